"""The policies of a conversation: when a caller turn gets no answer, when the call goes
to a person, and how a call that has cost its cap ends.

A turn gets no agent answer when the transcript is unclear (the caller is asked again),
when the caller asks for a person (the call is handed off), or when the call has cost its
cap. After an answer, the agent's own verdict counts too: "could not answer" is one more
misunderstanding, "handoff" hands off, "goodbye" hangs up. Repeated misunderstandings hand
the call off as well.

The cost cap acts when a booking crosses it (`cost_cap_reached`, from the ledger), not
at the next caller turn: the agent finishes the sentence it is saying (at once when
idle), then the call is transferred to transfer.number, or, without one or when the
transfer fails, hears `cost_cap_goodbye` and is hung up. It acts once: never a loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from engine.config import Config
from engine.log import get_logger
from engine.providers.base import AgentAction, ProviderError, Transcript
from engine.providers.faq.matcher import detect_intent
from engine.session.states import CallState
from engine.session.turn_taking import Mode

if TYPE_CHECKING:
    from engine.session.call_session import CallSession
    from engine.session.speaking import Speaking

log = get_logger(__name__)


class Listening(Protocol):
    """Whether the conversation listens and answers; a handoff stops it while it runs."""

    mode: Mode


class Policies:
    def __init__(self, session: CallSession, config: Config, speaking: Speaking,
                 listening: Listening, cost_so_far: Callable[[], float]) -> None:
        self.session = session
        self.policy = config.policy
        self.transfer_number = config.transfer.number
        self.speaking = speaking
        self.listening = listening
        self.cost_so_far = cost_so_far
        self.misunderstandings = 0  # in a row
        self.misunderstood_turns = 0  # in the whole call (experiments compare them)
        self.over_cap = False  # the call has cost its cap: it answers nothing more
        self._closing: asyncio.Task[None] | None = None  # the cap's action, once
        self.log = log.bind(call_sid=session.call_sid)

    def unclear(self, transcript: Transcript) -> bool:
        """The recognizer's own confidence says the transcript is likely wrong."""
        conf = transcript.confidence
        policy = self.policy
        if conf.avg_logprob is not None and conf.avg_logprob < policy.min_avg_logprob:
            return True
        if conf.no_speech_prob is not None and conf.no_speech_prob > policy.max_no_speech_prob:
            return True
        return (conf.token_logprob_mean is not None
                and conf.token_logprob_mean < policy.min_avg_logprob)

    async def allow_answer(self, text: str, transcript: Transcript, unclear: bool) -> bool:
        """Whether the agent answers this caller turn. When not, the policy has acted
        already: the caller was asked again, or the call is being handed off."""
        policy = self.policy
        cap = policy.call_cost_cap_usd
        if self.over_cap or (cap > 0 and self.cost_so_far() >= cap):
            self.cost_cap_reached()  # not acted on yet if a supervisor held the call
            return False
        if unclear:
            self.log.info("turn.low_confidence", text=text,
                          avg_logprob=transcript.confidence.avg_logprob,
                          no_speech_prob=transcript.confidence.no_speech_prob)
            await self.misunderstood("low confidence transcript")
            return False
        if detect_intent(text) == "handoff":
            await self.handoff("caller asked for a person", policy.handoff_line)
            return False
        return True

    # -- the cost cap ---------------------------------------------------------------------

    def cost_cap_reached(self) -> None:
        """The call has cost its cap. The agent says nothing new; the call is closed once
        the sentence being spoken ends (at once when idle). Not while a supervisor holds
        the call: the first turn after they hand it back acts."""
        self.over_cap = True
        if self.session.state is not CallState.AI or self._closing is not None:
            return
        self.log.info("turn.cost_cap", spent_usd=self.cost_so_far(),
                      cap_usd=self.policy.call_cost_cap_usd)
        self.speaking.finish_sentence()
        self._closing = self.session.spawn(self._close_over_cap(), "cost_cap")

    async def _close_over_cap(self) -> None:
        await self.speaking.wind_down(timeout_s=30.0)
        if self.session.state is not CallState.AI:  # a supervisor or the caller came first
            self._closing = None
            return
        reason = "call cost cap reached"
        if self.transfer_number and await self.handoff(reason, self.policy.cost_cap_line):
            return
        await self.session.say_goodbye_and_hang_up(self.policy.cost_cap_goodbye, reason)

    async def misunderstood(self, why: str) -> None:
        """Ask the caller again, or hand off after too many misunderstandings in a row."""
        self.misunderstandings += 1
        self.misunderstood_turns += 1
        obs = self.session.observer
        if self.misunderstandings >= self.policy.max_misunderstandings:
            if obs is not None:
                obs.alert(self.session, "low_confidence", "warning",
                          f"{self.misunderstandings} misunderstandings in a row", {"why": why})
            await self.handoff("repeated misunderstandings", self.policy.handoff_line)
            return
        speaking = self.speaking
        speaking.speak_in_background(speaking.say_lines([self.policy.not_understood], "system"))

    async def after_answer(self, action: AgentAction) -> bool:
        """Act on the agent's verdict on its own answer; False when the call was handed
        off for it (nothing more to do in this turn)."""
        if self.over_cap:  # the cap's action closes the call
            return False
        if action == "unknown":
            self.misunderstandings += 1
            self.misunderstood_turns += 1
            if self.misunderstandings >= self.policy.max_misunderstandings:
                await self.handoff("agent could not answer repeatedly", "")
                return False
        else:
            self.misunderstandings = 0
        if action == "handoff":
            await self.handoff("agent offered a person", "")
        elif action == "goodbye":
            await self.session.hang_up("caller said goodbye")
        return True

    async def handoff(self, reason: str, line: str) -> bool:
        """Say a short line, then transfer the call to the human queue. True when the call
        left the agent (transferred, or the caller hung up first)."""
        session = self.session
        if session.state is not CallState.AI:
            return False
        obs = session.observer
        self.log.info("turn.handoff", reason=reason)
        if obs is not None:
            obs.alert(session, "handoff_requested", "warning", f"handoff: {reason}",
                      {"reason": reason})
        number = self.transfer_number
        previous = self.listening.mode
        self.listening.mode = Mode.OFF
        self.speaking.stop()
        if line:
            try:
                await self.speaking.say_lines([line], "agent")
            except ProviderError as exc:
                self.log.warning("turn.handoff_line_failed", error=str(exc))
        if not number:
            self.log.warning("turn.handoff_impossible", detail="transfer.number is not set")
            self.listening.mode = previous
            return False
        result = await session.transfer(number, reason)
        if not result.ok and not result.already_ended:
            self.listening.mode = previous
            return False
        return True
