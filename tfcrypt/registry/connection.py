"""One shared etcd client per registry, replaced by a fresh one on the next endpoint on failure.

Rules:
- Every user of the registry (the watch loop, the lease keeper, CLI calls) borrows the
  current client with `client()` and reports a failure with `failed(client, error)`.
  Only the first report for a given client rotates: the others find it already replaced,
  so a failure seen by three tasks at once costs one endpoint, not three.
- A failed client is closed, and the next one is built on a fresh gRPC channel to the
  next endpoint. A fresh channel does not inherit gRPC's own reconnect backoff (up to
  two minutes), so our schedule (`Backoff`) is the only one that applies.
- Every request carries etcd's "hasleader" metadata (what clientv3's WithRequireLeader
  sends): a member cut off from the quorum answers "no leader" and cancels our watch
  instead of serving a silent, stale stream.
- The channel ignores http_proxy settings: etcd traffic goes straight to the member.

Pitfalls: aetcd exposes no public way to attach metadata, so the client's `metadata`
attribute is set before its first call (aetcd then passes it to every RPC and to the
watcher it creates on connect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import aetcd

from tfcrypt.registry.endpoints import Endpoint
from tfcrypt.registry.errors import Compacted, LeaseLost, RegistryError, RegistryUnavailable

log = logging.getLogger(__name__)

_REQUIRE_LEADER = (("hasleader", "true"),)
_MAX_MESSAGE = 64 * 1024 * 1024
_CLOSE_TIMEOUT = 2.0


@dataclass(frozen=True)
class RegistryStatus:
    """What the status API shows about the registry link."""

    connected: bool
    endpoint: str
    last_revision: int
    relists: int
    reconnects: int
    last_error: str | None


class Connection:
    """The current aetcd client and the counters that describe the link."""

    def __init__(self, endpoints: tuple[Endpoint, ...], request_timeout: float) -> None:
        self._endpoints = endpoints
        self._timeout = request_timeout
        self._index = 0
        self._client: aetcd.Client | None = None
        self._clients_made = 0
        self._closed = False
        self.connected = False
        self.last_revision = 0
        self.relists = 0
        self.reconnects = 0
        self.last_error: str | None = None

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoints[self._index]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def endpoint_count(self) -> int:
        return len(self._endpoints)

    def status(self) -> RegistryStatus:
        return RegistryStatus(
            connected=self.connected,
            endpoint=str(self.endpoint),
            last_revision=self.last_revision,
            relists=self.relists,
            reconnects=self.reconnects,
            last_error=self.last_error,
        )

    def client(self) -> aetcd.Client:
        """The current client, creating it (without I/O) if the last one failed."""
        if self._closed:
            raise RuntimeError("registry is closed")
        if self._client is None:
            ep = self.endpoint
            client = aetcd.Client(
                host=ep.host,
                port=ep.port,
                timeout=self._timeout,  # type: ignore[arg-type]  # aetcd annotates int
                options={
                    "grpc.enable_http_proxy": 0,
                    "grpc.max_receive_message_length": _MAX_MESSAGE,
                },
            )
            client.metadata = _REQUIRE_LEADER
            if self._clients_made:
                self.reconnects += 1
            self._clients_made += 1
            self._client = client
        return self._client

    def succeeded(self) -> None:
        self.connected = True

    async def failed(self, client: aetcd.Client, error: RegistryError) -> None:
        """Record `error` seen on `client`; if it is still current and the link itself is
        broken (not a refused request, a compacted revision or a lost lease), drop the
        client and rotate."""
        self.last_error = str(error)
        link_broken = isinstance(error, RegistryUnavailable) and not isinstance(
            error, Compacted | LeaseLost
        )
        if client is not self._client or not link_broken:
            return
        self.connected = False
        self._client = None
        self._index = (self._index + 1) % len(self._endpoints)
        log.warning("etcd unavailable (%s); next endpoint %s", error, self.endpoint)
        await _close_quietly(client)

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        self.connected = False
        if client is not None:
            await _close_quietly(client)


async def _close_quietly(client: aetcd.Client) -> None:
    """Close a client we have given up on; its own errors no longer matter."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), _CLOSE_TIMEOUT)
