"""The lab as one object: bring it up, describe it, run processes in it, take it down.

Rules:
- `up` refuses before creating anything if a tool is missing, the name is taken or a
  namespace of that name exists; then every object is written to the ledger before it
  is made, and any failure tears down what the ledger lists before re-raising.
- `down` works from the ledger alone (it needs no state file and no memory of `up`):
  processes first (newest first, by PID with identity checks), then mounts and
  namespaces in reverse order, then the run dir.
- Processes are general (`what`, `node`): etcd members and the Workload API server today,
  agents later; each is recorded in the ledger (right after fork, the PID does not exist
  before) and in the state file until stopped.
- State changes hold an flock on `<run_dir>/lock`, so concurrent CLI calls do not lose
  process records.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import etcd, etcd_tls, kube, mountns, net, preflight, procs, spire, workload_api
from .errors import LabError
from .layout import (
    BRIDGE,
    RUN_ROOT,
    TRUST_DOMAIN,
    UNDERLAY_CIDR6,
    UNDERLAY_PREFIXLEN,
    UNDERLAY_PREFIXLEN6,
    WORKLOAD_GATEWAY,
    WORKLOAD_GATEWAY6,
    Layout,
    Node,
    check_name,
)
from .ledger import Ledger
from .procs import ProcessRecord

STATE_FILE = "state.json"
WORKLOAD_API = "workload-api"
# who hands out SVIDs: real SPIRE, or the lab's own server (a fault injector: tests that
# need a server that misbehaves use it); docs/lab.md, "Identity providers"
WORKLOAD_API_MODES = ("lab", "spire")
DEFAULT_WORKLOAD_API = "spire"
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4


def run_dir_of(name: str) -> Path:
    return RUN_ROOT / check_name(name)


class Lab:
    """A named lab; construct with a Layout to create it, or `Lab.load(name)` to use one."""

    def __init__(self, layout: Layout, svid_ttl: int = workload_api.DEFAULT_SVID_TTL,
                 workload_api: str = DEFAULT_WORKLOAD_API) -> None:
        if svid_ttl < 2:
            raise LabError(f"--svid-ttl must be at least 2 seconds, got {svid_ttl}")
        if workload_api not in WORKLOAD_API_MODES:
            raise LabError(f"--workload-api must be one of {', '.join(WORKLOAD_API_MODES)}, "
                           f"got {workload_api!r}")
        if workload_api == "spire" and svid_ttl < spire.MIN_SVID_TTL:
            raise LabError(f"--svid-ttl must be at least {spire.MIN_SVID_TTL} seconds with "
                           f"SPIRE, got {svid_ttl}")
        self.layout = layout
        self.svid_ttl = svid_ttl
        self.workload_api = workload_api
        self.ledger = Ledger(layout.run_dir)

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def run_dir(self) -> Path:
        return self.layout.run_dir

    # ---------------------------------------------------------------- loading / state

    @classmethod
    def load(cls, name: str) -> Lab:
        path = run_dir_of(name) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"lab {name} is not up") from None
        layout = Layout(name, state["nodes"], state["workloads_per_node"], state["etcd_members"],
                        ipv6=state.get("ipv6", False), underlay=state.get("underlay", "v4"),
                        etcd_tls=state.get("etcd_tls", False),
                        kubernetes=state.get("kubernetes", False))
        return cls(layout, svid_ttl=state["svid_ttl"],
                   workload_api=state.get("workload_api", "lab"))

    def _initial_state(self) -> dict[str, Any]:
        return {"name": self.name, "nodes": self.layout.nodes,
                "workloads_per_node": self.layout.workloads_per_node,
                "etcd_members": self.layout.etcd_members, "svid_ttl": self.svid_ttl,
                "ipv6": self.layout.ipv6, "underlay": self.layout.underlay,
                "workload_api": self.workload_api,
                "etcd_tls": self.layout.etcd_tls,
                "kubernetes": self.layout.kubernetes,
                "phase": "creating", "processes": []}

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of the state file under the lab's lock."""
        with open(self.run_dir / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.run_dir / STATE_FILE
            state = json.loads(path.read_text()) if path.exists() else self._initial_state()
            yield state
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=2) + "\n")
            os.replace(tmp, path)

    def _read_state(self) -> dict[str, Any]:
        return json.loads((self.run_dir / STATE_FILE).read_text())

    def processes(self) -> list[ProcessRecord]:
        """Processes started and not stopped through the lab (running or not)."""
        return [ProcessRecord.from_json(p) for p in self._read_state()["processes"]]

    # ---------------------------------------------------------------- up

    def up(self) -> None:
        preflight.check_tools()
        if self.workload_api == "spire":
            spire.binary(spire.SERVER), spire.binary(spire.AGENT)  # built? (clear error)
        if self.layout.kubernetes:
            kube.check_built()
        if self.run_dir.exists():
            raise LabError(f"lab {self.name} is already up ({self.run_dir} exists): run "
                           f"`python -m netns_lab down --name {self.name}` first")
        for ns in self.layout.all_netns():
            if net.netns_exists(ns):
                raise LabError(f"namespace {ns} already exists: remove it "
                               f"(`ip netns del {ns}`) or pick another lab name")
        self.run_dir.mkdir(parents=True)
        self.ledger.record("run_dir", path=str(self.run_dir))
        try:
            with self._state():
                pass
            self._build()
            with self._state() as state:
                state["phase"] = "up"
        except BaseException:
            down(self.name)
            raise

    def _build(self) -> None:
        lay = self.layout
        for sub in ("logs", "etcd", "spire", "spiffe", "mnt"):
            (self.run_dir / sub).mkdir()
        self.ledger.record("mount", path=str(self.run_dir))
        mountns.make_run_dir_private(self.run_dir)
        for ns in lay.all_netns():
            self.ledger.record("netns", name=ns)
            net.create_netns(ns)
            if lay.ipv6:  # before any link exists, so every link inherits it
                net.sysctl(ns, {"net.ipv6.conf.all.accept_dad": "0",
                                "net.ipv6.conf.default.accept_dad": "0"})
        self._build_underlay()
        for node in lay.all_nodes():
            self._build_workloads(node)
        if lay.ipv6:
            net.wait_not_tentative(lay.all_netns())
        for node in lay.all_nodes():
            self.ledger.record("mount", path=str(node.mount_ns))
            mountns.create_node_mount_ns(node.netns, node.mount_ns, node.wireguard_dir,
                                         node.default_path_binds())
        if lay.etcd_tls:
            etcd_tls.write_certs(lay)  # the CA the Workload API server (or SPIRE, upstream) uses
        self.etcd_start([m.name for m in lay.all_members()])
        if self.workload_api == "spire":
            self.spire_start()
        else:
            self.workload_api_start()
        if lay.kubernetes:
            kube.start(self)

    def _link(self, ns: str, ifname: str) -> None:
        self.ledger.record("link", netns=ns, ifname=ifname)

    def _build_underlay(self) -> None:
        """One bridge; each host gets its IPv4 address, its IPv6 one beside it (ipv6), or
        only the IPv6 one (IPv6-only underlay); nodes route the others' workload subnets
        via their underlay address of the same family, IPv4 via IPv6 on an IPv6-only one."""
        lay = self.layout
        ul = lay.underlay_netns
        self._link(ul, BRIDGE)
        net.add_bridge(ul, BRIDGE, mcast_snooping=not lay.ipv6)

        def addresses(primary: str, v6: str | None) -> list[tuple[str, int]]:
            if lay.v6_underlay:
                return [(primary, UNDERLAY_PREFIXLEN6)]
            return [(primary, UNDERLAY_PREFIXLEN), *([(v6, UNDERLAY_PREFIXLEN6)] if v6 else [])]

        ends: list[tuple[str, str, list[tuple[str, int]], list[dict[str, object]]]] = [
            (lay.controller_netns, "ctl", addresses(lay.controller_ip, lay.controller_ip6), []),
            *((m.netns, m.name, addresses(m.underlay_ip, m.underlay_ip6), [])
              for m in lay.all_members()),
        ]
        for node in lay.all_nodes():
            routes: list[dict[str, object]] = []
            for other in lay.all_nodes():
                if other.name == node.name:
                    continue
                if lay.v6_underlay:
                    routes.append({"dst": other.workload_subnet, "via6": other.underlay_ip})
                else:
                    routes.append({"dst": other.workload_subnet, "gateway": other.underlay_ip})
                if other.workload_subnet6 and other.underlay_ip6:
                    routes.append({"dst": other.workload_subnet6, "gateway": other.underlay_ip6})
            ends.append((node.netns, node.name, addresses(node.underlay_ip, node.underlay_ip6),
                         routes))
        for ns, port, addrs, routes in ends:
            self._link(ns, "eth0")
            net.add_veth(ns, "eth0", ul, port)
            net.enslave_up(ul, port, BRIDGE)
            net.configure(ns, "eth0")
            net.add_addresses(ns, "eth0", addrs)
            net.add_routes(ns, "eth0", routes)

    def _build_workloads(self, node: Node) -> None:
        """Calico-style: /32 on the workload, onlink default via 169.254.1.1, proxy ARP.

        Pitfall: proxy ARP answers only if the node has a unicast route to the target,
        so the node routes 169.254.1.1 to its loopback (it has no default route).
        IPv6 needs no proxy: the node side holds the link-local gateway fe80::1 itself
        (the same address on every workload veth is fine, link-local is per link) and
        answers neighbour discovery for it; the workload answers for its own /128.
        """
        settings = {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
            "net.ipv4.conf.eth0.rp_filter": "0",
        }
        if self.layout.ipv6:
            settings["net.ipv6.conf.all.forwarding"] = "1"
        net.configure(node.netns, "lo",
                      routes=[{"dst": f"{WORKLOAD_GATEWAY}/32", "scope": RT_SCOPE_LINK}])
        for wl in self.layout.workloads_of(node):
            self._link(node.netns, wl.node_if)
            net.add_veth(node.netns, wl.node_if, wl.netns, "eth0")
            net.configure(node.netns, wl.node_if,
                          routes=[{"dst": f"{wl.ip}/32", "scope": RT_SCOPE_LINK}])
            net.configure(wl.netns, "eth0", address=wl.ip, prefixlen=32, routes=[
                {"dst": "0.0.0.0/0", "gateway": WORKLOAD_GATEWAY, "flags": RTNH_F_ONLINK}])
            if wl.ip6:  # Calico style again: a link-local gateway, a /128 routed by the node
                net.add_addresses(node.netns, wl.node_if, [(WORKLOAD_GATEWAY6, 64)])
                net.add_routes(node.netns, wl.node_if, [{"dst": f"{wl.ip6}/128"}])
                net.add_addresses(wl.netns, "eth0", [(wl.ip6, 128)])
                net.add_routes(wl.netns, "eth0", [{"dst": "::/0",
                                                   "gateway": WORKLOAD_GATEWAY6}])
            settings[f"net.ipv4.conf.{wl.node_if}.rp_filter"] = "0"
            settings[f"net.ipv4.conf.{wl.node_if}.proxy_arp"] = "1"
            settings[f"net.ipv4.neigh.{wl.node_if}.proxy_delay"] = "0"
        net.sysctl(node.netns, settings)

    # ---------------------------------------------------------------- processes

    def exec_prefix(self, target: str) -> list[str]:
        """argv prefix running a command in a node, workload, etcd member, "controller"
        or "underlay"; nodes get their mount namespace too."""
        lay = self.layout
        for node in lay.all_nodes():
            if target == node.name:
                return node.exec_prefix()
        if target in ("controller", "ctl"):
            return ["ip", "netns", "exec", lay.controller_netns]
        if target in ("underlay", "ul"):
            return ["ip", "netns", "exec", lay.underlay_netns]
        for ns_owner in (*lay.all_members(), *lay.all_workloads()):
            if target == ns_owner.name:
                return ["ip", "netns", "exec", ns_owner.netns]
        known = f"n1..n{lay.nodes}, n<i>-w<j>, controller, underlay, e1..e{lay.etcd_members}"
        raise LabError(f"unknown target {target!r} in lab {self.name}: use one of {known}")

    def start_process(self, what: str, argv: list[str], *, node: str | None = None,
                      target: str | None = None, log_name: str | None = None,
                      env: dict[str, str] | None = None,
                      extra_prefix: list[str] | None = None) -> ProcessRecord:
        """Start `argv` inside `target` (default: `node`; None = root namespace);
        `extra_prefix` (e.g. identity_prefix()) runs between the namespace entry and argv."""
        where = target if target is not None else node
        prefix = [*(self.exec_prefix(where) if where is not None else []),
                  *(extra_prefix or [])]
        log = self.layout.logs_dir / (log_name or f"{what}{'-' + node if node else ''}.log")
        with self._state() as state:
            rec = procs.start(argv, what=what, node=node, log=log, prefix=prefix, env=env)
            self.ledger.record("process", **rec.to_json())
            state["processes"].append(rec.to_json())
        return rec

    def stop_process(self, rec: ProcessRecord, *, sig: signal.Signals = signal.SIGTERM,
                     timeout: float = 10.0) -> bool:
        """Stop one lab process by PID and forget it; True if it was still running."""
        was_running = procs.stop(rec, sig=sig, timeout=timeout)
        with self._state() as state:
            state["processes"] = [p for p in state["processes"]
                                  if (p["pid"], p["starttime"]) != (rec.pid, rec.starttime)]
        return was_running

    def find_processes(self, what: str, node: str | None = None) -> list[ProcessRecord]:
        return [p for p in self.processes()
                if p.what == what and (node is None or p.node == node)]

    # ---------------------------------------------------------------- etcd

    def _members(self, which: list[str]) -> list[Any]:
        by_name = {m.name: m for m in self.layout.all_members()}
        unknown = [w for w in which if w not in by_name]
        if unknown:
            raise LabError(f"unknown etcd member {unknown[0]!r}: lab {self.name} has "
                           f"{', '.join(by_name)}")
        return [by_name[w] for w in which]

    def member_names(self, member: str) -> list[str]:
        return [m.name for m in self.layout.all_members()] if member == "all" else [member]

    def etcd_start(self, which: list[str], *, wait: bool = True) -> list[ProcessRecord]:
        """Start (or restart with the same data dir) members; running ones are kept."""
        started = []
        for m in self._members(which):
            if any(procs.is_running(p) for p in self.find_processes("etcd", m.name)):
                continue
            for stale in self.find_processes("etcd", m.name):
                self.stop_process(stale)
            argv = etcd.member_argv(self.layout, m)
            argv[0] = shutil.which("etcd") or "etcd"
            started.append(self.start_process("etcd", argv, node=m.name,
                                              log_name=f"etcd-{m.name}.log"))
        if wait:
            def exited() -> str | None:
                return next((r.node for r in started if not procs.is_running(r)), None)

            etcd.wait_healthy(self.layout, self._members(which), exited)
        return started

    def etcd_stop(self, which: list[str], *, kill: bool = False) -> None:
        for m in self._members(which):
            for rec in self.find_processes("etcd", m.name):
                self.stop_process(rec, sig=signal.SIGKILL if kill else signal.SIGTERM,
                                  timeout=30.0)

    # ---------------------------------------------------------------- Workload API

    def workload_api_start(self, serve_as: Mapping[str, str] | None = None) -> ProcessRecord:
        """Start the Workload API server (if it is not running). `serve_as` {node: other
        node}: that node's socket serves the other's SVID (netns_lab/workload_api.py)."""
        if self.workload_api == "spire":
            raise LabError(f"lab {self.name} runs SPIRE on the Workload API sockets: the lab "
                           f"server would take them over; use `spire ... start|stop`")
        running = [p for p in self.find_processes(WORKLOAD_API) if procs.is_running(p)]
        if running:
            return running[0]
        for stale in self.find_processes(WORKLOAD_API):
            self.stop_process(stale)
        workload_api.write_config(self.layout, self.svid_ttl, serve_as)
        rec = self.start_process(WORKLOAD_API, workload_api.server_argv(self.layout),
                                 log_name="workload-api.log")
        workload_api.wait_ready(self.layout, rec.pid, lambda: procs.is_running(rec), rec.log)
        return rec

    def workload_api_stop(self) -> None:
        for rec in self.find_processes(WORKLOAD_API):
            self.stop_process(rec)

    # ---------------------------------------------------------------- SPIRE

    def identity_prefix(self) -> list[str]:
        """argv prefix (after the namespace's) that runs a command as a tfcrypt identity:
        with SPIRE, the dedicated gid its entries select on; nothing with the lab server,
        whose sockets are the identity."""
        return spire.as_agent_prefix() if self.workload_api == "spire" else []

    def _spire_agent_spec(self, who: str) -> spire.AgentSpec:
        for spec in spire.agent_specs(self.layout):
            if spec.who == who:
                return spec
        names = ", ".join(s.who for s in spire.agent_specs(self.layout))
        raise LabError(f"unknown spire-agent {who!r} in lab {self.name}: use one of {names}")

    def _running(self, what: str, node: str | None) -> ProcessRecord | None:
        return next((p for p in reversed(self.find_processes(what, node))
                     if procs.is_running(p)), None)

    def spire_start(self) -> None:
        """The server, then (first time) a join token and an entry per spire-agent, then
        every spire-agent; waits until each hands its tfcrypt identity out."""
        self.spire_server_start()
        started = [self.spire_agent_start(spec.who, wait=False)
                   for spec in spire.agent_specs(self.layout)]
        for spec, rec in zip(spire.agent_specs(self.layout), started, strict=True):
            spire.wait_agent(self.exec_prefix(spec.target), spec,
                             functools.partial(procs.is_running, rec), rec.log)

    def spire_server_start(self) -> ProcessRecord:
        lay = self.layout
        ctl = self.exec_prefix("controller")
        if (rec := self._running(spire.SERVER, None)) is not None:
            return rec
        for stale in self.find_processes(spire.SERVER):
            self.stop_process(stale)
        if not spire.server_config(lay).exists():
            spire.write_server_config(lay, self.svid_ttl)
        rec = self.start_process(spire.SERVER, spire.server_argv(lay), target="controller",
                                 log_name="spire-server.log")
        spire.wait_server(lay, ctl, lambda: procs.is_running(rec), rec.log)
        if not spire.bundle_path(lay).exists():
            spire.write_bundle(lay, ctl)
        return rec

    def spire_server_stop(self, *, kill: bool = False) -> None:
        for rec in self.find_processes(spire.SERVER):
            self.stop_process(rec, sig=signal.SIGKILL if kill else signal.SIGTERM)

    def spire_agent_start(self, who: str, *, wait: bool = True) -> ProcessRecord:
        """Start one spire-agent; the first start registers it (token + entry), a
        restart re-uses the SVID kept in its data dir."""
        lay = self.layout
        spec = self._spire_agent_spec(who)
        if (rec := self._running(spire.AGENT, who)) is not None:
            return rec
        for stale in self.find_processes(spire.AGENT, who):
            self.stop_process(stale)
        if not spire.agent_config(lay, who).exists():
            ctl = self.exec_prefix("controller")
            token = spire.generate_token(lay, ctl, spec)
            spire.create_entry(lay, ctl, spec, self.svid_ttl)
            spire.write_agent_config(lay, spec, token)
        rec = self.start_process(spire.AGENT, spire.agent_argv(lay, who), node=who,
                                 target=spec.target, log_name=f"spire-agent-{who}.log")
        if wait:
            spire.wait_agent(self.exec_prefix(spec.target), spec,
                             lambda: procs.is_running(rec), rec.log)
        return rec

    def spire_agent_stop(self, who: str, *, kill: bool = False) -> None:
        self._spire_agent_spec(who)
        for rec in self.find_processes(spire.AGENT, who):
            self.stop_process(rec, sig=signal.SIGKILL if kill else signal.SIGTERM)

    def _spire_status(self, running: Any) -> dict[str, Any] | None:
        if self.workload_api != "spire":
            return None
        lay = self.layout
        server = running(spire.SERVER, None)
        return {
            "server": {"pid": server.pid if server else None, "running": server is not None,
                       "address": spire.server_address(lay),
                       "admin_socket": str(spire.server_socket(lay)),
                       "config": str(spire.server_config(lay)),
                       "log": str(lay.logs_dir / "spire-server.log"),
                       "exec": self.exec_prefix("controller")},
            "agents": [{
                "name": spec.who, "target": spec.target,
                "pid": a.pid if (a := running(spire.AGENT, spec.who)) else None,
                "running": a is not None, "socket": str(spec.socket),
                "alias_id": spire.alias_id(spec.who), "spiffe_id": spec.spiffe_id,
                "config": str(spire.agent_config(lay, spec.who)),
                "log": str(lay.logs_dir / f"spire-agent-{spec.who}.log"),
            } for spec in spire.agent_specs(lay)],
            "bundle": str(spire.bundle_path(lay)),
            "identity_gid": spire.AGENT_GID,
            "identity_exec": self.identity_prefix(),
            "svid_ttl_seconds": self.svid_ttl,
        }

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """The documented `status --json` shape (docs/lab.md); enough to drive the lab."""
        lay = self.layout
        state = self._read_state()
        recs = [ProcessRecord.from_json(p) for p in state["processes"]]

        def running(what: str, node: str | None) -> ProcessRecord | None:
            for r in reversed(recs):
                if r.what == what and r.node == node and procs.is_running(r):
                    return r
            return None

        api = running(WORKLOAD_API, None)
        return {
            "name": self.name,
            "phase": state["phase"],
            "run_dir": str(self.run_dir),
            "trust_domain": TRUST_DOMAIN,
            "underlay_cidr": lay.underlay_cidr,
            "underlay_cidr6": UNDERLAY_CIDR6 if lay.ipv6 else None,
            "ipv6": lay.ipv6,
            "underlay_family": lay.underlay,
            "underlay": {"netns": lay.underlay_netns, "bridge": BRIDGE,
                         "exec": self.exec_prefix("underlay")},
            "nodes": [{
                "name": n.name, "netns": n.netns, "underlay_if": "eth0",
                "underlay_ip": n.underlay_ip, "workload_subnet": n.workload_subnet,
                "underlay_ip6": n.underlay_ip6, "workload_subnet6": n.workload_subnet6,
                "spiffe_socket": str(n.spiffe_socket), "spiffe_id": n.spiffe_id,
                "exec": n.exec_prefix(), "wireguard_dir": str(n.wireguard_dir),
                "workloads": [w.name for w in lay.workloads_of(n)],
                "agent": {
                    "pid": (a.pid if (a := running("agent", n.name)) else None),
                    "running": a is not None,
                    "log": str(self.layout.logs_dir / f"agent-{n.name}.log"),
                    "state_dir": str(n.state_dir),
                },
            } for n in lay.all_nodes()],
            "workloads": [{
                "name": w.name, "netns": w.netns, "ip": w.ip, "ip6": w.ip6, "ips": w.ips,
                "node": w.node,
                "node_if": w.node_if, "exec": self.exec_prefix(w.name),
            } for w in lay.all_workloads()],
            "controller": {
                "netns": lay.controller_netns, "underlay_ip": lay.controller_ip,
                "underlay_ip6": lay.controller_ip6,
                "spiffe_socket": str(lay.controller_socket),
                "spiffe_id": lay.controller_spiffe_id,
                "exec": self.exec_prefix("controller"),
            },
            "etcd": {
                "endpoints": lay.etcd_endpoints(),
                "tls": lay.etcd_tls,
                "etcdctl_flags": etcd_tls.etcdctl_flags(lay),
                "members": [{
                    "name": m.name, "netns": m.netns, "underlay_ip": m.underlay_ip,
                    "underlay_ip6": m.underlay_ip6,
                    "pid": (r.pid if (r := running("etcd", m.name)) else None),
                    "data_dir": str(m.data_dir), "running": r is not None,
                } for m in lay.all_members()],
            },
            "kubernetes": kube.status(self),
            "identity_provider": self.workload_api,
            "spire": self._spire_status(running),
            "workload_api": {
                "mode": self.workload_api,
                "pid": api.pid if api else None, "running": api is not None,
                "config": str(workload_api.config_path(lay)),
                "ready_file": str(workload_api.ready_file(lay)),
                "svid_ttl_seconds": self.svid_ttl,
            },
            "processes": [{
                "pid": r.pid, "what": r.what, "node": r.node, "log": r.log,
                "running": procs.is_running(r),
            } for r in recs],
        }


def down(name: str) -> bool:
    """Remove everything the ledger of lab `name` lists; False if there was nothing."""
    run_dir = run_dir_of(name)
    if not run_dir.exists():
        return False
    entries = Ledger(run_dir).entries()
    errors: list[str] = []
    lock_path = run_dir / "lock"
    with open(lock_path, "a") if lock_path.exists() else contextlib.nullcontext() as lock:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        for e in reversed(entries):
            if e["kind"] == "process":
                try:
                    procs.stop(ProcessRecord.from_json(e))
                except OSError as err:
                    errors.append(f"process {e['pid']}: {err}")
    for e in reversed(entries):
        if e["kind"] == "netns":
            try:
                procs.stop_netns_residents(e["name"])
            except OSError as err:
                errors.append(f"processes in {e['name']}: {err}")
    for e in reversed(entries):
        try:
            if e["kind"] == "mount":
                mountns.unmount(Path(e["path"]))
            elif e["kind"] == "netns":
                net.remove_netns(e["name"])
        except (LabError, OSError) as err:
            errors.append(str(err))
    if mountns.is_mountpoint(run_dir):
        errors.append(f"{run_dir} is still mounted")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    if errors:
        raise LabError(f"down of lab {name} incomplete: {'; '.join(errors)}")
    return True
