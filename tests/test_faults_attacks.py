"""Fault injection, issue 8 scenarios 7-11: attacks on the inputs and the kernel state.

Key rotation and duplicate keys (7), forged/replayed/cross-domain/unauthorised records (8),
a hand flush of `inet tfcrypt` or a deleted ip rule (9), a burst of 1,000 updates (10),
malformed input everywhere (11). One lab (3 nodes x 2 workloads, examples/payments.yaml)
shared by the lab scenarios in file order; each leaves the lab healthy. n1-w1
(application=payments) is selected with every workload of n2 and n3; the harness flows
are n1-w1 <-> n2-w1 (selected) and n1-w2 <-> n2-w2 (shop <-> web, unselected). Harness
and its checks (a)-(d): tests/faults.py. Table and measured windows: docs/faults.md.

Writes "straight into etcd" go through one Python process in the controller namespace
(WRITER below): it signs payloads with the controller SVID from the controller's socket,
or stores raw bytes the test prepared (signed elsewhere, or garbage), per key in order.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import running_lab
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from faults import (
    FLOW_INTERVAL_S,
    PROTOS,
    Flow,
    Scenario,
    lab_workloads,
    load_policies,
    metrics,
    packet_times,
    publish,
    selected_pairs,
    status_json,
    successes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lab_workload_api.ca import LabCA
from labtools import PREFIX, etcdctl, fetch_svid, nft_table, run_in, sign_as, wait_for, wg_peers

from netns_lab import Lab, agents
from tfcrypt.errors import ConfigError
from tfcrypt.identity import Authorizer, TrustBundles, sign_envelope
from tfcrypt.identity.envelope import chain_value
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.families import families
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, parse_policy_document, policy_from_document
from tfcrypt.model.workload import Workload

TD = "lab.tfcrypt"
NOW = dt.datetime.now(dt.UTC)
HOUR = dt.timedelta(hours=1)
CONTROLLER_ID = f"spiffe://{TD}/tfcrypt/controller"


def node_id(node: str, td: str = TD) -> str:
    return f"spiffe://{td}/tfcrypt/node/{node}"


# ================================================================ 11. fuzz (no root)

class _Signers:
    """A trust domain with a controller and a node, as the agents' view would trust."""

    def __init__(self) -> None:
        self.ca = LabCA.generate(TD, now=NOW)
        self.controller = self.ca.issue(CONTROLLER_ID, HOUR, now=NOW)
        self.node = self.ca.issue(node_id("n2"), HOUR, now=NOW)

    def view(self) -> tuple[VerifiedView, list[str]]:
        counted: list[str] = []
        view = VerifiedView(families(), on_reject=counted.append)
        view.set_trust(TrustBundles({TD: [self.ca.cert]}), Authorizer(TD), NOW)
        return view, counted


SIGNERS = _Signers()
_T0 = int(NOW.timestamp())
VALID_PAYLOADS: dict[str, dict[str, Any]] = {
    "nodes/n2": NodeRecord(node="n2", spiffe_id=node_id("n2"), wg_public_key=base64.b64encode(
        b"\x02" * 32).decode(), endpoint="10.77.0.12:51820", workload_subnets=(), epoch=5,
        issued_at=_T0).to_payload(),
    "workloads/n2/w1": Workload("w1", "n2", ("10.200.2.11",), frozenset(
        {"application=web", "label=a"})).to_payload(epoch=5, issued_at=_T0),
    "policies/p": policy_from_document({
        "apiVersion": "tfcrypt.io/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": "p"}, "spec": {"mode": "enforce", "rules": [
            {"endpoint1": {"tags": ["application=payments"]}, "endpoint2": {"any": True},
             "match_tags": ["site"]}]}}).to_payload(epoch=5, issued_at=_T0),
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12)


@st.composite
def mutated_payload(draw: st.DrawFn, key: str) -> dict[str, Any]:
    """A valid payload of `key`'s family with fields replaced, removed or added."""
    payload = json.loads(json.dumps(VALID_PAYLOADS[key]))
    for _ in range(draw(st.integers(1, 3))):
        target: Any = payload
        path = draw(st.lists(st.sampled_from(["spec", "rules", 0, "endpoint1", "tags"]),
                             max_size=3))
        for step in path:
            nxt = (target.get(step) if isinstance(target, dict) and isinstance(step, str)
                   else target[step] if isinstance(target, list) and isinstance(step, int)
                   and len(target) > step else None)
            if not isinstance(nxt, (dict, list)):
                break
            target = nxt
        if isinstance(target, dict):
            field = draw(st.sampled_from([*sorted(target), "extra"]))
            if draw(st.booleans()):
                target[field] = draw(json_values)
            else:
                target.pop(field, None)
        elif isinstance(target, list):
            target.append(draw(json_values))
    return payload


@st.composite
def hostile_value(draw: st.DrawFn, key: str) -> bytes:
    """Anything a writer to etcd could put at `key`."""
    kind = draw(st.sampled_from(["bytes", "json", "envelope", "signed", "wrong_signer"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "envelope":
        env = json.loads(sign_envelope(VALID_PAYLOADS[key], SIGNERS.controller.key,
                                       SIGNERS.controller.chain))
        field = draw(st.sampled_from(sorted(env)))
        env[field] = draw(json_values)
        return json.dumps(env).encode()
    payload = draw(mutated_payload(key))
    signer = SIGNERS.node if key.startswith("nodes/") else SIGNERS.controller
    if kind == "wrong_signer":
        signer = SIGNERS.controller if signer is SIGNERS.node else SIGNERS.node
    return forge_envelope(payload, signer.key, signer.chain)


def forge_envelope(payload: object, key: Any, chain: Any) -> bytes:
    """An envelope around any payload, signed as sign_envelope would (which refuses
    payloads without the common fields: an attacker uses no such check)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    sig = key.sign(text.encode(), ec.ECDSA(hashes.SHA256()))
    return json.dumps({"v": 1, "payload": text, "sig": base64.b64encode(sig).decode(),
                       "chain": [base64.b64encode(c.public_bytes(serialization.Encoding.DER))
                                 .decode() for c in chain]}, sort_keys=True,
                      separators=(",", ":")).encode()


FAMILY_KEYS = st.sampled_from(sorted(VALID_PAYLOADS))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_11_malformed_values_in_every_family_are_counted_rejections(data: st.DataObject) -> None:
    key = data.draw(FAMILY_KEYS)
    value = data.draw(hostile_value(key))
    view, counted = SIGNERS.view()
    view.put(key, value, NOW)
    believed = key in view.records
    assert believed != (sum(view.rejections.values()) == 1), (believed, view.rejections)
    assert len(counted) == sum(view.rejections.values())
    if believed:   # a mutation that is still a valid record: the reader agrees with the parser
        assert json.loads(json.loads(value)["payload"])["key"] == key


CHAIN_REF, CHAIN_RAW = chain_value(SIGNERS.controller.chain)


@st.composite
def hostile_chain(draw: st.DrawFn) -> tuple[str, bytes]:
    """Anything a writer to etcd could put under chains/ (envelope version 2), with its
    hash right (the cheap part of a forgery) or wrong."""
    kind = draw(st.sampled_from(["bytes", "json", "field", "other_hash"]))
    if kind == "bytes":
        raw = draw(st.binary(max_size=300))
    elif kind == "json":
        raw = json.dumps(draw(json_values)).encode()
    elif kind == "field":
        obj = json.loads(CHAIN_RAW)
        obj[draw(st.sampled_from(["v", "chain", "extra"]))] = draw(json_values)
        raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    else:
        return hashlib.sha256(b"another").hexdigest(), CHAIN_RAW
    return hashlib.sha256(raw).hexdigest() if draw(st.booleans()) else CHAIN_REF, raw


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_11_hostile_chains_and_references_are_counted_rejections(data: st.DataObject) -> None:
    """Junk under chains/ is held (a real chain) or one counted rejection, never a crash,
    and a version-2 value naming anything but a held chain is one counted rejection."""
    view, counted = SIGNERS.view()
    ref, raw = data.draw(hostile_chain())
    view.put(f"chains/{ref}", raw, NOW)
    held = ref in view.chains
    assert held != (sum(view.rejections.values()) == 1), (held, view.rejections)
    key = "workloads/n2/w1"
    env = json.loads(sign_envelope(VALID_PAYLOADS[key], SIGNERS.controller.key,
                                   SIGNERS.controller.chain, by_ref=True))
    if data.draw(st.booleans()):
        env["chain_ref"] = data.draw(json_values | st.just(ref))
    view.put(key, json.dumps(env).encode(), NOW)
    believed = key in view.records
    assert believed == (env["chain_ref"] == ref and held and ref == CHAIN_REF)
    assert len(counted) == sum(view.rejections.values()) == (not held) + (not believed)


@st.composite
def policy_documents(draw: st.DrawFn) -> str:
    """YAML text: arbitrary, arbitrary JSON values, or a valid policy with a mutated spec."""
    kind = draw(st.sampled_from(["text", "json", "mutated"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "json":
        return yaml.safe_dump(draw(json_values))
    return yaml.safe_dump({"apiVersion": "tfcrypt.io/v1alpha1", "kind": "EncryptionPolicy",
                           "metadata": {"name": "p"},
                           "spec": draw(mutated_payload("policies/p")).get("spec")})


@settings(max_examples=300, deadline=None)
@given(doc=policy_documents())
def test_11_the_policy_parser_returns_a_policy_or_a_typed_error(doc: str) -> None:
    try:
        policy = parse_policy_document(doc, "fuzz")
    except ConfigError as e:
        assert str(e).startswith("fuzz")
    else:
        assert isinstance(policy, EncryptionPolicy)


# ================================================================ the lab scenarios

POLICIES = ("payments.yaml",)
TAGS = {
    "n1-w1": ["application=payments"],
    "n1-w2": ["application=shop"],
    "n2-w1": ["application=web"],
    "n2-w2": ["application=web"],
    "n3-w1": ["application=web"],
    "n3-w2": ["application=web"],
}
SELECTED = Flow("n1-w1", "n2-w1")
UNSELECTED = Flow("n1-w2", "n2-w2")
NODES = ("n1", "n2", "n3")
RECOVERY_BOUND_S = 10.0
REPAIR_BOUND_S = 1.0           # scenario 9: the issue's bound from the hand change to repair
SAVED: dict[str, bytes] = {}   # values kept by one scenario for a later one (the replay)

WRITER = '''
"""Write a plan of etcd values as fast as one process can: per key in order, keys in
parallel. Items: {"key", "payload"} (signed here with the controller SVID of SOCKET),
{"key", "raw": base64} or {"key", "delete": true}. Prints {"writes", "seconds"}."""
import asyncio, base64, json, sys, time
from urllib.parse import urlsplit
import aetcd
from tfcrypt.controller.session import fetch_svid
from tfcrypt.identity import sign_envelope

async def main(endpoint, plan_file, socket):
    plan = json.load(open(plan_file))
    svid = fetch_svid(socket)
    by_key = {}
    for item in plan:
        if "payload" in item:
            value = sign_envelope(item["payload"], svid.private_key, svid.chain)
        elif "raw" in item:
            value = base64.b64decode(item["raw"])
        else:
            value = None
        by_key.setdefault(item["key"].encode(), []).append(value)
    url = urlsplit(endpoint)
    async with aetcd.Client(host=url.hostname, port=url.port, timeout=20) as client:
        async def one(key, values):
            for value in values:
                if value is None:
                    await client.delete(key)
                else:
                    await client.put(key, value)
        started = time.monotonic()
        await asyncio.gather(*(one(k, v) for k, v in by_key.items()))
        took = time.monotonic() - started
    print(json.dumps({"writes": len(plan), "seconds": round(took, 3)}))

asyncio.run(main(*sys.argv[1:4]))
'''


def write_plan(lab: Lab, tmp: Path, plan: list[dict[str, Any]]) -> dict[str, Any]:
    """Run WRITER once in the controller namespace over `plan` (relative keys)."""
    script, plan_file = tmp / "writer.py", tmp / f"plan-{time.monotonic_ns()}.json"
    script.write_text(WRITER)
    plan_file.write_text(json.dumps([{**item, "key": f"{PREFIX}/{item['key']}"}
                                     for item in plan]))
    st_ = lab.status()
    out = run_in(lab, "controller", [*lab.identity_prefix(), sys.executable, str(script),
                                     st_["etcd"]["endpoints"][0], str(plan_file),
                                     st_["controller"]["spiffe_socket"]], timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def raw(value: bytes) -> str:
    return base64.b64encode(value).decode()


def healthy(lab: Lab, node: str) -> bool:
    rc, doc = status_json(lab, node)
    return rc == 0 and doc is not None and doc["health"]["healthy"]


def status(lab: Lab, node: str) -> dict[str, Any]:
    rc, doc = status_json(lab, node)
    assert doc is not None, f"no status from {node} (exit {rc})"
    return doc


def expected_allowed(wls: list[Workload], policies: list[EncryptionPolicy],
                     node: str) -> dict[str, frozenset[str]]:
    """Per remote node, the /32s `node`'s peer of it must allow (the pairwise definition)."""
    where = {ip: w.node for w in wls for ip in w.ips}
    out: dict[str, set[str]] = {}
    for pair in selected_pairs(wls, policies):
        for ip in pair:
            (other,) = pair - {ip}
            if where[ip] == node:
                out.setdefault(where[other], set()).add(f"{other}/32")
    return {n: frozenset(ips) for n, ips in out.items()}


def actual_allowed(lab: Lab, node: str) -> dict[str, frozenset[str]]:
    keys = {status(lab, n)["public_key"]: n for n in NODES if n != node}
    return {keys.get(k, k): p.allowed_ips for k, p in wg_peers(lab, node).items()
            if p.allowed_ips}


def kernel_state(lab: Lab, node: str) -> list[str]:
    """What the agent owns in the kernel, without counters and handshake times."""
    def out(*argv: str) -> str:
        return run_in(lab, node, list(argv)).stdout
    wg = sorted(" ".join(line.split("\t")[:4])
                for line in out("wg", "show", "tfcrypt0", "dump").splitlines())
    return [nft_table(lab, node), out("ip", "rule"),
            out("ip", "route", "show", "table", "29798"),
            out("ip", "route", "show", "table", "29799"), *wg]


def rejected_metric(lab: Lab, node: str) -> dict[str, float]:
    return {dict(labels)["reason"]: v for labels, v in
            metrics(lab, node).get("tfcrypt_records_rejected_total", {}).items()}


def reconciles(lab: Lab, node: str) -> float:
    return sum(metrics(lab, node).get("tfcrypt_reconciles_total", {}).values())


def scenario(lab: Lab, tmp_path: Path, name: str, bound: float = RECOVERY_BOUND_S) -> Scenario:
    initially = selected_pairs(lab_workloads(lab, TAGS), load_policies(POLICIES))
    return Scenario(lab, tmp_path, selected=SELECTED, unselected=UNSELECTED,
                    initially_selected=initially, recovery_bound_s=bound, name=name)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(nodes=3, workloads_per_node=2) as lab:
        publish(lab, TAGS, POLICIES)
        agents.start_all(lab)
        wls, pols = lab_workloads(lab, TAGS), load_policies(POLICIES)
        wait_for("every agent healthy with the expected peers", lambda: all(
            healthy(lab, n) and actual_allowed(lab, n) == expected_allowed(wls, pols, n)
            for n in NODES), timeout=60)
        yield lab


@pytest.fixture
def settled(lab: Lab) -> Iterator[Lab]:
    wait_for("every agent healthy", lambda: all(healthy(lab, n) for n in NODES), timeout=60)
    yield lab


def max_gap(lab_sc: Scenario, flow: Flow, since: float, until: float) -> float:
    """Longest stretch without a successful exchange, any direction and protocol."""
    gaps = []
    for s, d in ((flow.a, flow.b), (flow.b, flow.a)):
        for p in PROTOS:
            times = [since, *sorted(t for t in successes(lab_sc.log_of(s, d))[p]
                                    if since <= t <= until), until]
            gaps.append(max(b - a for a, b in itertools.pairwise(times)))
    return max(gaps)


# ---------------------------------------------------------------- 7. keys

@pytest.mark.lab
def test_7_key_rotated_under_traffic(settled: Lab, tmp_path: Path) -> None:
    lab = settled
    old_key = status(lab, "n2")["public_key"]
    SAVED["nodes/n2"] = etcdctl(lab, "get", "--print-value-only",
                                f"{PREFIX}/nodes/n2").rstrip("\n").encode()
    with scenario(lab, tmp_path, "rotate") as sc:
        sc.expect_report("n2 status shows a new key and a higher epoch",
                         lambda: status(lab, "n2")["public_key"] != old_key)
        sc.fault_started()
        run_in(lab, "n2", [sys.executable, "-m", "tfcrypt", "keys", "rotate", "--state-dir",
                           str(agents.state_dir(lab, "n2"))])
        sc.wait_reported()
        new_key = status(lab, "n2")["public_key"]
        wait_for("n1 and n3 to peer with n2's new key", lambda: all(
            new_key in wg_peers(lab, n) and old_key not in wg_peers(lab, n)
            for n in ("n1", "n3")), timeout=RECOVERY_BOUND_S)
        sc.fault_ended()
    gap = max_gap(sc, SELECTED, sc._started or 0, (sc._ended or 0) + 2)
    print(f"rotation: loss window {gap:.2f}s, {sc.result}")
    if gap > 3 * FLOW_INTERVAL_S:
        pytest.xfail(f"no loss (C5): selected exchanges stopped for {gap:.2f}s while peers "
                     "learnt the rotated key (no plaintext; recovered within the bound)")


@pytest.mark.lab
def test_7_two_nodes_publishing_one_key_get_no_peer_and_leak_nothing(
        settled: Lab, tmp_path: Path) -> None:
    lab = settled
    n1_key = status(lab, "n1")["public_key"]
    n3 = status(lab, "n3")
    underlay = next(n["underlay_ip"] for n in lab.status()["nodes"] if n["name"] == "n3")
    clone = NodeRecord(node="n3", spiffe_id=node_id("n3"), wg_public_key=n1_key,
                       endpoint=f"{underlay}:51820", workload_subnets=(), epoch=n3["epoch"],
                       issued_at=int(time.time()))
    with scenario(lab, tmp_path, "same-key") as sc:
        for node in ("n1", "n2"):
            sc.expect_report(f"{node} status reports the shared key", lambda node=node: any(
                "public key shared by n1, n3" in c for c in status(lab, node)["conflicts"]))
        sc.fault_started()
        assert agents.stop_agent(lab, "n3")   # else it republishes its own record at once
        etcdctl(lab, "put", f"{PREFIX}/nodes/n3", input=sign_as(lab, "n3", clone))
        sc.wait_reported()
        assert n1_key not in wg_peers(lab, "n2"), "n2 configured the shared key"
        assert n1_key not in wg_peers(lab, "n1")
        time.sleep(1.0)
        quiet_from = time.time()
        time.sleep(2.0)
        agents.start_agent(lab, "n3")
        wait_for("n3's own record back and n2 peering with n1 again", lambda:
                 n1_key in wg_peers(lab, "n2") and not status(lab, "n2")["conflicts"],
                 timeout=RECOVERY_BOUND_S)
        sc.fault_ended()
    dropped = max_gap(sc, SELECTED, quiet_from, quiet_from + 2.0)
    assert dropped >= 2.0 - 2 * FLOW_INTERVAL_S, \
        f"selected traffic still flowed while neither key was configured ({dropped:.2f}s gap)"
    print(f"same key: {sc.result}")


# ---------------------------------------------------------------- 8. forged records

@pytest.mark.lab
def test_8_forged_replayed_cross_domain_and_unauthorised_records_are_rejected(
        settled: Lab, tmp_path: Path) -> None:
    lab = settled
    now = int(time.time())
    n2 = status(lab, "n2")
    evil = LabCA.generate("evil.example")
    evil_node = evil.issue(node_id("n2", "evil.example"), HOUR)
    evil_ctl = evil.issue("spiffe://evil.example/tfcrypt/controller", HOUR)
    attacker_key = base64.b64encode(b"\x66" * 32).decode()

    def n2_record(spiffe_id: str, epoch: int) -> NodeRecord:
        return NodeRecord(node="n2", spiffe_id=spiffe_id, wg_public_key=attacker_key,
                          endpoint="10.77.0.13:51820", workload_subnets=(), epoch=epoch,
                          issued_at=now)

    grab = policy_from_document({
        "apiVersion": "tfcrypt.io/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": "grab"}, "spec": {"mode": "enforce", "rules": [
            {"endpoint1": {"any": True}, "endpoint2": {"any": True}}]}})
    grab_payload = grab.to_payload(epoch=now * 1000, issued_at=now)
    replay = SAVED.get("nodes/n2") or sign_as(lab, "n2", NodeRecord(
        node="n2", spiffe_id=node_id("n2"), wg_public_key=attacker_key,
        endpoint="10.77.0.13:51820", workload_subnets=(), epoch=n2["epoch"] - 1,
        issued_at=now))
    attacks = [
        ("forged: n2's record signed by n3", "nodes/n2", "unauthorized",
         sign_as(lab, "n3", n2_record(node_id("n3"), 2**40))),
        ("replayed: n2's own record of an older epoch", "nodes/n2", "rollback", replay),
        ("cross-domain: n2's record from evil.example", "nodes/n2", "unknown_trust_domain",
         sign_envelope(n2_record(node_id("n2", "evil.example"), 2**40).to_payload(),
                       evil_node.key, evil_node.chain)),
        ("cross-domain: a policy from evil.example's controller", "policies/grab",
         "unknown_trust_domain", sign_envelope(grab_payload, evil_ctl.key, evil_ctl.chain)),
        ("a policy signed by node n1", "policies/grab", "unauthorized",
         sign_as_payload(lab, "n1", grab_payload)),
    ]
    want: dict[str, int] = {}
    for _, _, reason, _ in attacks:
        want[reason] = want.get(reason, 0) + 1
    before = {n: kernel_state(lab, n) for n in ("n1", "n3")}
    counted = {n: status(lab, n)["rejected"] for n in ("n1", "n3")}
    metric = {n: rejected_metric(lab, n) for n in ("n1", "n3")}

    def advanced(node: str) -> bool:
        now_s, now_m = status(lab, node)["rejected"], rejected_metric(lab, node)
        return all(now_s.get(r, 0) - counted[node].get(r, 0) >= k
                   and now_m.get(r, 0) - metric[node].get(r, 0) >= k for r, k in want.items())

    with scenario(lab, tmp_path, "forged") as sc:
        for node in ("n1", "n3"):
            sc.expect_report(f"{node} counts every rejection by reason (status and metrics)",
                             lambda node=node: advanced(node))
        sc.fault_started()
        for _, key, _, value in attacks:   # one at a time: each must be seen and refused
            write_plan(lab, tmp_path, [{"key": key, "raw": raw(value)}])
            time.sleep(0.3)
        sc.wait_reported()
        time.sleep(1.0)
        after = {n: kernel_state(lab, n) for n in ("n1", "n3")}
        write_plan(lab, tmp_path, [{"key": "policies/grab", "delete": True}])
        sc.fault_ended()
    assert after == before, "a rejected record changed the dataplane"
    for node in ("n1", "n3"):
        assert "grab" not in status(lab, node)["policies"]["enforce"]
        assert attacker_key not in wg_peers(lab, node)
    wait_for("n2 to republish its overwritten record", lambda: status(lab, "n2")["public_key"]
             in etcdctl(lab, "get", "--print-value-only", f"{PREFIX}/nodes/n2"))
    print(f"forged: {sc.result}")


def sign_as_payload(lab: Lab, signer: str, payload: dict[str, Any]) -> bytes:
    """Any payload signed with node `signer`'s real SVID (fetched as that node)."""
    key, chain = fetch_svid(lab, signer)
    return sign_envelope(payload, key, chain)


# ---------------------------------------------------------------- 9. hand changes

def _nft_table(lab: Lab, node: str) -> str:
    return nft_table(lab, node, check=False)


def _log_size(lab: Lab, node: str) -> int:
    return Path(agents.running_agent(lab, node).log).stat().st_size  # type: ignore[union-attr]


def _changes_since(lab: Lab, node: str, since: int) -> str:
    """The agent's `dataplane_changed` log lines written after byte `since`."""
    log = Path(agents.running_agent(lab, node).log).read_bytes()[since:]  # type: ignore[union-attr]
    return "\n".join(line for line in log.decode(errors="replace").splitlines()
                     if "dataplane_changed" in line)


def _repair_window(lab: Lab, node: str, argv: list[str], probe: Any) -> tuple[float, float]:
    """(just before `argv` ran in `node`, when `probe()` held again), unix seconds."""
    start = time.time()
    run_in(lab, node, argv)
    while time.time() - start < 10 and not probe():
        time.sleep(0.005)
    return start, time.time()


OWN_CHANGES_S = 1.5  # the agent takes events within 1 s of its own change as its own
RESYNC_S = 5.0  # the lab agents' --resync-interval


def _away_from_the_resync(lab: Lab, node: str) -> None:
    """Wait until `node`'s next periodic full resync is seconds away. A resync that starts
    just before the hand change reads the kernel after it and repairs it itself, logged as
    "periodic resync": correct, but then the monitor's part is not what the test sees."""
    deadline = time.time() + 3 * RESYNC_S
    while time.time() < deadline:
        last = dt.datetime.fromisoformat(status(lab, node)["last_reconcile"]["at"])
        if 0.3 <= time.time() - last.timestamp() <= RESYNC_S - 2.0:
            return
        time.sleep(0.05)


@pytest.fixture
def n1_table_restored(settled: Lab) -> Iterator[Lab]:
    """If n1's agent did not repair its table, restart it (its first apply is full), so a
    failure here does not leave the next scenarios on a node without classification."""
    table = _nft_table(settled, "n1")
    yield settled
    if _nft_table(settled, "n1") != table:
        agents.stop_agent(settled, "n1")
        agents.start_agent(settled, "n1")
        wait_for("n1's table back after an agent restart",
                 lambda: _nft_table(settled, "n1") == table, timeout=30)


@pytest.mark.lab
def test_9_a_hand_flush_is_repaired_within_a_second_and_strict_ingress_drops_the_rest(
        n1_table_restored: Lab, tmp_path: Path) -> None:
    lab = n1_table_restored
    table = _nft_table(lab, "n1")
    drops_before = status(lab, "n2")["drops"]["strict_ingress"]["packets"]
    initially = selected_pairs(lab_workloads(lab, TAGS), load_policies(POLICIES))
    with scenario(lab, tmp_path, "flush") as sc:
        mark = _log_size(lab, "n1")
        sc.expect_report("n1 logs the repair, caused by the nft events",
                         lambda: "nft delete" in _changes_since(lab, "n1", mark))
        time.sleep(OWN_CHANGES_S)   # a hand change, not one racing the agent's own
        _away_from_the_resync(lab, "n1")
        sc.fault_started()
        opened, closed = _repair_window(lab, "n1", ["nft", "flush", "table", "inet", "tfcrypt"],
                                        lambda: _nft_table(lab, "n1") == table)
        sc.set_selected(frozenset(), at=opened)   # the window is judged below, not by (a)
        sc.set_selected(initially, at=closed)
        window = closed - opened
        sc.wait_reported()
        sc.fault_ended()
    a, b = sorted(sc.pair(SELECTED.a, SELECTED.b))
    n1_ip, n2_ip = (a, b) if a.startswith("10.200.1.") else (b, a)
    leaked_out = [t for t in packet_times(sc.pcap, f"inbound and src host {n1_ip} and "
                                          f"dst host {n2_ip}") if opened <= t <= closed]
    leaked_back = [t for t in packet_times(sc.pcap, f"src host {n2_ip} and dst host {n1_ip}")
                   if opened <= t <= closed]
    drops = status(lab, "n2")["drops"]["strict_ingress"]["packets"] - drops_before
    print(f"flush: repaired after {window * 1000:.0f} ms; {len(leaked_out)} plaintext "
          f"packets n1->n2 in the window, n2 strict ingress dropped {drops}; {sc.result}")
    assert window < REPAIR_BOUND_S, f"repaired after {window:.2f}s"
    assert not leaked_back, "n2 answered in plaintext: its classification was intact"
    assert drops >= len(leaked_out), "plaintext crossed that n2's strict ingress did not drop"


@pytest.mark.lab
def test_9_a_hand_deleted_ip_rule_is_repaired_within_a_second_and_nothing_leaks(
        settled: Lab, tmp_path: Path) -> None:
    lab = settled

    def rules() -> str:
        return run_in(lab, "n1", ["ip", "rule"]).stdout

    before = rules()
    with scenario(lab, tmp_path, "rule-del") as sc:
        mark = _log_size(lab, "n1")
        sc.expect_report("n1 logs the repair, caused by the netlink event",
                         lambda: "ip rule deleted at 1820" in _changes_since(lab, "n1", mark))
        time.sleep(OWN_CHANGES_S)
        _away_from_the_resync(lab, "n1")
        sc.fault_started()
        opened, closed = _repair_window(lab, "n1", ["ip", "rule", "del", "priority", "1820"],
                                        lambda: rules() == before)
        window = closed - opened
        sc.wait_reported()
        sc.fault_ended()
    print(f"rule deleted: repaired after {window * 1000:.0f} ms; {sc.result}")
    assert window < REPAIR_BOUND_S, f"repaired after {window:.2f}s"


# ---------------------------------------------------------------- 10. burst

GHOSTS = 50
CHURN = 50


def burst_plan(lab: Lab) -> tuple[list[dict[str, Any]], list[Workload], list[EncryptionPolicy]]:
    """1,000 controller writes: 50 ghost workloads on n3 flipping between payments and web
    10 times each, 50 policies rewritten 9 times each, n1-w1 and n2-w1 rewritten 25 times
    each with tags that keep them selected. Returns the plan and the final inventory."""
    base = int(time.time() * 1000) + 60_000
    ips = {w["name"]: w["ip"] for w in lab.status()["workloads"]}
    plan: list[dict[str, Any]] = []
    final_wls = {w.name: w for w in lab_workloads(lab, TAGS)}
    final_pols: dict[str, EncryptionPolicy] = {}
    for i in range(10):
        for j in range(GHOSTS):
            app = "payments" if (i + j) % 2 else "web"
            w = Workload(f"ghost-{j}", "n3", (f"10.200.3.{100 + j}",),
                         frozenset({f"application={app}"}))
            plan.append({"key": w.key, "payload": w.to_payload(epoch=base + i, issued_at=0)})
            final_wls[w.name] = w
    for i in range(9):
        for k in range(CHURN):
            pol = policy_from_document({
                "apiVersion": "tfcrypt.io/v1alpha1", "kind": "EncryptionPolicy",
                "metadata": {"name": f"churn-{k}"}, "spec": {"mode": "enforce", "rules": [
                    {"endpoint1": {"tags": [f"application=churn-{i}"]},
                     "endpoint2": {"tags": [f"tier=t{k}"]}}]}})
            plan.append({"key": pol.key, "payload": pol.to_payload(epoch=base + i,
                                                                    issued_at=0)})
            final_pols[pol.name] = pol
    for i in range(25):
        for name in ("n1-w1", "n2-w1"):
            tags = {*TAGS[name], *(["site=a"] if i % 2 else [])}
            w = Workload(name, name[:2], (ips[name],), frozenset(tags))
            plan.append({"key": w.key, "payload": w.to_payload(epoch=base + i, issued_at=0)})
            final_wls[name] = w
    now = int(time.time())
    for item in plan:
        item["payload"]["issued_at"] = now
    return plan, list(final_wls.values()), [*load_policies(POLICIES), *final_pols.values()]


@pytest.mark.lab
def test_10_a_burst_of_1000_updates_coalesces_converges_and_never_leaks(
        settled: Lab, tmp_path: Path) -> None:
    lab = settled
    plan, final_wls, final_pols = burst_plan(lab)
    assert len(plan) == 1000
    before = {n: reconciles(lab, n) for n in NODES}
    want = {n: expected_allowed(final_wls, final_pols, n) for n in NODES}
    with scenario(lab, tmp_path, "burst") as sc:
        sc.expect_report("n2 peers n3 with the ghosts that ended as payments",
                         lambda: actual_allowed(lab, "n2") == want["n2"])
        sc.fault_started()
        wrote = write_plan(lab, tmp_path, plan)
        sc.wait_reported(timeout=30)
        wait_for("every agent at the final state", lambda: all(
            actual_allowed(lab, n) == want[n] for n in NODES), timeout=30)
        sc.fault_ended()
    done = {n: reconciles(lab, n) - before[n] for n in NODES}
    print(f"burst: {wrote}, reconciles per node {done}; {sc.result}")
    for n in NODES:
        assert done[n] < len(plan) / 5, f"{n} reconciled {done[n]} times for 1,000 updates"
        assert status(lab, n)["selected_pairs"] == sum(
            1 for p in selected_pairs(final_wls, final_pols)
            if n in {w.node for w in final_wls if set(w.ips) & p})
    cleanup = [{"key": f"workloads/n3/ghost-{j}", "delete": True} for j in range(GHOSTS)]
    cleanup += [{"key": f"policies/churn-{k}", "delete": True} for k in range(CHURN)]
    write_plan(lab, tmp_path, cleanup)


# ---------------------------------------------------------------- 11. garbage in the lab

@pytest.mark.lab
def test_11_a_running_agent_survives_a_burst_of_garbage(settled: Lab, tmp_path: Path) -> None:
    lab = settled
    drawn: dict[bytes, str] = {}

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def draw(data: st.DataObject) -> None:
        key = data.draw(FAMILY_KEYS)
        drawn.setdefault(data.draw(hostile_value(key)), key.partition("/")[0])

    draw()
    values = [(f"workloads/n3/g{i}" if family == "workloads" else f"{family}/g{i}", value)
              for i, (value, family) in enumerate(list(drawn.items())[:300])]
    assert len(values) >= 200
    # scenario 10's cleanup leaves deleted workloads lingering (workload_grace, 30 s): the
    # kernel state compared below must not change by their expiry in between
    wait_for("no lingering workloads on n1", lambda: status(
        lab, "n1")["lingering_workloads"]["count"] == 0, timeout=45)
    before_state = kernel_state(lab, "n1")
    before = {n: sum(status(lab, n)["rejected"].values()) for n in ("n1", "n3")}
    wrote = write_plan(lab, tmp_path, [{"key": k, "raw": raw(v)} for k, v in values])

    def counted(node: str) -> int:
        return sum(status(lab, node)["rejected"].values()) - before[node]

    wait_for("both agents to count every garbage value", lambda: all(
        counted(n) >= len(values) for n in ("n1", "n3")), timeout=30)
    write_plan(lab, tmp_path, [{"key": k, "delete": True} for k, _ in values])
    print(f"garbage: {wrote}, counted {[counted(n) for n in ('n1', 'n3')]}")
    for node in NODES:
        assert agents.running_agent(lab, node) is not None, f"{node}'s agent died"
        assert healthy(lab, node)
    assert all(counted(n) == len(values) for n in ("n1", "n3"))
    assert kernel_state(lab, "n1") == before_state


# ---------------------------------------------------------------- 14. hostile keys

HOSTILE_KEYS = (b"nodes/\xff\xfe", "nodes/\u202eevil".encode(), b"workloads/n3/\x1b[2Jx")
HOSTILE_SHOWN = ("nodes/\\xff\\xfe", "nodes/\\u202eevil", "workloads/n3/\\x1b[2Jx")


def _raw_etcdctl(lab: Lab, *args: str | bytes) -> None:
    """etcdctl with raw byte arguments (a key that is not UTF-8), as any etcd client
    with write access could."""
    endpoints = ",".join(lab.status()["etcd"]["endpoints"])
    run_in(lab, "controller", ["etcdctl", f"--endpoints={endpoints}", *args])  # type: ignore[list-item]


def _log_since(lab: Lab, node: str, since: int) -> bytes:
    return Path(agents.running_agent(lab, node).log).read_bytes()[since:]  # type: ignore[union-attr]


@pytest.mark.lab
def test_14_keys_of_any_bytes_are_counted_once_logged_escaped_and_kill_no_agent(
        settled: Lab) -> None:
    """Issue #14 item 1: on main one key that is not UTF-8 made every agent exit
    (UnicodeEncodeError) within seconds, and again at every restart."""
    lab = settled
    pids = {n: agents.running_agent(lab, n).pid for n in NODES}  # type: ignore[union-attr]
    peers = {n: set(wg_peers(lab, n)) for n in NODES}
    before = {n: status(lab, n)["rejected"] for n in NODES}
    before_metric = {n: rejected_metric(lab, n) for n in NODES}
    logs = {n: _log_size(lab, n) for n in NODES}
    for key in HOSTILE_KEYS:
        _raw_etcdctl(lab, "put", PREFIX.encode() + b"/" + key, "junk")
    try:
        def new(node: str) -> dict[str, int]:
            now = status(lab, node)["rejected"]
            return {r: now[r] - before[node].get(r, 0) for r in now
                    if now[r] != before[node].get(r, 0)}

        wait_for("every agent to count the three hostile keys", lambda: all(
            new(n) == {"malformed": 3} for n in NODES), timeout=RECOVERY_BOUND_S)
        time.sleep(2.0)  # any second count (or a crash) would show by now
        for node in NODES:
            rec = agents.running_agent(lab, node)
            assert rec is not None and rec.pid == pids[node], f"{node}'s agent died"
            assert healthy(lab, node) and set(wg_peers(lab, node)) == peers[node]
            assert new(node) == {"malformed": 3}
            grown = {r: v - before_metric[node].get(r, 0.0)
                     for r, v in rejected_metric(lab, node).items()}
            assert {r: v for r, v in grown.items() if v} == {"malformed": 3.0}
            log = _log_since(lab, node, logs[node])
            assert "\u202e".encode() not in log and b"\xff" not in log and b"\x1b" not in log
            text = log.decode()
            for shown in HOSTILE_SHOWN:
                assert text.count(f"rejected {shown}: malformed") == 1, (shown, text)
        # a restart with the keys still there (on main: the agent exited again at once)
        restarted_at = _log_size(lab, "n3")  # the log is appended to
        assert agents.stop_agent(lab, "n3")
        agents.start_agent(lab, "n3")
        wait_for("n3's restarted agent healthy with its peers", lambda: healthy(
            lab, "n3") and set(wg_peers(lab, "n3")) == peers["n3"], timeout=60)
        time.sleep(2.0)
        assert agents.running_agent(lab, "n3") is not None, "n3's agent died after restart"
        text = _log_since(lab, "n3", restarted_at).decode()
        assert all(text.count(f"rejected {shown}: malformed") == 1 for shown in HOSTILE_SHOWN)
    finally:
        for key in HOSTILE_KEYS:
            _raw_etcdctl(lab, "del", PREFIX.encode() + b"/" + key)
    print("hostile keys: counted once by every agent, logged escaped, no agent died")
