"""Reading the nodes' flow reports from etcd, believed as node records are.

Rules of this module (docs/flows.md):
- Every value under `flows/` of the seen-traffic keyspace is verified exactly as the CLI
  verifies `nodes/`: tfcrypt.identity.verify under the session's trust bundle and
  Authorizer (`flows/<n>` only by node n's SPIFFE ID), the signer's chain valid now
  (ChainTime.NOW, like node records: an agent re-signs its report every ~30 s), chains
  of version-2 envelopes looked up among those the session's view holds. Then it is
  decoded with FlowReport.from_verified.
- A refused report is named with its reason and counted by reason; it never stops the
  command, and nothing of it is believed (a report is believed whole or not at all).
- Only records whose local end is a workload the verified inventory places on the
  reporting node are kept (tfcrypt.core.seen.local_flows); the others are counted.
- The size bound is etcd's own request limit, not the 64 KiB of inventory values: a
  report of MAX_REPORT_FLOWS records is about 1 MB.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tfcrypt.controller.session import ControllerSession
from tfcrypt.core.seen import Seen, local_flows
from tfcrypt.errors import Rejected
from tfcrypt.identity.verify import ChainTime, verify_envelopes
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.flow import FlowReport
from tfcrypt.text import excerpt

FLOWS = "flows/"
MAX_REPORT_BYTES = 1_572_864  # etcd's default --max-request-bytes: no value is larger


@dataclass(frozen=True)
class SeenRead:
    """The believed reports (as core's Seen) and the refused ones: key -> (reason, why)."""

    seen: Seen
    rejected: Mapping[str, tuple[str, str]]

    @property
    def rejections(self) -> Counter[str]:
        return Counter(reason for reason, _ in self.rejected.values())

    def to_json(self) -> dict[str, Any]:
        return {"reports": sorted(self.seen.reports), "not_local": self.seen.not_local,
                "rejections": dict(sorted(self.rejections.items())),
                "rejected": {k: {"reason": r, "message": m}
                             for k, (r, m) in sorted(self.rejected.items())}}

    def render(self) -> str:
        lines = [f"seen traffic: {len(self.seen.reports)} report(s) believed"
                 f" ({', '.join(sorted(self.seen.reports)) or 'none'}), "
                 f"{len(self.seen.flows)} record(s) kept, {self.seen.not_local} not local "
                 "to their reporting node (ignored)"]
        if self.rejected:
            counts = ", ".join(f"{r} {n}" for r, n in sorted(self.rejections.items()))
            lines.append(f"  {len(self.rejected)} report(s) refused ({counts}):")
            lines += [f"  refused {k}: {m}" for k, (_, m) in sorted(self.rejected.items())]
        return "\n".join(lines)


def believe_reports(items: Mapping[str, bytes], s: ControllerSession, view: VerifiedView,
                    now: float) -> tuple[dict[str, FlowReport], dict[str, tuple[str, str]]]:
    """Verify and decode `items` (key -> value under the seen keyspace): the reports by
    node, and the refused keys with (reason, message)."""
    keys = sorted(items)
    outcomes = verify_envelopes([(k, items[k], ChainTime.NOW) for k in keys],
                                bundles=s.bundles, authorizer=s.authorizer,
                                now=dt.datetime.fromtimestamp(now, dt.UTC),
                                chains=view.chains, max_bytes=MAX_REPORT_BYTES)
    reports: dict[str, FlowReport] = {}
    rejected: dict[str, tuple[str, str]] = {}
    for key, outcome in zip(keys, outcomes, strict=True):
        try:
            if isinstance(outcome, Rejected):
                raise outcome
            report = FlowReport.from_verified(outcome)
        except Rejected as rej:
            rejected[key] = (rej.reason.value, excerpt(str(rej), 240))
            continue
        reports[report.node] = report
    return reports, rejected


async def read_seen(s: ControllerSession, view: VerifiedView, now: float) -> SeenRead:
    """Every `flows/` report in etcd, verified; records checked against `view`'s inventory."""
    listed = await s.registry.get_all_seen(FLOWS)
    reports, rejected = believe_reports({k: i.value for k, i in listed.items.items()}, s,
                                        view, now)
    return SeenRead(local_flows(reports, view.of("workloads/")), rejected)
