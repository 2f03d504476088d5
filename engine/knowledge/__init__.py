"""The business's knowledge (FAQ entries and knowledge files) for the LLM agent: passages,
the static prompt block, and per-turn retrieval. See `base.py`."""

from engine.knowledge.base import KnowledgeBase, build_ranker, load_knowledge
from engine.knowledge.passages import Passage, faq_passages, file_passages

__all__ = ["KnowledgeBase", "Passage", "build_ranker", "faq_passages", "file_passages",
           "load_knowledge"]
