"""TwiML documents, built with the twilio SDK (never by string formatting)."""

from __future__ import annotations

from twilio.twiml.voice_response import Connect, Dial, VoiceResponse

from engine.telephony.stream_token import TOKEN_PARAMETER

TWIML_CONTENT_TYPE = "text/xml"


def connect_stream(stream_url: str, status_callback: str,
                   parameters: dict[str, str]) -> str:
    """<Connect><Stream> for a bidirectional Media Stream."""
    response = VoiceResponse()
    response.append(_stream(stream_url, status_callback, parameters))
    return str(response)


def say_then_reconnect(text: str, stream_url: str, status_callback: str,
                       parameters: dict[str, str]) -> str:
    """Last resort when no speech provider works: Twilio speaks the text with its own
    voice, then opens a new media stream for the same call, so the conversation goes on."""
    response = VoiceResponse()
    response.say(text)
    response.append(_stream(stream_url, status_callback, parameters))
    return str(response)


def stream_parameters(call_sid: str, from_number: str, to_number: str,
                      stream_token: str) -> dict[str, str]:
    """The <Parameter>s of every media stream we open; the stream's `start` message
    carries them back (the media stream checks the call's token and reads the caller's
    numbers from it)."""
    return {"from": from_number, "to": to_number, "callSid": call_sid,
            TOKEN_PARAMETER: stream_token}


def _stream(stream_url: str, status_callback: str, parameters: dict[str, str]) -> Connect:
    """The <Connect><Stream> element. The stream URL takes no query string; data travels
    as <Parameter>s and arrives in `start.customParameters`."""
    connect = Connect()
    stream = connect.stream(url=stream_url, status_callback=status_callback,
                            status_callback_method="POST")
    for name, value in parameters.items():
        if value:
            stream.parameter(name=name, value=value[:450])
    return connect


def transfer(announcement: str, number: str, caller_id: str = "",
             timeout_s: int = 30) -> str:
    """<Say> then <Dial> a human; used to update a live call."""
    response = VoiceResponse()
    if announcement:
        response.say(announcement)
    dial = Dial(caller_id=caller_id or None, timeout=timeout_s)
    dial.number(number)
    response.append(dial)
    return str(response)


def say_and_hang_up(text: str) -> str:
    """<Say> then <Hangup/>: a call we do not take (the budget is exhausted)."""
    response = VoiceResponse()
    response.say(text)
    response.hangup()
    return str(response)


def hang_up() -> str:
    """<Hangup/> alone: a webhook for a call that is already over."""
    response = VoiceResponse()
    response.hangup()
    return str(response)


def reject_busy() -> str:
    response = VoiceResponse()
    response.reject(reason="busy")
    return str(response)
