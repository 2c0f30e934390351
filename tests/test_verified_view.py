"""The verified view of etcd: what a reader believes, and what it refuses."""

from __future__ import annotations

import base64
import datetime as dt

from lab_workload_api.ca import LabCA

from tfcrypt.identity import Authorizer, TrustBundles, sign_envelope
from tfcrypt.identity.view import Family, VerifiedView
from tfcrypt.model.node import NodeRecord

TD = "lab.tfcrypt"
NOW = dt.datetime.now(dt.UTC)
HOUR = dt.timedelta(hours=1)


def node_id(n: str) -> str:
    return f"spiffe://{TD}/tfcrypt/node/{n}"


def new_view() -> VerifiedView:
    return VerifiedView({"nodes/": Family(NodeRecord.from_verified)})


class Signers:
    def __init__(self) -> None:
        self.ca = LabCA.generate(TD, now=NOW)
        self.rogue = LabCA.generate(TD, now=NOW)
        self.svids = {n: self.ca.issue(node_id(n), HOUR, now=NOW) for n in ("n1", "n2", "n3")}

    def record(self, node: str, epoch: int = 5, key_byte: int = 1, signer: str | None = None,
               ca: LabCA | None = None) -> bytes:
        rec = NodeRecord(node=node, spiffe_id=node_id(signer or node),
                         wg_public_key=base64.b64encode(bytes([key_byte]) * 32).decode(),
                         endpoint="10.77.0.12:51820", workload_subnets=("10.200.2.0/24",),
                         epoch=epoch, issued_at=1)
        payload = rec.to_payload()
        if signer:
            payload["spiffe_id"] = node_id(signer)
        svid = (ca or self.ca).issue(node_id(signer or node), HOUR, now=NOW) if ca or signer \
            else self.svids[node]
        return sign_envelope(payload, svid.key, svid.chain)

    def trusting(self) -> VerifiedView:
        view = new_view()
        view.set_trust(TrustBundles({TD: [self.ca.cert]}), Authorizer(TD), NOW)
        return view


def test_forged_overwrite_is_counted_and_the_real_record_stays() -> None:
    s = Signers()
    view = s.trusting()
    assert view.put("nodes/n2", s.record("n2", key_byte=2), NOW)
    real = view.records["nodes/n2"]
    assert not view.put("nodes/n2", s.record("n2", key_byte=9, signer="n3"), NOW)
    assert not view.put("nodes/n2", s.record("n2", key_byte=9, ca=s.rogue), NOW)
    assert view.records["nodes/n2"] == real
    assert view.rejections == {"unauthorized": 1, "untrusted_chain": 1}


def test_a_deletion_is_honoured() -> None:
    s = Signers()
    view = s.trusting()
    view.put("nodes/n2", s.record("n2"), NOW)
    assert view.delete("nodes/n2")
    assert "nodes/n2" not in view.records


def test_rollback_to_an_older_epoch_is_refused() -> None:
    s = Signers()
    view = s.trusting()
    view.put("nodes/n2", s.record("n2", epoch=7, key_byte=7), NOW)
    view.put("nodes/n2", s.record("n2", epoch=6, key_byte=6), NOW)
    assert view.records["nodes/n2"].epoch == 7
    assert view.rejections == {"rollback": 1}


def test_values_before_the_bundle_are_verified_when_it_arrives() -> None:
    s = Signers()
    view = new_view()
    view.replace_all({"nodes/n2": s.record("n2"), "nodes/n3": b"{garbage"}, NOW)
    assert view.records == {}
    assert view.set_trust(TrustBundles({TD: [s.ca.cert]}), Authorizer(TD), NOW)
    assert set(view.records) == {"nodes/n2"}
    assert view.rejections == {"malformed": 1}


def test_a_relist_drops_missing_keys_and_does_not_recount_rejections() -> None:
    s = Signers()
    view = s.trusting()
    bad = s.record("n3", signer="n2")
    view.replace_all({"nodes/n2": s.record("n2"), "nodes/n3": bad}, NOW)
    view.replace_all({"nodes/n3": bad}, NOW)
    assert view.records == {}
    assert view.rejections == {"unauthorized": 1}


def test_records_of_expired_signers_become_stale() -> None:
    s = Signers()
    view = s.trusting()
    view.put("nodes/n2", s.record("n2"), NOW)
    assert view.expire(NOW + 2 * HOUR)
    assert view.records == {}


def test_other_key_families_are_not_this_views_business() -> None:
    view = Signers().trusting()
    assert not view.put("policies/p", b"x", NOW)
    assert view.rejections == {}
