"""`make bench`: natd side by side with the kernel's NAT, the kernel without NAT and a bare XDP redirect.

    python -m bench.run                       # full run: 3 rounds, 3 s per figure (about 6 minutes)
    python -m bench.run --rounds 5 --seconds 5
    python -m bench.run --smoke --results-dir /tmp/x    # 1 round, tiny counts: the plumbing, not numbers

One lab (bench/topology.yaml, unique prefix) is built, every system is set up in turn on the same lab,
cores and generators (kernel-fwd, kernel-nat, natd, xdp-bare, then again, for --rounds rounds), each
figure is measured on each, and everything is torn down at the end, also on errors, Ctrl-C and SIGTERM.
The table goes to stdout, the full results to bench/results/<date>.md and the summary into
bench/README.md (between its results markers; the rest of the README is left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from . import figures, report
from .benchlab import SYSTEMS, BenchLab, System, machine_description

HERE = Path(__file__).resolve().parent
FIGURES = ["udp_flows", "udp_1flow", "fixed_load", "live", "rtt", "tcp_crr", "tcp_bulk", "flood",
           "flood_live"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of A B C D (default 3; >= 3 for figures)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per figure (default 3)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before a window (default 1)")
    ap.add_argument("--systems", default=",".join(report.SYSTEM_ORDER),
                    help=f"comma-separated subset of {','.join(report.SYSTEM_ORDER)}")
    ap.add_argument("--figures", default=",".join(FIGURES),
                    help=f"comma-separated subset of {','.join(FIGURES)}")
    ap.add_argument("--no-fast-path", action="store_true", help="skip the BPF_PROG_TEST_RUN figure")
    ap.add_argument("--fixed-rate", type=int, default=200_000, help="offered load of the CPU-per-Mpkt figure")
    ap.add_argument("--smoke", action="store_true",
                    help="1 round, short windows, small counts, no README update (for the smoke test)")
    ap.add_argument("--results-dir", type=Path, default=HERE / "results", help="where <date>.md goes")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    ap.add_argument("--json", type=Path, help="also dump the raw results as JSON here")
    args = ap.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    args.figures = [f for f in args.figures.split(",") if f]
    for s in args.systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}; known: {', '.join(SYSTEMS)}")
    for f in args.figures:
        if f not in FIGURES:
            ap.error(f"unknown figure {f!r}; known: {', '.join(FIGURES)}")
    if args.smoke:
        args.rounds, args.no_readme = 1, True
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds must be >= 1 and --seconds > 0")
    return args


def params_for(args: argparse.Namespace) -> figures.Params:
    p = figures.Params(warmup=args.warmup, seconds=args.seconds, fixed_rate=args.fixed_rate)
    if args.smoke:
        p = dataclasses.replace(p, warmup=0.2, seconds=min(args.seconds, 0.6), rtt_count=2000,
                                crr_count=1500, flood_flows=20_000, live_chunk=200_000, flood_chunk=50_000,
                                testrun_repeat=100_000, testrun_new_flows=5000, testrun_trials=3, bulk_omit=0)
    return p


class Runner:
    def __init__(self, args: argparse.Namespace, bl: BenchLab, p: figures.Params) -> None:
        self.args, self.bl, self.p = args, bl, p
        self.ports = figures.Ports()
        self.runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.fast_path: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def record(self, figure: str, system: str, result: dict[str, Any]) -> None:
        self.runs.setdefault(figure, {}).setdefault(system, []).append(result)

    def figure(self, name: str, system: System) -> dict[str, Any]:
        p, bl = self.p, self.bl
        if name == "udp_flows":
            return figures.udp_load(bl, system, p, p.udp_flows)
        if name == "udp_1flow":
            return figures.udp_load(bl, system, p, 1)
        if name == "fixed_load":
            return figures.udp_load(bl, system, p, p.udp_flows, rate=p.fixed_rate)
        if name == "live":
            return figures.live(bl, system, p, p.udp_flows)
        if name == "rtt":
            return figures.rtt(bl, system, p, self.ports)
        if name == "tcp_crr":
            return figures.crr(bl, system, p, self.ports)
        if name == "tcp_bulk":
            return figures.bulk(bl, system, p, self.ports)
        if name == "flood":
            return figures.flood(bl, system, p)
        if name == "flood_live":
            return figures.flood_live(bl, system, p)
        raise ValueError(name)

    def slot(self, rnd: int, name: str) -> None:
        system = SYSTEMS[name](self.bl)
        say(f"round {rnd}: {name}: setting up")
        try:
            system.setup()
            self.bl.pin_napi()
            for fig in self.args.figures:
                system.flush()
                t0 = time.monotonic()
                try:
                    res = self.figure(fig, system)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    self.errors.append(f"round {rnd}, {name}, {fig}: {exc}")
                    say(f"round {rnd}: {name}: {fig} FAILED: {exc}")
                    traceback.print_exc()
                    continue
                self.record(fig, name, res)
                say(f"round {rnd}: {name}: {fig}: {brief(res)} ({time.monotonic() - t0:.1f} s)")
            if name == "natd" and not self.args.no_fast_path:
                from . import testrun

                system.flush()
                fp = testrun.fast_path(self.bl, system, self.p.testrun_repeat, self.p.testrun_new_flows,
                                       self.p.testrun_trials)
                self.fast_path.append(fp)
                say(f"round {rnd}: natd: fast path: " + ", ".join(
                    f"{k}={fp[k]:.0f}" for k in ("pass_direct", "wrap_base", "parse_only", "natd_hit_inside",
                                                 "natd_new_flow")))
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            self.errors.append(f"round {rnd}, {name}: {exc}")
            say(f"round {rnd}: {name} FAILED: {exc}")
            traceback.print_exc()
        finally:
            # Ctrl-C / SIGTERM wait until the system is down (natd stopped and its pins removed); they
            # are delivered right after, and the lab's teardown follows.
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                with contextlib.suppress(Exception):
                    stats = system.stats()
                    if stats:
                        system.info["stats_end"] = stats
                try:
                    system.teardown()
                except Exception as exc:
                    self.errors.append(f"round {rnd}, {name}: teardown: {exc}")
                if system.info:
                    self.record("control", name, dict(system.info))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def brief(res: dict[str, Any]) -> str:
    keys = ("rate", "napi_ns_per_pkt", "gw_busy", "p50_us", "p99_us", "conn_per_s", "gbit_s",
            "new_flows_per_s", "count")
    return " ".join(f"{k}={res[k]:.4g}" for k in keys if isinstance(res.get(k), (int, float)))


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


NOTES = """\
## How to read this

* **Gateway cost** is CPU time of the gateway's receive work per packet. The gateway's NAPI threads
  (threaded NAPI on gw:in0 and gw:out0, pinned to core 0) do all of it for every system: the kernel's
  forwarding and NAT, and natd's XDP program. "NAPI threads" is their own CPU time
  (/proc/PID/schedstat); "core 0 busy" is the busy fraction of core 0 from /proc/stat x 1e9 / pps, which
  also counts anything else that ran on core 0 (on a shared machine: other people's processes), so it is
  an upper bound. Where they differ a lot, the machine was not quiet.
* **Closed loop**: natbench floods 60-byte UDP frames from an AF_PACKET socket on core 1; the client veth
  has a pfifo qdisc, so the sender blocks when the gateway falls behind. Such a generator tops out well
  below 1 Mpps here: when natd and the bare redirect are generator-bound their pps figures are equal to
  the generator's and their per-packet cost is inflated by small NAPI batches (thread wake-ups).
* **Saturated (live frames)**: BPF_F_TEST_XDP_LIVE_FRAMES sends frames from core 1 at several Mpps; the
  gateway's core is then the bottleneck and its cost per packet is the marginal one. The kernel paths pay
  for building an skb from each frame here (a NIC driver would too); XDP paths work on the frame.
* **Fast path**: BPF_PROG_TEST_RUN (repeat) on the daemon's own programs, through a restore-and-tail-call
  wrapper whose cost is subtracted (repeat runs share one buffer, which natd rewrites).
* The sink on the server counts and drops the generator's UDP in XDP; ping-pong and TCP go to the stack.
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, XDP, BPF); run: sudo make bench", file=sys.stderr)
        return 1
    p = params_for(args)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old_term = signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored (e.g. `make bench &`)
    started = time.monotonic()
    date = dt.datetime.now().strftime("%Y-%m-%d")
    load_start = loadavg()
    workdir = Path(tempfile.mkdtemp(prefix="natd-bench-"))
    bl = BenchLab(workdir)
    runner = Runner(args, bl, p)
    interrupted = False
    leftovers: list[str] = []
    try:
        say(f"building the lab (load average {load_start})")
        bl.up()
        say(f"lab {bl.prefix} up; gateway NAPI threads {bl.gw_napi} on core 0")
        for rnd in range(1, args.rounds + 1):
            for name in args.systems:
                runner.slot(rnd, name)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: tearing down")
    except Exception as exc:
        runner.errors.append(f"lab: {exc}")
        say(f"FAILED: {exc}")
        traceback.print_exc()
    finally:
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # teardown must not be cut short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            bl.down()
        except Exception as exc:
            runner.errors.append(f"teardown: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)
        leftovers = check_leftovers(bl.prefix)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    for what in leftovers:
        runner.errors.append(f"left behind: {what}")
    if interrupted:
        return 130
    res = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "rounds": args.rounds, "systems": args.systems, "params": dataclasses.asdict(p),
        "machine": machine_description(), "load_start": load_start, "load_end": loadavg(),
        "offloads": bl.settings, "runs": runner.runs, "fast_path": runner.fast_path, "errors": runner.errors,
        "elapsed_s": time.monotonic() - started,
    }
    res["machine"].pop("loadavg", None)
    doc = report.render(res, p, NOTES)
    print(doc)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{date}.md"
    out.write_text(doc)
    say(f"results written to {out}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    if not args.no_readme:
        rel = os.path.relpath(out, HERE)
        summary = (f"Latest full run: [{rel}]({rel}) ({res['date']}, load average {load_start} at start, "
                   f"{args.rounds} rounds x {p.seconds:g} s).\n\n### Systems\n\n"
                   f"{report.systems_table(res, report.metrics(p))}\n\n### Targets\n\n"
                   f"{report.targets_table(report.targets(res, report.metrics(p)))}\n")
        report.update_readme(HERE / "README.md", summary)
        say("bench/README.md updated")
    return 1 if runner.errors else 0


def check_leftovers(prefix: str) -> list[str]:
    from natd_lab import registry

    left = [f"namespace {ns}" for ns in registry.namespaces_of(prefix)]
    inst = Path("/run/natd/bpf") / prefix
    if inst.is_dir():
        with contextlib.suppress(OSError):
            inst.rmdir()  # natd --detach removes the pins and their layout directory, not the instance one
        if inst.exists():
            left.append(f"pins under {inst}: {sorted(os.listdir(inst))}")
    return left


if __name__ == "__main__":
    sys.exit(main())
