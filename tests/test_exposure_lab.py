"""What a running agent shows, and to whom (issue #14 item 9 and "Exposure").

Real agents in the lab. The first test has a lab of its own, whose Workload API hands n1
the SVID of n2 (a misregistration in SPIRE: the lab's server, told to, serves the wrong
identity on n1's socket). The others share one 2-node lab that encrypts everything and
carries traffic, so that every output (logs, status, status.json, metrics, error
messages) has something to say.
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import running_lab
from cryptography.hazmat.primitives import serialization
from labtools import PREFIX, etcdctl, fetch_svid, wait_for, workload_ip

from netns_lab import Lab, agents, inventory
from netns_lab.wire import ping

pytestmark = pytest.mark.lab


def run(lab: Lab, node: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*lab.exec_prefix(node), *argv], capture_output=True, text=True,
                          check=False, timeout=60)


def tfcrypt(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run(lab, node, sys.executable, "-m", "tfcrypt", *args)


def status_json(lab: Lab, node: str) -> dict[str, Any] | None:
    out = tfcrypt(lab, node, "status", "--json")
    return json.loads(out.stdout) if out.stdout.strip() else None


def spiffe_id(lab: Lab, node: str) -> str:
    return next(n.spiffe_id for n in lab.layout.all_nodes() if n.name == node)


def test_an_agent_handed_another_nodes_svid_says_why_in_status_and_recovers() -> None:
    """Before: status said "no SVID from the SPIFFE Workload API yet" while the log said
    the real reason; status.json was 0644. The lab server: it must hand n1 n2's SVID, a
    misbehaviour SPIRE has no switch for."""
    with running_lab(nodes=2, workloads_per_node=1, workload_api="lab") as lab:
        lab.workload_api_stop()
        lab.workload_api_start(serve_as={"n1": "n2"})
        agents.start_agent(lab, "n1")
        n1_id, n2_id = spiffe_id(lab, "n1"), spiffe_id(lab, "n2")

        doc = wait_for("n1's status to report the refused SVID", lambda: (
            (st := status_json(lab, "n1")) and st["workload_api"].get("last_refusal") and st))
        refusal = doc["workload_api"]["last_refusal"]
        assert refusal["reason"] == "unexpected_spiffe_id"
        assert n2_id in refusal["message"] and n1_id in refusal["message"]
        assert doc["spiffe_id"] is None and not doc["health"]["healthy"]
        reasons = " ".join(doc["health"]["reasons"])
        assert "refused" in reasons and n2_id in reasons, reasons
        assert "yet" not in doc["health"]["reasons"][0]

        table = tfcrypt(lab, "n1", "status")
        assert table.returncode == 1
        assert "Workload API:" in table.stdout and "last refused SVID" in table.stdout
        assert f"unexpected_spiffe_id: served {n2_id}" in table.stdout
        assert agents.running_agent(lab, "n1") is not None  # refused, not crashed

        status_file = agents.state_dir(lab, "n1") / "status.json"
        wait_for("status.json to be written", status_file.exists)
        assert stat.S_IMODE(status_file.stat().st_mode) == 0o600

        lab.workload_api_stop()
        lab.workload_api_start()  # n1's socket serves n1 again
        doc = wait_for("n1 to take its own SVID and report healthy", lambda: (
            (st := status_json(lab, "n1")) and st["health"]["healthy"] and st), timeout=40)
        assert doc["spiffe_id"] == n1_id
        assert stat.S_IMODE(status_file.stat().st_mode) == 0o600


# -- what a running agent exposes, and to whom (issue #14 "Exposure") ----------------

ENCRYPT_ALL = Path(__file__).parent.parent / "examples" / "encrypt-all.yaml"
NOBODY = 65534


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Two nodes encrypting everything, with a handshake and traffic behind them."""
    with running_lab(nodes=2, workloads_per_node=1) as lab:
        inventory.publish_workloads(lab)
        inventory.apply_policy(lab, ENCRYPT_ALL)
        agents.start_all(lab)
        for node in ("n1", "n2"):
            wait_for(f"{node} to report healthy with a selected pair", lambda n=node: (
                (st := status_json(lab, n)) and st["health"]["healthy"]
                and st["selected_pairs"] == 1))
        assert ping(lab, "n1-w1", workload_ip(lab, "n2-w1"), count=3, interval=0.1) == 3
        yield lab


def key_forms(lab: Lab, node: str) -> dict[str, str]:
    """Every spelling of `node`'s private keys worth grepping for: the WireGuard key as
    stored (base64) and as UAPI speaks it (hex), and the SVID key as PEM body lines and
    DER hex, fetched from the node's Workload API socket as the agent gets it."""
    b64 = (agents.state_dir(lab, node) / "wireguard.key").read_text().strip()
    raw = base64.b64decode(b64)
    forms = {"wireguard base64": b64, "wireguard hex": raw.hex(),
             "wireguard hex upper": raw.hex().upper()}
    private_key, _ = fetch_svid(lab, node)
    pem = private_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode()
    der = private_key.private_bytes(serialization.Encoding.DER,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    scalar = private_key.private_numbers().private_value  # type: ignore[union-attr]
    forms["svid scalar hex"] = f"{scalar:064x}"
    # A PEM line is 48 DER bytes. PKCS#8 of an EC key (SPIRE's) ends with the public key,
    # which every record's certificate carries too: only lines holding private bytes count.
    at = der.find(scalar.to_bytes(32, "big"))
    assert at >= 0, "the private scalar is not in the key's DER"
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    forms |= {f"svid pem line {i}": line for i, line in enumerate(body)
              if len(line) >= 40 and 48 * i < at + 32 and at < 48 * (i + 1)}
    forms |= {"svid der hex": der.hex(), "svid der base64": base64.b64encode(der).decode()}
    return forms


def outputs(lab: Lab, node: str) -> dict[str, str]:
    """Everything of tfcrypt's an operator or a local user may read on `node`."""
    state = agents.state_dir(lab, node)
    key_file = state / "wireguard.key"
    out = {
        "status table": tfcrypt(lab, node, "status").stdout,
        "status --json": tfcrypt(lab, node, "status", "--json").stdout,
        "status --probe": tfcrypt(lab, node, "status", "--probe").stdout,
        "status.json": (state / "status.json").read_text(),
        "metrics": scrape(lab, node),
        "keys show": tfcrypt(lab, node, "keys", "show").stdout,
        "etcd": etcdctl(lab, "get", "--prefix", PREFIX),
    }
    rec = agents.running_agent(lab, node)
    assert rec is not None
    out["agent log"] = Path(rec.log).read_text(errors="replace")
    for other in state.iterdir():  # wireguard-go's log, the epoch, anything else
        if other.is_file() and other.name != key_file.name:
            out[f"state dir {other.name}"] = other.read_text(errors="replace")
    # error messages: the key file itself handed to every command that reads a file,
    # and a second agent on a node that has one
    for argv in (["status", "--config", str(key_file)],
                 ["agent", "--config", str(key_file), "--node", node],
                 ["uninstall", "--config", str(key_file)],
                 ["policy", "plan", "-f", str(key_file)],
                 ["agent", *agents.agent_argv(lab, next(
                     n for n in lab.layout.all_nodes() if n.name == node))[4:]]):
        done = tfcrypt(lab, node, *argv)
        assert done.returncode != 0, argv
        out[f"error of tfcrypt {' '.join(argv[:3])}"] = done.stdout + done.stderr
    return out


def scrape(lab: Lab, node: str) -> str:
    return run(lab, node, sys.executable, "-c",
               "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
               f"'http://{agents.METRICS_ADDRESS}/metrics', timeout=5).read().decode())").stdout


@pytest.mark.parametrize("node", ["n1", "n2"])
def test_no_key_material_in_logs_status_metrics_etcd_or_errors(lab: Lab, node: str) -> None:
    """The agent's own private keys (read from its state dir and its Workload API socket)
    appear in none of its outputs, in any spelling; the public key does (a control that
    the outputs were read)."""
    forms = key_forms(lab, node)
    seen = outputs(lab, node)
    assert all(seen[k] for k in ("status table", "status.json", "metrics", "agent log")), seen
    public = json.loads(seen["status --json"])["public_key"]
    assert public in seen["status.json"] and public in seen["agent log"]
    leaks = [f"{form} in {where}" for where, text in seen.items()
             for form, value in forms.items() if value in text or value.lower() in text]
    assert not leaks, leaks
    assert "PRIVATE KEY" not in "".join(seen.values())


def test_the_status_socket_is_0600_root_and_no_other_user_reaches_it(lab: Lab) -> None:
    """Before: 0660, so any member of root's group read the status."""
    sock = agents.status_socket(lab, "n1")
    st = sock.lstat()
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) & 0o077 == 0
    curl = ["curl", "-sS", "--max-time", "5", "--unix-socket", "/run/tfcrypt/agent.sock",
            "http://tfcrypt/status"]
    assert json.loads(run(lab, "n1", *curl).stdout)["node"] == "n1"  # root: yes
    for gid in (NOBODY, 0):  # nobody, and nobody in root's group
        denied = run(lab, "n1", "setpriv", f"--reuid={NOBODY}", f"--regid={gid}",
                     "--clear-groups", *curl)
        assert denied.returncode != 0 and '"node"' not in denied.stdout, denied


def listening(lab: Lab, node: str, pid: int) -> list[str]:
    """Local addresses of the TCP sockets `pid` listens on in `node` (ss, in the node)."""
    out = run(lab, node, "ss", "-Hltnp").stdout
    return sorted(line.split()[3] for line in out.splitlines() if f"pid={pid}," in line)


def test_metrics_listen_only_where_configured_and_nowhere_by_default(lab: Lab) -> None:
    """Metrics are off unless `metrics_address` is set, and then bound to exactly that
    address: the lab's 127.0.0.1:9477 is not reachable from the other node. Runs last:
    it restarts n2's agent without metrics."""
    n1 = agents.running_agent(lab, "n1")
    assert n1 is not None
    assert listening(lab, "n1", n1.pid) == [agents.METRICS_ADDRESS]
    n1_underlay = next(n.underlay_ip for n in lab.layout.all_nodes() if n.name == "n1")
    port = agents.METRICS_ADDRESS.rsplit(":", 1)[1]
    remote = run(lab, "n2", "curl", "-sS", "--max-time", "5",
                 f"http://{n1_underlay}:{port}/metrics")
    assert remote.returncode != 0 and "tfcrypt_" not in remote.stdout

    agents.stop_agent(lab, "n2")
    spec = next(n for n in lab.layout.all_nodes() if n.name == "n2")
    argv = agents.agent_argv(lab, spec)
    i = argv.index("--metrics-address")
    rec = agents.start_agent_argv(lab, "n2", argv[:i] + argv[i + 2:])
    wait_for("n2 to report healthy without metrics", lambda: (
        (st := status_json(lab, "n2")) and st["health"]["healthy"]))
    assert listening(lab, "n2", rec.pid) == []
