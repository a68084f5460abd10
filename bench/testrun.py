"""BPF_PROG_TEST_RUN for the benchmarks: per-packet cost of natd's fast path, and live frames as a generator.

natd's programs are the daemon's own: their ids come from the XDP attachment of gw:in0/gw:out0 and the
fds from bpf_prog_get_fd_by_id, so the code measured is exactly the code forwarding the lab's traffic.

Repeat runs reuse one buffer, and natd rewrites it (addresses, ports, TTL): the second run would see a
translated packet. So every measured program is called through restore_call (bench/xdp_bench.c), which
writes the pristine frame back and tail-calls it; restore_call -> xdp_pass is measured the same way and
subtracted, and the cost of a bare XDP_PASS run added back, so each figure is "one run of the program".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

from natd_lab import netops

from natd import bpfsys

from . import sysutil

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}


def test_run(fd: int, data: bytes, repeat: int, ingress_ifindex: int, live: bool = False) -> tuple[int, int]:
    """(retval, ns per run). The caller's thread must be in the namespace of ingress_ifindex."""
    res = bpfsys.prog_test_run(fd, data, repeat, ingress_ifindex,
                               flags=bpfsys.BPF_F_TEST_XDP_LIVE_FRAMES if live else 0)
    return res.retval, res.duration_ns


def prog_fd_by_id(prog_id: int) -> int:
    return bpfsys.prog_fd_by_id(prog_id)


def xdp_prog_id(namespace: str, ifname: str) -> int:
    """Id of the XDP program attached to ifname in namespace (0 when none)."""
    with netops.rtnl(namespace) as ipr:
        link = ipr.get_links(netops.link_index(ipr, namespace, ifname))[0]
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return 0
    return int(xdp.get_attr("IFLA_XDP_PROG_ID") or 0)


# ------------------------------------------------------------------------------------ frames


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_frame(dmac: str, smac: str, src: str, dst: str, sport: int, dport: int, length: int = 60) -> bytes:
    """A full-checksum Ethernet/IPv4/UDP frame of `length` bytes (no FCS), like natbench's flood frames."""
    payload = b"natd-bench-payload".ljust(length - 42, b"\0")[: length - 42]
    udp_len = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    pseudo = (socket.inet_aton(src) + socket.inet_aton(dst)
              + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len))
    c = _csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    eth = bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex(smac.replace(":", "")) + b"\x08\x00"
    return eth + ip + udp


def set_template(bpf: Any, slot: int, frame: bytes, vary: int) -> None:
    table = bpf["tmpl"]
    leaf = table.Leaf()
    ctypes.memmove(ctypes.addressof(leaf), frame, len(frame))
    leaf.vary = vary
    table[table.Key(slot)] = leaf


def reset_counter(bpf: Any) -> None:
    table = bpf["run_ctr"]
    table[table.Key(0)] = table.Leaf(*([0] * len(table.Leaf())))


def set_jump(bpf: Any, fd: int) -> None:
    bpf["jmp"][ctypes.c_int(0)] = ctypes.c_int(fd)


def put_raw(table: Any, key: bytes, value: bytes = b"") -> None:
    """Insert raw key/value bytes into a BCC table (values zero-padded to the leaf size)."""
    k, v = table.Key(), table.Leaf()
    ctypes.memmove(ctypes.addressof(k), key, min(len(key), ctypes.sizeof(k)))
    ctypes.memmove(ctypes.addressof(v), value, min(len(value), ctypes.sizeof(v)))
    table[k] = v


def fill_probes(bl: Any) -> None:
    """The probes' maps hold what natd's hold for the inside frame: a /8 rule, the flow, the interface."""
    from .benchlab import CLI_ADDR, SRV_ADDR

    bpf = bl.bpf
    put_raw(bpf["probe_lpm"], struct.pack("<I", 8) + socket.inet_aton("10.0.0.0"), struct.pack("<I", 1))
    ct_key = (socket.inet_aton(CLI_ADDR) + socket.inet_aton(SRV_ADDR) + struct.pack("!HH", 10000, 9000)
              + bytes([socket.IPPROTO_UDP, 0, 0, 0]))
    put_raw(bpf["probe_ct"], ct_key, b"\1" * 8)
    put_raw(bpf["probe_ifaces"], struct.pack("<I", bl.ifindex["gw:in0"]), struct.pack("<I", 1))


# ------------------------------------------------------------------------------------ the figure


def fast_path(bl: Any, natd: Any, repeat: int, new_flows: int, trials: int = 5) -> dict[str, Any]:
    """ns per run of natd's programs next to parse-only, bare redirect and XDP_PASS (see module doc)."""
    from .benchlab import CLI_ADDR, GW_OUT_ADDR, PROBES, SRV_ADDR

    bpf, fns = bl.bpf, bl.fns
    mac, idx = bl.mac, bl.ifindex
    ns_gw = bl.lab.ns("gw")
    inside = udp_frame(mac["gw:in0"], mac["cli:eth0"], CLI_ADDR, SRV_ADDR, 10000, 9000)
    reply = udp_frame(mac["gw:out0"], mac["srv:eth0"], SRV_ADDR, GW_OUT_ADDR, 9000, 10000)
    unsolicited = udp_frame(mac["gw:out0"], mac["srv:eth0"], SRV_ADDR, GW_OUT_ADDR, 9000, 25000)
    ids = {fn: xdp_prog_id(ns_gw, ifname) for fn, ifname in (("xdp_inside", "in0"), ("xdp_outside", "out0"))}
    if not all(ids.values()):
        raise RuntimeError(f"natd's programs are not attached in {ns_gw}: {ids}")
    natd_fd = {fn: prog_fd_by_id(i) for fn, i in ids.items()}
    wrap = fns["restore_call"].fd
    results: dict[str, Any] = {"repeat": repeat, "trials": trials, "prog_ids": ids}
    verdicts: dict[str, str] = {}

    def measure(key: str, fd: int, frame: bytes, ifname: str, expect: int, wrapped: bool = True,
                vary: int = 0, runs: int = repeat, before: Callable[[], None] | None = None) -> None:
        durations = []
        for _ in range(trials if not vary else 1):
            if before:
                before()
            if wrapped:
                set_template(bpf, 0, frame, vary)
                set_jump(bpf, fd)
            with sysutil.in_netns(bl.lab.ns_path("gw")):
                rv, ns = test_run(wrap if wrapped else fd, frame, runs, idx[f"gw:{ifname}"])
            verdicts[key] = VERDICTS.get(rv, str(rv))
            if rv != expect:
                raise RuntimeError(f"fast path {key}: verdict {verdicts[key]}, expected {VERDICTS[expect]}")
            durations.append(ns)
        results[key] = statistics.median(durations)

    try:
        measure("pass_direct", fns["xdp_pass"].fd, inside, "in0", XDP_PASS, wrapped=False)
        measure("parse_direct", fns["parse_only"].fd, inside, "in0", XDP_PASS, wrapped=False)
        measure("wrap_base", fns["xdp_pass"].fd, inside, "in0", XDP_PASS)
        measure("parse_only", fns["parse_only"].fd, inside, "in0", XDP_PASS)
        measure("bare_redirect", fns["bare_in"].fd, inside, "in0", XDP_REDIRECT)
        fill_probes(bl)
        for probe in PROBES:
            if probe != "probe_ct_insert":
                measure(probe, fns[probe].fd, inside, "in0", XDP_PASS, wrapped=False)
        natd.flush()
        with sysutil.in_netns(bl.lab.ns_path("gw")):  # creates the flow the hit runs find
            test_run(natd_fd["xdp_inside"], inside, 1, idx["gw:in0"])
        measure("natd_hit_inside", natd_fd["xdp_inside"], inside, "in0", XDP_REDIRECT)
        measure("natd_hit_outside", natd_fd["xdp_outside"], reply, "out0", XDP_REDIRECT)
        measure("natd_drop_unsolicited", natd_fd["xdp_outside"], unsolicited, "out0", XDP_DROP)
        measure("natd_drop_direct", natd_fd["xdp_outside"], unsolicited, "out0", XDP_DROP, wrapped=False)
        natd.flush()
        measure("natd_new_flow", natd_fd["xdp_inside"], inside, "in0", XDP_REDIRECT, vary=1, runs=new_flows,
                before=lambda: reset_counter(bpf))
        results["new_flow_entries"] = natd.stats().get("conntrack_entries", 0)
        natd.flush()
        measure("probe_ct_insert", fns["probe_ct_insert"].fd, inside, "in0", XDP_PASS, vary=1, runs=new_flows,
                before=lambda: reset_counter(bpf))
        bpf["probe_ins"].items_delete_batch()
    finally:
        for fd in natd_fd.values():
            os.close(fd)
    base = results["wrap_base"] - results["pass_direct"]  # what restore_call + tail call add
    for key in ("parse_only", "bare_redirect", "natd_hit_inside", "natd_hit_outside", "natd_drop_unsolicited",
                "natd_new_flow"):
        results[f"{key}_net"] = max(0.0, results[key] - base)
    results["verdicts"] = verdicts
    return results


def live_generate(bl: Any, seconds: float, vary: int, chunk: int, max_frames: int,
                  enough: Callable[[], bool] | None = None) -> int:
    """Send frames with BPF_F_TEST_XDP_LIVE_FRAMES from cli:eth0 towards the gateway for `seconds` (at most
    max_frames, or until enough() says so); returns how many frames were generated. vary: 1 = every frame a
    new flow, N > 1 = N flows. Runs in this thread (on core 1); the frames that do not fit into the
    gateway's receive ring are dropped there, at no cost to the gateway."""
    from .benchlab import CLI_ADDR, SRV_ADDR

    frame = udp_frame(bl.mac["gw:in0"], bl.mac["cli:eth0"], CLI_ADDR, SRV_ADDR, 10000, 9000)
    set_template(bl.bpf, 1, frame, vary)
    sent = 0
    deadline = time.monotonic() + seconds
    with sysutil.in_netns(bl.lab.ns_path("cli")):
        while time.monotonic() < deadline and sent < max_frames and not (enough and enough()):
            test_run(bl.fns["livegen"].fd, frame, chunk, bl.ifindex["cli:eth0"], live=True)
            sent += chunk
    return sent
