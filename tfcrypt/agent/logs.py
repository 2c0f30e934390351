"""Structured logs: one event per line, as text or JSON, and what a reconcile changed.

Rules:
- One event is one line in both formats: newlines inside a message or a traceback are
  escaped, so `grep`, journald and log shippers never split an event.
- A text line shows no character a terminal would act on: other control characters,
  bidi overrides (U+202E makes a line read backwards) and lone surrogates are escaped as
  `\\xNN`/`\\uXXXX` (tfcrypt.text.printable), so the line can always be
  encoded and reads as it was written. JSON escapes them itself (ASCII output). Keys from
  etcd arrive escaped already; this is the last line of defence for any other text.
- `--log-format json` gives `{"ts", "level", "logger", "msg", ...}` plus the structured
  fields a call passes as `extra={"fields": {...}}`; text gives
  `TS LEVEL LOGGER: MSG key=value ...` with the same fields.
- A dataplane change is logged once, by the reconcile that made it: `change_summary`
  says what changed in the desired state (peers, their allowed IPs, classes, set
  elements) and the caller adds why (the inputs that marked the state dirty). Node names
  and addresses only: never key material.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from tfcrypt.core.compute import Desired
from tfcrypt.text import printable

MAX_LISTED = 5
AGENT_LOG = logging.getLogger("tfcrypt.agent.loop")
"""The logger of the agent's own lines (reconciles, lingering, publishing): one name that
operators filter on (docs/operations.md), whichever agent module writes the line."""


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = getattr(record, "fields", None)
    return dict(extra) if isinstance(extra, Mapping) else {}


def _timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, sort_keys=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        if record.exc_info:
            line += " exc=" + self.formatException(record.exc_info)
        return printable(line.replace("\n", "\\n"))


def _text(value: object) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        text = ",".join(map(str, value))
    elif isinstance(value, Mapping):
        text = ",".join(f"{k}:{v}" for k, v in value.items())
    else:
        text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=') else text


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Root logging for the agent: stderr, one event per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- what a reconcile changed ------------------------------------------------------------

def _listed(prefix: str, names: Iterable[str]) -> list[str]:
    items = sorted(names)
    shown = [prefix + n for n in items[:MAX_LISTED]]
    return shown + ([f"{prefix}{len(items) - MAX_LISTED} more"] if len(items) > MAX_LISTED
                    else [])


def change_summary(before: Desired | None, after: Desired) -> dict[str, Any]:
    """What differs between two desired states, as loggable fields (empty: nothing).

    Costs what changed: unchanged peers and selector sets are the same objects (or equal)
    from one Desired to the next and are skipped without looking at their addresses."""
    old_peers = {p.node: p for p in (before.peers.values() if before else ())}
    new_peers = {p.node: p for p in after.peers.values()}
    added = new_peers.keys() - old_peers.keys()
    removed = old_peers.keys() - new_peers.keys()
    changed = {n for n in new_peers.keys() & old_peers.keys()
               if new_peers[n] != old_peers[n]}
    ips_in = ips_out = 0
    for node in added | removed | changed:
        old = old_peers[node].allowed_ips if node in old_peers else frozenset()
        new = new_peers[node].allowed_ips if node in new_peers else frozenset()
        ips_in += len(new - old)
        ips_out += len(old - new)
    old_classes = set(before.class_selectors) if before else set()
    new_classes = set(after.class_selectors)
    elems_in, elems_out = _element_delta(before, after)
    out: dict[str, Any] = {}
    if added or removed or changed:
        out["peers"] = _listed("+", added) + _listed("-", removed) + _listed("~", changed)
    if ips_in or ips_out:
        out["allowed_ips"] = f"+{ips_in} -{ips_out}"
    if new_classes != old_classes:
        out["classes"] = f"+{len(new_classes - old_classes)} -{len(old_classes - new_classes)}"
    if elems_in or elems_out:
        out["elements"] = f"+{elems_in} -{elems_out}"
    if before is None or after.selected_pair_count != before.selected_pair_count:
        out["selected_pairs"] = after.selected_pair_count
    return out


def _element_delta(before: Desired | None, after: Desired) -> tuple[int, int]:
    """nftables set elements added and removed: local address -> class map entries, and
    each selector set's remote addresses (sets that are the same object are skipped)."""
    empty: frozenset[str] = frozenset()
    old_local = before.local_class if before else {}
    local_in = sum(1 for ip, c in after.local_class.items() if old_local.get(ip) != c)
    local_out = sum(1 for ip, c in old_local.items() if after.local_class.get(ip) != c)
    old_sets = before.selector_ips if before else {}
    new_sets = after.selector_ips
    elems_in = elems_out = 0
    for name in old_sets.keys() | new_sets.keys():
        old, new = old_sets.get(name, empty), new_sets.get(name, empty)
        if old is not new:
            elems_in += len(new - old)
            elems_out += len(old - new)
    return local_in + elems_in, local_out + elems_out
