"""Inbound flows in the XDP datapath: port forwards (DNAT) and static 1:1 NAT, byte for byte.

Rules (tests/bpf/harness.py): tcp GW_OUT:443 -> host1:8443, udp GW_OUT:5300 -> host1:5300, tcp
192.0.2.30:80 -> host1:8080 (an address with no NAT ports), tcp 192.0.2.20:40001 -> host1:2222 inside
rule 3's range 40000-40003 (so that port is reserved), static 10.1.77.7 <-> 192.0.2.77.

An inbound flow is the mirror of an outbound one: the remote opens it, so the remote is the initiator
(CT_F_INBOUND; packets_orig and FIN_ORIG are the remote's), and the same two conntrack halves let both
directions find it. Expected frames are built independently with scapy (checksums from scratch) and
compared with the program's output byte for byte.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from natd.config import parse_config
from natd.maps import RULE_FORWARD, RULE_STATIC, CtEntry, CtFlags, CtKey, CtState, Stat
from natd.rules import build_ruleset

from .harness import (
    FWD_ONLY,
    FWD_ONLY_ADDR,
    FWD_TCP,
    FWD_UDP,
    GW_OUT,
    HOST1,
    RESERVED_ADDR,
    RESERVED_FWD,
    RESERVED_PORTS,
    RULES_YAML,
    STATIC_INSIDE,
    STATIC_OUTSIDE,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    NatDatapath,
    assert_refused_with_icmp,
)
from .test_datapath import (
    SRV,
    SRV2,
    TCP_P,
    UDP_P,
    assert_checksums_valid,
    assert_untouched,
    changed_offsets,
    eth_in,
    eth_out,
    flow,
    syn,
)

pytestmark = pytest.mark.bpf

CLIENT = (SRV2, 51000)  # a client on the internet
TCP_OPTS = [("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]


def from_internet(dp: NatDatapath, l4: Packet, dst: str = GW_OUT, src: str = CLIENT[0],
                  ttl: int = 57) -> bytes:
    return bytes(eth_out(dp) / IP(src=src, dst=dst, ttl=ttl, id=0x2222) / l4)


def to_host(dp: NatDatapath, l4: Packet, dst: str, src: str = CLIENT[0], ttl: int = 56) -> bytes:
    """A frame as natd must redirect it to an inside host behind in1 (host1's MAC)."""
    return bytes(Ether(src=dp.mac["in1"], dst=dp.mac["host1"]) / IP(src=src, dst=dst, ttl=ttl, id=0x2222)
                 / l4)


def from_host(dp: NatDatapath, l4: Packet, src: str = HOST1, dst: str = CLIENT[0]) -> bytes:
    return bytes(eth_in(dp) / IP(src=src, dst=dst, ttl=64, id=0x3333) / l4)


def to_internet(dp: NatDatapath, l4: Packet, src: str, dst: str = CLIENT[0]) -> bytes:
    return bytes(Ether(src=dp.mac["out0"], dst=dp.mac["inet"]) / IP(src=src, dst=dst, ttl=63, id=0x3333) / l4)


def client_tcp(flags: str, dport: int = FWD_TCP[0], sport: int = CLIENT[1], seq: int = 1000, ack: int = 0,
               payload: bytes = b"") -> Packet:
    tcp = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=64240,
              options=TCP_OPTS if "S" in flags else [])
    return tcp / payload if payload else tcp


def server_tcp(flags: str, sport: int = FWD_TCP[2], dport: int = CLIENT[1], seq: int = 9000,
               ack: int = 1001) -> Packet:
    return TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=65160,
               options=TCP_OPTS if "S" in flags else [])


def fwd_flow(dp: NatDatapath, sport: int = CLIENT[1]) -> CtEntry:
    return flow(dp, HOST1, CLIENT[0], FWD_TCP[2], sport)


def open_inbound(dp: NatDatapath) -> None:
    assert dp.outside(from_internet(dp, client_tcp("S"))).retval == XDP_REDIRECT


# ======================================================================================= port forward


def test_syn_to_forwarded_port_opens_an_inbound_flow(dp: NatDatapath) -> None:
    frame = from_internet(dp, client_tcp("S", payload=b"tfo"))
    with dp.counting() as d:
        run = dp.outside(frame)
    assert run.retval == XDP_REDIRECT
    # DNAT: destination address and port, TTL, MACs, checksums; nothing else
    assert run.data == to_host(dp, client_tcp("S", dport=FWD_TCP[2], payload=b"tfo"), HOST1)
    assert_checksums_valid(run.data)
    assert changed_offsets(frame, run.data) <= set(range(12)) | {22, 24, 25, 30, 31, 32, 33, 36, 37, 50, 51}
    assert d.nonzero() == {"XDP_REDIRECT": 1, "DNAT_IN": 1, "CT_NEW": 1, "CT_NEW_INBOUND": 1}
    # conntrack: the inside server's view as the original key, the client as the initiator
    entry = fwd_flow(dp)
    assert entry.flags == CtFlags.INBOUND
    assert entry.state == CtState.SYN_SENT
    assert (str(entry.nat_ip), entry.nat_port_host, entry.rule_id) == (GW_OUT, FWD_TCP[0], RULE_FORWARD)
    assert (entry.packets_orig, entry.bytes_orig, entry.packets_reply, entry.bytes_reply) == \
        (1, len(frame), 0, 0)
    assert dict(dp.tables.reply_index()) == {
        CtKey.make(CLIENT[0], GW_OUT, CLIENT[1], FWD_TCP[0], TCP_P):
            CtKey.make(HOST1, CLIENT[0], FWD_TCP[2], CLIENT[1], TCP_P)}


def test_server_syn_ack_is_translated_back_to_the_forwarded_port(dp: NatDatapath) -> None:
    open_inbound(dp)
    frame = from_host(dp, server_tcp("SA"))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    assert run.data == to_internet(dp, server_tcp("SA", sport=FWD_TCP[0]), GW_OUT)
    assert_checksums_valid(run.data)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "SNAT_OUT": 1}
    entry = fwd_flow(dp)
    assert entry.state == CtState.SYN_RECV
    assert entry.flags == CtFlags.INBOUND | CtFlags.REPLIED
    assert (entry.packets_orig, entry.packets_reply, entry.bytes_reply) == (1, 1, len(frame))
    assert len(dp.flows()) == 1, "the server's reply must not open an outbound flow"


def test_inbound_handshake_and_data(dp: NatDatapath) -> None:
    """SYN_SENT -> SYN_RECV -> ESTABLISHED; packets_orig counts the client's packets, packets_reply the
    server's; ASSURED and CT_ESTABLISHED once."""
    with dp.counting() as d:
        open_inbound(dp)
        assert fwd_flow(dp).state == CtState.SYN_SENT
        assert dp.inside(from_host(dp, server_tcp("SA"))).retval == XDP_REDIRECT
        assert fwd_flow(dp).state == CtState.SYN_RECV
        ack = from_internet(dp, client_tcp("A", seq=1001, ack=9001))
        run = dp.outside(ack)
        assert run.retval == XDP_REDIRECT
        assert run.data == to_host(dp, client_tcp("A", dport=FWD_TCP[2], seq=1001, ack=9001), HOST1)
        assert fwd_flow(dp).state == CtState.ESTABLISHED
        for i in range(3):
            assert dp.outside(from_internet(dp, client_tcp("PA", seq=1001 + i, ack=9001,
                                                           payload=b"GET"))).retval == XDP_REDIRECT
        run = dp.inside(from_host(dp, server_tcp("PA", seq=9001, ack=1004) / b"200 OK"))
        assert run.retval == XDP_REDIRECT and Ether(run.data)[TCP].sport == FWD_TCP[0]
        assert_checksums_valid(run.data)
    entry = fwd_flow(dp)
    assert entry.state == CtState.ESTABLISHED
    assert entry.flags == CtFlags.INBOUND | CtFlags.REPLIED | CtFlags.ASSURED
    assert (entry.packets_orig, entry.packets_reply) == (5, 2)
    assert d[Stat.CT_ESTABLISHED] == 1 and d[Stat.CT_NEW] == 1 and d[Stat.CT_NEW_INBOUND] == 1
    assert d[Stat.DNAT_IN] == 5 and d[Stat.SNAT_OUT] == 2


S = CtState


@pytest.mark.parametrize("steps", [
    pytest.param([("h", "SA", S.SYN_RECV), ("c", "A", S.ESTABLISHED), ("c", "FA", S.FIN_WAIT),
                  ("h", "A", S.FIN_WAIT), ("h", "FA", S.LAST_ACK), ("c", "A", S.TIME_WAIT)],
                 id="client-closes-first"),
    pytest.param([("h", "SA", S.SYN_RECV), ("c", "A", S.ESTABLISHED), ("h", "FA", S.CLOSE_WAIT),
                  ("c", "FA", S.LAST_ACK), ("h", "A", S.TIME_WAIT)], id="server-closes-first"),
    pytest.param([("h", "SA", S.SYN_RECV), ("c", "A", S.ESTABLISHED), ("c", "R", S.CLOSE)], id="rst-client"),
    pytest.param([("h", "RA", S.CLOSE)], id="server-refuses"),
    pytest.param([("h", "SA", S.SYN_RECV), ("c", "A", S.ESTABLISHED), ("c", "FA", S.FIN_WAIT),
                  ("h", "FA", S.LAST_ACK), ("c", "A", S.TIME_WAIT), ("c", "S", S.SYN_SENT)],
                 id="client-reuses-the-tuple-after-time-wait"),
])
def test_inbound_tcp_state_machine(dp: NatDatapath, steps: list[tuple[str, str, CtState]]) -> None:
    """'c' = the client (internet, the initiator), 'h' = the inside server. FIN_ORIG is the client's."""
    open_inbound(dp)
    for i, (who, flags, expected) in enumerate(steps):
        if who == "c":
            run = dp.outside(from_internet(dp, client_tcp(flags)))
        else:
            run = dp.inside(from_host(dp, server_tcp(flags)))
        assert run.retval == XDP_REDIRECT, f"step {i} ({who} {flags})"
        assert_checksums_valid(run.data)
        state = CtState(fwd_flow(dp).state)
        assert state == expected, f"after step {i} ({who} {flags}): {state.name}"
        entry = fwd_flow(dp)
        if who == "c" and "F" in flags:
            assert entry.flags & CtFlags.FIN_ORIG, "the client's FIN is the initiator's"
        if who == "h" and "F" in flags:
            assert entry.flags & CtFlags.FIN_REPLY


@pytest.mark.parametrize("flags", ["A", "R", "RA", "SA", "FA", "PA", "F", ""])
def test_non_syn_to_forwarded_port_without_flow_dropped(dp: NatDatapath, flags: str) -> None:
    """Only a SYN opens an inbound TCP flow: a stray segment must not create state (RFC 5382: a NAT may
    drop unsolicited non-SYN segments)."""
    frame = from_internet(dp, client_tcp(flags))
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_NO_MAPPING": 1}
    assert dp.flows() == [] and dp.tables.reply_index() == []


def test_each_client_gets_its_own_inbound_flow(dp: NatDatapath) -> None:
    """Endpoint-dependent: flows to the same forwarded port from other clients (or another client port)
    are separate, each translated back to its own client."""
    clients = [(SRV2, 51000), (SRV2, 51001), (SRV, 51000)]
    for src, sport in clients:
        run = dp.outside(from_internet(dp, client_tcp("S", sport=sport), src=src))
        assert run.retval == XDP_REDIRECT
        assert (Ether(run.data)[IP].src, Ether(run.data)[TCP].sport) == (src, sport)
    assert len(dp.flows()) == 3
    for src, sport in clients:
        run = dp.inside(from_host(dp, server_tcp("SA", dport=sport), dst=src))
        out = Ether(run.data)
        assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (GW_OUT, FWD_TCP[0], src, sport)
        assert flow(dp, HOST1, src, FWD_TCP[2], sport).state == CtState.SYN_RECV


def test_udp_forward_keeps_the_port_and_is_assured_by_the_reply(dp: NatDatapath) -> None:
    dgram = from_internet(dp, UDP(sport=CLIENT[1], dport=FWD_UDP[0]) / b"hello")
    with dp.counting() as d:
        run = dp.outside(dgram)
    assert run.retval == XDP_REDIRECT
    assert run.data == to_host(dp, UDP(sport=CLIENT[1], dport=FWD_UDP[2]) / b"hello", HOST1)
    assert d[Stat.CT_NEW_INBOUND] == 1
    entry = flow(dp, HOST1, CLIENT[0], FWD_UDP[2], CLIENT[1], UDP_P)
    assert (entry.flags, entry.state, entry.packets_orig) == (CtFlags.INBOUND, CtState.NONE, 1)
    reply = from_host(dp, UDP(sport=FWD_UDP[2], dport=CLIENT[1]) / b"hi back")
    run = dp.inside(reply)
    assert run.retval == XDP_REDIRECT
    assert run.data == to_internet(dp, UDP(sport=FWD_UDP[0], dport=CLIENT[1]) / b"hi back", GW_OUT)
    entry = flow(dp, HOST1, CLIENT[0], FWD_UDP[2], CLIENT[1], UDP_P)
    assert entry.flags == CtFlags.INBOUND | CtFlags.REPLIED | CtFlags.ASSURED
    assert (entry.packets_orig, entry.packets_reply) == (1, 1)


def test_udp_forward_with_zero_checksum(dp: NatDatapath) -> None:
    run = dp.outside(from_internet(dp, UDP(sport=CLIENT[1], dport=FWD_UDP[0], chksum=0) / b"hello"))
    assert run.retval == XDP_REDIRECT
    assert run.data == to_host(dp, UDP(sport=CLIENT[1], dport=FWD_UDP[2], chksum=0) / b"hello", HOST1)


def test_forward_is_per_protocol(dp: NatDatapath) -> None:
    """tcp 443 is forwarded, udp 443 is not (and 443 is outside the NAT range: the gateway's own)."""
    frame = from_internet(dp, UDP(sport=CLIENT[1], dport=FWD_TCP[0]))
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d[Stat.PASS_LOCAL] == 1 and dp.flows() == []
    frame = from_internet(dp, client_tcp("S", dport=FWD_UDP[0]))
    run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert dp.flows() == []


def test_forward_only_address(dp: NatDatapath) -> None:
    """192.0.2.30 has a forward and no snat rule: the forwarded port opens flows; every other port would
    be the kernel's (NO_NAT_PORTS: an empty NAT range), but the address is only routed to the gateway, not
    configured on it, so the kernel would route it straight back out: dropped instead."""
    run = dp.outside(from_internet(dp, client_tcp("S", dport=FWD_ONLY[0]), dst=FWD_ONLY_ADDR))
    assert run.retval == XDP_REDIRECT
    assert run.data == to_host(dp, client_tcp("S", dport=FWD_ONLY[2]), HOST1)
    run = dp.inside(from_host(dp, server_tcp("SA", sport=FWD_ONLY[2])))
    assert run.data == to_internet(dp, server_tcp("SA", sport=FWD_ONLY[0]), FWD_ONLY_ADDR)
    for dport in (81, 25000, 40001):
        frame = from_internet(dp, client_tcp("S", dport=dport), dst=FWD_ONLY_ADDR)
        with dp.counting() as d:
            run = dp.outside(frame)
        assert_untouched(run, frame, XDP_DROP)
        assert d[Stat.DROP_NO_MAPPING] == 1
    assert len(dp.flows()) == 1


def test_syn_with_expiring_ttl_to_forwarded_port_creates_no_flow(dp: NatDatapath) -> None:
    """A packet natd hands to the kernel untranslated (TTL <= 1: PASS_TTL) must not leave a flow behind:
    the flow would exist with its first packet never translated (the fuzz invariant of test_datapath), and
    the kernel delivers the SYN to the gateway's own port 443 (GW_OUT is its address)."""
    for ttl in (1, 0):
        frame = from_internet(dp, client_tcp("S"), ttl=ttl)
        with dp.counting() as d:
            run = dp.outside(frame)
        assert_untouched(run, frame, XDP_PASS)
        assert d[Stat.PASS_TTL] == 1
        assert (d[Stat.CT_NEW], d[Stat.CT_NEW_INBOUND], [repr(k) for k, _ in dp.flows()]) == (0, 0, []), \
            f"TTL {ttl}: an untranslated SYN opened a flow"


# ======================================================================== forwarded ports are reserved


def test_port_preservation_skips_a_forwarded_port(dp: NatDatapath) -> None:
    """RFC 4787 REQ-3a keeps the inside port when free, but a forwarded port is never free: an inside flow
    from port 40001 gets another port of 40000-40003. UDP 40001 is not forwarded and is kept; so is a
    non-forwarded TCP port of the range."""
    fwd = RESERVED_FWD[0]
    for i in range(20):
        run = dp.inside(syn(dp, src="10.3.0.5", sport=fwd, dst=SRV, dport=1000 + i))
        assert run.retval == XDP_REDIRECT
        out = Ether(run.data)
        assert out[IP].src == RESERVED_ADDR
        assert out[TCP].sport != fwd and RESERVED_PORTS[0] <= out[TCP].sport <= RESERVED_PORTS[1]
        assert_checksums_valid(run.data)
    run = dp.inside(bytes(eth_in(dp) / IP(src="10.3.0.5", dst=SRV) / UDP(sport=fwd, dport=53)))
    assert Ether(run.data)[UDP].sport == fwd
    run = dp.inside(syn(dp, src="10.3.0.6", sport=40002, dst=SRV2))
    assert Ether(run.data)[TCP].sport == 40002


def test_random_allocation_never_hands_out_a_forwarded_port(dp: NatDatapath) -> None:
    """Rule 3 has four ports, one of them forwarded: to one destination exactly three TCP flows fit, on
    the three other ports; the fourth is refused (PORT_EXHAUSTED), never given the forwarded port.
    Repeated, since the allocator starts at a random port."""
    free = sorted(set(range(RESERVED_PORTS[0], RESERVED_PORTS[1] + 1)) - {RESERVED_FWD[0]})
    for rnd in range(25):
        dp.clear_flows()
        ports = []
        for i in range(3):
            run = dp.inside(syn(dp, src=f"10.3.1.{i + 1}", sport=50000 + rnd, dst=SRV))
            assert run.retval == XDP_REDIRECT, f"round {rnd}, flow {i}"
            ports.append(Ether(run.data)[TCP].sport)
        assert sorted(ports) == free, f"round {rnd}: {ports}"
        frame = syn(dp, src="10.3.1.9", sport=50000 + rnd, dst=SRV)
        with dp.counting() as d:
            run = dp.inside(frame)
        # 10.3.0.0/16 has no route on gw but the default one: the gateway answers from out0's address
        assert_refused_with_icmp(run, frame, GW_OUT)
        assert d.nonzero() == {"XDP_REDIRECT": 1, "DROP_PORT_EXHAUSTED": 1, "ICMP_UNREACH_SENT": 1}
    # UDP is not forwarded: all four ports are usable
    dp.clear_flows()
    ports = [Ether(dp.inside(bytes(eth_in(dp) / IP(src=f"10.3.1.{i + 1}", dst=SRV) /
                                   UDP(sport=50000, dport=53))).data)[UDP].sport for i in range(4)]
    assert sorted(ports) == list(range(RESERVED_PORTS[0], RESERVED_PORTS[1] + 1))


def test_forwarded_port_inside_a_nat_range_still_forwards(dp: NatDatapath) -> None:
    """With the range's other ports in use, a SYN to 192.0.2.20:40001 still reaches host1:2222, and
    unsolicited traffic to the other (NAT) ports is dropped."""
    for i in range(3):
        assert dp.inside(syn(dp, src=f"10.3.1.{i + 1}", sport=50000, dst=SRV)).retval == XDP_REDIRECT
    run = dp.outside(from_internet(dp, client_tcp("S", dport=RESERVED_FWD[0], sport=80), dst=RESERVED_ADDR,
                                   src=SRV))
    assert run.retval == XDP_REDIRECT
    assert run.data == to_host(dp, client_tcp("S", dport=RESERVED_FWD[2], sport=80), HOST1, src=SRV)
    frame = from_internet(dp, client_tcp("S", dport=40002, sport=81), dst=RESERVED_ADDR, src=SRV)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d[Stat.DROP_NO_MAPPING] == 1


# ============================================================================================== static


@pytest.mark.parametrize("sport", [45678, 22, 1024, 25000, 65535])
def test_static_outbound_keeps_the_port_and_uses_the_static_address(dp: NatDatapath, sport: int) -> None:
    frame = from_host(dp, TCP(sport=sport, dport=80, flags="S", seq=5, options=TCP_OPTS), src=STATIC_INSIDE,
                      dst=SRV)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    assert run.data == to_internet(dp, TCP(sport=sport, dport=80, flags="S", seq=5, options=TCP_OPTS),
                                   STATIC_OUTSIDE, dst=SRV)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "SNAT_OUT": 1, "CT_NEW": 1}
    entry = flow(dp, STATIC_INSIDE, SRV, sport, 80)
    assert (str(entry.nat_ip), entry.nat_port_host, entry.rule_id) == (STATIC_OUTSIDE, sport, RULE_STATIC)
    assert entry.flags == 0 and entry.state == CtState.SYN_SENT


def test_static_outbound_udp_and_echo(dp: NatDatapath) -> None:
    run = dp.inside(from_host(dp, UDP(sport=6000, dport=53) / b"q", src=STATIC_INSIDE, dst=SRV))
    assert run.data == to_internet(dp, UDP(sport=6000, dport=53) / b"q", STATIC_OUTSIDE, dst=SRV)
    run = dp.inside(from_host(dp, ICMP(type=8, id=4242, seq=1) / b"ping", src=STATIC_INSIDE, dst=SRV))
    assert run.data == to_internet(dp, ICMP(type=8, id=4242, seq=1) / b"ping", STATIC_OUTSIDE, dst=SRV)
    reply = bytes(eth_out(dp) / IP(src=SRV, dst=STATIC_OUTSIDE, ttl=57, id=0x2222) /
                  ICMP(type=0, id=4242, seq=1) / b"ping")
    run = dp.outside(reply)
    assert run.data == to_host(dp, ICMP(type=0, id=4242, seq=1) / b"ping", STATIC_INSIDE, src=SRV)


@pytest.mark.parametrize("dport", [7777, 22, 1, 25000, 65535])
def test_static_inbound_to_any_port_opens_a_flow(dp: NatDatapath, dport: int) -> None:
    frame = from_internet(dp, client_tcp("S", dport=dport), dst=STATIC_OUTSIDE)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert run.retval == XDP_REDIRECT
    assert run.data == to_host(dp, client_tcp("S", dport=dport), STATIC_INSIDE)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "DNAT_IN": 1, "CT_NEW": 1, "CT_NEW_INBOUND": 1}
    entry = flow(dp, STATIC_INSIDE, CLIENT[0], dport, CLIENT[1])
    assert (entry.flags, entry.rule_id, str(entry.nat_ip), entry.nat_port_host) == \
        (CtFlags.INBOUND, RULE_STATIC, STATIC_OUTSIDE, dport)
    run = dp.inside(from_host(dp, server_tcp("SA", sport=dport), src=STATIC_INSIDE))
    assert run.data == to_internet(dp, server_tcp("SA", sport=dport), STATIC_OUTSIDE)
    assert flow(dp, STATIC_INSIDE, CLIENT[0], dport, CLIENT[1]).state == CtState.SYN_RECV


def test_static_inbound_udp(dp: NatDatapath) -> None:
    run = dp.outside(from_internet(dp, UDP(sport=CLIENT[1], dport=9999) / b"x", dst=STATIC_OUTSIDE))
    assert run.data == to_host(dp, UDP(sport=CLIENT[1], dport=9999) / b"x", STATIC_INSIDE)
    assert flow(dp, STATIC_INSIDE, CLIENT[0], 9999, CLIENT[1], UDP_P).flags == CtFlags.INBOUND


@pytest.mark.parametrize("flags", ["A", "R", "SA", "FA"])
def test_static_inbound_non_syn_without_flow_dropped(dp: NatDatapath, flags: str) -> None:
    frame = from_internet(dp, client_tcp(flags, dport=7777), dst=STATIC_OUTSIDE)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_NO_MAPPING": 1}
    assert dp.flows() == []


def test_echo_request_to_static_address_not_forwarded(dp: NatDatapath) -> None:
    """natd maps no inbound echo: a ping to the static address does not reach the inside host, and the
    address is not the gateway's own (it must not be, see natd.rules), so it is dropped, not looped."""
    frame = from_internet(dp, ICMP(type=8, id=99, seq=1), dst=STATIC_OUTSIDE)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_NO_MAPPING": 1}
    assert dp.flows() == []


def test_static_inbound_after_outbound_is_the_same_flow(dp: NatDatapath) -> None:
    """The remote answering the static host's own connection finds that flow (not a new inbound one)."""
    dp.inside(from_host(dp, TCP(sport=45678, dport=80, flags="S"), src=STATIC_INSIDE, dst=SRV))
    with dp.counting() as d:
        run = dp.outside(from_internet(dp, TCP(sport=80, dport=45678, flags="SA"), dst=STATIC_OUTSIDE,
                                       src=SRV))
    assert run.data == to_host(dp, TCP(sport=80, dport=45678, flags="SA"), STATIC_INSIDE, src=SRV)
    assert d[Stat.CT_NEW] == 0
    entry = flow(dp, STATIC_INSIDE, SRV, 45678, 80)
    assert entry.flags == CtFlags.REPLIED and entry.state == CtState.SYN_RECV


@contextlib.contextmanager
def rules(dp: NatDatapath, yaml_text: str) -> Iterator[None]:
    """Another rule set for the block (like a reload); the session's rules are back afterwards."""
    def apply(text: str) -> None:
        dp.tables.apply_rules(build_ruleset(parse_config(text), ipaddress.IPv4Address(GW_OUT),
                                           [dp.ifindex["out0"]]))

    apply(yaml_text)
    try:
        yield
    finally:
        apply(RULES_YAML)


def test_static_port_already_mapped_to_the_destination_is_exhausted(dp: NatDatapath) -> None:
    """A static host has exactly one external port per inside port (a one-port range): when that port is
    already mapped towards the same destination (here: a flow of the host that had the static address
    before a reload), the new flow is refused (PORT_EXHAUSTED), never moved to another port."""
    previous = "10.1.77.8"
    with rules(dp, RULES_YAML.replace(f"inside: {STATIC_INSIDE},", f"inside: {previous},")):
        run = dp.inside(from_host(dp, TCP(sport=45000, dport=80, flags="S"), src=previous, dst=SRV))
        assert (Ether(run.data)[IP].src, Ether(run.data)[TCP].sport) == (STATIC_OUTSIDE, 45000)
    frame = from_host(dp, TCP(sport=45000, dport=80, flags="S"), src=STATIC_INSIDE, dst=SRV)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_refused_with_icmp(run, frame, "10.0.1.1")  # in1's address: 10.1.0.0/16 is routed via host1
    assert d.nonzero() == {"XDP_REDIRECT": 1, "DROP_PORT_EXHAUSTED": 1, "ICMP_UNREACH_SENT": 1}
    assert dp.flow(STATIC_INSIDE, SRV, 45000, 80, TCP_P) is None
    assert len(dp.tables.reply_index()) == 1
    # the same port towards another destination (or another port of the same one) is free
    for dst, dport in ((SRV2, 80), (SRV, 81)):
        run = dp.inside(from_host(dp, TCP(sport=45000, dport=dport, flags="S"), src=STATIC_INSIDE, dst=dst))
        assert run.retval == XDP_REDIRECT
        assert (Ether(run.data)[IP].src, Ether(run.data)[TCP].sport) == (STATIC_OUTSIDE, 45000)


def test_other_inside_hosts_are_not_static(dp: NatDatapath) -> None:
    run = dp.inside(from_host(dp, TCP(sport=45678, dport=80, flags="S"), src="10.1.77.8", dst=SRV))
    assert run.retval == XDP_REDIRECT
    assert Ether(run.data)[IP].src != STATIC_OUTSIDE
