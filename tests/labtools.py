"""Small tools for lab tests that drive tfcrypt agents: run in a target, read `wg`,
ping, capture the underlay, read and write etcd from inside the lab.

Pinging and capturing live in netns_lab.wire (the demo uses them too).
Everything here runs commands inside lab namespaces (from `status --json`), never lab
addresses from the root namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from netns_lab import Lab, agents
from netns_lab.wire import parse_ping, ping_argv
from tfcrypt.identity import sign_envelope
from tfcrypt.model.node import NodeRecord

T = TypeVar("T")
PREFIX = "/tfcrypt/v1"


def run_in(lab: Lab, target: str, argv: list[str], *, check: bool = True,
           input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*lab.exec_prefix(target), *argv], check=check, input=input,
                          capture_output=True, timeout=timeout,
                          text=input is None)  # type: ignore[call-overload]


# Deadlines stretch in the kernel tier's emulated guest (TCG runs Python several times
# slower); a deadline bounds a wait, it asserts no duration (STYLE: no timed assertions).
TIMEOUT_SCALE = float(os.environ.get("NETNS_LAB_TIMEOUT_SCALE") or 1)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 20.0,
             interval: float = 0.2) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what`."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.CalledProcessError, OSError, ValueError):
            last = probe()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@dataclass(frozen=True)
class WgPeer:
    endpoint: str
    allowed_ips: frozenset[str]
    latest_handshake: int


def wg_peers(lab: Lab, node: str, ifname: str = "tfcrypt0") -> dict[str, WgPeer]:
    """Peers as the real `wg show IF dump` reports them inside `node`."""
    out = run_in(lab, node, ["wg", "show", ifname, "dump"]).stdout.strip().splitlines()
    peers = {}
    for line in out[1:]:
        f = line.split("\t")
        ips = frozenset() if f[3] == "(none)" else frozenset(f[3].split(","))
        peers[f[0]] = WgPeer(f[2], ips, int(f[4]))
    return peers


def agent_status(lab: Lab, node: str) -> dict[str, Any]:
    state = next(n["agent"]["state_dir"] for n in lab.status()["nodes"] if n["name"] == node)
    return json.loads((Path(state) / "status.json").read_text())


_FLOW_ELEMENTS = re.compile(
    r"(\tset seen_\w+ \{\n(?:\t\t(?!elements = )[^\n]*\n)*)\t\telements = \{.*?\}\n(?=\t\}\n)",
    re.S)


def nft_table(lab: Lab, node: str, check: bool = True) -> str:
    """`nft -s list table inet tfcrypt` without the flow sets' elements: the kernel adds
    one with every new flow (docs/flows.md). They are counts, not the dataplane: a test
    comparing the dataplane before and after compares everything else."""
    out = run_in(lab, node, ["nft", "-s", "list", "table", "inet", "tfcrypt"],
                 check=check).stdout
    return _FLOW_ELEMENTS.sub(r"\1", out)


def workload_ip(lab: Lab, name: str) -> str:
    return next(w["ip"] for w in lab.status()["workloads"] if w["name"] == name)


class Pinger:
    """A ping that runs while a test breaks something; `result()` = (sent, received)."""

    def __init__(self, lab: Lab, src: str, dst_ip: str, count: int,
                 interval: float = 0.1) -> None:
        self.proc = subprocess.Popen(
            [*lab.exec_prefix(src), *ping_argv(dst_ip, count, interval)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.timeout = count * interval + 30

    def result(self) -> tuple[int, int]:
        out, _ = self.proc.communicate(timeout=self.timeout)
        sent, received = parse_ping(out)
        assert sent, out
        return sent, received

    def stop(self) -> tuple[int, int]:
        """End the ping now (SIGINT: it still prints its summary); (sent, received)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.result()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def etcdctl(lab: Lab, *args: str, input: bytes | None = None) -> str:
    etcd = lab.status()["etcd"]
    endpoints = ",".join(etcd["endpoints"])
    out = run_in(lab, "controller", ["etcdctl", f"--endpoints={endpoints}",
                                     *etcd.get("etcdctl_flags", []), *args], input=input)
    return out.stdout.decode() if isinstance(out.stdout, bytes) else out.stdout


# Run inside the signer's node as its identity: with SPIRE the unix attestor decides by
# the caller's gid and pid namespace, so the test process (root, gid 0) would get nothing.
FETCH_SVID_PEM = """
import json, sys
from cryptography.hazmat.primitives import serialization as s
from spiffe import WorkloadApiClient
with WorkloadApiClient(socket_path="unix:" + sys.argv[1]) as client:
    svid = client.fetch_x509_svid(timeout=10)
print(json.dumps({
    "key": svid.private_key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
                                          s.NoEncryption()).decode(),
    "chain": [c.public_bytes(s.Encoding.PEM).decode() for c in svid.cert_chain]}))
"""


def fetch_svid(lab: Lab, who: str) -> tuple[Any, list[x509.Certificate]]:
    """Node (or "controller") `who`'s real SVID, (private key, chain leaf first), fetched
    as that identity from its own socket: an attacker who stole the node's key."""
    if who == "controller":
        socket = lab.status()["controller"]["spiffe_socket"]
    else:
        socket = next(n["spiffe_socket"] for n in lab.status()["nodes"] if n["name"] == who)
    out = run_in(lab, who, [*lab.identity_prefix(), sys.executable, "-c", FETCH_SVID_PEM,
                            socket])
    doc = json.loads(out.stdout)
    key = serialization.load_pem_private_key(doc["key"].encode(), password=None)
    return key, [x509.load_pem_x509_certificate(c.encode()) for c in doc["chain"]]


def sign_as(lab: Lab, signer: str, record: NodeRecord) -> bytes:
    """`record` signed with node `signer`'s real SVID (lab server or SPIRE)."""
    key, chain = fetch_svid(lab, signer)
    return sign_envelope(record.to_payload(), key, chain)


def diagnostics(lab: Lab, nodes: tuple[str, ...], log_lines: int = 40) -> str:
    """What an operator would look at first: each node's `wg show`, ip rules and the tail
    of its agent log. Appended to a lab assertion so a CI failure explains itself."""
    from netns_lab import agents

    parts = []
    for node in nodes:
        for argv in (["wg", "show", "tfcrypt0"], ["ip", "rule"], ["ip", "route", "show",
                                                                   "table", "all"]):
            out = run_in(lab, node, argv, check=False)
            parts.append(f"--- {node}: {' '.join(argv)}\n{out.stdout}{out.stderr}")
        rec = agents.running_agent(lab, node)
        if rec is not None:
            with contextlib.suppress(OSError):
                tail = Path(rec.log).read_text(errors="replace").splitlines()[-log_lines:]
                parts.append(f"--- {node}: agent log (last {log_lines} lines)\n"
                             + "\n".join(tail))
    return "\n".join(parts)


def remove_node(lab: Lab, node: str, seen_by: str) -> None:
    """Stop `node`'s agent and delete its record, as an operator retiring it would; return
    once `seen_by` has dropped its peer (its selected traffic must now be dropped)."""
    key = agent_status(lab, node)["public_key"]
    assert agents.stop_agent(lab, node)
    etcdctl(lab, "del", f"{PREFIX}/nodes/{node}")
    wait_for(f"{seen_by} to drop {node}", lambda: key not in wg_peers(lab, seen_by),
             timeout=10)
