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
