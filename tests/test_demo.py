"""`switchboard demo --headless`: the newcomer's first command, end to end."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest

from engine.bus.events import CallEnded, CallStarted, TranscriptLine
from engine.config import load_config
from engine.sim.call_result import CallResult, SaidLine
from engine.sim.scenario import Scenario, Step
from engine.sim.scoring import AnswerKey
from switchboard.demo import demo_config, load_scenarios, run_demo
from switchboard.demo_watch import DemoWatcher, score_lines

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_bundled_scenarios_load_and_cover_the_cases() -> None:
    names = {s.name for s in load_scenarios()}
    assert {"opening-hours", "barge-in", "wants-a-person", "presses-zero",
            "long-call"} <= names
    assert "off-topic" in names  # questions the FAQ does not cover


def test_demo_config_is_self_contained(tmp_path: Path) -> None:
    config = load_config(ROOT / "config.toml", env={"SWITCHBOARD_DATA_DIR": str(tmp_path)})
    demo = demo_config(config)
    assert demo.engine.host == "127.0.0.1" and demo.console_api.host == "127.0.0.1"
    assert demo.twilio.auth_token.get_secret_value()  # signatures stay on, with a demo token
    assert not demo.engine.allow_unsigned_requests
    assert demo.transfer.number and demo.data_path() == tmp_path / "demo"


async def test_headless_demo_runs_calls_and_prints_a_summary(tmp_path: Path) -> None:
    config = load_config(ROOT / "config.toml", env={"SWITCHBOARD_DATA_DIR": str(tmp_path)})
    config.engine.port = 0
    config.console_api.port = 0
    out = io.StringIO()
    code = await run_demo(config, headless=True, calls=3, duration_s=20, out=out,
                          configure_logs=False)
    text = out.getvalue()
    assert code == 0, text
    assert "Summary" in text and "calls completed" in text
    assert "agent: Hello, thank you for calling" in text
    assert "caller:" in text and "voice-to-voice" in text
    # The history the demo wrote is what `switchboard report` reads.
    assert (tmp_path / "demo" / "history.sqlite3").exists()


async def test_headless_demo_logs_to_a_file_and_scores_its_callers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(ROOT / "config.toml", env={"SWITCHBOARD_DATA_DIR": str(tmp_path)})
    config.engine.port = 0
    config.console_api.port = 0
    out = io.StringIO()
    code = await run_demo(config, headless=True, calls=2, duration_s=15, out=out)
    text = out.getvalue()
    assert code == 0, text
    log_file = tmp_path / "demo" / "demo-engine.log"
    assert text.rstrip().endswith(f"Log lines of this demo: {log_file}")
    assert '"event": "engine.started"' in log_file.read_text()  # the engine's lines went there
    terminal = capsys.readouterr()
    assert "engine.started" not in terminal.err + terminal.out
    assert "[" in text and "caller:" in text and "{" not in text  # no JSON log line
    # The callers are scored: each line recognized (word error rate), each answer checked.
    assert "Caller turns (scripted -> recognized" in text
    assert re.search(r"word error rate \d+\.\d% over \d+ words", text), text
    assert "in-scope questions" in text and "out-of-scope questions" in text


def test_caller_turns_are_matched_to_what_was_heard_and_answered() -> None:
    config = load_config(ROOT / "config.toml", env={})
    faq = {e.id: e.answer for e in config.faq.entries}
    watcher = DemoWatcher(None)
    result = CallResult("CA1", "MZ1")
    scenario = Scenario(name="scored", steps=[
        Step(say="What is your return policy?", expect="returns"),
        Step(say="Sorry, actually, where is my order?", expect="order_status"),
        Step(say="Hi, I have a few questions. How much is the basic plan?", expect="pricing"),
        Step(say="Do you sell gift cards?", expect="none"),
        Step(say="When are you open on Saturdays?", expect="hours"),
        Step(say="Goodbye."),
    ])

    def hear(speaker: str, text: str, interrupted: bool = False) -> None:
        watcher.handle(TranscriptLine(call_sid="CA1", speaker=speaker, text=text,  # type: ignore[arg-type]
                                      line_id=f"l{len(watcher.calls['CA1'].lines)}",
                                      interrupted=interrupted))

    def say(text: str) -> None:
        now = time.monotonic()
        result.lines.append(SaidLine(text, now, now, False))

    watcher.scenario_of["+15550100001"] = "scored"
    watcher.handle(CallStarted(call_sid="CA1", from_number="+15550100001"))
    hear("agent", config.engine.greeting)
    say("What is your return policy?")
    hear("caller", "What is your return policy?")
    say("Sorry, actually, where is my order?")  # a barge-in: the cut answer comes after
    hear("agent", "You can return any device within 30 days…", interrupted=True)
    hear("caller", "Sorry, actually, where's my order?")
    hear("agent", faq["order_status"])
    say("Hi, I have a few questions. How much is the basic plan?")  # heard as two turns
    hear("caller", "Hi, I have a few questions.")
    hear("agent", "Hello, this is Acme Telecom. How can I help you today?")
    hear("caller", "How much is the basic plan?")
    hear("agent", faq["pricing"])
    say("Do you sell gift cards?")
    hear("caller", "Do you sell guest cards?")
    hear("agent", config.faq.unknown_answer)
    say("When are you open on Saturdays?")
    hear("caller", "When are you open on Saturdays?")
    hear("agent", config.policy.cost_cap_line)
    say("Goodbye.")  # cut by the end of the call: not heard, not scored
    watcher.handle(CallEnded(call_sid="CA1", reason="transferred"))

    scores = watcher.score([(scenario, result)], AnswerKey(config),
                           config.policy.cost_cap_line)
    assert [(s.answered, s.errors.errors, s.right) for s in scores] == [
        ("returns", 0, True), ("order_status", 0, True), ("pricing", 0, True),
        (None, 1, True), (None, 0, None)]
    assert scores[2].heard == "Hi, I have a few questions. How much is the basic plan?"
    assert scores[4].cost_cap
    summary = "\n".join(score_lines(scores))
    assert "[          scored] 'Do you sell gift cards?' -> 'Do you sell guest cards?'" in summary
    assert "recognized as scripted 4 of 5 caller turns; word error rate 2.9% over 34" in summary
    assert "in-scope questions     3 of 3 answered right (100%" in summary
    assert "out-of-scope questions 0 of 1 answered with an FAQ entry" in summary
    assert "1 more reached the cost cap" in summary
