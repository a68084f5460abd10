"""natd as a process on the lab gateway: start-up refusals, detach, restart and reload."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest
from natd_lab.natd import NatdError

pytestmark = pytest.mark.lab


def xdp_attached(lab: Any, node: str, ifname: str) -> bool:
    out = lab.exec(node, ["ip", "-d", "link", "show", "dev", ifname]).stdout
    return "prog/xdp" in out or "xdp id" in out


def test_overlap_with_ip_local_port_range_refuses_to_start(lab: Any, natd_factory: Any) -> None:
    natd = natd_factory(lab, {"inside": ["in1"], "outside": "out0",
                              "snat": [{"from": "10.0.0.0/16", "ports": "30000-40000"}]}, start=False)
    with pytest.raises(NatdError) as err:
        natd.start(timeout=60)
    log = natd.log_tail()
    assert "overlap the kernel's net.ipv4.ip_local_port_range" in log
    assert "Traceback" not in log
    assert natd.proc.returncode == 1
    assert "natd exited with 1" in str(err.value)
    assert not xdp_attached(lab, "gw", "in1")


def test_unknown_interface_is_named_with_the_alternatives(lab: Any, natd_factory: Any) -> None:
    natd = natd_factory(lab, {"inside": ["eth9"], "outside": "out0",
                              "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999"}]}, start=False)
    with pytest.raises(NatdError):
        natd.start(timeout=60)
    assert "interface eth9 not found; interfaces: in1, in2, lo, out0" in natd.log_tail()


def test_sigterm_detaches_and_flows_stay_pinned(lab: Any, natd_factory: Any) -> None:
    natd = natd_factory(lab)
    assert xdp_attached(lab, "gw", "in1") and xdp_attached(lab, "gw", "out0")
    lab.exec("host1", ["ping", "-c", "1", "-W", "2", lab.addr("srv1")])
    assert natd.natctl("-C").stdout.strip() == "1"
    assert natd.stop() == 0
    assert "STOPPING=1" in natd.messages
    assert not xdp_attached(lab, "gw", "in1") and not xdp_attached(lab, "gw", "out0")
    assert natd.natctl("-C").stdout.strip() == "1"  # state outlives the daemon (pinned)
    res = natd.uninstall()
    assert res.returncode == 0, res.stderr
    assert natd.natctl("-C", check=False).returncode == 1  # --detach removed the pins


# Streams from srv1 to a private host for `seconds`, then reports how many bytes arrived.
SLOW_SENDER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 18090)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
end = time.monotonic() + float(sys.argv[2])
sent = 0
while time.monotonic() < end:
    c.sendall(b"x" * 1000); sent += 1000; time.sleep(0.01)
c.shutdown(socket.SHUT_WR)
print(sent, flush=True)
"""

RECEIVER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 18090), timeout=30)
got = 0
while True:
    b = s.recv(65536)
    if not b:
        break
    got += len(b)
print(got)
"""


def test_tcp_transfer_survives_kill_9_and_restart(lab: Any, natd_factory: Any) -> None:
    natd = natd_factory(lab)
    sender = lab.popen("srv1", [sys.executable, "-c", SLOW_SENDER, lab.addr("srv1"), "6"],
                       stdout=-1, text=True)
    assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
    receiver = lab.popen("host1", [sys.executable, "-c", RECEIVER, lab.addr("srv1")], stdout=-1, text=True)
    time.sleep(1.5)
    before = natd.natctl("-L", "-p", "tcp", "--dport", "18090").stdout
    natd.kill9()  # no detach: the program stays attached, the maps stay pinned
    time.sleep(1.0)
    natd.start()
    after = natd.natctl("-L", "-p", "tcp", "--dport", "18090").stdout
    got, _ = receiver.communicate(timeout=30)
    sent, _ = sender.communicate(timeout=30)
    assert int(got) == int(sent) > 0
    # the same mapping before and after: external port unchanged
    assert before.split("dport=")[2].split()[0] == after.split("dport=")[2].split()[0]


def test_sighup_good_config_changes_rules_bad_config_changes_nothing(lab: Any, natd_factory: Any) -> None:
    natd = natd_factory(lab)
    lab.exec("host1", ["ping", "-c", "1", "-W", "2", lab.addr("srv1")])
    # good: a second rule with its own pool for host2's subnet
    cfg = dict(natd.config)
    cfg["snat"] = [{"from": "10.0.1.0/24", "ports": "20000-29999"},
                   {"from": "10.0.2.0/24", "to": ["192.0.2.7"], "ports": "20000-29999"}]
    natd.write_config(cfg)
    msg = natd.reload()
    assert "STATUS=reloaded" in msg
    assert natd.natctl("-C").stdout.strip() == "1"  # the existing flow survived
    res = lab.exec("host2", ["ping", "-c", "2", "-W", "2", lab.addr("srv1")], check=False)
    assert " 0% packet loss" in res.stdout
    assert "dst=192.0.2.7" in natd.natctl("-L", "-s", lab.addr("host2")).stdout
    # bad: a broken file is rejected with file:line: key, and the old rules keep translating
    natd.write_config("inside: [in1, in2]\noutside: out0\nsnat:\n  - from: 10.0.0.0/16\n    ports: 9-1\n")
    msg = natd.reload()
    assert "STATUS=reload rejected" in msg and "snat[0].ports" in msg
    res = lab.exec("host2", ["ping", "-c", "2", "-W", "2", lab.addr("srv2")], check=False)
    assert " 0% packet loss" in res.stdout
    assert "dst=192.0.2.7" in natd.natctl("-L", "-s", lab.addr("host2"), "-d", lab.addr("srv2")).stdout
    assert natd.proc.poll() is None
