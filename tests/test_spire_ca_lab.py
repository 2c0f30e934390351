"""SPIRE CA rotation and revocation under traffic (issue #15, item 4), on real SPIRE.

`spire-server localauthority x509 prepare / activate / taint / revoke` (the lab's CA is
self-signed, where these apply), with a selected flow running and tcpdump on the
underlay. What a user would notice:
- following the procedure in docs/operations.md ("Rotating SPIRE's CA"), no selected
  ping is lost and none crosses in clear; every node's status shows the new authority in
  its bundle, its SVID and every record signed by it before the old one is revoked; a
  record replayed under the revoked root afterwards is refused and counted;
- a node that missed the rotation (its agent frozen) while the operator revoked anyway:
  its peers refuse its record at once and drop its selected traffic (fail-closed, never
  plaintext); once it runs again it re-signs under the new CA and traffic resumes.
The tests run in order on one lab (the second rotates again from where the first left).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import running_lab
from labtools import (
    PREFIX,
    Pinger,
    agent_status,
    diagnostics,
    etcdctl,
    wait_for,
    wg_peers,
    workload_ip,
)

from netns_lab import Lab, agents, inventory, spire
from netns_lab.wire import capture, count_packets, ping

pytestmark = pytest.mark.lab

NODES = ("n1", "n2")
# rotations here are forced by `taint`, not waited for; a long enough TTL keeps a frozen
# agent's SVID valid while the second test revokes (its refusal must be the revocation's)
SVID_TTL = 120
ENCRYPT_ALL = Path(__file__).parent.parent / "examples" / "encrypt-all.yaml"
PLAINTEXT = "icmp and net 10.200.0.0/16"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(nodes=2, workloads_per_node=1, svid_ttl=SVID_TTL,
                     workload_api="spire") as lab:
        inventory.publish_workloads(lab)
        inventory.apply_policy(lab, ENCRYPT_ALL)
        agents.start_all(lab)
        try:
            wait_for("both agents healthy with a peer", lambda: all(
                agent_status(lab, n)["health"]["healthy"] and len(wg_peers(lab, n)) == 1
                for n in NODES), timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{diagnostics(lab, NODES)}") from None
        yield lab


def ctl(lab: Lab) -> list[str]:
    return lab.exec_prefix("controller")


def trust(lab: Lab, node: str) -> dict[str, Any]:
    doc: dict[str, Any] = agent_status(lab, node)["trust"]
    return doc


def on_every_node(lab: Lab, what: str, probe: Any, timeout: float = 60) -> None:
    try:
        wait_for(what, lambda: all(probe(trust(lab, n)) for n in NODES), timeout=timeout)
    except AssertionError as exc:
        shown = {n: trust(lab, n) for n in NODES}
        raise AssertionError(f"{exc}\ntrust: {shown}\n{diagnostics(lab, NODES)}") from None


def only_under(authority: str) -> Any:
    return lambda t: set(t["records_by_authority"]) == {authority}


def rotate_to_new_authority(lab: Lab, old: str,
                            before_activate: Callable[[], None] = lambda: None) -> str:
    """prepare, wait for the new root in every node's bundle, activate, taint the old:
    every spire-agent re-issues at once and the agents re-sign their records."""
    new = spire.prepare_x509_authority(lab.layout, ctl(lab))
    assert new != old
    on_every_node(lab, "the prepared root in every node's bundle",
                  lambda t: t["bundle_authorities"] == sorted([old, new]))
    assert all(trust(lab, n)["svid_authority"] == old for n in NODES), \
        "a prepared authority signed an SVID before it was activated"
    before_activate()
    spire.activate_x509_authority(lab.layout, ctl(lab), new)
    shown = spire.x509_authorities(lab.layout, ctl(lab))
    assert shown["active"]["authority_id"] == new and shown["old"]["authority_id"] == old
    spire.taint_x509_authority(lab.layout, ctl(lab), old)
    assert [a["tainted"] for a in spire.bundle_authorities(lab.layout, ctl(lab))
            ].count(True) == 1
    return new


def test_rotation_and_revocation_following_the_procedure_lose_and_leak_nothing(
        lab: Lab, tmp_path: Path) -> None:
    old = spire.x509_authorities(lab.layout, ctl(lab))["active"]["authority_id"]
    # tfcrypt names authorities as SPIRE does: the agents' view matches the server's
    for n in NODES:
        t = trust(lab, n)
        assert t["bundle_authorities"] == [old] and t["svid_authority"] == old, t
        assert set(t["records_by_authority"]) == {old}, t
    signed_under_old = etcdctl(lab, "get", "--print-value-only", f"{PREFIX}/nodes/n2").strip()
    pcap = tmp_path / "underlay.pcap"
    with capture(lab, pcap):
        pinger = Pinger(lab, "n1-w1", workload_ip(lab, "n2-w1"), count=int(600 / 0.1))
        try:
            new = rotate_to_new_authority(lab, old)
            on_every_node(lab, "every SVID and node record under the new authority",
                          lambda t: t["svid_authority"] == new and set(
                              (t["records_by_authority"].get(new) or {}).items())
                          >= {("nodes", 2)} and "nodes" not in (
                              t["records_by_authority"].get(old) or {}), timeout=SVID_TTL)
            # the controller's values are written once: still under the old authority,
            # which status shows, and which `tfcrypt resign` fixes
            assert {"workloads", "policies"} <= set(trust(lab, "n1")["records_by_authority"]
                                                    [old])
            out = resign(lab, new)
            assert f"re-signed 3 value(s) under authority {new}" in out, out
            on_every_node(lab, "every record under the new authority", only_under(new))
            spire.revoke_x509_authority(lab.layout, ctl(lab), old)
            on_every_node(lab, "the revoked root gone from every bundle",
                          lambda t: t["bundle_authorities"] == [new])
            assert ping(lab, "n2-w1", workload_ip(lab, "n1-w1")) == 3
            # a record still signed under the revoked root, written back: refused,
            # counted, the node's current record kept, its agent puts its own back
            etcdctl(lab, "put", f"{PREFIX}/nodes/n2", signed_under_old)
            wait_for("n1 to refuse the record signed under the revoked root", lambda: agent_status(
                lab, "n1")["rejected"].get("untrusted_chain"))
            wait_for("n2's agent to put its own record back", lambda: etcdctl(
                lab, "get", "--print-value-only", f"{PREFIX}/nodes/n2").strip()
                != signed_under_old)
            assert len(wg_peers(lab, "n1")) == 1
            sent, received = pinger.stop()
        finally:
            pinger.kill()
    assert received == sent, (f"{sent - received} of {sent} selected pings lost during the "
                              f"CA rotation\n{diagnostics(lab, NODES, log_lines=60)}")
    assert count_packets(pcap, PLAINTEXT) == 0, \
        "a workload ping crossed the underlay in clear during the CA rotation"
    assert count_packets(pcap, "udp port 51820") >= sent
    for n in NODES:
        s = agent_status(lab, n)
        assert s["health"]["healthy"], s["health"]
        assert set(s["rejected"]) <= {"untrusted_chain"}, s["rejected"]


def _frozen_agent(lab: Lab, node: str) -> int:
    """Restart `node`'s agent with a long etcd lease (frozen, it must not lose its record
    to the lease: what is tested is the revocation) and return its PID."""
    assert agents.stop_agent(lab, node)
    spec = next(x for x in lab.layout.all_nodes() if x.name == node)
    rec = lab.start_process(agents.AGENT, [*agents.agent_argv(lab, spec), "--lease-ttl",
                                           "600"], node=node,
                            extra_prefix=lab.identity_prefix())
    wait_for(f"{node}'s restarted agent healthy", lambda: agent_status(
        lab, node)["health"]["healthy"] and agent_status(lab, node)["in_sync"], timeout=60)
    argv0 = Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0")[0]
    assert argv0 == sys.executable.encode(), f"PID {rec.pid} is {argv0!r}, not the agent"
    return rec.pid


def resign(lab: Lab, new: str) -> str:
    """`tfcrypt resign` once the controller's own SVID comes from the new CA (its
    spire-agent re-issues after the taint like every other)."""
    out: str = wait_for("the controller's SVID from the new CA", lambda: (
        o if f"under authority {new}" in (o := inventory.tfcrypt(lab, "resign")) else None),
        timeout=SVID_TTL)
    return out


def test_a_node_that_missed_the_rotation_is_refused_at_revocation_fail_closed(
        lab: Lab, tmp_path: Path) -> None:
    old = spire.x509_authorities(lab.layout, ctl(lab))["active"]["authority_id"]
    pid = _frozen_agent(lab, "n2")
    assert wait_for("n1 -> n2 over the tunnel",
                    lambda: ping(lab, "n1-w1", workload_ip(lab, "n2-w1")) == 3)
    before = agent_status(lab, "n1")["rejected"].get("untrusted_chain", 0)
    pcap = tmp_path / "underlay.pcap"
    with capture(lab, pcap):
        try:
            # frozen once it holds both roots: it misses the re-issued SVID, not the bundle
            new = rotate_to_new_authority(lab, old, lambda: os.kill(pid, signal.SIGSTOP))
            resign(lab, new)
            # what the operator must not ignore: n1 still believes a record under `old`
            wait_for("n1's status to show n2's record as the last one under the old "
                     "authority", lambda: trust(lab, "n1")["records_by_authority"].get(old)
                     == {"nodes": 1} and trust(lab, "n1")["svid_authority"] == new,
                     timeout=SVID_TTL)
            spire.revoke_x509_authority(lab.layout, ctl(lab), old)
            wait_for("n1 to refuse n2's record and drop its peer", lambda: agent_status(
                lab, "n1")["rejected"].get("untrusted_chain", 0) > before
                and not wg_peers(lab, "n1"))
            assert ping(lab, "n1-w1", workload_ip(lab, "n2-w1")) == 0, \
                "selected traffic to a node whose record is no longer trusted got through"
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for("n2 re-signed under the new authority and n1 its peer again",
                 lambda: trust(lab, "n1")["records_by_authority"] == {
                     new: {"nodes": 2, "policies": 1, "workloads": 2}}
                 and len(wg_peers(lab, "n1")) == 1, timeout=60)
        assert wait_for("n1 -> n2 over the tunnel again",
                        lambda: ping(lab, "n1-w1", workload_ip(lab, "n2-w1")) == 3)
    assert count_packets(pcap, PLAINTEXT) == 0, \
        "a workload ping crossed the underlay in clear while n2's record was refused"
    assert agent_status(lab, "n2")["health"]["healthy"]
