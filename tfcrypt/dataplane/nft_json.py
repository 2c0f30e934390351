"""Talking to nftables through `nft`'s JSON interface, behind one small Protocol.

Rules of this module:
- Two calls only: read `table inet tfcrypt` (`nft -j list table inet tfcrypt`; None when the
  table does not exist) and run one transaction: a list of JSON commands, sent as ONE
  `nft -f -` in native syntax (rendered by tfcrypt/dataplane/nft_text.py; on nft 1.0.6
  as fast as JSON for elements and faster for rules, docs/nftables.md "Native syntax for
  the transaction"), or as ONE `nft -j -f -` in JSON when any command cannot be rendered
  faithfully (the whole transaction then, never part of it). `nft -f` loads a file as one
  netlink batch: every command applies or none does, in either syntax.
- Commands stay JSON everywhere else: the manager builds them, `FakeNft` understands them,
  tests compare them; the text is only what goes down the pipe.
- nft errors become `NftError` carrying nft's own message, here and nowhere else.
- `SubprocessNft` runs the real binary, in another network namespace if asked
  (`ip netns exec NS nft ...`); the Python binding is not used (not installable in a venv).
- `FakeNft` understands the subset of JSON commands tfcrypt emits and mimics the kernel
  behaviour the manager depends on: atomic transactions, EEXIST when an element is added
  with another value, ENOENT for a missing object, EBUSY for deleting an object still
  referenced, and a listing in the same shape as `nft -j list table`. Interval sets
  (`flags: ["interval"]`) take prefixes (`{"prefix": {"addr", "len"}}`) and refuse an
  element overlapping one already there, as the kernel does.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import logging
from typing import Any, Protocol

from tfcrypt.dataplane.nft_table import FAMILY, TABLE
from tfcrypt.dataplane.nft_text import Unrenderable, render
from tfcrypt.errors import TfcryptError

Json = dict[str, Any]

log = logging.getLogger(__name__)

_ENOENT = "Error: Could not process rule: No such file or directory"
_EEXIST = "Error: Could not process rule: File exists"
_EBUSY = "Error: Could not process rule: Device or resource busy"
_OVERLAP = "Error: interval overlaps with an existing one"


def _elem_key(raw: Any) -> Any:
    """A plain set's element as the fake keys it: a prefix as `addr/len`."""
    if isinstance(raw, dict) and isinstance(raw.get("prefix"), dict):
        return f"{raw['prefix']['addr']}/{raw['prefix']['len']}"
    return raw


def _elem_raw(key: Any) -> Any:
    """The listing's spelling of a fake element key (the inverse of `_elem_key`)."""
    if isinstance(key, str) and "/" in key:
        addr, length = key.split("/")
        return {"prefix": {"addr": addr, "len": int(length)}}
    return key


class NftError(TfcryptError):
    """`nft` refused a command or a transaction; the message is nft's stderr."""


class NftUnreadable(NftError):
    """`nft -j list` succeeded but printed no valid JSON (nft 1.0.6 truncates its output for
    a table with flags, e.g. `dormant`): the table exists and is not what tfcrypt built."""


class Nft(Protocol):
    async def list_table(self) -> Json | None: ...

    async def list_set(self, name: str) -> Json | None: ...

    async def run(self, commands: list[Json]) -> None: ...


def transaction(commands: list[Json], native: bool = True) -> tuple[list[str], bytes]:
    """(nft arguments, stdin) of one transaction: native syntax, or JSON when `native` is
    False or some command cannot be rendered faithfully (then all of them)."""
    if native:
        try:
            return ["-f", "-"], render(commands).encode()
        except Unrenderable as exc:
            log.info("nftables: transaction sent as JSON: %s", exc)
    return ["-j", "-f", "-"], json.dumps({"nftables": commands}).encode()


class SubprocessNft:
    """The real `nft` binary. `native=False` sends every transaction as JSON (the reference
    path of the equivalence tests, tests/test_nft_text.py).

    Pitfalls:
    - `ip netns exec` also says "No such file or directory" when the namespace is missing,
      so only nft's own message means "no table".
    - In native syntax nft's error quotes the line at fault (`/dev/stdin:3:1-40: Error:
      ...` then the line and carets): the NftError message carries all of it.
    """

    def __init__(self, netns: str | None = None, binary: str = "nft",
                 native: bool = True) -> None:
        self.netns = netns
        self.binary = binary
        self.native = native

    def __repr__(self) -> str:
        return f"SubprocessNft(netns={self.netns!r})"

    def argv(self, *args: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, self.binary, *args]

    async def _exec(self, args: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(*args),
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise NftError(f"cannot run {self.binary}: {exc}") from exc
        out, err = await proc.communicate(stdin)
        return proc.returncode or 0, out.decode(), err.decode().strip()

    async def list_table(self) -> Json | None:
        return await self._list("table", FAMILY, TABLE)

    async def list_set(self, name: str) -> Json | None:
        """`nft -j list set inet tfcrypt <name>` (a flow set's elements); None: no set."""
        return await self._list("set", FAMILY, TABLE, name)

    async def _list(self, *what: str) -> Json | None:
        rc, out, err = await self._exec(["-j", "list", *what])
        if rc == 0:
            try:
                listing: Json = json.loads(out)
            except ValueError as exc:
                raise NftUnreadable(f"nft -j list printed invalid JSON: {exc}") from exc
            return listing
        if err.startswith("Error: No such file or directory"):
            return None
        raise NftError(err or f"nft exited with {rc}")

    async def run(self, commands: list[Json]) -> None:
        if not commands:
            return
        args, payload = transaction(commands, self.native)
        rc, _, err = await self._exec(args, payload)
        if rc != 0:
            raise NftError(err or f"nft exited with {rc}")


def _refs(expr: Any) -> tuple[set[str], set[str], set[str]]:
    """(sets, counters, chains) a rule expression refers to."""
    sets: set[str] = set()
    counters: set[str] = set()
    chains: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str) and node.startswith("@"):
            sets.add(node[1:])
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key == "counter" and isinstance(value, str):
                    counters.add(value)
                elif key in ("jump", "goto") and isinstance(value, dict):
                    chains.add(value["target"])
                else:
                    walk(value)

    walk(expr)
    return sets, counters, chains


class FakeNft:
    """In-memory `table inet tfcrypt` for reconciler tests without root.

    `transactions` records every successful command list; `fail_next` makes the next
    transaction fail with that message and change nothing.
    """

    def __init__(self) -> None:
        self.table: Json | None = None
        self.transactions: list[list[Json]] = []
        self.fail_next: str | None = None

    def __repr__(self) -> str:
        return f"FakeNft(table={'present' if self.table else 'absent'})"

    async def list_table(self) -> Json | None:
        return None if self.table is None else self.listing()

    async def list_set(self, name: str) -> Json | None:
        if self.table is None or name not in self.table["sets"]:
            return None
        return {"nftables": [e for e in self.listing()["nftables"]
                             if e.get("set", {}).get("name") == name]}

    async def run(self, commands: list[Json]) -> None:
        if not commands:
            return
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise NftError(message)
        work = copy.deepcopy(self.table)
        for command in commands:
            ((verb, body),) = command.items()
            ((kind, obj),) = body.items()
            work = self._one(work, verb, kind, obj)
        self.table = work
        self.transactions.append(copy.deepcopy(commands))

    def bump(self, counter: str, packets: int, nbytes: int) -> None:
        """Pretend traffic hit a named counter."""
        assert self.table is not None
        c = self.table["counters"][counter]
        c["packets"] += packets
        c["bytes"] += nbytes

    def listing(self) -> Json:
        t = self.table
        assert t is not None
        out: list[Json] = [{"metainfo": {"json_schema_version": 1}},
                           {"table": {"family": FAMILY, "name": TABLE, "handle": t["handle"],
                                      **({"flags": t["flags"]} if t.get("flags") else {})}}]
        base = {"family": FAMILY, "table": TABLE}
        for name, c in t["counters"].items():
            out.append({"counter": {**base, "name": name, **c}})
        for name, s in t["sets"].items():
            obj: Json = {**base, "name": name, "type": s["type"], "handle": s["handle"]}
            if s["map"]:
                obj["map"] = s["map"]
            if s.get("flags"):
                obj["flags"] = list(s["flags"])
            obj.update((k, s[k]) for k in ("timeout", "size") if k in s)
            if s["elem"]:
                obj["elem"] = [[k, {"jump": {"target": v}}] if s["map"] else _elem_raw(k)
                               for k, v in s["elem"].items()]
            out.append({"map" if s["map"] else "set": obj})
        for name, c in t["chains"].items():
            out.append({"chain": {**base, "name": name, **c}})
        for chain in t["chains"]:
            for r in t["rules"]:
                if r["chain"] == chain:
                    out.append({"rule": {**base, **r}})
        return {"nftables": out}

    def _handle(self, t: Json) -> int:
        t["next"] += 1
        return int(t["next"])

    def _one(self, t: Json | None, verb: str, kind: str, obj: Json) -> Json | None:
        if kind == "table":
            if verb == "add":
                return t or {"handle": 1, "next": 1, "counters": {}, "sets": {}, "chains": {},
                             "rules": []}
            if verb == "delete" and t is not None:
                return None
            raise NftError(_ENOENT)
        if t is None:
            raise NftError(_ENOENT)
        handler = getattr(self, f"_{verb}_{kind}", None)
        if handler is None:
            raise NftError(f"Error: FakeNft does not understand {verb} {kind}")
        handler(t, obj)
        return t

    def _add_counter(self, t: Json, obj: Json) -> None:
        if obj["name"] not in t["counters"]:
            t["counters"][obj["name"]] = {"handle": self._handle(t), "packets": 0, "bytes": 0}

    def _delete_counter(self, t: Json, obj: Json) -> None:
        if obj["name"] not in t["counters"]:
            raise NftError(_ENOENT)
        if any(obj["name"] in _refs(r["expr"])[1] for r in t["rules"]):
            raise NftError(_EBUSY)
        del t["counters"][obj["name"]]

    def _add_set(self, t: Json, obj: Json, map_: str | None = None) -> None:
        have = t["sets"].get(obj["name"])
        flags = list(obj.get("flags", []))
        if have is not None and (have["type"], have["map"], have.get("flags", [])) != (
                obj["type"], map_, flags):
            raise NftError(_EEXIST)
        if have is None:
            t["sets"][obj["name"]] = {"type": obj["type"], "map": map_, "flags": flags,
                                      "handle": self._handle(t), "elem": {},
                                      **{k: obj[k] for k in ("timeout", "size") if k in obj}}
        if obj.get("elem"):
            self._add_element(t, obj)

    def _add_map(self, t: Json, obj: Json) -> None:
        self._add_set(t, obj, obj["map"])

    def _delete_set(self, t: Json, obj: Json) -> None:
        if obj["name"] not in t["sets"]:
            raise NftError(_ENOENT)
        if any(obj["name"] in _refs(r["expr"])[0] for r in t["rules"]):
            raise NftError(_EBUSY)
        del t["sets"][obj["name"]]

    _delete_map = _delete_set

    def _add_element(self, t: Json, obj: Json) -> None:
        s = t["sets"].get(obj["name"])
        if s is None:
            raise NftError(_ENOENT)
        for raw in obj["elem"]:
            key, value = (raw[0], raw[1]["jump"]["target"]) if s["map"] else (raw, None)
            key = _elem_key(key)
            if value is not None and value not in t["chains"]:
                raise NftError(_ENOENT)
            if key in s["elem"] and s["elem"][key] != value:
                raise NftError(_EEXIST)
            if "interval" in s.get("flags", []) and key not in s["elem"]:
                net = ipaddress.ip_network(key, strict=True)
                if any(net.overlaps(ipaddress.ip_network(k)) for k in s["elem"]):
                    raise NftError(_OVERLAP)
            s["elem"][key] = value

    def _delete_element(self, t: Json, obj: Json) -> None:
        s = t["sets"].get(obj["name"])
        for raw in obj["elem"]:
            key = _elem_key(raw[0] if isinstance(raw, list) else raw)
            if s is None or key not in s["elem"]:
                raise NftError(_ENOENT)
            del s["elem"][key]

    def _add_chain(self, t: Json, obj: Json) -> None:
        spec = {k: obj[k] for k in ("type", "hook", "prio", "policy") if k in obj}
        have = t["chains"].get(obj["name"])
        if have is None:
            t["chains"][obj["name"]] = {"handle": self._handle(t), **spec}
        elif {k: v for k, v in have.items() if k != "handle"} != spec:
            raise NftError(_EEXIST)

    def _flush_chain(self, t: Json, obj: Json) -> None:
        if obj["name"] not in t["chains"]:
            raise NftError(_ENOENT)
        t["rules"] = [r for r in t["rules"] if r["chain"] != obj["name"]]

    def _delete_chain(self, t: Json, obj: Json) -> None:
        name = obj["name"]
        if name not in t["chains"]:
            raise NftError(_ENOENT)
        jumps = {v for s in t["sets"].values() if s["map"] for v in s["elem"].values()}
        others = [r for r in t["rules"] if r["chain"] != name]
        if name in jumps or any(name in _refs(r["expr"])[2] for r in others):
            raise NftError(_EBUSY)
        t["rules"] = others
        del t["chains"][name]

    def _add_rule(self, t: Json, obj: Json) -> None:
        if obj["chain"] not in t["chains"]:
            raise NftError(_ENOENT)
        sets, counters, chains = _refs(obj["expr"])
        if not sets <= t["sets"].keys() or not counters <= t["counters"].keys():
            raise NftError(_ENOENT)
        if not chains <= t["chains"].keys():
            raise NftError(_ENOENT)
        rule = {"chain": obj["chain"], "handle": self._handle(t), "expr": obj["expr"]}
        if "comment" in obj:
            rule["comment"] = obj["comment"]
        t["rules"].append(rule)

    def _delete_rule(self, t: Json, obj: Json) -> None:
        for i, r in enumerate(t["rules"]):
            if r["chain"] == obj["chain"] and r["handle"] == obj["handle"]:
                del t["rules"][i]
                return
        raise NftError(_ENOENT)
