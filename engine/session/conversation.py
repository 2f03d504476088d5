"""The conversation of one call (hear, understand, answer, speak — interruptible), made of
named parts; `ConversationPipeline` is the session's `Conversation`.

- `turn_taking.py`: the endpointer, barge-in, backchannels, utterance → transcript;
- `policies.py`: unclear turns, handoff, the cost cap's action, the agent's verdicts;
- `replying.py`: the agent's answer, streamed sentence by sentence, and the turn record;
- `speaking.py`: speech into the outbound queue, marks, what the caller heard;
- `context.py`: what the agent is told, kept within a token budget.

Inbound frames do not pass through this module: the session hands them straight to
`TurnTaking.on_audio`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.config import Config
from engine.knowledge import KnowledgeBase
from engine.providers.base import Agent, SpeechToText, TextToSpeech
from engine.providers.faq.matcher import FaqMatcher
from engine.providers.response_cache import ResponseCache
from engine.session.context import ConversationContext
from engine.session.policies import Policies
from engine.session.replying import Replying
from engine.session.speaking import Speaking
from engine.session.turn_taking import Mode, TurnTaking
from engine.tools.registry import ToolBox

if TYPE_CHECKING:
    from engine.session.call_session import CallSession


@dataclass(slots=True, frozen=True)
class TurnChains:
    """The chains one turn hears, answers and speaks with."""

    stt: SpeechToText
    agent: Agent
    tts: TextToSpeech


def _not_degraded() -> bool:
    return False


@dataclass(slots=True)
class PipelineDeps:
    """What every call's pipeline shares (built once per engine)."""

    config: Config
    stt: SpeechToText
    agent: Agent
    tts: TextToSpeech
    cache: ResponseCache
    matcher: FaqMatcher | None = None  # answer-cache keys for common questions
    tools: ToolBox | None = None  # the tools the agent may call (none: offered none)
    knowledge: KnowledgeBase | None = None  # what the LLM agent is told of the business
    # The cheapest chains (providers.degraded_*), for new turns while `degraded()` says
    # so (the budget is exhausted with budget.on_exhausted = "degrade").
    cheapest: TurnChains | None = None
    degraded: Callable[[], bool] = _not_degraded
    usual: TurnChains = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.usual = TurnChains(self.stt, self.agent, self.tts)

    def chains(self) -> TurnChains:
        """The chains for a turn starting now."""
        if self.cheapest is not None and self.degraded():
            return self.cheapest
        return self.usual

    def all_chains(self) -> list[SpeechToText | Agent | TextToSpeech]:
        """Every chain a turn may use, each once (the cheapest ones too)."""
        found: list[SpeechToText | Agent | TextToSpeech] = [self.stt, self.agent, self.tts]
        if self.cheapest is not None:
            cheap = self.cheapest
            found += [c for c in (cheap.stt, cheap.agent, cheap.tts) if c not in found]
        return found


class ConversationPipeline:
    def __init__(self, session: CallSession, deps: PipelineDeps,
                 cost_so_far: Callable[[], float] = lambda: 0.0) -> None:
        cfg = deps.config
        self.greeting = cfg.engine.greeting
        prompt = cfg.policy.system_prompt.replace("{business}", cfg.faq.business_name)
        self.context = ConversationContext(
            prompt, cfg.policy.context_max_tokens, cfg.policy.context_keep_recent_turns,
            session.call_sid, deps.knowledge.static_text if deps.knowledge else "")
        self.speaking = Speaking(session, deps.chains().tts)
        self.policies = Policies(session, cfg, self.speaking, self, cost_so_far)
        self.replying = Replying(session, deps, self.context, self.speaking, self.policies)
        self.turns = TurnTaking(session, cfg, deps.chains, self.speaking, self.policies,
                                self.replying)
        # The hot path: the session calls turn-taking directly, without a hop through here.
        self.on_audio = self.turns.on_audio

    @property
    def mode(self) -> Mode:
        """Listening and answering (AI), transcribing only, or off; turn-taking keeps it."""
        return self.turns.mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        self.turns.mode = mode

    # -- Conversation protocol -----------------------------------------------------------

    def on_dtmf(self, digit: str) -> None:
        self.turns.on_dtmf(digit)

    async def start(self) -> None:
        self.speaking.speak_in_background(self.speaking.say_lines([self.greeting], "agent"))

    def set_listening(self, active: bool) -> None:
        if active:
            self.mode = Mode.AI
        else:
            self.mode = Mode.OFF
            self.speaking.stop()

    def take_over(self) -> None:
        """A supervisor speaks now: stop the agent, keep transcribing."""
        self.mode = Mode.TRANSCRIBE
        if self.speaking.agent_speaking():
            self.interrupt("supervisor took over")

    def hand_back(self) -> None:
        self.mode = Mode.AI
        self.turns.endpointer.reset()
        self.turns.session.spawn(self.turns.hearing.aclose(), "stt_stream_close")

    def interrupt(self, reason: str) -> None:
        """Stop generation and synthesis, and cut what the caller hears now."""
        self.speaking.interrupt(reason)

    def cost_cap_reached(self) -> None:
        self.policies.cost_cap_reached()

    async def aclose(self) -> None:
        self.mode = Mode.OFF
        self.speaking.stop()
        await self.turns.hearing.aclose()
