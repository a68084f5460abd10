"""Unit tests for natd.reaper: expiry rules, both re-check strategies, orphan clean-up and its races,
result accounting, the on_delete hook, and ReaperThread's lifecycle; the columnar reads it runs on
(natd.tables.FlowTable / ReplyTable / key_index, the numpy dtypes of natd.maps), the vectorised expiry
checked against the one-flow-at-a-time rule with hypothesis. FakeTables plus an injected clock; no root."""

from __future__ import annotations

import copy
import ctypes
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natd import reaper as reaper_mod
from natd import tables as tables_mod
from natd.config import Timeouts
from natd.errors import BpfError
from natd.maps import (
    CT_ENTRY_DTYPE,
    CT_KEY_DTYPE,
    CT_REPLY_VALUE_DTYPE,
    NAT_MAPPING_DTYPE,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    CtEntry,
    CtFlags,
    CtKey,
    CtReplyValue,
    CtState,
    NatMapping,
    NatMappingFlags,
    be32_to_ip,
    ip_to_be32,
    mapping_key_for,
    port_to_be16,
    reply_key_for,
)
from natd.reaper import Reaper, ReaperThread, SweepResult, expired, expired_mask, state_label
from natd.tables import FakeTables, Flow, FlowTable, ReplyTable, key_index

pytestmark = pytest.mark.unit

S = 1_000_000_000
NOW = 100_000 * S
EXT = "198.51.100.7"


class Clock:
    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class StubTimeouts:
    """Distinct, easy numbers: the tests check which one applied."""

    TCP: ClassVar[dict[int, int]] = {0: 11, 1: 12, 2: 13, 3: 1000, 4: 14, 5: 15, 6: 16, 7: 17, 8: 5}

    def for_state(self, proto: int, state: int, replied: bool) -> int:
        if proto == PROTO_TCP:
            if state not in self.TCP:
                raise ValueError(f"unknown TCP conntrack state {state}")
            return self.TCP[state]
        if proto == PROTO_UDP:
            return 30 if replied else 20
        if proto == PROTO_ICMP:
            return 7
        raise ValueError(f"no conntrack timeout for IP protocol {proto}")


_next_port = iter(range(1024, 65536))


def flow(proto: int = PROTO_TCP, state: int = CtState.ESTABLISHED, idle_s: float = 0.0, *,
         replied: bool = False, nat: str = EXT, src: str = "10.0.0.2", now: int = NOW) -> Flow:
    sport = next(_next_port)
    key = CtKey.make(src, "203.0.113.9", sport, 0 if proto == PROTO_ICMP else 443, proto)
    entry = CtEntry()
    entry.created_ns = now - int(idle_s * S) - S
    entry.last_seen_ns = now - int(idle_s * S)
    entry.nat_addr = ip_to_be32(nat)
    entry.nat_port = port_to_be16(sport)
    entry.state = int(state)
    entry.flags = int(CtFlags.REPLIED | CtFlags.ASSURED) if replied else 0
    entry.rule_id = 1
    return key, entry


class CopyingTables(FakeTables):
    """FakeTables whose reads return copies, like a batch lookup of a real map, with hooks that play
    the datapath between the reaper's calls; records the order of calls."""

    def __init__(self) -> None:
        super().__init__(ct_max=1 << 20)
        self.calls: list[str] = []
        self.after_flows: list[object] = []      # callables run once, after the next flows() read
        self.after_replies: list[object] = []    # callables run once, after the next reply_index() read

    def flows(self) -> list[Flow]:
        self.calls.append("flows")
        out = [(copy.copy(k), copy.copy(e)) for k, e in self.ct.items()]
        self._run(self.after_flows)
        return out

    def reply_index(self) -> list[tuple[CtKey, CtKey]]:
        self.calls.append("reply_index")
        out = [(copy.copy(k), copy.copy(v)) for k, v in self.replies.items()]
        self._run(self.after_replies)
        return out

    def lookup_flow(self, key: CtKey) -> CtEntry | None:
        self.calls.append("lookup_flow")
        e = self.ct.get(key)
        return None if e is None else copy.copy(e)

    def delete_flows(self, flows: Sequence[Flow]) -> int:
        self.calls.append("delete_flows")
        return super().delete_flows(flows)

    def delete_replies(self, keys: Sequence[CtKey]) -> int:
        self.calls.append("delete_replies")
        return super().delete_replies(keys)

    @staticmethod
    def _run(hooks: list[object]) -> None:
        while hooks:
            hook = hooks.pop(0)
            assert callable(hook)
            hook()


class NoLookupTables(CopyingTables):
    """A Tables without lookup_flow: the reaper must fall back to re-reading the table."""

    lookup_flow = None  # type: ignore[assignment]


def populate(tables: FakeTables, *flows: Flow) -> None:
    for k, e in flows:
        tables.add_flow(k, e)


def refresh(tables: FakeTables, key: CtKey, now: int) -> None:
    """A packet of the flow: what ct_update() does to last_seen_ns."""
    tables.ct[key].last_seen_ns = now


# --- expired(): the pure rule --------------------------------------------------------------------------


@pytest.mark.parametrize(("proto", "state", "replied", "timeout_s"), [
    (PROTO_TCP, CtState.NONE, False, 11),
    (PROTO_TCP, CtState.SYN_SENT, False, 12),
    (PROTO_TCP, CtState.SYN_RECV, True, 13),
    (PROTO_TCP, CtState.ESTABLISHED, True, 1000),
    (PROTO_TCP, CtState.FIN_WAIT, True, 14),
    (PROTO_TCP, CtState.CLOSE_WAIT, True, 15),
    (PROTO_TCP, CtState.LAST_ACK, True, 16),
    (PROTO_TCP, CtState.TIME_WAIT, True, 17),
    (PROTO_TCP, CtState.CLOSE, False, 5),
    (PROTO_UDP, CtState.NONE, False, 20),
    (PROTO_UDP, CtState.NONE, True, 30),
    (PROTO_ICMP, CtState.NONE, False, 7),
    (PROTO_ICMP, CtState.NONE, True, 7),
])
def test_expired_uses_the_timeout_of_proto_state_and_replied(proto: int, state: int, replied: bool,
                                                             timeout_s: int) -> None:
    at_limit = flow(proto, state, timeout_s, replied=replied)
    just_over = (at_limit[0], copy.copy(at_limit[1]))
    just_over[1].last_seen_ns -= 1
    assert expired([at_limit], NOW, StubTimeouts()) == []          # exactly at the timeout: alive
    assert expired([just_over], NOW, StubTimeouts()) == [just_over]  # one ns more: gone


def test_expired_with_the_real_config_timeouts() -> None:
    t = Timeouts()
    established = flow(PROTO_TCP, CtState.ESTABLISHED, 7439)
    syn = flow(PROTO_TCP, CtState.SYN_SENT, 121)
    udp_unreplied = flow(PROTO_UDP, CtState.NONE, 121)
    udp_replied = flow(PROTO_UDP, CtState.NONE, 121, replied=True)
    icmp = flow(PROTO_ICMP, CtState.NONE, 61)
    got = expired([established, syn, udp_unreplied, udp_replied, icmp], NOW, t)
    assert got == [syn, udp_unreplied, icmp]


def test_expired_future_last_seen_is_alive() -> None:
    """The datapath may stamp a packet after the reaper read its clock."""
    f = flow(PROTO_UDP, CtState.NONE, 0)
    f[1].last_seen_ns = NOW + 5 * S
    assert expired([f], NOW, StubTimeouts()) == []


def test_unknown_state_or_proto_gets_the_longest_timeout(caplog: pytest.LogCaptureFixture) -> None:
    weird_state = flow(PROTO_TCP, 42, 999)
    weird_state_old = flow(PROTO_TCP, 42, 1001)
    gre = flow(47, 0, 1001)
    with caplog.at_level(logging.WARNING, logger="natd.reaper"):
        got = expired([weird_state, weird_state_old, gre], NOW, StubTimeouts())
    assert got == [weird_state_old, gre]
    assert sum("longest timeout" in r.getMessage() for r in caplog.records) == 2  # once per kind


def test_state_label() -> None:
    assert state_label(PROTO_TCP, CtState.ESTABLISHED, 0) == ("tcp", "established")
    assert state_label(PROTO_TCP, CtState.SYN_SENT, CtFlags.REPLIED) == ("tcp", "syn_sent")
    assert state_label(PROTO_TCP, 99, 0) == ("tcp", "99")
    assert state_label(PROTO_UDP, 0, CtFlags.REPLIED | CtFlags.ASSURED) == ("udp", "replied")
    assert state_label(PROTO_UDP, 0, 0) == ("udp", "unreplied")
    assert state_label(PROTO_ICMP, 0, 0) == ("icmp", "unreplied")
    assert state_label(47, 0, 0) == ("47", "unreplied")


# --- Reaper.sweep ----------------------------------------------------------------------------------------


def test_sweep_deletes_expired_flows_with_both_halves_and_counts() -> None:
    t = CopyingTables()
    live_tcp = flow(PROTO_TCP, CtState.ESTABLISHED, 10, replied=True)
    live_udp = flow(PROTO_UDP, CtState.NONE, 25, replied=True, nat="198.51.100.8")
    old_udp = flow(PROTO_UDP, CtState.NONE, 25)
    old_syn = flow(PROTO_TCP, CtState.SYN_SENT, 13)
    old_syn2 = flow(PROTO_TCP, CtState.SYN_SENT, 100)
    old_icmp = flow(PROTO_ICMP, CtState.NONE, 8, replied=True)
    populate(t, live_tcp, live_udp, old_udp, old_syn, old_syn2, old_icmp)
    seen: list[SweepResult] = []

    result = Reaper(t, StubTimeouts(), clock=Clock(), on_sweep=seen.append).sweep()

    assert set(t.ct) == {live_tcp[0], live_udp[0]}
    assert set(t.replies) == {reply_key_for(*live_tcp), reply_key_for(*live_udp)}
    assert (result.scanned, result.reaped, result.orphans, result.refreshed) == (6, 4, 0, 0)
    assert result.recheck == "lookup"
    assert result.replies_scanned == 6
    assert result.by_state == {("udp", "unreplied"): 1, ("tcp", "syn_sent"): 2, ("icmp", "replied"): 1}
    assert result.entries_by_state == {("tcp", "established"): 1, ("udp", "replied"): 1}
    assert result.ports_in_use == {EXT: 1, "198.51.100.8": 1}
    assert result.duration_s >= 0
    assert seen == [result]


def test_sweep_of_an_empty_table() -> None:
    result = Reaper(CopyingTables(), StubTimeouts(), clock=Clock()).sweep()
    assert (result.scanned, result.reaped, result.orphans, result.recheck) == (0, 0, 0, "none")
    assert result.by_state == result.entries_by_state == result.ports_in_use == {}


def test_sweep_uses_the_clock_and_the_new_timeouts_after_set_timeouts() -> None:
    t = CopyingTables()
    f = flow(PROTO_UDP, CtState.NONE, 0)
    populate(t, f)
    clock = Clock()
    r = Reaper(t, StubTimeouts(), clock=clock)
    clock.now += 19 * S
    assert r.sweep().reaped == 0

    class Short(StubTimeouts):
        def for_state(self, proto: int, state: int, replied: bool) -> int:
            return 1

    r.set_timeouts(Short())
    assert isinstance(r.timeouts, Short)
    assert r.sweep().reaped == 1
    assert t.ct == {}


def test_sweep_reads_replies_before_flows() -> None:
    t = CopyingTables()
    populate(t, flow())
    Reaper(t, StubTimeouts(), clock=Clock()).sweep()
    assert t.calls[:2] == ["reply_index", "flows"]


def test_flow_refreshed_between_read_and_delete_survives_lookup_path() -> None:
    t = CopyingTables()
    a, b = flow(PROTO_UDP, CtState.NONE, 60), flow(PROTO_UDP, CtState.NONE, 60)
    populate(t, a, b)
    t.after_flows.append(lambda: refresh(t, a[0], NOW))  # a packet right after the snapshot

    result = Reaper(t, StubTimeouts(), clock=Clock()).sweep()

    assert result.recheck == "lookup"
    assert (result.reaped, result.refreshed) == (1, 1)
    assert set(t.ct) == {a[0]}
    assert reply_key_for(*a) in t.replies  # its reply half too
    assert result.entries_by_state == {("udp", "unreplied"): 1}
    assert result.ports_in_use == {EXT: 1}


def test_flow_refreshed_between_read_and_delete_survives_reread_path() -> None:
    t = NoLookupTables()
    a, b = flow(PROTO_TCP, CtState.SYN_SENT, 60), flow(PROTO_TCP, CtState.SYN_SENT, 60)
    populate(t, a, b)
    t.after_flows.append(lambda: refresh(t, a[0], NOW))

    result = Reaper(t, StubTimeouts(), clock=Clock()).sweep()

    assert result.recheck == "reread"
    assert t.calls.count("flows") == 2
    assert (result.reaped, result.refreshed) == (1, 1)
    assert set(t.ct) == {a[0]} and reply_key_for(*a) in t.replies


def test_flow_whose_state_changed_is_judged_by_its_new_state() -> None:
    """SYN_SENT for 60 s is expired; the SYN-ACK arrived (SYN_RECV, 13 s) just now: keep it."""
    t = CopyingTables()
    f = flow(PROTO_TCP, CtState.SYN_SENT, 60)
    populate(t, f)

    def answer() -> None:
        t.ct[f[0]].state = CtState.SYN_RECV
        t.ct[f[0]].last_seen_ns = NOW - 2 * S

    t.after_flows.append(answer)
    assert Reaper(t, StubTimeouts(), clock=Clock()).sweep().reaped == 0
    assert f[0] in t.ct


def test_big_expiry_switches_to_reread_and_deletes_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reaper_mod, "RECHECK_LOOKUP_MAX", 4)
    monkeypatch.setattr(reaper_mod, "LOOKUP_COST_S", 10.0)  # lookups dearer than re-reading the table
    monkeypatch.setattr(reaper_mod, "DELETE_CHUNK", 3)
    t = CopyingTables()
    old = [flow(PROTO_UDP, CtState.NONE, 99, src=f"10.0.1.{i}") for i in range(10)]
    populate(t, *old, flow(PROTO_TCP, CtState.ESTABLISHED, 1))
    t.after_flows.append(lambda: refresh(t, old[3][0], NOW))

    result = Reaper(t, StubTimeouts(), clock=Clock()).sweep()

    assert result.recheck == "reread"  # 10 expired > 4, and 10 lookups cost more than the read did
    assert "lookup_flow" not in t.calls
    assert t.calls.count("delete_flows") == 3  # 9 flows in chunks of 3
    assert (result.reaped, result.refreshed) == (9, 1)
    assert set(t.ct) == {old[3][0], *(k for k in t.ct if k.proto == PROTO_TCP)}
    assert len(t.ct) == 2


def test_big_expiry_stays_per_key_when_lookups_are_cheaper_than_a_reread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reaper_mod, "RECHECK_LOOKUP_MAX", 1)
    monkeypatch.setattr(reaper_mod, "LOOKUP_COST_S", 1e-6)

    class SlowRead(CopyingTables):
        def flows(self) -> list[Flow]:
            time.sleep(0.05)  # a table read costs 50 ms; 10 lookups cost 10 us
            return super().flows()

    t = SlowRead()
    populate(t, *(flow(PROTO_UDP, CtState.NONE, 99, src=f"10.0.3.{i}") for i in range(10)))
    result = Reaper(t, StubTimeouts(), clock=Clock()).sweep()
    assert (result.recheck, result.reaped) == ("lookup", 10)
    assert t.calls.count("flows") == 1


def test_lookup_path_rechecks_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reaper_mod, "RECHECK_CHUNK", 2)
    t = CopyingTables()
    populate(t, *(flow(PROTO_UDP, CtState.NONE, 99, src=f"10.0.2.{i}") for i in range(5)))
    result = Reaper(t, StubTimeouts(), clock=Clock()).sweep()
    assert result.reaped == 5 and t.ct == {} and t.replies == {}
    # each chunk is deleted right after its lookups: the refresh window is one chunk
    assert t.calls[2:] == ["lookup_flow", "lookup_flow", "delete_flows"] * 2 + ["lookup_flow", "delete_flows"]


def test_flow_deleted_by_someone_else_meanwhile_is_not_counted() -> None:
    t = CopyingTables()
    a, b = flow(PROTO_UDP, CtState.NONE, 99), flow(PROTO_UDP, CtState.NONE, 99)
    populate(t, a, b)
    t.after_flows.append(lambda: t.delete_flows([a]))  # natctl flush, say
    result = Reaper(t, StubTimeouts(), clock=Clock()).sweep()
    assert (result.reaped, result.refreshed) == (1, 0)
    assert t.ct == {}


# --- orphans ---------------------------------------------------------------------------------------------


def orphan(t: FakeTables) -> tuple[CtKey, CtKey]:
    """A reply entry whose flow is gone (e.g. a crash between the two deletes of another tool)."""
    k, e = flow(PROTO_UDP, CtState.NONE, 0)
    rk = reply_key_for(k, e)
    t.replies[rk] = k
    return rk, k


def test_orphaned_reply_is_deleted_when_seen_in_two_sweeps() -> None:
    t = CopyingTables()
    live = flow(PROTO_TCP, CtState.ESTABLISHED, 1)
    populate(t, live)
    rk, _ = orphan(t)
    r = Reaper(t, StubTimeouts(), clock=Clock())

    first = r.sweep()
    assert (first.orphans, first.orphans_pending) == (0, 1)
    assert rk in t.replies

    second = r.sweep()
    assert (second.orphans, second.orphans_pending) == (1, 0)
    assert rk not in t.replies
    assert set(t.replies) == {reply_key_for(*live)}
    assert set(t.ct) == {live[0]}

    assert r.sweep().orphans_pending == 0


def test_reply_of_a_flow_created_between_the_two_reads_is_no_orphan() -> None:
    """The datapath inserts the reply, then the original: if the reply read sees the first and the
    original lands before the flows read, the reply is not an orphan, not even pending."""
    t = CopyingTables()
    k, e = flow(PROTO_UDP, CtState.NONE, 0)
    t.replies[reply_key_for(k, e)] = k              # half-created when ct_reply is read
    t.after_replies.append(lambda: t.ct.__setitem__(k, e))  # the original goes in before ct_orig is read
    r = Reaper(t, StubTimeouts(), clock=Clock())
    for _ in range(3):
        result = r.sweep()
        assert (result.orphans, result.orphans_pending) == (0, 0)
    assert reply_key_for(k, e) in t.replies


def test_transient_reply_of_a_failed_create_is_not_deleted() -> None:
    """A create that failed (table full) leaves its reply for microseconds; the key is then free and may
    be claimed by another flow. Seen once, it must not be deleted by key later."""
    t = CopyingTables()
    rk, _ = orphan(t)
    r = Reaper(t, StubTimeouts(), clock=Clock())
    assert r.sweep().orphans_pending == 1
    # the datapath removes it, and a new flow claims the same reply key (same remote, same port)
    del t.replies[rk]
    k2, e2 = flow(PROTO_UDP, CtState.NONE, 0, src="10.9.9.9")
    t.ct[k2] = e2
    t.replies[rk] = k2
    result = r.sweep()
    assert (result.orphans, result.orphans_pending) == (0, 0)
    assert t.replies[rk] == k2


def test_orphan_whose_flow_reappears_is_kept() -> None:
    t = CopyingTables()
    rk, k = orphan(t)
    r = Reaper(t, StubTimeouts(), clock=Clock())
    assert r.sweep().orphans_pending == 1
    e = flow(PROTO_UDP, CtState.NONE, 0)[1]
    # the original reappears after this sweep's flows read: the lookup right before the delete saves it
    t.after_flows.append(lambda: t.ct.__setitem__(k, e))
    assert r.sweep().orphans == 0
    assert rk in t.replies


def test_orphans_without_lookup_flow() -> None:
    t = NoLookupTables()
    rk, _ = orphan(t)
    r = Reaper(t, StubTimeouts(), clock=Clock())
    r.sweep()
    assert r.sweep().orphans == 1
    assert rk not in t.replies


def test_reaped_flow_leaves_no_orphan() -> None:
    t = CopyingTables()
    populate(t, flow(PROTO_UDP, CtState.NONE, 99))
    r = Reaper(t, StubTimeouts(), clock=Clock())
    assert r.sweep().reaped == 1
    assert t.replies == {}
    assert r.sweep().orphans_pending == 0


# --- callbacks and errors --------------------------------------------------------------------------------


def test_on_sweep_failure_does_not_fail_the_sweep(caplog: pytest.LogCaptureFixture) -> None:
    def boom(result: SweepResult) -> None:
        raise RuntimeError("metrics broke")

    t = CopyingTables()
    populate(t, flow(PROTO_UDP, CtState.NONE, 99))
    with caplog.at_level(logging.ERROR, logger="natd.reaper"):
        assert Reaper(t, StubTimeouts(), clock=Clock(), on_sweep=boom).sweep().reaped == 1
    assert "on_sweep callback failed" in caplog.text


def test_sweep_propagates_table_errors() -> None:
    class Broken(CopyingTables):
        def flows(self) -> list[Flow]:
            raise BpfError("batch lookup in ct_orig: Bad file descriptor (errno 9)")

    with pytest.raises(BpfError):
        Reaper(Broken(), StubTimeouts(), clock=Clock()).sweep()


# --- ReaperThread ----------------------------------------------------------------------------------------


def wait_for(cond: object, timeout: float = 2.0) -> bool:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return bool(cond())


def test_thread_sweeps_at_start_and_stops_promptly() -> None:
    t = CopyingTables()
    populate(t, flow(PROTO_UDP, CtState.NONE, 99))
    results: list[SweepResult] = []
    th = ReaperThread(t, StubTimeouts(), interval=3600, clock=Clock(), on_sweep=results.append)
    assert th.daemon and th.name == "natd-reaper"
    started = time.monotonic()
    th.start()
    assert wait_for(lambda: th.sweeps == 1)
    assert results[0].reaped == 1 and t.ct == {}
    th.stop()
    th.join(timeout=1.0)
    assert not th.is_alive()
    assert time.monotonic() - started < 1.0
    assert th.stop_event.is_set()
    assert th.last_result is results[0] and th.last_success is not None


def test_thread_sweeps_every_interval_and_on_wake() -> None:
    t = CopyingTables()
    th = ReaperThread(t, StubTimeouts(), interval=0.02, clock=Clock())
    th.start()
    try:
        assert wait_for(lambda: th.sweeps >= 3)
    finally:
        th.stop()
        th.join(1.0)
    slow = ReaperThread(t, StubTimeouts(), interval=3600, clock=Clock())
    slow.start()
    try:
        assert wait_for(lambda: slow.sweeps == 1)
        slow.wake()
        assert wait_for(lambda: slow.sweeps == 2)
    finally:
        slow.stop()
        slow.join(1.0)
    assert not slow.is_alive()


def test_thread_survives_exceptions_from_tables(caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(CopyingTables):
        failures = 2

        def reply_index(self) -> list[tuple[CtKey, CtKey]]:
            if self.failures:
                self.failures -= 1
                raise BpfError("batch lookup in ct_reply: Bad file descriptor (errno 9)")
            return super().reply_index()

    t = Flaky()
    populate(t, flow(PROTO_UDP, CtState.NONE, 99))
    errors: list[Exception] = []
    th = ReaperThread(t, StubTimeouts(), interval=0.01, clock=Clock(), on_error=errors.append)
    with caplog.at_level(logging.DEBUG, logger="natd.reaper"):
        th.start()
        try:
            assert wait_for(lambda: th.sweeps >= 1)
        finally:
            th.stop()
            th.join(1.0)
    assert not th.is_alive()
    assert th.errors == 2 and len(errors) == 2
    assert isinstance(th.last_error, BpfError)
    assert t.ct == {}
    # the same failure twice in a row: one error line, the repeat at debug level; then the recovery
    error_lines = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(error_lines) == 1 and "retrying" in error_lines[0].getMessage()
    assert "work again" in caplog.text


def test_thread_logs_unexpected_errors_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    class Buggy(CopyingTables):
        def flows(self) -> list[Flow]:
            raise KeyError("bug")

    th = ReaperThread(Buggy(), StubTimeouts(), interval=3600, clock=Clock())
    with caplog.at_level(logging.ERROR, logger="natd.reaper"):
        th.start()
        assert wait_for(lambda: th.errors == 1)
        th.stop()
        th.join(1.0)
    assert caplog.records[0].exc_info is not None


def test_thread_stop_during_a_slow_sweep_waits_only_for_that_sweep() -> None:
    gate = threading.Event()

    class Slow(CopyingTables):
        def flows(self) -> list[Flow]:
            gate.wait(0.2)
            return super().flows()

    th = ReaperThread(Slow(), StubTimeouts(), interval=3600, clock=Clock())
    th.start()
    time.sleep(0.02)
    th.stop()
    gate.set()
    th.join(1.0)
    assert not th.is_alive()


def test_thread_set_timeouts_reaches_the_reaper() -> None:
    th = ReaperThread(CopyingTables(), StubTimeouts(), interval=1)
    new = Timeouts()
    th.set_timeouts(new)
    assert th.reaper.timeouts is new


def test_thread_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        ReaperThread(CopyingTables(), StubTimeouts(), interval=0)


# --- the numpy mirrors of the structs ---------------------------------------------------------------------


@pytest.mark.parametrize(("struct", "dtype"), [
    (CtKey, CT_KEY_DTYPE),
    (CtEntry, CT_ENTRY_DTYPE),
    (CtReplyValue, CT_REPLY_VALUE_DTYPE),
    (NatMapping, NAT_MAPPING_DTYPE),
])
def test_dtypes_match_the_ctypes_structs(struct: type[ctypes.Structure], dtype: np.dtype[Any]) -> None:
    """Same size, same fields in the same order at the same offsets with the same sizes (test_abi.py ties
    the ctypes structs to abi.h), and the same bytes for the same values."""
    assert dtype.itemsize == ctypes.sizeof(struct)
    names = [f[0] for f in struct._fields_]
    assert list(dtype.names or ()) == names
    for name in names:
        field_type, offset = dtype.fields[name][:2]  # type: ignore[index]
        assert offset == getattr(struct, name).offset, name
        assert field_type.itemsize == getattr(struct, name).size, name
    obj = struct.from_buffer_copy(bytes(range(ctypes.sizeof(struct))))
    row = np.frombuffer(bytes(obj), dtype=dtype)[0]
    for name in names:
        want = getattr(obj, name)
        got = row[name]
        if isinstance(want, ctypes.Structure):
            assert got.tobytes() == bytes(want), name
        elif isinstance(want, ctypes.Array):
            assert list(got) == list(want), name
        else:
            assert int(got) == want, name


# --- FlowTable, ReplyTable, key_index ---------------------------------------------------------------------


def test_flow_table_round_trips_flows_and_derives_reply_keys() -> None:
    flows = [flow(PROTO_TCP, CtState.ESTABLISHED, 5, replied=True), flow(PROTO_UDP, CtState.NONE, 1),
             flow(PROTO_ICMP, CtState.NONE, 2)]
    table = FlowTable.from_flows(flows)
    assert len(table) == 3 and table.keys.dtype == CT_KEY_DTYPE and table.entries.dtype == CT_ENTRY_DTYPE
    assert table.flows() == flows == list(table)
    assert table[1] == flows[1] and table[-1] == flows[2]
    assert table.ctkeys() == [k for k, _ in flows]
    assert table[1:].flows() == flows[1:]
    assert table.take(np.array([2, 0])).flows() == [flows[2], flows[0]]
    assert table.take(np.array([False, True, False])).flows() == [flows[1]]
    assert table.reply_keys().tobytes() == b"".join(bytes(reply_key_for(k, e)) for k, e in flows)
    assert FlowTable.from_blobs(table.keys.tobytes(), table.entries.tobytes(), 3).flows() == flows
    with pytest.raises(IndexError):
        table[3]
    empty = FlowTable.empty()
    assert len(empty) == 0 and empty.flows() == [] and FlowTable.from_flows([]).flows() == []


def test_flow_table_rejects_wrong_arrays() -> None:
    with pytest.raises(TypeError):
        FlowTable(np.zeros(2, CT_ENTRY_DTYPE), np.zeros(2, CT_ENTRY_DTYPE))
    with pytest.raises(ValueError, match="2 keys but 1 entries"):
        FlowTable(np.zeros(2, CT_KEY_DTYPE), np.zeros(1, CT_ENTRY_DTYPE))


def test_reply_table_round_trips() -> None:
    t = FakeTables()
    populate(t, flow(), flow(PROTO_UDP, CtState.NONE))
    replies = t.reply_table()
    assert len(replies) == 2
    assert replies.pairs() == t.reply_index()
    values = b"".join(bytes(CtReplyValue(orig)) for _, orig in t.reply_index())
    assert ReplyTable.from_blobs(replies.keys.tobytes(), values, 2).pairs() == t.reply_index()


def _keys(raw: list[bytes]) -> npt.NDArray[np.void]:
    return np.frombuffer(b"".join(raw), dtype=CT_KEY_DTYPE) if raw else np.zeros(0, CT_KEY_DTYPE)


_key_bytes = st.binary(min_size=16, max_size=16)


@settings(max_examples=200, deadline=None)
@given(hay=st.lists(_key_bytes, max_size=40, unique=True), extra=st.lists(_key_bytes, max_size=20),
       pick=st.lists(st.integers(0, 1000), max_size=40))
def test_key_index_agrees_with_a_dict(hay: list[bytes], extra: list[bytes], pick: list[int]) -> None:
    needles = extra + [hay[i % len(hay)] for i in pick] if hay else extra  # duplicates included
    where = {k: i for i, k in enumerate(hay)}
    got = key_index(_keys(hay), _keys(needles))
    assert got.tolist() == [where.get(k, -1) for k in needles]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hay=st.lists(_key_bytes, min_size=1, max_size=30, unique=True),
       extra=st.lists(_key_bytes, max_size=10))
def test_key_index_is_exact_when_every_hash_collides(monkeypatch: pytest.MonkeyPatch, hay: list[bytes],
                                                     extra: list[bytes]) -> None:
    monkeypatch.setattr(tables_mod, "_MIX", np.zeros(2, dtype=np.uint64))  # every key hashes to 0
    needles = extra + hay[::-1]
    where = {k: i for i, k in enumerate(hay)}
    assert key_index(_keys(hay), _keys(needles)).tolist() == [where.get(k, -1) for k in needles]


def test_key_index_of_big_tables() -> None:
    rng = np.random.default_rng(7)
    hay = np.frombuffer(rng.bytes(16 * 50_000), dtype=CT_KEY_DTYPE)
    rows = rng.permutation(50_000)[:30_000]
    needles = np.concatenate([np.take(hay, rows), np.frombuffer(rng.bytes(16 * 1000), dtype=CT_KEY_DTYPE)])
    got = key_index(hay, needles)
    assert (got[:30_000] == rows).all() and (got[30_000:] == -1).all()
    assert key_index(hay[:0], needles).tolist() == [-1] * len(needles)
    assert key_index(hay, needles[:0]).tolist() == []


# --- the vectorised expiry against the scalar rule ----------------------------------------------------------


class RandomTimeouts:
    """Timeouts drawn by hypothesis; unknown protocols/states raise ValueError like Timeouts."""

    def __init__(self, table: dict[tuple[int, int, bool], float]) -> None:
        self.table = table

    def for_state(self, proto: int, state: int, replied: bool) -> float:
        if proto not in (PROTO_TCP, PROTO_UDP, PROTO_ICMP):
            raise ValueError(f"no conntrack timeout for IP protocol {proto}")
        if proto == PROTO_TCP and state > 8:
            raise ValueError(f"unknown TCP conntrack state {state}")
        return self.table.get((proto, state if proto == PROTO_TCP else 0, replied), 30.0)


_U64 = (1 << 64) - 1
_flow_rows = st.lists(st.tuples(
    st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP, 47, 0, 255]),
    st.one_of(st.integers(0, 8), st.integers(0, 255)),               # state
    st.integers(0, 255),                                             # flags
    st.one_of(st.integers(0, _U64), st.integers(-3 * S, 3 * S)),    # last_seen: anything, or near now
    st.sampled_from(["198.51.100.1", "198.51.100.2", "192.0.2.9"]),  # nat address
), max_size=60)
_timeouts = st.one_of(
    st.just(StubTimeouts()), st.just(Timeouts()),
    st.dictionaries(st.tuples(st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP]), st.integers(0, 8),
                              st.booleans()),
                    st.floats(0, 1e6, allow_nan=False) | st.sampled_from([0.0, 1.0, 1e-9, 2.5]),
                    max_size=12).map(RandomTimeouts),
)


def random_table(rows: list[tuple[int, int, int, int, str]], now: int) -> list[Flow]:
    out = []
    for i, (proto, state, flags, seen, nat) in enumerate(rows):
        key = CtKey.make(f"10.1.{i // 250}.{i % 250 + 1}", "203.0.113.9", 1024 + i, 443, proto)
        entry = CtEntry()
        entry.last_seen_ns = seen if seen >= 0 and abs(seen) > 3 * S else min(max(now + seen, 0), _U64)
        entry.state, entry.flags, entry.nat_addr, entry.nat_port = state, flags, ip_to_be32(nat), i + 1
        out.append((key, entry))
    return out


@settings(max_examples=300, deadline=None)
@given(rows=_flow_rows, now=st.one_of(st.integers(0, _U64 >> 1), st.just(NOW), st.integers(0, 100 * S)),
       timeouts=_timeouts)
def test_vectorised_expiry_equals_the_scalar_rule(rows: list[tuple[int, int, int, int, str]], now: int,
                                                  timeouts: Any) -> None:
    flows = random_table(rows, now)
    mask = expired_mask(FlowTable.from_flows(flows), now, timeouts)
    assert mask.dtype == np.bool_ and len(mask) == len(flows)
    want = {bytes(k) for k, _ in expired(flows, now, timeouts)}
    assert {bytes(k) for (k, _), m in zip(flows, mask.tolist(), strict=True) if m} == want


@settings(max_examples=100, deadline=None)
@given(rows=_flow_rows, timeouts=_timeouts, lookups=st.booleans())
def test_sweep_of_a_random_table_matches_the_scalar_rule(rows: list[tuple[int, int, int, int, str]],
                                                         timeouts: Any, lookups: bool) -> None:
    """Whatever is in the table, a sweep deletes exactly what expired() names, and counts the rest."""
    flows = random_table(rows, NOW)
    t = CopyingTables() if lookups else NoLookupTables()
    populate(t, *flows)
    gone: list[Flow] = []
    result = Reaper(t, timeouts, clock=Clock(), on_delete=gone.extend).sweep()

    doomed = expired(flows, NOW, timeouts)
    survivors = [f for f in flows if bytes(f[0]) not in {bytes(k) for k, _ in doomed}]
    assert {bytes(k) for k, _ in gone} == {bytes(k) for k, _ in doomed}
    assert set(t.ct) == {k for k, _ in survivors}
    assert (result.scanned, result.reaped, result.refreshed) == (len(flows), len(doomed), 0)

    def tally(items: Sequence[Flow]) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for k, e in items:
            lbl = state_label(k.proto, e.state, e.flags)
            out[lbl] = out.get(lbl, 0) + 1
        return out

    assert result.by_state == tally(doomed)
    assert result.entries_by_state == tally(survivors)
    ports: dict[str, int] = {}
    for _, e in survivors:
        ports[str(be32_to_ip(e.nat_addr))] = ports.get(str(be32_to_ip(e.nat_addr)), 0) + 1
    assert result.ports_in_use == ports


# --- on_delete: the NAT event log's hook ------------------------------------------------------------------


def test_on_delete_gets_the_deleted_flows_per_chunk_as_rechecked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reaper_mod, "RECHECK_CHUNK", 2)
    t = CopyingTables()
    old = [flow(PROTO_UDP, CtState.NONE, 99, src=f"10.0.4.{i}") for i in range(5)]
    live = flow(PROTO_TCP, CtState.ESTABLISHED, 1)
    populate(t, *old, live)

    def last_packets() -> None:  # counters moved after the snapshot, but the flow stays idle
        t.ct[old[0][0]].packets_orig = 42

    t.after_flows.append(last_packets)
    r: Reaper
    calls: list[list[Flow]] = []
    table_calls_then: list[int] = []

    def hook(flows: Sequence[Flow]) -> None:
        assert not r._lock.locked(), "on_delete runs outside the sweep's lock"
        table_calls_then.append(len(t.calls))
        calls.append(list(flows))

    r = Reaper(t, StubTimeouts(), clock=Clock(), on_delete=hook)
    result = r.sweep()
    assert result.reaped == 5
    assert table_calls_then == [len(t.calls)] * 3, "called once the sweep's own work is done"
    assert [len(c) for c in calls] == [2, 2, 1]
    deleted = [f for c in calls for f in c]
    assert {k for k, _ in deleted} == {k for k, _ in old}
    assert all(isinstance(k, CtKey) and isinstance(e, CtEntry) for k, e in deleted)
    assert next(e for k, e in deleted if k == old[0][0]).packets_orig == 42  # the entry as re-checked
    assert t.calls.count("delete_flows") == 3


def test_on_delete_on_the_reread_path_and_through_the_thread() -> None:
    t = NoLookupTables()
    a, b = flow(PROTO_UDP, CtState.NONE, 99), flow(PROTO_UDP, CtState.NONE, 99)
    populate(t, a, b)
    t.after_flows.append(lambda: refresh(t, a[0], NOW))
    calls: list[Sequence[Flow]] = []
    th = ReaperThread(t, StubTimeouts(), interval=3600, clock=Clock(), on_delete=calls.append)
    th.start()
    try:
        assert wait_for(lambda: th.sweeps == 1)
    finally:
        th.stop()
        th.join(1.0)
    assert th.last_result is not None and th.last_result.recheck == "reread"
    assert len(calls) == 1 and [k for k, _ in calls[0]] == [b[0]]
    chunk = calls[0]
    assert isinstance(chunk, FlowTable)  # columnar too, for a consumer that wants the arrays
    assert chunk.entries["last_seen_ns"].tolist() == [b[1].last_seen_ns]


def test_on_delete_only_gets_what_this_sweep_deleted() -> None:
    """A flow somebody else deletes between the re-check and the delete is not reported."""

    class Racing(CopyingTables):
        def lookup_flows(self, keys: npt.NDArray[np.void]) -> tuple[Any, Any]:
            out = super().lookup_flows(keys)
            FakeTables.delete_flows(self, [victim])  # natctl -D, right after our lookups
            return out

    t = Racing()
    victim, other = flow(PROTO_UDP, CtState.NONE, 99), flow(PROTO_UDP, CtState.NONE, 99)
    populate(t, victim, other)
    calls: list[Sequence[Flow]] = []
    result = Reaper(t, StubTimeouts(), clock=Clock(), on_delete=calls.append).sweep()
    assert (result.reaped, result.by_state) == (1, {("udp", "unreplied"): 1})
    assert [[k for k, _ in c] for c in calls] == [[other[0]]]
    assert t.ct == {}


def test_on_delete_failure_is_logged_and_the_sweep_goes_on(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reaper_mod, "RECHECK_CHUNK", 1)
    t = CopyingTables()
    populate(t, flow(PROTO_UDP, CtState.NONE, 99), flow(PROTO_UDP, CtState.NONE, 99))
    seen: list[int] = []

    def boom(flows: Sequence[Flow]) -> None:
        seen.append(len(flows))
        raise RuntimeError("event log broke")

    sweeps: list[SweepResult] = []
    with caplog.at_level(logging.ERROR, logger="natd.reaper"):
        result = Reaper(t, StubTimeouts(), clock=Clock(), on_delete=boom, on_sweep=sweeps.append).sweep()
    assert result.reaped == 2 and seen == [1, 1] and sweeps == [result]
    assert caplog.text.count("on_delete callback failed") == 2


def test_on_delete_still_hears_of_deletes_when_the_sweep_fails_later() -> None:
    class BrokenReplies(CopyingTables):
        def delete_replies(self, keys: Sequence[CtKey]) -> int:
            raise BpfError("batch delete in ct_reply: Bad file descriptor (errno 9)")

    t = BrokenReplies()
    doomed = flow(PROTO_UDP, CtState.NONE, 99)
    populate(t, doomed)
    orphan(t)
    calls: list[Sequence[Flow]] = []
    r = Reaper(t, StubTimeouts(), clock=Clock(), on_delete=calls.append)
    r.sweep()  # the orphan is pending after this one
    assert [[k for k, _ in c] for c in calls] == [[doomed[0]]]
    populate(t, flow(PROTO_UDP, CtState.NONE, 99))
    with pytest.raises(BpfError):
        r.sweep()  # deletes the expired flow, then fails on the orphan
    assert len(calls) == 2 and len(calls[1]) == 1


def test_no_on_delete_call_when_nothing_was_deleted() -> None:
    t = CopyingTables()
    populate(t, flow(PROTO_TCP, CtState.ESTABLISHED, 1))
    calls: list[Sequence[Flow]] = []
    Reaper(t, StubTimeouts(), clock=Clock(), on_delete=calls.append).sweep()
    assert calls == []


# --- NAT mappings: released with their endpoint's last flow ------------------------------------------------


def add_mapping(t: FakeTables, f: Flow, *, endpoint_independent: bool = True,
                last_used: int = NOW - S) -> CtKey:
    """The mapping the datapath makes with a flow's first packet (natd.maps.mapping_key_for)."""
    key = mapping_key_for(f[0], endpoint_independent)
    m = NatMapping()
    m.last_used_ns = last_used
    m.ext_addr, m.ext_port = f[1].nat_addr, f[1].nat_port
    m.flags = int(NatMappingFlags.OWNS_PORT)
    t.add_mapping(key, m)
    return key


def test_mapping_released_when_its_last_flow_is_reaped() -> None:
    t = CopyingTables()
    old = flow(PROTO_UDP, CtState.NONE, 25)
    live = flow(PROTO_UDP, CtState.NONE, 1, src="10.0.0.3")
    populate(t, old, live)
    gone_key, kept_key = add_mapping(t, old), add_mapping(t, live)

    result = Reaper(t, StubTimeouts(), clock=Clock()).sweep()

    assert (result.reaped, result.mappings_released, result.mappings) == (1, 1, 1)
    assert set(t.mappings) == {kept_key} and gone_key not in t.mappings
    assert t.host_ports() == {ip_to_be32("10.0.0.3"): 1}


def test_mapping_stays_while_any_flow_of_the_endpoint_lives() -> None:
    """Endpoint-independent: the mapping key has no remote, and another flow of the same inside endpoint
    (to another remote) keeps it."""
    t = CopyingTables()
    old = flow(PROTO_UDP, CtState.NONE, 25)
    _, entry = flow(PROTO_UDP, CtState.NONE, 1)
    sibling = CtKey.make(str(old[0].src), "198.51.100.99", old[0].src_port, 53, PROTO_UDP)
    populate(t, old, (sibling, entry))
    mk = add_mapping(t, old)
    result = Reaper(t, StubTimeouts(), clock=Clock()).sweep()
    assert (result.reaped, result.mappings_released) == (1, 0) and mk in t.mappings


def test_address_and_port_dependent_mapping_is_the_whole_tuple() -> None:
    t = CopyingTables()
    live = flow(PROTO_TCP, CtState.ESTABLISHED, 1)
    old = flow(PROTO_TCP, CtState.SYN_SENT, 100)
    populate(t, live, old)
    kept = add_mapping(t, live, endpoint_independent=False)
    gone = add_mapping(t, old, endpoint_independent=False)
    Reaper(t, StubTimeouts(), clock=Clock()).sweep()
    assert kept in t.mappings and gone not in t.mappings


def test_mapping_a_new_flow_took_after_the_read_is_kept() -> None:
    """A mapping whose last_used_ns moved since the sweep read it has a flow the read did not see."""
    class Taken(CopyingTables):
        def lookup_mappings(self, keys: npt.NDArray[np.void]) -> tuple[npt.NDArray[np.bool_],
                                                                        npt.NDArray[np.void]]:
            for m in self.mappings.values():
                m.last_used_ns += 1  # a flow took it between the read and the re-check
            return super().lookup_mappings(keys)

    t = Taken()
    old = flow(PROTO_UDP, CtState.NONE, 25)
    populate(t, old)
    mk = add_mapping(t, old)
    result = Reaper(t, StubTimeouts(), clock=Clock()).sweep()
    assert (result.reaped, result.mappings_released) == (1, 0) and mk in t.mappings
