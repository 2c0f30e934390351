"""The agent's flow records: read the kernel's flow sets, keep, save, serve, publish.

Rules (docs/flows.md):
- Never on the packet path: the kernel counts every flow in the `seen_*` sets of
  `table inet tfcrypt` (tfcrypt/dataplane/nft_rules.py); this task reads them every
  `flows_interval` seconds, in the agent's process, and feeds the pure flow table
  (tfcrypt/core/flow_table.py).
- Only flows between a local workload and a remote one are kept, by the addresses the
  agent's verified inventory gives (rebuilt when the inventory changes).
- A failed read (nft missing, the table being rebuilt, anything unexpected) or publish
  is counted and logged, and the records are kept as they were: evidence is never
  dropped for a read that failed, and the task never ends the agent (the records are
  evidence; enforcement does not depend on them).
- Every `flows_publish_interval`: the records go to `flows.json` in the state dir
  (0600, atomically; a restart restores the last hour of them), and a `FlowReport` of
  this node's own flows, signed with its SVID, to `flows/<node>` of the seen-traffic
  keyspace (at most MAX_REPORT_FLOWS records, the most recent; the rest counted in
  `omitted`). A report that cannot be put is retried at the next interval.
- The status API serves the records (`GET /flows`), each with the workloads at its two
  ends, the remote node, its direction and the enforce-mode policies whose rules select
  its pair now.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from tfcrypt import metrics
from tfcrypt.agent.logs import AGENT_LOG as log
from tfcrypt.core.explain import judge
from tfcrypt.core.flow_table import FlowTable
from tfcrypt.core.selection import rules_of
from tfcrypt.dataplane.flow_listing import parse_flow_set
from tfcrypt.dataplane.nft_table import flow_sets
from tfcrypt.model.flow import MAX_REPORT_FLOWS, FlowReport, FlowSample
from tfcrypt.model.policy import EncryptionPolicy, Mode
from tfcrypt.model.workload import Workload
from tfcrypt.privatefile import write_private

STATE_FILE = "flows.json"
MAX_STATE_BYTES = 64 << 20


class SetReader(Protocol):
    async def list_set(self, name: str) -> dict[str, Any] | None: ...


class Addresses:
    """Which workload holds an address, split into this node's and the others'."""

    def __init__(self, workloads: Callable[[], Iterable[Workload]], own_node: str,
                 stamp: Callable[[], object] = object) -> None:
        self._workloads = workloads
        self._own = own_node
        self._stamp = stamp
        self._seen: object = None
        self.local: dict[str, Workload] = {}
        self.remote: dict[str, Workload] = {}

    def refresh(self) -> None:
        """Rebuild the maps when `stamp()` changed (the agent's: its last reconcile), so a
        read does not walk 100,000 workloads when nothing changed."""
        stamp = self._stamp()
        if stamp == self._seen and (self.local or self.remote):
            return
        self._seen = stamp
        local: dict[str, Workload] = {}
        remote: dict[str, Workload] = {}
        for w in self._workloads():
            book = local if w.node == self._own else remote
            for ip in w.ips:
                book[ip] = w
        self.local, self.remote = local, remote

    def keep(self, src: str, dst: str) -> bool:
        return ((src in self.local and dst in self.remote)
                or (dst in self.local and src in self.remote))

    def ends(self, src: str, dst: str) -> tuple[str, Workload | None, Workload | None]:
        """(direction, local workload, remote workload): `out` when the local one sent."""
        if src in self.local:
            return "out", self.local[src], self.remote.get(dst)
        return "in", self.local.get(dst), self.remote.get(src)


class FlowCollector:
    def __init__(self, nft: SetReader, addresses: Addresses, *, wg_ifname: str,
                 state_dir: Path, interval: float, publish_interval: float,
                 table: FlowTable) -> None:
        self.nft = nft
        self.addresses = addresses
        self.wg_ifname = wg_ifname
        self.state_path = state_dir / STATE_FILE
        self.interval = interval
        self.publish_interval = publish_interval
        self.table = table
        self.sets = [name for name, _, _, _ in flow_sets()]  # an absent one is skipped
        self.last_read: float | None = None
        self.last_error: str | None = None
        self.full_sets: list[str] = []
        self.skipped = 0

    def restore(self) -> None:
        """The records saved by the previous run (within retention); a bad file is
        counted, reported and replaced at the next save."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("flow records: cannot read %s: %s", self.state_path, exc)
            metrics.STATE_PROBLEMS.labels("flows_file").inc()
            return
        try:
            doc = json.loads(raw[:MAX_STATE_BYTES])
        except ValueError:
            log.warning("flow records: %s is not JSON; starting with none", self.state_path)
            metrics.STATE_PROBLEMS.labels("flows_file").inc()
            return
        restored = self.table.restore(doc, time.time())
        log.info("flow records: %d restored from %s", restored, self.state_path)

    async def read_once(self) -> None:
        """One read of every flow set into the table."""
        samples: list[FlowSample] = []
        full, skipped = [], 0
        for name in self.sets:
            listing = await self.nft.list_set(name)
            if listing is None:
                continue  # flows off, or the table not created yet
            found = parse_flow_set(name, listing)
            samples.extend(found.samples)
            skipped += found.skipped
            if found.full:
                full.append(name)
        if skipped:
            metrics.FLOW_READ_ERRORS.labels("odd_element").inc(skipped)
        self.addresses.refresh()
        now = time.time()
        for d in self.table.ingest(samples, now, self.wg_ifname, self.addresses.keep):
            _, _, remote = self.addresses.ends(d.key.src, d.key.dst)
            peer = remote.node if remote is not None else "unknown"
            metrics.FLOW_PACKETS.labels(peer, d.key.verdict.value).inc(d.packets)
            metrics.FLOW_BYTES.labels(peer, d.key.verdict.value).inc(d.bytes)
        metrics.FLOW_SETS_FULL.set(len(full))
        metrics.FLOW_RECORDS.set(len(self.table))
        if full and full != self.full_sets:
            log.warning("flow sets full (%s): new flows go uncounted until old ones time "
                        "out; raise flows_set_size", ", ".join(full))
        self.full_sets, self.skipped, self.last_read = full, skipped, now

    def save(self) -> None:
        """`flows.json` in the state dir (0600, replaced atomically)."""
        try:
            write_private(self.state_path, json.dumps(self.table.to_json()).encode(),
                          durable=False)
        except OSError as exc:
            log.warning("flow records: cannot save %s: %s", self.state_path, exc)
            metrics.STATE_PROBLEMS.labels("flows_file").inc()

    def report(self, node: str, handshakes: dict[str, float | None]) -> FlowReport:
        """This node's report: the records of the retention window, most recent first,
        at most MAX_REPORT_FLOWS of them."""
        now = time.time()
        since = now - self.table.retention
        records = self.table.records(since)
        return FlowReport(node=node, generated_at=now, since=since,
                          flows=tuple(records[:MAX_REPORT_FLOWS]), handshakes=handshakes,
                          omitted=max(0, len(records) - MAX_REPORT_FLOWS))

    async def run(self, publish: Callable[[], Awaitable[None]]) -> None:
        """Read every `interval`, save and publish every `publish_interval`."""
        next_publish = time.monotonic() + self.publish_interval
        while True:
            try:
                await self.read_once()
                self.last_error = None
            except Exception as exc:  # evidence, not enforcement: never stop the agent
                metrics.FLOW_READ_ERRORS.labels("read").inc()
                if str(exc) != self.last_error:
                    log.warning("flow records: cannot read the kernel's flow sets: %s", exc)
                self.last_error = str(exc)
            if time.monotonic() >= next_publish:
                next_publish = time.monotonic() + self.publish_interval
                await asyncio.to_thread(self.save)
                try:
                    await publish()
                except Exception as exc:
                    metrics.FLOW_READ_ERRORS.labels("publish").inc()
                    log.warning("flow report: not published: %s", exc)
            await asyncio.sleep(self.interval)

    def status(self) -> dict[str, Any]:
        """The `flows` part of the status document."""
        return {"records": len(self.table), "last_read": self.last_read,
                "last_error": self.last_error, "full_sets": self.full_sets,
                "unmatched_samples": self.table.unmatched,
                "folded": {v.value: {"records": t[0], "packets": t[1], "bytes": t[2]}
                           for v, t in self.table.folded.items()}}

    def records_doc(self, policies: Iterable[EncryptionPolicy]) -> dict[str, Any]:
        """`GET /flows`: every record with its workloads, remote node, direction and the
        enforce-mode rules (`policy#index`) that select its pair now."""
        refs = rules_of(policies, Mode.ENFORCE)
        rows = []
        for r in self.table.records():
            direction, local, remote = self.addresses.ends(r.key.src, r.key.dst)
            rules: list[str] = []
            if local is not None and remote is not None:
                ends = ((local, remote) if direction == "out" else (remote, local))
                rules = [f"{ref.policy}#{ref.index}" for ref in refs
                         if judge(ref, Mode.ENFORCE, ends[0], r.key.src, ends[1],
                                  r.key.dst).matched]
            rows.append({**r.to_json(), "direction": direction,
                         "local": local.name if local else None,
                         "local_tags": sorted(map(str, local.tags)) if local else [],
                         "remote": remote.name if remote else None,
                         "remote_tags": sorted(map(str, remote.tags)) if remote else [],
                         "remote_node": remote.node if remote else None,
                         "rules": rules})
        return {"flows": rows, **self.status()}
