"""Reading files and YAML from outside the process: bounded, strict, one line per problem.

Every YAML or small text file tfcrypt reads (policy files, the --config file, the lab's
inventory and tag files) goes through here, so the rules hold everywhere:
- A file is read at most `max_bytes + 1` bytes (default MAX_FILE_BYTES); a longer one is
  refused without being read whole. Text must be UTF-8.
- Duplicate keys in a mapping are refused. YAML says keys are unique, but PyYAML keeps
  the last one silently: `mode: audit` then `mode: enforce` would enforce.
- Anchors and aliases are allowed (PyYAML's own dumper writes them for shared values),
  but the document is weighed while it is composed, before anything is constructed:
  every alias counts as a full copy of what it names, and more than MAX_NODES nodes is
  refused. A small alias graph ("billion laughs") would otherwise expand exponentially in
  whatever walks the result (validation, repr in an error message).
- Nesting deeper than MAX_DEPTH is refused: PyYAML recurses once per level, and a deep
  document would otherwise end in RecursionError.
- Every problem is a ConfigError with one line, `<source>: <problem>`, naming the line and
  column where YAML has them; a value it quotes is cut to `excerpt()`.
PyYAML stays the parser (its SafeLoader, subclassed): only the checks are ours.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from tfcrypt.errors import ConfigError

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a signed policy must fit 64 KiB; comments are not that long
MAX_DEPTH = 64            # a policy document nests 6 deep, a config file 2
MAX_NODES = 200_000       # a signable policy has < 10,000; an alias bomb has billions
MAX_EXCERPT = 120         # characters of a quoted value in an error message


class InputError(ConfigError):
    """A file or document that cannot be read; the message is one line naming the source."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxset = _REPR.maxfrozenset = 4
_REPR.maxstring = _REPR.maxother = MAX_EXCERPT


def excerpt(value: object, limit: int = MAX_EXCERPT) -> str:
    """`repr(value)`, cut to `limit` characters: an error message never echoes a big value.

    reprlib walks only the few items it shows, so a huge structure costs nothing."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(message: str, limit: int = 400) -> str:
    """`message` on one line, at most `limit` characters."""
    flat = " ".join(message.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


class StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses duplicate keys, deep nesting and documents that
    alias expansion would make larger than MAX_NODES."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._weights: dict[int, int] = {}  # id(node) -> nodes once aliases expand

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # PyYAML's stubs leave it untyped
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH}",
                                    event.start_mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(event, yaml.AliasEvent):
            return node  # already weighed; the parent counts it once more per use
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
            else [])
        weight = 1 + sum(self._weights.get(id(c), 1) for c in children)
        if weight > MAX_NODES:
            raise ComposerError(None, None, f"more than {MAX_NODES} nodes once aliases are "
                                "expanded", event.start_mark)
        self._weights[id(node)] = weight
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: the base class says so
                    continue
                if duplicate:
                    raise ConstructorError(None, None, f"duplicate key {excerpt(key)}",
                                           key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load(text: str, source: str) -> Any:
    """The one YAML document in `text`, or InputError `source: problem (line N, column M)`."""
    loader: StrictLoader | None = None
    try:
        loader = StrictLoader(text)  # the reader checks the characters here already
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = exc.problem or exc.context or "not valid YAML"
        raise InputError(one_line(f"{source}: not valid YAML{where}: {problem}")) from None
    except yaml.YAMLError as exc:  # ReaderError: a character YAML does not allow
        raise InputError(one_line(f"{source}: not valid YAML: {exc}")) from None
    except RecursionError:
        raise InputError(f"{source}: not valid YAML: nested too deep") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text(path: str | Path, *, what: str = "", noun: str = "file",
              max_bytes: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of `path`, read at most `max_bytes + 1` bytes; else InputError.

    `what` prefixes the source in messages (e.g. `-f`), `noun` names the kind of file."""
    source = f"{what} {path}".strip()
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{source}: cannot read the {noun}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise InputError(f"{source}: the {noun} is larger than {max_bytes} bytes: refused")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: the {noun} is not UTF-8 text (byte "
                         f"{data[exc.start]:#04x} at offset {exc.start})") from None


def load_file(path: str | Path, *, what: str = "", noun: str = "file",
              max_bytes: int = MAX_FILE_BYTES) -> Any:
    """`load(read_text(path))`, with the same one-line errors."""
    text = read_text(path, what=what, noun=noun, max_bytes=max_bytes)
    return load(text, f"{what} {path}".strip())
