"""The agent's lingering bookkeeping: which deleted workloads stay selected, logged and shown.

Rules:
- What lingers, for how long, and when an entry ends is decided by tfcrypt/core/linger.py
  (pure); this module keeps its state between reconciles (the entries, and when the next
  one ends, in monotonic seconds) and says what happened.
- A deleted workload's addresses stay selected for `workload_grace` seconds unless a live
  workload claims them, so a terminating pod that still sends is not sent in plaintext;
  the reconciler wakes at `next_expiry`, so an address is released on time, not at the
  next resync.
- Every start and end is logged with why (`lingering_started`, `lingering_ended`), at
  most MAX_LINGER_LOGGED of each per reconcile (a relist may end or start thousands at
  once), the rest as one `lingering_summary` line. An end that changes the dataplane (any
  reason but the workload coming back) is a cause of the reconcile.
- Status lists the entries, with the time each has left, only when there are at most
  MAX_LINGER_SHOWN; otherwise the count and the grace alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from tfcrypt import metrics
from tfcrypt.agent.logs import AGENT_LOG as log
from tfcrypt.core.linger import EndReason, Lingering, LingerResult, linger
from tfcrypt.model.workload import Workload

MAX_LINGER_LOGGED = 20  # per reconcile; a relist may end or start thousands at once
MAX_LINGER_SHOWN = 20  # status lists the entries only when there are this few


class LingerBook:
    """The lingering entries between reconciles, and when the next one ends."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.lingering: Mapping[str, Lingering] = {}
        self.next_expiry: float | None = None

    def advance(self, previous: Mapping[str, Workload], live: Mapping[str, Workload],
                changed: set[str] | None, causes: list[str]) -> LingerResult:
        """Keep deleted workloads selected for the grace period (tfcrypt/core/linger.py):
        `previous` is the last effective mapping, `live` the verified workloads. Logs what
        started and ended lingering, and why; adds the ends that matter to `causes`."""
        result = linger(previous, live, self.lingering, time.monotonic(), self.grace, changed)
        self.lingering = result.lingering
        self.next_expiry = result.next_expiry
        metrics.LINGERING.set(len(result.lingering))
        grace = self.grace
        for key in result.started[:MAX_LINGER_LOGGED]:
            ips = list(result.lingering[key].workload.ips)
            log.info("%s deleted: its addresses %s stay selected for %gs unless reused",
                     key, ", ".join(ips), grace, extra={"fields": {
                         "event": "lingering_started", "key": key, "ips": ips,
                         "grace_s": grace}})
        for ended in result.ended[:MAX_LINGER_LOGGED]:
            why = ended.reason.value + (f" ({ended.ip} by {ended.by})"
                                        if ended.reason is EndReason.REUSED else "")
            log.info("%s no longer lingers: %s", ended.key, why, extra={"fields": {
                "event": "lingering_ended", "key": ended.key, "reason": ended.reason.value,
                **({"by": ended.by, "ip": ended.ip} if ended.by else {})}})
            if ended.reason is not EndReason.BACK:
                causes.append(f"lingering {ended.key} ended: {ended.reason.value}")
        skipped = (max(0, len(result.started) - MAX_LINGER_LOGGED),
                   max(0, len(result.ended) - MAX_LINGER_LOGGED))
        if any(skipped):
            log.info("lingering: %d more started and %d more ended (not listed)", *skipped,
                     extra={"fields": {"event": "lingering_summary",
                                       "lingering_total": len(result.lingering)}})
        return result

    def status(self) -> dict[str, Any]:
        """Count, grace and (when few) each lingering workload with the time it has left."""
        now = time.monotonic()
        doc: dict[str, Any] = {"count": len(self.lingering), "grace_s": self.grace}
        if len(self.lingering) <= MAX_LINGER_SHOWN:
            doc["entries"] = [{"key": k, "node": e.workload.node, "ips": list(e.workload.ips),
                               "ends_in_s": round(max(0.0, e.until - now), 1)}
                              for k, e in sorted(self.lingering.items())]
        return doc
