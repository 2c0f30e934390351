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
- Only a snapshot of workloads/, policies/ and nodes/ reaches the core: nothing here does
  I/O or awaits, so the state cannot change half-way through.
"""

from __future__ import annotations

from collections.abc import Mapping

from tfcrypt.agent.lingering import LingerBook
from tfcrypt.core.compute import Desired, Snapshot
from tfcrypt.core.incremental import IncrementalCore
from tfcrypt.core.inventory import Inventory
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.families import WORKLOADS
from tfcrypt.model.workload import Workload


def snapshot(view: VerifiedView, own_node: str, own_public_key: str,
             workloads: Mapping[str, Workload] | None = None) -> Snapshot:
    """The core's input: the verified view, with `workloads` (live plus lingering) in
    place of the verified workloads when given."""
    return Snapshot(
        own_node=own_node,
        workloads=view.of("workloads/") if workloads is None else workloads,
        policies={p.name: p for p in view.of("policies/").values()},
        nodes={r.node: r for r in view.of("nodes/").values()},
        own_public_key=own_public_key)


class CoreInput:
    """The incremental core and what it is fed: changed keys, lingering, the inventory."""

    def __init__(self, own_node: str, workload_grace: float) -> None:
        self.own_node = own_node
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
        self.inventory.sync(lingered.effective, None if changed is None or full else changed)
        return self.core.update(
            snapshot(view, self.own_node, own_public_key, self.inventory), changed)
