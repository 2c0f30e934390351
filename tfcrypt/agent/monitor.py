"""Kernel drift noticed as it happens: `nft monitor` and `ip monitor` run as the agent's children.

Rules:
- The periodic resync repairs drift eventually; this module makes the repair prompt. Two
  child processes run in the agent's own namespaces: `nft -j monitor` (one JSON object a
  line) and `ip -o monitor rule route link` (one event a line). A line that touches what the
  dataplane owns (`table inet tfcrypt` and anything in it; ip rules at the two reserved
  priorities; routes in the tunnel and fail-closed tables; the WireGuard link) calls
  `on_drift(why)`, and the agent marks itself dirty. The reconciler's debounce coalesces
  bursts of events into one reconcile.
- Parsing is pure (`nft_event`, `ip_event`: one line in, a reason or None out) and is
  tested on recorded lines; everything else is ignored (other tables, other priorities,
  other links, lines that are not events).
- The agent's own applies produce the same events. They are not told apart: the reconcile
  they trigger finds the kernel as desired (apply is idempotent), changes nothing, and so
  produces no event: the loop settles after one extra, empty reconcile. Reads (the
  listings every apply starts with) produce no events.
- A child that exits (binary missing, namespace gone, killed) is restarted with backoff, and
  every start reports drift once: events may have been missed while no child listened. The
  periodic resync stays the safety net.
- The children belong to the agent, not to the dataplane: cancelling `watch` (agent exit)
  kills and reaps them, and a SIGKILLed agent takes them along (parent-death signal set
  by util-linux `setpriv`, where it exists: `preexec_fn` is unsafe in a threaded process).
- `ip monitor` rather than a pyroute2 netlink socket: one mechanism for both sources (a
  child whose text is parsed by pure functions), the same tool an operator would run, and
  iproute2 6.1 prints these events with the priority, table and link name in fixed places
  (its `-j` flag is ignored by `monitor`, hence `-o`, one line per event).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tfcrypt.dataplane.nft_table import FAMILY, TABLE

log = logging.getLogger(__name__)

NFT_ARGV = ("nft", "-j", "monitor")
IP_ARGV = ("ip", "-o", "monitor", "rule", "route", "link")
LINE_LIMIT = 1 << 24  # one nft event may carry every element of a large set
MAX_BACKOFF = 30.0
STABLE_RUN = 10.0  # a child that lived this long resets the backoff

_DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL")
_RULE = re.compile(r"^(Deleted )?(\d+):\t")
_LINK = re.compile(r"^(Deleted )?\d+: ([^:@\s]+)(?:@\S+)?: <")
_TABLE = re.compile(r"\btable (\S+)")

OnDrift = Callable[[str], None]


@dataclass(frozen=True)
class KernelScope:
    """What the dataplane owns, as the monitors see it."""

    interface: str = "tfcrypt0"
    priorities: frozenset[int] = frozenset({1820, 1821})
    tables: frozenset[int] = frozenset({29798, 29799})

    @classmethod
    def of(cls, interface: str, route_table: int, rule_priority: int) -> KernelScope:
        """The two tables and two priorities the agent derives from its configuration."""
        return cls(interface=interface,
                   priorities=frozenset({rule_priority, rule_priority + 1}),
                   tables=frozenset({route_table, route_table + 1}))


def nft_event(line: str) -> str | None:
    """A reason if this `nft -j monitor` line touches `table inet tfcrypt`, else None."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or len(event) != 1:
        return None
    ((verb, body),) = event.items()
    if not isinstance(body, dict) or len(body) != 1:
        return None
    ((kind, obj),) = body.items()
    if not isinstance(obj, dict) or obj.get("family") != FAMILY:
        return None
    table = obj.get("name") if kind == "table" else obj.get("table")
    if table != TABLE:
        return None
    return f"nft {verb} {kind}{_nft_where(kind, obj)}"


def _nft_where(kind: str, obj: dict[str, Any]) -> str:
    if kind == "rule":
        return f" in {obj.get('chain')}"
    if kind in ("chain", "set", "map", "counter"):
        return f" {obj.get('name')}"
    return ""


def ip_event(line: str, scope: KernelScope) -> str | None:
    """A reason if this `ip -o monitor rule route link` line touches what we own."""
    if m := _RULE.match(line):
        deleted, priority = m.group(1), int(m.group(2))
        if priority not in scope.priorities:
            return None
        return f"ip rule {'deleted' if deleted else 'added'} at {priority}"
    if m := _LINK.match(line):
        if m.group(2) != scope.interface:
            return None
        return f"link {scope.interface} {'deleted' if m.group(1) else 'changed'}"
    if m := _TABLE.search(line):
        if not m.group(1).isdigit() or int(m.group(1)) not in scope.tables:
            return None
        verb = "deleted" if line.startswith("Deleted ") else "added"
        return f"route {verb} in table {m.group(1)}"
    return None


async def watch(scope: KernelScope, on_drift: OnDrift, *, backoff: float = 1.0) -> None:
    """Follow both monitors until cancelled; each relevant event calls `on_drift`."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(follow(NFT_ARGV, nft_event, on_drift, backoff=backoff))
        tg.create_task(follow(IP_ARGV, lambda line: ip_event(line, scope), on_drift,
                              backoff=backoff))


async def follow(argv: tuple[str, ...], parse: Callable[[str], str | None],
                 on_drift: OnDrift, *, backoff: float = 1.0) -> None:
    """Run one monitor child, restarting it when it exits; killed when cancelled."""
    delay = backoff
    prefix = _DIE_WITH_PARENT if shutil.which(_DIE_WITH_PARENT[0]) else ()
    while True:
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *prefix, *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, limit=LINE_LIMIT)
        except OSError as exc:
            log.warning("cannot run %s: %s; the periodic resync still repairs drift",
                        " ".join(argv), exc)
        else:
            try:
                on_drift(f"{argv[0]} monitor started")
                await _read(proc, parse, on_drift)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                err = await proc.stderr.read() if proc.stderr else b""
                await proc.wait()
                log.warning("%s exited with %s: %s", " ".join(argv), proc.returncode,
                            err.decode(errors="replace").strip()[:200] or "no message")
            finally:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        if time.monotonic() - started >= STABLE_RUN:
            delay = backoff
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)


async def _read(proc: asyncio.subprocess.Process, parse: Callable[[str], str | None],
                on_drift: OnDrift) -> None:
    assert proc.stdout is not None
    while True:
        try:
            raw = await proc.stdout.readline()
        except ValueError:
            on_drift("monitor line too long")
            return
        if not raw:
            return
        if why := parse(raw.decode(errors="replace")):
            on_drift(why)
