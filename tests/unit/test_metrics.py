"""natd.metrics on FakeTables: exact sample values, sweep-derived gauges, failures, the HTTP server."""

from __future__ import annotations

import socket
import struct
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from natd import __version__
from natd.config import Config, parse_config
from natd.errors import BpfError, ConfigError
from natd.maps import ExtAddrInfo, Stat, ip_to_be32
from natd.metrics import (
    NatdCollector,
    ReaperStatus,
    build_registry,
    config_port_ranges,
    decode_port_ranges,
    start_metrics_server,
)
from natd.reaper import SweepResult
from natd.tables import FakeTables, StatTotals

pytestmark = pytest.mark.unit

CONFIG = """\
inside: [eth1]
outside: eth0
snat:
  - from: 10.0.0.0/8
    to: [203.0.113.1, 203.0.113.2]
    ports: 20000-29999
  - from: 172.16.0.0/12
    ports: 1024-32767
conntrack:
  max: 4096
"""


@pytest.fixture
def config() -> Config:
    return parse_config(CONFIG)


def counting_tables() -> FakeTables:
    """Two CPUs; every stat gets a distinct value so a wrong mapping shows."""
    t = FakeTables(ncpu=2)
    for stat in Stat:
        t.counters[0][stat] = (100 + int(stat), 10_000 + int(stat))
        t.counters[1][stat] = (1, 1)
    return t


def packets(stat: Stat) -> float:
    return 101.0 + int(stat)


def byts(stat: Stat) -> float:
    return 10_001.0 + int(stat)


def registry_for(collector: NatdCollector) -> CollectorRegistry:
    return build_registry(collector, process_metrics=False)


def sweep(**kw: object) -> SweepResult:
    base: dict[str, object] = dict(scanned=10, reaped=3, orphans=1, duration_s=0.25,
                                   by_state={("tcp", "time_wait"): 2, ("udp", "unreplied"): 1},
                                   entries_by_state={("tcp", "established"): 5, ("udp", "replied"): 2},
                                   ports_in_use={"203.0.113.1": 6, "203.0.113.2": 1})
    base.update(kw)
    return SweepResult(**base)  # type: ignore[arg-type]


def test_counters_are_summed_over_cpus_and_mapped(config: Config) -> None:
    reg = registry_for(NatdCollector(counting_tables(), config, ReaperStatus()))
    v = reg.get_sample_value
    assert v("natd_connection_attempts_total") == packets(Stat.CT_NEW)
    assert v("natd_connections_established_total") == packets(Stat.CT_ESTABLISHED)
    assert v("natd_port_allocation_errors_total") == packets(Stat.DROP_PORT_EXHAUSTED)
    assert v("natd_conntrack_create_races_total") == packets(Stat.CT_CREATE_RACE)
    assert v("natd_icmp_errors_translated_total", {"direction": "in"}) == packets(Stat.ICMP_ERROR_IN)
    assert v("natd_icmp_errors_translated_total", {"direction": "out"}) == packets(Stat.ICMP_ERROR_OUT)
    assert v("natd_stats_read_success") == 1.0
    for stat in Stat:
        name = stat.name.split("_", 1)[-1].lower()
        if stat.name.startswith("DROP_"):
            assert v("natd_packets_dropped_total", {"reason": name}) == packets(stat), stat
        elif stat.name.startswith("PASS_"):
            assert v("natd_packets_passed_total", {"reason": name}) == packets(stat), stat
        elif stat.name.startswith("XDP_"):
            assert v("natd_xdp_verdicts_total", {"verdict": name}) == packets(stat), stat
    assert v("natd_packets_dropped_total", {"reason": "no_mapping"}) == 118.0
    assert v("natd_xdp_verdicts_total", {"verdict": "redirect"}) == 105.0


def test_direction_and_side(config: Config) -> None:
    reg = registry_for(NatdCollector(counting_tables(), config, ReaperStatus()))
    v = reg.get_sample_value
    out_dst = {"direction": "out", "side": "destination"}
    out_src = {"direction": "out", "side": "source"}
    in_src = {"direction": "in", "side": "source"}
    in_dst = {"direction": "in", "side": "destination"}
    assert v("natd_packets_total", out_dst) == packets(Stat.SNAT_OUT) == 106.0
    assert v("natd_bytes_total", out_dst) == byts(Stat.SNAT_OUT)
    assert v("natd_packets_total", out_src) == packets(Stat.DNAT_IN) == 107.0
    assert v("natd_bytes_total", out_src) == byts(Stat.DNAT_IN)
    from_source = (Stat.SNAT_OUT, Stat.DROP_SPOOFED_INSIDE, Stat.DROP_UNSUPPORTED, Stat.DROP_PORT_EXHAUSTED,
                   Stat.DROP_TABLE_FULL, Stat.DROP_FRAG_NEEDED_NO_DF, Stat.DROP_HOST_PORT_LIMIT)
    assert v("natd_packets_total", in_src) == sum(packets(s) for s in from_source) == 854.0
    assert v("natd_bytes_total", in_src) == sum(byts(s) for s in from_source)
    assert v("natd_packets_total", in_dst) == packets(Stat.DNAT_IN) + packets(Stat.DROP_NO_MAPPING) == 225.0
    assert v("natd_bytes_total", in_dst) == byts(Stat.DNAT_IN) + byts(Stat.DROP_NO_MAPPING)


def test_static_gauges(config: Config) -> None:
    reg = registry_for(NatdCollector(FakeTables(), config, ReaperStatus()))
    v = reg.get_sample_value
    assert v("natd_build_info", {"version": __version__}) == 1.0
    assert v("natd_conntrack_entries_limit") == 4096.0
    # from the config: rules naming their addresses (the empty-`to` rule's address is the datapath's)
    assert v("natd_external_ports_limit", {"external_ip": "203.0.113.1"}) == 10000.0
    assert v("natd_external_ports_limit", {"external_ip": "203.0.113.2"}) == 10000.0


def test_sweep_gauges_are_absent_before_the_first_sweep(config: Config) -> None:
    reg = registry_for(NatdCollector(FakeTables(), config, ReaperStatus()))
    v = reg.get_sample_value
    assert v("natd_conntrack_entries") is None
    assert v("natd_conntrack_entries_by_state", {"proto": "tcp", "state": "established"}) is None
    assert v("natd_external_ports_in_use", {"external_ip": "203.0.113.1"}) is None
    assert v("natd_reaper_last_duration_seconds") == 0.0
    assert v("natd_reaper_last_success_timestamp_seconds") == 0.0
    assert v("natd_idle_timeouts_total") == 0.0
    assert v("natd_conntrack_orphan_replies_deleted_total") == 0.0


def test_sweep_gauges_and_counters_follow_the_reaper(config: Config) -> None:
    status = ReaperStatus()
    reg = registry_for(NatdCollector(FakeTables(), config, status))
    v = reg.get_sample_value
    status.update(sweep(), 1_700_000_000.5)
    assert v("natd_conntrack_entries") == 7.0
    assert v("natd_conntrack_entries_by_state", {"proto": "tcp", "state": "established"}) == 5.0
    assert v("natd_conntrack_entries_by_state", {"proto": "udp", "state": "replied"}) == 2.0
    assert v("natd_external_ports_in_use", {"external_ip": "203.0.113.1"}) == 6.0
    assert v("natd_external_ports_in_use", {"external_ip": "203.0.113.2"}) == 1.0
    assert v("natd_reaper_last_duration_seconds") == 0.25
    assert v("natd_reaper_last_success_timestamp_seconds") == 1_700_000_000.5
    assert v("natd_idle_timeouts_total") == 3.0
    assert v("natd_conntrack_reaped_total", {"proto": "tcp", "state": "time_wait"}) == 2.0
    assert v("natd_conntrack_orphan_replies_deleted_total") == 1.0

    second = sweep(reaped=1, orphans=0, duration_s=0.5, by_state={("tcp", "time_wait"): 1},
                   entries_by_state={("icmp", "replied"): 1}, ports_in_use={"203.0.113.2": 1})
    status.update(second, 1_700_000_005.0)
    assert v("natd_conntrack_entries") == 1.0
    # gauges are the last sweep's: gone states disappear
    assert v("natd_conntrack_entries_by_state", {"proto": "tcp", "state": "established"}) is None
    assert v("natd_conntrack_entries_by_state", {"proto": "icmp", "state": "replied"}) == 1.0
    assert v("natd_external_ports_in_use", {"external_ip": "203.0.113.1"}) is None
    assert v("natd_reaper_last_duration_seconds") == 0.5
    assert v("natd_reaper_last_success_timestamp_seconds") == 1_700_000_005.0
    # counters accumulate
    assert v("natd_idle_timeouts_total") == 4.0
    assert v("natd_conntrack_reaped_total", {"proto": "tcp", "state": "time_wait"}) == 3.0
    assert v("natd_conntrack_reaped_total", {"proto": "udp", "state": "unreplied"}) == 1.0
    assert v("natd_conntrack_orphan_replies_deleted_total") == 1.0
    assert status.sweeps == 2


def test_snapshot_is_a_copy() -> None:
    status = ReaperStatus()
    status.update(sweep(), 1.0)
    snap = status.snapshot()
    snap.entries_by_state[("tcp", "close")] = 99
    snap.reaped_total.clear()
    snap.ports_in_use.clear()
    assert ("tcp", "close") not in status.entries_by_state
    assert status.reaped_total == {("tcp", "time_wait"): 2, ("udp", "unreplied"): 1}
    assert status.ports_in_use == {"203.0.113.1": 6, "203.0.113.2": 1}
    assert (snap.entries, snap.sweeps, snap.last_success_unixtime) == (7, 1, 1.0)


def test_explicit_port_ranges_win(config: Config) -> None:
    collector = NatdCollector(FakeTables(), config, ReaperStatus(), port_ranges={"192.0.2.1": (1024, 2047)})
    reg = registry_for(collector)
    assert reg.get_sample_value("natd_external_ports_limit", {"external_ip": "192.0.2.1"}) == 1024.0
    assert reg.get_sample_value("natd_external_ports_limit", {"external_ip": "203.0.113.1"}) is None
    collector.set_port_ranges({"192.0.2.9": (5000, 5000)})
    assert reg.get_sample_value("natd_external_ports_limit", {"external_ip": "192.0.2.9"}) == 1.0
    assert reg.get_sample_value("natd_external_ports_limit", {"external_ip": "192.0.2.1"}) is None


def test_config_port_ranges(config: Config) -> None:
    assert config_port_ranges(config) == {"203.0.113.1": (20000, 29999), "203.0.113.2": (20000, 29999)}


def test_decode_port_ranges_from_map_bytes() -> None:
    items = [(struct.pack("<I", ip_to_be32("203.0.113.9")), ExtAddrInfo(1024, 32767, 0).to_bytes()),
             (struct.pack("<I", ip_to_be32("198.51.100.1")), ExtAddrInfo(20000, 20000, 0).to_bytes())]
    assert decode_port_ranges(items) == {"203.0.113.9": (1024, 32767), "198.51.100.1": (20000, 20000)}


class BrokenStats(FakeTables):
    def stats_per_cpu(self) -> list[StatTotals]:
        raise BpfError("lookup in stats: Bad file descriptor (errno 9)")


def test_unreadable_counters_leave_the_rest(config: Config, caplog: pytest.LogCaptureFixture) -> None:
    status = ReaperStatus()
    status.update(sweep(), 2.0)
    reg = registry_for(NatdCollector(BrokenStats(), config, status))
    v = reg.get_sample_value
    assert v("natd_stats_read_success") == 0.0
    assert v("natd_packets_total", {"direction": "out", "side": "destination"}) is None
    assert v("natd_connection_attempts_total") is None
    assert v("natd_conntrack_entries") == 7.0
    assert v("natd_conntrack_entries_limit") == 4096.0
    assert "metrics: cannot read the datapath counters: lookup in stats: Bad file descriptor" in caplog.text


def family_names(families: Iterator[object]) -> list[str]:
    return [f.name for f in families]  # type: ignore[attr-defined]


def test_describe_matches_collect_and_has_no_samples(config: Config) -> None:
    status = ReaperStatus()
    status.update(sweep(), 1.0)
    collector = NatdCollector(counting_tables(), config, status)
    described = list(collector.describe())
    assert family_names(iter(described)) == family_names(collector.collect())
    assert all(f.samples == [] for f in described)
    assert family_names(iter(described)) == [
        "natd_build_info", "natd_conntrack_entries_limit", "natd_conntrack_entries",
        "natd_mappings", "natd_mappings_released", "natd_conntrack_entries_by_state",
        "natd_external_ports_limit", "natd_external_ports_in_use",
        "natd_idle_timeouts", "natd_conntrack_reaped", "natd_conntrack_orphan_replies_deleted",
        "natd_reaper_last_duration_seconds", "natd_reaper_last_success_timestamp_seconds",
        "natd_stats_read_success", "natd_connection_attempts", "natd_connections_established",
        "natd_port_allocation_errors", "natd_conntrack_create_races", "natd_icmp_errors_translated",
        "natd_icmp_unreachable_sent", "natd_icmp_unreachable_rate_limited", "natd_mapping_ports_shared",
        "natd_mapping_collisions", "natd_fragments_translated", "natd_hairpin_packets",
        "natd_packets", "natd_bytes",
        "natd_packets_dropped", "natd_packets_passed", "natd_xdp_verdicts", "natd_events_lost",
        "natd_events_write_errors",
    ]  # counter families are named without _total; their samples carry it


def test_exposition_text(config: Config) -> None:
    status = ReaperStatus()
    status.update(sweep(), 1.0)
    text = generate_latest(registry_for(NatdCollector(counting_tables(), config, status))).decode()
    attempts = packets(Stat.CT_NEW)
    assert (f"# TYPE natd_connection_attempts_total counter\n"
            f"natd_connection_attempts_total {attempts}\n") in text
    assert ("# HELP natd_conntrack_entries Flows in the conntrack table, counted by the reaper's last sweep "
            "(scrapes never walk the table, which can hold millions of entries).\n") in text
    assert 'natd_packets_dropped_total{reason="port_exhausted"} 122.0\n' in text
    assert 'natd_conntrack_entries_by_state{proto="tcp",state="established"} 5.0\n' in text
    assert "process_" not in text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert all(name.startswith("natd_") for name in names)


def test_registry_with_process_metrics(config: Config) -> None:
    reg = build_registry(NatdCollector(FakeTables(), config, ReaperStatus()))
    assert reg.get_sample_value("process_resident_memory_bytes") is not None
    assert reg.get_sample_value("natd_conntrack_entries_limit") == 4096.0


def test_http_server_serves_metrics(config: Config) -> None:
    server, thread = start_metrics_server(NatdCollector(counting_tables(), config, ReaperStatus()),
                                          "127.0.0.1", 0)
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert resp.status == 200
        assert f"natd_connection_attempts_total {packets(Stat.CT_NEW)}\n" in body
        assert "natd_conntrack_entries_limit 4096.0\n" in body
        assert thread.daemon
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_http_server_port_in_use_is_a_config_error(config: Config) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as exc:
            start_metrics_server(NatdCollector(FakeTables(), config, ReaperStatus()), "127.0.0.1", port)
    assert exc.value.key == "metrics.listen"
    assert str(exc.value) == (f"<config>: metrics.listen: cannot serve metrics on 127.0.0.1:{port}: Address "
                              "already in use; stop what holds the port or choose another metrics.listen")


def test_mapping_and_icmp_refusal_metrics(config: Config) -> None:
    status = ReaperStatus()
    status.update(sweep(mappings=4, mappings_released=2), 1.0)
    status.update(sweep(mappings=3, mappings_released=1), 2.0)
    v = registry_for(NatdCollector(counting_tables(), config, status)).get_sample_value
    assert v("natd_mappings") == 3 and v("natd_mappings_released_total") == 3
    assert v("natd_icmp_unreachable_sent_total") == packets(Stat.ICMP_UNREACH_SENT)
    assert v("natd_icmp_unreachable_rate_limited_total") == packets(Stat.ICMP_UNREACH_RATE_LIMITED)
    assert v("natd_mapping_ports_shared_total") == packets(Stat.EIM_PORT_SHARED)
    assert v("natd_mapping_collisions_total") == packets(Stat.EIM_COLLISION)
    dropped = v("natd_packets_dropped_total", {"reason": "host_port_limit"})
    assert dropped == packets(Stat.DROP_HOST_PORT_LIMIT)
