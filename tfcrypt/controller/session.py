"""One controller command's connection to the world: its SVID and etcd.

Rules:
- The SVID comes from the controller's own Workload API socket, fetched once per command;
  it must be a controller identity, else nothing is written (an agent's socket cannot be
  used to write policies by mistake: readers would reject the values anyway).
- Every read goes through the same verified view the agents use, so `list`, `explain`
  and `plan` show what agents believe, and name what they refuse.
- Every write is first read back through that same view (`VerifiedView.check`: the
  readers' size bound, envelope checks and parser, no second copy of any limit): a value
  the agents would refuse, or read as something other than what was meant, is not
  written, and the command fails naming why. Otherwise the operator would see "created"
  while every agent ignores the value and the traffic it selects stays in plaintext.
- Epochs of controller-written keys are milliseconds since the epoch, at least one above
  the value they replace: several writes per second keep increasing, and a key deleted
  and written again still lands above what readers remember.
- With envelope version 2 the SVID's chain is stored once at `chains/<sha256>` before
  the first value naming it, and again whenever a read of etcd finds it missing (a
  deleted chain leaves new readers refusing every value that names it:
  `unknown_chain`). Chains of earlier SVIDs stay: values signed under them name them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from spiffe import WorkloadApiClient

from tfcrypt.errors import ConfigError, TfcryptError
from tfcrypt.identity import Authorizer, TrustBundles, sign_envelope
from tfcrypt.identity.envelope import CHAINS, ENVELOPE_VERSION_REF, chain_value
from tfcrypt.identity.svid_source import (
    SvidUpdate,
    etcd_credentials,
    svid_authority,
    update_from_context,
)
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.families import families
from tfcrypt.registry import Registry
from tfcrypt.registry.errors import RegistryError

FETCH_TIMEOUT = 10.0


def fetch_svid(socket_path: str) -> SvidUpdate:
    """The SVID and bundles served on `socket_path`, once; a clear error if unavailable."""
    try:
        with WorkloadApiClient(socket_path=f"unix:{socket_path.removeprefix('unix:')}") as c:
            return update_from_context(c.fetch_x509_context(timeout=FETCH_TIMEOUT))
    except Exception as exc:
        raise TfcryptError(f"--spiffe-socket {socket_path}: cannot fetch an X509-SVID "
                           f"({exc})") from None


class ControllerSession:
    def __init__(self, registry: Registry, svid: SvidUpdate,
                 controller_ids: tuple[str, ...], now: Callable[[], float] = time.time,
                 envelope_version: int = 1) -> None:
        self.registry = registry
        self.svid = svid
        self._now = now
        self.envelope_version = envelope_version
        self._chain_stored: str | None = None  # the chain hash known to be in etcd
        self.authorizer = Authorizer(trust_domain=svid.trust_domain,
                                     controller_ids=controller_ids)
        self.bundles = TrustBundles(svid.bundles)

    def require_controller(self) -> None:
        if not self.authorizer.is_controller(self.svid.spiffe_id):
            raise ConfigError(f"--spiffe-socket: serves {self.svid.spiffe_id}, which is not "
                              "a controller identity: refusing to write")

    def svid_authority(self) -> str:
        """The X509 authority (subject key ID, hex) that issued our SVID."""
        return svid_authority(self.svid)

    def _empty_view(self) -> tuple[VerifiedView, dt.datetime]:
        view = VerifiedView(families())
        now = dt.datetime.fromtimestamp(self._now(), dt.UTC)
        view.set_trust(self.bundles, self.authorizer, now)
        return view, now

    @property
    def by_ref(self) -> bool:
        return self.envelope_version == ENVELOPE_VERSION_REF

    async def read_view(self) -> VerifiedView:
        listed = await self.registry.get_all("")
        view, now = self._empty_view()
        view.replace_all({k: i.value for k, i in listed.items.items()}, now)
        self.note_chains(view)
        return view

    def note_chains(self, view: VerifiedView) -> None:
        """After a full read of etcd: is our chain there? (else the next write stores it)"""
        if self.by_ref and CHAINS + chain_value(self.svid.chain)[0] not in view.raw:
            self._chain_stored = None

    async def repair_chains(self, view: VerifiedView,
                            fence: Callable[[], None] | None = None) -> list[str]:
        """Put back the chains believed values name that etcd lost (deleted by hand or by
        a bad restore): readers that start now would refuse every value naming them."""
        missing = view.chains_missing()
        for ref, certs in missing.items():
            again, raw = chain_value(certs)
            assert again == ref  # canonical: the same certificates give the same bytes
            if fence is not None:
                fence()
            await self.registry.put(CHAINS + ref, raw)
        return sorted(missing)

    async def _store_chain(self) -> None:
        ref, raw = chain_value(self.svid.chain)
        if self._chain_stored != ref:
            await self.registry.put(CHAINS + ref, raw)
            self._chain_stored = ref

    def readers_refusal(self, key: str, value: bytes, expected: object) -> str | None:
        """Why an agent would not believe `value` at `key` as `expected`, or None."""
        view, now = self._empty_view()
        items = {key: value}
        if self.by_ref:  # stored before the value (put_signed)
            ref, raw = chain_value(self.svid.chain)
            items[CHAINS + ref] = raw
        prepared = view.check(items, now)
        checked = prepared.results.get(key) if prepared is not None else None
        if checked is None:
            return "no agent reads this key"
        if checked.rejected is not None:
            return str(checked.rejected)
        if checked.record != expected:
            return "agents would read it as something else than was meant"
        return None

    def next_epoch(self, view: VerifiedView, key: str) -> int:
        return max((view.epoch(key) or 0) + 1, int(self._now() * 1000))

    async def put_signed(self, key: str, payload: dict[str, Any], expected: object,
                         fence: Callable[[], None] | None = None) -> bytes:
        """Sign `payload` (which names `key`) with the controller SVID and store it, if
        the agents would believe it and read it as `expected`; else ConfigError.
        `fence` runs last before the write (it raises to stop a deposed leader).
        Returns the value written: verified here already, a caller need not again."""
        self.require_controller()
        if payload.get("key") != key:
            raise ValueError(f"payload for {key} names {payload.get('key')!r}")
        value = sign_envelope(payload, self.svid.private_key, self.svid.chain,
                              by_ref=self.by_ref)
        if (refusal := self.readers_refusal(key, value, expected)) is not None:
            raise ConfigError(f"{key}: not written, every agent would refuse it: {refusal}")
        if fence is not None:
            fence()
        if self.by_ref:
            await self._store_chain()
        await self.registry.put(key, value)
        return value

    async def delete(self, key: str, fence: Callable[[], None] | None = None) -> bool:
        self.require_controller()
        if fence is not None:
            fence()
        return await self.registry.delete(key)


@asynccontextmanager
async def session(endpoints: tuple[str, ...], prefix: str, spiffe_socket: str,
                  controller_ids: tuple[str, ...], *, tls: bool = False,
                  server_name: str | None = None,
                  envelope_version: int = 1) -> AsyncIterator[ControllerSession]:
    """A session signing with the controller's SVID; with `tls`, the same SVID is the
    client certificate etcd checks (docs/registry.md)."""
    svid = await asyncio.to_thread(fetch_svid, spiffe_socket)
    registry = Registry(endpoints, prefix=prefix, request_timeout=5.0, tls=tls,
                        server_name=server_name)
    if tls:
        try:
            registry.set_credentials(etcd_credentials(svid))
        except ValueError as exc:
            raise ConfigError(f"--etcd-tls: {spiffe_socket}: {exc}") from None
    try:
        yield ControllerSession(registry, svid, controller_ids,
                                envelope_version=envelope_version)
    except RegistryError as exc:
        raise TfcryptError(f"--etcd {','.join(endpoints)}: {exc}") from None
    finally:
        await registry.aclose()
