"""The WireGuard device: UAPI text, the reconciler against FakeBackend, real wireguard-go.

The lab tests run wireguard-go inside network namespaces this file creates, with
interface and namespace names carrying a per-run random suffix, and check the result
with the real `wg` tool run in that namespace.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from netns_lab.agents import wireguard_go
from tfcrypt.wireguard import (
    DesiredDevice,
    DeviceOrigin,
    DeviceState,
    FakeBackend,
    KernelModuleMissing,
    PeerConfig,
    PeerState,
    UapiError,
    WireGuardManager,
    mtu_for_underlay,
    public_key_of,
)
from tfcrypt.wireguard.errors import DeviceUnavailable
from tfcrypt.wireguard.kernel import KernelBackend
from tfcrypt.wireguard.keys import generate_private_key
from tfcrypt.wireguard.model import encode_key, normalise_cidrs
from tfcrypt.wireguard.uapi import parse_get, peer_remove, peer_upsert, split_errno
from tfcrypt.wireguard.userspace import UserspaceBackend


def new_key() -> tuple[str, str]:
    """(private b64, public b64)."""
    raw = generate_private_key()
    return encode_key(raw), public_key_of(raw)


NODE_PRIVATE, NODE_PUBLIC = new_key()
_, PEER_A = new_key()
_, PEER_B = new_key()
_, PEER_C = new_key()


def desired(**peers: PeerConfig) -> DesiredDevice:
    return DesiredDevice(NODE_PRIVATE, 51820, 1420, {p.public_key: p for p in peers.values()})


def two_peers() -> DesiredDevice:
    return desired(
        a=PeerConfig(PEER_A, "192.0.2.1:51820", frozenset({"10.1.0.0/24"}), 25),
        b=PeerConfig(PEER_B, None, frozenset({"10.2.0.5/32", "fd00:2::5/128"})),
    )


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# --- values and UAPI text ---------------------------------------------------------------

def test_peer_config_is_canonical() -> None:
    peer = PeerConfig(PEER_A, "[fd00:0::1]:51820", frozenset({"10.1.0.7/24", "fd00::1/64"}))
    assert peer.endpoint == "[fd00::1]:51820"
    assert peer.allowed_ips == {"10.1.0.0/24", "fd00::/64"}
    assert peer == PeerConfig(PEER_A, "[fd00::1]:51820", frozenset({"fd00::/64", "10.1.0.0/24"}))
    with pytest.raises(ValueError):
        PeerConfig(PEER_A, "node-b.example:51820")
    with pytest.raises(ValueError):
        PeerConfig("not a key")


def test_desired_device_repr_hides_private_key() -> None:
    assert NODE_PRIVATE not in repr(two_peers())


def test_mtu_rule_is_underlay_minus_80() -> None:
    assert mtu_for_underlay(1500) == 1420
    assert mtu_for_underlay(9000) == 8920


def test_parse_get_answer_of_wireguard_go() -> None:
    private = generate_private_key()
    peer_hex = os.urandom(32)
    answer = (
        f"private_key={private.hex()}\nlisten_port=51999\nfwmark=7\n"
        f"public_key={peer_hex.hex()}\npreshared_key={'0' * 64}\nprotocol_version=1\n"
        "endpoint=[fd00::1]:5000\nlast_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=500000000\ntx_bytes=10\nrx_bytes=20\n"
        "persistent_keepalive_interval=25\nallowed_ip=10.1.0.0/24\nallowed_ip=fd00::1/128\n"
        "errno=0\n\n"
    )
    state, key = parse_get(answer)
    assert key == private
    assert state.public_key == public_key_of(private)
    assert (state.listen_port, state.fwmark) == (51999, 7)
    (peer,) = state.peers.values()
    assert peer == PeerState(
        encode_key(peer_hex), "[fd00::1]:5000", frozenset({"10.1.0.0/24", "fd00::1/128"}),
        1700000000.5, 20, 10, 25,
    )
    assert private.hex() not in repr(state)


def test_empty_device_and_negative_errno() -> None:
    state, key = parse_get(f"private_key={'0' * 64}\nlisten_port=0\nerrno=0\n\n")
    assert key is None and state.public_key is None and state.peers == {}
    with pytest.raises(UapiError) as raised:
        split_errno("errno=-22\n\n", "set peer")
    assert raised.value.errno == 22


def test_peer_messages_replace_allowed_ips_in_one_set() -> None:
    message = peer_upsert(PeerConfig(PEER_A, None, frozenset({"10.1.0.0/24", "10.3.0.1/32"}), 0))
    lines = message.split("\n")
    assert lines[0] == "set=1" and lines[1].startswith("public_key=")
    assert lines.index("replace_allowed_ips=true") < lines.index("allowed_ip=10.1.0.0/24")
    assert not any(line.startswith("endpoint=") for line in lines)
    assert message.endswith("\n\n")
    assert peer_remove(PEER_A).split("\n")[2] == "remove=true"


# --- the reconciler against the fake backend --------------------------------------------

def test_apply_configures_key_port_then_peers_and_second_apply_does_nothing() -> None:
    fake = FakeBackend()
    manager = WireGuardManager(fake)
    manager.set_desired(two_peers())

    first = run(manager.apply())
    assert first.ok and first.origin is DeviceOrigin.STARTED and first.ops == 4
    assert fake.calls[:2] == ["device", "link"]
    assert sorted(fake.calls[2:]) == sorted([f"upsert {PEER_A}", f"upsert {PEER_B}"])
    state = run(manager.status())
    assert state.public_key == NODE_PUBLIC and state.listen_port == 51820
    assert state.mtu == 1420 and state.up
    assert {k: p.config() for k, p in state.peers.items()} == dict(two_peers().peers)

    second = run(manager.apply())
    assert second.ops == 0 and second.ok and second.origin is DeviceOrigin.PRESENT
    assert fake.ops == 4


def test_nothing_touched_before_desired_is_known() -> None:
    leftover = PeerState(PEER_C, None, frozenset({"10.9.0.0/24"}), None, 0, 0, 0)
    fake = FakeBackend(existing=DeviceState(None, 0, 0, {PEER_C: leftover}, 1420, True))
    report = run(WireGuardManager(fake).apply())
    assert report.ops == 0 and fake.ops == 0 and PEER_C in fake.peers


def test_drift_repaired() -> None:
    fake = FakeBackend()
    manager = WireGuardManager(fake)
    manager.set_desired(two_peers())
    run(manager.apply())

    fake.listen_port = 4000
    fake.peers[PEER_A] = replace(fake.peers[PEER_A], allowed_ips=frozenset({"10.66.0.0/16"}))
    fake.peers[PEER_C] = PeerState(PEER_C, None, frozenset({"10.9.0.0/24"}), None, 0, 0, 0)
    fake.mtu = 1500

    assert run(manager.apply()).ops == 0 and not manager.last_full
    report = run(manager.apply(full=True))
    assert manager.last_full
    assert report.ok and report.ops == 4
    assert sorted(fake.calls[-4:]) == sorted(["device", "link", f"upsert {PEER_A}",
                                              f"remove {PEER_C}"])
    assert fake.listen_port == 51820 and fake.mtu == 1420
    assert fake.peers[PEER_A].allowed_ips == {"10.1.0.0/24"} and PEER_C not in fake.peers
    assert run(manager.apply()).ops == 0


def test_one_failing_peer_stays_pending_without_blocking_others() -> None:
    fake = FakeBackend()
    fake.fail_peers.add(PEER_B)
    manager = WireGuardManager(fake)
    manager.set_desired(two_peers())

    report = run(manager.apply())
    assert [e.item for e in report.errors] == [f"peer {PEER_B}"]
    assert "errno 22" in report.errors[0].reason
    assert PEER_A in fake.peers and PEER_B not in fake.peers

    retry = run(manager.apply())
    assert retry.ops == 1 and not retry.ok

    fake.fail_peers.clear()
    healed = run(manager.apply())
    assert healed.ok and healed.ops == 1 and PEER_B in fake.peers
    assert run(manager.apply()).ops == 0


class BatchingBackend(FakeBackend):
    """A backend that takes several peers in one write, as wireguard-go's UAPI does; like
    a UAPI set, a batch stops at the first bad peer, leaving the earlier ones written."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    async def upsert_peers(self, peers: list[PeerConfig]) -> None:
        self.batches.append(len(peers))
        for peer in peers:
            await self.upsert_peer(peer)


def test_peers_go_in_batches_and_a_failed_batch_is_redone_one_by_one() -> None:
    fake = BatchingBackend()
    manager = WireGuardManager(fake)
    three = desired(a=PeerConfig(PEER_A, None, frozenset({"10.1.0.1/32"})),
                    b=PeerConfig(PEER_B, None, frozenset({"10.2.0.1/32"})),
                    c=PeerConfig(PEER_C, None, frozenset({"10.3.0.1/32"})))
    manager.set_desired(three)
    assert run(manager.apply()).ok and fake.batches == [3]
    assert set(fake.peers) == {PEER_A, PEER_B, PEER_C}

    fake2 = BatchingBackend()
    fake2.fail_peers.add(PEER_B)
    manager2 = WireGuardManager(fake2)
    manager2.set_desired(three)
    report = run(manager2.apply())
    assert fake2.batches == [3]  # tried as one, then one by one
    assert [e.item for e in report.errors] == [f"peer {PEER_B}"]
    assert set(fake2.peers) == {PEER_A, PEER_C}
    assert run(manager2.apply()).ops == 1  # only the failed peer is retried


def test_leftover_peers_from_a_previous_run_removed_wanted_ones_kept() -> None:
    wanted = two_peers()
    kept = {
        k: PeerState(p.public_key, p.endpoint, p.allowed_ips, 1700000000.0, 5, 6,
                     p.persistent_keepalive)
        for k, p in wanted.peers.items()
    }
    stale = PeerState(PEER_C, "192.0.2.9:51820", frozenset({"10.9.0.0/24"}), None, 0, 0, 0)
    previous = DeviceState(NODE_PUBLIC, 51820, 0, {**kept, PEER_C: stale}, 1420, True)
    fake = FakeBackend(existing=previous, existing_private_key=_raw(NODE_PRIVATE))
    manager = WireGuardManager(fake)
    manager.set_desired(wanted)

    report = run(manager.apply())
    assert report.origin is DeviceOrigin.ADOPTED
    assert report.ok and report.ops == 1 and fake.calls == [f"remove {PEER_C}"]
    assert set(fake.peers) == {PEER_A, PEER_B}
    assert fake.peers[PEER_A].last_handshake == 1700000000.0


def test_adopted_device_matching_desired_needs_no_operation() -> None:
    wanted = two_peers()
    peers = {
        k: PeerState(p.public_key, p.endpoint or "192.0.2.77:40000", p.allowed_ips, None, 0, 0,
                     p.persistent_keepalive)
        for k, p in wanted.peers.items()
    }
    fake = FakeBackend(
        existing=DeviceState(NODE_PUBLIC, 51820, 0, peers, 1420, True),
        existing_private_key=_raw(NODE_PRIVATE),
    )
    manager = WireGuardManager(fake)
    manager.set_desired(wanted)
    report = run(manager.apply())
    assert report.origin is DeviceOrigin.ADOPTED and report.ops == 0 and fake.ops == 0
    assert fake.peers[PEER_B].endpoint == "192.0.2.77:40000"


def test_vanished_device_restarted_and_fully_reapplied() -> None:
    fake = FakeBackend()
    manager = WireGuardManager(fake)
    manager.set_desired(two_peers())
    run(manager.apply())

    fake.vanish()
    assert run(manager.apply()).ops == 0 and not manager.last_full
    report = run(manager.apply(full=True))
    assert report.origin is DeviceOrigin.RESTARTED and report.ok and report.ops == 4
    assert fake.restarts == 1 and set(fake.peers) == {PEER_A, PEER_B}


class CountingBackend(FakeBackend):
    """FakeBackend that counts device reads (`get_state`) and probes (`ensure_device`)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.probes = 0

    async def get_state(self) -> DeviceState:
        self.reads += 1
        return await super().get_state()

    async def ensure_device(self) -> DeviceOrigin:
        self.probes += 1
        return await super().ensure_device()


def test_incremental_apply_writes_only_the_changed_peer_without_reading() -> None:
    fake = CountingBackend()
    manager = WireGuardManager(fake)
    manager.set_desired(two_peers())
    run(manager.apply())
    assert (fake.reads, fake.probes) == (1, 1)

    assert run(manager.apply()).ops == 0 and run(manager.apply(full=True)).ops == 0
    assert (fake.reads, fake.probes) == (2, 2)
    moved = replace(two_peers().peers[PEER_A], allowed_ips=frozenset({"10.1.0.0/24",
                                                                      "10.1.9.9/32"}))
    manager.set_desired(desired(a=moved, b=two_peers().peers[PEER_B]))
    report = run(manager.apply())

    assert report.ok and report.ops == 1 and fake.calls[-1] == f"upsert {PEER_A}"
    assert (fake.reads, fake.probes) == (2, 2) and not manager.last_full
    assert fake.peers[PEER_A].allowed_ips == {"10.1.0.0/24", "10.1.9.9/32"}
    assert run(manager.apply()).ops == 0 and run(manager.apply(full=True)).ops == 0


def test_failed_write_device_change_or_restart_makes_the_next_apply_read() -> None:
    fake = CountingBackend()
    manager = WireGuardManager(fake)
    manager.set_desired(two_peers())
    run(manager.apply())
    fake.vanish()
    manager.set_desired(desired(a=two_peers().peers[PEER_A]))

    failed = run(manager.apply())
    assert not failed.ok and not manager.last_full and fake.reads == 1
    healed = run(manager.apply())
    assert healed.ok and manager.last_full and healed.origin is DeviceOrigin.RESTARTED
    assert set(fake.peers) == {PEER_A} and fake.reads == 2

    manager.set_desired(replace(desired(a=two_peers().peers[PEER_A]), mtu=1380))
    assert run(manager.apply()).ok and manager.last_full and fake.mtu == 1380

    fake.vanish()
    assert run(fake.ensure_device()) is DeviceOrigin.RESTARTED
    reapplied = run(manager.apply())
    assert manager.last_full and reapplied.ops == 3 and set(fake.peers) == {PEER_A}
    assert run(manager.apply()).ops == 0 and not manager.last_full


def test_canonical_allowed_ips_are_kept_as_given() -> None:
    given = frozenset({"10.1.0.0/24", "fd00::/64"})
    assert normalise_cidrs(given) == given
    assert normalise_cidrs(given) is given
    assert PeerConfig(PEER_A, None, given).allowed_ips is given
    assert normalise_cidrs(["10.1.0.7/24", "10.1.0.0/24", "fd00:0::1/64"]) == given
    assert normalise_cidrs(frozenset({"10.1.0.7/24"})) == {"10.1.0.0/24"}
    with pytest.raises(ValueError):
        normalise_cidrs(frozenset({"10.1.0.300/32"}))


def test_allowed_ip_moving_between_peers_converges() -> None:
    fake = FakeBackend()
    manager = WireGuardManager(fake)
    manager.set_desired(desired(
        a=PeerConfig(PEER_A, None, frozenset({"10.1.0.5/32", "10.1.0.6/32"})),
        b=PeerConfig(PEER_B, None, frozenset({"10.2.0.5/32"})),
    ))
    run(manager.apply())
    manager.set_desired(desired(
        a=PeerConfig(PEER_A, None, frozenset({"10.1.0.6/32"})),
        b=PeerConfig(PEER_B, None, frozenset({"10.2.0.5/32", "10.1.0.5/32"})),
    ))
    assert run(manager.apply()).ops == 2
    assert fake.peers[PEER_A].allowed_ips == {"10.1.0.6/32"}
    assert fake.peers[PEER_B].allowed_ips == {"10.2.0.5/32", "10.1.0.5/32"}
    assert run(manager.apply()).ops == 0


def test_unavailable_device_is_reported_not_raised() -> None:
    fake = FakeBackend()
    fake.fail_device = True
    manager = WireGuardManager(fake)
    manager.set_desired(two_peers())
    report = run(manager.apply())
    assert report.ops == 0 and [e.item for e in report.errors] == ["device"]


@pytest.mark.skipif(Path("/sys/module/wireguard").exists(), reason="kernel module present")
def test_kernel_backend_reports_missing_module() -> None:
    backend = KernelBackend("tfk" + secrets.token_hex(3))
    with pytest.raises(KernelModuleMissing, match="kernel WireGuard module not available"):
        run(backend.ensure_device())


def _raw(key_b64: str) -> bytes:
    return base64.b64decode(key_b64)


# --- real wireguard-go in network namespaces ---------------------------------------------

class Lab:
    """Namespaces and wireguard-go devices of one test; removes each by exact name/PID."""

    def __init__(self, tmp: Path) -> None:
        self.run_id = secrets.token_hex(3)
        self.tmp = tmp
        self.namespaces: list[str] = []
        self.backends: list[UserspaceBackend] = []
        self.pids: set[int] = set()

    def netns(self, role: str) -> str:
        name = f"tfwt-{self.run_id}-{role}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.namespaces.append(name)
        self.ip(name, "link", "set", "lo", "up")
        return name

    def backend(self, netns: str, ifname: str | None = None,
                uapi_timeout: float = 5.0) -> UserspaceBackend:
        ifname = ifname or "tfw" + secrets.token_hex(3)
        backend = UserspaceBackend(ifname, netns=netns, log_path=self.tmp / f"{ifname}.log",
                                   uapi_timeout=uapi_timeout, binary=wireguard_go())
        self.backends.append(backend)
        return backend

    def track(self, backend: UserspaceBackend) -> None:
        if backend.pid is not None:
            self.pids.add(backend.pid)

    @staticmethod
    def ip(netns: str, *args: str) -> str:
        done = subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)
        return done.stdout.decode()

    @staticmethod
    def in_ns(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", netns, *args], check=check, capture_output=True, text=True
        )

    def cleanup(self) -> None:
        for backend in self.backends:
            self.track(backend)
            with contextlib.suppress(Exception):
                asyncio.run(backend.destroy())
        names = {backend.ifname for backend in self.backends}
        for pid in self.pids:
            if _cmdline(pid) & names:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        for backend in self.backends:
            backend.socket_path.unlink(missing_ok=True)
        for name in self.namespaces:
            subprocess.run(["ip", "netns", "del", name], check=False)


def _cmdline(pid: int) -> set[str]:
    try:
        return set(Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"))
    except OSError:
        return set()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    current = Lab(tmp_path)
    try:
        yield current
    finally:
        current.cleanup()


def wg_dump(lab: Lab, netns: str, ifname: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = lab.in_ns(netns, "wg", "show", ifname, "dump").stdout.strip().split("\n")
    device = lines[0].split("\t")
    peers = {fields[0]: fields for fields in (line.split("\t") for line in lines[1:])}
    return device, peers


def assert_dump_is(lab: Lab, netns: str, ifname: str, want: DesiredDevice) -> None:
    device, peers = wg_dump(lab, netns, ifname)
    assert device[:3] == [want.private_key_b64, public_key_of(_raw(want.private_key_b64)),
                          str(want.listen_port)]
    assert set(peers) == set(want.peers)
    for key, peer in want.peers.items():
        _, _, endpoint, allowed, _, _, _, keepalive = peers[key]
        assert endpoint == (peer.endpoint or "(none)")
        assert frozenset(allowed.split(",")) == peer.allowed_ips
        assert keepalive == (str(peer.persistent_keepalive) if peer.persistent_keepalive
                             else "off")


@pytest.mark.lab
def test_wireguard_go_configured_restarted_and_adopted(lab: Lab) -> None:
    ns = lab.netns("a")
    backend = lab.backend(ns)
    want = desired(
        a=PeerConfig(PEER_A, "10.250.0.2:51820", frozenset({"10.1.0.0/24"}), 25),
        b=PeerConfig(PEER_B, None, frozenset({"10.2.0.5/32", "fd00:2::5/128"})),
    )
    want = replace(want, mtu=1400)

    async def configure() -> None:
        manager = WireGuardManager(backend)
        manager.set_desired(want)
        first = await manager.apply()
        lab.track(backend)
        assert first.ok, first.errors
        assert first.origin is DeviceOrigin.STARTED and first.ops == 4
        again = await manager.apply()
        assert again.ops == 0 and again.ok

    run(configure())
    assert_dump_is(lab, ns, backend.ifname, want)
    link = lab.ip(ns, "link", "show", backend.ifname)
    assert "mtu 1400" in link and ",UP" in link

    killed = backend.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)

    async def recover() -> None:
        manager = WireGuardManager(backend)
        manager.set_desired(want)
        report = await manager.apply()
        lab.track(backend)
        assert report.origin is DeviceOrigin.RESTARTED and report.ok and report.ops == 4
        assert backend.restarts == 1 and backend.restarted.is_set()
        assert backend.pid not in (None, killed)

    run(recover())
    assert_dump_is(lab, ns, backend.ifname, want)

    adopter = lab.backend(ns, backend.ifname)

    async def adopt() -> None:
        manager = WireGuardManager(adopter)
        manager.set_desired(want)
        report = await manager.apply()
        assert report.origin is DeviceOrigin.ADOPTED and report.ops == 0 and report.ok
        assert adopter.pid == backend.pid and adopter.restarts == 0

    run(adopt())
    assert_dump_is(lab, ns, backend.ifname, want)


AGENT = """
import asyncio, json, sys
from tfcrypt.wireguard import DesiredDevice, PeerConfig, WireGuardManager
from tfcrypt.wireguard.userspace import UserspaceBackend

async def main():
    spec = json.loads(sys.argv[1])
    backend = UserspaceBackend(spec["ifname"], netns=spec["netns"], log_path=spec["log"],
                               binary=spec["binary"])
    manager = WireGuardManager(backend)
    peers = {k: PeerConfig(k, None, frozenset(v)) for k, v in spec["peers"].items()}
    manager.set_desired(DesiredDevice(spec["key"], spec["port"], 1420, peers))
    report = await manager.apply()
    await backend.close()
    print(json.dumps({"pid": backend.pid, "ok": report.ok}))

asyncio.run(main())
"""


@pytest.mark.lab
def test_device_survives_the_agent_process_and_is_adopted(lab: Lab) -> None:
    import json
    import sys

    ns = lab.netns("a")
    backend = lab.backend(ns)
    want = desired(a=PeerConfig(PEER_A, None, frozenset({"10.1.0.0/24"})))
    spec = {
        "ifname": backend.ifname, "netns": ns, "log": str(lab.tmp / "agent.log"),
        "binary": wireguard_go(),
        "key": want.private_key_b64, "port": want.listen_port,
        "peers": {k: sorted(p.allowed_ips) for k, p in want.peers.items()},
    }
    agent = subprocess.run([sys.executable, "-c", AGENT, json.dumps(spec)],
                           capture_output=True, text=True, timeout=60)
    assert agent.returncode == 0, agent.stderr
    first = json.loads(agent.stdout)
    lab.pids.add(first["pid"])
    assert first["ok"]

    assert backend.ifname in _cmdline(first["pid"])
    manager = WireGuardManager(backend)
    manager.set_desired(want)
    report = run(manager.apply())
    assert report.origin is DeviceOrigin.ADOPTED and report.ops == 0
    assert backend.pid == first["pid"]
    assert_dump_is(lab, ns, backend.ifname, want)


@pytest.mark.lab
def test_device_of_another_namespace_is_not_adopted(lab: Lab) -> None:
    ns_a, ns_b = lab.netns("a"), lab.netns("b")
    owner = lab.backend(ns_a)
    manager = WireGuardManager(owner)
    manager.set_desired(two_peers())
    assert run(manager.apply()).ok
    lab.track(owner)

    intruder = WireGuardManager(lab.backend(ns_b, owner.ifname))
    intruder.set_desired(desired())
    report = run(intruder.apply())
    assert report.ops == 0 and "another network namespace" in report.errors[0].reason
    assert_dump_is(lab, ns_a, owner.ifname, two_peers())


def two_nodes(lab: Lab, keepalive: int = 0
              ) -> tuple[tuple[str, UserspaceBackend, str], tuple[str, UserspaceBackend, str]]:
    """Two namespaces over a veth, each with a device that has the other as its peer;
    returns (netns, backend, public key) per node. No packet is sent yet."""
    ns_a, ns_b = lab.netns("a"), lab.netns("b")
    lab.ip(ns_a, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", ns_b)
    for ns, underlay in ((ns_a, "10.250.7.1/24"), (ns_b, "10.250.7.2/24")):
        lab.ip(ns, "addr", "add", underlay, "dev", "ul0")
        lab.ip(ns, "link", "set", "ul0", "up")
    priv_a, pub_a = new_key()
    priv_b, pub_b = new_key()
    node_a = DesiredDevice(priv_a, 51820, 1420, {
        pub_b: PeerConfig(pub_b, "10.250.7.2:51821", frozenset({"10.77.0.2/32"}), keepalive),
    })
    node_b = DesiredDevice(priv_b, 51821, 1420, {
        pub_a: PeerConfig(pub_a, "10.250.7.1:51820", frozenset({"10.77.0.1/32"}), keepalive),
    })
    backend_a, backend_b = lab.backend(ns_a), lab.backend(ns_b)

    async def configure() -> None:
        for backend, want in ((backend_a, node_a), (backend_b, node_b)):
            manager = WireGuardManager(backend)
            manager.set_desired(want)
            report = await manager.apply()
            lab.track(backend)
            assert report.ok, report.errors

    run(configure())
    return (ns_a, backend_a, pub_a), (ns_b, backend_b, pub_b)


def handshake_of(lab: Lab, netns: str, backend: UserspaceBackend) -> int:
    line = lab.in_ns(netns, "wg", "show", backend.ifname, "latest-handshakes").stdout.strip()
    return int(line.split("\t")[1])


@pytest.mark.lab
def test_two_nodes_handshake_over_veth(lab: Lab) -> None:
    (ns_a, backend_a, pub_a), (ns_b, backend_b, _) = two_nodes(lab)
    for ns, backend, local, remote in (
        (ns_a, backend_a, "10.77.0.1/32", "10.77.0.2/32"),
        (ns_b, backend_b, "10.77.0.2/32", "10.77.0.1/32"),
    ):
        lab.ip(ns, "addr", "add", local, "dev", backend.ifname)
        lab.ip(ns, "route", "add", remote, "dev", backend.ifname)

    ping = lab.in_ns(ns_a, "ping", "-c", "2", "-i", "0.2", "-w", "10", "10.77.0.2", check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr

    assert handshake_of(lab, ns_a, backend_a) > 0
    state = run(WireGuardManager(backend_b).status())
    assert state.peers[pub_a].last_handshake is not None and state.peers[pub_a].rx_bytes > 0


@pytest.mark.lab
@pytest.mark.parametrize("keepalive", [0, 25])
def test_a_peer_with_keepalive_is_greeted_at_once_without_traffic(lab: Lab,
                                                                   keepalive: int) -> None:
    """What the agent's `persistent_keepalive` is for: with it, configuring a peer starts a
    handshake at once; without it, nothing happens until a packet waits (and a first
    attempt that reached a node not yet knowing us is retried only after 5 s)."""
    (ns_a, backend_a, _), (ns_b, backend_b, _) = two_nodes(lab, keepalive)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not handshake_of(lab, ns_a, backend_a):
        time.sleep(0.1)
    if keepalive:
        assert handshake_of(lab, ns_a, backend_a) > 0 and handshake_of(lab, ns_b, backend_b) > 0
    else:
        assert handshake_of(lab, ns_a, backend_a) == 0


@pytest.mark.lab
def test_supervision_restarts_a_killed_device(lab: Lab) -> None:
    ns = lab.netns("a")
    backend = lab.backend(ns)

    async def scenario() -> None:
        await backend.ensure_device()
        lab.track(backend)
        killed = backend.pid
        assert killed is not None
        async with asyncio.TaskGroup() as tasks:
            supervisor = tasks.create_task(backend.supervise(interval=0.1))
            os.kill(killed, signal.SIGKILL)
            await asyncio.wait_for(backend.restarted.wait(), timeout=30)
            supervisor.cancel()
        lab.track(backend)
        assert backend.restarts == 1 and backend.pid != killed

    run(scenario())
    assert backend.ifname in lab.ip(ns, "link", "show", backend.ifname)


@pytest.mark.lab
def test_a_stalled_device_is_reported_not_replaced(lab: Lab) -> None:
    """A wireguard-go that lives but does not answer (SIGSTOP stands in for a busy one)
    is not a vanished device: no second wireguard-go, no restart, same pid after."""
    ns = lab.netns("a")
    backend = lab.backend(ns, uapi_timeout=0.5)

    async def scenario() -> None:
        await backend.ensure_device()
        lab.track(backend)
        pid = backend.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(DeviceUnavailable, match="did not answer"):
                await backend.ensure_device()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await backend.ensure_device() is DeviceOrigin.PRESENT
        assert backend.pid == pid and backend.restarts == 0

    run(scenario())
