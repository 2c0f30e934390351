"""A listing the API server answers with an error is an error, never an empty cache.

kubernetes_asyncio does not raise on an error status when the body is not preloaded
(the controller reads raw JSON); a starting kube-apiserver answers 503 with a Status
object. Read as "no pods", that listing made a controller delete every record it owned
after an API server outage (seen once in tests/test_controller_faults_lab.py). The
lister here is a stand-in: the real server's 503 window is too short to hit on purpose.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from tfcrypt.controller.kube import KindCache


class Response:
    def __init__(self, status: int, doc: Any) -> None:
        self.status = status
        self._body = json.dumps(doc).encode()

    async def read(self) -> bytes:
        return self._body

    async def json(self) -> Any:
        return json.loads(self._body)


POD = {"metadata": {"namespace": "lab", "name": "w1", "resourceVersion": "7"}}
GOOD = {"kind": "PodList", "metadata": {"resourceVersion": "9"}, "items": [POD]}
STATUS_503 = {"kind": "Status", "status": "Failure", "code": 503,
              "message": "the server is currently unable to handle the request"}


def cache_after(*answers: tuple[int, Any]) -> tuple[KindCache, list[BaseException]]:
    """A pods cache listed once per answer; the errors each later listing raised."""
    replies = list(answers)

    async def lister(**_: Any) -> Response:
        return Response(*replies.pop(0))

    cache = KindCache("pods", lister, lambda: None, Counter())
    errors: list[BaseException] = []

    async def go() -> None:
        assert await cache._list() == "9"
        for _ in replies[:]:
            try:
                await cache._list()
            except ApiException as exc:
                errors.append(exc)

    asyncio.run(go())
    return cache, errors


@pytest.mark.parametrize("status,doc,says", [
    (503, STATUS_503, "503"),
    (500, {"kind": "Status", "code": 500}, "500"),
    (200, {"kind": "Status", "code": 200}, "not a list"),
    (200, {"kind": "PodList", "items": {"x": 1}}, "not a list"),
    (200, ["not", "an", "object"], "not a list"),
])
def test_an_error_answer_keeps_the_last_listing(status: int, doc: Any, says: str) -> None:
    cache, errors = cache_after((200, GOOD), (status, doc))
    assert set(cache.objects) == {"lab/w1"}
    assert len(errors) == 1 and says in str(errors[0])


def test_an_empty_list_is_believed() -> None:
    cache, errors = cache_after((200, GOOD), (200, {"kind": "PodList", "items": []}))
    assert cache.objects == {} and errors == []
