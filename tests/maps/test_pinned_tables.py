"""PinnedTables and the reaper on real BPF maps (bpf tier: needs root, no BCC, no network).

ct_orig / ct_reply and the NAT mapping maps are created with libbpf (natd.bpfsys.BpfMap.create: the same map
type, key/value sizes as the datapath's BPF_TABLE_PINNED) and pinned in a bpffs directory of their own,
removed afterwards.
Checks the raw batch read (chunking, ENOSPC, buffer growth), the batch update/delete/lookup helpers, the
columnar reads against the per-flow ones, and one reaper sweep (expiry, on_delete, orphans) end to end.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from natd import bpfsys
from natd.config import Timeouts
from natd.maps import (
    CT_ENTRY_DTYPE,
    CT_KEY_DTYPE,
    EXT_ENDPOINT_DTYPE,
    NAT_MAPPING_DTYPE,
    PROTO_TCP,
    PROTO_UDP,
    CtEntry,
    CtKey,
    CtReplyValue,
    CtState,
    ExtEndpoint,
    NatMapping,
    NatMappingFlags,
    ip_to_be32,
    mapping_key_for,
    port_to_be16,
    reply_key_for,
)
from natd.reaper import Reaper
from natd.tables import Flow, FlowTable, PinnedTables

pytestmark = pytest.mark.bpf

S = 1_000_000_000
NOW = 30 * 86400 * S
N = 5000
CT_MAX = 8192


def make_flows(n: int, expired_every: int) -> list[Flow]:
    """n distinct UDP/TCP flows; every ``expired_every``-th one idle past its (default) timeout."""
    out = []
    for i in range(n):
        proto = PROTO_TCP if i % 3 else PROTO_UDP
        key = CtKey.make(f"10.2.{i // 250}.{i % 250 + 1}", f"198.18.{i % 7}.1", 1024 + i, 443, proto)
        e = CtEntry()
        e.state = int(CtState.ESTABLISHED) if proto == PROTO_TCP else 0
        e.last_seen_ns = NOW - (8000 if i % expired_every == 0 else 10) * S
        e.nat_addr, e.nat_port = ip_to_be32("192.0.2.1"), port_to_be16(20000 + i)
        e.packets_orig = i
        out.append((key, e))
    return out


@pytest.fixture
def tables() -> Iterator[PinnedTables]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    base = "/run/natd/bpf" if os.path.ismount("/run/natd/bpf") else "/sys/fs/bpf"
    root = os.path.join(base, f"natd-maps-test-{secrets.token_hex(4)}")
    os.makedirs(root)
    made = []
    t = PinnedTables(root)
    try:
        for name, ks, vs in (("ct_orig", CT_KEY_DTYPE.itemsize, CT_ENTRY_DTYPE.itemsize),
                             ("ct_reply", CT_KEY_DTYPE.itemsize, CT_KEY_DTYPE.itemsize),
                             ("nat_mappings", CT_KEY_DTYPE.itemsize, NAT_MAPPING_DTYPE.itemsize),
                             ("port_owners", EXT_ENDPOINT_DTYPE.itemsize, CT_KEY_DTYPE.itemsize),
                             ("host_ports", 4, 4)):
            m = bpfsys.BpfMap.create(bpfsys.BPF_MAP_TYPE_HASH, ks, vs, CT_MAX, name)
            made.append(m)
            m.pin(os.path.join(root, name))
        yield t
    finally:
        t.close()
        for m in made:
            m.close()
        for name in os.listdir(root):
            os.unlink(os.path.join(root, name))
        os.rmdir(root)


def fill(t: PinnedTables, flows: Sequence[Flow]) -> None:
    table = FlowTable.from_flows(flows)
    assert t.map("ct_reply").update_batch(table.reply_keys().tobytes(), table.keys.tobytes(), len(flows)) \
        == len(flows)
    assert t.map("ct_orig").update_batch(table.keys.tobytes(), table.entries.tobytes()) == len(flows)


def as_set(flows: Sequence[Flow]) -> set[tuple[bytes, bytes]]:
    return {(bytes(k), bytes(e)) for k, e in flows}


def test_batch_reads_and_writes(tables: PinnedTables) -> None:
    ct = tables.map("ct_orig")
    keys, values, n = ct.lookup_batch_raw()
    assert (n, len(keys), len(values)) == (0, 0, 0)
    flows = make_flows(N, 10)
    fill(tables, flows)
    want = as_set(flows)

    keys, values, n = ct.lookup_batch_raw()
    assert n == N and keys.readonly and len(keys) == 16 * N and len(values) == 64 * N
    assert as_set(FlowTable.from_blobs(keys, values, n).flows()) == want
    # one entry per syscall: every bucket with two entries answers ENOSPC, and the read grows its chunk
    assert as_set(FlowTable.from_blobs(*ct.lookup_batch_raw(chunk=1)).flows()) == want
    # buffers sized for 10 entries: grown (mremap) over and over on the way
    ct._batch_hint = 10
    assert as_set(FlowTable.from_blobs(*ct.lookup_batch_raw(chunk=0)).flows()) == want
    assert ct._batch_hint > N
    assert {(k, v) for k, v in ct.items_batch()} == want

    assert as_set(tables.flows()) == want == as_set(tables.flow_table().flows())
    replies = tables.reply_index()
    assert {(bytes(r), bytes(o)) for r, o in replies} == {(bytes(reply_key_for(k, e)), bytes(k))
                                                          for k, e in flows}
    assert {(bytes(r), bytes(o)) for r, o in tables.reply_table().pairs()} == {(bytes(r), bytes(o))
                                                                                for r, o in replies}


def test_lookups_and_deletes(tables: PinnedTables) -> None:
    flows = make_flows(100, 10)
    fill(tables, flows[:90])
    found, entries = tables.lookup_flows(FlowTable.from_flows(flows).keys)
    assert found.tolist() == [True] * 90 + [False] * 10
    assert entries[:90].tobytes() == b"".join(bytes(e) for _, e in flows[:90])
    assert not entries[90:].tobytes().strip(b"\0")
    assert tables.lookup_flow(flows[3][0]) == flows[3][1] and tables.lookup_flow(flows[95][0]) is None

    # rows 88..91: two in the map, two never were
    done = tables.delete_flow_table(FlowTable.from_flows(flows[88:92]))
    assert done.tolist() == [True, True, False, False]
    assert len(tables.flows()) == 88 and len(tables.reply_index()) == 88
    missing = tables.map("ct_orig").delete_batch_raw(b"".join(bytes(k) for k, _ in flows[80:92]))
    assert missing == [8, 9, 10, 11]
    assert tables.delete_flows(flows[:80]) == 80
    assert tables.flows() == [] and len(tables.reply_index()) == 8  # the raw deletes left replies alone
    with pytest.raises(ValueError):
        tables.map("ct_orig").update_batch(b"x" * 16, b"", 1)


def test_a_sweep_on_real_maps(tables: PinnedTables) -> None:
    flows = make_flows(N, 10)
    fill(tables, flows)
    orphan_key = CtKey.make("198.18.9.9", "192.0.2.1", 443, 1234, PROTO_UDP)
    orig = CtKey.make("10.9.9.9", "198.18.9.9", 5555, 443, PROTO_UDP)
    tables.map("ct_reply").update(bytes(orphan_key), bytes(CtReplyValue(orig)))
    deleted: list[Flow] = []
    r = Reaper(tables, Timeouts(), clock=lambda: NOW, on_delete=deleted.extend)

    first = r.sweep()
    expired = flows[::10]  # idle 8000 s: past tcp_established (7440 s) and udp_unreplied (120 s)
    assert (first.scanned, first.reaped, first.refreshed, first.recheck) == (N, len(expired), 0, "lookup")
    assert (first.replies_scanned, first.orphans, first.orphans_pending) == (N + 1, 0, 1)
    assert as_set(deleted) == as_set(expired)
    assert sum(first.entries_by_state.values()) == N - len(expired) == len(tables.flows())
    assert first.ports_in_use == {"192.0.2.1": N - len(expired)}

    assert (first.mappings_released, first.mappings) == (0, 0)

    second = r.sweep()
    assert (second.reaped, second.orphans, second.orphans_pending) == (0, 1, 0)
    assert len(tables.reply_index()) == N - len(expired)
    assert np.array_equal(np.sort(tables.reply_table().origs.view("V16")),
                          np.sort(tables.flow_table().keys.view("V16")))


def test_mappings_released_on_real_maps(tables: PinnedTables) -> None:
    """The reaper's mapping release through PinnedTables: the mapping, its port claim and one port of its
    host's count go; a mapping with a live flow stays with its claim."""
    flows = make_flows(100, 10)  # flows[::10] are expired
    fill(tables, flows)
    owners, hosts = tables.map("port_owners"), tables.map("host_ports")
    for key, entry in flows:
        mk = mapping_key_for(key)
        m = NatMapping(last_used_ns=entry.created_ns, ext_addr=entry.nat_addr, ext_port=entry.nat_port,
                       flags=int(NatMappingFlags.OWNS_PORT))
        tables.map("nat_mappings").update(mk.to_bytes(), m.to_bytes())
        owners.update(ExtEndpoint(entry.nat_addr, entry.nat_port, key.proto, 0).to_bytes(), mk.to_bytes())
        hosts.update(struct.pack("<I", key.saddr),
                     struct.pack("<I", struct.unpack("<I", hosts.lookup(struct.pack("<I", key.saddr))
                                                     or b"\0\0\0\0")[0] + 1))
    held_before = sum(tables.host_ports().values())

    result = Reaper(tables, Timeouts(), clock=lambda: NOW).sweep()

    assert (result.reaped, result.mappings_released, result.mappings) == (10, 10, 90)
    assert len(tables.mapping_table()) == 90
    assert sum(tables.host_ports().values()) == held_before - 10
    claims = dict(owners.items())
    assert len(claims) == 90
    for key, entry in flows:
        claim = ExtEndpoint(entry.nat_addr, entry.nat_port, key.proto, 0).to_bytes()
        assert (claim in claims) == (entry.last_seen_ns > NOW - 1000 * S)  # the expired ones' are gone
