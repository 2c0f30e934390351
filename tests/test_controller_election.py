"""The controller's Lease fence (tfcrypt/controller/election.py): a replica writes only
while the Lease it read back names it and is fresh, and a leader frozen mid-batch stops
at its next write. The API server is a stand-in here (its Lease reads are what is under
test: a real Lease takeover is tests/test_controller_lab.py's)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes_asyncio import client

from tfcrypt.controller import election
from tfcrypt.controller.run import NotLeader


class FakeCoordination:
    def __init__(self, holder: str, renewed: dt.datetime) -> None:
        self.lease = SimpleNamespace(spec=SimpleNamespace(holder_identity=holder,
                                                          renew_time=renewed))

    async def read_namespaced_lease(self, name: str, namespace: str) -> Any:
        return self.lease


def elector(holder: str, renewed_ago: float) -> election.Elector:
    async def make() -> election.Elector:
        e = election.Elector(client.ApiClient(), "tfcrypt-system", "l", me="ctl-a")
        renewed = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=renewed_ago)
        e.coordination = FakeCoordination(holder, renewed)  # type: ignore[assignment]
        e.leading.set()
        return e
    return asyncio.run(make())


def test_a_fresh_lease_naming_us_lets_writes_through_until_it_would_expire() -> None:
    e = elector("ctl-a", renewed_ago=2)
    asyncio.run(e.check())
    e.fence()  # no raise: the check vouches for us
    left = e.valid_until - time.time()
    assert election.LEASE_DURATION - election.FENCE_MARGIN - 2 - 1 < left <= \
        election.LEASE_DURATION - election.FENCE_MARGIN - 2


@pytest.mark.parametrize("holder,ago", [("ctl-b", 1), ("ctl-a", election.LEASE_DURATION)])
def test_a_lease_naming_another_or_too_old_stops_the_batch(holder: str, ago: float) -> None:
    e = elector(holder, renewed_ago=ago)
    with pytest.raises(NotLeader):
        asyncio.run(e.check())
    with pytest.raises(NotLeader):
        e.fence()


def test_a_leader_that_wakes_after_its_lease_ran_out_writes_nothing_more() -> None:
    e = elector("ctl-a", renewed_ago=2)
    asyncio.run(e.check())
    e.valid_until = time.time() - 0.01  # as if frozen (SIGSTOP) past the Lease's end
    with pytest.raises(NotLeader, match="another replica may lead"):
        e.fence()
