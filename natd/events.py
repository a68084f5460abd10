"""NAT events: the event log (RFC 6888 REQ-12) and the live stream behind ``natctl -E``.

Where events come from
----------------------
* NEW: the datapath, when it creates a flow (``ct_commit()`` -> ``nat_event_emit()``, ebpf/lib/events.h),
  as a ``struct nat_event`` record in the pinned ``nat_events`` BPF ring buffer.
* DESTROY: natd itself, when a flow is deleted: the reaper's ``on_delete`` hook (reason ``timeout``) and
  ``natctl -D`` / ``natctl -F``, which send the flows they deleted to natd over the event socket (reason
  ``delete`` / ``flush``). Flows removed by ``natd --detach`` (an uninstall) are not logged.

One consumer
------------
A BPF ring buffer has one consumer position, in the map: two readers would each get part of the events.
So :class:`EventPump`, a thread of natd, is the only reader of ``nat_events``; it writes the event log and
republishes every event to the ``natctl -E`` processes connected to its unix socket
(:func:`socket_path`: ``/run/natd/events/<instance>.sock``). A reader that falls behind loses its own
events (it is told how many), never the log's, and never slows natd down.

Cost on the fast path
---------------------
The datapath emits only the types set in ``event_ctl`` (a mask of ``1 << NatEventType``): the pump sets
NEW while an event log is configured or a ``natctl -E`` is connected, and clears it otherwise, so without
readers a new flow costs one array lookup. Records are submitted with ``BPF_RB_NO_WAKEUP``: no per-event
wake-up; the pump drains the ring every :data:`POLL_INTERVAL_S` (and continuously while it is busy), so
wake-ups are batched by time whatever the flow rate. A full ring drops the event in the datapath and counts
it (``STAT_EVENTS_LOST``, ``natd_events_lost_total``); the packet is translated as usual. With an event log
configured the mask stays set when natd exits, so the pinned ring keeps the events of a restart's gap for
the next natd (up to its size; beyond that they are counted lost).

The log
-------
One JSON object per line, e.g.::

    {"time":"2024-05-01T12:00:00.123Z","event":"NEW","proto":"udp","inside":"10.0.1.42:40000",
     "external":"203.0.113.1:20001"}
    {"time":"2024-05-01T12:00:30.500Z","event":"DESTROY","proto":"udp","inside":"10.0.1.42:40000",
     "external":"203.0.113.1:20001","reason":"timeout"}

``destination`` (the remote endpoint) is added only with ``log.log_destinations: true`` (RFC 6888 REQ-12:
not logged by default); ``inbound: true`` marks flows opened from the internet (port forwards, static NAT).
For ICMP echo the port is the identifier (the destination's is 0). Times are UTC with milliseconds; the
datapath's CLOCK_MONOTONIC stamps are converted with the offset between the two clocks at the time the
batch is read (:class:`WallClock`). The file is opened for appending and written one batch of whole lines
per ``write()``; SIGHUP (``Daemon.reload``) reopens it, for logrotate. A write that fails (no such
directory, permissions, disk full) is logged once per outage and counted in
``natd_events_write_errors_total``; natd retries every :data:`RETRY_S` and the datapath never notices.
``log.events: "-"`` writes the lines to standard error instead.
"""

from __future__ import annotations

import calendar
import collections
import contextlib
import ctypes
import errno
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from natd.config import LogConfig
from natd.errors import NatdError
from natd.fmt import ICMP_ECHO, ICMP_ECHOREPLY, flow_tuples, ip_str, port_host
from natd.maps import (
    PROTO_ICMP,
    PROTO_NAMES,
    PROTO_NUMBERS,
    CtEntry,
    CtFlags,
    CtKey,
    NatEvent,
    NatEventType,
    ip_to_be32,
    port_to_be16,
)
from natd.ringbuf import RingBuffer
from natd.tables import Flow, PinnedTables

__all__ = [
    "POLL_INTERVAL_S",
    "REASONS",
    "RETRY_S",
    "Event",
    "EventLogWriter",
    "EventPump",
    "EventSocket",
    "WallClock",
    "conntrack_line",
    "decode_record",
    "destroy_events",
    "event_ctl_setter",
    "event_json",
    "format_time",
    "parse_event",
    "parse_time",
    "socket_path",
]

log = logging.getLogger("natd.events")

POLL_INTERVAL_S = 0.1          # the pump drains the ring at least this often
READ_BATCH = 4096              # ring records per read; a full batch means "more to come": no sleep
RETRY_S = 1.0                  # an event log that failed is reopened at most this often
MAX_PENDING_DESTROY = 1 << 20  # deleted flows waiting for their DESTROY line; more are dropped, counted
SUBSCRIBER_BUFFER = 4 << 20    # bytes queued for one natctl -E before its events are dropped
MAX_CLIENTS = 64
MAX_LINE = 1 << 16             # longest line natd accepts on the event socket
RUN_DIR = "/run/natd"
NEW_MASK = 1 << NatEventType.NEW
REASONS = ("timeout", "delete", "flush")  # why a flow was destroyed: reaper, natctl -D, natctl -F
_EVENT_NAMES = {NatEventType.NEW: "NEW", NatEventType.DESTROY: "DESTROY"}
_EVENT_TYPES = {name: t for t, name in _EVENT_NAMES.items()}
_INBOUND = int(CtFlags.INBOUND)
_NS = 1_000_000_000


def socket_path(instance: str, run_dir: str | None = None) -> str:
    """The event socket of a natd instance: ``<run_dir>/events/<instance>.sock``; run_dir defaults to
    $NATD_RUN_DIR, else /run/natd."""
    base = run_dir or os.environ.get("NATD_RUN_DIR") or RUN_DIR
    return os.path.join(base, "events", f"{instance}.sock")


# --- the event ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One NAT event. Addresses are dotted quads, ports host-order integers; ``time_ns`` is Unix time."""

    time_ns: int
    type: NatEventType
    proto: int
    inside_addr: str
    inside_port: int
    external_addr: str
    external_port: int
    remote_addr: str
    remote_port: int
    inbound: bool = False
    reason: str | None = None  # DESTROY: one of REASONS

    @property
    def name(self) -> str:
        return _EVENT_NAMES[self.type]

    def flow(self) -> Flow:
        """The event's flow as a (ct_orig key, entry) pair: only the tuple fields are filled in."""
        key = CtKey.make(self.inside_addr, self.remote_addr, self.inside_port, self.remote_port, self.proto)
        entry = CtEntry()
        entry.nat_addr = ip_to_be32(self.external_addr)
        entry.nat_port = port_to_be16(self.external_port)
        entry.flags = _INBOUND if self.inbound else 0
        return key, entry


class WallClock:
    """Converts CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns()) to Unix time. The offset between the two
    clocks is taken at each :meth:`offset_ns` call, so a stepped wall clock is followed."""

    def __init__(self, time_ns: Callable[[], int] = time.time_ns,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._time_ns = time_ns
        self._monotonic_ns = monotonic_ns

    def offset_ns(self) -> int:
        return self._time_ns() - self._monotonic_ns()

    def now_ns(self) -> int:
        return self._time_ns()


_RECORD_SIZE = ctypes.sizeof(NatEvent)


def decode_record(raw: bytes, offset_ns: int) -> Event:
    """A nat_events record (struct nat_event) as an Event; ``offset_ns`` = Unix - monotonic time."""
    if len(raw) != _RECORD_SIZE:
        raise ValueError(f"nat_events record of {len(raw)} bytes; struct nat_event has {_RECORD_SIZE}")
    rec = NatEvent.from_buffer_copy(raw)
    return Event(
        time_ns=int(rec.time_ns) + offset_ns,
        type=NatEventType(rec.type),
        proto=int(rec.proto),
        inside_addr=ip_str(rec.inside_addr),
        inside_port=port_host(rec.inside_port),
        external_addr=ip_str(rec.external_addr),
        external_port=port_host(rec.external_port),
        remote_addr=ip_str(rec.remote_addr),
        remote_port=port_host(rec.remote_port),
        inbound=bool(rec.flags & _INBOUND),
    )


def destroy_events(flows: Iterable[Flow], time_ns: int, reason: str) -> list[Event]:
    """DESTROY events for deleted flows (ct_orig key and entry each), all at Unix time ``time_ns``."""
    if reason not in REASONS:
        raise ValueError(f"unknown DESTROY reason {reason!r}; expected one of {', '.join(REASONS)}")
    out = []
    for key, entry in flows:
        out.append(Event(time_ns, NatEventType.DESTROY, int(key.proto), ip_str(key.saddr),
                         port_host(key.sport), ip_str(entry.nat_addr), port_host(entry.nat_port),
                         ip_str(key.daddr), port_host(key.dport), bool(entry.flags & _INBOUND), reason))
    return out


# --- text ---------------------------------------------------------------------------------------------


_last_second: list[tuple[int, str]] = [(-1, "")]  # format_time's cache: events come in bursts


def format_time(ns: int) -> str:
    """Unix time in ns as ISO 8601 UTC with milliseconds: 2024-05-01T12:00:00.123Z."""
    sec, rem = divmod(ns, _NS)
    cached_sec, text = _last_second[0]
    if sec != cached_sec:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _last_second[0] = (sec, text)
    return f"{text}.{rem // 1_000_000:03d}Z"


def parse_time(text: str) -> int:
    """The inverse of :func:`format_time` (ms resolution); ValueError when it is not that format."""
    if len(text) != 24 or text[19] != "." or text[23] != "Z" or not text[20:23].isdigit():
        raise ValueError(f"{text!r} is not a time like 2024-05-01T12:00:00.123Z")
    sec = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    return sec * _NS + int(text[20:23]) * 1_000_000


def _proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


def event_json(ev: Event, destinations: bool) -> str:
    """One line of the event log (without the newline); ``destination`` only when ``destinations``."""
    obj: dict[str, Any] = {
        "time": format_time(ev.time_ns),
        "event": ev.name,
        "proto": _proto_name(ev.proto),
        "inside": f"{ev.inside_addr}:{ev.inside_port}",
        "external": f"{ev.external_addr}:{ev.external_port}",
    }
    if destinations:
        obj["destination"] = f"{ev.remote_addr}:{ev.remote_port}"
    if ev.inbound:
        obj["inbound"] = True
    if ev.reason is not None:
        obj["reason"] = ev.reason
    return json.dumps(obj, separators=(",", ":"))


def _endpoint(obj: dict[str, Any], name: str) -> tuple[str, int]:
    value = obj.get(name)
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"{name}: expected \"address:port\", got {value!r}")
    addr, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{name}: {port!r} is not a port")
    try:
        socket.inet_aton(addr)
    except OSError:
        raise ValueError(f"{name}: {addr!r} is not an IPv4 address") from None
    return addr, int(port)


def parse_event(line: str | bytes) -> Event:
    """An event from one JSON line as :func:`event_json` writes it (with ``destination``: an event without
    one has the remote 0.0.0.0:0). ValueError that names the problem."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    name = obj.get("event")
    etype = _EVENT_TYPES.get(name) if isinstance(name, str) else None
    if etype is None:
        raise ValueError(f"event: expected NEW or DESTROY, got {obj.get('event')!r}")
    proto_name = obj.get("proto")
    proto = PROTO_NUMBERS.get(proto_name) if isinstance(proto_name, str) else None
    if proto is None:
        raise ValueError(f"proto: expected tcp, udp or icmp, got {proto_name!r}")
    time_text = obj.get("time")
    if not isinstance(time_text, str):
        raise ValueError("time: missing")
    reason = obj.get("reason")
    if etype is NatEventType.DESTROY and reason not in REASONS:
        raise ValueError(f"reason: expected one of {', '.join(REASONS)}, got {reason!r}")
    if etype is NatEventType.NEW and reason is not None:
        raise ValueError("reason: only DESTROY events have one")
    inside, external = _endpoint(obj, "inside"), _endpoint(obj, "external")
    remote = _endpoint(obj, "destination") if "destination" in obj else ("0.0.0.0", 0)
    return Event(parse_time(time_text), etype, proto, *inside, *external, *remote,
                 inbound=obj.get("inbound") is True, reason=reason)


def _tuple_text(proto: int, saddr: int, daddr: int, sport: int, dport: int, icmp_type: int) -> str:
    if proto == PROTO_ICMP:
        ident = sport if icmp_type == ICMP_ECHO else dport
        return f"src={ip_str(saddr)} dst={ip_str(daddr)} type={icmp_type} code=0 id={port_host(ident)}"
    return f"src={ip_str(saddr)} dst={ip_str(daddr)} sport={port_host(sport)} dport={port_host(dport)}"


def conntrack_line(ev: Event) -> str:
    """The event the way ``conntrack -E`` prints it: the event type right-aligned in brackets, protocol
    name and number, then the original and the reply tuple (natd.fmt.flow_tuples: the initiator's view
    first, so flows opened from the internet start with the remote)::

            [NEW] udp      17 src=10.0.1.42 dst=198.51.100.10 sport=40000 dport=53 \
    src=198.51.100.10 dst=203.0.113.1 sport=53 dport=20001
    """
    key, entry = ev.flow()
    orig, reply = flow_tuples(key, entry)
    head = f"{'[' + ev.name + ']':>9} {_proto_name(ev.proto):<8} {ev.proto} "
    return (f"{head}{_tuple_text(ev.proto, *orig, ICMP_ECHO)} "
            f"{_tuple_text(ev.proto, *reply, ICMP_ECHOREPLY)}")


# --- the log file -------------------------------------------------------------------------------------


class EventLogWriter:
    """Appends lines to the event log (a path, or "-" for standard error); never raises on I/O errors.

    :meth:`write` returns how many lines it could not write. The first failure of an outage is logged
    (with the path and what to do), the rest only counted; the file is reopened at the next write at most
    every ``retry_s``; when writing works again that is logged with the number of lines lost.
    """

    def __init__(self, path: str, *, retry_s: float = RETRY_S,
                 monotonic: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:
        self.path = path
        self._retry_s = retry_s
        self._monotonic = monotonic
        self._log = logger
        self._fd = -1
        self._failed_at: float | None = None  # monotonic time of the last failure (None: healthy)
        self._lost_in_outage = 0
        self._torn = False  # a partial write left half a line: start the next write on a new line
        self._open()

    @property
    def healthy(self) -> bool:
        return self._failed_at is None

    def _open(self) -> bool:
        if self.path == "-":
            self._fd = 2
            return True
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            self._fail(exc, 0)
            return False
        return True

    def _close(self) -> None:
        if self._fd > 2:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1

    def _fail(self, exc: OSError, lost: int) -> None:
        self._close()
        first = self._failed_at is None
        self._failed_at = self._monotonic()
        self._lost_in_outage += lost
        if first:
            self._log.error("cannot write the NAT event log %s: %s; %s. natd keeps translating, counts the "
                            "events it cannot write (natd_events_write_errors_total) and retries every "
                            "%.0f s", self.path, exc.strerror or exc, _hint(exc, self.path), self._retry_s)
        else:
            self._log.debug("NAT event log %s still failing: %s", self.path, exc.strerror or exc)

    def write(self, lines: Sequence[str]) -> int:
        """Append ``lines`` (without newlines) in one write; returns the number NOT written."""
        if not lines:
            return 0
        if self._fd < 0:
            if self._failed_at is not None and self._monotonic() - self._failed_at < self._retry_s:
                self._lost_in_outage += len(lines)
                return len(lines)
            if not self._open():
                self._lost_in_outage += len(lines)
                return len(lines)
        prefix = b"\n" if self._torn else b""  # a failed write left half a line: end it first
        data = prefix + ("\n".join(lines) + "\n").encode()
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError as exc:
            if done:
                self._torn = data[done - 1:done] != b"\n"
            written = data[:done].count(b"\n") - (1 if prefix and done else 0)
            lost = len(lines) - written
            self._fail(exc, lost)
            return lost
        self._torn = False
        if self._failed_at is not None:
            self._log.info("the NAT event log %s is writable again; %d events could not be written",
                           self.path, self._lost_in_outage)
            self._failed_at = None
            self._lost_in_outage = 0
        return 0

    def reopen(self) -> None:
        """Close and open the file again (SIGHUP: logrotate moved it away)."""
        self._close()
        self._open()

    def close(self) -> None:
        self._close()


def _hint(exc: OSError, path: str) -> str:
    parent = os.path.dirname(path) or "."
    if exc.errno == errno.ENOENT:
        return f"create {parent} (systemd: LogsDirectory=natd for /var/log/natd)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"make {path} writable for natd (systemd: ProtectSystem=strict allows only LogsDirectory= "
                "and ReadWritePaths=)")
    if exc.errno == errno.EISDIR:
        return "log.events must name a file, not a directory"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on the file system of {parent}"
    return "check log.events"


# --- the socket natctl talks to -----------------------------------------------------------------------


@dataclass
class _Client:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    subscriber: bool = False
    missed: int = 0
    warned: bool = False


class EventSocket:
    """natd's end of the event socket (a unix stream socket, mode 0600).

    natctl sends one JSON line per request: ``{"subscribe":true}`` makes the connection a subscriber
    that gets every event as a JSON line (with ``destination``; it is a live view, not a log), and a line
    that is an event (``natctl -D/-F``: the flows it deleted, as DESTROY events) is logged and published
    like natd's own. A subscriber whose :data:`SUBSCRIBER_BUFFER` is full misses events; it then gets
    ``{"event":"LOST","count":N}`` before the next one. All I/O is non-blocking: :meth:`handle` after a
    poll() on :meth:`poll_fds`.
    """

    def __init__(self, path: str, *, logger: logging.Logger = log) -> None:
        self.path = path
        self._log = logger
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a crashed natd's socket
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            self._listener.bind(path)
            os.chmod(path, 0o600)
            self._listener.listen(16)
            self._inode = os.stat(path).st_ino
        except OSError:
            self._listener.close()
            raise
        self._clients: dict[int, _Client] = {}

    @property
    def subscribers(self) -> int:
        return sum(1 for c in self._clients.values() if c.subscriber)

    def poll_fds(self) -> list[tuple[int, int]]:
        fds = [(self._listener.fileno(), select.POLLIN)]
        for fd, c in self._clients.items():
            fds.append((fd, select.POLLIN | (select.POLLOUT if c.outbuf else 0)))
        return fds

    def handle(self, fd: int, mask: int) -> list[Event]:
        """Work for one ready fd; returns the events clients sent."""
        if fd == self._listener.fileno():
            self._accept()
            return []
        client = self._clients.get(fd)
        if client is None:
            return []
        events: list[Event] = []
        if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
            events = self._read(fd, client)
        if fd in self._clients and mask & select.POLLOUT:
            self._flush(fd, client)
        return events

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log.warning("event socket %s: accept failed: %s", self.path, exc)
                return
            if len(self._clients) >= MAX_CLIENTS:
                sock.close()
                self._log.warning("event socket %s: more than %d natctl connections, refusing one",
                                  self.path, MAX_CLIENTS)
                continue
            sock.setblocking(False)
            self._clients[sock.fileno()] = _Client(sock)

    def _read(self, fd: int, client: _Client) -> list[Event]:
        events: list[Event] = []
        try:
            data = client.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return events
        except OSError:
            data = b""
        client.inbuf += data
        while True:
            end = client.inbuf.find(b"\n")
            if end < 0:
                break
            line = bytes(client.inbuf[:end])
            del client.inbuf[:end + 1]
            self._request(client, line, events)
        if len(client.inbuf) > MAX_LINE:
            self._warn(client, f"a line longer than {MAX_LINE} bytes")
            self._drop(fd)
        elif not data:
            if client.inbuf.strip():
                self._request(client, bytes(client.inbuf), events)
            self._drop(fd)
        return events

    def _request(self, client: _Client, line: bytes, events: list[Event]) -> None:
        if not line.strip():
            return
        if line.strip() == b'{"subscribe":true}':
            client.subscriber = True
            return
        try:
            events.append(parse_event(line))
        except ValueError as exc:
            self._warn(client, f"not an event ({exc})")

    def _warn(self, client: _Client, what: str) -> None:
        if not client.warned:
            client.warned = True
            self._log.warning("event socket %s: ignoring %s from a client", self.path, what)

    def _drop(self, fd: int) -> None:
        client = self._clients.pop(fd, None)
        if client is not None:
            client.sock.close()

    def _flush(self, fd: int, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the reader went away
            self._drop(fd)
            return
        del client.outbuf[:sent]

    def publish(self, lines: Sequence[str]) -> None:
        """Queue ``lines`` for every subscriber and send what the sockets take now."""
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode()
        for fd, client in list(self._clients.items()):
            if not client.subscriber:
                continue
            if len(client.outbuf) + len(data) > SUBSCRIBER_BUFFER:
                client.missed += len(lines)
            else:
                if client.missed:
                    client.outbuf += b'{"event":"LOST","count":%d}\n' % client.missed
                    client.missed = 0
                client.outbuf += data
            if client.outbuf:
                self._flush(fd, client)

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        self._listener.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:  # still ours, not a newer natd's
                os.unlink(self.path)


# --- the thread -----------------------------------------------------------------------------------------


def event_ctl_setter(tables: PinnedTables) -> Callable[[int], None]:
    """Writes event_ctl[0] (the event types the datapath emits) of a natd.tables.PinnedTables."""
    key = struct.pack("<I", 0)

    def set_mask(mask: int) -> None:
        tables.map("event_ctl").update(key, struct.pack("<I", mask))

    return set_mask


class EventPump(threading.Thread):
    """Reads NEW events from the ring buffer and DESTROY events from :meth:`on_delete` and the socket,
    writes the log, feeds ``natctl -E``. Start it, :meth:`stop` and join it; :meth:`reconfigure` on reload.

    Every piece is optional, for tests: ``ring`` (None: no datapath events), ``set_mask`` (None: nothing to
    tell the datapath), ``socket`` (None: no natctl). :meth:`step` is one iteration, callable without
    starting the thread.
    """

    def __init__(self, log_config: LogConfig, *, ring: RingBuffer | None = None,
                 set_mask: Callable[[int], None] | None = None, socket: EventSocket | None = None,
                 clock: WallClock | None = None, interval: float = POLL_INTERVAL_S,
                 logger: logging.Logger = log) -> None:
        super().__init__(name="natd-events", daemon=True)
        self._log = logger
        self._ring = ring
        self._set_mask = set_mask
        self._socket = socket
        self._clock = clock or WallClock()
        self._interval = interval
        self._config = log_config
        self._writer = EventLogWriter(log_config.events, logger=logger) if log_config.events else None
        self._pending: collections.deque[tuple[Sequence[Flow], int, str]] = collections.deque()
        self._pending_flows = 0
        self._pending_lock = threading.Lock()
        self._requests: collections.deque[LogConfig] = collections.deque()
        self._stopping = threading.Event()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._mask: int | None = None
        self.write_errors = 0  # events the log could not take (natd_events_write_errors_total)
        self.dropped = 0  # DESTROY events dropped, too many deleted flows waiting (natd_events_lost_total)
        self.written = 0  # events written to the log
        self.wanted = False  # someone reads events: the log or a natctl -E
        self._update_mask()

    @classmethod
    def open(cls, pin_dir: str, tables: PinnedTables, log_config: LogConfig, instance: str,
             logger: logging.Logger = log) -> EventPump:
        """The pump of a running datapath: its pinned ring buffer and event_ctl, and the event socket of
        ``instance`` (if that socket cannot be made, natd runs without it: natctl -E is then unavailable).
        Raises StateError when the ring buffer is missing."""
        ring = RingBuffer.open_pinned(os.path.join(pin_dir, "nat_events"))
        path = socket_path(instance)
        sock: EventSocket | None = None
        try:
            sock = EventSocket(path, logger=logger)
        except OSError as exc:
            logger.warning("cannot create the event socket %s: %s; natctl -E and the logging of natctl -D/-F "
                           "deletions are unavailable (systemd: RuntimeDirectory=natd)", path,
                           exc.strerror or exc)
        try:
            return cls(log_config, ring=ring, set_mask=event_ctl_setter(tables), socket=sock, logger=logger)
        except BaseException:
            ring.close()
            if sock is not None:
                sock.close()
            raise

    # -- feeding it (any thread) -----------------------------------------------------------------------
    def on_delete(self, flows: Sequence[Flow]) -> None:
        """The reaper's hook: these flows timed out and were deleted."""
        self.destroyed(flows, "timeout")

    def destroyed(self, flows: Sequence[Flow], reason: str) -> None:
        """Queue DESTROY events for deleted flows (formatted on the pump's thread)."""
        if not self.wanted or not len(flows):
            return
        with self._pending_lock:
            if self._pending_flows + len(flows) > MAX_PENDING_DESTROY:
                self.dropped += len(flows)
                return
            self._pending_flows += len(flows)
            self._pending.append((flows, self._clock.now_ns(), reason))
        self._wake()

    def reconfigure(self, log_config: LogConfig) -> None:
        """Apply a (re)loaded ``log`` section on the pump's thread: reopen the log file (also when its path
        did not change: logrotate), switch it on or off, follow log_destinations."""
        self._requests.append(log_config)
        self._wake()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self.step(self._interval)
                except Exception:  # a bug must not end the thread: log it, back off, carry on
                    self._log.exception("NAT event processing failed; retrying")
                    self._stopping.wait(1.0)
        finally:
            self.finish()

    def step(self, timeout: float) -> None:
        """One iteration: apply reloads, drain the ring and the DESTROY queue, then wait up to ``timeout``
        for the socket or a wake-up (not at all when the ring had more)."""
        while self._requests:
            self._apply(self._requests.popleft())
        more = self._drain_ring()
        self._drain_destroyed()
        self._poll(0.0 if more else timeout)
        self._update_mask()

    def _apply(self, config: LogConfig) -> None:
        if self._writer is not None and config.events == self._writer.path:
            self._writer.reopen()
        else:
            if self._writer is not None:
                self._writer.close()
            self._writer = EventLogWriter(config.events, logger=self._log) if config.events else None
            self._log.info("NAT event log: %s", config.events or "off")
        self._config = config
        self._update_mask()

    def _drain_ring(self) -> bool:
        ring = self._ring
        if ring is None:
            return False
        if not self.wanted:
            ring.skip()
            return False
        records = ring.read(READ_BATCH)
        if records:
            offset = self._clock.offset_ns()
            events = []
            for raw in records:
                try:
                    events.append(decode_record(raw, offset))
                except ValueError as exc:  # a record of another layout: never from this datapath
                    self._log.warning("skipping a nat_events record: %s", exc)
            self._dispatch(events)
        return len(records) >= READ_BATCH

    def _drain_destroyed(self) -> None:
        while True:
            with self._pending_lock:
                if not self._pending:
                    return
                flows, when, reason = self._pending.popleft()
                self._pending_flows -= len(flows)
            self._dispatch(destroy_events(flows, when, reason))

    def _poll(self, timeout: float) -> None:
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        if self._socket is not None:
            for fd, mask in self._socket.poll_fds():
                poller.register(fd, mask)
        for fd, mask in poller.poll(int(timeout * 1000)):
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
            elif self._socket is not None:
                self._dispatch(self._socket.handle(fd, mask))

    def _dispatch(self, events: Sequence[Event]) -> None:
        if not events:
            return
        if self._writer is not None:
            destinations = self._config.log_destinations
            failed = self._writer.write([event_json(ev, destinations) for ev in events])
            self.write_errors += failed
            self.written += len(events) - failed
        if self._socket is not None and self._socket.subscribers:
            self._socket.publish([event_json(ev, True) for ev in events])

    def _update_mask(self) -> None:
        self.wanted = self._writer is not None or bool(self._socket and self._socket.subscribers)
        mask = NEW_MASK if self.wanted else 0
        if mask != self._mask:
            self._write_mask(mask)

    def _write_mask(self, mask: int) -> None:
        if self._set_mask is None:
            self._mask = mask
            return
        try:
            self._set_mask(mask)
        except NatdError as exc:
            self._log.error("cannot switch the datapath's NAT events %s: %s", "on" if mask else "off", exc)
            return
        self._mask = mask

    def finish(self) -> None:
        """Last drain, then close everything. With an event log the datapath keeps emitting into the pinned
        ring (the next natd logs what happened in between); without one it stops."""
        try:
            while self._requests:
                self._apply(self._requests.popleft())
            while self._drain_ring():
                pass
            self._drain_destroyed()
        except Exception:
            self._log.exception("NAT events: the last drain failed")
        if self._writer is None and self._mask != 0:
            self._write_mask(0)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._writer is not None:
            self._writer.close()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        with contextlib.suppress(OSError):
            os.close(self._wake_fd)
        self._wake_fd = -1
