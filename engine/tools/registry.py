"""The tools of an engine (`ToolBox`): the specs the agent is offered (configured
`[[tools]]` and, when switched on, the built-ins), their compiled argument schemas, the
HTTP tools and the one HTTP client session they share.

Built once per engine (`ToolBox.from_config`, None when there is no tool at all) and
closed with it. A configured tool whose secret is missing from the environment stops the
engine at start, naming the tool and the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import aiohttp

from engine.config import Config, ConfigError
from engine.providers.base import ToolSpec
from engine.tools.builtins import builtin_specs
from engine.tools.http_tool import HttpTool
from engine.tools.validation import ArgumentValidator


class ToolBox:
    def __init__(self, config: Config, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.config = config
        self.use = config.tool_use
        self._http_tools: dict[str, HttpTool] = {}
        specs: list[ToolSpec] = []
        for tool in config.tools:
            secret = None
            if tool.auth_env:
                secret = env.get(tool.auth_env)
                if not secret:
                    raise ConfigError(f"tool {tool.name!r}: the environment variable "
                                      f"{tool.auth_env} (its {tool.auth_header}) is not set")
            self._http_tools[tool.name] = HttpTool(tool, secret, self.use.result_max_chars,
                                                   self.use.max_response_bytes)
            specs.append(ToolSpec(tool.name, tool.description, tool.parameters))
        self._builtins = {s.name for s in builtin_specs(config)} if self.use.builtins \
            else set()
        if self.use.builtins:
            specs += builtin_specs(config)
        self.specs: tuple[ToolSpec, ...] = tuple(specs)
        self._validators = {s.name: ArgumentValidator(s.parameters) for s in specs}
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, config: Config, env: Mapping[str, str] | None = None
                    ) -> ToolBox | None:
        """The engine's tools; None when none is configured (the agent is offered none)."""
        if not config.tools and not config.tool_use.builtins:
            return None
        return cls(config, env)

    def validator(self, name: str) -> ArgumentValidator | None:
        """The tool's argument schema; None for a tool the agent was never offered."""
        return self._validators.get(name)

    def is_builtin(self, name: str) -> bool:
        return name in self._builtins

    def http_tool(self, name: str) -> HttpTool:
        return self._http_tools[name]

    def http(self) -> aiohttp.ClientSession:
        """The HTTP session every tool call uses (made on first use: it keeps endpoints'
        connections warm across calls)."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30))
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
