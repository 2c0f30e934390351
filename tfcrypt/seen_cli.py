"""The seen-traffic commands' command line: `tfcrypt flows`, `policy plan --against-seen`,
`policy suggest`, `report` (docs/flows.md).

Rules:
- argparse wiring and the handlers only; what the commands compute lives in
  tfcrypt/core/seen*.py and tfcrypt/controller/seen_commands.py, the local view in
  tfcrypt/flows_view.py. tfcrypt/cli.py calls in here.
- Exit statuses: `plan --against-seen` 1 when a seen flow would be black-holed,
  `suggest` 1 when no seen flow can be covered, `report` 1 when selected pairs carried
  plaintext, `flows` 2 when the agent cannot be reached.
- Heavy imports (the core, the controller) happen in the handlers: `tfcrypt status`
  and `tfcrypt flows` stay quick to start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tfcrypt.errors import ConfigError
from tfcrypt.flows_view import duration
from tfcrypt.model.tags import Tag

if TYPE_CHECKING:
    from tfcrypt.controller.session import ControllerSession
    from tfcrypt.model.policy import EncryptionPolicy

EXIT_UNREACHABLE = 2
REPORT_MAX_AGE = "120s"  # tfcrypt/core/seen.py REPORT_MAX_AGE_S, not imported: `status` stays
                         # quick to start (the core costs ~80 ms of imports)


def add_plan_options(pol_plan: argparse.ArgumentParser) -> None:
    """`policy plan`'s --against-seen, --since, --report-max-age."""
    pol_plan.add_argument(
        "--against-seen", action="store_true",
        help="also list the seen flows (every node's signed flow report) the change would "
             "encrypt or take out of the tunnel, with each one's node readiness; exit 1 "
             "when a seen flow would be black-holed (docs/flows.md)")
    _since_option(pol_plan, "with --against-seen: ")
    pol_plan.add_argument(
        "--report-max-age", type=duration, default=None, metavar="DURATION",
        help="with --against-seen: a node whose own flow report is older is not ready "
             f"(default {REPORT_MAX_AGE}: reports come every ~30 s)")


def add_parsers(pol_sub: Any, sub: Any) -> tuple[argparse.ArgumentParser,
                                                 argparse.ArgumentParser]:
    """`policy suggest` and `report` (controller commands: cli.py adds etcd's options)."""
    pol_suggest = pol_sub.add_parser(
        "suggest", help="write an audit-mode policy that would encrypt every seen flow "
                        "touching workloads with all the --touching tags (one rule per seen "
                        "peer tag set), and list the flows it covers and the unseen pairs it "
                        "would also select; exit 1 when no seen flow can be covered")
    pol_suggest.add_argument("--touching", action="append", required=True, metavar="TAG",
                             help="a tag type=value the workloads must carry (repeatable: "
                                  "all of them)")
    pol_suggest.add_argument("--name", help="the policy's name (default seen-<tags>)")
    _since_option(pol_suggest)
    pol_suggest.add_argument("-o", "--output", metavar="FILE",
                             help="write the YAML to FILE instead of stdout")
    pol_suggest.add_argument("--json", action="store_true",
                             help="print the policy, covered flows and unseen pairs as JSON "
                                  "(the YAML goes to --output if given)")
    report = sub.add_parser(
        "report", help="proof of encryption from the seen flow reports, per enforced "
                       "policy: selected pairs that carried traffic, packets and bytes inside "
                       "WireGuard, strict-ingress and guard drops, plaintext of selected pairs "
                       "(flagged), last handshakes; exit 1 when selected pairs carried "
                       "plaintext")
    _since_option(report)
    report.add_argument("--json", action="store_true")

    return pol_suggest, report


def _since_option(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument("--since", type=duration, metavar="DURATION",
                   help=f"{prefix}only flows last seen within DURATION (90s, 30m, 1h, 1h30m); "
                        "default: everything the reports hold")



def touching(texts: Sequence[str]) -> frozenset[Tag]:
    try:
        return frozenset(Tag.parse(t) for t in texts)
    except ValueError as exc:
        raise ConfigError(f"--touching: {exc}") from None


def _since(args: argparse.Namespace, now: float) -> float | None:
    return None if args.since is None else now - args.since


async def plan_against_seen(s: ControllerSession, args: argparse.Namespace,
                             policy: EncryptionPolicy, infra: dict[str, str]) -> int:
    from tfcrypt.controller import seen_commands
    from tfcrypt.core.seen import Readiness

    now = time.time()
    result = await seen_commands.plan_against_seen_command(
        s, policy, now=now, since=_since(args, now), infrastructure=infra,
        readiness=Readiness(report_max_age=args.report_max_age or duration(REPORT_MAX_AGE)))
    print(json.dumps(seen_commands.seen_plan_to_json(result), indent=2) if args.json
          else seen_commands.render_seen_plan(result))
    return 1 if result["seen"].black_holed else 0


async def suggest(s: ControllerSession, args: argparse.Namespace, touching: frozenset[Tag],
                   infra: dict[str, str]) -> int:
    from tfcrypt.controller import seen_commands

    now = time.time()
    sug, read = await seen_commands.suggest_command(s, touching, now=now,
                                                    since=_since(args, now), name=args.name,
                                                    infrastructure=infra)
    if sug.policy is None:
        if args.json:
            print(json.dumps({**sug.to_json(), **read.to_json()}, indent=2))
        print(seen_commands.render_no_suggestion(sug, read), file=sys.stderr)
        return 1
    if args.output:
        try:
            Path(args.output).write_text(sug.yaml())
        except OSError as exc:
            raise ConfigError(f"-o {args.output}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps({**sug.to_json(), **read.to_json()}, indent=2))
    else:
        if not args.output:
            print(sug.yaml(), end="")
        print(seen_commands.render_suggestion(sug, read, now), file=sys.stderr)
    return 0


async def report(s: ControllerSession, args: argparse.Namespace, infra: dict[str, str]) -> int:
    from tfcrypt.controller import seen_commands

    now = time.time()
    since = _since(args, now)
    proof, read = await seen_commands.report_command(s, now=now, since=since,
                                                     infrastructure=infra)
    print(json.dumps(seen_commands.report_to_json(proof, read, now, since), indent=2)
          if args.json else seen_commands.render_report(proof, read, now, since))
    return 1 if proof.plaintext_found else 0


def flows_command(args: argparse.Namespace, socket: str) -> int:
    """`tfcrypt flows`: the local agent's `GET /flows`, filtered."""
    from tfcrypt import flows_view
    from tfcrypt.agent.status_api import NotServed, StatusApiError, fetch_status

    since = (time.time() - args.since) if args.since else None
    try:
        doc = fetch_status(socket, timeout=args.timeout, target="/flows")
    except NotServed:
        print("tfcrypt: the agent keeps no flow records (flows: false in its "
              "configuration)", file=sys.stderr)
        return 1
    except StatusApiError as exc:
        print(f"tfcrypt: cannot read the agent's flows: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    rows = flows_view.select(doc.get("flows", []), workload=args.workload, tag=args.tag,
                             verdict=args.verdict, since=since)
    print(json.dumps(rows, indent=2, sort_keys=True) if args.json
          else flows_view.render(doc, rows, time.time()))
    return 0
