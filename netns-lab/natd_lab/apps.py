"""Tiny network applications for labs, demos and tests, run inside a node with Lab.popen/Lab.exec.

The server answers every TCP connection and UDP datagram with the peer address it saw ("ip:port"), which
is what a NAT test wants to know: the address the internet sees for a private host.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from .lab import Lab

# Answers each TCP connection / UDP datagram with "ip:port" of the peer it sees.
PEER_ECHO = r"""
import socket, sys, threading
addr, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((addr, uport))
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
threading.Thread(target=udp, daemon=True).start()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, tport)); s.listen(512)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    try:
        c.sendall(f"{peer[0]}:{peer[1]}\n".encode())
    finally:
        c.close()
"""

# Connects (optionally from a fixed local port) and prints what the server said.
TCP_ASK = r"""
import socket, sys
s = socket.socket()
if len(sys.argv) > 3:
    s.bind(("", int(sys.argv[3])))
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
print(s.recv(200).decode().strip())
"""

# Sends one datagram (up to three tries) and prints the answer.
UDP_ASK = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
for attempt in range(3):
    u.sendto(b"hi", (sys.argv[1], int(sys.argv[2])))
    try:
        print(u.recv(200).decode()); break
    except TimeoutError:
        continue
else:
    sys.exit("no UDP answer")
"""


# Connects to argv[1]:argv[2], reads until the server closes, prints the byte count.
TCP_RECEIVER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
got = 0
while True:
    b = s.recv(65536)
    if not b:
        break
    got += len(b)
print(got)
"""


# Answers each datagram with the source address:port it saw (a minimal STUN binding response).
UDP_REFLECTOR = r"""
import socket, sys, threading
def serve(addr, port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((addr, port))
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
for spec in sys.argv[1:]:
    a, p = spec.rsplit(":", 1)
    threading.Thread(target=serve, args=(a, int(p)), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# One UDP socket (fixed local port) asks several reflectors what they see.
STUN_CLIENT = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
u.bind(("", int(sys.argv[1])))
for spec in sys.argv[2:]:
    a, p = spec.rsplit(":", 1)
    for _ in range(3):
        u.sendto(b"binding", (a, int(p)))
        try:
            print(u.recvfrom(200)[0].decode()); break
        except TimeoutError:
            continue
    else:
        print("timeout")
"""

# Accepts and keeps every connection, telling each client how it saw it.
TCP_HOLDER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(512)
print("ready", flush=True)
held = []
while True:
    c, peer = s.accept()
    c.sendall(f"{peer[0]}:{peer[1]}\n".encode()); held.append(c)
"""

# ICMP queries from a raw socket: argv[1] the type (8 echo, 13 timestamp), argv[2] the identifier, then one
# destination per argument (sequence number 1, 2, ...). Up to three tries each; prints "dst id seq" of the
# reply (the matching reply type, from dst, with our sequence number and a valid checksum) or "dst timeout".
ICMP_QUERY = r"""
import socket, struct, sys, time
qtype, ident = int(sys.argv[1]), int(sys.argv[2])
rtype = {8: 0, 13: 14}[qtype]
def csum(b):
    b += b"\x00" * (len(b) & 1)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s & 0xFFFF) + (s >> 16); s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(0.5)
for seq, dst in enumerate(sys.argv[3:], 1):
    body = struct.pack("!III", 1000, 0, 0) if qtype == 13 else b"natd-icmp-query"
    msg = struct.pack("!BBHHH", qtype, 0, 0, ident, seq) + body
    msg = msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
    got = None
    for _ in range(3):
        s.sendto(msg, (dst, 0))
        deadline = time.monotonic() + 1
        while got is None and time.monotonic() < deadline:
            try:
                pkt, (src, _) = s.recvfrom(2048)
            except TimeoutError:
                continue
            ihl = (pkt[0] & 0xF) * 4
            t, _c, _k, rid, rseq = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
            if src == dst and t == rtype and rseq == seq and csum(pkt[ihl:]) == 0:
                got = rid
        if got is not None:
            break
    print(dst, got, seq) if got is not None else print(dst, "timeout")
"""

# A raw ICMP socket sees a copy of every echo request the node gets (the kernel still answers it): prints
# the source and identifier of the first one, waiting at most argv[1] seconds.
ECHO_SNIFFER = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(0.5)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        pkt, (src, _) = s.recvfrom(2048)
    except TimeoutError:
        continue
    ihl = (pkt[0] & 0xF) * 4
    if pkt[ihl] == 8:
        print(src, struct.unpack("!H", pkt[ihl + 4:ihl + 6])[0], flush=True)
        break
"""


def start_udp_reflector(lab: Lab, node: str, *endpoints: str) -> subprocess.Popen[Any]:
    """UDP_REFLECTOR on node for each "addr:port"; waits until it listens; lab.down() ends it."""
    proc = lab.popen(node, [sys.executable, "-c", UDP_REFLECTOR, *endpoints], stdout=-1, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"the UDP reflector on {node} did not start (said {line!r})")
    return proc


def start_peer_echo(lab: Lab, node: str, tcp_port: int, udp_port: int | None = None,
                    addr: str | None = None) -> subprocess.Popen[Any]:
    """Start PEER_ECHO on node (its first address unless addr), wait until it listens; lab.down() ends it."""
    proc = lab.popen(node, [sys.executable, "-c", PEER_ECHO, addr or lab.addr(node), str(tcp_port),
                            str(udp_port if udp_port is not None else tcp_port)], stdout=-1, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"the echo server on {node} did not start (said {line!r})")
    return proc


def tcp_ask(lab: Lab, node: str, host: str, port: int, local_port: int | None = None,
            timeout: float = 15) -> str:
    """What the server at host:port saw node's connection come from."""
    args = [sys.executable, "-c", TCP_ASK, host, str(port)] + ([str(local_port)] if local_port else [])
    return lab.exec(node, args, timeout=timeout).stdout.strip()


def udp_ask(lab: Lab, node: str, host: str, port: int, timeout: float = 15) -> str:
    return lab.exec(node, [sys.executable, "-c", UDP_ASK, host, str(port)], timeout=timeout).stdout.strip()
