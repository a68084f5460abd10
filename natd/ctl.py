"""natctl: natd's conntrack(8). Lists, counts and deletes flows, shows counters and status.

Reads natd's pinned maps (<pin_root>/<instance>/v<layout>) directly, so it works while natd is down and
needs nothing compiled. The commands are plain functions of a :class:`~natd.tables.Tables` and a clock
(``now_ns``), unit-tested on FakeTables; :func:`run` parses the command line and opens the pinned maps,
:func:`main` is the console script.

Output follows conntrack: flows one per line in its ``-L`` format (natd.fmt), the summary line
("... N flow entries have been shown.") on stderr, ``-C`` a bare number, ``-S`` one row per CPU.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import ipaddress
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from natd import __version__
from natd.config import Config, Timeouts, load_config
from natd.errors import NatdError, StateError
from natd.events import conntrack_line, destroy_events, event_json, parse_event, socket_path
from natd.fmt import (
    TimeoutPolicy,
    flow_json,
    flow_tuples,
    format_flow,
    format_mapping,
    ip_str,
    mapping_json,
    seconds_left,
)
from natd.maps import LAYOUT_VERSION, PROTO_NAMES, PROTO_NUMBERS, PROTO_TCP, CtEntry, CtKey, CtState, Stat
from natd.metrics import read_port_ranges
from natd.status import pid_alive, read_status, status_path
from natd.tables import (
    Flow,
    PinnedTables,
    StatTotals,
    Tables,
    flow_mapping_keys,
    hosts_of,
    pin_dir,
    sum_stats,
)

__all__ = [
    "BANNER",
    "DEFAULT_CONFIG",
    "DEFAULT_INSTANCE",
    "DEFAULT_PIN_ROOT",
    "FlowFilter",
    "InterfaceInfo",
    "PinInfo",
    "Settings",
    "SnatRuleInfo",
    "build_parser",
    "connect_events",
    "conntrack_stats",
    "count_flows",
    "delete_flows",
    "flush_flows",
    "follow_events",
    "list_flows",
    "main",
    "notify_destroyed",
    "open_pinned",
    "read_pin_info",
    "run",
    "show_stats",
    "show_status",
]

PROG = "natctl"
BANNER = f"{PROG} v{__version__} (natd)"
DEFAULT_INSTANCE = "default"
DEFAULT_PIN_ROOT = "/sys/fs/bpf/natd"
DEFAULT_CONFIG = "/etc/natd/natd.yaml"
CHUNK = 4096  # lines per write

NowNs = Callable[[], int]

# conntrack -S columns, in conntrack's order, and what natd counts for each (help text says the same).
STATS_COLUMNS = ("found", "invalid", "insert", "insert_failed", "drop", "early_drop", "error",
                 "search_restart", "clash_resolve", "chaintoolong")

EPILOG = f"""\
examples:
  natctl -L                               list every flow, conntrack -L style
  natctl -L -p tcp --state ESTABLISHED    established TCP flows only
  natctl -L -s 10.0.1.42 -o json          one inside host's flows as JSON, one object per line
  natctl -L -q 203.0.113.1 --reply-port-dst 20001
                                          which flow holds external port 20001 of 203.0.113.1
  natctl -M -s 10.0.1.42                  one host's NAT mappings: inside ip:port -> external ip:port,
                                          flows using each, ports the host holds (max_ports_per_host)
  natctl -C                               count flows
  natctl -S                               per-CPU counters, conntrack -S style
  natctl -D -s 10.0.1.42                  delete one host's flows (frees their external ports)
  natctl -F                               delete every flow
  natctl -E                               follow flow events live (NEW, DESTROY), conntrack -E style
  natctl -E -o json -s 10.0.1.42          one inside host's events as JSON lines
  natctl status                           pin dir, table fill, counters, interfaces, rules
  natctl --config /etc/natd/natd.yaml -L  instance, pin root and timeouts from natd's config

settings: without --config, {DEFAULT_CONFIG} is read when it exists (else instance '{DEFAULT_INSTANCE}',
  pin root {DEFAULT_PIN_ROOT}, default timeouts); --instance and --pin-root override the config.
  The timeout column is computed from the config's timeouts: pass natd's config for exact values.

filters: -s/-d/-q take an address or a network (10.0.1.0/24); --sport/--dport/--state match the original
  direction, -q/--reply-port-dst the external address/port. For ICMP echo, --sport is the identifier.
  UDP and ICMP flows have no state, so --state matches TCP flows only (and not with -E).

-E: natd publishes every NEW (flow created by the datapath) and DESTROY (flow deleted: idle timeout, -D,
  -F) on its event socket, /run/natd/events/<instance>.sock; natctl -E prints them until Ctrl-C (exit 0).
  It needs natd running (its event log need not be on); -D and -F tell natd what they deleted, so its
  event log has those DESTROY events too.

-S columns (conntrack's names, natd's counters, per CPU):
  found          packets that matched an existing flow: SNAT_OUT + DNAT_IN - CT_NEW
  invalid        packets natd could not track: DROP_MALFORMED + DROP_UNSUPPORTED + DROP_NO_MAPPING
  insert         flows created: CT_NEW
  insert_failed  no free external port for a new flow: DROP_PORT_EXHAUSTED
  drop           new flows refused because the table is full: DROP_TABLE_FULL
  clash_resolve  another CPU created the same flow first: CT_CREATE_RACE
  early_drop, error, search_restart, chaintoolong: always 0 (natd never evicts; no such events)

exit status: 0 ok, 1 error (or -D matched nothing), 2 bad usage."""


# --- settings -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Where natd's state is and how to read it."""

    instance: str = DEFAULT_INSTANCE
    pin_root: str = DEFAULT_PIN_ROOT
    timeouts: TimeoutPolicy = dataclasses.field(default_factory=Timeouts)
    config: Config | None = None

    @property
    def pin_dir(self) -> str:
        return pin_dir(self.pin_root, self.instance, LAYOUT_VERSION)


def resolve_settings(args: argparse.Namespace, default_config: str | None, err: TextIO) -> Settings:
    """Config file (explicit, or the default one when it exists) first, then --instance/--pin-root."""
    config: Config | None = None
    if args.config:
        config = load_config(args.config)
    elif default_config and os.path.exists(default_config):
        try:
            config = load_config(default_config)
        except NatdError as exc:
            print(f"{PROG}: warning: ignoring {default_config}: {exc}", file=err)
    base = Settings() if config is None else Settings(config.instance, config.state.pin_root,
                                                      config.conntrack.timeouts, config)
    return dataclasses.replace(base, instance=args.instance or base.instance,
                               pin_root=args.pin_root or base.pin_root)


def open_pinned(settings: Settings) -> PinnedTables:
    """The pinned maps of the instance, with errors that say what to check."""
    directory = settings.pin_dir
    try:
        os.stat(directory)
    except PermissionError:
        raise StateError(f"cannot read {directory}: permission denied; natctl needs root") from None
    except FileNotFoundError:
        raise StateError(_no_state_message(settings)) from None
    return PinnedTables(directory)


def _no_state_message(settings: Settings) -> str:
    parent = os.path.dirname(settings.pin_dir)
    try:
        layouts = sorted(n for n in os.listdir(parent) if n.startswith("v") and n != f"v{LAYOUT_VERSION}")
    except OSError:
        layouts = []
    if layouts:
        return (f"{parent} holds natd state of map layout {', '.join(layouts)}, this natctl reads "
                f"v{LAYOUT_VERSION}; use the natctl of the natd version that is running")
    return (f"no natd state in {settings.pin_dir}: is natd running with instance '{settings.instance}' "
            f"and pin_root {settings.pin_root}? Pass --instance/--pin-root, or --config with natd's config")


# --- filters --------------------------------------------------------------------------------------------


def _host_int(be32: int) -> int:
    """An address as stored in the maps -> the integer ipaddress uses (host order)."""
    return int.from_bytes(be32.to_bytes(4, "little"), "big")


def _be16(port: int) -> int:
    return ((port & 0xFF) << 8) | (port >> 8)


@dataclass(frozen=True)
class FlowFilter:
    """conntrack-style flow filters; fields left None match everything."""

    proto: int | None = None
    orig_src: ipaddress.IPv4Network | None = None
    orig_dst: ipaddress.IPv4Network | None = None
    sport: int | None = None
    dport: int | None = None
    reply_dst: ipaddress.IPv4Network | None = None  # the external address
    reply_port_dst: int | None = None  # the external port (ICMP: identifier)
    state: CtState | None = None  # TCP only

    @property
    def active(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def matches(self, key: CtKey, entry: CtEntry) -> bool:
        if self.proto is not None and key.proto != self.proto:
            return False
        if self.state is not None and (key.proto != PROTO_TCP or entry.state != self.state):
            return False
        (osrc, odst, osport, odport), (_, rdst, _, rdport) = flow_tuples(key, entry)
        if self.sport is not None and osport != _be16(self.sport):
            return False
        if self.dport is not None and odport != _be16(self.dport):
            return False
        if self.reply_port_dst is not None and rdport != _be16(self.reply_port_dst):
            return False
        return _in_net(osrc, self.orig_src) and _in_net(odst, self.orig_dst) and _in_net(rdst, self.reply_dst)

    def select(self, flows: Sequence[Flow]) -> Sequence[Flow]:
        if not self.active:
            return flows
        return [(k, e) for k, e in flows if self.matches(k, e)]


def _in_net(be32: int, net: ipaddress.IPv4Network | None) -> bool:
    if net is None:
        return True
    return (_host_int(be32) & int(net.netmask)) == int(net.network_address)


# --- commands -------------------------------------------------------------------------------------------


def _write_lines(lines: Iterable[str], out: TextIO) -> None:
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= CHUNK:
            out.write("\n".join(batch) + "\n")
            batch.clear()
    if batch:
        out.write("\n".join(batch) + "\n")


def _flow_lines(flows: Sequence[Flow], timeouts: TimeoutPolicy, now_ns: int, output: str) -> Iterable[str]:
    for key, entry in flows:
        left = seconds_left(key, entry, timeouts, now_ns)
        if output == "json":
            yield json.dumps(flow_json(key, entry, left, now_ns), separators=(",", ":"))
        else:
            yield format_flow(key, entry, left)


def list_flows(tables: Tables, flt: FlowFilter, timeouts: TimeoutPolicy, now_ns: NowNs, output: str,
               out: TextIO, err: TextIO) -> int:
    """-L: matching flows on ``out``, the conntrack summary line on ``err``. Always 0."""
    flows = flt.select(tables.flows())
    _write_lines(_flow_lines(flows, timeouts, now_ns(), output), out)
    out.flush()
    print(f"{BANNER}: {len(flows)} flow entries have been shown.", file=err)
    return 0


def list_mappings(tables: Tables, flt: FlowFilter, output: str, out: TextIO, err: TextIO) -> int:
    """-M: the NAT mappings the filters match (-p, -s, --sport, -q, --reply-port-dst), each with the number
    of flows using it and the mappings its inside address holds. Always 0."""
    table = tables.mapping_table()
    flows = flow_mapping_keys(tables.flow_table())
    uses = collections.Counter(bytes(k) for k in flows.view("V16"))
    hosts = hosts_of(table)  # what max_ports_per_host counts, from the same read
    shown = 0
    for key, mapping in table.pairs():
        as_flow = CtEntry(nat_addr=mapping.ext_addr, nat_port=mapping.ext_port)
        if not flt.matches(key, as_flow):
            continue
        n, held = uses.get(key.to_bytes(), 0), hosts.get(key.saddr, 0)
        line = (json.dumps(mapping_json(key, mapping, n, held)) if output == "json"
                else format_mapping(key, mapping, n, held))
        print(line, file=out)
        shown += 1
    out.flush()
    print(f"{BANNER}: {shown} mappings have been shown.", file=err)
    return 0


def count_flows(tables: Tables, flt: FlowFilter, out: TextIO) -> int:
    """-C: the number of (matching) flows, bare."""
    print(len(flt.select(tables.flows())), file=out)
    return 0


OnDeleted = Callable[[Sequence[Flow]], None]


def delete_flows(tables: Tables, flt: FlowFilter, timeouts: TimeoutPolicy, now_ns: NowNs, output: str,
                 out: TextIO, err: TextIO, on_deleted: OnDeleted | None = None) -> int:
    """-D: delete matching flows (both halves: the external port is free again), print each like -L.
    1 when nothing matched. ``on_deleted`` gets the flows (natd's event log: :func:`notify_destroyed`)."""
    flows = flt.select(tables.flows())
    deleted = tables.delete_flows(flows) if flows else 0
    if deleted and on_deleted is not None:
        on_deleted(flows)
    _write_lines(_flow_lines(flows, timeouts, now_ns(), output), out)
    out.flush()
    print(f"{BANNER}: {deleted} flow entries have been deleted.", file=err)
    return 0 if deleted else 1


def flush_flows(tables: Tables, err: TextIO, on_deleted: OnDeleted | None = None) -> int:
    """-F: delete every flow, both halves. Orphaned reply halves are left to the reaper: deleting a
    reply whose flow is being created right now would break that flow."""
    flows = tables.flows()
    deleted = tables.delete_flows(flows)
    if deleted and on_deleted is not None:
        on_deleted(flows)
    print(f"{BANNER}: connection tracking table has been emptied ({deleted} flow entries deleted).",
          file=err)
    return 0


def conntrack_stats(cpu: StatTotals) -> dict[str, int]:
    """One CPU's counters under conntrack -S names (mapping in the --help text)."""
    def p(stat: Stat) -> int:
        return cpu.get(stat, (0, 0))[0]

    found = p(Stat.SNAT_OUT) + p(Stat.DNAT_IN) - p(Stat.CT_NEW)
    return {
        "found": max(0, found),
        "invalid": p(Stat.DROP_MALFORMED) + p(Stat.DROP_UNSUPPORTED) + p(Stat.DROP_NO_MAPPING),
        "insert": p(Stat.CT_NEW),
        "insert_failed": p(Stat.DROP_PORT_EXHAUSTED),
        "drop": p(Stat.DROP_TABLE_FULL),
        "early_drop": 0,
        "error": 0,
        "search_restart": 0,
        "clash_resolve": p(Stat.CT_CREATE_RACE),
        "chaintoolong": 0,
    }


def show_stats(tables: Tables, output: str, out: TextIO) -> int:
    """-S: one row per CPU, ``cpu=0   <TAB>found=... chaintoolong=0 `` exactly like conntrack -S."""
    for cpu, totals in enumerate(tables.stats_per_cpu()):
        row = conntrack_stats(totals)
        if output == "json":
            print(json.dumps({"cpu": cpu, **row}, separators=(",", ":")), file=out)
        else:
            fields = " ".join(f"{name}={row[name]}" for name in STATS_COLUMNS)
            print(f"cpu={cpu:<4}\t{fields} ", file=out)
    return 0


# --- events (-E), and telling natd what -D/-F deleted ---------------------------------------------------

EVENT_SOCKET_TIMEOUT_S = 10.0  # for -D/-F's notification: natd reads its socket every 0.1 s


def connect_events(settings: Settings) -> socket.socket:
    """A connection to natd's event socket (natd.events.socket_path), with errors that say what to check."""
    path = socket_path(settings.instance)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        if isinstance(exc, PermissionError):
            raise StateError(f"cannot connect to natd's event socket {path}: permission denied; natctl -E "
                             "needs root") from None
        raise StateError(f"no natd event socket at {path} ({exc.strerror or exc}): is natd running with "
                         f"instance '{settings.instance}'? Pass --instance or --config with natd's config "
                         "(natd logs why when it cannot create the socket)") from None
    return sock


def follow_events(sock: socket.socket, flt: FlowFilter, output: str, out: TextIO, err: TextIO) -> int:
    """-E: print natd's events as they happen, conntrack -E style or (-o json) as natd's JSON lines,
    until Ctrl-C (0) or natd closes the stream (1)."""
    shown = 0
    try:
        with sock, sock.makefile("rb") as stream:
            sock.sendall(b'{"subscribe":true}\n')
            for raw in stream:
                line = raw.strip()
                if not line:
                    continue
                if line.startswith(b'{"event":"LOST"'):
                    count = json.loads(line).get("count", "?")
                    print(f"{PROG}: warning: {count} events were not shown: natctl -E fell behind",
                          file=err)
                    continue
                try:
                    event = parse_event(line)
                except ValueError as exc:
                    print(f"{PROG}: warning: skipping an event natd sent: {exc}", file=err)
                    continue
                if flt.active and not flt.matches(*event.flow()):
                    continue
                out.write((line.decode() if output == "json" else conntrack_line(event)) + "\n")
                out.flush()
                shown += 1
    except KeyboardInterrupt:
        print(f"{BANNER}: {shown} flow events have been shown.", file=err)
        return 0
    except OSError as exc:
        raise StateError(f"reading natd's events: {exc.strerror or exc}") from None
    print(f"{PROG}: natd closed the event stream (it stopped); {shown} flow events have been shown",
          file=err)
    return 1


def notify_destroyed(settings: Settings, flows: Sequence[Flow], reason: str, err: TextIO,
                     connect: Callable[[Settings], socket.socket] = connect_events) -> None:
    """Send natd DESTROY events for flows natctl deleted (reason "delete" or "flush"): natd logs and
    publishes them like its own. Best effort: when natd is not there, a warning (if its config has an
    event log), never a failure of the deletion, which is done."""
    if not flows:
        return
    lines = [event_json(ev, True) for ev in destroy_events(flows, time.time_ns(), reason)]
    try:
        with connect(settings) as sock:
            sock.settimeout(EVENT_SOCKET_TIMEOUT_S)
            sock.sendall(("\n".join(lines) + "\n").encode())
    except (NatdError, OSError) as exc:
        config = settings.config
        if config is not None and config.log.events is not None:
            print(f"{PROG}: warning: natd did not get the {len(lines)} deleted flows, so its event log "
                  f"({config.log.events}) has no DESTROY events for them: {exc}", file=err)


# --- status ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InterfaceInfo:
    name: str
    role: str  # "inside" or "outside"
    ifindex: int | None  # None: no such interface in this network namespace
    xdp: str  # e.g. "xdp prog id 42 (driver mode)", "no XDP program"


@dataclass(frozen=True)
class SnatRuleInfo:
    rule_id: int
    network: str
    to: tuple[str, ...]
    ports: str
    max_ports_per_host: int | None = None


@dataclass(frozen=True)
class PinInfo:
    """What `natctl status` shows besides the tables' own contents."""

    directory: str
    pins: tuple[str, ...] = ()
    rules: tuple[SnatRuleInfo, ...] = ()
    port_ranges: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    interfaces: tuple[InterfaceInfo, ...] = ()
    daemon: dict[str, Any] | None = None  # natd's status file (natd.status), None when there is none


# IFLA_XDP_ATTACHED: the kernel's number, or pyroute2's name for it (the names `ip link` prints)
_XDP_MODES: dict[object, str] = {
    1: "driver mode", 2: "generic mode", 3: "offloaded", 4: "several modes",
    "xdp": "driver mode", "xdpgeneric": "generic mode", "xdpoffload": "offloaded",
    "xdpmulti": "several modes",
}


def _xdp_of(ifindex: int) -> str:
    """The XDP program attached to an interface, from one netlink request; never raises."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            (link,) = ipr.get_links(ifindex)
        xdp = link.get_attr("IFLA_XDP")
        mode = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else None
        if not mode:
            return "no XDP program"
        prog = xdp.get_attr("IFLA_XDP_PROG_ID")
        return f"xdp prog id {prog} ({_XDP_MODES.get(mode, f'mode {mode}')})"
    except Exception as exc:  # netlink errors, a missing pyroute2: status shows what it can
        return f"unknown ({exc})"


def _interface(name: str | None, ifindex: int | None, role: str) -> InterfaceInfo:
    if ifindex is None and name is not None:
        try:
            ifindex = socket.if_nametoindex(name)
        except OSError:
            return InterfaceInfo(name, role, None, "not found in this network namespace")
    if ifindex is None:
        raise ValueError("an interface needs a name or an index")
    if name is None:
        try:
            name = socket.if_indextoname(ifindex)
        except OSError:
            return InterfaceInfo(f"ifindex {ifindex}", role, ifindex, "not found in this network namespace")
    return InterfaceInfo(name, role, ifindex, _xdp_of(ifindex))


def read_pin_info(tables: Tables, settings: Settings) -> PinInfo:
    """Pin dir listing, rules, external addresses and interfaces, from the pinned maps (and the config's
    interface names when there is one). ``tables`` must be a PinnedTables."""
    if not isinstance(tables, PinnedTables):
        raise StateError(f"status reads pinned maps; {type(tables).__name__} has none")
    pins = tuple(sorted(os.listdir(tables.directory)))
    pool = tables.map("snat_pool")
    rules = []
    snat = tables.read_rules()["snat"]
    if not isinstance(snat, list):
        raise StateError(f"unexpected snat rules from {tables.directory}: {snat!r}")
    for rule in snat:
        start, size = int(rule["pool_index"]), int(rule["pool_size"])
        addrs = []
        for i in range(start, start + size):
            raw = pool.lookup(struct.pack("<I", i))
            if raw is not None:
                addrs.append(ip_str(struct.unpack_from("<I", raw)[0]))
        limit = rule.get("max_ports_per_host")
        rules.append(SnatRuleInfo(int(rule["rule_id"]), str(rule["from"]), tuple(addrs), str(rule["ports"]),
                                  int(limit) if isinstance(limit, int) else None))
    outside_keys = tables.map("outside_ifaces").keys()  # a BpfMap is not iterable itself
    outside = [struct.unpack("<I", k)[0] for k in outside_keys]
    interfaces = [_interface(None, i, "outside") for i in sorted(outside)]
    daemon = read_status(status_path(settings.instance))
    inside: list[str] = []
    if settings.config is not None:
        inside = list(settings.config.inside)
    elif daemon is not None:
        inside = [str(n) for n in daemon.get("inside", [])]
    interfaces += [_interface(name, None, "inside") for name in inside]
    return PinInfo(tables.directory, pins, tuple(rules), read_port_ranges(tables), tuple(interfaces), daemon)


def _reasons(totals: StatTotals, prefix: str) -> tuple[int, str]:
    found = [(s.name[len(prefix):].lower(), totals[s][0]) for s in Stat if s.name.startswith(prefix)]
    nonzero = [f"{name} {n}" for name, n in sorted(found, key=lambda x: -x[1]) if n]
    return sum(n for _, n in found), ", ".join(nonzero)


def status_data(tables: Tables, info: PinInfo, settings: Settings) -> dict[str, Any]:
    """Everything `natctl status` shows, as JSON-ready data."""
    totals = sum_stats(tables.stats_per_cpu())
    entries, limit = len(tables.flow_table()), tables.ct_max()
    return {
        "instance": settings.instance,
        "layout": LAYOUT_VERSION,
        "pin_dir": info.directory,
        "pins": list(info.pins),
        "conntrack": {"entries": entries, "max": limit},
        "translated": {
            "out": {"packets": totals[Stat.SNAT_OUT][0], "bytes": totals[Stat.SNAT_OUT][1]},
            "in": {"packets": totals[Stat.DNAT_IN][0], "bytes": totals[Stat.DNAT_IN][1]},
        },
        "dropped": {s.name[5:].lower(): totals[s][0] for s in Stat if s.name.startswith("DROP_")},
        "passed": {s.name[5:].lower(): totals[s][0] for s in Stat if s.name.startswith("PASS_")},
        "interfaces": [dataclasses.asdict(i) for i in info.interfaces],
        "external_addresses": {a: f"{lo}-{hi}" for a, (lo, hi) in sorted(info.port_ranges.items())},
        "snat_rules": [{"rule_id": r.rule_id, "from": r.network, "to": list(r.to), "ports": r.ports,
                        "max_ports_per_host": r.max_ports_per_host} for r in info.rules],
        "daemon": _daemon_data(info.daemon),
    }


def _daemon_data(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """The status file's contents plus whether that pid still runs (the datapath works without it)."""
    if status is None:
        return None
    pid = int(status.get("pid", 0))
    return {**status, "running": pid > 0 and pid_alive(pid)}


def _paren(text: str) -> str:
    return f" ({text})" if text else ""


def _daemon_lines(daemon: dict[str, Any] | None) -> list[str]:
    if daemon is None:
        return ["daemon:      no status file (natd not started here, or an older natd)"]
    run = "running" if daemon["running"] else "NOT running (the XDP program keeps translating)"
    reaper = daemon.get("reaper", {})
    last = reaper.get("last_success") or 0
    age = f"{max(0.0, time.time() - last):.0f} s ago" if last else "not yet"
    lines = [f"daemon:      pid {daemon.get('pid')} {run}, config {daemon.get('config')} "
             f"(digest {str(daemon.get('config_digest', ''))[:12]})",
             f"reaper:      last sweep {age}, {reaper.get('entries', 0)} entries, "
             f"{reaper.get('last_duration_seconds', 0.0):.3f} s, {reaper.get('sweeps', 0)} sweeps"]
    states = daemon.get("interfaces", {})
    if states:
        lines.append("link events: " + ", ".join(f"{n} {s}" for n, s in sorted(states.items())))
    return lines


def status_lines(data: dict[str, Any], totals_text: tuple[str, str]) -> list[str]:
    ct = data["conntrack"]
    fill = 100.0 * ct["entries"] / ct["max"] if ct["max"] else 0.0
    out, back = data["translated"]["out"], data["translated"]["in"]
    lines = [
        f"natd instance '{data['instance']}', map layout v{data['layout']}",
        f"pin dir:     {data['pin_dir']} ({len(data['pins'])} pins: {' '.join(data['pins'])})",
        f"conntrack:   {ct['entries']} / {ct['max']} entries ({fill:.1f}% full)",
        f"translated:  out {out['packets']} packets / {out['bytes']} bytes, "
        f"in {back['packets']} packets / {back['bytes']} bytes",
        f"dropped:     {sum(data['dropped'].values())} packets{_paren(totals_text[0])}",
        f"passed:      {sum(data['passed'].values())} packets{_paren(totals_text[1])}",
        "interfaces:" + ("" if data["interfaces"] else "  none known (pass --config to list inside ones)"),
    ]
    for i in data["interfaces"]:
        index = "-" if i["ifindex"] is None else str(i["ifindex"])
        lines.append(f"  {i['name']:<15} {i['role']:<7}  ifindex {index:<5} {i['xdp']}")
    lines.append("external addresses:" + ("" if data["external_addresses"] else "  none"))
    lines += [f"  {addr:<15} ports {ports}" for addr, ports in data["external_addresses"].items()]
    lines += _daemon_lines(data.get("daemon"))
    lines.append("snat rules:" + ("" if data["snat_rules"] else "  none"))
    for r in data["snat_rules"]:
        to = ", ".join(r["to"]) or "-"
        cap = f"  max {r['max_ports_per_host']} per host" if r["max_ports_per_host"] else ""
        lines.append(f"  rule {r['rule_id']:<4} {r['from']:<18} -> {to}  ports {r['ports']}{cap}")
    return lines


def show_status(tables: Tables, info: PinInfo, settings: Settings, output: str, out: TextIO) -> int:
    data = status_data(tables, info, settings)
    if output == "json":
        print(json.dumps(data, indent=2), file=out)
        return 0
    totals = sum_stats(tables.stats_per_cpu())
    texts = (_reasons(totals, "DROP_")[1], _reasons(totals, "PASS_")[1])
    print("\n".join(status_lines(data, texts)), file=out)
    return 0


# --- command line ---------------------------------------------------------------------------------------


def _proto(value: str) -> int:
    name = value.lower()
    if name in PROTO_NUMBERS:
        return PROTO_NUMBERS[name]
    if name.isdigit() and int(name) in PROTO_NAMES:
        return int(name)
    raise argparse.ArgumentTypeError(f"'{value}' is not a protocol natd tracks; expected tcp, udp or icmp")


def _network(value: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not an IPv4 address or network; expected e.g. 10.0.1.42 or 10.0.1.0/24") from None


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"'{value}' is not a port; expected 0-65535")
    return int(value)


def _state(value: str) -> CtState:
    try:
        return CtState[value.upper()]
    except KeyError:
        names = ", ".join(s.name for s in CtState)
        raise argparse.ArgumentTypeError(f"'{value}' is not a TCP state; expected one of {names}") from None


_FILTERS = ("proto", "orig_src", "orig_dst", "sport", "dport", "reply_dst", "reply_port_dst", "state")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Show and manipulate natd's connection tracking table, like conntrack(8).")
    parser.add_argument("--version", action="version", version=BANNER)
    where = parser.add_argument_group("which natd")
    where.add_argument("--instance", metavar="NAME", help=f"natd instance (default: {DEFAULT_INSTANCE})")
    where.add_argument("--pin-root", metavar="PATH", help=f"bpffs directory (default: {DEFAULT_PIN_ROOT})")
    where.add_argument("--config", metavar="FILE",
                       help=f"natd's config: instance, pin root, timeouts "
                            f"(default: {DEFAULT_CONFIG} if present)")
    commands = parser.add_argument_group("commands (one of)").add_mutually_exclusive_group()
    for short, long, name, text in (
            ("-L", "--dump", "list", "list flows"),
            ("-C", "--count", "count", "print the number of flows"),
            ("-S", "--stats", "stats", "per-CPU counters, conntrack -S style"),
            ("-F", "--flush", "flush", "delete every flow"),
            ("-D", "--delete", "delete", "delete the flows the filters match"),
            ("-E", "--event", "events", "follow flow events (NEW, DESTROY) live, conntrack -E style"),
            ("-M", "--mappings", "mappings", "list NAT mappings (inside endpoint -> external ip:port)")):
        commands.add_argument(short, long, dest="command", action="store_const", const=name, help=text)
    parser.add_argument("subcommand", nargs="?", choices=["status"],
                        help="status: pin dir, table fill, counters, interfaces, rules")
    filters = parser.add_argument_group("filters (-L, -C, -D, -E)")
    filters.add_argument("-p", "--proto", type=_proto, metavar="PROTO", help="tcp, udp or icmp")
    filters.add_argument("-s", "--orig-src", type=_network, metavar="ADDR", help="inside host (or network)")
    filters.add_argument("-d", "--orig-dst", type=_network, metavar="ADDR", help="remote host (or network)")
    filters.add_argument("--sport", type=_port, metavar="PORT", help="inside host's port (ICMP: identifier)")
    filters.add_argument("--dport", type=_port, metavar="PORT", help="remote port")
    filters.add_argument("-q", "--reply-dst", type=_network, metavar="ADDR", help="external address")
    filters.add_argument("--reply-port-dst", type=_port, metavar="PORT", help="external port")
    filters.add_argument("--state", type=_state, metavar="STATE", help="TCP state, e.g. ESTABLISHED")
    parser.add_argument("-o", "--output", choices=["text", "json"],
                        help="text (default) or json: one object per line for -L, -D, -E and -S, "
                             "one object for status")
    return parser


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command to run; parser.error() (exit 2) for combinations that make no sense."""
    if args.subcommand and args.command:
        parser.error(f"give one command: status or -{args.command[0].upper()}, not both")
    command: str | None = args.subcommand or args.command
    if command is None:
        parser.error("no command given; use -L, -C, -S, -F, -D, -E, -M or status")
    filtering = any(getattr(args, f) is not None for f in _FILTERS)
    if filtering and command not in ("list", "count", "delete", "events", "mappings"):
        parser.error("filters (-p, -s, -d, --sport, --dport, -q, --reply-port-dst, --state) apply to "
                     "-L, -C, -D, -E and -M only")
    if command == "mappings" and any(getattr(args, f) is not None for f in ("orig_dst", "dport", "state")):
        parser.error("-d, --dport and --state do not apply to -M: a mapping is an inside endpoint's, "
                     "whatever the remote")
    if command == "events" and args.state is not None:
        parser.error("--state does not apply to -E: events carry no TCP state")
    if command == "delete" and not filtering:
        parser.error("-D needs at least one filter (e.g. -s 10.0.1.42); -F deletes every flow")
    if args.output is not None and command in ("count", "flush"):
        parser.error("-o applies to -L, -D, -S, -M and status")
    return command


def _filter_of(args: argparse.Namespace) -> FlowFilter:
    return FlowFilter(**{f: getattr(args, f) for f in _FILTERS})


def run(argv: Sequence[str] | None = None, *,
        open_tables: Callable[[Settings], Tables] = open_pinned,
        pin_info: Callable[[Tables, Settings], PinInfo] = read_pin_info,
        now_ns: NowNs = time.monotonic_ns,
        default_config: str | None = DEFAULT_CONFIG,
        connect: Callable[[Settings], socket.socket] = connect_events) -> int:
    """natctl with its dependencies injectable: tests pass FakeTables through ``open_tables`` and a
    socketpair through ``connect`` (natd's event socket)."""
    out, err = sys.stdout, sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        command = _check_usage(parser, args)
    except SystemExit as exc:  # --help, --version, usage errors (argparse already printed them)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    output = args.output or "text"
    tables: Tables | None = None
    try:
        settings = resolve_settings(args, default_config, err)
        flt = _filter_of(args)
        if command == "events":
            return follow_events(connect(settings), flt, output, out, err)
        tables = open_tables(settings)
        if command == "list":
            return list_flows(tables, flt, settings.timeouts, now_ns, output, out, err)
        if command == "count":
            return count_flows(tables, flt, out)
        if command == "mappings":
            return list_mappings(tables, flt, output, out, err)
        # natd logs DESTROY events for what natctl deleted from its pinned maps (not from test fakes)
        pinned = isinstance(tables, PinnedTables)
        if command == "delete":
            return delete_flows(tables, flt, settings.timeouts, now_ns, output, out, err,
                                (lambda flows: notify_destroyed(settings, flows, "delete", err, connect))
                                if pinned else None)
        if command == "flush":
            return flush_flows(tables, err,
                               (lambda flows: notify_destroyed(settings, flows, "flush", err, connect))
                               if pinned else None)
        if command == "stats":
            return show_stats(tables, output, out)
        return show_status(tables, pin_info(tables, settings), settings, output, out)
    except NatdError as exc:
        print(f"{PROG}: error: {exc}", file=err)
        return 1
    except BrokenPipeError:  # natctl -L | head
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        close = getattr(tables, "close", None)
        if callable(close):
            close()


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point (``natctl``)."""
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
