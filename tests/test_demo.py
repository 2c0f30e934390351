"""The demo is the README's main command: its own verdict is asserted (acts 1-2 and the
Kubernetes act 3, in one run; act 2's seen traffic as tfcrypt flows, plan --against-seen
and report print it), and it must notice when the dataplane is broken on purpose
(in the Kubernetes act, which shares demo.measure and the verdict with acts 1-2; one
broken run instead of two keeps the suite's time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import new_lab_name

from netns_lab import Lab, agents, kdemo

pytestmark = pytest.mark.lab


def test_the_demo_passes_and_cleans_up() -> None:
    name = new_lab_name()
    out = subprocess.run([sys.executable, "-m", "netns_lab", "demo", "--name", name],
                         capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("flows as expected") == 4
    assert "MISMATCH" not in out.stdout
    rows = [line.split() for line in out.stdout.splitlines()]
    # act 2 marks the pairs the pci policy newly selects, e.g. reports <-> shop web
    assert any(r[:2] == ["*", "n1-w1"] and "n3-w3" in r and r[-1] == "ok" for r in rows)
    assert any("(node)" in r and r[-1] == "ok" for r in rows)
    assert "audit mode; shown as if enforced" in out.stdout
    # act 2 opens with what n1 saw: n3-w3 (reports, label=pci) with n1's shop workloads,
    # in plaintext, as act 1's table says
    seen = out.stdout.split("tfcrypt flows --workload n3-w3 --verdict plaintext on n1:", 1)[1]
    seen = seen.split("[5/9", 1)[0]
    assert [line for line in seen.splitlines()
            if "n1-w1 10.200.1.11" in line and "n3-w3 10.200.3.13" in line
            and "icmp" in line and "plaintext" in line]
    assert "wireguard" not in seen
    # the plan against the seen traffic names exactly act 1's flows of n3-w3 with the
    # other nodes' workloads (both directions), each ready to be encrypted
    encrypt = [line.split()[1:4:2] for line in out.stdout.splitlines()
               if line.startswith("  encrypt ")]
    peers = {"10.200.1.11", "10.200.1.12", "10.200.2.11", "10.200.2.12", "10.200.2.13"}
    assert sorted(encrypt) == sorted([[p, "10.200.3.13"] for p in peers]
                                     + [["10.200.3.13", p] for p in peers])
    assert all("as plaintext;" in line and line.endswith(": ready")
               for line in out.stdout.splitlines() if line.startswith("  encrypt "))
    assert "10 seen flow(s) would change" in out.stdout
    assert "ready against seen traffic" in out.stdout
    # the proof after enforcing: pci's traffic inside WireGuard, none of it plaintext
    report = out.stdout.split("tfcrypt report --since ", 1)[1].split("done:", 1)[0]
    assert report.split("\n", 1)[0].endswith("(exit 0):"), report
    pci = report.split("policy pci:", 1)[1].split("\npolicy ", 1)[0]
    wireguard = next(line for line in pci.splitlines() if "inside WireGuard:" in line)
    assert int(wireguard.split()[2]) > 0, pci
    assert "plaintext of selected pairs: none" in pci
    assert "PLAINTEXT" not in report
    assert "identities from SPIRE (spire-server 10.77.0.9:8081" in out.stdout
    assert "n3 spiffe://lab.tfcrypt/tfcrypt/node/n3" in out.stdout
    # act 3: the policies came through kubectl apply and the controller's status
    k = out.stdout.split("act 3:", 1)[1]
    assert "encryptionpolicy.tfcrypt.io/payments created" in k
    heads = [r for r in (line.split() for line in k.splitlines())
             if r[:5] == ["NAME", "MODE", "ACCEPTED", "READY", "PAIRS"]]
    assert len(heads) == 2
    statuses = [line.split()[:5] for line in k.splitlines() if line.startswith("payments ")]
    assert statuses and all(s == ["payments", "enforce", "True", "True", "11"]
                            for s in statuses)
    # the kubectl label move: n1-w2 (api east) <-> n3-w1 (now db east) moved in, on the wire
    moved = [r for r in (line.split() for line in k.splitlines()) if r[:1] == ["*"]]
    assert any(r[1] == "n1-w2" and "n3-w1" in r and r[-3:] == ["inside", "WireGuard", "ok"]
               for r in moved), k
    assert any(r[1] == "n2-w3" and "n3-w1" in r and r[-2:] == ["plaintext", "ok"]
               for r in moved), k
    assert not Path(f"/run/netns_lab/{name}").exists()


def _remove_the_mark_rule_on_n1(lab: Lab) -> None:
    """Stop n1's agent (so nothing repairs it) and delete every rule that sets the mark."""
    assert agents.stop_agent(lab, "n1")
    listing = json.loads(subprocess.run(
        [*lab.exec_prefix("n1"), "nft", "-j", "list", "table", "inet", "tfcrypt"],
        capture_output=True, text=True, check=True).stdout)
    marking = [r["rule"] for r in (o for o in listing["nftables"]) if "rule" in r
               and "mangle" in json.dumps(r["rule"]["expr"])]
    assert marking, "no marking rule found to remove"
    for rule in marking:
        subprocess.run([*lab.exec_prefix("n1"), "nft", "delete", "rule", "inet", "tfcrypt",
                        rule["chain"], "handle", str(rule["handle"])], check=True)


def test_the_demo_reports_a_broken_dataplane_and_fails(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    code = kdemo.run(new_lab_name(), before_measure=_remove_the_mark_rule_on_n1)
    out = capsys.readouterr().out
    assert code == 1
    mismatches = [line for line in out.splitlines() if line.endswith("MISMATCH")]
    assert mismatches and all("n1-" in line for line in mismatches)
    assert any("plaintext" in line for line in mismatches)
