"""Summaries (median, min, max over rounds), the tables, the targets, and the markdown files."""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYSTEM_ORDER = ["kernel-fwd", "kernel-nat", "natd", "xdp-bare"]
SYSTEM_LABEL = {"kernel-fwd": "kernel forwarding, no NAT", "kernel-nat": "kernel NAT (nft masquerade)",
                "natd": "natd", "xdp-bare": "bare XDP redirect (limit)"}
README_BEGIN = "<!-- bench:results:begin (written by bench/run.py; edit outside these markers) -->"
README_END = "<!-- bench:results:end -->"


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str            # unique id
    figure: str         # figure name in the results
    field: str          # field of that figure's result
    label: str
    unit: str
    higher_better: bool
    scale: float = 1.0

    def values(self, runs: dict[str, dict[str, list[dict[str, Any]]]], system: str) -> list[float]:
        out = []
        for r in runs.get(self.figure, {}).get(system, []):
            v = r.get(self.field)
            if isinstance(v, (int, float)):
                out.append(float(v) * self.scale)
        return out


def metrics(p: Any) -> list[Metric]:
    f = p.udp_flows
    return [
        Metric("udp_pps", "udp_flows", "rate", f"UDP forwarded, {f} flows, closed loop", "pps", True),
        Metric("udp_ns", "udp_flows", "napi_ns_per_pkt", f"gateway cost, {f} flows (NAPI threads)", "ns/pkt",
               False),
        Metric("udp_ns_core", "udp_flows", "ns_per_pkt", f"gateway cost, {f} flows (core 0 busy)", "ns/pkt",
               False),
        Metric("udp_busy", "udp_flows", "napi_busy", f"gateway NAPI busy, {f} flows, closed loop", "%", False,
               100.0),
        Metric("udp1_pps", "udp_1flow", "rate", "UDP forwarded, 1 flow, closed loop", "pps", True),
        Metric("udp1_ns", "udp_1flow", "napi_ns_per_pkt", "gateway cost, 1 flow (NAPI threads)", "ns/pkt",
               False),
        Metric("live_pps", "live", "rate", "UDP forwarded, gateway saturated (live frames)", "pps", True),
        Metric("live_ns", "live", "napi_ns_per_pkt", "gateway cost, saturated (NAPI threads)", "ns/pkt",
               False),
        Metric("live_core", "live", "per_core_pps", "pps one gateway core sustains (1e9 / cost, saturated)",
               "pps", True),
        Metric("fixed_cpu", "fixed_load", "napi_cpu_ms_per_mpkt",
               f"gateway CPU at {p.fixed_rate // 1000}k pps (NAPI threads)", "ms/Mpkt", False),
        Metric("fixed_cpu_core", "fixed_load", "cpu_ms_per_mpkt",
               f"gateway CPU at {p.fixed_rate // 1000}k pps (core 0 busy)", "ms/Mpkt", False),
        Metric("flood_rate", "flood", "new_flows_per_s",
               f"new flows/s, flood of {p.flood_flows // 1000}k distinct", "flows/s", True),
        Metric("flood_ns", "flood", "napi_ns_per_pkt", "gateway cost per new flow (NAPI threads)", "ns",
               False),
        Metric("flood_busy", "flood", "napi_busy", "gateway NAPI busy during that flood", "%", False, 100.0),
        Metric("flood_live_rate", "flood_live", "new_flows_per_s",
               "new flows/s, gateway saturated (live frames)", "flows/s", True),
        Metric("flood_live_ns", "flood_live", "napi_ns_per_pkt", "gateway cost per new flow, saturated", "ns",
               False),
        Metric("flood_live_core", "flood_live", "per_core_per_s",
               "new flows/s one gateway core sustains (1e9 / cost, saturated)", "flows/s", True),
        Metric("crr", "tcp_crr", "conn_per_s",
               "TCP connections/s (connect, 32 B request, 64 B answer, close)", "conn/s", True),
        Metric("crr_us", "tcp_crr", "napi_us_per_conn", "gateway cost per TCP connection (NAPI threads)",
               "us", False),
        Metric("bulk", "tcp_bulk", "gbit_s", "TCP bulk, 1 stream (iperf3)", "Gbit/s", True),
        Metric("bulk_busy", "tcp_bulk", "napi_busy", "gateway NAPI busy during TCP bulk", "%", False, 100.0),
        Metric("rtt50", "rtt", "p50_us", "UDP round trip p50", "us", False),
        Metric("rtt99", "rtt", "p99_us", "UDP round trip p99", "us", False),
        Metric("start", "control", "start_to_ready_s", "daemon start to READY", "s", False),
        Metric("rss", "control", "rss_ready_kib", "daemon RSS at READY", "MiB", False, 1 / 1024),
        Metric("rss_anon", "control", "rss_anon_ready_kib", "... of which anonymous (heap)", "MiB", False,
               1 / 1024),
        Metric("rss_file", "control", "rss_file_ready_kib", "... of which file-backed (libraries)", "MiB",
               False, 1 / 1024),
        Metric("rss_peak", "control", "rss_peak_kib", "daemon peak RSS (VmHWM)", "MiB", False, 1 / 1024),
    ]


FAST_PATH_ROWS = [
    ("pass_direct", "XDP_PASS only (test-run floor)"),
    ("parse_only_prog", "parse-only (natd's parsing.h: Ethernet, IPv4, L4 ports)"),
    ("bare_redirect_prog", "bare redirect (MAC rewrite + bpf_redirect)"),
    ("natd_hit_inside_prog", "natd xdp_inside, established flow (SNAT + FIB + redirect)"),
    ("natd_hit_outside_prog", "natd xdp_outside, established flow (reverse NAT + FIB + redirect)"),
    ("natd_new_flow_prog", "natd xdp_inside, new flow (port claim, 2 inserts)"),
    ("natd_drop_unsolicited_prog", "natd xdp_outside, unsolicited inbound (drop)"),
    ("wrap_overhead", "restore + tail call (subtracted from the rows above)"),
]


PROBE_ROWS = [
    ("probe_iface_lookup", "hash lookup, 4-byte key (natd: outside_ifaces after the FIB lookup)"),
    ("probe_lpm_lookup", "LPM trie lookup (natd: snat_rules, every inside packet)"),
    ("probe_ct_lookup", "hash lookup, 16-byte key, 262144 entries (natd: ct_orig / ct_reply)"),
    ("probe_ct_update", "that lookup + ktime + 2 atomic adds (natd: ct_update)"),
    ("probe_ktime", "bpf_ktime_get_ns"),
    ("probe_stats2", "2 per-CPU counter updates (natd: reason + verdict)"),
    ("probe_fib", "bpf_fib_lookup (natd: once per packet)"),
    ("probe_ct_insert", "hash insert, BPF_NOEXIST, 262144 preallocated (natd: 2 per new flow)"),
]


def fast_path_values(rounds: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-run program cost: (restore_call -> program) - (restore_call -> xdp_pass) + XDP_PASS alone."""
    out: dict[str, list[float]] = {}
    for r in rounds:
        base = r["wrap_base"] - r["pass_direct"]
        vals = {"pass_direct": r["pass_direct"], "wrap_overhead": base}
        for key in ("parse_only", "bare_redirect", "natd_hit_inside", "natd_hit_outside", "natd_new_flow",
                    "natd_drop_unsolicited"):
            vals[f"{key}_prog"] = r[key] - base
        for key, _ in PROBE_ROWS:
            if key in r:  # run directly: parse + the operation; the operation alone is that - parse-only
                vals[key] = r[key] - r["parse_direct"]
        if "probe_ct_insert" in r:  # run through restore_call (a new key each run)
            vals["probe_ct_insert"] = r["probe_ct_insert"] - base - r["parse_direct"]
        for k, v in vals.items():
            out.setdefault(k, []).append(float(v))
    return out


# ------------------------------------------------------------------------------------ formatting


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    a = abs(v)
    if unit in ("pps", "flows/s", "conn/s") and a >= 1000:
        return f"{v / 1e6:.2f}M" if a >= 1e6 else f"{v / 1e3:.0f}k" if a >= 1e4 else f"{v / 1e3:.1f}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(values: list[float], unit: str) -> str:
    if not values:
        return "-"
    m = num(med(values), unit)
    if len(values) == 1:
        return m
    return f"{m} [{num(min(values), unit)}-{num(max(values), unit)}]"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ tables


def systems_table(res: dict[str, Any], ms: list[Metric]) -> str:
    """One row per system: the headline numbers."""
    by = {m.key: m for m in ms}
    cols = {"udp_pps": "UDP pps, closed loop", "udp_ns": "ns/pkt (closed loop)",
            "live_ns": "ns/pkt (saturated)", "live_core": "pps per core",
            "fixed_cpu": "CPU ms/Mpkt at fixed load",
            "flood_live_ns": "ns per new flow", "flood_live_core": "new flows/s per core",
            "crr": "TCP conn/s", "bulk": "TCP Gbit/s", "rtt50": "RTT p50 us", "rtt99": "RTT p99 us"}
    header = ["system", *cols.values()]
    rows = []
    for s in res["systems"]:
        rows.append([SYSTEM_LABEL.get(s, s)]
                    + [num(med(by[c].values(res["runs"], s)), by[c].unit) for c in cols])
    return md_table(header, rows)


def figures_table(res: dict[str, Any], ms: list[Metric]) -> str:
    systems = res["systems"]
    header = ["figure", "unit"] + [SYSTEM_LABEL.get(s, s) for s in systems] + ["natd / kernel NAT",
                                                                             "natd / limit"]
    rows = []
    for m in ms:
        vals = {s: m.values(res["runs"], s) for s in systems}
        if not any(vals.values()):
            continue
        natd = med(vals.get("natd", []))
        rows.append([m.label, m.unit] + [cell(vals[s], m.unit) for s in systems]
                    + [ratio(natd, med(vals.get("kernel-nat", []))),
                       ratio(natd, med(vals.get("xdp-bare", [])))])
    return md_table(header, rows)


def fast_path_table(res: dict[str, Any]) -> str:
    vals = fast_path_values(res.get("fast_path", []))
    if not vals:
        return "(not measured)"
    parse = med(vals.get("parse_only_prog", []))
    rows = [[label, cell(vals.get(k, []), "ns"), ratio(med(vals.get(k, [])), parse) if k != "wrap_overhead"
             else "-"] for k, label in FAST_PATH_ROWS]
    rows += [[f"+ {label}", cell(vals[k], "ns"), "added to parse-only"]
             for k, label in PROBE_ROWS if k in vals]
    return md_table(["program (one run, BPF_PROG_TEST_RUN)", "ns/run", "vs parse-only"], rows)


@dataclasses.dataclass
class Target:
    name: str
    measured: str
    goal: str
    met: bool | None
    note: str
    indicative: bool = False  # the measurement cannot settle the target; shown, not claimed


def targets(res: dict[str, Any], ms: list[Metric]) -> list[Target]:
    by = {m.key: m for m in ms}

    def m(key: str, system: str) -> float | None:
        return med(by[key].values(res["runs"], system))

    out: list[Target] = []

    def add(name: str, value: float | None, goal: float, goal_text: str, higher: bool, note: str = "",
            fmt: Callable[[float], str] = lambda v: f"{v:.2f}x", indicative: bool = False) -> None:
        if value is None:
            out.append(Target(name, "-", goal_text, None, "not measured"))
            return
        met = value >= goal if higher else value <= goal
        if not met:
            by_how = value / goal if not higher else goal / value
            note = f"missed by {by_how:.2f}x" + (f". {note}" if note else "")
        out.append(Target(name, fmt(value), goal_text, met, note, indicative))

    def r(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def n(v: float | None, unit: str = "ns") -> str:
        return "-" if v is None else f"{v:.0f}{'' if unit == '%' else ' '}{unit}"

    fp = {k: med(v) for k, v in fast_path_values(res.get("fast_path", [])).items()}
    hit, parse, fib = fp.get("natd_hit_inside_prog"), fp.get("parse_only_prog"), fp.get("probe_fib")
    closed = ("closed loop: the cost per packet also depends on NAPI batch sizes (wake-ups), which differ "
              "with each system's speed; the saturated row is the per-packet comparison")
    live = {s: m("live_ns", s) for s in ("natd", "kernel-nat", "xdp-bare")}
    add("gateway cost per packet, natd / kernel NAT (1024 flows, socket generator)",
        r(m("udp_ns", "natd"), m("udp_ns", "kernel-nat")), 1 / 8, "<= 0.125x", False, closed, indicative=True)
    add("gateway cost per packet, natd / kernel NAT (saturated, live frames)",
        r(live["natd"], live["kernel-nat"]), 1 / 8, "<= 0.125x", False,
        f"natd {n(live['natd'])}, kernel NAT {n(live['kernel-nat'])}; the bare redirect itself is "
        f"{ratio(live['xdp-bare'], live['kernel-nat'])} of kernel NAT")
    add("gateway cost per packet, natd / bare redirect (1024 flows, socket generator)",
        r(m("udp_ns", "natd"), m("udp_ns", "xdp-bare")), 1.3, "<= 1.3x", False, closed, indicative=True)
    add("gateway cost per packet, natd / bare redirect (saturated, live frames)",
        r(live["natd"], live["xdp-bare"]), 1.3, "<= 1.3x", False,
        f"natd {n(live['natd'])}, bare {n(live['xdp-bare'])}: the difference is natd's program, "
        f"{n(hit)} per run (BPF_PROG_TEST_RUN) against {n(fp.get('bare_redirect_prog'))}")
    for key, rkey, label in (("udp_pps", "udp_busy", "1024 flows"), ("udp1_pps", None, "1 flow")):
        busy = m(rkey, "natd") if rkey else None
        add(f"closed-loop UDP pps, natd / kernel NAT ({label})", r(m(key, "natd"), m(key, "kernel-nat")), 2.0,
            ">= 2x", True, "" if busy is None else
            f"natd's gateway NAPI {busy:.0f}% busy: {'generator' if busy < 90 else 'gateway'}-bound")
    busy = m("flood_busy", "natd")
    add("new flows/s under a flood, natd / kernel NAT (socket generator)",
        r(m("flood_rate", "natd"), m("flood_rate", "kernel-nat")), 5.0, ">= 5x", True,
        "" if busy is None else f"natd's gateway NAPI {busy:.0f}% busy: "
        f"{'generator' if busy < 90 else 'gateway'}-bound; the saturated row is the gateway's limit")
    add("new flows/s under a flood, natd / kernel NAT (per gateway core, saturated, live frames)",
        r(m("flood_live_core", "natd"), m("flood_live_core", "kernel-nat")), 5.0, ">= 5x", True,
        f"per new flow natd {n(m('flood_live_ns', 'natd'))}, "
        f"kernel NAT {n(m('flood_live_ns', 'kernel-nat'))}; "
        f"natd's new-flow program {n(fp.get('natd_new_flow_prog'))} per run, one hash insert "
        f"{n(fp.get('probe_ct_insert'))} (it does two)")
    add("TCP bulk, natd / kernel NAT (same offloads)", r(m("bulk", "natd"), m("bulk", "kernel-nat")), 1.0,
        ">= 1x", True, f"sender-bound here; gateway NAPI busy natd {n(m('bulk_busy', 'natd'), '%')}, kernel "
        f"NAT {n(m('bulk_busy', 'kernel-nat'), '%')}: the kernel forwards GRO'd super-packets, natd each "
        "segment")
    add("fast path, natd established hit / parse-only (BPF_PROG_TEST_RUN)", r(hit, parse), 1.5, "<= 1.5x",
        False, f"natd {n(hit)}, parse-only {n(parse)}; of natd's: bpf_fib_lookup {n(fib)}, ct_update "
        f"{n(fp.get('probe_ct_update'))} (bpf_ktime_get_ns {n(fp.get('probe_ktime'))}), outside_ifaces "
        f"lookup {n(fp.get('probe_iface_lookup'))}, LPM {n(fp.get('probe_lpm_lookup'))}")
    add("daemon start to READY", m("start", "natd"), 5.0, "<= 5 s", False,
        "BCC compiles the datapath at every start", fmt=lambda v: f"{v:.1f} s")
    return out


def targets_table(ts: list[Target]) -> str:
    verdict = {True: "met", False: "**missed**", None: "-"}
    rows = [[t.name, t.measured, t.goal, f"({verdict[t.met].strip('*')}, indicative)" if t.indicative
             else verdict[t.met], t.note] for t in ts]
    return md_table(["target", "measured", "goal", "", "note"], rows)


# ------------------------------------------------------------------------------------ documents


def render(res: dict[str, Any], p: Any, notes: str = "") -> str:
    ms = metrics(p)
    mach = res["machine"]
    parts = [
        f"# natd benchmarks, {res['date']}",
        "",
        f"`{res['command']}`: {res['rounds']} round(s), {p.seconds:g} s per figure after {p.warmup:g} s "
        "warm-up, "
        f"systems alternated {' '.join(res['systems'])} each round; median [min-max] over rounds. "
        f"Run took {res['elapsed_s']:.0f} s.",
        "",
        "## Machine",
        "",
        md_table(["", ""], [[k, str(v)] for k, v in mach.items()]
                 + [["load average at start / end", f"{res['load_start']} / {res['load_end']}"],
                    ["lab", "cli - gw - srv (bench/topology.yaml), veth pairs, gateway NAPI on core 0, "
                     "everything else on core 1"]]
                 + [[f"offloads {k}", v] for k, v in res.get("offloads", {}).items()]),
        "",
        "## Systems",
        "",
        systems_table(res, ms),
        "",
        "## All figures",
        "",
        figures_table(res, ms),
        "",
        "## Fast path (BPF_PROG_TEST_RUN on the daemon's own programs)",
        "",
        fast_path_table(res),
        "",
        "## Targets",
        "",
        targets_table(targets(res, ms)),
        "",
    ]
    if notes:
        parts += [notes.strip(), ""]
    if res.get("errors"):
        parts += ["## Errors", ""] + [f"- {e}" for e in res["errors"]] + [""]
    return "\n".join(parts)


def update_readme(readme: Path, block: str) -> None:
    """Replace the text between the results markers (append the markers if missing); keep the rest."""
    text = readme.read_text() if readme.exists() else ""
    new = f"{README_BEGIN}\n{block.strip()}\n{README_END}"
    if README_BEGIN in text and README_END in text:
        pattern = re.escape(README_BEGIN) + r".*?" + re.escape(README_END)
        text = re.sub(pattern, lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    readme.write_text(text)
