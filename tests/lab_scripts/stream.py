"""One long-lived TCP connection carrying numbered lines, to follow a flow across changes.

Usage, INSIDE a lab workload (its exec prefix):
  stream.py serve PORT          accept one connection, read to EOF, print one JSON line
                                {"lines": N, "in_order": bool} and exit
  stream.py send IP PORT STOP   connect once, send "<seq>\\n" every 20 ms until the file
                                STOP exists, then close; exit 1 if the connection broke
The harness starts `serve`, then `send`, changes what it wants to change while the one
connection stays open, then creates STOP: "in_order" says every line arrived, once and in
order, over that single connection (a reset or a reconnect would break the count).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def serve(port: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as listener:
        print("listening", flush=True)
        conn, _ = listener.accept()
        data = b""
        with conn:
            while chunk := conn.recv(65536):
                data += chunk
    seqs = [int(x) for x in data.decode().split()]
    print(json.dumps({"lines": len(seqs), "in_order": seqs == list(range(len(seqs)))}),
          flush=True)


def send(ip: str, port: int, stop: str) -> None:
    seq = 0
    with socket.create_connection((ip, port), timeout=5) as conn:
        while not os.path.exists(stop):
            conn.sendall(f"{seq}\n".encode())
            seq += 1
            time.sleep(0.02)
    print(json.dumps({"sent": seq}), flush=True)


def main() -> None:
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        send(sys.argv[2], int(sys.argv[3]), sys.argv[4])


if __name__ == "__main__":
    main()
