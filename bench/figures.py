"""One function per figure: drive traffic through whichever system is set up and return its numbers.

Gateway cost comes from two clocks over the same window: the busy fraction of core 0 from /proc/stat
(what the gateway's core did, whoever ran there) and the CPU time of the gateway's NAPI threads
(/proc/PID/schedstat: exactly the gateway's receive and forwarding work). ns/pkt = busy time / packets.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from . import sysutil, testrun
from .benchlab import CLI_ADDR, GW_CPU, SRV_ADDR, BenchError, BenchLab, System, _readline

MAX_PACKETS = 50_000_000  # bound of every generator run (it also stops at its time limit)


@dataclasses.dataclass
class Params:
    warmup: float = 1.0
    seconds: float = 3.0
    udp_flows: int = 1024
    fixed_rate: int = 100_000
    rtt_count: int = 20_000
    crr_count: int = 12_000
    crr_concurrency: int = 16
    flood_flows: int = 150_000
    live_chunk: int = 1_000_000
    testrun_repeat: int = 1_000_000
    testrun_new_flows: int = 50_000
    testrun_trials: int = 5
    bulk_omit: int = 1
    flood_chunk: int = 100_000


class Ports:
    """A fresh server port per figure run, so no run meets another's sockets or TIME_WAITs."""

    def __init__(self, start: int = 7000) -> None:
        self.next = start

    def __call__(self) -> int:
        self.next += 1
        return self.next


@dataclasses.dataclass
class Snap:
    cpu: sysutil.CpuSample
    sink: int
    daemon_ns: int


def snap(bl: BenchLab, system: System) -> Snap:
    return Snap(sysutil.cpu_sample(GW_CPU, bl.gw_napi), bl.sink_count(),
                sum(sysutil.process_cpu_ns(p) for p in system.cpu_pids()))


def window(a: Snap, b: Snap, count: int | None = None) -> dict[str, float]:
    """Rates and gateway cost between two snapshots; count defaults to packets the sink saw."""
    cpu = sysutil.CpuDelta.between(a.cpu, b.cpu)
    n = b.sink - a.sink if count is None else count
    out = {"seconds": cpu.seconds, "count": n, "rate": n / cpu.seconds if cpu.seconds > 0 else 0.0,
           "gw_busy": cpu.busy_frac, "gw_busy_s": cpu.busy_s, "napi_s": cpu.threads_s,
           "daemon_cpu_s": (b.daemon_ns - a.daemon_ns) / 1e9}
    out["napi_busy"] = cpu.threads_s / cpu.seconds if cpu.seconds > 0 else 0.0
    out["ns_per_pkt"] = cpu.busy_s * 1e9 / n if n else 0.0
    out["napi_ns_per_pkt"] = cpu.threads_s * 1e9 / n if n else 0.0
    return out


def _flood(bl: BenchLab, flows: int, distinct: int, seconds: float, maxcount: int, rate: int) -> Any:
    return bl.tool("cli", "flood", "eth0", bl.mac["cli:eth0"], bl.mac["gw:in0"], CLI_ADDR, SRV_ADDR, flows,
                   distinct, f"{seconds:.3f}", maxcount, rate)


def _json(out: str) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise BenchError(f"no result line in {out[-300:]!r}")


def udp_load(bl: BenchLab, system: System, p: Params, flows: int, rate: int = 0) -> dict[str, Any]:
    """Closed-loop (rate 0) or paced small-UDP load; the window starts after the warm-up."""
    gen = _flood(bl, flows, 0, p.warmup + p.seconds + 2, MAX_PACKETS, rate)
    time.sleep(p.warmup)
    if gen.poll() is not None:
        out, err = bl.stop(gen)
        raise BenchError(f"generator exited early: {err.strip()[-300:]}")
    a = snap(bl, system)
    time.sleep(p.seconds)
    b = snap(bl, system)
    out, _ = bl.stop(gen)
    res: dict[str, Any] = dict(window(a, b))
    res["sent"] = _json(out)["sent"]
    if rate:
        res["cpu_ms_per_mpkt"] = res["ns_per_pkt"]  # ns/pkt x 1e6 pkt / 1e6 ns/ms
        res["napi_cpu_ms_per_mpkt"] = res["napi_ns_per_pkt"]
    return res


def rtt(bl: BenchLab, system: System, p: Params, ports: Ports) -> dict[str, Any]:
    port = ports()
    srv = bl.start("srv", [bl.natbench, "udpsrv", SRV_ADDR, str(port), f"{p.seconds + 30:.0f}"], ready=True)
    try:
        cli = bl.tool("cli", "udprr", SRV_ADDR, port, p.seconds, p.rtt_count)
        res = bl.finish(cli, p.seconds + 15)
    finally:
        bl.stop(srv)
    if not res["count"]:
        raise BenchError(f"no UDP ping-pong answers through {system.name}: {res}")
    return res


def crr(bl: BenchLab, system: System, p: Params, ports: Ports) -> dict[str, Any]:
    port = ports()
    srv = bl.start("srv", [bl.natbench, "tcpsrv", SRV_ADDR, str(port), f"{p.seconds + 30:.0f}"], ready=True)
    try:
        a = snap(bl, system)
        cli = bl.tool("cli", "tcpcrr", SRV_ADDR, port, p.seconds, p.crr_count, p.crr_concurrency)
        res = bl.finish(cli, p.seconds + 20)
        b = snap(bl, system)
    finally:
        bl.stop(srv)
    w = window(a, b, count=res["count"])
    res.update(conn_per_s=res["count"] / res["seconds"] if res["seconds"] else 0.0, gw_busy=w["gw_busy"],
               us_per_conn=w["ns_per_pkt"] / 1e3, napi_us_per_conn=w["napi_ns_per_pkt"] / 1e3)
    return res


def bulk(bl: BenchLab, system: System, p: Params, ports: Ports) -> dict[str, Any]:
    """One iperf3 TCP stream cli -> srv; the gateway window skips the first (omitted) second."""
    port = str(ports())
    life = str(round(p.seconds) + p.bulk_omit + 30)  # every process bounded in time, iperf3 by timeout(1)
    srv = bl.start("srv", ["timeout", "-k", "5", life, "iperf3", "-s", "-1", "--forceflush", "-B", SRV_ADDR,
                           "-p", port])
    if not _readline(srv, 10.0):
        bl.stop(srv)
        raise BenchError("iperf3 server did not start")
    secs = max(1, round(p.seconds))
    try:
        cli = bl.start("cli", ["timeout", "-k", "5", life, "iperf3", "-c", SRV_ADDR, "-p", port,
                               "-t", str(secs), "-O", str(p.bulk_omit), "-J"])
        time.sleep(p.bulk_omit + 0.2)
        a = snap(bl, system)
        time.sleep(max(0.2, secs - 0.4))
        b = snap(bl, system)
        out, err = bl.wait(cli, secs + p.bulk_omit + 20)
    finally:
        bl.stop(srv)
    try:
        end = json.loads(out)["end"]
        gbit = end["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError) as exc:
        raise BenchError(f"iperf3 through {system.name} failed: {err.strip()[-300:]} {out[-300:]}") from exc
    w = window(a, b, count=1)
    return {"gbit_s": gbit, "retransmits": end["sum_sent"].get("retransmits", 0), "gw_busy": w["gw_busy"],
            "napi_busy": w["napi_s"] / w["seconds"] if w["seconds"] else 0.0}


def flood(bl: BenchLab, system: System, p: Params) -> dict[str, Any]:
    """Every packet a new flow (distinct port pairs), p.flood_flows of them, as fast as the generator goes."""
    a = snap(bl, system)
    gen = _flood(bl, 1, 1, p.seconds + 5, p.flood_flows, 0)
    gres = bl.finish(gen, p.seconds + 20)
    time.sleep(0.05)
    b = snap(bl, system)
    res: dict[str, Any] = dict(window(a, b))
    res["sent"] = gres["sent"]
    res["gen_seconds"] = gres["seconds"]
    res["new_flows_per_s"] = res["count"] / gres["seconds"] if gres["seconds"] else 0.0
    res["system"] = system.stats()
    return res


def live(bl: BenchLab, system: System, p: Params, flows: int) -> dict[str, Any]:
    """The gateway saturated by a BPF_F_TEST_XDP_LIVE_FRAMES generator: forwarded pps and its cost."""
    testrun.live_generate(bl, min(1.0, p.warmup), flows, p.live_chunk, MAX_PACKETS)
    a = snap(bl, system)
    sent = testrun.live_generate(bl, p.seconds, flows, p.live_chunk, MAX_PACKETS)
    time.sleep(0.05)
    b = snap(bl, system)
    res: dict[str, Any] = dict(window(a, b))
    res["generated"] = sent
    res["per_core_pps"] = 1e9 / res["napi_ns_per_pkt"] if res["napi_ns_per_pkt"] else 0.0
    return res


def flood_live(bl: BenchLab, system: System, p: Params) -> dict[str, Any]:
    """Every frame a new flow, from the live-frames generator: the gateway's own limit for new flows.
    Stops once p.flood_flows flows went through (both NAT tables hold 262144), or after p.seconds."""
    testrun.reset_counter(bl.bpf)
    start = bl.sink_count()
    a = snap(bl, system)
    sent = testrun.live_generate(bl, p.seconds, 1, p.flood_chunk, MAX_PACKETS,
                                 enough=lambda: bl.sink_count() - start >= p.flood_flows)
    time.sleep(0.05)
    b = snap(bl, system)
    res: dict[str, Any] = dict(window(a, b))
    res["generated"] = sent
    res["new_flows_per_s"] = res["rate"]
    res["per_core_per_s"] = 1e9 / res["napi_ns_per_pkt"] if res["napi_ns_per_pkt"] else 0.0
    res["system"] = system.stats()
    return res
