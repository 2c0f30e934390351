"""etcd over mutual TLS: the client's X509-SVID as its certificate, the bundle as its roots.

Rules:
- The credentials are PEM bytes built from whatever SPIFFE provider serves the SVID (SPIRE,
  or the lab's Workload API server): the leaf and its intermediates as the client chain,
  the SVID's key, and the trust bundle of the SVID's own trust domain as the roots that
  must have signed etcd's server certificate. Nothing here knows where they came from.
- aetcd 1.0 opens only `grpc.aio.insecure_channel`. `TlsClient` is aetcd's `Client` with
  `connect()` opening `grpc.aio.secure_channel` instead, and nothing else changed: the
  stubs, the watcher and every request path stay aetcd's (one method overridden, pinned
  to aetcd 1.0's `connect`; `tests/test_registry_tls.py` fails if that shape changes).
- gRPC's channel credentials are fixed when the channel is made. A rotated SVID therefore
  needs a new channel: `Connection.set_credentials` retires the current client and the
  watch resumes on the next one from its last revision + 1 (watch.py), without a relist.
- The server is checked against the endpoint's host (an IP SAN for an IP endpoint, a DNS
  SAN for a name), or against `server_name` when one is given (gRPC's
  ssl_target_name_override): SPIRE puts DNS SANs in X509-SVIDs, not IP SANs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import aetcd
import grpc
from aetcd import rpc, watcher
from cryptography import x509
from cryptography.hazmat.primitives import serialization


@dataclass(frozen=True)
class TlsCredentials:
    """One identity's client certificate for etcd; `serial` names it in logs and status."""

    root_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    chain_pem: bytes = field(repr=False)
    serial: int = 0

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_pem, private_key=self.key_pem,
            certificate_chain=self.chain_pem)


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def credentials_from_svid(private_key: object, chain: Sequence[x509.Certificate],
                          bundle: Sequence[x509.Certificate]) -> TlsCredentials:
    """Client credentials from an X509-SVID (key, leaf-first chain) and the trust bundle
    that signed the etcd server's certificate. ValueError names what is missing."""
    if not chain:
        raise ValueError("the SVID has no certificate")
    if not bundle:
        raise ValueError("the SVID's trust domain has no bundle to verify etcd with")
    private_bytes = getattr(private_key, "private_bytes", None)
    if private_bytes is None:
        raise ValueError("the SVID's private key is not a key")
    key_pem = private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return TlsCredentials(_pem(bundle), key_pem, _pem(chain), chain[0].serial_number)


class TlsClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on a `secure_channel` (see the module rules)."""

    def __init__(self, *args: object, credentials: TlsCredentials,
                 server_name: str | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.credentials = credentials
        if server_name:
            self._options = {**self._options, "grpc.ssl_target_name_override": server_name}

    async def connect(self) -> None:
        """aetcd 1.0's `connect` with `secure_channel` (no username/password auth: the
        certificate is the client's identity)."""
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait, as aetcd does
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel = rpc.secure_channel(
                f"{self._host}:{self._port}", self.credentials.channel_credentials(),
                options=self._options.items())
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel),
                                            timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False
