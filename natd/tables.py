"""The datapath's state behind a narrow interface.

`Tables` is everything the control plane does with the BPF maps: read the conntrack table, delete
flows (both halves), read counters, write the rule maps. `PinnedTables` does it on the pinned maps
through natd.bpfsys; `FakeTables` keeps it in dicts so rules, reaping, metrics and natctl's formatting
are unit-tested without root.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol, overload

import numpy as np
import numpy.typing as npt

from natd import bpfsys
from natd.maps import (
    BE32,
    CT_ENTRY_DTYPE,
    CT_KEY_DTYPE,
    CT_REPLY_VALUE_DTYPE,
    EXT_ENDPOINT_DTYPE,
    MAX_POOL,
    NAT_MAPPING_DTYPE,
    PROTO_ICMP,
    STAT_MAX,
    U32,
    CtEntry,
    CtKey,
    DnatKey,
    DnatTarget,
    ExtAddrInfo,
    LpmV4Key,
    NatMapping,
    NatMappingFlags,
    NatSecret,
    SnatRuleValue,
    Stat,
    StatCounter,
    ip_to_be32,
    port_to_be16,
    reply_key_for,
)
from natd.rules import RuleSet

Flow = tuple[CtKey, CtEntry]
StatTotals = dict[Stat, tuple[int, int]]  # (packets, bytes)

MAP_NAMES = ("ct_orig", "ct_reply", "snat_rules", "snat_pool", "ext_addrs", "outside_ifaces", "dnat_rules",
             "static_out", "static_in", "stats", "nat_mappings", "port_owners", "host_ports")

Rows = npt.NDArray[np.intp] | npt.NDArray[np.bool_] | slice  # what FlowTable.take() selects with
Blob = bytes | memoryview  # packed keys or values, as BpfMap.lookup_batch_raw returns them
Lookups = tuple[npt.NDArray[np.bool_], npt.NDArray[np.void]]   # (found, values) per key; zero if not found

_KEY_SIZE = CT_KEY_DTYPE.itemsize
_ENTRY_SIZE = CT_ENTRY_DTYPE.itemsize


def _structured(data: npt.NDArray[np.void], dtype: np.dtype[np.void], what: str) -> npt.NDArray[np.void]:
    if data.dtype != dtype or data.ndim != 1:
        raise TypeError(f"{what} must be a 1-d array of {dtype}, got {data.ndim}-d {data.dtype}")
    return np.ascontiguousarray(data)


class FlowTable(Sequence[Flow]):
    """A whole-table read of ct_orig, columnar: ``keys`` (``CT_KEY_DTYPE``) and ``entries``
    (``CT_ENTRY_DTYPE``) are numpy structured arrays, row ``i`` is one flow. The reaper works on the columns
    (``entries["last_seen_ns"]``, ``keys["proto"]``...) without one Python object per flow.

    It is also a ``Sequence[Flow]``: indexing or iterating builds the (CtKey, CtEntry) objects on demand,
    so a FlowTable can be handed to code that wants flows (``list(table)``, :meth:`flows`) and costs
    nothing more when that code never looks. Treat it as immutable (the arrays may be read-only views
    of the syscall's buffer).
    """

    __slots__ = ("entries", "keys")

    def __init__(self, keys: npt.NDArray[np.void], entries: npt.NDArray[np.void]) -> None:
        keys = _structured(keys, CT_KEY_DTYPE, "keys")
        entries = _structured(entries, CT_ENTRY_DTYPE, "entries")
        if len(keys) != len(entries):
            raise ValueError(f"{len(keys)} keys but {len(entries)} entries")
        self.keys: npt.NDArray[np.void] = keys
        self.entries: npt.NDArray[np.void] = entries

    @classmethod
    def from_blobs(cls, keys: Blob, entries: Blob, count: int) -> FlowTable:
        """What :meth:`natd.bpfsys.BpfMap.lookup_batch_raw` returns, viewed in place (no copy)."""
        return cls(np.frombuffer(keys, CT_KEY_DTYPE, count), np.frombuffer(entries, CT_ENTRY_DTYPE, count))

    @classmethod
    def from_flows(cls, flows: Iterable[Flow]) -> FlowTable:
        pairs = list(flows)
        return cls(np.frombuffer(b"".join(bytes(k) for k, _ in pairs), CT_KEY_DTYPE),
                   np.frombuffer(b"".join(bytes(e) for _, e in pairs), CT_ENTRY_DTYPE))

    @classmethod
    def empty(cls) -> FlowTable:
        return cls(np.zeros(0, CT_KEY_DTYPE), np.zeros(0, CT_ENTRY_DTYPE))

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> Flow: ...
    @overload
    def __getitem__(self, index: slice) -> FlowTable: ...
    def __getitem__(self, index: int | slice) -> Flow | FlowTable:
        if isinstance(index, slice):
            return self.take(index)
        n = len(self.keys)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"flow {index} of {n}")
        return (CtKey.from_buffer_copy(self.keys.data, i * _KEY_SIZE),
                CtEntry.from_buffer_copy(self.entries.data, i * _ENTRY_SIZE))

    def __iter__(self) -> Iterator[Flow]:
        return iter(self.flows())

    def __repr__(self) -> str:
        return f"<FlowTable of {len(self)} flows>"

    def take(self, rows: Rows) -> FlowTable:
        """The flows at ``rows`` (indexes, a boolean mask or a slice), in that order."""
        if isinstance(rows, slice):
            return FlowTable(self.keys[rows], self.entries[rows])
        if rows.dtype == np.bool_:
            return FlowTable(self.keys[rows], self.entries[rows])
        return FlowTable(np.take(self.keys, rows), np.take(self.entries, rows))

    def flows(self) -> list[Flow]:
        """Every row as a (CtKey, CtEntry) pair: one pair of ctypes objects per flow, the slow part (~1.5 us
        a flow). The objects are elements of two ctypes arrays copied from the columns in one go."""
        n = len(self.keys)
        return list(zip((CtKey * n).from_buffer_copy(self.keys.data),
                        (CtEntry * n).from_buffer_copy(self.entries.data), strict=True))

    def ctkeys(self) -> list[CtKey]:
        """Every row's key as a CtKey (no entries: half the objects of :meth:`flows`)."""
        return list((CtKey * len(self.keys)).from_buffer_copy(self.keys.data))

    def reply_keys(self) -> npt.NDArray[np.void]:
        """Each flow's ct_reply key (natd.maps.reply_key_for, for every row at once)."""
        k, e = self.keys, self.entries
        out = np.zeros(len(k), CT_KEY_DTYPE)
        out["saddr"] = k["daddr"]
        out["daddr"] = e["nat_addr"]
        out["sport"] = np.where(k["proto"] == PROTO_ICMP, 0, k["dport"])
        out["dport"] = e["nat_port"]
        out["proto"] = k["proto"]
        return out


# --- matching keys between two reads, without one Python object per key ---------------------------------

# Odd multipliers drawn per process: nobody can craft flows whose keys collide in the hash below (a collision
# only costs time, the match itself is exact), and the sort spreads whatever the key layout.
_MIX = np.frombuffer(os.urandom(16), np.uint64) | np.uint64(1)


def _key_words(keys: npt.NDArray[np.void]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """A 16-byte key as two 64-bit words (views, no copy)."""
    words = np.ascontiguousarray(keys).view(np.uint64).reshape(-1, 2)
    return words[:, 0], words[:, 1]


def _key_hash(lo: npt.NDArray[np.uint64], hi: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    h: npt.NDArray[np.uint64] = lo * _MIX[0]
    h ^= hi * _MIX[1]
    h ^= h >> np.uint64(29)
    return h


def _sort_packed(h: npt.NDArray[np.uint64], low: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.intp]]:
    """Sort hashes, keeping track of where each came from, with one plain sort instead of an argsort (~3x
    faster): each hash's ``low`` low bits are replaced by its index. Returns (the sorted hashes with those
    bits cleared, their indexes)."""
    mask = np.uint64((1 << low) - 1)
    packed = h & ~mask
    packed |= np.arange(len(h), dtype=np.uint64)
    packed.sort()
    index = (packed & mask).astype(np.intp)
    packed &= ~mask
    return packed, index


def key_index(haystack: npt.NDArray[np.void], needles: npt.NDArray[np.void]) -> npt.NDArray[np.intp]:
    """For each of ``needles`` (16-byte keys: ``CT_KEY_DTYPE``), the row of an equal key in ``haystack``,
    or -1. Exact (bytewise), whatever the hash does: O((n + m) log n) in numpy, which runs without the GIL.
    """
    out = np.full(len(needles), -1, dtype=np.intp)
    if not len(haystack) or not len(needles):
        return out
    low = max(len(haystack), len(needles)).bit_length()  # index bits; the hash keeps 64 - low (>= 32)
    if low > 32:
        raise ValueError(f"key_index of {len(haystack)} and {len(needles)} keys: at most 2**32 each")
    hlo, hhi = _key_words(haystack)
    nlo, nhi = _key_words(needles)
    sorted_h, order = _sort_packed(_key_hash(hlo, hhi), low)
    # sorted needles walk the haystack in order: cache-friendly, several times faster than random ones
    needle_h, needle_at = _sort_packed(_key_hash(nlo, nhi), low)
    pos = np.searchsorted(sorted_h, needle_h)
    np.minimum(pos, len(sorted_h) - 1, out=pos)
    cand = np.take(order, pos)
    hit = np.take(sorted_h, pos) == needle_h
    slo, shi = np.take(nlo, needle_at), np.take(nhi, needle_at)
    exact = hit & (np.take(hlo, cand) == slo) & (np.take(hhi, cand) == shi)
    out[needle_at[exact]] = cand[exact]
    # same (truncated) hash, another key: walk that hash's run in the sorted haystack (rare)
    for j in np.flatnonzero(hit & ~exact).tolist():
        p = int(pos[j]) + 1
        while p < len(sorted_h) and sorted_h[p] == needle_h[j]:
            c = int(order[p])
            if hlo[c] == slo[j] and hhi[c] == shi[j]:
                out[needle_at[j]] = c
                break
            p += 1
    return out


class ReplyTable:
    """A whole-table read of ct_reply, columnar: reply ``keys`` and the original key each one points back
    to (``origs``), both ``CT_KEY_DTYPE`` arrays."""

    __slots__ = ("keys", "origs")

    def __init__(self, keys: npt.NDArray[np.void], origs: npt.NDArray[np.void]) -> None:
        keys = _structured(keys, CT_KEY_DTYPE, "keys")
        origs = _structured(origs, CT_KEY_DTYPE, "origs")
        if len(keys) != len(origs):
            raise ValueError(f"{len(keys)} reply keys but {len(origs)} original keys")
        self.keys: npt.NDArray[np.void] = keys
        self.origs: npt.NDArray[np.void] = origs

    @classmethod
    def from_blobs(cls, keys: Blob, values: Blob, count: int) -> ReplyTable:
        origs = np.frombuffer(values, CT_REPLY_VALUE_DTYPE, count)["orig"]
        return cls(np.frombuffer(keys, CT_KEY_DTYPE, count), origs)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[CtKey, CtKey]]) -> ReplyTable:
        items = list(pairs)
        return cls(np.frombuffer(b"".join(bytes(r) for r, _ in items), CT_KEY_DTYPE),
                   np.frombuffer(b"".join(bytes(o) for _, o in items), CT_KEY_DTYPE))

    def __len__(self) -> int:
        return len(self.keys)

    def pairs(self) -> list[tuple[CtKey, CtKey]]:
        """(reply key, original key) objects for every row."""
        n = len(self.keys)
        return list(zip((CtKey * n).from_buffer_copy(self.keys.data),
                        (CtKey * n).from_buffer_copy(self.origs.data), strict=True))


class MappingTable:
    """A whole-table read of nat_mappings, columnar: ``keys`` (``CT_KEY_DTYPE``: the inside endpoint, see
    natd.maps.mapping_key_for) and ``values`` (``NAT_MAPPING_DTYPE``)."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: npt.NDArray[np.void], values: npt.NDArray[np.void]) -> None:
        keys = _structured(keys, CT_KEY_DTYPE, "keys")
        values = _structured(values, NAT_MAPPING_DTYPE, "values")
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} mapping keys but {len(values)} values")
        self.keys: npt.NDArray[np.void] = keys
        self.values: npt.NDArray[np.void] = values

    @classmethod
    def from_blobs(cls, keys: Blob, values: Blob, count: int) -> MappingTable:
        return cls(np.frombuffer(keys, CT_KEY_DTYPE, count), np.frombuffer(values, NAT_MAPPING_DTYPE, count))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[CtKey, NatMapping]]) -> MappingTable:
        items = list(pairs)
        return cls(np.frombuffer(b"".join(bytes(k) for k, _ in items), CT_KEY_DTYPE),
                   np.frombuffer(b"".join(bytes(v) for _, v in items), NAT_MAPPING_DTYPE))

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: Rows) -> MappingTable:
        return MappingTable(self.keys[rows], self.values[rows])

    def pairs(self) -> list[tuple[CtKey, NatMapping]]:
        n = len(self.keys)
        return list(zip((CtKey * n).from_buffer_copy(self.keys.data),
                        (NatMapping * n).from_buffer_copy(self.values.data), strict=True))

    def owner_keys(self) -> npt.NDArray[np.void]:
        """The port_owners key (struct ext_endpoint, 8 bytes) of every row, as raw bytes rows."""
        out = np.zeros(len(self), EXT_ENDPOINT_DTYPE)
        out["addr"] = self.values["ext_addr"]
        out["port"] = self.values["ext_port"]
        out["proto"] = self.keys["proto"]
        return out


def flow_mapping_keys(flows: FlowTable) -> npt.NDArray[np.void]:
    """Every nat_mappings key the flows can be using: each flow's inside endpoint (endpoint-independent
    mapping) and its whole tuple (address-and-port-dependent), as natd.maps.mapping_key_for makes them."""
    eim = flows.keys.copy()
    eim["daddr"] = 0
    eim["dport"] = 0
    return np.concatenate([eim, flows.keys])


def hosts_of(mappings: MappingTable) -> dict[int, int]:
    """be32 inside address -> how many of ``mappings`` it holds."""
    addrs, counts = np.unique(mappings.keys["saddr"], return_counts=True)
    return {int(a): int(n) for a, n in zip(addrs, counts, strict=True)}


class Tables(Protocol):
    def flows(self) -> list[Flow]: ...
    def flow_table(self) -> FlowTable: ...
    def lookup_flow(self, key: CtKey) -> CtEntry | None: ...
    def lookup_flows(self, keys: npt.NDArray[np.void]) -> Lookups: ...
    def reply_index(self) -> list[tuple[CtKey, CtKey]]: ...
    def reply_table(self) -> ReplyTable: ...
    def delete_flows(self, flows: Sequence[Flow]) -> int: ...
    def delete_flow_table(self, flows: FlowTable) -> npt.NDArray[np.bool_]: ...
    def delete_replies(self, keys: Sequence[CtKey]) -> int: ...
    def stats_per_cpu(self) -> list[StatTotals]: ...
    def apply_rules(self, rules: RuleSet) -> None: ...
    def ct_max(self) -> int: ...
    # NAT mappings (struct nat_mapping): the reaper deletes those whose last flow is gone
    def mapping_table(self) -> MappingTable: ...
    def lookup_mappings(self, keys: npt.NDArray[np.void]) -> Lookups: ...
    def delete_mappings(self, mappings: MappingTable) -> int: ...
    def host_ports(self) -> dict[int, int]: ...
    def ensure_nat_secret(self) -> bool: ...


def sum_stats(per_cpu: Sequence[StatTotals]) -> StatTotals:
    total: StatTotals = {s: (0, 0) for s in Stat}
    for cpu in per_cpu:
        for stat, (pkts, byts) in cpu.items():
            p, b = total[stat]
            total[stat] = (p + pkts, b + byts)
    return total


def pin_dir(pin_root: str, instance: str, layout: int) -> str:
    """<pin_root>/<instance>/v<layout>: instances never share pins, layouts never misread each other."""
    return os.path.join(pin_root, instance, f"v{layout}")


class PinnedTables:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._maps: dict[str, bpfsys.BpfMap] = {}
        self._lock = threading.Lock()  # scrapes, the reaper and reloads open maps from their own threads

    def map(self, name: str) -> bpfsys.BpfMap:
        with self._lock:
            if name not in self._maps:
                self._maps[name] = bpfsys.BpfMap.open_pinned(os.path.join(self.directory, name))
            return self._maps[name]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def ct_max(self) -> int:
        return self.map("ct_orig").info.max_entries

    def flow_table(self) -> FlowTable:
        """ct_orig in one batch read, as arrays (no per-flow objects)."""
        return FlowTable.from_blobs(*self.map("ct_orig").lookup_batch_raw())

    def flows(self) -> list[Flow]:
        return self.flow_table().flows()

    def lookup_flow(self, key: CtKey) -> CtEntry | None:
        raw = self.map("ct_orig").lookup(key.to_bytes())
        return None if raw is None else CtEntry.from_buffer_copy(raw)

    def lookup_flows(self, keys: npt.NDArray[np.void]) -> Lookups:
        """The current entry of each of ``keys`` (``CT_KEY_DTYPE``), one lookup syscall each but no objects:
        ``(found, entries)``, entries zero where not found."""
        blob = np.ascontiguousarray(keys).tobytes()
        values, found = self.map("ct_orig").lookup_many_raw(blob, len(keys))
        return (np.frombuffer(found, dtype=np.uint8).astype(np.bool_),
                np.frombuffer(values, dtype=CT_ENTRY_DTYPE, count=len(keys)))

    def reply_table(self) -> ReplyTable:
        """ct_reply in one batch read, as arrays."""
        return ReplyTable.from_blobs(*self.map("ct_reply").lookup_batch_raw())

    def reply_index(self) -> list[tuple[CtKey, CtKey]]:
        return self.reply_table().pairs()

    def delete_flow_table(self, flows: FlowTable) -> npt.NDArray[np.bool_]:
        """Both halves of every row go: the reply (port claim), then the entry. Returns, per row, whether
        this call deleted its ct_orig entry (False: it was gone already)."""
        deleted = np.ones(len(flows), dtype=np.bool_)
        if not len(flows):
            return deleted
        self.map("ct_reply").delete_batch_raw(flows.reply_keys().tobytes(), len(flows))
        missing = self.map("ct_orig").delete_batch_raw(flows.keys.tobytes(), len(flows))
        deleted[missing] = False
        return deleted

    def delete_flows(self, flows: Sequence[Flow]) -> int:
        """Both halves go: the reply (port claim) and the entry."""
        table = flows if isinstance(flows, FlowTable) else FlowTable.from_flows(flows)
        return int(np.count_nonzero(self.delete_flow_table(table)))

    def delete_replies(self, keys: Sequence[CtKey]) -> int:
        return self.map("ct_reply").delete_batch([k.to_bytes() for k in keys])

    def stats_per_cpu(self) -> list[StatTotals]:
        m = self.map("stats")
        ncpu = bpfsys.possible_cpus()
        per_cpu: list[StatTotals] = [{} for _ in range(ncpu)]
        for stat in Stat:
            raw = m.lookup(struct.pack("<I", int(stat)))
            if raw is None:
                continue
            for cpu in range(ncpu):
                c = StatCounter.from_buffer_copy(raw, cpu * 16)
                per_cpu[cpu][stat] = (c.packets, c.bytes)
        return per_cpu

    def apply_rules(self, rules: RuleSet) -> None:
        """Writes the new rules, then removes what is gone: a flow never sees an empty rule set."""
        pool = self.map("snat_pool")
        for i in range(MAX_POOL):
            addr = rules.pool[i] if i < len(rules.pool) else None
            pool.update(struct.pack("<I", i), struct.pack("<I", ip_to_be32(addr) if addr else 0))
        ext = self.map("ext_addrs")
        wanted_ext = {struct.pack("<I", ip_to_be32(a)): ExtAddrInfo(lo, hi, 0).to_bytes()
                      for a, (lo, hi) in rules.ext_addrs.items()}
        for k, v in wanted_ext.items():
            ext.update(k, v)
        snat = self.map("snat_rules")
        wanted_snat = {
            LpmV4Key(e.network.prefixlen, ip_to_be32(e.network.network_address)).to_bytes():
            SnatRuleValue(e.rule_id, e.pool_index, e.pool_size, e.port_min, e.port_max, e.flags,
                          e.host_port_limit).to_bytes()
            for e in rules.snat
        }
        for k, v in wanted_snat.items():
            snat.update(k, v)
        out = self.map("outside_ifaces")
        wanted_if = {struct.pack("<I", i): struct.pack("<I", 1) for i in rules.outside_ifindexes}
        for k, v in wanted_if.items():
            out.update(k, v)
        dnat = self.map("dnat_rules")
        wanted_dnat = {
            DnatKey(ip_to_be32(f.address), port_to_be16(f.port), f.proto, 0).to_bytes():
            DnatTarget(ip_to_be32(f.inside_addr), port_to_be16(f.inside_port), 0).to_bytes()
            for f in rules.forwards
        }
        for k, v in wanted_dnat.items():
            dnat.update(k, v)
        st_out, st_in = self.map("static_out"), self.map("static_in")
        be32 = struct.Struct("<I").pack
        wanted_out = {be32(ip_to_be32(i)): be32(ip_to_be32(o)) for i, o in rules.statics}
        wanted_in = {be32(ip_to_be32(o)): be32(ip_to_be32(i)) for i, o in rules.statics}
        for m, wanted in ((st_out, wanted_out), (st_in, wanted_in)):
            for k, v in wanted.items():
                m.update(k, v)
        for m, wanted in ((snat, wanted_snat), (ext, wanted_ext), (out, wanted_if), (dnat, wanted_dnat),
                          (st_out, wanted_out), (st_in, wanted_in)):
            for k in list(m.keys()):
                if k not in wanted:
                    m.delete(k)

    def mapping_table(self) -> MappingTable:
        """nat_mappings in one batch read."""
        return MappingTable.from_blobs(*self.map("nat_mappings").lookup_batch_raw())

    def lookup_mappings(self, keys: npt.NDArray[np.void]) -> Lookups:
        blob = np.ascontiguousarray(keys).tobytes()
        values, found = self.map("nat_mappings").lookup_many_raw(blob, len(keys))
        return (np.frombuffer(found, dtype=np.uint8).astype(np.bool_),
                np.frombuffer(values, dtype=NAT_MAPPING_DTYPE, count=len(keys)))

    def delete_mappings(self, mappings: MappingTable) -> int:
        """Each mapping, its port claim and its count in host_ports. Returns how many mappings this call
        deleted."""
        if not len(mappings):
            return 0
        # The claims first, then the mappings: while a mapping exists and holds its port the datapath never
        # takes its claim over (port_owner_live), so the claim at the mapping's current address and port is
        # still the mapping's own. Once the claim is gone the port is free for a new mapping at once.
        owns = (mappings.values["flags"] & NatMappingFlags.OWNS_PORT) != 0
        if owns.any():
            claims = mappings.owner_keys()[owns]
            self.map("port_owners").delete_batch_raw(claims.tobytes(), len(claims))
        missing = self.map("nat_mappings").delete_batch_raw(mappings.keys.tobytes(), len(mappings))
        done = np.ones(len(mappings), dtype=np.bool_)
        done[missing] = False
        self._subtract_host_ports(hosts_of(mappings.take(done)))
        return int(np.count_nonzero(done))

    def _subtract_host_ports(self, counts: dict[int, int]) -> None:
        """host_ports -= counts. Not atomic against the datapath's adds: one that lands between this
        lookup and update is lost (the host may then hold one port over its limit until it lets go)."""
        hp = self.map("host_ports")
        for addr, n in counts.items():
            key = BE32.pack(addr)
            raw = hp.lookup(key)
            if raw is None:
                continue
            hp.update(key, U32.pack(max(0, U32.unpack(raw)[0] - n)))

    def ensure_nat_secret(self, random: Callable[[int], bytes] = os.urandom) -> bool:
        """Give the datapath its port-choice key (struct nat_secret) unless it has one: pinned, so every
        later natd keeps it. True when this call wrote it."""
        m = self.map("nat_secret")
        key = U32.pack(0)
        current = m.lookup(key)
        if current is not None and any(current):
            return False
        secret = random(ctypes.sizeof(NatSecret))
        while not any(secret):  # all-zero means "none yet"
            secret = random(ctypes.sizeof(NatSecret))
        m.update(key, secret)
        return True

    def host_ports(self) -> dict[int, int]:
        """be32 inside address -> external ports it holds (hosts holding none are left out)."""
        out = {}
        for k, v in self.map("host_ports").items_batch():
            n = U32.unpack(v)[0]
            if n:
                out[BE32.unpack(k)[0]] = n
        return out

    def read_rules(self) -> dict[str, object]:
        """The rule maps as plain data, for `natctl status`."""
        snat = []
        for k, v in self.map("snat_rules").items():
            key, val = LpmV4Key.from_buffer_copy(k), SnatRuleValue.from_buffer_copy(v)
            net = ipaddress.IPv4Network((ipaddress.IPv4Address(key.addr.to_bytes(4, "little")),
                                         key.prefixlen))
            snat.append({"from": str(net), "rule_id": val.rule_id, "pool_index": val.pool_index,
                         "pool_size": val.pool_size, "ports": f"{val.port_min}-{val.port_max}",
                         "max_ports_per_host": val.host_port_limit or None})
        return {"snat": sorted(snat, key=lambda r: str(r["from"]))}


class FakeTables:
    """In-memory Tables with the datapath's semantics for what the control plane can observe."""

    def __init__(self, ct_max: int = 1024, ncpu: int = 2) -> None:
        self._ct_max = ct_max
        self.ct: dict[CtKey, CtEntry] = {}
        self.replies: dict[CtKey, CtKey] = {}
        self.counters: list[StatTotals] = [{s: (0, 0) for s in Stat} for _ in range(ncpu)]
        self.rules: RuleSet | None = None
        self.mappings: dict[CtKey, NatMapping] = {}
        self.hosts: dict[int, int] = {}  # be32 inside address -> ports held (host_ports)
        self.nat_secret = b""
        assert len(Stat) == STAT_MAX

    def add_flow(self, key: CtKey, entry: CtEntry) -> None:
        """What the datapath does for a new flow (tests use it to populate the table)."""
        self.ct[key] = entry
        self.replies[reply_key_for(key, entry)] = key

    def ct_max(self) -> int:
        return self._ct_max

    def flows(self) -> list[Flow]:
        return list(self.ct.items())

    def flow_table(self) -> FlowTable:
        """The same arrays PinnedTables reads, built from :meth:`flows` (so a subclass that overrides
        flows() changes both)."""
        return FlowTable.from_flows(self.flows())

    def lookup_flow(self, key: CtKey) -> CtEntry | None:
        return self.ct.get(key)

    def reply_index(self) -> list[tuple[CtKey, CtKey]]:
        return list(self.replies.items())

    def lookup_flows(self, keys: npt.NDArray[np.void]) -> Lookups:
        """:meth:`lookup_flow` (overridable) for each key."""
        found = np.zeros(len(keys), dtype=np.bool_)
        entries = np.zeros(len(keys), dtype=CT_ENTRY_DTYPE)
        for i, key in enumerate(FlowTable(keys, entries).ctkeys()):
            entry = self.lookup_flow(key)
            if entry is not None:
                found[i] = True
                entries[i] = np.frombuffer(bytes(entry), dtype=CT_ENTRY_DTYPE)[0]
        return found, entries

    def reply_table(self) -> ReplyTable:
        """Built from :meth:`reply_index`."""
        return ReplyTable.from_pairs(self.reply_index())

    def delete_flow_table(self, flows: FlowTable) -> npt.NDArray[np.bool_]:
        """:meth:`delete_flows` (one call for all rows), reporting per row whether it deleted the entry."""
        pairs = flows.flows()
        present = [key in self.ct for key, _ in pairs]
        if pairs:
            self.delete_flows(pairs)
        return np.array([was and key not in self.ct for was, (key, _) in zip(present, pairs, strict=True)],
                        dtype=np.bool_)

    def delete_flows(self, flows: Sequence[Flow]) -> int:
        deleted = 0
        for key, entry in flows:
            self.replies.pop(reply_key_for(key, entry), None)
            if self.ct.pop(key, None) is not None:
                deleted += 1
        return deleted

    def delete_replies(self, keys: Sequence[CtKey]) -> int:
        return sum(self.replies.pop(k, None) is not None for k in keys)

    def stats_per_cpu(self) -> list[StatTotals]:
        return [dict(c) for c in self.counters]

    def apply_rules(self, rules: RuleSet) -> None:
        self.rules = rules

    def add_mapping(self, key: CtKey, mapping: NatMapping) -> None:
        """What the datapath does for a new mapping."""
        self.mappings[key] = mapping
        self.hosts[key.saddr] = self.hosts.get(key.saddr, 0) + 1

    def mapping_table(self) -> MappingTable:
        return MappingTable.from_pairs(self.mappings.items())

    def lookup_mappings(self, keys: npt.NDArray[np.void]) -> Lookups:
        found = np.zeros(len(keys), dtype=np.bool_)
        values = np.zeros(len(keys), dtype=NAT_MAPPING_DTYPE)
        for i, key in enumerate((CtKey * len(keys)).from_buffer_copy(np.ascontiguousarray(keys).data)):
            m = self.mappings.get(key)
            if m is not None:
                found[i] = True
                values[i] = np.frombuffer(bytes(m), dtype=NAT_MAPPING_DTYPE)[0]
        return found, values

    def delete_mappings(self, mappings: MappingTable) -> int:
        deleted = 0
        for key, _ in mappings.pairs():
            if self.mappings.pop(key, None) is not None:
                deleted += 1
                self.hosts[key.saddr] = max(0, self.hosts.get(key.saddr, 0) - 1)
        return deleted

    def host_ports(self) -> dict[int, int]:
        return {a: n for a, n in self.hosts.items() if n}

    def ensure_nat_secret(self) -> bool:
        if self.nat_secret:
            return False
        self.nat_secret = os.urandom(16)
        return True
