"""NodeRecord: normal forms, the round trip through a signed envelope, and field rejections."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lab_workload_api.ca import LabCA

from tfcrypt.errors import Rejected, RejectReason
from tfcrypt.identity import Authorizer, TrustBundles, Verified, sign_envelope, verify_envelope
from tfcrypt.model import NodeRecord

TD = "lab.tfcrypt"
NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
WG_KEY = base64.b64encode(bytes(range(1, 33))).decode()


def node_id(name: str) -> str:
    return f"spiffe://{TD}/tfcrypt/node/{name}"


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.generate(TD, now=NOW - dt.timedelta(hours=1))


def record(**overrides: Any) -> NodeRecord:
    fields: dict[str, Any] = {
        "node": "n1", "spiffe_id": node_id("n1"), "wg_public_key": WG_KEY,
        "endpoint": "192.0.2.1:51820", "workload_subnets": ("10.1.0.0/24",),
        "epoch": 3, "issued_at": 1748779200,
    }
    fields.update(overrides)
    return NodeRecord(**fields)


def publish_and_read(ca: LabCA, payload: dict[str, Any], signer: str = "n1") -> NodeRecord:
    """Sign as node `signer`, verify as a peer would, then parse the record."""
    svid = ca.issue(node_id(signer), dt.timedelta(hours=1), now=NOW)
    raw = sign_envelope(payload, svid.key, svid.chain)
    verified = verify_envelope(raw, payload["key"], bundles=TrustBundles({TD: [ca.cert]}),
                               authorizer=Authorizer(TD), now=NOW)
    return NodeRecord.from_verified(verified)


def test_round_trip_through_a_signed_envelope(ca: LabCA) -> None:
    rec = record(workload_subnets=("10.1.0.0/24", "fd00:1::/64"))
    assert publish_and_read(ca, rec.to_payload()) == rec


def test_payload_shape() -> None:
    p = record().to_payload()
    assert (p["kind"], p["key"], p["epoch"], p["issued_at"]) == ("NodeRecord", "nodes/n1", 3,
                                                                 1748779200)
    assert p["workload_subnets"] == ["10.1.0.0/24"]


@pytest.mark.parametrize("given_,normal", [
    ("[2001:DB8:0:0::1]:51820", "[2001:db8::1]:51820"),
    ("192.0.2.1:08080", "192.0.2.1:8080"),
    ("10.0.0.1:1", "10.0.0.1:1"),
])
def test_endpoint_normal_form(given_: str, normal: str) -> None:
    assert record(endpoint=given_).endpoint == normal


def test_subnets_are_sorted_and_deduplicated() -> None:
    rec = record(workload_subnets=("fd00::/64", "10.2.0.0/24", "10.1.0.0/24", "10.2.0.0/24",
                                   "FD00:0::/64"))
    assert rec.workload_subnets == ("10.1.0.0/24", "10.2.0.0/24", "fd00::/64")
    assert rec == record(workload_subnets=("10.1.0.0/24", "fd00::/64", "10.2.0.0/24"))


def test_workload_subnets_are_optional_on_read(ca: LabCA) -> None:
    p = record().to_payload()
    del p["workload_subnets"]
    assert publish_and_read(ca, p).workload_subnets == ()


def test_unknown_fields_are_ignored(ca: LabCA) -> None:
    assert publish_and_read(ca, {**record().to_payload(), "mtu": 1420}) == record()


@pytest.mark.parametrize("field", ["node", "spiffe_id", "wg_public_key", "endpoint"])
def test_missing_field_names_the_path(ca: LabCA, field: str) -> None:
    p = record().to_payload()
    del p[field]
    with pytest.raises(Rejected) as info:
        publish_and_read(ca, p)
    assert info.value.reason is RejectReason.MISSING_FIELD
    assert info.value.detail == f"payload.{field}"


@pytest.mark.parametrize("field,value,path", [
    ("wg_public_key", "not base64!", "payload.wg_public_key"),
    ("wg_public_key", base64.b64encode(bytes(31)).decode(), "payload.wg_public_key"),
    ("wg_public_key", base64.b64encode(bytes(32)).decode(), "payload.wg_public_key"),
    ("wg_public_key", 42, "payload.wg_public_key"),
    ("endpoint", "192.0.2.1", "payload.endpoint"),
    ("endpoint", "192.0.2.1:65536", "payload.endpoint"),
    ("endpoint", "192.0.2.1:0", "payload.endpoint"),
    ("endpoint", "2001:db8::1:51820", "payload.endpoint"),
    ("endpoint", "[192.0.2.1]:51820", "payload.endpoint"),
    ("endpoint", "[fe80::1%eth0]:51820", "payload.endpoint"),
    ("endpoint", "0.0.0.0:51820", "payload.endpoint"),
    ("endpoint", "node1.example:51820", "payload.endpoint"),
    ("workload_subnets", ["10.1.0.0/24", "10.2.0.1/24"], "payload.workload_subnets[1]"),
    ("workload_subnets", ["banana"], "payload.workload_subnets[0]"),
    ("workload_subnets", "10.1.0.0/24", "payload.workload_subnets"),
    ("workload_subnets", [7], "payload.workload_subnets"),
    ("kind", "Workload", "payload.kind"),
])
def test_invalid_field_names_the_path(ca: LabCA, field: str, value: Any, path: str) -> None:
    with pytest.raises(Rejected) as info:
        publish_and_read(ca, {**record().to_payload(), field: value})
    assert info.value.reason is RejectReason.INVALID_FIELD
    assert info.value.detail.startswith(path), info.value.detail


def test_spiffe_id_must_be_the_signer(ca: LabCA) -> None:
    with pytest.raises(Rejected) as info:
        publish_and_read(ca, record(spiffe_id=node_id("n2")).to_payload())
    assert info.value.reason is RejectReason.UNAUTHORIZED


def test_node_must_match_the_key() -> None:
    p = {**record().to_payload(), "node": "n2"}
    v = Verified(key="nodes/n1", kind="NodeRecord", epoch=3, issued_at=1, payload=p,
                 signer=node_id("n1"), not_after=NOW)
    with pytest.raises(Rejected) as info:
        NodeRecord.from_verified(v)
    assert info.value.reason is RejectReason.KEY_MISMATCH


@pytest.mark.parametrize("name", ["", "N1", "-n1", "n1-", "n_1", "a" * 64, "n/1"])
def test_bad_node_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="node"):
        record(node=name)


@pytest.mark.parametrize("name", ["n1", "a", "node-1.rack2", "a" * 63])
def test_good_node_names(name: str) -> None:
    assert record(node=name).key == f"nodes/{name}"


_names = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?", fullmatch=True)
_v4 = st.ip_addresses(v=4).filter(lambda a: not (a.is_unspecified or a.is_multicast))
_v6 = st.ip_addresses(v=6).filter(lambda a: not (a.is_unspecified or a.is_multicast))
_endpoints = st.one_of(
    st.builds(lambda a, p: f"{a}:{p}", _v4, st.integers(1, 65535)),
    st.builds(lambda a, p: f"[{a.exploded}]:{p}", _v6, st.integers(1, 65535)),
)
_nets = st.builds(lambda a, n: str(ipaddress.ip_network(f"{a}/{n}", strict=False)),
                  st.ip_addresses(v=4), st.integers(8, 32))


@settings(max_examples=40, deadline=None)
@given(name=_names, endpoint=_endpoints, subnets=st.lists(_nets, max_size=4),
       key=st.binary(min_size=32, max_size=32).filter(any), epoch=st.integers(0, 2**40))
def test_any_valid_record_round_trips(ca: LabCA, name: str, endpoint: str, subnets: list[str],
                                      key: bytes, epoch: int) -> None:
    rec = NodeRecord(node=name, spiffe_id=node_id(name),
                     wg_public_key=base64.b64encode(key).decode(), endpoint=endpoint,
                     workload_subnets=tuple(subnets), epoch=epoch, issued_at=1748779200)
    assert record(**{f: getattr(rec, f) for f in rec.__dataclass_fields__}) == rec
    assert publish_and_read(ca, rec.to_payload(), signer=name) == rec
