"""Experiments: config checks, assignment, the statistics against known values, verdicts
and guard rails over history rows (an A/A finds nothing; a worse arm is paused)."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from engine.bus.events import Alert
from engine.config import Config, load_config
from engine.config.experiments import ExperimentConfig, Experiments
from engine.experiments import stats
from engine.experiments.assignment import Assigner
from engine.experiments.compare import compare
from engine.experiments.outcomes import CallOutcome, VariantOutcomes, read_outcomes
from engine.experiments.report import (
    build_experiments_report,
    build_fleet_experiments_report,
    render_experiments,
)
from engine.experiments.runner import ExperimentRunner
from engine.experiments.variants import variant_config
from engine.hub import OpsHub
from engine.record.history import CallHistory
from engine.session.records import TurnRecord, TurnTimings
from tests.history_backends import HistoryBackend

ROOT = Path(__file__).resolve().parent.parent


def experiment(**extra: Any) -> ExperimentConfig:
    raw = {"name": "voice", "variants": [{"name": "A"}, {"name": "B", "voice": ["espeak"]}]}
    return ExperimentConfig.model_validate({**raw, **extra})


# -- config ---------------------------------------------------------------------------------


def test_the_shipped_example_and_overrides_validate() -> None:
    config = load_config(ROOT / "config.toml")
    assert all(isinstance(e, ExperimentConfig) for e in config.experiments)
    exp = experiment(variants=[
        {"name": "A"},
        {"name": "B", "voice": ["espeak"], "system_prompt": "Be brief.",
         "providers": {"espeak": {"rate_wpm": 190}}, "turns": {"endpoint_silence_ms": 700}}])
    assert exp.control == "A"  # the first, unless named
    merged = variant_config(Config(), exp.variants[1])
    assert merged.providers.tts == ["espeak"]
    assert merged.policy.system_prompt == "Be brief."
    assert merged.turns.endpoint_silence_ms == 700
    assert (merged.providers.model_extra or {})["espeak"].rate_wpm == 190
    assert Config().turns.endpoint_silence_ms != 700  # the engine's own config is untouched


@pytest.mark.parametrize(("variant", "message"), [
    ({"name": "B", "colour": "red"}, "colour"),
    ({"name": "B", "turns": {"endpoint_silence": 1}}, "unknown turns setting"),
    ({"name": "B", "voice": ["nope"]}, "unknown tts provider 'nope'"),
    ({"name": "B", "providers": {"nope": {}}}, "unknown provider table"),
    ({"name": "B", "providers": {"espeak": {"rate": 3}}}, "providers.espeak"),
    ({"name": "B", "weight": -1}, "weight"),
])
def test_bad_overrides_are_refused_at_start(variant: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ExperimentConfig.model_validate({"name": "x", "variants": [{"name": "A"}, variant]})


def test_experiment_level_mistakes_are_refused() -> None:
    with pytest.raises(ValidationError, match="control 'C'"):
        experiment(control="C")
    with pytest.raises(ValidationError, match="weights add up to 0"):
        experiment(variants=[{"name": "A", "weight": 0}, {"name": "B", "weight": 0}])
    with pytest.raises(ValidationError, match="only one may be enabled"):
        TypeAdapter(Experiments).validate_python([
            {"name": "one", "variants": [{"name": "A"}, {"name": "B"}]},
            {"name": "two", "variants": [{"name": "A"}, {"name": "B"}]}])


# -- assignment -----------------------------------------------------------------------------


def test_assignment_is_stable_weighted_and_skips_paused_variants() -> None:
    exp = experiment(variants=[{"name": "A", "weight": 3}, {"name": "B", "weight": 1}])
    assigner = Assigner(exp)
    numbers = [f"+1555{n:07d}" for n in range(4000)]
    first = {n: assigner.assign(n) for n in numbers}
    assert all(Assigner(exp).assign(n) == first[n] for n in numbers[:200])  # same every time
    share_b = sum(a is not None and a.variant == "B" for a in first.values()) / len(numbers)
    assert 0.22 < share_b < 0.28  # weight 1 of 4
    assert assigner.pause("B", "test")
    after = {n: assigner.assign(n) for n in numbers}
    assert all(a is not None and a.variant == "A" for a in after.values())
    # Callers of the variant still running keep it.
    assert all(after[n] == a for n, a in first.items() if a is not None and a.variant == "A")
    assert assigner.resume("B") and assigner.assign(numbers[0]) == first[numbers[0]]
    # No number: random, both arms reachable.
    seeded = Assigner(exp, rng=random.Random(1))
    assert {seeded.assign("").variant for _ in range(50)} == {"A", "B"}  # type: ignore[union-attr]


# -- statistics against known values --------------------------------------------------------


def test_wilson_interval_known_values() -> None:
    interval = stats.wilson(8, 10)
    assert interval is not None
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.4902, 0.9433)
    zero = stats.wilson(0, 20)
    assert zero is not None and zero.low == 0.0 and round(zero.high, 4) == 0.1611
    assert stats.wilson(0, 0) is None


def test_two_proportion_z_known_values() -> None:
    test = stats.two_proportion_z(10, 100, 20, 100)  # 10 % vs 20 %
    assert test is not None
    assert round(test.z, 4) == 1.9803 and round(test.p_value, 4) == 0.0477
    same = stats.two_proportion_z(5, 50, 5, 50)
    assert same is not None and same.z == 0 and same.p_value == 1.0


def test_bootstrap_is_seeded_and_covers_the_truth() -> None:
    rng = random.Random(7)
    values = [rng.gauss(1.0, 0.2) for _ in range(400)]
    first = stats.bootstrap(values, stats.mean_stat)
    assert first == stats.bootstrap(values, stats.mean_stat)  # reproducible output
    assert first is not None and first.low < 1.0 < first.high and first.high - first.low < 0.06
    diff = stats.bootstrap_diff(values, [v + 0.3 for v in values], stats.percentile_stat(95))
    assert diff is not None and diff.low > 0.2 and abs(diff.estimate - 0.3) < 1e-9
    ratio = stats.bootstrap(stats.pairs([1.0, 3.0], [2.0, 2.0]), stats.ratio_stat)
    assert ratio is not None and ratio.estimate == 1.0  # 4 USD over 4 minutes


def test_calls_needed_scales_with_the_observed_effect() -> None:
    # z = 1 with 100 per arm: (1.96 + 0.84)^2 = 7.85 times as many.
    assert stats.calls_needed(100, 1.0) == 785
    assert stats.calls_needed(100, 0.0) is None


# -- verdicts over generated outcomes -------------------------------------------------------


def outcomes(name: str, calls: int, escalation: float, v2v: float, seed: int
             ) -> VariantOutcomes:
    rng = random.Random(seed)
    found = VariantOutcomes(name)
    for i in range(calls):
        found.calls.append(CallOutcome(f"{name}{i}", rng.uniform(60, 180),
                                       rng.choice(["caller said goodbye", "caller hung up"]),
                                       rng.random() < escalation, rng.uniform(0.02, 0.06),
                                       int(rng.random() < 0.1)))
        for _ in range(3):
            found.v2v_s.append(rng.gauss(v2v, 0.15))
            found.answered_turns += 1
            found.agent_turns += 1
            found.interrupted_turns += int(rng.random() < 0.1)
    return found


def test_an_a_a_experiment_finds_no_difference() -> None:
    data = {"A": outcomes("A", 300, 0.1, 1.0, seed=1), "B": outcomes("B", 300, 0.1, 1.0, 2)}
    comparison = compare("aa", "A", data)
    verdicts = comparison.verdicts["B"]
    assert verdicts and not any(v.significant for v in verdicts.values()), verdicts
    assert all(v.text.startswith("no difference yet") for v in verdicts.values())


def test_a_worse_variant_is_found_with_the_test_named() -> None:
    data = {"A": outcomes("A", 200, 0.05, 1.0, seed=1), "B": outcomes("B", 200, 0.3, 1.4, 2)}
    verdicts = compare("ab", "A", data).verdicts["B"]
    escalation = verdicts["escalation_rate"]
    assert escalation.text == "B worse at 95 %" and escalation.test == "two-proportion z-test"
    assert escalation.p_value is not None and escalation.p_value < 0.001
    p95 = verdicts["v2v_p95_s"]
    assert p95.text == "B worse at 95 %" and p95.test == "bootstrap CI of the difference"


# -- guard rails and the report over a real history -----------------------------------------


async def _record(history: CallHistory, sid: str, variant: str, escalated: bool,
                  v2v: float, at: float) -> None:
    await history.call_started(sid, "+15550001111", "+15550000000", started_at=at)
    await history.variant_assigned(sid, "voice", variant)
    await history.turn_completed(sid, TurnRecord(idx=1, caller_text="hi", agent_text="hello",
                                                 timings=TurnTimings(voice_to_voice=v2v)),
                                 at=at + 5)
    await history.call_ended(sid, "caller said goodbye", 0.01, escalated=escalated,
                             ended_at=at + 60, duration_s=60.0)


async def test_guard_rail_pauses_a_variant_that_escalates_more(tmp_path: Path) -> None:
    exp = experiment(guard_rails={"min_calls": 20, "escalation_margin": 0.1})
    config = Config.model_validate({"engine": {"data_dir": str(tmp_path)}})
    history = CallHistory(tmp_path / "history.sqlite3", engine_id="t")
    await history.open()
    hub = OpsHub.from_config(config, history)
    seen: list[Alert] = []
    hub.publish = lambda event: seen.append(event) if isinstance(event, Alert) else None  # type: ignore[method-assign]
    now = time.time() - 3600
    for i in range(40):  # A hands off 1 call in 20, B 3 in 4
        await _record(history, f"CA-a{i}", "A", i % 20 == 0, 0.9, now + i)
        await _record(history, f"CA-b{i}", "B", i % 4 != 0, 0.9, now + i)
    runner = ExperimentRunner(exp, {}, None, hub)  # type: ignore[arg-type]
    breaches = await runner.check_guard_rails()
    assert [(b.variant, b.metric) for b in breaches] == [("B", "escalation_rate")]
    assert "B" in runner.paused and runner.assigner.assign("+15551234567").variant == "A"  # type: ignore[union-attr]
    assert len(seen) == 1 and seen[0].kind == "variant_paused"
    assert seen[0].data["variant"] == "B" and seen[0].data["by"] == "guard_rail"
    assert runner.pause("B", "again", "supervisor") == "variant B is already paused"
    assert runner.resume("B", "supervisor") is None and not runner.paused

    found = await history.read(lambda: read_outcomes("voice", 0, time.time()))
    assert {k: len(v.calls) for k, v in found.items()} == {"A": 40, "B": 40}
    await asyncio.sleep(0)
    await history.aclose()
    report = build_experiments_report(tmp_path / "history.sqlite3", [exp],
                                      since=timedelta(days=1))
    table = render_experiments(report)
    assert "experiment voice (control A)" in table
    assert "B worse at 95 % (two-proportion z-test)" in table
    for fmt in ("json", "csv"):
        assert "escalation_rate" in render_experiments(report, fmt)


async def test_supervisor_commands_pause_and_resume_a_variant() -> None:
    from engine.session.registry import CallRegistry
    from engine.supervision.api_schema import Command
    from engine.supervision.backend import Actor

    hub = OpsHub.from_config(Config())
    published: list[Any] = []
    hub.commands._publish = published.append  # type: ignore[method-assign]
    runner = ExperimentRunner(experiment(), {}, None, hub)  # type: ignore[arg-type]
    hub.commands.experiments = runner
    hub.commands.registry = CallRegistry(lambda *a: None, 60.0)  # type: ignore[arg-type,return-value]
    actor = Actor(name="ana", role="full")

    async def run(name: str, text: str) -> str | None:
        reply = await hub.commands.execute(
            Command(id="1", command=name, call_sid="CA-1", text=text), actor)  # type: ignore[arg-type]
        return reply.error

    assert await run("pause_variant", "voice/B") is None
    assert runner.paused == {"B": "paused by a supervisor"}
    assert await run("pause_variant", "voice/B") == "variant B is already paused"
    assert await run("pause_variant", "other/B") == "no running experiment 'other' on this engine"
    assert await run("resume_variant", "voice/B") is None and not runner.paused
    audits = [e for e in published if e.type == "command_audit"]
    assert [(a.command, a.ok) for a in audits] == [
        ("pause_variant", True), ("pause_variant", False), ("pause_variant", False),
        ("resume_variant", True)]
    assert audits[0].args["text"] == "voice/B"  # the variant, in the audit trail


async def test_variants_and_outcomes_on_both_backends(history_backend: HistoryBackend) -> None:
    history = history_backend.make(engine_id="e1")
    await history.open()
    now = time.time() - 600
    try:
        for i in range(6):
            await _record(history, f"CA-{i}", "AB"[i % 2], i == 1, 0.5 + i / 10, now + i)
        await history.variant_outcome("CA-1", "voice", 2)
        found = await history.read(lambda: read_outcomes("voice", now - 1, time.time()))
    finally:
        await history.aclose()
    assert {k: len(v.calls) for k, v in found.items()} == {"A": 3, "B": 3}
    b = found["B"]
    assert [c.escalated for c in b.calls] == [True, False, False]
    assert b.misunderstood_turns == 2 and b.caller_turns == 5 and b.agent_turns == 3
    assert b.v2v_s == pytest.approx([0.6, 0.8, 1.0])
    assert all(c.goodbye and c.cost_usd == pytest.approx(0.0) for c in b.calls)  # no lines
    if history_backend.kind == "postgres":
        report = await build_fleet_experiments_report(history_backend.dsn, [experiment()],
                                                      timedelta(days=1))
    else:
        report = build_experiments_report(history_backend.sqlite_path, [experiment()],
                                          timedelta(days=1))
    figures = report.comparisons[0].figures
    assert figures["A"]["calls"].value == 3 and figures["B"]["escalation_rate"].n == 3


def test_the_demo_runs_a_small_experiment() -> None:
    from switchboard.demo import demo_config

    config = demo_config(Config())
    assert [(e.name, e.enabled, len(e.variants)) for e in config.experiments] == [
        ("demo", True, 2)]
    assert not Config().experiments  # the engine's own config is untouched
