"""The bpf tier's harness: natd's XDP programs loaded once, driven with BPF_PROG_TEST_RUN.

NatDatapath wraps a loaded, pinned datapath in a lab namespace (see conftest.py for the fixtures): test
runs on either entry point, counter deltas, conntrack reads and clean-up.

BPF_PROG_TEST_RUN resolves the ctx's ingress_ifindex in the *calling thread's* network namespace, and the
FIB lookups then run in that device's namespace; so every test run is made with this thread inside gw's
namespace (setns there and back, see in_netns()).

RULES_YAML: four snat rules (10.0/16 -> out0's address, 10.1/16 -> a pool of two, 10.2/16 and 10.3/16 -> one
address with four ports each), port forwards (tcp 443 and udp 5300 on out0's address, tcp 80 on a
forward-only address, tcp 40001 inside rule 3's range, so reserved from allocation) and one static 1:1
mapping. The constants below name every address and port the tests rely on.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from natd import bpfsys
from natd.maps import CtEntry, CtKey, Stat
from natd.tables import PinnedTables, sum_stats

HERE = Path(__file__).resolve().parent
TOPOLOGY = HERE / "datapath.yaml"
BPFFS = "/sys/fs/bpf"
CT_MAX = 4096

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

GW_IN1 = "10.0.1.1"
GW_OUT = "203.0.113.1"       # out0's address: the external address of rule 0
HOST1 = "10.0.1.42"          # on in1, PERMANENT neighbour
NEXT_HOP = "203.0.113.6"     # default gateway on out0, PERMANENT neighbour
POOL = ("192.0.2.1", "192.0.2.2")  # rule 1
TINY_POOL_ADDR = "192.0.2.9"       # rule 2: four ports only
TINY_PORTS = (30000, 30003)
NAT_PORTS = (20000, 29999)
# inbound (tests/bpf/test_inbound.py, test_icmp_errors.py): port forwards and a static 1:1 mapping
FWD_TCP = (443, HOST1, 8443)       # tcp GW_OUT:443 -> host1:8443
FWD_UDP = (5300, HOST1, 5300)      # udp GW_OUT:5300 -> host1:5300 (no port in `to`: kept)
FWD_ONLY_ADDR = "192.0.2.30"       # an address with a forward and no snat rule (ports: none of the NAT's)
FWD_ONLY = (80, HOST1, 8080)       # tcp 192.0.2.30:80 -> host1:8080
RESERVED_ADDR = "192.0.2.20"       # rule 3: 10.3.0.0/16, a tiny range that includes a forwarded port
RESERVED_PORTS = (40000, 40003)
RESERVED_FWD = (40001, HOST1, 2222)  # tcp 192.0.2.20:40001 -> host1:2222, inside rule 3's range
STATIC_INSIDE = "10.1.77.7"        # routed via host1 (10.1.0.0/16), so inbound frames are redirected
STATIC_OUTSIDE = "192.0.2.77"
CAPPED_HOSTS = "10.0.1.64/28"       # rule 4: on in1's subnet, max_ports_per_host: CAPPED_PORTS
CAPPED_PORTS = 2

RULES_YAML = f"""
instance: bpftest
inside: [in1, in2]
outside: out0
conntrack: {{max: {CT_MAX}}}
snat:
  - from: 10.0.0.0/16
    ports: {NAT_PORTS[0]}-{NAT_PORTS[1]}
  - from: 10.1.0.0/16
    to: [{POOL[0]}, {POOL[1]}]
    ports: {NAT_PORTS[0]}-{NAT_PORTS[1]}
  - from: 10.2.0.0/16
    to: [{TINY_POOL_ADDR}]
    ports: {TINY_PORTS[0]}-{TINY_PORTS[1]}
  - from: 10.3.0.0/16
    to: [{RESERVED_ADDR}]
    ports: {RESERVED_PORTS[0]}-{RESERVED_PORTS[1]}
  - from: {CAPPED_HOSTS}
    ports: {NAT_PORTS[0]}-{NAT_PORTS[1]}
    max_ports_per_host: {CAPPED_PORTS}
forward:
  - {{proto: tcp, port: {FWD_TCP[0]}, to: "{FWD_TCP[1]}:{FWD_TCP[2]}"}}
  - {{proto: udp, port: {FWD_UDP[0]}, to: "{FWD_UDP[1]}"}}
  - proto: tcp
    port: {FWD_ONLY[0]}
    to: "{FWD_ONLY[1]}:{FWD_ONLY[2]}"
    address: {FWD_ONLY_ADDR}
  - proto: tcp
    port: {RESERVED_FWD[0]}
    to: "{RESERVED_FWD[1]}:{RESERVED_FWD[2]}"
    address: {RESERVED_ADDR}
static:
  - {{inside: {STATIC_INSIDE}, outside: {STATIC_OUTSIDE}}}
"""
TRANSLATED = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/16", "10.1.0.0/16", "10.2.0.0/16",
                                                       "10.3.0.0/16"))

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(target_fd: int) -> Iterator[None]:
    """Run the block with this thread in the network namespace of target_fd; always switch back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target_fd)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


@dataclasses.dataclass(frozen=True)
class Run:
    retval: int
    data: bytes


def assert_refused_with_icmp(run: Run, frame: bytes, gateway_addr: str) -> None:
    """RFC 5508 REQ-8: natd could make no session for ``frame`` and answered its sender with ICMP
    Destination Unreachable code 13 from ``gateway_addr`` (the gateway's address towards the sender),
    redirected back out of the interface it came in on, quoting the packet's IP header and 8 bytes."""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    assert run.retval == XDP_REDIRECT, f"verdict {run.retval}, not a redirected ICMP error"
    sent, out = Ether(frame), Ether(run.data)
    assert (out.dst, out.src) == (sent.src, sent.dst)
    assert (out[IP].src, out[IP].dst, out[IP].proto, out[IP].ttl) == (gateway_addr, sent[IP].src, 1, 64)
    assert (out[ICMP].type, out[ICMP].code) == (3, 13)
    assert bytes(out[ICMP].payload)[:28] == bytes(sent[IP])[:28] and len(bytes(out[ICMP].payload)) == 28
    # checksums: scapy recomputes them when they are deleted; they must come out the same
    ip = out[IP].copy()
    del ip.chksum
    del ip[ICMP].chksum
    rebuilt = IP(bytes(ip))
    assert (rebuilt.chksum, rebuilt[ICMP].chksum) == (out[IP].chksum, out[ICMP].chksum)


class StatDelta:
    """Counter deltas (packets) over a with-block: `with dp.counting() as d: ...; d[Stat.SNAT_OUT]`."""

    def __init__(self, before: dict[Stat, int]) -> None:
        self.before = before
        self.after: dict[Stat, int] | None = None

    def __getitem__(self, stat: Stat) -> int:
        assert self.after is not None, "read the delta after the with-block"
        return self.after[stat] - self.before[stat]

    def nonzero(self) -> dict[str, int]:
        return {s.name: self[s] for s in Stat if self[s]}


@dataclasses.dataclass
class NatDatapath:
    lab: Any
    datapath: Any
    tables: PinnedTables
    netns_fd: int
    ifindex: dict[str, int]   # gw's interfaces
    mac: dict[str, str]       # gw's interfaces and the two neighbours ("host1", "inet")
    pin_dir: str

    # ---------------------------------------------------------------------------------- test runs

    def run(self, function: str, frame: bytes, ifname: str) -> Run:
        with in_netns(self.netns_fd):
            res = bpfsys.prog_test_run(self.datapath.prog_fd(function), frame,
                                       ingress_ifindex=self.ifindex[ifname])
        return Run(res.retval, res.data)

    def run_many(self, function: str, frames: list[bytes], ifname: str) -> list[Run]:
        """One setns round trip for many frames (table filling)."""
        fd, idx = self.datapath.prog_fd(function), self.ifindex[ifname]
        with in_netns(self.netns_fd):
            return [Run(r.retval, r.data) for r in
                    (bpfsys.prog_test_run(fd, f, ingress_ifindex=idx) for f in frames)]

    def inside(self, frame: bytes, ifname: str = "in1") -> Run:
        return self.run("xdp_inside", frame, ifname)

    def outside(self, frame: bytes) -> Run:
        return self.run("xdp_outside", frame, "out0")

    # ---------------------------------------------------------------------------------- state

    def stats(self) -> dict[Stat, int]:
        return {s: p for s, (p, _b) in sum_stats(self.tables.stats_per_cpu()).items()}

    @contextlib.contextmanager
    def counting(self) -> Iterator[StatDelta]:
        delta = StatDelta(self.stats())
        yield delta
        delta.after = self.stats()

    def flows(self) -> list[tuple[CtKey, CtEntry]]:
        return self.tables.flows()

    def flow(self, src: str, dst: str, sport: int, dport: int, proto: int) -> CtEntry | None:
        return self.tables.lookup_flow(CtKey.make(src, dst, sport, dport, proto))

    def clear_flows(self) -> None:
        """Delete every flow, both halves (never BCC's clear(): it would bypass the pinned maps' users)."""
        flows = self.tables.flows()
        if flows:
            self.tables.delete_flows(flows)
        # a reply half whose entry is gone (should not exist; keep tests independent anyway)
        orphans = [k for k, _ in self.tables.reply_index()]
        if orphans:
            self.tables.delete_replies(orphans)
        # mappings, port claims and per-host counts go with the flows (natd's reaper would release them)
        for name in ("nat_mappings", "port_owners", "host_ports"):
            m = self.tables.map(name)
            for key in list(m.keys()):
                m.delete(key)
