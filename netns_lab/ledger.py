"""Append-only record of every object a lab creates, written BEFORE the object is made.

Rules: one JSON object per line in `<run_dir>/ledger.jsonl`, fsynced on append, so a crash
half-way through `up` still leaves a complete list of what may exist. Teardown walks the
ledger in reverse and removes exactly those objects by exact name, path or PID; an entry
whose object never came into being (or is already gone) is not an error. Nothing is ever
removed by pattern.

Entry kinds: run_dir {path}; mount {path}; netns {name}; link {netns, ifname} (a link
dies with its namespace, recorded so the ledger tells the whole story); process
{pid, starttime, argv, what, node, log}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LEDGER_FILE = "ledger.jsonl"


class Ledger:
    """The ledger of one lab run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LEDGER_FILE

    def record(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, **fields}, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        """All entries; a torn last line (crash mid-write) is skipped."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out: list[dict[str, Any]] = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
