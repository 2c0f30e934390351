"""tfcrypt's JSON command list rendered into nft's native syntax, for `nft -f -`.

Rules of this module:
- One job, pure: the JSON commands the manager builds (tfcrypt/dataplane/nftables.py) and
  the statements of its rules (tfcrypt/dataplane/nft_rules.py) in, the text of the same
  transaction out. No I/O; the caller sends the text as one `nft -f -` (one netlink
  batch: every command applies or none). Why: a first apply at 1,000 nodes is one
  transaction of ~340,000 set elements and ~10,800 rules; on nft 1.0.6 native syntax
  costs the same as JSON for the elements and about a third less for the rules, and
  nft's errors in it quote the line at fault (measured: docs/nftables.md, "Native syntax
  for the transaction").
- Faithful or nothing: every command kind, statement, expression, name and string is
  rendered from an allowlist of the shapes tfcrypt emits. Anything else (an unknown key or
  kind, a string nft's scanner would read otherwise: a quote, a `*` that makes an
  interface name a wildcard, a name that could be a keyword) raises `Unrenderable`, and
  the caller sends the WHOLE transaction as JSON instead; a transaction is never split
  between the two.
- Names: an nft identifier in native syntax is an unquoted word, and a bare word that is
  also a keyword (`set`, `counter`, `ip`...) is read as the keyword. nft's keywords have
  no `_`, and tfcrypt's names (`<selector>_v4`, `out_<class>`, `guard_drops`...) all have
  one; the three without (`tfcrypt`, `prerouting`, `selected`) are listed, proven by the
  real-nft tests (tests/test_nft_text.py).
- Matches are written with their operator (`==`, `!=`) as JSON has it, never implicit.
- One command a line; set elements `ELEMENTS_PER_LINE` to a line inside the braces, so
  that nft's error message, which quotes the line at fault, stays short.
"""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

Json = dict[str, Any]

ELEMENTS_PER_LINE = 16
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_PLAIN_NAMES = frozenset({"tfcrypt", "prerouting", "selected"})
_QUOTABLE = re.compile(r"[A-Za-z0-9_.:/=+,@ -]*")
_FAMILIES = frozenset({"inet", "ip", "ip6"})
_SET_TYPES = frozenset({"ipv4_addr", "ipv6_addr"})
_SET_FLAGS = frozenset({"interval"})
_MAP_TYPES = frozenset({"verdict"})
_CHAIN_TYPES = frozenset({"filter", "route", "nat"})
_HOOKS = frozenset({"prerouting", "input", "forward", "output", "postrouting"})
_POLICIES = frozenset({"accept", "drop"})
_OPS = frozenset({"==", "!="})
_VERDICTS = frozenset({"accept", "drop", "return", "continue"})
_PAYLOAD_FIELDS = {"ip": {"saddr", "daddr"}, "ip6": {"saddr", "daddr"},
                   "tcp": {"flags", "sport", "dport"}, "udp": {"sport", "dport"}}
_META_KEYS = {"mark": "mark", "iifname": "ifname", "oifname": "ifname"}
_TCP_FLAGS = frozenset({"fin", "syn", "rst", "psh", "ack", "urg", "ecn", "cwr"})
_FIB_FLAGS = frozenset({"saddr", "daddr", "mark", "iif", "oif"})
_FIB_RESULTS = {"oif": "bool", "oifname": "ifname", "type": "int"}
_BINOPS = {"&": 3, "^": 2, "|": 1}
"""Bitwise operators by binding strength in nft's grammar (`a & b | c` is `(a & b) | c`)."""


class Unrenderable(ValueError):
    """A command outside what this module renders faithfully; the message says what."""


def render(commands: Iterable[Json]) -> str:
    """The native-syntax text of one transaction; `Unrenderable` if any command is not
    one of the shapes tfcrypt emits."""
    memo: dict[int, tuple[Any, str]] = {}
    return "".join(_command(cmd, memo) + "\n" for cmd in commands)


def _one(obj: Any, what: str) -> tuple[str, Any]:
    if not isinstance(obj, dict) or len(obj) != 1:
        raise Unrenderable(f"{what}: not a one-key object: {obj!r:.80}")
    ((key, value),) = obj.items()
    return key, value


def _fields(obj: Any, required: set[str], optional: frozenset[str] = frozenset()) -> Json:
    if not isinstance(obj, dict) or not required <= obj.keys() <= required | optional:
        raise Unrenderable(f"unexpected fields: {sorted(obj) if isinstance(obj, dict) else obj}")
    return obj


def _name(value: Any) -> str:
    if (isinstance(value, str) and _NAME.fullmatch(value)
            and ("_" in value or value in _PLAIN_NAMES)):
        return value
    raise Unrenderable(f"name {value!r}: not a word nft reads as a name")


def _word(value: Any, allowed: Iterable[str]) -> str:
    if isinstance(value, str) and value in allowed:
        return value
    raise Unrenderable(f"{value!r}: not one of {sorted(allowed)}")


def _quoted(value: Any) -> str:
    if isinstance(value, str) and _QUOTABLE.fullmatch(value):
        return f'"{value}"'
    raise Unrenderable(f"string {value!r}: not quotable as is in nft syntax")


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise Unrenderable(f"{value!r}: not an integer")


def _table(obj: Json) -> str:
    return f"{_word(obj['family'], _FAMILIES)} {_name(obj['table'])}"


_OBJ = {"family", "table", "name"}


def _command(cmd: Json, memo: dict[int, tuple[Any, str]]) -> str:
    verb, body = _one(cmd, "command")
    kind, obj = _one(body, f"{verb} command")
    if (verb, kind) == ("add", "rule"):
        return _add_rule(obj, memo)
    render_one = _COMMANDS.get((verb, kind))
    if render_one is None:
        raise Unrenderable(f"command {verb} {kind}")
    return render_one(obj)


def _table_cmd(verb: str) -> Callable[[Json], str]:
    def render_table(obj: Json) -> str:
        _fields(obj, {"family", "name"})
        return f"{verb} table {_word(obj['family'], _FAMILIES)} {_name(obj['name'])}"
    return render_table


def _named(verb: str, kind: str) -> Callable[[Json], str]:
    def render_named(obj: Json) -> str:
        _fields(obj, _OBJ)
        return f"{verb} {kind} {_table(obj)} {_name(obj['name'])}"
    return render_named


def _add_set(obj: Json) -> str:
    _fields(obj, _OBJ | {"type"}, frozenset({"flags"}))
    flags = obj.get("flags", [])
    if not isinstance(flags, list) or (not flags and "flags" in obj):
        raise Unrenderable(f"set flags {flags!r}")
    spec = f"type {_word(obj['type'], _SET_TYPES)};"
    if flags:
        spec += f" flags {', '.join(_word(f, _SET_FLAGS) for f in flags)};"
    return f"add set {_table(obj)} {_name(obj['name'])} {{ {spec} }}"


def _add_map(obj: Json) -> str:
    _fields(obj, _OBJ | {"type", "map"})
    spec = f"type {_word(obj['type'], _SET_TYPES)} : {_word(obj['map'], _MAP_TYPES)};"
    return f"add map {_table(obj)} {_name(obj['name'])} {{ {spec} }}"


def _add_chain(obj: Json) -> str:
    base = {"type", "hook", "prio", "policy"}
    _fields(obj, _OBJ, frozenset(base))
    head = f"add chain {_table(obj)} {_name(obj['name'])}"
    if not base & obj.keys():
        return head
    _fields(obj, _OBJ | base)
    return (f"{head} {{ type {_word(obj['type'], _CHAIN_TYPES)} hook "
            f"{_word(obj['hook'], _HOOKS)} priority {_int(obj['prio'])}; "
            f"policy {_word(obj['policy'], _POLICIES)}; }}")


def _address(value: Any) -> str:
    """An address as nft's scanner reads it; IPv4-in-IPv6 spellings are left to JSON."""
    if isinstance(value, str):
        try:
            if ":" in value and "." not in value:
                socket.inet_pton(socket.AF_INET6, value)
                return value
            if ":" not in value:
                socket.inet_pton(socket.AF_INET, value)
                return value
        except (OSError, ValueError):
            pass
    raise Unrenderable(f"element {value!r}: not a plain IPv4 or IPv6 address")


def _plain_addresses(elems: list[Any]) -> list[str] | None:
    """`elems` as they are when all are plain addresses of one family (a selector set: up
    to tens of thousands, checked by `inet_pton` in C), else None (checked one by one)."""
    try:
        joined = "".join(elems)
    except TypeError:
        return None
    v6 = ":" in elems[0]
    if v6 and "." in joined:
        return None
    try:
        for _ in map(functools.partial(socket.inet_pton,
                                       socket.AF_INET6 if v6 else socket.AF_INET), elems):
            pass
    except (OSError, ValueError):
        return None
    return elems


def _element_key(raw: Any) -> str:
    if isinstance(raw, dict):
        key, prefix = _one(raw, "element")
        _fields(prefix, {"addr", "len"})
        length = _int(prefix["len"])
        addr = _address(prefix["addr"])
        if key != "prefix" or not 0 <= length <= (128 if ":" in addr else 32):
            raise Unrenderable(f"element {raw!r}")
        return f"{addr}/{length}"
    return _address(raw)


def _element(raw: Any) -> str:
    if isinstance(raw, list):
        if len(raw) != 2:
            raise Unrenderable(f"map element {raw!r}")
        verdict, target = _one(raw[1], "map element value")
        _fields(target, {"target"})
        return (f"{_element_key(raw[0])} : {_word(verdict, ('jump', 'goto'))} "
                f"{_name(target['target'])}")
    return _element_key(raw)


def _elements(verb: str) -> Callable[[Json], str]:
    def render_elements(obj: Json) -> str:
        _fields(obj, _OBJ | {"elem"})
        elems = obj["elem"]
        if not isinstance(elems, list) or not elems:
            raise Unrenderable("element command without elements")
        text = _plain_addresses(elems)
        if text is None:
            text = [_element(e) for e in elems]
        lines = [", ".join(text[i:i + ELEMENTS_PER_LINE])
                 for i in range(0, len(text), ELEMENTS_PER_LINE)]
        return f"{verb} element {_table(obj)} {_name(obj['name'])} {{ " + ",\n".join(lines) + " }"
    return render_elements


def _add_rule(obj: Json, memo: dict[int, tuple[Any, str]]) -> str:
    """A rule; `memo` holds the statements already rendered in this transaction, by
    identity (the class rules share a few hundred statement objects, nft_table.decoded;
    the memo keeps each one referenced, so an id is never reused while it is there)."""
    _fields(obj, {"family", "table", "chain", "expr"}, frozenset({"comment"}))
    if not isinstance(obj["expr"], list) or not obj["expr"]:
        raise Unrenderable("rule without statements")
    parts = []
    for stmt in obj["expr"]:
        hit = memo.get(id(stmt))
        if hit is None:
            hit = memo[id(stmt)] = (stmt, _statement(stmt))
        parts.append(hit[1])
    text = f"add rule {_table(obj)} {_name(obj['chain'])} " + " ".join(parts)
    if "comment" in obj:
        text += f" comment {_quoted(obj['comment'])}"
    return text


def _delete_rule(obj: Json) -> str:
    _fields(obj, {"family", "table", "chain", "handle"})
    return f"delete rule {_table(obj)} {_name(obj['chain'])} handle {_int(obj['handle'])}"


_COMMANDS: dict[tuple[str, str], Callable[[Json], str]] = {
    ("add", "table"): _table_cmd("add"),
    ("delete", "table"): _table_cmd("delete"),
    ("add", "counter"): _named("add", "counter"),
    ("delete", "counter"): _named("delete", "counter"),
    ("add", "set"): _add_set,
    ("delete", "set"): _named("delete", "set"),
    ("add", "map"): _add_map,
    ("delete", "map"): _named("delete", "map"),
    ("add", "chain"): _add_chain,
    ("flush", "chain"): _named("flush", "chain"),
    ("delete", "chain"): _named("delete", "chain"),
    ("add", "element"): _elements("add"),
    ("delete", "element"): _elements("delete"),
    ("delete", "rule"): _delete_rule,
}


# --- statements and expressions ------------------------------------------------------


def _statement(stmt: Any) -> str:
    kind, body = _one(stmt, "statement")
    if kind in _VERDICTS:
        if body is not None:
            raise Unrenderable(f"verdict {kind} with {body!r}")
        return kind
    if kind in ("jump", "goto"):
        return f"{kind} {_name(_fields(body, {'target'})['target'])}"
    if kind == "counter":
        if body is None:
            return "counter"
        if isinstance(body, str):
            return f"counter name {_quoted(_name(body))}"
        _fields(body, {"packets", "bytes"})
        return f"counter packets {_int(body['packets'])} bytes {_int(body['bytes'])}"
    if kind == "match":
        _fields(body, {"op", "left", "right"})
        left, value_kind = _expr(body["left"])
        return f"{left} {_word(body['op'], _OPS)} {_value(body['right'], value_kind)}"
    if kind == "vmap":
        _fields(body, {"key", "data"})
        key, _ = _expr(body["key"])
        return f"{key} vmap {_set_ref(body['data'])}"
    if kind == "mangle":
        _fields(body, {"key", "value"})
        key, value_kind = _expr(body["key"])
        return f"{key} set {_value(body['value'], value_kind)}"
    raise Unrenderable(f"statement {kind}")


def _expr(expr: Any) -> tuple[str, str]:
    """(text, kind of the values it compares with) of an expression that reads the packet:
    kind is "addr", "ifname", "mark", "tcpflags", "bool" or "int"."""
    kind, body = _one(expr, "expression")
    if kind == "payload":
        _fields(body, {"protocol", "field"})
        proto = _word(body["protocol"], _PAYLOAD_FIELDS)
        field_ = _word(body["field"], _PAYLOAD_FIELDS[proto])
        value_kind = {"saddr": "addr", "daddr": "addr", "flags": "tcpflags"}.get(field_, "int")
        return f"{proto} {field_}", value_kind
    if kind == "meta":
        key = _word(_fields(body, {"key"})["key"], _META_KEYS)
        return f"meta {key}", _META_KEYS[key]
    if kind == "fib":
        _fields(body, {"result", "flags"})
        flags = body["flags"]
        if not isinstance(flags, list) or not flags:
            raise Unrenderable(f"fib flags {flags!r}")
        result = _word(body["result"], _FIB_RESULTS)
        return (f"fib {' . '.join(_word(f, _FIB_FLAGS) for f in flags)} {result}",
                _FIB_RESULTS[result])
    if kind == "rt":
        return f"rt {_word(_fields(body, {'key'})['key'], ('mtu',))}", "int"
    if kind == "tcp option":
        _fields(body, {"name", "field"})
        name = _word(body["name"], ("maxseg",))
        return f"tcp option {name} {_word(body['field'], ('size',))}", "int"
    if kind in _BINOPS:
        if not isinstance(body, list) or len(body) != 2:
            raise Unrenderable(f"{kind} of {body!r}")
        left, value_kind = _expr(body[0])
        inner, _ = _one(body[0], "operand")
        if inner in _BINOPS and _BINOPS[inner] < _BINOPS[kind]:
            raise Unrenderable(f"{inner} inside {kind}: would need parentheses")
        return f"{left} {kind} {_value(body[1], value_kind)}", value_kind
    raise Unrenderable(f"expression {kind}")


def _set_ref(value: Any) -> str:
    if isinstance(value, str) and value.startswith("@"):
        return "@" + _name(value[1:])
    raise Unrenderable(f"{value!r}: not a set reference")


def _value(value: Any, kind: str) -> str:
    """A right-hand side: a set reference, a constant of `kind`, or an expression."""
    if isinstance(value, str) and value.startswith("@"):
        return _set_ref(value)
    if isinstance(value, dict):
        return _expr(value)[0]
    if kind == "bool" and isinstance(value, bool):
        return "exists" if value else "missing"
    if kind == "mark":
        mark = _int(value)
        if not 0 <= mark <= 0xFFFFFFFF:
            raise Unrenderable(f"mark {mark:#x}")
        return f"{mark:#010x}"
    if kind == "int":
        return str(_int(value))
    if kind == "ifname":
        return _quoted(value)
    if kind == "addr":
        return _address(value)
    if kind == "tcpflags":
        if isinstance(value, list) and value:
            return "(" + " | ".join(_word(f, _TCP_FLAGS) for f in value) + ")"
        return _word(value, _TCP_FLAGS)
    raise Unrenderable(f"value {value!r} for a {kind}")
