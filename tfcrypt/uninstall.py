"""`tfcrypt uninstall`: remove everything the agent put in the kernel, and say what.

Rules:
- Only tfcrypt's own objects, found by their ownership markers: `table inet tfcrypt`,
  the rules at the configured priority and the next one, the routes with tfcrypt's
  rtproto in the tunnel and fail-closed tables, the WireGuard interface of the
  configured name. The same managers that create them remove them (`set_desired`
  empty/False, then `apply`), so "ours" means the same thing in both directions.
- Order is the reverse of the agent's apply order: the marks (nftables) go first, so no
  packet is steered anywhere while the rest is taken apart; then the tunnel rule and
  routes, the device, and last the fail-closed rule and its prohibit routes. From the
  first step on, selected traffic flows in plaintext: that is what uninstall means.
- Refused while an agent answers on the status socket: it would put everything back.
- Idempotent: a second run finds nothing and says "nothing to remove".
- The private key is deleted unless `keep_key` (a reinstall then gets a new key and a
  higher epoch), and with it the epochs the reader accepted (`epochs.json`: kept with the
  key, a reinstall keeps refusing replays; gone, it starts like a first install); the
  other files the agent wrote in the state dir go too (status, wireguard-go's log, the
  flow records `flows.json`).
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyRoute2NetlinkError

from tfcrypt.agent.epochstore import EPOCHS_FILE
from tfcrypt.agent.flows import STATE_FILE as FLOWS_FILE
from tfcrypt.agent.nodekey import EPOCH_FILE
from tfcrypt.agent.status_api import answers
from tfcrypt.dataplane.netlink import Family, Netlink, PyRoute2Netlink
from tfcrypt.dataplane.nft_json import Nft, SubprocessNft
from tfcrypt.dataplane.nftables import NftManager
from tfcrypt.dataplane.routes import RouteManager
from tfcrypt.dataplane.rules import RuleManager
from tfcrypt.errors import TfcryptError
from tfcrypt.wireguard.keys import KEY_FILE
from tfcrypt.wireguard.link import link_state

STATE_FILES = ("status.json", "status.tmp", "wireguard-go.log", FLOWS_FILE)
KEY_FILES = (KEY_FILE, EPOCH_FILE, EPOCHS_FILE)


@dataclass(frozen=True)
class UninstallConfig:
    interface: str = "tfcrypt0"
    backend: str = "userspace"
    state_dir: str = "/var/lib/tfcrypt"
    route_table: int = 29798
    rule_priority: int = 1820
    status_socket: str = "/run/tfcrypt/agent.sock"
    keep_key: bool = False


class AgentRunning(TfcryptError):
    pass


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


async def _rule(netlink: Netlink, priority: int, table: int, siblings: tuple[int, int]) -> int:
    manager = RuleManager(netlink, priority=priority, table=table,
                          families=(Family.V4, Family.V6), siblings=siblings)
    manager.set_desired(False)
    report = await manager.apply()
    if report.errors:
        raise TfcryptError(f"ip rule {priority}: {report.errors[0].message}")
    return report.ops


async def _routes(netlink: Netlink, ifname: str, table: int) -> int:
    manager = RouteManager(netlink, ifname, table=table)
    manager.set_desired({})
    report = await manager.apply()
    if report.errors:
        raise TfcryptError(f"route table {table}: {report.errors[0].message}")
    return report.ops


async def _device(ifname: str, backend: str) -> str | None:
    """Stop wireguard-go serving `ifname` / delete the link; what was done, or None."""
    done = None
    if backend == "userspace":
        from tfcrypt.wireguard.uapi import UapiClient
        from tfcrypt.wireguard.userspace import UserspaceBackend
        userspace = UserspaceBackend(ifname)
        pid = await UapiClient(userspace.socket_path).server_pid()
        if pid is not None and not _same_netns(pid):
            return (f"left wireguard-go pid {pid} alone: it serves {userspace.socket_path} "
                    "from another network namespace")
        if pid is not None:
            await userspace.destroy()
            done = f"stopped wireguard-go pid {pid} serving {ifname}"
    if await link_state(ifname) is not None:
        async with AsyncIPRoute() as ipr:
            with contextlib.suppress(PyRoute2NetlinkError):
                indexes = await ipr.link_lookup(ifname=ifname)
                if indexes:
                    await ipr.link("del", index=indexes[0])
        done = f"deleted interface {ifname}"
    return done


def _same_netns(pid: int) -> bool:
    """/run/wireguard is shared by every network namespace of the mount namespace."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def _files(state_dir: Path, keep_key: bool) -> list[str]:
    names = STATE_FILES + (() if keep_key else KEY_FILES)
    removed = []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()
            removed.append(name)
    return removed


def _stale_socket(path: Path) -> bool:
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return False
    except FileNotFoundError:
        return False
    if answers(path):
        raise AgentRunning(f"an agent is running (it answers on {path}); stop it first, "
                           "or it puts everything back")
    path.unlink()
    return True


async def uninstall(cfg: UninstallConfig, *, netlink: Netlink | None = None,
                    nft: Nft | None = None) -> list[str]:
    """Remove tfcrypt's kernel state and files; one line per thing removed."""
    stale = _stale_socket(Path(cfg.status_socket))
    own_netlink = netlink is None
    netlink = netlink or PyRoute2Netlink()
    done: list[str] = []
    try:
        report = await NftManager(nft or SubprocessNft()).remove()
        if report.errors:
            raise TfcryptError(f"nftables: {report.errors[0].message}")
        if report.ops:
            done.append("deleted nftables table inet tfcrypt (marks, egress guard, "
                        "strict ingress, flow sets)")
        prio, table = cfg.rule_priority, cfg.route_table
        siblings = (prio, prio + 1)
        if n := await _rule(netlink, prio, table, siblings):
            done.append(f"deleted {_plural(n, 'ip rule')} at priority {prio} "
                        f"(lookup {table})")
        if n := await _routes(netlink, cfg.interface, table):
            done.append(f"deleted {_plural(n, 'route')} from table {table}")
        if what := await _device(cfg.interface, cfg.backend):
            done.append(what)
        if n := await _rule(netlink, prio + 1, table + 1, siblings):
            done.append(f"deleted {_plural(n, 'ip rule')} at priority {prio + 1} "
                        f"(lookup {table + 1}, fail-closed)")
        if n := await _routes(netlink, cfg.interface, table + 1):
            done.append(f"deleted {_plural(n, 'prohibit route')} from table {table + 1}")
    finally:
        if own_netlink:
            with contextlib.suppress(Exception):
                await netlink.aclose()
    if stale:
        done.append(f"removed the stale status socket {cfg.status_socket}")
    if files := _files(Path(cfg.state_dir), cfg.keep_key):
        done.append(f"removed {', '.join(files)} from {cfg.state_dir}")
    return done
