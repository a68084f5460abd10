"""natctl on FakeTables: every command, filter, output form, usage error and exit status."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from natd import __version__, ctl
from natd.ctl import BANNER, FlowFilter, InterfaceInfo, PinInfo, Settings, SnatRuleInfo
from natd.errors import StateError
from natd.maps import LAYOUT_VERSION as LAYOUT
from natd.maps import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    CtEntry,
    CtFlags,
    CtKey,
    CtState,
    NatMapping,
    NatMappingFlags,
    Stat,
    ip_to_be32,
    mapping_key_for,
    port_to_be16,
    reply_key_for,
)
from natd.tables import FakeTables, Tables

pytestmark = pytest.mark.unit

S = 1_000_000_000
NOW = 1000 * S
BOTH = int(CtFlags.REPLIED | CtFlags.ASSURED)

LINE_TCP = ("tcp      6 7430 ESTABLISHED src=10.0.1.42 dst=198.51.100.10 sport=40000 dport=80 "
            "src=198.51.100.10 dst=203.0.113.1 sport=80 dport=40000 [ASSURED] mark=0 use=1")
LINE_UDP = ("udp      17 110 src=10.0.1.42 dst=198.51.100.20 sport=40001 dport=53 [UNREPLIED] "
            "src=198.51.100.20 dst=203.0.113.1 sport=53 dport=20001 mark=0 use=1")
LINE_ICMP = ("icmp     1 50 src=10.0.1.43 dst=198.51.100.10 type=8 code=0 id=1234 "
             "src=198.51.100.10 dst=203.0.113.2 type=0 code=0 id=20002 [ASSURED] mark=0 use=1")
LINE_SYN = ("tcp      6 110 SYN_SENT src=10.0.2.7 dst=192.0.2.80 sport=50000 dport=443 [UNREPLIED] "
            "src=192.0.2.80 dst=203.0.113.2 sport=443 dport=20003 mark=0 use=1")


def flow(src: str, dst: str, sport: int, dport: int, proto: int, nat: str, nat_port: int,
         state: CtState = CtState.NONE, flags: int = 0) -> tuple[CtKey, CtEntry]:
    key = CtKey.make(src, dst, sport, dport, proto)
    e = CtEntry()
    e.nat_addr, e.nat_port = ip_to_be32(nat), port_to_be16(nat_port)
    e.state, e.flags = int(state), flags
    e.created_ns, e.last_seen_ns = NOW - 100 * S, NOW - 10 * S
    return key, e


def populated() -> FakeTables:
    t = FakeTables(ct_max=4096)
    for key, e in (
        flow("10.0.1.42", "198.51.100.10", 40000, 80, PROTO_TCP, "203.0.113.1", 40000, CtState.ESTABLISHED,
             BOTH),
        flow("10.0.1.42", "198.51.100.20", 40001, 53, PROTO_UDP, "203.0.113.1", 20001),
        flow("10.0.1.43", "198.51.100.10", 1234, 0, PROTO_ICMP, "203.0.113.2", 20002, flags=BOTH),
        flow("10.0.2.7", "192.0.2.80", 50000, 443, PROTO_TCP, "203.0.113.2", 20003, CtState.SYN_SENT),
    ):
        t.add_flow(key, e)
    return t


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def natctl(capsys: pytest.CaptureFixture[str]) -> Run:
    """natctl(tables, *argv) -> (exit status, stdout, stderr); records the Settings it opened."""

    def call(tables: Tables, *argv: str, pin_info: PinInfo | None = None,
             default_config: str | None = None, seen: list[Settings] | None = None) -> tuple[int, str, str]:
        def open_tables(settings: Settings) -> Tables:
            if seen is not None:
                seen.append(settings)
            return tables

        rc = ctl.run(list(argv), open_tables=open_tables, now_ns=lambda: NOW, default_config=default_config,
                     pin_info=lambda t, s: pin_info or PinInfo("/pins"))
        out, err = capsys.readouterr()
        return rc, out, err

    return call


# --- -L ---------------------------------------------------------------------------------------------------


def test_list_prints_every_flow_and_the_summary_on_stderr(natctl: Run) -> None:
    rc, out, err = natctl(populated(), "-L")
    assert rc == 0
    assert out == "\n".join([LINE_TCP, LINE_UDP, LINE_ICMP, LINE_SYN]) + "\n"
    assert err == f"natctl v{__version__} (natd): 4 flow entries have been shown.\n"


def test_list_of_an_empty_table_succeeds(natctl: Run) -> None:
    assert natctl(FakeTables(), "--dump") == (0, "", f"{BANNER}: 0 flow entries have been shown.\n")


@pytest.mark.parametrize(("argv", "lines"), [
    (["-p", "tcp"], [LINE_TCP, LINE_SYN]),
    (["--proto", "UDP"], [LINE_UDP]),
    (["-p", "1"], [LINE_ICMP]),
    (["-s", "10.0.1.42"], [LINE_TCP, LINE_UDP]),
    (["--orig-src", "10.0.1.0/24"], [LINE_TCP, LINE_UDP, LINE_ICMP]),
    (["-d", "198.51.100.10"], [LINE_TCP, LINE_ICMP]),
    (["--orig-dst", "192.0.2.0/24"], [LINE_SYN]),
    (["--sport", "1234"], [LINE_ICMP]),
    (["--dport", "53"], [LINE_UDP]),
    (["-q", "203.0.113.2"], [LINE_ICMP, LINE_SYN]),
    (["--reply-port-dst", "20001"], [LINE_UDP]),
    (["--state", "established"], [LINE_TCP]),
    (["--state", "NONE"], []),  # UDP/ICMP have no state: --state matches TCP only
    (["-p", "tcp", "-s", "10.0.2.0/24", "--state", "SYN_SENT", "--dport", "443"], [LINE_SYN]),
    (["-p", "udp", "--dport", "80"], []),
])
def test_list_filters(natctl: Run, argv: list[str], lines: list[str]) -> None:
    rc, out, err = natctl(populated(), "-L", *argv)
    assert rc == 0
    assert out.splitlines() == lines
    assert err == f"{BANNER}: {len(lines)} flow entries have been shown.\n"


def test_list_json_is_one_object_per_line(natctl: Run) -> None:
    rc, out, _ = natctl(populated(), "-L", "-o", "json", "-p", "tcp")
    assert rc == 0
    objs = [json.loads(line) for line in out.splitlines()]
    assert [o["orig"]["sport"] for o in objs] == [40000, 50000]
    assert objs[0]["state"] == "ESTABLISHED"
    assert objs[0]["timeout"] == 7430
    assert objs[0]["age"] == 100.0
    assert objs[1]["external"] == {"addr": "203.0.113.2", "port": 20003}
    assert (objs[1]["replied"], objs[1]["assured"]) == (False, False)


# --- -C -----------------------------------------------------------------------------------------------------


def test_count(natctl: Run) -> None:
    assert natctl(populated(), "-C") == (0, "4\n", "")
    assert natctl(populated(), "--count", "-p", "tcp") == (0, "2\n", "")
    assert natctl(FakeTables(), "-C") == (0, "0\n", "")


# --- -S -----------------------------------------------------------------------------------------------------


def test_stats_rows_map_natd_counters(natctl: Run) -> None:
    t = FakeTables(ncpu=2)
    t.counters[0].update({Stat.SNAT_OUT: (10, 1000), Stat.DNAT_IN: (7, 700), Stat.CT_NEW: (3, 180),
                          Stat.DROP_MALFORMED: (1, 60), Stat.DROP_UNSUPPORTED: (2, 120),
                          Stat.DROP_NO_MAPPING: (4, 240), Stat.DROP_PORT_EXHAUSTED: (5, 300),
                          Stat.DROP_TABLE_FULL: (6, 360), Stat.CT_CREATE_RACE: (8, 0)})
    t.counters[1].update({Stat.CT_NEW: (1, 60)})  # a create with no SNAT_OUT on that CPU: found stays >= 0
    rc, out, err = natctl(t, "-S")
    assert (rc, err) == (0, "")
    assert out == (
        "cpu=0   \tfound=14 invalid=7 insert=3 insert_failed=5 drop=6 early_drop=0 error=0 search_restart=0 "
        "clash_resolve=8 chaintoolong=0 \n"
        "cpu=1   \tfound=0 invalid=0 insert=1 insert_failed=0 drop=0 early_drop=0 error=0 search_restart=0 "
        "clash_resolve=0 chaintoolong=0 \n")


def test_stats_json(natctl: Run) -> None:
    t = FakeTables(ncpu=1)
    t.counters[0][Stat.CT_NEW] = (2, 0)
    rc, out, _ = natctl(t, "-S", "-o", "json")
    assert rc == 0
    assert json.loads(out) == {"cpu": 0, "found": 0, "invalid": 0, "insert": 2, "insert_failed": 0, "drop": 0,
                               "early_drop": 0, "error": 0, "search_restart": 0, "clash_resolve": 0,
                               "chaintoolong": 0}


# --- -F / -D ------------------------------------------------------------------------------------------------


def test_flush_deletes_both_halves_of_every_flow(natctl: Run) -> None:
    t = populated()
    assert len(t.replies) == 4
    rc, out, err = natctl(t, "-F")
    assert (rc, out) == (0, "")
    assert err == f"{BANNER}: connection tracking table has been emptied (4 flow entries deleted).\n"
    assert t.ct == {}
    assert t.replies == {}


def test_flush_of_an_empty_table_succeeds(natctl: Run) -> None:
    assert natctl(FakeTables(), "--flush") == (
        0, "", f"{BANNER}: connection tracking table has been emptied (0 flow entries deleted).\n")


def test_delete_removes_matches_only_and_frees_their_ports(natctl: Run) -> None:
    t = populated()
    keep = {k: e for k, e in t.ct.items() if k.src_port != 40001}
    rc, out, err = natctl(t, "-D", "-s", "10.0.1.42", "-p", "udp")
    assert rc == 0
    assert out == LINE_UDP + "\n"
    assert err == f"{BANNER}: 1 flow entries have been deleted.\n"
    assert t.ct == keep
    assert set(t.replies) == {reply_key_for(k, e) for k, e in keep.items()}


def test_delete_without_match_exits_1_and_changes_nothing(natctl: Run) -> None:
    t = populated()
    rc, out, err = natctl(t, "--delete", "-s", "10.9.9.9")
    assert (rc, out) == (1, "")
    assert err == f"{BANNER}: 0 flow entries have been deleted.\n"
    assert len(t.ct) == 4
    assert len(t.replies) == 4


def test_delete_json(natctl: Run) -> None:
    rc, out, _ = natctl(populated(), "-D", "--reply-port-dst", "20002", "-o", "json")
    assert rc == 0
    assert json.loads(out)["orig"] == {"src": "10.0.1.43", "dst": "198.51.100.10", "type": 8, "code": 0,
                                       "id": 1234}


# --- usage --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    ([], "no command given; use -L, -C, -S, -F, -D, -E, -M or status"),
    (["-D"], "-D needs at least one filter (e.g. -s 10.0.1.42); -F deletes every flow"),
    (["-S", "-p", "tcp"], "filters (-p, -s, -d, --sport, --dport, -q, --reply-port-dst, --state) apply to "
                          "-L, -C, -D, -E and -M only"),
    (["-F", "-s", "10.0.0.1"], "apply to -L, -C, -D, -E and -M only"),
    (["status", "--state", "ESTABLISHED"], "apply to -L, -C, -D, -E and -M only"),
    (["-E", "--state", "ESTABLISHED"], "--state does not apply to -E: events carry no TCP state"),
    (["-C", "-o", "json"], "-o applies to -L, -D, -S, -M and status"),
    (["-L", "status"], "give one command: status or -L, not both"),
    (["-L", "-C"], "argument -C/--count: not allowed with argument -L/--dump"),
    (["-L", "-p", "sctp"], "'sctp' is not a protocol natd tracks; expected tcp, udp or icmp"),
    (["-L", "-s", "10.0.0.300"], "'10.0.0.300' is not an IPv4 address or network; expected e.g. 10.0.1.42"),
    (["-L", "--sport", "70000"], "'70000' is not a port; expected 0-65535"),
    (["-L", "--dport", "-1"], "argument --dport: '-1' is not a port; expected 0-65535"),
    (["-L", "--state", "OPEN"], "'OPEN' is not a TCP state; expected one of NONE, SYN_SENT, SYN_RECV"),
    (["-L", "-o", "xml"], "argument -o/--output: invalid choice: 'xml'"),
    (["list"], "argument subcommand: invalid choice: 'list'"),
])
def test_usage_errors_exit_2(natctl: Run, argv: list[str], message: str) -> None:
    rc, out, err = natctl(populated(), *argv)
    assert (rc, out) == (2, "")
    assert err.startswith("usage: natctl ")
    assert "natctl: error: " in err
    assert message in err


def test_version(natctl: Run) -> None:
    assert natctl(FakeTables(), "--version") == (0, f"natctl v{__version__} (natd)\n", "")


def test_help_has_examples_and_the_stats_mapping(natctl: Run) -> None:
    rc, out, _ = natctl(FakeTables(), "--help")
    assert rc == 0
    assert "examples:\n  natctl -L " in out
    assert "insert_failed  no free external port for a new flow: DROP_PORT_EXHAUSTED" in out
    assert "found          packets that matched an existing flow: SNAT_OUT + DNAT_IN - CT_NEW" in out
    assert "exit status: 0 ok, 1 error (or -D matched nothing), 2 bad usage." in out


# --- errors and settings ------------------------------------------------------------------------------------


def test_missing_state_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    def no_state(settings: Settings) -> Tables:
        raise StateError("no pinned map at /x/ct_orig; is natd running with this instance and pin_root?")

    assert ctl.run(["-L"], open_tables=no_state, default_config=None) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("natctl: error: no pinned map at /x/ct_orig; is natd running with this instance and "
                   "pin_root?\n")


def test_open_pinned_without_state_names_instance_and_pin_root(tmp_path: Path) -> None:
    settings = Settings(instance="edge", pin_root=str(tmp_path))
    with pytest.raises(StateError) as exc:
        ctl.open_pinned(settings)
    assert str(exc.value) == (
        f"no natd state in {tmp_path}/edge/v{LAYOUT}: is natd running with instance 'edge' and pin_root "
        f"{tmp_path}? "
        "Pass --instance/--pin-root, or --config with natd's config")


def test_open_pinned_with_another_layout_says_so(tmp_path: Path) -> None:
    (tmp_path / "default" / "v9").mkdir(parents=True)
    with pytest.raises(StateError) as exc:
        ctl.open_pinned(Settings(pin_root=str(tmp_path)))
    assert str(exc.value) == (f"{tmp_path}/default holds natd state of map layout v9, this natctl reads "
                              f"v{LAYOUT}; "
                              "use the natctl of the natd version that is running")


def test_pin_root_error_through_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.run(["--pin-root", str(tmp_path), "-C"], default_config=None) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"natctl: error: no natd state in {tmp_path}/default/v{LAYOUT}: ")
    assert err.count("\n") == 1


CONFIG = """\
instance: edge
inside: [eth1]
outside: eth0
snat:
  - from: 10.0.0.0/8
conntrack:
  timeouts:
    tcp_established: 100
state:
  pin_root: /run/natd/bpf
"""


def test_config_gives_instance_pin_root_and_timeouts(natctl: Run, tmp_path: Path) -> None:
    path = tmp_path / "natd.yaml"
    path.write_text(CONFIG)
    seen: list[Settings] = []
    rc, out, _ = natctl(populated(), "--config", str(path), "-L", "--state", "ESTABLISHED", seen=seen)
    assert rc == 0
    assert out.startswith("tcp      6 90 ESTABLISHED ")  # 100 s timeout, idle 10 s
    assert (seen[0].instance, seen[0].pin_root, seen[0].pin_dir) == ("edge", "/run/natd/bpf",
                                                                     f"/run/natd/bpf/edge/v{LAYOUT}")


def test_command_line_overrides_the_config(natctl: Run, tmp_path: Path) -> None:
    path = tmp_path / "natd.yaml"
    path.write_text(CONFIG)
    seen: list[Settings] = []
    natctl(populated(), "--config", str(path), "--instance", "lab", "--pin-root", "/sys/fs/bpf/x", "-C",
           seen=seen)
    assert seen[0].pin_dir == f"/sys/fs/bpf/x/lab/v{LAYOUT}"


def test_defaults_without_config(natctl: Run, tmp_path: Path) -> None:
    seen: list[Settings] = []
    natctl(populated(), "-C", seen=seen, default_config=str(tmp_path / "absent.yaml"))
    assert seen[0].pin_dir == f"/sys/fs/bpf/natd/default/v{LAYOUT}"


def test_default_config_is_read_when_present(natctl: Run, tmp_path: Path) -> None:
    path = tmp_path / "natd.yaml"
    path.write_text(CONFIG)
    seen: list[Settings] = []
    natctl(populated(), "-C", seen=seen, default_config=str(path))
    assert seen[0].pin_dir == f"/run/natd/bpf/edge/v{LAYOUT}"


def test_a_broken_default_config_is_a_warning(natctl: Run, tmp_path: Path) -> None:
    path = tmp_path / "natd.yaml"
    path.write_text("inside: [eth1]\n")
    seen: list[Settings] = []
    rc, out, err = natctl(populated(), "-C", seen=seen, default_config=str(path))
    assert (rc, out) == (0, "4\n")
    assert err.startswith(f"natctl: warning: ignoring {path}: {path}:1: ")
    assert seen[0].pin_dir == f"/sys/fs/bpf/natd/default/v{LAYOUT}"


def test_a_broken_explicit_config_is_an_error(natctl: Run, tmp_path: Path) -> None:
    path = tmp_path / "natd.yaml"
    path.write_text("inside: [eth1]\n")
    rc, out, err = natctl(populated(), "--config", str(path), "-C")
    assert (rc, out) == (1, "")
    assert err.startswith(f"natctl: error: {path}:1: ")
    assert err.count("\n") == 1


def test_tables_are_closed(natctl: Run) -> None:
    class Closing(FakeTables):
        closed = 0

        def close(self) -> None:
            self.closed += 1

    t = Closing()
    natctl(t, "-C")
    assert t.closed == 1


def test_broken_pipe_exits_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    class Closed(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert ctl.run(["-L"], open_tables=lambda s: populated(), default_config=None) == 1


def test_read_pin_info_needs_pinned_tables() -> None:
    with pytest.raises(StateError) as exc:
        ctl.read_pin_info(FakeTables(), Settings())
    assert str(exc.value) == "status reads pinned maps; FakeTables has none"


# --- filters as a unit ---------------------------------------------------------------------------------


def test_empty_filter_matches_everything_and_is_inactive() -> None:
    t = populated()
    assert not FlowFilter().active
    assert FlowFilter().select(t.flows()) == t.flows()
    assert FlowFilter(sport=0).active


# --- status -------------------------------------------------------------------------------------------------


INFO = PinInfo(
    directory=f"/sys/fs/bpf/natd/default/v{LAYOUT}",
    pins=("ct_orig", "ct_reply", "stats"),
    rules=(SnatRuleInfo(0, "10.0.0.0/8", ("203.0.113.1", "203.0.113.2"), "20000-29999"),
           SnatRuleInfo(1, "172.16.0.0/12", (), "1024-32767", 500)),
    port_ranges={"203.0.113.2": (20000, 29999), "203.0.113.1": (20000, 29999)},
    interfaces=(InterfaceInfo("eth0", "outside", 4, "xdp prog id 42 (driver mode)"),
                InterfaceInfo("eth1", "inside", None, "not found in this network namespace")),
)


def status_tables() -> FakeTables:
    t = populated()
    t.counters[0].update({Stat.SNAT_OUT: (10, 1000), Stat.DNAT_IN: (8, 900), Stat.DROP_NO_MAPPING: (3, 180),
                          Stat.DROP_MALFORMED: (1, 60), Stat.PASS_LOCAL: (2, 120)})
    t.counters[1].update({Stat.SNAT_OUT: (1, 100), Stat.DROP_NO_MAPPING: (1, 60)})
    return t


def test_status_text(natctl: Run) -> None:
    rc, out, err = natctl(status_tables(), "status", pin_info=INFO)
    assert (rc, err) == (0, "")
    assert out.splitlines() == [
        f"natd instance 'default', map layout v{LAYOUT}",
        f"pin dir:     /sys/fs/bpf/natd/default/v{LAYOUT} (3 pins: ct_orig ct_reply stats)",
        "conntrack:   4 / 4096 entries (0.1% full)",
        "translated:  out 11 packets / 1100 bytes, in 8 packets / 900 bytes",
        "dropped:     5 packets (no_mapping 4, malformed 1)",
        "passed:      2 packets (local 2)",
        "interfaces:",
        "  eth0            outside  ifindex 4     xdp prog id 42 (driver mode)",
        "  eth1            inside   ifindex -     not found in this network namespace",
        "external addresses:",
        "  203.0.113.1     ports 20000-29999",
        "  203.0.113.2     ports 20000-29999",
        "daemon:      no status file (natd not started here, or an older natd)",
        "snat rules:",
        "  rule 0    10.0.0.0/8         -> 203.0.113.1, 203.0.113.2  ports 20000-29999",
        "  rule 1    172.16.0.0/12      -> -  ports 1024-32767  max 500 per host",
    ]


def test_status_of_an_idle_natd(natctl: Run) -> None:
    rc, out, _ = natctl(FakeTables(ct_max=1024), "status", pin_info=PinInfo("/p"))
    assert rc == 0
    assert out.splitlines() == [
        f"natd instance 'default', map layout v{LAYOUT}",
        "pin dir:     /p (0 pins: )",
        "conntrack:   0 / 1024 entries (0.0% full)",
        "translated:  out 0 packets / 0 bytes, in 0 packets / 0 bytes",
        "dropped:     0 packets",
        "passed:      0 packets",
        "interfaces:  none known (pass --config to list inside ones)",
        "external addresses:  none",
        "daemon:      no status file (natd not started here, or an older natd)",
        "snat rules:  none",
    ]


def test_status_shows_the_daemon_from_its_status_file(natctl: Run) -> None:
    daemon = {"pid": os.getpid(), "config": "/etc/natd/natd.yaml", "config_digest": "ab" * 32,
              "interfaces": {"eth0": "attached", "eth1": "missing"},
              "reaper": {"sweeps": 3, "last_success": time.time() - 2, "last_duration_seconds": 0.01,
                         "entries": 7}}
    rc, out, _ = natctl(FakeTables(ct_max=1024), "status", pin_info=PinInfo("/p", daemon=daemon))
    assert rc == 0
    lines = out.splitlines()
    head = f"daemon:      pid {os.getpid()} running, config /etc/natd/natd.yaml (digest abababababab)"
    assert head in lines
    assert any(line.startswith("reaper:      last sweep 2 s ago, 7 entries") for line in lines)
    assert "link events: eth0 attached, eth1 missing" in lines
    daemon["pid"] = 2**22 + 1  # above pid_max: no such process
    _, out, _ = natctl(FakeTables(ct_max=1024), "status", pin_info=PinInfo("/p", daemon=daemon))
    assert "NOT running (the XDP program keeps translating)" in out


def test_status_json(natctl: Run) -> None:
    rc, out, _ = natctl(status_tables(), "status", "-o", "json", pin_info=INFO)
    assert rc == 0
    data = json.loads(out)
    assert data["conntrack"] == {"entries": 4, "max": 4096}
    assert data["translated"] == {"out": {"packets": 11, "bytes": 1100}, "in": {"packets": 8, "bytes": 900}}
    assert data["dropped"]["no_mapping"] == 4
    assert data["passed"]["local"] == 2
    assert data["interfaces"][0] == {"name": "eth0", "role": "outside", "ifindex": 4,
                                     "xdp": "xdp prog id 42 (driver mode)"}
    assert data["external_addresses"] == {"203.0.113.1": "20000-29999", "203.0.113.2": "20000-29999"}
    assert data["snat_rules"][1] == {"rule_id": 1, "from": "172.16.0.0/12", "to": [], "ports": "1024-32767",
                                     "max_ports_per_host": 500}


def test_main_is_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def fake_run(argv: list[str]) -> int:
        calls.append(argv)
        return 0

    monkeypatch.setattr(ctl, "run", fake_run)
    assert ctl.main(["-C"]) == 0
    assert calls == [["-C"]]
    assert os.path.basename(ctl.DEFAULT_CONFIG) == "natd.yaml"


# --- XDP attachment (netlink faked) -------------------------------------------------------------------


class FakeNla:
    def __init__(self, attrs: dict[str, object]) -> None:
        self.attrs = attrs

    def get_attr(self, name: str) -> object:
        return self.attrs.get(name)


def fake_iproute(monkeypatch: pytest.MonkeyPatch, xdp: FakeNla | None) -> None:
    import pyroute2

    class FakeIPRoute:
        def __enter__(self) -> FakeIPRoute:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def get_links(self, index: int) -> list[FakeNla]:
            if index == 99:
                raise OSError(19, "No such device")
            return [FakeNla({"IFLA_XDP": xdp})]

    monkeypatch.setattr(pyroute2, "IPRoute", FakeIPRoute)


@pytest.mark.parametrize(("attrs", "expected"), [
    ({"IFLA_XDP_ATTACHED": "xdp", "IFLA_XDP_PROG_ID": 42}, "xdp prog id 42 (driver mode)"),
    ({"IFLA_XDP_ATTACHED": "xdpgeneric", "IFLA_XDP_PROG_ID": 7}, "xdp prog id 7 (generic mode)"),
    ({"IFLA_XDP_ATTACHED": 1, "IFLA_XDP_PROG_ID": 3}, "xdp prog id 3 (driver mode)"),
    ({"IFLA_XDP_ATTACHED": None}, "no XDP program"),
])
def test_xdp_attachment(monkeypatch: pytest.MonkeyPatch, attrs: dict[str, object], expected: str) -> None:
    fake_iproute(monkeypatch, FakeNla(attrs))
    assert ctl._xdp_of(5) == expected


def test_xdp_attachment_errors_do_not_fail_status(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_iproute(monkeypatch, None)
    assert ctl._xdp_of(5) == "no XDP program"
    assert ctl._xdp_of(99) == "unknown ([Errno 19] No such device)"


def test_interface_that_does_not_exist() -> None:
    assert ctl._interface("natd-nope0", None, "inside") == InterfaceInfo(
        "natd-nope0", "inside", None, "not found in this network namespace")


# --- -M: NAT mappings --------------------------------------------------------------------------------------


def mapped_tables() -> FakeTables:
    """host 10.0.1.42 with UDP 5060 mapped to 203.0.113.1:5060 (two flows), and ICMP id 7 (no flow left)."""
    t = FakeTables()
    for remote in ("198.51.100.10", "198.51.100.20"):
        key = CtKey.make("10.0.1.42", remote, 5060, 5060, PROTO_UDP)
        entry = CtEntry(nat_addr=ip_to_be32("203.0.113.1"), nat_port=port_to_be16(5060))
        t.add_flow(key, entry)
    sip = NatMapping(ext_addr=ip_to_be32("203.0.113.1"), ext_port=port_to_be16(5060),
                     flags=int(NatMappingFlags.OWNS_PORT))
    t.add_mapping(mapping_key_for(CtKey.make("10.0.1.42", "198.51.100.10", 5060, 5060, PROTO_UDP)), sip)
    ping = NatMapping(ext_addr=ip_to_be32("203.0.113.1"), ext_port=port_to_be16(20007),
                      flags=int(NatMappingFlags.OWNS_PORT | NatMappingFlags.EIF), rule_id=1)
    t.add_mapping(mapping_key_for(CtKey.make("10.0.1.42", "198.51.100.10", 7, 0, PROTO_ICMP)), ping)
    return t


def test_mappings_listed_with_their_flows_and_host_ports(natctl: Run) -> None:
    rc, out, err = natctl(mapped_tables(), "-M")
    assert rc == 0
    assert out.splitlines() == [
        "udp      17 src=10.0.1.42 sport=5060 ext=203.0.113.1 eport=5060 flows=2 host_ports=2 [OWNS_PORT]",
        "icmp     1 src=10.0.1.42 id=7 ext=203.0.113.1 eid=20007 flows=0 host_ports=2 [OWNS_PORT] [EIF]",
    ]
    assert err == f"{BANNER}: 2 mappings have been shown.\n"


def test_mappings_filtered_and_as_json(natctl: Run) -> None:
    rc, out, _ = natctl(mapped_tables(), "-M", "-p", "icmp", "-o", "json")
    assert rc == 0
    assert [json.loads(line) for line in out.splitlines()] == [{
        "proto": "icmp", "inside": {"addr": "10.0.1.42", "port": 7},
        "external": {"addr": "203.0.113.1", "port": 20007}, "flows": 0, "host_ports": 2,
        "flags": ["OWNS_PORT", "EIF"], "rule_id": 1}]
    _, out, _ = natctl(mapped_tables(), "-M", "--reply-port-dst", "5060")
    assert len(out.splitlines()) == 1 and "sport=5060" in out
    _, out, _ = natctl(mapped_tables(), "-M", "-s", "10.0.2.0/24")
    assert out == ""


@pytest.mark.parametrize("flag", [["-d", "198.51.100.10"], ["--dport", "53"], ["--state", "ESTABLISHED"]])
def test_mappings_refuse_remote_filters(natctl: Run, flag: list[str]) -> None:
    rc, _, err = natctl(mapped_tables(), "-M", *flag)
    assert rc == 2 and "do not apply to -M" in err
