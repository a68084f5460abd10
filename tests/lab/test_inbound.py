"""Inbound features through natd: port forwards (DNAT) and static 1:1 NAT, with real connections
from the internet side of the lab."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from natd_lab.apps import TCP_ASK, UDP_ASK, start_peer_echo

pytestmark = pytest.mark.lab

STATIC_ADDR = "192.0.2.10"  # inet routes 192.0.2.0/24 to the gateway


@pytest.fixture
def inbound(lab: Any, natd_factory: Any) -> tuple[Any, Any]:
    natd = natd_factory(lab, {
        "inside": ["in1", "in2"], "outside": "out0",
        "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999"}],
        "forward": [{"proto": "tcp", "port": 443, "to": "10.0.2.80:8443"},
                    {"proto": "udp", "port": 5300, "to": "10.0.2.80"}],
        "static": [{"inside": "10.0.1.42", "outside": STATIC_ADDR}],
    })
    return lab, natd


def serve(lab: Any, node: str, port: int) -> None:
    start_peer_echo(lab, node, port, port, addr="0.0.0.0")


def test_port_forward_reaches_the_inside_server_with_the_real_client_address(inbound: Any) -> None:
    lab, natd = inbound
    serve(lab, "host2", 8443)
    ext = lab.addr("gw", "out0")
    seen = lab.exec("srv1", [sys.executable, "-c", TCP_ASK, ext, "443"], timeout=15).stdout.strip()
    assert seen.split(":")[0] == lab.addr("srv1")  # DNAT keeps the client's address (RFC 5382)
    line = natd.natctl("-L", "-p", "tcp", "--dport", "443").stdout
    assert f"src={lab.addr('srv1')} dst={ext} sport={seen.split(':')[1]} dport=443 " in line
    assert f"src=10.0.2.80 dst={lab.addr('srv1')} sport=8443 " in line
    assert "TIME_WAIT" in line or "CLOSE" in line or "FIN_WAIT" in line or "LAST_ACK" in line


def test_udp_port_forward_keeps_the_port_when_none_is_given(inbound: Any) -> None:
    lab, _ = inbound
    serve(lab, "host2", 5300)
    seen = lab.exec("srv2", [sys.executable, "-c", UDP_ASK, lab.addr("gw", "out0"), "5300"], timeout=15)
    assert seen.stdout.split(":")[0] == lab.addr("srv2")


def test_other_ports_of_the_outside_address_stay_closed(inbound: Any) -> None:
    lab, natd = inbound
    serve(lab, "host2", 8444)
    before = natd.metric("natd_packets_dropped_total", reason="no_mapping") or 0
    res = lab.exec("srv1", ["timeout", "3", sys.executable, "-c", TCP_ASK, lab.addr("gw", "out0"), "21000"],
                   check=False)
    assert res.returncode != 0
    assert (natd.metric("natd_packets_dropped_total", reason="no_mapping") or 0) > before


def test_static_nat_keeps_ports_outbound_and_opens_every_port_inbound(inbound: Any) -> None:
    lab, natd = inbound
    serve(lab, "srv1", 18400)
    seen = lab.exec("host1", [sys.executable, "-c", TCP_ASK, lab.addr("srv1"), "18400", "45678"],
                    timeout=15).stdout.strip()
    assert seen == f"{STATIC_ADDR}:45678"  # 1:1: the static address, and the port kept
    serve(lab, "host1", 7777)
    seen = lab.exec("srv2", [sys.executable, "-c", TCP_ASK, STATIC_ADDR, "7777"], timeout=15).stdout.strip()
    assert seen.split(":")[0] == lab.addr("srv2")
    # host2 (no static mapping) is still masqueraded behind the outside address
    serve(lab, "srv2", 18401)
    seen = lab.exec("host2", [sys.executable, "-c", TCP_ASK, lab.addr("srv2"), "18401"], timeout=15).stdout
    assert seen.split(":")[0] == lab.addr("gw", "out0")
    assert (natd.metric("natd_connection_attempts_total") or 0) >= 3


def test_hairpinning_to_a_port_forward_and_a_static_address(inbound: Any) -> None:
    """RFC 4787 REQ-9 / RFC 5382 REQ-8: a private host reaching a port forward or a static mapping by
    its external address works, and the target sees the sender's external address and port."""
    lab, natd = inbound
    ext = lab.addr("gw", "out0")
    serve(lab, "host2", 8443)
    seen = lab.exec("host1", [sys.executable, "-c", TCP_ASK, ext, "443"], timeout=15).stdout.strip()
    # host1 has the static address 192.0.2.10 and keeps its ports: host2 sees exactly that
    assert seen.split(":")[0] == STATIC_ADDR, seen
    serve(lab, "host1", 7778)
    seen = lab.exec("host2", [sys.executable, "-c", TCP_ASK, STATIC_ADDR, "7778"], timeout=15).stdout.strip()
    ip, port = seen.split(":")
    assert ip == ext and 20000 <= int(port) <= 29999  # host2 is masqueraded behind the outside address
    assert (natd.metric("natd_hairpin_packets_total") or 0) >= 6  # both handshakes went round
    table = natd.natctl("-L", "-p", "tcp", "--dport", "7778").stdout
    assert f"src={lab.addr('host2')} dst={STATIC_ADDR}" in table  # host2's outbound half
    assert f"src={ext} dst={STATIC_ADDR} sport={port} dport=7778" in table  # host1's inbound half
