"""NAT mappings under BPF_PROG_TEST_RUN: endpoint-independent mapping stored in nat_mappings with its port
owned in port_owners, per-host port limits (RFC 6888 REQ-4) answered with ICMP code 13 (RFC 5508 REQ-8),
the port sharing RFC 7857 §3 allows when nothing else is free, endpoint-independent filtering bound to
the mapping's life, and natd's reaper releasing a mapping with its last flow.

Rules: see harness.RULES_YAML (rule 2 has four ports, rule 4 caps hosts of 10.0.1.64/28 at two ports).
"""

from __future__ import annotations

import ipaddress
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from natd.config import parse_config
from natd.maps import (
    ICMP_BURST,
    ICMP_WINDOW_NS,
    PROTO_ICMP,
    PROTO_UDP,
    CtKey,
    ExtEndpoint,
    NatMapping,
    NatMappingFlags,
    Stat,
    ip_to_be32,
    mapping_key_for,
    port_to_be16,
)
from natd.reaper import Reaper

from .harness import (
    CAPPED_PORTS,
    GW_IN1,
    GW_OUT,
    HOST1,
    POOL,
    RULES_YAML,
    TINY_POOL_ADDR,
    TINY_PORTS,
    NatDatapath,
    assert_refused_with_icmp,
)
from .test_datapath import SRV, SRV2, TCP_P, XDP_DROP, XDP_REDIRECT, eth_in, eth_out, open_flow, syn, tcp_in
from .test_inbound import rules

pytestmark = pytest.mark.bpf

CAPPED_HOST = "10.0.1.66"  # in rule 4's 10.0.1.64/28, on in1's subnet
SRV3 = "198.51.100.30"


def udp_from(dp: NatDatapath, src: str, sport: int, dst: str = SRV, dport: int = 5060) -> bytes:
    return bytes(eth_in(dp) / IP(src=src, dst=dst, ttl=64) / UDP(sport=sport, dport=dport) / b"sip")


def udp_out_port(dp: NatDatapath, src: str, sport: int, dst: str = SRV, dport: int = 5060) -> tuple[str, int]:
    run = dp.inside(udp_from(dp, src, sport, dst, dport))
    assert run.retval == XDP_REDIRECT, f"{src}:{sport} -> {dst}:{dport}: verdict {run.retval}"
    out = Ether(run.data)
    return str(out[IP].src), int(out[UDP].sport)


def mapping(dp: NatDatapath, src: str, sport: int, proto: int = TCP_P) -> NatMapping | None:
    key = mapping_key_for(CtKey.make(src, "0.0.0.0", sport, 0, proto))
    raw = dp.tables.map("nat_mappings").lookup(key.to_bytes())
    return None if raw is None else NatMapping.from_buffer_copy(raw)


def port_owner(dp: NatDatapath, ext: str, port: int, proto: int = TCP_P) -> CtKey | None:
    ep = ExtEndpoint(ip_to_be32(ext), port_to_be16(port), proto, 0)
    raw = dp.tables.map("port_owners").lookup(ep.to_bytes())
    return None if raw is None else CtKey.from_buffer_copy(raw)


def host_count(dp: NatDatapath, host: str) -> int:
    return dp.tables.host_ports().get(ip_to_be32(host), 0)


def reaper(dp: NatDatapath) -> Reaper:
    """natd's reaper on the test's pinned maps, with the default timeouts (nothing here is old enough to
    expire): it only releases the mappings whose flows a test deleted."""
    return Reaper(dp.tables, parse_config(RULES_YAML).conntrack.timeouts)


def delete_flows_of(dp: NatDatapath, src: str, sport: int) -> None:
    """What expiry does to an endpoint's flows (the reaper's own expiry is tested in tests/unit)."""
    gone = [(k, e) for k, e in dp.flows() if k.src == ipaddress.IPv4Address(src) and k.src_port == sport]
    assert gone
    dp.tables.delete_flows(gone)


# ============================================================================ mapping, owner, host count


def test_a_mapping_is_stored_with_its_port_claim_and_host_count(dp: NatDatapath) -> None:
    port = open_flow(dp, src=HOST1, sport=40000, dst=SRV)
    m = mapping(dp, HOST1, 40000)
    assert m is not None and (m.ext_addr, m.ext_port) == (ip_to_be32(GW_OUT), port_to_be16(port))
    assert m.flags == NatMappingFlags.OWNS_PORT and m.rule_id == 0
    assert port_owner(dp, GW_OUT, port) == mapping_key_for(CtKey.make(HOST1, SRV, 40000, 80, TCP_P))
    assert host_count(dp, HOST1) == 1
    # a second flow of the endpoint reuses the mapping: no new port, no new count
    with dp.counting() as d:
        assert open_flow(dp, src=HOST1, sport=40000, dst=SRV2) == port
    assert d[Stat.CT_NEW] == 1 and d[Stat.EIM_PORT_SHARED] == 0
    assert host_count(dp, HOST1) == 1 and len(dp.tables.mapping_table()) == 1


def test_sip_hosts_sharing_a_source_port_keep_one_port_each_towards_every_server(dp: NatDatapath) -> None:
    """RFC 4787 REQ-1, the case that used to break it: two hosts send from the same UDP port (SIP's 5060;
    here 25060, inside the NAT range) to one server. The second host's mapping gets another port (25060 is
    the first host's), and keeps it towards other servers, where 25060 would have been free."""
    sip = 25060  # inside rule 0's range, so the first host keeps it
    a = udp_out_port(dp, HOST1, sip)
    b = udp_out_port(dp, "10.0.1.43", sip)
    assert a == (GW_OUT, sip) and b[1] != sip
    assert udp_out_port(dp, "10.0.1.43", sip, dst=SRV2) == b
    assert udp_out_port(dp, "10.0.1.43", sip, dst=SRV3, dport=3478) == b
    assert udp_out_port(dp, HOST1, sip, dst=SRV3, dport=3478) == a


def test_icmp_identifier_mapping_is_endpoint_independent(dp: NatDatapath) -> None:
    """RFC 5508 REQ-1a: one echo identifier gets the same external identifier towards every host."""
    ids = set()
    for dst in (SRV, SRV2, SRV3):
        run = dp.inside(bytes(eth_in(dp) / IP(src=HOST1, dst=dst) / ICMP(type=8, id=0x4242, seq=1)))
        assert run.retval == XDP_REDIRECT
        ids.add(Ether(run.data)[ICMP].id)
    assert len(ids) == 1
    assert mapping(dp, HOST1, 0x4242, PROTO_ICMP) is not None


def test_tcp_and_udp_mappings_of_one_endpoint_are_independent(dp: NatDatapath) -> None:
    """RFC 7857 §5: mappings are protocol-dependent: one per protocol, each counted for the host."""
    open_flow(dp, src=HOST1, sport=26000, dst=SRV)
    udp_out_port(dp, HOST1, 26000)
    assert mapping(dp, HOST1, 26000, TCP_P) is not None
    assert mapping(dp, HOST1, 26000, PROTO_UDP) is not None
    assert host_count(dp, HOST1) == 2


# ============================================================================ release with the last flow


def test_the_reaper_releases_a_mapping_with_its_last_flow(dp: NatDatapath) -> None:
    port = open_flow(dp, src=HOST1, sport=40000, dst=SRV)
    open_flow(dp, src=HOST1, sport=40000, dst=SRV2)
    sweeper = reaper(dp)
    sweeper.sweep()
    assert mapping(dp, HOST1, 40000) is not None, "a mapping with live flows stays"
    dp.tables.delete_flows([(k, e) for k, e in dp.flows() if k.dst_port == 80 and str(k.dst) == SRV])
    result = sweeper.sweep()
    assert result.mappings_released == 0 and mapping(dp, HOST1, 40000) is not None
    dp.tables.delete_flows(dp.flows())
    result = sweeper.sweep()
    assert (result.mappings_released, result.mappings) == (1, 0)
    assert mapping(dp, HOST1, 40000) is None
    assert port_owner(dp, GW_OUT, port) is None
    assert host_count(dp, HOST1) == 0
    # made again, the mapping comes back on the same port (its first candidate is the endpoint's hash)
    assert open_flow(dp, src=HOST1, sport=40000, dst=SRV3) == port


# ============================================================================ per-host limit + ICMP


def test_host_port_limit_refuses_new_mappings_with_icmp_code_13(dp: NatDatapath) -> None:
    """RFC 6888 REQ-4 and RFC 5508 REQ-8: rule 4 caps a host at CAPPED_PORTS ports. The next new mapping
    is refused, counted, and answered with Destination Unreachable code 13 from the gateway's address on
    the host's side; flows that reuse a held mapping, and other hosts, go on."""
    held = [open_flow(dp, src=CAPPED_HOST, sport=41000 + i, dst=SRV) for i in range(CAPPED_PORTS)]
    assert host_count(dp, CAPPED_HOST) == CAPPED_PORTS
    frame = syn(dp, src=CAPPED_HOST, sport=41999, dst=SRV)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert_refused_with_icmp(run, frame, GW_IN1)
    assert d.nonzero() == {"XDP_REDIRECT": 1, "DROP_HOST_PORT_LIMIT": 1, "ICMP_UNREACH_SENT": 1}
    assert dp.flow(CAPPED_HOST, SRV, 41999, 80, TCP_P) is None
    assert host_count(dp, CAPPED_HOST) == CAPPED_PORTS
    # a held mapping towards another destination: no new port, allowed
    assert open_flow(dp, src=CAPPED_HOST, sport=41000, dst=SRV2) == held[0]
    # the limit is per host
    open_flow(dp, src="10.0.1.67", sport=41999, dst=SRV)
    # one mapping released (its flows gone, the reaper swept): room for one more
    delete_flows_of(dp, CAPPED_HOST, 41001)
    assert reaper(dp).sweep().mappings_released == 1
    assert host_count(dp, CAPPED_HOST) == CAPPED_PORTS - 1
    open_flow(dp, src=CAPPED_HOST, sport=41999, dst=SRV)
    assert host_count(dp, CAPPED_HOST) == CAPPED_PORTS


def test_icmp_for_refused_udp_and_echo_quotes_the_packet(dp: NatDatapath) -> None:
    for i in range(CAPPED_PORTS):
        open_flow(dp, src=CAPPED_HOST, sport=42000 + i, dst=SRV)
    echo = eth_in(dp) / IP(src=CAPPED_HOST, dst=SRV) / ICMP(type=8, id=77, seq=1) / (b"x" * 40)
    for frame in (udp_from(dp, CAPPED_HOST, 42999), bytes(echo)):
        assert_refused_with_icmp(dp.inside(frame), frame, GW_IN1)


def test_icmp_refusals_are_rate_limited(dp: NatDatapath) -> None:
    """RFC 1812 §4.3.2.8: at most ICMP_BURST errors per CPU and 100 ms window; the rest are dropped silently
    and counted. Bounded: 3 * ICMP_BURST frames."""
    for i in range(CAPPED_PORTS):
        open_flow(dp, src=CAPPED_HOST, sport=43000 + i, dst=SRV)
    frame = syn(dp, src=CAPPED_HOST, sport=43999, dst=SRV)
    started = time.monotonic()
    with dp.counting() as d:
        runs = dp.run_many("xdp_inside", [frame] * (3 * ICMP_BURST), "in1")
    windows = int((time.monotonic() - started) / 0.1) + 2  # windows the runs may have touched, at most
    sent, limited = d[Stat.ICMP_UNREACH_SENT], d[Stat.ICMP_UNREACH_RATE_LIMITED]
    assert sent + limited == 3 * ICMP_BURST == d[Stat.DROP_HOST_PORT_LIMIT]
    assert 0 < sent <= windows * ICMP_BURST and limited >= (3 - windows) * ICMP_BURST
    assert [r.retval for r in runs].count(XDP_REDIRECT) == sent
    assert [r.retval for r in runs].count(XDP_DROP) == limited
    assert all(r.data == frame for r in runs if r.retval == XDP_DROP)
    time.sleep(ICMP_WINDOW_NS / 1e9)  # the next test starts with a fresh window


def test_no_icmp_about_a_later_fragment(dp: NatDatapath) -> None:
    """RFC 1812 §4.3.2.7: no ICMP error about a non-initial fragment (natd also never sees one without
    its first: it is dropped as unknown)."""
    for i in range(CAPPED_PORTS):
        open_flow(dp, src=CAPPED_HOST, sport=44000 + i, dst=SRV)
    first = bytes(eth_in(dp) / IP(src=CAPPED_HOST, dst=SRV, flags="MF", id=9) / UDP(sport=44999, dport=53)
                  / (b"a" * 64))
    assert_refused_with_icmp(dp.inside(first), first, GW_IN1)
    later = bytes(eth_in(dp) / IP(src=CAPPED_HOST, dst=SRV, frag=9, id=9, proto=17) / (b"b" * 64))
    run = dp.inside(later)
    assert run.retval == XDP_DROP and run.data == later


# ============================================================================ sharing (RFC 7857 §3)


def test_a_port_is_shared_only_when_no_free_port_is_left(dp: NatDatapath) -> None:
    """Rule 2 has four ports. Four endpoints own one each; a fifth, to another destination, shares one
    (RFC 7857 §3, counted). When the owner of that port then talks to the same destination, the port is
    busy there: that one flow gets another port (counted), and the owner's mapping stays."""
    owners = {}
    for i in range(4):
        src = f"10.2.0.{i + 1}"
        owners[udp_out_port(dp, src, 7000, dst=SRV)[1]] = src
    assert sorted(owners) == list(range(TINY_PORTS[0], TINY_PORTS[1] + 1))
    with dp.counting() as d:
        ext, shared = udp_out_port(dp, "10.2.0.9", 7000, dst=SRV2)
    assert ext == TINY_POOL_ADDR and d[Stat.EIM_PORT_SHARED] == 1
    m = mapping(dp, "10.2.0.9", 7000, PROTO_UDP)
    assert m is not None and not m.flags & NatMappingFlags.OWNS_PORT
    owner = owners[shared]
    with dp.counting() as d:
        _, other = udp_out_port(dp, owner, 7000, dst=SRV2)
    assert other != shared and d[Stat.EIM_COLLISION] == 1
    assert mapping(dp, owner, 7000, PROTO_UDP).ext_port == port_to_be16(shared)  # type: ignore[union-attr]
    # towards SRV every port is taken by its owner: a sixth endpoint is refused there
    frame = udp_from(dp, "10.2.0.10", 7000, dst=SRV)
    with dp.counting() as d:
        run = dp.inside(frame)
    assert d[Stat.DROP_PORT_EXHAUSTED] == 1
    assert_refused_with_icmp(run, frame, GW_IN1)


# ============================================================================ endpoint-independent filtering

EIF_RULES = RULES_YAML.replace(f"    ports: {TINY_PORTS[0]}-{TINY_PORTS[1]}\n",
                               f"    ports: {TINY_PORTS[0]}-{TINY_PORTS[1]}\n"
                               "    filtering: endpoint-independent\n", 1)


def udp_in(dp: NatDatapath, src: str, port: int, sport: int = 3478) -> bytes:
    return bytes(eth_out(dp) / IP(src=src, dst=TINY_POOL_ADDR, ttl=57) / UDP(sport=sport, dport=port) / b"hi")


def test_eif_never_shares_a_port(dp: NatDatapath) -> None:
    """RFC 4787 §5 (and the issue): under endpoint-independent filtering an external port names exactly one
    inside endpoint, so with four owned ports a fifth endpoint is refused even towards another
    destination."""
    assert "filtering: endpoint-independent" in EIF_RULES
    with rules(dp, EIF_RULES):
        for i in range(4):
            udp_out_port(dp, f"10.2.0.{i + 1}", 7000, dst=SRV)
        frame = udp_from(dp, "10.2.0.9", 7000, dst=SRV2)
        with dp.counting() as d:
            run = dp.inside(frame)
        assert d[Stat.DROP_PORT_EXHAUSTED] == 1 and d[Stat.EIM_PORT_SHARED] == 0
        assert_refused_with_icmp(run, frame, GW_IN1)


def test_eif_mapping_lives_as_long_as_any_flow_of_the_endpoint(dp: NatDatapath) -> None:
    """RFC 4787 REQ-8 with REQ-1: a new remote reaches the endpoint through its mapping while ANY of its
    flows lives, not only its newest (RFC 7857 §7); once the last is gone and the reaper released the
    mapping, the port is closed."""
    with rules(dp, EIF_RULES):
        _, port = udp_out_port(dp, "10.2.0.1", 7000, dst=SRV)
        udp_out_port(dp, "10.2.0.1", 7000, dst=SRV2)
        # the newest flow goes first; the older one keeps the mapping open to anyone
        dp.tables.delete_flows([(k, e) for k, e in dp.flows() if str(k.dst) == SRV2])
        reaper(dp).sweep()
        run = dp.outside(udp_in(dp, SRV3, port))
        assert run.retval == XDP_REDIRECT
        assert (Ether(run.data)[IP].dst, Ether(run.data)[UDP].dport) == ("10.2.0.1", 7000)
        # the inbound flow is one of the endpoint's flows too; all gone: released, closed
        dp.tables.delete_flows(dp.flows())
        assert reaper(dp).sweep().mappings_released == 1
        frame = udp_in(dp, SRV3, port, sport=3479)
        with dp.counting() as d:
            run = dp.outside(frame)
        assert run.retval == XDP_DROP and d[Stat.DROP_NO_MAPPING] == 1


def test_eif_inbound_tcp_syn_reaches_the_endpoint(dp: NatDatapath) -> None:
    """RFC 5382 REQ-3 with endpoint-independent filtering: a SYN from a new remote to the mapped port opens
    a flow to the inside endpoint; a non-SYN segment does not."""
    with rules(dp, EIF_RULES):
        run = dp.inside(syn(dp, src="10.2.0.1", sport=7100, dst=SRV))
        port = Ether(run.data)[TCP].sport
        stray = bytes(eth_out(dp) / IP(src=SRV3, dst=TINY_POOL_ADDR) / TCP(sport=5555, dport=port, flags="A"))
        assert dp.outside(stray).retval == XDP_DROP
        run = dp.outside(tcp_in(dp, "S", port, dst=TINY_POOL_ADDR, src=SRV3, sport=5555))
        assert run.retval == XDP_REDIRECT
        assert (Ether(run.data)[IP].dst, Ether(run.data)[TCP].dport) == ("10.2.0.1", 7100)


def test_default_filtering_ignores_the_mapping_for_new_remotes(dp: NatDatapath) -> None:
    """Address-and-port-dependent filtering (the default): a mapping opens nothing to other remotes."""
    _, port = udp_out_port(dp, "10.2.0.1", 7000, dst=SRV)
    frame = udp_in(dp, SRV3, port)
    with dp.counting() as d:
        run = dp.outside(frame)
    assert run.retval == XDP_DROP and d[Stat.DROP_NO_MAPPING] == 1



# ============================================================================ keyed port choice (RFC 7857 §9)


def test_the_port_choice_is_keyed_by_natds_secret(dp: NatDatapath) -> None:
    """RFC 7857 §9: when the inside port cannot be kept (40000-40003 lie outside rule 0's range), the port
    comes from a hash keyed with natd's pinned secret: stable for one key (a released mapping comes back
    on its port), different under another key, so the outside cannot compute it from the endpoint."""
    secret = dp.tables.map("nat_secret")
    zero = struct.pack("<I", 0)
    original = secret.lookup(zero)
    assert original is not None and any(original), "natd (here: the fixture) wrote a key"
    assert not dp.tables.ensure_nat_secret(), "an existing key is kept"

    def ports() -> list[int]:
        dp.clear_flows()
        return [open_flow(dp, src=HOST1, sport=40000 + i, dst=SRV) for i in range(4)]

    first = ports()
    assert ports() == first
    try:
        secret.update(zero, bytes(b ^ 0x5A for b in original))
        assert ports() != first  # all four equal by chance: p ~ 1e-16
    finally:
        secret.update(zero, original)


def test_a_mapping_moves_with_its_rules_pool_and_stays_one_port_of_the_host(dp: NatDatapath) -> None:
    """A reload that gives the rule another external address: the endpoint's next new flow replaces its
    mapping with one on the new address (EIM from then on), and the host still counts one port."""
    src = "10.1.200.5"  # rule 1: paired pool of two addresses
    run = dp.inside(syn(dp, src=src, sport=42000, dst=SRV))
    first = str(Ether(run.data)[IP].src)
    other = POOL[1] if first == POOL[0] else POOL[0]
    moved = RULES_YAML.replace(f"to: [{POOL[0]}, {POOL[1]}]", f"to: [{other}]")
    assert moved != RULES_YAML
    with rules(dp, moved):
        out = [Ether(dp.inside(syn(dp, src=src, sport=42000, dst=d)).data) for d in (SRV2, SRV3)]
    assert {str(o[IP].src) for o in out} == {other}
    assert out[0][TCP].sport == out[1][TCP].sport
    m = mapping(dp, src, 42000)
    assert m is not None and m.ext_addr == ip_to_be32(other)
    assert host_count(dp, src) == 1
