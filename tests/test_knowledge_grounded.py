"""Grounded answers measured through the OpenAI stand-in (scripted to answer only from
what it was given), with the real OpenAI agent, on the bundled FAQ evaluation set
(tests/data/faq_cases.toml) and a knowledge base grown with distractors
(bench/bench_knowledge.py has the data and the measuring loop)."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.bench_knowledge import Figures, ask_all, in_scope, knowledge_of, load_cases
from engine.config import FaqConfig, PricesConfig
from engine.knowledge import KnowledgeBase
from engine.money.ledger import CallLedger
from engine.money.prices import PriceTable
from engine.providers.base import Usage
from engine.providers.faq.embeddings import EmbeddingUnavailable, SentenceEmbedder
from engine.sim.standins.openai_api import OpenAIStandin
from engine.sim.standins.openai_grounded import ground

FAQ, CASES = load_cases()
SCOPED = in_scope(FAQ, CASES)


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    try:
        return SentenceEmbedder()
    except EmbeddingUnavailable as exc:  # `python3 dev.py setup` installs it
        pytest.skip(f"embedding model not installed: {exc}")


@pytest.fixture
async def grounded() -> AsyncIterator[OpenAIStandin]:
    async with ground(OpenAIStandin()) as server:
        yield server


async def _measure(faq: FaqConfig, size: int, inline: int, folder: Path,
                   embedder: SentenceEmbedder | None, server: OpenAIStandin) -> Figures:
    # The ranking's quality, not this machine's load: no retrieval skipped for time.
    kb: KnowledgeBase = await knowledge_of(faq, size, inline, folder, embedder,
                                           retrieval_timeout_s=30)
    try:
        return await ask_all(kb, faq, SCOPED, server)
    finally:
        await kb.aclose()


async def test_the_prompt_carries_the_right_passage_and_stays_flat_as_knowledge_grows(
        tmp_path: Path, embedder: SentenceEmbedder, grounded: OpenAIStandin) -> None:
    small = await _measure(FAQ, 10, 0, tmp_path, embedder, grounded)
    large = await _measure(FAQ, 200, 0, tmp_path, embedder, grounded)
    assert len(SCOPED) >= 40
    # Measured 100 % of 40 at both sizes (bench/README.md), 97.5 % at 10 passages
    # with retrievals cut by the 0.5 s deadline on a loaded machine.
    assert small.carried_share >= 0.95, small.misses
    assert large.carried_share >= 0.95, large.misses
    # The stand-in answers from what it was given: right when the passage was there
    # (its own lexical reading of 3 passages gets a few wrong: measured 90 %).
    assert large.answered_share >= 0.85
    # What the stand-in received is what the figures say: the passage lines, before
    # the caller's words.
    last = grounded.requests[-1].json["messages"]
    assert last[-1]["role"] == "user" and last[-2]["content"].count("\n[") >= 1
    # 20x the knowledge, the same prompt per turn (top_k passages, not the whole base).
    assert statistics.fmean(large.prompt_tokens) <= 1.1 * statistics.fmean(small.prompt_tokens)


async def test_the_lexical_fallback_still_carries_most_right_passages(
        tmp_path: Path, grounded: OpenAIStandin) -> None:
    figures = await _measure(FAQ, 200, 0, tmp_path, None, grounded)
    assert figures.carried_share >= 0.95, figures.misses  # measured 97.5 %


async def test_the_static_prefix_is_cached_from_the_second_turn_and_costs_less(
        tmp_path: Path, grounded: OpenAIStandin) -> None:
    # ~1,700 tokens of knowledge: under inline_max_tokens, over OpenAI's 1024 minimum.
    kb = await knowledge_of(FAQ, 40, 3000, tmp_path, None)
    assert kb.mode == "inline" and kb.tokens > 1100
    figures = await ask_all(kb, FAQ, SCOPED[:3], grounded)
    await kb.aclose()
    first, second, _ = figures.prompt_tokens
    cached = figures.cached_tokens
    assert cached[0] == 0 and cached[1] >= 1024 and cached[1] % 128 == 0
    assert cached[1] >= 0.8 * kb.tokens and cached[2] == cached[1]
    # The ledger books the second turn cheaper, for as many prompt tokens.
    ledger = CallLedger("CA1", 0, PriceTable(PricesConfig()))
    usages = [Usage(provider="openai", kind="llm", model="gpt-5.4-mini", input_tokens=p,
                    cached_input_tokens=c, output_tokens=30)
              for p, c in zip(figures.prompt_tokens, cached, strict=True)]
    one, two = ledger.add(usages[0]), ledger.add(usages[1])
    assert abs(first - second) < 20 and two.cost_usd < 0.5 * one.cost_usd
    assert any(line.unit == "1M cached input tokens" for line in two.lines)


@pytest.mark.slow
async def test_a_call_gets_retrieved_passages_and_the_turn_records_their_ids(
        tmp_path: Path) -> None:
    from engine.session.records import TurnRecord
    from engine.sim.scenario import Scenario, Step
    from engine.wiring import Providers, build_engine, build_providers
    from tests.harness import base_sections, local_providers, running_engine

    hours = next(e.answer for e in FAQ.entries if e.id == "hours")

    async def engine_with_openai(config: Any) -> Any:
        local, cloud = local_providers(config), build_providers(config)
        return await build_engine(config, history=False, supervisor_api=False,
                                  providers=Providers(stt=local.stt, agents=cloud.agents,
                                                      tts=local.tts))

    async with ground(OpenAIStandin()) as server:
        sections = base_sections()
        sections["providers"] = {"agent": ["openai"],
                                 "openai": {"api_key": "sk-test", "base_url": server.base_url}}
        sections["knowledge"] = {"inline_max_tokens": 0}  # retrieved per turn
        async with running_engine(tmp_path, make_engine=engine_with_openai,
                                  **sections) as run:
            records: list[TurnRecord] = []
            hub = run.engine.hub
            seen = hub.turn_completed
            hub.turn_completed = lambda s, r: (records.append(r), seen(s, r))[1]  # type: ignore[method-assign]
            caller = run.caller()
            await asyncio.wait_for(caller.run(Scenario(name="kb", steps=[
                Step(say="What time do you open on Saturday?")])), 90)
    (record,) = [r for r in records if r.caller_text]
    assert "faq:hours" in record.knowledge_ids, record
    chat = [r.json for r in server.requests if r.path.endswith("/chat/completions")]
    messages = chat[0]["messages"]
    assert messages[-2]["role"] == "system" and "[faq:hours]" in messages[-2]["content"]
    assert all("[faq:" not in m["content"] for m in messages[:-2])  # nothing inline
    assert record.agent_text == hours
