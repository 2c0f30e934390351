"""Mapping between registry-relative keys and etcd's absolute byte keys.

Rules:
- The prefix is stored without a trailing slash; an absolute key is
  `prefix + "/" + rel_key`, so "/tfcrypt/v1" never sees "/tfcrypt/v10/...".
- A relative key is handed out in the printable, reversible form of
  tfcrypt.text (valid UTF-8 as it is; other bytes, control and bidi characters
  and backslashes escaped), and `key()` reverses it: a key written by someone else, of
  any bytes, is rejected by a name that every log line, status document and terminal
  can show, and can still be deleted by that name.
- A relative key is non-empty and does not start with "/": a leading slash would make
  "nodes/a" and "/nodes/a" different keys that look the same in logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from aetcd.utils import prefix_range_end

from tfcrypt.registry.errors import BadKey
from tfcrypt.text import escape_key, excerpt, unescape_key


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _unescape(rel_key: str) -> bytes:
    try:
        return unescape_key(rel_key)
    except ValueError as exc:
        raise BadKey(str(exc)) from None


@dataclass(frozen=True)
class Keyspace:
    """The slice of etcd below one prefix."""

    prefix: str

    def __post_init__(self) -> None:
        cleaned = self.prefix.rstrip("/")
        if not cleaned.startswith("/"):
            raise ValueError(f"registry prefix must start with '/': {self.prefix!r}")
        object.__setattr__(self, "prefix", cleaned)

    @property
    def root(self) -> bytes:
        """Every absolute key of this keyspace starts with these bytes."""
        return _encode(self.prefix + "/")

    def key(self, rel_key: str) -> bytes:
        if not rel_key or rel_key.startswith("/"):
            raise BadKey("relative key must be non-empty and not start with '/': "
                         f'"{excerpt(rel_key)}"')
        return _encode(self.prefix + "/") + _unescape(rel_key)

    def sub(self, sub_prefix: str) -> bytes:
        """Absolute byte prefix of `sub_prefix` ("" is the whole keyspace)."""
        if sub_prefix.startswith("/"):
            raise BadKey(f'sub-prefix must not start with "/": "{excerpt(sub_prefix)}"')
        return self.root + _unescape(sub_prefix)

    def relative(self, key: bytes) -> str:
        root = self.root
        if not key.startswith(root):
            raise ValueError(f"key outside the registry prefix: {key!r}")
        return escape_key(key[len(root):])

    @staticmethod
    def range_end(start: bytes) -> bytes:
        return prefix_range_end(start)


def seen_prefix(prefix: str) -> str:
    """The seen-traffic keyspace beside `prefix` ("/tfcrypt/v1" -> "/tfcrypt/v1-seen"):
    flow reports (tfcrypt/model/flow.py) live outside the prefix every agent watches, so
    no agent receives every other node's reports; `tfcrypt policy plan --against-seen`
    and `tfcrypt report` read them."""
    return prefix.rstrip("/") + "-seen"
