"""Chains stored once (envelope version 2, issue #18 item 3): a value names its writer's
chain by hash, and a reader believes it exactly as it would the same value with the chain
attached, or refuses it, counted, when the chain is missing or is not what it is named."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from lab_workload_api.ca import LabCA

from tfcrypt.identity import Authorizer, TrustBundles, sign_envelope
from tfcrypt.identity import view as view_module
from tfcrypt.identity.envelope import CHAINS, chain_value
from tfcrypt.identity.verify import ChainTime
from tfcrypt.identity.view import Family, VerifiedView
from tfcrypt.model.workload import Workload

TD = "lab.tfcrypt"
NOW = dt.datetime.now(dt.UTC)
HOUR = dt.timedelta(hours=1)
CONTROLLER = f"spiffe://{TD}/tfcrypt/controller"


class World:
    def __init__(self) -> None:
        self.ca = LabCA.generate(TD, now=NOW)
        self.rogue = LabCA.generate(TD, now=NOW)
        self.svid = self.ca.issue(CONTROLLER, HOUR, now=NOW)
        self.ref, self.chain = chain_value(self.svid.chain)

    def workload(self, i: int, *, by_ref: bool = True, svid: object = None,
                 epoch: int = 1) -> tuple[str, bytes]:
        w = Workload(name=f"w{i}", node="n1", ips=(f"10.1.{i // 250}.{i % 250 + 1}",),
                     tags=frozenset({f"application=a{i % 3}"}))  # type: ignore[arg-type]
        s = svid or self.svid
        payload = w.to_payload(epoch=epoch, issued_at=int(NOW.timestamp()))
        return w.key, sign_envelope(payload, s.key, s.chain, by_ref=by_ref)  # type: ignore[attr-defined]

    def view(self) -> VerifiedView:
        v = VerifiedView({"workloads/": Family(Workload.from_verified, ChainTime.ISSUED_AT)})
        v.set_trust(TrustBundles({TD: [self.ca.cert]}), Authorizer(TD), NOW)
        return v


def test_a_value_naming_its_stored_chain_is_believed_as_with_the_chain_attached() -> None:
    w = World()
    key, by_ref = w.workload(1)
    _, attached = w.workload(1, by_ref=False)
    assert json.loads(by_ref)["chain_ref"] == w.ref and "chain" not in json.loads(by_ref)
    assert len(by_ref) * 2 < len(attached)  # the point: the chain is most of a record
    ref_view, att_view = w.view(), w.view()
    assert ref_view.put(CHAINS + w.ref, w.chain, NOW) is False  # a chain is no record
    assert ref_view.put(key, by_ref, NOW)
    assert att_view.put(key, attached, NOW)
    assert ref_view.records == att_view.records
    assert ref_view.authority == att_view.authority
    assert ref_view.rejections == {}


def test_a_missing_chain_is_a_counted_refusal_until_it_arrives() -> None:
    w = World()
    view = w.view()
    key, value = w.workload(1)
    assert not view.put(key, value, NOW)
    assert view.rejections == {"unknown_chain": 1}
    assert f"chains/{w.ref}" in view.last_rejection[key]
    assert view.put(CHAINS + w.ref, w.chain, NOW)  # the refused value is believed now
    assert key in view.records and key not in view.rejected


def test_a_listing_finds_the_chain_whatever_the_order_of_its_items() -> None:
    w = World()
    records = dict(w.workload(i) for i in range(5))
    items = records | {CHAINS + w.ref: w.chain}  # the chain last
    view = w.view()
    prepared = view.check(view.pending(items), NOW)
    view.replace_all(items, NOW, prepared)
    assert sorted(view.records) == sorted(records)
    assert view.rejections == {}


def test_a_chain_value_that_is_not_what_its_key_names_is_refused_and_never_used() -> None:
    w = World()
    view = w.view()
    key, value = w.workload(1)
    other_ref, other_chain = chain_value(w.ca.issue(CONTROLLER, HOUR, now=NOW).chain)
    view.put(CHAINS + w.ref, other_chain, NOW)  # a real chain, stored under another hash
    view.put(CHAINS + "0" * 64, b'{"chain":[],"v":1}', NOW)
    view.put(key, value, NOW)
    assert view.rejections == {"key_mismatch": 2, "unknown_chain": 1}
    assert "sha256" in view.last_rejection[CHAINS + w.ref]
    assert key not in view.records and view.chains == {}
    assert other_ref != w.ref


def test_a_stored_chain_is_checked_exactly_as_an_attached_one() -> None:
    w = World()
    view = w.view()
    rogue = w.rogue.issue(CONTROLLER, HOUR, now=NOW)  # a well-formed chain we do not trust
    rogue_ref, rogue_chain = chain_value(rogue.chain)
    view.put(CHAINS + rogue_ref, rogue_chain, NOW)  # held: its bytes are what it is named
    key, value = w.workload(1, svid=rogue)
    view.put(key, value, NOW)
    assert view.rejections == {"untrusted_chain": 1}
    assert key not in view.records


def test_deleting_a_chain_keeps_what_was_believed_and_refuses_new_writes_naming_it() -> None:
    w = World()
    view = w.view()
    view.put(CHAINS + w.ref, w.chain, NOW)
    key, value = w.workload(1)
    view.put(key, value, NOW)
    assert view.delete(CHAINS + w.ref) is False
    assert key in view.records  # verified, unchanged: the deletion changes nothing believed
    key2, value2 = w.workload(2)
    view.put(key2, value2, NOW)  # a new write naming it: still held, for key's sake
    assert key2 in view.records
    view.delete(key)
    view.delete(key2)
    assert view.chains == {}  # nobody uses it and etcd no longer has it
    key3, value3 = w.workload(3)
    view.put(key3, value3, NOW)
    assert view.rejections == {"unknown_chain": 1}
    # a fresh reader of an etcd without the chain believes nothing that names it
    fresh = w.view()
    fresh.replace_all({key: value, key2: value2}, NOW)
    assert fresh.records == {} and fresh.rejections == {"unknown_chain": 2}


def test_held_chains_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(view_module, "MAX_CHAINS", 2)
    w = World()
    view = w.view()
    chains = [chain_value(w.ca.issue(CONTROLLER, HOUR, now=NOW).chain) for _ in range(3)]
    for ref, raw in chains:
        view.put(CHAINS + ref, raw, NOW)
    assert len(view.chains) == 2
    assert view.rejections == {"too_large": 1}
    assert "2 chains are held" in view.last_rejection[CHAINS + chains[2][0]]


def test_verifying_on_every_core_gives_what_one_thread_gives(
        monkeypatch: pytest.MonkeyPatch) -> None:
    w = World()
    items = dict(w.workload(i) for i in range(60))
    items[CHAINS + w.ref] = w.chain
    bad_key, _ = w.workload(61)
    items[bad_key] = w.workload(62)[1]  # stored at another key: key_mismatch
    forged_key, value = w.workload(63)
    env = json.loads(value)
    env["sig"] = json.loads(w.workload(64)[1])["sig"]  # another value's signature
    items[forged_key] = json.dumps(env).encode()
    node = w.ca.issue(f"spiffe://{TD}/tfcrypt/node/n1", HOUR, now=NOW)
    intruder_key, items_value = w.workload(65, svid=node, by_ref=False)
    items[intruder_key] = items_value  # a node may not write workloads
    view = w.view()
    one = view.check(items, NOW)
    monkeypatch.setattr(view_module, "PARALLEL_MIN", 1)
    monkeypatch.setattr(view_module.os, "cpu_count", lambda: 4)
    many = view.check(items, NOW)
    assert one is not None and many is not None
    assert one.results.keys() == many.results.keys()
    for key, checked in one.results.items():
        assert many.results[key].record == checked.record
        assert str(many.results[key].rejected) == str(checked.rejected)
    assert str(many.results[bad_key].rejected).startswith("key_mismatch")
    assert str(many.results[forged_key].rejected).startswith("bad_signature")
    assert str(many.results[intruder_key].rejected).startswith("unauthorized")
    assert sum(c.record is not None for c in many.results.values()) == 60
