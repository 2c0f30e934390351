"""`tfcrypt` command line.

Commands that talk to etcd take --etcd, --spiffe-socket and --etcd-tls (or TFCRYPT_ETCD,
TFCRYPT_SPIFFE_SOCKET, TFCRYPT_ETCD_TLS): with TLS the command's SVID is etcd's client
certificate.
`agent`, `status` and `uninstall` also read `--config FILE` (YAML); precedence is flags >
TFCRYPT_* environment > file > defaults (tfcrypt/config.py, docs/operations.md).
Errors in what the user typed exit with status 2 and one line naming the option.
`status` exits 0 healthy, 1 unhealthy, 2 when the agent cannot be reached.
`policy plan --against-seen` exits 1 when a seen flow would be black-holed, `policy
suggest` 1 when no seen flow can be covered, `report` 1 when selected pairs carried
plaintext (docs/flows.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tfcrypt import __version__, seen_cli
from tfcrypt.config import (
    DEFAULT_ETCD,
    DEFAULT_SPIFFE_SOCKET,
    KEYS,
    AgentConfig,
    agent_config,
    env_default,
    resolve,
    unknown_env,
)
from tfcrypt.config_values import (
    etcd_tls_problem,
    split_endpoints,
    split_host_port,
    state_dir_problem,
)
from tfcrypt.errors import ConfigError, TfcryptError
from tfcrypt.flows_view import VERDICTS, duration
from tfcrypt.marks import foreign_clashes
from tfcrypt.safeyaml import one_line
from tfcrypt.table import print_rows

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNREACHABLE = 0, 1, 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", action="append", metavar="URL[,URL...]",
                   help=f"etcd endpoints (env TFCRYPT_ETCD; default {DEFAULT_ETCD[0]})")
    p.add_argument("--spiffe-socket", metavar="PATH",
                   default=env_default("SPIFFE_SOCKET", DEFAULT_SPIFFE_SOCKET),
                   help="SPIFFE Workload API socket (env TFCRYPT_SPIFFE_SOCKET; "
                        "default %(default)s)")
    p.add_argument("--etcd-tls", action="store_true", default=None,
                   help="connect to etcd over mutual TLS with this SVID as the client "
                        "certificate (env TFCRYPT_ETCD_TLS; docs/registry.md)")
    p.add_argument("--etcd-server-name", metavar="NAME",
                   default=env_default("ETCD_SERVER_NAME"),
                   help="name etcd's certificate must carry, if not the endpoint's host "
                        "(env TFCRYPT_ETCD_SERVER_NAME)")
    p.add_argument("--prefix", default=env_default("PREFIX", "/tfcrypt/v1"),
                   help="etcd key prefix (default %(default)s)")
    p.add_argument("--log-level", default=env_default("LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])


def _etcd_tls(args: argparse.Namespace) -> bool:
    """--etcd-tls, else TFCRYPT_ETCD_TLS (true/false), else off."""
    if args.etcd_tls:
        return True
    raw = env_default("ETCD_TLS")
    if raw is None:
        return False
    try:
        return resolve({}, {"TFCRYPT_ETCD_TLS": raw}, None, ["etcd_tls"])["etcd_tls"]
    except KeyError:
        return False


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

    agent = sub.add_parser(
        "agent", help="run the per-node daemon",
        description="Every option is also a TFCRYPT_<KEY> environment variable and a key of "
                    "the --config file; flags win over the environment, which wins over "
                    "the file.")
    _config_option(agent)
    _key_options(agent)

    keys = sub.add_parser("keys", help="manage this node's WireGuard key")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    rotate = keys_sub.add_parser(
        "rotate", help="make a new key and bump the epoch; a running agent picks it up "
                       "within a second and republishes its record")
    show = keys_sub.add_parser("show", help="print the public key and epoch")
    workload = sub.add_parser("workload", help="the controller-signed workload inventory")
    wl_sub = workload.add_subparsers(dest="workload_command", required=True)
    wl_set = wl_sub.add_parser("set", help="create or update a workload (signed with the "
                                           "controller SVID; nothing is written that the "
                                           "agents would refuse)")
    wl_set.add_argument("name")
    wl_set.add_argument("--node", required=True, help="the node the workload runs on")
    wl_set.add_argument("--ip", action="append", required=True, help="an address (repeatable)")
    wl_set.add_argument("--tag", action="append", default=[],
                        help="an effective tag type=value (repeatable)")
    wl_del = wl_sub.add_parser("delete", help="remove a workload")
    wl_del.add_argument("name")
    wl_del.add_argument("--node", help="only on this node")
    wl_list = wl_sub.add_parser("list", help="every stored workload as agents read it: state "
                                             "ok, or refused: <reason>")
    wl_list.add_argument("--json", action="store_true")

    policy = sub.add_parser("policy", help="EncryptionPolicies")
    pol_sub = policy.add_subparsers(dest="policy_command", required=True)
    pol_apply = pol_sub.add_parser(
        "apply", help="create or update a policy from a YAML file (at most 1 MiB); nothing "
                      "is written that the agents would refuse")
    pol_apply.add_argument("-f", "--file", required=True)
    pol_del = pol_sub.add_parser("delete", help="remove a policy")
    pol_del.add_argument("name")
    pol_list = pol_sub.add_parser("list", help="every stored policy as agents read it: state "
                                              "ok, or refused: <reason>")
    pol_list.add_argument("--json", action="store_true")
    pol_plan = pol_sub.add_parser(
        "plan", help="which pairs a policy file would newly encrypt or stop encrypting (an "
                     "audit-mode policy is shown as if enforced), and whether every node it "
                     "needs has a verified key")
    pol_plan.add_argument("-f", "--file", required=True)
    pol_plan.add_argument("--json", action="store_true")
    seen_cli.add_plan_options(pol_plan)
    pol_suggest, report = seen_cli.add_parsers(pol_sub, sub)

    expl = sub.add_parser("explain", help="is the flow SRC_IP -> DST_IP encrypted, by which "
                                          "policy and rule, or why not")
    expl.add_argument("src_ip", metavar="SRC_IP")
    expl.add_argument("dst_ip", metavar="DST_IP")
    expl.add_argument("--json", action="store_true")
    for p_ in (pol_plan, expl, pol_suggest, report):
        p_.add_argument("--infrastructure-cidr", action="append", default=[],
                        metavar="CIDR", help="an address or CIDR the agents are configured "
                        "to treat as infrastructure (repeatable); node records' addresses "
                        "and the --etcd endpoints given as IPs always are")
    resign = sub.add_parser(
        "resign", help="re-sign every workload and policy not signed under the controller "
                       "SVID's current CA (before revoking an old SPIRE CA: "
                       "docs/operations.md) or not in --envelope-version's format (moving "
                       "to chains stored once: docs/trust.md)")
    from tfcrypt.controller.cli_run import add_parser as add_controller
    from tfcrypt.controller.cli_run import envelope_option
    add_controller(sub, _common)
    controller_parsers = [wl_set, wl_del, wl_list, pol_apply, pol_del, pol_list, pol_plan,
                          pol_suggest, report, expl, resign]

    status = sub.add_parser(
        "status", help="ask the local agent how it is: a table, or --json; exit 0 healthy, "
                       "1 unhealthy, 2 agent unreachable")
    _config_option(status)
    _key_options(status, ("status_socket",))
    status.add_argument("--json", action="store_true", help="the status document as JSON")
    status.add_argument("--probe", action="store_true",
                        help="print one line (healthy, or why not) and set the exit code: "
                             "for liveness/readiness probes")
    status.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to wait for the agent (default %(default)s)")
    status.add_argument("--state-dir", default=None,
                        help="read <state-dir>/status.json (written after every reconcile) "
                             "instead of asking the agent's socket")

    flows = sub.add_parser(
        "flows", help="the flows the local agent saw cross this node, with the verdict the "
                      "kernel gave each (wireguard, plaintext, guard_drop, ingress_drop)",
        description="Flow records between this node's workloads and remote ones, as the "
                    "kernel counted them (docs/flows.md). Filters combine.")
    _config_option(flows)
    _key_options(flows, ("status_socket",))
    flows.add_argument("--workload", help="only flows with this workload at either end")
    flows.add_argument("--tag", help="only flows with a workload carrying this tag "
                                     "(type=value) at either end")
    flows.add_argument("--verdict", choices=VERDICTS, help="only flows with this verdict")
    flows.add_argument("--since", type=duration, metavar="DURATION",
                       help="only flows seen in the last DURATION (90s, 30m, 1h, 1h30m)")
    flows.add_argument("--json", action="store_true", help="the matching records as JSON")
    flows.add_argument("--timeout", type=float, default=5.0,
                       help="seconds to wait for the agent (default %(default)s)")

    unin = sub.add_parser(
        "uninstall", help="remove everything the agent put in the kernel (nftables table, "
                          "ip rules, routes, WireGuard device) and its state files; the agent "
                          "must be stopped first")
    _config_option(unin)
    _key_options(unin, UNINSTALL_KEYS)
    unin.add_argument("--keep-key", action="store_true",
                      help="keep the WireGuard private key and epoch in the state dir")

    for p in controller_parsers:
        _common(p)
        p.add_argument("--controller-id", action="append", default=None,
                       help="SPIFFE IDs allowed to write workloads and policies "
                            "(default spiffe://<trust-domain>/tfcrypt/controller)")
        envelope_option(p)
    for p in (rotate, show):
        _common(p)
        p.add_argument("--state-dir", default=env_default("STATE_DIR", "/var/lib/tfcrypt"),
                       help="the agent's state directory (default %(default)s)")
    return parser


UNINSTALL_KEYS = ("interface", "backend", "state_dir", "route_table", "rule_priority",
                  "status_socket")


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=env_default("CONFIG"),
                   help="YAML file of configuration keys (env TFCRYPT_CONFIG)")


def _key_options(p: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per configuration key; None means "not given", so lower layers apply."""
    defaults = {f: getattr(AgentConfig, f) for f in AgentConfig.__dataclass_fields__
                if hasattr(AgentConfig, f)}
    for key in KEYS:
        if names is not None and key.name not in names:
            continue
        default = defaults.get(key.field)
        if isinstance(default, tuple):
            default = ",".join(default) or None
        elif isinstance(default, int) and key.name in ("mark", "mark_mask"):
            default = hex(default)
        shown = "none" if default is None else default
        if key.name == "node_name":
            shown = "the hostname"
        elif key.name == "advertise_address":
            shown = "required"
        text = f"{key.help} (env {key.env}; default {shown})".replace("%", "%%")
        if isinstance(default, bool):
            p.add_argument(key.option, dest=key.name, default=None, action="store_const",
                           const=True, help=text)
            continue
        repeat = key.name in ("etcd", "controller_ids", "infrastructure_cidrs")
        p.add_argument(key.option, dest=key.name, default=None,
                       action="append" if repeat else "store", metavar=key.name.upper(),
                       help=text)


def _cli_infrastructure(args: argparse.Namespace) -> dict[str, str]:
    """What explain and plan treat as infrastructure besides the node records' addresses:
    the --etcd endpoints given as IPs and each --infrastructure-cidr."""
    from tfcrypt.core.infrastructure import Reason, canonical_prefix, literal_etcd_hosts, merge

    configured = {}
    for cidr in getattr(args, "infrastructure_cidr", None) or ():
        try:
            configured[canonical_prefix(cidr)] = Reason.CONFIGURED.value
        except ValueError:
            raise ConfigError(f"--infrastructure-cidr: {cidr!r} is not an address or CIDR"
                              ) from None
    return merge(configured, literal_etcd_hosts(_etcd(args)))


def _flags(args: argparse.Namespace) -> dict[str, object]:
    return {k.name: getattr(args, k.name, None) for k in KEYS}


def _agent_config(args: argparse.Namespace) -> AgentConfig:
    return agent_config(_flags(args), os.environ, args.config)


async def _run_agent(cfg: AgentConfig) -> None:
    from tfcrypt.agent.dataplane import Dataplane, RoutingConfig
    from tfcrypt.agent.loop import Agent
    from tfcrypt.dataplane.netlink import PyRoute2Netlink
    from tfcrypt.dataplane.nft_json import SubprocessNft
    from tfcrypt.dataplane.nft_table import FlowAccounting
    from tfcrypt.dataplane.nftables import NftManager
    from tfcrypt.identity.svid_source import SvidSource
    from tfcrypt.registry import Registry
    from tfcrypt.wireguard.device import WireGuardManager

    if cfg.backend == "userspace":
        from tfcrypt.wireguard.userspace import UserspaceBackend
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        backend = UserspaceBackend(
            cfg.interface, binary=cfg.wireguard_go,
            log_path=cfg.wireguard_log or Path(cfg.state_dir) / "wireguard-go.log")
    else:
        from tfcrypt.wireguard.kernel import KernelBackend
        backend = KernelBackend(cfg.interface)  # type: ignore[assignment]
    netlink = PyRoute2Netlink()
    registry = Registry(cfg.etcd_endpoints, prefix=cfg.prefix, tls=cfg.etcd_tls,
                        server_name=cfg.etcd_server_name)
    dataplane = Dataplane(WireGuardManager(backend), NftManager(SubprocessNft()), netlink,
                          RoutingConfig(ifname=cfg.interface, tunnel_table=cfg.route_table,
                                        failclosed_table=cfg.route_table + 1,
                                        rule_priority=cfg.rule_priority, mark=cfg.mark,
                                        mask=cfg.mark_mask),
                          FlowAccounting(size=cfg.flows_set_size) if cfg.flows else None)
    agent = Agent(cfg, registry=registry, svids=SvidSource(cfg.spiffe_socket),
                  dataplane=dataplane)
    metrics_server = None
    if cfg.metrics_address:
        from tfcrypt import metrics
        host, port = split_host_port(cfg.metrics_address)
        try:
            metrics_server = metrics.serve(host, port)
        except OSError as exc:
            raise ConfigError(f"metrics_address: cannot listen on {cfg.metrics_address}: "
                              f"{exc.strerror}") from None
        logging.getLogger("tfcrypt").info("metrics on http://%s/metrics", cfg.metrics_address)
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
        if metrics_server is not None:
            metrics_server.shutdown()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            await registry.aclose()
        with contextlib.suppress(Exception):
            await netlink.aclose()
        with contextlib.suppress(Exception):
            await backend.close()


async def _controller_command(args: argparse.Namespace) -> int:
    from tfcrypt.controller import commands
    from tfcrypt.controller.session import session
    from tfcrypt.model.policy import read_policy_file

    controller_ids = tuple(args.controller_id or
                           ("spiffe://{trust_domain}/tfcrypt/controller",))
    policy = read_policy_file(args.file) \
        if args.command == "policy" and args.policy_command in ("apply", "plan") else None
    workload = commands.build_workload(args.name, args.node, args.ip, args.tag) \
        if args.command == "workload" and args.workload_command == "set" else None
    if args.command == "policy" and args.policy_command == "plan" and (
            args.since is not None and not args.against_seen):
        raise ConfigError("--since: only with --against-seen")
    touching = seen_cli.touching(args.touching) \
        if args.command == "policy" and args.policy_command == "suggest" else frozenset()
    infra = _cli_infrastructure(args)
    endpoints, tls = _etcd(args), _etcd_tls(args)
    if (problem := etcd_tls_problem(endpoints, tls, args.etcd_server_name)):
        raise ConfigError(problem)
    async with session(endpoints, args.prefix, args.spiffe_socket, controller_ids,
                       tls=tls, server_name=args.etcd_server_name,
                       envelope_version=args.envelope_version) as s:
        if args.command == "resign":
            print(await commands.resign(s))
        elif args.command == "explain":
            explanation = await commands.explain_flow(s, args.src_ip, args.dst_ip, infra)
            print(json.dumps(explanation.to_json(), indent=2) if args.json
                  else explanation.render())
        elif workload is not None:
            print(await commands.workload_set(s, workload, infra))
        elif policy is not None and args.policy_command == "plan" and args.against_seen:
            return await seen_cli.plan_against_seen(s, args, policy, infra)
        elif policy is not None and args.policy_command == "plan":
            plan = await commands.policy_plan(s, policy, infra)
            print(json.dumps(commands.plan_to_json(plan), indent=2) if args.json
                  else commands.render_plan(plan))
        elif args.command == "policy" and args.policy_command == "suggest":
            return await seen_cli.suggest(s, args, touching, infra)
        elif args.command == "report":
            return await seen_cli.report(s, args, infra)
        elif policy is not None:
            print(await commands.policy_apply(s, policy))
        elif args.command == "workload" and args.workload_command == "delete":
            print(await commands.workload_delete(s, args.name, args.node))
        elif args.command == "policy" and args.policy_command == "delete":
            print(await commands.policy_delete(s, args.name))
        elif args.command == "workload":
            print_rows(await commands.workload_rows(s), args.json,
                        ["name", "node", "ips", "tags", "epoch"])
        else:
            print_rows(await commands.policy_rows(s), args.json,
                        ["name", "mode", "rules", "epoch"])
    return 0


def _status_command(args: argparse.Namespace) -> int:
    import datetime as dt

    from tfcrypt import status_view
    from tfcrypt.agent.status_api import StatusApiError, fetch_status

    socket = resolve(_flags(args), os.environ, args.config, ["status_socket"]).get(
        "status_socket", AgentConfig.status_socket)
    try:
        if args.state_dir:
            doc = json.loads((Path(args.state_dir) / "status.json").read_text())
        else:
            doc = fetch_status(socket, timeout=args.timeout)
    except (StatusApiError, OSError, ValueError) as exc:
        print(f"tfcrypt: cannot reach the agent: {exc}\n"
              "  Is it running (systemctl status tfcrypt, or the tfcrypt pod on this node)? "
              "Does --status-socket / TFCRYPT_STATUS_SOCKET / status_socket in the config "
              "file name the agent's socket?", file=sys.stderr)
        return EXIT_UNREACHABLE
    now = dt.datetime.now(dt.UTC)
    verdict = doc.get("health") or status_view.health(doc, now).to_json()
    if args.probe:
        print("healthy" if verdict["healthy"] else
              "unhealthy: " + "; ".join(verdict["reasons"]))
    elif args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(status_view.render(doc, now))
    return EXIT_HEALTHY if verdict["healthy"] else EXIT_UNHEALTHY


def _uninstall_command(args: argparse.Namespace) -> int:
    from tfcrypt.uninstall import UninstallConfig, uninstall

    values = resolve(_flags(args), os.environ, args.config, UNINSTALL_KEYS)
    values.pop("_origin", None)
    cfg = UninstallConfig(**values, keep_key=args.keep_key)
    done = asyncio.run(uninstall(cfg))
    for line in done:
        print(line)
    if not done:
        print("nothing to remove")
    if args.keep_key:
        print(f"the private key stays in {cfg.state_dir}")
    return 0


def _keys_command(args: argparse.Namespace) -> int:
    from tfcrypt.agent.nodekey import load_node_key, rotate_node_key

    if (problem := state_dir_problem(args.state_dir)) is not None:
        raise ConfigError(f"--state-dir: {problem}")
    try:
        if args.keys_command == "rotate":
            nk = rotate_node_key(args.state_dir, time.time())
        else:
            nk = load_node_key(args.state_dir, time.time())
    except OSError as exc:
        raise TfcryptError(f"--state-dir {args.state_dir}: {exc.strerror or exc}") from None
    print(json.dumps({"public_key": nk.public_key, "epoch": nk.epoch}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "agent":
            cfg = _agent_config(args)
            from tfcrypt.agent.logs import setup_logging
            setup_logging(cfg.log_level, cfg.log_format)
            for clash in [] if cfg.allow_foreign_mark_bits else foreign_clashes(cfg.mark_mask):
                logging.getLogger("tfcrypt").warning(
                    "mark_mask %#x (the default) overlaps another tool's bits: %s; on such a "
                    "node choose free bits (docs/operations.md)", cfg.mark_mask, clash)
            for name in unknown_env(os.environ):
                logging.getLogger("tfcrypt").warning(
                    "%s is not a tfcrypt configuration key: ignored", name)
            asyncio.run(_run_agent(cfg))
            return 0
        if args.command == "status":
            return _status_command(args)
        if args.command == "uninstall":
            return _uninstall_command(args)
        if args.command == "flows":
            return seen_cli.flows_command(args, resolve(_flags(args), os.environ, args.config,
                                                       ["status_socket"]).get(
                "status_socket", AgentConfig.status_socket))
        if args.command == "keys":
            return _keys_command(args)
        if args.command == "controller":
            from tfcrypt.controller.cli_run import main as controller_main
            return controller_main(args)
        if args.command in ("workload", "policy", "explain", "resign", "report"):
            return asyncio.run(_controller_command(args))
    except ConfigError as exc:
        print(f"tfcrypt: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except TfcryptError as exc:
        print(f"tfcrypt: {one_line(str(exc))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
