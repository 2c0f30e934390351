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
import json
import os
import shutil
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import etcd, etcd_tls, mountns, net, preflight, procs, workload_api
from .errors import LabError
from .layout import (
    BRIDGE,
    RUN_ROOT,
    TRUST_DOMAIN,
    UNDERLAY_CIDR,
    UNDERLAY_PREFIXLEN,
    WORKLOAD_GATEWAY,
    Layout,
    Node,
    check_name,
)
from .ledger import Ledger
from .procs import ProcessRecord

STATE_FILE = "state.json"
WORKLOAD_API = "workload-api"
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4


def run_dir_of(name: str) -> Path:
    return RUN_ROOT / check_name(name)


class Lab:
    """A named lab; construct with a Layout to create it, or `Lab.load(name)` to use one."""

    def __init__(self, layout: Layout, svid_ttl: int = workload_api.DEFAULT_SVID_TTL) -> None:
        if svid_ttl < 2:
            raise LabError(f"--svid-ttl must be at least 2 seconds, got {svid_ttl}")
        self.layout = layout
        self.svid_ttl = svid_ttl
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
                        etcd_tls=state.get("etcd_tls", False))
        return cls(layout, svid_ttl=state["svid_ttl"])

    def _initial_state(self) -> dict[str, Any]:
        return {"name": self.name, "nodes": self.layout.nodes,
                "workloads_per_node": self.layout.workloads_per_node,
                "etcd_members": self.layout.etcd_members, "svid_ttl": self.svid_ttl,
                "etcd_tls": self.layout.etcd_tls,
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
        self._build_underlay()
        for node in lay.all_nodes():
            self._build_workloads(node)
        for node in lay.all_nodes():
            self.ledger.record("mount", path=str(node.mount_ns))
            mountns.create_node_mount_ns(node.netns, node.mount_ns, node.wireguard_dir,
                                         node.default_path_binds())
        if lay.etcd_tls:
            etcd_tls.write_certs(lay)  # the CA the Workload API server then loads
        self.etcd_start([m.name for m in lay.all_members()])
        self.workload_api_start()

    def _link(self, ns: str, ifname: str) -> None:
        self.ledger.record("link", netns=ns, ifname=ifname)

    def _build_underlay(self) -> None:
        lay = self.layout
        ul = lay.underlay_netns
        self._link(ul, BRIDGE)
        net.add_bridge(ul, BRIDGE)
        ends: list[tuple[str, str, str, list[dict[str, object]]]] = [
            (lay.controller_netns, "ctl", lay.controller_ip, []),
            *((m.netns, m.name, m.underlay_ip, []) for m in lay.all_members()),
        ]
        for node in lay.all_nodes():
            routes: list[dict[str, object]] = [
                {"dst": other.workload_subnet, "gateway": other.underlay_ip}
                for other in lay.all_nodes() if other.name != node.name
            ]
            ends.append((node.netns, node.name, node.underlay_ip, routes))
        for ns, port, ip, routes in ends:
            self._link(ns, "eth0")
            net.add_veth(ns, "eth0", ul, port)
            net.enslave_up(ul, port, BRIDGE)
            net.configure(ns, "eth0", address=ip, prefixlen=UNDERLAY_PREFIXLEN, routes=routes)

    def _build_workloads(self, node: Node) -> None:
        """Calico-style: /32 on the workload, onlink default via 169.254.1.1, proxy ARP.

        Pitfall: proxy ARP answers only if the node has a unicast route to the target,
        so the node routes 169.254.1.1 to its loopback (it has no default route).
        """
        settings = {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
            "net.ipv4.conf.eth0.rp_filter": "0",
        }
        net.configure(node.netns, "lo",
                      routes=[{"dst": f"{WORKLOAD_GATEWAY}/32", "scope": RT_SCOPE_LINK}])
        for wl in self.layout.workloads_of(node):
            self._link(node.netns, wl.node_if)
            net.add_veth(node.netns, wl.node_if, wl.netns, "eth0")
            net.configure(node.netns, wl.node_if,
                          routes=[{"dst": f"{wl.ip}/32", "scope": RT_SCOPE_LINK}])
            net.configure(wl.netns, "eth0", address=wl.ip, prefixlen=32, routes=[
                {"dst": "0.0.0.0/0", "gateway": WORKLOAD_GATEWAY, "flags": RTNH_F_ONLINK}])
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
                      env: dict[str, str] | None = None) -> ProcessRecord:
        """Start `argv` inside `target` (default: `node`; None = root namespace)."""
        where = target if target is not None else node
        prefix = self.exec_prefix(where) if where is not None else []
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
            "underlay_cidr": UNDERLAY_CIDR,
            "underlay": {"netns": lay.underlay_netns, "bridge": BRIDGE,
                         "exec": self.exec_prefix("underlay")},
            "nodes": [{
                "name": n.name, "netns": n.netns, "underlay_if": "eth0",
                "underlay_ip": n.underlay_ip, "workload_subnet": n.workload_subnet,
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
                "name": w.name, "netns": w.netns, "ip": w.ip, "node": w.node,
                "node_if": w.node_if, "exec": self.exec_prefix(w.name),
            } for w in lay.all_workloads()],
            "controller": {
                "netns": lay.controller_netns, "underlay_ip": lay.controller_ip,
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
                    "pid": (r.pid if (r := running("etcd", m.name)) else None),
                    "data_dir": str(m.data_dir), "running": r is not None,
                } for m in lay.all_members()],
            },
            "workload_api": {
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
