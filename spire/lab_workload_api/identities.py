"""The current X509-SVID of each registered SPIFFE ID, and its rotation.

Rules:
- one `IdentitySource` per distinct SPIFFE ID; sockets registered with the same ID share
  it (as spire-agent hands one SVID per registration entry to every matching caller);
- rotation follows SPIRE: the next SVID is issued at issued_at + ttl * (0.5 + U(0, 0.1)),
  i.e. at half-life plus up to 10% of the TTL as jitter, so identities issued together
  do not all rotate in the same instant; each identity schedules its own rotation;
- the schedule is measured on the monotonic clock from the moment of issuance, so a wall
  clock step does not stall or burst rotations;
- logs carry the SPIFFE ID, serial and expiry, never key material.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random

from lab_workload_api.ca import IssuedSVID, LabCA
from lab_workload_api.versioned import Versioned

log = logging.getLogger("lab_workload_api")

ROTATION_AT = 0.5
ROTATION_JITTER = 0.1


def rotation_delay(ttl_seconds: float, rng: random.Random) -> float:
    """Seconds from issuance to the next rotation: ttl * (0.5 + U(0, 0.1))."""
    return ttl_seconds * (ROTATION_AT + rng.uniform(0.0, ROTATION_JITTER))


class IdentitySource:
    """Issues the SVID of one SPIFFE ID and re-issues it before it expires.

    Pitfall: `svid` must exist before any server listens, so the first SVID is issued in
    the constructor; `run` only does rotations.
    """

    def __init__(self, spiffe_id: str, ca: LabCA, ttl_seconds: float,
                 rng: random.Random | None = None) -> None:
        self.spiffe_id = spiffe_id
        self._ca = ca
        self._ttl_seconds = ttl_seconds
        self._rng = rng or random.Random()
        self._issued_at = 0.0
        self.svid: Versioned[IssuedSVID] = Versioned(self._issue("svid issued"))

    def _issue(self, event: str) -> IssuedSVID:
        svid = self._ca.issue(self.spiffe_id, dt.timedelta(seconds=self._ttl_seconds))
        self._issued_at = asyncio.get_running_loop().time()
        log.info("%s spiffe_id=%s serial=%x not_after=%s", event, self.spiffe_id,
                 svid.leaf.serial_number, svid.leaf.not_valid_after_utc.isoformat())
        return svid

    async def run(self) -> None:
        """Rotate forever; cancelled by the server on shutdown."""
        loop = asyncio.get_running_loop()
        while True:
            due = self._issued_at + rotation_delay(self._ttl_seconds, self._rng)
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self.svid.publish(self._issue("svid rotated"))
