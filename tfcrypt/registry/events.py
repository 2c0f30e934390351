"""The values a registry consumer receives: a full list, then changes.

Rules:
- A stream of events is `Listed`, then any number of `Put`/`Deleted`, then possibly
  another `Listed`, and so on. A `Listed` is the whole truth at its revision: the
  consumer replaces its view with it (a key missing from it is gone, even if no
  `Deleted` was delivered for it).
- Keys are relative to the registry prefix ("nodes/n1", not "/tfcrypt/v1/nodes/n1").
- Values are opaque bytes: the registry never parses them; the reader verifies them.
- Revisions are etcd's: a change's `mod_revision` is strictly greater than the revision
  of the `Listed` before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Item:
    """One stored value and the revision that last wrote it."""

    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Listed:
    """Every key under the prefix at `revision`."""

    items: Mapping[str, Item] = field(default_factory=dict)
    revision: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", MappingProxyType(dict(self.items)))

    def __hash__(self) -> int:
        return hash((self.revision, frozenset(self.items.items())))


@dataclass(frozen=True)
class Put:
    """`rel_key` now holds `value` (created or replaced)."""

    rel_key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Deleted:
    """`rel_key` was deleted, or its lease expired."""

    rel_key: str
    mod_revision: int


RegistryEvent = Listed | Put | Deleted
