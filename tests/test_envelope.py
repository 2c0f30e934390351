"""Signed envelopes: every rejection reason, the accepted key types, and fuzzing.

Certificates are real X509-SVIDs minted by the lab CA; `now` is fixed so nothing here
depends on the clock. Each rejection test also proves the reader's EpochBook did not move.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lab_workload_api.ca import LabCA, build_leaf
from spiffe.bundle.x509_bundle.x509_bundle import X509Bundle
from spiffe.bundle.x509_bundle.x509_bundle_set import X509BundleSet
from spiffe.spiffe_id.spiffe_id import TrustDomain

from tfcrypt.errors import ConfigError, Rejected, RejectReason
from tfcrypt.identity import (
    Authorizer,
    ChainTime,
    EpochBook,
    TrustBundles,
    Verified,
    canonical_json,
    sign_envelope,
    verify_envelope,
)

TD = "lab.tfcrypt"
NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
BACKDATE = dt.timedelta(seconds=30)
CONTROLLER = f"spiffe://{TD}/tfcrypt/controller"


def node_id(name: str, td: str = TD) -> str:
    return f"spiffe://{td}/tfcrypt/node/{name}"


class World:
    """Two trust domains we trust, one rogue CA impersonating ours, and a reader's state."""

    def __init__(self) -> None:
        self.lab = LabCA.generate(TD, now=NOW - HOUR)
        self.evil = LabCA.generate("evil.example", now=NOW - HOUR)
        self.rogue = LabCA.generate(TD, now=NOW - HOUR)
        self.bundles = TrustBundles({TD: [self.lab.cert], "evil.example": [self.evil.cert]})
        self.authorizer = Authorizer(TD)

    def svid(self, spiffe_id: str, ca: LabCA | None = None, **leaf_args: Any
             ) -> tuple[Any, tuple[x509.Certificate, ...]]:
        ca = ca or self.lab
        key = leaf_args.pop("key", None) or ec.generate_private_key(ec.SECP256R1())
        leaf_args.setdefault("uris", [spiffe_id])
        leaf_args.setdefault("not_before", NOW - BACKDATE)
        leaf_args.setdefault("not_after", NOW + HOUR)
        leaf = build_leaf(ca, key.public_key(), **leaf_args)
        return key, (leaf,)

    def verify(self, raw: bytes, key: str, now: dt.datetime = NOW, **kw: Any) -> Verified:
        return verify_envelope(raw, key, bundles=self.bundles, authorizer=self.authorizer,
                               now=now, **kw)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def payload(key: str, epoch: int = 9, kind: str = "NodeRecord", **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "key": key, "epoch": epoch, "issued_at": 1748779200, **fields}


def node_value(world: World, name: str = "n1", **kw: Any) -> bytes:
    key, chain = world.svid(node_id(name))
    return sign_envelope(payload(f"nodes/{name}", **kw), key, chain)


def envelope_of(text: str, key: Any, chain: Sequence[x509.Certificate]) -> bytes:
    """An envelope around arbitrary payload text, to test what sign_envelope refuses to build."""
    data = text.encode()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    else:
        sig = key.sign(data)
    return json.dumps({
        "v": 1, "payload": text, "sig": base64.b64encode(sig).decode(),
        "chain": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                  for c in chain],
    }).encode()


def edit_envelope(raw: bytes, **changes: Any) -> bytes:
    obj = json.loads(raw)
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.fixture
def book(world: World) -> EpochBook:
    """A reader that already accepted epoch 5 for nodes/n1 and nodes/n2 and policies/x."""
    b = EpochBook()
    ckey, cchain = world.svid(CONTROLLER)
    for raw, key in [(node_value(world, "n1", epoch=5), "nodes/n1"),
                     (node_value(world, "n2", epoch=5), "nodes/n2"),
                     (sign_envelope(payload("policies/x", 5, "EncryptionPolicy"), ckey, cchain),
                      "policies/x")]:
        b.accept(world.verify(raw, key))
    return b


def assert_rejected(world: World, book: EpochBook, reason: RejectReason,
                    read: Callable[[], Verified]) -> Rejected:
    """Run a reader's full path (verify, check epoch, accept) and prove nothing moved."""
    before = book.snapshot()
    with pytest.raises(Rejected) as info:
        verified = read()
        book.accept(verified)
    assert info.value.reason is reason, info.value
    assert book.snapshot() == before
    return info.value


# --- accepted values -------------------------------------------------------------------

@pytest.mark.parametrize("make_key", [
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ed25519.Ed25519PrivateKey.generate,
], ids=["ec-p256", "ec-p384", "rsa-2048", "ed25519"])
def test_valid_record_verifies_for_each_leaf_key_type(world: World, make_key: Any) -> None:
    key, chain = world.svid(node_id("n1"), key=make_key())
    raw = sign_envelope(payload("nodes/n1", endpoint="10.0.0.1:51820"), key, chain)
    v = world.verify(raw, "nodes/n1")
    assert (v.key, v.kind, v.epoch, v.signer) == ("nodes/n1", "NodeRecord", 9, node_id("n1"))
    assert v.payload["endpoint"] == "10.0.0.1:51820"
    assert v.not_after == chain[0].not_valid_after_utc
    book = EpochBook()
    book.accept(v)
    assert book.highest("nodes/n1") == 9


def test_controller_writes_workloads_and_policies(world: World) -> None:
    key, chain = world.svid(CONTROLLER)
    for k in ("workloads/n1/web", "policies/payments"):
        assert world.verify(sign_envelope(payload(k, 1, "X"), key, chain), k).signer == CONTROLLER


def test_not_after_is_the_earliest_in_the_chain(world: World) -> None:
    key, chain = world.svid(node_id("n1"), not_after=NOW + dt.timedelta(days=400))
    v = world.verify(sign_envelope(payload("nodes/n1"), key, chain), "nodes/n1")
    assert v.not_after == world.lab.cert.not_valid_after_utc


def test_envelope_is_canonical_and_signature_covers_payload_text(world: World) -> None:
    key, chain = world.svid(node_id("n1"))
    raw = sign_envelope(payload("nodes/n1", note="grüße"), key, chain)
    obj = json.loads(raw)
    assert sorted(obj) == ["chain", "payload", "sig", "v"]
    assert obj["payload"] == canonical_json(payload("nodes/n1", note="grüße"))
    assert "grüße" in raw.decode("utf-8")
    assert raw.decode() == canonical_json(obj)


def test_equal_epoch_is_accepted_after_svid_rotation(world: World, book: EpochBook) -> None:
    book.accept(world.verify(node_value(world, "n1", epoch=5), "nodes/n1"))
    assert book.highest("nodes/n1") == 5


# --- one test per rejection reason ----------------------------------------------------

def test_tampered_payload_is_bad_signature(world: World, book: EpochBook) -> None:
    raw = node_value(world, "n1", endpoint="10.0.0.1:51820")
    text = json.loads(raw)["payload"].replace("10.0.0.1", "10.6.6.6")
    tampered = edit_envelope(raw, payload=text)
    assert_rejected(world, book, RejectReason.BAD_SIGNATURE,
                    lambda: world.verify(tampered, "nodes/n1"))


def test_signature_by_another_key_is_bad_signature(world: World, book: EpochBook) -> None:
    _, chain = world.svid(node_id("n1"))
    other = ec.generate_private_key(ec.SECP256R1())
    raw = envelope_of(canonical_json(payload("nodes/n1")), other, chain)
    assert_rejected(world, book, RejectReason.BAD_SIGNATURE,
                    lambda: world.verify(raw, "nodes/n1"))


def test_our_id_signed_by_another_trusted_domain_is_untrusted(world: World,
                                                              book: EpochBook) -> None:
    key, chain = world.svid(node_id("n1"), ca=world.evil)
    raw = sign_envelope(payload("nodes/n1"), key, chain)
    rej = assert_rejected(world, book, RejectReason.UNTRUSTED_CHAIN,
                          lambda: world.verify(raw, "nodes/n1"))
    assert TD in rej.detail


def test_rogue_ca_with_our_name_is_untrusted(world: World, book: EpochBook) -> None:
    assert world.rogue.cert.subject == world.lab.cert.subject
    key, chain = world.svid(node_id("n1"), ca=world.rogue)
    raw = sign_envelope(payload("nodes/n1"), key, chain)
    assert_rejected(world, book, RejectReason.UNTRUSTED_CHAIN,
                    lambda: world.verify(raw, "nodes/n1"))


def test_rogue_ca_shipped_in_the_chain_is_untrusted(world: World, book: EpochBook) -> None:
    key, chain = world.svid(node_id("n1"), ca=world.rogue)
    raw = sign_envelope(payload("nodes/n1"), key, (*chain, world.rogue.cert))
    assert_rejected(world, book, RejectReason.UNTRUSTED_CHAIN,
                    lambda: world.verify(raw, "nodes/n1"))


def test_unknown_trust_domain(world: World, book: EpochBook) -> None:
    stranger = LabCA.generate("other.example", now=NOW - HOUR)
    key, chain = world.svid(node_id("n1", "other.example"), ca=stranger)
    raw = sign_envelope(payload("nodes/n1"), key, chain)
    assert_rejected(world, book, RejectReason.UNKNOWN_TRUST_DOMAIN,
                    lambda: world.verify(raw, "nodes/n1"))


def test_other_trust_domain_node_may_not_write_our_node_key(world: World,
                                                            book: EpochBook) -> None:
    key, chain = world.svid(node_id("n1", "evil.example"), ca=world.evil)
    raw = sign_envelope(payload("nodes/n1"), key, chain)
    assert_rejected(world, book, RejectReason.UNAUTHORIZED,
                    lambda: world.verify(raw, "nodes/n1"))


def test_two_uri_sans_is_not_an_svid(world: World, book: EpochBook) -> None:
    key, chain = world.svid(node_id("n1"), uris=[node_id("n1"), node_id("n2")])
    raw = sign_envelope(payload("nodes/n1"), key, chain)
    rej = assert_rejected(world, book, RejectReason.NOT_AN_SVID,
                          lambda: world.verify(raw, "nodes/n1"))
    assert "2 URI SANs" in rej.detail


@pytest.mark.parametrize("leaf_args,uri", [
    ({"uris": []}, None),
    ({}, "https://lab.tfcrypt/tfcrypt/node/n1"),
    ({}, f"spiffe://{TD}"),
    ({}, f"spiffe://{TD}/tfcrypt/../node/n1"),
    ({}, "spiffe://LAB.tfcrypt/tfcrypt/node/n1"),
], ids=["no-san", "https", "no-path", "dot-dot", "uppercase-td"])
def test_leaf_without_one_workload_spiffe_id_is_not_an_svid(
        world: World, book: EpochBook, leaf_args: dict[str, Any], uri: str | None) -> None:
    if uri is not None:
        leaf_args = {"uris": [uri]}
    key, chain = world.svid(node_id("n1"), **leaf_args)
    raw = sign_envelope(payload("nodes/n1"), key, chain)
    assert_rejected(world, book, RejectReason.NOT_AN_SVID,
                    lambda: world.verify(raw, "nodes/n1"))


def test_ca_certificate_as_leaf_is_not_an_svid(world: World, book: EpochBook) -> None:
    key, chain = world.svid(node_id("n1"), is_ca=True)
    raw = sign_envelope(payload("nodes/n1"), key, chain)
    rej = assert_rejected(world, book, RejectReason.NOT_AN_SVID,
                          lambda: world.verify(raw, "nodes/n1"))
    assert "cA=true" in rej.detail


def test_trust_domain_root_as_leaf_is_not_an_svid(world: World, book: EpochBook) -> None:
    raw = sign_envelope(payload("nodes/n1"), world.lab.key, (world.lab.cert,))
    assert_rejected(world, book, RejectReason.NOT_AN_SVID,
                    lambda: world.verify(raw, "nodes/n1"))


def test_leaf_without_digital_signature_is_not_an_svid(world: World, book: EpochBook) -> None:
    key, chain = world.svid(node_id("n1"), digital_signature=False)
    raw = sign_envelope(payload("nodes/n1"), key, chain)
    rej = assert_rejected(world, book, RejectReason.NOT_AN_SVID,
                          lambda: world.verify(raw, "nodes/n1"))
    assert "digitalSignature" in rej.detail


@pytest.mark.parametrize("verify_at,detail", [
    (NOW + 2 * HOUR, "expired"),
    (NOW - HOUR / 2, "not valid before"),
    (NOW + dt.timedelta(days=366), "expired"),
], ids=["leaf-expired", "leaf-not-yet-valid", "past-ca"])
def test_chain_outside_validity_is_expired(world: World, book: EpochBook,
                                           verify_at: dt.datetime, detail: str) -> None:
    raw = node_value(world, "n1")
    rej = assert_rejected(world, book, RejectReason.EXPIRED,
                          lambda: world.verify(raw, "nodes/n1", now=verify_at))
    assert detail in rej.detail


def test_expired_trust_bundle_root_is_expired(world: World, book: EpochBook) -> None:
    old = LabCA.generate(TD, now=NOW - dt.timedelta(days=400))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = build_leaf(old, key.public_key(), uris=[node_id("n1")],
                      not_before=NOW - BACKDATE, not_after=NOW + HOUR)
    raw = sign_envelope(payload("nodes/n1"), key, (leaf,))
    bundles = TrustBundles({TD: [old.cert]})
    assert_rejected(world, book, RejectReason.EXPIRED, lambda: verify_envelope(
        raw, "nodes/n1", bundles=bundles, authorizer=world.authorizer, now=NOW))


def test_node_a_may_not_sign_node_b(world: World, book: EpochBook) -> None:
    key, chain = world.svid(node_id("n1"))
    raw = sign_envelope(payload("nodes/n2"), key, chain)
    rej = assert_rejected(world, book, RejectReason.UNAUTHORIZED,
                          lambda: world.verify(raw, "nodes/n2"))
    assert node_id("n1") in rej.detail


@pytest.mark.parametrize("key", ["policies/x", "workloads/n1/web"])
def test_node_may_not_write_policies_or_workloads(world: World, book: EpochBook,
                                                  key: str) -> None:
    nkey, chain = world.svid(node_id("n1"))
    raw = sign_envelope(payload(key, kind="EncryptionPolicy"), nkey, chain)
    assert_rejected(world, book, RejectReason.UNAUTHORIZED, lambda: world.verify(raw, key))


@pytest.mark.parametrize("key", ["nodes/n1", "config/x", "nodes/n1/extra", "policies/",
                                 "nodes/N1"])
def test_controller_may_not_write_node_or_unknown_keys(world: World, book: EpochBook,
                                                       key: str) -> None:
    ckey, chain = world.svid(CONTROLLER)
    raw = sign_envelope(payload(key), ckey, chain)
    assert_rejected(world, book, RejectReason.UNAUTHORIZED, lambda: world.verify(raw, key))


def test_lower_epoch_is_rollback(world: World, book: EpochBook) -> None:
    raw = node_value(world, "n1", epoch=4)
    v = world.verify(raw, "nodes/n1")
    rej = assert_rejected(world, book, RejectReason.ROLLBACK, lambda: v)
    assert "epoch 4 < accepted 5" in rej.detail
    with pytest.raises(Rejected):
        book.check(v)


def test_replay_after_deletion_is_rollback(world: World) -> None:
    """The key is deleted from etcd, then its old value is written back: still a rollback."""
    book = EpochBook()
    old = node_value(world, "n3", epoch=1)
    book.accept(world.verify(old, "nodes/n3"))
    book.accept(world.verify(node_value(world, "n3", epoch=2), "nodes/n3"))
    assert_rejected(world, book, RejectReason.ROLLBACK, lambda: world.verify(old, "nodes/n3"))


@pytest.mark.parametrize("raw", [
    b"not json",
    b"\xff\xfe\x00",
    b"[]",
    b'{"v": 1}',
    b'{"v": 2, "payload": "{}", "sig": "AA==", "chain": ["AA=="]}',
    b'{"v": true, "payload": "{}", "sig": "AA==", "chain": ["AA=="]}',
    b'{"v": 1, "payload": "{}", "sig": "AA==", "chain": ["AA=="], "extra": 1}',
    b'{"v": 1, "payload": "{}", "sig": "!!", "chain": ["AA=="]}',
    b'{"v": 1, "payload": "{}", "sig": "AA==", "chain": []}',
    b'{"v": 1, "payload": "{}", "sig": "AA==", "chain": ["AAAA"]}',
    b'{"v": 1, "v": 1, "payload": "{}", "sig": "AA==", "chain": ["AA=="]}',
    b"[" * 100000,
], ids=["text", "not-utf8", "array", "fields", "version", "bool-version", "extra-field",
        "bad-base64", "empty-chain", "chain-not-der", "duplicate-key", "deep"])
def test_malformed_envelope(world: World, book: EpochBook, raw: bytes) -> None:
    assert_rejected(world, book, RejectReason.MALFORMED,
                    lambda: world.verify(raw, "nodes/n1", max_bytes=200000))


def test_payload_with_lone_surrogate_is_malformed(world: World, book: EpochBook) -> None:
    """JSON can escape a lone surrogate; such a payload has no UTF-8 bytes to verify."""
    raw = node_value(world, "n1")
    text = json.loads(raw)["payload"].replace('"kind":', '"a":"\ud800","kind":')
    forged = edit_envelope(raw, payload=text)
    assert b"\\ud800" in forged
    assert_rejected(world, book, RejectReason.MALFORMED,
                    lambda: world.verify(forged, "nodes/n1"))


@pytest.mark.parametrize("text", [
    "not json",
    '["kind"]',
    '{"kind":"NodeRecord","key":"nodes/n1","epoch":9,"issued_at":1.5}',
    '{"kind":"NodeRecord","key":"nodes/n1","epoch":9,"issued_at":NaN}',
    '{"kind":"NodeRecord","key":"nodes/n2","key":"nodes/n1","epoch":9,"issued_at":1}',
], ids=["text", "array", "float", "nan", "duplicate-key"])
def test_malformed_payload(world: World, book: EpochBook, text: str) -> None:
    key, chain = world.svid(node_id("n1"))
    raw = envelope_of(text, key, chain)
    assert_rejected(world, book, RejectReason.MALFORMED, lambda: world.verify(raw, "nodes/n1"))


@pytest.mark.parametrize("field", ["kind", "key", "epoch", "issued_at"])
def test_missing_field(world: World, book: EpochBook, field: str) -> None:
    key, chain = world.svid(node_id("n1"))
    body = payload("nodes/n1")
    del body[field]
    raw = envelope_of(canonical_json(body), key, chain)
    rej = assert_rejected(world, book, RejectReason.MISSING_FIELD,
                          lambda: world.verify(raw, "nodes/n1"))
    assert rej.detail == f"payload.{field}"


@pytest.mark.parametrize("field,value", [
    ("epoch", -1), ("epoch", "9"), ("epoch", True), ("issued_at", None),
    ("kind", ""), ("kind", 7), ("key", ["nodes/n1"]),
])
def test_invalid_common_field(world: World, book: EpochBook, field: str, value: Any) -> None:
    key, chain = world.svid(node_id("n1"))
    raw = envelope_of(canonical_json({**payload("nodes/n1"), field: value}), key, chain)
    rej = assert_rejected(world, book, RejectReason.INVALID_FIELD,
                          lambda: world.verify(raw, "nodes/n1"))
    assert field in rej.detail


def test_value_over_size_bound(world: World, book: EpochBook) -> None:
    raw = node_value(world, "n1", padding="x" * 70000)
    assert_rejected(world, book, RejectReason.TOO_LARGE, lambda: world.verify(raw, "nodes/n1"))
    assert world.verify(raw, "nodes/n1", max_bytes=len(raw)).epoch == 9


def test_value_copied_to_another_key_is_key_mismatch(world: World, book: EpochBook) -> None:
    raw = node_value(world, "n1")
    rej = assert_rejected(world, book, RejectReason.KEY_MISMATCH,
                          lambda: world.verify(raw, "nodes/n2"))
    assert "nodes/n1" in rej.detail and "nodes/n2" in rej.detail


# --- building blocks ---------------------------------------------------------------------

def test_sign_envelope_refuses_what_no_reader_would_accept(world: World) -> None:
    key, chain = world.svid(node_id("n1"))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="does not match"):
        sign_envelope(payload("nodes/n1"), other, chain)
    with pytest.raises(ValueError, match="float"):
        sign_envelope(payload("nodes/n1", ratio=0.5), key, chain)
    with pytest.raises(ValueError, match="epoch"):
        sign_envelope({**payload("nodes/n1"), "epoch": -1}, key, chain)
    with pytest.raises(ValueError, match="empty"):
        sign_envelope(payload("nodes/n1"), key, ())


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": [1, None, True], "a": "é"}) == '{"a":"é","b":[1,null,true]}'
    with pytest.raises(ValueError):
        canonical_json({1: "x"})


def test_trust_bundles_from_spiffe_bundle_set(world: World) -> None:
    bundle_set = X509BundleSet.of([
        X509Bundle(TrustDomain(TD), {world.lab.cert}),
        X509Bundle(TrustDomain("evil.example"), {world.evil.cert}),
    ])
    bundles = TrustBundles.from_spiffe(bundle_set)
    assert bundles == world.bundles
    assert list(bundles) == ["evil.example", TD]
    assert bundles[TD] == (world.lab.cert,)
    assert repr(bundles) == "TrustBundles({evil.example: 1 CA, lab.tfcrypt: 1 CA})"


def test_authorizer_templates(world: World) -> None:
    authz = Authorizer("prod.example", node_id_template="spiffe://{trust_domain}/n/{node}",
                       controller_ids=("spiffe://{trust_domain}/ctl", "spiffe://x.example/c"))
    authz.check("spiffe://prod.example/n/a", "nodes/a")
    authz.check("spiffe://x.example/c", "policies/p")
    with pytest.raises(Rejected):
        authz.check("spiffe://prod.example/n/a", "policies/p")
    with pytest.raises(ConfigError):
        Authorizer(TD, node_id_template="spiffe://{trust_domain}/node")
    with pytest.raises(ConfigError):
        Authorizer(TD, controller_ids=("spiffe://{domain}/c",))


def test_verify_refuses_naive_now(world: World) -> None:
    with pytest.raises(ValueError, match="timezone"):
        world.verify(node_value(world), "nodes/n1", now=NOW.replace(tzinfo=None))


# --- fuzzing -------------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(raw=st.binary(max_size=2048))
def test_arbitrary_bytes_only_ever_rejected(world: World, raw: bytes) -> None:
    with pytest.raises(Rejected):
        world.verify(raw, "nodes/n1")


_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json = st.recursive(_json_leaf, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


@FUZZ
@given(obj=st.dictionaries(st.sampled_from(["v", "payload", "sig", "chain", "x"]), _json),
       body=_json)
def test_arbitrary_envelope_shapes_only_ever_rejected(world: World, obj: dict[str, Any],
                                                      body: Any) -> None:
    if "payload" in obj and isinstance(body, dict):
        obj["payload"] = json.dumps(body)
    with pytest.raises(Rejected):
        world.verify(json.dumps(obj).encode(), "nodes/n1")


@pytest.fixture(scope="module")
def valid_raw(world: World) -> bytes:
    return node_value(world, "n1")


@FUZZ
@given(data=st.data())
def test_mutated_valid_envelope_verifies_or_is_rejected(world: World, valid_raw: bytes,
                                                        data: st.DataObject) -> None:
    raw = bytearray(valid_raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        v = world.verify(bytes(raw), "nodes/n1")
    except Rejected:
        return
    assert v.signer == node_id("n1")
    assert dict(v.payload) == dict(world.verify(valid_raw, "nodes/n1").payload)


@FUZZ
@given(data=st.data())
def test_mutated_leaf_certificate_is_only_ever_rejected(world: World, valid_raw: bytes,
                                                        data: st.DataObject) -> None:
    obj = json.loads(valid_raw)
    der = bytearray(base64.b64decode(obj["chain"][0]))
    positions = data.draw(st.lists(st.integers(0, len(der) - 1), min_size=1, max_size=3,
                                   unique=True))
    for i in positions:
        der[i] ^= data.draw(st.integers(1, 255))
    raw = edit_envelope(valid_raw, chain=[base64.b64encode(bytes(der)).decode()])
    with pytest.raises(Rejected):
        world.verify(raw, "nodes/n1")


def _controller_value(world: World, issued_at: dt.datetime) -> bytes:
    key, chain = world.svid(CONTROLLER)
    body = payload("policies/x", 9, "EncryptionPolicy") | {"issued_at": int(issued_at.timestamp())}
    return sign_envelope(body, key, chain)


def test_controller_value_outlives_its_signers_svid_when_checked_at_issued_at(
        world: World, book: EpochBook) -> None:
    raw = _controller_value(world, NOW)
    later = NOW + 2 * HOUR
    assert world.verify(raw, "policies/x", now=later,
                        chain_time=ChainTime.ISSUED_AT).signer == CONTROLLER
    assert_rejected(world, book, RejectReason.EXPIRED,
                    lambda: world.verify(raw, "policies/x", now=later))


def test_issued_at_in_the_future_is_refused(world: World, book: EpochBook) -> None:
    raw = _controller_value(world, NOW + HOUR / 2)
    rej = assert_rejected(world, book, RejectReason.INVALID_FIELD, lambda: world.verify(
        raw, "policies/x", now=NOW, chain_time=ChainTime.ISSUED_AT))
    assert "future" in rej.detail


def test_issued_after_the_chain_expired_is_expired(world: World, book: EpochBook) -> None:
    raw = _controller_value(world, NOW + 2 * HOUR)
    assert_rejected(world, book, RejectReason.EXPIRED, lambda: world.verify(
        raw, "policies/x", now=NOW + 2 * HOUR, chain_time=ChainTime.ISSUED_AT))


def test_a_chain_validated_once_is_still_checked_for_time_and_bundle(world: World) -> None:
    """The verifier reuses a validated path (C4: 100,000 records share one chain); reuse
    must not let an expired chain, or a bundle that no longer trusts it, through."""
    value = node_value(world, "n7")
    assert world.verify(value, "nodes/n7").signer == node_id("n7")
    assert world.verify(value, "nodes/n7").signer == node_id("n7")  # from the cache
    with pytest.raises(Rejected) as expired:
        world.verify(value, "nodes/n7", now=NOW + 2 * HOUR)
    assert expired.value.reason is RejectReason.EXPIRED
    with pytest.raises(Rejected) as too_early:
        world.verify(value, "nodes/n7", now=NOW - 2 * HOUR)
    assert too_early.value.reason is RejectReason.EXPIRED
    rogue_bundle = TrustBundles({TD: [world.rogue.cert]})
    with pytest.raises(Rejected) as untrusted:
        verify_envelope(value, "nodes/n7", bundles=rogue_bundle, authorizer=world.authorizer,
                        now=NOW)
    assert untrusted.value.reason is RejectReason.UNTRUSTED_CHAIN
    assert world.verify(value, "nodes/n7").signer == node_id("n7")
