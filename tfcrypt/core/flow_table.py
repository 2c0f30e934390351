"""Flow records from the kernel's counters: deltas, verdicts, bounds (docs/flows.md).

Rules of this module:
- Pure: no I/O. `ingest` takes one read of every flow set (tfcrypt/dataplane/
  flow_listing.py) and adds what each element counted since the previous read to its
  record; the agent reads, persists and serves (tfcrypt/agent/flows.py).
- Deltas per kernel element: an element seen for the first time counts whole, one whose
  counter went down was re-created (timed out, the table rebuilt) and counts whole too.
  The first read after a start only primes (the kernel's sets outlive an agent restart,
  and the records of before were restored from the state dir: counting those elements
  whole would count their packets twice).
- Times are the packets', not the read's: a sample's `idle` (from the element's timeout)
  puts `last_seen` at the flow's last packet, to the kernel's one second; a new
  record's `first_seen` is its first read's `last_seen` (the kernel keeps no first time:
  a flow's first packet is known only to within one `flows_interval`).
- The verdict comes from where the kernel counted the packet, not from what the agent
  believes: `sel` (marked) leaving by the tunnel is `wireguard`, by anything else a guard
  drop; `uns` (unmarked) arriving from the tunnel is `wireguard` (decrypted), otherwise
  `plaintext`; `drop` is a strict-ingress drop.
- Only flows between a local workload and a remote one are kept (`keep`); the others
  are counted in `unmatched` and forgotten.
- Bounded: at most `max_records` records; beyond that, and for records older than
  `retention`, the oldest (by last seen) are folded into per-verdict totals
  (`folded`), which survive. The per-element memory is bounded by the kernel's set
  sizes (an element the kernel dropped is forgotten at the next read).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tfcrypt.model.flow import FlowKey, FlowRecord, FlowSample, Verdict, proto_name

FOLD_TO = 0.9  # fold down to this share of the bound, so folding is not done every read

_Element = tuple[str, str, str, int, int | None, str | None]


@dataclass
class _Acc:
    first: float
    last: float
    packets: int
    bytes: int


@dataclass(frozen=True)
class Delta:
    """What one read added to one flow."""

    key: FlowKey
    packets: int
    bytes: int


def verdict_of(kind: str, iface: str | None, wg_ifname: str) -> Verdict:
    if kind == "drop":
        return Verdict.INGRESS_DROP
    if kind == "sel":
        return Verdict.WIREGUARD if iface == wg_ifname else Verdict.GUARD_DROP
    return Verdict.WIREGUARD if iface == wg_ifname else Verdict.PLAINTEXT


class FlowTable:
    """The node's flow records, fed by successive reads of the kernel's flow sets."""

    def __init__(self, max_records: int = 20000, retention: float = 3600.0) -> None:
        self.max_records = max_records
        self.retention = retention
        self._records: dict[FlowKey, _Acc] = {}
        self._last: dict[_Element, tuple[int, int]] = {}
        self._primed = False
        self.folded: dict[Verdict, list[int]] = {}
        """verdict -> [records, packets, bytes] folded away (bound or retention)."""
        self.unmatched = 0
        """Samples of the last read that were not local-workload <-> remote-workload."""

    def __len__(self) -> int:
        return len(self._records)

    def ingest(self, samples: Iterable[FlowSample], now: float, wg_ifname: str,
               keep: Callable[[str, str], bool]) -> list[Delta]:
        """Add one read of every flow set; the deltas it added (for the metrics)."""
        seen: dict[_Element, tuple[int, int]] = {}
        deltas: list[Delta] = []
        unmatched = 0
        for s in samples:
            if not keep(s.src, s.dst):
                unmatched += 1
                continue
            element = (s.kind, s.src, s.dst, s.proto, s.dport, s.iface)
            seen[element] = (s.packets, s.bytes)
            if not self._primed:
                continue
            before = self._last.get(element)
            if before is None or s.packets < before[0]:
                packets, nbytes = s.packets, s.bytes
            else:
                packets, nbytes = s.packets - before[0], s.bytes - before[1]
            if packets <= 0:
                continue
            at_last = now - s.idle
            key = FlowKey(s.src, s.dst, proto_name(s.proto), s.dport,
                          verdict_of(s.kind, s.iface, wg_ifname))
            acc = self._records.get(key)
            if acc is None:
                self._records[key] = _Acc(at_last, at_last, packets, nbytes)
            else:
                acc.last = max(acc.last, at_last)
                acc.packets, acc.bytes = acc.packets + packets, acc.bytes + nbytes
            deltas.append(Delta(key, packets, nbytes))
        self._last, self._primed, self.unmatched = seen, True, unmatched
        self._bound(now)
        return deltas

    def _bound(self, now: float) -> None:
        old = [k for k, a in self._records.items() if a.last < now - self.retention]
        for key in old:
            self._fold(key)
        if len(self._records) > self.max_records:
            excess = len(self._records) - int(self.max_records * FOLD_TO)
            for key in heapq.nsmallest(excess, self._records,
                                       key=lambda k: self._records[k].last):
                self._fold(key)

    def _fold(self, key: FlowKey) -> None:
        acc = self._records.pop(key)
        totals = self.folded.setdefault(key.verdict, [0, 0, 0])
        totals[0] += 1
        totals[1] += acc.packets
        totals[2] += acc.bytes

    def records(self, since: float | None = None) -> list[FlowRecord]:
        """Records last seen at or after `since` (all: None), most recent first."""
        out = [FlowRecord(k, a.first, a.last, a.packets, a.bytes)
               for k, a in self._records.items() if since is None or a.last >= since]
        out.sort(key=lambda r: r.last_seen, reverse=True)
        return out

    def to_json(self) -> dict[str, Any]:
        """What the state dir keeps across a restart."""
        return {"records": [r.to_json() for r in self.records()],
                "folded": {v.value: t for v, t in sorted(self.folded.items(),
                                                         key=lambda i: i[0].value)}}

    def restore(self, doc: object, now: float) -> int:
        """Records from `to_json` output (those within retention); the number restored.
        A record that does not parse is skipped: the file is ours, but a crash may have
        cut it (it is written atomically: a bug, not a torn write)."""
        if not isinstance(doc, dict):
            return 0
        restored = 0
        for raw in doc.get("records", []) if isinstance(doc.get("records"), list) else []:
            try:
                r = FlowRecord.from_json(raw)
            except ValueError:
                continue
            if r.last_seen >= now - self.retention and len(self._records) < self.max_records:
                self._records[r.key] = _Acc(r.first_seen, r.last_seen, r.packets, r.bytes)
                restored += 1
        folded = doc.get("folded")
        if isinstance(folded, dict):
            for name, totals in folded.items():
                try:
                    verdict = Verdict(name)
                except ValueError:
                    continue
                if (isinstance(totals, list) and len(totals) == 3
                        and all(isinstance(t, int) and t >= 0 for t in totals)):
                    self.folded[verdict] = list(totals)
        return restored
