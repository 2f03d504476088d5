"""Start-up checks of the configured models against the price catalog.

For every provider the chains built, its model (the provider's `model`):
- must have a catalog entry when its provider bills it (no free or local-CPU unit
  declared for it); otherwise the engine stops, naming the model and the key to add.
  `engine.allow_unpriced_models` lets it start instead, with one loud warning per model
  (its costs are then booked as unpriced);
- must be priced in a unit its provider bills in for that kind;
- must not be past its announced shutdown date (the engine stops); one retiring within
  `RETIRING_WITHIN_DAYS` days is warned about.
Every problem is gathered into one `ConfigError`, one line, so `switchboard serve` prints
it as such.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

from engine.config import Config, ConfigError
from engine.log import get_logger
from engine.money.prices import PriceTable, utc_now
from engine.providers.base import Agent, SpeechToText, TextToSpeech
from engine.providers.billing import BillingUnit
from engine.providers.registry import USAGE_KIND, Kind, registry

Provider = SpeechToText | Agent | TextToSpeech

log = get_logger(__name__)

RETIRING_WITHIN_DAYS = 60


@dataclass(frozen=True, slots=True)
class ConfiguredModel:
    kind: Kind  # the chain it serves in
    provider: str  # the registry name: the chains', the catalog's and Usage.provider
    model: str


def configured_models(built: Iterable[tuple[Kind, Provider]]) -> list[ConfiguredModel]:
    """Each built provider's model under its registry name, once (in chain order)."""
    found: list[ConfiguredModel] = []
    for kind, provider in built:
        spec = registry.spec_of(kind, provider)
        if spec is None:  # made outside the registry (a test double): nothing to check
            log.info("prices.provider_not_checked", kind=kind,
                     provider=provider.name)
            continue
        configured = ConfiguredModel(kind, spec.name, provider.model)
        if configured not in found:
            found.append(configured)
    return found


def check_configured_models(config: Config, built: Iterable[tuple[Kind, Provider]],
                            today: date | None = None) -> None:
    """Raise ConfigError for every configured model the catalog refuses; warn the rest."""
    table = PriceTable(config.prices)
    today = today or utc_now().date()
    problems: list[str] = []
    for configured in configured_models(built):
        problem = _check(configured, table, config.engine.allow_unpriced_models, today)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError("; ".join(problems))


def _check(m: ConfiguredModel, table: PriceTable, allow_unpriced: bool,
           today: date) -> str | None:
    """The problem with one configured model, if any (warnings are logged here)."""
    named = f"{m.provider} model {m.model!r} ({m.kind})"
    entry = table.entry(m.provider, m.model)
    if entry is None:
        if registry.uncatalogued_unit(USAGE_KIND[m.kind], m.provider, m.model) is not None:
            return None  # free, or our own CPU at prices.stt_local_per_minute
        if not allow_unpriced:
            return (f"no price for {named}: add a [[prices.models]] entry with provider = "
                    f"\"{m.provider}\" and model = \"{m.model}\" to config.toml, or set "
                    "engine.allow_unpriced_models = true")
        log.warning("prices.unpriced_model", provider=m.provider, model=m.model, kind=m.kind,
                    detail=f"no price for {named}: engine.allow_unpriced_models is set, so "
                           "its costs count as $0 and are marked unpriced")
        return None
    units = registry.declared_units(m.provider, m.model, (m.kind,)) or frozenset()
    if entry.unit is not BillingUnit.FREE and entry.unit not in units:
        return (f"{named} is priced in {entry.unit.value!r}, which the {m.kind} provider "
                f"does not bill in ({', '.join(sorted(units))}): fix its [[prices.models]] "
                "entry")
    if entry.shutdown is None:
        return None
    days = (entry.shutdown - today).days
    if days <= 0:
        return (f"{named} was shut down by its vendor on {entry.shutdown.isoformat()}: "
                f"choose another model in [providers.{m.provider}]")
    if days <= RETIRING_WITHIN_DAYS:
        log.warning("prices.model_retiring", provider=m.provider, model=m.model, kind=m.kind,
                    shutdown=entry.shutdown.isoformat(), days_left=days,
                    detail=f"{named} shuts down on {entry.shutdown.isoformat()}, in {days} "
                           f"days: choose another model in [providers.{m.provider}]")
    return None
