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


def _listing(s: Signers) -> dict[str, bytes]:
    return {"nodes/n1": s.record("n1", key_byte=1), "nodes/n2": s.record("n2", key_byte=2),
            "nodes/n3": s.record("n3", key_byte=3, signer="n1")}  # forged: refused


def test_prepared_results_apply_exactly_as_verifying_on_the_spot() -> None:
    """The agent verifies big lists in a thread (`check`) and applies them in one step:
    same records, same rejections counted once, same epochs, as the synchronous path."""
    s = Signers()
    items = _listing(s)
    direct, ahead = s.trusting(), s.trusting()
    direct.replace_all(items, NOW)
    prepared = ahead.check(ahead.pending(items), NOW)
    assert prepared is not None and set(prepared.results) == set(items)
    ahead.replace_all(items, NOW, prepared)
    assert ahead.records == direct.records and len(ahead.records) == 2
    assert ahead.rejections == direct.rejections == {"unauthorized": 1}
    assert ahead.epoch("nodes/n1") == direct.epoch("nodes/n1") == 5
    older = s.record("n1", epoch=4, key_byte=9)  # epochs are checked when applied
    stale_prepared = ahead.check({"nodes/n1": older}, NOW)
    ahead.replace_all({**items, "nodes/n1": older}, NOW, stale_prepared)
    assert ahead.records["nodes/n1"] == direct.records["nodes/n1"]
    assert ahead.rejections["rollback"] == 1


def test_prepared_results_are_not_trusted_beyond_what_they_were_checked_for() -> None:
    s = Signers()
    items = _listing(s)
    # checked under a rogue bundle: everything refused there; the real trust believes
    view = s.trusting()
    rogue = view.check(items, NOW, TrustBundles({TD: [s.rogue.cert]}), Authorizer(TD))
    assert rogue is not None
    assert all(c.rejected is not None for c in rogue.results.values())
    view.replace_all(items, NOW, rogue)
    assert set(view.records) == {"nodes/n1", "nodes/n2"}
    # a value that changed since it was checked is verified as it is now
    view2 = s.trusting()
    prepared = view2.check(items, NOW)
    forged = {**items, "nodes/n2": s.record("n2", epoch=9, key_byte=8, signer="n3")}
    view2.replace_all(forged, NOW, prepared)
    assert "nodes/n2" not in view2.records and view2.rejections["unauthorized"] == 2
    # a result whose chain expired before it was applied is not used
    view3 = s.trusting()
    prepared = view3.check(items, NOW)
    view3.replace_all(items, NOW + 2 * HOUR, prepared)
    assert view3.records == {} and view3.rejections["expired"] == 2


def _ski(ca: LabCA) -> str:
    from cryptography import x509
    return ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def test_a_ca_rotation_believes_both_roots_then_refuses_what_the_revoked_one_signed() -> None:
    """SPIRE's prepare / activate / revoke seen from one reader: while the bundle holds the
    old and the new root, records signed under either are believed and the view names
    which authority signed each; once the old root leaves the bundle, a record still
    signed under it stops being believed at once (its node's peer goes, fail-closed)
    and the refusal is counted, while the re-signed one stays."""
    s = Signers()
    new = LabCA.generate(TD, now=NOW)
    view = s.trusting()
    assert view.put("nodes/n1", s.record("n1"), NOW)
    assert view.put("nodes/n2", s.record("n2", key_byte=2), NOW)
    both = TrustBundles({TD: [s.ca.cert, new.cert]})
    assert not view.set_trust(both, Authorizer(TD), NOW)  # prepare: nothing changes
    view.put("nodes/n1", s.record("n1", key_byte=1, ca=new), NOW)  # n1 re-signed, same key
    assert view.rejections == {}
    assert view.authority == {"nodes/n1": _ski(new), "nodes/n2": _ski(s.ca)}
    assert view.set_trust(TrustBundles({TD: [new.cert]}), Authorizer(TD), NOW)  # revoke
    assert set(view.records) == {"nodes/n1"} and set(view.authority) == {"nodes/n1"}
    assert view.rejections == {"untrusted_chain": 1}
    assert "nodes/n2" in view.rejected and "nodes/n2" not in view.not_after
    # relisting the same write does not count it again; n2 re-signing brings it back
    view.replace_all(dict(view.raw), NOW)
    assert view.rejections == {"untrusted_chain": 1}
    assert view.put("nodes/n2", s.record("n2", key_byte=2, ca=new), NOW)
    assert set(view.records) == {"nodes/n1", "nodes/n2"}


def test_a_trust_change_keeps_the_real_record_under_a_refused_overwrite() -> None:
    """A forged value sitting in etcd at a key (refused, the real record kept) must not
    unseat the real record when the bundle changes for an unrelated reason."""
    s = Signers()
    view = s.trusting()
    assert view.put("nodes/n2", s.record("n2", key_byte=2), NOW)
    real = view.records["nodes/n2"]
    assert not view.put("nodes/n2", s.record("n2", key_byte=9, ca=s.rogue), NOW)
    other = LabCA.generate(TD, now=NOW)
    view.set_trust(TrustBundles({TD: [s.ca.cert, other.cert]}), Authorizer(TD), NOW)
    assert view.records["nodes/n2"] == real and view.authority["nodes/n2"] == _ski(s.ca)
    # but once the real record's root goes too, nothing at that key is believed
    view.set_trust(TrustBundles({TD: [other.cert]}), Authorizer(TD), NOW)
    assert "nodes/n2" not in view.records


def test_of_a_family_is_exactly_its_believed_records_through_every_change() -> None:
    """`of(prefix)` is kept per family (not a scan): it must follow puts, refusals,
    deletions, relists and trust changes exactly as `records` does."""
    s = Signers()
    view = s.trusting()

    def scanned() -> dict[str, object]:
        return {k: v for k, v in view.records.items() if k.startswith("nodes/")}

    view.put("nodes/n2", s.record("n2"), NOW)
    view.put("nodes/n3", s.record("n3"), NOW)
    view.put("nodes/n3", s.record("n3", key_byte=9, signer="n2"), NOW)  # refused
    assert view.of("nodes/") == scanned() and len(scanned()) == 2
    view.delete("nodes/n2")
    assert view.of("nodes/") == scanned() and list(scanned()) == ["nodes/n3"]
    view.replace_all({"nodes/n1": s.record("n1")}, NOW)
    assert view.of("nodes/") == scanned() and list(scanned()) == ["nodes/n1"]
    view.set_trust(TrustBundles({TD: [s.rogue.cert]}), Authorizer(TD), NOW)  # revoked
    assert view.of("nodes/") == scanned() == {}
    copy = view.of("nodes/")
    copy["nodes/x"] = None  # a copy: the caller cannot change the view
    assert view.of("nodes/") == {}
