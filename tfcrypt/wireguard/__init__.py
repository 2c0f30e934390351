"""The WireGuard device: key at rest, backends (wireguard-go over UAPI, kernel), reconciler.

Rules:
- `WireGuardManager` is the only writer of the device; it talks to a backend through the
  `WireGuardBackend` protocol, so reconciler tests run against `FakeBackend`.
- The device outlives the agent; a new agent adopts it (see userspace.py).
- Private keys never appear in logs, reprs or error messages.
"""

from __future__ import annotations

from tfcrypt.wireguard.backend import DeviceOrigin, WireGuardBackend
from tfcrypt.wireguard.device import ApplyError, ApplyReport, WireGuardManager
from tfcrypt.wireguard.errors import (
    DeviceUnavailable,
    KernelModuleMissing,
    UapiError,
    WireGuardError,
)
from tfcrypt.wireguard.fake import FakeBackend
from tfcrypt.wireguard.keys import KeyLoad, load_or_create, public_key_of, rotate
from tfcrypt.wireguard.model import (
    DesiredDevice,
    DeviceState,
    PeerConfig,
    PeerState,
    mtu_for_underlay,
)

__all__ = [
    "ApplyError",
    "ApplyReport",
    "DesiredDevice",
    "DeviceOrigin",
    "DeviceState",
    "DeviceUnavailable",
    "FakeBackend",
    "KernelModuleMissing",
    "KeyLoad",
    "PeerConfig",
    "PeerState",
    "UapiError",
    "WireGuardBackend",
    "WireGuardError",
    "WireGuardManager",
    "load_or_create",
    "mtu_for_underlay",
    "public_key_of",
    "rotate",
]
