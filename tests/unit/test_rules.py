"""Config -> rule map contents, and the ip_local_port_range guard (pure, no kernel)."""

from __future__ import annotations

import ipaddress

import pytest

from natd.config import parse_config
from natd.errors import ConfigError
from natd.rules import build_ruleset, check_local_port_range
from natd.sysctl import read_local_port_range

pytestmark = pytest.mark.unit

OUT = ipaddress.IPv4Address("203.0.113.1")


def cfg(snat: str) -> str:
    return f"inside: [in1]\noutside: out0\nsnat:\n{snat}"


def test_rule_without_pool_uses_the_outside_address() -> None:
    rules = build_ruleset(parse_config(cfg("  - from: 10.0.0.0/16\n    ports: 20000-29999\n")), OUT, [7])
    assert rules.pool == (OUT,)
    (entry,) = rules.snat
    assert (str(entry.network), entry.pool_index, entry.pool_size) == ("10.0.0.0/16", 0, 1)
    assert (entry.port_min, entry.port_max) == (20000, 29999)
    assert rules.ext_addrs == {OUT: (20000, 29999)}
    assert rules.outside_ifindexes == frozenset({7})


def test_pools_are_consecutive_slices_per_rule() -> None:
    text = cfg("  - from: 10.0.0.0/16\n    to: [192.0.2.1, 192.0.2.2]\n"
               "  - from: 10.1.0.0/16\n    to: [192.0.2.3]\n    ports: 40000-40999\n")
    rules = build_ruleset(parse_config(text), OUT, [1])
    assert [str(a) for a in rules.pool] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert [(e.rule_id, e.pool_index, e.pool_size) for e in rules.snat] == [(0, 0, 2), (1, 2, 1)]
    assert rules.ext_addrs[ipaddress.IPv4Address("192.0.2.3")] == (40000, 40999)


def test_rule_without_pool_needs_an_outside_address() -> None:
    with pytest.raises(ConfigError, match="outside interface out0 has no IPv4 address"):
        build_ruleset(parse_config(cfg("  - from: 10.0.0.0/16\n")), None, [1])


def test_overlap_with_the_kernels_local_port_range_is_refused_with_the_fix() -> None:
    rules = build_ruleset(parse_config(cfg("  - from: 10.0.0.0/16\n    ports: 30000-40000\n")), OUT, [1])
    with pytest.raises(ConfigError) as err:
        check_local_port_range(rules, (32768, 60999), [OUT])
    msg = str(err.value)
    assert "30000-40000 of 203.0.113.1 overlap" in msg and "32768-60999" in msg
    assert "ip_local_port_range" in msg and "1024-32767" in msg


def test_overlap_only_matters_for_the_gateways_own_addresses() -> None:
    text = cfg("  - from: 10.0.0.0/16\n    to: [192.0.2.1]\n    ports: 30000-40000\n")
    rules = build_ruleset(parse_config(text), OUT, [1])
    check_local_port_range(rules, (32768, 60999), [OUT])  # 192.0.2.1 is not the gateway's: no clash


def test_adjacent_ranges_do_not_overlap() -> None:
    rules = build_ruleset(parse_config(cfg("  - from: 10.0.0.0/16\n    ports: 1024-32767\n")), OUT, [1])
    check_local_port_range(rules, (32768, 60999), [OUT])


def test_read_local_port_range_from_an_injected_proc(tmp_path: pytest.TempPathFactory) -> None:
    base = tmp_path / "sys/net/ipv4"  # type: ignore[operator]
    base.mkdir(parents=True)
    (base / "ip_local_port_range").write_text("32768\t60999\n")
    assert read_local_port_range(str(tmp_path)) == (32768, 60999)


# --- port forwards and static 1:1 NAT ------------------------------------------------------------------

INBOUND = """\
inside: [in1]
outside: out0
snat:
  - from: 10.0.0.0/16
    ports: 20000-29999
  - from: 10.1.0.0/16
    to: [192.0.2.1]
    ports: 40000-40999
forward:
  - {proto: tcp, port: 443, to: "10.0.2.80:8443"}
  - {proto: udp, port: 5300, to: 10.0.2.80}
  - {proto: tcp, port: 80, to: "10.0.2.81:8080", address: 192.0.2.30}
  - {proto: tcp, port: 40001, to: 10.0.2.82, address: 192.0.2.1}
static:
  - {inside: 10.0.3.5, outside: 192.0.2.77}
  - {inside: 10.9.9.9, outside: 192.0.2.78}
"""


def test_forwards_and_statics_go_into_the_ruleset() -> None:
    from natd.rules import ForwardEntry

    rules = build_ruleset(parse_config(INBOUND), OUT, [7])
    a = ipaddress.IPv4Address
    assert rules.forwards == (
        ForwardEntry(OUT, 443, 6, a("10.0.2.80"), 8443),            # no address: the outside address
        ForwardEntry(OUT, 5300, 17, a("10.0.2.80"), 5300),          # no port in `to`: kept
        ForwardEntry(a("192.0.2.30"), 80, 6, a("10.0.2.81"), 8080),
        ForwardEntry(a("192.0.2.1"), 40001, 6, a("10.0.2.82"), 40001),
    )
    assert rules.statics == ((a("10.0.3.5"), a("192.0.2.77")), (a("10.9.9.9"), a("192.0.2.78")))


def test_ext_addrs_of_forward_and_static_addresses() -> None:
    """An address with snat keeps its NAT range (forwards on it are carved out by the datapath); a
    forward-only address gets an empty range (NO_NAT_PORTS: its other ports are the kernel's); a static
    address belongs to its host entirely (ALL_PORTS)."""
    from natd.rules import ALL_PORTS, NO_NAT_PORTS

    rules = build_ruleset(parse_config(INBOUND), OUT, [7])
    a = ipaddress.IPv4Address
    assert rules.ext_addrs == {
        OUT: (20000, 29999),
        a("192.0.2.1"): (40000, 40999),
        a("192.0.2.30"): NO_NAT_PORTS,
        a("192.0.2.77"): ALL_PORTS,
        a("192.0.2.78"): ALL_PORTS,
    }
    assert NO_NAT_PORTS[0] > NO_NAT_PORTS[1], "empty: no port p satisfies lo <= p <= hi"
    assert ALL_PORTS == (1, 65535)


def test_forward_only_on_the_outside_address_has_no_nat_ports() -> None:
    from natd.rules import NO_NAT_PORTS

    text = ("inside: [in1]\noutside: out0\nsnat:\n  - from: 10.0.0.0/16\n    to: [192.0.2.1]\n"
            "forward:\n  - {proto: tcp, port: 22, to: 10.0.2.80}\n")
    rules = build_ruleset(parse_config(text), OUT, [1])
    assert rules.ext_addrs[OUT] == NO_NAT_PORTS
    # an empty range never overlaps the kernel's ephemeral ports
    check_local_port_range(rules, (1024, 65535), [OUT])


def test_forward_without_address_needs_an_outside_address() -> None:
    text = ("inside: [in1]\noutside: out0\nsnat:\n  - from: 10.0.0.0/16\n    to: [192.0.2.1]\n"
            "forward:\n  - {proto: tcp, port: 22, to: 10.0.2.80}\n")
    with pytest.raises(ConfigError, match=r"forward\[0\] has no 'address' and the outside interface") as e:
        build_ruleset(parse_config(text), None, [1])
    assert e.value.key == "forward[0].address"


def test_static_outside_equal_to_the_outside_address_used_by_snat_is_refused() -> None:
    text = cfg("  - from: 10.0.0.0/16\n") + "static:\n  - {inside: 10.0.3.5, outside: 203.0.113.1}\n"
    with pytest.raises(ConfigError) as e:
        build_ruleset(parse_config(text), OUT, [1])
    assert e.value.key == "static[0].outside"
    assert "203.0.113.1 is also used by snat or a port forward" in e.value.message
    assert "must belong to one inside host alone" in e.value.message


def test_static_outside_equal_to_an_implicit_forward_address_is_refused() -> None:
    """The config check sees only explicit forward addresses; the ruleset sees the resolved one."""
    text = ("inside: [in1]\noutside: out0\nsnat:\n  - from: 10.0.0.0/16\n    to: [192.0.2.1]\n"
            "forward:\n  - {proto: tcp, port: 22, to: 10.0.2.80}\n"
            "static:\n  - {inside: 10.0.3.5, outside: 203.0.113.1}\n")
    with pytest.raises(ConfigError) as e:
        build_ruleset(parse_config(text), OUT, [1])
    assert e.value.key == "static[0].outside"


def test_static_outside_equal_to_the_unused_outside_address_is_refused() -> None:
    """docs/config.md: a static address must not be the outside interface's address, also when no snat
    rule or forward uses it. Otherwise every port of the gateway's own address belongs to the inside host
    (ALL_PORTS): a SYN to the gateway's ssh port opens a flow to that host, and replies to the gateway's
    own UDP traffic are forwarded to it."""
    text = ("inside: [in1]\noutside: out0\nsnat:\n  - from: 10.0.0.0/16\n    to: [192.0.2.1]\n"
            "static:\n  - {inside: 10.0.3.5, outside: 203.0.113.1}\n")
    with pytest.raises(ConfigError) as e:
        build_ruleset(parse_config(text), OUT, [1])
    assert e.value.key == "static[0].outside"


def test_forward_duplicated_through_the_outside_address_is_refused() -> None:
    """A forward without `address` and one with `address:` the outside interface's address name the same
    external port; the config check cannot see it (it compares the addresses as written), so the ruleset
    must: otherwise the second silently replaces the first in dnat_rules."""
    text = ("inside: [in1]\noutside: out0\nsnat:\n  - from: 10.0.0.0/16\n"
            "forward:\n  - {proto: tcp, port: 443, to: 10.0.2.80}\n"
            "  - {proto: tcp, port: 443, to: 10.0.2.81, address: 203.0.113.1}\n")
    with pytest.raises(ConfigError) as e:
        build_ruleset(parse_config(text), OUT, [1])
    assert e.value.key in ("forward[1].address", "forward[1].port")


def test_static_address_on_the_gateway_itself_is_refused_with_its_own_message() -> None:
    text = ("inside: [in1]\noutside: out0\nsnat:\n  - from: 10.0.0.0/16\n    to: [192.0.2.1]\n"
            "static:\n  - {inside: 10.0.3.5, outside: 192.0.2.99}\n")
    rules = build_ruleset(parse_config(text), OUT, [1])
    with pytest.raises(ConfigError) as e:
        check_local_port_range(rules, (32768, 60999), [OUT, ipaddress.IPv4Address("192.0.2.99")])
    assert e.value.key == "static[0].outside"
    assert "is an address of the gateway itself" in str(e.value)


def test_overlap_names_the_rule_that_owns_the_address() -> None:
    text = cfg("  - from: 10.0.0.0/16\n    to: [192.0.2.1]\n  - from: 10.1.0.0/16\n    ports: 30000-40000\n")
    rules = build_ruleset(parse_config(text), OUT, [1])
    with pytest.raises(ConfigError) as e:
        check_local_port_range(rules, (32768, 60999), [OUT])
    assert e.value.key == "snat[1].ports"
