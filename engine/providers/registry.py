"""The provider registry: what each provider module declares, and how modules are found.

A provider module declares, next to its class, a `ProviderSpec` (name, kind, settings
model, environment variables, billable units, builder) and passes it to `register` when
it is imported. `discover` imports the modules of `engine.providers.builtin` and of any
package named in `providers.packages`, so a third-party provider needs no change here.

Config validation (`engine.config`), wiring (`engine.wiring`), the price table
(`engine.money.prices`) and the start-up price checks (`engine.money.model_checks`) read
the registry; nothing else branches on a provider's name. The billing units themselves
live in `engine.providers.billing` (re-exported here for provider modules).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, SecretStr

from engine.config import ConfigError
from engine.providers.base import ProviderKind
from engine.providers.billing import UNCATALOGUED, Billing, BillingUnit

if TYPE_CHECKING:
    from engine.config import Config

Kind = Literal["stt", "agent", "tts"]  # the chain a provider serves in (config keys)
KINDS: tuple[Kind, ...] = ("stt", "agent", "tts")
# Usage reports the agent's kind as "llm" (the events' and the ledger's vocabulary).
USAGE_KIND: Mapping[Kind, ProviderKind] = MappingProxyType(
    {"stt": "stt", "agent": "llm", "tts": "tts"})
BUILTIN_PACKAGE = "engine.providers.builtin"


# A provider that declares nothing is billed in its kind's usual units, as every provider
# was before declarations existed (each model's catalog entry says which).
DEFAULT_BILLING: Mapping[ProviderKind, tuple[Billing, ...]] = MappingProxyType({
    "stt": (Billing(BillingUnit.AUDIO_TOKENS), Billing(BillingUnit.AUDIO_MINUTE)),
    "llm": (Billing(BillingUnit.TOKENS),),
    "tts": (Billing(BillingUnit.CHARACTERS),),
})


class ProviderSettings(BaseModel):
    """Base of every `[providers.NAME]` table: a typo in config.toml fails loudly."""

    model_config = ConfigDict(extra="forbid")


class NoSettings(ProviderSettings):
    """For a provider that reads nothing from its own table."""


class ProviderUnavailable(Exception):
    """A builder cannot make its provider here (e.g. no API key); `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownProviderError(ConfigError):
    """A chain or a table names a provider nobody registered."""


S = TypeVar("S", bound=ProviderSettings)


@dataclass(frozen=True, slots=True)
class ProviderSpec(Generic[S]):
    """Everything the engine needs to know about one provider, declared by its module.

    Providers of several kinds may share one name, and then one table and one settings
    model (the OpenAI speech-to-text, agent and text-to-speech share `[providers.openai]`).
    """

    name: str  # in the chains and as the table `[providers.NAME]`; Usage.provider
    kind: Kind
    settings: type[S]
    # Makes the provider from its table and the whole config (chain-wide timeouts, the
    # FAQ, ...); raises ProviderUnavailable when it cannot run here. The provider's class
    # lives in this builder's module (`Registry.spec_of` finds a built provider's spec so).
    build: Callable[[S, Config], object]
    env: Mapping[str, str] = field(default_factory=dict)  # variable -> settings field
    # The units it may bill in: each model's catalog entry names one of them; free or
    # local-CPU units also price a model the catalog does not list.
    billing: tuple[Billing, ...] = ()


def require_secret(value: SecretStr, env_var: str) -> str:
    """The secret, or ProviderUnavailable naming the variable that should hold it."""
    secret = value.get_secret_value()
    if not secret:
        raise ProviderUnavailable(f"{env_var} is not set")
    return secret


class Registry:
    """The registered specs, by (kind, name), and their tables."""

    def __init__(self) -> None:
        self._specs: dict[tuple[Kind, str], ProviderSpec[Any]] = {}
        self._billing: dict[tuple[ProviderKind, str], tuple[Billing, ...]] = {}
        self._discovered: set[str] = set()

    def register(self, spec: ProviderSpec[S]) -> ProviderSpec[S]:
        key = (spec.kind, spec.name)
        known = self._specs.get(key)
        if known is not None and known.build.__module__ != spec.build.__module__:
            raise ValueError(f"{spec.kind} provider {spec.name!r} is registered twice "
                             f"({known.build.__module__}, {spec.build.__module__})")
        shared = self.tables().get(spec.name)
        if shared is not None and shared is not spec.settings and known is None:
            raise ValueError(f"[providers.{spec.name}] has two settings models "
                             f"({shared.__name__}, {spec.settings.__name__})")
        self._specs[key] = spec
        if spec.billing:
            self._billing[(USAGE_KIND[spec.kind], spec.name)] = spec.billing
        return spec

    def spec(self, kind: Kind, name: str) -> ProviderSpec[Any]:
        """The spec of `name` in chain `kind`; UnknownProviderError lists the known ones."""
        found = self._specs.get((kind, name))
        if found is None:
            raise UnknownProviderError(f"providers.{kind}: unknown provider {name!r}; "
                                       f"known: {', '.join(self.names(kind)) or 'none'}")
        return found

    def names(self, kind: Kind) -> list[str]:
        return sorted(name for k, name in self._specs if k == kind)

    def tables(self) -> dict[str, type[ProviderSettings]]:
        """Table name -> settings model, for every registered provider."""
        return {spec.name: spec.settings for spec in self._specs.values()}

    def env_overrides(self) -> dict[str, tuple[str, str]]:
        """Environment variable -> (table, field), from every spec."""
        return {var: (spec.name, key) for spec in self._specs.values()
                for var, key in spec.env.items()}

    def billing(self, kind: ProviderKind, provider: str) -> tuple[Billing, ...]:
        """How `provider`'s usage of `kind` is billed (its kind's usual units if undeclared)."""
        declared = self._billing.get((kind, provider))
        return declared if declared is not None else DEFAULT_BILLING.get(kind, ())

    def declared_units(self, provider: str, model: str,
                       kinds: Iterable[Kind] = KINDS) -> frozenset[BillingUnit] | None:
        """The units `provider` may bill `model` in, over the given kinds it serves in;
        None when no provider of that name is registered for them (nothing to check)."""
        served = [kind for kind in kinds if (kind, provider) in self._specs]
        if not served:
            return None
        return frozenset(b.unit for kind in served for b in self.billing(USAGE_KIND[kind], provider)
                         if b.applies_to(model))

    def uncatalogued_unit(self, kind: ProviderKind, provider: str,
                          model: str) -> BillingUnit | None:
        """The unit `provider` bills `model` in when the catalog has no entry for it: free
        or our own CPU, whichever it declares first; None when the model needs a price."""
        return next((b.unit for b in self.billing(kind, provider)
                     if b.applies_to(model) and b.unit in UNCATALOGUED), None)

    def spec_of(self, kind: Kind, provider: object) -> ProviderSpec[Any] | None:
        """The spec whose builder made `provider`: a provider's class lives in the module
        that registers it (None for an object no registered module defines)."""
        module = type(provider).__module__
        return next((spec for (k, _), spec in self._specs.items()
                     if k == kind and spec.build.__module__ == module), None)

    def discover(self, packages: Iterable[str] = ()) -> None:
        """Import the built-in provider modules and the named packages or modules."""
        for name in (BUILTIN_PACKAGE, *packages):
            if name in self._discovered:
                continue
            try:
                module = importlib.import_module(name)
                if module.__spec__ is not None and module.__spec__.submodule_search_locations:
                    for info in pkgutil.iter_modules(module.__spec__.submodule_search_locations,
                                                     f"{name}."):
                        importlib.import_module(info.name)
            except ImportError as exc:
                raise ConfigError(f"providers.packages: cannot import {name!r}: {exc}") from exc
            self._discovered.add(name)


# The process's registry: provider modules register into it when imported.
registry = Registry()
register = registry.register


def lazy_import(name: str) -> ModuleType:
    """`name`, imported on first use: keeps a vendor SDK out of start-up until it is called.

    Discovery imports every provider module; the offline default must not pay for the
    cloud SDKs (half a second and ~25 MB). Use it under `if not TYPE_CHECKING:` so type
    checkers still see a plain import. First use must happen on one thread (the event
    loop's), as Python 3.11's lazy loader is not thread-safe.
    """
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
