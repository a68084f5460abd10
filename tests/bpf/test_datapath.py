"""natd's XDP datapath under BPF_PROG_TEST_RUN: exact rewrites, checksums, verdicts, reasons, conntrack.

Every frame is built with scapy and run through xdp_inside (ingress in1) or xdp_outside (ingress out0) in
the lab namespace of tests/bpf/conftest.py, whose rules are (see harness.RULES_YAML):

    rule 0  10.0.0.0/16 -> 203.0.113.1 (out0's address)    ports 20000-29999
    rule 1  10.1.0.0/16 -> 192.0.2.1, 192.0.2.2 (paired)     ports 20000-29999
    rule 2  10.2.0.0/16 -> 192.0.2.9                         ports 30000-30003 (exhaustion)
    rule 3  10.3.0.0/16 -> 192.0.2.20                        ports 40000-40003, one forwarded
    rule 4  10.0.1.64/28 -> 203.0.113.1                      ports 20000-29999, 2 ports per host

Checksums are checked by letting scapy recompute them (the fields are deleted and the packet rebuilt).
Reasons are asserted with the deltas of the datapath's own counters (natd.maps.Stat).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from natd.bpfsys import BpfError
from natd.maps import CtEntry, CtFlags, CtKey, CtState, Stat, ip_to_be32, port_to_be16

from .harness import (
    CT_MAX,
    GW_IN1,
    GW_OUT,
    HOST1,
    NAT_PORTS,
    POOL,
    TINY_POOL_ADDR,
    TINY_PORTS,
    TRANSLATED,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    NatDatapath,
    Run,
    assert_refused_with_icmp,
)

pytestmark = pytest.mark.bpf

SRV = "198.51.100.10"
SRV2 = "198.51.100.20"
UNRESOLVED = "198.18.0.1"  # routed via 203.0.113.5, which has no neighbour entry
TCP_P, UDP_P, ICMP_P = socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP


# ============================================================================================= helpers


def eth_in(dp: NatDatapath, ethertype: int | None = None) -> Ether:
    """A frame as host1 sends it to the gateway's in1 (scapy fills in the type from the payload)."""
    eth = Ether(src=dp.mac["host1"], dst=dp.mac["in1"])
    if ethertype is not None:
        eth.type = ethertype
    return eth


def eth_out(dp: NatDatapath, ethertype: int | None = None) -> Ether:
    """A frame as the next hop (inet) sends it to the gateway's out0."""
    eth = Ether(src=dp.mac["inet"], dst=dp.mac["out0"])
    if ethertype is not None:
        eth.type = ethertype
    return eth


def syn(dp: NatDatapath, src: str = HOST1, sport: int = 40000, dst: str = SRV, dport: int = 80,
        flags: str = "S", ttl: int = 64, payload: bytes = b"") -> bytes:
    tcp = TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=5000 if "A" in flags else 0, window=29200)
    pkt = eth_in(dp) / IP(src=src, dst=dst, ttl=ttl, id=0x1234) / tcp
    return bytes(pkt / payload if payload else pkt)


def tcp_out(dp: NatDatapath, flags: str, src: str = HOST1, sport: int = 40000, dst: str = SRV,
            dport: int = 80) -> bytes:
    return bytes(eth_in(dp) / IP(src=src, dst=dst, ttl=64) / TCP(sport=sport, dport=dport, flags=flags))


def tcp_in(dp: NatDatapath, flags: str, dport: int, dst: str = GW_OUT, src: str = SRV, sport: int = 80,
           ttl: int = 57) -> bytes:
    return bytes(eth_out(dp) / IP(src=src, dst=dst, ttl=ttl) / TCP(sport=sport, dport=dport, flags=flags))


def assert_checksums_valid(frame: bytes) -> None:
    """The IP and L4 checksums are what scapy computes from scratch for the same packet."""
    pkt = Ether(frame)
    fresh = pkt.copy()
    del fresh[IP].chksum
    layer: type[Packet] | None = next((c for c in (TCP, UDP, ICMP) if c in pkt), None)
    if layer is not None:
        del fresh[layer].chksum
    rebuilt = Ether(bytes(fresh))
    assert pkt[IP].chksum == rebuilt[IP].chksum, "IP header checksum"
    if layer is not None:
        assert pkt[layer].chksum == rebuilt[layer].chksum, f"{layer.__name__} checksum"


def changed_offsets(a: bytes, b: bytes) -> set[int]:
    assert len(a) == len(b), "the datapath never changes a frame's length"
    return {i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y}


def flow(dp: NatDatapath, src: str, dst: str, sport: int, dport: int, proto: int = TCP_P) -> CtEntry:
    entry = dp.flow(src, dst, sport, dport, proto)
    assert entry is not None, f"no ct_orig entry for {proto} {src}:{sport} -> {dst}:{dport}"
    return entry


def assert_untouched(run: Run, frame: bytes, verdict: int) -> None:
    assert run.retval == verdict
    assert run.data == frame, "a frame that is not translated must leave the program byte for byte"


def open_flow(dp: NatDatapath, src: str = HOST1, sport: int = 40000, dst: str = SRV, dport: int = 80) -> int:
    """SYN out; returns the external port."""
    run = dp.inside(syn(dp, src=src, sport=sport, dst=dst, dport=dport))
    assert run.retval == XDP_REDIRECT
    return int(Ether(run.data)[TCP].sport)


# ================================================================================================= TCP


def test_tcp_syn_translated_and_redirected(dp: NatDatapath) -> None:
    frame = syn(dp, payload=b"hello")
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    out, orig = Ether(run.data), Ether(frame)
    # layer 2: from out0 to the next hop's MAC (the PERMANENT neighbour)
    assert (out.src, out.dst) == (dp.mac["out0"], dp.mac["inet"])
    # layer 3: source translated, TTL decremented, the rest as sent
    assert out[IP].src == GW_OUT and out[IP].dst == SRV
    assert out[IP].ttl == orig[IP].ttl - 1
    assert (out[IP].id, out[IP].len, out[IP].flags, out[IP].tos) == (orig[IP].id, orig[IP].len,
                                                                       orig[IP].flags, orig[IP].tos)
    # layer 4: 40000 is outside 20000-29999, so a port of the range is allocated
    sport = out[TCP].sport
    assert NAT_PORTS[0] <= sport <= NAT_PORTS[1]
    assert (out[TCP].dport, out[TCP].seq, out[TCP].flags, out[TCP].window) == (80, 1000, "S", 29200)
    assert bytes(out[TCP].payload) == b"hello"
    assert_checksums_valid(run.data)
    # exactly the NAT fields changed: MACs, TTL, IP checksum, source address, source port, TCP checksum
    allowed = set(range(0, 12)) | {22, 24, 25, 26, 27, 28, 29, 34, 35, 50, 51}
    assert changed_offsets(frame, run.data) <= allowed
    # conntrack: both halves, matching the packet
    entry = flow(dp, HOST1, SRV, 40000, 80)
    assert entry.state == CtState.SYN_SENT
    assert (str(entry.nat_ip), entry.nat_port_host) == (GW_OUT, sport)
    assert entry.rule_id == 0
    assert (entry.packets_orig, entry.bytes_orig, entry.packets_reply) == (1, len(frame), 0)
    assert entry.flags == 0
    replies = dict(dp.tables.reply_index())
    assert replies[CtKey.make(SRV, GW_OUT, 80, sport, TCP_P)] == CtKey.make(HOST1, SRV, 40000, 80, TCP_P)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "SNAT_OUT": 1, "CT_NEW": 1}


def test_inside_port_in_range_is_kept(dp: NatDatapath) -> None:
    """RFC 4787 REQ-3a / RFC 5382: the inside port is preserved when it is in the range and free."""
    assert open_flow(dp, sport=25000) == 25000
    assert flow(dp, HOST1, SRV, 25000, 80).nat_port_host == 25000


def test_existing_flow_keeps_its_mapping(dp: NatDatapath) -> None:
    port = open_flow(dp)
    with dp.counting() as d:
        for _ in range(3):
            run = dp.inside(tcp_out(dp, "A"))
            assert run.retval == XDP_REDIRECT
            assert Ether(run.data)[TCP].sport == port
    assert d[Stat.CT_NEW] == 0 and d[Stat.SNAT_OUT] == 3
    assert flow(dp, HOST1, SRV, 40000, 80).packets_orig == 4


def test_syn_ack_reply_translated_back(dp: NatDatapath) -> None:
    port = open_flow(dp)
    frame = tcp_in(dp, "SA", port)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert run.retval == XDP_REDIRECT
    out = Ether(run.data)
    assert (out.src, out.dst) == (dp.mac["in1"], dp.mac["host1"])
    assert (out[IP].src, out[IP].dst, out[IP].ttl) == (SRV, HOST1, 56)
    assert (out[TCP].sport, out[TCP].dport, out[TCP].flags) == (80, 40000, "SA")
    assert_checksums_valid(run.data)
    allowed = set(range(0, 12)) | {22, 24, 25, 30, 31, 32, 33, 36, 37, 50, 51}
    assert changed_offsets(frame, run.data) <= allowed
    entry = flow(dp, HOST1, SRV, 40000, 80)
    assert entry.state == CtState.SYN_RECV
    assert entry.flags & CtFlags.REPLIED and not entry.flags & CtFlags.ASSURED
    assert (entry.packets_reply, entry.bytes_reply) == (1, len(frame))
    assert d.nonzero() == {"XDP_REDIRECT": 1, "DNAT_IN": 1}


def _walk(dp: NatDatapath, steps: list[tuple[str, str, CtState]]) -> None:
    """steps: (direction 'o' inside->out / 'r' reply, TCP flags, state expected after the packet)."""
    port = open_flow(dp)
    assert flow(dp, HOST1, SRV, 40000, 80).state == CtState.SYN_SENT
    for i, (direction, flags, expected) in enumerate(steps):
        run = dp.inside(tcp_out(dp, flags)) if direction == "o" else dp.outside(tcp_in(dp, flags, port))
        assert run.retval == XDP_REDIRECT, f"step {i} ({direction} {flags})"
        assert_checksums_valid(run.data)
        state = CtState(flow(dp, HOST1, SRV, 40000, 80).state)
        assert state == expected, f"after step {i} ({direction} {flags}): {state.name}"


S = CtState


@pytest.mark.parametrize("steps", [
    pytest.param([("r", "SA", S.SYN_RECV), ("o", "A", S.ESTABLISHED), ("o", "FA", S.FIN_WAIT),
                  ("r", "A", S.FIN_WAIT), ("r", "FA", S.LAST_ACK), ("o", "A", S.TIME_WAIT)],
                 id="inside-closes-first"),
    pytest.param([("r", "SA", S.SYN_RECV), ("o", "A", S.ESTABLISHED), ("o", "PA", S.ESTABLISHED),
                  ("r", "FA", S.CLOSE_WAIT), ("o", "A", S.CLOSE_WAIT), ("o", "FA", S.LAST_ACK),
                  ("r", "A", S.TIME_WAIT)], id="remote-closes-first"),
    pytest.param([("r", "SA", S.SYN_RECV), ("o", "A", S.ESTABLISHED), ("o", "R", S.CLOSE)], id="rst-inside"),
    pytest.param([("r", "SA", S.SYN_RECV), ("o", "A", S.ESTABLISHED), ("r", "RA", S.CLOSE)], id="rst-remote"),
    pytest.param([("r", "R", S.CLOSE)], id="rst-refused"),
    pytest.param([("r", "S", S.SYN_RECV), ("o", "SA", S.SYN_RECV), ("r", "A", S.ESTABLISHED)],
                 id="simultaneous-open"),
    pytest.param([("r", "SA", S.SYN_RECV), ("o", "A", S.ESTABLISHED), ("o", "FA", S.FIN_WAIT),
                  ("r", "FA", S.LAST_ACK), ("o", "A", S.TIME_WAIT), ("o", "S", S.SYN_SENT)],
                 id="tuple-reused-after-time-wait"),
])
def test_tcp_state_machine(dp: NatDatapath, steps: list[tuple[str, str, CtState]]) -> None:
    _walk(dp, steps)


def test_established_sets_assured_and_counts_once(dp: NatDatapath) -> None:
    port = open_flow(dp)
    with dp.counting() as d:
        dp.outside(tcp_in(dp, "SA", port))
        dp.inside(tcp_out(dp, "A"))
        dp.inside(tcp_out(dp, "A"))
    entry = flow(dp, HOST1, SRV, 40000, 80)
    assert entry.flags == CtFlags.REPLIED | CtFlags.ASSURED
    assert d[Stat.CT_ESTABLISHED] == 1


def test_fin_flags_recorded(dp: NatDatapath) -> None:
    port = open_flow(dp)
    dp.outside(tcp_in(dp, "SA", port))
    dp.inside(tcp_out(dp, "A"))
    dp.inside(tcp_out(dp, "FA"))
    assert flow(dp, HOST1, SRV, 40000, 80).flags & CtFlags.FIN_ORIG
    dp.outside(tcp_in(dp, "FA", port))
    assert flow(dp, HOST1, SRV, 40000, 80).flags & CtFlags.FIN_REPLY


def test_mid_stream_packet_opens_established_flow(dp: NatDatapath) -> None:
    """A flow picked up mid-stream (table flushed) is taken as established, like conntrack's tcp_loose."""
    run = dp.inside(tcp_out(dp, "PA"))
    assert run.retval == XDP_REDIRECT
    assert flow(dp, HOST1, SRV, 40000, 80).state == CtState.ESTABLISHED


def test_rst_without_flow_dropped(dp: NatDatapath) -> None:
    frame = tcp_out(dp, "R")
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d[Stat.DROP_NO_MAPPING] == 1 and d[Stat.CT_NEW] == 0
    assert dp.flows() == []


# =========================================================================================== UDP, ICMP


def test_udp_translated_both_ways(dp: NatDatapath) -> None:
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / UDP(sport=5353, dport=53) / b"query")
    run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    out = Ether(run.data)
    assert out[IP].src == GW_OUT and out[UDP].chksum != 0
    port = out[UDP].sport
    assert NAT_PORTS[0] <= port <= NAT_PORTS[1]
    assert_checksums_valid(run.data)
    assert flow(dp, HOST1, SRV, 5353, 53, UDP_P).state == CtState.NONE

    reply = bytes(eth_out(dp) / IP(src=SRV, dst=GW_OUT) / UDP(sport=53, dport=port) / b"answer")
    run = dp.outside(reply)
    assert run.retval == XDP_REDIRECT
    back = Ether(run.data)
    assert (back[IP].dst, back[UDP].dport, back[UDP].sport) == (HOST1, 5353, 53)
    assert bytes(back[UDP].payload) == b"answer"
    assert_checksums_valid(run.data)
    entry = flow(dp, HOST1, SRV, 5353, 53, UDP_P)
    assert entry.flags == CtFlags.REPLIED | CtFlags.ASSURED  # UDP: a reply assures the flow


def test_udp_zero_checksum_stays_zero(dp: NatDatapath) -> None:
    """RFC 768: checksum 0 means 'none'; it must not become a (wrong) checksum."""
    pkt = eth_in(dp) / IP(src=HOST1, dst=SRV) / UDP(sport=5353, dport=53, chksum=0) / b"query"
    run = dp.inside(bytes(pkt))
    assert run.retval == XDP_REDIRECT
    out = Ether(run.data)
    assert out[UDP].chksum == 0 and out[IP].src == GW_OUT
    port = out[UDP].sport
    reply = eth_out(dp) / IP(src=SRV, dst=GW_OUT) / UDP(sport=53, dport=port, chksum=0) / b"answer"
    run = dp.outside(bytes(reply))
    assert run.retval == XDP_REDIRECT
    back = Ether(run.data)
    assert back[UDP].chksum == 0 and (back[IP].dst, back[UDP].dport) == (HOST1, 5353)
    assert_checksums_valid_ip_only(run.data)


def assert_checksums_valid_ip_only(frame: bytes) -> None:
    pkt = Ether(frame)
    fresh = pkt.copy()
    del fresh[IP].chksum
    assert Ether(bytes(fresh))[IP].chksum == pkt[IP].chksum


def _udp_payload_for_translated_zero_sum(src: str, sport: int, dst: str, dport: int, body: bytes) -> bytes:
    """A payload whose UDP checksum, once the packet carries src/sport, computes to 0 (sent as 0xffff)."""
    probe = IP(bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / (b"\x00\x00" + body)))
    word = probe[UDP].chksum  # ~sum with the word at 0: a word equal to it makes the sum 0xffff
    payload = struct.pack("!H", word) + body
    check = IP(bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload))
    assert check[UDP].chksum == 0xFFFF
    return payload


def test_udp_checksum_that_becomes_zero_is_sent_as_ffff(dp: NatDatapath) -> None:
    """RFC 768: a computed 0 is transmitted as 0xffff; 0 would mean 'no checksum'."""
    payload = _udp_payload_for_translated_zero_sum(GW_OUT, 25001, SRV, 53, b"abcdef")
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / UDP(sport=25001, dport=53) / payload)
    assert Ether(frame)[UDP].chksum not in (0, 0xFFFF)
    run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    out = Ether(run.data)
    assert (out[IP].src, out[UDP].sport) == (GW_OUT, 25001)
    assert out[UDP].chksum == 0xFFFF

    # and the same on the way back: the reply's checksum becomes 0 once translated to the inside
    back_payload = _udp_payload_for_translated_zero_sum(SRV, 53, HOST1, 25001, b"ghijkl")
    reply = bytes(eth_out(dp) / IP(src=SRV, dst=GW_OUT) / UDP(sport=53, dport=25001) / back_payload)
    run = dp.outside(reply)
    assert run.retval == XDP_REDIRECT
    back = Ether(run.data)
    assert (back[IP].dst, back[UDP].dport) == (HOST1, 25001)
    assert back[UDP].chksum == 0xFFFF


def test_icmp_echo_identifier_translated(dp: NatDatapath) -> None:
    req = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / ICMP(type=8, id=7, seq=1) / b"ping-data")
    run = dp.inside(req)
    assert run.retval == XDP_REDIRECT
    out = Ether(run.data)
    ext_id = out[ICMP].id
    assert out[IP].src == GW_OUT and NAT_PORTS[0] <= ext_id <= NAT_PORTS[1]
    assert (out[ICMP].type, out[ICMP].seq, bytes(out[ICMP].payload)) == (8, 1, b"ping-data")
    assert_checksums_valid(run.data)
    entry = flow(dp, HOST1, SRV, 7, 0, ICMP_P)
    assert entry.nat_port_host == ext_id and entry.state == CtState.NONE

    rep = bytes(eth_out(dp) / IP(src=SRV, dst=GW_OUT) / ICMP(type=0, id=ext_id, seq=1) / b"ping-data")
    with dp.counting() as d:
        run = dp.outside(rep)
    assert run.retval == XDP_REDIRECT
    back = Ether(run.data)
    assert (back[IP].dst, back[ICMP].type, back[ICMP].id, back[ICMP].seq) == (HOST1, 0, 7, 1)
    assert_checksums_valid(run.data)
    assert d[Stat.DNAT_IN] == 1
    assert flow(dp, HOST1, SRV, 7, 0, ICMP_P).flags == CtFlags.REPLIED | CtFlags.ASSURED


def test_icmp_timestamp_query_translated_both_ways(dp: NatDatapath) -> None:
    """RFC 5508 REQ-1: ICMP timestamp requests (13) and replies (14) are translated like echo, by their
    identifier (what conntrack does); the 12 bytes of timestamps are left alone."""
    stamps = struct.pack("!III", 1000, 0, 0)
    req = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / ICMP(type=13, id=9, seq=3) / stamps)
    run = dp.inside(req)
    assert run.retval == XDP_REDIRECT
    out = Ether(run.data)
    ext_id = out[ICMP].id
    assert (out[IP].src, out[ICMP].type, out[ICMP].seq, bytes(out[ICMP].payload)) == (GW_OUT, 13, 3, stamps)
    assert_checksums_valid(run.data)
    assert flow(dp, HOST1, SRV, 9, 0, ICMP_P).nat_port_host == ext_id
    answer = struct.pack("!III", 1000, 2000, 2001)
    rep = bytes(eth_out(dp) / IP(src=SRV, dst=GW_OUT) / ICMP(type=14, id=ext_id, seq=3) / answer)
    run = dp.outside(rep)
    assert run.retval == XDP_REDIRECT
    back = Ether(run.data)
    assert (back[IP].dst, back[ICMP].type, back[ICMP].id, bytes(back[ICMP].payload)) == (HOST1, 14, 9, answer)
    assert_checksums_valid(run.data)


@pytest.mark.parametrize("icmp_type", [15, 17], ids=["information-request", "address-mask-request"])
def test_deprecated_icmp_queries_are_not_translated(dp: NatDatapath, icmp_type: int) -> None:
    """RFC 6918 deprecates information and address mask requests: bound for the internet, they are
    dropped (natd cannot translate them), never forwarded with a private source."""
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / ICMP(type=icmp_type, id=9, seq=1) / bytes(8))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d[Stat.DROP_UNSUPPORTED] == 1


def test_icmp_identifier_in_range_kept(dp: NatDatapath) -> None:
    run = dp.inside(bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / ICMP(type=8, id=21000, seq=1)))
    assert Ether(run.data)[ICMP].id == 21000


def test_df_bit_alone_is_not_a_fragment(dp: NatDatapath) -> None:
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV, flags="DF") / TCP(sport=40000, dport=80, flags="S"))
    run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    assert Ether(run.data)[IP].flags == "DF"
    assert_checksums_valid(run.data)


def test_ethernet_padding_is_left_alone(dp: NatDatapath) -> None:
    """A short packet padded to the 60-byte Ethernet minimum: checksums cover the IP packet only."""
    pkt = eth_in(dp) / IP(src=HOST1, dst=SRV) / UDP(sport=5353, dport=53) / b"x"
    frame = bytes(pkt) + b"\xaa" * (60 - len(pkt))
    run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    assert run.data[len(pkt):] == frame[len(pkt):]
    assert_checksums_valid(run.data)


# ========================================================================= address and port allocation


def test_paired_pooling(dp: NatDatapath) -> None:
    """RFC 4787 REQ-2: an inside host always gets the same external address; hosts spread over the pool."""
    chosen: dict[str, set[str]] = {}
    for h in range(50):
        host = f"10.1.{(h * 37) % 256}.{h + 10}"
        for i in range(4):
            run = dp.inside(syn(dp, src=host, sport=41000 + i, dst=f"198.51.100.{10 + i}", dport=443 + i))
            assert run.retval == XDP_REDIRECT
            assert_checksums_valid(run.data)
            chosen.setdefault(host, set()).add(Ether(run.data)[IP].src)
    assert all(len(addrs) == 1 for addrs in chosen.values()), {h: a for h, a in chosen.items() if len(a) > 1}
    assert set().union(*chosen.values()) == set(POOL)
    entry = flow(dp, "10.1.0.10", SRV, 41000, 443)
    assert entry.rule_id == 1 and str(entry.nat_ip) in POOL


def test_pool_address_replies_translated_back(dp: NatDatapath) -> None:
    run = dp.inside(syn(dp, src="10.1.7.7", sport=41000))
    out = Ether(run.data)
    ext, port = out[IP].src, out[TCP].sport
    assert ext in POOL
    run = dp.outside(tcp_in(dp, "SA", port, dst=ext))
    assert run.retval == XDP_REDIRECT  # 10.1.0.0/16 is routed via host1 (a PERMANENT neighbour)
    back = Ether(run.data)
    assert (back[IP].dst, back[TCP].dport, back.dst) == ("10.1.7.7", 41000, dp.mac["host1"])
    assert_checksums_valid(run.data)


def test_external_port_belongs_to_one_endpoint(dp: NatDatapath) -> None:
    """Endpoint-independent mapping (RFC 4787 REQ-1): an external port belongs to one inside endpoint
    (port_owners), so a second host with the same inside port gets another port even towards another
    destination, and then keeps it towards every destination, the first host's included. Replies go to
    the right host each."""
    a = open_flow(dp, src=HOST1, sport=25000, dst=SRV)
    b = open_flow(dp, src="10.0.1.43", sport=25000, dst=SRV2)
    assert a == 25000 and b != 25000
    assert open_flow(dp, src="10.0.1.43", sport=25000, dst=SRV) == b
    assert open_flow(dp, src="10.0.1.43", sport=25000, dst=SRV, dport=8080) == b
    assert open_flow(dp, src=HOST1, sport=25000, dst=SRV2) == 25000
    # many hosts to one destination: all external ports distinct
    ports = [open_flow(dp, src=f"10.0.3.{i}", sport=25000, dst=SRV) for i in range(1, 40)]
    assert len({*ports, a, b}) == len(ports) + 2
    run = dp.outside(tcp_in(dp, "SA", b, src=SRV2))
    assert (Ether(run.data)[IP].dst, Ether(run.data)[TCP].dport) == ("10.0.1.43", 25000)
    run = dp.outside(tcp_in(dp, "SA", 25000, src=SRV2))
    assert (Ether(run.data)[IP].dst, Ether(run.data)[TCP].dport) == (HOST1, 25000)


def test_port_exhaustion(dp: NatDatapath) -> None:
    """Rule 2 has four ports: the fifth flow to one destination is dropped and counted, others go on."""
    ports = []
    for i in range(4):
        run = dp.inside(syn(dp, src="10.2.0.5", sport=40000 + i))
        assert run.retval == XDP_REDIRECT
        out = Ether(run.data)
        assert out[IP].src == TINY_POOL_ADDR
        ports.append(out[TCP].sport)
    assert sorted(ports) == list(range(TINY_PORTS[0], TINY_PORTS[1] + 1))
    frame = syn(dp, src="10.2.0.5", sport=40004)
    with dp.counting() as d:
        run = dp.inside(frame)
    # RFC 5508 REQ-8: the host hears at once that no session can be made (from in1's address: 10.2.0.0/16
    # is routed via host1)
    assert_refused_with_icmp(run, frame, "10.0.1.1")
    assert d.nonzero() == {"XDP_REDIRECT": 1, "DROP_PORT_EXHAUSTED": 1, "ICMP_UNREACH_SENT": 1}
    assert dp.flow("10.2.0.5", SRV, 40004, 80, TCP_P) is None
    assert len(dp.tables.reply_index()) == 4, "a failed allocation leaves no reply half behind"
    # another destination has all four ports free
    assert dp.inside(syn(dp, src="10.2.0.5", sport=40004, dst=SRV2)).retval == XDP_REDIRECT
    # existing flows are not disturbed
    assert Ether(dp.inside(tcp_out(dp, "A", src="10.2.0.5", sport=40000)).data)[TCP].sport == ports[0]
    # freeing one mapping makes room again
    dp.tables.delete_flows([(k, e) for k, e in dp.flows() if k.src_port == 40001 and str(k.dst) == SRV])
    run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT and Ether(run.data)[TCP].sport == ports[1]


def test_conntrack_table_full(dp: NatDatapath) -> None:
    """RFC 6888 REQ-11: a full table refuses new flows and keeps translating the existing ones."""
    frames = [syn(dp, sport=20000 + (i % 10000), dst=f"198.51.{100 + i // 10000}.{1 + (i // 100) % 200}",
                  dport=1000 + i % 100) for i in range(CT_MAX)]
    runs = dp.run_many("xdp_inside", frames, "in1")
    assert [r.retval for r in runs].count(XDP_REDIRECT) == CT_MAX
    assert len(dp.flows()) == CT_MAX
    extra = syn(dp, sport=30500, dst="198.51.100.250")
    with dp.counting() as d:
        run = dp.inside(extra)
    assert_refused_with_icmp(run, extra, GW_IN1)  # RFC 5508 REQ-8
    assert d[Stat.DROP_TABLE_FULL] == 1 and d[Stat.ICMP_UNREACH_SENT] == 1 and d[Stat.CT_NEW] == 0
    assert len(dp.tables.reply_index()) == CT_MAX, "no reply half without its entry"
    # existing flows still translate, both ways
    first = Ether(runs[0].data)
    run = dp.inside(tcp_out(dp, "A", sport=20000, dst=first[IP].dst, dport=first[TCP].dport))
    assert run.retval == XDP_REDIRECT and Ether(run.data)[TCP].sport == first[TCP].sport
    run = dp.outside(tcp_in(dp, "SA", first[TCP].sport, src=first[IP].dst, sport=first[TCP].dport))
    assert run.retval == XDP_REDIRECT and Ether(run.data)[TCP].dport == 20000
    # one flow gone: room for one more
    dp.tables.delete_flows(dp.flows()[:1])
    assert dp.inside(extra).retval == XDP_REDIRECT
    last = syn(dp, sport=30501, dst="198.51.100.251")
    assert_refused_with_icmp(dp.inside(last), last, GW_IN1)


# ================================================================================ outside: unsolicited


def test_unsolicited_syn_in_nat_range_dropped(dp: NatDatapath) -> None:
    frame = tcp_in(dp, "S", 25000, sport=51000)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_NO_MAPPING": 1}
    assert dp.flows() == []


def test_unsolicited_to_pool_address_dropped(dp: NatDatapath) -> None:
    frame = tcp_in(dp, "S", 25000, dst=POOL[1], sport=51000)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d[Stat.DROP_NO_MAPPING] == 1


@pytest.mark.parametrize("dport", [22, 1, 19999, 30000, 65535])
def test_gateway_ports_outside_nat_range_passed(dp: NatDatapath, dport: int) -> None:
    frame = tcp_in(dp, "S", dport, sport=51000)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d.nonzero() == {"XDP_PASS": 1, "PASS_LOCAL": 1}


def test_mapping_filters_by_remote_endpoint(dp: NatDatapath) -> None:
    """Endpoint-dependent filtering: only the remote the flow went to may use the mapping."""
    port = open_flow(dp)
    for src, sport in ((SRV, 81), (SRV2, 80)):
        frame = tcp_in(dp, "SA", port, src=src, sport=sport)
        with dp.counting() as d:
            run = dp.outside(frame)
        assert_untouched(run, frame, XDP_DROP)
        assert d[Stat.DROP_NO_MAPPING] == 1
    assert flow(dp, HOST1, SRV, 40000, 80).packets_reply == 0


def test_inbound_to_private_address_dropped(dp: NatDatapath) -> None:
    frame = tcp_in(dp, "S", 22, dst=HOST1)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_TO_PRIVATE": 1}


def test_inbound_transit_passed(dp: NatDatapath) -> None:
    frame = tcp_in(dp, "S", 80, dst="198.51.100.99")
    run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)


def test_echo_request_to_gateway_passed(dp: NatDatapath) -> None:
    """The gateway answers pings itself."""
    frame = bytes(eth_out(dp) / IP(src=SRV, dst=GW_OUT) / ICMP(type=8, id=21000, seq=1))
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d.nonzero() == {"XDP_PASS": 1, "PASS_ICMP_OTHER": 1}


def test_echo_reply_for_gateways_own_ping_passed(dp: NatDatapath) -> None:
    frame = bytes(eth_out(dp) / IP(src=SRV, dst=GW_OUT) / ICMP(type=0, id=21000, seq=1))
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d[Stat.PASS_LOCAL] == 1


def test_outside_unknown_fragment_and_options_passed_untouched(dp: NatDatapath) -> None:
    port = open_flow(dp)
    for ip, reason in ((IP(src=SRV, dst=GW_OUT, frag=100), Stat.PASS_FRAG_UNKNOWN),
                       (IP(src=SRV, dst=GW_OUT, options=[IPOption_Router_Alert()]), Stat.PASS_UNSUPPORTED)):
        frame = bytes(eth_out(dp) / ip / TCP(sport=80, dport=port, flags="A"))
        with dp.counting() as d:
            run = dp.outside(frame)
        assert_untouched(run, frame, XDP_PASS)
        assert d[reason] == 1


def test_outside_reply_with_ttl_1_passed_untouched(dp: NatDatapath) -> None:
    port = open_flow(dp)
    frame = tcp_in(dp, "SA", port, ttl=1)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d[Stat.PASS_TTL] == 1
    assert flow(dp, HOST1, SRV, 40000, 80).state == CtState.SYN_SENT


def test_outside_unresolved_inside_neighbour_translated_then_passed(dp: NatDatapath) -> None:
    """10.0.1.43 has no neighbour entry: translated back, then the kernel resolves and forwards it."""
    port = open_flow(dp, src="10.0.1.43")
    frame = tcp_in(dp, "SA", port)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert run.retval == XDP_PASS
    out = Ether(run.data)
    assert (out[IP].dst, out[TCP].dport) == ("10.0.1.43", 40000)
    assert out[IP].ttl == 57 and (out.src, out.dst) == (dp.mac["inet"], dp.mac["out0"])
    assert_checksums_valid(run.data)
    assert d.nonzero() == {"XDP_PASS": 1, "DNAT_IN": 1, "PASS_NO_NEIGH": 1}


@pytest.mark.parametrize("entry", ["inside", "outside"])
def test_not_ipv4_passed(dp: NatDatapath, entry: str) -> None:
    eth = eth_in(dp) if entry == "inside" else eth_out(dp)
    frames = [bytes(eth / ARP(op=1, psrc=HOST1, pdst=GW_IN1)),
              bytes(eth / IPv6(src="fe80::1", dst="ff02::1") / UDP(sport=546, dport=547))]
    for frame in frames:
        with dp.counting() as d:
            run = dp.inside(frame) if entry == "inside" else dp.outside(frame)
        assert_untouched(run, frame, XDP_PASS)
        assert d[Stat.PASS_NOT_IPV4] == 1


# ============================================================================== inside: not translated


def test_spoofed_inside_source_dropped(dp: NatDatapath) -> None:
    frame = syn(dp, src="172.16.0.5")
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_SPOOFED_INSIDE": 1}
    assert dp.flows() == []


def test_traffic_to_gateway_passed(dp: NatDatapath) -> None:
    frame = syn(dp, dst=GW_IN1, dport=22)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d.nonzero() == {"XDP_PASS": 1, "PASS_LOCAL": 1}


def test_inside_to_inside_passed(dp: NatDatapath) -> None:
    frame = syn(dp, dst="10.0.2.80")
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d[Stat.PASS_INSIDE_ROUTE] == 1
    assert dp.flows() == []


@pytest.mark.parametrize("ttl", [0, 1])
def test_expiring_ttl_passed(dp: NatDatapath, ttl: int) -> None:
    """The kernel answers with Time Exceeded (traceroute through the gateway)."""
    frame = syn(dp, ttl=ttl)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d.nonzero() == {"XDP_PASS": 1, "PASS_TTL": 1}


@pytest.mark.parametrize("ip,reason", [
    pytest.param(IP(src=HOST1, dst=SRV, options=[IPOption_Router_Alert()]), "DROP_UNSUPPORTED",
                 id="ihl6-options"),
    pytest.param(IP(src=HOST1, dst=SRV, frag=185), "DROP_FRAG_UNKNOWN", id="later-fragment-first-unseen"),
])
def test_untranslatable_ip_bound_outside_dropped(dp: NatDatapath, ip: IP, reason: str) -> None:
    """First fragments are translated (tests/bpf/test_fragments.py); these never are."""
    frame = bytes(eth_in(dp) / ip / TCP(sport=40000, dport=80, flags="S"))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, reason: 1}


@pytest.mark.parametrize("l4", [
    pytest.param(ICMP(type=0, id=5), id="icmp-echo-reply"),
    pytest.param(ICMP(type=8, code=1, id=5), id="icmp-echo-bad-code"),
    pytest.param(Raw(b"\x00" * 24), id="gre"),
])
def test_untranslatable_protocol_bound_outside_dropped(dp: NatDatapath, l4: Packet) -> None:
    ip = IP(src=HOST1, dst=SRV, proto=47) if isinstance(l4, Raw) else IP(src=HOST1, dst=SRV)
    frame = bytes(eth_in(dp) / ip / l4)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d[Stat.DROP_UNSUPPORTED] == 1


@pytest.mark.parametrize("icmp_type", [3, 11, 12])
def test_icmp_error_without_quoted_packet_dropped(dp: NatDatapath, icmp_type: int) -> None:
    """An ICMP error that quotes nothing natd could translate is never forwarded with a private source."""
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / ICMP(type=icmp_type, code=0))
    run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert dp.flows() == []


def test_too_big_with_df_passed_for_frag_needed(dp: NatDatapath) -> None:
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV, flags="DF") / UDP(sport=5353, dport=53) / (b"x" * 1500))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d[Stat.PASS_FRAG_NEEDED] == 1


def test_too_big_without_df_translated_and_passed_for_fragmentation(dp: NatDatapath) -> None:
    """RFC 4787 REQ-13a: a DF=0 datagram too big for out0 (1528 > 1500) is translated like any packet and
    handed to the kernel, which fragments and forwards it; nothing leaves untranslated. MACs and TTL are
    the kernel's to change (it forwards it). The reply comes back through the mapping it created."""
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV, id=0x0d0d) / UDP(sport=5353, dport=53) / (b"x" * 1500))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_PASS
    out = Ether(run.data)
    assert d.nonzero() == {"XDP_PASS": 1, "SNAT_OUT": 1, "PASS_FRAGMENT_OUT": 1, "CT_NEW": 1}
    assert (out[IP].src, out[IP].dst, out[UDP].dport) == (GW_OUT, SRV, 53)
    assert NAT_PORTS[0] <= out[UDP].sport <= NAT_PORTS[1]
    assert (out[IP].ttl, out[IP].id, out[IP].flags.DF) == (64, 0x0d0d, 0)
    assert (out.src, out.dst) == (Ether(frame).src, Ether(frame).dst)
    assert changed_offsets(frame, run.data) <= {24, 25, 26, 27, 28, 29, 34, 35, 40, 41}
    assert_checksums_valid(run.data)
    entry = flow(dp, HOST1, SRV, 5353, 53, UDP_P)
    assert (str(entry.nat_ip), entry.nat_port_host) == (GW_OUT, out[UDP].sport) and entry.packets_orig == 1
    # the flow's next packets, small ones, are redirected as usual; replies come back
    small = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / UDP(sport=5353, dport=53) / b"q")
    assert Ether(dp.inside(small).data)[UDP].sport == out[UDP].sport
    reply = eth_out(dp) / IP(src=SRV, dst=GW_OUT) / UDP(sport=53, dport=out[UDP].sport) / b"a"
    run = dp.outside(bytes(reply))
    assert run.retval == XDP_REDIRECT
    assert (Ether(run.data)[IP].dst, Ether(run.data)[UDP].dport) == (HOST1, 5353)


def test_too_big_tcp_segment_of_an_existing_flow_without_df_passed_translated(dp: NatDatapath) -> None:
    port = open_flow(dp)
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / TCP(sport=40000, dport=80, flags="A") / (b"t" * 1480))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_PASS
    assert d.nonzero() == {"XDP_PASS": 1, "SNAT_OUT": 1, "PASS_FRAGMENT_OUT": 1}
    out = Ether(run.data)
    assert (out[IP].src, out[TCP].sport, out[IP].ttl) == (GW_OUT, port, 64)
    assert_checksums_valid(run.data)


def test_too_big_fragments_without_df_translated_and_passed(dp: NatDatapath) -> None:
    """A datagram an inside host fragmented for its own 1600-byte link: the first fragment (by its ports) and
    the later ones (by what natd remembered of the first) are translated; the too-big ones go to the kernel
    to be fragmented again, the last, small one is redirected."""
    frags = fragment(IP(src=HOST1, dst=SRV, id=0x2e2e, ttl=64) / UDP(sport=40030, dport=53) / (b"f" * 3500),
                     fragsize=1576)
    assert len(frags) == 3 and len(frags[0]) > 1500 and len(frags[1]) > 1500 and len(frags[2]) < 1500
    runs = []
    with dp.counting() as d:
        for f in frags:
            runs.append(dp.inside(bytes(eth_in(dp) / f)))
    assert [r.retval for r in runs] == [XDP_PASS, XDP_PASS, XDP_REDIRECT]
    assert d[Stat.PASS_FRAGMENT_OUT] == 2 and d[Stat.FRAG_TRANSLATED] == 2 and d[Stat.SNAT_OUT] == 1
    assert {Ether(r.data)[IP].src for r in runs} == {GW_OUT}
    assert [Ether(r.data)[IP].ttl for r in runs] == [64, 64, 63]
    for r in runs:
        assert_checksums_valid_ip_only(r.data)


def test_too_big_icmp_error_without_df_dropped(dp: NatDatapath) -> None:
    """An ICMP error is at most 576 bytes (RFC 1812): a 1528-byte one from inside is never forwarded."""
    quoted = IP(src=SRV, dst=HOST1) / UDP(sport=53, dport=5353)
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / ICMP(type=3, code=3) / bytes(quoted) / (b"e" * 1472))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_FRAG_NEEDED_NO_DF": 1}


def test_too_big_inside_to_inside_passed(dp: NatDatapath) -> None:
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst="10.0.2.80") / UDP(sport=5353, dport=53) / (b"x" * 1500))
    run = dp.inside(frame)
    assert_untouched(run, frame, XDP_PASS)


def test_unresolved_next_hop_translated_and_passed(dp: NatDatapath) -> None:
    """FIB lookup NO_NEIGH (next hop 203.0.113.5 has no neighbour entry): the packet is translated and
    handed to the kernel, which resolves the neighbour; it must not be redirected with unknown MACs.
    Checked for the first packet of a flow (which creates the entry) and for a later one."""
    for i, flags in enumerate(("S", "A")):
        frame = tcp_out(dp, flags, dst=UNRESOLVED)
        with dp.counting() as d:
            run = dp.inside(frame)
        out = Ether(run.data)
        assert run.retval == XDP_PASS, (f"packet {i} ({flags}): verdict {run.retval}, expected XDP_PASS; "
                                        f"out MACs {out.src} -> {out.dst}, counters {d.nonzero()}")
        assert (out[IP].src, out[IP].ttl) == (GW_OUT, 64), f"packet {i}: translated, not yet forwarded"
        assert (out.src, out.dst) == (Ether(frame).src, Ether(frame).dst), f"packet {i}: MACs untouched"
        assert_checksums_valid(run.data)
        assert d[Stat.PASS_NO_NEIGH] == 1


# =========================================================================================== malformed


def _reply_frame(dp: NatDatapath) -> bytes:
    port = open_flow(dp)
    return bytes(eth_out(dp) / IP(src=SRV, dst=GW_OUT) / TCP(sport=80, dport=port, flags="SA") / b"data")


@pytest.mark.parametrize("entry", ["inside", "outside"])
def test_truncated_frames_never_rewritten(dp: NatDatapath, entry: str) -> None:
    full = syn(dp, payload=b"data") if entry == "inside" else _reply_frame(dp)
    run_fn: Callable[[bytes], Run] = dp.inside if entry == "inside" else dp.outside
    flows_before = len(dp.flows())
    for cut in range(len(full)):
        frame = full[:cut]
        try:
            run = run_fn(frame)
        except BpfError:
            assert cut < 14, f"test run refused a {cut}-byte frame"  # the kernel wants an Ethernet header
            continue
        assert run.retval in (XDP_DROP, XDP_PASS), f"cut at {cut}: verdict {run.retval}"
        assert run.data == frame, f"cut at {cut}: rewritten"
    assert len(dp.flows()) == flows_before, "no flow was created from a truncated frame"


@pytest.mark.parametrize("entry", ["inside", "outside"])
@pytest.mark.parametrize("mangle", ["ihl0", "ihl4", "ihl15", "len-too-long", "len-below-ihl", "version6"])
def test_bad_ip_header_dropped_untouched(dp: NatDatapath, entry: str, mangle: str) -> None:
    if entry == "inside":
        eth, ip = eth_in(dp, 0x0800), IP(src=HOST1, dst=SRV)
    else:
        eth, ip = eth_out(dp, 0x0800), IP(src=SRV, dst=GW_OUT)
    raw_ip = bytearray(bytes(ip / TCP(sport=40000, dport=80, flags="S")))
    if mangle.startswith("ihl"):
        raw_ip[0] = 0x40 | int(mangle[3:])
    elif mangle == "len-too-long":
        raw_ip[2:4] = struct.pack("!H", len(raw_ip) + 1)
    elif mangle == "len-below-ihl":
        raw_ip[2:4] = struct.pack("!H", 19)
    else:
        raw_ip[0] = 0x65
    frame = bytes(eth / Raw(bytes(raw_ip)))
    with dp.counting() as d:
        run = dp.inside(frame) if entry == "inside" else dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_MALFORMED": 1}


def test_tcp_data_offset_below_5_dropped(dp: NatDatapath) -> None:
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / TCP(sport=40000, dport=80, flags="S", dataofs=4))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d[Stat.DROP_MALFORMED] == 1


def test_tcp_data_offset_beyond_segment_dropped(dp: NatDatapath) -> None:
    """Data offset 15 (60-byte header) in a 20-byte segment: receivers and conntrack call it malformed."""
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / TCP(sport=40000, dport=80, flags="S", dataofs=15))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d[Stat.DROP_MALFORMED] == 1 and dp.flows() == []


@pytest.mark.parametrize("udp_len", [0, 7, 14])
def test_bad_udp_length_dropped(dp: NatDatapath, udp_len: int) -> None:
    """UDP length below the header size or beyond the datagram (here 13 bytes: header + 'query')."""
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / UDP(sport=5353, dport=53, len=udp_len) / b"query")
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d[Stat.DROP_MALFORMED] == 1 and dp.flows() == []


def test_udp_length_shorter_than_datagram_translated(dp: NatDatapath) -> None:
    """A UDP length short of the IP payload is legal (trailing bytes inside the datagram are ignored)."""
    frame = bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / UDP(sport=5353, dport=53, len=9) / b"query")
    run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT and Ether(run.data)[IP].src == GW_OUT


@pytest.mark.parametrize("entry", ["inside", "outside"])
@pytest.mark.parametrize("proto,l4_len", [
    pytest.param(TCP_P, 10, id="tcp-header-cut-by-ip-length"),
    pytest.param(UDP_P, 4, id="udp-header-cut-by-ip-length"),
    pytest.param(UDP_P, 0, id="udp-empty-ip-payload"),
    pytest.param(ICMP_P, 4, id="icmp-header-cut-by-ip-length"),
])
def test_l4_header_beyond_ip_total_length_dropped(dp: NatDatapath, entry: str, proto: int,
                                                  l4_len: int) -> None:
    """The IP total length says the L4 header is cut short; the bytes that would complete it are Ethernet
    padding (here: a copy of a real header). Such a packet is malformed and must not be translated: the
    rewrite would patch bytes outside the IP packet and create a flow from garbage."""
    if entry == "inside":
        eth, ip = eth_in(dp, 0x0800), IP(src=HOST1, dst=SRV)
        l4: Packet = {TCP_P: TCP(sport=40000, dport=80, flags="S"), UDP_P: UDP(sport=5353, dport=53),
                      ICMP_P: ICMP(type=8, id=7)}[proto]
    else:
        port = open_flow(dp)
        run = dp.inside(bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / UDP(sport=5353, dport=53)))
        uport = Ether(run.data)[UDP].sport
        run = dp.inside(bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / ICMP(type=8, id=7)))
        icmp_id = Ether(run.data)[ICMP].id
        eth, ip = eth_out(dp, 0x0800), IP(src=SRV, dst=GW_OUT)
        l4 = {TCP_P: TCP(sport=80, dport=port, flags="SA"), UDP_P: UDP(sport=53, dport=uport),
              ICMP_P: ICMP(type=0, id=icmp_id)}[proto]
    full = bytearray(bytes(ip / l4))
    full[2:4] = struct.pack("!H", 20 + l4_len)           # total length cuts the L4 header
    full[10:12] = struct.pack("!H", _ip_csum(bytes(full[:20])))  # keep the IP header checksum valid
    frame = bytes(eth / Raw(bytes(full)))
    frame += b"\x00" * max(0, 60 - len(frame))
    flows_before = len(dp.flows())
    with dp.counting() as d:
        run = dp.inside(frame) if entry == "inside" else dp.outside(frame)
    assert run.retval == XDP_DROP, f"verdict {run.retval}, counters {d.nonzero()}"
    assert run.data == frame, f"rewritten at offsets {sorted(changed_offsets(frame, run.data))}"
    assert d[Stat.DROP_MALFORMED] == 1
    assert len(dp.flows()) == flows_before


def _ip_csum(header: bytes) -> int:
    header = header[:10] + b"\x00\x00" + header[12:]
    return (~_ocsum(header)) & 0xFFFF


def _ocsum(data: bytes) -> int:
    """One's complement sum (folded, 0..0xffff) of data, padded to even length."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


# ===================================================================================== property (fuzz)
# fuzz: random frames through both entry points. NATD_FUZZ_EXAMPLES sets the example count (default 2000,
# about 10 s); the invariants are the datapath's safety rules, not its exact choices.

FUZZ_EXAMPLES = int(os.environ.get("NATD_FUZZ_EXAMPLES", "2000"))

INSIDE_SOURCES = [HOST1, "10.0.1.43", "10.1.0.10", "10.1.200.3", "10.2.0.5", "172.16.0.5", GW_IN1, SRV]
DESTINATIONS = [SRV, SRV2, GW_OUT, GW_IN1, HOST1, "10.0.2.80", POOL[0], TINY_POOL_ADDR, UNRESOLVED,
                "224.0.0.1", "255.255.255.255", "127.0.0.1", "0.0.0.0"]
OUTSIDE_SOURCES = [SRV, SRV2, "198.51.100.99", HOST1]
OUTSIDE_DESTS = [GW_OUT, POOL[0], POOL[1], TINY_POOL_ADDR, HOST1, "10.1.0.10", "198.51.100.99"]

# byte offsets the NAT may change: MACs, TTL, IP checksum, (inside) source / (outside) destination address,
# and per protocol the translated port/identifier and the L4 checksum
_L2_L3 = set(range(12)) | {22, 24, 25}
ALLOWED = {
    ("inside", TCP_P): _L2_L3 | {26, 27, 28, 29, 34, 35, 50, 51},
    ("inside", UDP_P): _L2_L3 | {26, 27, 28, 29, 34, 35, 40, 41},
    ("inside", ICMP_P): _L2_L3 | {26, 27, 28, 29, 36, 37, 38, 39},
    ("outside", TCP_P): _L2_L3 | {30, 31, 32, 33, 36, 37, 50, 51},
    ("outside", UDP_P): _L2_L3 | {30, 31, 32, 33, 36, 37, 40, 41},
    ("outside", ICMP_P): _L2_L3 | {30, 31, 32, 33, 36, 37, 38, 39},
}


def _l4_sum(frame: bytes) -> int:
    """One's complement sum over what the L4 checksum covers (TCP/UDP: with the pseudo-header)."""
    ip = frame[14:34]
    proto, tot = ip[9], struct.unpack("!H", ip[2:4])[0]
    seg = frame[34:14 + tot]
    if proto == ICMP_P:
        return _ocsum(seg)
    pseudo = ip[12:20] + struct.pack("!BBH", 0, proto, len(seg))
    return _ocsum(pseudo + seg)


def _translatable(frame: bytes, entry: str) -> int | None:
    """The IP protocol when frame is a well-formed IPv4 TCP/UDP/ICMP-echo packet natd may translate:
    Ethernet + IPv4 without options or fragmentation, TTL > 1 (inside), the L4 header inside the IP total
    length, TCP data offset from 5 to the end of the datagram, UDP length from 8 to the end of the datagram,
    ICMP echo request (inside) / reply (outside) with code 0."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] != 0x45:
        return None
    tot = struct.unpack("!H", frame[16:18])[0]
    frag = struct.unpack("!H", frame[20:22])[0]
    if tot < 20 or 14 + tot > len(frame) or frag & 0x1FFF:  # later fragments: _later_fragment()
        return None
    first_fragment = bool(frag & 0x2000)  # its UDP length covers the whole datagram
    if entry == "inside" and frame[22] <= 1:
        return None
    proto, l4_len = frame[23], tot - 20
    need = {TCP_P: 20, UDP_P: 8, ICMP_P: 8}.get(proto)
    if need is None or l4_len < need:
        return None
    if proto == TCP_P and not 5 <= frame[46] >> 4 <= l4_len // 4:
        return None
    udp_len = struct.unpack("!H", frame[38:40])[0] if proto == UDP_P else 0
    if proto == UDP_P and not (udp_len >= 8 and (first_fragment or udp_len <= l4_len)):
        return None
    if proto == ICMP_P and (frame[34] not in ((8, 13) if entry == "inside" else (0, 14)) or frame[35] != 0):
        return None
    return proto


def _later_fragment(frame: bytes) -> bool:
    """A well-formed IPv4 fragment other than the first: natd may only give it the address it gave the
    first fragment of its datagram (source inside, destination outside)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] != 0x45:
        return False
    tot = struct.unpack("!H", frame[16:18])[0]
    return tot >= 20 and 14 + tot <= len(frame) and bool(struct.unpack("!H", frame[20:22])[0] & 0x1FFF)


def _icmp_error(frame: bytes) -> bool:
    """A well-formed IPv4 ICMP error (Destination Unreachable, Time Exceeded, Parameter Problem): natd may
    translate the outer address and the packet it quotes (RFC 5508), nothing else."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[14] != 0x45 or frame[23] != ICMP_P:
        return False
    tot = struct.unpack("!H", frame[16:18])[0]
    if tot < 28 or 14 + tot > len(frame) or struct.unpack("!H", frame[20:22])[0] & 0x3FFF:
        return False
    return frame[34] in (3, 11, 12)


EXTERNAL = {ipaddress.IPv4Address(a) for a in (GW_OUT, *POOL, TINY_POOL_ADDR)}
# proto, remote addr, external addr, external port, remote port, inside addr, inside port
Mapping = tuple[int, str, str, int, int, str, int]


@st.composite
def ip_frames(draw: st.DrawFn, entry: str, eth: Ether, mappings: list[Mapping]) -> bytes:
    """Mostly-plausible frames for one entry point: random bytes, or scapy-built IPv4 with random fields
    (options, fragments, TTL 0-2, odd data offsets, UDP checksum 0, ICMP types) and then perhaps truncated,
    padded, given another IP total length or a flipped byte. mappings are flows that exist, so outside
    frames often hit one."""
    kind = draw(st.sampled_from(["bytes", "ip", "ip", "ip", "ip", "icmp-error"]))
    if kind == "bytes":
        return draw(st.binary(min_size=14, max_size=120))
    if kind == "icmp-error":
        return draw(icmp_errors(entry, eth, mappings))
    proto = draw(st.sampled_from([TCP_P, TCP_P, UDP_P, UDP_P, ICMP_P, ICMP_P, 47, 0]))
    mapped = entry == "outside" and mappings and draw(st.booleans())
    if mapped:
        mproto, remote, ext, eport, rport, _, _ = draw(st.sampled_from(mappings))
        proto = mproto
        src, dst = remote, ext
        sport, dport = rport, eport
    else:
        if entry == "inside":
            src, dst = draw(st.sampled_from(INSIDE_SOURCES)), draw(st.sampled_from(DESTINATIONS))
        else:
            src, dst = draw(st.sampled_from(OUTSIDE_SOURCES)), draw(st.sampled_from(OUTSIDE_DESTS))
        sport = draw(st.sampled_from([40000, 25000, 20000, 29999, 53, 80]) | st.integers(0, 65535))
        dport = draw(st.sampled_from([80, 53, 22, 25000, 30001]) | st.integers(0, 65535))
    ip = IP(src=src, dst=dst, ttl=draw(st.sampled_from([64, 64, 64, 2, 1, 0])),
            flags=draw(st.sampled_from(["", "", "", "DF", "MF"])),
            frag=draw(st.sampled_from([0, 0, 0, 0, 1, 185])), id=draw(st.integers(0, 65535)),
            tos=draw(st.integers(0, 255)))
    if draw(st.integers(0, 9)) == 0:
        ip.options = [IPOption_Router_Alert()]
    payload = draw(st.binary(max_size=24))
    if proto == TCP_P:
        l4: Packet = TCP(sport=sport, dport=dport, flags=draw(st.integers(0, 0xFF)),
                         seq=draw(st.integers(0, 2**32 - 1)),
                         dataofs=draw(st.sampled_from([None, None, 4, 6])))
    elif proto == UDP_P:
        l4 = UDP(sport=sport, dport=dport, chksum=draw(st.sampled_from([None, None, 0])))
    elif proto == ICMP_P:
        icmp_id = dport if entry == "outside" else sport
        l4 = ICMP(type=draw(st.sampled_from([8, 0, 3, 11])), code=draw(st.sampled_from([0, 0, 1])),
                  id=icmp_id, seq=draw(st.integers(0, 65535)))
    else:
        l4 = Raw(b"\x00" * 8)
        ip.proto = proto
    frame = bytearray(bytes(eth / ip / l4 / payload))
    tweak = draw(st.sampled_from(["none", "none", "none", "truncate", "pad", "iplen", "iplen", "corrupt"]))
    if tweak == "truncate":
        frame = frame[:draw(st.integers(14, len(frame)))]
    elif tweak == "pad":
        frame += draw(st.binary(min_size=1, max_size=30))
    elif tweak == "iplen":
        ihl = (frame[14] & 0xF) * 4
        # around the interesting edges: no L4 header, a partial one, exactly one, the frame's end
        tot = draw(st.sampled_from([0, 19, 20, 24, 27, 28, 30, 39, 40, len(frame) - 14, len(frame) - 13])
                   | st.integers(0, len(frame) - 10))
        frame[16:18] = struct.pack("!H", tot)
        if draw(st.booleans()):
            frame += bytes(max(0, 60 - len(frame)))  # Ethernet minimum-size padding
        if ihl == 20:
            frame[24:26] = struct.pack("!H", _ip_csum(bytes(frame[14:34])))
    elif tweak == "corrupt":
        i = draw(st.integers(14, len(frame) - 1))
        frame[i] ^= draw(st.integers(1, 255))
    return bytes(frame)


@st.composite
def icmp_errors(draw: st.DrawFn, entry: str, eth: Ether, mappings: list[Mapping]) -> bytes:
    """ICMP errors quoting a packet of an existing flow (outside: as the internet saw it, inside: as the
    inside host saw it), or of no flow; with the quote cut at random points."""
    proto, remote, ext, eport, rport, host, hport = draw(st.sampled_from(mappings))
    if not draw(st.integers(0, 3)):
        eport = draw(st.integers(0, 65535))  # no such mapping
    out = entry == "outside"
    if proto == ICMP_P:
        quoted_l4: Packet = ICMP(type=8, id=eport) if out else ICMP(type=0, id=hport)
    else:
        layer = TCP if proto == TCP_P else UDP
        quoted_l4 = layer(sport=eport, dport=rport) if out else layer(sport=rport, dport=hport)
    quoted = (IP(src=ext, dst=remote, ttl=1) if entry == "outside" else IP(src=remote, dst=host)) / quoted_l4
    quoted_bytes = bytes(quoted)[:draw(st.sampled_from([20, 24, 28, 36, 40, 60]))]
    icmp = ICMP(type=draw(st.sampled_from([3, 11, 12])), code=draw(st.sampled_from([0, 1, 3, 4])))
    outer = IP(src="198.51.100.1", dst=ext) if entry == "outside" else IP(src=host, dst=remote)
    frame = bytearray(bytes(eth / outer / icmp / Raw(quoted_bytes)))
    if draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(14, len(frame) - 1))
        frame[i] ^= draw(st.integers(1, 255))
    return bytes(frame)


def _ct_count(dp: NatDatapath) -> int:
    return len(dp.flows())


def _check_icmp_error_translation(entry: str, frame: bytes, out: bytes) -> None:
    """An ICMP error natd changed: about a translated host's packet (inside) / sent to an external address
    (outside); only MACs, TTL, the outer address and the ICMP message changed, with IP and ICMP checksums
    as valid as they came in."""
    if entry == "inside":
        # from the flow's host or another inside node (RFC 5508 REQ-5c), always about a translated host's
        # packet (the quote's destination); another node's error goes to that packet's source only
        host = ipaddress.IPv4Address(frame[58:62])
        assert any(host in net for net in TRANSLATED), f"ICMP error about {host}, in no snat rule"
        if frame[26:30] != frame[58:62]:
            assert frame[30:34] == frame[54:58], "a third party's error not sent to the quoted source"
        outer = {26, 27, 28, 29}
    else:
        assert ipaddress.IPv4Address(frame[30:34]) in EXTERNAL, "ICMP error to no external address"
        outer = {30, 31, 32, 33}
    tot = struct.unpack("!H", frame[16:18])[0]
    assert changed_offsets(frame, out) <= _L2_L3 | outer | set(range(36, 14 + tot))
    assert _ocsum(frame[14:34]) % 0xFFFF == _ocsum(out[14:34]) % 0xFFFF, "IP checksum"
    assert _ocsum(frame[34:14 + tot]) % 0xFFFF == _ocsum(out[34:14 + tot]) % 0xFFFF, "ICMP checksum"


def test_fuzz_random_frames(natd_dp: NatDatapath) -> None:
    """Invariants over random frames, both entry points:
    - the verdict is XDP_DROP, XDP_PASS or XDP_REDIRECT;
    - a frame that leaves changed was a well-formed TCP/UDP/ICMP-echo IPv4 packet, from a translated
      prefix (inside) or matching an existing reply mapping (outside); only NAT fields changed, and
      the IP and L4 checksums stay exactly as valid as they were (valid in -> valid out); or it was an
      ICMP error (see _check_icmp_error_translation);
    - the conntrack table grows by at most one entry per frame."""
    dp = natd_dp
    dp.clear_flows()
    eths = {"inside": eth_in(dp), "outside": eth_out(dp)}
    # flows the outside frames can hit
    mappings: list[Mapping] = []
    for src, proto, sport, dport in ((HOST1, TCP_P, 40000, 80), ("10.1.0.10", TCP_P, 41000, 443),
                                     (HOST1, UDP_P, 5353, 53), ("10.2.0.5", UDP_P, 40000, 53),
                                     (HOST1, ICMP_P, 7, 0), ("10.1.200.3", ICMP_P, 9, 0)):
        l4 = {TCP_P: TCP(sport=sport, dport=dport, flags="S"), UDP_P: UDP(sport=sport, dport=dport),
              ICMP_P: ICMP(type=8, id=sport)}[proto]
        out = Ether(dp.inside(bytes(eth_in(dp) / IP(src=src, dst=SRV) / l4)).data)
        ext_port = out[ICMP].id if proto == ICMP_P else out[TCP if proto == TCP_P else UDP].sport
        mappings.append((proto, SRV, out[IP].src, ext_port, dport, src, sport))

    reply_map = dp.tables.map("ct_reply")
    ext_addrs = dp.tables.map("ext_addrs")  # key: the address as it sits in the packet

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from(["inside", "outside"]))
        frame = data.draw(ip_frames(entry, eths[entry], mappings))
        before = _ct_count(dp)
        if before > CT_MAX // 2:
            dp.clear_flows()  # keep room (the mappings above are then gone; fine for the invariants)
            before = 0
        proto = _translatable(frame, entry)
        reply_key = None
        if entry == "outside" and proto is not None:
            sport = 0 if proto == ICMP_P else struct.unpack("!H", frame[34:36])[0]
            dport = struct.unpack("!H", frame[38:40] if proto == ICMP_P else frame[36:38])[0]
            reply_key = CtKey(ip_to_be32(ipaddress.IPv4Address(frame[26:30])),
                              ip_to_be32(ipaddress.IPv4Address(frame[30:34])),
                              port_to_be16(sport), port_to_be16(dport), proto)
        mapped_before = reply_key is not None and reply_map.lookup(reply_key.to_bytes()) is not None
        try:
            run = dp.inside(frame) if entry == "inside" else dp.outside(frame)
        except BpfError:
            assert len(frame) < 14
            return
        assert run.retval in (XDP_DROP, XDP_PASS, XDP_REDIRECT), f"verdict {run.retval}"
        after = _ct_count(dp)
        assert after - before <= 1, "more than one conntrack entry from one frame"
        # by design (hairpin.h): a hairpinned UDP datagram nobody receives keeps the sender's mapping, as a
        # datagram to an unresponsive destination does (RFC 4787 REQ-9 hole punching)
        hairpin_udp_kept = (entry == "inside" and len(frame) >= 34 and frame[23] == UDP_P
                            and run.retval == XDP_DROP and ext_addrs.lookup(frame[30:34]) is not None)
        assert after == before or run.data != frame or hairpin_udp_kept, \
            "a flow was created but its first packet not translated"
        outcome = f"{entry} {'unchanged' if run.data == frame else 'changed'}"
        seen[outcome] = seen.get(outcome, 0) + 1
        if run.data == frame:
            assert run.retval != XDP_REDIRECT, "redirected without the MAC/TTL rewrite"
            return
        if entry == "inside" and len(run.data) == 70 and run.data[34:36] == b"\x03\x0d" and \
                run.data[42:70] == frame[14:42]:
            # no session could be made: ICMP code 13 back to the sender (RFC 5508 REQ-8)
            assert_refused_with_icmp(run, frame, str(ipaddress.IPv4Address(run.data[26:30])))
            assert after == before, "a refused packet left a flow"
            return
        if proto is None and _icmp_error(frame):
            _check_icmp_error_translation(entry, frame, run.data)
            assert after == before, "an ICMP error created a flow"
            return
        if proto is None and _later_fragment(frame):
            addr = {26, 27, 28, 29} if entry == "inside" else {30, 31, 32, 33}
            assert changed_offsets(frame, run.data) <= _L2_L3 | addr, "a later fragment: address only"
            assert _ocsum(frame[14:34]) % 0xFFFF == _ocsum(run.data[14:34]) % 0xFFFF, "IP checksum"
            assert after == before, "a later fragment created a flow"
            return
        assert proto is not None, f"{entry}: a frame natd must not translate was changed: {frame.hex()}"
        if entry == "inside":
            src = ipaddress.IPv4Address(frame[26:30])
            assert any(src in net for net in TRANSLATED), f"source {src} is in no snat rule"
        else:
            assert mapped_before, "outside frame changed without a reply mapping"
        assert changed_offsets(frame, run.data) <= ALLOWED[(entry, proto)]
        # checksums: exactly as valid as before (incremental updates keep the one's complement sums)
        assert _ocsum(frame[14:34]) % 0xFFFF == _ocsum(run.data[14:34]) % 0xFFFF, "IP checksum"
        udp_none = proto == UDP_P and frame[40:42] == b"\x00\x00"
        if udp_none:
            assert run.data[40:42] == b"\x00\x00", "UDP checksum 0 must stay 0"
        else:
            assert _l4_sum(frame) % 0xFFFF == _l4_sum(run.data) % 0xFFFF, "L4 checksum"
        if proto == UDP_P:
            assert udp_none or run.data[40:42] != b"\x00\x00", "a UDP checksum turned into 'none'"
        if _ocsum(frame[14:34]) == 0xFFFF:
            assert _ocsum(run.data[14:34]) == 0xFFFF, "valid IP checksum in, invalid out"
        if not udp_none and _l4_sum(frame) == 0xFFFF:
            assert _l4_sum(run.data) == 0xFFFF, "valid L4 checksum in, invalid out"

    seen: dict[str, int] = {}
    check()
    # the invariants are not vacuous: both entry points translated some frames and left others alone
    outcomes = [f"{e} {c}" for e in ("inside", "outside") for c in ("changed", "unchanged")]
    assert all(seen.get(o, 0) > 0 for o in outcomes), seen
