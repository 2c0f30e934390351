"""Put, get and watch one key with aetcd; run INSIDE a lab namespace (ip netns exec).

Usage: etcd_kv.py ENDPOINTS KEY VALUE, ENDPOINTS = comma-separated http://ip:port.
Tries the endpoints in order (a killed member must not fail the run), prints one JSON
line {"endpoint", "get", "watched"} and exits 0, or prints the error and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import urlsplit

import aetcd


async def _use(host: str, port: int, key: bytes, value: bytes) -> dict[str, str]:
    async with aetcd.Client(host=host, port=port, timeout=5, connect_wait_timeout=2) as client:
        await client.get(b"/probe")
        watch = await client.watch(key)
        await client.put(key, value)
        got = await client.get(key)
        watched = b""
        async for event in watch:
            watched = event.kv.value
            break
        await watch.cancel()
        return {"endpoint": f"{host}:{port}", "get": got.value.decode() if got else "",
                "watched": watched.decode()}


async def main(endpoints: str, key: str, value: str) -> int:
    errors = []
    for url in endpoints.split(","):
        parts = urlsplit(url)
        try:
            result = await asyncio.wait_for(
                _use(parts.hostname or "", parts.port or 2379, key.encode(), value.encode()),
                timeout=20)
        except Exception as e:
            errors.append(f"{url}: {type(e).__name__}: {e}")
            continue
        print(json.dumps(result))
        return 0
    print("; ".join(errors))
    return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:4])))
