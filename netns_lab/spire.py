"""Real SPIRE in the lab: one spire-server, one spire-agent per node and one for the
controller, built from tools/spire by scripts/build-go.sh (netns_lab/gobin.py).

Rules:
- spire-server runs in the controller's namespace, listening on the controller's underlay
  address only (10.77.0.9:8081): only lab namespaces reach it. sqlite datastore, disk key
  manager, join_token node attestor; its admin socket is in `<run_dir>/spire/server`.
- Each spire-agent runs inside its node (net + mount namespace) and serves the Workload API
  on the socket the node's tfcrypt agent uses (layout.Node.spiffe_socket, seen inside the
  node at /run/spire/sockets/agent.sock); the controller's serves layout.controller_socket.
  It attests with a one-time join token, trusts the bundle `spire-server bundle show`
  printed, keeps its key and SVID on disk (a restart re-uses them, no new token needed),
  and attests callers with the unix workload attestor.
- Each spire-agent gets the alias `spiffe://lab.tfcrypt/lab/spire-agent/<who>` (the
  token's -spiffeID); the tfcrypt identity is an entry parented on that alias and
  selecting `unix:gid:<AGENT_GID>`. tfcrypt agents (and commands run "as the controller")
  run with that primary gid, so a workload process -- root, gid 0 -- that connects to
  the same socket matches no entry and gets no SVID. Why a gid and not a uid: the agent
  needs root's capabilities and root-owned state (nftables, wireguard-go, ip rules); a
  non-root agent uid with ambient capabilities is a separate hardening step.
- With etcd over TLS (layout.etcd_tls) the server's X509 CA is signed by the lab CA
  (`disk` UpstreamAuthority): SPIRE's bundle is then the lab root, the one etcd trusts,
  and every X509-SVID chain is leaf + SPIRE's intermediate (netns_lab/etcd_tls.py).
- SVID lifetime: the lab's --svid-ttl, on every entry and as the server's default.
- SPIRE's CA rotation (`spire-server localauthority x509 prepare / activate / taint /
  revoke`, SPIRE >= 1.11) is driven through `server_cli` by the `*_x509_authority`
  helpers below; they apply to the self-signed CA only (with an UpstreamAuthority the
  commands are `upstreamauthority taint / revoke`, docs/operations.md).
- Every process goes through Lab.start_process (ledger + state), so `down` stops them.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gobin
from .errors import LabError
from .layout import TRUST_DOMAIN, Layout

SERVER = "spire-server"
AGENT = "spire-agent"
MODULE = "spire"
SERVER_PORT = 8081
AGENT_GID = 7479  # dedicated gid of the tfcrypt identities (no workload runs under it)
CONTROLLER = "ctl"  # the spire-agent name of the controller's namespace
READY_TIMEOUT = 60.0
# spire-agent syncs entries every 5 s and rotates at half-life; shorter lifetimes race it
MIN_SVID_TTL = 30
CA_TTL = "24h"
# the spire-agents' own SVIDs: SPIRE defaults them to default_x509_svid_ttl, i.e. the
# lab's short --svid-ttl; a spire-agent whose own SVID expires while the server is away
# exits and cannot re-attest (its join token is spent), so they live for an hour
AGENT_SVID_TTL = "1h"


def binary(program: str) -> Path:
    return gobin.go_binary(MODULE, program)


def as_agent_prefix() -> list[str]:
    """argv prefix running a command with the tfcrypt identities' gid (uid stays 0)."""
    return ["setpriv", f"--regid={AGENT_GID}", "--clear-groups", "--"]


def alias_id(who: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/lab/spire-agent/{who}"


@dataclass(frozen=True)
class AgentSpec:
    """One spire-agent: `who` is a node name or "ctl"; `target` is where it runs."""

    who: str
    target: str
    socket: Path
    spiffe_id: str  # the tfcrypt identity its entry gives callers with AGENT_GID


def agent_specs(layout: Layout) -> list[AgentSpec]:
    specs = [AgentSpec(n.name, n.name, n.spiffe_socket, n.spiffe_id) for n in layout.all_nodes()]
    specs.append(AgentSpec(CONTROLLER, "controller", layout.controller_socket,
                           layout.controller_spiffe_id))
    return specs


def server_dir(layout: Layout) -> Path:
    return layout.spire_dir / "server"


def server_socket(layout: Layout) -> Path:
    return server_dir(layout) / "api.sock"


def server_config(layout: Layout) -> Path:
    return server_dir(layout) / "server.conf"


def bundle_path(layout: Layout) -> Path:
    return layout.spire_dir / "bundle.pem"


def agent_dir(layout: Layout, who: str) -> Path:
    return layout.spire_dir / f"agent-{who}"


def agent_config(layout: Layout, who: str) -> Path:
    return agent_dir(layout, who) / "agent.conf"


def server_address(layout: Layout) -> str:
    return f"{layout.controller_ip}:{SERVER_PORT}"


def _hcl_string(value: str) -> str:
    if any(c in value for c in '"\\\n'):
        raise LabError(f"SPIRE config value {value!r} has a quote, backslash or newline")
    return f'"{value}"'


def _upstream_authority(layout: Layout) -> str:
    """With etcd over TLS, SPIRE's X509 CA is an intermediate under the lab CA (the `disk`
    UpstreamAuthority, self-signed upstream: no bundle_file_path), so the bundle SPIRE
    serves is the lab root that etcd trusts and signed the members' certificates."""
    if not layout.etcd_tls:
        return ""
    from .etcd_tls import upstream_ca_paths

    cert, key = upstream_ca_paths(layout)
    q = _hcl_string
    return f"""    UpstreamAuthority "disk" {{
        plugin_data {{
            cert_file_path = {q(str(cert))}
            key_file_path = {q(str(key))}
        }}
    }}
"""


def write_server_config(layout: Layout, svid_ttl: int) -> Path:
    d = server_dir(layout)
    (d / "data").mkdir(parents=True, exist_ok=True, mode=0o700)
    q = _hcl_string
    upstream = _upstream_authority(layout)
    text = f"""server {{
    bind_address = {q(layout.controller_ip)}
    bind_port = "{SERVER_PORT}"
    socket_path = {q(str(server_socket(layout)))}
    trust_domain = {q(TRUST_DOMAIN)}
    data_dir = {q(str(d / "data"))}
    log_level = "INFO"
    ca_ttl = "{CA_TTL}"
    default_x509_svid_ttl = "{svid_ttl}s"
    agent_ttl = "{AGENT_SVID_TTL}"
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = {q(str(d / "data" / "datastore.sqlite3"))}
        }}
    }}
    KeyManager "disk" {{
        plugin_data {{
            keys_path = {q(str(d / "data" / "keys.json"))}
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
{upstream}}}
"""
    path = server_config(layout)
    path.write_text(text)
    return path


def write_agent_config(layout: Layout, spec: AgentSpec, join_token: str) -> Path:
    d = agent_dir(layout, spec.who)
    (d / "data").mkdir(parents=True, exist_ok=True, mode=0o700)
    q = _hcl_string
    text = f"""agent {{
    data_dir = {q(str(d / "data"))}
    log_level = "INFO"
    server_address = {q(layout.controller_ip)}
    server_port = "{SERVER_PORT}"
    socket_path = {q(str(spec.socket))}
    trust_bundle_path = {q(str(bundle_path(layout)))}
    trust_domain = {q(TRUST_DOMAIN)}
    join_token = {q(join_token)}
}}

plugins {{
    KeyManager "disk" {{
        plugin_data {{
            directory = {q(str(d / "data"))}
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"""
    path = agent_config(layout, spec.who)
    path.write_text(text)
    return path


def server_argv(layout: Layout) -> list[str]:
    return [str(binary(SERVER)), "run", "-config", str(server_config(layout))]


def agent_argv(layout: Layout, who: str) -> list[str]:
    return [str(binary(AGENT)), "run", "-config", str(agent_config(layout, who))]


def server_cli(layout: Layout, prefix: list[str], *args: str) -> str:
    """Run `spire-server <args> -socketPath <admin socket>` (inside the controller netns);
    stdout, or a LabError with SPIRE's own message."""
    argv = [*prefix, str(binary(SERVER)), args[0], *args[1:], "-socketPath",
            str(server_socket(layout))]
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if res.returncode != 0:
        msg = (res.stderr.strip() or res.stdout.strip()).replace("\n", "; ")
        raise LabError(f"spire-server {' '.join(args[:2])} failed: {msg}")
    return res.stdout


def generate_token(layout: Layout, prefix: list[str], spec: AgentSpec, ttl: int = 600) -> str:
    out = server_cli(layout, prefix, "token", "generate", "-spiffeID", alias_id(spec.who),
                     "-ttl", str(ttl))
    for line in out.splitlines():
        if line.startswith("Token:"):
            return line.split(":", 1)[1].strip()
    raise LabError(f"spire-server token generate printed no token: {out.strip()!r}")


def create_entry(layout: Layout, prefix: list[str], spec: AgentSpec, svid_ttl: int) -> None:
    server_cli(layout, prefix, "entry", "create", "-parentID", alias_id(spec.who),
               "-spiffeID", spec.spiffe_id, "-selector", f"unix:gid:{AGENT_GID}",
               "-x509SVIDTTL", str(svid_ttl))


def write_bundle(layout: Layout, prefix: list[str]) -> Path:
    pem = server_cli(layout, prefix, "bundle", "show")
    if "BEGIN CERTIFICATE" not in pem:
        raise LabError(f"spire-server bundle show printed no certificate: {pem.strip()!r}")
    path = bundle_path(layout)
    path.write_text(pem)
    return path


def _wait(what: str, probe: Callable[[], bool], alive: Callable[[], bool], log: str,
          timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        if not alive():
            raise LabError(f"{what} exited before it was ready: see {log}")
        time.sleep(0.2)
    raise LabError(f"{what} not ready after {timeout:.0f} s: see {log}")


def wait_server(layout: Layout, prefix: list[str], alive: Callable[[], bool], log: str) -> None:
    def healthy() -> bool:
        try:
            server_cli(layout, prefix, "healthcheck")
        except LabError:
            return False
        return True

    _wait("spire-server", healthy, alive, log)


def wait_agent(prefix: list[str], spec: AgentSpec, alive: Callable[[], bool], log: str) -> None:
    """Ready = the agent's Workload API hands the tfcrypt identity to a caller with
    AGENT_GID (so its entry is synced too, not only its socket open)."""
    def serves() -> bool:
        res = subprocess.run(
            [*prefix, *as_agent_prefix(), str(binary(AGENT)), "api", "fetch", "x509",
             "-socketPath", str(spec.socket), "-timeout", "2s"],
            capture_output=True, text=True, check=False, timeout=30)
        return res.returncode == 0 and spec.spiffe_id in res.stdout

    _wait(f"spire-agent {spec.who}", serves, alive, log)


# ---------------------------------------------------------------- CA rotation

def _json(out: str, what: str) -> Any:
    try:
        return json.loads(out)
    except ValueError:
        raise LabError(f"spire-server {what} printed no JSON: {out.strip()[:200]!r}") from None


def x509_authorities(layout: Layout, prefix: list[str]) -> dict[str, Any]:
    """`localauthority x509 show`: {"active": {...}, "prepared": {...}, "old": {...}},
    each with its `authority_id` (the CA's subject key ID, hex) and `expires_at`;
    absent slots are missing or empty."""
    out = server_cli(layout, prefix, "localauthority", "x509", "show", "-output", "json")
    doc: dict[str, Any] = _json(out, "localauthority x509 show")
    return {k: v for k, v in doc.items() if v}


def _authority_command(layout: Layout, prefix: list[str], verb: str,
                       authority_id: str | None) -> dict[str, Any]:
    args = ["localauthority", "x509", verb, "-output", "json"]
    if authority_id is not None:
        args += ["-authorityID", authority_id]
    doc: dict[str, Any] = _json(server_cli(layout, prefix, *args),
                                f"localauthority x509 {verb}")
    return doc


def prepare_x509_authority(layout: Layout, prefix: list[str]) -> str:
    """A new X509 CA, published in the bundle but not signing yet; its authority ID."""
    doc = _authority_command(layout, prefix, "prepare", None)
    authority = (doc.get("prepared_authority") or {}).get("authority_id")
    if not authority:
        raise LabError(f"localauthority x509 prepare named no authority: {doc!r}")
    return str(authority)


def activate_x509_authority(layout: Layout, prefix: list[str], authority_id: str) -> None:
    """The prepared CA signs from now on; the previous active one becomes `old`."""
    _authority_command(layout, prefix, "activate", authority_id)


def taint_x509_authority(layout: Layout, prefix: list[str], authority_id: str) -> None:
    """Mark the old CA tainted: spire-agents rotate SVIDs it signed at once."""
    _authority_command(layout, prefix, "taint", authority_id)


def revoke_x509_authority(layout: Layout, prefix: list[str], authority_id: str) -> None:
    """Remove the (tainted) old CA from the bundle."""
    _authority_command(layout, prefix, "revoke", authority_id)


def bundle_authorities(layout: Layout, prefix: list[str]) -> list[dict[str, Any]]:
    """`bundle show -output json`'s x509_authorities (each with asn1 and tainted)."""
    doc = _json(server_cli(layout, prefix, "bundle", "show", "-output", "json"), "bundle show")
    return list(doc.get("x509_authorities") or [])

