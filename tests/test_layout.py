"""The lab's layout (pure): IPv4 as before by default; IPv6 beside it; an IPv6-only underlay."""

from __future__ import annotations

import pytest

from netns_lab.errors import LabError
from netns_lab.layout import Layout


def test_default_lab_is_ipv4_only_as_before() -> None:
    lay = Layout("t1", 2, 1)
    n2 = lay.node(2)
    assert (n2.underlay_ip, n2.underlay_ip6, n2.workload_subnet6) == ("10.77.0.12", None, None)
    assert [w.ips for w in lay.workloads_of(n2)] == [["10.200.2.11"]]
    assert lay.etcd_endpoints() == ["http://10.77.0.2:2379"]
    assert lay.controller_ip == "10.77.0.9" and lay.underlay_cidr == "10.77.0.0/24"


def test_dual_stack_keeps_the_ipv4_underlay_and_adds_ula_everywhere() -> None:
    lay = Layout("t1", 2, 2, ipv6=True)
    n1 = lay.node(1)
    assert (n1.underlay_ip, n1.underlay_ip6) == ("10.77.0.11", "fd00:77::11")
    assert n1.workload_subnet6 == "fd00:200:1::/64"
    assert [w.ips for w in lay.workloads_of(n1)] == [["10.200.1.11", "fd00:200:1::11"],
                                                      ["10.200.1.12", "fd00:200:1::12"]]
    assert lay.etcd_endpoints() == ["http://10.77.0.2:2379"]
    assert lay.controller_ip6 == "fd00:77::9"


def test_ipv6_only_underlay_puts_etcd_controller_and_endpoints_on_ipv6() -> None:
    lay = Layout("t1", 3, 1, etcd_members=3, underlay="v6")
    assert lay.ipv6, "an IPv6 underlay implies IPv6 in the nodes"
    assert lay.node(3).underlay_ip == "fd00:77::13"
    assert lay.etcd_endpoints() == ["http://[fd00:77::2]:2379", "http://[fd00:77::3]:2379",
                                    "http://[fd00:77::4]:2379"]
    assert lay.member(1).peer_url == "http://[fd00:77::2]:2380"
    assert lay.controller_ip == "fd00:77::9" and lay.underlay_cidr == "fd00:77::/64"
    assert lay.workloads_of(lay.node(1))[0].ips == ["10.200.1.11", "fd00:200:1::11"]


def test_an_unknown_underlay_family_is_refused() -> None:
    with pytest.raises(LabError, match="--underlay must be v4 or v6"):
        Layout("t1", 2, 1, underlay="v5")
