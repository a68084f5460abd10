"""From a validated Config to the contents of the rule maps (pure: no kernel, unit-tested).

The datapath never loops over rules: a source address finds its rule with one LPM lookup, the rule
names a slice of the external address pool, and ext_addrs tells the inbound path which ports of an
external address belong to the NAT.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from natd.config import Config
from natd.errors import ConfigError
from natd.maps import MAX_POOL, MAX_RULES, PROTO_NUMBERS, SnatRuleFlags


@dataclass(frozen=True)
class SnatEntry:
    network: ipaddress.IPv4Network
    rule_id: int
    pool_index: int
    pool_size: int
    port_min: int
    port_max: int
    flags: int = 0  # natd.maps.SnatRuleFlags
    host_port_limit: int = 0  # max_ports_per_host; 0: no limit


@dataclass(frozen=True)
class ForwardEntry:
    address: ipaddress.IPv4Address
    port: int
    proto: int
    inside_addr: ipaddress.IPv4Address
    inside_port: int


# ext_addrs range of an address that has port forwards but no NAT ports: empty (lo > hi), so unsolicited
# traffic to its other ports goes to the kernel like any traffic for the gateway itself.
NO_NAT_PORTS = (1, 0)
# a static 1:1 address belongs to its inside host entirely
ALL_PORTS = (1, 65535)


@dataclass(frozen=True)
class RuleSet:
    snat: tuple[SnatEntry, ...]
    pool: tuple[ipaddress.IPv4Address, ...]
    ext_addrs: dict[ipaddress.IPv4Address, tuple[int, int]] = field(default_factory=dict)
    outside_ifindexes: frozenset[int] = frozenset()
    forwards: tuple[ForwardEntry, ...] = ()
    statics: tuple[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], ...] = ()  # (inside, outside)


def build_ruleset(config: Config, outside_addr: ipaddress.IPv4Address | None,
                  outside_ifindexes: Iterable[int]) -> RuleSet:
    """outside_addr is the outside interface's address, used by rules without a `to` pool."""
    pool: list[ipaddress.IPv4Address] = []
    snat: list[SnatEntry] = []
    ext: dict[ipaddress.IPv4Address, tuple[int, int]] = {}
    for rule_id, rule in enumerate(config.snat):
        addrs = list(rule.to)
        if not addrs:
            if outside_addr is None:
                raise ConfigError(
                    f"snat[{rule_id}] has no 'to' pool and the outside interface {config.outside} has no "
                    f"IPv4 address; add one to {config.outside} or give the rule 'to: [ADDRESS]'",
                    key=f"snat[{rule_id}].to")
            addrs = [outside_addr]
        flags = SnatRuleFlags(0)
        if rule.mapping == "address-and-port-dependent":
            flags |= SnatRuleFlags.APDM
        if rule.filtering == "endpoint-independent":
            flags |= SnatRuleFlags.EIF
        snat.append(SnatEntry(rule.from_, rule_id, len(pool), len(addrs), rule.ports.lo, rule.ports.hi,
                              int(flags), rule.max_ports_per_host or 0))
        pool.extend(addrs)
        for addr in addrs:
            prev = ext.get(addr)
            if prev is not None and prev != (rule.ports.lo, rule.ports.hi):
                raise ConfigError(
                    f"external address {addr} is used with ports {prev[0]}-{prev[1]} and "
                    f"{rule.ports}; rules sharing an external address must use the same port range",
                    key=f"snat[{rule_id}].ports")
            ext[addr] = (rule.ports.lo, rule.ports.hi)
    forwards: list[ForwardEntry] = []
    seen: dict[tuple[ipaddress.IPv4Address, int, int], int] = {}
    for i, fwd in enumerate(config.forward):
        fwd_addr = fwd.address or outside_addr
        if fwd_addr is None:
            raise ConfigError(f"forward[{i}] has no 'address' and the outside interface {config.outside} has "
                              f"no IPv4 address; add one to {config.outside} or give the forward 'address'",
                              key=f"forward[{i}].address")
        # the config check compares addresses as written; here the outside address is known
        slot = (fwd_addr, PROTO_NUMBERS[fwd.proto], fwd.port)
        if slot in seen:
            raise ConfigError(f"{fwd.proto} port {fwd.port} on {fwd_addr} is already forwarded by "
                              f"forward[{seen[slot]}] (one of them names the outside interface's address "
                              f"implicitly)", key=f"forward[{i}].port")
        seen[slot] = i
        forwards.append(ForwardEntry(fwd_addr, fwd.port, PROTO_NUMBERS[fwd.proto], fwd.inside_addr,
                                     fwd.inside_port))
        ext.setdefault(fwd_addr, NO_NAT_PORTS)
    statics = []
    for i, st in enumerate(config.static):
        if st.outside in ext or st.outside == outside_addr:
            raise ConfigError(f"static[{i}].outside {st.outside} is also used by snat or a port forward "
                              f"or is the outside interface's address; a static address must belong to one "
                              f"inside host alone (every port of it, the gateway's own traffic included)",
                              key=f"static[{i}].outside")
        ext[st.outside] = ALL_PORTS
        statics.append((st.inside, st.outside))
    if len(pool) > MAX_POOL:
        raise ConfigError(f"{len(pool)} external addresses over all rules; at most {MAX_POOL} are supported",
                          key="snat")
    if len(snat) > MAX_RULES:
        raise ConfigError(f"{len(snat)} snat rules; at most {MAX_RULES} are supported", key="snat")
    return RuleSet(tuple(snat), tuple(pool), ext, frozenset(outside_ifindexes), tuple(forwards),
                   tuple(statics))


def check_local_port_range(ruleset: RuleSet, local_range: tuple[int, int],
                           gateway_addrs: Iterable[ipaddress.IPv4Address]) -> None:
    """The kernel picks the gateway's own source ports from ip_local_port_range; if those could be NAT
    ports of one of the gateway's own addresses, the replies to its own connections would be dropped as
    unsolicited. Refuse to start instead."""
    lo, hi = local_range
    own = set(gateway_addrs)
    for i, (_, outside) in enumerate(ruleset.statics):
        if outside in own:
            raise ConfigError(
                f"static[{i}].outside {outside} is an address of the gateway itself; every port of a static "
                f"address belongs to its inside host, so it must not be configured on a gateway interface: "
                f"remove it from the interface and have the upstream router route it to the gateway",
                key=f"static[{i}].outside")
    for addr, (pmin, pmax) in ruleset.ext_addrs.items():
        if addr in own and pmin <= hi and lo <= pmax:
            rule = next((e.rule_id for e in ruleset.snat
                         if addr in ruleset.pool[e.pool_index:e.pool_index + e.pool_size]), None)
            fix_kernel = (f" or move the kernel's range: sysctl -w net.ipv4.ip_local_port_range="
                          f"'{pmax + 1} 65535' (in the gateway's namespace)" if pmax < 65535 else "")
            raise ConfigError(
                f"NAT ports {pmin}-{pmax} of {addr} overlap the kernel's net.ipv4.ip_local_port_range "
                f"{lo}-{hi} (the gateway's own connections use it); pick snat ports outside {lo}-{hi} "
                f"(e.g. 1024-{lo - 1}){fix_kernel}",
                key=f"snat[{rule}].ports" if rule is not None else "snat")

