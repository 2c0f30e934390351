"""Errors of the WireGuard device layer.

Every error here is a `TfcryptError`, so the agent can count and log it with one handler.
Messages name the interface and what failed; they never contain key material.
"""

from __future__ import annotations

from tfcrypt.errors import TfcryptError


class WireGuardError(TfcryptError):
    """A WireGuard device operation failed; the item it concerned stays pending."""


class UapiError(WireGuardError):
    """wireguard-go answered a UAPI request with a non-zero errno.

    wireguard-go writes the errno negated (`errno=-22`); `errno` is always the positive
    value so callers can compare it with the `errno` module.
    """

    def __init__(self, errno: int, operation: str) -> None:
        super().__init__(f"UAPI {operation} failed with errno {errno}")
        self.errno = errno
        self.operation = operation


class DeviceUnavailable(WireGuardError):
    """The device cannot be created, adopted or reached."""


class KernelModuleMissing(DeviceUnavailable):
    """The kernel has no WireGuard support; use the userspace backend instead."""
