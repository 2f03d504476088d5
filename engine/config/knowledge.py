"""`[knowledge]`: what the business knows, for the LLM agent (engine/knowledge/).

The FAQ entries and optional knowledge files (Markdown or plain text). A small knowledge
base goes whole into the static system-prompt prefix (cached by the provider); a larger
one is cut into passages and the best `top_k` are retrieved for each turn.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, PrivateAttr

from engine.config.base import ConfigError, Section


class KnowledgeConfig(Section):
    # Markdown / plain-text files, relative to the config file's directory or absolute.
    files: list[str] = Field(default_factory=list)
    # The FAQ entries that answer (not the handoff/goodbye ones) are knowledge too.
    include_faq: bool = True
    # Under this many tokens the whole knowledge base is sent in the static prefix (the
    # provider caches it from 1024 tokens: cached input costs ~1/10 of input, so ~3000
    # cached tokens cost about what 3 retrieved passages do uncached). 0: always retrieve.
    inline_max_tokens: int = Field(default=3000, ge=0)
    top_k: int = Field(default=3, ge=1, le=20)  # passages retrieved per turn above it
    passage_tokens: int = Field(default=120, ge=20, le=1000)  # a file passage's size
    # Cosine similarity (sentence embeddings) a passage needs to be retrieved; the
    # lexical fallback (no embedding model installed) needs a shared topic word instead.
    # The bundled FAQ's in-scope questions score >= 0.27 on their passage, but unrelated
    # ones reach 0.5 too (bench/bench_knowledge.py): this trims noise, the model decides.
    min_similarity: float = Field(default=0.25, ge=0.0, le=1.0)
    # A retrieval that takes longer (CPU busy) is skipped for the turn: never a stall.
    retrieval_timeout_s: float = Field(default=0.5, gt=0)
    _base_dir: Path | None = PrivateAttr(default=None)

    def anchor(self, base_dir: Path) -> None:
        """Relative file names are relative to `base_dir` (the config file's directory);
        each file must be readable now, or the engine does not start (ConfigError)."""
        self._base_dir = base_dir
        for path in self.paths():
            if not path.is_file() or not os.access(path, os.R_OK):
                raise ConfigError(f"knowledge.files: cannot read {path}")

    def paths(self) -> list[Path]:
        base = self._base_dir or Path.cwd()
        return [p if p.is_absolute() else base / p
                for p in (Path(os.path.expanduser(f)) for f in self.files)]
