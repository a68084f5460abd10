"""The bench lab: topology, pinning, the bench's own XDP programs and C tools, and the four systems.

    lab = BenchLab(workdir)     # workdir: a temporary directory for the compiled tools
    lab.up()                    # lab, neighbours, GRO, qdisc, threaded NAPI pinned, sink attached
    sys = SYSTEMS["natd"](lab); sys.setup(); ...; sys.teardown()
    lab.down()                  # idempotent: systems, XDP, processes, namespaces

Core 0 is the gateway's: the NAPI threads of gw:in0 and gw:out0 (and natd's daemon). Core 1 gets
everything else: this process, every tool it starts (children inherit the affinity), and the NAPI
threads of cli:eth0 and srv:eth0 (the server's sink).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

from natd_lab import Lab, netops

from . import sysutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOPOLOGY = HERE / "topology.yaml"
GW_CPU, LOAD_CPU = 0, 1

CLI_ADDR, GW_IN_ADDR = "10.0.1.2", "10.0.1.1"
GW_OUT_ADDR, SRV_ADDR = "198.51.100.1", "198.51.100.2"
PRIVATE = "10.0.0.0/8"
XDP_FLAGS_DRV_MODE = 1 << 2
NFT_TABLE = "natd_bench"
# parse_only + one operation of natd's fast path each (bench/xdp_bench.c)
PROBES = ("probe_fib", "probe_lpm_lookup", "probe_ct_lookup", "probe_iface_lookup", "probe_ct_update",
          "probe_ktime", "probe_stats2", "probe_ct_insert")


class BenchError(RuntimeError):
    pass


class BenchLab:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.lab = Lab(TOPOLOGY)
        self.mac: dict[str, str] = {}
        self.ifindex: dict[str, int] = {}
        self.gw_napi: list[int] = []
        self.bpf: Any = None
        self.natbench = str(workdir / "natbench")
        self._xdp: list[tuple[str, str]] = []  # (node, ifname) with a bench program attached
        self._procs: list[subprocess.Popen[Any]] = []
        self.settings: dict[str, str] = {}

    @property
    def prefix(self) -> str:
        return str(self.lab.prefix)

    # ------------------------------------------------------------------------------------ build

    def up(self) -> None:
        os.sched_setaffinity(0, {LOAD_CPU})
        self._compile_tools()
        self.lab.up()
        for node, ifname in (("cli", "eth0"), ("gw", "in0"), ("gw", "out0"), ("srv", "eth0")):
            key = f"{node}:{ifname}"
            with netops.rtnl(self.lab.ns(node)) as ipr:
                idx = netops.link_index(ipr, self.lab.ns(node), ifname)
                self.ifindex[key] = idx
                self.mac[key] = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
        # PERMANENT neighbours: no ARP in the measurements, and natd's FIB lookups always find the MAC
        for node, ifname, addr, peer in (("cli", "eth0", GW_IN_ADDR, "gw:in0"),
                                         ("gw", "in0", CLI_ADDR, "cli:eth0"),
                                         ("gw", "out0", SRV_ADDR, "srv:eth0"),
                                         ("srv", "eth0", GW_OUT_ADDR, "gw:out0")):
            with netops.rtnl(self.lab.ns(node)) as ipr:
                ipr.neigh("replace", dst=addr, lladdr=self.mac[peer], state="permanent",
                          ifindex=self.ifindex[f"{node}:{ifname}"])
        # GRO on the gateway's veths too: it gives them a NAPI instance (the receive work then runs in
        # a NAPI thread we can pin, for every system alike) and is the kernel's default on a real NIC.
        for ifname in ("in0", "out0"):
            self.lab.exec("gw", ["ethtool", "-K", ifname, "gro", "on"])
        # closed-loop generator: veths apply back-pressure to a qdisc, the qdisc to the sender's socket
        self.lab.exec("cli", ["tc", "qdisc", "replace", "dev", "eth0", "root", "pfifo", "limit", "10000"])
        for node, ifname in (("cli", "eth0"), ("gw", "in0"), ("gw", "out0"), ("srv", "eth0")):
            self.lab.exec(node, ["sh", "-c", f"echo 1 > /sys/class/net/{ifname}/threaded"])
        self._compile_bpf()
        self.attach_xdp("srv", "eth0", "sink")
        self.pin_napi()
        self.settings = self._offload_settings()

    def _compile_tools(self) -> None:
        res = subprocess.run(["gcc", "-O2", "-Wall", "-o", self.natbench, str(HERE / "natbench.c")],
                             capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            raise BenchError(f"compiling bench/natbench.c failed (gcc and libc6-dev installed? make setup "
                             f"does):\n{res.stderr}")

    def _compile_bpf(self) -> None:
        from bcc import BPF  # type: ignore[import-not-found,unused-ignore]

        def macb(key: str) -> str:
            return ",".join(f"0x{b}" for b in self.mac[key].split(":"))

        cflags = [f"-I{REPO / 'ebpf' / 'lib'}", f"-DSRV_MAC={macb('srv:eth0')}",
                  f"-DOUT_MAC={macb('gw:out0')}", f"-DCLI_MAC={macb('cli:eth0')}",
                  f"-DIN_MAC={macb('gw:in0')}",
                  f"-DIN_IFINDEX={self.ifindex['gw:in0']}", f"-DOUT_IFINDEX={self.ifindex['gw:out0']}",
                  "-Wno-compare-distinct-pointer-types"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.bpf = BPF(src_file=str(HERE / "xdp_bench.c"), cflags=cflags)
            self.fns = {name: self.bpf.load_func(name, BPF.XDP)
                        for name in ("bare_in", "bare_out", "sink", "parse_only", "xdp_pass", "restore_call",
                                     "livegen", *PROBES)}

    def _offload_settings(self) -> dict[str, str]:
        short = {"tx-checksumming": "tx-csum", "tx-tcp-segmentation": "tso",
                 "generic-segmentation-offload": "gso", "generic-receive-offload": "gro",
                 "rx-udp-gro-forwarding": "udp-gro-fwd"}
        out = {}
        for node, ifname in (("cli", "eth0"), ("gw", "in0"), ("gw", "out0"), ("srv", "eth0")):
            feats = {}
            for line in self.lab.exec(node, ["ethtool", "-k", ifname]).stdout.splitlines():
                name, _, value = line.strip().partition(": ")
                feats[name] = value.split()[0] if value else ""
            out[f"{node}:{ifname}"] = " ".join(f"{v}={feats.get(k, '?')}" for k, v in short.items())
        return out

    # ------------------------------------------------------------------------------------ XDP, pinning

    def attach_xdp(self, node: str, ifname: str, fn: str) -> None:
        from bcc import BPF

        with sysutil.in_netns(self.lab.ns_path(node)):
            BPF.attach_xdp(ifname, self.fns[fn], XDP_FLAGS_DRV_MODE)
        self._xdp.append((node, ifname))

    def detach_xdp(self, node: str, ifname: str) -> None:
        from bcc import BPF

        if (node, ifname) in self._xdp:
            self._xdp.remove((node, ifname))
            with sysutil.in_netns(self.lab.ns_path(node)):
                BPF.remove_xdp(ifname, XDP_FLAGS_DRV_MODE)

    def pin_napi(self) -> None:
        """Pin the NAPI threads: the gateway's to GW_CPU, the endpoints' to LOAD_CPU (after XDP changes)."""
        gw = []
        where = (("gw:in0", GW_CPU), ("gw:out0", GW_CPU), ("cli:eth0", LOAD_CPU), ("srv:eth0", LOAD_CPU))
        for key, cpu in where:
            node = key.split(":")[0]
            napis = sysutil.napi_threads(self.lab.ns_path(node), self.ifindex[key])
            pids = [n.pid for n in napis if n.pid]
            if not pids:
                raise BenchError(f"{key} has no threaded NAPI instance (napis: {napis})")
            for pid in pids:
                os.sched_setaffinity(pid, {cpu})
                # Real-time priority for every NAPI thread: NAPI normally runs in softirq context, ahead of
                # every task, so the gateway's receive work is never queued behind other processes on its
                # core (on a shared machine: other people's), and the endpoints' receive work (the server's
                # sink, the client's replies) never falls behind the generator sharing core 1.
                os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(10))
            if node == "gw":
                gw += pids
        self.gw_napi = gw

    @staticmethod
    def pin_process(pid: int, cpu: int) -> None:
        """Every thread of pid to one CPU."""
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), {cpu})

    def sink_count(self) -> int:
        import ctypes

        return int(self.bpf["sink_count"].sum(ctypes.c_int(0)).value)

    # ------------------------------------------------------------------------------------ routes

    def srv_route(self, present: bool) -> None:
        """srv's route back to the private prefix: only while a system without NAT is measured."""
        from pyroute2.netlink.exceptions import NetlinkError

        ns = self.lab.ns("srv")
        with netops.rtnl(ns) as ipr:
            if present:
                ipr.route("replace", dst=PRIVATE, gateway=GW_OUT_ADDR)
            else:
                with contextlib.suppress(NetlinkError):  # ESRCH: not there
                    ipr.route("del", dst=PRIVATE, gateway=GW_OUT_ADDR)

    # ------------------------------------------------------------------------------------ processes

    def start(self, node: str, args: list[str], ready: bool = False) -> subprocess.Popen[str]:
        """A bench tool in node (on LOAD_CPU); ready=True waits for its 'ready' line."""
        proc: subprocess.Popen[str] = self.lab.popen(
            node, ["taskset", "-c", str(LOAD_CPU), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self._procs.append(proc)
        if ready:
            assert proc.stdout is not None
            line = _readline(proc, 10.0)
            if line.strip() != "ready":
                self.stop(proc)
                raise BenchError(f"{args[0]} {args[1] if len(args) > 1 else ''} in {node} did not start: "
                                 f"{line!r} {proc.stderr.read() if proc.stderr else ''}")
        return proc

    def stop(self, proc: subprocess.Popen[str], timeout: float = 5.0) -> tuple[str, str]:
        """SIGTERM (by PID) and collect its output; SIGKILL after timeout."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=5)
        if proc in self._procs:
            self._procs.remove(proc)
        return out or "", err or ""

    def wait(self, proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
        """Wait for a process to end by itself (SIGTERM, then SIGKILL, at timeout); its output."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = self.stop(proc)
        if proc in self._procs:
            self._procs.remove(proc)
        return out or "", err or ""

    def finish(self, proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        """Wait for a bounded tool to end by itself (SIGTERM at timeout) and parse its JSON line."""
        out, err = self.wait(proc, timeout)
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                result: dict[str, Any] = json.loads(line)
                return result
        raise BenchError(f"tool ended with {proc.returncode} and no result: {err.strip()[-500:]}")

    def tool(self, node: str, *args: object) -> subprocess.Popen[str]:
        return self.start(node, [self.natbench, *map(str, args)])

    # ------------------------------------------------------------------------------------ teardown

    def down(self) -> None:
        for proc in list(self._procs):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=3)
        for node, ifname in list(self._xdp):
            with contextlib.suppress(Exception):
                self.detach_xdp(node, ifname)
        if self.bpf is not None:
            with contextlib.suppress(Exception):
                self.bpf.cleanup()
            self.bpf = None
        self.lab.down()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


# ============================================================================================ systems


class System:
    name = ""
    label = ""

    def __init__(self, bl: BenchLab) -> None:
        self.bl = bl
        self.info: dict[str, Any] = {}

    def setup(self) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Empty the system's state table (between figures)."""

    def teardown(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        """Counters worth recording next to a figure (e.g. table size, drops)."""
        return {}

    def cpu_pids(self) -> list[int]:
        """Processes of the system itself whose CPU time is recorded (natd's daemon)."""
        return []


class KernelForwarding(System):
    name, label = "kernel-fwd", "kernel forwarding (no NAT)"

    def setup(self) -> None:
        self.bl.srv_route(True)

    def teardown(self) -> None:
        self.bl.srv_route(False)


class KernelNat(System):
    name, label = "kernel-nat", "kernel NAT (nftables masquerade + conntrack)"
    RULES = f"""table ip {NFT_TABLE} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "out0" masquerade
    }}
}}
"""

    def setup(self) -> None:
        self.bl.srv_route(False)
        self.bl.lab.exec("gw", ["nft", "-f", "-"], input=self.RULES)
        self.flush()

    def flush(self) -> None:
        self.bl.lab.exec("gw", ["conntrack", "-F"], check=False)

    def stats(self) -> dict[str, int]:
        res = self.bl.lab.exec("gw", ["conntrack", "-C"], check=False)
        return {"conntrack_entries": int(res.stdout.strip() or 0)} if res.returncode == 0 else {}

    def teardown(self) -> None:
        self.bl.lab.exec("gw", ["nft", "delete", "table", "ip", NFT_TABLE], check=False)
        self.flush()


class Natd(System):
    name, label = "natd", "natd (XDP)"
    CONFIG: ClassVar[dict[str, Any]] = {"inside": ["in0"], "outside": "out0", "snat": [{"from": PRIVATE}]}

    def __init__(self, bl: BenchLab) -> None:
        super().__init__(bl)
        self.natd: Any = None

    def setup(self) -> None:
        from natd_lab.natd import NatdInLab

        self.bl.srv_route(False)
        self.natd = NatdInLab(self.bl.lab, json.loads(json.dumps(self.CONFIG)))
        t0 = time.monotonic()
        self.natd.start(timeout=120)
        self.info["start_to_ready_s"] = time.monotonic() - t0
        pid = self.natd.proc.pid
        self.info["rss_ready_kib"] = sysutil.rss_kib(pid)
        self.info["rss_anon_ready_kib"] = sysutil.rss_kib(pid, "RssAnon")
        self.info["rss_file_ready_kib"] = sysutil.rss_kib(pid, "RssFile")
        BenchLab.pin_process(pid, GW_CPU)
        self.bl.pin_napi()

    @property
    def pid(self) -> int:
        return int(self.natd.proc.pid)

    @property
    def pin_dir(self) -> str:
        from natd.maps import LAYOUT_VERSION
        from natd.tables import pin_dir

        return pin_dir(self.natd.pin_root, self.natd.instance, LAYOUT_VERSION)

    def tables(self) -> Any:
        from natd.tables import PinnedTables

        return PinnedTables(self.pin_dir)

    def flush(self) -> None:
        tables = self.tables()
        try:
            flows = tables.flows()
            if flows:
                tables.delete_flows(flows)
            orphans = [k for k, _ in tables.reply_index()]
            if orphans:
                tables.delete_replies(orphans)
        finally:
            tables.close()

    def stats(self) -> dict[str, int]:
        from natd.tables import sum_stats

        tables = self.tables()
        try:
            totals = sum_stats(tables.stats_per_cpu())
            out = {s.name.lower(): p for s, (p, _b) in totals.items() if p}
            out["conntrack_entries"] = len(tables.flows())
        finally:
            tables.close()
        return out

    def cpu_pids(self) -> list[int]:
        return [self.pid]

    def teardown(self) -> None:
        if self.natd is not None:
            if self.natd.proc is not None and self.natd.proc.poll() is None:
                self.info["rss_end_kib"] = sysutil.rss_kib(self.pid)
                self.info["rss_peak_kib"] = sysutil.rss_kib(self.pid, "VmHWM")
            self.natd.close()  # SIGTERM by PID, natd --detach (pins removed), temp files removed
            self.natd = None


class BareXdp(System):
    name, label = "xdp-bare", "bare XDP redirect (the limit)"

    def setup(self) -> None:
        self.bl.srv_route(True)
        self.bl.attach_xdp("gw", "in0", "bare_in")
        self.bl.attach_xdp("gw", "out0", "bare_out")
        self.bl.pin_napi()

    def teardown(self) -> None:
        self.bl.detach_xdp("gw", "in0")
        self.bl.detach_xdp("gw", "out0")
        self.bl.srv_route(False)


SYSTEMS: dict[str, type[System]] = {s.name: s for s in (KernelForwarding, KernelNat, Natd, BareXdp)}


def machine_description() -> dict[str, str]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    model = next((line.split(":", 1)[1].strip() for line in read("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), "?")
    mem = next((line.split(":", 1)[1].strip() for line in read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), "?")
    virt = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True, check=False).stdout.strip()
    os_name = next((line.split("=", 1)[1].strip('"') for line in read("/etc/os-release").splitlines()
                    if line.startswith("PRETTY_NAME=")), "?")
    return {"kernel": os.uname().release, "cpu": f"{model} x {os.cpu_count()}", "memory": mem,
            "systemd-detect-virt": virt or "?", "os": os_name, "python": sys.version.split()[0],
            "loadavg": read("/proc/loadavg").strip()}
