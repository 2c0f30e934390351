"""`tfcrypt flows`: the local agent's flow records, filtered and shown (docs/flows.md).

Rules:
- Pure: the input is the agent's `GET /flows` document (tfcrypt/agent/flows.py); the
  CLI fetches it. Filters combine with AND: `workload` matches either end's name, `tag`
  either end's tags, `verdict` the record's, `since` its last seen time.
- DURATION (`--since`, `--report-max-age` of the seen-traffic commands): `90s`, `30m`,
  `1h30m`, `2d`, parsed once here for every command.
- The table is for people (most recent first, sizes in human units); `--json` gives the
  filtered rows unchanged, for scripts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tfcrypt.model.flow import Verdict
from tfcrypt.status_view import human_bytes, human_duration, table

VERDICTS = tuple(v.value for v in Verdict)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """`90s`, `30m`, `1h`, `1h30m`, `2d` -> seconds; argparse shows the error (exit 2)."""
    parts = _DURATION.findall(text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 1h, "
                                         "1h30m")
    seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be more than 0")
    return seconds


def select(rows: Sequence[Mapping[str, Any]], *, workload: str | None = None,
           tag: str | None = None, verdict: str | None = None,
           since: float | None = None) -> list[Mapping[str, Any]]:
    """The rows that pass every filter given."""
    out = []
    for r in rows:
        if workload is not None and workload not in (r.get("local"), r.get("remote")):
            continue
        if tag is not None and tag not in (*r.get("local_tags", ()), *r.get("remote_tags", ())):
            continue
        if verdict is not None and r.get("verdict") != verdict:
            continue
        if since is not None and r.get("last_seen", 0) < since:
            continue
        out.append(r)
    return out


def _port(r: Mapping[str, Any]) -> str:
    return r["proto"] if r.get("dport") is None else f"{r['proto']}/{r['dport']}"


def render(doc: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], now: float) -> str:
    header = ("LAST SEEN", "DIR", "LOCAL", "REMOTE", "NODE", "PROTO", "VERDICT", "PACKETS",
              "BYTES", "RULES")
    body = [[human_duration(max(0.0, now - r["last_seen"])) + " ago", r["direction"],
             f"{r.get('local') or '?'} {r['src'] if r['direction'] == 'out' else r['dst']}",
             f"{r.get('remote') or '?'} {r['dst'] if r['direction'] == 'out' else r['src']}",
             r.get("remote_node") or "?", _port(r), r["verdict"], str(r["packets"]),
             human_bytes(r["bytes"]), ",".join(r.get("rules", ())) or "-"] for r in rows]
    lines = table(header, body) if body else ["no flow records match"]
    read = doc.get("last_read")
    when = (dt.datetime.fromtimestamp(read, dt.UTC).isoformat(timespec="seconds")
            if isinstance(read, int | float) else "never")
    lines.append(f"{len(rows)} of {doc.get('records', len(rows))} records; kernel last read "
                 f"{when}")
    if doc.get("last_error"):
        lines.append(f"last read failed: {doc['last_error']}")
    if doc.get("full_sets"):
        lines.append("kernel flow sets full (new flows uncounted): "
                     + ", ".join(doc["full_sets"]))
    return "\n".join(lines)
