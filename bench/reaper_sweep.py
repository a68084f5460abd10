#!/usr/bin/env python3
"""Benchmark: conntrack sweeps and metrics scrapes at 100k and 1M flows, on real pinned BPF maps.

Needs root (BPF maps), never touches the network. Run from the repository root:

    sudo .venv/bin/python bench/reaper_sweep.py                  # 100k and 1M flows, 10% expired
    sudo .venv/bin/python bench/reaper_sweep.py --sizes 1000000 --repeat 5
    sudo .venv/bin/python bench/reaper_sweep.py --datapath       # maps made by compiling the real datapath

The maps live under a pin directory of their own, /run/natd/bpf/bench-<random>/bench/v<layout> (or
--pin-root), removed at the end whatever happens. By default ct_orig / ct_reply / stats / ext_addrs are
created directly (libbpf, same types, key/value sizes and max_entries as the datapath's
BPF_TABLE_PINNED); --datapath compiles and loads natd's XDP program with natd.loader.Datapath (not
attached to anything) and uses the maps it pins.

For each size it fills both conntrack halves and one NAT mapping per flow with batch updates (flows shaped
like a NAT gateway's: 4096 inside hosts, 1024 remotes, 4 external addresses; 70% TCP, 25% UDP, 5% ICMP), a
fraction of them idle past their timeout (default config timeouts), and reports, medians of --repeat runs:

  read      BpfMap.lookup_batch_raw of ct_orig and ct_reply (the raw batch read)
  objects   PinnedTables.flows(): the same read as a list of (CtKey, CtEntry), what natctl uses
  sweep     Reaper.sweep() with the expired fraction (expired flows re-inserted before each run)
  sweep0    Reaper.sweep() with nothing expired
  stall     the longest the main thread waited for the GIL (1 ms sleeps) while a ReaperThread swept
  scrape    generate_latest() of natd.metrics' collector fed by the last sweep, idle and during a sweep
  rss       process RSS after the fill, and the peak while sweeping
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import os
import platform
import secrets
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, generate_latest

from natd import bpfsys
from natd.config import Timeouts, parse_config
from natd.maps import (
    CT_ENTRY_DTYPE,
    CT_KEY_DTYPE,
    EXT_ENDPOINT_DTYPE,
    LAYOUT_VERSION,
    MAX_HOSTS,
    NAT_MAPPING_DTYPE,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    STAT_MAX,
    CtFlags,
    CtState,
    ExtAddrInfo,
    ip_to_be32,
)
from natd.metrics import NatdCollector, ReaperStatus
from natd.reaper import Reaper, ReaperThread, SweepResult, expired_mask
from natd.tables import FlowTable, PinnedTables

S = 1_000_000_000
EXTERNAL = ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")
CONFIG = """\
inside: [bench-in]
outside: bench-out
snat:
  - from: 10.0.0.0/8
    to: [192.0.2.1, 192.0.2.2, 192.0.2.3, 192.0.2.4]
    ports: 1024-65535
conntrack:
  max: {ct_max}
"""


def rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, KiB."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":")
                values[name] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def median_time(fn: Callable[[], object], repeat: int, before: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# --- the maps ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def pinned_maps(pin_root: str, ct_max: int, datapath: bool) -> Iterator[str]:
    """A pin directory holding ct_orig, ct_reply, stats, ext_addrs and the NAT mapping maps; removed (maps
    unpinned) on exit."""
    directory = os.path.join(pin_root, "bench", f"v{LAYOUT_VERSION}")
    os.makedirs(directory)
    loaded: Any = None
    made: list[bpfsys.BpfMap] = []
    try:
        if datapath:
            from natd.loader import Datapath

            loaded = Datapath.load(directory, ct_max)
        else:
            specs = {
                "ct_orig": (bpfsys.BPF_MAP_TYPE_HASH, CT_KEY_DTYPE.itemsize, CT_ENTRY_DTYPE.itemsize, ct_max),
                "ct_reply": (bpfsys.BPF_MAP_TYPE_HASH, CT_KEY_DTYPE.itemsize, CT_KEY_DTYPE.itemsize, ct_max),
                "stats": (bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, STAT_MAX),
                "ext_addrs": (bpfsys.BPF_MAP_TYPE_HASH, 4, ctypes.sizeof(ExtAddrInfo), 256),
                "nat_mappings": (bpfsys.BPF_MAP_TYPE_HASH, CT_KEY_DTYPE.itemsize, NAT_MAPPING_DTYPE.itemsize,
                                 ct_max),
                "port_owners": (bpfsys.BPF_MAP_TYPE_HASH, EXT_ENDPOINT_DTYPE.itemsize, CT_KEY_DTYPE.itemsize,
                                ct_max),
                "host_ports": (bpfsys.BPF_MAP_TYPE_HASH, 4, 4, MAX_HOSTS),
            }
            for name, (kind, ks, vs, n) in specs.items():
                m = bpfsys.BpfMap.create(kind, ks, vs, n, name)
                made.append(m)
                m.pin(os.path.join(directory, name))
        yield directory
    finally:
        for m in made:
            m.close()
        if loaded is not None:
            with contextlib.suppress(Exception):
                loaded.bpf.cleanup()
        shutil.rmtree(pin_root)  # unlinking a pin unpins the map


def make_flows(n: int, expired_fraction: float, now_ns: int,
               seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(orig keys, entries, reply keys, reply values) for n distinct flows; the first round(n * fraction)
    rows in a random order are idle past their (default config) timeout."""
    rng = np.random.default_rng(seed)
    i = np.arange(n, dtype=np.int64)
    host, sport = i % 4096, 1024 + (i // 4096) % 60000     # (host, sport) distinct: orig keys distinct
    remote, j = i % 1024, i // 1024
    nat_port, nat_index = 1024 + j % 60000, (j // 60000) % len(EXTERNAL)  # reply keys distinct too
    roll = rng.random(n)
    proto = np.where(roll < 0.70, PROTO_TCP, np.where(roll < 0.95, PROTO_UDP, PROTO_ICMP)).astype(np.uint8)

    def be16(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = x.astype(np.uint16)
        return out.byteswap()

    def be32(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
        out: np.ndarray = (a | (b << 8) | (c << 16) | (d << 24)).astype(np.uint32)  # network order in memory
        return out

    keys = np.zeros(n, CT_KEY_DTYPE)
    keys["saddr"] = be32(np.full(n, 10), np.full(n, 1), host >> 8, host & 0xFF)
    keys["daddr"] = be32(np.full(n, 198), np.full(n, 18), remote >> 8, remote & 0xFF)
    keys["sport"] = be16(sport)
    keys["dport"] = be16(np.where(proto == PROTO_TCP, 443, np.where(proto == PROTO_UDP, 53, 0)))
    keys["proto"] = proto

    state = np.where(proto == PROTO_TCP, np.where(rng.random(n) < 0.9, int(CtState.ESTABLISHED),
                                                  int(CtState.SYN_SENT)), int(CtState.NONE)).astype(np.uint8)
    replied = (state != CtState.SYN_SENT) & (rng.random(n) < 0.9)
    timeout_s = np.select([(proto == PROTO_TCP) & (state == CtState.ESTABLISHED), proto == PROTO_TCP,
                           (proto == PROTO_UDP) & replied, proto == PROTO_UDP], [7440, 120, 300, 120], 60)
    idle_s = rng.random(n) * timeout_s * 0.9
    dead = np.zeros(n, dtype=bool)
    dead[rng.permutation(n)[:round(n * expired_fraction)]] = True
    idle_s = np.where(dead, timeout_s + 1 + rng.random(n) * 100, idle_s)

    entries = np.zeros(n, CT_ENTRY_DTYPE)
    entries["last_seen_ns"] = now_ns - (idle_s * S).astype(np.int64)
    entries["created_ns"] = entries["last_seen_ns"] - S
    entries["packets_orig"] = 10
    entries["bytes_orig"] = 1500
    entries["nat_addr"] = np.array([ip_to_be32(a) for a in EXTERNAL], np.uint32)[nat_index]
    entries["nat_port"] = be16(nat_port)
    entries["state"] = state
    entries["flags"] = np.where(replied, int(CtFlags.REPLIED | CtFlags.ASSURED), 0)
    entries["rule_id"] = 1

    table = FlowTable(keys, entries)
    replies = table.reply_keys()
    return keys, entries, replies, keys.copy()


def make_mappings(keys: np.ndarray, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The endpoint-independent mapping of every flow (each inside endpoint here has exactly one flow, the
    worst case for the reaper: every expired flow releases a mapping)."""
    mkeys = keys.copy()
    mkeys["daddr"] = 0
    mkeys["dport"] = 0
    values = np.zeros(len(keys), NAT_MAPPING_DTYPE)
    values["last_used_ns"] = entries["created_ns"]
    values["ext_addr"] = entries["nat_addr"]
    values["ext_port"] = entries["nat_port"]
    values["rule_id"] = 1
    return mkeys, values


class Bench:
    def __init__(self, directory: str, n: int, expired_fraction: float, timeouts: Timeouts) -> None:
        self.tables = PinnedTables(directory)
        self.n = n
        # The reapers' clock stands still (nothing but this script touches the maps), so the expired set is
        # the same in every run; 30 days: flows idle for hours fit even on a machine booted minutes ago.
        self.now = 30 * 86400 * S
        self.keys, self.entries, self.reply_keys, self.reply_values = make_flows(n, expired_fraction,
                                                                                 self.now)
        self.dead = np.flatnonzero(expired_mask(FlowTable(self.keys, self.entries), self.now, timeouts))
        self.mapping_keys, self.mapping_values = make_mappings(self.keys, self.entries)

    def fill(self, rows: np.ndarray | None = None) -> float:
        started = time.perf_counter()
        k, e, rk, rv = self.keys, self.entries, self.reply_keys, self.reply_values
        if rows is not None:
            k, e, rk, rv = k[rows], e[rows], rk[rows], rv[rows]
        mk, mv = self.mapping_keys, self.mapping_values
        if rows is not None:
            mk, mv = mk[rows], mv[rows]
        self.tables.map("ct_reply").update_batch(rk.tobytes(), rv.tobytes(), len(rk))
        self.tables.map("ct_orig").update_batch(k.tobytes(), e.tobytes(), len(k))
        self.tables.map("nat_mappings").update_batch(mk.tobytes(), mv.tobytes(), len(mk))
        return time.perf_counter() - started


def measure(directory: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"flows": n}
    timeouts = parse_config(CONFIG.format(ct_max=n)).conntrack.timeouts
    bench = Bench(directory, n, args.expired, timeouts)
    out["fill_s"] = bench.fill()
    out["expired"] = len(bench.dead)
    out["rss_after_fill_mib"] = rss_kib()[0] / 1024
    ct_orig, ct_reply = bench.tables.map("ct_orig"), bench.tables.map("ct_reply")
    assert ct_orig.lookup_batch_raw()[2] == n
    out["read_orig_s"] = median_time(ct_orig.lookup_batch_raw, args.repeat)
    out["read_reply_s"] = median_time(ct_reply.lookup_batch_raw, args.repeat)
    out["flow_table_s"] = median_time(bench.tables.flow_table, args.repeat)
    out["flows_objects_s"] = median_time(bench.tables.flows, 1)

    reaper = Reaper(bench.tables, timeouts, clock=lambda: bench.now)
    results: list[SweepResult] = []
    reset_peak_rss()
    sweep_s = median_time(lambda: results.append(reaper.sweep()), args.repeat,
                          before=lambda: bench.fill(bench.dead))
    out["sweep_s"] = sweep_s
    out["sweep_reaped"] = results[-1].reaped
    out["sweep_mappings_released"] = results[-1].mappings_released
    out["sweep_recheck"] = results[-1].recheck
    results.clear()
    out["sweep0_s"] = median_time(lambda: results.append(reaper.sweep()), args.repeat)
    assert results[-1].reaped == 0 and results[-1].scanned == n - len(bench.dead), results[-1]
    out["rss_peak_sweep_mib"] = rss_kib()[1] / 1024

    # the main thread while a ReaperThread sweeps: how long does a 1 ms sleep really take? (and without a
    # sweep, for the noise floor of this machine)
    def sleeps(until: Callable[[], bool]) -> list[float]:
        gaps = []
        while not until():
            t0 = time.perf_counter()
            time.sleep(0.001)
            gaps.append(time.perf_counter() - t0)
        return gaps

    idle_until = time.perf_counter() + 1.0
    idle = sleeps(lambda: time.perf_counter() > idle_until)
    out["stall_idle_max_ms"] = 1000 * max(idle)
    bench.fill(bench.dead)
    thread = ReaperThread(bench.tables, timeouts, interval=3600, clock=lambda: bench.now)
    thread.start()
    gaps = sleeps(lambda: thread.sweeps > 0 or thread.errors > 0)
    thread.stop()
    thread.join()
    assert thread.errors == 0, thread.last_error
    out["stall_max_ms"] = 1000 * max(gaps)
    out["stall_p99_ms"] = 1000 * float(np.percentile(gaps, 99))

    # scrapes: the collector as the daemon builds it, fed by the last sweep
    status = ReaperStatus()
    assert thread.last_result is not None
    status.update(thread.last_result, time.time())
    registry = CollectorRegistry()
    registry.register(NatdCollector(bench.tables, parse_config(CONFIG.format(ct_max=n)), status))
    out["scrape_s"] = median_time(lambda: generate_latest(registry), max(5, args.repeat))
    # and during a sweep
    bench.fill(bench.dead)
    busy = threading.Thread(target=reaper.sweep)
    busy.start()
    during = []
    while busy.is_alive():
        t0 = time.perf_counter()
        generate_latest(registry)
        during.append(time.perf_counter() - t0)
        time.sleep(0.01)
    busy.join()
    out["scrape_during_sweep_max_s"] = max(during) if during else 0.0
    out["rss_end_mib"] = rss_kib()[0] / 1024
    bench.tables.close()
    return out


def report(r: dict[str, Any]) -> None:
    ms = {k: 1000 * v for k, v in r.items() if k.endswith("_s")}
    print(f"{r['flows']} flows (fill {r['fill_s']:.2f} s):\n"
          f"  read       ct_orig {ms['read_orig_s']:.0f} ms, ct_reply {ms['read_reply_s']:.0f} ms "
          f"(lookup_batch_raw); flow_table() {ms['flow_table_s']:.0f} ms; flows() objects "
          f"{r['flows_objects_s']:.2f} s\n"
          f"  sweep      {ms['sweep_s']:.0f} ms with {r['expired']} expired ({r['sweep_reaped']} reaped, "
          f"{r['sweep_mappings_released']} mappings released, re-check {r['sweep_recheck']}); {ms['sweep0_s']:.0f} ms with none expired\n"
          f"  stall      main thread during a sweep: max {r['stall_max_ms']:.1f} ms, p99 "
          f"{r['stall_p99_ms']:.1f} ms (1 ms sleeps; without a sweep: max {r['stall_idle_max_ms']:.1f} ms)\n"
          f"  scrape     {ms['scrape_s']:.1f} ms; during a sweep max "
          f"{ms['scrape_during_sweep_max_s']:.1f} ms\n"
          f"  rss        {r['rss_after_fill_mib']:.0f} MiB after the fill (this script's own arrays "
          f"included), peak while sweeping {r['rss_peak_sweep_mib']:.0f} MiB, at the end "
          f"{r['rss_end_mib']:.0f} MiB",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="flow counts, comma-separated")
    ap.add_argument("--expired", type=float, default=0.10, help="fraction of flows expired (default 0.10)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing; the median is reported")
    ap.add_argument("--ct-max", type=int, default=1 << 20, help="max_entries of the conntrack maps")
    ap.add_argument("--datapath", action="store_true", help="compile and load the real datapath (BCC)")
    ap.add_argument("--pin-root", default=None, help="bpffs directory to create (default "
                    "/run/natd/bpf/bench-<random>, else /sys/fs/bpf/natd-bench-<random>)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (BPF maps)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > args.ct_max:
        ap.error(f"--ct-max {args.ct_max} is smaller than {max(sizes)} flows")
    token = secrets.token_hex(4)
    pin_root = args.pin_root or (f"/run/natd/bpf/bench-{token}" if os.path.isdir("/run/natd/bpf")
                                 else f"/sys/fs/bpf/natd-bench-{token}")
    maps = "datapath (BCC)" if args.datapath else "libbpf"
    print(f"# {datetime.date.today()}: nproc {os.cpu_count()}, kernel {platform.release()}, python "
          f"{platform.python_version()}, numpy {np.__version__}; maps: {maps}, ct_max {args.ct_max}, "
          f"expired {args.expired:.0%}, median of {args.repeat}")
    rows = []
    for n in sizes:
        with pinned_maps(pin_root, args.ct_max, args.datapath) as directory:
            rows.append(measure(directory, n, args))
        report(rows[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
