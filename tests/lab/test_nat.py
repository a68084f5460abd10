"""End to end: real packets from private hosts through natd on the lab gateway (issue: XDP datapath).

Shares one lab + natd per module (nat_lab fixture); each test uses its own ports so they do not interact.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest
from natd_lab.apps import ICMP_QUERY, TCP_ASK, start_peer_echo, tcp_ask, udp_ask

pytestmark = pytest.mark.lab

# Opens N connections at once and keeps them all open until every one has its answer.
MANY_TCP = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
answers = [s.recv(200).decode().strip() for s in socks]
print("\n".join(answers))
for s in socks:
    s.close()
"""


def flows(natd: Any, *filters: str) -> list[dict[str, Any]]:
    res = natd.natctl("-L", "-o", "json", *filters, check=False)
    assert res.returncode in (0, 1), res.stderr
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]  # JSON lines


def test_tcp_udp_icmp_from_two_hosts_see_only_the_external_address(nat_lab: Any) -> None:
    lab, natd = nat_lab
    ext = lab.addr("gw", "out0")
    srv1 = lab.addr("srv1")
    start_peer_echo(lab, "srv1", 18080, 15353)
    procs = {h: lab.popen(h, [sys.executable, "-c", TCP_ASK, srv1, "18080"], stdout=-1, text=True)
             for h in ("host1", "host2")}  # both hosts at once
    seen = {}
    for host, proc in procs.items():
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, f"{host}: TCP through natd failed"
        seen[host] = out.strip()
    for host, peer in seen.items():
        ip, port = peer.rsplit(":", 1)
        assert ip == ext, f"srv1 saw {host} as {peer}, not the external address {ext}"
        assert 20000 <= int(port) <= 29999
    for host in ("host1", "host2"):
        peer = udp_ask(lab, host, srv1, 15353)
        assert peer.split(":")[0] == ext
    for host in ("host1", "host2"):
        res = lab.exec(host, ["ping", "-c", "3", "-i", "0.2", "-W", "2", lab.addr("srv2")], timeout=20,
                       check=False)
        assert " 0% packet loss" in res.stdout, res.stdout
    # the conntrack table has the flows, with the external address as the reply tuple's destination
    tcp = flows(natd, "-p", "tcp", "--dport", "18080")
    assert {f["orig"]["src"] for f in tcp} == {lab.addr("host1"), lab.addr("host2")}
    assert all(f["reply"]["dst"] == ext for f in tcp)


def test_http_through_the_nat(nat_lab: Any) -> None:
    lab, _ = nat_lab
    srv2 = lab.addr("srv2")
    server = lab.popen("srv2", [sys.executable, "-m", "http.server", "18000", "--bind", srv2],
                       stdout=-1, stderr=-1, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if lab.exec("srv2", ["curl", "-sf", "-o", "/dev/null", f"http://{srv2}:18000/"], check=False
                    ).returncode == 0:
            break
        time.sleep(0.1)
    for host in ("host1", "host2"):
        res = lab.exec(host, ["curl", "-sf", "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://{srv2}:18000/"], timeout=20)
        assert res.stdout == "200"
    server.terminate()
    _, log = server.communicate(timeout=10)
    clients = {line.split()[0] for line in log.splitlines() if '"GET / HTTP' in line} - {srv2}  # - probe
    assert clients == {lab.addr("gw", "out0")}, log


def test_unsolicited_inbound_never_reaches_a_private_host(nat_lab: Any) -> None:
    lab, natd = nat_lab
    ext = lab.addr("gw", "out0")
    before = natd.metric("natd_packets_dropped_total", reason="no_mapping") or 0
    capture = lab.popen("host1", ["tcpdump", "-ni", "eth0", "-c", "50", "-w", "-",
                                  f"src host {lab.addr('srv1')} and (tcp port 25000 or udp port 25001)"],
                        stdout=-1, stderr=-1)
    time.sleep(0.5)
    for _ in range(3):  # SYNs and datagrams to NAT ports nobody asked for
        res = lab.exec("srv1", ["timeout", "2", sys.executable, "-c", TCP_ASK, ext, "25000"], check=False)
        assert res.returncode != 0
        lab.exec("srv1", ["bash", "-c", f"echo x > /dev/udp/{ext}/25001"], check=False)
    time.sleep(0.5)
    capture.terminate()
    pcap, _ = capture.communicate(timeout=10)
    assert len(pcap) <= 24, "host1 captured packets from srv1 it never asked for"  # pcap header only
    after = natd.metric("natd_packets_dropped_total", reason="no_mapping") or 0
    assert after - before >= 4


def test_internet_routing_private_prefixes_at_the_gateway_is_dropped(nat_lab: Any) -> None:
    lab, natd = nat_lab
    before = natd.metric("natd_packets_dropped_total", reason="to_private") or 0
    with lab.ipr("inet") as ipr:  # an attacker's route: 10.0.0.0/8 via the gateway
        ipr.route("replace", dst="10.0.0.0/8", gateway=lab.addr("gw", "out0"))
    try:
        res = lab.exec("inet", ["ping", "-c", "3", "-i", "0.2", "-W", "1", lab.addr("host1")], check=False)
        assert " 100% packet loss" in res.stdout
    finally:
        with lab.ipr("inet") as ipr:
            ipr.route("del", dst="10.0.0.0/8", gateway=lab.addr("gw", "out0"))
    after = natd.metric("natd_packets_dropped_total", reason="to_private") or 0
    assert after - before >= 3


def test_gateway_own_connections_still_work(nat_lab: Any) -> None:
    lab, _ = nat_lab
    start_peer_echo(lab, "srv2", 18081, 15354)
    ip, port = tcp_ask(lab, "gw", lab.addr("srv2"), 18081).rsplit(":", 1)
    assert ip == lab.addr("gw", "out0")
    lo, hi = map(int, lab.exec("gw", ["cat", "/proc/sys/net/ipv4/ip_local_port_range"]).stdout.split())
    assert lo <= int(port) <= hi  # the kernel's own port, untouched by the NAT


def test_200_concurrent_flows_get_200_distinct_mappings(nat_lab: Any) -> None:
    lab, natd = nat_lab
    start_peer_echo(lab, "srv1", 18082, 15355)
    out = lab.exec("host1", [sys.executable, "-c", MANY_TCP, lab.addr("srv1"), "18082", "200"],
                   timeout=60).stdout.split()
    assert len(out) == 200
    assert len(set(out)) == 200
    assert {o.split(":")[0] for o in out} == {lab.addr("gw", "out0")}
    table = flows(natd, "-p", "tcp", "-s", lab.addr("host1"), "--dport", "18082")
    assert len(table) == 200
    assert len({f["external"]["port"] for f in table}) == 200


def test_translated_packets_bypass_the_kernel_forwarding_path(nat_lab: Any) -> None:
    lab, natd = nat_lab
    srv1 = lab.addr("srv1")
    lab.exec("host1", ["ping", "-c", "2", "-W", "1", srv1], check=False)  # neighbours resolved
    nstat = json.loads(lab.exec("gw", ["nstat", "-az", "--json"]).stdout)
    fwd_before = nstat["kernel"]["IpForwDatagrams"]
    redirect_before = natd.metric("natd_xdp_verdicts_total", verdict="redirect") or 0
    lab.exec("host1", ["ping", "-c", "200", "-i", "0.002", "-W", "1", srv1], timeout=30)
    nstat = json.loads(lab.exec("gw", ["nstat", "-az", "--json"]).stdout)
    fwd = nstat["kernel"]["IpForwDatagrams"] - fwd_before
    redirected = (natd.metric("natd_xdp_verdicts_total", verdict="redirect") or 0) - redirect_before
    assert redirected >= 400  # 200 requests out + 200 replies back, all redirected by XDP
    assert fwd <= 2, f"the kernel forwarded {fwd} packets that natd should have redirected"


def test_icmp_timestamp_query_crosses_the_nat(nat_lab: Any) -> None:
    """RFC 5508 REQ-1: an ICMP timestamp request from a private host is translated out and srv1's kernel's
    timestamp reply comes back to the host with the identifier it used (conntrack tracks these too)."""
    lab, natd = nat_lab
    srv1 = lab.addr("srv1")
    out = lab.exec("host1", [sys.executable, "-c", ICMP_QUERY, "13", "4242", srv1], timeout=30).stdout.split()
    assert out == [srv1, "4242", "1"], out  # a type 14 reply, with host1's own identifier
    flows = natd.natctl("-L", "-p", "icmp", "-s", lab.addr("host1"), "-d", srv1, "--sport", "4242").stdout
    assert "id=4242" in flows and lab.addr("gw", "out0") in flows, flows
