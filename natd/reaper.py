"""Conntrack expiry: the control plane's half of the flow table's life cycle.

The datapath creates flows and stamps every packet's time into ``last_seen_ns``
(``bpf_ktime_get_ns()``, i.e. CLOCK_MONOTONIC, the clock of :func:`time.monotonic_ns`), but it never
removes anything: ct_orig is a plain hash (RFC 6888 REQ-11: a full table refuses new flows rather than
evicting live ones), so a flow lives until this module deletes it. A flow expires when it has been idle
longer than the timeout of its protocol and state (``Timeouts.for_state(proto, state, replied)``).

One sweep (:meth:`Reaper.sweep`):

1. read ct_reply (:meth:`Tables.reply_index`), THEN ct_orig (:meth:`Tables.flows`), each with batch
   lookups. The order matters for orphans, see 4.
2. find the expired flows in that snapshot.
3. re-check each expired flow against the live map and delete (both halves) only those that are still
   expired. A flow that saw a packet after the snapshot was read survives.
4. delete orphaned reply entries: a reply whose original key is missing from the ct_orig read (which
   came after the ct_reply read). The datapath inserts the reply half first, then the original, within
   one XDP run, so a flow being created while we read has its original in the later ct_orig read. The
   other way a reply can be briefly alone is a create that fails (table full: the datapath removes the
   reply again microseconds later); deleting such a transient entry *by key* could instead hit the same
   key re-claimed by a new flow in the meantime. So a reply is deleted only when it is seen orphaned,
   with the same original key, in two consecutive sweeps (and, when the table supports it, its original
   is looked up once more right before): a real orphan cannot be re-claimed, because its key is taken.

Re-check cost (step 3), the trade-off
-------------------------------------
Re-checking key by key is exact up to a few milliseconds (a chunk of ``RECHECK_CHUNK`` = 1024 lookups is
deleted right after it was checked) but costs one syscall per expired flow, ~4 us. Re-reading the whole
table costs one more :meth:`Tables.flows` whatever the number of expired flows, but a flow refreshed
between that re-read and its delete (up to the length of the re-read plus the deletes) is lost. The
reaper picks per sweep:

* per key, when ``Tables.lookup_flow`` exists and the expired flows number at most
  ``RECHECK_LOOKUP_MAX`` (65536, ~0.26 s), or their lookups (``LOOKUP_COST_S`` each) would take no
  longer than this sweep's own :meth:`Tables.flows` read did;
* otherwise (mass expiry after a SYN flood with a fast table read, or a Tables without ``lookup_flow``):
  one more :meth:`Tables.flows`, then batch deletes of what is still expired in it, ``DELETE_CHUNK`` at a
  time.

So the re-check never costs more than max(0.26 s, one table read), and prefers the exact method whenever
it is not the more expensive one. Measured on the dev box (1M ct_orig entries, BCC-created pinned map):
the raw batch lookup takes 0.8 s, :meth:`PinnedTables.flows` with its ctypes objects 4.3 s, one
``lookup_flow`` 3.4 us, this module's scan of the snapshot 0.4 s. With those numbers per-key always wins.

Nothing is deleted that was refreshed before its re-check. No user-space reaper can close the last window
(a packet between the re-check and the delete syscall) without a compare-and-delete in the kernel; idle
timeouts are seconds to hours, so that window is the race every conntrack has between its timer and a
late packet.

:class:`ReaperThread` runs sweeps off the daemon's main thread (signals, sd_notify watchdog, metrics) and
never lets an exception out: a failed sweep is logged, counted and retried at the next interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast

from natd.errors import NatdError
from natd.maps import PROTO_NAMES, PROTO_TCP, CtEntry, CtFlags, CtKey, CtState, be32_to_ip
from natd.tables import Flow, Tables

__all__ = [
    "DEFAULT_INTERVAL_S",
    "DELETE_CHUNK",
    "LOOKUP_COST_S",
    "RECHECK_CHUNK",
    "RECHECK_LOOKUP_MAX",
    "Reaper",
    "ReaperThread",
    "SweepResult",
    "TimeoutPolicy",
    "expired",
    "state_label",
]

log = logging.getLogger("natd.reaper")

DEFAULT_INTERVAL_S = 5.0
RECHECK_LOOKUP_MAX = 65536   # expired flows re-checked key by key regardless of the table size (~0.26 s)
LOOKUP_COST_S = 4e-6         # one lookup_flow() syscall, for the per-key vs re-read decision
RECHECK_CHUNK = 1024         # keys looked up, then deleted together: the refresh window is one chunk
DELETE_CHUNK = 8192          # flows per delete_flows() call on the re-read path
_REPLIED = int(CtFlags.REPLIED)
_NS = 1_000_000_000
_ERROR_LOG_EVERY_S = 60.0    # a failure that repeats identically is logged again after this long

_T = TypeVar("_T")
_Label = tuple[int, int, int]  # (proto, state, replied 0/1): what the timeout depends on


class TimeoutPolicy(Protocol):
    """What the reaper needs of ``Config.conntrack.timeouts`` (natd.config.Timeouts)."""

    def for_state(self, proto: int, state: int, replied: bool) -> float:
        """Idle timeout in seconds; ValueError for a protocol or state it does not know."""
        ...


class _LookupFlow(Protocol):
    def __call__(self, key: CtKey) -> CtEntry | None: ...


@dataclass
class SweepResult:
    """One sweep, for logs and metrics. Counts are flows (ct_orig entries) unless named otherwise."""

    scanned: int                                  # ct_orig entries read
    reaped: int                                   # expired flows deleted (both halves)
    orphans: int                                  # orphaned ct_reply entries deleted
    duration_s: float
    by_state: dict[tuple[str, str], int]          # reaped per (proto, state), see state_label()
    entries_by_state: dict[tuple[str, str], int]  # live flows per (proto, state) after the sweep
    ports_in_use: dict[str, int]                  # external address -> live flows translated to it
    refreshed: int = 0          # expired in the snapshot, but saw traffic before the re-check: kept
    orphans_pending: int = 0    # replies seen orphaned for the first time; deleted next sweep if still so
    replies_scanned: int = 0    # ct_reply entries read
    recheck: str = "none"       # how expired flows were re-checked: "lookup", "reread" or "none"


def state_label(proto: int, state: int, flags: int) -> tuple[str, str]:
    """(protocol, state) names for metrics and logs: ("tcp", "established"), ("udp", "replied")...

    TCP is labelled with its conntrack state; UDP and ICMP have no state, and what their timeouts depend
    on is whether the remote ever answered, so they are labelled "replied" / "unreplied".
    """
    name = PROTO_NAMES.get(proto, str(proto))
    if proto == PROTO_TCP:
        try:
            return name, CtState(state).name.lower()
        except ValueError:
            return name, str(state)
    return name, "replied" if flags & _REPLIED else "unreplied"


class _Deadlines:
    """Timeouts in ns per (proto, state, replied), computed once per sweep instead of once per flow."""

    def __init__(self, timeouts: TimeoutPolicy, logger: logging.Logger, warned: set[_Label]) -> None:
        self._timeouts = timeouts
        self._log = logger
        self._warned = warned
        self.ns: dict[_Label, int] = {}
        self._fallback: int | None = None

    def timeout_ns(self, label: _Label) -> int:
        try:
            return self.ns[label]
        except KeyError:
            pass
        proto, state, replied = label
        try:
            value = round(self._timeouts.for_state(proto, state, bool(replied)) * _NS)
        except ValueError as exc:
            # A protocol or state this natd does not know (a newer datapath, a corrupt entry): expire it
            # after the longest configured timeout, so it is neither reaped early nor kept forever.
            value = self._longest()
            if label not in self._warned:
                self._warned.add(label)
                self._log.warning("%s; flows like this expire after %.0f s, the longest timeout",
                                  exc, value / _NS)
        self.ns[label] = value
        return value

    def _longest(self) -> int:
        if self._fallback is None:
            known = [self._timeouts.for_state(proto, state, replied)
                     for proto in PROTO_NAMES for state in CtState for replied in (False, True)
                     if proto == PROTO_TCP or state == CtState.NONE]
            self._fallback = round(max(known) * _NS)
        return self._fallback

    def is_expired(self, key: CtKey, entry: CtEntry, now_ns: int) -> bool:
        idle: int = now_ns - entry.last_seen_ns
        return idle > self.timeout_ns((key.proto, entry.state, entry.flags & _REPLIED))


@dataclass
class _Scan:
    expired: list[Flow] = field(default_factory=list)
    counts: dict[_Label, int] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)  # nat_addr (be32 as stored) -> flows


def _scan(flows: Sequence[Flow], now_ns: int, deadlines: _Deadlines) -> _Scan:
    """One pass over the snapshot: expired flows, and live counts per label and external address."""
    out = _Scan()
    counts, ports, found, cache = out.counts, out.ports, out.expired, deadlines.ns
    for flow in flows:
        key, entry = flow
        label = (key.proto, entry.state, entry.flags & _REPLIED)
        counts[label] = counts.get(label, 0) + 1
        addr = entry.nat_addr
        ports[addr] = ports.get(addr, 0) + 1
        timeout = cache.get(label)
        if timeout is None:
            timeout = deadlines.timeout_ns(label)
        if now_ns - entry.last_seen_ns > timeout:
            found.append(flow)
    return out


def expired(flows: Sequence[Flow], now_ns: int, timeouts: TimeoutPolicy) -> list[Flow]:
    """The flows idle for longer than their timeout at ``now_ns`` (CLOCK_MONOTONIC ns). Pure.

    Idle means ``now_ns - last_seen_ns``; a flow exactly at its timeout is still alive. A protocol/state
    ``timeouts`` does not know gets the longest configured timeout (and a warning).
    """
    return _scan(flows, now_ns, _Deadlines(timeouts, log, set())).expired


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _label_of(key: CtKey, entry: CtEntry) -> _Label:
    return key.proto, entry.state, entry.flags & _REPLIED


class Reaper:
    """Expires flows from a :class:`~natd.tables.Tables`. Not thread-safe beyond one sweep at a time
    (a lock enforces that); :meth:`set_timeouts` may be called from any thread."""

    def __init__(self, tables: Tables, timeouts: TimeoutPolicy,
                 clock: Callable[[], int] = time.monotonic_ns,
                 on_sweep: Callable[[SweepResult], None] | None = None,
                 logger: logging.Logger | None = None) -> None:
        self._tables = tables
        self._timeouts = timeouts
        self._clock = clock
        self._on_sweep = on_sweep
        self._log = logger or log
        self._lock = threading.Lock()
        self._warned: set[_Label] = set()
        # reply key -> original key, as bytes: replies seen orphaned by the previous sweep
        self._pending_orphans: dict[bytes, bytes] = {}

    @property
    def timeouts(self) -> TimeoutPolicy:
        return self._timeouts

    def set_timeouts(self, timeouts: TimeoutPolicy) -> None:
        """New timeouts (SIGHUP reload); the next sweep uses them. One attribute store: thread-safe."""
        self._timeouts = timeouts

    def sweep(self) -> SweepResult:
        """One full pass (see the module docstring). Raises what the tables raise (BpfError...)."""
        with self._lock:
            result = self._sweep()
        self._log.debug("swept %d flows: reaped %d (kept %d refreshed, re-check %s), orphans %d deleted, "
                        "%d pending, in %.3f s", result.scanned, result.reaped, result.refreshed,
                        result.recheck, result.orphans, result.orphans_pending, result.duration_s)
        if self._on_sweep is not None:
            try:
                self._on_sweep(result)
            except Exception:
                self._log.exception("on_sweep callback failed (the sweep itself succeeded)")
        return result

    # -- the pass ---------------------------------------------------------------------------------
    def _sweep(self) -> SweepResult:
        started = time.monotonic()
        deadlines = _Deadlines(self._timeouts, self._log, self._warned)
        replies = self._tables.reply_index()  # first: see "orphans" in the module docstring
        now = self._clock()  # before the read: an entry stamped during it is never older than it looks
        read_started = time.monotonic()
        flows = self._tables.flows()
        read_s = time.monotonic() - read_started
        scan = _scan(flows, now, deadlines)

        deleted: list[tuple[CtKey, CtEntry, CtEntry]] = []  # (key, entry as first read, entry deleted)
        reaped, refreshed, recheck = 0, 0, "none"
        if scan.expired:
            recheck, reaped, refreshed = self._delete_expired(scan.expired, read_s, deadlines, deleted)
        orphans, pending = self._delete_orphans(replies, flows)

        by_state: dict[tuple[str, str], int] = {}
        for key, old, new in deleted:
            lbl = state_label(key.proto, new.state, new.flags)
            by_state[lbl] = by_state.get(lbl, 0) + 1
            first = _label_of(key, old)
            scan.counts[first] -= 1
            scan.ports[old.nat_addr] -= 1
        entries_by_state: dict[tuple[str, str], int] = {}
        for (proto, state, replied), n in scan.counts.items():
            if n > 0:
                lbl = state_label(proto, state, replied)
                entries_by_state[lbl] = entries_by_state.get(lbl, 0) + n
        ports_in_use = {str(be32_to_ip(addr)): n for addr, n in scan.ports.items() if n > 0}
        return SweepResult(scanned=len(flows), reaped=reaped, orphans=orphans,
                           duration_s=time.monotonic() - started, by_state=by_state,
                           entries_by_state=entries_by_state, ports_in_use=ports_in_use,
                           refreshed=refreshed, orphans_pending=pending, replies_scanned=len(replies),
                           recheck=recheck)

    def _delete_expired(self, candidates: list[Flow], read_s: float, deadlines: _Deadlines,
                        deleted: list[tuple[CtKey, CtEntry, CtEntry]]) -> tuple[str, int, int]:
        """Re-check the snapshot's expired flows against the live map and delete those still expired.
        ``read_s``: how long this sweep's flows() took, the price of a re-read. Appends what it deleted
        to ``deleted``; returns (method, flows deleted, flows found refreshed)."""
        lookup = cast("_LookupFlow | None", getattr(self._tables, "lookup_flow", None))
        if lookup is not None and (len(candidates) <= RECHECK_LOOKUP_MAX
                                   or len(candidates) * LOOKUP_COST_S <= read_s):
            reaped, refreshed = self._recheck_by_lookup(candidates, lookup, deadlines, deleted)
            return "lookup", reaped, refreshed
        reaped, refreshed = self._recheck_by_reread(candidates, deadlines, deleted)
        return "reread", reaped, refreshed

    def _recheck_by_lookup(self, candidates: list[Flow], lookup: _LookupFlow, deadlines: _Deadlines,
                           deleted: list[tuple[CtKey, CtEntry, CtEntry]]) -> tuple[int, int]:
        reaped = refreshed = 0
        for chunk in _chunks(candidates, RECHECK_CHUNK):
            now = self._clock()
            batch: list[Flow] = []
            olds: list[CtEntry] = []
            for key, old in chunk:
                current = lookup(key)
                if current is None:  # deleted by someone else (natctl flush): nothing to do
                    continue
                if deadlines.is_expired(key, current, now):
                    batch.append((key, current))
                    olds.append(old)
                else:
                    refreshed += 1
            if batch:
                # The entry just looked up, not the snapshot's: its reply key is the one in the map now.
                reaped += self._tables.delete_flows(batch)
                deleted.extend((key, old, new) for (key, new), old in zip(batch, olds, strict=True))
        return reaped, refreshed

    def _recheck_by_reread(self, candidates: list[Flow], deadlines: _Deadlines,
                           deleted: list[tuple[CtKey, CtEntry, CtEntry]]) -> tuple[int, int]:
        wanted = {bytes(key): entry for key, entry in candidates}
        now = self._clock()
        fresh = self._tables.flows()
        batch: list[Flow] = []
        olds: list[CtEntry] = []
        refreshed = 0
        for key, current in fresh:
            old = wanted.get(bytes(key))
            if old is None:
                continue
            if deadlines.is_expired(key, current, now):
                batch.append((key, current))
                olds.append(old)
            else:
                refreshed += 1
        reaped = 0
        for start in range(0, len(batch), DELETE_CHUNK):
            part = batch[start:start + DELETE_CHUNK]
            reaped += self._tables.delete_flows(part)
            deleted.extend((key, old, new) for (key, new), old in
                           zip(part, olds[start:start + DELETE_CHUNK], strict=True))
        return reaped, refreshed

    def _delete_orphans(self, replies: Sequence[tuple[CtKey, CtKey]],
                        flows: Sequence[Flow]) -> tuple[int, int]:
        """Delete replies orphaned in this sweep and the previous one; returns (deleted, newly pending)."""
        if not replies:
            self._pending_orphans = {}
            return 0, 0
        present = {bytes(key) for key, _ in flows}
        seen: dict[bytes, bytes] = {}
        confirmed: list[tuple[CtKey, CtKey]] = []
        for reply_key, orig_key in replies:
            orig = bytes(orig_key)
            if orig in present:
                continue
            rk = bytes(reply_key)
            if self._pending_orphans.get(rk) == orig:
                confirmed.append((reply_key, orig_key))
            else:
                seen[rk] = orig
        self._pending_orphans = seen
        if not confirmed:
            return 0, len(seen)
        lookup = cast("_LookupFlow | None", getattr(self._tables, "lookup_flow", None))
        if lookup is not None and len(confirmed) <= RECHECK_LOOKUP_MAX:
            confirmed = [(rk, ok) for rk, ok in confirmed if lookup(ok) is None]
        deleted = self._tables.delete_replies([rk for rk, _ in confirmed]) if confirmed else 0
        if deleted:
            self._log.info("deleted %d orphaned conntrack reply entries (their flow was gone)", deleted)
        return deleted, len(seen)


class ReaperThread(threading.Thread):
    """Runs :meth:`Reaper.sweep` now and then every ``interval`` seconds (measured from the end of the
    previous sweep) until :meth:`stop`. Never raises: a failed sweep is logged, counted in ``errors``,
    passed to ``on_error`` and retried at the next interval, so the daemon's main loop never depends on
    a sweep succeeding or finishing."""

    def __init__(self, tables: Tables, timeouts: TimeoutPolicy, *, interval: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], int] = time.monotonic_ns,
                 on_sweep: Callable[[SweepResult], None] | None = None,
                 on_error: Callable[[Exception], None] | None = None,
                 logger: logging.Logger | None = None) -> None:
        super().__init__(name="natd-reaper", daemon=True)
        if interval <= 0:
            raise ValueError(f"reaper interval must be positive, got {interval}")
        self._log = logger or log
        self.reaper = Reaper(tables, timeouts, clock=clock, on_sweep=on_sweep, logger=self._log)
        self.interval = interval
        self._on_error = on_error
        self._stop_event = threading.Event()
        self._wake = threading.Event()
        self.sweeps = 0
        self.errors = 0
        self.last_result: SweepResult | None = None
        self.last_error: Exception | None = None
        self.last_success: float | None = None  # time.monotonic() at the end of the last good sweep
        self._last_logged: tuple[str, float] | None = None

    @property
    def stop_event(self) -> threading.Event:
        return self._stop_event

    def stop(self) -> None:
        """Ask the thread to end; it does after the sweep in progress, if any. join() to wait."""
        self._stop_event.set()
        self._wake.set()

    def wake(self) -> None:
        """Sweep now instead of at the end of the interval (e.g. the table is filling up)."""
        self._wake.set()

    def set_timeouts(self, timeouts: TimeoutPolicy) -> None:
        self.reaper.set_timeouts(timeouts)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._wake.clear()
            self._sweep_once()
            self._wake.wait(self.interval)

    def _sweep_once(self) -> None:
        try:
            self.last_result = self.reaper.sweep()
        except Exception as exc:
            self.errors += 1
            self.last_error = exc
            self._report(exc)
            if self._on_error is not None:
                try:
                    self._on_error(exc)
                except Exception:
                    self._log.exception("reaper on_error callback failed")
            return
        self.sweeps += 1
        self.last_success = time.monotonic()
        if self._last_logged is not None:
            self._log.info("conntrack sweeps work again (%d failed so far)", self.errors)
            self._last_logged = None

    def _report(self, exc: Exception) -> None:
        """Log a failure; the same failure again only once a minute, not every interval."""
        text, now = f"{type(exc).__name__}: {exc}", time.monotonic()
        if self._last_logged is not None and self._last_logged[0] == text \
                and now - self._last_logged[1] < _ERROR_LOG_EVERY_S:
            self._log.debug("conntrack sweep failed again: %s", text)
            return
        self._last_logged = (text, now)
        # Expected failures (a map syscall) say what happened; anything else is a bug: keep the traceback.
        if isinstance(exc, NatdError):
            self._log.error("conntrack sweep failed, retrying in %.0f s: %s", self.interval, exc)
        else:
            self._log.error("conntrack sweep failed, retrying in %.0f s", self.interval, exc_info=exc)
