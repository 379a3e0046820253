"""The house rules, read from the source with ``ast``:

- the pure core (``service/core``) imports nothing of the service but the core;
- adapters (``service/adapters``) never import the pipeline, the app or the devtools;
- the pipeline (``service/pipeline``) never imports the app's commands or the devtools (it
  may read ``Settings``);
- nothing in the core, the adapters or the pipeline calls the real clock: ``time.time()``,
  ``time.monotonic()`` and ``time.sleep()`` live in one object (``service/clock.py``); the
  pipeline does not even import ``time`` (it takes ``now`` or a ``Clock``), the core and the
  adapters name the real clock only as a default that callers replace.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).parents[2] / "service"


def modules(layer: str) -> list[Path]:
    return sorted((SERVICE / layer).rglob("*.py"))


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def clock_calls(path: Path) -> list[str]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "time"
            and node.func.attr in ("time", "monotonic", "sleep", "perf_counter")
        ):
            calls.append(f"{path.name}:{node.lineno} time.{node.func.attr}()")
    return calls


@pytest.mark.parametrize("path", modules("core"), ids=lambda p: p.name)
def test_the_core_imports_only_the_core(path: Path) -> None:
    own = {m for m in imports(path) if m.startswith("service")}
    assert all(m.startswith("service.core") for m in own), own


@pytest.mark.parametrize("path", modules("adapters"), ids=lambda p: p.name)
def test_adapters_never_import_the_pipeline(path: Path) -> None:
    own = {m for m in imports(path) if m.startswith("service")}
    forbidden = ("service.pipeline", "service.app", "service.devtools")
    assert not [m for m in own if m.startswith(forbidden)], own


@pytest.mark.parametrize("path", modules("pipeline"), ids=lambda p: p.name)
def test_the_pipeline_never_imports_commands_or_devtools(path: Path) -> None:
    own = {m for m in imports(path) if m.startswith("service")}
    allowed_app = {"service.app.settings"}
    assert not [m for m in own if m.startswith("service.devtools")], own
    assert not [m for m in own if m.startswith("service.app") and m not in allowed_app], own
    assert "time" not in imports(path)


@pytest.mark.parametrize(
    "path", modules("core") + modules("adapters") + modules("pipeline"), ids=lambda p: p.name
)
def test_no_real_clock_outside_the_clock_object(path: Path) -> None:
    assert clock_calls(path) == []


def test_the_rules_can_fail() -> None:
    """The checks above see what they look for (a layer test that finds nothing proves
    nothing): the real clock object and the app's shells do call the clock and import more."""
    assert clock_calls(SERVICE / "clock.py")
    assert "service.pipeline.loop" in imports(SERVICE / "app" / "wiring.py")
