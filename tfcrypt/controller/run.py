"""`tfcrypt controller run`: keep etcd's signed inventory equal to the cluster.

Rules (docs/controller.md):
- One reconcile pass: compute the desired records from the caches (desired.py), read
  etcd through the agents' verified view, write the difference for records this
  controller owns (puts signed with its SVID through ControllerSession.put_signed, which
  refuses anything the agents would not believe), then the EncryptionPolicy statuses.
- Passes run after any cluster change (debounced by DEBOUNCE), and every RESYNC seconds
  anyway: node keys appear in etcd without a cluster event, and Ready depends on them.
- Nothing is written before every kind has been listed, and nothing while another
  replica holds the Lease: before each batch the Lease is read back and must name this
  replica, unexpired (a deposed leader stops at its next batch), and before each write
  of the batch `leader_fence` checks that this reading still holds (a leader frozen
  mid-batch stops at its next write). Writes go WRITE_WINDOW at a time (_in_windows):
  what a frozen leader had in flight still lands, at most one window.
- etcd unreachable: the pass fails, is counted and logged, and is retried; the cluster
  caches stay current, so the next pass catches up. The API server unreachable: etcd
  keeps what it holds (the caches keep the last listing).
- The SVID is fetched again when half its lifetime has passed (SPIRE rotates it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from tfcrypt.controller import metrics
from tfcrypt.controller.desired import (
    MANAGED_BY,
    MANAGER,
    Desired,
    Record,
    desired_state,
    plan_sync,
)
from tfcrypt.controller.health import Health
from tfcrypt.controller.kube import Cluster
from tfcrypt.controller.policy_status import accepted_status, refused_status, same_status
from tfcrypt.controller.session import ControllerSession, fetch_svid
from tfcrypt.errors import ConfigError
from tfcrypt.identity.svid_source import etcd_credentials
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.policy import EncryptionPolicy

log = logging.getLogger("tfcrypt.controller")

DEBOUNCE = 0.2
RESYNC = 10.0
RETRY = 2.0
WRITE_WINDOW = 32  # etcd writes in flight at once in a pass (see _in_windows)


class NotLeader(Exception):
    """The Lease does not name this replica: write nothing."""


async def _in_windows(writes: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run the writes WRITE_WINDOW at a time, each window to its end, then raise the
    window's first failure (NotLeader, etcd's error) as itself; later windows never
    start. One etcd fsync commits every write in flight, so a cold sync of 10,000
    records is not 10,000 fsyncs in a row (bench K1). Each write still passes the leader
    fence just before it is sent: a leader frozen mid-pass lands at most one window."""
    for lo in range(0, len(writes), WRITE_WINDOW):
        done = await asyncio.gather(*(w() for w in writes[lo:lo + WRITE_WINDOW]),
                                    return_exceptions=True)
        if (failed := next((r for r in done if isinstance(r, BaseException)), None)):
            raise failed


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    def __init__(self, session: ControllerSession, cluster: Cluster, spiffe_socket: str,
                 *, tls: bool = False, leader_check: Any = None,
                 infrastructure: Mapping[str, str] | None = None,
                 health: Health | None = None) -> None:
        self.s = session
        self.cluster = cluster
        self.spiffe_socket = spiffe_socket
        self.tls = tls
        self.leader_check = leader_check  # async () -> None, raises NotLeader
        self.leader_fence: Any = None     # () -> None before each write, raises NotLeader
        self.infrastructure = dict(infrastructure or {})
        self.health = health or Health()
        self.wake = asyncio.Event()
        self.passes = 0
        self._svid_fetched = time.time()
        self._skips_logged: dict[str, str] = {}
        self._ip_conflicts_logged: dict[str, str] = {}
        self._view: VerifiedView | None = None
        self._signers: dict[bytes, tuple[str, bool]] = {}  # value -> (signer, managed)

    def changed(self) -> None:
        self.wake.set()

    async def run(self) -> None:
        while True:
            self.health.beat()  # /healthz: the loop turns (a pass stuck here stops it)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), RESYNC)
            await asyncio.sleep(DEBOUNCE)
            self.wake.clear()
            if not self.cluster.synced:
                continue
            try:
                await self.reconcile()
            except NotLeader as exc:
                log.debug("not the leader: %s", exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd down, API server down: retry the whole pass
                metrics.ERRORS.labels(type(exc).__name__).inc()
                log.warning("reconcile failed (%s: %s); retrying in %.0fs",
                            type(exc).__name__, exc, RETRY)
                await asyncio.sleep(RETRY)
                self.wake.set()

    async def _refresh_svid(self) -> None:
        svid = self.s.svid
        half = (svid.not_after.timestamp() - self._svid_fetched) / 2
        if time.time() < self._svid_fetched + half:
            return
        new = await asyncio.to_thread(fetch_svid, self.spiffe_socket)
        self._svid_fetched = time.time()
        self.s.svid = new
        self.s.bundles = type(self.s.bundles)(new.bundles)
        self._view = None  # verify everything again under the new bundles
        if self.tls:
            self.s.registry.set_credentials(etcd_credentials(new))
        log.info("SVID refreshed: %s until %s", new.spiffe_id, new.not_after)

    async def read_view(self) -> VerifiedView:
        """etcd as the agents read it; one view kept across passes, so only values that
        changed are verified again (10,000 pods: one signature check each, once)."""
        listed = await self.s.registry.get_all("")
        now = dt.datetime.fromtimestamp(time.time(), dt.UTC)
        if self._view is None:
            self._view = self.s._empty_view()[0]
            self._signers.clear()
        self._view.replace_all({k: i.value for k, i in listed.items.items()}, now)
        self.s.note_chains(self._view)
        self._view.expire(now)  # node records whose signer's SVID ran out (Ready)
        return self._view

    def owned(self, view: VerifiedView) -> tuple[dict[str, Record], dict[str, str]]:
        """Believed records this controller owns, and who holds every other key."""
        mine = self.s.svid.spiffe_id
        raw = {k: v for k, v in view.raw.items()
               if k.startswith(("workloads/", "policies/"))}
        unknown = {k: v for k, v in raw.items() if v not in self._signers}
        now = dt.datetime.fromtimestamp(time.time(), dt.UTC)
        prepared = view.check(unknown, now) if unknown else None
        for key, value in unknown.items():
            checked = prepared.results.get(key) if prepared is not None else None
            v = checked.verified if checked is not None else None
            if v is not None:
                self._signers[value] = (v.signer, v.payload.get(MANAGED_BY) == MANAGER)
        live = set(raw.values())
        for value in [v for v in self._signers if v not in live]:
            del self._signers[value]
        owned: dict[str, Record] = {}
        held: dict[str, str] = {}
        for key, value in raw.items():
            signer, managed = self._signers.get(value, ("", False))
            if key in view.records and signer == mine and managed:
                owned[key] = view.records[key]
            else:
                held[key] = (f"a record signed by {signer}, not managed by kubernetes"
                             if signer else "a record the agents refuse")
        return owned, held

    def _snapshot(self) -> Desired:
        return desired_state(self.cluster.pods.objects, self.cluster.namespaces.objects,
                             self.cluster.policies.objects)

    async def reconcile(self) -> None:
        """One pass; raises NotLeader (nothing written) or the etcd / API error."""
        await self._refresh_svid()
        desired = self._snapshot()
        view = await self.read_view()
        if view.chains_missing():
            if self.leader_check is not None:
                await self.leader_check()
            for ref in await self.s.repair_chains(view, self.leader_fence):
                metrics.WRITES.labels("put").inc()
                log.warning("chains/%s was missing from etcd; put it back (values in etcd "
                            "name it: agents starting now would refuse them)", ref)
        owned, held = self.owned(view)
        plan = plan_sync(desired.records, owned, held)
        metrics.observe(desired, plan)
        self._log_skips(desired)
        if not plan.empty:
            if self.leader_check is not None:
                await self.leader_check()
            await _in_windows([functools.partial(self._put, key, record, view, key in owned)
                               for key, record in plan.puts.items()])
            await _in_windows([functools.partial(self._delete, key) for key in plan.deletes])
            view = await self.read_view()
        await self._statuses(desired, view, plan.conflicts)
        if self.passes == 0 or not plan.empty:
            log.info("pass %d: %d records meant, %d written, %d deleted, %d pods skipped, "
                     "%d policies refused, %d conflicts", self.passes + 1,
                     len(desired.records), len(plan.puts), len(plan.deletes),
                     sum(desired.skipped.values()), len(desired.refused),
                     len(plan.conflicts))
        self.passes += 1

    async def _put(self, key: str, record: Record, view: VerifiedView, update: bool) -> None:
        payload = {**record.to_payload(epoch=self.s.next_epoch(view, key),
                                       issued_at=int(time.time())),
                   MANAGED_BY: MANAGER}
        try:
            value = await self.s.put_signed(key, payload, record, self.leader_fence)
            # verified by put_signed as the agents will: owned() need not check it again
            self._signers[value] = (self.s.svid.spiffe_id, True)
            metrics.WRITES.labels("put").inc()
            log.info("%s %s", "updated" if update else "created", key)
        except ConfigError as exc:  # the readers would refuse it: not written
            metrics.ERRORS.labels("refused-by-readers").inc()
            log.warning("%s", exc)

    async def _delete(self, key: str) -> None:
        await self.s.delete(key, self.leader_fence)
        metrics.WRITES.labels("delete").inc()
        log.info("deleted %s", key)

    async def _statuses(self, desired: Desired, view: VerifiedView,
                        conflicts: Mapping[str, str]) -> None:
        workloads = view.of("workloads/")
        published: dict[str, EncryptionPolicy] = {
            p.name: p for p in view.of("policies/").values()}
        nodes = {r.node: r for r in view.of("nodes/").values()}
        now = _now_iso()
        checked_leader = False
        for name, obj in sorted(self.cluster.policies.objects.items()):
            if name in desired.refused:
                status = refused_status(obj, desired.refused[name], now)
            elif (policy := desired.policies.get(name)) is not None and \
                    policy.key in conflicts:
                status = refused_status(obj, conflicts[policy.key], now)
            elif policy is not None:
                status = accepted_status(obj, policy, workloads, published, nodes, now,
                                         self.infrastructure)
            else:
                continue
            if same_status(obj.get("status"), status):
                continue
            if self.leader_check is not None and not checked_leader:
                await self.leader_check()
                checked_leader = True
            if self.leader_fence is not None:
                self.leader_fence()
            await self.cluster.patch_status(name, obj.get("status"), status)
            metrics.WRITES.labels("status").inc()
            # the watch brings the new object; until then, do not write it again
            self.cluster.policies.objects[name] = {**obj, "status": status}

    def _log_skips(self, desired: Desired) -> None:
        if desired.skip_details != self._skips_logged:
            for key, why in sorted(desired.skip_details.items()):
                if self._skips_logged.get(key) != why:
                    log.info("pod %s skipped: %s", key, why)
            self._skips_logged = dict(desired.skip_details)
        for ip, why in desired.ip_conflicts.items():
            if self._ip_conflicts_logged.get(ip) != why:
                log.warning("address %s", why)
        self._ip_conflicts_logged = dict(desired.ip_conflicts)
        for name, err in desired.refused.items():
            log.debug("EncryptionPolicy %s refused: %s", name, err)


def status_snapshot(c: Controller) -> dict[str, Any]:
    """For logs and tests: what the last pass saw."""
    d = c._snapshot()
    return {"passes": c.passes, "records": len(d.records), "skipped": dict(d.skipped),
            "ignored_labels": dict(d.ignored_labels), "refused": dict(d.refused),
            "ip_conflicts": dict(d.ip_conflicts),
            **dataclasses.asdict(metrics.LAST)}
