"""The small interface every WireGuard backend offers the manager.

Rules:
- A backend owns one interface by name and does the I/O; it decides nothing. The
  manager decides what to change from `get_state()` and calls the write verbs.
- `ensure_device()` is the only verb that may create a device. It says how the device came
  to be, so the agent knows when state was lost (`RESTARTED`) and a full re-apply of
  every reconciler is due (a vanished device took its routes with it).
- Writes raise a `WireGuardError` subclass; the manager keeps the item pending.
"""

from __future__ import annotations

import enum
from typing import Protocol

from tfcrypt.wireguard.model import DeviceState, PeerConfig


class DeviceOrigin(enum.Enum):
    """How `ensure_device()` found the device."""

    PRESENT = "present"        # running, and already known to this backend
    ADOPTED = "adopted"        # found running, left by a previous agent
    STARTED = "started"        # created because none existed
    RESTARTED = "restarted"    # had been running, vanished, created again: state lost


class WireGuardBackend(Protocol):
    ifname: str

    async def ensure_device(self) -> DeviceOrigin: ...

    async def get_state(self) -> DeviceState: ...

    async def read_private_key(self) -> bytes | None: ...

    async def configure_device(self, private_key: bytes | None, listen_port: int | None) -> None:
        """Set the fields that are not None, in one operation."""

    async def set_link(self, mtu: int | None, up: bool) -> None: ...

    async def upsert_peer(self, peer: PeerConfig) -> None:
        """Create or update one peer, replacing its allowed IPs atomically."""

    async def remove_peer(self, public_key: str) -> None: ...

    async def close(self) -> None:
        """Release this process's resources; the device itself keeps running."""
