"""From the benches' results to what the README shows: latest.json, latest.md and plots.

Rules:
- Input is only what the benches wrote (`bench/results/<bench>.json`); nothing is
  measured here, so a report can be rebuilt at any time (`python -m bench report`).
- `latest.json` holds one entry per figure id (`D1.tcp1`, `C3.first_apply_s`, ...) with
  value, unit, goal, min, max, runs, pass and the bench and date it came from, plus one
  verdict per issue figure (D1 ... C5): pass only if every goal under it passed. Figures
  keep the date of the run that produced them: a bench run alone refreshes its own.
- Plots are drawn with matplotlib's non-interactive Agg backend into PNG files next to
  the JSON; a plot whose data is missing is skipped and said so, never drawn empty.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.common import RESULTS

FIGURE_IDS = ("D1", "D2", "D3", "D4", "C1", "C2", "C3", "C4", "C5", "K1", "K2",
              "F1", "F2", "F3", "F4", "F5")
TITLES = {
    "D1": "selected flow: tfcrypt tunnel vs hand-made WireGuard",
    "D2": "unselected flow, 100,000 set elements vs no tfcrypt",
    "D3": "classification cost vs set size (and naive ip rules)",
    "D4": "WireGuard MTU and fragmentation",
    "C1": "policy change to every node's dataplane (3 nodes)",
    "C2": "node join to first selected packet",
    "C3": "one agent at 1,000 nodes x 100 workloads (no lab)",
    "C4": "record verification and start-up with 100,000 records",
    "C5": "key rotation under a selected flow",
    "K1": "controller initial sync of 10,000 pods (issue #17)",
    "K2": "kubectl label to every node's dataplane (issue #17)",
    "F1": "one agent's first compute, 10 to 5,000 nodes x 30 workloads (issue #18)",
    "F2": "one workload's labels to the agent's new desired state, up to 5,000 nodes",
    "F3": "etcd bytes of every signed record, and the watch fan-out of one change",
    "F4": "agent start-up: every record verified (extrapolated) plus compute",
    "F5": "RSS of the agent's view, inventory and desired state, up to 5,000 nodes",
}
_SCALE_RESULT = re.compile(r"reconcile_n(\d+)\.json$")

Json = dict[str, Any]


def _load(path: Path) -> Json | None:
    try:
        body: Json = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return body


def figure_group(fig_id: str) -> str | None:
    head = fig_id.split(".", 1)[0]
    return head if head in FIGURE_IDS else None


def collect(results: Path = RESULTS) -> Json:
    """Every figure of every bench result file, keyed by id, with per-issue verdicts."""
    figures: dict[str, Json] = {}
    conditions: dict[str, Json] = {}
    for path in sorted(results.glob("*.json")):
        if path.name == "latest.json":
            continue
        body = _load(path)
        if not body or "figures" not in body:
            continue
        bench = body.get("bench", path.stem)
        conds = body.get("conditions", {})
        conditions[path.stem] = conds
        for fig in body["figures"]:
            if figure_group(str(fig.get("id", ""))) is None:
                continue
            figures[fig["id"]] = {**{k: v for k, v in fig.items() if k != "samples"},
                                  "bench": bench, "date": conds.get("date")}
    verdicts = {}
    for group in FIGURE_IDS:
        mine = [f for i, f in figures.items() if figure_group(i) == group]
        judged = [f["pass"] for f in mine if f.get("pass") is not None]
        verdicts[group] = {
            "title": TITLES[group], "figures": len(mine),
            "pass": (all(judged) if judged else None) if mine else None,
            "measured": bool(mine)}
    return {"generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "verdicts": verdicts, "figures": dict(sorted(figures.items(), key=_order)),
            "conditions": conditions}


def _order(item: tuple[str, Json]) -> tuple[int, str]:
    group = figure_group(item[0]) or ""
    return (FIGURE_IDS.index(group) if group in FIGURE_IDS else 99, item[0])


def markdown(latest: Json) -> str:
    """The table the README embeds: one row per figure, its goal and pass/short."""
    rows = ["| figure | value | min | max | runs | unit | goal | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for fig_id, f in latest["figures"].items():
        verdict = "-" if f.get("pass") is None else ("pass" if f["pass"] else "**short**")
        rows.append(f"| {fig_id} | {f['value']} | {f['min']} | {f['max']} | {f['runs']} "
                    f"| {f['unit']} | {f.get('goal') or '-'} | {verdict} |")
    summary = ["| id | what | verdict |", "|---|---|---|"]
    for group, v in latest["verdicts"].items():
        verdict = ("not measured" if not v["measured"] else
                   "-" if v["pass"] is None else "pass" if v["pass"] else "**short**")
        summary.append(f"| {group} | {v['title']} | {verdict} |")
    return "\n".join(summary) + "\n\n" + "\n".join(rows) + "\n"


def _figs(latest: Json, ids: Iterable[str]) -> list[tuple[str, Json]]:
    return [(i, latest["figures"][i]) for i in ids if i in latest["figures"]]


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, out: Path) -> bool:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_ratios(latest: Json, out: Path) -> bool:
    """D1-D3 ratios as bars with min-max whiskers, the goal as a line."""
    plt = _pyplot()

    figs = [(i, f) for i, f in latest["figures"].items()
            if figure_group(i) in ("D1", "D2", "D3") and f["unit"] == "x"]
    if not figs:
        return False
    names = [i for i, _ in figs]
    values = [f["value"] for _, f in figs]
    low = [f["value"] - f["min"] for _, f in figs]
    high = [f["max"] - f["value"] for _, f in figs]
    colors = ["tab:green" if f.get("pass") else "tab:red" if f.get("pass") is False
              else "tab:gray" for _, f in figs]
    builds = _builds(latest)
    fig, axes = plt.subplots(1, 2 if builds else 1, figsize=(14 if builds else 9, 4.5),
                             width_ratios=(2, 1) if builds else None, squeeze=False)
    ax = axes[0][0]
    ax.bar(names, values, yerr=[low, high], color=colors, capsize=3)
    ax.axhline(0.95, color="black", linestyle="--", linewidth=0.8, label="goal 0.95 (D1, D2)")
    ax.axhline(0.97, color="gray", linestyle=":", linewidth=0.8, label="goal 0.97 (D3)")
    ax.set_ylabel("throughput ratio (median, min-max)")
    ax.set_title("Data plane, side by side (green: goal met, red: short, gray: no goal)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(loc="lower left", fontsize=8)
    if builds:
        bx = axes[0][1]
        width = 0.2
        for k, (label, series) in enumerate(builds.items()):
            xs = [j + (k - 1.5) * width for j in range(len(series))]
            bx.bar(xs, [v for _, v in series], width, label=label)
        bx.set_xticks(range(len(BUILD_MEASURES)), [m for m, _ in BUILD_MEASURES])
        bx.set_ylabel("Gbit/s (TCP), kpackets/s / 10 (UDP), median")
        bx.set_title("D1 absolute: both wireguard-go builds, same rounds")
        bx.legend(fontsize=7)
    return _save(plt, fig, out)


BUILD_MEASURES = (("tcp1", "tcp1_gbps"), ("tcp4", "tcp4_gbps"), ("udp", "udp_kpps"))


def _builds(latest: Json) -> dict[str, list[tuple[str, float]]]:
    """D1's absolute medians per wireguard-go build and side (tfcrypt, by hand), when the
    run had Debian's build too; UDP scaled by 1/10 to share the axis."""
    figures = latest["figures"]
    out: dict[str, list[tuple[str, float]]] = {}
    for prefix, build in (("D1.", "current"), ("D1.debian_", "Debian 2022")):
        for side in ("tfcrypt", "raw"):
            ids = [f"{prefix}{m}_{side}" for _, m in BUILD_MEASURES]
            if all(i in figures for i in ids):
                out[f"{build}, {side}"] = [
                    (i, figures[i]["value"] / (10 if "kpps" in i else 1)) for i in ids]
    return out if len(out) == 4 else {}


def scale_series(results: Path = RESULTS) -> dict[int, Json]:
    """C3 growth: the reconcile results kept per node count (`reconcile_n<N>.json`)."""
    series = {}
    for path in results.glob("reconcile_n*.json"):
        m = _SCALE_RESULT.search(path.name)
        body = _load(path)
        if m and body:
            series[int(m.group(1))] = {f["id"]: f for f in body.get("figures", [])}
    return dict(sorted(series.items()))


def plot_scale(series: dict[int, Json], out: Path) -> bool:
    """How compute, first apply, one change and RSS grow from 10 to 1,000 nodes."""
    if len(series) < 2:
        return False
    plt = _pyplot()

    nodes = list(series)

    def values(*names: str) -> list[float | None]:
        out_values: list[float | None] = []
        for n in nodes:
            fig = next((series[n][name] for name in names if name in series[n]), None)
            out_values.append(fig["value"] if fig else None)
        return out_values

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, ids, scale in (("first compute (s)", ("C3.first_compute_s", "first.compute"), 1),
                              ("first apply (s)", ("C3.first_apply_s", "first.apply"), 1),
                              ("one change (s)", ("C3.change_total_ms", "change.total"), 1e-3)):
        ys = values(*ids)
        pts = [(n, y * scale) for n, y in zip(nodes, ys, strict=True) if y is not None]
        if pts:
            left.plot(*zip(*pts, strict=True), marker="o", label=label)
    left.axhline(1.0, color="gray", linestyle=":", linewidth=0.8)
    left.axhline(5.0, color="gray", linestyle="--", linewidth=0.8)
    left.axhline(0.05, color="gray", linestyle="-.", linewidth=0.8)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("nodes (x 100 workloads each)")
    left.set_ylabel("seconds (goals: 1 s, 5 s, 50 ms)")
    left.legend(fontsize=8)
    rss = [(n, y) for n, y in zip(nodes, values("C3.rss_mib", "first.rss_after"), strict=True)
           if y is not None]
    if rss:
        right.plot(*zip(*rss, strict=True), marker="o", color="tab:purple")
    right.axhline(150, color="gray", linestyle="--", linewidth=0.8, label="goal 150 MiB")
    right.set_xscale("log")
    right.set_xlabel("nodes (x 100 workloads each)")
    right.set_ylabel("agent RSS after first apply (MiB)")
    right.legend(fontsize=8)
    fig.suptitle("C3: one agent's cost as the cluster grows")
    return _save(plt, fig, out)


def plot_fleet(results: Path, out: Path) -> bool:
    """F1-F5 against nodes (log x): seconds, bytes and RSS of one agent, with the limit
    and the goals the bench's README section argues from (etcd's quota, C3's goals)."""
    body = _load(results / "fleet.json")
    sizes: dict[str, Json] = (body or {}).get("sizes", {})
    if len(sizes) < 2:
        return False
    plt = _pyplot()

    figures = {f["id"]: f["value"] for f in (body or {}).get("figures", [])}
    nodes = sorted(int(n) for n in sizes)
    limits = (body or {}).get("limits", {})

    def series(fmt: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
        pts = [(n, figures[fmt.format(n=n)] * scale) for n in nodes
               if fmt.format(n=n) in figures]
        return [n for n, _ in pts], [v for _, v in pts]

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, fmt, scale in (("F1 first compute", "F1.n{n}", 1.0),
                              ("F2 one change", "F2.n{n}", 1e-3),
                              ("F2 one node record re-signed", "F2.rotation.n{n}", 1e-3),
                              ("F4 start-up (verify extrapolated + F1)", "F4.n{n}", 1.0)):
        left.plot(*series(fmt, scale), marker="o", label=label)
    measured = dict(zip(*series("F4.verify_measured.n{n}"), strict=True))
    first = dict(zip(*series("F1.n{n}"), strict=True))
    checked = [(n, v + first[n]) for n, v in measured.items() if n in first]
    if checked:
        left.plot(*zip(*checked, strict=True), marker="x", linestyle="none", color="black",
                  label="F4 check: every record verified for real, + F1")
    left.axhline(0.05, color="gray", linestyle="-.", linewidth=0.8, label="50 ms (C3's goal)")
    left.set_ylabel("seconds")
    for label, fmt in (("F3 etcd: every signed record", "F3.n{n}"),
                       ("F3 watch fan-out of one change", "F3.fanout.n{n}"),
                       ("F3 fan-out of one SVID rotation round", "F3.rotation.n{n}")):
        mid.plot(*series(fmt), marker="o", label=label)
    if "etcd_quota_mib" in limits:
        mid.axhline(limits["etcd_quota_mib"], color="black", linestyle=":", linewidth=0.8,
                    label="etcd default quota (storage)")
    mid.set_ylabel("MiB")
    for label, fmt in (("F5 RSS measured", "F5.n{n}"),
                       ("F5 + raw values (estimate)", "F5.with_raw.n{n}")):
        right.plot(*series(fmt), marker="o", label=label)
    view_n, view_mib = series("F5.view_measured.n{n}")
    rss = dict(zip(*series("F5.n{n}"), strict=True))
    pts = [(n, rss[n] + v) for n, v in zip(view_n, view_mib, strict=True) if n in rss]
    if pts:
        right.plot(*zip(*pts, strict=True), marker="x", linestyle="none", color="black",
                   label="F5 + a really verified view (upper bound)")
    right.axhline(150, color="gray", linestyle="--", linewidth=0.8, label="150 MiB (C3's goal)")
    right.set_ylabel("agent RSS (MiB)")
    per_node = (body or {}).get("conditions", {}).get("per_node", "?")
    for ax in (left, mid, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"nodes (x {per_node} workloads each)")
        ax.legend(fontsize=7)
    fig.suptitle("F1-F5: one agent's control-plane cost as the cluster grows (simulation)")
    return _save(plt, fig, out)


def plot_convergence(results: Path, out: Path) -> bool:
    """C1: the distribution of the 50 convergence times, with the p99 goal."""
    body = _load(results / "convergence.json")
    if not body:
        return False
    samples = next((f.get("samples") for f in body.get("figures", [])
                    if f.get("id") == "C1.p50"), None)
    if not samples:
        return False
    plt = _pyplot()

    ordered = sorted(samples)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], marker=".")
    ax.axvline(500, color="gray", linestyle="--", linewidth=0.8, label="goal p99 < 500 ms")
    ax.set_xlabel("policy write (etcd) -> last node's nft commit (ms)")
    ax.set_ylabel("fraction of changes")
    ax.set_title(f"C1: convergence over {len(ordered)} changes, 3 nodes")
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def write(results: Path = RESULTS) -> tuple[Json, list[str]]:
    """latest.json, latest.md and the plots; returns the document and what was skipped."""
    latest = collect(results)
    skipped = []
    plots = {"dataplane.png": lambda p: plot_ratios(latest, p),
             "scale.png": lambda p: plot_scale(scale_series(results), p),
             "convergence.png": lambda p: plot_convergence(results, p),
             "fleet.png": lambda p: plot_fleet(results, p)}
    latest["plots"] = []
    for name, draw in plots.items():
        if draw(results / name):
            latest["plots"].append(name)
        else:
            skipped.append(f"{name}: no data yet")
    (results / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    (results / "latest.md").write_text(markdown(latest))
    return latest, skipped
