"""A/B experiment on real simulated calls: two variants that differ by construction.

Variant "slow" waits 3.5 s of silence before it answers (no semantic endpointing), the
control ends a complete sentence after 0.2 s: every voice-to-voice time of "slow" is
longer by construction. The calls go through the real engine (local speech models,
SQLite history); the test checks each caller's assignment, what was recorded, and that
the verdict finds the difference (and none where there is none).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from engine.app import Engine
from engine.bus.events import CallUpdated
from engine.config import Config
from engine.config.experiments import Experiments
from engine.experiments.assignment import Assigner
from engine.experiments.compare import compare
from engine.experiments.outcomes import read_outcomes
from engine.experiments.report import build_experiments_report, render_experiments
from engine.sim.scenario import Scenario, Step
from tests.harness import EventLog, base_sections, make_local_engine, running_engine

EXPERIMENT: dict[str, Any] = {
    "name": "endpointing", "control": "quick",
    "guard_rails": {"enabled": False},
    "variants": [
        {"name": "quick", "weight": 1},
        {"name": "slow", "weight": 1,
         "turns": {"semantic_endpointing": False, "endpoint_silence_ms": 3500}},
    ],
}


def _numbers(assigner: Assigner, per_variant: int) -> dict[str, str]:
    """Caller numbers, `per_variant` of each variant (number -> expected variant)."""
    found: dict[str, str] = {}
    counts = {v.name: 0 for v in assigner.experiment.variants}
    n = 0
    while min(counts.values()) < per_variant:
        n += 1
        number = f"+1555020{n:04d}"
        assignment = assigner.assign(number)
        assert assignment is not None
        if counts[assignment.variant] < per_variant:
            counts[assignment.variant] += 1
            found[number] = assignment.variant
    return found


async def _engine(config: Config) -> Engine:
    experiments = TypeAdapter(Experiments).validate_python([EXPERIMENT])
    return await make_local_engine(config.model_copy(update={"experiments": experiments}),
                                   history=True)


async def test_two_variants_on_real_calls_the_verdict_finds_the_slower_one(
        tmp_path: Path) -> None:
    experiment = TypeAdapter(Experiments).validate_python([EXPERIMENT])[0]
    numbers = _numbers(Assigner(experiment), per_variant=4)
    async with running_engine(tmp_path, make_engine=_engine, **base_sections()) as run:
        events = EventLog(run)
        sids: dict[str, str] = {}

        async def one_call(number: str) -> None:
            caller = run.caller()
            sids[caller.call_sid] = number
            result = await asyncio.wait_for(caller.run(Scenario(
                name="ab", **{"from": number},
                steps=[Step(say="What are your opening hours?")])), 90)
            assert result.error is None, result.error

        pending = list(numbers)
        while pending:  # two at a time: the machine's two cores
            batch, pending = pending[:2], pending[2:]
            await asyncio.gather(*(one_call(n) for n in batch))
        runner = run.engine.hub.commands.experiments
        assert runner is not None
        await asyncio.sleep(0.5)  # the engine's side of the last hang-ups
        await runner.drain()  # each ended call's outcome is written
        await run.engine.hub.drain()
        history = run.engine.hub.history
        assert history is not None
        outcomes = await history.read(lambda: read_outcomes("endpointing", 0, 1e12))
        snapshot = {c.call_sid: c.variant for c in run.engine.hub.snapshot().calls}
        await events.close()

    # Every caller got the variant its number hashes to: in the event and the history.
    labels = {e.call_sid: e.variant for e in events.events
              if isinstance(e, CallUpdated) and e.variant}
    for sid, number in sids.items():
        assert labels[sid] == f"endpointing/{numbers[number]}"
        assert snapshot[sid] == labels[sid]  # a console connecting later sees it too
    recorded = {c.call_sid: name for name, o in outcomes.items() for c in o.calls}
    assert recorded == {sid: numbers[number] for sid, number in sids.items()}
    assert {name: len(o.calls) for name, o in outcomes.items()} == {"quick": 4, "slow": 4}
    # A turn the recognizer got wrong is asked again (a misunderstood turn), not timed.
    assert all(len(o.v2v_s) + o.misunderstood_turns >= 4 for o in outcomes.values())

    comparison = compare("endpointing", "quick", outcomes, ["quick", "slow"])
    slower = comparison.verdicts["slow"]["v2v_p50_s"]
    assert slower.significant and slower.direction == "worse", slower
    assert slower.test == "bootstrap CI of the difference"
    assert slower.diff is not None and slower.diff > 1.0, slower
    # Nobody was handed off in either arm: no difference there.
    escalation = comparison.verdicts["slow"]["escalation_rate"]
    assert not escalation.significant and escalation.text.startswith("no difference yet")

    # The command's report reads the same history file.
    report = build_experiments_report(tmp_path / "data" / "history.sqlite3", [experiment],
                                      since=timedelta(days=1))
    table = render_experiments(report)
    assert "slow worse at 95 %" in table, table
