"""Fragments (RFC 4787 REQ-14): the first fragment is translated with its ports, later fragments of the
same datagram get the same address; a later fragment whose first was never seen is never guessed at."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.l2 import Ether

from natd.maps import Stat

from .harness import GW_OUT, HOST1, NatDatapath
from .test_datapath import SRV, XDP_DROP, XDP_PASS, XDP_REDIRECT, eth_in, eth_out

pytestmark = pytest.mark.bpf


def datagram_fragments(src: str, dst: str, sport: int, dport: int, ident: int, size: int = 4000) -> list[IP]:
    return fragment(IP(src=src, dst=dst, id=ident, ttl=64) / UDP(sport=sport, dport=dport)
                    / (b"z" * size), fragsize=1400)


def reassembled_udp_checksum_ok(frags: list[bytes]) -> bool:
    """Reassemble the translated fragments; the UDP checksum (in the first one) must fit the datagram."""
    pkts = sorted((Ether(f)[IP] for f in frags), key=lambda p: int(p.frag))
    datagram = b"".join(bytes(p.payload) for p in pkts)
    udp = UDP(datagram)
    ref = IP(src=pkts[0].src, dst=pkts[0].dst) / UDP(sport=udp.sport, dport=udp.dport) / bytes(udp.payload)
    return int(udp.chksum) == int(IP(bytes(ref))[UDP].chksum)


def test_a_4000_byte_datagram_crosses_both_ways(dp: NatDatapath) -> None:
    frags = datagram_fragments(HOST1, SRV, 40000, 53, ident=0x4242)
    assert len(frags) == 3 and frags[0].flags.MF and frags[1].frag > 0
    out = []
    with dp.counting() as d:
        for f in frags:
            run = dp.inside(bytes(eth_in(dp) / f))
            assert run.retval == XDP_REDIRECT
            out.append(run.data)
    assert d[Stat.FRAG_TRANSLATED] == 2 and d[Stat.CT_NEW] == 1
    pkts = [Ether(o)[IP] for o in out]
    assert {p.src for p in pkts} == {GW_OUT}
    assert all(p.id == 0x4242 for p in pkts)
    for p in pkts:  # every fragment's IP checksum is right
        fresh = p.copy()
        del fresh.chksum
        assert IP(bytes(fresh)).chksum == p.chksum
    ext_port = pkts[0][UDP].sport
    assert reassembled_udp_checksum_ok(out)
    # the 4000-byte reply comes back in fragments too
    reply = datagram_fragments(SRV, GW_OUT, 53, ext_port, ident=0x5151)
    back = []
    for f in reply:
        run = dp.outside(bytes(eth_out(dp) / f))
        assert run.retval == XDP_REDIRECT
        back.append(run.data)
    bpk = [Ether(b)[IP] for b in back]
    assert {p.dst for p in bpk} == {HOST1}
    assert bpk[0][UDP].dport == 40000
    assert reassembled_udp_checksum_ok(back)


def test_later_fragment_before_its_first_is_never_guessed(dp: NatDatapath) -> None:
    frags = datagram_fragments(HOST1, SRV, 40010, 53, ident=0x0777)
    frame = bytes(eth_in(dp) / frags[1])
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_DROP and run.data == frame
    assert d[Stat.DROP_FRAG_UNKNOWN] == 1
    # from the internet, an unknown later fragment goes to the kernel untouched (it is addressed to us)
    inbound = bytes(eth_out(dp) / datagram_fragments(SRV, GW_OUT, 53, 25000, ident=0x0778)[2])
    with dp.counting() as d:
        run = dp.outside(inbound)
    assert run.retval == XDP_PASS and run.data == inbound
    assert d[Stat.PASS_FRAG_UNKNOWN] == 1


def test_fragments_of_different_datagrams_do_not_mix(dp: NatDatapath) -> None:
    a = datagram_fragments(HOST1, SRV, 40020, 53, ident=0x1001)
    assert dp.inside(bytes(eth_in(dp) / a[0])).retval == XDP_REDIRECT
    other = datagram_fragments(HOST1, SRV, 40021, 53, ident=0x1002)  # same hosts, another IP id
    assert dp.inside(bytes(eth_in(dp) / other[1])).retval == XDP_DROP
    assert dp.inside(bytes(eth_in(dp) / a[1])).retval == XDP_REDIRECT
