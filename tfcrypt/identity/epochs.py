"""Rollback protection: the highest epoch accepted for each key.

Rules:
- An epoch lower than the highest already accepted for that key is a rollback: someone
  with write access to etcd (who cannot forge a signature) replays an older signed value,
  for instance a WireGuard key the node has since rotated away from.
- An equal epoch is accepted: a node re-signs its unchanged record after its SVID rotates
  and keeps the epoch.
- Epochs are remembered across deletions on purpose: deleting a key and then writing back
  its old signed value is the same replay by two steps.
- Memory only: after a restart the first value read for a key sets the floor. etcd's own
  revision order is what the reader starts from then.
- `check` never records; `accept` records only after every other check passed, so a
  rejected value never moves the floor.
"""

from __future__ import annotations

from tfcrypt.errors import Rejected, RejectReason
from tfcrypt.identity.verify import Verified


class EpochBook:
    """Highest accepted epoch per key (relative to the prefix)."""

    def __init__(self) -> None:
        self._highest: dict[str, int] = {}

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
        self._highest[verified.key] = verified.epoch

    def snapshot(self) -> dict[str, int]:
        """A copy of what is remembered, for status output and tests."""
        return dict(self._highest)

    def __len__(self) -> int:
        return len(self._highest)

    def __repr__(self) -> str:
        return f"EpochBook({len(self._highest)} keys)"
