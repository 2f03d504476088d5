"""The price catalog: units priced to the micro-dollar, cost lines, malformed entries and
moved keys refused at load, and the start-up checks (unpriced, retiring and retired
models) on a real engine; the shipped catalog against the installed openai SDK."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import textwrap
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from engine.app import Engine
from engine.bus.events import UsageCost
from engine.config import Config, ConfigError, PricesConfig, load_config
from engine.money.catalog import DEFAULT_CATALOG
from engine.money.model_checks import check_configured_models
from engine.money.prices import CostLine, PriceTable, utc_now
from engine.providers.base import Usage
from engine.sim.scenario import Scenario
from engine.sim.standins.openai_api import OpenAIStandin
from engine.wiring import Providers, build_engine, build_providers
from switchboard import cli
from tests.harness import EventLog, local_providers, make_config, running_engine

ROOT = Path(__file__).resolve().parent.parent
D = Decimal

# Explicit prices, one entry per unit, so the shipped figures cannot move these.
CATALOG = PricesConfig.model_validate({"stt_local_per_minute": 0.001, "models": [
    {"provider": "openai", "model": "whisper-1", "unit": "per_minute", "per_minute": 0.006},
    {"provider": "openai", "model": "gpt-5.4-mini", "unit": "tokens", "input_per_1m": 0.75,
     "cached_input_per_1m": 0.075, "output_per_1m": 4.50},
    {"provider": "openai", "model": "gpt-5.4-nano", "unit": "tokens", "input_per_1m": 0.20,
     "output_per_1m": 1.25},
    {"provider": "openai", "model": "gpt-4o-mini-transcribe", "unit": "audio_tokens",
     "input_per_1m": 3.00, "output_per_1m": 5.00},
    {"provider": "openai", "model": "gpt-4o-mini-tts", "unit": "audio_tokens",
     "input_per_1m": 0.60, "output_per_1m": 12.00},
    {"provider": "elevenlabs", "model": "eleven_flash_v2_5", "unit": "per_1k_characters",
     "per_1k_characters": 0.05},
    {"provider": "twilio", "model": "say", "unit": "per_1k_characters",
     "per_1k_characters": 0.0},
    {"provider": "openai", "model": "llama-local", "unit": "free"},
]})


def llm_usage(**kwargs: Any) -> Usage:
    return Usage("openai", "llm", "gpt-5.4-mini", input_tokens=1234, cached_input_tokens=200,
                 output_tokens=56, **kwargs)


# --- pricing ----------------------------------------------------------------------------


@pytest.mark.parametrize(("usage", "cost", "unit"), [
    # 45 s at $0.006 per minute
    (Usage("openai", "stt", "whisper-1", audio_seconds=45.0), D("0.0045"), "audio minute"),
    # (1234 - 200) * 0.75 + 200 * 0.075 + 56 * 4.50 = 775.5 + 15 + 252 per 1M
    (llm_usage(), D("0.0010425"), "1M input tokens"),
    # 600 audio tokens in at $3, 20 text tokens out at $5 per 1M
    (Usage("openai", "stt", "gpt-4o-mini-transcribe", audio_seconds=60.0, input_tokens=600,
           output_tokens=20), D("0.0019"), "1M audio input tokens"),
    # 14 text tokens in at $0.60, 1250 audio tokens out at $12 per 1M
    (Usage("openai", "tts", "gpt-4o-mini-tts", characters=53, input_tokens=14,
           output_tokens=1250, estimated=True), D("0.0150084"), "1M text input tokens"),
    # 321 characters at $0.05 per 1K
    (Usage("elevenlabs", "tts", "eleven_flash_v2_5", characters=321), D("0.01605"),
     "1K characters"),
    (Usage("twilio", "tts", "say", characters=120), D(0), "1K characters"),
    (Usage("openai", "llm", "llama-local", input_tokens=900, output_tokens=40), D(0),
     "request (free)"),
    # our own CPU: 90 s at $0.001 per minute
    (Usage("local_whisper", "stt", "bundled", audio_seconds=90.0), D("0.0015"),
     "local audio minute"),
    (Usage("espeak", "tts", "espeak-ng", characters=500), D(0), "request (free)"),
    (Usage("faq", "llm", "faq"), D(0), "request (free)"),
    (Usage("elevenlabs", "tts", "eleven_flash_v2_5", cached=True), D(0),
     "cache hit (not billed)"),
    (Usage("openai", "llm", "gpt-5.4-mini", cached=True), D(0), "cache hit (not billed)"),
    (Usage("elevenlabs:cache", "tts", "eleven_flash_v2_5", characters=321), D(0),
     "cache hit (not billed)"),
])
def test_every_unit_is_priced_to_the_micro_dollar(usage: Usage, cost: Decimal,
                                                  unit: str) -> None:
    table = PriceTable(CATALOG)
    assert table.cost_decimal(usage) == (cost, True)
    lines = table.cost_lines(usage)
    assert lines[0].unit == unit
    assert sum(line.amount for line in lines) == cost
    assert all(line.amount == line.quantity * line.unit_price for line in lines)
    assert all(line.estimated is usage.estimated and not line.unpriced for line in lines)
    assert table.unpriced_models == set()


def test_the_lines_of_an_llm_call() -> None:
    table = PriceTable(CATALOG)
    assert table.cost_lines(llm_usage()) == [
        CostLine("agent", "openai", "gpt-5.4-mini", D("0.001034"), "1M input tokens",
                 D("0.75"), D("0.0007755")),
        CostLine("agent", "openai", "gpt-5.4-mini", D("0.0002"), "1M cached input tokens",
                 D("0.075"), D("0.000015")),
        CostLine("agent", "openai", "gpt-5.4-mini", D("0.000056"), "1M output tokens",
                 D("4.5"), D("0.000252")),
    ]
    # Nothing cached: two lines. A cut stream's estimate is flagged on every line.
    lines = table.cost_lines(Usage("openai", "llm", "gpt-5.4-mini", input_tokens=500,
                                   output_tokens=10, estimated=True))
    assert [(line.unit, line.estimated) for line in lines] == [
        ("1M input tokens", True), ("1M output tokens", True)]
    # No cached price listed: cached input costs the input price.
    nano = table.cost_lines(Usage("openai", "llm", "gpt-5.4-nano", input_tokens=1000,
                                  cached_input_tokens=400, output_tokens=100))
    assert [(line.unit, line.unit_price, line.amount) for line in nano] == [
        ("1M input tokens", D("0.2"), D("0.00012")),
        ("1M cached input tokens", D("0.2"), D("0.00008")),
        ("1M output tokens", D("1.25"), D("0.000125"))]
    assert {line.item for line in table.cost_lines(
        Usage("openai", "stt", "whisper-1", audio_seconds=3.0))} == {"stt"}


def test_an_unpriced_model_is_booked_at_zero_with_its_quantities_flagged() -> None:
    table = PriceTable(CATALOG)
    usage = Usage("openai", "llm", "gpt-9-huge", input_tokens=1000, output_tokens=200)
    with capture_logs() as logs:
        lines = table.cost_lines(usage)
        assert table.cost_decimal(usage) == (D(0), False)
    assert [(line.unit, line.quantity, line.amount, line.unpriced) for line in lines] == [
        ("1M input tokens", D("0.001"), D(0), True), ("1M output tokens", D("0.0002"), D(0), True)]
    assert table.unpriced_models == {"llm:openai:gpt-9-huge"}
    assert sum(e["log_level"] == "warning" for e in logs) == 1
    # A provider nobody registered is priced from the catalog too, or unpriced.
    assert table.cost_decimal(Usage("acme", "tts", "voice-1", characters=10)) == (D(0), False)


def test_the_shipped_catalog_prices_twilio_say_and_is_config_tomls() -> None:
    shipped = load_config(ROOT / "config.toml", env={}).prices
    assert shipped.models == list(DEFAULT_CATALOG) == PricesConfig().models
    table = PriceTable(shipped)
    assert table.cost_decimal(Usage("twilio", "tts", "say", characters=120)) == (D(0), True)
    listed = {(e.provider, e.model) for e in shipped.models}
    assert {("openai", m) for m in (
        "gpt-5.4-mini", "gpt-4o-mini", "gpt-4.1-mini", "gpt-5-mini", "gpt-5.4-nano",
        "gpt-transcribe", "whisper-1", "gpt-4o-mini-transcribe", "gpt-4o-transcribe",
        "tts-1", "gpt-4o-mini-tts")} <= listed
    assert {("elevenlabs", m) for m in (
        "eleven_flash_v2_5", "eleven_multilingual_v2", "eleven_v3")} <= listed


def sdk_shutdowns() -> dict[str, date]:
    """Model -> announced shutdown date, from the installed openai SDK's own notes."""
    spec = importlib.util.find_spec("openai")
    assert spec is not None and spec.submodule_search_locations
    types = Path(next(iter(spec.submodule_search_locations))) / "types"
    dates: dict[str, date] = {}
    for path in ("shared/chat_model.py", "audio_model.py", "audio/speech_model.py"):
        notes = (types / path).read_text().split('"""Deprecated values:', 1)[1]
        for item in " ".join(notes.split()).split(" - "):
            found = re.search(r"shutdown date: (\d{4}-\d{2}-\d{2})", item)
            if found:
                for model in re.findall(r'"([^"]+)"', item.split(":", 1)[0]):
                    dates[model] = date.fromisoformat(found.group(1))
    return dates


def test_shutdown_dates_are_the_installed_sdks() -> None:
    announced = sdk_shutdowns()
    assert announced["gpt-4o-mini"] == date(2027, 1, 14)  # the notes were read at all
    for entry in DEFAULT_CATALOG:
        if entry.provider == "openai":
            assert entry.shutdown == announced.get(entry.model), entry.model
    # The defaults are models not announced for shutdown.
    assert "gpt-5.4-mini" not in announced and "gpt-transcribe" not in announced


# --- malformed entries and moved keys -------------------------------------------------


def entry_toml(**fields: Any) -> str:
    body = {"provider": '"openai"', "model": '"whisper-1"', "unit": '"per_minute"',
            "per_minute": "0.006", **fields}
    return "[[prices.models]]\n" + "".join(f"{k} = {v}\n" for k, v in body.items()
                                           if v is not None)


@pytest.mark.parametrize(("toml", "message"), [
    (entry_toml(unit='"per_token"'),
     r"prices\.models\.0\.unit\n.*unknown unit 'per_token'; one of: per_minute, tokens"),
    (entry_toml(unit='"local_minute"'), r"prices\.models\.0\.unit\n.*unknown unit"),
    (entry_toml(unit='"tokens"', per_minute=None, input_per_1m="0.1"),
     r"prices\.models\.0\n.*openai 'whisper-1': unit 'tokens' needs output_per_1m"),
    (entry_toml(input_per_1m="0.1"),
     r"prices\.models\.0\n.*unit 'per_minute' takes no input_per_1m"),
    (entry_toml(per_minute="-0.006"),
     r"prices\.models\.0\.per_minute\n.*greater than or equal to 0"),
    (entry_toml(shutdown='"2027-02-30"'), r"prices\.models\.0\.shutdown\n"),
    (entry_toml(shutdown="2027-01-14T10:30:00"), r"prices\.models\.0\.shutdown\n"),
    (entry_toml(shutdown='"soon"'), r"prices\.models\.0\.shutdown\n"),
    (entry_toml(model='""'), r"prices\.models\.0\.model\n"),
    (entry_toml(price="0.006"), r"prices\.models\.0\.price\n.*Extra inputs"),
    (entry_toml() + entry_toml(per_minute="0.007"),
     r"prices\.models\[1\] \(openai 'whisper-1'\): a second entry \(the first is "
     r"prices\.models\[0\]\)"),
    (entry_toml(provider='"elevenlabs"', unit='"tokens"', per_minute=None,
                input_per_1m="1.0", output_per_1m="1.0"),
     r"prices\.models\[0\] \(elevenlabs 'whisper-1'\): unit 'tokens' is not one elevenlabs "
     r"bills in \(per_1k_characters\)"),
    ("[prices.llm_per_million]\n\"gpt-4o-mini\" = [0.15, 0.075, 0.60]\n",
     r"prices\.llm_per_million: model prices moved to the \[\[prices\.models\]\] catalog"),
    ("[prices]\nstt_openai_per_minute = {whisper-1 = 0.006}\n"
     "tts_per_thousand_chars = {espeak = 0.0}\n",
     r"prices\.stt_openai_per_minute, prices\.tts_per_thousand_chars: model prices moved"),
])
def test_malformed_entries_and_moved_keys_stop_at_load(tmp_path: Path, toml: str,
                                                      message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_a_free_entry_is_allowed_for_any_provider() -> None:
    prices = PricesConfig.model_validate({"models": [
        {"provider": "elevenlabs", "model": "self-hosted", "unit": "free"}]})
    assert PriceTable(prices).cost_decimal(
        Usage("elevenlabs", "tts", "self-hosted", characters=99)) == (D(0), True)


# --- start-up checks -------------------------------------------------------------------


def cloud_config(tmp_path: Path, models: list[dict[str, Any]] | None = None,
                 **sections: dict[str, Any]) -> Config:
    """An OpenAI agent (then the FAQ) with a key; `models` replaces the catalog."""
    providers = {"agent": ["openai", "faq"], **sections.pop("providers", {})}
    providers["openai"] = {"api_key": "sk-test", **providers.get("openai", {})}
    if models is not None:
        sections["prices"] = {"models": models}
    return make_config(tmp_path, 0, providers=providers, **sections)


async def test_an_unpriced_model_stops_the_engine_naming_model_and_key(
        tmp_path: Path) -> None:
    config = cloud_config(tmp_path, providers={"openai": {"llm_model": "gpt-9-huge"}})
    with pytest.raises(ConfigError) as caught:
        await build_engine(config, history=False, supervisor_api=False)
    assert str(caught.value) == (
        "no price for openai model 'gpt-9-huge' (agent): add a [[prices.models]] entry with "
        "provider = \"openai\" and model = \"gpt-9-huge\" to config.toml, or set "
        "engine.allow_unpriced_models = true")


def test_switchboard_serve_prints_the_refusal_as_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(f"""
        [engine]
        data_dir = "{tmp_path / 'data'}"
        [providers]
        agent = ["openai", "faq"]
        [providers.openai]
        llm_model = "gpt-9-huge"
        [logging]
        format = "json"
    """))
    assert cli.main(["--config", str(path), "serve", "--port", "0"]) == 2
    err = capsys.readouterr().err  # (log lines, if any, go to stderr too)
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "switchboard: no price for openai model 'gpt-9-huge' (agent): add a "
        "[[prices.models]] entry with provider = \"openai\" and model = \"gpt-9-huge\" to "
        "config.toml, or set engine.allow_unpriced_models = true")
    assert not (tmp_path / "data").exists()  # refused before anything was opened


async def test_allow_unpriced_starts_loudly_and_marks_every_cost_unpriced(
        tmp_path: Path) -> None:
    async with OpenAIStandin() as server:
        async def make(config: Config) -> Engine:
            with capture_logs() as logs:
                engine = await build_engine(config, history=False, supervisor_api=False)
            warned = [e for e in logs if e["event"] == "prices.unpriced_model"]
            assert [(e["log_level"], e["model"], e["kind"]) for e in warned] == [
                ("warning", "gpt-9-voice", "tts")]
            return engine

        async with running_engine(
                tmp_path, make_engine=make, engine={"allow_unpriced_models": True},
                cache={"backend": "off"},
                providers={"tts": ["openai"], "openai": {
                    "api_key": "sk-test", "base_url": server.base_url,
                    "tts_model": "gpt-9-voice"}}) as run:
            events = EventLog(run)
            result = await asyncio.wait_for(run.caller().run(Scenario(name="hi", steps=[])),
                                            60)
            await run.engine.hub.drain()
            await asyncio.sleep(0.1)
            await events.close()
    assert result.error is None, result.error
    voice = [e for e in events.events if isinstance(e, UsageCost) and e.kind == "tts"]
    assert voice, "the greeting was not booked"
    assert all(e.model == "gpt-9-voice" and e.unpriced and e.cost_usd == 0.0
               and e.estimated for e in voice)
    phone = [e for e in events.events if isinstance(e, UsageCost) and e.kind == "telephony"]
    assert phone and not any(e.unpriced for e in phone)


def retiring_catalog(shutdown: date) -> list[dict[str, Any]]:
    return [{"provider": "openai", "model": "gpt-test", "unit": "tokens",
             "input_per_1m": 1.0, "output_per_1m": 2.0, "shutdown": shutdown}]


async def test_a_model_retiring_within_60_days_is_warned_at_start(tmp_path: Path) -> None:
    shutdown = utc_now().date() + timedelta(days=30)
    config = cloud_config(tmp_path, retiring_catalog(shutdown),
                          providers={"openai": {"llm_model": "gpt-test"}})
    local, cloud = local_providers(config), build_providers(config)
    with capture_logs() as logs:
        engine = await build_engine(config, history=False, supervisor_api=False,
                                    providers=Providers(local.stt, cloud.agents, local.tts))
    for hook in engine.on_stopping:
        await hook()
    for agent in cloud.agents:
        await agent.aclose()
    [warning] = [e for e in logs if e["event"] == "prices.model_retiring"]
    assert warning["log_level"] == "warning" and warning["days_left"] == 30
    assert warning["shutdown"] == shutdown.isoformat() and warning["model"] == "gpt-test"
    assert warning["detail"] == (f"openai model 'gpt-test' (agent) shuts down on "
                                 f"{shutdown.isoformat()}, in 30 days: choose another model "
                                 "in [providers.openai]")
    # 61 days ahead: nothing to say.
    far = cloud_config(tmp_path, retiring_catalog(utc_now().date() + timedelta(days=61)),
                       providers={"openai": {"llm_model": "gpt-test"}})
    with capture_logs() as logs:
        check_configured_models(far, build_providers(far).by_kind())
    assert not [e for e in logs if e["event"] == "prices.model_retiring"]


@pytest.mark.parametrize("days_ago", [0, 1])
async def test_a_model_past_its_shutdown_date_stops_the_engine(tmp_path: Path,
                                                               days_ago: int) -> None:
    shutdown = utc_now().date() - timedelta(days=days_ago)
    config = cloud_config(tmp_path, retiring_catalog(shutdown),
                          providers={"openai": {"llm_model": "gpt-test"}})
    with pytest.raises(ConfigError) as caught:
        await build_engine(config, history=False, supervisor_api=False)
    assert str(caught.value) == (f"openai model 'gpt-test' (agent) was shut down by its "
                                 f"vendor on {shutdown.isoformat()}: choose another model in "
                                 "[providers.openai]")


def test_every_problem_is_named_in_one_line_and_units_are_checked_per_kind(
        tmp_path: Path) -> None:
    config = cloud_config(tmp_path, [
        {"provider": "openai", "model": "tts-x", "unit": "tokens", "input_per_1m": 1.0,
         "output_per_1m": 1.0}],
        providers={"tts": ["openai", "espeak"], "stt": ["openai", "local_whisper"],
                   "openai": {"tts_model": "tts-x", "llm_model": "gpt-9"}})
    with pytest.raises(ConfigError) as caught:
        check_configured_models(config, build_providers(config).by_kind())
    problems = str(caught.value).split("; ")
    assert "\n" not in str(caught.value)
    assert [p.split(":")[0] for p in problems] == [
        "no price for openai model 'gpt-transcribe' (stt)",
        "no price for openai model 'gpt-9' (agent)",
        "openai model 'tts-x' (tts) is priced in 'tokens', which the tts provider does not "
        "bill in (audio_tokens, per_1k_characters)"]


def test_the_documented_cloud_stack_is_priced_and_the_openai_voice_is_warned(
        tmp_path: Path) -> None:
    # The shipped catalog and provider defaults, on the day they were checked.
    checked = date(2026, 11, 30)
    config = make_config(tmp_path, 0, providers={
        "stt": ["openai", "local_whisper"], "agent": ["openai", "faq"],
        "tts": ["elevenlabs", "openai", "espeak"],
        "openai": {"api_key": "sk-test"}, "elevenlabs": {"api_key": "xi-test"}})
    built = build_providers(config)
    assert [p.model for p in (built.stt[0], built.agents[0], built.tts[0], built.tts[1])] == [
        "gpt-transcribe", "gpt-5.4-mini", "eleven_flash_v2_5", "gpt-4o-mini-tts"]
    with capture_logs() as logs:
        check_configured_models(config, built.by_kind(), today=checked)
    assert [(e["model"], e["days_left"]) for e in logs
            if e["event"] == "prices.model_retiring"] == [("gpt-4o-mini-tts", 37)]
    with pytest.raises(ConfigError, match=r"openai model 'gpt-4o-mini-tts' \(tts\) was shut "
                                          r"down by its vendor on 2027-01-06"):
        check_configured_models(config, built.by_kind(), today=date(2027, 1, 6))


def test_a_usage_without_its_models_unit_is_flagged_not_silently_free() -> None:
    # A request abandoned before its end, estimated in characters: the model bills tokens.
    table = PriceTable(CATALOG)
    usage = Usage("openai", "tts", "gpt-4o-mini-tts", characters=120, estimated=True)
    assert table.cost_decimal(usage) == (D(0), False)
    assert [(line.unit, line.quantity, line.unpriced, line.estimated)
            for line in table.cost_lines(usage)] == [("1K characters", D("0.12"), True, True)]
    stt = Usage("openai", "stt", "gpt-4o-mini-transcribe", audio_seconds=30.0, estimated=True)
    assert [(line.unit, line.quantity) for line in table.cost_lines(stt)] == [
        ("audio minute", D("0.5"))]
    assert table.unpriced_models == {"tts:openai:gpt-4o-mini-tts",
                                     "stt:openai:gpt-4o-mini-transcribe"}
    # Nothing measured at all (an LLM request that produced nothing): no line, no flag.
    assert table.cost_lines(Usage("openai", "llm", "gpt-5.4-mini")) == []


def test_a_local_models_cpu_time_is_billed_only_when_cpu_second_is_priced() -> None:
    usage = Usage("piper", "tts", "en_US-joe-medium", characters=40, cpu_seconds=0.25)
    assert PriceTable(PricesConfig()).cost_lines(usage)[-1].unit != "CPU second"
    priced = PriceTable(PricesConfig(cpu_second=0.00002))
    cpu = priced.cost_lines(usage)[-1]
    assert (cpu.unit, cpu.quantity, cpu.amount) == ("CPU second", D("0.25"), D("0.000005"))
    assert priced.cost(usage) == pytest.approx(0.000005, abs=1e-12)
    cached = Usage("piper", "tts", "en_US-joe-medium", cpu_seconds=0.25, cached=True)
    assert priced.cost(cached) == 0.0
