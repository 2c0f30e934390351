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
- With TLS (registry/tls.py) no client exists before the first credentials: users wait in
  `wait_credentials()`. New credentials (a rotated SVID) retire the current client: its
  users are told (`on_rotation`: the watch resumes on the next client from its revision,
  without a relist), the next `client()` is built with the new certificate, and the old
  one is closed a grace period later so requests in flight on it can finish.

Pitfalls: aetcd exposes no public way to attach metadata, so the client's `metadata`
attribute is set before its first call (aetcd then passes it to every RPC and to the
watcher it creates on connect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aetcd

from tfcrypt.registry.endpoints import Endpoint
from tfcrypt.registry.errors import Compacted, LeaseLost, RegistryError, RegistryUnavailable
from tfcrypt.registry.tls import TlsClient, TlsCredentials

log = logging.getLogger(__name__)

_REQUIRE_LEADER = (("hasleader", "true"),)
_MAX_MESSAGE = 64 * 1024 * 1024
_CLOSE_TIMEOUT = 2.0
RETIRE_GRACE = 5.0  # seconds a client replaced by new credentials stays open


@dataclass(frozen=True)
class RegistryStatus:
    """What the status API shows about the registry link."""

    connected: bool
    endpoint: str
    last_revision: int
    relists: int
    reconnects: int
    last_error: str | None
    tls: bool = False
    credential_rotations: int = 0


class Connection:
    """The current aetcd client and the counters that describe the link."""

    def __init__(self, endpoints: tuple[Endpoint, ...], request_timeout: float, *,
                 tls: bool = False, server_name: str | None = None) -> None:
        self._endpoints = endpoints
        self._timeout = request_timeout
        self.tls = tls
        self._server_name = server_name
        self._credentials: TlsCredentials | None = None
        self._have_credentials = asyncio.Event()
        if not tls:
            self._have_credentials.set()
        self._rotation_listeners: set[Callable[[], None]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: list[aetcd.Client] = []
        self._rotated = False
        self.credential_rotations = 0
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
            tls=self.tls,
            credential_rotations=self.credential_rotations,
        )

    async def wait_credentials(self) -> None:
        """Return once a client can be made (at once without TLS)."""
        await self._have_credentials.wait()

    def set_credentials(self, credentials: TlsCredentials) -> None:
        """Use `credentials` for every client from now on; a current client made with
        other credentials is retired (see the module rules)."""
        if not self.tls:
            raise RuntimeError("set_credentials on a registry without TLS")
        if credentials == self._credentials:
            return
        self._credentials = credentials
        self._have_credentials.set()
        old, self._client = self._client, None
        if old is None:
            return
        self.credential_rotations += 1
        self._rotated = True
        log.info("etcd client certificate replaced (serial %x); new connection",
                 credentials.serial)
        for listener in list(self._rotation_listeners):
            listener()
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def on_rotation(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` when the current client is retired for new credentials; returns
        the function that stops it."""
        self._rotation_listeners.add(listener)
        return lambda: self._rotation_listeners.discard(listener)

    async def _retire(self, client: aetcd.Client) -> None:
        self._retired.append(client)
        await asyncio.sleep(RETIRE_GRACE)
        self._retired.remove(client)
        await _close_quietly(client)

    def client(self) -> aetcd.Client:
        """The current client, creating it (without I/O) if the last one failed."""
        if self._closed:
            raise RuntimeError("registry is closed")
        if self._client is None:
            ep = self.endpoint
            options = {
                "grpc.enable_http_proxy": 0,
                "grpc.max_receive_message_length": _MAX_MESSAGE,
            }
            client: aetcd.Client
            if self.tls:
                if self._credentials is None:
                    raise RegistryUnavailable("etcd TLS: no client certificate yet "
                                              "(waiting for the SVID)")
                client = TlsClient(host=ep.host, port=ep.port, timeout=self._timeout,
                                   options=options, credentials=self._credentials,
                                   server_name=self._server_name)
            else:
                client = aetcd.Client(
                    host=ep.host,
                    port=ep.port,
                    timeout=self._timeout,  # type: ignore[arg-type]  # aetcd annotates int
                    options=options,
                )
            client.metadata = _REQUIRE_LEADER
            if self._clients_made and not self._rotated:
                self.reconnects += 1
            self._rotated = False
            self._clients_made += 1
            self._client = client
        return self._client

    def is_current(self, client: aetcd.Client) -> bool:
        """Whether `client` is still the one `client()` hands out."""
        return client is self._client

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
        self._have_credentials.set()  # wake waiters: they find the registry closed
        for task in list(self._retiring):
            task.cancel()
        for old in [*self._retired, *([client] if client is not None else [])]:
            await _close_quietly(old)
        self._retired.clear()


async def _close_quietly(client: aetcd.Client) -> None:
    """Close a client we have given up on; its own errors no longer matter."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), _CLOSE_TIMEOUT)
