"""Unit tests for the inbound keys of natd.config: `forward` (port forwards) and `static` (1:1 NAT).

Valid configurations parse to the documented values; every error names the file, the 1-based line of the
offending key (or of the nearest written parent) and the dotted key (docs/config.md)."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from natd.config import Config, ForwardRule, StaticRule, parse_config
from natd.errors import ConfigError

pytestmark = pytest.mark.unit

# lines 1-5; the cases below start at line 6
HEAD = """\
inside: [eth1]
outside: eth0
snat:
  - from: 10.0.0.0/16
    to: [198.51.100.7]
"""


def y(body: str) -> str:
    return HEAD + textwrap.dedent(body).lstrip("\n")


def error(body: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(y(body), source="natd.yaml")
    return info.value


A = ipaddress.IPv4Address


# ================================================================================================ valid


def test_forward_and_static_default_to_empty() -> None:
    cfg = parse_config(HEAD)
    assert cfg.forward == [] and cfg.static == []


def test_forward_with_and_without_port_and_address() -> None:
    cfg = parse_config(y("""
        forward:
          - proto: tcp
            port: 443
            to: 10.0.2.80:8443
          - proto: udp
            port: 5300
            to: 10.0.2.80
          - {proto: tcp, port: 80, to: "10.0.2.81:8080", address: 198.51.100.9}
          - {proto: udp, port: 443, to: 10.0.2.80}
        """))
    tcp, udp, other, udp443 = cfg.forward
    assert (tcp.proto, tcp.port, tcp.address) == ("tcp", 443, None)
    assert (tcp.inside_addr, tcp.inside_port) == (A("10.0.2.80"), 8443)
    assert (udp.proto, udp.port, udp.inside_addr, udp.inside_port) == ("udp", 5300, A("10.0.2.80"), 5300)
    assert udp.to == (A("10.0.2.80"), None), "no port in `to`: the forwarded port is kept"
    assert (other.address, other.inside_addr, other.inside_port) == (A("198.51.100.9"), A("10.0.2.81"), 8080)
    assert (udp443.proto, udp443.port) == ("udp", 443), "the same port for the other protocol is no duplicate"


def test_forward_round_trips_through_the_dump() -> None:
    """`to` is dumped as written (ADDRESS or ADDRESS:PORT), so the digest is stable and a dump re-parses."""
    cfg = parse_config(y("""
        forward:
          - {proto: tcp, port: 443, to: "10.0.2.80:8443"}
          - {proto: udp, port: 53, to: 10.0.2.80}
        static:
          - {inside: 10.0.3.5, outside: 198.51.100.9}
        """))
    dump = cfg.model_dump(mode="json", by_alias=True)
    assert dump["forward"] == [
        {"proto": "tcp", "port": 443, "to": "10.0.2.80:8443", "address": None},
        {"proto": "udp", "port": 53, "to": "10.0.2.80", "address": None},
    ]
    assert dump["static"] == [{"inside": "10.0.3.5", "outside": "198.51.100.9"}]
    again = Config.model_validate(dump, context={"yaml": True})
    assert again == cfg and again.digest() == cfg.digest()


def test_the_same_port_on_two_addresses_is_fine() -> None:
    cfg = parse_config(y("""
        forward:
          - {proto: tcp, port: 443, to: 10.0.2.80}
          - {proto: tcp, port: 443, to: 10.0.2.81, address: 198.51.100.9}
          - {proto: tcp, port: 443, to: 10.0.2.82, address: 198.51.100.10}
        """))
    assert [f.address for f in cfg.forward] == [None, A("198.51.100.9"), A("198.51.100.10")]


def test_static_mappings() -> None:
    cfg = parse_config(y("""
        static:
          - inside: 10.0.3.5
            outside: 198.51.100.9
          - {inside: 10.0.3.6, outside: 198.51.100.10}
        """))
    assert [(s.inside, s.outside) for s in cfg.static] == [(A("10.0.3.5"), A("198.51.100.9")),
                                                           (A("10.0.3.6"), A("198.51.100.10"))]


def test_static_inside_host_may_be_outside_every_snat_network() -> None:
    """The static mapping itself translates the host; it needs no snat rule."""
    cfg = parse_config(y("""
        static:
          - {inside: 192.168.7.7, outside: 198.51.100.9}
        """))
    assert cfg.static[0].inside == A("192.168.7.7")


def test_forward_and_static_on_different_addresses_coexist() -> None:
    cfg = parse_config(y("""
        forward:
          - {proto: tcp, port: 22, to: "10.0.3.5:2222", address: 198.51.100.10}
        static:
          - {inside: 10.0.3.5, outside: 198.51.100.9}
        """))
    assert cfg.forward[0].address == A("198.51.100.10")


def test_python_construction() -> None:
    fwd = ForwardRule.model_validate({"proto": "tcp", "port": 443, "to": "10.0.2.80:8443"})
    assert (fwd.inside_addr, fwd.inside_port, fwd.address) == (A("10.0.2.80"), 8443, None)
    st = StaticRule.model_validate({"inside": "10.0.3.5", "outside": "198.51.100.9"})
    assert (st.inside, st.outside) == (A("10.0.3.5"), A("198.51.100.9"))


# ================================================================================================ errors


ERROR_CASES = [
    # --- forward: one key at a time ---------------------------------------------------------------------
    pytest.param("""
        forward:
          - proto: icmp
            port: 443
            to: 10.0.2.80
        """, 7, "forward[0].proto", "'icmp' is not a protocol a port forward can use; expected tcp or udp",
        id="proto-icmp"),
    pytest.param("""
        forward:
          - proto: 6
            port: 443
            to: 10.0.2.80
        """, 7, "forward[0].proto", "6 is not a protocol a port forward can use", id="proto-number"),
    pytest.param("""
        forward:
          - proto: TCP
            port: 443
            to: 10.0.2.80
        """, 7, "forward[0].proto", "'TCP' is not a protocol a port forward can use", id="proto-case"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 0
            to: 10.0.2.80
        """, 8, "forward[0].port", "0 is not a port; expected an integer 1-65535", id="port-0"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 65536
            to: 10.0.2.80
        """, 8, "forward[0].port", "65536 is not a port; expected an integer 1-65535", id="port-65536"),
    pytest.param("""
        forward:
          - proto: tcp
            port: "443"
            to: 10.0.2.80
        """, 8, "forward[0].port", "'443' is not a port; expected an integer 1-65535", id="port-string"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 400-500
            to: 10.0.2.80
        """, 8, "forward[0].port", "'400-500' is not a port", id="port-range"),
    pytest.param("""
        forward:
          - proto: tcp
            port: true
            to: 10.0.2.80
        """, 8, "forward[0].port", "true is not a port", id="port-bool"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
            to: 10.0.2.80:0
        """, 9, "forward[0].to", "'10.0.2.80:0' has no valid port after ':'; expected ADDRESS or "
        "ADDRESS:PORT", id="to-port-0"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
            to: 10.0.2.80:70000
        """, 9, "forward[0].to", "'10.0.2.80:70000' has no valid port after ':'", id="to-port-too-big"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
            to: "10.0.2.80:https"
        """, 9, "forward[0].to", "'10.0.2.80:https' has no valid port after ':'", id="to-port-name"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
            to: "10.0.2.80:"
        """, 9, "forward[0].to", "'10.0.2.80:' has no valid port after ':'", id="to-empty-port"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
            to: web.internal:8443
        """, 9, "forward[0].to", "'web.internal:8443' is not an inside endpoint; expected ADDRESS or "
        "ADDRESS:PORT such as 10.0.2.80:8443", id="to-hostname"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
            to: 10.0.2.300
        """, 9, "forward[0].to", "'10.0.2.300' is not an inside endpoint", id="to-bad-address"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
            to: 8443
        """, 9, "forward[0].to", "8443 is not an inside endpoint", id="to-number"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
        """, 7, "forward[0].to", "required key is missing", id="to-missing"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
            to: 10.0.2.80
            address: 127.0.0.1
        """, 10, "forward[0].address", "127.0.0.1 cannot be an external address", id="address-loopback"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
            to: 10.0.2.80
            address: eth0
        """, 10, "forward[0].address", "'eth0' is not an IPv4 address", id="address-name"),
    pytest.param("""
        forward:
          - proto: tcp
            prot: 443
            to: 10.0.2.80
        """, 8, "forward[0].prot", "unknown key 'prot'; known keys: proto, port, to, address; "
        "did you mean 'proto'?", id="forward-unknown-key"),
    pytest.param("""
        forward:
          proto: tcp
          port: 443
          to: 10.0.2.80
        """, 6, "forward", "a mapping is not a list; expected a list of port forwards",
        id="forward-not-a-list"),
    # --- forward: across entries ------------------------------------------------------------------------
    pytest.param("""
        forward:
          - {proto: tcp, port: 443, to: 10.0.2.80}
          - {proto: udp, port: 443, to: 10.0.2.80}
          - proto: tcp
            port: 443
            to: 10.0.2.81:443
        """, 10, "forward[2].port", "tcp port 443 on the outside address is already forwarded by forward[0]",
        id="duplicate-forward-outside-address"),
    pytest.param("""
        forward:
          - {proto: udp, port: 53, to: 10.0.2.80, address: 198.51.100.9}
          - proto: udp
            port: 53
            to: 10.0.2.81
            address: 198.51.100.9
        """, 9, "forward[1].port", "udp port 53 on 198.51.100.9 is already forwarded by forward[0]",
        id="duplicate-forward-explicit-address"),
    pytest.param("""
        forward:
          - proto: tcp
            port: 443
            to: 10.0.2.80
            address: 198.51.100.9
        static:
          - {inside: 10.0.3.5, outside: 198.51.100.9}
        """, 10, "forward[0].address", "198.51.100.9 is static[0].outside, which already sends every port "
        "to its inside host", id="forward-on-static-address"),
    # --- static -----------------------------------------------------------------------------------------
    pytest.param("""
        static:
          - {inside: 10.0.3.5, outside: 198.51.100.9}
          - inside: 10.0.3.5
            outside: 198.51.100.10
        """, 8, "static[1].inside", "10.0.3.5 already has static[0]; one external address per inside host",
        id="duplicate-static-inside"),
    pytest.param("""
        static:
          - {inside: 10.0.3.5, outside: 198.51.100.9}
          - inside: 10.0.3.6
            outside: 198.51.100.9
        """, 9, "static[1].outside", "198.51.100.9 is already the outside address of static[0]; a static "
        "address belongs to one host", id="duplicate-static-outside"),
    pytest.param("""
        static:
          - inside: 10.0.3.5
            outside: 198.51.100.7
        """, 8, "static[0].outside", "198.51.100.7 is also in an snat 'to' pool; a static address must "
        "belong to its inside host alone", id="static-outside-in-pool"),
    pytest.param("""
        static:
          - inside: 10.0.3.5
            outside: 10.0.200.1
        """, 8, "static[0].outside", "10.0.200.1 is on a translated (snat from) network; an external address "
        "cannot be", id="static-outside-on-translated-network"),
    pytest.param("""
        static:
          - inside: 10.0.3.5
            outside: 224.0.0.5
        """, 8, "static[0].outside", "224.0.0.5 cannot be an external address",
        id="static-outside-multicast"),
    pytest.param("""
        static:
          - inside: 10.0.3.500
            outside: 198.51.100.9
        """, 7, "static[0].inside", "'10.0.3.500' is not an IPv4 address", id="static-inside-bad"),
    pytest.param("""
        static:
          - inside: 10.0.3.5
        """, 7, "static[0].outside", "required key is missing", id="static-outside-missing"),
    pytest.param("""
        static:
          - {inside: 10.0.3.5, outside: 198.51.100.9, ports: 1-100}
        """, 7, "static[0].ports", "unknown key 'ports'; known keys: inside, outside",
        id="static-unknown-key"),
]


@pytest.mark.parametrize(("body", "line", "key", "message"), ERROR_CASES)
def test_error_location_and_message(body: str, line: int, key: str, message: str) -> None:
    err = error(body)
    assert (err.source, err.line, err.key) == ("natd.yaml", line, key), str(err)
    assert err.message.startswith(message), err.message
    assert str(err).startswith(f"natd.yaml:{line}: {key}: {message}")


def test_several_inbound_errors_report_the_first_in_file_order() -> None:
    err = error("""
        forward:
          - {proto: tcp, port: 443, to: 10.0.2.80}
          - {proto: tcp, port: 443, to: 10.0.2.81}
        static:
          - {inside: 10.0.3.5, outside: 198.51.100.7}
          - {inside: 10.0.3.5, outside: 198.51.100.9}
        """)
    assert (err.line, err.key) == (8, "forward[1].port")
    assert err.message.endswith("(+2 more)"), err.message


def test_the_top_level_lists_forward_and_static_as_known_keys() -> None:
    err = error("""
        forwards:
          - {proto: tcp, port: 443, to: 10.0.2.80}
        """)
    assert (err.line, err.key) == (6, "forwards")
    assert "forward" in err.message and "static" in err.message and "did you mean 'forward'?" in err.message
