"""BPF_PROG_TEST_RUN proofs for rows of docs/rfc-compliance.md (the lab side: tests/lab/test_rfc_claims.py).

Behavioural: the frames that come out and the datapath's counters, not the tables behind them.
"""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import Ether

from natd.maps import MAX_FRAGS, Stat

from .harness import GW_OUT, HOST1, NAT_PORTS, NatDatapath
from .test_datapath import SRV, SRV2, XDP_DROP, XDP_REDIRECT, assert_checksums_valid, eth_in

pytestmark = pytest.mark.bpf


def _ip_checksum(header: bytes) -> int:
    s = sum(struct.unpack("!10H", header))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def bogus_first_fragments(dp: NatDatapath, count: int, src: str = "10.0.1.44",
                          dst: str = SRV2) -> list[bytes]:
    """First fragments (MF, offset 0) of one UDP flow, one IP id each; their datagrams never complete."""
    template = bytearray(bytes(eth_in(dp) / IP(src=src, dst=dst, flags="MF", id=0, ttl=64)
                               / UDP(sport=40080, dport=9, len=8 + 1400, chksum=0) / (b"\xee" * 32)))
    frames = []
    for i in range(count):
        template[18:20] = struct.pack("!H", i % 65536)
        template[24:26] = b"\x00\x00"
        template[24:26] = struct.pack("!H", _ip_checksum(bytes(template[14:34])))
        frames.append(bytes(template))
    return frames


def datagram_fragments(src: str, sport: int, ident: int) -> list[IP]:
    return fragment(IP(src=src, dst=SRV, id=ident, ttl=64) / UDP(sport=sport, dport=53) / (b"z" * 4000),
                    fragsize=1400)


# ================================================================================== RFC 4787 REQ-14a


def test_a_flood_of_bogus_first_fragments_leaves_other_traffic_alone(dp: NatDatapath) -> None:
    """RFC 4787 REQ-14a: three times more never-completed first fragments than the fragment table holds,
    then an unfragmented datagram and an in-order fragmented one (first, then later fragments) of another
    host: all translated, the later fragments through their own first fragment."""
    flood = bogus_first_fragments(dp, 3 * MAX_FRAGS)
    runs = dp.run_many("xdp_inside", flood, "in1")
    assert {r.retval for r in runs} == {XDP_REDIRECT}
    run = dp.inside(bytes(eth_in(dp) / IP(src=HOST1, dst=SRV) / UDP(sport=40500, dport=53) / b"plain"))
    assert run.retval == XDP_REDIRECT and Ether(run.data)[IP].src == GW_OUT
    assert_checksums_valid(run.data)
    frags = datagram_fragments(HOST1, 40501, ident=0x4321)
    with dp.counting() as d:
        out = [dp.inside(bytes(eth_in(dp) / f)) for f in frags]
    assert [r.retval for r in out] == [XDP_REDIRECT] * 3
    assert {Ether(r.data)[IP].src for r in out} == {GW_OUT}
    assert d[Stat.FRAG_TRANSLATED] == 2 and d[Stat.DROP_FRAG_UNKNOWN] == 0


def test_a_flood_between_a_first_fragment_and_its_later_ones_evicts_it(dp: NatDatapath) -> None:
    """The limit of REQ-14a: the fragment table is an LRU of MAX_FRAGS entries. When more first fragments
    than that are translated between a datagram's first fragment and its later ones, the datagram's entry
    is evicted and its later fragments are dropped (never forwarded untranslated)."""
    frags = datagram_fragments(HOST1, 40502, ident=0x4322)
    assert dp.inside(bytes(eth_in(dp) / frags[0])).retval == XDP_REDIRECT
    dp.run_many("xdp_inside", bogus_first_fragments(dp, 3 * MAX_FRAGS), "in1")
    frame = bytes(eth_in(dp) / frags[1])
    with dp.counting() as d:
        run = dp.inside(frame)
    assert run.retval == XDP_DROP and run.data == frame
    assert d[Stat.DROP_FRAG_UNKNOWN] == 1


# ================================================================================== RFC 5508 REQ-1a


@pytest.mark.parametrize("ident", [25555, 40404], ids=["id-in-range", "id-outside-range"])
def test_one_echo_identifier_to_two_hosts_gets_one_external_identifier(dp: NatDatapath, ident: int) -> None:
    ids = set()
    for dst in (SRV, SRV2):
        run = dp.inside(bytes(eth_in(dp) / IP(src=HOST1, dst=dst) / ICMP(type=8, id=ident, seq=1)))
        assert run.retval == XDP_REDIRECT
        ids.add(Ether(run.data)[ICMP].id)
    assert len(ids) == 1, ids
    assert NAT_PORTS[0] <= ids.pop() <= NAT_PORTS[1]


# ====================================================================================== RFC 7857 §5


def test_tcp_and_udp_mappings_of_one_endpoint_are_separate(dp: NatDatapath) -> None:
    """RFC 7857 §5: 10.0.1.43's UDP flow from 25000 holds external port 25000 towards SRV:53; HOST1's UDP
    flow from 25000 to SRV:53 gets another port, its TCP flow from 25000 to SRV:53 gets 25000."""
    def sport(src: str, l4: UDP | TCP) -> int:
        run = dp.inside(bytes(eth_in(dp) / IP(src=src, dst=SRV) / l4))
        assert run.retval == XDP_REDIRECT
        out = Ether(run.data)
        assert out[IP].src == GW_OUT
        return int(out[UDP].sport if UDP in out else out[TCP].sport)

    assert sport("10.0.1.43", UDP(sport=25000, dport=53)) == 25000
    udp = sport(HOST1, UDP(sport=25000, dport=53))
    tcp = sport(HOST1, TCP(sport=25000, dport=53, flags="S"))
    assert udp != 25000 and tcp == 25000
