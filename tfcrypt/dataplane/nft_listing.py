"""What nft reports of `table inet tfcrypt`, read back into a `TableState`.

Rules of this module:
- Pure: no I/O; the input is `nft -j list table inet tfcrypt` output.
- Rules are recognised by their comment (`tfcrypt:<hash>`) alone; a rule without one, or a
  second rule with the same one, is a stray the manager deletes.
- Anything in the table this module does not recognise (an object kind tfcrypt never
  creates, an element that is not a plain address) is listed in `TableState.foreign`; the
  manager answers that by rebuilding the table in one atomic transaction.
- Interval sets (the infrastructure sets) list a host as its address and a wider prefix as
  `{"prefix": {"addr", "len"}}`, read back as `addr/len` (the desired side's spelling,
  tfcrypt/dataplane/nft_table.py `infra_elements`); a range, which tfcrypt never
  creates, is foreign.
- The flow sets (`seen_*`: a concatenated type, flags dynamic/timeout) are read as their
  declaration only: their elements are the kernel's (tfcrypt/dataplane/flow_listing.py
  reads them), never diffed. nft lists their flags as `timeout` alone, so the
  declaration is normalised to FLOW_FLAGS.
- Addresses are canonicalised as on the desired side; `raw_elements` keeps nft's spelling
  where it differs, so a delete names the element as nft knows it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from tfcrypt.dataplane.nft_table import (
    BY_ADDR_TYPE,
    COMMENT_PREFIX,
    FLOW_FLAGS,
    INTERVAL,
    BaseHook,
    Fam,
    Json,
    RuleSpec,
    SetSpec,
    TableState,
    canonical_ip,
)
from tfcrypt.errors import ConfigError

_KNOWN_KINDS = frozenset({"metainfo", "table", "counter", "set", "map", "chain", "rule"})


def parse_listing(listing: Json,
                  canon: Callable[[str], tuple[Fam, str]] = canonical_ip) -> TableState:
    """Read `nft -j list table inet tfcrypt` output into a TableState (with handles).

    `raw_elements` keeps nft's spelling only where it differs from the canonical one."""
    state = TableState()
    for entry in listing.get("nftables", []):
        ((kind, obj),) = entry.items()
        if kind not in _KNOWN_KINDS:
            state.foreign.append(f"{kind} {obj.get('name', '?')}")
        elif kind == "table" and obj.get("flags"):
            state.foreign.append(f"table flags {obj['flags']}")
        elif kind == "counter":
            state.counters.add(obj["name"])
            state.handles[("counter", obj["name"])] = obj["handle"]
        elif kind in ("set", "map"):
            _parse_set(state, kind, obj, canon)
        elif kind == "chain":
            hook = None
            if "hook" in obj:
                hook = BaseHook(obj["type"], obj["hook"], obj["prio"], obj.get("policy", "accept"))
            state.chains[obj["name"]] = hook
            state.handles[("chain", obj["name"])] = obj["handle"]
        elif kind == "rule":
            _parse_rule(state, obj)
    return state


def _parse_set(state: TableState, kind: str, obj: Json,
               canon_of: Callable[[str], tuple[Fam, str]]) -> None:
    name = obj["name"]
    flags = obj.get("flags") or []
    if (kind == "set" and isinstance(obj["type"], list) and isinstance(flags, list)
            and "timeout" in flags and set(flags) <= {"timeout", "dynamic"}):
        state.sets[name] = SetSpec(" . ".join(map(str, obj["type"])), None, FLOW_FLAGS,
                                   obj.get("timeout"), obj.get("size"))
        state.handles[("set", name)] = obj["handle"]
        return
    spec = SetSpec(obj["type"] if isinstance(obj["type"], str) else json.dumps(obj["type"]),
                   obj.get("map") if kind == "map" else None,
                   tuple(flags) if isinstance(flags, list) else (str(flags),))
    if spec.flags not in ((), INTERVAL) or spec.type not in BY_ADDR_TYPE or (
            spec.flags and kind == "map"):
        state.foreign.append(f"{kind} {name} of type {spec.type} flags {obj.get('flags')}")
    state.sets[name] = spec
    state.handles[("set", name)] = obj["handle"]
    members: dict[str, str | None] = {}
    for raw in obj.get("elem", []):
        key, value = (raw[0], raw[1]) if kind == "map" else (raw, None)
        if isinstance(key, dict) and "elem" in key:
            key = key["elem"].get("val")
        length = None
        if spec.flags and isinstance(key, dict) and isinstance(key.get("prefix"), dict):
            key, length = key["prefix"].get("addr"), key["prefix"].get("len")
            if not isinstance(length, int):
                key = None
        target = value["jump"]["target"] if isinstance(value, dict) and "jump" in value else None
        if not isinstance(key, str) or (kind == "map" and target is None):
            state.foreign.append(f"element {json.dumps(raw)} in {name}")
            continue
        try:
            _, canon = canon_of(key)
        except ConfigError:
            state.foreign.append(f"element {key!r} in {name}")
            continue
        if length is not None:
            raw_key: object = {"prefix": {"addr": key, "len": length}}
            key, canon = f"{key}/{length}", f"{canon}/{length}"
        else:
            raw_key = key
        members[canon] = target
        if canon != key:
            state.raw_elements[(name, canon)] = raw_key
    state.elements[name] = members


def _parse_rule(state: TableState, obj: Json) -> None:
    chain, comment, handle = obj["chain"], obj.get("comment", ""), obj["handle"]
    key = (chain, comment)
    if not comment.startswith(COMMENT_PREFIX) or key in state.rules:
        state.stray_rules.append((chain, handle))
        return
    state.rules[key] = RuleSpec(chain, comment)
    state.rule_handles[key] = handle


def counter_values(listing: Json) -> dict[str, tuple[int, int]]:
    """Named counters, plus `out:<class>` summed over the anonymous counters of its chain."""
    out: dict[str, tuple[int, int]] = {}
    for entry in listing.get("nftables", []):
        ((kind, obj),) = entry.items()
        if kind == "counter":
            out[obj["name"]] = (obj["packets"], obj["bytes"])
        elif kind == "rule" and obj["chain"].startswith("out_"):
            for stmt in obj.get("expr", []):
                counter = stmt.get("counter")
                if isinstance(counter, dict):
                    name = "out:" + obj["chain"][4:]
                    p, b = out.get(name, (0, 0))
                    out[name] = (p + counter["packets"], b + counter["bytes"])
    return out
