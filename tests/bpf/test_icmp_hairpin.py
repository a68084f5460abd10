"""Hairpinned ICMP in the XDP datapath (RFC 5508 REQ-7, REQ-7a, RFC 7857 §12), byte for byte.

Queries: an inside host pings the static 1:1 address of another inside host (Basic NAT). The echo request
goes out through the sender's own echo session, so the target sees the sender's external address and
mapped identifier, and comes back in to the static host; the static host's echo reply goes out from its
static address and in through the sender's session, back to the sender with its own identifier. An echo
to any other external address is the gateway's own business (answered by the kernel, or dropped when the
address is not the gateway's).

Errors: the target of a hairpinned packet (or an inside router in front of it) answers it with an ICMP
error addressed to the sender's external address. natd translates it out through the target's flow and
in through the sender's: the quote reverts to what the sender sent, the outer destination becomes the
sender's inside address (REQ-7a) and the outer source the target's external address.

Host A is host1 (10.0.1.42, behind GW_OUT) or 10.1.7.7 (a pool address); host B is the static host
10.1.77.7 (192.0.2.77) or host1 behind the port forward udp GW_OUT:5300. Both are routed via in1 to host1's
MAC, so every translated frame is redirected there. Rules: see tests/bpf/harness.py.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from natd.maps import CtFlags, Stat

from .harness import (
    FWD_ONLY_ADDR,
    FWD_UDP,
    GW_OUT,
    HOST1,
    POOL,
    STATIC_INSIDE,
    STATIC_OUTSIDE,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    NatDatapath,
    Run,
)
from .test_datapath import ICMP_P, TCP_P, UDP_P, assert_untouched, eth_in, flow
from .test_icmp_errors import assert_error_checksums, with_ttl

pytestmark = pytest.mark.bpf

ROUTER_IN = "10.0.1.254"  # an inside router in front of the target, without a static mapping
PING_ID = 7               # outside the NAT range: the sender's identifier is mapped to another one


def from_inside(dp: NatDatapath, src: str, dst: str, l4: Packet, ident: int = 0x4444) -> bytes:
    return bytes(eth_in(dp) / IP(src=src, dst=dst, ttl=64, id=ident) / l4)


def to_inside(dp: NatDatapath, src: str, dst: str, l4: Packet, ident: int = 0x4444) -> bytes:
    """As natd must redirect it to an inside host (via in1 to host1's MAC, TTL 63)."""
    return bytes(Ether(src=dp.mac["in1"], dst=dp.mac["host1"]) / IP(src=src, dst=dst, ttl=63, id=ident) / l4)


def _diff(run: Run, frame: bytes) -> str:
    return f"got {run.data.hex()}\nsent {frame.hex()}"


# ============================================================================ echo (queries)


def test_hairpinned_echo_to_a_static_address_goes_round_both_ways(dp: NatDatapath) -> None:
    """RFC 5508 REQ-7 (Basic NAT), RFC 7857 §12: host1 pings 10.1.77.7 by its static address. The target
    sees host1's external address and mapped identifier; its reply comes from the static address and
    reaches host1 with host1's own identifier. Checksums as scapy computes them; the session counts one
    packet each way and is marked replied."""
    request = from_inside(dp, HOST1, STATIC_OUTSIDE, ICMP(type=8, id=PING_ID, seq=1) / b"hairpin-ping")
    with dp.counting() as d:
        run = dp.inside(request)
    assert run.retval == XDP_REDIRECT, d.nonzero()
    entry = flow(dp, HOST1, STATIC_OUTSIDE, PING_ID, 0, ICMP_P)
    assert str(entry.nat_ip) == GW_OUT and entry.nat_port_host != PING_ID
    ext_id = entry.nat_port_host
    want = to_inside(dp, GW_OUT, STATIC_INSIDE, ICMP(type=8, id=ext_id, seq=1) / b"hairpin-ping")
    assert run.data == want, _diff(run, request)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "HAIRPIN": 1, "CT_NEW": 1}

    reply = from_inside(dp, STATIC_INSIDE, GW_OUT, ICMP(type=0, id=ext_id, seq=1) / b"hairpin-ping", 0x5555)
    with dp.counting() as d:
        run = dp.inside(reply)
    assert run.retval == XDP_REDIRECT, d.nonzero()
    assert run.data == to_inside(dp, STATIC_OUTSIDE, HOST1, ICMP(type=0, id=PING_ID, seq=1) / b"hairpin-ping",
                                 0x5555), _diff(run, reply)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "HAIRPIN": 1}
    entry = flow(dp, HOST1, STATIC_OUTSIDE, PING_ID, 0, ICMP_P)
    assert (entry.packets_orig, entry.packets_reply) == (1, 1)
    assert entry.flags & CtFlags.REPLIED
    assert len(dp.flows()) == 1  # static NAT keeps the identifier: no state on the target's side


@pytest.mark.parametrize("dst,verdict,reason", [
    pytest.param(GW_OUT, XDP_PASS, "PASS_LOCAL", id="gateway-address"),
    pytest.param(POOL[0], XDP_DROP, "DROP_NO_MAPPING", id="pool-address"),
    pytest.param(FWD_ONLY_ADDR, XDP_DROP, "DROP_NO_MAPPING", id="forward-only-address"),
])
def test_echo_to_an_external_address_without_static_mapping_is_not_hairpinned(
        dp: NatDatapath, dst: str, verdict: int, reason: str) -> None:
    """No inside host owns the echo there: the gateway's own address is answered by the kernel (passed
    untouched); an address routed to the gateway but not configured on it is dropped (the kernel would
    route it straight back out with a private source). No session is opened."""
    frame = from_inside(dp, HOST1, dst, ICMP(type=8, id=PING_ID, seq=1))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, verdict)
    assert d.nonzero() == {"XDP_PASS" if verdict == XDP_PASS else "XDP_DROP": 1, reason: 1}
    assert dp.flows() == []


@pytest.mark.parametrize("src,ident", [
    pytest.param(STATIC_INSIDE, 12345, id="static-host-unknown-identifier"),
    pytest.param(HOST1, None, id="host-without-static-mapping"),
])
def test_echo_reply_that_answers_no_hairpinned_echo_is_the_gateways(dp: NatDatapath, src: str,
                                                                    ident: int | None) -> None:
    """An echo reply to the gateway's address that matches no hairpinned session (a reply to the gateway's
    own ping) goes to the kernel untouched."""
    run = dp.inside(from_inside(dp, HOST1, STATIC_OUTSIDE, ICMP(type=8, id=PING_ID, seq=1)))
    assert run.retval == XDP_REDIRECT
    ext_id = flow(dp, HOST1, STATIC_OUTSIDE, PING_ID, 0, ICMP_P).nat_port_host
    before = flow(dp, HOST1, STATIC_OUTSIDE, PING_ID, 0, ICMP_P).to_bytes()
    frame = from_inside(dp, src, GW_OUT, ICMP(type=0, id=ext_id if ident is None else ident, seq=1))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_PASS)
    assert d.nonzero() == {"XDP_PASS": 1, "PASS_LOCAL": 1}
    assert flow(dp, HOST1, STATIC_OUTSIDE, PING_ID, 0, ICMP_P).to_bytes() == before


# ============================================================================ errors


def _hairpin(dp: NatDatapath, src: str, dst: str, l4: Packet) -> tuple[bytes, bytes]:
    """A hairpinned packet: (as the sender sent it, as the target got it)."""
    frame = from_inside(dp, src, dst, l4, 0x1234)
    run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    return frame, run.data


HAIRPIN_ERRORS = {
    "udp-to-static-port-unreachable": (HOST1, STATIC_OUTSIDE, lambda: UDP(sport=5353, dport=7000) / b"hello",
                                       lambda: ICMP(type=3, code=3), None),
    "tcp-to-static-admin-prohibited-8-bytes": (HOST1, STATIC_OUTSIDE,
                                               lambda: TCP(sport=40000, dport=7001, flags="S", seq=1),
                                               lambda: ICMP(type=3, code=13), 28),
    "udp-to-port-forward-port-unreachable": ("10.1.7.7", GW_OUT,
                                             lambda: UDP(sport=6000, dport=FWD_UDP[0]) / b"hello",
                                             lambda: ICMP(type=3, code=3), None),
}


@pytest.mark.parametrize("case", HAIRPIN_ERRORS)
def test_hairpinned_error_from_the_target_reaches_the_sender(dp: NatDatapath, case: str) -> None:
    """RFC 5508 REQ-7 (every NAT: a static target and a port forward target) and REQ-7a: the target
    answers a hairpinned packet with an error, addressed to the sender's external address and quoting
    what it got. natd sends it to the sender (outer destination: the quoted source after translation,
    REQ-7a), from the target's external address, quoting exactly what the sender sent (with the TTL the
    target saw); type and code kept; every checksum valid; neither flow changed."""
    src, dst, make_l4, make_error, n = HAIRPIN_ERRORS[case]
    sent, got = _hairpin(dp, src, dst, make_l4())
    target = IP(got[14:]).dst
    flows = {k.to_bytes(): e.to_bytes() for k, e in dp.flows()}
    assert len(flows) == 2  # the sender's flow and the target's inbound flow
    quote = got[14:] if n is None else got[14:14 + n]
    frame = from_inside(dp, target, IP(got[14:]).src, make_error() / Raw(quote), 0x6161)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT, d.nonzero()
    want_quote = with_ttl(sent[14:], 63)
    want_quote = want_quote if n is None else want_quote[:n]
    assert run.data == to_inside(dp, dst, src, make_error() / Raw(want_quote), 0x6161), _diff(run, frame)
    assert_error_checksums(run.data, full_quote=n is None)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "HAIRPIN": 1}
    assert {k.to_bytes(): e.to_bytes() for k, e in dp.flows()} == flows, "an ICMP error changed conntrack"


@pytest.mark.parametrize("router,public", [
    pytest.param(ROUTER_IN, STATIC_OUTSIDE, id="router-without-static"),
    pytest.param(HOST1, STATIC_OUTSIDE, id="another-inside-host"),
])
def test_hairpinned_error_from_a_router_in_front_of_the_target(dp: NatDatapath, router: str,
                                                              public: str) -> None:
    """RFC 5508 REQ-7a with REQ-5c: a router between the gateway and the target reports the hairpinned
    packet (Time Exceeded). It reaches the sender like the target's own error; the source is the public
    address of the flow the router reports about (the target's static address), never the router's."""
    sent, got = _hairpin(dp, HOST1, STATIC_OUTSIDE, UDP(sport=5353, dport=7000) / b"hello")
    frame = from_inside(dp, router, GW_OUT, ICMP(type=11, code=0) / Raw(got[14:]), 0x6161)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT, d.nonzero()
    assert run.data == to_inside(dp, public, HOST1, ICMP(type=11, code=0) / Raw(with_ttl(sent[14:], 63)),
                                 0x6161), _diff(run, frame)
    assert_error_checksums(run.data, full_quote=True)
    assert d[Stat.HAIRPIN] == 1


def test_error_to_an_external_address_about_no_hairpinned_flow_is_the_gateways(dp: NatDatapath) -> None:
    """An error addressed to the gateway's address that quotes no hairpinned flow (the gateway's own
    packet, or none at all) is passed to the kernel untouched, as before natd translated hairpinned
    errors; a quote too short to hold 8 bytes of L4 is malformed: dropped and counted."""
    _hairpin(dp, HOST1, STATIC_OUTSIDE, UDP(sport=5353, dport=7000) / b"hello")
    unknown = bytes(IP(src=GW_OUT, dst=STATIC_INSIDE, ttl=63) / UDP(sport=25000, dport=7000) / b"hello")
    for quote in (unknown, bytes(IP(src=GW_OUT, dst=STATIC_INSIDE) / ICMP(type=8, id=9))):
        frame = from_inside(dp, STATIC_INSIDE, GW_OUT, ICMP(type=3, code=3) / Raw(quote))
        with dp.counting() as d:
            run = dp.inside(frame)
        assert_untouched(run, frame, XDP_PASS)
        assert d.nonzero() == {"XDP_PASS": 1, "PASS_LOCAL": 1}
    frame = from_inside(dp, STATIC_INSIDE, GW_OUT, ICMP(type=3, code=3) / Raw(unknown[:27]))
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_MALFORMED": 1}


def test_hairpinned_error_with_a_bad_icmp_checksum_dropped(dp: NatDatapath) -> None:
    """RFC 5508 REQ-3 (SHOULD) on the hairpin path: a hairpinned error whose ICMP checksum does not verify
    is dropped (malformed), untouched."""
    _sent, got = _hairpin(dp, HOST1, STATIC_OUTSIDE, UDP(sport=5353, dport=7000) / b"hello")
    raw = bytearray(from_inside(dp, STATIC_INSIDE, GW_OUT, ICMP(type=3, code=3) / Raw(got[14:])))
    raw[14 + 20 + 2] ^= 0x5A
    frame = bytes(raw)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_untouched(run, frame, XDP_DROP)
    assert d.nonzero() == {"XDP_DROP": 1, "DROP_MALFORMED": 1}


def test_hairpinned_error_with_quoted_ip_options(dp: NatDatapath) -> None:
    """RFC 5508 REQ-3b on the hairpin path: the quote's options are traversed there too."""
    from .test_icmp_errors import IP_OPTIONS, with_options

    sent, got = _hairpin(dp, HOST1, STATIC_OUTSIDE, UDP(sport=5353, dport=7000) / b"hello")
    opts = IP_OPTIONS["record-route-12"]
    frame = from_inside(dp, STATIC_INSIDE, GW_OUT, ICMP(type=3, code=3) / Raw(with_options(got[14:], opts)))
    run = dp.inside(frame)
    assert run.retval == XDP_REDIRECT
    want = with_options(with_ttl(sent[14:], 63), opts)
    assert run.data == to_inside(dp, STATIC_OUTSIDE, HOST1, ICMP(type=3, code=3) / Raw(want)), \
        _diff(run, frame)
    assert_error_checksums(run.data, full_quote=True)


def test_tcp_and_udp_flows_are_untouched_by_hairpinned_echo(dp: NatDatapath) -> None:
    """The echo session is its own flow: an established hairpinned UDP flow between the same hosts keeps
    its entry, and the echo gets a session of its own."""
    _hairpin(dp, HOST1, STATIC_OUTSIDE, UDP(sport=5353, dport=7000) / b"hello")
    before = flow(dp, HOST1, STATIC_OUTSIDE, 5353, 7000, UDP_P).to_bytes()
    _hairpin(dp, HOST1, STATIC_OUTSIDE, ICMP(type=8, id=PING_ID, seq=1))
    assert flow(dp, HOST1, STATIC_OUTSIDE, 5353, 7000, UDP_P).to_bytes() == before
    assert {(k.proto, str(k.src)) for k, _ in dp.flows()} >= {(UDP_P, HOST1), (ICMP_P, HOST1)}
    assert not [k for k, _ in dp.flows() if k.proto == TCP_P]
