"""The controller commands' listings: one row per value, as a table or as JSON.

A cell is bounded (MAX_CELL): a refusal reason may quote a hostile value, and a listing
must stay readable whatever etcd holds.
"""

from __future__ import annotations

import json

MAX_CELL = 200  # a refusal reason may quote the value; a listing shows a bounded excerpt


def cell(value: object) -> str:
    text = "-" if value is None else (
        ",".join(map(str, value)) if isinstance(value, list) else str(value))
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 3] + "..."


def print_rows(rows: list[dict[str, object]], as_json: bool, columns: list[str]) -> None:
    """One row per value under the prefix; a refused one in state `refused: <reason>`."""
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return
    columns = [*columns, "state"]
    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in table)]) for i, c in enumerate(columns)]
    for row in [[c.upper() for c in columns], *table]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
