"""Network objects of the lab through pyroute2: namespaces, links, addresses, routes.

Rules: every call takes exact names (namespace, interface); nothing is looked up by
pattern. Sysctls are set with `ip netns exec <ns> sysctl -w` (pyroute2 has no sysctl
API), one process per namespace. Removal tolerates absence, because teardown follows a
ledger that may list objects a crashed `up` never made.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterable

from pyroute2 import IPRoute, netns

from .errors import LabError

RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4
IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
DAD_TIMEOUT = 10.0


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def create_netns(name: str) -> None:
    """Create a named namespace (as `ip netns add` does) and bring its loopback up."""
    if netns_exists(name):
        raise LabError(f"namespace {name} already exists: run `ip netns del {name}` or pick "
                       "another lab name")
    netns.create(name)
    with IPRoute(netns=name) as ipr:
        ipr.link("set", index=_index(ipr, "lo"), state="up")


def remove_netns(name: str) -> None:
    if netns_exists(name):
        netns.remove(name)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} missing in its namespace")
    return int(found[0])


def add_bridge(ns: str, ifname: str, *, mcast_snooping: bool = True) -> None:
    """A bridge; without multicast snooping it floods IPv6 neighbour discovery to every
    port instead of guessing from MLD reports it may not have seen yet."""
    with IPRoute(netns=ns) as ipr:
        ipr.link("add", ifname=ifname, kind="bridge",
                 **({} if mcast_snooping else {"br_mcast_snooping": 0}))
        ipr.link("set", index=_index(ipr, ifname), state="up")


def add_veth(ns: str, ifname: str, peer_ns: str, peer_ifname: str) -> None:
    """A veth pair with one end in each namespace, both down until configured."""
    with IPRoute(netns=ns) as ipr:
        ipr.link("add", ifname=ifname, kind="veth",
                 peer={"ifname": peer_ifname, "net_ns_fd": peer_ns})


def enslave_up(ns: str, ifname: str, master: str) -> None:
    with IPRoute(netns=ns) as ipr:
        idx = _index(ipr, ifname)
        ipr.link("set", index=idx, master=_index(ipr, master))
        ipr.link("set", index=idx, state="up")


def configure(
    ns: str, ifname: str, *, address: str | None = None, prefixlen: int = 32,
    routes: Iterable[dict[str, object]] = (),
) -> None:
    """Address an interface, bring it up and add routes; `oif` in a route may name a link."""
    with IPRoute(netns=ns) as ipr:
        idx = _index(ipr, ifname)
        if address is not None:
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up")
        for route in routes:
            spec = dict(route)
            oif = spec.pop("oif", ifname)
            spec["oif"] = _index(ipr, str(oif))
            ipr.route("add", **spec)


def add_addresses(ns: str, ifname: str, addresses: Iterable[tuple[str, int]]) -> None:
    """More addresses on an interface; IPv6 ones with `nodad`: the lab's addresses are
    unique by construction, and a tentative address can neither send nor be reached."""
    with IPRoute(netns=ns) as ipr:
        idx = _index(ipr, ifname)
        for address, prefixlen in addresses:
            extra = {"flags": IFA_F_NODAD} if ":" in address else {}
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen, **extra)


def add_routes(ns: str, ifname: str, routes: Iterable[dict[str, object]]) -> None:
    """Routes by `ifname` (or `oif`); `via6` routes an IPv4 prefix via an IPv6 next hop
    (RFC 5549, Linux >= 5.2), how an IPv6-only underlay carries unselected IPv4."""
    with IPRoute(netns=ns) as ipr:
        for route in routes:
            spec = dict(route)
            spec["oif"] = _index(ipr, str(spec.pop("oif", ifname)))
            if "via6" in spec:
                spec["via"] = {"family": socket.AF_INET6, "addr": spec.pop("via6")}
            if ":" in str(spec.get("dst", "")):
                spec["family"] = socket.AF_INET6
            ipr.route("add", **spec)


def tentative(ns: str) -> list[str]:
    """IPv6 addresses of a namespace still in duplicate address detection."""
    with IPRoute(netns=ns) as ipr:
        return [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=socket.AF_INET6)
                if (a.get_attr("IFA_FLAGS") or a["flags"]) & IFA_F_TENTATIVE]


def wait_not_tentative(namespaces: Iterable[str], timeout: float = DAD_TIMEOUT) -> None:
    """Return once no IPv6 address in `namespaces` is tentative (DAD finished), or raise."""
    left = list(namespaces)
    deadline = time.monotonic() + timeout
    while left:
        left = [ns for ns in left if tentative(ns)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise LabError(f"IPv6 addresses still tentative after {timeout:.0f}s in "
                           f"{left[0]}: {', '.join(tentative(left[0]))}")
        time.sleep(0.1)


def sysctl(ns: str, settings: dict[str, str]) -> None:
    if not settings:
        return
    argv = ["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
            *(f"{k}={v}" for k, v in settings.items())]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        msg = res.stderr.strip().replace("\n", "; ")
        raise LabError(f"sysctl in {ns} failed: {msg}")
