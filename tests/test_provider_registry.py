"""Providers as plug-ins: declarations, discovery, config validation, wiring and pricing.

The third-party test writes a provider package into a temporary directory, names it in
`providers.packages` and shows it validated, built, priced and heard by a caller, with no
file of ours changed.
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from engine.bus.events import UsageCost
from engine.config import Config, ConfigError, PricesConfig, load_config
from engine.money.prices import PriceTable
from engine.providers.base import Usage
from engine.providers.builtin.openai_common import OpenAISettings
from engine.providers.builtin.tts_elevenlabs import ElevenLabsSettings
from engine.providers.builtin.tts_espeak import EspeakSettings
from engine.providers.registry import BillingUnit, registry
from engine.sim.scenario import Scenario
from engine.wiring import NoProviderError, build_engine, build_providers
from tests.harness import EventLog, running_engine

ROOT = Path(__file__).resolve().parent.parent

# A whole provider, as a third party would write it: one module, nothing else.
PLUGIN = '''
"""A test voice: every sentence is a flat tone of `level`."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from pydantic import SecretStr

from engine.config import Config
from engine.providers.base import AudioChunk, SynthesisDone, SynthesisEvent, Timing, Usage
from engine.providers.registry import (
    Billing, BillingUnit, ProviderSettings, ProviderSpec, register, require_secret)

NAME = "{name}"


class ToneSettings(ProviderSettings):
    level: int = 0x55
    model: str = "tone-1"
    token: SecretStr = SecretStr("")  # env {env}


class ToneTTS:
    runs_locally = False
    name = NAME
    voice = "flat"

    def __init__(self, level: int, model: str, token: str) -> None:
        self.level = level
        self.model = model
        self.token = token

    async def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
        started = time.monotonic()
        yield AudioChunk(bytes([self.level]) * 1600)
        elapsed = time.monotonic() - started
        yield SynthesisDone(Usage(NAME, "tts", self.model, characters=len(text)),
                            Timing(elapsed, elapsed))

    def estimate_usage(self, text: str) -> Usage:
        return Usage(self.name, "tts", self.model, characters=len(text), estimated=True)

    async def warm_up(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def build(settings: ToneSettings, config: Config) -> ToneTTS:
    return ToneTTS(settings.level, settings.model, require_secret(settings.token, "{env}"))


register(ProviderSpec(name=NAME, kind="tts", settings=ToneSettings, build=build,
                      env={{"{env}": "token"}}, billing=(Billing(BillingUnit.CHARACTERS),)))
'''


def write_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, str]:
    """A provider package on sys.path: (package, provider name, its env variable)."""
    suffix = uuid.uuid4().hex[:8]
    package, name, env = f"sb_plugin_{suffix}", f"tone_{suffix}", f"TONE_{suffix.upper()}_TOKEN"
    root = tmp_path / "site"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text('"""Test providers."""\n')
    (root / package / "tone.py").write_text(PLUGIN.format(name=name, env=env))
    monkeypatch.syspath_prepend(str(root))
    return package, name, env


def tone_price(name: str) -> dict[str, Any]:
    """The test voice's catalog entry: $2 per 1K characters."""
    return {"provider": name, "model": "tone-1", "unit": "per_1k_characters",
            "per_1k_characters": 2.0}


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# --- declarations and config validation -----------------------------------------------


def test_builtin_providers_declare_name_kind_table_env_and_billing() -> None:
    registry.discover()
    assert {"local_whisper", "openai"} <= set(registry.names("stt"))
    assert {"faq", "openai"} <= set(registry.names("agent"))
    assert {"espeak", "elevenlabs", "openai"} <= set(registry.names("tts"))
    tables = registry.tables()
    # The three OpenAI providers share one table and one settings model.
    assert tables["openai"] is OpenAISettings and tables["espeak"] is EspeakSettings
    env = registry.env_overrides()
    assert env["OPENAI_API_KEY"] == ("openai", "api_key")
    assert env["ELEVENLABS_API_KEY"] == ("elevenlabs", "api_key")
    assert registry.billing("stt", "local_whisper")[0].unit is BillingUnit.LOCAL_AUDIO_MINUTE
    assert [b.unit for b in registry.billing("llm", "faq")] == [BillingUnit.FREE]
    assert [b.unit for b in registry.billing("llm", "openai")] == [BillingUnit.TOKENS]


async def test_the_registry_answers_the_price_catalogs_questions() -> None:
    registry.discover()
    # What a model needs no catalog entry for: free, or our own CPU's minute.
    assert registry.uncatalogued_unit("tts", "espeak", "espeak-ng") is BillingUnit.FREE
    assert registry.uncatalogued_unit("stt", "local_whisper", "tiny.en") \
        is BillingUnit.LOCAL_AUDIO_MINUTE
    assert registry.uncatalogued_unit("llm", "openai", "gpt-5.4-mini") is None
    # The OpenAI voice bills per token (gpt-4o-mini-tts) or per character (tts-1).
    assert registry.declared_units("openai", "tts-1", ("tts",)) == {
        BillingUnit.AUDIO_TOKENS, BillingUnit.CHARACTERS}
    assert registry.declared_units("twilio", "say") is None  # nobody registered it
    # A built provider's spec, found by the module that registers it.
    config = Config.model_validate({})
    built = build_providers(config)
    names = [spec.name for kind, p in built.by_kind() if (spec := registry.spec_of(kind, p))]
    assert names == [*config.providers.stt, *config.providers.agent, *config.providers.tts]
    assert registry.spec_of("tts", object()) is None
    for provider in built.all():
        await provider.aclose()


def test_unknown_chain_name_is_rejected_naming_the_known_ones(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", """
        [providers]
        tts = ["espeek"]
    """)
    with pytest.raises(ConfigError, match=r"unknown provider 'espeek'; known: .*espeak") as caught:
        load_config(path, env={})
    assert "elevenlabs, espeak, openai" in str(caught.value)
    # Config.model_validate (what the tests build configs with) validates as much.
    with pytest.raises(ValueError, match=r"providers\.agent: unknown provider 'gpt'"):
        Config.model_validate({"providers": {"agent": ["gpt"]}})


def test_unknown_table_is_rejected_naming_the_known_ones(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", """
        [providers.elevenlab]
        voice_id = "x"
    """)
    with pytest.raises(ConfigError, match=r"providers\.elevenlab: unknown provider table; "
                                          r"known: .*elevenlabs, espeak, faq"):
        load_config(path, env={})
    with pytest.raises(ValueError, match=r"providers\.breaker_failure: unknown setting"):
        Config.model_validate({"providers": {"breaker_failure": 3}})


def test_a_typo_inside_a_table_still_fails() -> None:
    with pytest.raises(ValueError, match=r"providers\.espeak\.vioce: Extra inputs"):
        Config.model_validate({"providers": {"espeak": {"vioce": "en-gb"}}})


def test_tables_are_typed_and_default_when_absent() -> None:
    config = Config.model_validate({"providers": {"espeak": {"voice": "en-gb"}}})
    assert config.providers.settings("espeak", EspeakSettings).voice == "en-gb"
    eleven = config.providers.settings("elevenlabs", ElevenLabsSettings)
    assert eleven.model_id == "eleven_flash_v2_5" and not eleven.api_key.get_secret_value()
    with pytest.raises(TypeError):
        config.providers.settings("espeak", OpenAISettings)


def test_a_specs_environment_variables_are_applied(tmp_path: Path) -> None:
    config = load_config(ROOT / "config.toml", env={"ELEVENLABS_API_KEY": "xi-123",
                                                    "OPENAI_BASE_URL": "http://local/v1"})
    assert config.providers.settings("elevenlabs", ElevenLabsSettings) \
        .api_key.get_secret_value() == "xi-123"
    assert config.providers.settings("openai", OpenAISettings).base_url == "http://local/v1"


# --- wiring ---------------------------------------------------------------------------


def test_a_provider_without_its_key_is_skipped_with_the_reason() -> None:
    config = Config.model_validate({"providers": {"agent": ["openai", "faq"],
                                                  "tts": ["elevenlabs", "espeak"]}})
    with capture_logs() as logs:
        built = build_providers(config)
    assert [a.name for a in built.agents] == ["faq"]
    assert [t.name for t in built.tts] == ["espeak"]
    skipped = {(e["kind"], e["provider"]): e["reason"] for e in logs
               if e["event"] == "wiring.provider_skipped"}
    assert skipped == {("agent", "openai"): "OPENAI_API_KEY is not set",
                       ("tts", "elevenlabs"): "ELEVENLABS_API_KEY is not set"}
    with pytest.raises(NoProviderError, match=r"providers\.tts"):
        build_providers(Config.model_validate({"providers": {"tts": ["elevenlabs"]}}))


def test_discovery_does_not_load_the_cloud_sdks() -> None:
    # In a fresh process: the offline default validates and builds without the SDKs.
    code = textwrap.dedent(f"""
        import sys
        from engine.config import load_config
        from engine.wiring import build_providers
        build_providers(load_config({str(ROOT / "config.toml")!r}, env={{}}))
        loaded = [name for name in ("openai", "elevenlabs.client", "httpx2")
                  if type(sys.modules.get(name)).__name__ == "module"]
        print(",".join(loaded) or "none")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.strip() == "none"


# --- a third-party provider -----------------------------------------------------------


def test_a_provider_package_is_validated_configured_and_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package, name, env = write_plugin(tmp_path, monkeypatch)
    path = write_config(tmp_path / "c.toml", f"""
        [providers]
        packages = ["{package}"]
        tts = ["{name}", "espeak"]

        [providers.{name}]
        level = 66
    """)
    config = load_config(path, env={env: "secret"})
    settings_model = importlib.import_module(f"{package}.tone").ToneSettings
    settings = config.providers.settings(name, settings_model)
    assert settings.level == 66 and settings.token.get_secret_value() == "secret"
    built = build_providers(config)
    assert [t.name for t in built.tts] == [name, "espeak"]
    assert built.tts[0].model == "tone-1"

    with capture_logs() as logs:  # without its variable it is skipped, saying why
        assert [t.name for t in build_providers(load_config(path, env={})).tts] == ["espeak"]
    assert any(e["event"] == "wiring.provider_skipped" and e["reason"] == f"{env} is not set"
               for e in logs)
    typo = write_config(tmp_path / "typo.toml", f"""
        [providers]
        packages = ["{package}"]
        [providers.{name}]
        levle = 1
    """)
    with pytest.raises(ConfigError, match=rf"providers\.{name}\.levle: Extra inputs"):
        load_config(typo, env={})
    missing = write_config(tmp_path / "missing.toml", """
        [providers]
        packages = ["sb_no_such_package"]
    """)
    with pytest.raises(ConfigError, match="cannot import 'sb_no_such_package'"):
        load_config(missing, env={})


def test_a_provider_package_is_priced_by_its_declared_units(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package, name, _ = write_plugin(tmp_path, monkeypatch)
    Config.model_validate({"providers": {"packages": [package]}})
    table = PriceTable(PricesConfig.model_validate({"models": [tone_price(name)]}))
    assert table.cost(Usage(name, "tts", "tone-1", characters=500)) == 1.0
    assert table.cost(Usage(f"{name}:cache", "tts", "tone-1", characters=500)) == 0.0
    assert table.cost_decimal(Usage(name, "tts", "tone-2", characters=500))[1] is False
    assert table.unpriced_models == {f"tts:{name}:tone-2"}
    # A catalog entry in a unit the provider does not declare is a configuration error.
    with pytest.raises(ValueError, match=rf"prices\.models\[0\] \({name} 'tone-1'\): unit "
                                         r"'tokens' is not one .* bills in \(per_1k_characters\)"):
        PricesConfig.model_validate({"models": [{
            "provider": name, "model": "tone-1", "unit": "tokens", "input_per_1m": 1.0,
            "output_per_1m": 1.0}]})


async def test_a_provider_package_serves_a_real_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package, name, _ = write_plugin(tmp_path, monkeypatch)

    async def make(config: Config) -> Any:
        return await build_engine(config, history=False, supervisor_api=False)

    async with running_engine(
            tmp_path, make_engine=make,
            providers={"packages": [package], "tts": [name], name: {"level": 66,
                                                                     "token": "secret"}},
            prices={"models": [tone_price(name)]}) as run:
        events = EventLog(run)
        tone = run.engine.deps.tts
        assert tone.name == f"fallback({name})" and tone.model == "tone-1"
        result = await asyncio.wait_for(run.caller().run(Scenario(name="tone", steps=[])), 60)
        await asyncio.sleep(0.1)
        await events.close()
    assert result.error is None, result.error
    # The greeting the caller heard is the plug-in's tone, through the engine's chain.
    assert bytes([66]) * 160 in result.agent_audio
    usage = [e for e in events.events if isinstance(e, UsageCost) and e.provider == name]
    assert usage and all(e.cost_usd == pytest.approx(e.characters * 2.0 / 1000)
                         for e in usage)
