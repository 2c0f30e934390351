"""etcd over mutual TLS in the lab (issue #14, "etcd over mutual TLS"), proven on the wire.

Three labs, one after the other. Two of 2 nodes and a 3-member etcd: a plaintext one (the
control: the same scenario's capture shows record content, so the TLS claim is not
vacuous) and one with `etcd_tls` whose SVIDs live 16 s (rotated every ~8-10 s). In each,
the scenario publishes workloads and a policy through the controller CLI, lets the agents
converge, and captures ports 2379 and 2380 on every underlay port while a workload
changes, an agent restarts (a full relist: every record crosses 2379) and a marker key is
written (replicated over 2380). The TLS lab also shows that a client without a
certificate is refused, and that SVID rotations keep the agents' watches (a change after
rotations is applied; no relist). The third runs real SPIRE (issue #15): SPIRE's X509 CA is
an intermediate under the lab root etcd trusts, and the agents and the controller CLI
authenticate to etcd with the SVIDs SPIRE issues (leaf + intermediate).
"""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import running_lab
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from labtools import agent_status, etcdctl, run_in, wait_for, wg_peers, workload_ip
from spiffe import WorkloadApiClient

from netns_lab import Lab, agents, etcd_tls, inventory, spire
from netns_lab.wire import capture, ping

pytestmark = pytest.mark.lab

POLICY = """apiVersion: tfcrypt.io/v1alpha1
kind: EncryptionPolicy
metadata: {name: tls-pair}
spec:
  mode: enforce
  rules:
    - endpoint1: {tags: [application=a]}
      endpoint2: {tags: [application=b]}
"""


@dataclass
class Seen:
    """Which known strings a capture of etcd's ports contained."""

    client: dict[str, bool]  # port 2379: record content
    peer: dict[str, bool]    # port 2380: a key name replicated between members


def n1_selects_n2_w1(lab: Lab) -> bool:
    ip = workload_ip(lab, "n2-w1")
    return any(f"{ip}/32" in p.allowed_ips for p in wg_peers(lab, "n1").values())


def converge(lab: Lab, tmp_path: Path) -> None:
    agents.start_all(lab)
    inventory.set_workload(lab, "n1-w1", ["application=a"])
    inventory.set_workload(lab, "n2-w1", ["application=b"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    inventory.apply_policy(lab, policy)
    wait_for("n1 to select n2-w1 (peer n2 with its address)", lambda: n1_selects_n2_w1(lab),
             timeout=60)
    assert ping(lab, "n1-w1", workload_ip(lab, "n2-w1"), count=3) > 0


def scenario(lab: Lab, tmp_path: Path) -> Seen:
    """Converge, then capture etcd's ports while record content must cross them."""
    converge(lab, tmp_path)
    n2 = agent_status(lab, "n2")
    marker_tag = f"application=marker{secrets.token_hex(4)}"
    marker_key = f"/lab-marker/key{secrets.token_hex(4)}"
    client_pcap, peer_pcap = tmp_path / "client.pcap", tmp_path / "peer.pcap"
    with capture(lab, client_pcap, "tcp port 2379"), capture(lab, peer_pcap, "tcp port 2380"):
        inventory.set_workload(lab, "n2-w2x", [marker_tag], node="n2", ips=["10.99.0.7"])
        restarted = dt.datetime.now(dt.UTC)
        agents.control(lab, "n1", "restart")
        wait_for("n1's new agent to list every workload and be in sync", lambda: (
            (st := agent_status(lab, "n1"))["in_sync"] and st["workloads"] == 3
            and dt.datetime.fromisoformat(st["generated_at"]) > restarted
            and n1_selects_n2_w1(lab)), 60)
        etcdctl(lab, "put", marker_key, "v")
    client, peer = client_pcap.read_bytes(), peer_pcap.read_bytes()
    return Seen(
        client={"n2's public key": n2["public_key"].encode() in client,
                "n2's SPIFFE ID": n2["spiffe_id"].encode() in client,
                "a workload tag": marker_tag.encode() in client},
        peer={"a key name": marker_key.encode() in peer})


def test_without_tls_the_capture_of_etcd_traffic_shows_record_content(tmp_path: Path
                                                                       ) -> None:
    """The control: the same scenario on a plaintext etcd shows every string."""
    with running_lab(nodes=2, workloads_per_node=1, etcd_members=3) as lab:
        seen = scenario(lab, tmp_path)
    assert all(seen.client.values()), seen.client
    assert all(seen.peer.values()), seen.peer


def tfcrypt_cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """The controller's tfcrypt CLI, with the controller identity's gid on a SPIRE lab."""
    st = lab.status()
    return run_in(lab, "controller", [*lab.identity_prefix(), sys.executable, "-m", "tfcrypt",
                                      *args,
                                      "--spiffe-socket", st["controller"]["spiffe_socket"]],
                  check=False, timeout=90)


def node_svid_files(lab: Lab, node: str, tmp_path: Path) -> tuple[str, str]:
    """The node's current SVID (from its Workload API socket) as PEM chain and key files."""
    socket = next(str(n.spiffe_socket) for n in lab.layout.all_nodes() if n.name == node)
    with WorkloadApiClient(socket_path=f"unix:{socket}") as client:
        svid = client.fetch_x509_svid(timeout=10)
    chain, key = tmp_path / f"{node}.pem", tmp_path / f"{node}.key"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                               for c in svid.cert_chain))
    key.write_bytes(svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key.chmod(0o600)
    return str(chain), str(key)


def curl(lab: Lab, url: str, cert: str, key: str) -> subprocess.CompletedProcess[str]:
    """GET `url` from etcd member e2's namespace with a client certificate."""
    return run_in(lab, "e2", ["curl", "-sS", "--http1.1", "--max-time", "5", "--noproxy", "*",
                                      "--cacert", str(etcd_tls.bundle_path(lab.layout)),
                                      "--cert", cert, "--key", key, url], check=False)


def test_etcd_over_mutual_tls(tmp_path: Path) -> None:
    # The lab server: a 16 s SVID lifetime (below SPIRE's 30 s floor in the lab) makes the
    # TLS connection rotate several times inside this test; on SPIRE see the test below.
    with running_lab(nodes=2, workloads_per_node=1, etcd_members=3, svid_ttl=16,
                     etcd_tls=True, workload_api="lab") as lab:
        # agents converge and ping works; no record content crosses 2379, no key 2380
        seen = scenario(lab, tmp_path)
        assert not any(seen.client.values()), seen.client
        assert not any(seen.peer.values()), seen.peer
        assert agent_status(lab, "n1")["etcd"]["tls"] is True

        # a client without a certificate (it trusts etcd's) is refused by etcd itself
        members = lab.status()["etcd"]["members"]
        ip = members[0]["underlay_ip"]
        bare = run_in(lab, "controller", ["etcdctl", f"--endpoints=https://{ip}:2379",
                                          f"--cacert={etcd_tls.bundle_path(lab.layout)}",
                                          "--dial-timeout=2s",
                                          "--command-timeout=3s", "get", "--prefix", "/"],
                      check=False)
        assert bare.returncode != 0
        log = Path(lab.layout.logs_dir / "etcd-e1.log").read_text()
        assert "client didn't provide a certificate" in log
        # ... and so is tfcrypt with TLS off: it cannot read the registry
        plain = tfcrypt_cli(lab, "policy", "list", "--etcd", f"{ip}:2379")
        assert plain.returncode != 0, plain.stdout
        with_tls = tfcrypt_cli(lab, "policy", "list", "--etcd", f"{ip}:2379", "--etcd-tls")
        assert with_tls.returncode == 0 and "tls-pair" in with_tls.stdout, with_tls.stderr

        # a node's SVID is a client etcd accepts, but not a raft peer: only certificates
        # with the shared peer name are (--peer-cert-allowed-hostname). Asked from e2's
        # namespace: etcd also requires a peer's certificate to name its address.
        peer_url = f"https://{ip}:2380/members"
        as_node = curl(lab, peer_url, *node_svid_files(lab, "n1", tmp_path))
        assert as_node.returncode != 0, as_node.stdout
        as_member = curl(lab, peer_url, str(etcd_tls.cert_path(lab.layout, "e2")),
                         str(etcd_tls.key_path(lab.layout, "e2")))
        assert as_member.returncode == 0 and "peerURLs" in as_member.stdout, as_member.stderr

        # ... and so is an agent with TLS off: it never connects, status says why
        agents.stop_agent(lab, "n1")
        started = dt.datetime.now(dt.UTC)
        node = next(n for n in lab.layout.all_nodes() if n.name == "n1")
        argv = [a for a in agents.agent_argv(lab, node) if a != "--etcd-tls"]
        argv[argv.index("--etcd") + 1] = ",".join(f"{m['underlay_ip']}:2379" for m in members)
        rec = agents.start_agent_argv(lab, "n1", argv, log_name="agent-n1-notls.log")
        try:
            def unreachable() -> dict[str, Any] | None:
                st = agent_status(lab, "n1")
                fresh = dt.datetime.fromisoformat(st["generated_at"]) > started
                return st if fresh and not st["etcd"]["connected"] \
                    and st["etcd"]["last_error"] else None

            st = wait_for("n1's TLS-off agent to report etcd unreachable", unreachable, 60)
            assert st["etcd"]["tls"] is False and st["workloads"] == 0, st["etcd"]
        finally:
            lab.stop_process(rec)
        agents.start_agent(lab, "n1")
        wait_for("n1's TLS agent to be back in sync", lambda: (
            (st := agent_status(lab, "n1"))["etcd"]["connected"] and st["etcd"]["tls"]
            and st["in_sync"]), 60)

        # SVID rotation keeps the watch: changes after rotations arrive, no relist
        before = agent_status(lab, "n1")["etcd"]
        wait_for("n1 to rotate its etcd client certificate twice", lambda: (
            agent_status(lab, "n1")["etcd"]["credential_rotations"]
            >= before["credential_rotations"] + 2), timeout=60)
        inventory.set_workload(lab, "n2-w1", ["application=c"])
        wait_for("n1 to drop n2-w1 after its tags changed",
                 lambda: not n1_selects_n2_w1(lab), timeout=30)
        inventory.set_workload(lab, "n2-w1", ["application=b"])
        wait_for("n1 to select n2-w1 again", lambda: n1_selects_n2_w1(lab), timeout=30)
        after = agent_status(lab, "n1")["etcd"]
        assert after["relists"] == before["relists"], (before, after)
        assert after["connected"]
        assert ping(lab, "n1-w1", workload_ip(lab, "n2-w1"), count=3) > 0


def bare_etcdctl(lab: Lab) -> subprocess.CompletedProcess[str]:
    """etcdctl that trusts etcd's certificate but presents none of its own."""
    ip = lab.status()["etcd"]["members"][0]["underlay_ip"]
    return run_in(lab, "controller", ["etcdctl", f"--endpoints=https://{ip}:2379",
                                      f"--cacert={etcd_tls.bundle_path(lab.layout)}",
                                      "--dial-timeout=2s", "--command-timeout=3s",
                                      "get", "--prefix", "/"], check=False)


def pem_certs(path: Path) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER)
            for c in x509.load_pem_x509_certificates(path.read_bytes())]


CHAIN_LENGTH = """
import sys
from spiffe import WorkloadApiClient
with WorkloadApiClient(socket_path="unix:" + sys.argv[1]) as client:
    print(len(client.fetch_x509_svid(timeout=10).cert_chain))
"""


def svid_chain_length(lab: Lab, node: str) -> int:
    """How many certificates the node's SPIRE SVID chain has (asked as the tfcrypt gid)."""
    socket = next(str(n.spiffe_socket) for n in lab.layout.all_nodes() if n.name == node)
    res = run_in(lab, node, [*lab.identity_prefix(), sys.executable, "-c", CHAIN_LENGTH,
                             socket])
    return int(res.stdout)


def test_etcd_over_mutual_tls_with_svids_issued_by_spire(tmp_path: Path) -> None:
    with running_lab(nodes=2, workloads_per_node=1, svid_ttl=120, workload_api="spire",
                     etcd_tls=True) as lab:
        # the bundle SPIRE serves is the root etcd trusts (SPIRE's CA is its intermediate)
        assert pem_certs(spire.bundle_path(lab.layout)) == \
            pem_certs(etcd_tls.bundle_path(lab.layout))
        assert svid_chain_length(lab, "n1") == 2  # leaf + SPIRE's intermediate

        # agents holding SPIRE SVIDs (leaf + intermediate) read the registry over TLS,
        # select the pair and carry the ping
        converge(lab, tmp_path)
        for node in ("n1", "n2"):
            wait_for(f"{node} healthy over TLS etcd", lambda node=node: (
                (st := agent_status(lab, node))["health"]["healthy"] and st["selected_pairs"]
                and st["etcd"]["tls"] and st["etcd"]["connected"]), timeout=60)

        # a client without a certificate is refused by etcd itself
        assert bare_etcdctl(lab).returncode != 0
        log = Path(lab.layout.logs_dir / "etcd-e1.log").read_text()
        assert "client didn't provide a certificate" in log

        # the controller's SPIRE SVID is a client certificate etcd accepts
        ip = lab.status()["etcd"]["members"][0]["underlay_ip"]
        with_tls = tfcrypt_cli(lab, "policy", "list", "--etcd", f"{ip}:2379", "--etcd-tls")
        assert with_tls.returncode == 0 and "tls-pair" in with_tls.stdout, with_tls.stderr
