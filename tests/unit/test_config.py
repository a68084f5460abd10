"""Unit tests for natd.config: schema, defaults, error locations and messages, helpers, contrib profiles."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from natd.config import (
    Config,
    ConntrackConfig,
    PortRange,
    SnatRule,
    Timeouts,
    load_config,
    parse_config,
)
from natd.errors import ConfigError, NatdError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "inside: [eth1]\noutside: eth0\nsnat:\n  - from: 10.0.0.0/8\n"


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(y(text), source="natd.yaml")
    return info.value


# --- valid configs and defaults -------------------------------------------------------------------------


def test_minimal_config_and_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.instance == "default"
    assert cfg.inside == ["eth1"]
    assert cfg.outside == "eth0"
    assert len(cfg.snat) == 1
    rule = cfg.snat[0]
    assert rule.from_ == ipaddress.IPv4Network("10.0.0.0/8")
    assert rule.to == []
    assert rule.ports == PortRange(1024, 32767)
    assert cfg.conntrack.max == 262144
    t = cfg.conntrack.timeouts
    assert (t.tcp_syn_sent, t.tcp_syn_recv, t.tcp_established, t.tcp_fin_wait, t.tcp_close_wait,
            t.tcp_last_ack, t.tcp_time_wait, t.tcp_close) == (120, 60, 7440, 240, 240, 240, 120, 10)
    assert (t.udp_unreplied, t.udp_replied, t.icmp) == (120, 300, 60)
    assert cfg.metrics.listen == "127.0.0.1:9469"
    assert cfg.metrics.enabled is True
    assert (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9469)
    assert cfg.log.level == "info"
    assert cfg.log.events is None
    assert cfg.log.log_destinations is False
    assert cfg.state.pin_root == "/run/natd/bpf"


def test_full_config() -> None:
    cfg = parse_config(y("""
        instance: edge-1
        inside: [eth1, eth2]
        outside: wan0
        snat:
          - from: 10.0.0.0/16
            to: [198.51.100.7, 198.51.100.8]
            ports: 20000-29999
          - from: 10.1.0.0/16
            to: [198.51.100.7]
            ports: "20000-29999"
          - from: 192.168.1.5
            to: [203.0.113.9]
            ports: 40000
        conntrack:
          max: 1024
          timeouts: {tcp_established: 8000, icmp: 90}
        metrics: {listen: "[::1]:9100", enabled: false}
        log: {level: debug, events: /var/log/natd/events.log, log_destinations: true}
        state: {pin_root: /sys/fs/bpf/natd-edge}
    """))
    assert cfg.instance == "edge-1"
    assert cfg.snat[0].to == [ipaddress.IPv4Address("198.51.100.7"), ipaddress.IPv4Address("198.51.100.8")]
    assert cfg.snat[1].ports == PortRange(20000, 29999)
    assert cfg.snat[2].from_ == ipaddress.IPv4Network("192.168.1.5/32")
    assert cfg.snat[2].ports == PortRange(40000, 40000)
    assert cfg.conntrack.max == 1024
    assert cfg.conntrack.timeouts.tcp_established == 8000
    assert cfg.conntrack.timeouts.tcp_syn_sent == 120
    assert (cfg.metrics.host, cfg.metrics.port, cfg.metrics.enabled) == ("::1", 9100, False)
    assert cfg.log.level == "debug"
    assert cfg.log.events == "/var/log/natd/events.log"
    assert cfg.state.pin_root == "/sys/fs/bpf/natd-edge"


def test_config_is_frozen() -> None:
    cfg = parse_config(MINIMAL)
    with pytest.raises(ValidationError):
        cfg.outside = "eth9"
    with pytest.raises(ValidationError):
        cfg.conntrack.max = 2048


def test_python_construction_matches_yaml() -> None:
    cfg = Config(inside=["eth1"], outside="eth0", snat=[SnatRule(from_=ipaddress.IPv4Network("10.0.0.0/8"))])
    assert cfg.digest() == parse_config(MINIMAL).digest()
    assert SnatRule.model_validate({"from": "10.0.0.0/8", "ports": 5000}).ports == PortRange(5000, 5000)


def test_configerror_is_a_natd_error() -> None:
    assert issubclass(ConfigError, NatdError)


# --- errors: exact line, key and message -----------------------------------------------------------------

KNOWN_TOP = "instance, inside, outside, snat, forward, static, conntrack, metrics, log, state"

ERROR_CASES = [
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snatt: []
        """, 3, "snatt", f"unknown key 'snatt'; known keys: {KNOWN_TOP}; did you mean 'snat'?",
        id="unknown-top"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            prots: 1024-2047
        """, 5, "snat[0].prots",
        "unknown key 'prots'; known keys: from, to, ports, mapping, filtering, max_ports_per_host; "
        "did you mean 'ports'?",
        id="unknown-nested"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        conntrack:
          timeouts:
            tcp_establised: 9000
        snat: [{from: 10.0.0.0/8}]
        """, 5, "conntrack.timeouts.tcp_establised", "unknown key 'tcp_establised'", id="unknown-timeout"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            from_: 10.0.0.0/8
        """, 5, "snat[0].from_", "unknown key 'from_'", id="python-name-not-a-yaml-key"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            ports: 30000-20000
        """, 5, "snat[0].ports",
        "'30000-20000' is not a port range; expected LO-HI with 1 <= LO <= HI <= 65535", id="ports-reversed"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            ports: 70000
        """, 5, "snat[0].ports", "70000 is not a port range; expected LO-HI", id="ports-int-too-big"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            ports: 0-100
        """, 5, "snat[0].ports", "'0-100' is not a port range", id="ports-zero"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.1/8
        """, 4, "snat[0].from", "'10.0.0.1/8' has host bits set; the network is 10.0.0.0/8", id="host-bits"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/33
        """, 4, "snat[0].from",
        "'10.0.0.0/33' is not an IPv4 network; expected an IPv4 network ADDRESS/PREFIX",
        id="bad-network"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: "fd00::/8"
        """, 4, "snat[0].from", "'fd00::/8' is not an IPv4 network", id="ipv6-network"),
    pytest.param("""
        inside: [eth1, eth0]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        """, 2, "outside", "'eth0' is also listed in inside", id="outside-in-inside"),
    pytest.param("""
        inside:
          - eth1
          - eth2
          - eth1
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        """, 4, "inside[2]", "'eth1' is listed twice (also at [0]); each interface may appear once",
        id="inside-duplicate"),
    pytest.param("""
        inside: [eth1]
        outside: a-very-long-ifname
        snat: [{from: 10.0.0.0/8}]
        """, 2, "outside", "'a-very-long-ifname' is not a valid interface name; expected 1-15 characters",
        id="ifname-too-long"),
    pytest.param("""
        inside:
          - eth1
          - "eth 2"
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        """, 3, "inside[1]", "'eth 2' is not a valid interface name", id="ifname-space"),
    pytest.param("""
        inside: [eth1/2]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        """, 1, "inside[0]", "'eth1/2' is not a valid interface name", id="ifname-slash"),
    pytest.param("""
        inside: [eth1]
        outside: on
        snat: [{from: 10.0.0.0/8}]
        """, 2, "outside", "true is not an interface name; expected a string such as eth0 (quote names",
        id="ifname-yaml-bool"),
    pytest.param("""
        inside: eth1
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        """, 1, "inside", "'eth1' is not a list; expected a list of interface names, e.g. [eth1]",
        id="inside-not-list"),
    pytest.param("""
        inside: []
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        """, 1, "inside", "the list is empty; expected at least one entry", id="inside-empty"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: []
        """, 3, "snat", "the list is empty; expected at least one entry", id="snat-empty"),
    pytest.param("""
        instance: Prod
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        """, 1, "instance", "'Prod' is not a valid instance name; expected 1-32 characters from a-z, 0-9",
        id="instance-uppercase"),
    pytest.param("""
        instance: 007
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        """, 1, "instance", "7 is not a string", id="instance-number"),
    pytest.param("""
        inside: [eth1]
        snat: [{from: 10.0.0.0/8}]
        """, 1, "outside", "required key is missing", id="missing-outside"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
          - to: [198.51.100.7]
        """, 5, "snat[1].from", "required key is missing", id="missing-from"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
          - from: 10.0.0.0/8
        """, 5, "snat[1].from", "10.0.0.0/8 is already the network of snat[0]", id="from-duplicate"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            to: [198.51.100.7]
          - from: 192.168.0.0/16
            to:
              - 198.51.100.8
              - 10.9.9.9
        """, 9, "snat[1].to[1]", "10.9.9.9 is inside snat[0].from 10.0.0.0/8; an external address cannot",
        id="to-inside-from"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            to: [198.51.100.7, 198.51.100.7]
        """, 5, "snat[0].to[1]", "198.51.100.7 is listed twice (also at [0]); each address may appear once",
        id="to-duplicate"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            to: [224.0.0.1]
        """, 5, "snat[0].to[0]", "224.0.0.1 cannot be an external address; expected a unicast IPv4 address",
        id="to-multicast"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            to: 198.51.100.7
        """, 5, "snat[0].to", "'198.51.100.7' is not a list; expected a list of IPv4 addresses",
        id="to-not-list"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            to: [198.51.100.7]
            ports: 20000-29999
          - from: 172.16.0.0/12
            to: [198.51.100.9, 198.51.100.7]
            ports: 30000-39999
        """, 9, "snat[1].ports",
        "30000-39999 differs from snat[0].ports 20000-29999, and both rules translate to 198.51.100.7; "
        "rules sharing an external address must use the same port range", id="shared-address-ports"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
          - from: 172.16.0.0/12
            ports: 40000-49999
        """, 6, "snat[1].ports",
        "40000-49999 differs from snat[0].ports 1024-32767, and both rules translate "
        "to the outside interface's address", id="shared-outside-address"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        conntrack:
          max: 100
        """, 5, "conntrack.max", "100 is out of range; expected an integer from 1024 to 16777216",
        id="ct-max-small"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        conntrack:
          max: "4096"
        """, 5, "conntrack.max", "'4096' is not a whole number; expected an integer", id="ct-max-string"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        conntrack:
          timeouts:
            icmp: 0
        """, 6, "conntrack.timeouts.icmp", "0 is out of range; expected whole seconds from 1 to 4294967295",
        id="timeout-zero"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        conntrack:
          timeouts:
            udp_replied: 2.5
        """, 6, "conntrack.timeouts.udp_replied", "2.5 is not a whole number", id="timeout-float"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        conntrack: 5
        """, 4, "conntrack", "5 is not a mapping; expected keys: max, timeouts", id="section-not-mapping"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        metrics:
          listen: localhost:9469
        """, 5, "metrics.listen", "'localhost:9469' is not a listen address; expected HOST:PORT",
        id="listen-hostname"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        metrics:
          listen: "127.0.0.1:0"
        """, 5, "metrics.listen", "'127.0.0.1:0' is not a listen address", id="listen-port-zero"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        metrics:
          enabled: "yes"
        """, 5, "metrics.enabled", "'yes' is not a boolean; expected true or false", id="enabled-string"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        log:
          level: verbose
        """, 5, "log.level", "'verbose' is not a log level; expected one of debug, info, warning, error",
        id="log-level"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        log:
          events: events.log
        """, 5, "log.events", "'events.log' is not an absolute path", id="events-relative"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        state:
          pin_root: sys/fs/bpf
        """, 5, "state.pin_root", "'sys/fs/bpf' is not an absolute path", id="pin-root-relative"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        outside: eth2
        snat: [{from: 10.0.0.0/8}]
        """, 3, "outside", "duplicate key 'outside' (first at line 2)", id="duplicate-key"),
    pytest.param("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            ports: 1024-2047
            ports: 4096-8191
        """, 6, "snat[0].ports", "duplicate key 'ports' (first at line 5)", id="duplicate-nested-key"),
]


@pytest.mark.parametrize(("text", "line", "key", "message"), ERROR_CASES)
def test_error_location_and_message(text: str, line: int, key: str, message: str) -> None:
    err = error(text)
    assert (err.source, err.line, err.key) == ("natd.yaml", line, key)
    assert err.message.startswith(message), err.message
    assert str(err).startswith(f"natd.yaml:{line}: {key}: {message}")


def test_port_range_message_exactly() -> None:
    err = error("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            ports: 30000-20000
        """)
    assert str(err) == ("natd.yaml:5: snat[0].ports: '30000-20000' is not a port range; "
                        "expected LO-HI with 1 <= LO <= HI <= 65535")


def test_several_errors_report_first_in_file_order() -> None:
    # log.level (line 1) comes after instance (line 2) in the schema, but first in the file.
    err = error("""
        log: {level: loud}
        instance: "Bad Name"
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.1/8
        """)
    assert (err.line, err.key) == (1, "log.level")
    assert err.message.endswith("(+2 more)")


def test_single_error_has_no_more_suffix() -> None:
    assert "more)" not in error("inside: [eth1]\noutside: eth0\nsnat: []\n").message


def test_shared_address_with_same_ports_is_fine() -> None:
    cfg = parse_config(y("""
        inside: [eth1]
        outside: eth0
        snat:
          - from: 10.0.0.0/8
            to: [198.51.100.7]
            ports: 20000-29999
          - from: 172.16.0.0/12
            to: [198.51.100.7]
            ports: 20000-29999
          - from: 192.168.0.0/16
            to: [198.51.100.8]
            ports: 1024-2047
        """))
    assert [str(r.ports) for r in cfg.snat] == ["20000-29999", "20000-29999", "1024-2047"]


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("inside: [eth1\noutside: eth0\n", 2, "invalid YAML: expected ',' or ']'"),
    ("inside: [eth1]\noutside: eth0\n  snat: x\n", 3, "invalid YAML: mapping values are not allowed here"),
    ("inside: [eth1]\n\toutside: eth0\n", 2, "invalid YAML: found character '\\t'"),
    ("a: !!python/object:os.system x\n", 1, "invalid YAML: could not determine a constructor"),
])
def test_yaml_syntax_errors_carry_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="natd.yaml")
    assert (info.value.line, info.value.key) == (line, None)
    assert info.value.message.startswith(fragment), info.value.message


def test_unquoted_ipv6_listen_gets_a_hint() -> None:
    err = error("""
        inside: [eth1]
        outside: eth0
        snat: [{from: 10.0.0.0/8}]
        metrics:
          listen: [::1]:9469
        """)
    assert err.line == 5
    assert 'quote IPv6 listen addresses: "[::1]:9469"' in err.message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file(text: str) -> None:
    with pytest.raises(ConfigError, match="the file is empty; expected a mapping with at least the keys "
                                          "inside, outside and snat"):
        parse_config(text)


@pytest.mark.parametrize("text", ["- eth0\n", "just a string\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError, match=r"expected a mapping of keys .* at the top level") as info:
        parse_config(text)
    assert info.value.line == 1


# --- load_config ------------------------------------------------------------------------------------------


def test_load_config_reads_file_and_errors_name_it(tmp_path: Path) -> None:
    good = tmp_path / "natd.yaml"
    good.write_text(MINIMAL)
    assert load_config(good).outside == "eth0"
    assert load_config(str(good)).digest() == parse_config(MINIMAL).digest()

    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL + "    ports: 9-1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert (info.value.source, info.value.line, info.value.key) == (str(bad), 5, "snat[0].ports")
    assert str(info.value).startswith(f"{bad}:5: snat[0].ports: '9-1' is not a port range")


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read the configuration: No such file") as info:
        load_config(path)
    assert info.value.source == str(path)


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"instance: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


# --- PortRange --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "lo", "hi"), [
    ("20000-29999", 20000, 29999),
    ("20000", 20000, 20000),
    (20000, 20000, 20000),
    (" 1024 - 2047 ", 1024, 2047),
    ("1-65535", 1, 65535),
    ("65535", 65535, 65535),
])
def test_port_range_parse(value: str | int, lo: int, hi: int) -> None:
    assert PortRange.parse(value) == PortRange(lo, hi)


@pytest.mark.parametrize("value", ["30000-20000", "0-10", "0", 0, 65536, "65536", "1-65536", "", "-", "10-",
                                   "-10", "a-b", "1024:2047", "+5", "1e3", True, 1.5, None, [1, 2]])
def test_port_range_parse_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match="is not a port range; expected LO-HI with 1 <= LO <= HI <= 65535"):
        PortRange.parse(value)  # type: ignore[arg-type]


def test_port_range_constructor_validates() -> None:
    with pytest.raises(ConfigError):
        PortRange(10, 9)
    with pytest.raises(ConfigError):
        PortRange(0, 9)


def test_port_range_len_str_contains() -> None:
    r = PortRange(1024, 32767)
    assert len(r) == 31744
    assert len(PortRange(5, 5)) == 1
    assert len(PortRange(1, 65535)) == 65535
    assert str(r) == "1024-32767"
    assert 1024 in r and 32767 in r
    assert 1023 not in r and 32768 not in r


@pytest.mark.parametrize(("a", "b", "expected"), [
    ((1024, 2047), (2048, 4095), False),
    ((1024, 2048), (2048, 4095), True),
    ((1024, 65535), (32768, 60999), True),
    ((20000, 20000), (20000, 20000), True),
    ((1, 10), (11, 20), False),
    ((100, 200), (50, 300), True),
])
def test_port_range_overlaps(a: tuple[int, int], b: tuple[int, int], expected: bool) -> None:
    ra, rb = PortRange(*a), PortRange(*b)
    assert ra.overlaps(rb) is expected
    assert rb.overlaps(ra) is expected


port = st.integers(min_value=1, max_value=65535)


@given(port, port)
def test_port_range_str_parse_round_trip(a: int, b: int) -> None:
    r = PortRange(min(a, b), max(a, b))
    assert PortRange.parse(str(r)) == r
    assert len(r) == r.hi - r.lo + 1
    assert r.overlaps(r)


@given(port)
def test_port_range_single_port_round_trip(p: int) -> None:
    assert PortRange.parse(p) == PortRange.parse(str(p)) == PortRange(p, p)
    assert str(PortRange.parse(p)) == f"{p}-{p}"


@given(st.integers(min_value=-10**6, max_value=10**6), st.integers(min_value=-10**6, max_value=10**6))
def test_port_range_parse_never_accepts_invalid(a: int, b: int) -> None:
    text = f"{a}-{b}"
    if a >= 1 and 1 <= a <= b <= 65535:
        assert PortRange.parse(text) == PortRange(a, b)
    else:
        with pytest.raises(ConfigError):
            PortRange.parse(text)


# --- Timeouts ---------------------------------------------------------------------------------------------


def test_for_state_mapping() -> None:
    t = Timeouts(tcp_syn_sent=1, tcp_syn_recv=2, tcp_established=3, tcp_fin_wait=4, tcp_close_wait=5,
                 tcp_last_ack=6, tcp_time_wait=7, tcp_close=8, udp_unreplied=9, udp_replied=10, icmp=11)
    assert [t.for_state(6, state, False) for state in range(9)] == [1, 1, 2, 3, 4, 5, 6, 7, 8]
    assert t.for_state(6, 3, True) == 3
    assert t.for_state(17, 0, False) == 9
    assert t.for_state(17, 0, True) == 10
    assert t.for_state(1, 0, False) == t.for_state(1, 0, True) == 11


def test_for_state_defaults() -> None:
    t = Timeouts()
    assert t.for_state(6, 0, False) == 120
    assert t.for_state(6, 3, True) == 7440
    assert t.for_state(17, 0, True) == 300
    assert t.for_state(1, 0, False) == 60


@pytest.mark.parametrize(("proto", "state"), [(6, 9), (6, -1), (47, 0), (58, 0)])
def test_for_state_unknown(proto: int, state: int) -> None:
    with pytest.raises(ValueError, match="expected"):
        Timeouts().for_state(proto, state, False)


def test_defaults_meet_rfc_minimums() -> None:
    assert Timeouts().below_rfc_minimums() == []


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("tcp_established", 7439, "RFC 5382 REQ-5"),
    ("tcp_fin_wait", 239, "RFC 5382 REQ-5"),
    ("tcp_close_wait", 60, "RFC 5382 REQ-5"),
    ("tcp_last_ack", 30, "RFC 5382 REQ-5"),
    ("udp_unreplied", 30, "RFC 4787 REQ-5"),
    ("udp_replied", 119, "RFC 4787 REQ-5"),
    ("icmp", 59, "RFC 5508 REQ-2"),
])
def test_below_rfc_minimums_warns(field: str, value: int, fragment: str) -> None:
    warnings = Timeouts.model_validate({field: value}).below_rfc_minimums()
    assert len(warnings) == 1
    assert warnings[0].startswith(f"conntrack.timeouts.{field} is {value} s, below the ")
    assert fragment in warnings[0]


@pytest.mark.parametrize("field", ["tcp_syn_sent", "tcp_syn_recv", "tcp_time_wait", "tcp_close"])
def test_below_rfc_minimums_ignores_handshake_and_closed_states(field: str) -> None:
    assert Timeouts.model_validate({field: 1}).below_rfc_minimums() == []


def test_below_rfc_minimums_lists_each_violation() -> None:
    timeouts = Timeouts.model_validate({"tcp_established": 300, "icmp": 10, "udp_replied": 60})
    assert [w.split(" ")[0] for w in timeouts.below_rfc_minimums()] == [
        "conntrack.timeouts.tcp_established", "conntrack.timeouts.udp_replied", "conntrack.timeouts.icmp"]


# --- digest and restart keys ------------------------------------------------------------------------------

DIGEST_A = """
inside: [eth1, eth2]
outside: eth0
snat:
  - from: 10.0.0.0/8
    ports: 20000-29999
conntrack:
  max: 65536
  timeouts: {udp_replied: 600, icmp: 90}
"""

DIGEST_B = """
# same content: other key order, flow/block style, comments, explicit defaults
conntrack:
  timeouts:
    icmp: 90          # one and a half minutes
    udp_replied: 600
  max: 65536
snat:
  - ports: "20000-29999"
    to: []
    from: "10.0.0.0/8"
outside: eth0
instance: default
inside:
  - eth1
  - eth2
metrics: {enabled: true}
"""


def test_digest_is_stable_across_formatting() -> None:
    a, b = parse_config(DIGEST_A), parse_config(DIGEST_B)
    assert a.digest() == b.digest()
    assert len(a.digest()) == 64 and int(a.digest(), 16) >= 0
    assert a.digest() == parse_config(DIGEST_A).digest()


@pytest.mark.parametrize(("old", "new"), [
    ("icmp: 90", "icmp: 91"),
    ("max: 65536", "max: 65537"),
    ("20000-29999", "20000-29998"),
    ("inside: [eth1, eth2]", "inside: [eth2, eth1]"),
])
def test_digest_changes_with_values(old: str, new: str) -> None:
    assert old in DIGEST_A
    assert parse_config(DIGEST_A).digest() != parse_config(DIGEST_A.replace(old, new)).digest()


def test_changes_needing_restart() -> None:
    base = parse_config(DIGEST_A)
    assert base.changes_needing_restart(parse_config(DIGEST_B)) == []
    assert base.changes_needing_restart(parse_config(DIGEST_A.replace("icmp: 90", "icmp: 30"))) == []
    changed = parse_config(DIGEST_A.replace("max: 65536", "max: 4096").replace("eth0", "wan0")
                           + "instance: b\nstate: {pin_root: /sys/fs/bpf/other}\n")
    assert base.changes_needing_restart(changed) == ["instance", "outside", "conntrack.max", "state.pin_root"]


# --- contrib profiles -------------------------------------------------------------------------------------


def test_contrib_default_config_parses_and_equals_defaults() -> None:
    cfg = load_config(REPO / "contrib" / "natd.yaml")
    assert cfg.conntrack == ConntrackConfig()
    assert cfg.conntrack.timeouts.below_rfc_minimums() == []
    assert cfg.digest() == parse_config(MINIMAL).digest()


def test_contrib_aws_like_profile() -> None:
    cfg = load_config(REPO / "contrib" / "aws-like.yaml")
    assert set(cfg.conntrack.timeouts.model_dump().values()) == {350}
    assert all(rule.ports == PortRange(1024, 65535) for rule in cfg.snat)
    warnings = cfg.conntrack.timeouts.below_rfc_minimums()
    assert len(warnings) == 1 and warnings[0].startswith("conntrack.timeouts.tcp_established is 350 s")


def test_docs_examples_parse() -> None:
    text = (REPO / "docs" / "config.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    configs = [b for b in blocks if "inside:" in b]
    assert len(configs) >= 3
    for block in configs:
        parse_config(block, source="docs/config.md")


def test_duplicate_keys_report_the_first_in_file_order() -> None:
    err = error("""
        inside: [eth1]
        outside: eth0
        outside: eth2
        snat:
          - from: 10.0.0.0/8
            from: 10.0.0.0/8
        log: {level: info, level: debug}
        """)
    assert (err.line, err.key) == (3, "outside")
    assert err.message.endswith("(+2 more)")
