"""The core's input: the verified view assembled into a Snapshot, and what changed since.

Rules:
- A Snapshot is the verified view of etcd (tfcrypt/identity/view.py) as the core takes it:
  policies by name, node records by node, this node's public key, and the workloads live
  plus lingering (tfcrypt/agent/lingering.py) in place of the verified workloads.
- The core is told which workload keys changed since the last reconcile (`note_changed`;
  None means unknown, and then it compares everything: after a relist or new trust,
  `all_changed`). Lingering adds the keys whose effective value it changed.
- The Inventory (tfcrypt/core/inventory.py) holds the workloads the core was last given,
  indexed as they change (the core's full computations query it instead of indexing
  100,000 workloads), and it is lingering's previous effective mapping too. It follows
  the keys the core is told of; a full reconcile (start, relist, resync, repair) compares
  every key, so a missed key cannot last.
- Infrastructure (tfcrypt/core/infrastructure.py): the static entries (configured CIDRs,
  this node's address, etcd's; tfcrypt/agent/infrastructure.py) plus the address of
  every node record verified since the agent started. Decision: a node's address stays
  infrastructure after its record expires or is deleted, until the agent restarts: a
  record expires when its node is in trouble, which is exactly when its underlay must
  not be captured (waiting for a node's SVID to lapse would otherwise be a way to
  select its address); a node address legitimately reused by a workload is rare and
  is released by a restart. The effective workloads are screened (`Screen`) before the
  Inventory is fed, so the Inventory and the core never see a refused address.
- Only a snapshot of workloads/, policies/ and nodes/ reaches the core: nothing here does
  I/O or awaits, so the state cannot change half-way through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from tfcrypt.agent.lingering import LingerBook
from tfcrypt.core.compute import Desired, Snapshot
from tfcrypt.core.incremental import IncrementalCore
from tfcrypt.core.infrastructure import Infrastructure, Screen, merge, node_addresses
from tfcrypt.core.inventory import Inventory
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.families import WORKLOADS
from tfcrypt.model.workload import Workload


def snapshot(view: VerifiedView, own_node: str, own_public_key: str,
             workloads: Mapping[str, Workload] | None = None,
             infrastructure: Mapping[str, str] | None = None) -> Snapshot:
    """The core's input: the verified view, with `workloads` (live plus lingering) in
    place of the verified workloads when given."""
    return Snapshot(
        own_node=own_node,
        workloads=view.of("workloads/") if workloads is None else workloads,
        policies={p.name: p for p in view.of("policies/").values()},
        nodes={r.node: r for r in view.of("nodes/").values()},
        own_public_key=own_public_key,
        infrastructure=infrastructure or {})


class CoreInput:
    """The incremental core and what it is fed: changed keys, lingering, the inventory."""

    def __init__(self, own_node: str, workload_grace: float,
                 static_infrastructure: Mapping[str, str] | None = None) -> None:
        self.own_node = own_node
        self.static_infrastructure = dict(static_infrastructure or {})
        self.screen = Screen()
        self.infrastructure = Infrastructure()
        self._node_addresses: dict[str, str] = {}  # every node record's, since start
        self.core = IncrementalCore(own_node)
        self.inventory = Inventory()
        self.lingering = LingerBook(workload_grace)
        # workload keys changed since the last reconcile; None = unknown, diff everything
        self._changed: set[str] | None = None

    def note_changed(self, key: str) -> None:
        """Tell the incremental core which workload keys an event touched."""
        if key.startswith(WORKLOADS) and self._changed is not None:
            self._changed.add(key)

    def all_changed(self) -> None:
        """Anything may have changed (a relist; every record verified again)."""
        self._changed = None

    def desired(self, view: VerifiedView, own_public_key: str, full: bool,
                causes: list[str]) -> Desired:
        """The core's answer for the view now; lingering's log-worthy ends go to `causes`."""
        changed, self._changed = self._changed, set()
        lingered = self.lingering.advance(self.inventory, view.of("workloads/"), changed,
                                          causes)
        if changed is not None:
            changed |= lingered.changed
        infra = self._infrastructure(view)
        effective, changed = self.screen.update(lingered.effective, infra, changed)
        self.inventory.sync(effective, None if changed is None or full else changed)
        desired = self.core.update(
            snapshot(view, self.own_node, own_public_key, self.inventory, infra.entries),
            changed)
        refused = self.screen.refused
        return replace(desired, refused=refused) if refused != desired.refused else desired

    def _infrastructure(self, view: VerifiedView) -> Infrastructure:
        """Static entries plus every node address seen since start (kept, see the rules)."""
        self._node_addresses.update(node_addresses(view.of("nodes/").values()))
        entries = merge(self.static_infrastructure, self._node_addresses)
        if entries != self.infrastructure.entries:
            self.infrastructure = Infrastructure.of(entries)
        return self.infrastructure
