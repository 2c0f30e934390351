"""The kernel's flow accounting, read back: `nft -j list set inet tfcrypt seen_*`.

Rules of this module:
- Pure: no I/O. The input is one flow set's listing; the output is one `FlowSample` per
  element, with the element's cumulative counter (deltas are the flow table's job,
  tfcrypt/core/flow_table.py).
- An element that is not of the set's declared shape (nft spelling a protocol we do not
  expect, a hand-added element) is skipped and counted in `skipped`, never an error: the
  flow records are evidence, and one odd element must not cost the others.
- An element's `expires` is its timeout less the time since its last packet (every
  packet's `update` re-arms it), so a sample carries `idle`: the flow's last packet was
  that long before the read, to nft's one-second resolution.
- `full` says the set holds `size` elements: new flows are then not counted by the
  kernel until old ones time out, and the agent reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tfcrypt.dataplane.nft_table import FLOW_KINDS, Fam, Json, flow_sets
from tfcrypt.model.flow import FlowSample, canonical_address, proto_number

FLOW_SET_SHAPES = {name: (kind, fam, ports) for name, kind, fam, ports in flow_sets()}


@dataclass
class FlowSetListing:
    samples: list[FlowSample]
    size: int | None
    skipped: int = 0

    @property
    def full(self) -> bool:
        return self.size is not None and len(self.samples) + self.skipped >= self.size


def _proto(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    if isinstance(value, str):
        try:
            return proto_number(value)
        except ValueError:
            return None
    return None


def _address(value: object, fam: Fam) -> str | None:
    """The canonical address, if it is one of the set's family."""
    found = canonical_address(value)
    return found if found is not None and (":" in found) == (fam.suffix == "v6") else None


def _sample(kind: str, fam: Fam, ports: bool, elem: object,
            timeout: float | None) -> FlowSample | None:
    if not isinstance(elem, dict) or not isinstance(elem.get("elem"), dict):
        return None
    body = elem["elem"]
    parts, counter = (body.get("val") or {}).get("concat"), body.get("counter")
    want = 3 + ports + (kind != "drop")
    if not isinstance(parts, list) or len(parts) != want or not isinstance(counter, dict):
        return None
    src, dst, proto = _address(parts[0], fam), _address(parts[1], fam), _proto(parts[2])
    dport = parts[3] if ports else None
    iface = parts[-1] if kind != "drop" else None
    packets, nbytes = counter.get("packets"), counter.get("bytes")
    if (src is None or dst is None or proto is None
            or (ports and (not isinstance(dport, int) or not 0 <= dport <= 65535))
            or (kind != "drop" and not isinstance(iface, str))
            or not isinstance(packets, int) or not isinstance(nbytes, int)):
        return None
    expires = body.get("expires")
    idle = 0.0
    if timeout is not None and isinstance(expires, int | float) and 0 <= expires <= timeout:
        idle = float(timeout - expires)
    return FlowSample(kind, src, dst, proto, dport, iface, packets, nbytes, idle)


def parse_flow_set(name: str, listing: Json) -> FlowSetListing:
    """The samples of flow set `name` in `nft -j list set inet tfcrypt <name>` output."""
    kind, fam, ports = FLOW_SET_SHAPES[name]
    assert kind in FLOW_KINDS
    out = FlowSetListing([], None)
    for entry in listing.get("nftables", []):
        obj = entry.get("set") if isinstance(entry, dict) else None
        if not isinstance(obj, dict) or obj.get("name") != name:
            continue
        size, timeout = obj.get("size"), obj.get("timeout")
        out.size = size if isinstance(size, int) else None
        for elem in obj.get("elem", []):
            sample = _sample(kind, fam, ports, elem,
                             timeout if isinstance(timeout, int | float) else None)
            if sample is None:
                out.skipped += 1
            else:
                out.samples.append(sample)
    return out
