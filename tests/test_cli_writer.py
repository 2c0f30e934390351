"""`tfcrypt policy|workload` against a real etcd and the lab Workload API server: the
writer applies the readers' bounds, and listings show what agents refuse (issue #14)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import etcd_fixture
import pytest
from etcd_fixture import EtcdServer
from wlapi_server import TD, Server

from tfcrypt.controller.session import fetch_svid
from tfcrypt.identity import sign_envelope
from tfcrypt.identity.svid_source import SvidUpdate
from tfcrypt.model.policy import parse_policy_document
from tfcrypt.registry import Registry

CONTROLLER = f"spiffe://{TD}/tfcrypt/controller"
PREFIX = "/tfcrypt/v1"
etcd = etcd_fixture.etcd  # the fixture, under the name tests ask for


@pytest.fixture
def wlapi(workdir: Path) -> Iterator[Server]:
    config = workdir / "config.json"
    config.write_text(json.dumps({
        "trust_domain": TD, "state_dir": str(workdir / "state"), "svid_ttl_seconds": 600,
        "identities": [{"socket": str(workdir / "ctl.sock"), "spiffe_id": CONTROLLER}]}))
    server = Server(workdir, config)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def tfcrypt(etcd: EtcdServer, wlapi: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFCRYPT_")}
    return subprocess.run(
        [sys.executable, "-m", "tfcrypt", *args, "--etcd", etcd.endpoint,
         "--spiffe-socket", str(wlapi.sock("ctl")), "--prefix", PREFIX],
        capture_output=True, text=True, timeout=60, env=env)


def stored_keys(etcd: EtcdServer) -> list[str]:
    async def read() -> list[str]:
        async with Registry([etcd.endpoint.removeprefix("http://")], prefix=PREFIX) as reg:
            return sorted((await reg.get_all("")).items)
    return asyncio.run(read())


def put_signed_raw(etcd: EtcdServer, wlapi: Server, key: str, payload: dict[str, object]) -> None:
    """Write a value signed by the controller, bypassing the CLI's checks (another writer)."""
    svid: SvidUpdate = fetch_svid(str(wlapi.sock("ctl")))
    value = sign_envelope(payload, svid.private_key, svid.chain)

    async def write() -> None:
        async with Registry([etcd.endpoint.removeprefix("http://")], prefix=PREFIX) as reg:
            await reg.put(key, value)
    asyncio.run(write())


def big_policy(rules: int) -> str:
    body = "".join(f"  - endpoint1: {{tags: [application=a{i}]}}\n"
                   f"    endpoint2: {{subnet: 10.{i // 256 % 256}.{i % 256}.0/24}}\n"
                   for i in range(rules))
    return ("apiVersion: tfcrypt.io/v1alpha1\nkind: EncryptionPolicy\n"
            f"metadata: {{name: big}}\nspec:\n  rules:\n{body}")


def test_apply_of_a_policy_every_agent_would_refuse_writes_nothing(
        etcd: EtcdServer, wlapi: Server, workdir: Path) -> None:
    path = workdir / "big.yaml"
    path.write_text(big_policy(10_000))
    out = tfcrypt(etcd, wlapi, "policy", "apply", "-f", str(path))
    assert out.returncode == 2, out
    assert out.stdout == ""
    line, = out.stderr.splitlines()
    assert "too_large" in line and "65536" in line and "policies/big" in line
    assert stored_keys(etcd) == []


SMALL = """apiVersion: tfcrypt.io/v1alpha1
kind: EncryptionPolicy
metadata: {name: small}
spec:
  rules:
  - endpoint1: {tags: [application=a]}
    endpoint2: {any: true}
"""


def policy_payload(name: str, rules: int) -> dict[str, object]:
    return parse_policy_document(big_policy(rules).replace("{name: big}", f"{{name: {name}}}")
                                 ).to_payload(epoch=1, issued_at=int(time.time()))


def test_policy_list_shows_a_value_the_agents_refuse_with_the_reason(
        etcd: EtcdServer, wlapi: Server, workdir: Path) -> None:
    (workdir / "small.yaml").write_text(SMALL)
    assert tfcrypt(etcd, wlapi, "policy", "apply", "-f", str(workdir / "small.yaml")
                   ).returncode == 0
    put_signed_raw(etcd, wlapi, "policies/big", policy_payload("big", 10_000))
    listed = tfcrypt(etcd, wlapi, "policy", "list")
    assert listed.returncode == 0, listed
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "MODE", "RULES", "EPOCH", "STATE"]
    big, small = lines[1:]
    assert big.split()[:4] == ["big", "-", "-", "-"]
    assert "refused: too_large:" in big and "bound is 65536" in big
    assert small.split()[0] == "small" and small.endswith("ok")
    rows = json.loads(tfcrypt(etcd, wlapi, "policy", "list", "--json").stdout)
    assert [(r["name"], r["state"].split(":")[0]) for r in rows] == [
        ("big", "refused"), ("small", "ok")]


def test_workload_set_applies_the_readers_bound_and_list_shows_refusals(
        etcd: EtcdServer, wlapi: Server) -> None:
    ips = [arg for i in range(6000) for arg in ("--ip", f"10.1.{i // 250}.{i % 250 + 1}")]
    out = tfcrypt(etcd, wlapi, "workload", "set", "w1", "--node", "n1", *ips)
    assert out.returncode == 2, out
    line, = out.stderr.splitlines()
    assert "workloads/n1/w1" in line and "too_large" in line
    assert stored_keys(etcd) == []
    put_signed_raw(etcd, wlapi, "workloads/n1/w2",
                   {"kind": "Workload", "key": "workloads/n1/w2", "epoch": 1,
                    "issued_at": int(time.time()), "name": "w2", "node": "n1",
                    "ips": ["10.0.0.1"], "tags": ["application=a", "application=b"]})
    listed = tfcrypt(etcd, wlapi, "workload", "list")
    row, = listed.stdout.splitlines()[1:]
    assert row.split()[:2] == ["w2", "n1"] and "refused: invalid_field: payload.tags" in row


LAUGHS = ("apiVersion: tfcrypt.io/v1alpha1\nkind: EncryptionPolicy\nmetadata: {name: lol}\n"
          "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
          + "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
          + "spec:\n  rules:\n  - endpoint1: {subnet: *a9}\n    endpoint2: {any: true}\n")


@pytest.mark.parametrize(("content", "problem"), [
    (LAUGHS.encode(), "more than 200000 nodes once aliases are expanded"),
    (SMALL.replace("spec:\n", "spec:\n  mode: audit\n  mode: enforce\n").encode(),
     "duplicate key 'mode'"),
    (b"#" * (50 << 20), "the policy file is larger than 1048576 bytes: refused"),
    (SMALL.encode().replace(b"small", b"sm\xe4ll"), "the policy file is not UTF-8 text"),
], ids=["alias-bomb", "duplicate-key", "50MB", "latin-1"])
def test_bad_policy_files_end_in_exit_2_and_one_short_line(
        workdir: Path, content: bytes, problem: str) -> None:
    path = workdir / "p.yaml"
    path.write_bytes(content)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "tfcrypt", "policy", "apply", "-f", str(path),
                          "--etcd", "127.0.0.1:9", "--spiffe-socket", str(workdir / "none")],
                         capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 5
    assert (out.returncode, out.stdout) == (2, "")
    line, = out.stderr.splitlines()
    assert line.startswith(f"tfcrypt: -f {path}: " if "file" in problem else
                           f"tfcrypt: {path}: not valid YAML") and problem in line
    assert len(line) < 200


def test_a_bad_infrastructure_cidr_for_explain_is_one_line_and_exit_2(workdir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "tfcrypt", "explain", "10.0.0.1", "10.0.0.2",
                          "--infrastructure-cidr", "10.0.0.0/33", "--etcd", "127.0.0.1:9",
                          "--spiffe-socket", str(workdir / "none")],
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == ("tfcrypt: --infrastructure-cidr: '10.0.0.0/33' is not an address "
                          "or CIDR\n")


def test_envelope_version_2_stores_the_chain_once_and_a_missing_chain_is_named(
        etcd: EtcdServer, wlapi: Server, workdir: Path) -> None:
    (workdir / "small.yaml").write_text(SMALL)
    for name in ("small", "other"):
        (workdir / f"{name}.yaml").write_text(SMALL.replace("{name: small}", f"{{name: {name}}}"))
        out = tfcrypt(etcd, wlapi, "policy", "apply", "-f", str(workdir / f"{name}.yaml"),
                      "--envelope-version", "2")
        assert out.returncode == 0, out
    keys = stored_keys(etcd)
    chains = [k for k in keys if k.startswith("chains/")]
    assert len(chains) == 1 and keys == [*chains, "policies/other", "policies/small"]
    listed = tfcrypt(etcd, wlapi, "policy", "list", "--json")
    assert [r["state"] for r in json.loads(listed.stdout)] == ["ok", "ok"]

    async def drop(key: str) -> None:
        async with Registry([etcd.endpoint.removeprefix("http://")], prefix=PREFIX) as reg:
            await reg.delete(key)
    asyncio.run(drop(chains[0]))
    rows = json.loads(tfcrypt(etcd, wlapi, "policy", "list", "--json").stdout)
    assert [r["state"].split(":")[:2] for r in rows] == [["refused", " unknown_chain"]] * 2
    assert chains[0] in rows[0]["state"]
    # the next write puts the chain back: both values are believed again
    again = tfcrypt(etcd, wlapi, "policy", "apply", "-f", str(workdir / "small.yaml"),
                    "--envelope-version", "2")
    assert again.returncode == 0, again
    rows = json.loads(tfcrypt(etcd, wlapi, "policy", "list", "--json").stdout)
    assert [r["state"] for r in rows] == ["ok", "ok"], (stored_keys(etcd), again)
    bad = tfcrypt(etcd, wlapi, "policy", "apply", "-f", str(workdir / "small.yaml"),
                  "--envelope-version", "3")
    assert bad.returncode == 2 and "must be 1 or 2" in bad.stderr
