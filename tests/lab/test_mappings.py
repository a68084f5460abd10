"""NAT mappings end to end: what hosts and servers see when mappings are stored and owned (RFC 4787 REQ-1
under port contention), and per-host port limits (RFC 6888 REQ-4) that answer with ICMP Destination
Unreachable code 13 (RFC 5508 REQ-8), so a host's connect() fails at once instead of timing out."""

from __future__ import annotations

import errno
import sys
import time
from typing import Any

import pytest
from natd_lab.apps import STUN_CLIENT, TCP_HOLDER, start_udp_reflector

pytestmark = pytest.mark.lab

# Opens argv[3] TCP connections to argv[1]:argv[2], one line per attempt ("ok" or the errno), holds them
# until stdin closes, then closes them all.
CONNECT_MANY = r"""
import socket, sys
socks, out = [], []
for _ in range(int(sys.argv[3])):
    s = socket.socket(); s.settimeout(10)
    try:
        s.connect((sys.argv[1], int(sys.argv[2]))); socks.append(s); out.append("ok")
    except OSError as e:
        out.append(str(e.errno))
print(" ".join(out), flush=True)
sys.stdin.read()
for s in socks:
    s.close()
"""

# A connected UDP socket sends one datagram and waits: the errno it gets, or "timeout".
UDP_CONNECTED = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.connect((sys.argv[1], int(sys.argv[2])))
u.send(b"x")
try:
    u.recv(100); print("answer")
except TimeoutError:
    print("timeout")
except OSError as e:
    print(e.errno)
"""

# One connect, its outcome: "ok" or the errno.
CONNECT_ONCE = r"""
import socket, sys
s = socket.socket(); s.settimeout(10)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("ok")
except OSError as e:
    print(e.errno)
"""


def start(lab: Any, node: str, script: str, *args: str) -> None:
    proc = lab.popen(node, [sys.executable, "-c", script, *args], stdout=-1, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"


def test_hosts_sharing_a_source_port_keep_one_mapping_towards_every_server(lab: Any,
                                                                          natd_factory: Any) -> None:
    """RFC 4787 REQ-1 under contention: host1 and host2 both send from UDP port 25060 (think SIP's fixed
    5060) to srv1. host1 keeps 25060; host2's mapping gets another port, which srv2 and a second port of
    srv1 see too (before mappings were stored, srv2 saw 25060, free towards it: another mapping)."""
    natd_factory(lab, {"inside": ["in1", "in2"], "outside": "out0",
                       "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999"}]})
    srv1, srv2, gw = lab.addr("srv1"), lab.addr("srv2"), lab.addr("gw", "out0")
    start_udp_reflector(lab, "srv1", f"{srv1}:3478", f"{srv1}:3479")
    start_udp_reflector(lab, "srv2", f"{srv2}:3478")

    def ask(node: str, *servers: str) -> list[str]:
        args = [sys.executable, "-c", STUN_CLIENT, "25060", *servers]
        return lab.exec(node, args, timeout=30).stdout.split()

    assert ask("host1", f"{srv1}:3478") == [f"{gw}:25060"]
    (host2_first,) = ask("host2", f"{srv1}:3478")
    assert host2_first.startswith(f"{gw}:") and host2_first != f"{gw}:25060"
    assert ask("host2", f"{srv2}:3478", f"{srv1}:3479") == [host2_first, host2_first]
    assert ask("host1", f"{srv2}:3478", f"{srv1}:3479") == [f"{gw}:25060", f"{gw}:25060"]


def test_per_host_port_limit_fails_connects_at_once_and_frees_with_the_flows(lab: Any,
                                                                            natd_factory: Any) -> None:
    """max_ports_per_host: 3. host1's fourth simultaneous connection is refused by natd with ICMP code 13,
    which Linux reports to connect() as EHOSTUNREACH (not a timeout: the host is told). host2 is not
    affected. Once host1 closes its connections and the reaper has released their mappings (short TCP
    close timeouts here), host1 connects again."""
    natd = natd_factory(lab, {
        "inside": ["in1", "in2"], "outside": "out0",
        "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999", "max_ports_per_host": 3}],
        "conntrack": {"timeouts": {"tcp_fin_wait": 1, "tcp_close_wait": 1, "tcp_last_ack": 1,
                                   "tcp_time_wait": 1, "tcp_close": 1}},
    })
    srv1 = lab.addr("srv1")
    start(lab, "srv1", TCP_HOLDER, srv1, "7100")
    holder = lab.popen("host1", [sys.executable, "-c", CONNECT_MANY, srv1, "7100", "4"], stdin=-1, stdout=-1,
                       text=True)
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline().split() == ["ok", "ok", "ok", str(errno.EHOSTUNREACH)]
    assert "ports 20000-29999  max 3 per host" in natd.natctl("status").stdout
    # natctl -M: the three mappings the host holds, each owning its port
    mappings = natd.natctl("-M", "-p", "tcp", "-s", lab.addr("host1")).stdout.splitlines()
    assert len(mappings) == 3 and all("flows=1 host_ports=3 [OWNS_PORT]" in m for m in mappings), mappings
    # a connected UDP socket hears it too (fatal ICMP errors reach connected sockets)
    assert lab.exec("host1", [sys.executable, "-c", UDP_CONNECTED, srv1, "7101"],
                    timeout=20).stdout.strip() == str(errno.EHOSTUNREACH)
    connect_once = [sys.executable, "-c", CONNECT_ONCE, srv1, "7100"]
    assert lab.exec("host2", connect_once, timeout=20).stdout.strip() == "ok"
    sent = natd.metric("natd_icmp_unreachable_sent_total")
    assert sent is not None and sent >= 2
    refused = natd.metric("natd_packets_dropped_total", reason="host_port_limit")
    assert refused is not None and refused >= 2
    holder.stdin.close()
    holder.wait(timeout=10)
    deadline = time.monotonic() + 30  # close timeouts 1 s, reaper every 0.5 s
    outcome = ""
    while time.monotonic() < deadline:
        outcome = lab.exec("host1", connect_once, timeout=20).stdout.strip()
        if outcome == "ok":
            break
        time.sleep(0.5)
    assert outcome == "ok", f"host1 still refused after its connections closed: {outcome}"


def test_max_ports_per_host_changes_on_reload_and_a_bad_value_keeps_the_running_one(
        lab: Any, natd_factory: Any) -> None:
    """SIGHUP applies a new max_ports_per_host to the running datapath (the mappings held stay); a bad
    value is rejected with the key named and the running limit kept."""
    def config(limit: object) -> dict[str, Any]:
        return {"inside": ["in1", "in2"], "outside": "out0",
                "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999", "max_ports_per_host": limit}]}

    natd = natd_factory(lab, config(2))
    srv1 = lab.addr("srv1")
    start(lab, "srv1", TCP_HOLDER, srv1, "7100")
    holder = lab.popen("host1", [sys.executable, "-c", CONNECT_MANY, srv1, "7100", "3"], stdin=-1, stdout=-1,
                       text=True)
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline().split() == ["ok", "ok", str(errno.EHOSTUNREACH)]
    connect_once = [sys.executable, "-c", CONNECT_ONCE, srv1, "7100"]

    natd.write_config({**natd.config, "snat": config(0)["snat"]})
    msg = natd.reload()
    assert "STATUS=reload rejected" in msg and "snat[0].max_ports_per_host" in msg, msg
    assert lab.exec("host1", connect_once, timeout=20).stdout.strip() == str(errno.EHOSTUNREACH)

    natd.write_config({**natd.config, "snat": config(3)["snat"]})
    assert "STATUS=reloaded" in natd.reload()
    assert lab.exec("host1", connect_once, timeout=20).stdout.strip() == "ok"
    holder.stdin.close()
    holder.wait(timeout=10)
