"""Echo TCP and UDP on a port and, at the same time, exchange with a peer's echo.

Usage: flow.py LISTEN_PORT PEER_IP PEER_PORT LOG INTERVAL. Run INSIDE a lab workload
(its exec prefix). Every INTERVAL it does one TCP exchange (a new connection: a fault
that resets connections must not hide behind a stuck one) and one UDP exchange, each
with a short timeout, and appends `<proto> <unix time>` to LOG for each echo that came
back intact. Failures are not logged: the harness reasons on successes over time.
"""

from __future__ import annotations

import os
import socket
import socketserver
import sys
import threading
import time

TIMEOUT = 0.5


class _TcpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(2)
        data = self.request.recv(256)
        if data:
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def udp_echo(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        data, addr = s.recvfrom(256)
        s.sendto(data, addr)


def tcp_once(peer: tuple[str, int], payload: bytes) -> bool:
    try:
        with socket.create_connection(peer, timeout=TIMEOUT) as c:
            c.settimeout(TIMEOUT)
            c.sendall(payload)
            return c.recv(256) == payload
    except OSError:
        return False


def udp_once(s: socket.socket, peer: tuple[str, int], payload: bytes) -> bool:
    try:
        s.sendto(payload, peer)
        deadline = time.monotonic() + TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            data, _ = s.recvfrom(256)
            if data == payload:
                return True
    except OSError:
        pass
    return False


def main() -> None:
    port, peer_ip, peer_port, log, interval = sys.argv[1:6]
    peer = (peer_ip, int(peer_port))
    server = _Server(("0.0.0.0", int(port)), _TcpEcho)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Thread(target=udp_echo, args=(int(port),), daemon=True).start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seq = 0
    with open(log, "a", buffering=1) as out:
        while True:
            started = time.monotonic()
            for proto in ("tcp", "udp"):
                seq += 1
                payload = f"{os.getpid()}:{seq}".encode()
                ok = (tcp_once(peer, payload) if proto == "tcp"
                      else udp_once(udp, peer, payload))
                if ok:
                    out.write(f"{proto} {time.time():.6f}\n")
            time.sleep(max(0.0, float(interval) - (time.monotonic() - started)))


if __name__ == "__main__":
    main()
