"""Private data (issue 10): the data directory is the owner's alone, and logs leave out
what the history keeps (caller numbers, transcripts). A real engine: its files are
stat'ed after real writes, and its log lines are the JSON it prints in production."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from engine.bus import events as ev
from engine.config import Config
from engine.log import configure_logging, mask_number
from engine.record.history import CallHistory
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.openai_api import OpenAIStandin
from engine.supervision.tokens import TOKEN_FILE_NAME
from engine.wiring import build_engine
from tests.harness import EventLog, RunningEngine, running_engine

NUMBER = "+15550142987"  # the caller's
SAID = "my secret word is zanzibar"  # what the caller said (the transcript)
ANSWERED = "Noted, quixotic friend."  # what the agent said
PIN = "4937"  # what the caller typed


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of `folder` ("." ) and of everything in it."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def cloud_sections(openai_url: str, **engine: Any) -> dict[str, Any]:
    return {"engine": {"greeting": "Hello.", **engine},
            "providers": {"stt": ["openai"], "agent": ["openai"], "tts": ["openai"],
                          "openai": {"api_key": "sk-test", "base_url": openai_url}},
            "cache": {"backend": "off"}}


async def engine_with_console(config: Config) -> Any:
    return await build_engine(config, supervisor_api=True)


async def engine_without_console(config: Config) -> Any:
    return await build_engine(config, supervisor_api=False)


def history_of(run: RunningEngine) -> CallHistory:
    history = run.engine.hub.history
    assert history is not None
    return history


# --- the data directory ------------------------------------------------------------------


async def test_a_new_data_dir_and_its_files_are_the_owners_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    previous = os.umask(0o022)  # the usual umask: files 0644 unless the engine says
    try:
        async with running_engine(tmp_path, make_engine=engine_with_console,
                                  **cloud_sections("http://127.0.0.1:9/v1")) as run:
            history = history_of(run)
            assert await history.call_started("CA1", NUMBER, "+15550100000")
            assert await history.call_ended("CA1", "caller hung up", 0.01)
            found = modes(data)  # while the engine runs: the WAL and its index exist
    finally:
        os.umask(previous)
    names = {"history.sqlite3", "history.sqlite3-wal", "history.sqlite3-shm",
             history.journal.name, TOKEN_FILE_NAME}
    assert names <= found.keys()
    assert found["."] == 0o700
    assert {name: mode for name, mode in found.items() if name != "."} == dict.fromkeys(
        found.keys() - {"."}, 0o600)


async def test_an_open_data_dir_is_tightened_at_start_with_one_warning(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    data = tmp_path / "data"
    data.symlink_to(volume)  # the data dir links to where the data is: that is tightened
    history = CallHistory(data / "history.sqlite3")  # a history from before the fix
    await history.open()
    await history.call_started("CA0", NUMBER, "+15550100000")
    await history.aclose()
    (data / TOKEN_FILE_NAME).write_text(secrets.token_urlsafe(32))
    (data / "exports").mkdir()
    (data / "exports" / "calls.csv").write_text(f"CA0,{NUMBER}\n")
    loose = ["history.sqlite3", history.journal.name, TOKEN_FILE_NAME, "exports",
             "exports/calls.csv"]
    for name in [".", *loose]:
        (data / name).chmod(0o755 if (data / name).is_dir() else 0o644)

    with capture_logs() as logs:
        async with running_engine(tmp_path, make_engine=engine_with_console,
                                  **cloud_sections("http://127.0.0.1:9/v1")):
            found = modes(data)
    warned = [e for e in logs if "permission" in e["event"]]
    assert [e["event"] for e in warned] == ["data_dir.permissions_tightened"]
    assert warned[0]["count"] == len(loose) + 1 and sorted(warned[0]["entries"]) == sorted(
        [".", *loose])
    assert found["."] == found["exports"] == 0o700
    assert all(mode == 0o600 for name, mode in found.items() if name not in (".", "exports"))


# --- the logs ----------------------------------------------------------------------------


@pytest.mark.parametrize("redact", [True, False], ids=["redacted", "not-redacted"])
async def test_logs_leave_out_the_callers_number_and_words_unless_told(
        tmp_path: Path, redact: bool) -> None:
    openai = OpenAIStandin(api_key="sk-test")
    openai.transcript, openai.reply = SAID, ANSWERED
    output = io.StringIO()
    configure_logging("info", "json", stream=output, redact=redact)
    try:
        async with running_engine(tmp_path, make_engine=engine_without_console,
                                  **cloud_sections(await openai.start())) as run:
            events = EventLog(run)
            caller = run.caller()
            result = await asyncio.wait_for(caller.run(Scenario.model_validate({
                "name": "secret", "voice": "en-us", "from": NUMBER,
                "steps": [Step(say="Please note my word."), Step(dtmf=PIN)]})), 60)
            assert result.error is None
            sid = caller.call_sid
            async with asyncio.timeout(10):
                while not any(isinstance(e, ev.CallEnded) for e in events.events):
                    await asyncio.sleep(0.05)
            await run.engine.hub.drain()
            await events.close()
            history = history_of(run)
            call = await history.get_call(sid)
            database = history.path
    finally:
        await openai.stop()
    with contextlib.closing(sqlite3.connect(database)) as conn:
        turns = conn.execute("SELECT caller_text, agent_text FROM turns WHERE call_sid = ?",
                             (sid,)).fetchall()
    # The history keeps everything, whatever the logs do.
    assert call is not None and call.from_number == NUMBER
    assert turns == [(SAID, ANSWERED)]

    text = output.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) > 10 and all(line["level"] != "debug" for line in lines)
    webhook = next(line for line in lines if line["event"] == "webhook.voice")
    said = [line["text"] for line in lines
            if line["event"] == "call.transcript" and line["speaker"] == "caller"
            and line["final"]]
    typed = [line["digit"] for line in lines if line["event"] == "call.dtmf"]
    if redact:
        for secret in (NUMBER, NUMBER[2:], "zanzibar", "quixotic"):
            assert secret not in text
        assert webhook["from_number"] == mask_number(NUMBER) == "+********987"
        assert said == [f"<{len(SAID)} chars>"]
        assert typed == ["<1 chars>"] * len(PIN)
    else:
        assert webhook["from_number"] == NUMBER
        assert said == [SAID] and "quixotic" in text
        assert "".join(typed) == PIN
