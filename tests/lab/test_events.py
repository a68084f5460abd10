"""The NAT event log and natctl -E with the real natd: real flows make NEW events, reaped flows DESTROY
events (short UDP timeouts), natctl -D makes DESTROY "delete", SIGHUP reopens the log (logrotate)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from natd_lab.apps import UDP_ASK, start_peer_echo
from natd_lab.natd import _bin

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
    start_peer_echo(lab, "srv1", 18081, 15354)
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
    start_peer_echo(lab, "srv1", 18082, 15355)
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


class Lines:
    """A child's stdout read line by line with a timeout (select on the raw pipe, no buffering)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def next(self, timeout: float = 15.0) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def test_natctl_E_follows_events_live(lab: Any, natd_factory: Any) -> None:
    """Without an event log too: natctl -E switches the datapath's events on while it listens."""
    natd = natd_factory(lab, start=False)
    natd.config["conntrack"] = {"timeouts": {"udp_unreplied": TIMEOUT_S, "udp_replied": TIMEOUT_S}}
    natd.write_config(natd.config)
    natd.start()
    start_peer_echo(lab, "srv1", 18083, 15356)
    argv = [_bin("natctl"), "--instance", natd.instance, "--pin-root", natd.pin_root, "-E"]
    text = lab.popen("gw", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    js = lab.popen("gw", [*argv, "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    text_lines, js_lines = Lines(text), Lines(js)
    try:
        # until both have subscribed, flows from host2 (each ask is a new flow: a new source port)
        deadline = time.monotonic() + 30
        seen = [False, False]
        while not all(seen) and time.monotonic() < deadline:
            ask_udp(lab, "host2", 15356)
            for i, reader in enumerate((text_lines, js_lines)):
                while reader.next(timeout=0.5) is not None:
                    seen[i] = True
        assert all(seen), "natctl -E printed no event within 30 s"
        peer = ask_udp(lab, "host1", 15356)
        new = wait_for("host1's NEW", lambda: _next_from(text_lines, lab.addr("host1")))
        assert new.startswith("    [NEW] udp      17 "), new
        assert (f"src={lab.addr('host1')} dst={lab.addr('srv1')}" in new
                and f"dport=15356 src={lab.addr('srv1')} dst={peer.split(':')[0]} sport=15356 "
                    f"dport={peer.split(':')[1]}" in new), new
        event = json.loads(wait_for("host1's JSON event", lambda: _next_from(js_lines, lab.addr("host1"))))
        assert (event["event"], event["destination"]) == ("NEW", f"{lab.addr('srv1')}:15356"), \
            "natctl -E shows destinations (a live view, not the log)"
        destroy = wait_for("host1's DESTROY", lambda: _next_from(text_lines, lab.addr("host1")))
        assert destroy.startswith("[DESTROY] udp      17 src=" + lab.addr("host1")), destroy
    finally:
        for proc in (text, js):
            proc.send_signal(signal.SIGINT)
    for proc in (text, js):
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, f"Ctrl-C must exit 0: {err.decode()}"
        assert b"flow events have been shown" in err


def _next_from(reader: Lines, inside: str) -> str | None:
    """The next line about ``inside`` (host2's probe flows and their DESTROYs are skipped)."""
    while (line := reader.next(timeout=1.0)) is not None:
        if f"src={inside} " in line or f'"inside":"{inside}:' in line:
            return line
    return None
