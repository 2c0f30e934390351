"""tfcrypt's registry: etcd as a stream of events in and one leased record out.

Rules: values are opaque bytes (the reader verifies them); keys are relative to the
prefix; etcd being away is never an exception out of `Registry.events()`; every aetcd or
gRPC error is translated in `errors.etcd_errors`. See docs/registry.md.
"""

from __future__ import annotations

from tfcrypt.registry.connection import RegistryStatus
from tfcrypt.registry.endpoints import Backoff, Endpoint, parse_endpoint
from tfcrypt.registry.errors import (
    Compacted,
    LeaseLost,
    RegistryError,
    RegistryRequestRejected,
    RegistryUnavailable,
)
from tfcrypt.registry.events import Deleted, Item, Listed, Put, RegistryEvent
from tfcrypt.registry.registry import DEFAULT_PREFIX, Registry
from tfcrypt.registry.tls import TlsCredentials, credentials_from_svid

__all__ = [
    "DEFAULT_PREFIX",
    "Backoff",
    "Compacted",
    "Deleted",
    "Endpoint",
    "Item",
    "LeaseLost",
    "Listed",
    "Put",
    "Registry",
    "RegistryError",
    "RegistryEvent",
    "RegistryRequestRejected",
    "RegistryStatus",
    "RegistryUnavailable",
    "TlsCredentials",
    "credentials_from_svid",
    "parse_endpoint",
]
