"""`python -m netns_lab`: the lab's command line.

Rules: every error is one line on stderr, `netns_lab: <problem>: <fix>`, exit 1 (2 for a
bad command line, also one line); `down` of an absent lab says so and exits 0; `exec`
replaces this process so the command's exit code is the CLI's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import agents, guest, kdemo, kube, procs
from .errors import LabError
from .lab import DEFAULT_WORKLOAD_API, WORKLOAD_API_MODES, Lab, down
from .layout import MAX_NODES, MAX_WORKLOADS, Layout, check_name
from .workload_api import DEFAULT_SVID_TTL

PROG = "netns_lab"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: {message} (see `python -m {PROG} --help`)\n")
        raise SystemExit(2)


def _name(value: str) -> str:
    try:
        return check_name(value)
    except LabError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m {PROG}",
                description="A tfcrypt lab: nodes, workloads, an underlay and etcd as "
                            "network namespaces, plus an identity provider: real SPIRE "
                            "(--workload-api spire, the default) or the lab SPIFFE "
                            "Workload API server (--workload-api lab, a fault injector).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("--name", required=True, type=_name,
                       help="lab name, ^[a-z][a-z0-9]{0,7}$; prefix of every lab object")
        return c

    up = cmd("up", "create the lab; on any failure remove what was made")
    up.add_argument("--nodes", type=int, required=True, help=f"node count, 1..{MAX_NODES}")
    up.add_argument("--workloads-per-node", type=int, required=True,
                    help=f"workloads on each node, 0..{MAX_WORKLOADS}")
    up.add_argument("--etcd-members", type=int, choices=(1, 3), default=1,
                    help="etcd cluster size (default 1)")
    up.add_argument("--etcd-tls", action="store_true",
                    help="etcd serves mutual TLS to clients and peers; agents connect with "
                         "their SVIDs (docs/lab.md)")
    up.add_argument("--svid-ttl", type=int, default=DEFAULT_SVID_TTL, metavar="SECONDS",
                    help=f"lifetime of issued X509-SVIDs (default {DEFAULT_SVID_TTL})")
    up.add_argument("--ipv6", action="store_true",
                    help="IPv6 (ULA) beside IPv4 for nodes and workloads (docs/lab.md)")
    up.add_argument("--underlay", choices=("v4", "v6"), default="v4",
                    help="underlay family: v6 is IPv6-only (etcd and WireGuard endpoints "
                         "over IPv6; implies --ipv6); default v4")
    up.add_argument("--workload-api", choices=WORKLOAD_API_MODES, default=DEFAULT_WORKLOAD_API,
                    help="who issues SVIDs: spire (a real spire-server and a spire-agent per "
                         "node, built by scripts/build-go.sh) or lab (the lab's own server, "
                         f"a fault injector); default {DEFAULT_WORKLOAD_API}")

    up.add_argument("--kubernetes", action="store_true",
                    help="also a real kube-apiserver (and its own etcd) in the controller "
                         "namespace, with deploy/kubernetes's CRD and RBAC applied and a "
                         "Node and Pod object per lab node and workload (docs/lab.md)")
    up.add_argument("--agents", action="store_true",
                    help="start a tfcrypt agent in every node once the lab is up")

    ag = cmd("agent", "start, stop (SIGTERM), kill (SIGKILL) or restart one node's "
                      "tfcrypt agent")
    ag.add_argument("node", help="node name (n1, n2, ...)")
    ag.add_argument("action", choices=agents.ACTIONS)

    dm = sub.add_parser("demo", help="the main job: tag-selective encryption proven on the "
                                     "wire, in three acts",
                        description="Bring up a 3-node lab with tfcrypt agents, publish the "
                                    "inventory of examples/demo-inventory.yaml and two "
                                    "policies, drive traffic between every pair of workloads "
                                    "on different nodes while capturing the underlay, and "
                                    "print one row per pair with a verdict; then wait for "
                                    "every node's flow report of that traffic, show what n1 "
                                    "saw (tfcrypt flows), apply an audit-mode policy, show "
                                    "its plan against the seen traffic, enforce it, print "
                                    "the table again and tfcrypt report since the "
                                    "enforcement; act 3, in a lab with a kube-apiserver, "
                                    "applies the same policies with kubectl apply through "
                                    "tfcrypt controller run, prints the table and kubectl "
                                    "get encryptionpolicies, and moves a pair in with kubectl "
                                    "label pod. Exit 1 on any mismatch or a failing report.")
    dm.add_argument("--name", default="demo", type=_name, help="lab name (default demo)")
    dm.add_argument("--workload-api", choices=WORKLOAD_API_MODES, default="spire",
                    help="who issues SVIDs (default spire; lab = the lab's own server)")
    dm.add_argument("--keep", action="store_true",
                    help="leave the lab up to explore; says how to take it down")
    dm.add_argument("--kubernetes", action="store_true",
                    help="only act 3, the Kubernetes act: Pods labelled from the inventory, "
                         "tfcrypt controller run, the policies applied with kubectl apply, "
                         "the wire table, kubectl get encryptionpolicies, then a kubectl "
                         "label pod that moves a pair in, shown on the wire")

    st = cmd("status", "describe the lab (human summary, or --json)")
    st.add_argument("--json", action="store_true", help="print the documented JSON document")

    cmd("down", "stop every lab process and remove every lab object (exit 0 if absent)")

    ex = cmd("exec", "run a command inside a lab target and exit with its status")
    ex.add_argument("target", help="a node (n1), a workload (n1-w1), controller, underlay, "
                                   "or an etcd member (e1)")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...",
                    help="command to run, after --")

    et = cmd("etcd", "start, stop (SIGTERM and wait) or kill (SIGKILL) etcd members")
    et.add_argument("member", help="member name (e1, e2, e3) or all")
    et.add_argument("action", choices=("start", "stop", "kill"))
    et.add_argument("--no-wait", action="store_true",
                    help="start: do not wait for the started members to be healthy")

    gu = sub.add_parser("guest", help="run a command in Debian's current kernel under qemu "
                                      "(TCG), host root read-only: the kernel tier",
                        description="Fetch (once, into ~/.cache/tfcrypt/kernel) the kernel "
                                    "package Debian's linux-image-amd64 depends on, boot it "
                                    "under qemu with the host root shared read-only and tmpfs "
                                    "on /run and /tmp, run CMD in the current directory, "
                                    "stream its output and exit with its status (124 timeout, "
                                    "125 the guest ended without one).")
    gu.add_argument("--timeout", type=float, default=1800, metavar="SECONDS",
                    help="stop qemu after this long (default 1800)")
    gu.add_argument("--memory", type=int, default=3072, metavar="MB",
                    help="guest memory (default 3072)")
    gu.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    gu.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in the command's environment (repeatable)")
    gu.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...",
                    help="command to run, after --")

    wa = cmd("workload-api", "start or stop the lab's SPIFFE Workload API server")
    wa.add_argument("action", choices=("start", "stop"))

    sp = cmd("spire", "start, stop (SIGTERM) or kill (SIGKILL) the spire-server or one "
                      "spire-agent of a lab brought up with --workload-api spire")
    sp.add_argument("which", help="server, a node (n1, ...) or ctl (the controller's agent)")
    sp.add_argument("action", choices=("start", "stop", "kill"))
    kc = cmd("kubectl", "run the lab's kubectl (inside the controller namespace) against a "
                        "lab brought up with --kubernetes; exits with kubectl's status")
    kc.add_argument("--as", dest="who", choices=("admin", "controller"), default="admin",
                    help="credential: admin (system:masters, default) or controller (the "
                         "tfcrypt controller's ServiceAccount user, RBAC applies)")
    kc.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- ARGS...",
                    help="kubectl arguments, after --")

    ka = cmd("kube-apiserver", "start, stop (SIGTERM) or kill (SIGKILL) the lab's "
                               "kube-apiserver (its etcd keeps running)")
    ka.add_argument("action", choices=("start", "stop", "kill"))
    return p


def _summary(s: dict[str, Any]) -> str:
    members = ", ".join(f"{m['name']} {'running' if m['running'] else 'stopped'}"
                        for m in s["etcd"]["members"])
    if s["spire"] is not None:
        up_ = [a["name"] for a in s["spire"]["agents"] if a["running"]]
        api = (f"SPIRE server {'running' if s['spire']['server']['running'] else 'stopped'}"
               f", agents running: {' '.join(up_) or '-'}")
    else:
        api = "lab server " + ("running" if s["workload_api"]["running"] else "stopped")
    lines = [
        f"lab {s['name']} ({s['phase']}): {len(s['nodes'])} node(s), "
        f"{len(s['workloads'])} workload(s), run dir {s['run_dir']}",
        f"etcd {','.join(s['etcd']['endpoints'])} [{members}]; identities: {api}",
    ]
    if (k := s.get("kubernetes")) is not None:
        state = "running" if k["apiserver"]["running"] else "stopped"
        lines.append(f"kube-apiserver {k['version']} {k['apiserver']['url']} {state}; "
                     f"kubeconfig {k['kubeconfigs']['admin']} (admin), "
                     f"{k['kubeconfigs']['controller']} (controller)")
    lines += [f"  {n['name']} {n['underlay_ip']} {n['workload_subnet']} "
              f"{(n['workload_subnet6'] + ' ') if n.get('workload_subnet6') else ''}"
              f"workloads: {' '.join(n['workloads']) or '-'}"
              f"{' agent pid ' + str(n['agent']['pid']) if n['agent']['running'] else ''}"
              for n in s["nodes"]]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.command == "up":
        lab = Lab(Layout(args.name, args.nodes, args.workloads_per_node, args.etcd_members,
                         ipv6=args.ipv6, underlay=args.underlay, etcd_tls=args.etcd_tls,
                         kubernetes=args.kubernetes),
                  svid_ttl=args.svid_ttl, workload_api=args.workload_api)
        lab.up()
        print(f"lab {args.name} is up: run dir {lab.run_dir}")
        if args.agents:
            try:
                for rec in agents.start_all(lab):
                    print(f"agent {rec.node} running, pid {rec.pid}, log {rec.log}")
            except BaseException:
                down(args.name)
                raise
        return 0
    if args.command == "demo":
        run = kdemo.run if args.kubernetes else kdemo.run_all
        return run(args.name, args.keep, workload_api=args.workload_api)
    if args.command == "guest":
        argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not argv:
            raise LabError("guest needs a command: guest -- CMD...")
        env = dict(kv.partition("=")[::2] for kv in args.env)
        return guest.run(argv, timeout=args.timeout, memory_mb=args.memory, cpus=args.cpus,
                         env=env)
    if args.command == "down":
        if down(args.name):
            print(f"lab {args.name} is down")
        else:
            print(f"{PROG}: lab {args.name} is not up")
        return 0
    lab = Lab.load(args.name)
    if args.command == "status":
        s = lab.status()
        print(json.dumps(s, indent=2) if args.json else _summary(s))
    elif args.command == "exec":
        argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not argv:
            raise LabError("exec needs a command: exec --name NAME TARGET -- CMD...")
        full = lab.exec_prefix(args.target) + argv
        sys.stdout.flush()
        os.execvp(full[0], full)
    elif args.command == "etcd":
        names = lab.member_names(args.member)
        if args.action == "start":
            for rec in lab.etcd_start(names, wait=not args.no_wait):
                print(f"etcd {rec.node} started, pid {rec.pid}")
        else:
            lab.etcd_stop(names, kill=args.action == "kill")
            print(f"etcd {args.member}: {args.action} done")
    elif args.command in ("kubectl", "kube-apiserver"):
        if not lab.layout.kubernetes:
            raise LabError(f"lab {lab.name} has no Kubernetes: bring it up with --kubernetes")
        if args.command == "kubectl":
            full = kube.kubectl_argv(lab, args.who) + (
                args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
            sys.stdout.flush()
            os.execvp(full[0], full)
        if args.action == "start":
            rec = kube.apiserver_start(lab)
            print(f"kube-apiserver running, pid {rec.pid}, log {rec.log}")
        else:
            kube.apiserver_stop(lab, kill=args.action == "kill")
            print(f"kube-apiserver: {args.action} done")
    elif args.command == "agent":
        print(agents.control(lab, args.node, args.action))
    elif args.command == "workload-api":
        if args.action == "start":
            rec = lab.workload_api_start()
            print(f"workload API running, pid {rec.pid}"
                  f"{'' if procs.is_running(rec) else ' (exited)'}")
        else:
            lab.workload_api_stop()
            print("workload API stopped")
    elif args.command == "spire":
        if lab.workload_api != "spire":
            raise LabError(f"lab {lab.name} runs the lab Workload API server, not SPIRE: "
                           f"bring it up with --workload-api spire")
        if args.action == "start":
            rec = (lab.spire_server_start() if args.which == "server"
                   else lab.spire_agent_start(args.which))
            print(f"{rec.what} {args.which} running, pid {rec.pid}, log {rec.log}")
        else:
            if args.which == "server":
                lab.spire_server_stop(kill=args.action == "kill")
            else:
                lab.spire_agent_stop(args.which, kill=args.action == "kill")
            print(f"spire {args.which}: {args.action} done")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return _run(args)
    except LabError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
