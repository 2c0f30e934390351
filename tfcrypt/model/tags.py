"""Tags: Tungsten Fabric's `type=value` labels that encryption policies select workloads by.

Rules (DESIGN.md, "Policy model"):
- A tag is written `type=value`. The type is lowercased; the value keeps its case
  (`Site=Paris` and `site=Paris` are the same tag, `site=paris` is another).
- Every type holds ONE value per workload (application, tier, deployment, site and any
  custom type), except `label`, which holds many. A workload given two values of a
  single-valued type is refused: TF resolves inheritance before we see the tags, so two
  values means the inventory is wrong, and guessing one would silently change selection.
- Types are short identifiers (`[a-z][a-z0-9_-]*`, at most 63 characters); values are
  1-255 printable characters without whitespace or commas (commas separate tags on the
  command line). A value may contain `=`: only the first one splits type from value.
- Errors are ValueError whose message starts with the offending text, so callers can
  prefix a field path.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

LABEL = "label"
WELL_KNOWN_TYPES = ("application", "tier", "deployment", "site", LABEL)
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_VALUE_RE = re.compile(r"^[^\s,\x00-\x1f\x7f]{1,255}$")


@dataclass(frozen=True, order=True)
class Tag:
    """One `type=value`; construct with `Tag.parse` or `Tag(type, value)` (type is lowercased)."""

    type: str
    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not isinstance(self.value, str):
            raise ValueError(f"{self.type!r}={self.value!r}: type and value must be strings")
        object.__setattr__(self, "type", self.type.lower())
        if not _TYPE_RE.fullmatch(self.type):
            raise ValueError(f"{self.type!r}: a tag type is a short identifier "
                             "([a-z][a-z0-9_-]*)")
        if not _VALUE_RE.fullmatch(self.value):
            raise ValueError(f"{self.type}={self.value!r}: a tag value is 1-255 printable "
                             "characters without spaces or commas")

    @classmethod
    def parse(cls, text: object) -> Tag:
        """`type=value` -> Tag; ValueError for anything else."""
        if not isinstance(text, str):
            raise ValueError(f"{text!r}: a tag is a string type=value")
        kind, sep, value = text.partition("=")
        if not sep:
            raise ValueError(f"{text!r}: a tag is type=value")
        return cls(kind, value)

    @property
    def single_valued(self) -> bool:
        return self.type != LABEL

    def __str__(self) -> str:
        return f"{self.type}={self.value}"


def check_single_values(tags: Iterable[Tag]) -> None:
    """ValueError naming the type if a single-valued type carries two values."""
    seen: dict[str, str] = {}
    for tag in sorted(tags):
        if not tag.single_valued:
            continue
        if tag.type in seen:
            raise ValueError(f"{tag.type}: one value per workload, got "
                             f"{seen[tag.type]!r} and {tag.value!r}")
        seen[tag.type] = tag.value


@functools.lru_cache(maxsize=1 << 14)
def _parse_text(text: str) -> Tag:
    """`Tag.parse`, one shared Tag per distinct text: a cluster has a few hundred distinct
    tags over 100,000 records, and a Tag (with its lower-cased type) per record and tag
    was ~30 MiB of the agent at that scale (C4). A refused text raises, not cached."""
    return Tag.parse(text)


def parse_tags(texts: Iterable[object]) -> frozenset[Tag]:
    """Tags from `type=value` strings (Tags pass through), single values checked.

    ValueError messages are a path suffix: `[i]: ...` for the offending position, `: ...`
    for the list as a whole, so a caller writes f"tags{e}".
    """
    if isinstance(texts, str):
        raise ValueError(": a list of type=value strings, not one string")
    tags: set[Tag] = set()
    for i, text in enumerate(texts):
        try:
            tags.add(text if isinstance(text, Tag) else
                     _parse_text(text) if isinstance(text, str) else Tag.parse(text))
        except ValueError as e:
            raise ValueError(f"[{i}]: {e}") from None
    try:
        check_single_values(tags)
    except ValueError as e:
        raise ValueError(f": {e}") from None
    return frozenset(tags)


def sorted_tag_texts(tags: Iterable[Tag]) -> list[str]:
    """The canonical written form of a tag set: sorted `type=value` strings."""
    return [str(t) for t in sorted(tags)]
