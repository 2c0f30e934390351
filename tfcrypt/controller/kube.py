"""The controller's view of the cluster: Pods, Namespaces and EncryptionPolicies, kept by
list + watch (kubernetes_asyncio).

Rules:
- Each kind is listed whole, then watched from the list's resourceVersion; every change
  replaces the cached object (its JSON, camelCase, as the API server sent it) and wakes
  the reconciler, which recomputes everything from the caches (level-triggered).
- A watch gap (410 Gone: the server no longer holds the revision we asked for) or any
  broken watch is a full relist: the cache is replaced by the listing, so objects deleted
  during the gap disappear too. Each is counted (`resyncs`) and logged.
- The API server being down changes nothing in etcd: the caches keep the last listing,
  the reconciler keeps the records, and the loop relists when the server is back. A
  listing answered with an error status (a starting server's 503) or with something
  that is no list is an error, never an empty cache.
- `synced` is set once every kind has been listed: before that the controller writes
  nothing (an empty cache would otherwise delete every record it owns).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tfcrypt.controller import metrics

log = logging.getLogger("tfcrypt.controller")

GROUP, VERSION, PLURAL = "tfcrypt.io", "v1alpha1", "encryptionpolicies"
WATCH_TIMEOUT = 240  # seconds (--watch-timeout, whose help names it); the server ends
#   the watch, we resume from the last revision
RETRY = 2.0


def _key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class KindCache:
    """One kind's objects by `namespace/name` (or `name`), kept by list + watch."""

    def __init__(self, kind: str, lister: Callable[..., Awaitable[Any]],
                 changed: Callable[[], None], resyncs: Counter[str],
                 watch_timeout: int = WATCH_TIMEOUT) -> None:
        self.kind = kind
        self.watch_timeout = watch_timeout
        self.objects: dict[str, dict[str, Any]] = {}
        self.listed = asyncio.Event()
        self._lister = lister
        self._changed = changed
        self._resyncs = resyncs

    async def _list(self) -> str:
        resp = await self._lister(_preload_content=False)
        # Without preloading the client does not raise on an error status: a 503 from a
        # starting API server is a Status object with no items, which read as "no pods"
        # would delete every record the controller owns. The cache keeps its last listing.
        if not 200 <= resp.status <= 299:
            body = (await resp.read()).decode(errors="replace")[:300]
            raise ApiException(status=resp.status, reason=f"list {self.kind}: {body}")
        doc = await resp.json()
        if not isinstance(doc, dict) or not isinstance(doc.get("items", []), list) \
                or not str(doc.get("kind", "")).endswith("List"):
            raise ApiException(status=resp.status,
                               reason=f"list {self.kind}: not a list: {str(doc)[:300]}")
        self.objects = {_key(o): o for o in doc.get("items") or []}
        self.listed.set()
        self._changed()
        return str((doc.get("metadata") or {}).get("resourceVersion") or "")

    async def run(self) -> None:
        """List and watch forever; relist after a gap or an error."""
        reason = "start"
        while True:
            try:
                self._resyncs[f"{self.kind}:{reason}"] += 1
                metrics.RESYNCS.labels(self.kind, reason).inc()
                rv = await self._list()
                log.info("listed %d %s (%s)", len(self.objects), self.kind, reason)
                await self._watch(rv)
                reason = "watch-ended"
            except ApiException as exc:
                reason = "watch-gap" if exc.status == 410 else f"api-{exc.status}"
                log.warning("%s: %s (%s): relisting", self.kind, reason,
                            (exc.reason or "").strip())
                if exc.status != 410:
                    await asyncio.sleep(RETRY)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server unreachable, a broken stream
                reason = "error"
                log.warning("%s: %s: %s; relisting in %.0fs", self.kind,
                            type(exc).__name__, exc, RETRY)
                await asyncio.sleep(RETRY)

    async def _watch(self, rv: str) -> None:
        while True:
            w = watch.Watch(return_type="object")  # the JSON as sent, no model objects
            async with w:
                async for event in w.stream(self._lister, resource_version=rv,
                                            timeout_seconds=self.watch_timeout,
                                            allow_watch_bookmarks=True):
                    obj = event["raw_object"]
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if event["type"] == "BOOKMARK":
                        continue
                    if event["type"] == "DELETED":
                        self.objects.pop(_key(obj), None)
                    else:
                        self.objects[_key(obj)] = obj
                    self._changed()


class Cluster:
    """The three caches the controller reconciles from."""

    def __init__(self, api: client.ApiClient, changed: Callable[[], None], *,
                 watch_timeout: int | None = None) -> None:
        core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.resyncs: Counter[str] = Counter()
        w = watch_timeout or WATCH_TIMEOUT
        self.pods = KindCache("pods", core.list_pod_for_all_namespaces, changed, self.resyncs, w)
        self.namespaces = KindCache("namespaces", core.list_namespace, changed, self.resyncs, w)

        async def list_policies(**kw: Any) -> Any:
            return await self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kw)

        self.policies = KindCache(PLURAL, list_policies, changed, self.resyncs, w)
        self.kinds = (self.pods, self.namespaces, self.policies)

    @property
    def synced(self) -> bool:
        return all(k.listed.is_set() for k in self.kinds)

    async def run(self) -> None:
        await asyncio.gather(*(k.run() for k in self.kinds))

    async def patch_status(self, name: str, old: dict[str, Any] | None,
                           status: dict[str, Any]) -> None:
        """Write an EncryptionPolicy's status (the status subresource, merge patch: keys
        of the old status that the new one lacks are removed with null)."""
        body = {**{k: None for k in old or {}}, **status}
        await self.custom.patch_cluster_custom_object_status(
            GROUP, VERSION, PLURAL, name, {"status": body},
            _content_type="application/merge-patch+json")
