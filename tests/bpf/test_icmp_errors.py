"""ICMP error translation in the XDP datapath (RFC 5508 REQ-3/4/5, RFC 5382 REQ-9), byte for byte.

Inbound: a router on the internet answers a packet natd translated (Time Exceeded, Destination / Port
Unreachable, Fragmentation Needed, Parameter Problem); the error arrives at the external address quoting
the translated packet. natd must send it to the inside host with the outer destination and the quoted
source address and port (echo identifier) reverted, every checksum right (outer IP, ICMP, the quoted IP
header, the quoted TCP/UDP/ICMP checksum), and leave the conntrack entry exactly as it was (errors never
refresh or delete a mapping). Errors it cannot attribute to a mapping are dropped when they concern the
NAT's ports, and given to the kernel when they concern the gateway's own traffic.

Outbound: an inside host answers a packet it received through the NAT with an error (e.g. UDP port
unreachable); the error leaves with the outer source and the quoted destination address and port
translated to the external ones, or is dropped (never leaked with a private address).

Every expected frame is built independently with scapy (which computes every checksum from scratch) and
compared with what the program returned, byte for byte. Rules: see tests/bpf/harness.py.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import checksum

from natd.maps import CtEntry, CtState, Stat

from .harness import (
    FWD_UDP,
    GW_OUT,
    HOST1,
    NAT_PORTS,
    POOL,
    STATIC_INSIDE,
    STATIC_OUTSIDE,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    NatDatapath,
    Run,
)
from .test_datapath import ICMP_P, SRV, SRV2, TCP_P, UDP_P, assert_untouched, eth_in, eth_out, flow

pytestmark = pytest.mark.bpf

ROUTER = "198.51.100.1"  # a router on the path to SRV: the source of the errors
ERR_TTL = 250
ERR_ID = 0x4242


# ============================================================================================= helpers


@dataclasses.dataclass(frozen=True)
class Sent:
    """A packet an inside host sent and what natd made of it."""

    frame: bytes       # as the inside host sent it
    out: bytes         # as natd forwarded it
    proto: int
    key: tuple[str, str, int, int, int]  # its conntrack key (src, dst, sport, dport, proto)

    @property
    def ip(self) -> bytes:
        """The inside host's IP packet."""
        return self.frame[14:]

    @property
    def out_ip(self) -> bytes:
        """The translated IP packet, as the internet saw it."""
        return self.out[14:]

    def entry(self, dp: NatDatapath) -> CtEntry:
        return flow(dp, *self.key)


def send_out(dp: NatDatapath, l4: Packet, src: str = HOST1, dst: str = SRV) -> Sent:
    frame = bytes(eth_in(dp) / IP(src=src, dst=dst, ttl=64, id=0x1234) / l4)
    run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    pkt = Ether(frame)
    proto = pkt[IP].proto
    if proto == ICMP_P:
        key = (src, dst, pkt[ICMP].id, 0, ICMP_P)
    else:
        key = (src, dst, pkt[IP].payload.sport, pkt[IP].payload.dport, proto)
    return Sent(frame, run.data, proto, key)


def with_ttl(ip: bytes, ttl: int) -> bytes:
    """The IP packet with another TTL and its header checksum recomputed (by scapy)."""
    pkt = IP(ip)
    pkt.ttl = ttl
    del pkt.chksum
    return bytes(pkt)


def router_error(dp: NatDatapath, icmp: Packet, quote: bytes, dst: str, ttl: int = ERR_TTL) -> bytes:
    """An ICMP error from ROUTER to dst (an external address), quoting `quote`, as it arrives on out0."""
    return bytes(eth_out(dp) / IP(src=ROUTER, dst=dst, ttl=ttl, id=ERR_ID) / icmp / Raw(quote))


def expected_in(dp: NatDatapath, icmp: Packet, quote: bytes, dst: str, ttl: int = ERR_TTL) -> bytes:
    """The same error as natd must redirect it to the inside host dst (via in1, to host1's MAC)."""
    return bytes(Ether(src=dp.mac["in1"], dst=dp.mac["host1"])
                 / IP(src=ROUTER, dst=dst, ttl=ttl - 1, id=ERR_ID) / icmp / Raw(quote))


def quoted_of(frame: bytes) -> bytes:
    """The quoted packet of an ICMP error frame (Ethernet + IPv4 without options + ICMP)."""
    tot = struct.unpack("!H", frame[16:18])[0]
    return frame[14 + 28:14 + tot]


def assert_error_checksums(frame: bytes, full_quote: bool) -> None:
    """Every checksum of an ICMP error, recomputed by scapy: outer IP, ICMP, the quoted IP header, and
    the quoted TCP/UDP/ICMP-echo checksum when the quote holds the whole quoted packet."""
    pkt = Ether(frame)
    fresh = pkt.copy()
    del fresh[IP].chksum
    del fresh[ICMP].chksum
    fresh[ICMP].remove_payload()
    fresh[ICMP].add_payload(Raw(quoted_of(frame)))
    rebuilt = Ether(bytes(fresh))
    assert pkt[IP].chksum == rebuilt[IP].chksum, "outer IP header checksum"
    assert pkt[ICMP].chksum == rebuilt[ICMP].chksum, "ICMP checksum"
    quote = quoted_of(frame)
    assert checksum(quote[:(quote[0] & 0xF) * 4]) == 0, "quoted IP header checksum (options included)"
    if not full_quote:
        return
    inner = IP(quote)
    layer: type[Packet] = {TCP_P: TCP, UDP_P: UDP, ICMP_P: ICMP}[inner.proto]
    if layer is UDP and inner[UDP].chksum == 0:
        return  # "no checksum" (RFC 768), asserted where it matters
    again = inner.copy()
    del again[layer].chksum
    assert IP(bytes(again))[layer].chksum == inner[layer].chksum, f"quoted {layer.__name__} checksum"


# The inside host's packets the errors are about: (L4 layer, bytes of L4 the router quotes; None = all).
QUOTED: dict[str, tuple[Callable[[], Packet], int | None]] = {
    "tcp-syn-20": (lambda: TCP(sport=40000, dport=80, flags="S", seq=1000, window=29200), 20),
    "tcp-syn-8": (lambda: TCP(sport=40000, dport=80, flags="S", seq=1000, window=29200), 8),
    "udp": (lambda: UDP(sport=5353, dport=53) / b"query", None),
    "udp-csum-0": (lambda: UDP(sport=5353, dport=53, chksum=0) / b"query", None),
    "icmp-echo": (lambda: ICMP(type=8, id=7, seq=1) / b"ping-data", None),
}

ERRORS: dict[str, Callable[[], Packet]] = {
    "time-exceeded": lambda: ICMP(type=11, code=0),
    "port-unreachable": lambda: ICMP(type=3, code=3),
    "frag-needed": lambda: ICMP(type=3, code=4, nexthopmtu=1400),
    "param-problem": lambda: ICMP(type=12, code=0, ptr=8),
}


def with_options(ip: bytes, opts: bytes) -> bytes:
    """The IP packet with `opts` (a multiple of 4 bytes) inserted after its 20-byte header, and IHL, total
    length and header checksum set to match. The L4 checksum does not cover IP options."""
    raw = bytearray(ip[:20] + opts + ip[20:])
    raw[0] = 0x40 | (5 + len(opts) // 4)
    raw[2:4] = struct.pack("!H", len(raw))
    raw[10:12] = b"\x00\x00"
    raw[10:12] = struct.pack("!H", checksum(bytes(raw[:20 + len(opts)])))
    return bytes(raw)


# IP options a router on the way might have added to the packet it quotes (RFC 5508 REQ-3b).
IP_OPTIONS: dict[str, bytes] = {
    "nop-eol-4": b"\x01\x01\x01\x00",
    "router-alert-4": b"\x94\x04\x00\x00",
    "record-route-12": b"\x07\x0b\x04" + bytes(8) + b"\x00",
    "nop-40": b"\x01" * 39 + b"\x00",  # IHL 15, the longest header there is
}


def quote_len(sent: Sent, l4_bytes: int | None) -> int:
    return len(sent.out_ip) if l4_bytes is None else 20 + l4_bytes


# ====================================================================== inbound: translated to the host


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("quoted", QUOTED)
def test_error_about_a_mapped_flow_translated_to_the_inside_host(dp: NatDatapath, error: str,
                                                                 quoted: str) -> None:
    """RFC 5508 REQ-3/4: outer destination and quoted source address/port (echo identifier) reverted, the
    ICMP message otherwise as the router sent it (type, code, next-hop MTU, pointer), all checksums valid;
    the conntrack entry untouched (RFC 5508 REQ-6, RFC 4787 REQ-12, RFC 5382 REQ-10: errors never
    refresh or delete a mapping)."""
    make_l4, l4_bytes = QUOTED[quoted]
    sent = send_out(dp, make_l4())
    n = quote_len(sent, l4_bytes)
    before = sent.entry(dp).to_bytes()
    frame = router_error(dp, ERRORS[error](), sent.out_ip[:n], GW_OUT)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert run.retval == XDP_REDIRECT
    # what the inside host sent, with the TTL the router saw: the quote reverted exactly
    want_quote = with_ttl(sent.ip, IP(sent.out_ip).ttl)[:n]
    assert run.data == expected_in(dp, ERRORS[error](), want_quote, HOST1), _diff(run, frame)
    assert_error_checksums(run.data, full_quote=l4_bytes is None or n == len(sent.out_ip))
    if quoted == "udp-csum-0":
        assert run.data[14 + 28 + 26:14 + 28 + 28] == b"\x00\x00", "a quoted UDP checksum 0 stays 0"
    assert d.nonzero() == {"XDP_REDIRECT": 1, "ICMP_ERROR_IN": 1}
    assert sent.entry(dp).to_bytes() == before, "an ICMP error changed the conntrack entry"
    assert len(dp.flows()) == 1


def _diff(run: Run, frame: bytes) -> str:
    return f"got {run.data.hex()}\nsent {frame.hex()}"


def test_frag_needed_reaches_the_host_with_the_next_hop_mtu(dp: NatDatapath) -> None:
    """PMTU discovery: the MTU field (bytes 6-7 of the ICMP header) is delivered as sent."""
    sent = send_out(dp, TCP(sport=40000, dport=80, flags="PA") / (b"x" * 1200))
    frame = router_error(dp, ICMP(type=3, code=4, nexthopmtu=1280), sent.out_ip[:28], GW_OUT)
    run = dp.outside(frame)
    assert run.retval == XDP_REDIRECT
    out = Ether(run.data)
    assert (out[ICMP].type, out[ICMP].code, out[ICMP].nexthopmtu) == (3, 4, 1280)
    assert (out[IP].dst, out[IP].src) == (HOST1, ROUTER)
    quote = IP(quoted_of(run.data))
    assert (quote.src, quote.dst, quote.len) == (HOST1, SRV, 1240)
    assert struct.unpack("!HH", quoted_of(run.data)[20:24]) == (40000, 80)
    assert_error_checksums(run.data, full_quote=False)


def test_error_about_an_established_flow_changes_nothing_in_conntrack(dp: NatDatapath) -> None:
    """Host/port unreachable for an ESTABLISHED TCP flow: no state change, no counter, no last_seen
    refresh, no deletion (RFC 5508 / RFC 7857: an ICMP error must not refresh or tear down a mapping)."""
    sent = send_out(dp, TCP(sport=40000, dport=80, flags="S"))
    port = Ether(sent.out)[TCP].sport
    assert dp.outside(bytes(eth_out(dp) / IP(src=SRV, dst=GW_OUT) /
                            TCP(sport=80, dport=port, flags="SA"))).retval == XDP_REDIRECT
    assert dp.inside(bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) /
                           TCP(sport=40000, dport=80, flags="A"))).retval == XDP_REDIRECT
    entry = sent.entry(dp)
    assert entry.state == CtState.ESTABLISHED
    before = entry.to_bytes()
    for code in (0, 1, 3, 13):  # net, host, port unreachable, administratively prohibited
        run = dp.outside(router_error(dp, ICMP(type=3, code=code), sent.out_ip, GW_OUT))
        assert run.retval == XDP_REDIRECT
    assert sent.entry(dp).to_bytes() == before
    # the flow still translates both ways
    run = dp.inside(bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / TCP(sport=40000, dport=80, flags="A")))
    assert run.retval == XDP_REDIRECT and Ether(run.data)[TCP].sport == port


def test_error_about_a_pool_address_flow_translated(dp: NatDatapath) -> None:
    """A flow of rule 1 (pool address): the error arrives for the pool address, goes to 10.1.x (routed via
    host1)."""
    sent = send_out(dp, UDP(sport=6000, dport=53) / b"q", src="10.1.7.7")
    ext = Ether(sent.out)[IP].src
    assert ext in POOL
    frame = router_error(dp, ICMP(type=11, code=0), sent.out_ip, ext)
    run = dp.outside(frame)
    assert run.retval == XDP_REDIRECT
    assert run.data == expected_in(dp, ICMP(type=11, code=0), with_ttl(sent.ip, 63), "10.1.7.7")


def test_error_about_a_static_flow_translated(dp: NatDatapath) -> None:
    sent = send_out(dp, UDP(sport=6000, dport=53) / b"q", src=STATIC_INSIDE)
    assert Ether(sent.out)[IP].src == STATIC_OUTSIDE and Ether(sent.out)[UDP].sport == 6000
    frame = router_error(dp, ICMP(type=3, code=3), sent.out_ip, STATIC_OUTSIDE)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert run.retval == XDP_REDIRECT
    assert run.data == expected_in(dp, ICMP(type=3, code=3), with_ttl(sent.ip, 63), STATIC_INSIDE)
    assert d[Stat.ICMP_ERROR_IN] == 1


def test_error_about_a_port_forward_reply_translated(dp: NatDatapath) -> None:
    """An inbound flow (tcp GW_OUT:443 -> host1:8443): the router's error about the server's SYN-ACK quotes
    GW_OUT:443 and must reach host1 quoting 10.0.1.42:8443."""
    client = (SRV2, 51000)
    syn = bytes(eth_out(dp) / IP(src=client[0], dst=GW_OUT) / TCP(sport=client[1], dport=443, flags="S"))
    assert dp.outside(syn).retval == XDP_REDIRECT
    synack = bytes(eth_in(dp) / IP(src=HOST1, dst=client[0], ttl=64) /
                   TCP(sport=8443, dport=client[1], flags="SA", seq=77, ack=1))
    run = dp.inside(synack)
    assert run.retval == XDP_REDIRECT
    assert (Ether(run.data)[IP].src, Ether(run.data)[TCP].sport) == (GW_OUT, 443)
    before = flow(dp, HOST1, client[0], 8443, client[1]).to_bytes()
    frame = router_error(dp, ICMP(type=3, code=1), run.data[14:], GW_OUT)
    with dp.counting() as d:
        out = dp.outside(frame)
    assert out.retval == XDP_REDIRECT
    assert out.data == expected_in(dp, ICMP(type=3, code=1), with_ttl(synack[14:], 63), HOST1)
    assert d[Stat.ICMP_ERROR_IN] == 1
    assert flow(dp, HOST1, client[0], 8443, client[1]).to_bytes() == before


@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_every_quote_length(dp: NatDatapath, proto: str) -> None:
    """The router may quote any length (RFC 792: IP header + 8 bytes; RFC 1812: as much as fits). Below IP
    header + 8 bytes of L4 nothing can be attributed: dropped as malformed, untouched. From there on the
    error is translated, with the quoted L4 checksum fixed whenever it is inside the quote (TCP: from 18
    bytes of L4 on) and every checksum of the result valid."""
    l4: Packet = {"tcp": TCP(sport=40000, dport=80, flags="S") / b"0123456789",
                  "udp": UDP(sport=5353, dport=53) / b"query",
                  "icmp": ICMP(type=8, id=7, seq=1) / b"ping-data"}[proto]
    sent = send_out(dp, l4)
    before = sent.entry(dp).to_bytes()
    want_quote = with_ttl(sent.ip, IP(sent.out_ip).ttl)
    for n in range(len(sent.out_ip) + 1):
        frame = router_error(dp, ICMP(type=11, code=0), sent.out_ip[:n], GW_OUT)
        with dp.counting() as d:
            run = dp.outside(frame)
        if n < 28:
            assert_untouched(run, frame, XDP_DROP)
            assert d.nonzero() == {"XDP_DROP": 1, "DROP_MALFORMED": 1}, f"quote of {n} bytes"
            continue
        quote = bytearray(want_quote[:n])
        if proto == "tcp" and n == 20 + 17:
            quote[36] = sent.out_ip[36]  # half a checksum: nothing natd could fix, left as quoted
        assert run.retval == XDP_REDIRECT, f"quote of {n} bytes: {d.nonzero()}"
        assert run.data == expected_in(dp, ICMP(type=11, code=0), bytes(quote), HOST1), f"quote of {n} bytes"
        assert_error_checksums(run.data, full_quote=n == len(sent.out_ip))
    assert sent.entry(dp).to_bytes() == before


# ================================================================ quoted IP options (RFC 5508 REQ-3b)


@pytest.mark.parametrize("opts", IP_OPTIONS)
@pytest.mark.parametrize("quoted", ["tcp-syn-8", "udp", "icmp-echo"])
def test_error_quoting_ip_options_translated_to_the_inside_host(dp: NatDatapath, quoted: str,
                                                                opts: str) -> None:
    """RFC 5508 REQ-3b (MUST): the quoted packet carries IP options (added on the way: natd never sends
    any). natd traverses them to the quoted transport header, finds the flow, and reverts the quote; the
    options stay as quoted, and the quoted header checksum (which covers them) stays valid."""
    make_l4, l4_bytes = QUOTED[quoted]
    sent = send_out(dp, make_l4())
    before = sent.entry(dp).to_bytes()
    quote = with_options(sent.out_ip, IP_OPTIONS[opts])
    n = len(quote) if l4_bytes is None else 20 + len(IP_OPTIONS[opts]) + l4_bytes
    frame = router_error(dp, ICMP(type=11, code=0), quote[:n], GW_OUT)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert run.retval == XDP_REDIRECT, d.nonzero()
    want = with_options(with_ttl(sent.ip, IP(sent.out_ip).ttl), IP_OPTIONS[opts])[:n]
    assert run.data == expected_in(dp, ICMP(type=11, code=0), want, HOST1), _diff(run, frame)
    assert_error_checksums(run.data, full_quote=l4_bytes is None)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "ICMP_ERROR_IN": 1}
    assert sent.entry(dp).to_bytes() == before


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_every_quote_length_with_40_bytes_of_options(dp: NatDatapath, proto: str) -> None:
    """RFC 5508 REQ-3b, bounds: with IHL 15 the transport header starts 60 bytes into the quote. A quote
    that ends before 8 bytes of it is malformed (dropped, counted, untouched); from there on the error is
    translated."""
    l4: Packet = {"tcp": TCP(sport=40000, dport=80, flags="S") / b"0123456789",
                  "udp": UDP(sport=5353, dport=53) / b"query"}[proto]
    sent = send_out(dp, l4)
    opts = IP_OPTIONS["nop-40"]
    quote = with_options(sent.out_ip, opts)
    want = with_options(with_ttl(sent.ip, IP(sent.out_ip).ttl), opts)
    for n in range(len(quote) + 1):
        frame = router_error(dp, ICMP(type=3, code=3), quote[:n], GW_OUT)
        with dp.counting() as d:
            run = dp.outside(frame)
        if n < 60 + 8:
            assert_untouched(run, frame, XDP_DROP)
            assert d.nonzero() == {"XDP_DROP": 1, "DROP_MALFORMED": 1}, f"quote of {n} bytes"
            continue
        expected = bytearray(want[:n])
        if proto == "tcp" and n == 60 + 17:
            expected[76] = quote[76]  # half a checksum: nothing natd could fix, left as quoted
        assert run.retval == XDP_REDIRECT, f"quote of {n} bytes: {d.nonzero()}"
        want_frame = expected_in(dp, ICMP(type=3, code=3), bytes(expected), HOST1)
        assert run.data == want_frame, f"quote of {n} bytes"
        assert_error_checksums(run.data, full_quote=n == len(quote))


@pytest.mark.parametrize("opts", ["router-alert-4", "nop-40"])
def test_host_error_quoting_ip_options_translated_out(dp: NatDatapath, opts: str) -> None:
    """RFC 5508 REQ-3b, outbound: an inside host's error quotes a packet with IP options; the quoted
    destination is translated behind the options and the error leaves from the external address."""
    reply, got, _ = _udp_reply_to_host(dp)
    frame = host_error(dp, ICMP(type=3, code=3), with_options(got[14:], IP_OPTIONS[opts]))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT, d.nonzero()
    want = with_options(with_ttl(reply[14:], 56), IP_OPTIONS[opts])
    assert run.data == expected_out(dp, ICMP(type=3, code=3), want), _diff(run, frame)
    assert_error_checksums(run.data, full_quote=True)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "ICMP_ERROR_OUT": 1}


# ============================================================ ICMP checksum (RFC 5508 REQ-3, SHOULD)


def _corrupt(frame: bytes, how: str) -> bytes:
    """The frame with its ICMP message made wrong: the checksum field, or the message's last byte."""
    raw = bytearray(frame)
    at = 14 + 20 + 2 if how == "checksum-field" else 14 + struct.unpack("!H", frame[16:18])[0] - 1
    raw[at] ^= 0x5A
    return bytes(raw)


def _error_frames(dp: NatDatapath, where: str, n: int) -> bytes:
    """A valid error natd would translate, quoting n bytes (so the ICMP message is 8 + n bytes long)."""
    if where == "in":
        sent = send_out(dp, UDP(sport=5353, dport=53) / (b"q" * 40))
        return router_error(dp, ICMP(type=11, code=0), sent.out_ip[:n], GW_OUT)
    _, got, _ = _udp_reply_to_host(dp)
    got = got + bytes(40)  # room for longer quotes (trailing bytes after the quoted datagram)
    src = HOST1 if where == "out-host" else "10.0.1.254"
    return host_error(dp, ICMP(type=3, code=3), got[14:14 + n], src=src)


@pytest.mark.parametrize("n", [28, 33, 34, 35, 36], ids=lambda n: f"quote-{n}")
@pytest.mark.parametrize("how", ["checksum-field", "last-byte"])
@pytest.mark.parametrize("where", ["in", "out-host", "out-router"])
def test_error_with_a_bad_icmp_checksum_dropped(dp: NatDatapath, where: str, how: str, n: int) -> None:
    """RFC 5508 REQ-3 (SHOULD): an error about a mapped flow whose ICMP checksum does not verify is dropped
    (counted as malformed), untouched, in both directions. The quote lengths give ICMP messages whose
    length leaves 0, 1, 2 and 3 bytes after the last 4-byte word; the same errors with a valid checksum
    are translated (test_every_quote_length covers every length)."""
    good = _error_frames(dp, where, n)
    run = (dp.outside if where == "in" else dp.inside)(good)
    assert run.retval == XDP_REDIRECT, "the valid error must be translated"
    bad = _corrupt(good, how)
    flows = {k.to_bytes(): e.to_bytes() for k, e in dp.flows()}
    with dp.counting() as d:
        run = (dp.outside if where == "in" else dp.inside)(bad)
    assert_untouched(run, bad, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_MALFORMED": 1}
    assert {k.to_bytes(): e.to_bytes() for k, e in dp.flows()} == flows


@pytest.mark.parametrize("bad", [False, True], ids=["valid", "bad-checksum"])
def test_error_longer_than_the_checksum_bound_translated_unverified(dp: NatDatapath, bad: bool) -> None:
    """The checksum is verified over at most 576 bytes of ICMP message (a router's error is at most 576
    bytes, RFC 1812 §4.3.2.3). A longer one is translated unverified: its checksum is carried over
    incrementally, so a wrong one arrives exactly as wrong (the inside host drops it)."""
    sent = send_out(dp, UDP(sport=5353, dport=53) / b"query")
    quote = sent.out_ip + bytes(2000)  # trailing bytes past the quoted datagram
    frame = router_error(dp, ICMP(type=11, code=0), quote, GW_OUT)
    if bad:
        frame = _corrupt(frame, "checksum-field")
    with dp.counting() as d:
        run = dp.outside(frame)
    # translated, then too big for in1's MTU: the kernel gets it (and would send Fragmentation Needed)
    assert run.retval == XDP_PASS
    assert d.nonzero() == {"XDP_PASS": 1, "ICMP_ERROR_IN": 1, "PASS_FIB_OTHER": 1}
    want = bytes(eth_out(dp) / IP(src=ROUTER, dst=HOST1, ttl=ERR_TTL, id=ERR_ID) / ICMP(type=11, code=0)
                 / Raw(with_ttl(sent.ip, IP(sent.out_ip).ttl) + bytes(2000)))
    assert run.data[:36] + run.data[38:] == want[:36] + want[38:]
    # the ICMP checksum is as valid as it came in: the message sums to the same value, 0 when it was valid
    assert checksum(run.data[34:]) == checksum(frame[34:])
    assert (checksum(run.data[34:]) != 0) == bad


# ====================================================================== inbound: not translated


def _no_flow_quote(src: str, sport: int, proto: int = TCP_P, dst: str = SRV, dport: int = 80) -> bytes:
    l4: Packet = {TCP_P: TCP(sport=sport, dport=dport, flags="S"), UDP_P: UDP(sport=sport, dport=dport),
                  ICMP_P: ICMP(type=8, id=sport)}[proto]
    return bytes(IP(src=src, dst=dst, ttl=63) / l4)


@pytest.mark.parametrize("proto", [TCP_P, UDP_P], ids=["tcp", "udp"])
@pytest.mark.parametrize("sport", [NAT_PORTS[0], 25000, NAT_PORTS[1]])
def test_error_without_mapping_in_nat_range_dropped(dp: NatDatapath, proto: int, sport: int) -> None:
    """The quoted source port belongs to the NAT but no flow has it: nobody to send it to, and handing it
    to the kernel would be wrong (natd's port, not the kernel's): dropped, untouched."""
    frame = router_error(dp, ICMP(type=3, code=3), _no_flow_quote(GW_OUT, sport, proto), GW_OUT)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_NO_MAPPING": 1}


@pytest.mark.parametrize("ext,sport", [(GW_OUT, 22), (GW_OUT, NAT_PORTS[0] - 1), (GW_OUT, NAT_PORTS[1] + 1),
                                       (GW_OUT, 40000)])
def test_error_about_the_gateways_own_traffic_passed(dp: NatDatapath, ext: str, sport: int) -> None:
    """Quoted source port outside the NAT range: the gateway's own connection; the kernel's business."""
    frame = router_error(dp, ICMP(type=3, code=4, nexthopmtu=1400), _no_flow_quote(ext, sport), ext)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d.nonzero() == {"XDP_PASS": 1, "PASS_ICMP_OTHER": 1}


@pytest.mark.parametrize("ext,sport", [(POOL[0], 50000), ("192.0.2.30", 25000)])
def test_error_to_an_address_the_gateway_does_not_own_dropped(dp: NatDatapath, ext: str, sport: int) -> None:
    """A pool address (192.0.2.1) or a forward-only address (192.0.2.30) routed to the gateway but not
    configured on it: the kernel would route an untranslated packet for it straight back out (a loop
    with the upstream router), so what natd does not translate there is dropped."""
    frame = router_error(dp, ICMP(type=3, code=3), _no_flow_quote(ext, sport), ext)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_NO_MAPPING": 1}


def test_error_to_a_static_address_without_flow_dropped(dp: NatDatapath) -> None:
    """Every port of a static address belongs to its inside host: no flow, no delivery."""
    frame = router_error(dp, ICMP(type=3, code=3), _no_flow_quote(STATIC_OUTSIDE, 22), STATIC_OUTSIDE)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d[Stat.DROP_NO_MAPPING] == 1


@pytest.mark.parametrize("ident", [NAT_PORTS[0], 21000, 40000, 1])
def test_error_about_an_echo_without_session_passed(dp: NatDatapath, ident: int) -> None:
    """An echo without a session is the gateway's own ping: its errors belong to the kernel, like the echo
    replies to it (xdp_outside passes those whatever the identifier: the kernel picks identifiers anywhere,
    the NAT range included), and like errors about the gateway's own TCP/UDP traffic. Otherwise `ping` /
    `traceroute -I` run on the gateway never see Destination Unreachable / Time Exceeded."""
    frame = router_error(dp, ICMP(type=11, code=0), _no_flow_quote(GW_OUT, ident, ICMP_P), GW_OUT)
    with dp.counting() as d:
        run = dp.outside(frame)
    verdict = {XDP_DROP: "XDP_DROP", XDP_PASS: "XDP_PASS"}.get(run.retval, str(run.retval))
    assert (verdict, d.nonzero()) == ("XDP_PASS", {"XDP_PASS": 1, "PASS_ICMP_OTHER": 1})
    assert_untouched(run, frame, XDP_PASS)


def test_error_about_an_echo_of_another_host_is_not_attributed(dp: NatDatapath) -> None:
    """A session exists for the identifier, but towards another remote: not this session's error; not
    translated (the kernel gets it, as for any echo without a session)."""
    sent = send_out(dp, ICMP(type=8, id=7, seq=1))
    ext_id = Ether(sent.out)[ICMP].id
    quote = bytes(IP(src=GW_OUT, dst=SRV2, ttl=63) / ICMP(type=8, id=ext_id, seq=1))
    frame = router_error(dp, ICMP(type=3, code=1), quote, GW_OUT)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d[Stat.ICMP_ERROR_IN] == 0


def test_error_from_another_endpoint_is_not_attributed(dp: NatDatapath) -> None:
    """The mapping is endpoint-dependent: a quote naming another remote (address or port) or another
    external address than the error's destination matches no flow."""
    sent = send_out(dp, TCP(sport=40000, dport=80, flags="S"))
    port = Ether(sent.out)[TCP].sport
    quotes = [bytes(IP(src=GW_OUT, dst=SRV2, ttl=63) / TCP(sport=port, dport=80, flags="S")),
              bytes(IP(src=GW_OUT, dst=SRV, ttl=63) / TCP(sport=port, dport=81, flags="S"))]
    for quote in quotes:
        frame = router_error(dp, ICMP(type=3, code=3), quote, GW_OUT)
        with dp.counting() as d:
            run = dp.outside(frame)
        assert_untouched(run, frame, XDP_DROP)
        assert d[Stat.DROP_NO_MAPPING] == 1
    # the right quote, sent to another external address (in the NAT range there too)
    frame = router_error(dp, ICMP(type=3, code=3), sent.out_ip, POOL[0])
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d[Stat.DROP_NO_MAPPING] == 1


def _mangled(ip: bytes, **fields: int) -> bytes:
    raw = bytearray(ip)
    if "frag" in fields:
        raw[6:8] = struct.pack("!H", fields["frag"])
    if "first" in fields:
        raw[0] = fields["first"]
    raw[10:12] = b"\x00\x00"
    raw[10:12] = struct.pack("!H", checksum(bytes(raw[:20])))
    return bytes(raw)


@pytest.mark.parametrize("case", ["ihl15-past-the-quote", "version6", "ihl4"])
def test_quoted_header_natd_never_sends_is_malformed(dp: NatDatapath, case: str) -> None:
    """RFC 5508 REQ-3b traverses options only within the quote: a header whose IHL puts the transport
    header past the 33 quoted bytes, an IPv6 version or an IHL below 5 is malformed: dropped, counted."""
    sent = send_out(dp, UDP(sport=5353, dport=53) / b"query")
    first = {"ihl15-past-the-quote": 0x4F, "version6": 0x65, "ihl4": 0x44}[case]
    frame = router_error(dp, ICMP(type=11, code=0), _mangled(sent.out_ip, first=first), GW_OUT)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_MALFORMED": 1}


@pytest.mark.parametrize("frag", [1, 185, 0x2000 | 185], ids=["offset-1", "offset-185", "offset-185-mf"])
def test_quoted_non_first_fragment_passed(dp: NatDatapath, frag: int) -> None:
    """A non-first fragment carries no ports: nothing to translate; the kernel's."""
    sent = send_out(dp, UDP(sport=5353, dport=53) / b"query")
    frame = router_error(dp, ICMP(type=11, code=1), _mangled(sent.out_ip, frag=frag), GW_OUT)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d.nonzero() == {"XDP_PASS": 1, "PASS_ICMP_OTHER": 1}


@pytest.mark.parametrize("quote", [
    pytest.param(lambda: IP(src=GW_OUT, dst=SRV, proto=47) / Raw(b"\x00" * 8), id="gre"),
    pytest.param(lambda: IP(src=GW_OUT, dst=SRV) / ICMP(type=0, id=21000), id="echo-reply"),
    pytest.param(lambda: IP(src=GW_OUT, dst=SRV) / ICMP(type=3, code=3) / Raw(b"\x00" * 8), id="icmp-error"),
])
def test_quoted_protocol_natd_does_not_map_passed(dp: NatDatapath, quote: Callable[[], Packet]) -> None:
    frame = router_error(dp, ICMP(type=3, code=2), bytes(quote()), GW_OUT)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d.nonzero() == {"XDP_PASS": 1, "PASS_ICMP_OTHER": 1}


def test_error_with_expiring_ttl_passed_untouched(dp: NatDatapath) -> None:
    sent = send_out(dp, UDP(sport=5353, dport=53) / b"query")
    before = sent.entry(dp).to_bytes()
    frame = router_error(dp, ICMP(type=3, code=3), sent.out_ip, GW_OUT, ttl=1)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d.nonzero() == {"XDP_PASS": 1, "PASS_TTL": 1}
    assert sent.entry(dp).to_bytes() == before


# ===================================================================================== outbound errors


def _udp_reply_to_host(dp: NatDatapath, src: str = HOST1, sport: int = 5353) -> tuple[bytes, bytes, int]:
    """A UDP flow src:sport -> SRV:53 and SRV's reply. Returns (reply as SRV sent it, reply as the inside
    host got it, external port)."""
    sent = send_out(dp, UDP(sport=sport, dport=53) / b"query", src=src)
    out = Ether(sent.out)
    ext, port = out[IP].src, out[UDP].sport
    reply = bytes(eth_out(dp) / IP(src=SRV, dst=ext, ttl=57, id=0x5151) / UDP(sport=53, dport=port)
                  / b"answer")
    run = dp.outside(reply)
    # translated back either way; 10.0.1.43 has no neighbour entry, so the kernel forwards that one
    assert run.retval == (XDP_REDIRECT if src != "10.0.1.43" else XDP_PASS)
    assert Ether(run.data)[IP].dst == src
    return reply, run.data, port


def host_error(dp: NatDatapath, icmp: Packet, quote: bytes, src: str = HOST1, dst: str = SRV) -> bytes:
    return bytes(eth_in(dp) / IP(src=src, dst=dst, ttl=64, id=0x6161) / icmp / Raw(quote))


def expected_out(dp: NatDatapath, icmp: Packet, quote: bytes, src: str = GW_OUT, dst: str = SRV) -> bytes:
    return bytes(Ether(src=dp.mac["out0"], dst=dp.mac["inet"]) / IP(src=src, dst=dst, ttl=63, id=0x6161) /
                 icmp / Raw(quote))


@pytest.mark.parametrize("quoted_l4", [None, 8], ids=["whole-datagram", "8-bytes"])
def test_host_port_unreachable_translated_out(dp: NatDatapath, quoted_l4: int | None) -> None:
    """RFC 5508 REQ-3 outbound: host1 answers SRV's UDP reply with Port Unreachable, quoting it as received
    (SRV:53 -> 10.0.1.42:5353); it leaves from the external address, quoting SRV:53 -> GW_OUT:port with
    the quoted UDP checksum SRV computed."""
    reply, got, _ = _udp_reply_to_host(dp)
    before = flow(dp, HOST1, SRV, 5353, 53, UDP_P).to_bytes()
    n = len(got) - 14 if quoted_l4 is None else 20 + quoted_l4
    frame = host_error(dp, ICMP(type=3, code=3), got[14:14 + n])
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    want_quote = with_ttl(reply[14:], 56)[:n]  # what SRV sent, with the TTL host1 saw
    assert run.data == expected_out(dp, ICMP(type=3, code=3), want_quote), _diff(run, frame)
    assert_error_checksums(run.data, full_quote=quoted_l4 is None)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "ICMP_ERROR_OUT": 1}
    assert flow(dp, HOST1, SRV, 5353, 53, UDP_P).to_bytes() == before


def test_host_error_with_zero_udp_checksum_translated_out(dp: NatDatapath) -> None:
    sent = send_out(dp, UDP(sport=5353, dport=53, chksum=0) / b"query")
    port = Ether(sent.out)[UDP].sport
    reply = bytes(eth_out(dp) / IP(src=SRV, dst=GW_OUT, ttl=57) / UDP(sport=53, dport=port, chksum=0) / b"a")
    got = dp.outside(reply).data
    run = dp.inside(host_error(dp, ICMP(type=3, code=3), got[14:]))
    assert run.retval == XDP_REDIRECT
    assert run.data == expected_out(dp, ICMP(type=3, code=3), with_ttl(reply[14:], 56))
    assert quoted_of(run.data)[26:28] == b"\x00\x00"


def test_static_host_error_translated_out(dp: NatDatapath) -> None:
    reply, got, port = _udp_reply_to_host(dp, src=STATIC_INSIDE, sport=6000)
    assert port == 6000
    frame = host_error(dp, ICMP(type=3, code=3), got[14:], src=STATIC_INSIDE)
    run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    assert run.data == expected_out(dp, ICMP(type=3, code=3), with_ttl(reply[14:], 56), src=STATIC_OUTSIDE)


def test_forward_server_error_translated_out(dp: NatDatapath) -> None:
    """The server behind udp GW_OUT:5300 answers a datagram with Port Unreachable: it leaves quoting
    client -> GW_OUT:5300, as the client sent it."""
    client = (SRV2, 52000)
    dgram = bytes(eth_out(dp) / IP(src=client[0], dst=GW_OUT, ttl=57) / UDP(sport=client[1], dport=FWD_UDP[0])
                  / b"hello")
    run = dp.outside(dgram)
    assert run.retval == XDP_REDIRECT
    assert (Ether(run.data)[IP].dst, Ether(run.data)[UDP].dport) == (HOST1, FWD_UDP[2])
    frame = host_error(dp, ICMP(type=3, code=3), run.data[14:], dst=client[0])
    with dp.counting() as d:
        out = dp.inside(frame)
    assert out.retval == XDP_REDIRECT
    assert out.data == expected_out(dp, ICMP(type=3, code=3), with_ttl(dgram[14:], 56), dst=client[0])
    assert d[Stat.ICMP_ERROR_OUT] == 1


@pytest.mark.parametrize("case", ["no-flow", "other-remote-port", "third-party-error-sent-elsewhere"])
def test_host_error_without_mapping_dropped(dp: NatDatapath, case: str) -> None:
    """RFC 5508 REQ-5 (SHOULD drop without a mapping): never leaked with a private address. An error
    about no flow, or an inside node's error about another host's flow that is not addressed to the quoted
    packet's source (natd does not lend its public address for that), is dropped."""
    _udp_reply_to_host(dp, src="10.0.1.43", sport=5353)
    _udp_reply_to_host(dp)
    dst = SRV
    if case == "no-flow":
        quote = bytes(IP(src=SRV, dst=HOST1, ttl=56) / UDP(sport=53, dport=5354) / b"answer")
    elif case == "third-party-error-sent-elsewhere":
        quote = bytes(IP(src=SRV, dst="10.0.1.43", ttl=56) / UDP(sport=53, dport=5353) / b"answer")
        dst = SRV2
    else:
        quote = bytes(IP(src=SRV, dst=HOST1, ttl=56) / UDP(sport=54, dport=5353) / b"answer")
    frame = host_error(dp, ICMP(type=3, code=3), quote, dst=dst)
    flows = {k.to_bytes(): e.to_bytes() for k, e in dp.flows()}
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_NO_MAPPING": 1}
    assert {k.to_bytes(): e.to_bytes() for k, e in dp.flows()} == flows


# ===================================================== errors from other inside nodes (RFC 5508 REQ-5c)

ROUTER_IN = "10.0.1.254"  # an inside router between the gateway and the hosts behind it, no static mapping


@pytest.mark.parametrize("error", ["time-exceeded", "frag-needed", "port-unreachable"])
@pytest.mark.parametrize("host,router,public", [
    pytest.param(HOST1, ROUTER_IN, None, id="router-without-static"),
    pytest.param("10.1.7.7", ROUTER_IN, None, id="router-without-static-pool-flow"),
    pytest.param(HOST1, STATIC_INSIDE, STATIC_OUTSIDE, id="router-with-static"),
    pytest.param(HOST1, "10.0.1.43", None, id="another-host"),
])
def test_inside_router_error_translated_out(dp: NatDatapath, host: str, router: str, public: str | None,
                                            error: str) -> None:
    """RFC 5508 REQ-5 (a, b, c): an inside node other than the flow's host (a router between the gateway
    and the host) sends an error about a packet that came in from the internet. The quote is reverted to
    what the remote sent (a), type and code are kept (b), and the outer source becomes public (c): the
    sender's own static 1:1 address when it has one (Basic NAT), else the flow's external address (a pool
    address for the pool flow). All checksums valid; the flow unchanged."""
    reply, got, port = _udp_reply_to_host(dp, src=host, sport=5353)
    ext = IP(reply[14:]).dst
    entry = flow(dp, host, SRV, 5353, 53, UDP_P)
    before = entry.to_bytes()
    frame = host_error(dp, ERRORS[error](), got[14:], src=router)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT, d.nonzero()
    want_quote = with_ttl(reply[14:], 56)
    assert run.data == expected_out(dp, ERRORS[error](), want_quote, src=public or ext), _diff(run, frame)
    assert_error_checksums(run.data, full_quote=True)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "ICMP_ERROR_OUT": 1}
    assert flow(dp, host, SRV, 5353, 53, UDP_P).to_bytes() == before
    assert (IP(quoted_of(run.data)).dst, struct.unpack("!H", quoted_of(run.data)[22:24])[0]) == (ext, port)


def test_inside_router_error_quoting_8_bytes_of_tcp_translated_out(dp: NatDatapath) -> None:
    """RFC 5508 REQ-5c with a TCP quote of IP header + 8 bytes (RFC 792's minimum) from an inside router:
    the server behind the port forward GW_OUT:443 answers a client; a router in front of it reports
    the client's SYN as timed out."""
    client = (SRV2, 52000)
    syn_in = bytes(eth_out(dp) / IP(src=client[0], dst=GW_OUT, ttl=57, id=0x7777)
                   / TCP(sport=client[1], dport=443, flags="S", seq=1))
    run = dp.outside(syn_in)
    assert run.retval == XDP_REDIRECT
    frame = host_error(dp, ICMP(type=11, code=0), run.data[14:14 + 28], src=ROUTER_IN, dst=client[0])
    with dp.counting() as d:
        out = dp.inside(frame)
    assert out.retval == XDP_REDIRECT
    assert out.data == expected_out(dp, ICMP(type=11, code=0), with_ttl(syn_in[14:], 56)[:28], dst=client[0])
    assert_error_checksums(out.data, full_quote=False)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "ICMP_ERROR_OUT": 1}


@pytest.mark.parametrize("n", [0, 19, 20, 27])
def test_host_error_with_truncated_quote_dropped(dp: NatDatapath, n: int) -> None:
    _, got, _ = _udp_reply_to_host(dp)
    frame = host_error(dp, ICMP(type=3, code=3), got[14:14 + n])
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_MALFORMED": 1}


def test_host_error_quoting_icmp_dropped(dp: NatDatapath) -> None:
    """natd maps no inbound echo, so an error about an ICMP message a host received is about nothing natd
    can translate: dropped (never forwarded with the private source)."""
    frame = host_error(dp, ICMP(type=3, code=3), bytes(IP(src=SRV, dst=HOST1) / ICMP(type=0, id=7)))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_UNSUPPORTED": 1}
