"""The protocol package stays sans I/O: no asyncio, socket or ssl, no other burrow layer.

``burrow/__init__.py`` imports the whole library (asyncio included), so importing
``burrow.protocol`` the normal way proves nothing. Two checks instead:

* a static one: every ``import``/``from ... import`` in ``src/burrow/protocol/*.py``
  is parsed with :mod:`ast`, relative imports resolved, and checked;
* a dynamic one: a fresh interpreter loads the protocol modules under a stub
  ``burrow`` package (so ``burrow/__init__.py`` does not run) and reports which
  forbidden modules ended up in ``sys.modules`` (this catches a stdlib module
  that drags ``socket`` or ``ssl`` in behind the scenes).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# find_spec locates the package without running burrow/__init__.py (and the whole library)
_SPEC = importlib.util.find_spec("burrow")
assert _SPEC is not None and _SPEC.submodule_search_locations
BURROW_DIR = Path(next(iter(_SPEC.submodule_search_locations))).resolve()
PROTOCOL_DIR = BURROW_DIR / "protocol"
PROTOCOL_FILES = sorted(PROTOCOL_DIR.glob("*.py"))

FORBIDDEN = ("asyncio", "socket", "ssl")
#: burrow modules the protocol may use besides its own package.
ALLOWED_BURROW = ("burrow.errors",)


def _module_name(path: Path) -> str:
    """``burrow.protocol.frames`` for .../burrow/protocol/frames.py (the package for __init__)."""
    parts = ["burrow", "protocol"]
    if path.stem != "__init__":
        parts.append(path.stem)
    return ".".join(parts)


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """Absolute name of ``from <level dots><module> import ...`` inside ``importer``."""
    if level == 0:
        assert module is not None
        return module
    package = importer if is_package else importer.rpartition(".")[0]
    base = package.split(".")
    if level > 1:
        base = base[: -(level - 1)]
    assert base, f"relative import beyond the top-level package in {importer}"
    return ".".join(base + ([module] if module else []))


def imported_modules(source: str, importer: str, is_package: bool = False) -> set[str]:
    """Every module a source text imports (for ``from X import a``: X, and X.a in case a is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, importer, is_package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            # importlib.import_module("socket") / __import__("ssl") would dodge the check above
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value))
    return found


def violations(modules: set[str]) -> list[str]:
    bad = []
    for name in sorted(modules):
        top = name.split(".")[0]
        if top in FORBIDDEN:
            bad.append(f"{name}: I/O module")
        elif top == "burrow" and name != "burrow":  # the bare parent package of `from .. import x`
            inside = name == "burrow.protocol" or name.startswith("burrow.protocol.")
            allowed = any(name == ok or name.startswith(ok + ".") for ok in ALLOWED_BURROW)
            if not inside and not allowed:
                bad.append(f"{name}: burrow module outside burrow.protocol")
        elif top in ("importlib",):
            bad.append(f"{name}: dynamic imports are not allowed here")
    return bad


def test_the_package_has_the_expected_modules() -> None:
    names = {path.name for path in PROTOCOL_FILES}
    assert {"__init__.py", "frames.py", "events.py", "session.py"} <= names


@pytest.mark.parametrize("path", PROTOCOL_FILES, ids=lambda p: p.name)
def test_no_io_and_no_outside_burrow_imports(path: Path) -> None:
    modules = imported_modules(path.read_text(encoding="utf-8"), _module_name(path), path.stem == "__init__")
    assert violations(modules) == []


def test_relative_imports_are_resolved() -> None:
    # what session.py really does: the checker must see burrow.errors and burrow.protocol.frames
    modules = imported_modules(
        "from ..errors import ProtocolError\nfrom . import events\nfrom .frames import encode\n",
        "burrow.protocol.session",
    )
    assert {"burrow.errors", "burrow.protocol", "burrow.protocol.events", "burrow.protocol.frames"} <= modules
    assert violations(modules) == []


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import asyncio.streams",
        "import socket as s",
        "from ssl import SSLContext",
        "from asyncio import Protocol",
        "def f():\n    import socket",
        "from .. import connection",
        "from .. import errors, tunnel",
        "from ..connection import Connection",
        "from ..agent import relay_connection",
        "import burrow.relay.server",
        "import importlib\nimportlib.import_module('socket')",
        "__import__('ssl')",
    ],
)
def test_the_checker_catches_violations(source: str) -> None:
    # a checker that sees nothing would pass the test above vacuously
    assert violations(imported_modules(source, "burrow.protocol.session"))


_PROBE = textwrap.dedent(
    """
    import json, sys, types
    # a stub parent package: burrow/__init__.py (which imports everything) must not run
    pkg = types.ModuleType("burrow")
    pkg.__path__ = [sys.argv[1]]
    sys.modules["burrow"] = pkg
    before = set(sys.modules)
    import burrow.protocol, burrow.protocol.frames, burrow.protocol.events, burrow.protocol.session
    after = set(sys.modules)
    print(json.dumps({"before": sorted(before), "new": sorted(after - before)}))
    """
)


def test_importing_the_protocol_loads_no_io_module() -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-c", _PROBE, str(BURROW_DIR)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    report = json.loads(result.stdout)
    new = report["new"]
    assert "burrow.protocol.session" in new  # the probe really imported the package
    assert [m for m in new if m.split(".")[0] in FORBIDDEN] == []
    burrow_modules = {m for m in new if m.split(".")[0] == "burrow"}
    assert burrow_modules <= {
        "burrow.errors",
        "burrow.protocol",
        "burrow.protocol.frames",
        "burrow.protocol.events",
        "burrow.protocol.session",
        "burrow.protocol.buffer",
        "burrow.protocol.messages",
    }
