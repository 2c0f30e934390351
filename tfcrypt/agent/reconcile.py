"""One reconcile: the core's answer for the view, applied to the dataplane, and its record.

Rules:
- A reconcile runs only when the inputs are in sync (the loop decides, tfcrypt/agent/
  loop.py); it assembles the snapshot (tfcrypt/agent/snapshot.py), hands the result to
  the dataplane (whose apply order lives in tfcrypt/agent/dataplane.py) and keeps what
  the status shows of it: the desired state, the MTU and why, the last reconcile, and the
  last repair (a full apply that found the kernel differing although our inputs had not
  changed: someone else changed it).
- Events the kernel monitors report while we apply, or within OWN_EVENTS_WINDOW after an
  apply that changed something, are most likely our own (`changes_are_ours`).
- A reconcile that changed the kernel logs one line: what changed and why (the causes
  that marked the view dirty). Conflicts and peers without a verified key are logged when
  they change, not on every reconcile.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from typing import Any

from tfcrypt import metrics
from tfcrypt.agent.dataplane import ApplyResult, Dataplane
from tfcrypt.agent.logs import AGENT_LOG as log
from tfcrypt.agent.logs import change_summary
from tfcrypt.agent.mtu import pick_mtu
from tfcrypt.agent.nodekey import NodeKey
from tfcrypt.agent.snapshot import CoreInput
from tfcrypt.config import AgentConfig
from tfcrypt.core.compute import Desired
from tfcrypt.core.infrastructure import Reason
from tfcrypt.identity.view import VerifiedView

OWN_EVENTS_WINDOW = 1.0  # seconds after an apply that changed something: events are ours


class Reconciler:
    """Computes and applies; remembers what the status reports of the last reconcile."""

    def __init__(self, cfg: AgentConfig, dataplane: Dataplane, inputs: CoreInput) -> None:
        self.cfg = cfg
        self.dataplane = dataplane
        self.inputs = inputs
        self.desired: Desired | None = None
        self.last_reconcile: dict[str, Any] = {}
        self.mtu: int | None = None  # the WireGuard MTU in use, and where it came from
        self.mtu_source = ""
        # the last full apply that found the kernel differing from what we had applied
        self.last_repair: dict[str, Any] | None = None
        self._applying = False
        self._own_changes_until = 0.0

    def changes_are_ours(self) -> bool:
        """Whether kernel events now are most likely our own apply's."""
        return self._applying or time.monotonic() < self._own_changes_until

    async def run(self, view: VerifiedView, node_key: NodeKey, full: bool,
                  causes: list[str]) -> ApplyResult:
        """One reconcile; `full` reads the kernel and repairs drift, `causes` say why."""
        started = time.monotonic()
        now = dt.datetime.now(dt.UTC)
        view.expire(now)
        desired = self.inputs.desired(view, node_key.public_key, full, causes)
        if self.desired is None or desired.conflicts != self.desired.conflicts:
            for conflict in desired.conflicts:
                log.warning("inventory conflict: %s", conflict)
        if desired.missing_peers and (self.desired is None or
                                      desired.missing_peers != self.desired.missing_peers):
            log.warning("selected traffic to %s is dropped: no verified key",
                        ", ".join(sorted(desired.missing_peers)))
        if self.desired is None or desired.refused != self.desired.refused:
            note_refused(desired)
        previous, self.desired = self.desired, desired
        if full or self.mtu is None:
            await self._pick_mtu()
        assert self.mtu is not None
        self.dataplane.set_desired(desired, private_key_b64=node_key.key.private_key_b64,
                                   listen_port=self.cfg.listen_port, mtu=self.mtu,
                                   keepalive=self.cfg.persistent_keepalive)
        self._applying = True
        try:
            result = await self.dataplane.apply(full=full)
        finally:
            self._applying = False
        if result.ops:
            self._own_changes_until = time.monotonic() + OWN_EVENTS_WINDOW
            if full and previous == desired:
                # same inputs, yet the kernel needed changes: someone else changed it
                self.last_repair = {"at": now.isoformat(), "why": why(causes),
                                    "ops": dict(result.changed)}
                metrics.DRIFT_REPAIRS.inc()
        duration = time.monotonic() - started
        metrics.RECONCILES.labels("error" if result.errors else "ok").inc()
        metrics.RECONCILE_SECONDS.observe(duration)
        metrics.PEERS.set(len(desired.peers))
        metrics.SELECTED_PAIRS.set(desired.selected_pair_count)
        metrics.INFRASTRUCTURE_PREFIXES.set(len(desired.infrastructure))
        if result.ops:
            log.info("reconciled", extra={"fields": {
                "event": "dataplane_changed", **change_summary(previous, desired),
                "ops": dict(result.changed), "peers_total": len(desired.peers),
                "classes_total": len(desired.class_selectors), "why": why(causes),
                **({"errors": result.errors} if result.errors else {})}})
        elif result.errors:
            log.warning("reconcile left items pending: %s", "; ".join(result.errors))
        self.last_reconcile = {"at": now.isoformat(), "duration_s": round(duration, 4),
                               "ops": result.ops, "errors": result.errors,
                               "changed": dict(result.changed)}
        return result

    async def _pick_mtu(self) -> None:
        mtu, source = await pick_mtu(self.cfg, self.dataplane.netlink)
        if (mtu, source) != (self.mtu, self.mtu_source):
            log.info("wireguard MTU %d (%s)", mtu, source)
        self.mtu, self.mtu_source = mtu, source


MAX_REFUSED_LOGGED = 20


def note_refused(desired: Desired) -> None:
    """The gauge by reason, and one warning naming (at most 20 of) the refused addresses."""
    by_reason = Counter(desired.refused.values())
    for reason in Reason:
        metrics.REFUSED_ADDRESSES.labels(reason.value).set(by_reason.get(reason.value, 0))
    if desired.refused:
        shown = list(desired.refused.items())[:MAX_REFUSED_LOGGED]
        more = len(desired.refused) - len(shown)
        log.warning("workload addresses refused for selection (infrastructure): %s%s",
                    ", ".join(f"{ip} ({why})" for ip, why in shown),
                    f" and {more} more" if more else "",
                    extra={"fields": {"event": "infrastructure_refused",
                                      "refused_total": len(desired.refused),
                                      "by_reason": dict(by_reason)}})


def why(causes: list[str]) -> str:
    """The inputs behind a reconcile, deduplicated, at most a few named."""
    unique = list(dict.fromkeys(causes))
    if not unique:
        return "periodic resync (drift repaired)"
    shown = ", ".join(unique[:4])
    return shown + (f" and {len(unique) - 4} more" if len(unique) > 4 else "")
