"""`tfcrypt controller run`: its options and start-up (kept out of tfcrypt/cli.py, which
holds the other commands).

Rules:
- The cluster credential is --kubeconfig FILE (outside a cluster), else the pod's
  service account (in-cluster); nothing else is guessed.
- etcd and SPIFFE options are the other controller commands' (--etcd, --spiffe-socket,
  --etcd-tls, --prefix, --controller-id), so a record this command writes is one the CLI
  lists and the agents believe.
- --config FILE is the agents' configuration file (the tfcrypt-agent-config ConfigMap in
  a cluster): the controller takes etcd, etcd_tls, etcd_server_name, prefix and
  infrastructure_cidrs from it, so it writes where the agents read and counts pairs as
  they screen them; flags win over TFCRYPT_* variables, which win over the file. Its
  other keys are the agent's, validated the same way but unused here.
- With --no-leader-election exactly one replica may run; the Deployment runs two with
  the Lease.
- --metrics-port serves /metrics, /healthz and /readyz (health.py: the probes).
- --watch-timeout is the server-side end of each watch (kube.py): a production value
  has no reason to change; the lab shortens it to make a watch resume from an old
  resourceVersion, the one way to meet a real 410.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from tfcrypt.errors import ConfigError

log = logging.getLogger("tfcrypt.controller")


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    ctl = sub.add_parser("controller", help="the Kubernetes controller: Pods, Namespaces and "
                                            "EncryptionPolicy objects -> signed records")
    ctl_sub = ctl.add_subparsers(dest="controller_command", required=True)
    run = ctl_sub.add_parser(
        "run", help="watch the cluster and keep etcd's workloads/ and policies/ equal to "
                    "it (docs/controller.md)",
        description="Publishes every scheduled, non-host-network Pod with IPs as "
                    "workloads/<node>/<namespace>.<pod> and every EncryptionPolicy the "
                    "parser accepts as policies/<name>, signed with the controller SVID; "
                    "deletes only records it wrote; writes each EncryptionPolicy's status.")
    run.add_argument("--kubeconfig", metavar="FILE", default=os.environ.get("KUBECONFIG"),
                     help="kubeconfig to reach the API server (env KUBECONFIG); default: "
                          "the pod's service account (in-cluster)")
    run.add_argument("--context", help="kubeconfig context (default: its current one)")
    run.add_argument("--no-leader-election", action="store_true",
                     help="do not take a Lease: only for a single replica")
    run.add_argument("--lease-namespace", default="tfcrypt-system",
                     help="namespace of the Lease (default %(default)s)")
    run.add_argument("--lease-name", default="tfcrypt-controller",
                     help="name of the Lease (default %(default)s)")
    run.add_argument("--identity", help="this replica's name in the Lease "
                                        "(default <hostname>-<pid>)")
    run.add_argument("--config", metavar="FILE", default=os.environ.get("TFCRYPT_CONFIG"),
                     help="the agents' YAML config file: etcd, etcd_tls, etcd_server_name, "
                          "prefix and infrastructure_cidrs are read from it (env "
                          "TFCRYPT_CONFIG; flags and TFCRYPT_* variables win)")
    run.add_argument("--metrics-port", type=int, default=None,
                     help="serve /metrics (Prometheus), /healthz and /readyz (probes) on "
                          "this port (default: off)")
    run.add_argument("--metrics-address", default="127.0.0.1",
                     help="address for --metrics-port (default %(default)s)")
    run.add_argument("--watch-timeout", type=_positive_int, metavar="SECONDS",
                     default=None,  # kube.WATCH_TIMEOUT: not imported here (slow import)
                     help="ask the API server to end each watch after this long; the "
                          "controller then watches again from the last resourceVersion it "
                          "saw (a 410 Gone there is a relist, reason watch-gap). Default "
                          "240; the lab's fault test shortens it")
    common(run)
    # None = not given, so --config can supply them (the help keeps the default's text)
    run.set_defaults(prefix=None, etcd_server_name=None)
    for action in run._actions:
        if action.dest == "prefix":
            action.help = "etcd key prefix (env TFCRYPT_PREFIX; default /tfcrypt/v1)"
    run.add_argument("--controller-id", action="append", default=None,
                     help="SPIFFE IDs allowed to write workloads and policies "
                          "(default spiffe://<trust-domain>/tfcrypt/controller)")
    envelope_option(run)


def envelope_option(p: argparse.ArgumentParser) -> None:
    """--envelope-version, for every command that signs workloads or policies."""
    p.add_argument("--envelope-version", type=_envelope_version, metavar="1|2",
                   default=os.environ.get("TFCRYPT_ENVELOPE_VERSION", "1"),
                   help="format of the values this command signs: 1 attaches the "
                        "controller's certificate chain to each; 2 stores it once under "
                        "chains/ and names it by hash (less than half the bytes in etcd, "
                        "a faster agent start). Agents older than this release refuse 2 "
                        "(malformed: unsupported envelope version 2): switch once every "
                        "agent is upgraded (env TFCRYPT_ENVELOPE_VERSION; default "
                        "%(default)s; docs/trust.md)")


def _envelope_version(text: str) -> int:
    if text.strip() not in ("1", "2"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 or 2")
    return int(text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


FILE_KEYS = ("etcd", "etcd_tls", "etcd_server_name", "prefix", "infrastructure_cidrs")


def etcd_settings(args: argparse.Namespace, env: Mapping[str, str]
                  ) -> tuple[tuple[str, ...], bool, dict[str, str]]:
    """Endpoints, TLS and infrastructure from flags > env > --config > defaults; sets
    args.prefix and args.etcd_server_name. A bad value is a ConfigError naming where it
    came from (`tfcrypt.yaml: etcd: ...`)."""
    from tfcrypt.config import DEFAULT_ETCD, resolve
    from tfcrypt.core.infrastructure import Reason, canonical_prefix, literal_etcd_hosts, merge

    flags = {"etcd": args.etcd,
             "etcd_tls": args.etcd_tls, "etcd_server_name": args.etcd_server_name,
             "prefix": args.prefix}
    got = resolve(flags, env, args.config, FILE_KEYS)
    endpoints = tuple(got.get("etcd_endpoints") or DEFAULT_ETCD)
    args.prefix = got.get("prefix", "/tfcrypt/v1")
    args.etcd_server_name = got.get("etcd_server_name")
    infra = {canonical_prefix(c): Reason.CONFIGURED.value
             for c in got.get("infrastructure_cidrs") or ()}
    return endpoints, bool(got.get("etcd_tls", False)), merge(infra,
                                                              literal_etcd_hosts(endpoints))


def main(args: argparse.Namespace) -> int:
    """The etcd options (flags, environment, --config), then `run`."""
    from tfcrypt.agent.logs import setup_logging
    from tfcrypt.config_values import etcd_tls_problem

    setup_logging(args.log_level, "text")
    endpoints, tls, infrastructure = etcd_settings(args, os.environ)
    if (problem := etcd_tls_problem(endpoints, tls, args.etcd_server_name)):
        raise ConfigError(problem)
    return asyncio.run(run(args, endpoints, tls, infrastructure))


async def _load_kube(args: argparse.Namespace) -> Any:
    from kubernetes_asyncio import client, config

    try:
        if args.kubeconfig:
            await config.load_kube_config(config_file=args.kubeconfig, context=args.context)
        else:
            config.load_incluster_config()
    except Exception as exc:
        where = f"--kubeconfig {args.kubeconfig}" if args.kubeconfig else "in-cluster config"
        raise ConfigError(f"{where}: {exc}") from None
    return client.ApiClient()


async def run(args: argparse.Namespace, endpoints: tuple[str, ...], tls: bool,
              infrastructure: dict[str, str]) -> int:
    from tfcrypt.controller.kube import Cluster
    from tfcrypt.controller.run import Controller
    from tfcrypt.controller.session import session

    controller_ids = tuple(args.controller_id or
                           ("spiffe://{trust_domain}/tfcrypt/controller",))
    from tfcrypt.controller.health import Health, serve

    health = Health()
    if args.metrics_port is not None:
        serve(args.metrics_address, args.metrics_port, health)
    api = await _load_kube(args)
    async with session(endpoints, args.prefix, args.spiffe_socket, controller_ids,
                       tls=tls, server_name=args.etcd_server_name,
                       envelope_version=args.envelope_version) as s, api:
        s.require_controller()
        tasks: list[asyncio.Task[None]] = []
        controller = Controller(s, None, args.spiffe_socket,  # type: ignore[arg-type]
                                tls=tls, infrastructure=infrastructure, health=health)
        controller.cluster = Cluster(api, controller.changed,
                                     watch_timeout=args.watch_timeout)
        health.ready = lambda: controller.cluster.synced
        if not args.no_leader_election:
            from tfcrypt.controller.election import Elector
            elector = Elector(api, args.lease_namespace, args.lease_name, args.identity,
                              on_lead=controller.changed)
            controller.leader_check = elector.check
            controller.leader_fence = elector.fence
            tasks.append(asyncio.create_task(elector.run()))
            log.info("%s: leader election on Lease %s/%s", elector.me,
                     args.lease_namespace, args.lease_name)
        tasks += [asyncio.create_task(controller.cluster.run()),
                  asyncio.create_task(controller.run())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
    return 0
