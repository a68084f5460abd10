"""The datapath's state behind a narrow interface.

`Tables` is everything the control plane does with the BPF maps: read the conntrack table, delete
flows (both halves), read counters, write the rule maps. `PinnedTables` does it on the pinned maps
through natd.bpfsys; `FakeTables` keeps it in dicts so rules, reaping, metrics and natctl's formatting
are unit-tested without root.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import threading
from collections.abc import Sequence
from typing import Protocol

from natd import bpfsys
from natd.maps import (
    MAX_POOL,
    STAT_MAX,
    CtEntry,
    CtKey,
    CtReplyValue,
    ExtAddrInfo,
    LpmV4Key,
    SnatRuleValue,
    Stat,
    StatCounter,
    ip_to_be32,
    reply_key_for,
)
from natd.rules import RuleSet

Flow = tuple[CtKey, CtEntry]
StatTotals = dict[Stat, tuple[int, int]]  # (packets, bytes)

MAP_NAMES = ("ct_orig", "ct_reply", "snat_rules", "snat_pool", "ext_addrs", "outside_ifaces", "stats")


class Tables(Protocol):
    def flows(self) -> list[Flow]: ...
    def lookup_flow(self, key: CtKey) -> CtEntry | None: ...
    def reply_index(self) -> list[tuple[CtKey, CtKey]]: ...
    def delete_flows(self, flows: Sequence[Flow]) -> int: ...
    def delete_replies(self, keys: Sequence[CtKey]) -> int: ...
    def stats_per_cpu(self) -> list[StatTotals]: ...
    def apply_rules(self, rules: RuleSet) -> None: ...
    def ct_max(self) -> int: ...


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

    def flows(self) -> list[Flow]:
        return [(CtKey.from_buffer_copy(k), CtEntry.from_buffer_copy(v))
                for k, v in self.map("ct_orig").items_batch()]

    def lookup_flow(self, key: CtKey) -> CtEntry | None:
        raw = self.map("ct_orig").lookup(key.to_bytes())
        return None if raw is None else CtEntry.from_buffer_copy(raw)

    def reply_index(self) -> list[tuple[CtKey, CtKey]]:
        return [(CtKey.from_buffer_copy(k), CtReplyValue.from_buffer_copy(v).orig)
                for k, v in self.map("ct_reply").items_batch()]

    def delete_flows(self, flows: Sequence[Flow]) -> int:
        """Both halves go: the reply (port claim) and the entry."""
        replies = [reply_key_for(k, e).to_bytes() for k, e in flows]
        self.map("ct_reply").delete_batch(replies)
        return self.map("ct_orig").delete_batch([k.to_bytes() for k, _ in flows])

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
            SnatRuleValue(e.rule_id, e.pool_index, e.pool_size, e.port_min, e.port_max).to_bytes()
            for e in rules.snat
        }
        for k, v in wanted_snat.items():
            snat.update(k, v)
        out = self.map("outside_ifaces")
        wanted_if = {struct.pack("<I", i): struct.pack("<I", 1) for i in rules.outside_ifindexes}
        for k, v in wanted_if.items():
            out.update(k, v)
        for m, wanted in ((snat, wanted_snat), (ext, wanted_ext), (out, wanted_if)):
            for k in list(m.keys()):
                if k not in wanted:
                    m.delete(k)

    def read_rules(self) -> dict[str, object]:
        """The rule maps as plain data, for `natctl status`."""
        snat = []
        for k, v in self.map("snat_rules").items():
            key, val = LpmV4Key.from_buffer_copy(k), SnatRuleValue.from_buffer_copy(v)
            net = ipaddress.IPv4Network((ipaddress.IPv4Address(key.addr.to_bytes(4, "little")),
                                         key.prefixlen))
            snat.append({"from": str(net), "rule_id": val.rule_id, "pool_index": val.pool_index,
                         "pool_size": val.pool_size, "ports": f"{val.port_min}-{val.port_max}"})
        return {"snat": sorted(snat, key=lambda r: str(r["from"]))}


class FakeTables:
    """In-memory Tables with the datapath's semantics for what the control plane can observe."""

    def __init__(self, ct_max: int = 1024, ncpu: int = 2) -> None:
        self._ct_max = ct_max
        self.ct: dict[CtKey, CtEntry] = {}
        self.replies: dict[CtKey, CtKey] = {}
        self.counters: list[StatTotals] = [{s: (0, 0) for s in Stat} for _ in range(ncpu)]
        self.rules: RuleSet | None = None
        assert len(Stat) == STAT_MAX

    def add_flow(self, key: CtKey, entry: CtEntry) -> None:
        """What the datapath does for a new flow (tests use it to populate the table)."""
        self.ct[key] = entry
        self.replies[reply_key_for(key, entry)] = key

    def ct_max(self) -> int:
        return self._ct_max

    def flows(self) -> list[Flow]:
        return list(self.ct.items())

    def lookup_flow(self, key: CtKey) -> CtEntry | None:
        return self.ct.get(key)

    def reply_index(self) -> list[tuple[CtKey, CtKey]]:
        return list(self.replies.items())

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
