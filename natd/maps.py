"""Python mirror of ebpf/lib/abi.h: map keys, values, states and counter names.

tests/unit/test_abi.py compiles abi.h with the host C compiler and checks every size, offset and enum
value here against it, so the two cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
import struct

import numpy as np

LAYOUT_VERSION = 6
MAX_POOL = 256
MAX_RULES = 1024
MAX_IFACES = 64
MAX_FORWARDS = 4096
MAX_STATIC = 1024
MAX_FRAGS = 8192
MAX_HOSTS = 65536
ICMP_BURST = 100
ICMP_WINDOW_NS = 100_000_000
EVENTS_RING_BYTES = 1 << 20  # the nat_events ring buffer (ebpf/lib/maps.h)
RULE_STATIC = 0xFFFFFFFE  # rule_id of flows made by a static 1:1 mapping
RULE_FORWARD = 0xFFFFFFFF  # rule_id of flows opened through a port forward

PROTO_ICMP = socket.IPPROTO_ICMP
PROTO_TCP = socket.IPPROTO_TCP
PROTO_UDP = socket.IPPROTO_UDP
PROTO_NAMES = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp"}
PROTO_NUMBERS = {name: num for num, name in PROTO_NAMES.items()}


def ip_to_be32(addr: str | ipaddress.IPv4Address) -> int:
    """The integer whose in-memory (little-endian host) bytes are the address in network order."""
    return int.from_bytes(ipaddress.IPv4Address(addr).packed, "little")


def be32_to_ip(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value.to_bytes(4, "little"))


def port_to_be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def be16_to_port(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "little"), "big")


class CtState(enum.IntEnum):
    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8


class CtFlags(enum.IntFlag):
    REPLIED = 1 << 0
    ASSURED = 1 << 1
    FIN_ORIG = 1 << 2
    FIN_REPLY = 1 << 3
    INBOUND = 1 << 4


class Stat(enum.IntEnum):
    """enum natd_stat, in order; names are the C names without the STAT_ prefix, lower-cased."""

    XDP_ABORTED = 0
    XDP_DROP = 1
    XDP_PASS = 2
    XDP_TX = 3
    XDP_REDIRECT = 4
    SNAT_OUT = 5
    DNAT_IN = 6
    PASS_NOT_IPV4 = 7
    PASS_LOCAL = 8
    PASS_INSIDE_ROUTE = 9
    PASS_TTL = 10
    PASS_FRAG_NEEDED = 11
    PASS_NO_NEIGH = 12
    PASS_FIB_OTHER = 13
    PASS_ICMP_OTHER = 14
    PASS_UNSUPPORTED = 15
    DROP_MALFORMED = 16
    DROP_NO_MAPPING = 17
    DROP_TO_PRIVATE = 18
    DROP_SPOOFED_INSIDE = 19
    DROP_UNSUPPORTED = 20
    DROP_PORT_EXHAUSTED = 21
    DROP_TABLE_FULL = 22
    DROP_FRAG_NEEDED_NO_DF = 23
    DROP_OUT_OF_WINDOW = 24
    CT_NEW = 25
    CT_ESTABLISHED = 26
    CT_CREATE_RACE = 27
    ICMP_ERROR_IN = 28
    ICMP_ERROR_OUT = 29
    CT_NEW_INBOUND = 30
    HAIRPIN = 31
    EVENTS_LOST = 32
    FRAG_TRANSLATED = 33
    DROP_FRAG_UNKNOWN = 34
    PASS_FRAG_UNKNOWN = 35
    PASS_FRAGMENT_OUT = 36
    DROP_HOST_PORT_LIMIT = 37
    ICMP_UNREACH_SENT = 38
    ICMP_UNREACH_RATE_LIMITED = 39
    EIM_PORT_SHARED = 40
    EIM_COLLISION = 41


STAT_MAX = len(Stat)


class NatEventType(enum.IntEnum):
    """enum nat_event_type: NEW comes from the datapath (nat_events ring buffer), DESTROY from natd."""

    NEW = 1
    DESTROY = 2


class _Struct(ctypes.Structure):
    def to_bytes(self) -> bytes:
        return ctypes.string_at(ctypes.addressof(self), ctypes.sizeof(self))

    @classmethod
    def from_bytes(cls, data: bytes):  # type: ignore[no-untyped-def]
        return cls.from_buffer_copy(data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Struct) or type(other) is not type(self):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())


class CtKey(_Struct):
    _fields_ = [
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]

    @classmethod
    def make(cls, saddr: str, daddr: str, sport: int, dport: int, proto: int) -> CtKey:
        return cls(ip_to_be32(saddr), ip_to_be32(daddr), port_to_be16(sport), port_to_be16(dport), proto)

    @property
    def src(self) -> ipaddress.IPv4Address:
        return be32_to_ip(self.saddr)

    @property
    def dst(self) -> ipaddress.IPv4Address:
        return be32_to_ip(self.daddr)

    @property
    def src_port(self) -> int:
        return be16_to_port(self.sport)

    @property
    def dst_port(self) -> int:
        return be16_to_port(self.dport)

    def __repr__(self) -> str:
        proto = PROTO_NAMES.get(self.proto, str(self.proto))
        return f"CtKey({proto} {self.src}:{self.src_port} -> {self.dst}:{self.dst_port})"


class CtEntry(_Struct):
    _fields_ = [
        ("created_ns", ctypes.c_uint64),
        ("last_seen_ns", ctypes.c_uint64),
        ("packets_orig", ctypes.c_uint64),
        ("bytes_orig", ctypes.c_uint64),
        ("packets_reply", ctypes.c_uint64),
        ("bytes_reply", ctypes.c_uint64),
        ("nat_addr", ctypes.c_uint32),
        ("nat_port", ctypes.c_uint16),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("rule_id", ctypes.c_uint32),
        ("inside_ack", ctypes.c_uint32),
    ]

    @property
    def nat_ip(self) -> ipaddress.IPv4Address:
        return be32_to_ip(self.nat_addr)

    @property
    def nat_port_host(self) -> int:
        return be16_to_port(self.nat_port)


class CtReplyValue(_Struct):
    _fields_ = [("orig", CtKey)]


# numpy mirrors of the conntrack structs, for whole-table reads (natd.tables.FlowTable): same field names,
# native byte order like ctypes; tests/unit/test_reaper.py checks itemsize and offsets against the ctypes
# structs above (which test_abi.py checks against abi.h).
CT_KEY_DTYPE = np.dtype({
    "names": ["saddr", "daddr", "sport", "dport", "proto", "pad"],
    "formats": [np.uint32, np.uint32, np.uint16, np.uint16, np.uint8, (np.uint8, (3,))],
    "offsets": [0, 4, 8, 10, 12, 13],
    "itemsize": 16,
})
CT_ENTRY_DTYPE = np.dtype({
    "names": ["created_ns", "last_seen_ns", "packets_orig", "bytes_orig", "packets_reply", "bytes_reply",
              "nat_addr", "nat_port", "state", "flags", "rule_id", "inside_ack"],
    "formats": [np.uint64, np.uint64, np.uint64, np.uint64, np.uint64, np.uint64,
                np.uint32, np.uint16, np.uint8, np.uint8, np.uint32, np.uint32],
    "offsets": [0, 8, 16, 24, 32, 40, 48, 52, 54, 55, 56, 60],
    "itemsize": 64,
})
NAT_MAPPING_DTYPE = np.dtype({
    "names": ["last_used_ns", "ext_addr", "ext_port", "flags", "pad", "rule_id", "pad2"],
    "formats": [np.uint64, np.uint32, np.uint16, np.uint8, np.uint8, np.uint32, np.uint32],
    "offsets": [0, 8, 12, 14, 15, 16, 20],
    "itemsize": 24,
})
EXT_ENDPOINT_DTYPE = np.dtype({
    "names": ["addr", "port", "proto", "pad"],
    "formats": [np.uint32, np.uint16, np.uint8, np.uint8],
    "offsets": [0, 4, 6, 7],
    "itemsize": 8,
})
CT_REPLY_VALUE_DTYPE = np.dtype({"names": ["orig"], "formats": [CT_KEY_DTYPE], "offsets": [0],
                                 "itemsize": 16})


class LpmV4Key(_Struct):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class SnatRuleFlags(enum.IntFlag):
    APDM = 1 << 0  # mapping: address-and-port-dependent
    EIF = 1 << 1  # filtering: endpoint-independent


class SnatRuleValue(_Struct):
    _fields_ = [
        ("rule_id", ctypes.c_uint32),
        ("pool_index", ctypes.c_uint32),
        ("pool_size", ctypes.c_uint32),
        ("port_min", ctypes.c_uint16),
        ("port_max", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("host_port_limit", ctypes.c_uint32),
    ]


class NatMappingFlags(enum.IntFlag):
    OWNS_PORT = 1 << 0  # its port is claimed in port_owners
    EIF = 1 << 1  # created under endpoint-independent filtering


class NatMapping(_Struct):
    """Value of nat_mappings; the key is a CtKey (see :func:`mapping_key_for`)."""

    _fields_ = [
        ("last_used_ns", ctypes.c_uint64),
        ("ext_addr", ctypes.c_uint32),
        ("ext_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("rule_id", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


class NatSecret(_Struct):
    _fields_ = [("key", ctypes.c_uint32 * 4)]


class IcmpRate(_Struct):
    _fields_ = [("window_start_ns", ctypes.c_uint64), ("sent", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class FragKey(_Struct):
    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32), ("id", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class FragValue(_Struct):
    _fields_ = [("seen_ns", ctypes.c_uint64), ("addr", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class ExtEndpoint(_Struct):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]


class ExtAddrInfo(_Struct):
    _fields_ = [("port_min", ctypes.c_uint16), ("port_max", ctypes.c_uint16), ("pad", ctypes.c_uint32)]


class DnatKey(_Struct):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]


class DnatTarget(_Struct):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class StatCounter(_Struct):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class NatEvent(_Struct):
    """One nat_events record (natd.events decodes it)."""

    _fields_ = [
        ("time_ns", ctypes.c_uint64),
        ("type", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("inside_addr", ctypes.c_uint32),
        ("external_addr", ctypes.c_uint32),
        ("remote_addr", ctypes.c_uint32),
        ("inside_port", ctypes.c_uint16),
        ("external_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("pad2", ctypes.c_uint16),
    ]


def mapping_key_for(orig: CtKey, endpoint_independent: bool = True) -> CtKey:
    """The nat_mappings key of a flow's original key: its inside endpoint (daddr and dport zero) under
    endpoint-independent mapping, the whole tuple under address-and-port-dependent mapping."""
    key = CtKey.from_buffer_copy(orig.to_bytes())
    if endpoint_independent:
        key.daddr = 0
        key.dport = 0
    return key


def reply_key_for(orig: CtKey, entry: CtEntry) -> CtKey:
    """The ct_reply key of a flow: the internet's view (remote -> external address/port)."""
    key = CtKey()
    key.saddr = orig.daddr
    key.daddr = entry.nat_addr
    key.sport = 0 if orig.proto == PROTO_ICMP else orig.dport
    key.dport = entry.nat_port
    key.proto = orig.proto
    return key


U32 = struct.Struct("<I")
BE32 = struct.Struct("<I")  # be32 values are kept as the raw in-memory integer (see ip_to_be32)


# name -> (key type, value type); the maps natd pins, in ebpf/lib/maps.h
MAP_TYPES: dict[str, tuple[type[_Struct] | None, type[_Struct] | None]] = {
    "ct_orig": (CtKey, CtEntry),
    "ct_reply": (CtKey, CtReplyValue),
    "snat_rules": (LpmV4Key, SnatRuleValue),
    "snat_pool": (None, None),        # u32 index -> be32 address
    "ext_addrs": (None, ExtAddrInfo),  # be32 address -> info
    "outside_ifaces": (None, None),   # u32 ifindex -> u32
    "dnat_rules": (DnatKey, DnatTarget),
    "static_out": (None, None),       # be32 inside -> be32 outside
    "static_in": (None, None),        # be32 outside -> be32 inside
    "stats": (None, StatCounter),     # per-CPU, u32 index -> counter
    "nat_events": (None, NatEvent),   # ring buffer of NatEvent records (no keys)
    "event_ctl": (None, None),        # array[1]: u32 mask of 1 << NatEventType the datapath emits
    "nat_mappings": (CtKey, NatMapping),
    "port_owners": (ExtEndpoint, CtKey),
    "host_ports": (None, None),       # be32 inside address -> u32 external ports held
    "icmp_rate": (None, IcmpRate),    # per-CPU array[1]
    "nat_secret": (None, NatSecret),  # array[1]
}
