"""Rollback protection: the highest epoch accepted for each key.

Rules:
- An epoch lower than the highest already accepted for that key is a rollback: someone
  with write access to etcd (who cannot forge a signature) replays an older signed value,
  for instance a WireGuard key the node has since rotated away from.
- An equal epoch is accepted: a node re-signs its unchanged record after its SVID rotates
  and keeps the epoch.
- Epochs are remembered across deletions on purpose: deleting a key and then writing back
  its old signed value is the same replay by two steps.
- Remembered across restarts too: the agent persists the book in its state dir
  (tfcrypt/agent/epochstore.py) and `restore`s it before it reads etcd, so a restarted
  reader still refuses a replayed older record. `generation` moves whenever a floor rises,
  so the owner knows when there is something new to save.
- Bounded: at most `max_keys` floors are kept; past that the floor updated least recently
  is forgotten first (a key whose floor is forgotten is protected again from its next
  accepted value on). The bound is far above any cluster's number of records.
- `check` never records; `accept` records only after every other check passed, so a
  rejected value never moves the floor.
"""

from __future__ import annotations

from collections.abc import Mapping

from tfcrypt.errors import Rejected, RejectReason
from tfcrypt.identity.verify import Verified

MAX_KEYS = 200_000


class EpochBook:
    """Highest accepted epoch per key (relative to the prefix), least recently raised first."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._highest: dict[str, int] = {}
        self.generation = 0  # bumped whenever a floor rises or the book is restored

    def highest(self, key: str) -> int | None:
        return self._highest.get(key)

    def check(self, verified: Verified) -> None:
        """Raise Rejected(ROLLBACK) if an epoch above `verified.epoch` was accepted for its key."""
        seen = self._highest.get(verified.key)
        if seen is not None and verified.epoch < seen:
            raise Rejected(RejectReason.ROLLBACK,
                           f"{verified.key}: epoch {verified.epoch} < accepted {seen}")

    def accept(self, verified: Verified) -> None:
        """Record `verified.epoch` as seen; call after `check` and any model parsing passed."""
        self.check(verified)
        self._raise(verified.key, verified.epoch)

    def restore(self, floors: Mapping[str, int]) -> None:
        """Take floors saved by an earlier run (in their saved order); a floor already
        higher here stays."""
        for key, epoch in floors.items():
            if epoch > self._highest.get(key, -1):
                self._raise(key, epoch)
        self.generation += 1

    def _raise(self, key: str, epoch: int) -> None:
        previous = self._highest.pop(key, None)
        self._highest[key] = epoch  # (re)inserted last: the most recently raised
        if previous != epoch:
            self.generation += 1
        while len(self._highest) > self.max_keys:
            del self._highest[next(iter(self._highest))]

    def snapshot(self) -> dict[str, int]:
        """A copy of what is remembered, least recently raised first (status, saving)."""
        return dict(self._highest)

    def __len__(self) -> int:
        return len(self._highest)

    def __repr__(self) -> str:
        return f"EpochBook({len(self._highest)} keys)"
