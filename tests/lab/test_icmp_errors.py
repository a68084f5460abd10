"""ICMP errors through natd (RFC 5508 REQ-3/4/5, RFC 5382 REQ-9): traceroute in three modes and PMTU
discovery across a smaller MTU behind the gateway. Every hop must show, and a transfer with DF must
complete, which only happens when the errors reach the inside host with the quoted header reverted."""

from __future__ import annotations

import errno
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.lab


def hops(output: str) -> list[str]:
    """The responding address of each traceroute line (first column after the hop number)."""
    out = []
    for line in output.splitlines()[1:]:
        parts = line.split()
        out.append(parts[1] if len(parts) > 1 else "")
    return out


@pytest.mark.parametrize("mode", [[], ["-I"], ["-T", "-p", "80"]], ids=["udp", "icmp", "tcp"])
def test_traceroute_shows_every_hop(nat_lab: Any, mode: list[str]) -> None:
    """RFC 5508 REQ-4: Time Exceeded from a router beyond the gateway (inet) is translated back; the
    gateway's own Time Exceeded (hop 1) reaches the host; the destination answers last."""
    lab, natd = nat_lab
    before = natd.metric("natd_icmp_errors_translated_total", direction="in") or 0
    res = lab.exec("host1", ["traceroute", "-n", "-q", "1", "-w", "2", "-m", "5", *mode, lab.addr("srv1")],
                   timeout=60)
    assert hops(res.stdout)[:3] == [lab.addr("gw", "in1"), lab.addr("inet", "gw0"), lab.addr("srv1")], \
        res.stdout
    after = natd.metric("natd_icmp_errors_translated_total", direction="in") or 0
    assert after - before >= 1


SENDER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 18300), timeout=20)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: always DF
payload = b"y" * (1 << 20)
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode())
"""

SINK = r"""
import socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], 18300)); l.listen(1)
print("ready", flush=True)
c, _ = l.accept()
got = 0
while True:
    b = c.recv(65536)
    if not b:
        break
    got += len(b)
c.sendall(str(got).encode()); c.close()
"""


def test_pmtu_discovery_through_a_smaller_link_behind_the_gateway(lab: Any, natd_factory: Any) -> None:
    """RFC 5508 REQ-4 (Fragmentation Needed): inet forwards to srv1 over MTU 1280 while srv1 itself has
    1500 (so its MSS does not hide the problem); host1's DF segments need PMTU discovery to get through."""
    natd = natd_factory(lab)
    lab.set_link("inet", "srv1", mtu=1280)
    sink = lab.popen("srv1", [sys.executable, "-c", SINK, lab.addr("srv1")], stdout=-1, text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    res = lab.exec("host1", [sys.executable, "-c", SENDER, lab.addr("srv1")], timeout=40)
    assert res.stdout.strip() == str(1 << 20)
    assert (natd.metric("natd_icmp_errors_translated_total", direction="in") or 0) >= 1
    route = lab.exec("host1", ["ip", "route", "get", lab.addr("srv1")]).stdout
    assert "mtu 1280" in route, route  # the host learnt the path MTU from the translated error


# One connect; prints "ok", "timeout" or the errno it failed with.
CONNECT = r"""
import socket, sys
s = socket.socket(); s.settimeout(10)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("ok")
except TimeoutError:
    print("timeout")
except OSError as e:
    print(e.errno)
"""


def test_gateway_without_a_route_tells_the_host(nat_lab: Any) -> None:
    """An error the gateway itself generates reaches the inside host: with no route to a destination (an
    unreachable route on gw), natd hands the untranslated SYN to the kernel, whose Destination Unreachable
    makes host1's connect() fail at once instead of timing out. Nothing leaves towards the internet."""
    from natd_lab import netops

    lab, natd = nat_lab
    prefix, target = "198.51.100.192/26", "198.51.100.200"  # on no lab node
    before = natd.metric("natd_packets_passed_total", reason="fib_other") or 0
    with netops.rtnl(lab.ns("gw")) as ipr:
        ipr.route("add", dst=prefix, type="unreachable")
    try:
        outcome = lab.exec("host1", [sys.executable, "-c", CONNECT, target, "80"], timeout=30).stdout.strip()
    finally:
        with netops.rtnl(lab.ns("gw")) as ipr:
            ipr.route("del", dst=prefix, type="unreachable")
    assert outcome in (str(errno.EHOSTUNREACH), str(errno.ENETUNREACH)), outcome
    assert (natd.metric("natd_packets_passed_total", reason="fib_other") or 0) - before >= 1
