"""The rules of the house, checked on the source: which part may import which.

Every import counts, including the ones inside functions and under TYPE_CHECKING: a lazy
import is still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Part (a folder or file under the repository) -> modules it must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # The engine runs headless: only the launcher knows both halves.
    "engine": ("console", "switchboard"),
    # The call owns no wire and reports through its observer; it may read the shared
    # call-state vocabulary of the event schema, nothing else of the operations side.
    "engine/session": ("engine.telephony", "engine.hub", "engine.supervision",
                       "engine.money", "engine.record", "engine.bus.event_bus",
                       "engine.bus.memory", "engine.bus.redis_streams", "engine.wiring",
                       "engine.app"),
    # The edge knows Twilio and the call's ports, nothing of LLMs, money or the record.
    "engine/telephony": ("engine.providers", "engine.hub", "engine.supervision",
                         "engine.money", "engine.record", "engine.bus", "engine.wiring"),
    # Providers serve whoever calls them.
    "engine/providers": ("engine.session", "engine.telephony", "engine.hub",
                         "engine.supervision", "engine.money", "engine.record", "engine.bus",
                         "engine.wiring", "engine.app"),
    "engine/audio": ("engine.session", "engine.telephony", "engine.providers", "engine.hub",
                     "engine.supervision", "engine.money", "engine.record", "engine.bus"),
    # Money and the record read what the call produces; they never drive it.
    "engine/money": ("engine.telephony", "engine.hub", "engine.supervision", "engine.wiring",
                     "engine.app"),
    "engine/record": ("engine.telephony", "engine.hub", "engine.supervision", "engine.wiring",
                      "engine.app"),
    "engine/bus": ("engine.session", "engine.telephony", "engine.providers", "engine.hub",
                   "engine.supervision", "engine.money", "engine.record"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from engine.bus import events` names a module too.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _matches(module: str, banned: str) -> bool:
    return module == banned or module.startswith(banned + ".")


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_point_inward(part: str) -> None:
    files = sorted((ROOT / part).rglob("*.py"))
    assert files, f"no Python files under {part}"
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in files for line, module in imported_modules(path)
             if any(_matches(module, banned) for banned in FORBIDDEN[part])]
    assert not wrong, "imports against the design's direction:\n" + "\n".join(wrong)


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from engine.hub import OpsHub\n"
                      "def f():\n    import console.app\n"
                      "from engine.bus import events\n")
    modules = {module for _, module in imported_modules(sample)}
    assert {"engine.hub", "console.app", "engine.bus.events"} <= modules
