"""Flows as text, the way conntrack(8) prints them, and as JSON.

:func:`format_flow` writes one ``conntrack -L`` line (libnetfilter_conntrack's default output)::

    tcp      6 431999 ESTABLISHED src=10.0.1.42 dst=198.51.100.10 sport=40000 dport=80 \
src=198.51.100.10 dst=203.0.113.1 sport=80 dport=40000 [ASSURED] mark=0 use=1

That is: the protocol name left-aligned in 8 columns, a space, its number, the seconds left before the
flow expires, the TCP state (TCP only), the original tuple (the inside host's view), ``[UNREPLIED]`` when
nothing came back yet, the reply tuple (the internet's view: its dst/dport are the external address and
port), ``[ASSURED]`` when assured, and ``mark=0 use=1`` (natd has no marks; kept so tools that parse
conntrack output read natd's too). ICMP echo tuples print ``type=8 code=0 id=N`` / ``type=0 code=0 id=N``
instead of ports. tests/lab/test_fmt_golden.py checks this against the real conntrack binary.

Seconds left = the idle timeout of the flow's protocol/state (see natd.config.Timeouts) minus the time
since its last packet, never below 0. Timestamps are CLOCK_MONOTONIC ns (time.monotonic_ns()).

:func:`flow_json` is the same flow as a JSON-ready dict (``natctl -L -o json`` prints one per line).
Addresses and ports are converted with plain integer operations, not ipaddress objects: ``natctl -L``
formats up to millions of flows.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from typing import Protocol

from natd.maps import (
    PROTO_ICMP,
    PROTO_NAMES,
    PROTO_TCP,
    CtEntry,
    CtFlags,
    CtKey,
    CtState,
    NatMapping,
    NatMappingFlags,
)

__all__ = [
    "ICMP_ECHO",
    "ICMP_ECHOREPLY",
    "TimeoutPolicy",
    "flow_json",
    "format_flow",
    "format_flows",
    "format_mapping",
    "ip_str",
    "mapping_json",
    "port_host",
    "seconds_left",
    "tcp_state_name",
]

NS_PER_S = 1_000_000_000
ICMP_ECHO = 8
ICMP_ECHOREPLY = 0
_REPLIED = int(CtFlags.REPLIED)
_ASSURED = int(CtFlags.ASSURED)
_STATE_NAMES = {int(s): s.name for s in CtState}


class TimeoutPolicy(Protocol):
    """What formatting needs of natd.config.Timeouts."""

    def for_state(self, proto: int, state: int, replied: bool) -> float:
        """Idle timeout in seconds; ValueError for a protocol or state it does not know."""
        ...


def ip_str(be32: int) -> str:
    """Dotted quad of an address kept as stored in the maps (network byte order in memory)."""
    return socket.inet_ntoa(be32.to_bytes(4, "little"))


def port_host(be16: int) -> int:
    """A port (or ICMP identifier) as stored in the maps, in host byte order."""
    return ((be16 & 0xFF) << 8) | (be16 >> 8)


def tcp_state_name(state: int) -> str:
    """conntrack's name of a TCP state; an unknown number prints as NONE, like conntrack does."""
    return _STATE_NAMES.get(state, "NONE")


def seconds_left(key: CtKey, entry: CtEntry, timeouts: TimeoutPolicy, now_ns: int) -> int:
    """Whole seconds before the flow expires: timeout - idle time, rounded down, never below 0.

    A protocol or state ``timeouts`` does not know (a newer datapath) shows 0.
    """
    try:
        timeout_s = timeouts.for_state(key.proto, entry.state, bool(entry.flags & _REPLIED))
    except ValueError:
        return 0
    idle_ns = max(0, now_ns - int(entry.last_seen_ns))
    return max(0, (round(timeout_s * NS_PER_S) - idle_ns) // NS_PER_S)


def _tuple_text(proto: int, saddr: int, daddr: int, sport: int, dport: int, icmp_type: int) -> str:
    if proto == PROTO_ICMP:
        ident = sport if icmp_type == ICMP_ECHO else dport
        return f"src={ip_str(saddr)} dst={ip_str(daddr)} type={icmp_type} code=0 id={port_host(ident)}"
    return f"src={ip_str(saddr)} dst={ip_str(daddr)} sport={port_host(sport)} dport={port_host(dport)}"


Tuple = tuple[int, int, int, int]  # saddr, daddr, sport, dport as stored (be32 / be16)


def flow_tuples(key: CtKey, entry: CtEntry) -> tuple[Tuple, Tuple]:
    """(original, reply) tuples as conntrack names them: the original is the initiator's view. For an
    outbound flow that is the inside host's (ct_orig key) and the reply is the ct_reply key (remote ->
    external address/port). A flow opened from the internet (port forward, static NAT) is the other way
    round: remote -> external address/port first, then inside host -> remote."""
    reply_sport = 0 if key.proto == PROTO_ICMP else key.dport
    outside: Tuple = (key.daddr, entry.nat_addr, reply_sport, entry.nat_port)
    inside: Tuple = (key.saddr, key.daddr, key.sport, key.dport)
    if entry.flags & CtFlags.INBOUND:
        return (key.daddr, entry.nat_addr, key.dport, entry.nat_port), inside
    return inside, outside


def format_flow(key: CtKey, entry: CtEntry, timeout: int) -> str:
    """One ``conntrack -L`` line; ``timeout`` is the seconds-left column (see :func:`seconds_left`)."""
    proto = key.proto
    head = f"{PROTO_NAMES.get(proto, 'unknown'):<8} {proto} {timeout} "
    if proto == PROTO_TCP:
        head += f"{tcp_state_name(entry.state)} "
    o, r = flow_tuples(key, entry)
    orig = _tuple_text(proto, *o, ICMP_ECHO)
    reply = _tuple_text(proto, *r, ICMP_ECHOREPLY)
    unreplied = "" if entry.flags & _REPLIED else "[UNREPLIED] "
    assured = "[ASSURED] " if entry.flags & _ASSURED else ""
    return f"{head}{orig} {unreplied}{reply} {assured}mark=0 use=1"


def _tuple_json(proto: int, saddr: int, daddr: int, sport: int, dport: int,
                icmp_type: int) -> dict[str, object]:
    if proto == PROTO_ICMP:
        ident = sport if icmp_type == ICMP_ECHO else dport
        return {"src": ip_str(saddr), "dst": ip_str(daddr), "type": icmp_type, "code": 0,
                "id": port_host(ident)}
    return {"src": ip_str(saddr), "dst": ip_str(daddr), "sport": port_host(sport), "dport": port_host(dport)}


def flow_json(key: CtKey, entry: CtEntry, timeout: int, now_ns: int) -> dict[str, object]:
    """The flow as a JSON-ready dict.

    Keys: proto (name), proto_number, state (TCP state name; null for UDP and ICMP), timeout (seconds
    left), orig and reply (src, dst, and sport/dport, or type/code/id for ICMP), external (addr, port: the
    translated source; for ICMP port is the identifier), packets and bytes (each {orig, reply}), replied,
    assured, age (seconds since the flow was created, ms resolution), rule_id.
    """
    proto = key.proto
    o, r = flow_tuples(key, entry)
    return {
        "proto": PROTO_NAMES.get(proto, "unknown"),
        "proto_number": proto,
        "state": tcp_state_name(entry.state) if proto == PROTO_TCP else None,
        "timeout": timeout,
        "orig": _tuple_json(proto, *o, ICMP_ECHO),
        "reply": _tuple_json(proto, *r, ICMP_ECHOREPLY),
        "inbound": bool(entry.flags & CtFlags.INBOUND),
        "external": {"addr": ip_str(entry.nat_addr), "port": port_host(entry.nat_port)},
        "packets": {"orig": entry.packets_orig, "reply": entry.packets_reply},
        "bytes": {"orig": entry.bytes_orig, "reply": entry.bytes_reply},
        "replied": bool(entry.flags & _REPLIED),
        "assured": bool(entry.flags & _ASSURED),
        "age": round(max(0, now_ns - entry.created_ns) / NS_PER_S, 3),
        "rule_id": entry.rule_id,
    }


def format_flows(flows: Iterable[tuple[CtKey, CtEntry]], timeouts: TimeoutPolicy,
                 now_ns: int) -> Iterator[str]:
    """``conntrack -L`` lines for ``flows``, in the order given, all timed against one ``now_ns``."""
    for key, entry in flows:
        yield format_flow(key, entry, seconds_left(key, entry, timeouts, now_ns))


# --- NAT mappings (natctl -M) -------------------------------------------------------------------------------

def format_mapping(key: CtKey, mapping: NatMapping, flows: int, host_ports: int) -> str:
    """One ``natctl -M`` line, in the style of a conntrack line::

        udp      17 src=10.0.1.42 sport=5060 ext=203.0.113.1 eport=5060 flows=2 host_ports=3 [OWNS_PORT]

    ``src``/``sport`` the inside endpoint (ICMP: ``id=``), ``ext``/``eport`` what it is translated to;
    under address-and-port-dependent mapping the remote follows (``dst``/``dport``). ``flows``: the
    endpoint's flows using it; ``host_ports``: mappings its inside address holds (max_ports_per_host
    counts these). Flags: ``[OWNS_PORT]`` (no other endpoint shares the port), ``[EIF]``."""
    proto = key.proto
    ident = "id" if proto == PROTO_ICMP else "sport"
    name = PROTO_NAMES.get(proto, "unknown")
    text = f"{name:<8} {proto} src={ip_str(key.saddr)} {ident}={port_host(key.sport)}"
    if key.daddr:
        text += f" dst={ip_str(key.daddr)}"
        if proto != PROTO_ICMP:
            text += f" dport={port_host(key.dport)}"
    text += (f" ext={ip_str(mapping.ext_addr)} e{'id' if proto == PROTO_ICMP else 'port'}="
             f"{port_host(mapping.ext_port)} flows={flows} host_ports={host_ports}")
    for flag in NatMappingFlags:
        if mapping.flags & flag:
            text += f" [{flag.name}]"
    return text


def mapping_json(key: CtKey, mapping: NatMapping, flows: int, host_ports: int) -> dict[str, object]:
    """The mapping as a JSON-ready dict (``natctl -M -o json``)."""
    out: dict[str, object] = {
        "proto": PROTO_NAMES.get(key.proto, str(key.proto)),
        "inside": {"addr": ip_str(key.saddr), "port": port_host(key.sport)},
        "external": {"addr": ip_str(mapping.ext_addr), "port": port_host(mapping.ext_port)},
        "flows": flows,
        "host_ports": host_ports,
        "flags": [f.name for f in NatMappingFlags if mapping.flags & f],
        "rule_id": mapping.rule_id,
    }
    if key.daddr:
        out["remote"] = {"addr": ip_str(key.daddr), "port": port_host(key.dport)}
    return out
