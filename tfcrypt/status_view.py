"""The agent's status document: the health verdict, and its rendering for `tfcrypt status`.

Rules:
- Pure: a status dict (as the status API serves it) and `now` in, a value or text out.
  No I/O and no clock reads, so the agent (to publish its verdict) and tests use the
  same code.
- Healthy means traffic the policies select is protected and will stay so: the SVID is
  valid, the inputs are in sync, the last reconcile had no errors, etcd is connected or
  has been unreachable for less than the grace period, and every peer the selection
  needs has a verified key and is configured on the device. Each failed condition is one
  reason, written for the operator who reads it at 3 a.m.
- A peer's handshake is `recent` within 180 s (WireGuard's REJECT_AFTER_TIME: after that
  a session needs a new handshake), `stale` after, `never` without one. Handshakes follow
  traffic, so they inform but do not decide health.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RECENT_HANDSHAKE_S = 180.0
PEER_COLUMNS = ("NODE", "SPIFFE ID", "ENDPOINT", "HANDSHAKE", "RX", "TX", "ALLOWED IPS")


@dataclass(frozen=True)
class Health:
    healthy: bool
    reasons: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "reasons": list(self.reasons)}


def fingerprint(public_key_b64: str) -> str:
    """A short, stable name for a public key: the first 8 bytes of its SHA-256, in hex
    pairs, like an SSH fingerprint: lets operators compare keys at a glance."""
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
    except ValueError:
        return "invalid"
    return ":".join(f"{b:02x}" for b in hashlib.sha256(raw).digest()[:8])


def parse_time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def handshake_state(age_s: float | None) -> str:
    if age_s is None:
        return "never"
    return "recent" if age_s <= RECENT_HANDSHAKE_S else "stale"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _refusal(refusal: Mapping[str, Any]) -> str:
    """`reason: message` of a refused SVID; the agent escaped and shortened the message."""
    return f"{refusal.get('reason', '?')}: {refusal.get('message', '')}"


def health(status: Mapping[str, Any], now: dt.datetime) -> Health:
    """The verdict on a status document at `now`, with one reason per failed condition."""
    reasons: list[str] = []
    expires = parse_time(status.get("svid_expires"))
    refusal = (status.get("workload_api") or {}).get("last_refusal")
    if expires is None and refusal:
        reasons.append(f"no SVID accepted from the SPIFFE Workload API: the last one was "
                       f"refused ({_refusal(refusal)}); is this socket registered for "
                       "this node in SPIRE?")
    elif expires is None:
        reasons.append("no SVID from the SPIFFE Workload API yet (is the agent's socket "
                       "registered with SPIRE?)")
    elif expires <= now:
        reasons.append(f"the SVID expired at {expires.isoformat()}: peers reject this "
                       "node's record")
    if not status.get("in_sync"):
        reasons.append("not in sync: waiting for an SVID and a first etcd listing; the "
                       "dataplane is left as it was")
    last = status.get("last_reconcile") or {}
    if status.get("in_sync") and not last:
        reasons.append("no reconcile has run yet")
    if last.get("errors"):
        errors = list(last["errors"])
        more = f" (and {len(errors) - 2} more)" if len(errors) > 2 else ""
        reasons.append(f"the last reconcile left items pending: {'; '.join(errors[:2])}{more}")
    etcd = status.get("etcd") or {}
    if not etcd.get("connected"):
        since = parse_time(etcd.get("disconnected_since"))
        grace = float(status.get("etcd_grace_s", 60.0))
        down_s = (now - since).total_seconds() if since else None
        if down_s is None or down_s >= grace:
            how_long = "" if down_s is None else f" for {down_s:.0f}s"
            why = f": {etcd['last_error']}" if etcd.get("last_error") else ""
            reasons.append(f"etcd unreachable{how_long} (allowed {grace:.0f}s){why}")
    missing = list(status.get("missing_peers") or ())
    if missing:
        reasons.append(f"no verified key for {', '.join(missing)}: selected traffic to "
                       f"{'it' if len(missing) == 1 else 'them'} is dropped")
    absent = [p["node"] for p in status.get("peers") or () if not p.get("configured", True)]
    if absent:
        reasons.append(f"{_plural(len(absent), 'peer')} not configured on "
                       f"{status.get('interface', 'the device')}: {', '.join(absent)}")
    own = (status.get("own_record") or {}).get("refused")
    if own:
        reasons.append(f"this node's own record in etcd is refused by its own view, and so "
                       f"by its peers: {own}")
    return Health(not reasons, tuple(reasons))


# -- rendering -------------------------------------------------------------------------

def human_duration(seconds: float) -> str:
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _when(value: str | None, now: dt.datetime) -> str:
    t = parse_time(value)
    if t is None:
        return "-"
    delta = (t - now).total_seconds()
    rel = f"in {human_duration(delta)}" if delta >= 0 else f"{human_duration(delta)} ago"
    return f"{t.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} ({rel})"


def _names(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "-"


def _counts(mapping: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(mapping.items())) if mapping else "none"


def _drops(drops: Mapping[str, Mapping[str, int]]) -> str:
    if not drops:
        return "-"
    return ", ".join(f"{name.replace('_', ' ')} {d.get('packets', 0)} pkts"
                     for name, d in sorted(drops.items()))


def _etcd(etcd: Mapping[str, Any], now: dt.datetime) -> str:
    if etcd.get("connected"):
        state = f"connected, revision {etcd.get('last_revision', '-')}"
    else:
        since = parse_time(etcd.get("disconnected_since"))
        state = "DISCONNECTED" + (f" for {human_duration((now - since).total_seconds())}"
                                  if since else "")
        if etcd.get("last_error"):
            state += f" ({etcd['last_error']})"
    if etcd.get("tls"):
        state += f", mutual TLS ({etcd.get('credential_rotations', 0)} certificate rotations)"
    return f"{state}; {etcd.get('reconnects', 0)} reconnects, {etcd.get('relists', 0)} relists"


def _workload_api(api: Mapping[str, Any], now: dt.datetime) -> str:
    if not api:
        return "-"
    if api.get("connected"):
        state = "connected"
    elif api.get("waiting_for_socket"):
        state = "WAITING for its socket"
    else:
        state = "NOT CONNECTED" + (f" ({api['last_error']})" if api.get("last_error") else "")
    refusal = api.get("last_refusal")
    if refusal:
        state += f"; last refused SVID {_when(refusal.get('at'), now)}: {_refusal(refusal)}"
    return state


def _trust(trust: Mapping[str, Any]) -> str:
    """Bundle authorities, our SVID's, and records counted by the authority that signed
    them: what an operator checks before revoking an old CA (docs/operations.md)."""
    if not trust:
        return "-"
    mine = trust.get("svid_authority") or "-"
    bundle = ", ".join(a + (" (our SVID)" if a == mine else "")
                       for a in trust.get("bundle_authorities") or ()) or "-"
    signed = "; ".join(f"{a}: " + ", ".join(f"{n} {fam}" for fam, n in counts.items())
                       for a, counts in (trust.get("records_by_authority") or {}).items())
    return f"{bundle}\n{'Records signed by:':21}{signed or '-'}"


def _reconcile(last: Mapping[str, Any], now: dt.datetime) -> str:
    if not last:
        return "none yet"
    errors = last.get("errors") or []
    text = (f"{_when(last.get('at'), now)}, {last.get('duration_s', 0) * 1000:.1f} ms, "
            f"{_plural(int(last.get('ops', 0)), 'change')}, "
            f"{_plural(len(errors), 'error') if errors else 'no errors'}")
    return text + "".join(f"\n{'':21}{e}" for e in errors)


def _peer_row(p: Mapping[str, Any]) -> list[str]:
    age = p.get("handshake_age_s")
    shake = "never" if age is None else f"{human_duration(age)} ago"
    if not p.get("configured", True):
        shake = "NOT CONFIGURED"
    return [p.get("node", "?"), p.get("spiffe_id") or "-", p.get("endpoint") or "-", shake,
            human_bytes(p.get("rx_bytes")), human_bytes(p.get("tx_bytes")),
            str(p.get("allowed_ip_count", len(p.get("allowed_ips", ()))))]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
            for row in [list(header), *rows]]


LOCAL_SHOWN = 8  # local workloads named in the text view; `--json` lists them all


def render(status: Mapping[str, Any], now: dt.datetime) -> str:
    """The status as `calicoctl node status` would print it: a header block, a peer table,
    then the verdict's reasons."""
    verdict = status.get("health") or health(status, now).to_json()
    policies = status.get("policies") or {}
    fp = status.get("public_key_fingerprint") or "-"
    lines = [
        f"tfcrypt agent on {status.get('node', '?')}: "
        f"{'HEALTHY' if verdict['healthy'] else 'UNHEALTHY'}",
        "",
        f"{'SPIFFE ID:':21}{status.get('spiffe_id') or '-'}",
        f"{'SVID expires:':21}{_when(status.get('svid_expires'), now)}",
        f"{'Workload API:':21}{_workload_api(status.get('workload_api') or {}, now)}",
        f"{'WireGuard:':21}{status.get('interface', '-')} port {status.get('listen_port', '-')}"
        f", key {fp}, epoch {status.get('epoch', '-')}",
        f"{'etcd:':21}{_etcd(status.get('etcd') or {}, now)}",
        f"{'Trust authorities:':21}{_trust(status.get('trust') or {})}",
        f"{'Policies enforced:':21}{_names(policies.get('enforce', []))}",
        f"{'Policies audited:':21}{_names(policies.get('audit', []))}",
        f"{'Selected pairs:':21}{status.get('selected_pairs', 0)} "
        f"(audit policies would add {status.get('audit_pairs', 0)})",
        f"{'Drops:':21}{_drops(status.get('drops') or {})}",
        f"{'Last reconcile:':21}{_reconcile(status.get('last_reconcile') or {}, now)}",
        f"{'Rejected records:':21}{_counts(status.get('rejected') or {})}",
    ]
    local = status.get("local_workloads") or []
    if local:
        shown = "; ".join(f"{w.get('name', '?')} {' '.join(w.get('ips') or ['-'])}"
                          for w in local[:LOCAL_SHOWN])
        more = f" (+{len(local) - LOCAL_SHOWN} more)" if len(local) > LOCAL_SHOWN else ""
        lines.append(f"{'Local workloads:':21}{shown}{more}")
    lingering = status.get("lingering_workloads") or {}
    if lingering.get("count"):
        shown = ", ".join(f"{e['key'].removeprefix('workloads/')} ({e['ends_in_s']:g}s left)"
                          for e in lingering.get("entries", []))
        lines.append(f"{'Lingering workloads:':21}{lingering['count']}"
                     f"{': ' + shown if shown else ''} (deleted, kept selected for "
                     f"{lingering.get('grace_s', 0):g}s unless reused)")
    refused = status.get("refused") or {}
    if refused.get("count"):
        shown = ", ".join(f"{e['ip']} ({e['reason']})" for e in refused.get("entries", []))
        lines.append(f"{'Refused addresses:':21}{refused['count']}"
                     f"{': ' + shown if shown else ' ' + _counts(refused.get('by_reason', {}))}"
                     " (workload records claiming infrastructure: never selected)")
    if status.get("key_problem"):
        lines.append(f"{'Key file:':21}{status['key_problem']}")
    rollbacks = status.get("rollbacks") or {}
    if rollbacks:
        lines.append(f"{'Rollbacks refused:':21}{', '.join(sorted(rollbacks))} (etcd holds "
                     "an older record than one this agent accepted: replayed or restored)")
    epochs = status.get("epochs") or {}
    if epochs.get("problem"):
        lines.append(f"{'Epochs file:':21}{epochs['problem']}")
    peers = status.get("peers") or []
    lines += ["", f"Peers ({len(peers)}):"]
    if peers:
        lines += table(PEER_COLUMNS, [_peer_row(p) for p in peers])
    else:
        lines.append("  none (no selected flow leaves this node)")
    if not verdict["healthy"]:
        lines += ["", "Unhealthy because:"] + [f"  - {r}" for r in verdict["reasons"]]
    return "\n".join(lines)
