"""natd.fmt: conntrack -L lines, seconds left, JSON (tests/lab/test_fmt_golden.py checks the real tool)."""

from __future__ import annotations

import json

import pytest

from natd.config import Timeouts
from natd.fmt import flow_json, format_flow, format_flows, ip_str, port_host, seconds_left, tcp_state_name
from natd.maps import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    CtEntry,
    CtFlags,
    CtKey,
    CtState,
    ip_to_be32,
    port_to_be16,
)

pytestmark = pytest.mark.unit

S = 1_000_000_000
BOTH = int(CtFlags.REPLIED | CtFlags.ASSURED)


def entry(nat_port: int, *, state: CtState = CtState.NONE, flags: int = 0, created: int = 0,
          last_seen: int = 0, nat_addr: str = "203.0.113.1") -> CtEntry:
    e = CtEntry()
    e.nat_addr = ip_to_be32(nat_addr)
    e.nat_port = port_to_be16(nat_port)
    e.state = int(state)
    e.flags = flags
    e.created_ns = created
    e.last_seen_ns = last_seen
    return e


TCP = CtKey.make("10.0.1.42", "198.51.100.10", 40000, 80, PROTO_TCP)
UDP = CtKey.make("10.0.1.42", "198.51.100.10", 40001, 53, PROTO_UDP)
ICMP = CtKey.make("10.0.1.42", "198.51.100.10", 1234, 0, PROTO_ICMP)


def test_conversions_from_map_byte_order() -> None:
    assert ip_str(ip_to_be32("203.0.113.1")) == "203.0.113.1"
    assert ip_str(ip_to_be32("10.0.1.255")) == "10.0.1.255"
    assert port_host(port_to_be16(40000)) == 40000
    assert port_host(port_to_be16(1)) == 1
    assert port_host(port_to_be16(65535)) == 65535


def test_tcp_line_is_conntracks() -> None:
    e = entry(40000, state=CtState.ESTABLISHED, flags=BOTH)
    assert format_flow(TCP, e, 431999) == (
        "tcp      6 431999 ESTABLISHED src=10.0.1.42 dst=198.51.100.10 sport=40000 dport=80 "
        "src=198.51.100.10 dst=203.0.113.1 sport=80 dport=40000 [ASSURED] mark=0 use=1")


def test_tcp_syn_sent_unreplied() -> None:
    e = entry(20001, state=CtState.SYN_SENT)
    assert format_flow(TCP, e, 119) == (
        "tcp      6 119 SYN_SENT src=10.0.1.42 dst=198.51.100.10 sport=40000 dport=80 [UNREPLIED] "
        "src=198.51.100.10 dst=203.0.113.1 sport=80 dport=20001 mark=0 use=1")


def test_udp_unreplied_has_no_state_column() -> None:
    e = entry(20002)
    assert format_flow(UDP, e, 29) == (
        "udp      17 29 src=10.0.1.42 dst=198.51.100.10 sport=40001 dport=53 [UNREPLIED] "
        "src=198.51.100.10 dst=203.0.113.1 sport=53 dport=20002 mark=0 use=1")


def test_udp_replied_not_assured_has_no_flags() -> None:
    e = entry(20002, flags=int(CtFlags.REPLIED))
    assert format_flow(UDP, e, 299) == (
        "udp      17 299 src=10.0.1.42 dst=198.51.100.10 sport=40001 dport=53 "
        "src=198.51.100.10 dst=203.0.113.1 sport=53 dport=20002 mark=0 use=1")


def test_icmp_echo_prints_type_code_id() -> None:
    e = entry(20001, flags=BOTH, nat_addr="203.0.113.7")
    assert format_flow(ICMP, e, 29) == (
        "icmp     1 29 src=10.0.1.42 dst=198.51.100.10 type=8 code=0 id=1234 "
        "src=198.51.100.10 dst=203.0.113.7 type=0 code=0 id=20001 [ASSURED] mark=0 use=1")


def test_unknown_tcp_state_prints_none_like_conntrack() -> None:
    assert tcp_state_name(int(CtState.TIME_WAIT)) == "TIME_WAIT"
    assert tcp_state_name(0) == "NONE"
    assert tcp_state_name(200) == "NONE"
    e = entry(40000, flags=BOTH)
    e.state = 200
    assert format_flow(TCP, e, 0).startswith("tcp      6 0 NONE src=10.0.1.42 ")


def test_unknown_protocol_is_named_unknown() -> None:
    key = CtKey.make("10.0.1.42", "198.51.100.10", 7, 9, 132)
    assert format_flow(key, entry(7), 5) == (
        "unknown  132 5 src=10.0.1.42 dst=198.51.100.10 sport=7 dport=9 [UNREPLIED] "
        "src=198.51.100.10 dst=203.0.113.1 sport=9 dport=7 mark=0 use=1")


@pytest.mark.parametrize(("key", "state", "flags", "idle_s", "expected"), [
    (TCP, CtState.ESTABLISHED, BOTH, 0, 7440),
    (TCP, CtState.ESTABLISHED, BOTH, 40, 7400),
    (TCP, CtState.TIME_WAIT, BOTH, 119, 1),
    (TCP, CtState.SYN_SENT, 0, 200, 0),           # overdue: 0, never negative
    (UDP, CtState.NONE, 0, 20, 100),              # udp_unreplied 120
    (UDP, CtState.NONE, int(CtFlags.REPLIED), 20, 280),  # udp_replied 300
    (ICMP, CtState.NONE, BOTH, 59, 1),            # icmp 60
])
def test_seconds_left(key: CtKey, state: CtState, flags: int, idle_s: int, expected: int) -> None:
    e = entry(1, state=state, flags=flags, last_seen=1000 * S)
    assert seconds_left(key, e, Timeouts(), 1000 * S + idle_s * S) == expected


def test_seconds_left_rounds_down_like_the_kernel() -> None:
    e = entry(1, state=CtState.ESTABLISHED, last_seen=10 * S)
    assert seconds_left(TCP, e, Timeouts(), 10 * S + 1) == 7439
    assert seconds_left(TCP, e, Timeouts(), 10 * S + S - 1) == 7439
    assert seconds_left(TCP, e, Timeouts(), 10 * S + S) == 7439
    assert seconds_left(TCP, e, Timeouts(), 10 * S + S + 1) == 7438


def test_seconds_left_with_a_clock_behind_last_seen_shows_the_full_timeout() -> None:
    e = entry(1, state=CtState.ESTABLISHED, last_seen=50 * S)
    assert seconds_left(TCP, e, Timeouts(), 10 * S) == 7440


def test_seconds_left_uses_the_given_timeouts() -> None:
    e = entry(1, state=CtState.ESTABLISHED, last_seen=0)
    assert seconds_left(TCP, e, Timeouts(tcp_established=100), 30 * S) == 70


def test_seconds_left_unknown_state_is_zero() -> None:
    e = entry(1, last_seen=0)
    e.state = 42
    assert seconds_left(TCP, e, Timeouts(), 0) == 0


def test_flow_json_tcp() -> None:
    e = entry(20001, state=CtState.ESTABLISHED, flags=BOTH, created=5 * S, last_seen=9 * S)
    e.packets_orig, e.bytes_orig, e.packets_reply, e.bytes_reply, e.rule_id = 3, 300, 2, 1400, 7
    got = flow_json(TCP, e, 7439, 10 * S + 1_234_567)
    assert got == {
        "proto": "tcp", "proto_number": 6, "state": "ESTABLISHED", "timeout": 7439,
        "orig": {"src": "10.0.1.42", "dst": "198.51.100.10", "sport": 40000, "dport": 80},
        "reply": {"src": "198.51.100.10", "dst": "203.0.113.1", "sport": 80, "dport": 20001},
        "inbound": False,
        "external": {"addr": "203.0.113.1", "port": 20001},
        "packets": {"orig": 3, "reply": 2}, "bytes": {"orig": 300, "reply": 1400},
        "replied": True, "assured": True, "age": 5.001, "rule_id": 7,
    }
    json.dumps(got)  # JSON-ready


def test_inbound_flow_prints_the_remote_as_the_original_side() -> None:
    """A port-forwarded connection (conntrack prints DNAT the same way): original = remote -> external
    address:port, reply = inside server -> remote."""
    key = CtKey.make("10.0.2.80", "198.51.100.10", 8443, 40000, 6)
    e = entry(443, state=CtState.ESTABLISHED, flags=BOTH | CtFlags.INBOUND)
    line = format_flow(key, e, 7440)
    assert ("src=198.51.100.10 dst=203.0.113.1 sport=40000 dport=443 "
            "src=10.0.2.80 dst=198.51.100.10 sport=8443 dport=40000 [ASSURED]") in line
    got = flow_json(key, e, 7440, 0)
    assert got["orig"] == {"src": "198.51.100.10", "dst": "203.0.113.1", "sport": 40000, "dport": 443}
    assert got["reply"] == {"src": "10.0.2.80", "dst": "198.51.100.10", "sport": 8443, "dport": 40000}
    assert got["inbound"] is True


def test_flow_json_icmp_and_udp() -> None:
    icmp = flow_json(ICMP, entry(20001), 60, 0)
    assert icmp["state"] is None
    assert icmp["orig"] == {"src": "10.0.1.42", "dst": "198.51.100.10", "type": 8, "code": 0, "id": 1234}
    assert icmp["reply"] == {"src": "198.51.100.10", "dst": "203.0.113.1", "type": 0, "code": 0, "id": 20001}
    assert icmp["external"] == {"addr": "203.0.113.1", "port": 20001}
    assert (icmp["replied"], icmp["assured"], icmp["age"]) == (False, False, 0.0)
    udp = flow_json(UDP, entry(20002, flags=int(CtFlags.REPLIED)), 1, 0)
    assert (udp["proto"], udp["proto_number"], udp["state"]) == ("udp", 17, None)
    assert (udp["replied"], udp["assured"]) == (True, False)


def test_format_flows_keeps_order_and_one_clock() -> None:
    flows = [(UDP, entry(20002, last_seen=0)), (TCP, entry(20001, state=CtState.ESTABLISHED, last_seen=0))]
    lines = list(format_flows(flows, Timeouts(), 20 * S))
    assert [line.split()[:3] for line in lines] == [["udp", "17", "100"], ["tcp", "6", "7420"]]
