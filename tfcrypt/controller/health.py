"""The controller's HTTP endpoint: /metrics (Prometheus), /healthz and /readyz (probes).

Rules (docs/controller.md "Probes"):
- /healthz (liveness) answers 200 while the reconcile loop is turning: every loop
  iteration, synced or not, leader or not, calls `beat()`, and an iteration starts at
  least every RESYNC seconds (10). No beat for STALL seconds means the loop is wedged
  (a pass stuck on a call that never returns): 503, and the kubelet restarts the pod.
  Before the first beat the start time counts, so a start that hangs also fails.
  A failing pass (etcd down) still beats: restarting cannot bring etcd back.
- /readyz (readiness) answers 200 once Pods, Namespaces and EncryptionPolicies have all
  been listed, leader or not. A follower is ready too: it is a warm standby that takes
  over within one Lease duration, and with leader-only readiness a rolling update could
  never complete (the new pod cannot lead while the old one holds the Lease) and the
  PodDisruptionBudget would count the standby as down.
- The body is one line saying why; the server runs in a daemon thread and only reads
  two values the event loop writes (a float and a bool-returning callable), so a busy
  loop cannot block a probe and a probe cannot disturb the loop.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

STALL = 90.0  # seconds without a loop iteration before /healthz fails (RESYNC is 10)
PATHS = ("/metrics", "/healthz", "/readyz")


class Health:
    """What the probes ask about; `beat()` and `ready` are set by the controller."""

    def __init__(self, stall: float = STALL, clock: Callable[[], float] = time.monotonic,
                 ready: Callable[[], bool] | None = None) -> None:
        self.stall = stall
        self.clock = clock
        self.started = clock()
        self.last_beat: float | None = None
        self.ready: Callable[[], bool] = ready or (lambda: False)

    def beat(self) -> None:
        self.last_beat = self.clock()

    def live(self) -> tuple[bool, str]:
        since = self.last_beat if self.last_beat is not None else self.started
        age = self.clock() - since
        what = "last loop iteration" if self.last_beat is not None else "started, no loop yet,"
        if age > self.stall:
            return False, f"wedged: {what} {age:.0f}s ago (limit {self.stall:.0f}s)"
        return True, f"ok: {what} {age:.0f}s ago"

    def readiness(self) -> tuple[bool, str]:
        try:
            ready = bool(self.ready())
        except Exception as exc:  # a probe must answer, whatever the controller's state
            return False, f"not ready: {type(exc).__name__}: {exc}"
        if ready:
            return True, "ok: pods, namespaces and encryptionpolicies listed"
        return False, "not ready: the cluster is not listed yet"


def _handler(health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype, code = generate_latest(REGISTRY), CONTENT_TYPE_LATEST, 200
            elif path in ("/healthz", "/readyz"):
                ok, why = health.live() if path == "/healthz" else health.readiness()
                body, ctype, code = (why + "\n").encode(), "text/plain", 200 if ok else 503
            else:
                body, ctype, code = b"not found: /metrics, /healthz, /readyz\n", \
                    "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would flood the log

    return Handler


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(host: str, port: int, health: Health) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; returns the server (has shutdown())."""
    server_class = _Server6 if ":" in host else ThreadingHTTPServer
    server = server_class((host, port), _handler(health))
    threading.Thread(target=server.serve_forever, name="tfcrypt-controller-http",
                     daemon=True).start()
    return server
