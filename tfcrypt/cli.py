"""`tfcrypt` command line.

Every command takes --etcd and --spiffe-socket (or TFCRYPT_ETCD, TFCRYPT_SPIFFE_SOCKET).
Errors in what the user typed exit with status 2 and one line naming the option.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tfcrypt import __version__
from tfcrypt.config import (
    DEFAULT_ETCD,
    DEFAULT_SPIFFE_SOCKET,
    AgentConfig,
    default_node_name,
    env_default,
    split_endpoints,
)
from tfcrypt.errors import ConfigError, TfcryptError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", action="append", metavar="URL[,URL...]",
                   help=f"etcd endpoints (env TFCRYPT_ETCD; default {DEFAULT_ETCD[0]})")
    p.add_argument("--spiffe-socket", metavar="PATH",
                   default=env_default("SPIFFE_SOCKET", DEFAULT_SPIFFE_SOCKET),
                   help="SPIFFE Workload API socket (env TFCRYPT_SPIFFE_SOCKET; "
                        "default %(default)s)")
    p.add_argument("--prefix", default=env_default("PREFIX", "/tfcrypt/v1"),
                   help="etcd key prefix (default %(default)s)")
    p.add_argument("--log-level", default=env_default("LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])


def _etcd(args: argparse.Namespace) -> tuple[str, ...]:
    if args.etcd:
        return split_endpoints(args.etcd)
    return split_endpoints(env_default("ETCD") or DEFAULT_ETCD[0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfcrypt",
        description="Tag-selective WireGuard encryption between nodes, with keys bound to "
                    "SPIFFE identities and exchanged through etcd.")
    parser.add_argument("--version", action="version", version=f"tfcrypt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="run the per-node daemon")
    _common(agent)
    agent.add_argument("--node", default=default_node_name(),
                       help="this node's name (env TFCRYPT_NODE_NAME; default the hostname)")
    agent.add_argument("--advertise-address", default=env_default("ADVERTISE_ADDRESS"),
                       help="underlay address peers reach this node at (required)")
    agent.add_argument("--interface", default=env_default("INTERFACE", "tfcrypt0"),
                       help="WireGuard interface name (default %(default)s)")
    agent.add_argument("--listen-port", type=int, default=51820,
                       help="WireGuard UDP port (default %(default)s)")
    agent.add_argument("--backend", default=env_default("BACKEND", "userspace"),
                       help="userspace (wireguard-go) or kernel (default %(default)s)")
    agent.add_argument("--state-dir", default=env_default("STATE_DIR", "/var/lib/tfcrypt"),
                       help="where the private key (0600) and status live (default "
                            "%(default)s)")
    agent.add_argument("--mark", type=lambda v: int(v, 0), default=0x00100000,
                       help="fwmark bit for selected packets (default 0x00100000)")
    agent.add_argument("--mark-mask", type=lambda v: int(v, 0), default=None,
                       help="mask of the mark bits tfcrypt owns (default: the mark)")
    agent.add_argument("--route-table", type=int, default=29798,
                       help="tunnel route table; the next id holds the fail-closed "
                            "prohibit routes (default %(default)s)")
    agent.add_argument("--rule-priority", type=int, default=1820,
                       help="ip rule priority of the tunnel rule; the fail-closed rule "
                            "takes the next one (default %(default)s)")
    agent.add_argument("--lease-ttl", type=int, default=15,
                       help="seconds the node record outlives a dead agent (default "
                            "%(default)s)")
    agent.add_argument("--resync-interval", type=float, default=10.0,
                       help="seconds between full reconciles (default %(default)s)")
    agent.add_argument("--mtu", type=int, default=None,
                       help="WireGuard MTU (default 1420: 1500 minus 80 bytes of overhead)")
    agent.add_argument("--wireguard-log", default=None,
                       help="file for wireguard-go's output (default: in the state dir)")

    keys = sub.add_parser("keys", help="manage this node's WireGuard key")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    rotate = keys_sub.add_parser(
        "rotate", help="make a new key and bump the epoch; a running agent picks it up "
                       "within a second and republishes its record")
    show = keys_sub.add_parser("show", help="print the public key and epoch")
    workload = sub.add_parser("workload", help="the controller-signed workload inventory")
    wl_sub = workload.add_subparsers(dest="workload_command", required=True)
    wl_set = wl_sub.add_parser("set", help="create or update a workload (signed with the "
                                           "controller SVID)")
    wl_set.add_argument("name")
    wl_set.add_argument("--node", required=True, help="the node the workload runs on")
    wl_set.add_argument("--ip", action="append", required=True, help="an address (repeatable)")
    wl_set.add_argument("--tag", action="append", default=[],
                        help="an effective tag type=value (repeatable)")
    wl_del = wl_sub.add_parser("delete", help="remove a workload")
    wl_del.add_argument("name")
    wl_del.add_argument("--node", help="only on this node")
    wl_list = wl_sub.add_parser("list", help="workloads as agents would believe them")
    wl_list.add_argument("--json", action="store_true")

    policy = sub.add_parser("policy", help="EncryptionPolicies")
    pol_sub = policy.add_subparsers(dest="policy_command", required=True)
    pol_apply = pol_sub.add_parser("apply", help="create or update a policy from a YAML file")
    pol_apply.add_argument("-f", "--file", required=True)
    pol_del = pol_sub.add_parser("delete", help="remove a policy")
    pol_del.add_argument("name")
    pol_list = pol_sub.add_parser("list", help="policies as agents would believe them")
    pol_list.add_argument("--json", action="store_true")
    pol_plan = pol_sub.add_parser(
        "plan", help="which pairs a policy file would newly encrypt or stop encrypting (an "
                     "audit-mode policy is shown as if enforced), and whether every node it "
                     "needs has a verified key")
    pol_plan.add_argument("-f", "--file", required=True)
    pol_plan.add_argument("--json", action="store_true")

    expl = sub.add_parser("explain", help="is the flow SRC_IP -> DST_IP encrypted, by which "
                                          "policy and rule, or why not")
    expl.add_argument("src_ip", metavar="SRC_IP")
    expl.add_argument("dst_ip", metavar="DST_IP")
    expl.add_argument("--json", action="store_true")
    controller_parsers = [wl_set, wl_del, wl_list, pol_apply, pol_del, pol_list, pol_plan,
                          expl]

    status = sub.add_parser("status", help="what the local agent last reported")
    for p in controller_parsers:
        _common(p)
        p.add_argument("--controller-id", action="append", default=None,
                       help="SPIFFE IDs allowed to write workloads and policies "
                            "(default spiffe://<trust-domain>/tfcrypt/controller)")
    for p in (rotate, show, status):
        _common(p)
        p.add_argument("--state-dir", default=env_default("STATE_DIR", "/var/lib/tfcrypt"),
                       help="the agent's state directory (default %(default)s)")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _agent_config(args: argparse.Namespace) -> AgentConfig:
    if not args.advertise_address:
        raise ConfigError("--advertise-address: required (the underlay IP peers use)")
    return AgentConfig(
        node_name=args.node, advertise_address=args.advertise_address,
        etcd_endpoints=_etcd(args), spiffe_socket=args.spiffe_socket,
        interface=args.interface, listen_port=args.listen_port, backend=args.backend,
        state_dir=args.state_dir, prefix=args.prefix, mark=args.mark,
        mark_mask=args.mark_mask if args.mark_mask is not None else args.mark,
        route_table=args.route_table, rule_priority=args.rule_priority,
        lease_ttl=args.lease_ttl,
        resync_interval=args.resync_interval, mtu=args.mtu)


async def _run_agent(cfg: AgentConfig, wireguard_log: str | None) -> None:
    from tfcrypt.agent.dataplane import Dataplane, RoutingConfig
    from tfcrypt.agent.loop import Agent
    from tfcrypt.dataplane.netlink import PyRoute2Netlink
    from tfcrypt.dataplane.nft_json import SubprocessNft
    from tfcrypt.dataplane.nftables import NftManager
    from tfcrypt.identity.svid_source import SvidSource
    from tfcrypt.registry import Registry
    from tfcrypt.wireguard.device import WireGuardManager

    supervise = None
    if cfg.backend == "userspace":
        from tfcrypt.wireguard.userspace import UserspaceBackend
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        backend = UserspaceBackend(
            cfg.interface, log_path=wireguard_log or Path(cfg.state_dir) / "wireguard-go.log")
        supervise = backend.supervise
    else:
        from tfcrypt.wireguard.kernel import KernelBackend
        backend = KernelBackend(cfg.interface)  # type: ignore[assignment]
    netlink = PyRoute2Netlink()
    registry = Registry(cfg.etcd_endpoints, prefix=cfg.prefix)
    dataplane = Dataplane(WireGuardManager(backend), NftManager(SubprocessNft()), netlink,
                          RoutingConfig(ifname=cfg.interface, tunnel_table=cfg.route_table,
                                        failclosed_table=cfg.route_table + 1,
                                        rule_priority=cfg.rule_priority, mark=cfg.mark,
                                        mask=cfg.mark_mask))
    agent = Agent(cfg, registry=registry, svids=SvidSource(cfg.spiffe_socket),
                  dataplane=dataplane, supervise=supervise)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await agent.run()
    except asyncio.CancelledError:
        logging.getLogger("tfcrypt").info("stopping; the dataplane stays in place")
    finally:
        with contextlib.suppress(Exception):
            await registry.aclose()
        with contextlib.suppress(Exception):
            await netlink.aclose()
        with contextlib.suppress(Exception):
            await backend.close()


def _cell(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _print_rows(rows: list[dict[str, object]], as_json: bool, columns: list[str]) -> None:
    """A table of the verified rows, then one line per refused value with its reason."""
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return
    table = [[_cell(r[c]) for c in columns] for r in rows if r["verified"]]
    widths = [max([len(c), *(len(row[i]) for row in table)]) for i, c in enumerate(columns)]
    for row in [[c.upper() for c in columns], *table]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    for r in rows:
        if not r["verified"]:
            print(f"{r['key']}: REJECTED ({r['rejected']})")


async def _controller_command(args: argparse.Namespace) -> int:
    from tfcrypt.controller import commands
    from tfcrypt.controller.session import session

    controller_ids = tuple(args.controller_id or
                           ("spiffe://{trust_domain}/tfcrypt/controller",))
    policy = commands.read_policy_file(args.file) \
        if args.command == "policy" and args.policy_command in ("apply", "plan") else None
    workload = commands.build_workload(args.name, args.node, args.ip, args.tag) \
        if args.command == "workload" and args.workload_command == "set" else None
    async with session(_etcd(args), args.prefix, args.spiffe_socket, controller_ids) as s:
        if args.command == "explain":
            explanation = await commands.explain_flow(s, args.src_ip, args.dst_ip)
            print(json.dumps(explanation.to_json(), indent=2) if args.json
                  else explanation.render())
        elif workload is not None:
            print(await commands.workload_set(s, workload))
        elif policy is not None and args.policy_command == "plan":
            plan = await commands.policy_plan(s, policy)
            print(json.dumps(commands.plan_to_json(plan), indent=2) if args.json
                  else commands.render_plan(plan))
        elif policy is not None:
            print(await commands.policy_apply(s, policy))
        elif args.command == "workload" and args.workload_command == "delete":
            print(await commands.workload_delete(s, args.name, args.node))
        elif args.command == "policy" and args.policy_command == "delete":
            print(await commands.policy_delete(s, args.name))
        elif args.command == "workload":
            _print_rows(await commands.workload_rows(s), args.json,
                        ["name", "node", "ips", "tags", "epoch"])
        else:
            _print_rows(await commands.policy_rows(s), args.json,
                        ["name", "mode", "rules", "epoch"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "agent":
            _setup_logging(args.log_level)
            cfg = _agent_config(args)
            asyncio.run(_run_agent(cfg, args.wireguard_log))
            return 0
        if args.command == "keys":
            from tfcrypt.agent.nodekey import load_node_key, rotate_node_key
            if args.keys_command == "rotate":
                nk = rotate_node_key(args.state_dir, time.time())
            else:
                nk = load_node_key(args.state_dir, time.time())
            print(json.dumps({"public_key": nk.public_key, "epoch": nk.epoch}))
            return 0
        if args.command in ("workload", "policy", "explain"):
            return asyncio.run(_controller_command(args))
        if args.command == "status":
            path = Path(args.state_dir) / "status.json"
            try:
                print(path.read_text())
            except OSError as exc:
                print(f"tfcrypt: no agent status at {path}: {exc.strerror}", file=sys.stderr)
                return 1
            return 0
    except ConfigError as exc:
        print(f"tfcrypt: {exc}", file=sys.stderr)
        return 2
    except TfcryptError as exc:
        print(f"tfcrypt: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
