"""RFC 5508 REQ-5c and REQ-7/REQ-7a (RFC 7857 §12) with real packets through natd in network namespaces.

REQ-5c: an inside router between the gateway and a host sends Time Exceeded or Fragmentation Needed about
a packet that came in from the internet. The remote's kernel must get it on its socket's error queue:
which proves the ICMP and outer IP checksums (the kernel drops an error that fails them), the quoted
destination (the errqueue's address is the quoted destination: the flow's external endpoint only if natd
reverted the quote) and the outer source (SO_EE_OFFENDER: a public address, never the router's).

REQ-7: host1 pings host2 by its static 1:1 address and host2 sees host1's external address and mapped
identifier; host1 gets the reply with its own identifier. host1's datagram to a closed port of that
static address draws host2's Port Unreachable, which must reach host1's socket quoting host2's static
address and port (REQ-7a: the outer destination is host1 itself).

Traffic goes only to the namespaces a test built (RFC 5737 addresses outside, 10.x inside).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from natd_lab import parse_topology
from natd_lab.apps import ECHO_SNIFFER, ICMP_QUERY

pytestmark = pytest.mark.lab

# --- REQ-5c: an inside router between host1 and the gateway ---------------------------------------------

#   host1 10.0.5.42/24 eth0 --- eth1 10.0.5.1/24  rtr  eth0 10.0.9.2/24 --- in1 10.0.9.1/24  gw
#   gw out0 203.0.113.1/29 --- gw0 203.0.113.6/29 inet srv1 198.51.100.1/24 --- eth0 198.51.100.10/24 srv1
INSIDE_ROUTER: dict[str, Any] = {
    "name": "inside-router",
    "description": "a host behind an inside router behind the NAT gateway; one server outside",
    "nodes": {
        "host1": {"role": "host"},
        "rtr": {"role": "router", "sysctls": {"net.ipv4.ip_forward": 1}},
        "gw": {"role": "gateway", "sysctls": {"net.ipv4.ip_forward": 1}},
        "inet": {"role": "router", "sysctls": {"net.ipv4.ip_forward": 1}},
        "srv1": {"role": "server"},
    },
    "links": [
        {"a": "host1:eth0", "a_addr": "10.0.5.42/24", "b": "rtr:eth1", "b_addr": "10.0.5.1/24"},
        {"a": "rtr:eth0", "a_addr": "10.0.9.2/24", "b": "gw:in1", "b_addr": "10.0.9.1/24"},
        {"a": "gw:out0", "a_addr": "203.0.113.1/29", "b": "inet:gw0", "b_addr": "203.0.113.6/29"},
        {"a": "inet:srv1", "a_addr": "198.51.100.1/24", "b": "srv1:eth0", "b_addr": "198.51.100.10/24"},
    ],
    "routes": {
        "host1": [{"dst": "default", "via": "10.0.5.1"}],
        "rtr": [{"dst": "default", "via": "10.0.9.1"}],
        "gw": [{"dst": "default", "via": "203.0.113.6"}, {"dst": "10.0.5.0/24", "via": "10.0.9.2"}],
        "inet": [{"dst": "192.0.2.0/24", "via": "203.0.113.1"}],
        "srv1": [{"dst": "default", "via": "198.51.100.1"}],
    },
}
RTR_STATIC = "192.0.2.12"

# Reads one error from a socket's error queue (IP_RECVERR) within a bounded wait.
READ_ERROR = r"""
import select, socket, struct
IP_RECVERR = 11
def read_error(s, timeout):
    p = select.poll(); p.register(s, select.POLLERR)
    if not p.poll(int(timeout * 1000)):
        return None
    data, anc, flags, name = s.recvmsg(4096, 512, socket.MSG_ERRQUEUE)
    for level, typ, raw in anc:
        if level == socket.IPPROTO_IP and typ == IP_RECVERR:
            errno_, origin, itype, code, _pad, info, _data = struct.unpack("=IBBBBII", raw[:16])
            return {"errno": errno_, "origin": origin, "type": itype, "code": code, "info": info,
                    "offender": socket.inet_ntoa(raw[20:24]), "quoted_dst": [name[0], name[1]]}
    return None
"""

# srv1: waits for host1's datagram, then answers it in a way the inside router must complain about
# (mode ttl: TTL 3, which expires at the router; mode mtu: 1400 bytes with DF over the router's 1280-byte
# link), and prints what its error queue got, as JSON. Up to three tries (ICMP rate limits, first ARP).
REMOTE = READ_ERROR + r"""
import json, sys
mode = sys.argv[2]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((sys.argv[1], 18500)); u.settimeout(15)
print("ready", flush=True)
_, peer = u.recvfrom(2048)
u.connect(peer)
u.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
if mode == "ttl":
    u.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 3)
    payload = b"expires at the inside router"
else:
    u.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF
    payload = b"m" * 1400
err = None
for _ in range(3):
    u.send(payload)
    err = read_error(u, 3)
    if err:
        break
print(json.dumps({"peer": list(peer), "error": err}), flush=True)
"""

HOST_SEND = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("", 5353))
u.sendto(b"hello", (sys.argv[1], 18500))
"""


@pytest.mark.parametrize("mode,static", [
    pytest.param("ttl", False, id="time-exceeded-router-without-static"),
    pytest.param("ttl", True, id="time-exceeded-router-with-static"),
    pytest.param("mtu", False, id="frag-needed-router-without-static"),
])
def test_inside_router_error_reaches_the_remote_from_a_public_address(lab_factory: Any, natd_factory: Any,
                                                                      mode: str, static: bool) -> None:
    """RFC 5508 REQ-5 (a, b, c): the inside router's Time Exceeded / Fragmentation Needed about srv1's
    reply reaches srv1's socket, with type and code kept (b) and quoting the flow's external endpoint
    (a); its source is the router's static 1:1 address when it has one (the Basic NAT case of REQ-5c),
    else the flow's external address (c). Frag Needed keeps its next-hop MTU: srv1 learns 1280."""
    lab = lab_factory(parse_topology(INSIDE_ROUTER, source="tests/lab/test_icmp_rfc5508.py"))
    config: dict[str, Any] = {"inside": ["in1"], "outside": "out0",
                              "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999"}]}
    if static:
        config["static"] = [{"inside": lab.addr("rtr", "eth0"), "outside": RTR_STATIC}]
    natd = natd_factory(lab, config)
    if mode == "mtu":
        lab.set_link("rtr", "eth1", mtu=1280)
        lab.set_link("host1", "eth0", mtu=1280)
    srv1, ext = lab.addr("srv1"), lab.addr("gw", "out0")
    remote = lab.popen("srv1", [sys.executable, "-c", REMOTE, srv1, mode], stdout=-1, text=True)
    assert remote.stdout is not None and remote.stdout.readline().strip() == "ready"
    before = natd.metric("natd_icmp_errors_translated_total", direction="out") or 0
    lab.exec("host1", [sys.executable, "-c", HOST_SEND, srv1], timeout=10)
    out, _ = remote.communicate(timeout=30)
    result = json.loads(out)
    peer, err = result["peer"], result["error"]
    assert peer[0] == ext and 20000 <= peer[1] <= 29999, result
    assert err is not None, f"no ICMP error reached srv1: {result}"
    assert err["origin"] == 2, err  # SO_EE_ORIGIN_ICMP
    assert err["quoted_dst"] == peer, "the quote was not reverted to the flow's external endpoint"
    assert err["offender"] == (RTR_STATIC if static else ext), "the error's source is not public"
    if mode == "ttl":
        assert (err["type"], err["code"]) == (11, 0), err
    else:
        assert (err["type"], err["code"], err["info"]) == (3, 4, 1280), err
        route = lab.exec("srv1", ["ip", "route", "get", ext]).stdout
        assert "mtu 1280" in route, route  # srv1 learnt the path MTU from the translated error
    after = natd.metric("natd_icmp_errors_translated_total", direction="out") or 0
    assert after - before >= 1


# --- REQ-7 / REQ-7a: hairpinned ICMP in the default lab ---------------------------------------------------

STATIC_B = "192.0.2.10"  # host2's static address (inet routes 192.0.2.0/24 to the gateway)
PING_ID = 7              # outside the NAT range: natd maps it to another identifier

@pytest.fixture
def hairpin_lab(lab: Any, natd_factory: Any) -> tuple[Any, Any]:
    natd = natd_factory(lab, {
        "inside": ["in1", "in2"], "outside": "out0",
        "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999"}],
        "static": [{"inside": lab.addr("host2"), "outside": STATIC_B}],
    })
    return lab, natd


def test_hairpinned_echo_to_a_static_address(hairpin_lab: Any) -> None:
    """RFC 5508 REQ-7 (Basic NAT hairpinned query sessions), RFC 7857 §12: host2 sees host1's echo from
    host1's external address with host1's mapped identifier, and host1's reply comes from host2's static
    address with host1's own identifier and a valid ICMP checksum. An echo to the gateway's own external
    address is still answered by the gateway."""
    lab, natd = hairpin_lab
    ext = lab.addr("gw", "out0")
    sniffer = lab.popen("host2", [sys.executable, "-c", ECHO_SNIFFER, "20"], stdout=-1, text=True)
    assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "ready"
    before = natd.metric("natd_hairpin_packets_total") or 0
    reply = lab.exec("host1", [sys.executable, "-c", ICMP_QUERY, "8", str(PING_ID), STATIC_B],
                     timeout=15).stdout.split()
    assert reply == [STATIC_B, str(PING_ID), "1"], reply
    seen, _ = sniffer.communicate(timeout=25)
    src, ident = seen.split()
    assert src == ext and 20000 <= int(ident) <= 29999, seen  # host1's external address and mapped id
    assert (natd.metric("natd_hairpin_packets_total") or 0) - before >= 2  # the echo and its reply
    flows = natd.natctl("-L", "-p", "icmp").stdout
    assert f"src={lab.addr('host1')} dst={STATIC_B}" in flows, flows
    # the gateway's own address: the kernel answers, the identifier is untouched
    own = lab.exec("host1", [sys.executable, "-c", ICMP_QUERY, "8", str(PING_ID), ext],
                   timeout=15).stdout.split()
    assert own == [ext, str(PING_ID), "1"], own


UNREACHABLE = READ_ERROR + r"""
import json, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
u.connect((sys.argv[1], int(sys.argv[2])))
err = None
for _ in range(3):
    u.send(b"anyone there?")
    err = read_error(u, 3)
    if err:
        break
print(json.dumps(err))
"""


def test_hairpinned_port_unreachable_reaches_the_sender(hairpin_lab: Any) -> None:
    """RFC 5508 REQ-7 (hairpinned errors) and REQ-7a: host2's kernel answers host1's hairpinned datagram
    to a closed port with Port Unreachable, addressed to host1's external address. host1's socket gets
    it: the quote names what host1 sent (host2's static address and port), the source is host2's static
    address, and the outer destination was host1's own address (REQ-7a), else host1 would not see it."""
    lab, natd = hairpin_lab
    before = natd.metric("natd_hairpin_packets_total") or 0
    out = lab.exec("host1", [sys.executable, "-c", UNREACHABLE, STATIC_B, "7999"], timeout=20).stdout
    err = json.loads(out)
    assert err is not None, "no Port Unreachable reached host1"
    assert (err["origin"], err["type"], err["code"]) == (2, 3, 3), err
    assert err["errno"] == 111, err  # ECONNREFUSED
    assert err["quoted_dst"] == [STATIC_B, 7999], err
    assert err["offender"] == STATIC_B, err
    assert (natd.metric("natd_hairpin_packets_total") or 0) - before >= 2  # the datagram and the error
