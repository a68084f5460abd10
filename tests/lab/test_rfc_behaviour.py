"""NAT behaviour that real applications depend on, tested the way a STUN client (RFC 5780-style) and a
hole-punching peer see it: endpoint-independent mapping (RFC 4787 REQ-1, RFC 5382 REQ-1), filtering
(RFC 4787 REQ-8) and UDP hole punching between two NATed sites."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from natd_lab.apps import STUN_CLIENT, start_udp_reflector

pytestmark = pytest.mark.lab

# Sends from the reflector's port to a given external endpoint (a third party that was never asked).
POKE = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
a, p = sys.argv[1].rsplit(":", 1)
for _ in range(5):
    u.sendto(b"unsolicited", (a, int(p)))
"""

# Asks a reflector for its mapping, then waits for anything else on the same socket.
LISTEN_AFTER_BINDING = r"""
import socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
u.bind(("", int(sys.argv[1])))
a, p = sys.argv[2].rsplit(":", 1)
u.sendto(b"binding", (a, int(p)))
print(u.recvfrom(200)[0].decode(), flush=True)
end = time.monotonic() + float(sys.argv[3])
got = 0
while time.monotonic() < end:
    try:
        data, peer = u.recvfrom(200)
        if data == b"unsolicited":
            got += 1
    except TimeoutError:
        pass
print(got, flush=True)
"""


def nat_config(**rule: str) -> dict[str, Any]:
    return {"inside": ["in1", "in2"], "outside": "out0",
            "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999", **rule}]}


@pytest.mark.parametrize("local_port", [25001, 40001], ids=["port-in-range", "port-outside-range"])
def test_endpoint_independent_mapping(lab: Any, natd_factory: Any, local_port: int) -> None:
    """RFC 4787 REQ-1: one inside ip:port keeps one external ip:port for every destination (three
    server endpoints: two ports of srv1, one of srv2), also when the port itself cannot be kept."""
    natd_factory(lab, nat_config())
    srv1, srv2 = lab.addr("srv1"), lab.addr("srv2")
    start_udp_reflector(lab, "srv1", f"{srv1}:3478", f"{srv1}:3479")
    start_udp_reflector(lab, "srv2", f"{srv2}:3478")
    seen = lab.exec("host1", [sys.executable, "-c", STUN_CLIENT, str(local_port), f"{srv1}:3478",
                              f"{srv1}:3479", f"{srv2}:3478"], timeout=30).stdout.split()
    assert len(seen) == 3 and "timeout" not in seen
    assert len(set(seen)) == 1, f"mapping changed with the destination: {seen}"
    ip, port = seen[0].split(":")
    assert ip == lab.addr("gw", "out0")
    assert int(port) == local_port if 20000 <= local_port <= 29999 else 20000 <= int(port) <= 29999


def test_address_and_port_dependent_mapping_when_configured(lab: Any, natd_factory: Any) -> None:
    natd_factory(lab, nat_config(mapping="address-and-port-dependent"))
    srv1, srv2 = lab.addr("srv1"), lab.addr("srv2")
    start_udp_reflector(lab, "srv1", f"{srv1}:3478", f"{srv1}:3479")
    start_udp_reflector(lab, "srv2", f"{srv2}:3478")
    seen = lab.exec("host1", [sys.executable, "-c", STUN_CLIENT, "40002", f"{srv1}:3478", f"{srv1}:3479",
                              f"{srv2}:3478"], timeout=30).stdout.split()
    assert "timeout" not in seen and len(set(seen)) >= 2  # fresh random ports (three equal: p ~ 1e-8)


@pytest.mark.parametrize("filtering,expect", [("address-and-port-dependent", 0),
                                              ("endpoint-independent", 5)])
def test_filtering(lab: Any, natd_factory: Any, filtering: str, expect: int) -> None:
    """RFC 4787 REQ-8: after host1 talked to srv1, srv2 (never contacted) sends to host1's mapping:
    dropped under address-and-port-dependent filtering (the default), delivered under
    endpoint-independent filtering (full cone)."""
    natd_factory(lab, nat_config(filtering=filtering))
    srv1 = lab.addr("srv1")
    start_udp_reflector(lab, "srv1", f"{srv1}:3478")
    listener = lab.popen("host1", [sys.executable, "-c", LISTEN_AFTER_BINDING, "40003", f"{srv1}:3478", "3"],
                         stdout=-1, text=True)
    assert listener.stdout is not None
    mapping = listener.stdout.readline().strip()
    lab.exec("srv2", [sys.executable, "-c", POKE, mapping], timeout=10)
    out, _ = listener.communicate(timeout=15)
    assert int(out.strip()) == expect


# Rendezvous: registers two peers' external endpoints, then tells each about the other.
RENDEZVOUS = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], 3478)); u.settimeout(30)
print("ready", flush=True)
peers = {}
while len(peers) < 2:
    data, peer = u.recvfrom(200)
    peers[data.decode()] = peer
(na, pa), (nb, pb) = peers.items()
u.sendto(f"{pb[0]}:{pb[1]}".encode(), pa)
u.sendto(f"{pa[0]}:{pa[1]}".encode(), pb)
"""

# A peer: registers, learns the other's endpoint, then both sides send until each has heard the other.
PEER = r"""
import socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(0.2); u.bind(("", 40000))
name, server = sys.argv[1], sys.argv[2]
end = time.monotonic() + 20
other = None
while other is None and time.monotonic() < end:
    u.sendto(name.encode(), (server, 3478))
    try:
        data, peer = u.recvfrom(200)
        if peer[0] == server:
            other = data.decode()
    except TimeoutError:
        pass
a, p = other.rsplit(":", 1)
heard = 0
for _ in range(40):  # bounded: 40 x 0.2 s
    u.sendto(f"hello from {name}".encode(), (a, int(p)))
    try:
        data, peer = u.recvfrom(200)
        if data.startswith(b"hello from"):
            heard += 1
            if heard >= 3:
                break
    except TimeoutError:
        pass
print(other, heard)
"""


def test_udp_hole_punching_between_two_natd_sites(lab_factory: Any, natd_factory: Any) -> None:
    """Two hosts, each behind its own natd (endpoint-independent mapping, address-and-port-dependent
    filtering: the defaults), learn each other's external endpoint from a rendezvous server and then
    talk directly: each one's first datagrams open its own NAT for the other (RFC 4787 REQ-1, REQ-8)."""
    lab = lab_factory("two-sites")
    for site, subnet in (("a", "10.0.1.0/24"), ("b", "10.0.2.0/24")):
        natd_factory(lab, {"instance": f"{lab.prefix}{site}", "inside": ["in1"], "outside": "out0",
                           "snat": [{"from": subnet, "ports": "20000-29999"}]}, node=f"gw_{site}")
    srv = lab.addr("srv")
    rendezvous = lab.popen("srv", [sys.executable, "-c", RENDEZVOUS, srv], stdout=-1, text=True)
    assert rendezvous.stdout is not None and rendezvous.stdout.readline().strip() == "ready"
    peers = {site: lab.popen(f"host_{site}", [sys.executable, "-c", PEER, site, srv], stdout=-1, text=True)
             for site in ("a", "b")}
    results = {site: p.communicate(timeout=40)[0].split() for site, p in peers.items()}
    assert results["a"][0].startswith(lab.addr("gw_b", "out0") + ":")  # a learnt b's external endpoint
    assert results["b"][0].startswith(lab.addr("gw_a", "out0") + ":")
    assert int(results["a"][1]) >= 1 and int(results["b"][1]) >= 1, results  # each heard the other


BIG_ECHO = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], 5400))
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(65535)
    u.sendto(data[::-1], peer)
"""

BIG_ASK = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
payload = (bytes(range(256)) * 16)[:4000]
for _ in range(3):
    u.sendto(payload, (sys.argv[1], 5400))
    try:
        data = u.recv(65535)
        print(len(data), data == payload[::-1]); break
    except TimeoutError:
        continue
else:
    print("timeout")
"""


def test_a_4000_byte_udp_datagram_crosses_both_ways(lab: Any, natd_factory: Any) -> None:
    """RFC 4787 REQ-14: fragmented datagrams are translated in both directions (the first fragment by
    its ports, the others by what natd remembered of it)."""
    natd = natd_factory(lab, nat_config())
    srv1 = lab.addr("srv1")
    proc = lab.popen("srv1", [sys.executable, "-c", BIG_ECHO, srv1], stdout=-1, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    out = lab.exec("host1", [sys.executable, "-c", BIG_ASK, srv1], timeout=20).stdout.split()
    assert out == ["4000", "True"]
    assert (natd.metric("natd_fragments_translated_total") or 0) >= 4  # 2 later fragments each way


# Echoes each datagram reversed, prefixed with the peer it saw; replies without DF (IP_PMTUDISC_DONT), so
# the router in front of the small link fragments them.
ECHO_NO_DF = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], 5401))
u.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: DF=0
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(65535)
    u.sendto(f"{peer[0]}:{peer[1]}|".encode() + data[::-1], peer)
"""

# Sends one datagram of each size without DF and checks the reversed echo.
ASK_NO_DF = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
u.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_PMTUDISC_DONT
u.bind(("", 40050))
for size in map(int, sys.argv[2:]):
    payload = (bytes(range(256)) * 20)[:size]
    for _ in range(3):
        u.sendto(payload, (sys.argv[1], 5401))
        try:
            seen, _, body = u.recv(65535).partition(b"|")
            print(size, seen.decode(), body == payload[::-1]); break
        except TimeoutError:
            continue
    else:
        print(size, "timeout", False)
"""

# Records the IPv4 packets from the given sources (AF_PACKET on eth0): id, fragment offset, MF, length.
SNIFF_FRAGMENTS = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800)); s.bind(("eth0", 0))
s.settimeout(0.5)
want, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
print("ready", flush=True)
n = 0
while n < want and time.monotonic() < end:
    try:
        pkt, addr = s.recvfrom(65535)
    except TimeoutError:
        continue
    if addr[2] == socket.PACKET_OUTGOING or len(pkt) < 34 or pkt[23] != 17:
        continue
    tot, ident, frag = struct.unpack("!HHH", pkt[16:22])
    src = socket.inet_ntoa(pkt[26:30])
    if src == sys.argv[3]:
        continue
    print(src, ident, (frag & 0x1FFF) * 8, (frag >> 13) & 1, tot, flush=True)
    n += 1
"""


def test_datagrams_too_big_for_the_outside_link_without_df_are_fragmented(lab: Any,
                                                                          natd_factory: Any) -> None:
    """RFC 4787 REQ-13a: gw's outside link has MTU 1280. host1's datagrams without DF, 1400 bytes and 4000
    bytes (which host1 fragments for its own 1500), are translated and then fragmented by gw's kernel, in
    order; srv1 receives them reassembled from host1's external endpoint. Its replies, fragmented by inet
    for the same link, come back translated. Nothing arrives with a private source."""
    lab.set_link("gw", "out0", mtu=1280)
    lab.set_link("inet", "gw0", mtu=1280)
    natd = natd_factory(lab, nat_config())
    srv1, gw_out = lab.addr("srv1"), lab.addr("gw", "out0")
    echo = lab.popen("srv1", [sys.executable, "-c", ECHO_NO_DF, srv1], stdout=-1, text=True)
    assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
    # 1400: 2 fragments; 4000 (host1: 1480 + 1480 + 1048 bytes of payload): 2 + 2 + 1
    sniff = lab.popen("srv1", [sys.executable, "-c", SNIFF_FRAGMENTS, "7", "20", srv1], stdout=-1, text=True)
    assert sniff.stdout is not None and sniff.stdout.readline().strip() == "ready"
    out = lab.exec("host1", [sys.executable, "-c", ASK_NO_DF, srv1, "1400", "4000"], timeout=30).stdout
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 2 and all(r[2] == "True" for r in rows), out
    for size, seen, _ in rows:
        ip, port = seen.split(":")
        assert ip == gw_out and 20000 <= int(port) <= 29999, f"{size}: srv1 saw {seen}"
    assert rows[0][1] == rows[1][1]
    packets = [line.split() for line in sniff.communicate(timeout=30)[0].splitlines()]
    assert packets and all(p[0] == gw_out for p in packets), f"untranslated packets reached srv1: {packets}"
    assert all(int(p[4]) <= 1280 for p in packets), packets
    frags: dict[str, list[tuple[int, int]]] = {}
    for _src, ident, offset, _mf, _tot in packets:
        frags.setdefault(ident, []).append((int(offset), int(_mf)))
    assert len(frags) >= 2, packets
    first = next(iter(frags.values()))  # the 1400-byte datagram, fragmented by gw alone
    assert first == sorted(first) and len(first) == 2 and first[-1][1] == 0, f"out of order: {first}"
    assert (natd.metric("natd_packets_passed_total", reason="fragment_out") or 0) >= 3
    assert (natd.metric("natd_fragments_translated_total") or 0) >= 2
