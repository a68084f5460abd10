"""A RST from the internet must fall near the inside host's receive window to close a flow (RFC 5961
§3 in spirit), and new external ports keep the class and parity of the inside port (RFC 4787 REQ-3a,
REQ-4). BPF_PROG_TEST_RUN on crafted frames; harness in tests/bpf/."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from natd.maps import CtState, Stat

from .harness import GW_OUT, HOST1, NatDatapath
from .test_datapath import SRV, TCP_P, XDP_DROP, XDP_REDIRECT, eth_in, eth_out, flow, open_flow

pytestmark = pytest.mark.bpf


def seg(dp: NatDatapath, outbound: bool, flags: str, seq: int, ack: int, ext_port: int = 0) -> bytes:
    if outbound:
        return bytes(eth_in(dp) / IP(src=HOST1, dst=SRV, ttl=64)
                     / TCP(sport=40000, dport=80, flags=flags, seq=seq, ack=ack))
    return bytes(eth_out(dp) / IP(src=SRV, dst=GW_OUT, ttl=60)
                 / TCP(sport=80, dport=ext_port, flags=flags, seq=seq, ack=ack))


def established(dp: NatDatapath) -> int:
    port = open_flow(dp)
    assert dp.outside(seg(dp, False, "SA", 7000, 1001, port)).retval == XDP_REDIRECT
    assert dp.inside(seg(dp, True, "A", 1001, 7001)).retval == XDP_REDIRECT
    assert flow(dp, HOST1, SRV, 40000, 80).state == CtState.ESTABLISHED
    assert flow(dp, HOST1, SRV, 40000, 80).inside_ack == 7001
    return port


@pytest.mark.parametrize("seq", [7001 + (1 << 21), 7001 - (1 << 17), 0x80000000])
def test_out_of_window_rst_is_dropped_and_changes_nothing(dp: NatDatapath, seq: int) -> None:
    port = established(dp)
    frame = seg(dp, False, "R", seq % (1 << 32), 0, port)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert run.retval == XDP_DROP and run.data == frame
    assert d[Stat.DROP_OUT_OF_WINDOW] == 1
    assert flow(dp, HOST1, SRV, 40000, 80).state == CtState.ESTABLISHED


@pytest.mark.parametrize("offset", [0, 1460, 1 << 19, -1000])
def test_in_window_rst_closes_the_flow(dp: NatDatapath, offset: int) -> None:
    port = established(dp)
    run = dp.outside(seg(dp, False, "R", 7001 + offset, 0, port))
    assert run.retval == XDP_REDIRECT
    assert Ether(run.data)[IP].dst == HOST1
    assert flow(dp, HOST1, SRV, 40000, 80).state == CtState.CLOSE


def test_rst_before_any_ack_from_inside_is_accepted(dp: NatDatapath) -> None:
    """SYN_SENT: the inside host acknowledged nothing yet (a refused connection's RST+ACK)."""
    port = open_flow(dp)
    assert dp.outside(seg(dp, False, "RA", 0, 1001, port)).retval == XDP_REDIRECT
    assert flow(dp, HOST1, SRV, 40000, 80).state == CtState.CLOSE


def test_inside_rst_is_trusted(dp: NatDatapath) -> None:
    established(dp)
    assert dp.inside(seg(dp, True, "R", 99, 0)).retval == XDP_REDIRECT
    assert flow(dp, HOST1, SRV, 40000, 80, TCP_P).state == CtState.CLOSE


def test_new_ports_keep_parity(dp: NatDatapath) -> None:
    """Source ports outside the NAT range (40000+) get a port in 20000-29999 of the same parity
    (RFC 4787 REQ-4); the 0-1023 class split of REQ-3a is not exercised by this rule's range."""
    for sport in range(40100, 40140):
        run = dp.inside(bytes(eth_in(dp) / IP(src=HOST1, dst=SRV, ttl=64) / TCP(sport=sport, dport=81)))
        assert run.retval == XDP_REDIRECT
        got = Ether(run.data)[TCP].sport
        assert 20000 <= got <= 29999
        assert got % 2 == sport % 2, f"{sport} -> {got}: parity not kept"
