"""Network objects of the lab through pyroute2: namespaces, links, addresses, routes.

Rules: every call takes exact names (namespace, interface); nothing is looked up by
pattern. Sysctls are set with `ip netns exec <ns> sysctl -w` (pyroute2 has no sysctl
API), one process per namespace. Removal tolerates absence, because teardown follows a
ledger that may list objects a crashed `up` never made.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable

from pyroute2 import IPRoute, netns

from .errors import LabError

RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4


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


def add_bridge(ns: str, ifname: str) -> None:
    with IPRoute(netns=ns) as ipr:
        ipr.link("add", ifname=ifname, kind="bridge")
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


def sysctl(ns: str, settings: dict[str, str]) -> None:
    if not settings:
        return
    argv = ["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
            *(f"{k}={v}" for k, v in settings.items())]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        msg = res.stderr.strip().replace("\n", "; ")
        raise LabError(f"sysctl in {ns} failed: {msg}")
