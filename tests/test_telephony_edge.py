"""The telephony edge against real HTTP/WebSocket traffic, signed by the real twilio SDK."""

from __future__ import annotations

import asyncio
import json
import statistics
import xml.etree.ElementTree as ET
from base64 import b64encode
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs
from twilio.request_validator import RequestValidator

from engine.session.call_session import CallSession
from engine.sim.caller import CallResult, SimulatedCaller
from engine.sim.scenario import Scenario, Step
from engine.telephony.signature import sign
from tests.harness import ACCOUNT_SID, AUTH_TOKEN, RunningEngine, running_engine

VOICE_FORM = {"CallSid": "CA" + "1" * 32, "AccountSid": ACCOUNT_SID, "From": "+15550001111",
              "To": "+15550002222", "CallStatus": "ringing", "ApiVersion": "2010-04-01",
              "Direction": "inbound"}


def twilio_signature(url: str, params: dict[str, str]) -> str:
    return str(RequestValidator(AUTH_TOKEN).compute_signature(url, params))


async def post_voice(run: RunningEngine, signature: str | None,
                     form: dict[str, str] | None = None) -> tuple[int, str, str]:
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    async with aiohttp.ClientSession() as http, http.post(
            run.url + "/twilio/voice", data=form or VOICE_FORM, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


# -- webhooks and signatures -------------------------------------------------------------


async def test_voice_webhook_valid_signature_answers_twiml(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        sig = twilio_signature(run.url + "/twilio/voice", VOICE_FORM)
        status, ctype, body = await post_voice(run, sig)
    assert status == 200
    assert ctype.startswith("text/xml")
    root = ET.fromstring(body)
    stream = root.find("./Connect/Stream")
    assert stream is not None
    port = run.config.engine.port
    assert stream.get("url") == f"ws://127.0.0.1:{port}/twilio/media"
    assert stream.get("statusCallback") == f"http://127.0.0.1:{port}/twilio/stream-status"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params["from"] == "+15550001111" and params["to"] == "+15550002222"


@pytest.mark.parametrize("signature", [None, "", "bm90IGEgc2lnbmF0dXJl"])
async def test_voice_webhook_missing_or_wrong_signature_is_403(tmp_path: Path,
                                                               signature: str | None) -> None:
    async with running_engine(tmp_path) as run:
        with capture_logs() as logs:
            status, _, _ = await post_voice(run, signature)
        assert status == 403
        assert any(e["event"] == "webhook.bad_signature" and e["log_level"] == "warning"
                   for e in logs)
        assert run.engine.registry.get(VOICE_FORM["CallSid"]) is None


async def test_signature_over_tampered_params_is_403(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        sig = twilio_signature(run.url + "/twilio/voice", VOICE_FORM)
        tampered = dict(VOICE_FORM, From="+19999999999")
        status, _, _ = await post_voice(run, sig, tampered)
    assert status == 403


async def test_behind_tls_proxy_signature_uses_public_url(tmp_path: Path) -> None:
    public = "https://voice.example.com"
    async with running_engine(tmp_path, public_url=public) as run:
        # Twilio signed the https URL it called; the engine sees plain http internally.
        good = twilio_signature(public + "/twilio/voice", VOICE_FORM)
        internal = twilio_signature(run.url + "/twilio/voice", VOICE_FORM)
        assert (await post_voice(run, internal))[0] == 403
        status, _, body = await post_voice(run, good)
    assert status == 200
    stream = ET.fromstring(body).find("./Connect/Stream")
    assert stream is not None
    assert stream.get("url") == "wss://voice.example.com/twilio/media"
    assert stream.get("statusCallback") == "https://voice.example.com/twilio/stream-status"


async def test_voice_webhook_configured_as_get_is_signed_over_the_query(
        tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        from urllib.parse import urlencode

        path = "/twilio/voice?" + urlencode(VOICE_FORM)
        sig = twilio_signature(run.url + path, {})
        async with aiohttp.ClientSession() as http:
            async with http.get(run.url + path, headers={"X-Twilio-Signature": sig}) as resp:
                assert resp.status == 200
                assert "<Stream" in await resp.text()
            async with http.get(run.url + path, headers={"X-Twilio-Signature": "x"}) as resp:
                assert resp.status == 403


async def test_signature_with_explicit_port_is_accepted(tmp_path: Path) -> None:
    public = "https://voice.example.com"
    async with running_engine(tmp_path, public_url=public) as run:
        # RequestValidator also accepts the :443 form Twilio sometimes signs.
        sig = twilio_signature("https://voice.example.com:443/twilio/voice", VOICE_FORM)
        assert (await post_voice(run, sig))[0] == 200


async def test_status_callbacks_need_signatures_and_end_calls(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        await post_voice(run, twilio_signature(run.url + "/twilio/voice", VOICE_FORM))
        assert run.engine.registry.get(VOICE_FORM["CallSid"]) is not None
        form = {"CallSid": VOICE_FORM["CallSid"], "AccountSid": ACCOUNT_SID,
                "CallStatus": "completed", "CallDuration": "12", "SequenceNumber": "0"}
        stream_form = {"CallSid": VOICE_FORM["CallSid"], "StreamSid": "MZ" + "2" * 32,
                       "StreamEvent": "stream-stopped", "AccountSid": ACCOUNT_SID}
        async with aiohttp.ClientSession() as http:
            async with http.post(run.url + "/twilio/status", data=form) as resp:
                assert resp.status == 403
            async with http.post(run.url + "/twilio/stream-status", data=stream_form,
                                 headers={"X-Twilio-Signature": "bad"}) as resp:
                assert resp.status == 403
            sig = twilio_signature(run.url + "/twilio/stream-status", stream_form)
            async with http.post(run.url + "/twilio/stream-status", data=stream_form,
                                 headers={"X-Twilio-Signature": sig}) as resp:
                assert resp.status == 204
            sig = twilio_signature(run.url + "/twilio/status", form)
            async with http.post(run.url + "/twilio/status", data=form,
                                 headers={"X-Twilio-Signature": sig}) as resp:
                assert resp.status == 204
        assert run.engine.registry.get(VOICE_FORM["CallSid"]) is None
        ended = run.engine.registry.get_any(VOICE_FORM["CallSid"])
        assert ended is not None and ended.ended


async def test_websocket_handshake_requires_signature(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        ws_url = run.url.replace("http", "ws") + "/twilio/media"
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"X-Twilio-Signature": "wrong"},
                            # signed over the http URL instead of the ws URL
                            {"X-Twilio-Signature": sign(AUTH_TOKEN, run.url + "/twilio/media")}):
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await http.ws_connect(ws_url, headers=headers)
                assert info.value.status == 403


async def test_engine_without_auth_token_refuses_everything(tmp_path: Path) -> None:
    async with running_engine(tmp_path, twilio={"auth_token": ""}) as run:
        # An empty key is one anyone could sign with: never accepted.
        empty = str(RequestValidator("").compute_signature(run.url + "/twilio/voice",
                                                           VOICE_FORM))
        status, _, _ = await post_voice(run, empty)
    assert status == 403


async def test_unsigned_mode_is_explicit_and_loud(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with running_engine(tmp_path,
                                  engine={"allow_unsigned_requests": True}) as run:
            status, _, _ = await post_voice(run, None)
            async with aiohttp.ClientSession() as http, http.get(run.url + "/healthz") as r:
                health = await r.json()
    assert status == 200
    assert any(e["event"] == "engine.SIGNATURE_CHECKS_DISABLED" for e in logs)
    assert health["status"] == "degraded"
    assert "signature checks disabled" in health["degraded"]


# -- a full call -----------------------------------------------------------------------------


async def test_simulated_call_hears_greeting_paced_in_whole_frames(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        caller = run.caller()
        result = await caller.run(Scenario(name="listen", steps=[Step(pause=0.5)]))
        session = run.engine.registry.get_any(caller.call_sid)
    assert result.error is None, result.error
    assert result.bad_frames_received == []
    # The greeting is ~3 s of speech: all of it arrived as whole 160-byte frames.
    assert result.frames_received > 100
    assert len(result.agent_audio) == result.frames_received * 160
    # Every mark the engine sent was echoed after its audio played, and the engine saw it.
    assert result.marks_received and result.marks_received == result.marks_echoed
    assert session is not None and session.stats.marks_in == len(result.marks_echoed)
    # Paced to real time: frames spread over about their own duration (with a small lead),
    # not dumped at once.
    span = result.arrivals[-1] - result.arrivals[0]
    audio_s = result.frames_received * 0.02
    assert audio_s - 0.25 <= span <= audio_s + 0.5
    gaps = [b - a for a, b in zip(result.arrivals[10:], result.arrivals[11:], strict=False)]
    assert 0.015 <= statistics.median(gaps) <= 0.025
    # The caller hung up; the engine ended the call and the status callback was accepted.
    assert result.ended_by == "caller"
    assert session is not None and session.ended
    assert session.stats.frames_in >= result.frames_sent - 5


async def test_dtmf_reaches_the_session(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        caller = run.caller()
        result = await caller.run(Scenario(name="dtmf", wait_for_greeting=False,
                                           steps=[Step(dtmf="12#"), Step(pause=0.3)]))
        session = run.engine.registry.get_any(caller.call_sid)
    assert result.error is None
    assert session is not None and session.stats.dtmf_in == 3


# -- bad input ---------------------------------------------------------------------------------


def stream_parameters(twiml: str) -> dict[str, str]:
    """The <Parameter>s of the <Connect><Stream> in a TwiML answer."""
    stream = ET.fromstring(twiml).find("./Connect/Stream")
    assert stream is not None, twiml
    return {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


class RawStream:
    """A hand-driven Media Streams client, for sending what Twilio never should. Its
    `start` carries `token` (from the webhook's TwiML when it posts one) unless None."""

    def __init__(self, run: RunningEngine, call_sid: str, token: str | None = None) -> None:
        self.run = run
        self.call_sid = call_sid
        self.stream_sid = "MZ" + call_sid[2:]
        self.token = token
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.http = aiohttp.ClientSession()

    async def open(self, webhook: bool = True) -> aiohttp.ClientWebSocketResponse:
        if webhook:
            form = dict(VOICE_FORM, CallSid=self.call_sid)
            _, _, twiml = await post_voice(
                self.run, twilio_signature(self.run.url + "/twilio/voice", form), form)
            if self.token is None:
                self.token = stream_parameters(twiml)["streamToken"]
        url = self.run.url.replace("http", "ws") + "/twilio/media"
        self.ws = await self.http.ws_connect(url, headers={
            "X-Twilio-Signature": sign(AUTH_TOKEN, self.run.config.media_stream_url())})
        return self.ws

    def start_msg(self, encoding: str = "audio/x-mulaw") -> str:
        params = {"from": "+1555"}
        if self.token is not None:
            params["streamToken"] = self.token
        return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid,
                           "start": {"streamSid": self.stream_sid, "callSid": self.call_sid,
                                     "accountSid": ACCOUNT_SID, "tracks": ["inbound"],
                                     "mediaFormat": {"encoding": encoding,
                                                     "sampleRate": 8000, "channels": 1},
                                     "customParameters": params}})

    def media_msg(self, payload: bytes | str) -> str:
        b64 = payload if isinstance(payload, str) else b64encode(payload).decode()
        return json.dumps({"event": "media", "sequenceNumber": "2", "streamSid": self.stream_sid,
                           "media": {"track": "inbound", "chunk": "1", "timestamp": "20",
                                     "payload": b64}})

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.http.close()


async def wait_until(predicate, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def started_stream(run: RunningEngine, call_sid: str
                         ) -> tuple[RawStream, aiohttp.ClientWebSocketResponse, CallSession]:
    """A call with its webhook and its stream started: the stream, its socket, the call."""
    raw = RawStream(run, call_sid)
    ws = await raw.open()
    await ws.send_str(raw.start_msg())
    session = run.engine.registry.get(raw.call_sid)
    assert session is not None
    await wait_until(lambda: session.stream_sid is not None)
    return raw, ws, session


async def test_bad_messages_are_counted_and_the_call_goes_on(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        # Another, healthy call runs at the same time and must not notice anything.
        good_caller = run.caller()
        good = asyncio.create_task(good_caller.run(
            Scenario(name="good", steps=[Step(pause=1.0)])))
        raw = RawStream(run, "CA" + "b" * 32)
        ws = await raw.open()
        await ws.send_str(raw.media_msg(b"\xff" * 160))  # media before start
        await ws.send_str(raw.start_msg())
        await ws.send_str("{not json")
        await ws.send_str('["a", "list"]')
        await ws.send_str(json.dumps({"event": "bogus", "streamSid": raw.stream_sid}))
        await ws.send_str(raw.media_msg("!!!not-base64!!!"))
        await ws.send_str(raw.media_msg(b"\xff" * 100))  # odd size: re-framed
        await ws.send_str(raw.media_msg(b"\xff" * 60))  # completes a 160-byte frame
        await ws.send_str(raw.media_msg(b"\xff" * 4000))  # oversized payload
        await ws.send_str(raw.start_msg())  # a second start
        await ws.send_str(json.dumps({"event": "dtmf", "dtmf": {"digit": "X"}}))
        await ws.send_bytes(b"\x00\x01")
        await ws.send_str(raw.media_msg(b"\xff" * 160))  # and normal audio still flows
        session = run.engine.registry.get(raw.call_sid)
        assert session is not None
        await wait_until(lambda: session.stats.frames_in >= 2)
        bad = session.stats.bad_messages
        for reason in ("bad_json", "unknown_event", "bad_base64", "odd_size_payload",
                       "oversized_payload", "second_start", "bad_field", "binary_frame"):
            assert bad.get(reason, 0) >= 1, (reason, bad)
        assert run.engine.bad_messages["media_before_start"] == 1
        assert not ws.closed
        assert session.stats.frames_in == 2  # 160 + (100+60); nothing else counted as audio
        result = await good
        await raw.close()
    assert result.error is None and result.frames_received > 100
    assert result.ended_by == "caller"


async def test_flood_closes_only_that_socket(tmp_path: Path) -> None:
    async with running_engine(tmp_path, engine={"max_messages_per_second": 100}) as run:
        raw = RawStream(run, "CA" + "c" * 32)
        ws = await raw.open()
        await ws.send_str(raw.start_msg())
        with capture_logs() as logs:
            for _ in range(300):
                if ws.closed:
                    break
                await ws.send_str(raw.media_msg(b"\xff" * 160))
            msg = await ws.receive(timeout=3)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1008
        assert any(e["event"] == "media.closing" and e.get("call_sid") == raw.call_sid
                   for e in logs)
        session = run.engine.registry.get_any(raw.call_sid)
        assert session is not None and await session.wait_ended(3)
        # The engine still takes calls.
        result = await run.caller().run(Scenario(name="after", steps=[]))
        await raw.close()
    assert result.error is None and result.frames_received > 50


async def test_too_many_malformed_messages_close_with_policy_code(tmp_path: Path) -> None:
    async with running_engine(tmp_path, engine={"max_bad_messages": 5}) as run:
        raw = RawStream(run, "CA" + "d" * 32)
        ws = await raw.open()
        await ws.send_str(raw.start_msg())
        for _ in range(10):
            if ws.closed:
                break
            await ws.send_str("garbage")
        await ws.receive(timeout=3)
        assert ws.close_code == 1008
        await raw.close()


async def test_oversized_websocket_message_closes_with_1009(tmp_path: Path) -> None:
    async with running_engine(tmp_path, engine={"max_message_bytes": 4096}) as run:
        raw = RawStream(run, "CA" + "e" * 32)
        ws = await raw.open()
        await ws.send_str(raw.start_msg())
        await ws.send_str(raw.media_msg(b"\xff" * 8000))
        await ws.receive(timeout=3)
        assert ws.close_code == 1009
        session = run.engine.registry.get_any(raw.call_sid)
        assert session is not None and await session.wait_ended(3)
        await raw.close()


async def test_stream_for_unknown_call_is_served_and_finished_call_refused(
        tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        # No webhook here (a restart, or another engine answered it), but the call's token.
        call_sid = "CA" + "f" * 32
        token = run.engine.stream_tokens.issue(call_sid, ACCOUNT_SID)
        raw = RawStream(run, call_sid, token)
        ws = await raw.open(webhook=False)
        await ws.send_str(raw.start_msg())
        await wait_until(lambda: run.engine.registry.get(raw.call_sid) is not None)
        assert run.engine.bad_messages == {}
        await ws.close()
        await wait_until(lambda: run.engine.registry.is_ended(raw.call_sid))
        await raw.close()
        # A second stream for the same, now finished, call is refused.
        again = RawStream(run, raw.call_sid, token)
        ws2 = await again.open(webhook=False)
        await ws2.send_str(again.start_msg())
        await ws2.receive(timeout=3)
        assert ws2.close_code == 1008
        await again.close()


async def test_close_without_stop_ends_the_call(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        raw, ws, session = await started_stream(run, "CA" + "9" * 32)
        await ws.close()
        assert await session.wait_ended(3)
        assert session.end_reason == "stream closed without stop"
        await raw.close()


async def test_no_start_message_times_out(tmp_path: Path) -> None:
    async with running_engine(tmp_path, engine={"start_timeout_s": 0.3}) as run:
        raw = RawStream(run, "CA" + "8" * 32)
        ws = await raw.open()
        await ws.receive(timeout=3)
        assert ws.close_code == 1008
        await raw.close()


# -- REST control ------------------------------------------------------------------------------


async def held_call(run: RunningEngine) -> tuple[SimulatedCaller, asyncio.Task[CallResult],
                                                CallSession]:
    """A caller who stays on the line silently, and its live session once streaming."""
    caller = run.caller()
    task = asyncio.create_task(caller.run(Scenario(name="hold", wait_for_greeting=False,
                                                   hangup_at_end=False, steps=[])))
    await wait_until(lambda: (s := run.engine.registry.get(caller.call_sid)) is not None
                     and s.stream_sid is not None)
    session = run.engine.registry.get(caller.call_sid)
    assert session is not None
    return caller, task, session


async def test_transfer_updates_the_call_with_say_and_dial(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        caller, task, session = await held_call(run)
        result = await session.transfer("+15550100999", reason="test")
        assert result.ok and not result.already_ended
        call = await asyncio.wait_for(task, 5)
        update = run.rest.updates_for(caller.call_sid)[-1]
    twiml = ET.fromstring(update.form["Twiml"])
    assert twiml.findtext("./Say") == run.config.transfer.announcement
    assert twiml.findtext("./Dial/Number") == "+15550100999"
    assert call.ended_by == "redirect" and call.redirects
    assert session.ended and session.end_reason == "transferred"


async def test_hang_up_completes_the_call_and_404_means_already_ended(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        caller, task, session = await held_call(run)
        result = await session.hang_up("test")
        call = await asyncio.wait_for(task, 5)
        assert result.ok
        assert run.rest.updates_for(caller.call_sid)[-1].form == {"Status": "completed"}
        assert session.ended
        assert call.ended_by in ("rest-completed", "engine")
        # The same call again: Twilio says 20404/400; the engine treats it as ended.
        assert run.engine.control is not None
        gone = await run.engine.control.hang_up("CA" + "0" * 32)
        assert gone.ok and gone.already_ended and gone.code == 20404


async def test_rest_errors_are_reported_not_raised(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        caller, task, session = await held_call(run)
        run.rest.fail_next.append((500, 20500, "Internal Server Error"))
        result = await session.transfer("+15550100999", reason="test")
        assert not result.ok and result.status == 500
        assert session.state.value == "ai"  # back where it was; the call goes on
        await caller.hang_up()
        await asyncio.wait_for(task, 5)


async def test_duration_cap_says_goodbye_and_hangs_up(tmp_path: Path) -> None:
    async with running_engine(tmp_path, engine={"max_call_seconds": 1.5}) as run:
        caller = run.caller()
        result = await asyncio.wait_for(caller.run(Scenario(
            name="long", wait_for_greeting=False, hangup_at_end=False, steps=[])), 30)
        session = run.engine.registry.get_any(caller.call_sid)
    assert session is not None and session.end_reason == "duration cap reached"
    assert result.completed_by_rest
    assert result.clears_received >= 1  # the greeting was cut for the goodbye
    assert result.frames_received > 50


async def test_progress_marks_sit_on_frame_boundaries_without_padding() -> None:
    from engine.telephony.outbound import OutboundPlayer, Pacer

    sent: list[str] = []

    async def send(msg: str) -> None:
        sent.append(msg)

    pacer = Pacer(lead_s=10.0)  # everything due at once
    player = OutboundPlayer("CA1", "MZ1", send, None, pacer)
    player.enqueue_audio(b"\x01" * 400)  # 2 whole frames + 80 bytes
    player.enqueue_mark("p1", pad=False)  # after the 2 whole frames
    player.enqueue_audio(b"\x02" * 80)  # completes frame 3 without any silence
    player.enqueue_mark("s1")  # end of sentence
    while await player.pump(0.0, pacer.lead_s):
        pass
    kinds = ["mark:" + m.split('"name":"')[1].split('"')[0] if '"mark"' in m else "media"
             for m in sent]
    assert kinds == ["media", "media", "mark:p1", "media", "mark:s1"]
    assert player.frames_sent == 3  # 480 bytes: no padding frame was added
