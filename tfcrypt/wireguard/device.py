"""The WireGuard device reconciler: desired device in memory, actual read from the backend.

Rules:
- `set_desired()` only records; `apply()` does the I/O. Before `set_desired()` has been
  called, `apply()` changes nothing: no sweep of peers before inputs are in sync.
- Full and incremental applies. `apply(full=True)` reads actual state from the backend
  (UAPI get) and diffs everything, so a restarted daemon, a drifted peer or a previous
  run's leftovers are seen and repaired. `apply()` trusts what the last apply read and wrote
  and only writes the peers whose desired `PeerConfig` differs from it: O(changed peers),
  no probe, no read (the backend's `ensure_device` of wireguard-go is itself a UAPI get of
  every peer). It is full anyway when memory cannot be trusted: the first apply, after any
  failed write or probe, after the backend restarted the device, and when the device's own
  settings (key, port, MTU) are to change. An incremental apply reports the device as
  PRESENT without probing: a vanished device shows up as write errors, and the next apply
  is full (probe, restart, re-apply everything).
- Decide, then act: the whole plan is computed with no `await`, then executed under
  `asyncio.shield` so a cancelled apply does not stop between writes.
- Order when adding: private key and listen port, then link MTU/up, then peers; removals
  last. Each peer is one backend write that replaces its allowed IPs atomically.
- Peers go in batches of `PEER_BATCH` when the backend can (`upsert_peers`: wireguard-go
  takes many peers in one UAPI set; 999 one-peer round trips cost ~1 s of a first apply);
  a batch that fails is redone one peer at a time, so one failed write is reported and
  stays pending (the next apply retries it) while the others go ahead. Peers on the
  device that are not desired are removed: the interface name is ours, so every peer on
  it is ours.
- A desired peer without an endpoint accepts whatever endpoint the device learned.
  A desired listen port 0 means "any": the port the device picked is kept.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace

from tfcrypt.dataplane.delta import DeltaTracker, Plan
from tfcrypt.wireguard.backend import DeviceOrigin, WireGuardBackend
from tfcrypt.wireguard.errors import WireGuardError
from tfcrypt.wireguard.keys import public_key_of
from tfcrypt.wireguard.model import DesiredDevice, DeviceState, PeerConfig, decode_key

log = logging.getLogger(__name__)

PEER_BATCH = 100


@dataclass(frozen=True)
class ApplyError:
    """One item that could not be applied: `item` is "device", "link" or "peer <key>"."""

    item: str
    reason: str


@dataclass(frozen=True)
class ApplyReport:
    ops: int
    errors: list[ApplyError] = field(default_factory=list)
    origin: DeviceOrigin | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class _Plan:
    private_key: bytes | None
    listen_port: int | None
    mtu: int | None
    set_up: bool
    peers: Plan[str, PeerConfig]


class WireGuardManager:
    """Reconciles one WireGuard device through a backend.

    Pitfalls:
    - WireGuard moves an allowed IP to the peer that was given it last. The core never
      gives one IP to two peers, so writes in any order converge; a drift of that kind
      (someone else's write) is only seen by a full apply.
    - A failed UAPI write may have applied part of its lines: after any error the next
      apply reads the device again.
    """

    def __init__(self, backend: WireGuardBackend) -> None:
        self.backend = backend
        self._desired: DesiredDevice | None = None
        self._peers: DeltaTracker[str, PeerConfig] = DeltaTracker()
        self._applied_device: tuple[str, int, int] | None = None
        self._restarts = _restarts(backend)
        self.last_full = False

    def __repr__(self) -> str:
        return f"WireGuardManager({self.backend.ifname!r})"

    @property
    def desired(self) -> DesiredDevice | None:
        return self._desired

    def set_desired(self, desired: DesiredDevice) -> None:
        self._desired = desired
        self._peers.set_desired(desired.peers)

    async def status(self) -> DeviceState:
        return await self.backend.get_state()

    async def apply(self, full: bool = False) -> ApplyReport:
        """Bring the device to the desired state; `full=True` probes and reads the device
        first and repairs drift (periodic resync, monitor events, device restarts). See the
        module rules for when an apply is full anyway."""
        desired = self._desired
        if desired is None:
            return ApplyReport(0)
        device = (desired.private_key_b64, desired.listen_port, desired.mtu)
        trusted = self._applied_device == device and self._restarts == _restarts(self.backend)
        self.last_full = full or not trusted
        if not self.last_full:
            ops, errors = await asyncio.shield(self._execute(
                _Plan(None, None, None, False, self._peers.plan())))
            if errors:
                self._applied_device = None
            return ApplyReport(ops, errors, DeviceOrigin.PRESENT)
        self._applied_device = None
        try:
            origin = await self.backend.ensure_device()
            actual = await self.backend.get_state()
        except WireGuardError as exc:
            log.warning("wireguard %s unavailable: %s", self.backend.ifname, exc)
            return ApplyReport(0, [ApplyError("device", str(exc))])
        if origin is DeviceOrigin.RESTARTED:
            log.warning("wireguard %s was gone and is restarted; re-applying", self.backend.ifname)
        self._restarts = _restarts(self.backend)
        ops, errors = await asyncio.shield(self._execute(self._plan(desired, actual)))
        if not errors:
            self._applied_device = device
        return ApplyReport(ops, errors, origin)

    def _plan(self, desired: DesiredDevice, actual: DeviceState) -> _Plan:
        private_key = decode_key(desired.private_key_b64)
        want_key = private_key if actual.public_key != public_key_of(private_key) else None
        want_port = None
        if desired.listen_port and desired.listen_port != actual.listen_port:
            want_port = desired.listen_port
        want_mtu = desired.mtu if actual.mtu != desired.mtu else None
        self._peers.load_actual(
            (key, _as_desired(peer.config(), desired.peers.get(key)))
            for key, peer in actual.peers.items()
        )
        return _Plan(
            private_key=want_key,
            listen_port=want_port,
            mtu=want_mtu,
            set_up=want_mtu is not None or actual.up is False,
            peers=self._peers.plan(),
        )

    async def _execute(self, plan: _Plan) -> tuple[int, list[ApplyError]]:
        ops = 0
        errors: list[ApplyError] = []
        backend = self.backend
        if plan.private_key is not None or plan.listen_port is not None:
            ops += 1
            try:
                await backend.configure_device(plan.private_key, plan.listen_port)
            except WireGuardError as exc:
                errors.append(ApplyError("device", str(exc)))
        if plan.set_up:
            ops += 1
            try:
                await backend.set_link(plan.mtu, up=True)
            except (WireGuardError, OSError) as exc:
                errors.append(ApplyError("link", str(exc)))
        upserts = list(plan.peers.upserts.items())
        batch = getattr(backend, "upsert_peers", None)
        for start in range(0, len(upserts), PEER_BATCH):
            chunk = upserts[start:start + PEER_BATCH]
            ops += len(chunk)
            if batch is not None and len(chunk) > 1:
                try:
                    await batch([peer for _, peer in chunk])
                except WireGuardError as exc:
                    log.info("wireguard %s: a batch of %d peers failed (%s); one by one",
                             backend.ifname, len(chunk), exc)
                else:
                    self._peers.actual.update(chunk)
                    continue
            for key, peer in chunk:  # one by one: a bad peer fails alone
                try:
                    await backend.upsert_peer(peer)
                except WireGuardError as exc:
                    errors.append(ApplyError(f"peer {key}", str(exc)))
                else:
                    self._peers.actual[key] = peer  # what was written, even if desired moved
        for key in sorted(plan.peers.deletions):
            ops += 1
            try:
                await backend.remove_peer(key)
            except WireGuardError as exc:
                errors.append(ApplyError(f"peer {key}", str(exc)))
            else:
                self._peers.applied_delete(key)
        for error in errors:
            log.warning("wireguard %s: %s failed: %s", backend.ifname, error.item, error.reason)
        return ops, errors


def _restarts(backend: WireGuardBackend) -> int | None:
    """How often the backend restarted a vanished device (its supervisor may do so between
    two applies, and a restarted device has lost every peer); None if it does not say."""
    count = getattr(backend, "restarts", None)
    return count if isinstance(count, int) else None


def _as_desired(actual: PeerConfig, desired: PeerConfig | None) -> PeerConfig:
    """Actual peer as comparable to desired: a learned endpoint is fine if none is wanted."""
    if desired is not None and desired.endpoint is None:
        return replace(actual, endpoint=None)
    return actual
