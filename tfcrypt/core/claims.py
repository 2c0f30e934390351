"""Claims: who claims each IP, kept current for the incremental core.

The same state compute() derives from the workloads each time (tfcrypt/core/compute.py:
conflicts, contested IPs, each node's IPs), changed by one workload at a time.

Invariants (after `refresh` of every IP an add or remove touched):
- `owners` holds exactly the current workloads' claims (tfcrypt/core/postings.py ClaimMap);
  `on_node` is node -> workload key -> workload for the same workloads, with no empty node.
- `conflicts` has an entry (compute's `conflict_text`) exactly for the IPs claimed by more
  than one workload; `contested` is exactly the IPs claimed on more than one node, which
  no peer gets as an allowed IP.
"""

from __future__ import annotations

from collections.abc import Iterable

from tfcrypt.core.compute import conflict_text
from tfcrypt.core.inventory import Inventory
from tfcrypt.core.postings import ClaimMap
from tfcrypt.model.workload import Workload


class Claims:
    """Who claims each IP, kept current: conflicts, contested IPs and per-node IP lists."""

    def __init__(self, workloads: Iterable[Workload]) -> None:
        self.owners = ClaimMap()
        self.on_node: dict[str, dict[str, Workload]] = {}
        self.contested: set[str] = set()
        self.conflicts: dict[str, str] = {}
        for w in workloads:
            self.add(w)
        self.refresh(self.owners.shared())

    @classmethod
    def of_inventory(cls, inventory: Inventory) -> Claims:
        """Copies of an Inventory's claims (no address claimed twice, so no conflict and
        nothing contested); its keys are the workloads' keys, as in the agent's view."""
        claims = cls(())
        claims.owners = inventory.claims()
        claims.on_node = inventory.workloads_by_node()
        return claims

    def add(self, w: Workload) -> None:
        self.on_node.setdefault(w.node, {})[w.key] = w
        for ip in w.ips:
            self.owners.add(ip, w)

    def remove(self, w: Workload) -> None:
        node = self.on_node[w.node]
        del node[w.key]
        if not node:
            del self.on_node[w.node]
        for ip in w.ips:
            self.owners.remove(ip, w)

    def refresh(self, ips: Iterable[str]) -> None:
        """Recompute the conflict state of `ips` after adds and removes."""
        for ip in ips:
            owners = self.owners.get(ip)
            if len(owners) > 1:
                self.conflicts[ip] = conflict_text(ip, owners)
            else:
                self.conflicts.pop(ip, None)
            if len({w.node for w in owners}) > 1:
                self.contested.add(ip)
            else:
                self.contested.discard(ip)

    def ips_of(self, node: str) -> list[str]:
        return [ip for w in self.on_node.get(node, {}).values() for ip in w.ips]

    def nodes_of(self, ip: str) -> set[str]:
        return {w.node for w in self.owners.get(ip)}
