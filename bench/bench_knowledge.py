"""Grounded answers: does the prompt carry the right passage, and what does it cost?

    .venv/bin/python -m bench.bench_knowledge [--sizes 10,200] [--lexical]

The questions are the FAQ evaluation set (tests/data/faq_cases.toml, as bench_faq.py):
exact questions, paraphrases and speech-recognition variants of the entries that answer
(handoff and goodbye are intents, not knowledge), and out-of-scope questions. The
knowledge base is that FAQ plus a generated knowledge file of plausible distractors
(roaming, phones, coverage: prices and months in every line), so it has 10 or 200
passages in all. Each question is one call's first turn: the context the engine builds
(static block or retrieved passages), sent by the real OpenAI agent to the stand-in
scripted to answer only from what it was given (engine/sim/standins/openai_grounded.py).

Per mode and size it prints: the share of in-scope questions whose prompt carried the
right passage, the share the stand-in answered right, prompt tokens per turn (the
stand-in's count), cached tokens, the ledger's cost per turn, and retrieval latency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_faq import DEFAULT_CASES
from engine.config import Config, FaqConfig, KnowledgeConfig, PricesConfig
from engine.knowledge import KnowledgeBase, build_ranker, faq_passages
from engine.knowledge.passages import load_file
from engine.knowledge.ranking import LexicalRanker
from engine.money.prices import PriceTable
from engine.providers.base import AgentDone, TextDelta, Usage
from engine.providers.builtin.llm_openai import OpenAIChatAgent
from engine.providers.faq.embeddings import SentenceEmbedder
from engine.session.context import ConversationContext
from engine.sim.standins.openai_api import OpenAIStandin
from engine.sim.standins.openai_grounded import ground

MODEL = "gpt-5.4-mini"
_COUNTRIES = ("France", "Spain", "Italy", "Germany", "Mexico", "Canada", "Japan", "Brazil",
              "India", "Egypt", "Kenya", "Norway", "Greece", "Peru", "Chile", "Vietnam",
              "Thailand", "Turkey", "Poland", "Ireland", "Portugal", "Morocco", "Iceland",
              "Austria", "Belgium", "Sweden", "Finland", "Denmark", "Croatia", "Colombia")
_PHONES = ("Nova", "Orbit", "Pulse", "Vertex", "Echo", "Zenith", "Flare", "Comet", "Prism",
           "Atlas", "Quartz", "Ember", "Halo", "Drift", "Summit", "Ripple", "Aurora", "Bolt")
_CITIES = ("Springfield", "Riverton", "Lakeside", "Fairview", "Greenville", "Oakdale",
           "Maplewood", "Hillcrest", "Brookfield", "Cedar Falls", "Ashland", "Westport",
           "Clearwater", "Milford", "Kingston", "Bayside", "Northgate", "Elmwood")


def distractor_markdown(n: int) -> str:
    """`n` sections of plausible business knowledge that answer none of the FAQ questions
    (one passage each), the same text for the same `n`."""
    sections = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            country = _COUNTRIES[(i // 3) % len(_COUNTRIES)]
            sections.append(
                f"## Roaming in {country} ({i})\nCalls from {country} cost {5 + i % 40} cents "
                f"a minute and data costs {1 + i % 9} dollars a gigabyte. Turn roaming on in "
                "the app under Travel before you leave.")
        elif kind == 1:
            phone = _PHONES[(i // 3) % len(_PHONES)]
            sections.append(
                f"## The {phone} {i % 7 + 3} phone ({i})\nThe {phone} has a {5 + i % 3}.{i % 10} "
                f"inch screen and a {3000 + 10 * i} mAh battery. It costs {199 + i} dollars, "
                f"or {9 + i % 20} dollars a month over 24 months.")
        else:
            city = _CITIES[(i // 3) % len(_CITIES)]
            sections.append(
                f"## Network coverage in {city} ({i})\n5G covers {60 + i % 40} percent of "
                f"{city}. Fibre to the home is planned in {city} for month {1 + i % 12}; "
                "sign up for news of it in the app.")
    return "# More about us\n\n" + "\n\n".join(sections) + "\n"


def load_cases(path: Path = DEFAULT_CASES) -> tuple[FaqConfig, list[dict[str, str]]]:
    with path.open("rb") as f:
        data = tomllib.load(f)
    return FaqConfig.model_validate(data["faq"]), data["cases"]


def in_scope(faq: FaqConfig, cases: list[dict[str, str]]) -> list[dict[str, str]]:
    """The cases a knowledge passage answers (entries with action "answer")."""
    answering = {e.id for e in faq.entries if e.action == "answer"}
    return [c for c in cases if c["expect"] in answering]


async def knowledge_of(faq: FaqConfig, passages: int, inline_max_tokens: int, folder: Path,
                       embedder: SentenceEmbedder | None,
                       retrieval_timeout_s: float = 0.5) -> KnowledgeBase:
    """The FAQ plus distractors up to `passages` passages; in retrieved mode ranked with
    `embedder`, or lexically when it is None."""
    found = faq_passages(faq.entries)
    extra = folder / f"more-{passages}.md"
    extra.write_text(distractor_markdown(max(0, passages - len(found))), encoding="utf-8")
    cfg = KnowledgeConfig(files=[str(extra)], inline_max_tokens=inline_max_tokens,
                          retrieval_timeout_s=retrieval_timeout_s)
    if passages > len(found):
        found += load_file(extra, cfg.passage_tokens)
    kb = KnowledgeBase(found, cfg)
    if kb.mode == "retrieved":
        kb.ranker = (await asyncio.to_thread(build_ranker, found, cfg, embedder)
                     if embedder is not None else LexicalRanker(found))
    return kb


@dataclass
class Figures:
    questions: int = 0
    carried: int = 0  # the right passage was in the prompt
    answered: int = 0  # the grounded stand-in answered with the right entry's answer
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    cost_usd: list[float] = field(default_factory=list)
    retrieval_ms: list[float] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)

    @property
    def carried_share(self) -> float:
        return self.carried / max(1, self.questions)

    @property
    def answered_share(self) -> float:
        return self.answered / max(1, self.questions)


async def ask_all(kb: KnowledgeBase, faq: FaqConfig, cases: list[dict[str, str]],
                  server: OpenAIStandin, prices: PriceTable | None = None) -> Figures:
    """Each case as a call's first turn through the real agent and the grounded stand-in."""
    answers = {e.id: e.answer for e in faq.entries}
    prices = prices or PriceTable(PricesConfig())
    agent = OpenAIChatAgent("sk-test", server.base_url, model=MODEL, first_token_timeout_s=5)
    prompt = Config().policy.system_prompt.replace("{business}", faq.business_name)
    figures = Figures()
    try:
        for case in cases:
            context = ConversationContext(prompt, 1500, 4, knowledge=kb.static_text)
            started = time.perf_counter()
            found = await kb.retrieve(case["text"])
            figures.retrieval_ms.append((time.perf_counter() - started) * 1000)
            messages = context.messages(case["text"], [p.render() for p in found])
            reply, usage = await _ask(agent, messages)
            figures.questions += 1
            carried = any(f"[faq:{case['expect']}]" in m.content for m in messages)
            figures.carried += carried
            figures.answered += reply == answers[case["expect"]]
            if not carried:
                figures.misses.append(f"{case['text']!r} -> {[p.id for p in found]}")
            figures.prompt_tokens.append(usage.input_tokens)
            figures.cached_tokens.append(usage.cached_input_tokens)
            figures.cost_usd.append(prices.cost(usage))
    finally:
        await agent.aclose()
    return figures


async def _ask(agent: OpenAIChatAgent, messages: Any) -> tuple[str, Usage]:
    parts: list[str] = []
    usage = None
    async for event in agent.respond(messages):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, AgentDone):
            usage = event.usage
    assert usage is not None
    return "".join(parts), usage


def _row(label: str, f: Figures) -> str:
    ms = sorted(f.retrieval_ms)
    p50 = ms[len(ms) // 2] if ms else 0.0
    return (f"{label:<28}{f.carried_share:>8.1%}{f.answered_share:>9.1%}"
            f"{statistics.fmean(f.prompt_tokens):>9.0f}{statistics.fmean(f.cached_tokens):>8.0f}"
            f"{statistics.fmean(f.cost_usd) * 1e6:>11.1f}{p50:>9.1f}")


async def run(sizes: list[int], lexical: bool, folder: Path) -> int:
    faq, cases = load_cases()
    scoped = in_scope(faq, cases)
    embedder = None if lexical else await asyncio.to_thread(SentenceEmbedder)
    print(f"{len(scoped)} in-scope questions; ranking: {'lexical' if lexical else 'embedding'}")
    print(f"{'mode, passages':<28}{'carried':>8}{'answered':>9}{'prompt':>9}{'cached':>8}"
          f"{'µ$/turn':>11}{'ret. ms':>9}")
    for size in sizes:
        for mode, inline in (("inline", 10**9), ("retrieved", 0)):
            kb = await knowledge_of(faq, size, inline, folder, embedder)
            async with ground(OpenAIStandin()) as server:
                figures = await ask_all(kb, faq, scoped, server)
            await kb.aclose()
            print(_row(f"{mode}, {len(kb.passages)}", figures))
            for miss in figures.misses[:5]:
                print("   miss:", miss)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,200")
    parser.add_argument("--lexical", action="store_true", help="without the embedding model")
    args = parser.parse_args(argv)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        return asyncio.run(run([int(s) for s in args.sizes.split(",")], args.lexical,
                               Path(folder)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
