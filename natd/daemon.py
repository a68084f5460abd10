"""natd, the daemon: validate the config, load and attach the XDP program, fill the rule maps, then
serve: reap expired flows, export metrics, reload on SIGHUP, speak sd_notify.

Restarts are hitless: on SIGTERM the daemon exits but leaves the XDP program attached and its maps
pinned, so established flows keep being translated while no daemon runs (only reaping and metrics
pause), and the next start re-attaches over the same state. Detaching on exit would instead hand those
flows' packets to the kernel, which answers them with RSTs. `natd --detach` is the real uninstall
(program off the interfaces, pins removed); `--detach-on-exit` makes SIGTERM detach as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from natd import __version__
from natd.config import Config, Timeouts, load_config
from natd.errors import ConfigError, EnvironmentError_, NatdError
from natd.events import EventPump
from natd.linkwatch import LinkState, LinkWatcher
from natd.loader import Datapath, check_pinned_layout, ensure_bpffs, remove_pins
from natd.maps import LAYOUT_VERSION
from natd.metrics import NatdCollector, ReaperStatus, start_metrics_server
from natd.netlink import Interfaces
from natd.reaper import ReaperThread, SweepResult
from natd.rules import RuleSet, build_ruleset, check_local_port_range
from natd.sdnotify import Notifier
from natd.status import status_path, write_status
from natd.sysctl import enable_accept_local, read_local_port_range
from natd.tables import PinnedTables, pin_dir

log = logging.getLogger("natd")

REAP_INTERVAL_MAX_S = 5.0
REAP_INTERVAL_MIN_S = 0.5


def reap_interval(timeouts: Timeouts) -> float:
    """A quarter of the shortest timeout, within [0.5 s, 5 s]: a flow outlives its timeout by at most that
    much, and tables with second-long test timeouts still get swept in time."""
    shortest = min(int(v) for v in timeouts.model_dump().values())
    return max(REAP_INTERVAL_MIN_S, min(REAP_INTERVAL_MAX_S, shortest / 4))


def setup_logging(level: str) -> None:
    """One line per event on stderr, no colours: journald adds time and unit itself."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def require_privileges(proc: str = "/proc") -> None:
    if os.geteuid() != 0:
        raise EnvironmentError_("natd needs root (bpf(), XDP attach, netlink); run it as root or via systemd")
    # a kernel-wide sysctl (net.core.* ones are invisible in a network namespace)
    if not os.path.exists(f"{proc}/sys/kernel/unprivileged_bpf_disabled"):
        raise EnvironmentError_("this kernel has no bpf() syscall (kernel.unprivileged_bpf_disabled "
                                "missing); natd needs a kernel with CONFIG_BPF_SYSCALL and XDP")


class Daemon:
    def __init__(self, config_path: str, config: Config, *, notifier: Notifier | None = None,
                 proc: str = "/proc", clock: Callable[[], int] = time.monotonic_ns,
                 status_file: str | None = None) -> None:
        self.config_path = config_path
        self.config = config
        self.notifier = notifier or Notifier()
        self.proc = proc
        self.clock = clock
        self.pin_dir = pin_dir(config.state.pin_root, config.instance, LAYOUT_VERSION)
        self.datapath: Datapath | None = None
        self.tables: PinnedTables | None = None
        self.reaper: ReaperThread | None = None
        self.reaper_status = ReaperStatus()
        self.events: EventPump | None = None  # NAT event log and natctl -E (natd.events)
        self.metrics_server: object | None = None
        self.ready = False
        self.rules: RuleSet | None = None
        self.links: LinkWatcher | None = None
        self.link_states: dict[str, str] = {}
        self.status_file = status_file or status_path(config.instance)
        self.started_at = time.time()
        self._rules_lock = threading.Lock()  # reloads (main thread) and link events (watcher thread)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = threading.Event()  # set by either: the main loop acts at once, not at its next tick

    # -- start-up -------------------------------------------------------------------------------
    def ruleset(self, config: Config, links: Interfaces) -> RuleSet:
        for name in [*config.inside, config.outside]:
            links.ifindex(name)
        outside_addrs = links.ipv4_addrs(config.outside)
        rules = build_ruleset(config, outside_addrs[0] if outside_addrs else None,
                              [links.ifindex(config.outside)])
        check_local_port_range(rules, read_local_port_range(self.proc), links.ipv4_addrs())
        return rules

    def start(self) -> None:
        cfg = self.config
        for warning in cfg.conntrack.timeouts.below_rfc_minimums():
            log.warning("%s", warning)
        links = Interfaces()
        try:
            rules = self.ruleset(cfg, links)
        finally:
            links.close()
        ensure_bpffs(cfg.state.pin_root, f"{self.proc}/self/mountinfo")
        reused = check_pinned_layout(self.pin_dir, cfg.conntrack.max)
        t0 = time.monotonic()
        self.notifier.status("compiling the XDP program")
        self.datapath = Datapath.load(self.pin_dir, cfg.conntrack.max)
        self.tables = PinnedTables(self.pin_dir)
        self.tables.apply_rules(rules)
        if self.tables.ensure_nat_secret():
            log.info("new port-choice key for endpoint-independent mappings (kept in %s)", self.pin_dir)
        self.rules = rules
        for ifname in cfg.inside:
            enable_accept_local(ifname, self.proc)
            self.datapath.attach(ifname, "xdp_inside")
        self.datapath.attach(cfg.outside, "xdp_outside")
        self.link_states = {name: "attached" for name in [*cfg.inside, cfg.outside]}
        self.links = LinkWatcher({*cfg.inside, cfg.outside}, self._on_link)
        self.links.start()
        log.info("attached: inside %s, outside %s; %s pinned state in %s (%.1f s)", ",".join(cfg.inside),
                 cfg.outside, "reusing" if reused else "new", self.pin_dir, time.monotonic() - t0)
        self.events = self._start_events()
        self.reaper = ReaperThread(self.tables, cfg.conntrack.timeouts,
                                   interval=reap_interval(cfg.conntrack.timeouts),
                                   clock=self.clock, on_sweep=self._on_sweep,
                                   on_delete=self.events.on_delete if self.events is not None else None)
        self.reaper.start()
        if cfg.metrics.enabled:
            collector = NatdCollector(self.tables, cfg, self.reaper_status, events=self.events)
            self.metrics_server, _ = start_metrics_server(collector, cfg.metrics.host, cfg.metrics.port)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, cfg.metrics.port)
        self.ready = True
        self.write_status()
        self.notifier.ready(f"translating: {len(rules.snat)} snat rules, "
                            f"{len(rules.pool)} external addresses")

    def _on_sweep(self, result: SweepResult) -> None:
        self.reaper_status.update(result, time.time())
        self.write_status()

    # -- NAT events: the event log, natctl -E (natd.events) -------------------------------------------
    def _start_events(self) -> EventPump | None:
        """The event pump runs whenever natd does (natctl -E needs it); without an event log a failure to
        start it only costs natctl -E, with one it fails the start."""
        assert self.tables is not None
        try:
            pump = EventPump.open(self.pin_dir, self.tables, self.config.log, self.config.instance)
        except NatdError as exc:
            if self.config.log.events is not None:
                raise
            log.warning("NAT events unavailable (natctl -E will not work): %s", exc)
            return None
        pump.start()
        if self.config.log.events is not None:
            log.info("NAT event log: %s%s", self.config.log.events,
                     " (with destinations)" if self.config.log.log_destinations else "")
        return pump

    def _stop_events(self) -> None:
        """After the reaper: its last DESTROY events are written before the pump ends."""
        if self.events is not None:
            self.events.stop()
            self.events.join(timeout=10)

    # -- interfaces coming and going ------------------------------------------------------------------
    def _on_link(self, state: LinkState) -> None:
        """Keep serving the other interfaces when one vanishes; re-attach when it is back."""
        assert self.datapath is not None
        cfg = self.config
        role = "outside" if state.name == cfg.outside else "inside"
        if state.ifindex is None:
            self.datapath.attached.pop(state.name, None)
            self.link_states[state.name] = "missing"
            log.warning("%s interface %s was deleted (its XDP program went with it); serving the others, "
                        "natd re-attaches when %s is back", role, state.name, state.name)
        elif not state.xdp_attached:
            self.datapath.attach(state.name, "xdp_outside" if role == "outside" else "xdp_inside")
            if role == "inside":
                enable_accept_local(state.name, self.proc)
            else:
                with self._rules_lock:  # a re-created outside interface has a new ifindex
                    assert self.rules is not None and self.tables is not None
                    self.rules = dataclasses.replace(self.rules, outside_ifindexes=frozenset({state.ifindex}))
                    self.tables.apply_rules(self.rules)
            self.link_states[state.name] = "attached" if state.up else "attached, down"
            log.warning("%s interface %s is back (ifindex %d); XDP program re-attached", role, state.name,
                        state.ifindex)
        else:
            self.link_states[state.name] = "attached" if state.up else "attached, down"
            log.warning("%s interface %s is %s", role, state.name, "up" if state.up else "down")
        self.write_status()

    def write_status(self) -> None:
        """The daemon's view for `natctl status` (best effort: a read-only /run must not stop natd)."""
        snap = self.reaper_status.snapshot()
        data = {
            "pid": os.getpid(),
            "started": self.started_at,
            "updated": time.time(),
            "config": self.config_path,
            "config_digest": self.config.digest(),
            "pin_dir": self.pin_dir,
            "inside": list(self.config.inside),
            "outside": self.config.outside,
            "interfaces": dict(self.link_states),
            "reaper": {"sweeps": snap.sweeps, "last_success": snap.last_success_unixtime,
                       "last_duration_seconds": snap.last_duration_seconds, "entries": snap.entries,
                       "idle_timeouts_total": snap.idle_timeouts_total},
        }
        try:
            write_status(self.status_file, data)
        except OSError as exc:
            log.debug("cannot write %s: %s", self.status_file, exc)

    # -- reload ---------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config; apply it only if it is valid and changes nothing restart-only."""
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            blocked = self.config.changes_needing_restart(new)
            if new.metrics != self.config.metrics:
                blocked.append("metrics")
            if blocked:
                raise ConfigError(f"{', '.join(blocked)} cannot change on reload (restart natd to apply); "
                                  "the running config stays", source=self.config_path, key=blocked[0])
            links = Interfaces()
            try:
                rules = self.ruleset(new, links)
            finally:
                links.close()
            assert self.tables is not None and self.reaper is not None
            with self._rules_lock:
                self.tables.apply_rules(rules)
                self.rules = rules
            self.reaper.set_timeouts(new.conntrack.timeouts)
        except NatdError as exc:
            log.error("reload rejected, the running config stays: %s", exc)
            if self.events is not None:
                self.events.reconfigure(self.config.log)  # reopen the event log anyway (logrotate)
            self.notifier.ready(f"reload rejected: {exc}")
            return False
        self.config = new
        if self.events is not None:
            self.events.reconfigure(new.log)  # reopens the event log (logrotate), or switches it
        self.write_status()
        log.info("reloaded %s (digest %s)", self.config_path, new.digest()[:12])
        self.notifier.ready(f"reloaded: {len(rules.snat)} snat rules")
        return True

    # -- run / stop -----------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self, *_: object) -> None:
        self._reload.set()
        self._wake.set()

    def serve(self) -> None:
        interval = self.notifier.watchdog_interval()
        tick = min(interval, 1.0) if interval else 1.0
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop.is_set():
                break
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if interval:
                self.notifier.watchdog()

    def stop(self, detach: bool = False) -> None:
        self.notifier.stopping()
        if self.links is not None:
            self.links.stop()
            self.links.join(timeout=5)
        if self.reaper is not None:
            self.reaper.stop()
            self.reaper.join(timeout=10)
        self._stop_events()
        if self.metrics_server is not None:
            for method in ("shutdown", "server_close"):  # close too, or the port stays bound
                call = getattr(self.metrics_server, method, None)
                if call:
                    call()
        if self.datapath is not None and detach:
            self.datapath.detach_all()
            log.info("detached; flows stay pinned in %s", self.pin_dir)
        elif self.datapath is not None:
            log.info("exiting; the XDP program stays attached and keeps translating (%s); "
                     "'natd --detach' removes it", ", ".join(self.datapath.attached))
        if self.tables is not None:
            self.tables.close()


def uninstall(config: Config) -> int:
    """--detach: remove natd's program from the configured interfaces and unpin its maps."""
    from natd.loader import XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE

    try:
        from bcc import BPF  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise EnvironmentError_("python module bcc not found (make setup installs python3-bpfcc)") from exc
    for ifname in [*config.inside, config.outside]:
        for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            try:
                BPF.remove_xdp(ifname, flags)
            except Exception as exc:
                log.debug("remove_xdp %s flags %d: %s", ifname, flags, exc)
    where = pin_dir(config.state.pin_root, config.instance, LAYOUT_VERSION)
    removed = remove_pins(where)
    log.info("detached from %s; removed %d pinned maps from %s",
             ", ".join([*config.inside, config.outside]), len(removed), where)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="natd",
        description="XDP NAT gateway daemon: SNAT/masquerade with conntrack in eBPF.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  natd --config /etc/natd/natd.yaml            run in the foreground (systemd: Type=notify)
  natd --check-config /etc/natd/natd.yaml      validate only; exit 0 (ok) or 1 (error with file:line: key)
  natd --detach --config /etc/natd/natd.yaml   uninstall: detach the program, unpin maps (drops all flows)
  ip netns exec gw natd --config lab.yaml      run inside a gateway namespace
signals: SIGHUP reloads the config (a bad one is rejected, the old one keeps running);
         SIGTERM/SIGINT end the daemon; the XDP program stays attached and keeps translating
         (a restart is hitless); --detach-on-exit detaches it too, natd --detach uninstalls.""")
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML config (see docs/config.md)")
    parser.add_argument("--check-config", metavar="FILE", help="validate FILE and exit")
    parser.add_argument("--detach", action="store_true", help="detach and remove pinned state, then exit")
    parser.add_argument("--detach-on-exit", action="store_true",
                        help="on SIGTERM/SIGINT also detach the program (established flows then break)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="overrides log.level of the config")
    parser.add_argument("--version", action="version", version=f"natd {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "info")
    if args.check_config:
        try:
            cfg = load_config(args.check_config)
        except NatdError as exc:
            print(f"natd: {exc}", file=sys.stderr)
            return 1
        print(f"{args.check_config}: OK (instance {cfg.instance}, {len(cfg.snat)} snat rules)")
        return 0
    if not args.config:
        parser.error("--config FILE is required (or --check-config FILE)")
    daemon: Daemon | None = None
    try:
        cfg = load_config(args.config)
        setup_logging(args.log_level or cfg.log.level)
        require_privileges()
        if args.detach:
            return uninstall(cfg)
        daemon = Daemon(args.config, cfg)

        def on_term(signum: int, frame: FrameType | None) -> None:
            assert daemon is not None
            daemon.request_stop()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            assert daemon is not None
            daemon.request_reload()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)
        daemon.start()
        daemon.serve()
        return 0
    except NatdError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if daemon is not None:
            # a start that failed half way takes back what it attached
            daemon.stop(detach=args.detach_on_exit or not daemon.ready)


if __name__ == "__main__":
    sys.exit(main())
