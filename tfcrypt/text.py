"""Text that came from etcd, made safe to print: keys escaped reversibly, excerpts short.

Rules:
- A key under the prefix may hold any bytes: invalid UTF-8, control characters, a
  right-to-left override (U+202E) that makes a log line read backwards. The registry
  hands consumers every key in one printable form, `escape_key(raw)`, so nothing later
  (logging, status JSON, status.json, the CLI, f-strings) can fail to encode it or be
  fooled by it: valid UTF-8 stays as it is, except that a backslash is doubled; a byte
  that is not UTF-8 reads `\\xNN`; a non-printable character (Unicode's own
  `str.isprintable`: controls, format characters such as the bidi overrides, line and
  paragraph separators, unassigned code points) reads `\\xNN` below U+0080, else
  `\\uXXXX` or `\\UXXXXXXXX`.
- The form is reversible (`unescape_key`), so a key written by someone else can still be
  deleted by the name it was shown under. Every key tfcrypt itself writes is printable
  ASCII without a backslash and is its own escaped form.
- `excerpt(text)` is for showing, never for identity: the same character escaping (not
  reversible: a backslash stays single) and at most `limit` characters, so a 1 MiB key or
  value cannot make a 1 MiB log line.
"""

from __future__ import annotations

EXCERPT = 120  # characters of a key or a message shown in a log line, status or the CLI


def _escaped_char(c: str) -> str:
    n = ord(c)
    if n < 0x80:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"


def escape_key(raw: bytes) -> str:
    """The printable, reversible form of the key bytes `raw`."""
    text = raw.decode("utf-8", "surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to do
    out = []
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif 0xDC80 <= ord(c) <= 0xDCFF:  # a byte surrogateescape could not decode
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(_escaped_char(c))
    return "".join(out)


_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


def unescape_key(text: str) -> bytes:
    """The key bytes that `escape_key` showed as `text`; ValueError on a bad escape."""
    if "\\" not in text:
        return text.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("utf-8", "surrogateescape")
            i += 1
            continue
        kind = text[i + 1: i + 2]
        if kind == "\\":
            out += b"\\"
            i += 2
            continue
        width = _HEX_DIGITS.get(kind)
        digits = text[i + 2: i + 2 + width] if width else ""
        if not width or len(digits) != width or not all(
                d in "0123456789abcdefABCDEF" for d in digits):
            raise ValueError(f"bad escape at character {i} of key \"{excerpt(text)}\"")
        n = int(digits, 16)
        if kind == "x":
            out.append(n)
        elif n > 0x10FFFF or 0xD800 <= n <= 0xDFFF:
            raise ValueError(f"bad code point at character {i} of key \"{excerpt(text)}\"")
        else:
            out += chr(n).encode("utf-8")
        i += 2 + width
    return bytes(out)


def printable(text: str) -> str:
    """`text` with every non-printable character escaped (not reversible: for showing)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   (f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                    else _escaped_char(c))
                   for c in text)


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """`text` cut to `limit` characters, with non-printable characters escaped."""
    if len(text) > limit:
        return printable(text[:limit]) + f"... ({len(text) - limit} more characters)"
    return printable(text)
