"""Trust at the edge (issue 10): streams bound to their call, sessions that end, calls that
stay ended, malformed requests refused cleanly. Real engines, real HTTP and WebSockets,
signed by the real twilio SDK; the history is a real SQLite file."""

from __future__ import annotations

import asyncio
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from engine.app import Engine
from engine.bus.events import CallStarted, UsageCost
from engine.config import Config
from engine.hub import OpsHub
from engine.record.history import CallHistory
from engine.sim.scenario import Scenario, Step
from engine.telephony.signature import sign
from engine.telephony.stream_token import StreamTokens
from tests.harness import ACCOUNT_SID, AUTH_TOKEN, EventLog, RunningEngine, running_engine
from tests.test_telephony_edge import (
    VOICE_FORM,
    RawStream,
    post_voice,
    started_stream,
    stream_parameters,
    twilio_signature,
    wait_until,
)


async def engine_with_history(config: Config) -> Engine:
    """The plain engine (greeting only, espeak) with a real call history."""
    history = CallHistory(config.data_path() / "history.sqlite3", engine_id="edge-test")
    await history.open()
    engine = Engine(config, hub=OpsHub.from_config(config, history))
    engine.on_stopping.append(history.aclose)
    return engine


def listen() -> Scenario:
    """A caller who hears the greeting, stays a moment, hangs up."""
    return Scenario(name="listen", steps=[Step(pause=0.3)])


def history_of(run: RunningEngine) -> CallHistory:
    history = run.engine.hub.history
    assert history is not None
    return history


async def signed_voice(run: RunningEngine, call_sid: str) -> tuple[int, str]:
    form = dict(VOICE_FORM, CallSid=call_sid)
    status, _, body = await post_voice(run, twilio_signature(run.url + "/twilio/voice", form),
                                       form)
    return status, body


async def received_until_closed(ws: aiohttp.ClientWebSocketResponse) -> list[str]:
    """The text frames the engine sent before it closed the socket."""
    texts: list[str] = []
    async with asyncio.timeout(5):
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                texts.append(msg.data)
    return texts


def warnings_about(logs: list[MutableMapping[str, Any]], call_sid: str
                   ) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e.get("call_sid") == call_sid
            and e["log_level"] in ("warning", "error", "critical")]


# -- 1. a stream is bound to its call ------------------------------------------------------


async def test_made_up_call_with_a_captured_handshake_is_refused_and_not_billed(
        tmp_path: Path) -> None:
    async with running_engine(tmp_path, engine_with_history) as run:
        events = EventLog(run)
        # A real call first: its handshake signature is the one an attacker captures.
        real = run.caller()
        await real.run(listen())
        assert real.result.error is None and real.result.frames_received > 50
        fake = RawStream(run, "CA" + "e0" * 16)  # never had a webhook
        with capture_logs() as logs:
            ws = await fake.open(webhook=False)
            await ws.send_str(fake.start_msg())
            for _ in range(20):  # whatever audio it sends is never heard by an AI
                if ws.closed:
                    break
                await ws.send_str(fake.media_msg(b"\xff" * 160))
            frames = await received_until_closed(ws)
        await fake.close()
        assert ws.close_code == 1008
        assert frames == []  # no greeting
        refused = warnings_about(logs, fake.call_sid)
        assert [e["event"] for e in refused] == ["media.stream_refused"]  # logged once
        assert refused[0]["reason"] == "unbound_stream"
        assert run.engine.bad_messages["unbound_stream"] == 1
        assert run.engine.registry.get_any(fake.call_sid) is None
        await run.engine.hub.drain()
        assert await history_of(run).get_call(fake.call_sid) is None
        assert await history_of(run).bill(fake.call_sid) == []
        assert not [e for e in events.events if getattr(e, "call_sid", "") == fake.call_sid]
        assert any(isinstance(e, UsageCost) and e.call_sid == real.call_sid
                   for e in events.events)  # the real call was billed, as it should be
        async with aiohttp.ClientSession() as http, http.get(run.url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'switchboard_bad_messages_total{reason="unbound_stream"} 1.0' in metrics
        await events.close()


async def test_close_reason_says_why_and_a_wrong_or_foreign_token_is_refused(
        tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        # Call A had its webhook; B too. B's stream presents A's token, then a made-up one.
        a, b = "CA" + "a0" * 16, "CA" + "b0" * 16
        token_a = stream_parameters((await signed_voice(run, a))[1])["streamToken"]
        await signed_voice(run, b)
        for token in (token_a, "0" * 64, token_a.upper()):
            raw = RawStream(run, b, token)
            ws = await raw.open(webhook=False)
            await ws.send_str(raw.start_msg())
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (1008, "stream not bound to its call")
            await raw.close()
        assert run.engine.bad_messages["unbound_stream"] == 3
        # Neither call was touched: B still waits for its own stream.
        session_b = run.engine.registry.get(b)
        assert session_b is not None and session_b.stream_sid is None and not session_b.ended
        # ... which is served.
        own = RawStream(run, b, run.engine.stream_tokens.issue(b, ACCOUNT_SID))
        ws = await own.open(webhook=False)
        await ws.send_str(own.start_msg())
        await wait_until(lambda: session_b.stream_sid is not None)
        await own.close()


async def test_a_valid_token_is_served_by_a_restarted_or_another_engine(
        tmp_path: Path) -> None:
    call_sid = "CA" + "c0" * 16
    async with running_engine(tmp_path / "first") as first:
        status, twiml = await signed_voice(first, call_sid)
        assert status == 200
        token = stream_parameters(twiml)["streamToken"]
    # The first engine is gone; the stream reaches another one sharing the auth token.
    async with running_engine(tmp_path / "second") as second:
        raw = RawStream(second, call_sid, token)
        ws = await raw.open(webhook=False)
        await ws.send_str(raw.start_msg())
        greeting = 0
        async with asyncio.timeout(5):
            while greeting < 25:
                msg = await ws.receive()
                assert msg.type is aiohttp.WSMsgType.TEXT, msg
                greeting += '"event":"media"' in msg.data
        session = second.engine.registry.get(call_sid)
        assert session is not None and session.state.value == "ai"
        assert second.engine.bad_messages == {}
        await raw.close()
        assert await session.wait_ended(3)
    # An engine with another stream secret does not take it.
    async with running_engine(tmp_path / "third", engine={"stream_secret": "other"}) as third:
        raw = RawStream(third, call_sid, token)
        ws = await raw.open(webhook=False)
        await ws.send_str(raw.start_msg())
        await ws.receive(timeout=5)
        assert ws.close_code == 1008
        assert third.engine.registry.get_any(call_sid) is None
        await raw.close()


def test_stream_tokens_follow_the_shared_secret(tmp_path: Path) -> None:
    from tests.harness import make_config

    def tokens(**engine: Any) -> StreamTokens:
        twilio = {"auth_token": engine.pop("auth_token", AUTH_TOKEN)}
        return StreamTokens.from_config(make_config(tmp_path, 1, engine=engine,
                                                    twilio=twilio))

    sid = "CA" + "d0" * 16
    derived = tokens().issue(sid, ACCOUNT_SID)
    assert derived == tokens().issue(sid, ACCOUNT_SID)  # another engine, same auth token
    assert derived != tokens(auth_token="another-account-token").issue(sid, ACCOUNT_SID)
    assert derived not in (AUTH_TOKEN, "") and len(derived) == 64
    assert derived != tokens().issue("CA" + "d1" * 16, ACCOUNT_SID)
    assert derived != tokens().issue(sid, "AC" + "00" * 16)
    # With SWITCHBOARD_STREAM_SECRET the auth token no longer matters.
    shared = tokens(stream_secret="fleet").issue(sid, ACCOUNT_SID)
    assert shared == tokens(stream_secret="fleet", auth_token="x").issue(sid, ACCOUNT_SID)
    assert shared != derived
    assert tokens().valid(sid, ACCOUNT_SID, derived)
    assert not tokens().valid(sid, ACCOUNT_SID, derived[:-1])
    assert not tokens().valid(sid, ACCOUNT_SID, "é" * 64)  # not ASCII: refused, no error


async def test_say_then_reconnect_twiml_carries_the_token(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        assert run.engine.control is not None
        call_sid = "CA" + "f1" * 16
        await run.engine.control.say_then_reconnect(call_sid, "One moment.", "+1555", "+1666")
        twiml = run.rest.updates_for(call_sid)[-1].form["Twiml"]
    params = stream_parameters(twiml)
    assert run.engine.stream_tokens.valid(call_sid, ACCOUNT_SID, params["streamToken"])


# -- 2. sessions that end, calls that stay ended ---------------------------------------------


async def test_webhook_without_a_stream_ends_after_start_timeout(tmp_path: Path) -> None:
    async with running_engine(tmp_path, engine_with_history,
                              engine={"start_timeout_s": 0.4}) as run:
        call_sid = "CA" + "10" * 16
        assert (await signed_voice(run, call_sid))[0] == 200
        session = run.engine.registry.get(call_sid)
        assert session is not None and session.state.value == "connected"
        assert await session.wait_ended(3)
        assert session.end_reason == "no media stream"
        assert 0.35 <= session.ended_at - session.created_at < 1.5  # type: ignore[operator]
        assert run.engine.registry.get(call_sid) is None and len(run.engine.registry) == 0
        await run.engine.hub.drain()
        stored = await history_of(run).get_call(call_sid)
    assert stored is not None and stored.end_reason == "no media stream"
    assert stored.state == "ended"


async def test_duration_cap_runs_from_the_webhook(tmp_path: Path) -> None:
    async with running_engine(tmp_path, engine={"max_call_seconds": 1.0,
                                                "start_timeout_s": 5.0}) as run:
        # No stream at all: the cap still ends it.
        idle = "CA" + "11" * 16
        await signed_voice(run, idle)
        idle_session = run.engine.registry.get(idle)
        assert idle_session is not None
        # A stream that starts late: the cap counts from the webhook, not the stream.
        raw = RawStream(run, "CA" + "12" * 16)
        with capture_logs() as logs:
            webhook_at = time.monotonic()
            ws = await raw.open()
            await asyncio.sleep(0.7)
            await ws.send_str(raw.start_msg())
            await wait_until(lambda: any(e["event"] == "call.duration_cap"
                                         and e.get("call_sid") == raw.call_sid
                                         for e in logs), timeout=5)
            cap_after = time.monotonic() - webhook_at
        assert 0.9 <= cap_after < 1.5, cap_after  # from the attach it would be >= 1.7
        assert await idle_session.wait_ended(1)
        assert idle_session.end_reason == "duration cap reached"
        await raw.close()


async def test_a_refused_stream_ends_the_call_that_waited_for_it(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        raw = RawStream(run, "CA" + "13" * 16)
        ws = await raw.open()
        session = run.engine.registry.get(raw.call_sid)
        assert session is not None
        await ws.send_str(raw.start_msg(encoding="audio/l16"))
        msg = await ws.receive(timeout=5)
        assert (msg.data, msg.extra) == (1003, "unsupported media format")
        assert await session.wait_ended(3)
        assert session.end_reason == "media stream refused: unsupported media format"
        await raw.close()


async def test_a_duplicate_stream_is_refused_and_the_live_call_goes_on(
        tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        first, ws1, session = await started_stream(run, "CA" + "14" * 16)
        second = RawStream(run, first.call_sid, first.token)  # same call, same token
        ws2 = await second.open(webhook=False)
        await ws2.send_str(second.start_msg())
        msg = await ws2.receive(timeout=5)
        assert (msg.data, msg.extra) == (1008, "call already has a media stream")
        assert not session.ended and not ws1.closed
        await ws1.send_str(first.media_msg(b"\xff" * 160))
        await wait_until(lambda: session.stats.frames_in == 1)
        await second.close()
        await first.close()


async def test_replayed_webhook_of_an_ended_call_does_not_revive_it(tmp_path: Path) -> None:
    async with running_engine(tmp_path, engine_with_history,
                              engine={"ended_call_retention_s": 0.05}) as run:
        events = EventLog(run)
        caller = run.caller()
        result = await caller.run(listen())
        assert result.error is None
        call_sid = caller.call_sid
        history = history_of(run)
        await run.engine.hub.drain()
        ended = await history.get_call(call_sid)
        assert ended is not None and ended.ended_at is not None
        await asyncio.sleep(0.1)  # past the in-memory retention
        # The webhook exactly as Twilio signed it, replayed.
        form = {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "From": "+15550100001",
                "To": "+15550100000", "CallStatus": "ringing", "ApiVersion": "2010-04-01",
                "Direction": "inbound"}
        signature = twilio_signature(run.url + "/twilio/voice", form)
        with capture_logs() as logs:
            for _ in range(2):
                status, ctype, body = await post_voice(run, signature, form)
                assert status == 200 and ctype.startswith("text/xml")
                root = ET.fromstring(body)
                assert root.find("./Hangup") is not None and root.find("./Connect") is None
            # A stream with the call's real token, replayed too: refused.
            raw = RawStream(run, call_sid, run.engine.stream_tokens.issue(call_sid,
                                                                          ACCOUNT_SID))
            ws = await raw.open(webhook=False)
            await ws.send_str(raw.start_msg())
            msg = await ws.receive(timeout=5)
            assert (msg.data, msg.extra) == (1008, "call already ended")
            await raw.close()
        assert [e["event"] for e in warnings_about(logs, call_sid)] == [
            "webhook.voice_for_ended_call", "webhook.voice_for_ended_call",
            "media.stream_refused"]
        assert run.engine.registry.get_any(call_sid) is None
        assert len(run.engine.registry) == 0
        await run.engine.hub.drain()
        after = await history.get_call(call_sid)
        assert after == ended  # not started again, not reopened
        assert sum(isinstance(e, CallStarted) and e.call_sid == call_sid
                   for e in events.events) == 1
        await events.close()


# -- 3. malformed requests: a 4xx and one warning line ---------------------------------------


@pytest.fixture
def aiohttp_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    return caplog


async def _big_body(size: int) -> AsyncIterator[bytes]:
    chunk = b"A" * 65536
    for _ in range(size // len(chunk)):
        yield chunk


MALFORMED: dict[str, dict[str, Any]] = {
    "not utf-8": {"data": b"CallSid=CA\xff\xfe\xfd&From=%ff%fe\xc3\x28",
                  "headers": {"Content-Type": "application/x-www-form-urlencoded"},
                  "status": 403, "event": "webhook.bad_signature"},
    "broken multipart": {"data": b"--xx\r\nContent-Disposition: form-data; name=\"CallSid\""
                                 b"\r\n\r\nCA1\r\n--yy",
                         "headers": {"Content-Type": "multipart/form-data; boundary=xx"},
                         "status": 415, "event": "webhook.bad_request"},
    "10 MB with a length": {"data": b"A" * (10 * 1024 * 1024),
                            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
                            "status": 413, "event": "webhook.body_too_large"},
    "10 MB chunked": {"data": "chunked",
                      "headers": {"Content-Type": "application/x-www-form-urlencoded"},
                      "status": 413, "event": "webhook.body_too_large"},
    "a json body": {"data": b'{"CallSid": "CA1"}',
                    "headers": {"Content-Type": "application/json"},
                    "status": 415, "event": "webhook.bad_request"},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_webhooks_get_a_4xx_and_one_warning(
        tmp_path: Path, case: str, aiohttp_logs: pytest.LogCaptureFixture) -> None:
    spec = MALFORMED[case]
    async with running_engine(tmp_path) as run:
        # A valid signature changes nothing: the body is refused before it is trusted.
        headers = dict(spec["headers"], **{
            "X-Twilio-Signature": twilio_signature(run.url + "/twilio/voice", VOICE_FORM)})
        async with aiohttp.ClientSession() as http:
            for path in ("/twilio/voice", "/twilio/status", "/twilio/stream-status"):
                data = _big_body(10 * 1024 * 1024) if spec["data"] == "chunked" \
                    else spec["data"]
                with capture_logs() as logs:
                    async with http.post(run.url + path, data=data,
                                         headers=headers) as resp:
                        assert resp.status == spec["status"], (path, await resp.text())
                noted = [e for e in logs if e["log_level"] != "debug"]
                assert [(e["event"], e["log_level"]) for e in noted] == [
                    (spec["event"], "warning")], noted
                assert not any("exc_info" in e or "exception" in e for e in logs)
        assert run.engine.registry.live() == []
    # aiohttp itself logged no error and no traceback.
    assert not [r for r in aiohttp_logs.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_too_large_says_so(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run, aiohttp.ClientSession() as http:
        with capture_logs() as logs:
            async with http.post(run.url + "/twilio/voice", data=b"A" * 100_000,
                                 headers={"Content-Type":
                                          "application/x-www-form-urlencoded"}) as resp:
                assert resp.status == 413
        (line,) = [e for e in logs if e["log_level"] == "warning"]
        assert line["event"] == "webhook.body_too_large"
        assert line["size"] == 100_000 and line["limit"] == 64 * 1024
        assert run.engine.bad_messages == {"body_too_large": 1}


async def test_get_webhook_with_broken_query_and_plain_get_on_media(
        tmp_path: Path, aiohttp_logs: pytest.LogCaptureFixture) -> None:
    async with running_engine(tmp_path) as run, aiohttp.ClientSession() as http:
        with capture_logs() as logs:
            async with http.get(run.url + "/twilio/voice?CallSid=%ff%fe&From=%c3%28",
                                headers={"X-Twilio-Signature": "x"}) as resp:
                assert resp.status == 403
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "webhook.bad_signature"]
        # The media URL with a valid handshake signature, but not a WebSocket upgrade.
        sig = sign(AUTH_TOKEN, run.config.media_stream_url())
        with capture_logs() as logs:
            async with http.get(run.url + "/twilio/media",
                                headers={"X-Twilio-Signature": sig}) as resp:
                assert resp.status == 400
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "media.bad_handshake"]
    assert not [r for r in aiohttp_logs.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_oversized_websocket_message_is_logged_as_oversized(tmp_path: Path) -> None:
    async with running_engine(tmp_path, engine={"max_message_bytes": 4096}) as run:
        raw, ws, session = await started_stream(run, "CA" + "15" * 16)
        with capture_logs() as logs:
            await ws.send_str(raw.media_msg(b"\xff" * 8000))
            await received_until_closed(ws)  # the greeting plays until then
            assert await session.wait_ended(3)
        assert ws.close_code == 1009
        warned = [e for e in logs if e["log_level"] == "warning"]
        assert [(e["event"], e.get("reason")) for e in warned] == [
            ("media.bad_message", "oversized_message")]
        assert "oversized message" in warned[0]["detail"]
        assert session.end_reason == "oversized message"
        await raw.close()
