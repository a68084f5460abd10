"""Behavioural proofs for rows of docs/rfc-compliance.md: real packets through natd in the default lab.

Each test names the requirement it shows. They look only at what the packets show (who receives what,
from which address and port) and at natd's counters, never at the datapath's tables, so they hold for
any implementation of the mappings.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from natd_lab.apps import ECHO_SNIFFER, ICMP_QUERY, STUN_CLIENT, start_udp_reflector

from .test_rfc_behaviour import BIG_ECHO, nat_config

pytestmark = pytest.mark.lab

NAT_RANGE = (20000, 29999)


def in_nat_range(endpoint: str) -> bool:
    return NAT_RANGE[0] <= int(endpoint.rsplit(":", 1)[1]) <= NAT_RANGE[1]


def ready(proc: subprocess.Popen[Any]) -> None:
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"


# ================================================================ RFC 4787 REQ-6 / REQ-6a: mapping refresh

# On srv1: waits for "A" and "B" (one datagram each, from two host1 sockets), then for HOLD seconds keeps
# A's mapping busy inbound ("inbound" mode: a datagram every 0.3 s) or just listens ("outbound" mode: host1
# sends); then probes both mappings and prints what it saw of A.
REFRESH_SERVER = r"""
import socket, sys, time
mode, hold = sys.argv[2], float(sys.argv[3])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], 5402)); u.settimeout(0.3)
print("ready", flush=True)
peers, seen_a = {}, set()
end = time.monotonic() + 20
while len(peers) < 2 and time.monotonic() < end:
    try:
        data, peer = u.recvfrom(100)
    except TimeoutError:
        continue
    peers.setdefault(data.decode(), peer)
    if data == b"A":
        seen_a.add(peer)
end = time.monotonic() + hold
inbound = 0
while time.monotonic() < end:
    if mode == "inbound":
        u.sendto(b"keep", peers["A"]); inbound += 1
    try:
        data, peer = u.recvfrom(100)
        if data == b"A":
            seen_a.add(peer)
    except TimeoutError:
        pass
for _ in range(3):
    for name in ("A", "B"):
        u.sendto(b"probe", peers[name])
    time.sleep(0.2)
print(inbound, " ".join(f"{a}:{p}" for a, p in sorted(seen_a)), flush=True)
"""

# On host1: sockets A and B each send once; in "outbound" mode A then sends every 0.3 s (nothing else
# is sent by either); both listen until the end and count what arrives.
REFRESH_HOST = r"""
import select, socket, sys, time
mode, hold, srv = sys.argv[1], float(sys.argv[2]), sys.argv[3]
socks = {}
for name, port in (("A", 40061), ("B", 40062)):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("", port)); s.setblocking(False)
    s.sendto(name.encode(), (srv, 5402)); socks[name] = s
got = {(n, k): 0 for n in socks for k in (b"keep", b"probe")}
end = time.monotonic() + hold + 3
next_send = time.monotonic() + 0.3
while time.monotonic() < end:
    if mode == "outbound" and time.monotonic() >= next_send and time.monotonic() < end - 2:
        socks["A"].sendto(b"A", (srv, 5402)); next_send += 0.3
    r, _, _ = select.select(list(socks.values()), [], [], 0.1)
    for name, s in socks.items():
        if s in r:
            data = s.recv(100)
            if (name, data) in got:
                got[(name, data)] += 1
print(got[("A", b"keep")], got[("A", b"probe")], got[("B", b"keep")], got[("B", b"probe")], flush=True)
"""


@pytest.mark.parametrize("mode", ["outbound", "inbound"])
def test_one_direction_alone_refreshes_a_udp_mapping(lab: Any, natd_factory: Any, mode: str) -> None:
    """RFC 4787 REQ-6 (outbound) and REQ-6a (inbound). UDP timeouts of 2 s. host1 opens two mappings to
    srv1 with one datagram each. For 6 s only one direction carries packets on mapping A (host1's
    datagrams, or srv1's), while B stays idle. Then srv1 sends to both mappings: A still delivers to
    host1, so it outlived its timeout, and B was reaped. Exactly two flows were ever created, so A was
    never reaped and then re-created."""
    hold = 6.0
    natd = natd_factory(lab, {**nat_config(),
                              "conntrack": {"timeouts": {"udp_unreplied": 2, "udp_replied": 2}}})
    srv1 = lab.addr("srv1")
    server = lab.popen("srv1", [sys.executable, "-c", REFRESH_SERVER, srv1, mode, str(hold)],
                       stdout=-1, text=True)
    ready(server)
    host = lab.exec("host1", [sys.executable, "-c", REFRESH_HOST, mode, str(hold), srv1],
                    timeout=40).stdout.split()
    keep_a, probe_a, keep_b, probe_b = map(int, host)
    inbound, *seen_a = server.communicate(timeout=30)[0].split()
    assert probe_a >= 1, f"mapping A was lost although {mode} packets kept it busy: {host}"
    assert probe_b == 0 and keep_b == 0, f"mapping B should have been reaped: {host}"
    assert len(seen_a) == 1 and seen_a[0].startswith(lab.addr("gw", "out0") + ":"), seen_a
    if mode == "inbound":
        assert keep_a >= 10 and int(inbound) >= 10, (host, inbound)
    assert natd.metric("natd_connection_attempts_total") == 2
    assert (natd.metric("natd_idle_timeouts_total") or 0) >= 1


# ========================================================== RFC 4787 REQ-9 / REQ-9a: UDP hairpinning

# On host2: opens its side towards host1's mapping (dropped by host1's filter, but it creates host2's
# flow), then answers the first "hello" with "pong" and prints who it came from.
HAIRPIN_TARGET = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("", 40072)); u.settimeout(10)
a, p = sys.argv[1].rsplit(":", 1)
u.sendto(b"punch", (a, int(p)))
print("ready", flush=True)
try:
    while True:
        data, peer = u.recvfrom(100)
        if data == b"hello":
            u.sendto(b"pong", peer)
            print(f"{peer[0]}:{peer[1]}", flush=True)
            break
except TimeoutError:
    print("timeout", flush=True)
"""

# On host1: sends "hello" to an external endpoint until an answer comes; prints the answer and its source.
HAIRPIN_SENDER = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("", int(sys.argv[1]))); u.settimeout(1)
a, p = sys.argv[2].rsplit(":", 1)
for _ in range(5):
    u.sendto(b"hello", (a, int(p)))
    try:
        data, peer = u.recvfrom(100)
        print(data.decode(), f"{peer[0]}:{peer[1]}"); break
    except TimeoutError:
        continue
else:
    print("timeout -")
"""


def test_udp_hairpinning_between_two_inside_mappings(lab: Any, natd_factory: Any) -> None:
    """RFC 4787 REQ-9 and REQ-9a for UDP: host1 and host2 learn their mappings from srv1 (STUN), then
    talk to each other's external endpoint (host2 first, so the default filtering admits host1). The
    datagram reaches host2 from host1's external address and port, and host2's answer reaches host1 from
    host2's external endpoint."""
    natd = natd_factory(lab, nat_config())
    srv1 = lab.addr("srv1")
    start_udp_reflector(lab, "srv1", f"{srv1}:3478")
    m1 = lab.exec("host1", [sys.executable, "-c", STUN_CLIENT, "40071", f"{srv1}:3478"]).stdout.strip()
    m2 = lab.exec("host2", [sys.executable, "-c", STUN_CLIENT, "40072", f"{srv1}:3478"]).stdout.strip()
    gw_out = lab.addr("gw", "out0")
    assert m1.startswith(gw_out + ":") and m2.startswith(gw_out + ":") and m1 != m2, (m1, m2)
    target = lab.popen("host2", [sys.executable, "-c", HAIRPIN_TARGET, m1], stdout=-1, text=True)
    ready(target)
    reply, source = lab.exec("host1", [sys.executable, "-c", HAIRPIN_SENDER, "40071", m2],
                             timeout=20).stdout.split()
    seen_by_host2 = target.communicate(timeout=20)[0].strip()
    assert seen_by_host2 == m1, f"host2 saw {seen_by_host2}, host1's external endpoint is {m1}"
    assert (reply, source) == ("pong", m2)
    assert (natd.metric("natd_hairpin_packets_total") or 0) >= 2


def test_udp_hairpinning_to_a_port_forward(lab: Any, natd_factory: Any) -> None:
    """RFC 4787 REQ-9 and REQ-9a for UDP through a port forward: host1 asks a reflector behind a UDP
    forward (on host2) at the gateway's external address. It answers, and it saw host1's external
    endpoint, the same one srv1 sees (endpoint-independent mapping)."""
    gw_out = lab.addr("gw", "out0")
    natd_factory(lab, {**nat_config(), "forward": [{"proto": "udp", "port": 5300, "to": lab.addr("host2")}]})
    srv1 = lab.addr("srv1")
    start_udp_reflector(lab, "srv1", f"{srv1}:3478")
    start_udp_reflector(lab, "host2", f"{lab.addr('host2')}:5300")
    seen = lab.exec("host1", [sys.executable, "-c", STUN_CLIENT, "40073", f"{srv1}:3478", f"{gw_out}:5300"],
                    timeout=30).stdout.split()
    assert len(seen) == 2 and "timeout" not in seen, seen
    assert seen[0].startswith(gw_out + ":") and in_nat_range(seen[0])
    assert seen[1] == seen[0], f"the forward's target saw {seen[1]}, srv1 saw {seen[0]}"


# ====================================================== RFC 4787 REQ-14a: fragment floods vs. real traffic

# Raw IPv4 fragments of one UDP flow (different IP ids): "first" (MF, offset 0, with a UDP header that
# claims more data) or "later" (MF, offset 1480, no header). Bounded by count; prints how many went out.
FLOOD = r"""
import socket, struct, sys
src, dst, sport, dport, count, kind, base = sys.argv[1:8]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
body = b"\xee" * 32
sent = 0
for i in range(int(count)):
    ident = (int(base) + i) % 65536 or 1
    if kind == "first":
        payload = struct.pack("!HHHH", int(sport) + i % int(sys.argv[8]), int(dport), 8 + 1400, 0) + body
        frag = 0x2000
    else:
        payload, frag = body, 0x2000 | 185
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, 64, 17, 0, saddr, daddr)
    try:
        s.sendto(hdr + payload, (dst, 0)); sent += 1
    except OSError:
        pass
print(sent, flush=True)
"""

# On host1: rounds of one small and one 4000-byte (fragmented) UDP exchange with srv1 until stdin closes,
# then three more; each exchange may take three tries. Prints "started" after the first round, and at the
# end the rounds, failed exchanges, retries, and 1 if it ran until stopped.
TRAFFIC = r"""
import select, socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
big = (bytes(range(256)) * 16)[:4000]
def exchange(payload):
    for attempt in range(3):
        u.sendto(payload, (sys.argv[1], 5400))
        try:
            if u.recv(65535) == payload[::-1]:
                return attempt
        except TimeoutError:
            pass
    return None
rounds, retries, failed, after_stop = 0, 0, 0, None
end = time.monotonic() + 90
while rounds < 100000 and time.monotonic() < end and (after_stop is None or after_stop > 0):
    for payload in (b"small-" + bytes(str(rounds), "ascii"), big):
        r = exchange(payload)
        if r is None:
            failed += 1
        else:
            retries += r
    rounds += 1
    if rounds == 1:
        print("started", flush=True)
    if after_stop is None and select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read():
        after_stop = 3
    elif after_stop is not None:
        after_stop -= 1
print(rounds, failed, retries, int(after_stop == 0), flush=True)
"""


def test_a_flood_of_bogus_fragments_does_not_impair_other_traffic(lab: Any, natd_factory: Any) -> None:
    """RFC 4787 REQ-14a. While host1 exchanges small and 4000-byte (fragmented) datagrams with srv1,
    host2 sends 20000 first fragments whose datagrams never complete (more than natd's 8192-entry fragment
    table holds) and srv2 sends 5000 first and 5000 later fragments to the gateway's external address.
    Every exchange of host1 completes, also after the flood."""
    natd = natd_factory(lab, nat_config())
    srv1, srv2, gw_out = lab.addr("srv1"), lab.addr("srv2"), lab.addr("gw", "out0")
    echo = lab.popen("srv1", [sys.executable, "-c", BIG_ECHO, srv1], stdout=-1, text=True)
    ready(echo)
    out_before = natd.metric("natd_packets_total", direction="out", side="destination") or 0
    traffic = lab.popen("host1", [sys.executable, "-c", TRAFFIC, srv1], stdin=subprocess.PIPE, stdout=-1,
                        text=True)
    assert traffic.stdout is not None and traffic.stdout.readline().strip() == "started"
    floods = [
        lab.popen("host2", [sys.executable, "-c", FLOOD, lab.addr("host2"), srv2, "40080", "9", "20000",
                            "first", "1", "1"], stdout=-1, text=True),
        lab.popen("srv2", [sys.executable, "-c", FLOOD, srv2, gw_out, "53", "20000", "5000", "first", "1",
                           "10000"], stdout=-1, text=True),
        lab.popen("srv2", [sys.executable, "-c", FLOOD, srv2, gw_out, "53", "20000", "5000", "later", "30000",
                           "1"], stdout=-1, text=True),
    ]
    sent = [int(f.communicate(timeout=120)[0].strip()) for f in floods]
    out, _ = traffic.communicate(input="", timeout=90)
    rounds, failed, retries, lasted = map(int, out.split())
    assert failed == 0, f"{failed} exchanges of {2 * rounds} failed during the flood ({retries} retries)"
    assert lasted == 1, f"the exchanges ({rounds} rounds) did not last until after the flood"
    assert sent[0] > 8192, sent
    flood_out = (natd.metric("natd_packets_total", direction="out", side="destination") or 0) - out_before
    assert flood_out > 8192, f"only {flood_out} bogus first fragments were translated"
    assert (natd.metric("natd_fragments_translated_total") or 0) >= 4 * rounds


# ============================== RFC 4787 REQ-13: DF=1 and too big -> Fragmentation Needed reaches the host

# On host1: a 1400-byte datagram with DF (IP_PMTUDISC_DO) over a path with a 1280 link; reads the ICMP
# error from the socket's error queue (IP_RECVERR): errno, origin, type, code, info (MTU) and the offender.
DF_SENDER = r"""
import select, socket, struct, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IP, 10, 2)   # IP_MTU_DISCOVER = IP_PMTUDISC_DO
u.setsockopt(socket.IPPROTO_IP, 11, 1)   # IP_RECVERR
u.connect((sys.argv[1], 5403))
p = select.poll(); p.register(u, select.POLLERR)
for _ in range(3):
    u.send(b"d" * 1400)
    if p.poll(2000):
        break
_, anc, _, _ = u.recvmsg(2048, 512, 0x2000)  # MSG_ERRQUEUE
for level, kind, data in anc:
    if (level, kind) == (socket.IPPROTO_IP, 11):
        errno, origin, typ, code, _pad, info, _data = struct.unpack("=IBBBBII", data[:16])
        offender = socket.inet_ntoa(data[20:24])
        print(errno, origin, typ, code, info, offender)
try:
    u.send(b"d" * 1400)
    print("sent")
except OSError as e:
    print("errno", e.errno)
"""


def test_df_datagram_too_big_for_the_outside_link_gets_fragmentation_needed(lab: Any,
                                                                            natd_factory: Any) -> None:
    """RFC 4787 REQ-13: gw's outside link has MTU 1280. host1's socket, which sends a 1400-byte datagram
    with DF, receives ICMP Destination Unreachable / Fragmentation Needed (type 3, code 4) with MTU 1280
    from the gateway, and the next send of that size fails with EMSGSIZE: the host learnt the path MTU."""
    lab.set_link("gw", "out0", mtu=1280)
    lab.set_link("inet", "gw0", mtu=1280)
    natd = natd_factory(lab, nat_config())
    lines = lab.exec("host1", [sys.executable, "-c", DF_SENDER, lab.addr("srv1")],
                     timeout=20).stdout.splitlines()
    assert len(lines) == 2, lines
    errno, origin, typ, code, info, offender = lines[0].split()
    assert (int(errno), int(origin), int(typ), int(code), int(info)) == (90, 2, 3, 4, 1280), lines[0]
    assert offender == lab.addr("gw", "in1")
    assert lines[1] == "errno 90"
    assert (natd.metric("natd_packets_passed_total", reason="frag_needed") or 0) >= 1


# ================================================ RFC 5382 REQ-3 / REQ-3a, RFC 7857 §6: filtering of TCP

# On srv1: a TCP server that tells each client the address it sees and keeps the connection open.
TCP_WHOAMI = r"""
import socket, sys, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(16)
print("ready", flush=True)
def serve(c, peer):
    c.sendall(f"{peer[0]}:{peer[1]}\n".encode())
    while c.recv(100):
        pass
    c.close()
while True:
    c, peer = l.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

# On host1, one local port: optionally an outbound TCP connection (its mapping) or a UDP exchange with a
# reflector, a TCP listener and a UDP socket on it; prints the mapping, then for a while reports what
# arrives from elsewhere ("tcp <peer>" for an accepted connection, "udp <n>" for unsolicited datagrams).
INSIDE_ENDPOINT = r"""
import select, socket, sys, time
port, how, where, wait = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
a, p = where.rsplit(":", 1)
def tcp_sock():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("", port)); return s
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("", port)); u.settimeout(1)
if how == "tcp":
    c = tcp_sock(); c.settimeout(5); c.connect((a, int(p)))
    mapping = c.recv(200).decode().strip()
else:
    for _ in range(3):
        u.sendto(b"binding", (a, int(p)))
        try:
            mapping = u.recv(200).decode(); break
        except TimeoutError:
            continue
l = tcp_sock(); l.listen(4); l.setblocking(False)
print(mapping, flush=True)
end, accepted, datagrams = time.monotonic() + wait, [], 0
while time.monotonic() < end:
    r, _, _ = select.select([l, u], [], [], 0.2)
    if l in r:
        s, peer = l.accept()
        s.sendall(b"inside here"); s.close(); accepted.append(f"{peer[0]}:{peer[1]}")
    if u in r:
        if u.recv(200) == b"unsolicited":
            datagrams += 1
print("tcp", ",".join(accepted) or "-", "udp", datagrams, flush=True)
"""

# From the internet: connects to an external endpoint; prints what the far end says, or "refused".
TCP_POKE = r"""
import socket, sys
a, p = sys.argv[1].rsplit(":", 1)
try:
    s = socket.create_connection((a, int(p)), timeout=3)
    s.settimeout(3)
    print(s.recv(100).decode() or "closed")
except OSError:
    print("refused")
"""

UDP_POKE = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
a, p = sys.argv[1].rsplit(":", 1)
for _ in range(5):
    u.sendto(b"unsolicited", (a, int(p)))
"""


@pytest.mark.parametrize("filtering", ["endpoint-independent", "address-and-port-dependent"])
def test_tcp_filtering(lab: Any, natd_factory: Any, filtering: str) -> None:
    """RFC 5382 REQ-3 / REQ-3a: host1 has a TCP connection to srv1 from port 40090 and listens on the same
    port. srv2, never contacted, connects to that mapping: under endpoint-independent filtering its SYN
    opens a new flow to host1 (which accepts and sees srv2's own address); under the default it is
    dropped and the connection fails."""
    natd_factory(lab, nat_config(filtering=filtering))
    srv1 = lab.addr("srv1")
    server = lab.popen("srv1", [sys.executable, "-c", TCP_WHOAMI, srv1, "18500"], stdout=-1, text=True)
    ready(server)
    inside = lab.popen("host1", [sys.executable, "-c", INSIDE_ENDPOINT, "40090", "tcp", f"{srv1}:18500", "6"],
                       stdout=-1, text=True)
    assert inside.stdout is not None
    mapping = inside.stdout.readline().strip()
    assert mapping.startswith(lab.addr("gw", "out0") + ":") and in_nat_range(mapping), mapping
    poke = lab.exec("srv2", [sys.executable, "-c", TCP_POKE, mapping], timeout=20).stdout.strip()
    report = inside.communicate(timeout=20)[0].split()
    if filtering == "endpoint-independent":
        assert poke == "inside here"
        assert report[1].startswith(lab.addr("srv2") + ":"), report
    else:
        assert poke == "refused"
        assert report[1] == "-", report


def test_endpoint_independent_filtering_is_per_protocol(lab: Any, natd_factory: Any) -> None:
    """RFC 7857 §6: under endpoint-independent filtering, host1's UDP mapping (port 40091, used with srv1's
    reflector) admits srv2's UDP datagrams but not a TCP connection to the same external port, although
    host1 listens for TCP on 40091 too."""
    natd_factory(lab, nat_config(filtering="endpoint-independent"))
    srv1 = lab.addr("srv1")
    start_udp_reflector(lab, "srv1", f"{srv1}:3478")
    inside = lab.popen("host1", [sys.executable, "-c", INSIDE_ENDPOINT, "40091", "udp", f"{srv1}:3478", "6"],
                       stdout=-1, text=True)
    assert inside.stdout is not None
    mapping = inside.stdout.readline().strip()
    assert mapping.startswith(lab.addr("gw", "out0") + ":"), mapping
    lab.exec("srv2", [sys.executable, "-c", UDP_POKE, mapping], timeout=10)
    poke = lab.exec("srv2", [sys.executable, "-c", TCP_POKE, mapping], timeout=20).stdout.strip()
    report = inside.communicate(timeout=20)[0].split()
    assert int(report[3]) == 5, f"UDP from srv2 should pass the UDP mapping's filter: {report}"
    assert poke == "refused" and report[1] == "-", (poke, report)


# ================================================================= RFC 7857 §5: EIM is per protocol

TCP_ASK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1]))); s.settimeout(5)
s.connect((sys.argv[2], int(sys.argv[3])))
print(s.recv(200).decode().strip())
"""


def test_endpoint_independent_mapping_is_per_protocol(lab: Any, natd_factory: Any) -> None:
    """RFC 7857 §5: host2's UDP flow from port 25000 holds external port 25000 towards srv1:3478, so
    host1's UDP flow from 25000 there gets another port. host1's TCP flow from the same 25000 to srv1
    gets 25000: its TCP mapping is not its UDP mapping (a protocol-independent mapping would give both
    the same external port)."""
    natd_factory(lab, nat_config())
    srv1, gw_out = lab.addr("srv1"), lab.addr("gw", "out0")
    start_udp_reflector(lab, "srv1", f"{srv1}:3478")
    server = lab.popen("srv1", [sys.executable, "-c", TCP_WHOAMI, srv1, "3478"], stdout=-1, text=True)
    ready(server)
    host2_udp = lab.exec("host2", [sys.executable, "-c", STUN_CLIENT, "25000", f"{srv1}:3478"]).stdout.strip()
    assert host2_udp == f"{gw_out}:25000"
    host1_udp = lab.exec("host1", [sys.executable, "-c", STUN_CLIENT, "25000", f"{srv1}:3478"]).stdout.strip()
    host1_tcp = lab.exec("host1", [sys.executable, "-c", TCP_ASK, "25000", srv1, "3478"]).stdout.strip()
    assert host1_udp.startswith(gw_out + ":") and host1_udp != host2_udp, host1_udp
    assert host1_tcp == f"{gw_out}:25000", host1_tcp


# ======================================================= RFC 7857 §4: paired pooling and exhaustion

# From host1's (secondary) addresses: one UDP exchange per "addr:lport:dst:dport"; prints the endpoint the
# server saw, or "timeout".
UDP_FROM = r"""
import socket, sys
for spec in sys.argv[1:]:
    addr, lport, dst, dport = spec.split(":")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((addr, int(lport))); u.settimeout(1)
    for _ in range(3):
        u.sendto(b"hi", (dst, int(dport)))
        try:
            print(addr, u.recv(200).decode()); break
        except TimeoutError:
            continue
    else:
        print(addr, "timeout")
    u.close()
"""


def test_paired_pooling_drops_new_sessions_when_the_hosts_address_is_exhausted(lab: Any,
                                                                               natd_factory: Any) -> None:
    """RFC 7857 §4 (and RFC 4787 REQ-2): a pool of two addresses with four ports each. Inside addresses
    are found that map to each pool address (each always to the same one). Host A uses all four ports of
    its address towards srv1:3478; then a fifth flow of A and a flow of C (another host on A's address)
    are dropped, not moved to the other address, while B (on the other address) still gets through."""
    pool = ["192.0.2.1", "192.0.2.2"]
    natd = natd_factory(lab, {"inside": ["in1", "in2"], "outside": "out0",
                              "snat": [{"from": "10.0.0.0/16", "to": pool, "ports": "20000-20003"}]})
    srv1, srv2 = lab.addr("srv1"), lab.addr("srv2")
    addrs = [f"10.0.1.{50 + i}" for i in range(12)]
    for a in addrs:
        lab.exec("host1", ["ip", "addr", "add", f"{a}/24", "dev", "eth0"])
    # one reflector port per address, so the discovery never competes for ports
    start_udp_reflector(lab, "srv2", *(f"{srv2}:{3500 + i}" for i in range(len(addrs))))
    start_udp_reflector(lab, "srv1", f"{srv1}:3478")
    specs = [f"{a}:40200:{srv2}:{3500 + i}" for i, a in enumerate(addrs)]
    found: dict[str, list[str]] = {}
    for line in lab.exec("host1", [sys.executable, "-c", UDP_FROM, *specs], timeout=60).stdout.splitlines():
        inside, seen = line.split()
        assert seen != "timeout", line
        found.setdefault(seen.rsplit(":", 1)[0], []).append(inside)
    respecs = [s.replace(":40200:", ":40201:") for s in specs]
    again = lab.exec("host1", [sys.executable, "-c", UDP_FROM, *respecs], timeout=60).stdout.splitlines()
    assert {line.split()[0]: line.split()[1].rsplit(":", 1)[0] for line in again} == \
        {i: ext for ext, inside in found.items() for i in inside}, "an inside address changed pool address"
    assert set(found) <= set(pool)
    full = next((ext for ext in pool if len(found.get(ext, [])) >= 2), None)
    other = next((ext for ext in pool if ext != full and found.get(ext)), None)
    assert full and other, f"need two hosts on one pool address and one on the other: {found}"
    host_a, host_c, host_b = found[full][0], found[full][1], found[other][0]
    before = natd.metric("natd_port_allocation_errors_total") or 0
    four_specs = [f"{host_a}:{40300 + i}:{srv1}:3478" for i in range(4)]
    four = lab.exec("host1", [sys.executable, "-c", UDP_FROM, *four_specs], timeout=60).stdout.splitlines()
    ports = {line.split()[1] for line in four}
    assert ports == {f"{full}:{p}" for p in range(20000, 20004)}, four
    rest = lab.exec("host1", [sys.executable, "-c", UDP_FROM, f"{host_a}:40304:{srv1}:3478",
                              f"{host_c}:40305:{srv1}:3478", f"{host_b}:40306:{srv1}:3478"],
                    timeout=60).stdout
    results = dict(line.split() for line in rest.splitlines())
    assert results[host_a] == "timeout" and results[host_c] == "timeout", results
    assert results[host_b].rsplit(":", 1)[0] == other, results
    assert (natd.metric("natd_port_allocation_errors_total") or 0) - before >= 2


# ================================================ RFC 5508 REQ-1a: ICMP query mapping endpoint-independent

@pytest.mark.parametrize("ident", [25555, 40404], ids=["id-in-range", "id-outside-range"])
def test_icmp_echo_identifier_mapping_is_endpoint_independent(lab: Any, natd_factory: Any,
                                                               ident: int) -> None:
    """RFC 5508 REQ-1a: host1 pings srv1 and srv2 with one identifier; both servers see the gateway's
    address and the same external identifier, and both replies reach host1 with its own identifier."""
    natd_factory(lab, nat_config())
    srv1, srv2 = lab.addr("srv1"), lab.addr("srv2")
    sniffers = {s: lab.popen(s, [sys.executable, "-c", ECHO_SNIFFER, "15"], stdout=-1, text=True)
                for s in ("srv1", "srv2")}
    for proc in sniffers.values():
        ready(proc)
    replies = lab.exec("host1", [sys.executable, "-c", ICMP_QUERY, "8", str(ident), srv1, srv2],
                       timeout=30).stdout.splitlines()
    assert replies == [f"{srv1} {ident} 1", f"{srv2} {ident} 2"], replies
    seen = {s: p.communicate(timeout=20)[0].split() for s, p in sniffers.items()}
    gw_out = lab.addr("gw", "out0")
    assert seen["srv1"][0] == seen["srv2"][0] == gw_out, seen
    assert seen["srv1"][1] == seen["srv2"][1], f"the identifier depends on the destination: {seen}"
    if ident <= NAT_RANGE[1]:
        assert int(seen["srv1"][1]) == ident
    else:
        assert NAT_RANGE[0] <= int(seen["srv1"][1]) <= NAT_RANGE[1]
