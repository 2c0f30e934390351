"""The core room imports nothing that does I/O (STYLE.md, "three rooms")."""

from __future__ import annotations

import ast
from pathlib import Path

import tfcrypt.core

FORBIDDEN = ("asyncio", "subprocess", "socket", "pyroute2", "aetcd", "grpc", "spiffe",
             "tfcrypt.agent", "tfcrypt.dataplane", "tfcrypt.registry", "tfcrypt.wireguard",
             "time", "os")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_imports_no_io() -> None:
    core = Path(tfcrypt.core.__file__).parent
    offenders = {
        f"{p.name}: {name}"
        for p in core.glob("*.py")
        for name in _imports(p)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not offenders
