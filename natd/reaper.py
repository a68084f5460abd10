"""Conntrack expiry: the control plane's half of the flow table's life cycle.

The datapath creates flows and stamps every packet's time into ``last_seen_ns``
(``bpf_ktime_get_ns()``, i.e. CLOCK_MONOTONIC, the clock of :func:`time.monotonic_ns`), but it never
removes anything: ct_orig is a plain hash (RFC 6888 REQ-11: a full table refuses new flows rather than
evicting live ones), so a flow lives until this module deletes it. A flow expires when it has been idle
longer than the timeout of its protocol and state (``Timeouts.for_state(proto, state, replied)``).

One sweep (:meth:`Reaper.sweep`):

1. read ct_reply (:meth:`Tables.reply_table`), THEN ct_orig (:meth:`Tables.flow_table`), each with batch
   lookups into one buffer, viewed as numpy structured arrays (natd.tables.FlowTable, ReplyTable). The
   order matters for orphans, see 4.
2. find the expired flows in that snapshot, vectorised: a table of deadlines indexed by
   (proto, state, replied) is built once per sweep from the timeouts, and one comparison against
   ``last_seen_ns`` marks every expired row. The counts of the result (flows per state, per external
   address) come from ``np.bincount`` / ``np.unique`` on the same columns. No Python object is built
   per flow: the expired ones, too, are re-checked and deleted as arrays (``on_delete`` callbacks get
   them as FlowTables, whose (CtKey, CtEntry) objects are made if the callback looks).
3. re-check each expired flow against the live map and delete (both halves) only those that are still
   expired. A flow that saw a packet after the snapshot was read survives.
4. delete orphaned reply entries: a reply whose original key is missing from the ct_orig read (which
   came after the ct_reply read; matched with :func:`natd.tables.key_index`, exact, in numpy). The
   datapath inserts the reply half first, then the original, within one XDP run, so a flow being created
   while we read has its original in the later ct_orig read. The other way a reply can be briefly alone
   is a create that fails (table full: the datapath removes the reply again microseconds later); deleting
   such a transient entry *by key* could instead hit the same key re-claimed by a new flow in the
   meantime. So a reply is deleted only when it is seen orphaned, with the same original key, in two
   consecutive sweeps (and, when the table supports it, its original is looked up once more right
   before): a real orphan cannot be re-claimed, because its key is taken.

5. release NAT mappings (nat_mappings, see ebpf/lib/abi.h) that no flow left after this sweep uses: an
   endpoint-independent mapping lives exactly as long as the inside endpoint has a flow (RFC 4787 REQ-1:
   the same external port towards every remote meanwhile), then its port claim and its count towards
   the host's max_ports_per_host go with it. nat_mappings is read before ct_orig, and the datapath adds a
   mapping only after its first flow, so a mapping in the read without a flow in the later read has
   really lost its flows; one a new flow took since is recognised by its ``last_used_ns``, looked up
   again right before the delete.

Re-check cost (step 3), the trade-off
-------------------------------------
Re-checking key by key is exact up to a few milliseconds (a chunk of ``RECHECK_CHUNK`` = 1024 lookups is
deleted right after it was checked) but costs one syscall per expired flow, ~4 us. Re-reading the whole
table costs one more :meth:`Tables.flow_table` whatever the number of expired flows, but a flow refreshed
between that re-read and its delete (up to the length of the re-read plus the deletes) is lost. The
reaper picks per sweep:

* per key (:meth:`Tables.lookup_flows`), when the Tables can look keys up (its ``lookup_flow`` is not
  None) and the expired flows number at most
  ``RECHECK_LOOKUP_MAX`` (65536, ~0.26 s), or their lookups (``LOOKUP_COST_S`` each) would take no
  longer than this sweep's own :meth:`Tables.flow_table` read did;
* otherwise (mass expiry after a SYN flood, or a Tables without ``lookup_flow``): one more
  :meth:`Tables.flow_table`, matched against the expired flows in numpy, then batch deletes of what is
  still expired in it, ``DELETE_CHUNK`` at a time.

So the re-check never costs more than max(0.26 s, one table read), and prefers the exact method whenever
it is not the more expensive one. Measured (bench/reaper_sweep.py, bench/README.md; 1M flows on a 2-core
VM): a table read is ~0.35-0.4 s of kernel time, a lookup ~3.5 us, so up to ~100k expired flows are
re-checked key by key; a whole sweep takes ~0.8 s with a few expired flows, ~1.5 s with 100k.

Nothing is deleted that was refreshed before its re-check. No user-space reaper can close the last window
(a packet between the re-check and the delete syscall) without a compare-and-delete in the kernel; idle
timeouts are seconds to hours, so that window is the race every conntrack has between its timer and a
late packet.

The deleted flows are handed to ``on_delete`` (the NAT event log's hook), one call per deleted chunk, as
the entry was when re-checked (its final counters), after the sweep has released its lock.

Threads and the GIL: the syscalls (batch reads, lookups, deletes) and the numpy work release the GIL, and
the batch reads land in buffers that are never zeroed or copied in Python, so a sweep of a million flows
holds the GIL for a few milliseconds at a time at most; and every batch syscall stops after
``natd.bpfsys.BATCH_CHUNK`` entries, so on a non-preemptible kernel the CPU is not held either. The
daemon's main loop (signals, sd_notify watchdog) and the metrics server keep running while it works.

:class:`ReaperThread` runs sweeps off the daemon's main thread (signals, sd_notify watchdog, metrics) and
never lets an exception out: a failed sweep is logged, counted and retried at the next interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from natd.errors import NatdError
from natd.maps import (
    CT_KEY_DTYPE,
    PROTO_NAMES,
    PROTO_TCP,
    CtFlags,
    CtKey,
    CtState,
    be32_to_ip,
)
from natd.tables import Flow, FlowTable, MappingTable, ReplyTable, Tables, flow_mapping_keys, key_index

__all__ = [
    "DEFAULT_INTERVAL_S",
    "DELETE_CHUNK",
    "LOOKUP_COST_S",
    "RECHECK_CHUNK",
    "RECHECK_LOOKUP_MAX",
    "OnDelete",
    "Reaper",
    "ReaperThread",
    "SweepResult",
    "TimeoutPolicy",
    "expired",
    "expired_mask",
    "state_label",
]

log = logging.getLogger("natd.reaper")

DEFAULT_INTERVAL_S = 5.0
RECHECK_LOOKUP_MAX = 65536   # expired flows re-checked key by key regardless of the table size (~0.25 s)
LOOKUP_COST_S = 4e-6         # one key of Tables.lookup_flows() (a syscall), for the per-key vs re-read choice
RECHECK_CHUNK = 1024         # keys looked up, then deleted together: the refresh window is one chunk
DELETE_CHUNK = 8192          # flows per delete_flow_table() call on the re-read path
_REPLIED = int(CtFlags.REPLIED)
_NS = 1_000_000_000
_U64_MAX = (1 << 64) - 1
_ERROR_LOG_EVERY_S = 60.0    # a failure that repeats identically is logged again after this long

# A flow's label (what its timeout depends on) packed in one integer: proto << 9 | state << 1 | replied.
_NLABELS = 1 << 17

_Label = tuple[int, int, int]  # (proto, state, replied 0/1): what the timeout depends on
OnDelete = Callable[[Sequence[Flow]], None]
_IntArray = npt.NDArray[np.intp]


class TimeoutPolicy(Protocol):
    """What the reaper needs of ``Config.conntrack.timeouts`` (natd.config.Timeouts)."""

    def for_state(self, proto: int, state: int, replied: bool) -> float:
        """Idle timeout in seconds; ValueError for a protocol or state it does not know."""
        ...


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
    mappings: int = 0           # NAT mappings left after the sweep
    mappings_released: int = 0  # mappings deleted because their last flow was gone


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


def _unpack_label(label: int) -> _Label:
    return label >> 9, (label >> 1) & 0xFF, label & 1


def _labels(table: FlowTable) -> _IntArray:
    """Every row's label, packed (see _NLABELS)."""
    k, e = table.keys, table.entries
    labels: _IntArray = k["proto"].astype(np.intp) << 9
    labels |= e["state"].astype(np.intp) << 1
    labels |= e["flags"] & _REPLIED
    return labels


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

    def expired_mask(self, table: FlowTable, now_ns: int,
                     labels: _IntArray | None = None) -> npt.NDArray[np.bool_]:
        """Per row: idle for longer than its timeout at ``now_ns``. The rule of :func:`expired`
        (``now - last_seen > timeout``), as ``last_seen < now - timeout`` with that threshold looked up
        per label and clamped to [0, 2**64): exact for every u64 ``last_seen_ns``."""
        if labels is None:
            labels = _labels(table)
        present: list[int] = np.flatnonzero(np.bincount(labels, minlength=_NLABELS)).tolist()
        threshold = np.zeros(_NLABELS, dtype=np.uint64)
        for label in present:
            limit = now_ns - self.timeout_ns(_unpack_label(label))
            threshold[label] = min(max(limit, 0), _U64_MAX)
        mask: npt.NDArray[np.bool_] = table.entries["last_seen_ns"] < np.take(threshold, labels)
        return mask


@dataclass
class _Scan:
    expired: list[Flow] = field(default_factory=list)
    counts: dict[_Label, int] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)  # nat_addr (be32 as stored) -> flows


def _scan(flows: Sequence[Flow], now_ns: int, deadlines: _Deadlines) -> _Scan:
    """One pass over a list of flows, one at a time: the reference the vectorised sweep is tested against."""
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
    ``timeouts`` does not know gets the longest configured timeout (and a warning). One flow at a time:
    :func:`expired_mask` is the same rule for a whole :class:`~natd.tables.FlowTable` at once.
    """
    return _scan(flows, now_ns, _Deadlines(timeouts, log, set())).expired


def expired_mask(table: FlowTable, now_ns: int, timeouts: TimeoutPolicy) -> npt.NDArray[np.bool_]:
    """:func:`expired` for every row of ``table`` at once (numpy): True where the flow is expired."""
    return _Deadlines(timeouts, log, set()).expired_mask(table, now_ns)


@dataclass
class _Deleted:
    """What one sweep deleted: the flows (as re-checked) per delete call, and, per deleted flow, its label
    and external address in the first snapshot (to take it out of that snapshot's counts)."""

    chunks: list[FlowTable] = field(default_factory=list)
    old_rows: list[_IntArray] = field(default_factory=list)  # rows of the first snapshot

    def add(self, flows: FlowTable, old_rows: _IntArray) -> None:
        if len(flows):
            self.chunks.append(flows)
            self.old_rows.append(old_rows)

    def rows(self) -> _IntArray:
        return np.concatenate(self.old_rows) if self.old_rows else np.zeros(0, dtype=np.intp)


def _label_counts(labels: _IntArray) -> dict[tuple[str, str], int]:
    """state_label() -> number of rows, from packed labels."""
    out: dict[tuple[str, str], int] = {}
    if not len(labels):
        return out
    counts = np.bincount(labels, minlength=_NLABELS)
    for label in np.flatnonzero(counts).tolist():
        proto, state, replied = _unpack_label(label)
        lbl = state_label(proto, state, replied)
        out[lbl] = out.get(lbl, 0) + int(counts[label])
    return out


class Reaper:
    """Expires flows from a :class:`~natd.tables.Tables`. Not thread-safe beyond one sweep at a time
    (a lock enforces that); :meth:`set_timeouts` may be called from any thread.

    ``on_sweep`` gets every successful sweep's :class:`SweepResult`; ``on_delete`` gets the flows the
    sweep deleted, one call per delete chunk (a :class:`~natd.tables.FlowTable`: a Sequence[Flow] whose
    objects are built only if the callback looks, with numpy columns for one that wants them), each entry
    as it was when re-checked. Both are called after the sweep let go of its lock, from the sweeping
    thread; what they raise is logged, never passed on. ``on_delete`` is called also when the sweep fails
    half way, for what it had deleted until then.
    """

    def __init__(self, tables: Tables, timeouts: TimeoutPolicy,
                 clock: Callable[[], int] = time.monotonic_ns,
                 on_sweep: Callable[[SweepResult], None] | None = None,
                 logger: logging.Logger | None = None,
                 on_delete: OnDelete | None = None) -> None:
        self._tables = tables
        self._timeouts = timeouts
        self._clock = clock
        self._on_sweep = on_sweep
        self._on_delete = on_delete
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
        deleted = _Deleted()
        try:
            with self._lock:
                result = self._sweep(deleted)
        finally:
            self._report_deleted(deleted.chunks)
        self._log.debug("swept %d flows: reaped %d (kept %d refreshed, re-check %s), orphans %d deleted, "
                        "%d pending, in %.3f s", result.scanned, result.reaped, result.refreshed,
                        result.recheck, result.orphans, result.orphans_pending, result.duration_s)
        if self._on_sweep is not None:
            try:
                self._on_sweep(result)
            except Exception:
                self._log.exception("on_sweep callback failed (the sweep itself succeeded)")
        return result

    def _report_deleted(self, chunks: list[FlowTable]) -> None:
        if self._on_delete is None:
            return
        for chunk in chunks:
            try:
                self._on_delete(chunk)
            except Exception:
                self._log.exception("on_delete callback failed for %d deleted flows (they are deleted)",
                                    len(chunk))

    # -- the pass ---------------------------------------------------------------------------------
    def _sweep(self, deleted: _Deleted) -> SweepResult:
        started = time.monotonic()
        deadlines = _Deadlines(self._timeouts, self._log, self._warned)
        replies = self._tables.reply_table()  # first: see "orphans" in the module docstring
        mappings = self._tables.mapping_table()  # before the flows: see "mappings" in the module docstring
        now = self._clock()  # before the read: an entry stamped during it is never older than it looks
        read_started = time.monotonic()
        table = self._tables.flow_table()
        read_s = time.monotonic() - read_started
        labels = _labels(table)
        candidates = np.flatnonzero(deadlines.expired_mask(table, now, labels))

        reaped, refreshed, recheck = 0, 0, "none"
        if len(candidates):
            recheck, reaped, refreshed = self._delete_expired(table, candidates, read_s, deadlines, deleted)
        orphans, pending = self._delete_orphans(replies, table)

        # what the first snapshot saw, less what this sweep deleted (counted as it was then)
        gone = deleted.rows()
        live = np.ones(len(table), dtype=np.bool_)
        live[gone] = False
        released = self._release_mappings(mappings, table.take(live))
        entries_by_state = _label_counts(labels[live])
        addrs, counts = np.unique(table.entries["nat_addr"][live], return_counts=True)
        ports_in_use = {str(be32_to_ip(int(a))): int(n) for a, n in zip(addrs, counts, strict=True)}
        by_state = _label_counts(np.concatenate([_labels(c) for c in deleted.chunks])
                                 if deleted.chunks else np.zeros(0, dtype=np.intp))
        return SweepResult(scanned=len(table), reaped=reaped, orphans=orphans,
                           duration_s=time.monotonic() - started, by_state=by_state,
                           entries_by_state=entries_by_state, ports_in_use=ports_in_use,
                           refreshed=refreshed, orphans_pending=pending, replies_scanned=len(replies),
                           recheck=recheck, mappings=len(mappings) - released, mappings_released=released)

    def _delete_expired(self, table: FlowTable, candidates: _IntArray, read_s: float,
                        deadlines: _Deadlines, deleted: _Deleted) -> tuple[str, int, int]:
        """Re-check the snapshot's expired flows (rows ``candidates`` of ``table``) against the live map and
        delete those still expired. ``read_s``: how long this sweep's flow_table() took, the price of a
        re-read. Returns (method, flows deleted, flows found refreshed)."""
        # a Tables may set lookup_flow to None: it cannot look keys up, only re-read
        can_lookup = getattr(self._tables, "lookup_flow", None) is not None
        n = len(candidates)
        if can_lookup and (n <= RECHECK_LOOKUP_MAX or n * LOOKUP_COST_S <= read_s):
            reaped, refreshed = self._recheck_by_lookup(table, candidates, deadlines, deleted)
            return "lookup", reaped, refreshed
        reaped, refreshed = self._recheck_by_reread(table, candidates, deadlines, deleted)
        return "reread", reaped, refreshed

    def _recheck_by_lookup(self, table: FlowTable, candidates: _IntArray, deadlines: _Deadlines,
                           deleted: _Deleted) -> tuple[int, int]:
        reaped = refreshed = 0
        for start in range(0, len(candidates), RECHECK_CHUNK):
            rows = candidates[start:start + RECHECK_CHUNK]
            keys = np.take(table.keys, rows)
            now = self._clock()
            # a row not found was deleted by someone else (natctl flush): nothing to do
            found, current = self._tables.lookup_flows(keys)
            still = found & deadlines.expired_mask(FlowTable(keys, current), now)
            refreshed += int(np.count_nonzero(found)) - int(np.count_nonzero(still))
            if not still.any():
                continue
            # The entry just looked up, not the snapshot's: its reply key is the one in the map now.
            batch = FlowTable(keys[still], current[still])
            done = self._tables.delete_flow_table(batch)
            reaped += int(np.count_nonzero(done))
            deleted.add(batch.take(done), rows[still][done])
        return reaped, refreshed

    def _recheck_by_reread(self, table: FlowTable, candidates: _IntArray, deadlines: _Deadlines,
                           deleted: _Deleted) -> tuple[int, int]:
        now = self._clock()
        fresh = self._tables.flow_table()
        # for each expired flow of the snapshot, its row in the re-read (-1: gone meanwhile)
        at = key_index(fresh.keys, np.take(table.keys, candidates))
        found = at >= 0
        still = fresh.take(at[found])
        old_rows = candidates[found]
        expired_now = deadlines.expired_mask(still, now)
        refreshed = len(still) - int(np.count_nonzero(expired_now))
        batch, old_rows = still.take(expired_now), old_rows[expired_now]
        reaped = 0
        for start in range(0, len(batch), DELETE_CHUNK):
            part = batch[start:start + DELETE_CHUNK]
            done = self._tables.delete_flow_table(part)
            reaped += int(np.count_nonzero(done))
            deleted.add(part.take(done), old_rows[start:start + DELETE_CHUNK][done])
        return reaped, refreshed

    def _release_mappings(self, mappings: MappingTable, live: FlowTable) -> int:
        """Delete the mappings no live flow uses any more (with their port claims and host counts)."""
        if not len(mappings):
            return 0
        idle = np.flatnonzero(key_index(flow_mapping_keys(live), mappings.keys) < 0)
        if not len(idle):
            return 0
        candidates = mappings.take(idle)
        # a flow that took the mapping after the flow read stamped last_used_ns: keep that one
        found, current = self._tables.lookup_mappings(candidates.keys)
        still = found & (current["last_used_ns"] == candidates.values["last_used_ns"])
        released = self._tables.delete_mappings(MappingTable(candidates.keys[still], current[still]))
        if released:
            self._log.debug("released %d NAT mappings (their last flow was gone)", released)
        return released

    def _delete_orphans(self, replies: ReplyTable, table: FlowTable) -> tuple[int, int]:
        """Delete replies orphaned in this sweep and the previous one; returns (deleted, newly pending)."""
        if not len(replies):
            self._pending_orphans = {}
            return 0, 0
        orphaned = np.flatnonzero(key_index(table.keys, replies.origs) < 0)
        seen: dict[bytes, bytes] = {}
        confirmed: list[tuple[bytes, bytes]] = []
        reply_keys, orig_keys = replies.keys.view("V16"), replies.origs.view("V16")
        for row in orphaned.tolist():
            rk, orig = reply_keys[row].tobytes(), orig_keys[row].tobytes()
            if self._pending_orphans.get(rk) == orig:
                confirmed.append((rk, orig))
            else:
                seen[rk] = orig
        self._pending_orphans = seen
        if not confirmed:
            return 0, len(seen)
        if getattr(self._tables, "lookup_flow", None) is not None and len(confirmed) <= RECHECK_LOOKUP_MAX:
            origs = np.frombuffer(b"".join(ok for _, ok in confirmed), dtype=CT_KEY_DTYPE)
            found, _ = self._tables.lookup_flows(origs)
            confirmed = [pair for pair, there in zip(confirmed, found.tolist(), strict=True) if not there]
        deleted = (self._tables.delete_replies([CtKey.from_buffer_copy(rk) for rk, _ in confirmed])
                   if confirmed else 0)
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
                 logger: logging.Logger | None = None,
                 on_delete: OnDelete | None = None) -> None:
        super().__init__(name="natd-reaper", daemon=True)
        if interval <= 0:
            raise ValueError(f"reaper interval must be positive, got {interval}")
        self._log = logger or log
        self.reaper = Reaper(tables, timeouts, clock=clock, on_sweep=on_sweep, logger=self._log,
                             on_delete=on_delete)
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
