"""natd.events without a datapath: formatting, RFC 6888 REQ-12 destination omission, clock conversion,
the log writer's error handling and reopening, the pump with fake rings, the event socket, natctl -E."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from natd import ctl, events
from natd.config import LogConfig
from natd.events import (
    NEW_MASK,
    Event,
    EventLogWriter,
    EventPump,
    EventSocket,
    WallClock,
    conntrack_line,
    decode_record,
    destroy_events,
    event_json,
    format_time,
    parse_event,
    parse_time,
)
from natd.maps import CtEntry, CtFlags, CtKey, NatEvent, NatEventType, ip_to_be32, port_to_be16
from natd.tables import FakeTables, Flow

pytestmark = pytest.mark.unit

T0 = 1_714_564_800_123_456_789  # 2024-05-01T12:00:00.123456789Z
UDP, TCP, ICMP = 17, 6, 1


def new_event(**kw: object) -> Event:
    base: dict[str, object] = dict(time_ns=T0, type=NatEventType.NEW, proto=UDP, inside_addr="10.0.1.42",
                                   inside_port=40000, external_addr="203.0.113.1", external_port=20001,
                                   remote_addr="198.51.100.10", remote_port=53)
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


def record(mono_ns: int, **kw: int) -> bytes:
    rec = NatEvent(time_ns=mono_ns, type=NatEventType.NEW, proto=UDP, flags=0,
                   inside_addr=ip_to_be32("10.0.1.42"), external_addr=ip_to_be32("203.0.113.1"),
                   remote_addr=ip_to_be32("198.51.100.10"), inside_port=port_to_be16(40000),
                   external_port=port_to_be16(20001), remote_port=port_to_be16(53))
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec.to_bytes()


def flow(proto: int = UDP, flags: int = 0) -> Flow:
    key = CtKey.make("10.0.1.42", "198.51.100.10", 40000, 0 if proto == ICMP else 53, proto)
    entry = CtEntry()
    entry.nat_addr = ip_to_be32("203.0.113.1")
    entry.nat_port = port_to_be16(20001)
    entry.flags = flags
    return key, entry


# --- time ----------------------------------------------------------------------------------------------


def test_time_is_iso8601_utc_with_milliseconds() -> None:
    assert format_time(T0) == "2024-05-01T12:00:00.123Z"
    assert format_time(0) == "1970-01-01T00:00:00.000Z"
    assert format_time(T0 + 999_000_000) == "2024-05-01T12:00:01.122Z"
    assert parse_time("2024-05-01T12:00:00.123Z") == T0 - 456_789
    with pytest.raises(ValueError, match="is not a time like"):
        parse_time("2024-05-01 12:00:00")


def test_monotonic_stamps_become_wall_clock_time() -> None:
    clock = WallClock(time_ns=lambda: T0, monotonic_ns=lambda: 5_000_000_000)
    offset = clock.offset_ns()
    assert offset == T0 - 5_000_000_000
    # a flow created 1.5 s of CLOCK_MONOTONIC before "now" is logged 1.5 s before now
    ev = decode_record(record(3_500_000_000), offset)
    assert ev.time_ns == T0 - 1_500_000_000
    assert json.loads(event_json(ev, False))["time"] == "2024-05-01T11:59:58.623Z"


def test_the_offset_follows_a_stepped_wall_clock() -> None:
    now = [T0]
    clock = WallClock(time_ns=lambda: now[0], monotonic_ns=lambda: 7)
    before = clock.offset_ns()
    now[0] += 3600 * 10**9
    assert clock.offset_ns() - before == 3600 * 10**9


# --- the record and JSON -------------------------------------------------------------------------------


def test_decode_record_fields() -> None:
    ev = decode_record(record(10, flags=int(CtFlags.INBOUND)), 100)
    assert ev == new_event(time_ns=110, inbound=True)
    with pytest.raises(ValueError, match="struct nat_event has 32"):
        decode_record(b"\0" * 16, 0)


def test_destinations_are_left_out_unless_configured() -> None:
    """RFC 6888 REQ-12: the destination is not logged by default."""
    ev = new_event()
    assert json.loads(event_json(ev, False)) == {
        "time": "2024-05-01T12:00:00.123Z", "event": "NEW", "proto": "udp", "inside": "10.0.1.42:40000",
        "external": "203.0.113.1:20001"}
    assert "198.51.100.10" not in event_json(ev, False)
    assert json.loads(event_json(ev, True))["destination"] == "198.51.100.10:53"


def test_destroy_events_from_deleted_flows() -> None:
    (ev,) = destroy_events([flow(flags=int(CtFlags.INBOUND | CtFlags.REPLIED))], T0, "timeout")
    assert ev == new_event(type=NatEventType.DESTROY, inbound=True, reason="timeout")
    line = json.loads(event_json(ev, False))
    assert (line["event"], line["reason"], line["inbound"]) == ("DESTROY", "timeout", True)
    with pytest.raises(ValueError, match="unknown DESTROY reason"):
        destroy_events([flow()], T0, "because")


def test_parse_event_is_the_inverse_of_event_json() -> None:
    for ev in (new_event(time_ns=T0 - 456_789), new_event(time_ns=T0 - 456_789, type=NatEventType.DESTROY,
                                                          reason="flush", inbound=True, proto=TCP)):
        assert parse_event(event_json(ev, True)) == ev
    # without a destination the remote is unknown
    assert parse_event(event_json(new_event(), False)).remote_addr == "0.0.0.0"


@pytest.mark.parametrize(("line", "message"), [
    ("nope", "not JSON"),
    ("[]", "expected a JSON object"),
    ('{"event":"UPDATE"}', "expected NEW or DESTROY"),
    ('{"event":"NEW","proto":"sctp"}', "expected tcp, udp or icmp"),
    ('{"event":"DESTROY","proto":"udp","time":"2024-05-01T12:00:00.123Z"}', "reason: expected one of"),
    ('{"event":"NEW","proto":"udp","time":"2024-05-01T12:00:00.123Z","inside":"10.0.1.42"}',
     'inside: expected "address:port"'),
    ('{"event":"NEW","proto":"udp","time":"2024-05-01T12:00:00.123Z","inside":"10.0.1.300:1",'
     '"external":"1.2.3.4:5"}', "is not an IPv4 address"),
])
def test_parse_event_errors_name_the_field(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_event(line)


def test_conntrack_lines() -> None:
    assert conntrack_line(new_event()) == (
        "    [NEW] udp      17 src=10.0.1.42 dst=198.51.100.10 sport=40000 dport=53 "
        "src=198.51.100.10 dst=203.0.113.1 sport=53 dport=20001")
    # opened from the internet: the remote's view first, like natctl -L
    inbound = new_event(type=NatEventType.DESTROY, proto=TCP, inbound=True, reason="timeout")
    assert conntrack_line(inbound) == (
        "[DESTROY] tcp      6 src=198.51.100.10 dst=203.0.113.1 sport=53 dport=20001 "
        "src=10.0.1.42 dst=198.51.100.10 sport=40000 dport=53")
    assert conntrack_line(new_event(proto=ICMP, remote_port=0)) == (
        "    [NEW] icmp     1 src=10.0.1.42 dst=198.51.100.10 type=8 code=0 id=40000 "
        "src=198.51.100.10 dst=203.0.113.1 type=0 code=0 id=20001")


# --- the log writer --------------------------------------------------------------------------------------


def test_writer_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    path.write_text("old\n")
    w = EventLogWriter(str(path))
    assert w.write(["a", "b"]) == 0
    assert w.write([]) == 0
    w.close()
    assert path.read_text() == "old\na\nb\n"


def test_writer_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    w = EventLogWriter("-")
    assert w.write(['{"event":"NEW"}']) == 0
    w.close()
    assert capfd.readouterr().err == '{"event":"NEW"}\n'


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_an_unwritable_log_is_reported_once_counted_and_retried(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "logs" / "events.log"  # the directory does not exist yet
    clock = Clock()
    with caplog.at_level(logging.DEBUG, logger="natd.events"):
        w = EventLogWriter(str(path), monotonic=clock)
        assert w.write(["a"]) == 1
        assert w.write(["b", "c"]) == 2  # within the retry interval: not even tried
        clock.t += 2
        assert w.write(["d"]) == 1  # tried again, still failing
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, "one error per outage"
        assert f"cannot write the NAT event log {path}: No such file or directory; create {path.parent}" \
            in errors[0].getMessage()
        assert "natd_events_write_errors_total" in errors[0].getMessage()
        path.parent.mkdir()
        clock.t += 2
        assert w.write(["e"]) == 0
    assert path.read_text() == "e\n"
    assert any("writable again; 4 events could not be written" in r.getMessage() for r in caplog.records)


def test_a_directory_is_not_a_log_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = EventLogWriter(str(tmp_path))
    assert w.write(["a"]) == 1
    assert "log.events must name a file, not a directory" in caplog.text


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_disk_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    w = EventLogWriter("/dev/full")
    assert w.write(["a", "b"]) == 2
    assert "No space left on device; free space on the file system of /dev" in caplog.text
    w.close()


def test_reopen_follows_logrotate(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    w = EventLogWriter(str(path))
    w.write(["before"])
    path.rename(tmp_path / "events.log.1")  # logrotate moves it away ...
    w.write(["still the old file"])
    w.reopen()  # ... and sends SIGHUP
    w.write(["after"])
    w.close()
    assert (tmp_path / "events.log.1").read_text() == "before\nstill the old file\n"
    assert path.read_text() == "after\n"


# --- the pump ----------------------------------------------------------------------------------------------


class FakeRing:
    def __init__(self, records: list[bytes]) -> None:
        self.records = records
        self.skipped = 0

    def read(self, limit: int = 4096) -> list[bytes]:
        out, self.records = self.records[:limit], self.records[limit:]
        return out

    def skip(self) -> int:
        self.skipped += len(self.records)
        self.records = []
        return 0

    def close(self) -> None:
        pass


def pump_for(log_config: LogConfig, ring: FakeRing | None = None, masks: list[int] | None = None,
             sock: EventSocket | None = None) -> EventPump:
    clock = WallClock(time_ns=lambda: T0, monotonic_ns=lambda: 10_000_000_000)
    return EventPump(log_config, ring=ring, set_mask=masks.append if masks is not None else None,  # type: ignore[arg-type]
                     socket=sock, clock=clock)


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pump_logs_new_and_destroy_events(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    masks: list[int] = []
    ring = FakeRing([record(9_000_000_000)])
    pump = pump_for(LogConfig(events=str(path)), ring, masks)
    assert masks == [NEW_MASK], "an event log switches the datapath's events on"
    pump.on_delete([flow()])
    pump.step(0)
    pump.finish()
    got = lines(path)
    assert [(e["event"], e["time"], e.get("reason")) for e in got] == [
        ("NEW", "2024-05-01T11:59:59.123Z", None), ("DESTROY", "2024-05-01T12:00:00.123Z", "timeout")]
    assert all("destination" not in e for e in got)
    assert masks == [NEW_MASK], "with an event log the datapath keeps emitting across a restart"
    assert pump.written == 2 and pump.write_errors == 0


def test_pump_with_destinations(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    pump = pump_for(LogConfig(events=str(path), log_destinations=True), FakeRing([record(1)]))
    pump.step(0)
    pump.finish()
    assert lines(path)[0]["destination"] == "198.51.100.10:53"


def test_pump_without_readers_emits_nothing_and_skips_the_ring(tmp_path: Path) -> None:
    masks: list[int] = []
    ring = FakeRing([record(1), record(2)])
    pump = pump_for(LogConfig(), ring, masks)
    assert masks == [0] and not pump.wanted
    pump.on_delete([flow()])  # nobody reads: not even queued
    pump.step(0)
    assert ring.skipped == 2
    pump.finish()
    assert masks == [0]


def test_reload_reopens_switches_and_follows_log_destinations(tmp_path: Path) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    masks: list[int] = []
    ring = FakeRing([])
    pump = pump_for(LogConfig(events=str(first)), ring, masks)
    ring.records.append(record(1))
    pump.step(0)
    first.rename(tmp_path / "a.log.1")
    pump.reconfigure(LogConfig(events=str(first), log_destinations=True))  # SIGHUP after logrotate
    ring.records.append(record(2))
    pump.step(0)
    pump.reconfigure(LogConfig(events=str(second)))
    ring.records.append(record(3))
    pump.step(0)
    pump.reconfigure(LogConfig())
    ring.records.append(record(4))
    pump.step(0)
    pump.finish()
    assert "destination" not in lines(tmp_path / "a.log.1")[0]
    assert "destination" in lines(first)[0]
    assert len(lines(second)) == 1
    assert masks == [NEW_MASK, 0], "switched off with the log"
    assert ring.skipped == 1


def test_write_errors_are_counted_and_the_pump_goes_on(tmp_path: Path) -> None:
    pump = pump_for(LogConfig(events=str(tmp_path)), FakeRing([record(1), record(2)]))  # a directory
    pump.step(0)
    pump.on_delete([flow()])
    pump.step(0)
    pump.finish()
    assert pump.write_errors == 3 and pump.written == 0


def test_too_many_waiting_deletions_are_dropped_and_counted(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "MAX_PENDING_DESTROY", 2)
    pump = pump_for(LogConfig(events=str(tmp_path / "e.log")))
    pump.on_delete([flow(), flow()])
    pump.on_delete([flow()])
    assert pump.dropped == 1
    pump.finish()
    assert len(lines(tmp_path / "e.log")) == 2


def test_the_thread_stops_promptly(tmp_path: Path) -> None:
    pump = pump_for(LogConfig(events=str(tmp_path / "e.log")), FakeRing([]))
    pump._interval = 60.0
    pump.start()
    pump.on_delete([flow()])
    pump.stop()
    pump.join(timeout=5)
    assert not pump.is_alive()
    assert len(lines(tmp_path / "e.log")) == 1


# --- the socket and natctl -E -------------------------------------------------------------------------------


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "events" / "test.sock")  # AF_UNIX paths are short: tmp_path is


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def spin(pump: EventPump, until: object, rounds: int = 50) -> None:
    for _ in range(rounds):
        pump.step(0.02)
        if callable(until) and until():
            return


def test_socket_is_private_and_removed(sock_path: str) -> None:
    sock = EventSocket(sock_path)
    assert os.stat(sock_path).st_mode & 0o777 == 0o600
    sock.close()
    assert not os.path.exists(sock_path)


def test_subscribers_get_every_event_with_destinations(tmp_path: Path, sock_path: str) -> None:
    masks: list[int] = []
    ring = FakeRing([])
    pump = pump_for(LogConfig(), ring, masks, EventSocket(sock_path))
    client = connect(sock_path)
    client.sendall(b'{"subscribe":true}\n')
    spin(pump, lambda: pump.wanted)
    assert masks == [0, NEW_MASK], "a natctl -E switches the datapath's events on"
    ring.records.append(record(1))
    pump.on_delete([flow()])
    pump.step(0)
    client.settimeout(2)
    stream = client.makefile("rb")
    got = [json.loads(stream.readline()) for _ in range(2)]
    assert [(g["event"], g["destination"]) for g in got] == [("NEW", "198.51.100.10:53"),
                                                             ("DESTROY", "198.51.100.10:53")]
    stream.close()
    client.close()
    spin(pump, lambda: not pump.wanted)
    assert masks == [0, NEW_MASK, 0], "and its leaving switches them off"
    pump.finish()


def test_natctl_deletions_are_logged(tmp_path: Path, sock_path: str) -> None:
    log_path = tmp_path / "e.log"
    pump = pump_for(LogConfig(events=str(log_path)), None, None, EventSocket(sock_path))
    settings = ctl.Settings(instance="test")
    err = io.StringIO()
    done = threading.Event()

    def natctl() -> None:
        ctl.notify_destroyed(settings, [flow(), flow(TCP)], "delete", err, lambda _: connect(sock_path))
        done.set()

    threading.Thread(target=natctl).start()
    spin(pump, lambda: done.is_set() and log_path.exists() and len(lines(log_path)) == 2)
    pump.finish()
    assert [(e["event"], e["proto"], e["reason"]) for e in lines(log_path)] == [
        ("DESTROY", "udp", "delete"), ("DESTROY", "tcp", "delete")]
    assert err.getvalue() == ""


def test_natctl_warns_when_natd_is_not_there_and_has_an_event_log() -> None:
    from natd.config import parse_config

    cfg = parse_config("inside: [a]\noutside: b\nsnat: [{from: 10.0.0.0/8}]\nlog: {events: /var/log/e}\n")
    err = io.StringIO()
    ctl.notify_destroyed(ctl.Settings(config=cfg), [flow()], "flush", err,
                         lambda s: ctl.connect_events(ctl.Settings(instance="no-such-natd-instance")))
    assert "natd did not get the 1 deleted flows, so its event log (/var/log/e) has no DESTROY" \
        in err.getvalue()


def test_a_slow_subscriber_loses_its_own_events_and_is_told(tmp_path: Path, sock_path: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    log_path = tmp_path / "e.log"
    sock = EventSocket(sock_path)
    pump = pump_for(LogConfig(events=str(log_path)), None, None, sock)
    client = connect(sock_path)
    client.sendall(b'{"subscribe":true}\n')
    spin(pump, lambda: sock.subscribers == 1)
    monkeypatch.setattr(events, "SUBSCRIBER_BUFFER", 1)  # this reader's queue is "full"
    for _ in range(3):
        pump.on_delete([flow()])
        pump.step(0)
    monkeypatch.setattr(events, "SUBSCRIBER_BUFFER", 1 << 20)  # it caught up
    pump.on_delete([flow(TCP)])
    pump.step(0)
    pump.finish()
    with client, client.makefile("rb") as stream:
        got = [json.loads(line) for line in stream]
    assert got[0] == {"event": "LOST", "count": 3}
    assert [(g["event"], g["proto"]) for g in got[1:]] == [("DESTROY", "tcp")]
    assert len(lines(log_path)) == 4, "the log has them all"


class ScriptedSocket:
    """What natctl -E reads: natd's lines, then EOF (or Ctrl-C)."""

    def __init__(self, data: bytes, interrupt: bool = False) -> None:
        self.a, self.b = socket.socketpair()
        self.b.sendall(data)
        if not interrupt:
            self.b.shutdown(socket.SHUT_WR)
        self.interrupt = interrupt

    def connect(self, settings: ctl.Settings) -> socket.socket:
        return self.a


class InterruptingOut(io.StringIO):
    def write(self, s: str) -> int:
        if self.getvalue():
            raise KeyboardInterrupt  # Ctrl-C after the first line
        return super().write(s)


@pytest.fixture
def scripted() -> Iterator[bytes]:
    ev = [new_event(), new_event(type=NatEventType.DESTROY, reason="timeout", inside_addr="10.0.2.80")]
    yield b"".join((event_json(e, True) + "\n").encode() for e in ev) + b'{"event":"LOST","count":7}\n'


def run_natctl(argv: list[str], sock: ScriptedSocket,
               capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = ctl.run(argv, connect=sock.connect, default_config=None,
                 open_tables=lambda s: FakeTables())
    out, err = capsys.readouterr()
    return rc, out, err


def test_natctl_E_prints_conntrack_lines(scripted: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    sock = ScriptedSocket(scripted)
    rc, out, err = run_natctl(["-E"], sock, capsys)
    assert rc == 1 and "natd closed the event stream" in err
    assert out.splitlines() == [conntrack_line(new_event()),
                                conntrack_line(new_event(type=NatEventType.DESTROY, reason="timeout",
                                                         inside_addr="10.0.2.80"))]
    assert "warning: 7 events were not shown: natctl -E fell behind" in err
    assert sock.b.recv(100) == b'{"subscribe":true}\n'


def test_natctl_E_json_and_filters(scripted: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_natctl(["-E", "-o", "json", "-s", "10.0.2.0/24"], ScriptedSocket(scripted), capsys)
    assert rc == 1  # the scripted natd closed the stream
    (line,) = out.splitlines()
    assert json.loads(line)["inside"] == "10.0.2.80:40000"


def test_natctl_E_ctrl_c_exits_0(scripted: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = InterruptingOut(), io.StringIO()
    a, b = socket.socketpair()
    b.sendall(scripted)
    assert ctl.follow_events(a, ctl.FlowFilter(), "text", out, err) == 0
    assert "1 flow events have been shown" in err.getvalue()
    b.close()


def test_natctl_E_without_natd(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATD_RUN_DIR", str(tmp_path))
    rc = ctl.run(["-E", "--instance", "edge"], default_config=None)
    err = capsys.readouterr().err
    assert rc == 1
    assert (f"natctl: error: no natd event socket at {tmp_path}/events/edge.sock (No such file or "
            "directory): is natd running with instance 'edge'?") in err


# --- metrics ---------------------------------------------------------------------------------------------


def test_metrics_count_lost_events_and_write_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry

    from natd.config import parse_config
    from natd.maps import Stat
    from natd.metrics import NatdCollector, ReaperStatus

    tables = FakeTables(ncpu=2)
    tables.counters[0][Stat.EVENTS_LOST] = (5, 0)
    tables.counters[1][Stat.EVENTS_LOST] = (2, 0)
    monkeypatch.setattr(events, "MAX_PENDING_DESTROY", 1)
    pump = pump_for(LogConfig(events=str(tmp_path)))  # a directory: every write fails
    pump.on_delete([flow()])
    pump.on_delete([flow()])  # one waiting already: dropped
    pump.step(0)
    config = parse_config("inside: [a]\noutside: b\nsnat: [{from: 10.0.0.0/8}]\n")
    registry = CollectorRegistry()
    registry.register(NatdCollector(tables, config, ReaperStatus(), events=pump))
    assert registry.get_sample_value("natd_events_lost_total") == 5 + 2 + 1
    assert registry.get_sample_value("natd_events_write_errors_total") == 1
    registry = CollectorRegistry()
    registry.register(NatdCollector(tables, config, ReaperStatus()))  # natd without an event pump
    assert registry.get_sample_value("natd_events_lost_total") == 7
    assert registry.get_sample_value("natd_events_write_errors_total") == 0
    pump.finish()
