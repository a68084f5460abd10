"""Prometheus metrics: a custom collector that reads natd's state at scrape time.

Where each metric comes from
----------------------------
Datapath counters (the per-CPU ``stats`` map, summed over CPUs at every scrape; packets unless named
bytes; bytes are whole frames as XDP sees them, Ethernet header included):

=========================================  ==========================================================
natd_connection_attempts_total             CT_NEW: flows created (CloudWatch ConnectionAttemptCount)
natd_connections_established_total         CT_ESTABLISHED: TCP flows that reached ESTABLISHED
                                           (CloudWatch ConnectionEstablishedCount)
natd_port_allocation_errors_total          DROP_PORT_EXHAUSTED (CloudWatch ErrorPortAllocation)
natd_conntrack_create_races_total          CT_CREATE_RACE: another CPU created the same flow first
natd_icmp_errors_translated_total{direction}  ICMP_ERROR_IN / ICMP_ERROR_OUT: ICMP errors about mapped flows
                                           translated to the inside host (in) or out to the internet (out)
natd_hairpin_packets_total                 HAIRPIN: inside -> external address -> inside (RFC 4787 REQ-9)
natd_fragments_translated_total            FRAG_TRANSLATED: later fragments translated via the first
natd_packets_total / natd_bytes_total      see "Traffic directions" below
natd_packets_dropped_total{reason}         every DROP_* counter; reason = the name without DROP_,
                                           lower-case (malformed, no_mapping, port_exhausted, ...)
natd_packets_passed_total{reason}          every PASS_* counter, handed to the kernel: untouched, except
                                           no_neigh and fragment_out: translated already (and counted
                                           as such: SNAT_OUT, DNAT_IN or FRAG_TRANSLATED); fragment_out
                                           is too big for the outside link with DF=0, so the kernel
                                           fragments it (RFC 4787 REQ-13a)
natd_xdp_verdicts_total{verdict}           XDP_ABORTED/DROP/PASS/TX/REDIRECT: aborted, drop, pass, tx,
                                           redirect
natd_events_lost_total                     NAT events lost: EVENTS_LOST (the datapath's ring buffer was
                                           full) + DESTROY events natd dropped (too many deleted flows
                                           waiting for the event log), see natd.events
natd_stats_read_success                    1 if the counters above could be read at this scrape, else 0
                                           (they are then left out; the others are still served)
=========================================  ==========================================================

From natd's event pump (natd.events), also at scrape time: natd_events_write_errors_total, events the
event log could not take (unwritable file, disk full); 0 without an event log.

Traffic directions, named after the AWS NAT gateway's CloudWatch metrics. "source" is the inside hosts,
"destination" the internet; "in" is what natd received for translation, "out" what it sent on:

=========================================  ==========================================================
direction="out", side="destination"        SNAT_OUT (PacketsOutToDestination): translated and sent out
direction="out", side="source"             DNAT_IN (PacketsOutToSource): replies translated back in
direction="in", side="source"              PacketsInFromSource: SNAT_OUT + the drops only outbound
                                           traffic to translate can have: DROP_SPOOFED_INSIDE,
                                           DROP_UNSUPPORTED, DROP_PORT_EXHAUSTED, DROP_TABLE_FULL,
                                           DROP_FRAG_NEEDED_NO_DF (an inside ICMP error too big for
                                           the outside link; other DF=0 packets that are too big are
                                           translated, in SNAT_OUT, and fragmented by the kernel)
direction="in", side="destination"         PacketsInFromDestination: DNAT_IN + DROP_NO_MAPPING
                                           (unsolicited packets to a NAT port of an external address)
=========================================  ==========================================================

So ``in - out`` is what natd dropped instead of translating, per side. Not attributed to a side:
DROP_MALFORMED (either interface) and DROP_TO_PRIVATE (not addressed to an external address); and
DROP_NO_MAPPING also counts the (rare) TCP RSTs from inside hosts for flows natd does not know, because
the datapath counts both under one reason.

From the reaper's last sweep (:class:`ReaperStatus`, updated by the daemon after every sweep): counting
a million-entry table costs about a second, so scrapes never walk the table. These gauges are left out
until the first sweep has finished, rather than reporting a false 0:

=========================================  ==========================================================
natd_conntrack_entries                     flows left after the last sweep
natd_conntrack_entries_by_state            the same per {proto, state}: TCP states (established, ...),
                                           "replied"/"unreplied" for UDP and ICMP
natd_external_ports_in_use{external_ip}    flows translated to that external address (each holds one
                                           port claim: a port is claimed per protocol and remote
                                           endpoint, so this may exceed the limit below; exhaustion
                                           shows in natd_port_allocation_errors_total)
natd_idle_timeouts_total                   flows the reaper expired (CloudWatch IdleTimeoutCount)
natd_conntrack_reaped_total{proto,state}   the same per protocol and the state they expired in
natd_conntrack_orphan_replies_deleted_total  ct_reply halves found without their flow and deleted
natd_reaper_last_duration_seconds          0 until the first sweep
natd_reaper_last_success_timestamp_seconds unix time; 0 until the first sweep
=========================================  ==========================================================

Static: natd_conntrack_entries_limit (conntrack.max), natd_external_ports_limit{external_ip} (size of the
NAT port range of that address, from the pinned ext_addrs map, or the config's snat rules when the tables
are not pinned maps), natd_build_info{version}.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from natd import __version__
from natd.config import Config
from natd.errors import ConfigError, NatdError
from natd.fmt import ip_str
from natd.maps import ExtAddrInfo, Stat
from natd.tables import PinnedTables, StatTotals, Tables, sum_stats

__all__ = [
    "IN_FROM_DESTINATION",
    "IN_FROM_SOURCE",
    "NatdCollector",
    "ReaperStatus",
    "SweepSummary",
    "build_registry",
    "config_port_ranges",
    "decode_port_ranges",
    "read_port_ranges",
    "start_metrics_server",
]

log = logging.getLogger("natd.metrics")

PortRanges = Mapping[str, tuple[int, int]]  # external address -> (port_min, port_max)
StateKey = tuple[str, str]  # (proto, state) as natd.reaper.state_label names them

# The stats summed into direction="in" (see the module docstring).
IN_FROM_SOURCE = (Stat.SNAT_OUT, Stat.DROP_SPOOFED_INSIDE, Stat.DROP_UNSUPPORTED, Stat.DROP_PORT_EXHAUSTED,
                  Stat.DROP_TABLE_FULL, Stat.DROP_FRAG_NEEDED_NO_DF, Stat.DROP_HOST_PORT_LIMIT)
IN_FROM_DESTINATION = (Stat.DNAT_IN, Stat.DROP_NO_MAPPING)
_DIRECTIONS: tuple[tuple[str, str, tuple[Stat, ...]], ...] = (
    ("in", "source", IN_FROM_SOURCE),
    ("out", "destination", (Stat.SNAT_OUT,)),
    ("in", "destination", IN_FROM_DESTINATION),
    ("out", "source", (Stat.DNAT_IN,)),
)
_VERDICTS = (Stat.XDP_ABORTED, Stat.XDP_DROP, Stat.XDP_PASS, Stat.XDP_TX, Stat.XDP_REDIRECT)
_DROPS = tuple(s for s in Stat if s.name.startswith("DROP_"))
_PASSES = tuple(s for s in Stat if s.name.startswith("PASS_"))


def _reason(stat: Stat) -> str:
    """DROP_NO_MAPPING -> no_mapping, XDP_PASS -> pass."""
    return stat.name.split("_", 1)[1].lower()


# --- what the reaper reports ----------------------------------------------------------------------------


class SweepSummary(Protocol):
    """What :meth:`ReaperStatus.update` needs of a sweep (natd.reaper.SweepResult has it)."""

    @property
    def duration_s(self) -> float: ...
    @property
    def reaped(self) -> int: ...
    @property
    def orphans(self) -> int: ...
    @property
    def by_state(self) -> Mapping[StateKey, int]: ...
    @property
    def entries_by_state(self) -> Mapping[StateKey, int]: ...
    @property
    def ports_in_use(self) -> Mapping[str, int]: ...
    @property
    def mappings(self) -> int: ...
    @property
    def mappings_released(self) -> int: ...


@dataclass
class ReaperStatus:
    """The reaper's last sweep and running totals, shared between the reaper and the scrapes.

    Write it with :meth:`update` (the reaper's thread), read it with :meth:`snapshot` (a scrape's
    thread): both hold the lock, so a scrape never sees half a sweep.
    """

    last_duration_seconds: float = 0.0
    last_success_unixtime: float = 0.0
    sweeps: int = 0
    entries: int = 0
    entries_by_state: dict[StateKey, int] = field(default_factory=dict)
    ports_in_use: dict[str, int] = field(default_factory=dict)
    reaped_total: dict[StateKey, int] = field(default_factory=dict)
    idle_timeouts_total: int = 0
    orphans_deleted_total: int = 0
    mappings: int = 0
    mappings_released_total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def update(self, result: SweepSummary, unixtime: float) -> None:
        """Record a finished sweep; ``unixtime`` is when it finished (time.time())."""
        by_state = dict(result.entries_by_state)
        ports = dict(result.ports_in_use)
        with self._lock:
            self.last_duration_seconds = result.duration_s
            self.last_success_unixtime = unixtime
            self.sweeps += 1
            self.entries = sum(by_state.values())
            self.entries_by_state = by_state
            self.ports_in_use = ports
            for key, n in result.by_state.items():
                self.reaped_total[key] = self.reaped_total.get(key, 0) + n
            self.idle_timeouts_total += result.reaped
            self.orphans_deleted_total += result.orphans
            self.mappings = result.mappings
            self.mappings_released_total += result.mappings_released

    def snapshot(self) -> ReaperStatus:
        """A consistent copy (its dicts are copies too)."""
        with self._lock:
            return dataclasses.replace(self, entries_by_state=dict(self.entries_by_state),
                                       ports_in_use=dict(self.ports_in_use),
                                       reaped_total=dict(self.reaped_total))


# --- NAT port ranges per external address ---------------------------------------------------------------


def decode_port_ranges(items: Iterable[tuple[bytes, bytes]]) -> dict[str, tuple[int, int]]:
    """ext_addrs map entries (be32 address -> struct ext_addr_info) as {address: (port_min, port_max)}."""
    out: dict[str, tuple[int, int]] = {}
    for key, value in items:
        (addr,) = struct.unpack_from("<I", key)
        info = ExtAddrInfo.from_buffer_copy(value[:8])
        out[ip_str(addr)] = (int(info.port_min), int(info.port_max))
    return out


def read_port_ranges(tables: PinnedTables) -> dict[str, tuple[int, int]]:
    """The pinned ext_addrs map: the datapath's own view, current after every reload."""
    return decode_port_ranges(tables.map("ext_addrs").items())


def config_port_ranges(config: Config) -> dict[str, tuple[int, int]]:
    """Port ranges of the addresses the config names (rules with an empty ``to`` use the outside
    interface's address, which only the running datapath knows: see :func:`read_port_ranges`)."""
    return {str(addr): (rule.ports.lo, rule.ports.hi) for rule in config.snat for addr in rule.to}


# --- the collector ----------------------------------------------------------------------------------------


class EventCounters(Protocol):
    """What the collector reads of natd.events.EventPump."""

    @property
    def write_errors(self) -> int: ...
    @property
    def dropped(self) -> int: ...


class NatdCollector:
    """prometheus_client custom collector (register it in a CollectorRegistry, see build_registry).

    ``port_ranges`` (external address -> (port_min, port_max)) overrides where the port limits come from;
    by default they are read from the pinned ext_addrs map when ``tables`` is a PinnedTables, else from
    ``config`` (see :func:`config_port_ranges`). :meth:`set_port_ranges` replaces them (after a reload).
    """

    def __init__(self, tables: Tables, config: Config, status: ReaperStatus, *,
                 port_ranges: PortRanges | None = None, version: str = __version__,
                 events: EventCounters | None = None) -> None:
        self._events = events
        self._tables = tables
        self._config = config
        self._status = status
        self._port_ranges = dict(port_ranges) if port_ranges is not None else None
        self._version = version

    def set_port_ranges(self, port_ranges: PortRanges) -> None:
        self._port_ranges = dict(port_ranges)

    def port_ranges(self) -> dict[str, tuple[int, int]]:
        if self._port_ranges is not None:
            return dict(self._port_ranges)
        if isinstance(self._tables, PinnedTables):
            return read_port_ranges(self._tables)
        return config_port_ranges(self._config)

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples (the registry checks names with this, not collect())."""
        empty: StatTotals = {s: (0, 0) for s in Stat}
        swept = dataclasses.replace(ReaperStatus(), sweeps=1)
        for family in self._families(empty, swept, {}):
            family.samples = []
            yield family

    def collect(self) -> Iterator[Metric]:
        status = self._status.snapshot()
        totals: StatTotals | None
        try:
            totals = sum_stats(self._tables.stats_per_cpu())
        except NatdError as exc:
            log.warning("metrics: cannot read the datapath counters: %s", exc)
            totals = None
        try:
            ranges = self.port_ranges()
        except NatdError as exc:
            log.warning("metrics: cannot read the external address port ranges: %s", exc)
            ranges = {}
        yield from self._families(totals, status, ranges)

    # -- building the families ------------------------------------------------------------------------
    def _families(self, totals: StatTotals | None, status: ReaperStatus,
                  ranges: PortRanges) -> Iterator[Metric]:
        yield self._build_info()
        yield from self._conntrack(status)
        yield from self._ports(status, ranges)
        yield from self._reaper(status)
        ok = GaugeMetricFamily("natd_stats_read_success",
                               "1 if the datapath counters could be read at this scrape (else they are "
                               "left out).", value=0 if totals is None else 1)
        yield ok
        if totals is not None:
            yield from self._counters(totals)
        yield CounterMetricFamily("natd_events_write_errors_total",
                                  "NAT events the event log (log.events) could not take: the file could not "
                                  "be opened or written (permissions, missing directory, disk full).",
                                  value=self._events.write_errors if self._events is not None else 0)

    def _build_info(self) -> Metric:
        info = GaugeMetricFamily("natd_build_info", "natd version; the value is always 1.",
                                 labels=["version"])
        info.add_metric([self._version], 1)
        return info

    def _conntrack(self, status: ReaperStatus) -> Iterator[Metric]:
        yield GaugeMetricFamily("natd_conntrack_entries_limit",
                                "Conntrack table capacity (conntrack.max); a full table refuses new flows.",
                                value=self._config.conntrack.max)
        if status.sweeps == 0:
            return
        yield GaugeMetricFamily("natd_conntrack_entries",
                                "Flows in the conntrack table, counted by the reaper's last sweep (scrapes "
                                "never walk the table, which can hold millions of entries).",
                                value=status.entries)
        yield GaugeMetricFamily("natd_mappings",
                                "NAT mappings (inside endpoint -> external address:port) at the reaper's "
                                "last sweep; each holds one external port, and lives while its endpoint "
                                "has flows.",
                                value=status.mappings)
        yield CounterMetricFamily("natd_mappings_released_total",
                                  "Mappings the reaper deleted because their last flow was gone.",
                                  value=status.mappings_released_total)
        by_state = GaugeMetricFamily("natd_conntrack_entries_by_state",
                                     "Flows by protocol and state at the reaper's last sweep; UDP and ICMP "
                                     "flows are 'replied' or 'unreplied'.", labels=["proto", "state"])
        for (proto, state), n in sorted(status.entries_by_state.items()):
            by_state.add_metric([proto, state], n)
        yield by_state

    def _ports(self, status: ReaperStatus, ranges: PortRanges) -> Iterator[Metric]:
        limit = GaugeMetricFamily("natd_external_ports_limit",
                                  "Size of the NAT port range of an external address (per protocol and "
                                  "remote endpoint).", labels=["external_ip"])
        for addr, (lo, hi) in sorted(ranges.items()):
            limit.add_metric([addr], hi - lo + 1)
        yield limit
        if status.sweeps == 0:
            return
        in_use = GaugeMetricFamily("natd_external_ports_in_use",
                                   "Flows translated to an external address at the reaper's last sweep, one "
                                   "port claim each; ports are claimed per protocol and remote endpoint, so "
                                   "this can exceed the limit (exhaustion shows in "
                                   "natd_port_allocation_errors_total).", labels=["external_ip"])
        for addr, n in sorted(status.ports_in_use.items()):
            in_use.add_metric([addr], n)
        yield in_use

    def _reaper(self, status: ReaperStatus) -> Iterator[Metric]:
        yield CounterMetricFamily("natd_idle_timeouts_total",
                                  "Flows the reaper removed after their idle timeout.",
                                  value=status.idle_timeouts_total)
        reaped = CounterMetricFamily("natd_conntrack_reaped_total",
                                     "Flows the reaper removed, by protocol and the state they expired in.",
                                     labels=["proto", "state"])
        for (proto, state), n in sorted(status.reaped_total.items()):
            reaped.add_metric([proto, state], n)
        yield reaped
        yield CounterMetricFamily("natd_conntrack_orphan_replies_deleted_total",
                                  "Reply halves (ct_reply) found without their flow and deleted by the "
                                  "reaper.",
                                  value=status.orphans_deleted_total)
        yield GaugeMetricFamily("natd_reaper_last_duration_seconds",
                                "Duration of the last successful conntrack sweep (0: none yet).",
                                value=status.last_duration_seconds)
        yield GaugeMetricFamily("natd_reaper_last_success_timestamp_seconds",
                                "Unix time the last successful conntrack sweep finished (0: none yet).",
                                value=status.last_success_unixtime)

    def _counters(self, totals: StatTotals) -> Iterator[Metric]:
        def packets(stat: Stat) -> int:
            return totals[stat][0]

        yield CounterMetricFamily("natd_connection_attempts_total", "Flows created (new conntrack entries).",
                                  value=packets(Stat.CT_NEW))
        yield CounterMetricFamily("natd_connections_established_total",
                                  "TCP flows that completed the handshake (reached ESTABLISHED).",
                                  value=packets(Stat.CT_ESTABLISHED))
        yield CounterMetricFamily("natd_port_allocation_errors_total",
                                  "New flows dropped because no external port was free for their "
                                  "destination.",
                                  value=packets(Stat.DROP_PORT_EXHAUSTED))
        yield CounterMetricFamily("natd_conntrack_create_races_total",
                                  "New flows another CPU created first (harmless; the packet used that "
                                  "entry).",
                                  value=packets(Stat.CT_CREATE_RACE))
        icmp = CounterMetricFamily("natd_icmp_errors_translated_total",
                                   "ICMP errors (unreachable, time exceeded, parameter problem) about mapped "
                                   "flows, translated towards the inside host (in) or the internet (out).",
                                   labels=["direction"])
        icmp.add_metric(["in"], packets(Stat.ICMP_ERROR_IN))
        icmp.add_metric(["out"], packets(Stat.ICMP_ERROR_OUT))
        yield icmp
        yield CounterMetricFamily("natd_icmp_unreachable_sent_total",
                                  "ICMP Destination Unreachable (code 13) natd sent to inside hosts whose "
                                  "packet could get no session: no port, max_ports_per_host, table full "
                                  "(RFC 5508 REQ-8).", value=packets(Stat.ICMP_UNREACH_SENT))
        yield CounterMetricFamily("natd_icmp_unreachable_rate_limited_total",
                                  "The same, not sent because of the rate limit (RFC 1812 4.3.2.8); the "
                                  "packets were dropped silently.",
                                  value=packets(Stat.ICMP_UNREACH_RATE_LIMITED))
        yield CounterMetricFamily("natd_mapping_ports_shared_total",
                                  "New endpoint-independent mappings that had to share an external port with "
                                  "another inside endpoint (no free port among the tries; RFC 7857 3).",
                                  value=packets(Stat.EIM_PORT_SHARED))
        yield CounterMetricFamily("natd_mapping_collisions_total",
                                  "Flows that could not use their endpoint's mapping (its shared port was "
                                  "busy towards that remote) and got a port of their own.",
                                  value=packets(Stat.EIM_COLLISION))
        yield CounterMetricFamily("natd_fragments_translated_total",
                                  "Non-first IPv4 fragments translated like their datagram's first fragment.",
                                  value=packets(Stat.FRAG_TRANSLATED))
        yield CounterMetricFamily("natd_hairpin_packets_total",
                                  "Packets from an inside host to an external address of this NAT, "
                                  "translated out and back in (hairpinning).", value=packets(Stat.HAIRPIN))
        pkts = CounterMetricFamily("natd_packets_total",
                                   "Packets natd received for translation (direction=in) and sent on "
                                   "translated (direction=out), from/to the inside hosts (side=source) or "
                                   "the internet (side=destination); in - out = dropped.",
                                   labels=["direction", "side"])
        byts = CounterMetricFamily("natd_bytes_total", "Bytes (whole frames) of natd_packets_total.",
                                   labels=["direction", "side"])
        for direction, side, stats in _DIRECTIONS:
            pkts.add_metric([direction, side], sum(totals[s][0] for s in stats))
            byts.add_metric([direction, side], sum(totals[s][1] for s in stats))
        yield pkts
        yield byts
        yield self._by_reason("natd_packets_dropped_total", "Packets dropped, by reason.", "reason", _DROPS,
                              totals)
        yield self._by_reason("natd_packets_passed_total",
                              "Packets handed to the kernel untouched, by reason.", "reason", _PASSES, totals)
        yield self._by_reason("natd_xdp_verdicts_total", "XDP verdicts returned, by verdict.", "verdict",
                              _VERDICTS, totals)
        dropped = self._events.dropped if self._events is not None else 0
        yield CounterMetricFamily("natd_events_lost_total",
                                  "NAT events lost before natd could log them: the datapath's ring buffer "
                                  "was full, or too many deleted flows waited for their DESTROY events.",
                                  value=packets(Stat.EVENTS_LOST) + dropped)

    @staticmethod
    def _by_reason(name: str, documentation: str, label: str, stats: Iterable[Stat],
                   totals: StatTotals) -> Metric:
        family = CounterMetricFamily(name, documentation, labels=[label])
        for stat in stats:
            family.add_metric([_reason(stat)], totals[stat][0])
        return family


# --- serving --------------------------------------------------------------------------------------------


def build_registry(collector: NatdCollector, *, process_metrics: bool = True) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) with natd's collector and, unless
    disabled, the standard process_* metrics of this process."""
    registry = CollectorRegistry()
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry


def start_metrics_server(collector: NatdCollector, host: str,
                         port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on host:port from a daemon thread; returns (server, thread): server.shutdown()
    stops it. A port that cannot be bound is a ConfigError on metrics.listen."""
    registry = build_registry(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; stop what holds "
                          "the port or choose another metrics.listen", key="metrics.listen") from None
    return server, thread
