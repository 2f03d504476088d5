"""`switchboard demo --headless`: the newcomer's first command, end to end."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from engine.config import load_config
from switchboard.demo import demo_config, load_scenarios, run_demo

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_bundled_scenarios_load_and_cover_the_cases() -> None:
    names = {s.name for s in load_scenarios()}
    assert {"opening-hours", "barge-in", "wants-a-person", "presses-zero",
            "long-call"} <= names


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
