"""NAT events from the datapath: ct_commit() -> nat_event_emit() -> the pinned nat_events ring buffer.

Read with natd.ringbuf.RingBuffer (the reader natd's event pump uses) and decoded with natd.events.
event_ctl decides whether anything is emitted; a full ring counts STAT_EVENTS_LOST.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from natd.events import NEW_MASK, decode_record
from natd.maps import EVENTS_RING_BYTES, NatEventType, Stat
from natd.ringbuf import RingBuffer

from .harness import CT_MAX, FWD_UDP, GW_OUT, HOST1, XDP_REDIRECT, NatDatapath

pytestmark = pytest.mark.bpf

SRV = "198.51.100.10"
EVENT_RECORD = 8 + 32  # ring header + struct nat_event


def set_mask(dp: NatDatapath, mask: int) -> None:
    dp.tables.map("event_ctl").update(struct.pack("<I", 0), struct.pack("<I", mask))


@pytest.fixture
def ring(dp: NatDatapath) -> Iterator[RingBuffer]:
    """The pinned ring, emptied; event_ctl back to 0 (nothing emitted) afterwards."""
    rb = RingBuffer.open_pinned(os.path.join(dp.pin_dir, "nat_events"))
    rb.skip()
    try:
        yield rb
    finally:
        set_mask(dp, 0)
        rb.skip()
        rb.close()


def udp_out(dp: NatDatapath, sport: int, dport: int = 53, dst: str = SRV) -> bytes:
    return bytes(Ether(src=dp.mac["host1"], dst=dp.mac["in1"]) / IP(src=HOST1, dst=dst, ttl=64)
                 / UDP(sport=sport, dport=dport) / b"q")


def test_the_ring_is_pinned_with_its_size(dp: NatDatapath, ring: RingBuffer) -> None:
    assert ring.size == EVENTS_RING_BYTES
    assert sorted({"nat_events", "event_ctl"} & set(os.listdir(dp.pin_dir))) == ["event_ctl", "nat_events"]


def test_nothing_is_emitted_while_event_ctl_is_0(dp: NatDatapath, ring: RingBuffer) -> None:
    set_mask(dp, 0)
    assert dp.inside(udp_out(dp, 41000)).retval == XDP_REDIRECT
    assert ring.pending_bytes() == 0
    assert ring.read() == []


def test_a_new_flow_emits_one_new_event(dp: NatDatapath, ring: RingBuffer) -> None:
    set_mask(dp, NEW_MASK)
    with dp.counting() as d:
        run = dp.inside(udp_out(dp, 41001))
        again = dp.inside(udp_out(dp, 41001))  # the same flow: no event
    assert run.retval == again.retval == XDP_REDIRECT
    ext_port = Ether(run.data)[UDP].sport
    records = ring.read()
    assert len(records) == 1 and d[Stat.EVENTS_LOST] == 0
    ev = decode_record(records[0], offset_ns=0)
    entry = dp.flow(HOST1, SRV, 41001, 53, socket.IPPROTO_UDP)
    assert entry is not None
    assert ev.type is NatEventType.NEW
    assert ev.time_ns == entry.created_ns  # monotonic: offset 0
    assert (ev.proto, ev.inside_addr, ev.inside_port) == (socket.IPPROTO_UDP, HOST1, 41001)
    assert (ev.external_addr, ev.external_port) == (GW_OUT, ext_port)
    assert (ev.remote_addr, ev.remote_port, ev.inbound) == (SRV, 53, False)


def test_an_inbound_flow_through_a_port_forward_is_marked(dp: NatDatapath, ring: RingBuffer) -> None:
    set_mask(dp, NEW_MASK)
    port, inside, inside_port = FWD_UDP
    frame = bytes(Ether(src=dp.mac["inet"], dst=dp.mac["out0"]) / IP(src=SRV, dst=GW_OUT, ttl=57)
                  / UDP(sport=5555, dport=port) / b"x")
    dp.outside(frame)
    (raw,) = ring.read()
    ev = decode_record(raw, 0)
    assert ev.inbound
    assert (ev.inside_addr, ev.inside_port, ev.external_addr, ev.external_port) == (inside, inside_port,
                                                                                    GW_OUT, port)
    assert (ev.remote_addr, ev.remote_port) == (SRV, 5555)


def test_tcp_syn_emits_and_a_refused_flow_does_not(dp: NatDatapath, ring: RingBuffer) -> None:
    set_mask(dp, NEW_MASK)
    eth = Ether(src=dp.mac["host1"], dst=dp.mac["in1"])
    dp.inside(bytes(eth / IP(src=HOST1, dst=SRV) / TCP(sport=41002, dport=80, flags="S")))
    dp.inside(bytes(eth / IP(src=HOST1, dst=SRV) / TCP(sport=41003, dport=80, flags="R")))  # no flow
    events = [decode_record(r, 0) for r in ring.read()]
    assert [(e.proto, e.inside_port) for e in events] == [(socket.IPPROTO_TCP, 41002)]


def test_a_full_ring_counts_lost_events_and_translates_anyway(dp: NatDatapath, ring: RingBuffer) -> None:
    set_mask(dp, NEW_MASK)
    capacity = EVENTS_RING_BYTES // EVENT_RECORD
    batch = CT_MAX - 96
    # new flows to 8 remote ports (light load on each one's external port range), then deleted: again
    frames = [udp_out(dp, 1024 + i, dport=53 + i % 8) for i in range(batch)]
    created = 0
    with dp.counting() as d:
        while created <= capacity + batch:
            runs = dp.run_many("xdp_inside", frames, "in1")
            assert {r.retval for r in runs} == {XDP_REDIRECT}, "a full ring must not change verdicts"
            created += batch
            dp.clear_flows()
    assert d[Stat.CT_NEW] == created
    assert d[Stat.EVENTS_LOST] == created - capacity
    assert len(ring.read(limit=capacity + 10)) == capacity
