"""The NAT event log and natctl -E with the real natd: real flows make NEW events, reaped flows DESTROY
events (short UDP timeouts), natctl -D makes DESTROY "delete", SIGHUP reopens the log (logrotate)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from natd_lab.natd import _bin

from .test_nat import UDP_ASK, start_echo

pytestmark = pytest.mark.lab

TIMEOUT_S = 2  # udp_unreplied / udp_replied: flows are reaped a few seconds after their last packet


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def events_in(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def natd_with_log(lab: Any, natd_factory: Any) -> Any:
    natd = natd_factory(lab, start=False)
    natd.config.update({"log": {"events": str(natd.dir / "events.log")},
                        "conntrack": {"timeouts": {"udp_unreplied": TIMEOUT_S, "udp_replied": TIMEOUT_S}}})
    natd.write_config(natd.config)
    natd.start()
    return natd


def ask_udp(lab: Any, host: str, port: int) -> str:
    """One UDP exchange host -> srv1:port through natd; returns how srv1 saw the host (ip:port)."""
    return str(lab.exec(host, [sys.executable, "-c", UDP_ASK, lab.addr("srv1"), str(port)],
                        timeout=20).stdout.strip())


def test_new_and_destroy_events_are_logged(lab: Any, natd_with_log: Any) -> None:
    natd = natd_with_log
    log = natd.dir / "events.log"
    ext = lab.addr("gw", "out0")
    start_echo(lab, "srv1", 18081, 15354)
    seen = {host: ask_udp(lab, host, 15354) for host in ("host1", "host2")}
    new = wait_for("two NEW events", lambda: [e for e in events_in(log) if e["event"] == "NEW"]
                   if len([e for e in events_in(log) if e["event"] == "NEW"]) >= 2 else None)
    assert {e["inside"].split(":")[0] for e in new} == {lab.addr("host1"), lab.addr("host2")}
    assert {e["external"] for e in new} == set(seen.values()), "the external endpoint srv1 saw"
    assert all(e["proto"] == "udp" and e["external"].startswith(f"{ext}:") for e in new)
    assert all("destination" not in e for e in new), "RFC 6888 REQ-12: no destinations by default"
    # logged with the wall-clock time of the flow's creation
    for e in new:
        stamp = time.mktime(time.strptime(e["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        assert abs(stamp - time.time()) < 30, e["time"]
    destroyed = wait_for("the reaper's DESTROY events",
                         lambda: [e for e in events_in(log) if e["event"] == "DESTROY"]
                         if len([e for e in events_in(log) if e["event"] == "DESTROY"]) >= 2 else None)
    assert {(e["inside"], e["external"], e["reason"]) for e in destroyed} == \
        {(e["inside"], e["external"], "timeout") for e in new}
    assert natd.metric("natd_events_write_errors_total") == 0
    assert natd.metric("natd_events_lost_total") == 0


def test_natctl_deletions_and_logrotate(lab: Any, natd_with_log: Any) -> None:
    natd = natd_with_log
    log = natd.dir / "events.log"
    start_echo(lab, "srv1", 18082, 15355)
    ask_udp(lab, "host1", 15355)
    wait_for("the NEW event", lambda: events_in(log))
    natd.natctl("-D", "-s", lab.addr("host1"))
    wait_for("natctl's DESTROY", lambda: [e for e in events_in(log) if e.get("reason") == "delete"])
    # logrotate: move the file away, SIGHUP; the next events go to a new file
    log.rename(natd.dir / "events.log.1")
    assert "reloaded" in natd.reload()
    ask_udp(lab, "host2", 15355)
    (fresh,) = wait_for("an event in the new file", lambda: events_in(log))
    assert fresh["event"] == "NEW" and fresh["inside"].startswith(lab.addr("host2") + ":")
    assert [e["event"] for e in events_in(natd.dir / "events.log.1")] == ["NEW", "DESTROY"]


def test_natctl_E_follows_events_live(lab: Any, natd_factory: Any) -> None:
    """Without an event log too: natctl -E switches the datapath's events on while it listens."""
    natd = natd_factory(lab, start=False)
    natd.config["conntrack"] = {"timeouts": {"udp_unreplied": TIMEOUT_S, "udp_replied": TIMEOUT_S}}
    natd.write_config(natd.config)
    natd.start()
    start_echo(lab, "srv1", 18083, 15356)
    argv = [_bin("natctl"), "--instance", natd.instance, "--pin-root", natd.pin_root, "-E"]
    text = lab.popen("gw", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    js = lab.popen("gw", [*argv, "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # both connected and subscribed (natd polls its socket every 0.1 s)
        peer = ask_udp(lab, "host1", 15356)
        assert text.stdout is not None and js.stdout is not None
        line = text.stdout.readline()  # blocks until the event; the lab's teardown kills it otherwise
        assert line.startswith("    [NEW] udp      17 "), line
        assert (f"src={lab.addr('host1')} dst={lab.addr('srv1')}" in line
                and f"dport=15356 src={lab.addr('srv1')} dst={peer.split(':')[0]} sport=15356 "
                    f"dport={peer.split(':')[1]}" in line), line
        event = json.loads(js.stdout.readline())
        assert (event["event"], event["destination"]) == ("NEW", f"{lab.addr('srv1')}:15356"), \
            "natctl -E shows destinations (a live view, not the log)"
        destroy = text.stdout.readline()  # reaped after TIMEOUT_S
        assert destroy.startswith("[DESTROY] udp      17 src=" + lab.addr("host1")), destroy
    finally:
        for proc in (text, js):
            proc.send_signal(signal.SIGINT)
    for proc in (text, js):
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, f"Ctrl-C must exit 0: {err}"
        assert "flow events have been shown" in err
