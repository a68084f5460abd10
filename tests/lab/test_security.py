"""Hostile input and faults, end to end: real packets from a hostile internet (and a hostile inside host)
against natd on the lab gateway, with live flows that must come through unharmed.

    full scan           nmap SYN + UDP scan of all 65,535 ports of the external and a pool address
    direct routing      the upstream router routes 10/8 at the gateway: TCP/UDP/ICMP to private hosts
    spoofed replies     datagrams / an out-of-window RST to a mapping from the wrong endpoint
    inside spoofing     an inside host sending with sources outside (and inside) the snat prefixes
    self-protection     the gateway's own services vs. natd's metrics port
    port exhaustion     more connections to one destination than a tiny port range holds
    reaper under load   thousands of idle flows reaped around a live one
    SIGHUP storm        50 acked reloads, a burst of unacked ones, then a broken file, under a transfer

Every test prints a "FIGURES" line (pytest -s) with what it measured; docs/security.md has the last ones.
Only addresses of the lab's namespaces are ever sent to; every loop is bounded in count and time.
"""

from __future__ import annotations

import itertools
import json
import re
import select
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from natd_lab.apps import TCP_HOLDER, TCP_RECEIVER

pytestmark = pytest.mark.lab

POOL_ADDR = "192.0.2.7"   # host2's pool address; inet routes 192.0.2.0/24 to the gateway
NAT_PORTS = (20000, 29999)
SEC_CONFIG: dict[str, Any] = {
    "inside": ["in1", "in2"],
    "outside": "out0",
    "snat": [{"from": "10.0.1.0/24", "ports": f"{NAT_PORTS[0]}-{NAT_PORTS[1]}"},
             {"from": "10.0.2.0/24", "to": [POOL_ADDR], "ports": f"{NAT_PORTS[0]}-{NAT_PORTS[1]}"}],
    "conntrack": {"timeouts": {"tcp_close": 2}},  # a torn-down TCP entry is reaped within ~2.5 s
}

# ================================================================================ programs run in nodes

UDP_ECHO = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(2048)
    u.sendto(data + f"|{peer[0]}:{peer[1]}".encode(), peer)
"""

# One datagram every `interval` s, each waiting up to 1 s for its own echo, until a line on stdin or `limit`
# s. Prints "peer ADDR:PORT" (how the server saw it) at the first answer, then a JSON summary.
PINGPONG = r"""
import json, select, socket, sys, time
dst, port, interval, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if len(sys.argv) > 5:
    u.bind(("", int(sys.argv[5])))
sent = answered = 0; peers = set(); other = []; worst = 0.0
end = time.monotonic() + limit
while time.monotonic() < end and not select.select([sys.stdin], [], [], 0)[0]:
    msg = f"ping-{sent}".encode(); t = time.monotonic()
    u.sendto(msg, (dst, port)); sent += 1
    while True:
        left = t + 1.0 - time.monotonic()
        if left <= 0:
            break
        u.settimeout(left)
        try:
            data, src = u.recvfrom(2048)
        except TimeoutError:
            break
        if data.startswith(msg + b"|"):
            answered += 1
            peer = data.split(b"|", 1)[1].decode()
            if not peers:
                print("peer", peer, flush=True)
            peers.add(peer); worst = max(worst, time.monotonic() - t)
            break
        other.append(f"{src[0]}:{src[1]} {data[:24].decode(errors='replace')}")
    time.sleep(max(0.0, interval - (time.monotonic() - t)))
print(json.dumps({"sent": sent, "answered": answered, "lost": sent - answered, "peers": sorted(peers),
                  "other": other[:50], "worst_rtt": round(worst, 4)}), flush=True)
"""

# Streams 1000 bytes every 10 ms to the first client until a line on stdin (or argv[3] s); prints bytes sent.
STREAM_SERVER = r"""
import select, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
end = time.monotonic() + float(sys.argv[3]); sent = 0
while time.monotonic() < end and not select.select([sys.stdin], [], [], 0)[0]:
    c.sendall(b"x" * 1000); sent += 1000; time.sleep(0.01)
c.shutdown(socket.SHUT_WR)
print(sent, flush=True)
"""


# A TCP connection that carries a line every 100 ms until a line on stdin (or argv[3] s).
TICK_SERVER = r"""
import select, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
end = time.monotonic() + float(sys.argv[3]); n = 0
try:
    while time.monotonic() < end and not select.select([sys.stdin], [], [], 0)[0]:
        c.sendall(b"tick %06d\n" % n); n += 1; time.sleep(0.1)
    c.shutdown(socket.SHUT_WR)
    print("sent", n, flush=True)
except OSError as e:
    print("error", repr(e), flush=True)
"""

TICK_CLIENT = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("connected", s.getsockname()[1], flush=True)
got = 0; err = None
try:
    while True:
        b = s.recv(4096)
        if not b:
            break
        got += b.count(b"\n")
except OSError as e:
    err = repr(e)
print(json.dumps({"ticks": got, "error": err}), flush=True)
"""

BANNER_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b"SSH-2.0-natd-lab\r\n")
    finally:
        c.close()
"""

CONNECT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.settimeout(3)
    print("open", s.recv(200).decode(errors="replace").strip())
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as e:
    print("error", e)
"""

# n connects at once (non-blocking), argv[4] s to complete; prints the peers the server reported and the
# failures, then holds the connections until a line on stdin.
MANY_CONNECT = r"""
import errno, json, selectors, socket, sys, time
host, port, n, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sel = selectors.DefaultSelector(); socks = []
for i in range(n):
    s = socket.socket(); s.setblocking(False)
    s.connect_ex((host, port)); sel.register(s, selectors.EVENT_WRITE, i); socks.append(s)
deadline = time.monotonic() + wait; result = {}
while len(result) < n and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
        err = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        result[key.data] = errno.errorcode.get(err, str(err)) if err else "ok"
        sel.unregister(key.fileobj)
peers, failed = [], []
for i, s in enumerate(socks):
    r = result.get(i, "timeout")
    if r == "ok":
        s.setblocking(True); s.settimeout(5); peers.append(s.recv(100).decode().strip())
    else:
        failed.append(r); s.close()
print(json.dumps({"peers": peers, "failed": failed}), flush=True)
sys.stdin.readline()
"""

UDP_ASK = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
for attempt in range(3):
    u.sendto(b"hi", (sys.argv[1], int(sys.argv[2])))
    try:
        print(u.recv(200).decode().split("|")[1]); break
    except TimeoutError:
        continue
else:
    sys.exit("no UDP answer")
"""

# New UDP flows in waves: `waves` x `per_wave` datagrams to distinct ports of argv[1], `gap` s apart.
FLOOD_WAVES = r"""
import socket, sys, time
dst, waves, per_wave, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for w in range(waves):
    t = time.monotonic()
    for i in range(per_wave):
        u.sendto(b"x", (dst, 30000 + w * per_wave + i))
    time.sleep(max(0.0, gap - (time.monotonic() - t)))
print("done", flush=True)
"""

# Raw packets with any source (scapy, IP_HDRINCL through the kernel's routing): a JSON list of specs.
SCAPY_SEND = r"""
import json, sys
from scapy.all import ICMP, IP, TCP, UDP, Raw, conf, send
from scapy.supersocket import L3RawSocket
conf.verb = 0
conf.L3socket = L3RawSocket
n = 0
for spec in json.loads(sys.argv[1]):
    ip = IP(src=spec["src"], dst=spec["dst"], ttl=spec.get("ttl", 64))
    if spec["proto"] == "udp":
        l4 = UDP(sport=spec["sport"], dport=spec["dport"]) / Raw(spec.get("payload", "x").encode())
    elif spec["proto"] == "tcp":
        l4 = TCP(sport=spec["sport"], dport=spec["dport"], flags=spec.get("flags", "S"),
                 seq=spec.get("seq", 1000), ack=spec.get("ack", 0))
    else:
        l4 = ICMP(id=spec["sport"], seq=1) / Raw(spec.get("payload", "x").encode())
    count = spec.get("count", 1)
    send(ip / l4, count=count, verbose=0)
    n += count
print(n)
"""

# Probes (TCP SYN to 22 and 80, UDP to 53, ICMP echo) to each of argv[1]'s addresses; prints answers.
SCAPY_PROBE = r"""
import json, sys
from scapy.all import ICMP, IP, TCP, UDP, Raw, conf, sr
conf.verb = 0
pkts = []
for d in sys.argv[1].split(","):
    pkts += [IP(dst=d) / TCP(sport=41022, dport=22, flags="S"),
             IP(dst=d) / TCP(sport=41080, dport=80, flags="S"),
             IP(dst=d) / UDP(sport=41053, dport=53) / Raw(b"direct"), IP(dst=d) / ICMP(id=0x4141, seq=1)]
ans, _ = sr(pkts, timeout=2, verbose=0)
print(json.dumps({"sent": len(pkts), "answers": [a[1].summary() for a in ans]}))
"""

# A SYN to 127.0.0.1:9469 put straight on the wire to the gateway's MAC (what only a neighbour can do).
SCAPY_LOOPBACK = r"""
import json, sys
from scapy.all import IP, TCP, Ether, conf, srp
conf.verb = 0
pkt = Ether(dst=sys.argv[1]) / IP(src=sys.argv[2], dst="127.0.0.1") / TCP(sport=41469, dport=9469, flags="S")
ans, _ = srp(pkt, iface=sys.argv[3], timeout=2, verbose=0)
print(json.dumps({"answers": [a[1].summary() for a in ans]}))
"""


# ================================================================================ helpers


def ready(proc: subprocess.Popen[Any], what: str = "ready", timeout: float = 15.0) -> str:
    """The first stdout line of proc (which must start with `what`), waiting at most `timeout` s."""
    assert proc.stdout is not None
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    assert r, f"no '{what}' from {proc.args} within {timeout} s"
    line = proc.stdout.readline().strip()
    assert line.startswith(what), f"{proc.args}: expected {what!r}, got {line!r}"
    return line


def run_py(lab: Any, node: str, script: str, *args: Any, stdin: bool = False) -> subprocess.Popen[Any]:
    kw: dict[str, Any] = {"stdout": subprocess.PIPE, "text": True}
    if stdin:
        kw["stdin"] = subprocess.PIPE
    return lab.popen(node, [sys.executable, "-c", script, *map(str, args)], **kw)


def finish(proc: subprocess.Popen[Any], timeout: float = 30.0) -> str:
    """Tell a stdin-controlled program to stop and return the rest of its output."""
    out, _ = proc.communicate(input="stop\n" if proc.stdin else None, timeout=timeout)
    return str(out)


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM to that PID, then wait (a program that would otherwise run until the lab goes down)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Capture:
    """tcpdump on one interface of a node, into a pcap file; counts what it caught afterwards."""

    def __init__(self, lab: Any, node: str, iface: str, bpf: str, path: Path, direction: str = "") -> None:
        self.path = path
        cmd = ["tcpdump", "-Z", "root", "-U", "-n", "-s", "256", "-i", iface, "-w", str(path)]
        if direction:
            cmd += ["-Q", direction]
        self.proc = lab.popen(node, [*cmd, bpf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        deadline, lines = time.monotonic() + 10, []
        while time.monotonic() < deadline:  # tcpdump says "listening on" once it captures
            r, _, _ = select.select([self.proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
            lines.append(self.proc.stderr.readline() if r else "")
            if "listening on" in lines[-1] or not lines[-1]:
                break
        assert "listening on" in lines[-1], f"tcpdump did not start on {node}:{iface}: {lines!r}"

    def stop(self) -> list[Any]:
        from scapy.all import rdpcap  # scapy.all: with the layers registered, frames dissect as Ether/IP

        time.sleep(0.3)  # the last packets in flight
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=10)
        return list(rdpcap(str(self.path)))


def flows(natd: Any, *filters: str) -> list[dict[str, Any]]:
    res = natd.natctl("-L", "-o", "json", *filters, check=False)
    assert res.returncode in (0, 1), res.stderr
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def metric(natd: Any, name: str, **labels: str) -> float:
    return natd.metric(name, **labels) or 0.0


def figures(test: str, **values: Any) -> None:
    print(f"\nFIGURES {test}: {json.dumps(values)}")


def parse_ranges(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def nmap_states(xml_text: str) -> dict[tuple[str, str], dict[str, set[int]]]:
    """(address, proto) -> state -> ports, from nmap -oX (collapsed ports carry their list since 7.80)."""
    states: dict[tuple[str, str], dict[str, set[int]]] = {}
    for host in ET.fromstring(xml_text).iter("host"):
        address = host.find("address")
        assert address is not None
        addr = str(address.get("addr"))
        for port in host.iter("port"):
            state = port.find("state")
            assert state is not None
            states.setdefault((addr, str(port.get("protocol"))), {}).setdefault(
                str(state.get("state")), set()).add(int(str(port.get("portid"))))
        for extra in host.iter("extraports"):
            for reasons in extra.iter("extrareasons"):
                states.setdefault((addr, str(reasons.get("proto"))), {}).setdefault(
                    str(extra.get("state")), set()).update(parse_ranges(str(reasons.get("ports"))))
    return states


# ================================================================================ the shared gateway


@pytest.fixture(scope="module")
def sec(request: pytest.FixtureRequest, lab_session: Any) -> Iterator[tuple[Any, Any]]:
    """A default lab with natd on gw (SEC_CONFIG), shared by the module's tests. One gateway setting, in the
    lab's gw namespace only: no ICMP rate limit, so every closed UDP port of the scan answers. (The pool
    address needs no blackhole route: natd drops what it does not translate for an address the gateway
    does not own, see test_pool_address_ports_outside_the_nat_range_do_not_loop.)"""
    from natd_lab import Lab
    from natd_lab.natd import NatdInLab

    lab = Lab("default")
    lab_session.track(lab)
    request.addfinalizer(lab.down)
    lab.up()
    lab.exec("gw", ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0", "net.ipv4.icmp_msgs_per_sec=100000",
                    "net.ipv4.icmp_msgs_burst=100000"])
    natd = NatdInLab(lab, json.loads(json.dumps(SEC_CONFIG)))
    request.addfinalizer(natd.close)
    natd.start()
    yield lab, natd


# ================================================================================ scans


def test_full_port_scan_reaches_no_private_host(sec: Any, tmp_path: Path) -> None:
    """nmap SYN + UDP scan of all 65,535 ports of the external address and of a pool address from the
    internet, while host1 has a UDP ping-pong and host2 a TCP stream (both with srv2): no private host
    sees one packet from the scanner, both flows finish unharmed, every probe of a NAT port is dropped
    and counted (no_mapping), and the gateway's kernel answers for the other ports itself: closed, except
    the gateway's own service on 2222, the only open port."""
    lab, natd = sec
    t0 = time.monotonic()
    ext, srv1, srv2 = lab.addr("gw", "out0"), lab.addr("srv1"), lab.addr("srv2")
    banner = run_py(lab, "gw", BANNER_SERVER, ext, 2222)
    ready(banner)
    echo = run_py(lab, "srv2", UDP_ECHO, srv2, 18101)
    ready(echo)
    streamer = run_py(lab, "srv2", STREAM_SERVER, srv2, 18100, 170, stdin=True)
    ready(streamer)
    caps = {h: Capture(lab, h, "eth0", f"src host {srv1} or src host {srv2}", tmp_path / f"{h}.pcap")
            for h in ("host1", "host2")}
    receiver = run_py(lab, "host2", TCP_RECEIVER, srv2, 18100)
    pingpong = run_py(lab, "host1", PINGPONG, srv2, 18101, 0.05, 170, stdin=True)
    ready(pingpong, "peer")
    drops_before = metric(natd, "natd_packets_dropped_total", reason="no_mapping")
    scan_xml = tmp_path / "scan.xml"
    t_scan = time.monotonic()
    res = lab.exec("srv1", ["timeout", "150", "nmap", "-n", "-Pn", "-sS", "-sU", "-p-", "--max-retries", "0",
                            "--min-rate", "6000", "--max-rate", "6000", "-T4", "-oX", str(scan_xml),
                            ext, POOL_ADDR], timeout=160)
    scan_s = time.monotonic() - t_scan
    drops = metric(natd, "natd_packets_dropped_total", reason="no_mapping") - drops_before
    pong = json.loads(finish(pingpong).strip().splitlines()[-1])
    sent = int(finish(streamer).strip())
    got = int(receiver.communicate(timeout=30)[0])
    seen = {h: c.stop() for h, c in caps.items()}
    stop(banner)
    stop(echo)
    states = nmap_states(scan_xml.read_text())
    nat = set(range(NAT_PORTS[0], NAT_PORTS[1] + 1))
    other = set(range(1, 65536)) - nat

    def sources(addr: str) -> dict[str, int]:
        return {h: sum(1 for p in pkts if p.haslayer("IP") and p["IP"].src == addr)
                for h, pkts in seen.items()}

    from_scanner, from_srv2 = sources(srv1), sources(srv2)
    counts = {f"{a} {p}": {s: len(v) for s, v in st.items()} for (a, p), st in sorted(states.items())}
    elapsed = time.monotonic() - t0
    figures("full_scan", probes=4 * 65535, nat_port_probes=4 * len(nat), no_mapping_drops=drops,
            scan_s=round(scan_s, 1), test_s=round(elapsed, 1), states=counts, udp_pingpong=pong,
            tcp_stream={"sent": sent, "got": got}, host_packets_from_scanner=from_scanner)
    assert res.returncode == 0, res.stderr
    # the external address: the NAT range is silent (dropped by natd), the rest is the kernel's
    tcp, udp = states[(ext, "tcp")], states[(ext, "udp")]
    assert tcp.get("open", set()) == {2222}, "only the gateway's own service may answer a SYN"
    assert nat <= tcp["filtered"], "a NAT port answered: natd let a probe through to someone"
    assert not nat & tcp.get("closed", set())
    assert len(tcp.get("closed", set())) >= 0.995 * (len(other) - 1)
    assert not udp.get("open"), "a UDP port answered like an open service"
    assert nat <= udp["open|filtered"] and not nat & udp.get("closed", set())
    assert len(udp.get("closed", set())) >= 0.995 * len(other)
    # the pool address: nothing answers; natd drops every probe (the gateway does not own the address, so
    # even its non-NAT ports have no one to go to)
    for proto in ("tcp", "udp"):
        assert set(states[(POOL_ADDR, proto)]) <= {"filtered", "open|filtered"}, states[(POOL_ADDR, proto)]
    expected = 2 * len(nat) + 2 * 65535  # NAT range of the external address (TCP, UDP) + all of the pool's
    assert expected <= drops <= expected * 1.01, f"{drops} no_mapping drops for {expected} probes"
    # no private host saw the scanner, and both saw their own flows (the captures worked)
    assert from_scanner == {"host1": 0, "host2": 0}
    assert all(n > 0 for n in from_srv2.values()), from_srv2
    assert pong["lost"] == 0 and pong["answered"] == pong["sent"] > 100, pong
    assert len(pong["peers"]) == 1, "the ping-pong flow changed its mapping during the scan"
    assert got == sent > 0, "the TCP stream lost data during the scan"
    assert elapsed < 180


def test_pool_address_ports_outside_the_nat_range_do_not_loop(sec: Any, tmp_path: Path) -> None:
    lab, _ = sec
    cap = Capture(lab, "inet", "gw0", f"dst host {POOL_ADDR}", tmp_path / "loop.pcap", direction="in")
    specs = [{"src": lab.addr("srv1"), "dst": POOL_ADDR, "proto": "tcp", "sport": 41000, "dport": 80,
              "count": 5},
             {"src": lab.addr("srv1"), "dst": POOL_ADDR, "proto": "udp", "sport": 41000, "dport": 53,
              "count": 5}]
    lab.exec("srv1", [sys.executable, "-c", SCAPY_SEND, json.dumps(specs)], timeout=30)
    time.sleep(1.0)
    back = len(cap.stop())
    figures("pool_loop", probes=10, copies_back_from_gateway=back)
    assert back == 0, f"10 probes to {POOL_ADDR} came back from the gateway {back} times (routing loop)"


def test_direct_routing_to_private_addresses_is_dropped(sec: Any, tmp_path: Path) -> None:
    """The upstream router (inet) routes 10.0.0.0/8 - the private hosts and the gateway's inside
    addresses - at the gateway, and inet itself and srv1 behind it send TCP SYNs, UDP and ICMP echo
    straight to them: nothing reaches a host, nothing answers, every packet is counted as to_private."""
    from natd_lab import netops

    lab, natd = sec
    targets = [lab.addr("host1"), lab.addr("host2"), lab.addr("gw", "in1"), lab.addr("gw", "in2")]
    attackers = {"inet": lab.addr("inet", "gw0"), "srv1": lab.addr("srv1")}
    bpf = " or ".join(f"src host {a}" for a in attackers.values())
    caps = {h: Capture(lab, h, "eth0", bpf, tmp_path / f"{h}.pcap") for h in ("host1", "host2")}
    gw_in = Capture(lab, "gw", "in1", bpf, tmp_path / "gw-in1.pcap")
    before = metric(natd, "natd_packets_dropped_total", reason="to_private")
    with netops.rtnl(lab.ns("inet")) as ipr:
        ipr.route("replace", dst="10.0.0.0/8", gateway=lab.addr("gw", "out0"))
    try:
        results = {node: json.loads(lab.exec(node, [sys.executable, "-c", SCAPY_PROBE, ",".join(targets)],
                                             timeout=30).stdout)
                   for node in attackers}
    finally:
        with netops.rtnl(lab.ns("inet")) as ipr:
            ipr.route("del", dst="10.0.0.0/8", gateway=lab.addr("gw", "out0"))
    dropped = metric(natd, "natd_packets_dropped_total", reason="to_private") - before
    seen = {h: len(c.stop()) for h, c in caps.items()}
    seen["gw:in1"] = len(gw_in.stop())
    sent = sum(r["sent"] for r in results.values())
    figures("direct_routing", sent=sent, to_private_drops=dropped, delivered=seen,
            answers={n: len(r["answers"]) for n, r in results.items()})
    assert sent == 2 * 4 * len(targets)
    assert all(not r["answers"] for r in results.values()), results
    assert seen == {"host1": 0, "host2": 0, "gw:in1": 0}
    assert dropped == sent
    assert lab.exec("inet", ["ip", "-4", "route", "show", "10.0.0.0/8"]).stdout.strip() == ""


# ================================================================================ spoofing


def test_spoofed_udp_replies_are_filtered_by_address_and_port(sec: Any, tmp_path: Path) -> None:
    """host1 has a UDP flow with srv1:18200. srv2 sends to the flow's external port from its own address,
    from srv1's port on another address and from srv1's address on another port: address-and-port-
    dependent filtering (natd's default, RFC 4787 §5) drops all of them as no_mapping and host1 never sees
    one. A datagram with the exact 4-tuple (srv1's address and port, spoofed) does get through: natd cannot
    tell it from srv1; only source validation upstream (BCP 38) prevents that."""
    lab, natd = sec
    srv1 = lab.addr("srv1")
    echo = run_py(lab, "srv1", UDP_ECHO, srv1, 18200)
    ready(echo)
    cap = Capture(lab, "host1", "eth0", "udp", tmp_path / "host1.pcap")
    client = run_py(lab, "host1", PINGPONG, srv1, 18200, 0.2, 60, stdin=True)
    ext, eport = ready(client, "peer").split()[1].split(":")
    entry = flows(natd, "-p", "udp", "-s", lab.addr("host1"), "--dport", "18200")
    assert [(f["external"]["addr"], f["external"]["port"]) for f in entry] == [(ext, int(eport))]
    before = metric(natd, "natd_packets_dropped_total", reason="no_mapping")
    n = 5
    spoofs = {"A-own-address": (lab.addr("srv2"), 18200), "B-other-address": ("198.51.100.77", 18200),
              "C-other-port": (srv1, 18201), "D-exact-tuple": (srv1, 18200)}
    specs = [{"src": s, "dst": ext, "proto": "udp", "sport": p, "dport": int(eport), "payload": f"SPOOF-{k}",
              "count": n} for k, (s, p) in spoofs.items()]
    lab.exec("srv2", [sys.executable, "-c", SCAPY_SEND, json.dumps(specs)], timeout=30)
    time.sleep(1.0)
    dropped = metric(natd, "natd_packets_dropped_total", reason="no_mapping") - before
    result = json.loads(finish(client).strip().splitlines()[-1])
    pkts = cap.stop()
    stop(echo)
    reached = {k: sum(1 for p in pkts if p.haslayer("Raw") and bytes(p["Raw"].load).startswith(
        f"SPOOF-{k}".encode())) for k in spoofs}
    figures("spoofed_udp", sent_per_kind=n, no_mapping_drops=dropped, reached_host1=reached,
            flow={k: result[k] for k in ("sent", "answered", "lost", "peers")})
    assert reached == {"A-own-address": 0, "B-other-address": 0, "C-other-port": 0, "D-exact-tuple": n}
    assert dropped == 3 * n
    assert result["lost"] == 0 and result["peers"] == [f"{ext}:{eport}"], result
    assert sum(1 for o in result["other"] if "SPOOF-D" in o) == n  # the exact tuple is indistinguishable


def test_out_of_window_rst_does_not_tear_down_an_established_flow(sec: Any) -> None:
    """host1 has an established TCP connection with srv1 (a line every 100 ms). srv2 sends RSTs that spoof
    srv1's address and port with a sequence number 2^31 away from what host1 expects: the flow stays
    ESTABLISHED with its mapping, the RSTs are counted (out_of_window), and the connection carries every
    line to the end, also after the tcp_close timeout (2 s here) has passed."""
    lab, natd = sec
    srv1 = lab.addr("srv1")
    server = run_py(lab, "srv1", TICK_SERVER, srv1, 18210, 60, stdin=True)
    ready(server)
    client = run_py(lab, "host1", TICK_CLIENT, srv1, 18210)
    ready(client, "connected")
    time.sleep(0.5)
    dump = lab.exec("srv1", ["timeout", "5", "tcpdump", "-c", "1", "-S", "-n", "-l", "-i", "eth0",
                             "tcp src port 18210 and (tcp[13] & 8 != 0)"], timeout=10, check=False).stdout
    m = re.search(r"seq (\d+):(\d+)", dump)
    assert m, f"no data segment of the connection seen on srv1: {dump!r}"
    bad_seq = (int(m.group(2)) + 2**31) % 2**32
    [before] = flows(natd, "-p", "tcp", "-s", lab.addr("host1"), "--dport", "18210")
    assert before["state"] == "ESTABLISHED"
    oow = metric(natd, "natd_packets_dropped_total", reason="out_of_window")
    spec = [{"src": srv1, "dst": before["external"]["addr"], "proto": "tcp", "sport": 18210,
             "dport": before["external"]["port"], "flags": "R", "seq": bad_seq, "count": 3}]
    lab.exec("srv2", [sys.executable, "-c", SCAPY_SEND, json.dumps(spec)], timeout=30)
    time.sleep(0.5)
    [after] = flows(natd, "-p", "tcp", "-s", lab.addr("host1"), "--dport", "18210")
    counted = metric(natd, "natd_packets_dropped_total", reason="out_of_window") - oow
    time.sleep(3.0)  # past tcp_close (2 s) and a reaper sweep: a CLOSE entry would be gone by now
    later = flows(natd, "-p", "tcp", "-s", lab.addr("host1"), "--dport", "18210")
    sent = int(finish(server).split()[-1])
    result = json.loads(client.communicate(timeout=15)[0].strip().splitlines()[-1])
    figures("out_of_window_rst", rsts=3, out_of_window_drops=counted, state_after=after["state"],
            ticks_sent=sent, ticks_received=result["ticks"])
    assert after["state"] == "ESTABLISHED", f"an out-of-window RST moved the flow to {after['state']}"
    assert [f["external"]["port"] for f in later] == [before["external"]["port"]]
    assert result == {"ticks": sent, "error": None}
    assert counted == 3


def test_inside_sources_outside_the_snat_prefixes_are_dropped(sec: Any, tmp_path: Path) -> None:
    """host1 sends UDP, TCP SYNs and pings with sources no snat rule covers - an unrelated private
    network, 10/8 outside the rules, the gateway's external address, srv1's own address (a reflection
    attempt): all dropped and counted (spoofed_inside), nothing reaches srv1."""
    lab, natd = sec
    srv1 = lab.addr("srv1")
    sources = ["172.16.5.5", "10.0.3.5", lab.addr("gw", "out0"), srv1]
    cap = Capture(lab, "srv1", "eth0", "udp or tcp or icmp", tmp_path / "srv1.pcap", direction="in")
    specs = []
    for s in sources:
        specs += [{"src": s, "dst": srv1, "proto": "udp", "sport": 47001, "dport": 18300,
                   "payload": "ISPOOF"},
                  {"src": s, "dst": srv1, "proto": "tcp", "sport": 47002, "dport": 18301},
                  {"src": s, "dst": srv1, "proto": "icmp", "sport": 0x4747, "payload": "ISPOOF"}]
    before = metric(natd, "natd_packets_dropped_total", reason="spoofed_inside")
    sent = int(lab.exec("host1", [sys.executable, "-c", SCAPY_SEND, json.dumps(specs)], timeout=30).stdout)
    time.sleep(0.5)
    dropped = metric(natd, "natd_packets_dropped_total", reason="spoofed_inside") - before
    pkts = cap.stop()
    reached = [p.summary() for p in pkts if p.haslayer("IP") and (
        (p.haslayer("Raw") and b"ISPOOF" in bytes(p["Raw"].load)) or
        (p.haslayer("TCP") and p["TCP"].sport == 47002))]
    figures("inside_spoofing", sent=sent, spoofed_inside_drops=dropped, reached_srv1=len(reached))
    assert sent == 3 * len(sources)
    assert reached == []
    assert dropped == sent


def test_inside_spoofing_of_another_translated_host_is_not_validated_per_interface(
        sec: Any, tmp_path: Path) -> None:
    """Documents a limit (docs/security.md): natd validates inside sources against the snat prefixes, not
    per interface. host1 (on in1) sending with host2's address (10.0.2.80, in2's subnet) is translated to
    host2's pool address, and srv1's answer is delivered to host2 - even with rp_filter=1 on in1, because
    the kernel's reverse-path filter never sees a packet XDP redirects. Per-interface source validation
    has to happen before natd (the switch port, the hypervisor's anti-spoofing)."""
    lab, natd = sec
    srv1 = lab.addr("srv1")
    echo = run_py(lab, "srv1", UDP_ECHO, srv1, 18302)
    ready(echo)
    old = lab.exec("gw", ["sysctl", "-n", "net.ipv4.conf.in1.rp_filter"]).stdout.strip()
    lab.exec("gw", ["sysctl", "-qw", "net.ipv4.conf.in1.rp_filter=1"])
    try:
        cap = Capture(lab, "host2", "eth0", f"udp and src host {srv1}", tmp_path / "host2.pcap")
        spec = [{"src": lab.addr("host2"), "dst": srv1, "proto": "udp", "sport": 47010, "dport": 18302,
                 "payload": "NOT-HOST2", "count": 3}]
        lab.exec("host1", [sys.executable, "-c", SCAPY_SEND, json.dumps(spec)], timeout=30)
        time.sleep(0.5)
        pkts = cap.stop()
    finally:
        lab.exec("gw", ["sysctl", "-qw", f"net.ipv4.conf.in1.rp_filter={old}"])
        stop(echo)
    entry = flows(natd, "-p", "udp", "-s", lab.addr("host2"), "--dport", "18302")
    to_host2 = [p for p in pkts if p.haslayer("UDP") and p["UDP"].dport == 47010]
    figures("inside_spoof_other_host", sent=3, translated_as=[f["external"] for f in entry],
            replies_delivered_to_host2=len(to_host2))
    assert [f["external"]["addr"] for f in entry] == [POOL_ADDR]
    assert len(to_host2) == 3 and all(bytes(p["Raw"].load).startswith(b"NOT-HOST2") for p in to_host2)


# ================================================================================ the gateway itself


def test_gateway_service_reachable_metrics_port_not(sec: Any) -> None:
    """A service of the gateway on its external address outside the NAT range (ssh-like, 2222) is
    reachable from the internet; natd's metrics listener is on 127.0.0.1 only: 203.0.113.1:9469 is refused,
    and a SYN to 127.0.0.1:9469 put on the wire to the gateway by its upstream neighbour gets nothing."""
    lab, natd = sec
    ext = lab.addr("gw", "out0")
    banner = run_py(lab, "gw", BANNER_SERVER, ext, 2222)
    ready(banner)
    try:
        ssh, metrics = (lab.exec("srv1", [sys.executable, "-c", CONNECT, ext, port, "3"],
                                 timeout=15).stdout.strip() for port in ("2222", "9469"))
    finally:
        stop(banner)
    listeners = lab.exec("gw", ["ss", "-Hltn", "sport = :9469"]).stdout.split()
    with_mac = lab.exec("gw", ["cat", "/sys/class/net/out0/address"]).stdout.strip()
    loop = json.loads(lab.exec("inet", [sys.executable, "-c", SCAPY_LOOPBACK, with_mac,
                                        lab.addr("inet", "gw0"), "gw0"], timeout=30).stdout)
    figures("self_protection", ssh=ssh, metrics_via_external=metrics,
            metrics_listen=[x for x in listeners if ":9469" in x], loopback_answers=loop["answers"])
    assert ssh == "open SSH-2.0-natd-lab"
    assert metrics == "refused"
    assert [x for x in listeners if ":9469" in x] == ["127.0.0.1:9469"]
    assert loop["answers"] == []
    assert natd.metric("natd_build_info") is not None  # and it still serves on loopback


# ================================================================================ exhaustion, reaper, reload


def test_port_exhaustion_fails_cleanly_and_spares_other_destinations(lab: Any, natd_factory: Any) -> None:
    """host1's rule has 20 ports (long timeouts: defaults). 30 connections at once to srv1:18400: exactly
    20 get through, each with its own port of the range, the other 10 fail at once on the client with
    EHOSTUNREACH (the SYNs are dropped, counted as port allocation errors and answered with ICMP
    Destination Unreachable code 13, RFC 5508 REQ-8; nothing half-open is left); meanwhile host1 -> srv2
    (another destination: new mappings share a port when none is free, RFC 7857 §3) and host2 -> srv1
    still work."""
    pool, lo, hi = "192.0.2.9", 20000, 20019
    natd = natd_factory(lab, {"inside": ["in1", "in2"], "outside": "out0",
                              "snat": [{"from": "10.0.1.0/24", "to": [pool], "ports": f"{lo}-{hi}"},
                                       {"from": "10.0.2.0/24", "ports": "20000-29999"}]})
    srv1, srv2 = lab.addr("srv1"), lab.addr("srv2")
    servers = [run_py(lab, "srv1", TCP_HOLDER, srv1, 18400), run_py(lab, "srv2", TCP_HOLDER, srv2, 18401)]
    for s in servers:
        ready(s)
    errors_before = metric(natd, "natd_port_allocation_errors_total")
    many = run_py(lab, "host1", MANY_CONNECT, srv1, 18400, 30, 4, stdin=True)
    result = json.loads(ready(many, "{", timeout=30))
    table = flows(natd, "-p", "tcp", "-s", lab.addr("host1"), "--dport", "18400")
    # (stdin is /dev/null for lab.exec: these close their connections at once)
    other_dst = lab.exec("host1", [sys.executable, "-c", MANY_CONNECT, srv2, 18401, 3, 4], timeout=30).stdout
    other_host = lab.exec("host2", [sys.executable, "-c", MANY_CONNECT, srv1, 18400, 3, 4], timeout=30).stdout
    errors = metric(natd, "natd_port_allocation_errors_total") - errors_before
    finish(many)
    for s in servers:
        stop(s)
    peers = result["peers"]
    other_dst_r, other_host_r = json.loads(other_dst), json.loads(other_host)
    figures("port_exhaustion", range_size=hi - lo + 1, attempts=30, connected=len(peers),
            failed=result["failed"], port_allocation_errors=errors, flows=len(table),
            other_destination=len(other_dst_r["peers"]), other_host=len(other_host_r["peers"]))
    assert len(peers) == hi - lo + 1, result
    assert {p.split(":")[0] for p in peers} == {pool}
    assert sorted(int(p.split(":")[1]) for p in peers) == list(range(lo, hi + 1))
    assert result["failed"] == ["EHOSTUNREACH"] * (30 - (hi - lo + 1))
    assert errors >= len(result["failed"])
    assert len(table) == hi - lo + 1 and {f["state"] for f in table} == {"ESTABLISHED"}
    assert len(other_dst_r["peers"]) == 3 and other_dst_r["failed"] == []
    assert {p.split(":")[0] for p in other_dst_r["peers"]} == {pool}
    assert len(other_host_r["peers"]) == 3 and other_host_r["failed"] == []
    assert {p.split(":")[0] for p in other_host_r["peers"]} == {lab.addr("gw", "out0")}


def test_reaper_never_takes_a_live_flow_while_thousands_expire(lab: Any, natd_factory: Any) -> None:
    """UDP timeouts of 2 s (sweeps every 0.5 s). host1 keeps a ping-pong with srv1 going (every 100 ms)
    while it opens 12,000 one-datagram flows to srv2 in 8 waves; they expire and are reaped around the
    live flow over many sweeps. The live flow keeps its external port the whole time (natctl and every
    echo agree) and loses no reply."""
    natd = natd_factory(lab, {"inside": ["in1", "in2"], "outside": "out0",
                              "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999"}],
                              "conntrack": {"timeouts": {"udp_unreplied": 2, "udp_replied": 2}}})
    srv1 = lab.addr("srv1")
    echo = run_py(lab, "srv1", UDP_ECHO, srv1, 18500)
    ready(echo)
    pingpong = run_py(lab, "host1", PINGPONG, srv1, 18500, 0.1, 90, stdin=True)
    peer = ready(pingpong, "peer").split()[1]
    reaped_before = metric(natd, "natd_idle_timeouts_total")
    created_before = metric(natd, "natd_connection_attempts_total")
    waves, per_wave = 8, 1500
    flood = run_py(lab, "host1", FLOOD_WAVES, lab.addr("srv2"), waves, per_wave, 1.5)
    samples: list[tuple[float, int, list[int], float]] = []
    deadline = time.monotonic() + 60
    flood_done = False
    while time.monotonic() < deadline:
        live = flows(natd, "-p", "udp", "-s", lab.addr("host1"), "-d", srv1, "--dport", "18500")
        count = int(natd.natctl("-C").stdout)
        samples.append((metric(natd, "natd_idle_timeouts_total") - reaped_before, count,
                        [f["external"]["port"] for f in live], time.monotonic()))
        assert samples[-1][2] == [int(peer.split(":")[1])], f"the live flow's entry: {live}"
        flood_done = flood_done or flood.poll() is not None
        if flood_done and count <= 2:
            break
        time.sleep(0.5)
    # every flow the flood created (a burst can lose a few datagrams on the veth before XDP sees them) was
    # reaped; the counter is the reaper's, updated after its sweep
    created = metric(natd, "natd_connection_attempts_total") - created_before
    settle = time.monotonic() + 10
    while metric(natd, "natd_idle_timeouts_total") - reaped_before < created and time.monotonic() < settle:
        time.sleep(0.5)
    reaped = metric(natd, "natd_idle_timeouts_total") - reaped_before
    result = json.loads(finish(pingpong).strip().splitlines()[-1])
    stop(echo)
    increments = sum(1 for a, b in itertools.pairwise(samples) if b[0] > a[0])
    figures("reaper_under_load", flood_datagrams=waves * per_wave, flows_created=created, reaped=reaped,
            duration_s=round(samples[-1][3] - samples[0][3], 1), polls=len(samples),
            polls_with_new_reaps=increments, peak_entries=max(s[1] for s in samples),
            pingpong={k: result[k] for k in ("sent", "answered", "lost", "peers", "worst_rtt")})
    assert flood_done and flood.returncode == 0
    assert created >= 0.95 * waves * per_wave, f"the flood created only {created} flows"
    assert reaped == created, f"{reaped} of the {created} idle flows reaped (the live one must not be)"
    assert increments >= 3, "the flows were not reaped over several sweeps"
    assert result["lost"] == 0 and result["sent"] >= 100, result
    assert result["peers"] == [peer], "the live flow's mapping changed"


def test_sighup_storm_then_a_broken_file(lab: Any, natd_factory: Any) -> None:
    """50 SIGHUPs in a row, each waited for and acked (RELOADING=1, then READY=1 with STATUS=reloaded),
    alternating two good configs; then a burst of 20 SIGHUPs without waiting (coalesced: every reload
    that starts is acked); then a broken file, rejected. natd stays up, the old rules keep translating
    new flows throughout, and a TCP transfer running across the whole storm completes byte for byte."""
    good_a: dict[str, Any] = {"inside": ["in1", "in2"], "outside": "out0",
                              "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999"}]}
    good_b = json.loads(json.dumps(good_a))
    good_b["snat"].append({"from": "10.9.0.0/16", "to": ["192.0.2.50"], "ports": "20000-29999"})
    natd = natd_factory(lab, json.loads(json.dumps(good_a)))
    srv1, srv2 = lab.addr("srv1"), lab.addr("srv2")
    echo = run_py(lab, "srv2", UDP_ECHO, srv2, 18601)
    ready(echo)
    streamer = run_py(lab, "srv1", STREAM_SERVER, srv1, 18600, 170, stdin=True)
    ready(streamer)
    receiver = run_py(lab, "host1", TCP_RECEIVER, srv1, 18600)
    time.sleep(0.5)
    [before] = flows(natd, "-p", "tcp", "--dport", "18600")
    t0 = time.monotonic()
    latencies = []
    translated = 0
    for i in range(50):
        cfg = dict(natd.config, snat=(good_b if i % 2 == 0 else good_a)["snat"])
        natd.write_config(cfg)
        t = time.monotonic()
        msg = natd.reload(timeout=30)
        latencies.append(time.monotonic() - t)
        assert "STATUS=reloaded" in msg, f"reload {i}: {msg}"
        if i % 10 == 9:  # new flows keep being translated mid-storm
            peer = lab.exec("host2", [sys.executable, "-c", UDP_ASK, srv2, "18601"], timeout=15).stdout
            assert peer.split(":")[0] == lab.addr("gw", "out0")
            translated += 1
        assert time.monotonic() - t0 < 120, "the storm is taking too long"
    n_before_burst = len(natd.drain())
    for _ in range(20):
        natd.proc.send_signal(signal.SIGHUP)
        time.sleep(0.005)
    burst: list[str] = []
    settle = time.monotonic() + 20
    while time.monotonic() < settle:
        time.sleep(1.5)
        burst = natd.drain()[n_before_burst:]
        kinds = [m.split("\n")[0] for m in burst]
        if kinds and kinds.count("RELOADING=1") == kinds.count("READY=1") and kinds[-1] == "READY=1":
            time.sleep(1.5)  # nothing more is coming
            if len(natd.drain()) == n_before_burst + len(burst):
                break
    kinds = [m.split("\n")[0] for m in burst]
    natd.write_config("inside: [in1, in2]\noutside: out0\nsnat:\n  - from: 10.0.0.0/16\n    ports: 9-1\n")
    rejected = natd.reload(timeout=30)
    alive = natd.proc.poll() is None
    peer = lab.exec("host2", [sys.executable, "-c", UDP_ASK, srv2, "18601"], timeout=15).stdout
    sent = int(finish(streamer).strip())
    got = int(receiver.communicate(timeout=30)[0])
    [after] = flows(natd, "-p", "tcp", "--dport", "18600")
    stop(echo)
    msgs = natd.drain()
    starts = [m.split("\n")[0] for m in msgs]
    figures("sighup_storm", acked_reloads=len(latencies), reload_latency_s={
        "mean": round(sum(latencies) / len(latencies), 3), "max": round(max(latencies), 3)},
        storm_s=round(time.monotonic() - t0, 1), burst_signals=20,
        burst_reloads=kinds.count("RELOADING=1"), transfer={"sent": sent, "got": got})
    assert 1 <= kinds.count("RELOADING=1") == kinds.count("READY=1") <= 20, kinds
    assert all("STATUS=reloaded" in m for m in burst if m.startswith("READY=1"))
    assert "STATUS=reload rejected" in rejected and "snat[0].ports" in rejected
    assert alive and natd.proc.poll() is None
    assert peer.split(":")[0] == lab.addr("gw", "out0"), "the old rules stopped translating"
    assert starts.count("RELOADING=1") + 1 == starts.count("READY=1")  # + the start-up READY
    assert got == sent > 0, "the transfer lost data during the storm"
    assert after["external"]["port"] == before["external"]["port"]
    assert translated == 5
