"""C4 (issue #7): records verified per second at agent start, and start-up time with
100,000 signed workload records in a real etcd.

Run `python -m bench.startup [--records N] [--policies P] [--quick]` as root, from the
repo root.

Rules:
- One lab per run (netns_lab, 2 nodes, no lab workloads, 1 etcd member, a random name),
  taken down in a `finally`. Everything that talks to lab addresses runs inside lab
  namespaces: the etcd loader runs in the controller namespace, the agent in n1.
- The inventory is bench.compute's generator (its tag mix and policies), moved onto the
  lab's two nodes: node 0's 100 workloads run on n1, every other workload on n2 (renamed
  `w<j>-n<k>` to keep keys unique). n2 has no agent: its node record is signed in-process
  with n2's real SVID from its lab socket (as tests/labtools.sign_as does), so n1 has one
  peer whose allowed IPs are every remote workload. Only `--policies` are written (default
  policy-00, 6 rules: ~255,000 nft elements at 100,000 records); `all` (19 policies, 3.4 M
  elements) needs several GB in the agent and in nft, which a shared machine may not have.
- Workloads and policies are signed the way the controller signs them (`to_payload`
  with a millisecond epoch, `sign_envelope` with the controller SVID fetched from the
  lab's controller socket). Building, signing and loading etcd are not timed.
- C4.verify_rate: `VerifiedView.replace_all` of a fresh view with the trust installed,
  in this process, exactly what the agent does on `Listed`; several runs over the first
  `--verify-records` signed records (node record and policies included). One more pass
  under cProfile over a smaller slice gives the per-record split (JSON extra).
- C4.startup_s: the real agent started in n1 (netns_lab.agents' argv, recorded by the lab
  as n1's agent) with the records and policies already in etcd; from just before the
  process is spawned until its first dataplane apply with no errors has returned. The
  agent's log has no line per phase, so it runs under a probe: `python -c PROBE agent
  ...`, which wraps `list_prefix`, `VerifiedView.replace_all`/`set_trust`,
  `IncrementalCore.update`, `Dataplane.set_desired`/`apply` with timers that log one JSON
  line each into the agent's own log, then calls `tfcrypt.cli.main`. Same code path,
  same imports, no profiler.
- The agent lists etcd in one range read and its gRPC receive limit is 64 MiB; 100,000
  records are ~110 MB, so the agent as it is cannot start. When its list fails for that
  reason the failure is recorded and the agent is started again with the limit raised in
  the probe (the figures' note says so), to measure what start-up costs beyond that.
- Nothing is asserted; a start-up that does not complete (the agent died, or etcd's list
  keeps failing) is reported with the agent's last log lines, and the other figures
  are still written.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Figure, conditions, markdown_table, run_prefix, write_results
from bench.compute import make_snapshot
from tfcrypt.config import AgentConfig
from tfcrypt.controller.session import fetch_svid
from tfcrypt.identity import Authorizer, TrustBundles, sign_envelope
from tfcrypt.identity.envelope import CHAINS, chain_value
from tfcrypt.identity.svid_source import SvidUpdate
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.families import families
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.workload import Workload
from tfcrypt.wireguard.keys import generate_private_key, public_key_of

PREFIX = "/tfcrypt/v1"
PER_NODE = 100
DEFAULT_POLICIES = "policy-00"  # 6 rules: ~255,000 nft elements at 100,000 records
TXN_OPS = 128  # etcd's default --max-txn-ops
PROBE_TAG = "bench-probe "
LIMIT_ENV = "BENCH_GRPC_RECEIVE_MIB"
RAISED_LIMIT_MIB = 512

# Runs as `python -c PROBE agent ...` in the agent's place: times the start-up phases.
PROBE = r'''
import time
T_START = time.time()
import json, logging, os, sys
if os.environ.get("BENCH_GRPC_RECEIVE_MIB"):  # LIMIT_ENV: the agent's etcd receive limit
    import tfcrypt.registry.connection as connection
    connection._MAX_MESSAGE = int(os.environ["BENCH_GRPC_RECEIVE_MIB"]) * 2**20
import tfcrypt.registry.watch as watch
from tfcrypt.agent.dataplane import Dataplane
from tfcrypt.core.incremental import IncrementalCore
from tfcrypt.identity.view import VerifiedView
log = logging.getLogger("bench.probe")
def note(step, t0, **kw):
    t1 = time.time()
    if T_START is not None:  # the first line, once logging is set up
        log.info("bench-probe %s", json.dumps({"step": "probe_start", "start": T_START,
                                               "end": T_START}))
        globals()["T_START"] = None
    log.info("bench-probe %s", json.dumps({"step": step, "start": t0, "end": t1, **kw}))
inner_list = watch.list_prefix
async def list_prefix(*a, **kw):
    t0 = time.time()
    try:
        listed = await inner_list(*a, **kw)
    except Exception as exc:
        note("list_failed", t0, error=str(exc)[:300])
        raise
    note("list", t0, items=len(listed.items))
    return listed
watch.list_prefix = list_prefix
def timed(cls, name, step, extra):
    inner = getattr(cls, name)
    def wrapper(self, *a, **kw):
        t0 = time.time()
        out = inner(self, *a, **kw)
        note(step, t0, **extra(self, out))
        return out
    setattr(cls, name, wrapper)
def view_extra(view, out):
    return {"raw": len(view.raw), "records": len(view.records),
            "rejected": sum(view.rejections.values())}
timed(VerifiedView, "replace_all", "verify_list", view_extra)
timed(VerifiedView, "set_trust", "verify_trust", view_extra)
timed(VerifiedView, "check", "verify_check",  # the agent verifies lists in a worker thread
      lambda view, out: {"raw": len(out.results) if out is not None else 0})
timed(IncrementalCore, "update", "compute",
      lambda core, d: {"peers": len(d.peers),
                       "elements": sum(len(v) for v in d.selector_ips.values())})
timed(Dataplane, "set_desired", "set_desired", lambda dp, out: {})
inner_apply = Dataplane.apply
async def apply(self, *a, **kw):
    t0 = time.time()
    result = await inner_apply(self, *a, **kw)
    note("apply", t0, ops=result.ops, errors=len(result.errors),
         changed=dict(result.changed))
    return result
Dataplane.apply = apply
from tfcrypt.cli import main
sys.exit(main(sys.argv[1:]))
'''


# -- the inventory, signed ------------------------------------------------------------

def lab_workloads(records: int, policies: str = "all") -> tuple[list[Workload], list[Any]]:
    """bench.compute's inventory for `records` workloads, placed on n1 (node 0) and n2,
    and its policies (`all`, or names separated by commas)."""
    snap = make_snapshot(max(1, records // PER_NODE), PER_NODE)
    workloads = []
    for w in snap.workloads.values():
        local = w.node == "n0000"
        workloads.append(Workload(w.name if local else f"{w.name}-{w.node}",
                                  "n1" if local else "n2", w.ips, w.tags))
    chosen = [p for p in snap.policies.values()
              if policies == "all" or p.name in policies.split(",")]
    if not chosen:
        raise ValueError(f"--policies {policies}: none of {', '.join(snap.policies)}")
    return workloads[:records], chosen


def sign_inventory(workloads: list[Workload], policies: list[Any],
                   controller: SvidUpdate, version: int = 2) -> dict[str, bytes]:
    """Values by relative key, signed as `tfcrypt workload set` / `policy apply` sign with
    `--envelope-version`; version 2 puts the chain, stored once, first."""
    epoch, issued_at = int(time.time() * 1000), int(time.time())
    items = {}
    if version == 2:
        ref, raw = chain_value(controller.chain)
        items[CHAINS + ref] = raw
    for obj in [*policies, *workloads]:
        items[obj.key] = sign_envelope(obj.to_payload(epoch=epoch, issued_at=issued_at),
                                       controller.private_key, controller.chain,
                                       by_ref=version == 2)
    return items


def node_record(node: str, svid: SvidUpdate, endpoint: str) -> tuple[str, bytes]:
    record = NodeRecord(node=node, spiffe_id=svid.spiffe_id,
                        wg_public_key=public_key_of(generate_private_key()),
                        endpoint=endpoint, workload_subnets=(), epoch=int(time.time() * 1000),
                        issued_at=int(time.time()))
    return record.key, sign_envelope(record.to_payload(), svid.private_key, svid.chain)


# -- C4.verify_rate: the agent's verification path, in process ---------------------------

def agent_trust(svid: SvidUpdate) -> tuple[TrustBundles, Authorizer]:
    """The trust the agent installs for this SVID (tfcrypt.agent.loop._follow_svids)."""
    cfg = AgentConfig.__dataclass_fields__
    return TrustBundles(svid.bundles), Authorizer(
        trust_domain=svid.trust_domain,
        node_id_template=cfg["node_id_template"].default,
        controller_ids=cfg["controller_ids"].default)


def verify_once(items: Mapping[str, bytes], svid: SvidUpdate,
                threads: bool = True) -> tuple[float, VerifiedView]:
    """What the agent does on `Listed`: `check` (on every core, in worker threads) then
    `replace_all` with the results; `threads=False` verifies in this thread only (the
    profile, which sees one thread, and the one-core figure)."""
    bundles, authorizer = agent_trust(svid)
    view = VerifiedView(families())
    now = dt.datetime.now(dt.UTC)
    view.set_trust(bundles, authorizer, now)
    t0 = time.perf_counter()
    view.replace_all(items, now, view.check(view.pending(items), now,
                                            workers=None if threads else 1))
    return time.perf_counter() - t0, view


# (label, file suffix, function name): summed cumulative time, per record; the identity
# code caches per distinct certificate and chain, so those lines are ~0 with one signer
PROFILE_PARTS = (
    ("envelope parse (JSON, base64, DER)", "identity/envelope.py", "decode_envelope"),
    ("of which certificate parse (cached)", "identity/envelope.py", "_certificate"),
    ("payload parse", "identity/verify.py", "_parse_payload"),
    ("leaf SPIFFE ID", "identity/verify.py", "_leaf_spiffe_id"),
    ("chain validation", "identity/verify.py", "_validate_chain"),
    ("leaf SVID checks", "identity/verify.py", "_check_svid_leaf"),
    ("signature", "identity/envelope.py", "verify_signature"),
    ("authorisation", "identity/authz.py", "check"),
    ("epoch book", "identity/epochs.py", "check"),
    ("record parse (Workload.from_verified)", "model/workload.py", "from_verified"),
    ("verify_envelope total", "identity/verify.py", "verify_envelope"),
    ("check total", "identity/view.py", "check"),
    ("replace_all total", "identity/view.py", "replace_all"),
)


def profile_verify(items: Mapping[str, bytes], svid: SvidUpdate) -> dict[str, Any]:
    profiler = cProfile.Profile()
    profiler.enable()
    verify_once(items, svid, threads=False)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    n = len(items)
    split = {}
    for label, suffix, func in PROFILE_PARTS:
        cum = sum(v[3] for (file, _, name), v in raw.items()
                  if name == func and file.endswith(suffix))
        split[label] = round(cum / n * 1e6, 1)
    stats.sort_stats("tottime").print_stats(15)
    top = [line for line in out.getvalue().splitlines() if line.strip()]
    return {"records": n, "per_record_us_profiled": split, "top_tottime": top[-16:]}


# -- loading etcd (runs in the controller namespace) ------------------------------------

async def load_etcd(path: Path, endpoint: str) -> int:
    import aetcd

    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    lines = path.read_bytes().splitlines()
    pairs = [line.split(b"\t", 1) for line in lines if line]
    sem = asyncio.Semaphore(4)
    async with aetcd.Client(host=host, port=int(port), timeout=60,
                            options={"grpc.enable_http_proxy": 0}) as client:
        async def put(batch: list[list[bytes]]) -> None:
            async with sem:
                await client.transaction(compare=[], failure=[], success=[
                    client.transactions.put(f"{PREFIX}/".encode() + k, v) for k, v in batch])

        await asyncio.gather(*(put(pairs[i:i + TXN_OPS])
                               for i in range(0, len(pairs), TXN_OPS)))
    return len(pairs)


def write_items(path: Path, items: Mapping[str, bytes]) -> None:
    with open(path, "wb") as out:
        for key, value in items.items():
            if b"\n" in value or "\t" in key:
                raise ValueError(f"{key}: value with a newline or key with a tab")
            out.write(key.encode() + b"\t" + value + b"\n")


# -- C4.startup_s: the real agent in the lab --------------------------------------------

@dataclass
class Startup:
    total_s: float | None
    steps: list[dict[str, Any]]
    rss_mib: tuple[float, float] | None  # VmRSS, VmHWM
    failure: str | None
    log_tail: list[str]
    warnings: dict[str, int]  # the agent's WARNING and ERROR lines until then, counted
    receive_limit_mib: int | None  # raised in the probe; None = the agent's own limit


def probe_steps(text: str) -> list[dict[str, Any]]:
    steps = []
    for line in text.splitlines():
        at = line.find(PROBE_TAG)
        if at >= 0:
            try:
                steps.append(json.loads(line[at + len(PROBE_TAG):]))
            except ValueError:
                continue
    return steps


def warning_counts(text: str) -> dict[str, int]:
    """The agent's WARNING and ERROR lines, without their timestamp, counted."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if " WARNING " in line or " ERROR " in line:
            what = line.split(" ", 1)[-1][:200]
            counts[what] = counts.get(what, 0) + 1
    return counts


def read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def vm_mib(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM: the peak) of `pid`, in MiB."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def run_agent(lab: Any, node: str, timeout: float, receive_limit_mib: int | None) -> Startup:
    """Start the agent under the probe; wait for its first apply without errors."""
    from netns_lab import agents
    from netns_lab.procs import is_running

    spec = next(n for n in lab.layout.all_nodes() if n.name == node)
    argv = agents.agent_argv(lab, spec)
    if argv[1:3] != ["-m", "tfcrypt"]:
        raise RuntimeError(f"unexpected agent argv {argv[:4]}")
    agents.state_dir(lab, node).mkdir(parents=True, exist_ok=True, mode=0o700)
    env = dict(os.environ)
    if receive_limit_mib:
        env[LIMIT_ENV] = str(receive_limit_mib)
    log = lab.layout.logs_dir / f"{agents.AGENT}-{node}.log"
    offset = log.stat().st_size if log.exists() else 0
    t0 = time.time()
    rec = lab.start_process(agents.AGENT, [argv[0], "-c", PROBE, *argv[3:]], node=node,
                            env=env)
    deadline = time.monotonic() + timeout
    failure = None
    while True:
        text = read_from(Path(rec.log), offset)
        steps = probe_steps(text)
        done = [s for s in steps if s["step"] == "apply" and s["errors"] == 0]
        if done:
            rss = vm_mib(rec.pid)
            return Startup(done[0]["end"] - t0, steps, rss, None, text.splitlines()[-15:],
                           warning_counts(text), receive_limit_mib)
        fails = [s for s in steps if s["step"] == "list_failed"]
        if len(fails) >= 3:
            failure = f"etcd list failed {len(fails)} times: {fails[-1]['error']}"
        elif not is_running(rec):
            failure = "the agent exited"
        elif time.monotonic() > deadline:
            failure = f"no complete apply after {timeout:.0f} s"
        if failure:
            return Startup(None, steps, None, failure, text.splitlines()[-15:],
                           warning_counts(text), receive_limit_mib)
        time.sleep(0.25)


def reset_node(lab: Any, node: str) -> None:
    """Stop the agent and remove what it left in the kernel and its state dir (`tfcrypt
    uninstall`), so that the next start is a cold one again."""
    from netns_lab import agents

    agents.stop_agent(lab, node)
    out = subprocess.run(
        [*lab.exec_prefix(node), sys.executable, "-m", "tfcrypt", "uninstall",
         "--state-dir", str(agents.state_dir(lab, node)),
         "--status-socket", str(agents.status_socket(lab, node))],
        capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"tfcrypt uninstall in {node}: {(out.stderr or out.stdout)[-300:]}")


def startup_split(st: Startup) -> dict[str, float]:
    """Seconds per phase of one start-up, from the probe's lines."""
    steps = st.steps

    def first(step: str, **match: Any) -> dict[str, Any] | None:
        return next((s for s in steps if s["step"] == step
                     and all(s.get(k) == v for k, v in match.items())), None)

    apply_done = next(s for s in steps if s["step"] == "apply" and s["errors"] == 0)
    before = [s for s in steps if s["end"] <= apply_done["end"]]
    listed = first("list")
    verify = sum(s["end"] - s["start"] for s in before
                 if s["step"] in ("verify_list", "verify_trust", "verify_check")
                 and s["raw"] > 0)
    computes = [s for s in before if s["step"] == "compute"]
    applies = [s for s in before if s["step"] in ("set_desired", "apply")]
    probe_start = first("probe_start")
    spawned = apply_done["end"] - (st.total_s or 0.0)
    split = {
        "interpreter_s": probe_start["end"] - spawned if probe_start else 0.0,
        "list_s": listed["end"] - listed["start"] if listed else 0.0,
        "verify_s": verify,
        "compute_s": sum(s["end"] - s["start"] for s in computes),
        "apply_s": sum(s["end"] - s["start"] for s in applies),
    }
    split["other_s"] = (st.total_s or 0.0) - sum(split.values())
    return split


# -- the run -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from netns_lab import Lab, Layout, agents, down

    t = time.perf_counter()
    workloads, policies = lab_workloads(args.records, args.policies)
    build_s = time.perf_counter() - t
    name = run_prefix("s")
    # the lab's Workload API server, not SPIRE: the bench signs as the controller and as
    # n2 from its own process, which SPIRE's entries (they select the agent's gid) refuse;
    # the SVIDs have the same shape (one leaf under the trust domain's root)
    lab = Lab(Layout(name, nodes=2, workloads_per_node=0, etcd_members=1), svid_ttl=3600,
              workload_api="lab")
    tmp = Path(tempfile.mkdtemp(prefix="tfs-"))
    extra: dict[str, Any] = {}
    timings: dict[str, Any] = {"inventory_build_s": build_s, "commit": source_commit()}
    verify_runs: list[float] = []
    variant_runs: dict[str, list[float]] = {}
    attempts: list[Startup] = []
    try:
        t = time.perf_counter()
        lab.up()
        timings["lab_up_s"] = time.perf_counter() - t
        st = lab.status()
        controller = fetch_svid(st["controller"]["spiffe_socket"])
        n2 = next(n for n in st["nodes"] if n["name"] == "n2")
        t = time.perf_counter()
        items = sign_inventory(workloads, policies, controller, args.envelope_version)
        key, value = node_record("n2", fetch_svid(n2["spiffe_socket"]),
                                 f"{n2['underlay_ip']}:51820")
        items[key] = value
        timings["sign_s"] = time.perf_counter() - t
        value_bytes = sum(len(v) for v in items.values())
        print(f"lab {name} up in {timings['lab_up_s']:.1f}s; {len(items)} values signed in "
              f"{timings['sign_s']:.1f}s ({value_bytes / 2**20:.1f} MiB)", file=sys.stderr)

        # in process: node record and policies first, then workloads, up to
        # --verify-records; each run verifies the same records in both envelope versions
        # and on one thread, side by side (`variants`)
        ordered = dict(sorted(items.items(), key=lambda kv: not kv[0].startswith(
            (CHAINS, "nodes/", "policies/"))))
        subset = dict(list(ordered.items())[:args.verify_records])
        sub_wl = [w for w in workloads if w.key in subset]
        sub_pol = [p for p in policies if p.key in subset]
        variants = {
            "v2": (sign_inventory(sub_wl, sub_pol, controller, 2), True),
            "v2_1thread": (sign_inventory(sub_wl, sub_pol, controller, 2), False),
            "v1": (sign_inventory(sub_wl, sub_pol, controller, 1), True),
        }
        for variant in variants.values():
            variant[0][key] = value
        extra["variant_bytes_per_record"] = {
            v: round(sum(len(x) for x in it.values()) / len(it)) for v, (it, _) in variants.items()}
        for i in range(args.runs):
            for label, (vitems, threads) in variants.items():
                seconds, view = verify_once(vitems, controller, threads)
                variant_runs.setdefault(label, []).append(seconds)
                print(f"verify run {i + 1} {label}: {len(vitems)} values in {seconds:.2f}s "
                      f"({len(vitems) / seconds:.0f}/s), believed {len(view.records)}, "
                      f"rejected {dict(view.rejections)}", file=sys.stderr)
                extra.setdefault("verify_believed", {})[label] = len(view.records)
                extra.setdefault("verify_rejected", {})[label] = dict(view.rejections)
        verify_runs = variant_runs[f"v{args.envelope_version}"]
        profile = profile_verify(dict(list(variants["v2"][0].items())[:args.profile_records]),
                                 controller)
        # the profiler slows everything down about alike: scale its split to the median
        per_record = sorted(verify_runs)[len(verify_runs) // 2] / len(subset) * 1e6
        scale = per_record / profile["per_record_us_profiled"]["replace_all total"]
        profile["per_record_us_scaled"] = {
            k: round(v * scale, 1) for k, v in profile["per_record_us_profiled"].items()}
        extra["verify_profile"] = profile

        write_items(tmp / "items.tsv", items)
        t = time.perf_counter()
        out = subprocess.run(
            [*lab.exec_prefix("controller"), sys.executable, "-m", "bench.startup", "--load-etcd",
             str(tmp / "items.tsv"), "--endpoint", st["etcd"]["endpoints"][0]],
            capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"loading etcd failed: {out.stderr.strip()[-500:]}")
        timings["etcd_load_s"] = time.perf_counter() - t
        print(f"etcd loaded in {timings['etcd_load_s']:.1f}s; starting the agent in n1",
              file=sys.stderr)

        limit = None
        for i in range(args.agent_runs):
            attempts.append(run_agent(lab, "n1", args.timeout, limit))
            if i == 0 and attempts[-1].failure and "larger than max" in attempts[-1].failure:
                limit = RAISED_LIMIT_MIB
                print(f"the agent as it is: {attempts[-1].failure}; again with the receive "
                      f"limit raised to {limit} MiB in the probe", file=sys.stderr)
                reset_node(lab, "n1")
                attempts.append(run_agent(lab, "n1", args.timeout, limit))
            last = attempts[-1]
            print(f"agent start {i + 1}: "
                  f"{last.failure or f'complete in {last.total_s:.1f} s'}", file=sys.stderr)
            if last.failure:
                print("\n".join(last.log_tail), file=sys.stderr)
                break
            if i + 1 < args.agent_runs:
                reset_node(lab, "n1")
    finally:
        try:
            agents.stop_agent(lab, "n1")
        except Exception as exc:  # the lab's down stops it anyway
            print(f"stopping the agent: {exc}", file=sys.stderr)
        down(name)
        shutil.rmtree(tmp, ignore_errors=True)

    return report(args, len(items), len(subset), verify_runs, attempts, timings, extra,
                  value_bytes, variant_runs)


def source_commit() -> str:
    """The commit the agent ran (the code changes under a bench: say which one it was)."""
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "tfcrypt"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return f"{head or 'unknown'}{' + uncommitted tfcrypt changes' if dirty else ''}"


def report(args: argparse.Namespace, records: int, verify_records: int,
           verify_runs: list[float], attempts: list[Startup], timings: dict[str, Any],
           extra: dict[str, Any], value_bytes: int,
           variant_runs: dict[str, list[float]]) -> int:
    figures = [Figure("C4.verify_rate", tuple(verify_records / s for s in verify_runs),
                      "records/s", None,
                      f"VerifiedView.check + replace_all in process, {verify_records} "
                      f"records, envelope version {args.envelope_version}"),
               Figure("C4.verify_per_record", tuple(s / verify_records * 1e6
                                                    for s in verify_runs), "us")]
    for label, runs in variant_runs.items():
        figures.append(Figure(f"C4.verify_rate_{label}", tuple(verify_records / s
                                                               for s in runs), "records/s"))
    if "v1" in variant_runs and "v2" in variant_runs:
        figures.append(Figure("C4.verify_speedup_v2_over_v1", tuple(
            a / b for a, b in zip(variant_runs["v1"], variant_runs["v2"], strict=True)), "x",
            None, "same records, same run: v1 seconds / v2 seconds"))
    starts = [a for a in attempts if a.total_s is not None]
    if starts:
        splits = [startup_split(a) for a in starts]
        limit = starts[0].receive_limit_mib
        raised = (f"; etcd receive limit raised to {limit} MiB in the probe (the agent's "
                  "64 MiB refuses the list)" if limit else "")
        figures.append(Figure("C4.startup_s", tuple(a.total_s or 0.0 for a in starts), "s",
                              None, f"{records} values in etcd, spawn to first complete "
                              f"apply{raised}"))
        for part in ("interpreter_s", "list_s", "verify_s", "compute_s", "apply_s", "other_s"):
            figures.append(Figure(f"C4.startup.{part.removesuffix('_s')}",
                                  tuple(sp[part] for sp in splits), "s"))
        if all(sp["verify_s"] > 0 for sp in splits):
            figures.append(Figure("C4.startup.verify_rate",
                                  tuple(records / sp["verify_s"] for sp in splits),
                                  "records/s", None, "inside the agent"))
        rss = [a.rss_mib for a in starts if a.rss_mib is not None]
        if rss:
            figures.append(Figure("C4.startup_rss_mib", tuple(r[0] for r in rss), "MiB", None,
                                  "agent VmRSS after its first complete apply; peak (VmHWM) "
                                  f"{max(r[1] for r in rss):.0f} MiB"))
    extra["startup_attempts"] = [
        {"receive_limit_mib": a.receive_limit_mib, "total_s": a.total_s,
         "failure": a.failure, "probe": a.steps, "warnings": a.warnings,
         "log_tail": a.log_tail} for a in attempts]
    commit = timings.pop("commit")
    size = next((s for a in attempts for s in a.steps if s["step"] == "compute"), {})
    relists = [sum(s["step"] == "list" for s in a.steps) - 1 for a in attempts if a.total_s]
    conds = conditions(records=records, etcd_value_mib=round(value_bytes / 2**20, 1),
                       envelope_version=args.envelope_version,
                       policies=args.policies, nft_set_elements=size.get("elements"),
                       peers=size.get("peers"), tfcrypt_commit=commit,
                       relists_before_complete=relists,
                       verify_records=verify_records, quick=args.quick,
                       **{k: round(v, 2) for k, v in timings.items()})
    path = write_results("startup", figures, conds, **extra)
    print(markdown_table(figures))
    print(f"\nconditions: {conds}\nresults: {path}")
    for i, a in enumerate(attempts):
        limit = f"receive limit {a.receive_limit_mib} MiB" if a.receive_limit_mib else \
            "the agent as it is"
        print(f"start-up attempt {i + 1} ({limit}): "
              f"{a.failure or f'complete in {a.total_s:.1f} s'}")
        for what, count in a.warnings.items():
            print(f"  {count} x {what}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup")
    parser.add_argument("--records", type=int, default=100_000,
                        help="workload records in etcd (default 100,000)")
    parser.add_argument("--verify-records", type=int, default=5_000,
                        help="records per in-process verification run")
    parser.add_argument("--profile-records", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=3, help="in-process verification runs")
    parser.add_argument("--agent-runs", type=int, default=None,
                        help="cold agent starts, tfcrypt uninstall in between (default 3; "
                             "1 with --quick)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the agent's first complete apply")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help="bench.compute policies to apply: names (comma-separated) or "
                             "'all' (3.4 M nft elements at 100,000 records: several GB)")
    parser.add_argument("--envelope-version", type=int, choices=(1, 2), default=2,
                        help="format of the records in etcd for the agent starts (the "
                             "in-process runs measure both; default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="5,000 records, 1,000 per verification run")
    parser.add_argument("--load-etcd", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_etcd:
        count = asyncio.run(load_etcd(args.load_etcd, args.endpoint))
        print(f"{count} keys written")
        return 0
    if args.quick:
        args.records, args.verify_records, args.profile_records = 5_000, 1_000, 300
    args.agent_runs = args.agent_runs or (1 if args.quick else 3)
    args.timeout = args.timeout or max(120.0, args.records * 0.01)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
