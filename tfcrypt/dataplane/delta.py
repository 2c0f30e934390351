"""Desired-versus-actual bookkeeping shared by every reconciler (after Felix's deltatracker).

A reconciler keeps one `DeltaTracker` per kind of kernel object. Keys are the canonical
identity of an object (a peer's public key, a route's (table, dst)); values are the
object's full desired state, compared with `==`. The tracker never does I/O: the
reconciler loads `actual` from the kernel, asks for `plan()`, performs it, and reports
each success so that a failed item stays pending for the next apply.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class Plan(Generic[K, V]):
    """What an apply must do: add or change `upserts`, then remove `deletions`."""

    upserts: Mapping[K, V]
    deletions: frozenset[K]

    @property
    def empty(self) -> bool:
        return not self.upserts and not self.deletions


@dataclass
class DeltaTracker(Generic[K, V]):
    desired: dict[K, V] = field(default_factory=dict)
    actual: dict[K, V] = field(default_factory=dict)

    def set_desired(self, items: Mapping[K, V]) -> None:
        self.desired = dict(items)

    def load_actual(self, items: Iterable[tuple[K, V]]) -> None:
        self.actual = dict(items)

    def plan(self, owned: frozenset[K] | None = None) -> Plan[K, V]:
        """The difference; `owned` limits deletions to objects we may remove."""
        upserts = {k: v for k, v in self.desired.items() if self.actual.get(k) != v}
        stale = self.actual.keys() - self.desired.keys()
        if owned is not None:
            stale &= owned
        return Plan(upserts, frozenset(stale))

    def applied_upsert(self, key: K) -> None:
        self.actual[key] = self.desired[key]

    def applied_delete(self, key: K) -> None:
        self.actual.pop(key, None)

    @property
    def in_sync(self) -> bool:
        return self.plan().empty
