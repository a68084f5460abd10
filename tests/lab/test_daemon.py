"""natd as a process on the lab gateway: start-up refusals, detach, restart and reload."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest
from natd_lab.apps import TCP_RECEIVER
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


def test_sigterm_leaves_the_datapath_translating_and_detach_uninstalls(lab: Any, natd_factory: Any) -> None:
    natd = natd_factory(lab)
    assert xdp_attached(lab, "gw", "in1") and xdp_attached(lab, "gw", "out0")
    lab.exec("host1", ["ping", "-c", "1", "-W", "2", lab.addr("srv1")])
    assert natd.natctl("-C").stdout.strip() == "1"
    assert natd.stop() == 0
    assert "STOPPING=1" in natd.messages
    # no daemon: the program stays attached and keeps translating new and old flows
    assert xdp_attached(lab, "gw", "in1") and xdp_attached(lab, "gw", "out0")
    lab.exec("host2", ["ping", "-c", "2", "-W", "2", lab.addr("srv2")])
    assert natd.natctl("-C").stdout.strip() == "2"  # state outlives the daemon (pinned)
    res = natd.uninstall()
    assert res.returncode == 0, res.stderr
    assert not xdp_attached(lab, "gw", "in1") and not xdp_attached(lab, "gw", "out0")
    assert natd.natctl("-C", check=False).returncode == 1  # --detach removed the pins


def test_detach_on_exit(lab: Any, natd_factory: Any) -> None:
    natd = natd_factory(lab, start=False)
    natd.start(extra_args=["--detach-on-exit"])
    assert xdp_attached(lab, "gw", "out0")
    assert natd.stop() == 0
    assert not xdp_attached(lab, "gw", "in1") and not xdp_attached(lab, "gw", "out0")


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



@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
def test_tcp_transfer_survives_a_restart(lab: Any, natd_factory: Any, how: str) -> None:
    natd = natd_factory(lab)
    sender = lab.popen("srv1", [sys.executable, "-c", SLOW_SENDER, lab.addr("srv1"), "6"],
                       stdout=-1, text=True)
    assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
    receiver = lab.popen("host1", [sys.executable, "-c", TCP_RECEIVER, lab.addr("srv1"), "18090"],
                         stdout=-1, text=True)
    time.sleep(1.5)
    before = natd.natctl("-L", "-p", "tcp", "--dport", "18090").stdout
    if how == "kill-9":
        natd.kill9()  # no chance to clean up: the program stays attached, the maps stay pinned
    else:
        assert natd.stop() == 0
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


FLOOD = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(30000, 30000 + int(sys.argv[2])):  # one new flow per destination port
    u.sendto(b"x", (sys.argv[1], port))
"""


def test_full_table_drops_new_flows_never_established_ones(lab: Any, natd_factory: Any) -> None:
    """RFC 6888 REQ-11: a flood of new flows past conntrack.max is dropped and counted, an established
    transfer carries on, and once the flood's entries expire new flows work again."""
    cfg = {"inside": ["in1", "in2"], "outside": "out0",
           "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999"}],
           "conntrack": {"max": 1024, "timeouts": {"udp_unreplied": 2, "udp_replied": 2}}}
    natd = natd_factory(lab, cfg)
    sender = lab.popen("srv1", [sys.executable, "-c", SLOW_SENDER, lab.addr("srv1"), "6"],
                       stdout=-1, text=True)
    assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
    receiver = lab.popen("host2", [sys.executable, "-c", TCP_RECEIVER, lab.addr("srv1"), "18090"],
                         stdout=-1, text=True)
    time.sleep(1.0)
    lab.exec("host1", [sys.executable, "-c", FLOOD, lab.addr("srv2"), "3000"], timeout=30)
    full = natd.metric("natd_packets_dropped_total", reason="table_full") or 0
    assert full >= 3000 - 1024
    got, _ = receiver.communicate(timeout=30)
    sent, _ = sender.communicate(timeout=30)
    assert int(got) == int(sent) > 0  # the established transfer never lost its entry
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and int(natd.natctl("-C").stdout) > 10:
        time.sleep(0.5)
    assert int(natd.natctl("-C").stdout) <= 10  # the flood expired (udp_unreplied 2 s) and was reaped
    res = lab.exec("host1", ["ping", "-c", "2", "-W", "2", lab.addr("srv1")], check=False)
    assert " 0% packet loss" in res.stdout
    assert (natd.metric("natd_idle_timeouts_total") or 0) >= 1000


def test_sd_notify_watchdog_and_message_order(lab: Any, natd_factory: Any) -> None:
    natd = natd_factory(lab, start=False)
    natd.start(env={"WATCHDOG_USEC": "1000000"})  # systemd would kill natd after 1 s without WATCHDOG=1
    assert natd.messages[-1].startswith("READY=1")
    time.sleep(2.0)
    natd.reload()
    assert natd.stop() == 0
    msgs = natd.drain()
    kinds = [m.split("\n")[0].split("=")[0] for m in msgs]
    assert kinds.count("WATCHDOG") >= 3  # every 0.5 s (half of WATCHDOG_USEC)
    order = [k for k in kinds if k in ("READY", "RELOADING", "STOPPING")]
    assert order == ["READY", "RELOADING", "READY", "STOPPING"]
    reloading = next(m for m in msgs if m.startswith("RELOADING=1"))
    assert "MONOTONIC_USEC=" in reloading  # Type=notify-reload wants both in one message


def test_reload_refuses_restart_only_changes(lab: Any, natd_factory: Any) -> None:
    natd = natd_factory(lab)
    cfg = dict(natd.config)
    cfg["inside"] = ["in1"]
    natd.write_config(cfg)
    msg = natd.reload()
    assert "STATUS=reload rejected" in msg and "inside" in msg and "restart" in msg
    cfg = dict(natd.config)
    cfg["conntrack"] = {"max": 4096}
    natd.write_config(cfg)
    assert "conntrack.max" in natd.reload()
    lab.exec("host2", ["ping", "-c", "1", "-W", "2", lab.addr("srv1")])  # in2 still translated


def test_interface_down_deleted_and_back(lab: Any, natd_factory: Any) -> None:
    """natd logs link changes, keeps serving the other interfaces, and re-attaches an interface that is
    re-created (a new ifindex, no program) — and natctl status reports it."""
    natd = natd_factory(lab)
    lab.set_link("gw", "in1", up=False)
    lab.exec("host2", ["ping", "-c", "1", "-W", "2", lab.addr("srv1")])  # in2 unaffected
    lab.set_link("gw", "in1", up=True)
    # delete in1 (its peer on host1 goes with it) and build the link again
    with lab.ipr("gw") as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname="in1")[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "in1 missing" not in natd.natctl("status").stdout:
        time.sleep(0.2)
    assert "in1 missing" in natd.natctl("status").stdout
    lab.exec("host2", ["ping", "-c", "1", "-W", "2", lab.addr("srv1")])
    with lab.ipr("gw") as ipr:
        ipr.link("add", ifname="in1", kind="veth", peer={"ifname": "eth0", "net_ns_fd": lab.ns("host1")})
        idx = ipr.link_lookup(ifname="in1")[0]
        ipr.addr("add", index=idx, address="10.0.1.1", prefixlen=24)
        ipr.link("set", index=idx, state="up")
    with lab.ipr("host1") as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=idx, address="10.0.1.42", prefixlen=24)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway="10.0.1.1")
    lab.exec("host1", ["ethtool", "-K", "eth0", "tx", "off", "gro", "on"])
    lab.exec("gw", ["ethtool", "-K", "in1", "tx", "off"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not xdp_attached(lab, "gw", "in1"):
        time.sleep(0.2)
    assert xdp_attached(lab, "gw", "in1")
    res = lab.exec("host1", ["ping", "-c", "2", "-W", "2", lab.addr("srv1")], check=False)
    assert " 0% packet loss" in res.stdout or " 50% packet loss" in res.stdout  # first may wait for ARP
    log = natd.log_tail(80)
    assert "inside interface in1 was deleted" in log and "inside interface in1 is back" in log
    assert natd.proc.poll() is None
