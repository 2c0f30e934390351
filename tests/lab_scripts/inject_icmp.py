"""Send ICMP echo requests with a forged source, in plaintext, out of one interface.

Usage: inject_icmp.py SRC DST IFNAME COUNT. Run INSIDE a lab node (its exec prefix): the
packets are built by hand (IP_HDRINCL; for IPv6 a raw IPPROTO_RAW socket, which takes the
IPv6 header from us), so they carry a workload's source address without passing through
that node's classification, as an attacker on the underlay would send. IPv6 addresses
give ICMPv6 echo requests.
"""

from __future__ import annotations

import socket
import struct
import sys
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def packet(src: str, dst: str, seq: int) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, 0x7466, seq) + b"tfcrypt-inject"
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), seq, 0, 64,
                         socket.IPPROTO_ICMP, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return header + body


def packet6(src: str, dst: str, seq: int) -> bytes:
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    body = struct.pack("!BBHHH", 128, 0, 0, 0x7466, seq) + b"tfcrypt-inject"
    pseudo = s + d + struct.pack("!I3xB", len(body), socket.IPPROTO_ICMPV6)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    header = struct.pack("!IHBB16s16s", 6 << 28, len(body), socket.IPPROTO_ICMPV6, 64, s, d)
    return header + body


def main(src: str, dst: str, ifname: str, count: int) -> int:
    v6 = ":" in dst
    family, build = (socket.AF_INET6, packet6) if v6 else (socket.AF_INET, packet)
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        for seq in range(count):
            s.sendto(build(src, dst, seq), (dst, 0))
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
