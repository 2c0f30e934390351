"""Follows the SPIFFE Workload API and turns every X509-SVID update into an event.

Rules:
- py-spiffe streams on a thread of its own; updates cross into asyncio only through
  `loop.call_soon_threadsafe`, never by touching the loop from that thread.
- py-spiffe retries a few times by itself, then reports the error and its watcher
  stops for good. This source owns the outer loop: a missing socket is waited for (and
  said once), an ended or failed stream is reconnected with backoff, so the agent never
  needs to know which of these happened.
- An update whose SVID is not the identity this node expects (a misregistered socket)
  is refused and counted; the last good SVID stays in use. The last refusal is kept in
  `state.last_refusal` (reason, message, when) so that status can say why there is no
  SVID instead of only "none yet": an operator reads status, not the log.
- Whatever the Workload API hands us is outside input: a SPIFFE ID or an error text is
  escaped and cut short (tfcrypt.text.excerpt) before it reaches a log line or status.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from spiffe import WorkloadApiClient
from spiffe.workloadapi.workload_api_client import RetryPolicy

from tfcrypt.registry.tls import TlsCredentials, credentials_from_svid
from tfcrypt.text import excerpt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SvidUpdate:
    """One identity as served by the Workload API, with the bundles to verify others."""

    spiffe_id: str
    private_key: object = field(repr=False)
    chain: tuple[x509.Certificate, ...] = field(repr=False)
    bundles: Mapping[str, tuple[x509.Certificate, ...]] = field(repr=False)

    @property
    def serial(self) -> int:
        return self.chain[0].serial_number

    @property
    def not_after(self) -> dt.datetime:
        return min(c.not_valid_after_utc for c in self.chain)

    @property
    def trust_domain(self) -> str:
        return self.spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


def svid_authority(svid: SvidUpdate) -> str:
    """The X509 authority that issued the SVID, as SPIRE names it (its subject key ID in
    hex): the leaf's authority key ID. "" when the leaf carries none."""
    try:
        aki = svid.chain[0].extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier).value.key_identifier
    except (x509.ExtensionNotFound, ValueError):
        return ""
    return aki.hex() if aki else ""


def etcd_credentials(svid: SvidUpdate) -> TlsCredentials:
    """The SVID as etcd's client certificate, its own trust domain's bundle as the roots
    etcd's certificate must chain to (registry/tls.py). ValueError names what is missing."""
    return credentials_from_svid(svid.private_key, svid.chain,
                                 svid.bundles.get(svid.trust_domain, ()))


def update_from_context(ctx: object) -> SvidUpdate:
    """An SvidUpdate from a py-spiffe X509Context (its default SVID and every bundle)."""
    svid = ctx.default_svid  # type: ignore[attr-defined]
    bundles = {
        str(b.trust_domain): tuple(b.x509_authorities)
        for b in ctx.x509_bundle_set.bundles  # type: ignore[attr-defined]
    }
    return SvidUpdate(str(svid.spiffe_id), svid.private_key, tuple(svid.cert_chain), bundles)


@dataclass(frozen=True)
class Refusal:
    """An SVID the Workload API served and this node refused: why, and when."""

    reason: str
    message: str
    at: dt.datetime

    def to_json(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "at": self.at.isoformat()}


REFUSALS = frozenset({"unexpected_spiffe_id", "invalid_svid"})


@dataclass
class SvidSourceState:
    """What status reports about the Workload API connection."""

    connected: bool = False
    waiting_for_socket: bool = False
    last_error: str | None = None
    last_refusal: Refusal | None = None
    reconnects: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    current: SvidUpdate | None = None


class SvidSource:
    """Async iterator of SVID updates from one Workload API socket, reconnecting forever."""

    def __init__(self, socket_path: str, expected_spiffe_id: str | None = None, *,
                 poll_interval: float = 1.0, max_backoff: float = 10.0) -> None:
        self.socket_path = socket_path.removeprefix("unix:")
        self.expected_spiffe_id = expected_spiffe_id
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.state = SvidSourceState()

    async def updates(self) -> AsyncIterator[SvidUpdate]:
        backoff = self.poll_interval
        while True:
            await self._wait_for_socket()
            async for update in self._follow_one_stream():
                backoff = self.poll_interval
                yield update
            self.state.connected = False
            self.state.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _wait_for_socket(self) -> None:
        said = False
        while not os.path.exists(self.socket_path):
            if not said:
                log.warning("waiting for the SPIFFE Workload API socket %s", self.socket_path)
                said = True
            self.state.waiting_for_socket = True
            await asyncio.sleep(self.poll_interval)
        if said:
            log.info("SPIFFE Workload API socket %s appeared", self.socket_path)
        self.state.waiting_for_socket = False

    def _fail(self, reason: str, detail: str) -> None:
        detail = excerpt(detail)
        self.state.errors[reason] += 1
        self.state.last_error = f"{reason}: {detail}"
        if reason in REFUSALS:
            self.state.last_refusal = Refusal(reason, detail, dt.datetime.now(dt.UTC))
        log.warning("workload API %s: %s (%s)", self.socket_path, reason, detail)

    def refuse(self, update: SvidUpdate, expected: str) -> None:
        """`update` names another identity than `expected` (this node's): counted, kept
        as the last refusal, and not used (the caller keeps its last good SVID)."""
        self._fail("unexpected_spiffe_id",
                   f"served {excerpt(update.spiffe_id)}, but this node is {expected}")

    def refuse_for_etcd(self, update: SvidUpdate, problem: str) -> None:
        """`update` cannot be etcd's client certificate (no bundle for its own trust
        domain): counted, kept as the last refusal, and not used."""
        self._fail("invalid_svid", f"{excerpt(update.spiffe_id)} as etcd client "
                                   f"certificate: {problem}")

    async def _follow_one_stream(self) -> AsyncIterator[SvidUpdate]:
        """Yield updates of one py-spiffe watcher until it reports an error."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        try:
            client = WorkloadApiClient(socket_path=f"unix:{self.socket_path}")
        except Exception as exc:  # the socket vanished between the check and here
            self._fail("connect_failed", str(exc))
            return
        handler = client.stream_x509_contexts(
            on_success=lambda ctx: loop.call_soon_threadsafe(queue.put_nowait, ("ok", ctx)),
            on_error=lambda err: loop.call_soon_threadsafe(queue.put_nowait, ("err", err)),
            retry_connect=True,
            retry_policy=RetryPolicy(max_retries=3, base_backoff_in_seconds=0.2, max_backoff=2),
        )
        try:
            while True:
                kind, item = await queue.get()
                if kind == "err":
                    self._fail("stream_error", str(item))
                    return
                try:
                    update = update_from_context(item)
                except Exception as exc:
                    self._fail("invalid_svid", str(exc))
                    return
                if self.expected_spiffe_id and update.spiffe_id != self.expected_spiffe_id:
                    self.refuse(update, self.expected_spiffe_id)
                    continue
                self.state.connected = True
                self.state.current = update
                log.debug("served SVID %s serial %x valid until %s",
                          excerpt(update.spiffe_id), update.serial, update.not_after.isoformat())
                yield update
        finally:
            handler.cancel()
            await asyncio.to_thread(client.close)
