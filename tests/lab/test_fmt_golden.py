"""natctl prints flows exactly like conntrack(8): checked against the real tool on real kernel NAT flows.

Builds three throwaway namespaces (client 10.0.1.42 -> kernel NAT gateway -> server 198.51.100.10,
external address 203.0.113.1, RFC 5737 addresses outside), makes TCP, UDP (replied and unreplied) and
ICMP echo flows through an nftables masquerade with a port range (so external ports differ from the
inside ports), reads `conntrack -L` / `conntrack -S` in the gateway namespace, then rebuilds each flow as
natd's CtKey/CtEntry and checks natd.fmt/natd.ctl print the very same bytes. Nothing is created in the
root namespace (veths are created directly in their namespaces); the fixture kills its processes and
deletes its namespaces whatever happens.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from natd import ctl
from natd.fmt import format_flow
from natd.maps import PROTO_NUMBERS, CtEntry, CtFlags, CtKey, CtState, Stat, ip_to_be32, port_to_be16
from natd.tables import FakeTables

pytestmark = pytest.mark.lab

SERVER = r"""
import socket, threading, time
def hold(c):
    time.sleep(60)
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("198.51.100.10", 80)); t.listen(8)
silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); silent.bind(("198.51.100.10", 5353))
echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); echo.bind(("198.51.100.10", 5354))
def echoer():
    while True:
        data, peer = echo.recvfrom(2048)
        echo.sendto(data, peer)
threading.Thread(target=echoer, daemon=True).start()
print("ready", flush=True)
conns = []
while True:
    c, _ = t.accept()
    conns.append(c)
"""

CLIENT = r"""
import socket, time
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("10.0.1.42", 40000)); t.connect(("198.51.100.10", 80))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("10.0.1.42", 40001))
u.sendto(b"nobody answers", ("198.51.100.10", 5353))
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("10.0.1.42", 40002)); r.settimeout(5)
r.sendto(b"echo me", ("198.51.100.10", 5354))
r.recvfrom(2048)
print("ready", flush=True)
time.sleep(60)
"""


@dataclass
class Gold:
    flows: list[str]      # conntrack -L lines
    summary: str          # conntrack -L's stderr line
    stats: list[str]      # conntrack -S lines


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _wait_ready(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(f"{what} did not start: {line!r} {err}")


def _build(prefix: str) -> tuple[str, str, str]:
    client, gw, server = f"{prefix}-c", f"{prefix}-g", f"{prefix}-s"
    for ns in (client, gw, server):
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
    # veth ends are created directly in their namespaces: nothing ever appears in the root namespace
    _run("ip", "link", "add", "fgc0", "netns", client, "type", "veth", "peer", "name", "fgi0", "netns", gw)
    _run("ip", "link", "add", "fgo0", "netns", gw, "type", "veth", "peer", "name", "fgs0", "netns", server)
    _run("ip", "-n", client, "addr", "add", "10.0.1.42/24", "dev", "fgc0")
    _run("ip", "-n", client, "link", "set", "fgc0", "up")
    _run("ip", "-n", client, "route", "add", "default", "via", "10.0.1.1")
    _run("ip", "-n", gw, "addr", "add", "10.0.1.1/24", "dev", "fgi0")
    _run("ip", "-n", gw, "addr", "add", "203.0.113.1/24", "dev", "fgo0")
    _run("ip", "-n", gw, "link", "set", "fgi0", "up")
    _run("ip", "-n", gw, "link", "set", "fgo0", "up")
    _run("ip", "-n", gw, "route", "add", "198.51.100.0/24", "via", "203.0.113.2")
    _run("ip", "netns", "exec", gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    _run("ip", "-n", server, "addr", "add", "203.0.113.2/24", "dev", "fgs0")
    _run("ip", "-n", server, "addr", "add", "198.51.100.10/32", "dev", "lo")
    _run("ip", "-n", server, "link", "set", "fgs0", "up")
    _run("ip", "-n", server, "route", "add", "default", "via", "203.0.113.1")
    ruleset = ("table ip fmtgold {\n chain post {\n  type nat hook postrouting priority srcnat;\n"
               "  oifname \"fgo0\" meta l4proto { tcp, udp, icmp } masquerade to :20000-20999\n }\n}\n")
    subprocess.run(["ip", "netns", "exec", gw, "nft", "-f", "-"], input=ruleset, text=True, check=True,
                   timeout=30)
    return client, gw, server


@pytest.fixture(scope="module")
def gold() -> Iterator[Gold]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    for tool in ("ip", "nft", "conntrack", "ping"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    prefix = f"fmtgold-{secrets.token_hex(3)}"
    procs: list[subprocess.Popen[str]] = []
    try:
        client, gw, server = _build(prefix)
        for ns, code, what in ((server, SERVER, "server"), (client, CLIENT, "client")):
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            _wait_ready(proc, what)
        _run("ip", "netns", "exec", client, "ping", "-c1", "-W2", "198.51.100.10")
        time.sleep(0.2)
        done = subprocess.run(["ip", "netns", "exec", gw, "conntrack", "-L"], capture_output=True,
                              text=True, timeout=30, check=True)
        stats = _run("ip", "netns", "exec", gw, "conntrack", "-S")
        yield Gold(done.stdout.splitlines(), done.stderr.strip(), stats.splitlines())
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate(timeout=10)
        for suffix in ("c", "g", "s"):
            subprocess.run(["ip", "netns", "del", f"{prefix}-{suffix}"], capture_output=True, timeout=30)


_TUPLE = re.compile(r"src=(\S+) dst=(\S+) (?:sport=(\d+) dport=(\d+)|type=(\d+) code=(\d+) id=(\d+))")


def flow_from_conntrack(line: str) -> tuple[CtKey, CtEntry, int]:
    """Rebuild natd's view of a kernel flow from its conntrack -L line (key, entry, seconds left)."""
    proto_name, _number, timeout = line.split()[:3]
    proto = PROTO_NUMBERS[proto_name]
    orig, reply = _TUPLE.findall(line)
    osrc, odst, osport, odport, _, _, oid = orig
    rsrc, rdst, rsport, rdport, _, _, rid = reply
    # natd's NAT only ever rewrites the source: the reply comes from the original destination
    assert rsrc == odst, line
    if oid:
        key = CtKey.make(osrc, odst, int(oid), 0, proto)
        nat_port = int(rid)
    else:
        assert rsport == odport, line
        key = CtKey.make(osrc, odst, int(osport), int(odport), proto)
        nat_port = int(rdport)
    entry = CtEntry()
    entry.nat_addr = ip_to_be32(rdst)
    entry.nat_port = port_to_be16(nat_port)
    if proto_name == "tcp":
        entry.state = CtState[line.split()[3]]
    flags = CtFlags(0) if "[UNREPLIED]" in line else CtFlags.REPLIED
    if "[ASSURED]" in line:
        flags |= CtFlags.ASSURED
    entry.flags = int(flags)
    return key, entry, int(timeout)


def test_the_lab_made_every_kind_of_flow(gold: Gold) -> None:
    kinds = {(line.split()[0], "[UNREPLIED]" in line, "[ASSURED]" in line) for line in gold.flows}
    assert {("tcp", False, True), ("udp", True, False), ("udp", False, False),
            ("icmp", False, False)} <= kinds, gold.flows
    assert len(gold.flows) == 4, gold.flows
    # the masquerade port range moved every inside port/identifier: the reply tuple really differs
    for line in gold.flows:
        ports = re.findall(r"(?:dport|id)=(\d+)", line)
        assert 20000 <= int(ports[-1]) <= 20999, line


def test_format_flow_prints_what_conntrack_prints(gold: Gold) -> None:
    for line in gold.flows:
        key, entry, timeout = flow_from_conntrack(line)
        assert format_flow(key, entry, timeout) == line


def test_list_summary_line_has_conntracks_shape(gold: Gold, capsys: pytest.CaptureFixture[str]) -> None:
    tables = FakeTables()
    for line in gold.flows:
        key, entry, _ = flow_from_conntrack(line)
        tables.add_flow(key, entry)
    assert ctl.run(["-L"], open_tables=lambda s: tables, now_ns=lambda: 0, default_config=None) == 0
    err = capsys.readouterr().err.strip()
    assert gold.summary == "conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown."
    assert err.replace(ctl.BANNER, "conntrack v1.4.7 (conntrack-tools)") == gold.summary


def test_stats_rows_have_conntracks_shape(gold: Gold) -> None:
    tables = FakeTables(ncpu=len(gold.stats))
    tables.counters[0][Stat.CT_NEW] = (3, 300)
    out = io.StringIO()
    assert ctl.show_stats(tables, "text", out) == 0
    ours = out.getvalue().splitlines()

    def shape(row: str) -> str:
        return re.sub(r"=\d+", "=N", row)

    assert [shape(r) for r in ours] == [shape(r) for r in gold.stats]
    assert ours[0].startswith("cpu=0   \tfound=0 invalid=0 insert=3 ")
