"""natd configuration: load, validate and describe /etc/natd/natd.yaml.

The schema is a tree of frozen pydantic models rooted at :class:`Config`; docs/config.md documents every
key. :func:`load_config` / :func:`parse_config` are the only entry points the daemon needs: they turn
every problem (YAML syntax, an unknown key, a bad value, a cross-field conflict) into one
:class:`~natd.errors.ConfigError` that names the file, the 1-based line and the dotted key, e.g.::

    /etc/natd/natd.yaml:7: snat[0].ports: '30000-20000' is not a port range; expected LO-HI with ...

Line numbers come from composing the YAML into a node tree first (nodes keep their start marks) and
walking pydantic's error ``loc`` down that tree; a key that is missing falls back to its nearest parent.
When there are several errors, the first in file order is reported with "(+N more)".
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NoReturn, Self, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    field_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from natd.errors import ConfigError

# Capacities of the datapath maps (NATD_MAX_* in ebpf/lib/abi.h) and protocol numbers: one source.
from natd.maps import (
    MAX_FORWARDS,
    MAX_IFACES,
    MAX_POOL,
    MAX_RULES,
    MAX_STATIC,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
)

__all__ = [
    "RESTART_KEYS",
    "Config",
    "ConntrackConfig",
    "ForwardRule",
    "LogConfig",
    "MetricsConfig",
    "PortRange",
    "SnatRule",
    "StateConfig",
    "StaticRule",
    "Timeouts",
    "load_config",
    "parse_config",
]


# Keys a SIGHUP reload cannot change: they name pinned state, attached programs or sized maps.
RESTART_KEYS = ("instance", "inside", "outside", "conntrack.max", "state.pin_root")

_PORTS_EXPECTED = "expected LO-HI with 1 <= LO <= HI <= 65535"
_PORTS_RE = re.compile(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?")
_INSTANCE_RE = re.compile(r"[a-z0-9_-]{1,32}")
_LISTEN_RE = re.compile(r"\[(?P<v6>[^\]]+)\]:(?P<p6>[0-9]{1,5})|(?P<v4>[^:\[\]]+):(?P<p4>[0-9]{1,5})")
_LISTEN_EXPECTED = ("expected HOST:PORT with an IPv4 address or a bracketed IPv6 address and "
                    "1 <= PORT <= 65535, e.g. 127.0.0.1:9469 or \"[::1]:9469\" (quote the IPv6 form in YAML)")
_UNQUOTED_V6 = re.compile(r":\s*\[[0-9A-Fa-f:.]*\]:\d")  # listen: [::1]:9469 is a YAML flow list
_LOG_LEVELS = ("debug", "info", "warning", "error")
_U32_MAX = 2**32 - 1

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]
_H = TypeVar("_H", bound=Hashable)


# --- raising validation errors that carry their own location -----------------------------------------


def _fail(message: str, *at: str | int, more: Sequence[Problem] = ()) -> NoReturn:
    """Raise a validation error; ``at`` extends pydantic's loc (e.g. a list index), ``more`` adds errors."""
    raise PydanticCustomError("natd", "{message}", {"message": message, "at": at, "more": tuple(more)})


def _fail_all(problems: Sequence[Problem]) -> None:
    if problems:
        (at, message), *rest = problems
        _fail(message, *at, more=rest)


def _show(value: Any) -> str:
    """A value as the user wrote it, for messages."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "an empty value"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


# --- scalar validators (BeforeValidator functions: they own the messages) ----------------------------


def _int_between(lo: int, hi: int, unit: str = "an integer") -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(f"{_show(value)} is not a whole number; expected {unit} from {lo} to {hi}")
        if not lo <= value <= hi:
            _fail(f"{value} is out of range; expected {unit} from {lo} to {hi}")
        return value

    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(f"{_show(value)} is not a boolean; expected true or false")
    return value


def _instance(value: Any) -> str:
    expected = "expected 1-32 characters from a-z, 0-9, '_' and '-'"
    if not isinstance(value, str):
        _fail(f"{_show(value)} is not a string; {expected} (quote names YAML would read as a number)")
    if not _INSTANCE_RE.fullmatch(value):
        _fail(f"{_show(value)} is not a valid instance name; {expected}")
    return value


def _ifname(value: Any) -> str:
    """Linux dev_valid_name(): 1..15 bytes, not '.'/'..', no '/', ':' or whitespace."""
    if not isinstance(value, str):
        _fail(f"{_show(value)} is not an interface name; expected a string such as eth0 "
              "(quote names YAML would read as a number or a boolean)")
    if (not value or len(value.encode()) > 15 or value in (".", "..")
            or any(c in "/:" or c.isspace() for c in value)):
        _fail(f"{_show(value)} is not a valid interface name; "
              "expected 1-15 characters without '/', ':' or whitespace")
    return value


def _abs_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        _fail(f"{_show(value)} is not an absolute path; expected a path starting with '/'")
    if ".." in value.split("/"):
        _fail(f"{_show(value)} contains '..'; expected a plain absolute path")
    return value


def _optional_abs_path(value: Any) -> str | None:
    return None if value is None else _abs_path(value)


def _event_log_path(value: Any) -> str | None:
    """log.events: an absolute file path, "-" (standard error) or null (no event log)."""
    if value == "-":
        return "-"
    if isinstance(value, str) and not value.startswith("/"):
        _fail(f"{_show(value)} is not an absolute path; expected a path starting with '/', or '-' for "
              "standard error")
    return _optional_abs_path(value)


def _log_level(value: Any) -> str:
    if value not in _LOG_LEVELS:
        _fail(f"{_show(value)} is not a log level; expected one of {', '.join(_LOG_LEVELS)}")
    return str(value)


def _network(value: Any) -> ipaddress.IPv4Network:
    if isinstance(value, ipaddress.IPv4Network):
        return value
    expected = "expected an IPv4 network ADDRESS/PREFIX such as 10.0.0.0/8"
    if not isinstance(value, str):
        _fail(f"{_show(value)} is not an IPv4 network; {expected}")
    try:
        return ipaddress.IPv4Network(value)
    except ValueError:
        pass
    try:
        loose = ipaddress.IPv4Network(value, strict=False)
    except ValueError:
        _fail(f"{_show(value)} is not an IPv4 network; {expected}")
    _fail(f"{_show(value)} has host bits set; the network is {loose} (write that, or fix the prefix length)")


def _external_address(value: Any) -> ipaddress.IPv4Address:
    expected = "expected a unicast IPv4 address such as 198.51.100.7"
    if isinstance(value, ipaddress.IPv4Address):
        addr = value
    elif isinstance(value, str):
        try:
            addr = ipaddress.IPv4Address(value)
        except ValueError:
            _fail(f"{_show(value)} is not an IPv4 address; {expected}")
    else:
        _fail(f"{_show(value)} is not an IPv4 address; {expected}")
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast or addr.is_reserved:
        _fail(f"{addr} cannot be an external address; {expected} "
              "(not 0.0.0.0, 127.0.0.0/8, multicast or 240.0.0.0/4)")
    return addr


def _split_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:9469' -> ('127.0.0.1', 9469); '[::1]:9469' -> ('::1', 9469). Raises ValueError."""
    m = _LISTEN_RE.fullmatch(value)
    if m is None:
        raise ValueError(value)
    if m["v6"] is not None:
        host, port = m["v6"], int(m["p6"])
        ipaddress.IPv6Address(host)
    else:
        host, port = m["v4"], int(m["p4"])
        ipaddress.IPv4Address(host)
    if not 1 <= port <= 65535:
        raise ValueError(value)
    return host, port


def _listen(value: Any) -> str:
    if not isinstance(value, str):
        _fail(f"{_show(value)} is not a listen address; {_LISTEN_EXPECTED}")
    try:
        _split_listen(value)
    except ValueError:
        _fail(f"{_show(value)} is not a listen address; {_LISTEN_EXPECTED}")
    return value


def _list_of(what: str, example: str, *, nonempty: bool = False) -> Callable[[Any], list[Any]]:
    def check(value: Any) -> list[Any]:
        if not isinstance(value, list | tuple):
            _fail(f"{_show(value)} is not a list; expected a list of {what}, e.g. {example}")
        if nonempty and not value:
            _fail(f"the list is empty; expected at least one entry, e.g. {example}")
        return list(value)

    return check


def _unique(what: str) -> Callable[[list[_H]], list[_H]]:
    def check(values: list[_H]) -> list[_H]:
        first: dict[_H, int] = {}
        problems: list[Problem] = []
        for i, v in enumerate(values):
            if v in first:
                shown = _show(v) if isinstance(v, str) else str(v)
                problems.append(((i,), f"{shown} is listed twice (also at [{first[v]}]); "
                                 f"each {what} may appear once"))
            else:
                first[v] = i
        _fail_all(problems)
        return values

    return check


# --- the schema ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive port range ``lo``-``hi``; YAML: "20000-29999" or a single port 20000."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if (isinstance(self.lo, bool) or isinstance(self.hi, bool) or not isinstance(self.lo, int)
                or not isinstance(self.hi, int) or not 1 <= self.lo <= self.hi <= 65535):
            raise ConfigError(f"'{self.lo}-{self.hi}' is not a port range; {_PORTS_EXPECTED}")

    def __len__(self) -> int:
        return self.hi - self.lo + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    def __str__(self) -> str:
        return f"{self.lo}-{self.hi}"

    def overlaps(self, other: PortRange) -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    @classmethod
    def parse(cls, value: str | int) -> PortRange:
        """Parse "LO-HI" or a single port (str or int); raises ConfigError saying what is valid."""
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ConfigError(f"{_show(value)} is not a port range; {_PORTS_EXPECTED}")
        if isinstance(value, int):
            if not 1 <= value <= 65535:
                raise ConfigError(f"{value} is not a port range; {_PORTS_EXPECTED}")
            return cls(value, value)
        m = _PORTS_RE.fullmatch(value)
        lo, hi = (int(m[1]), int(m[2] or m[1])) if m else (0, 0)
        if not 1 <= lo <= hi <= 65535:
            raise ConfigError(f"{_show(value)} is not a port range; {_PORTS_EXPECTED}")
        return cls(lo, hi)

    @classmethod
    def _validate(cls, value: Any) -> PortRange:
        if isinstance(value, PortRange):
            return value
        try:
            return cls.parse(value)
        except ConfigError as exc:
            _fail(exc.message)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any,
                                     handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        # dumps (python and json mode) write the YAML form "lo-hi"
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(str))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        text = {"type": "string", "pattern": r"^ *[0-9]{1,5} *(- *[0-9]{1,5} *)?$"}
        single = {"type": "integer", "minimum": 1, "maximum": 65535}
        return {"anyOf": [text, single], "examples": ["20000-29999"]}


class _Section(BaseModel):
    """Base of every mapping in the file: frozen, and unknown keys are errors that list the known ones."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @classmethod
    def yaml_keys(cls) -> list[str]:
        """The keys this mapping accepts in YAML, in schema order."""
        return [f.validation_alias if isinstance(f.validation_alias, str) else name
                for name, f in cls.model_fields.items()]

    @model_validator(mode="before")
    @classmethod
    def _known_keys_only(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, cls):
            return data
        known = cls.yaml_keys()
        if not isinstance(data, dict):
            _fail(f"{_show(data)} is not a mapping; expected keys: {', '.join(known)}")
        accepted = set(known)
        if not (info.context or {}).get("yaml"):  # Python callers may use field names (from_)
            accepted |= set(cls.model_fields)
        problems: list[Problem] = []
        for key in data:
            if key not in accepted:
                hint = difflib.get_close_matches(str(key), known, n=1)
                problems.append(((str(key),), f"unknown key '{key}'; known keys: {', '.join(known)}"
                                 + (f"; did you mean '{hint[0]}'?" if hint else "")))
        _fail_all(problems)
        return data


IfName = Annotated[str, BeforeValidator(_ifname)]
Seconds = Annotated[int, BeforeValidator(_int_between(1, _U32_MAX, "whole seconds"))]


MAPPINGS = ("endpoint-independent", "address-and-port-dependent")
FILTERINGS = ("address-and-port-dependent", "endpoint-independent")


def _choice(what: str, allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value in allowed:
            return str(value)
        _fail(f"{_show(value)} is not a {what} behaviour; expected one of: {', '.join(allowed)}")

    return check


def _ports_per_host(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        _fail(f"{_show(value)} is not a number of ports; expected an integer 1-65535 (external ports one "
              "inside address may hold at once), or leave max_ports_per_host out for no limit")
    return value


class SnatRule(_Section):
    """Translate sources in ``from`` to the addresses ``to`` (empty: the outside interface's address)."""

    # validation_alias (not alias) keeps the Python keyword from_ for type checkers: SnatRule(from_=...)
    from_: Annotated[ipaddress.IPv4Network, BeforeValidator(_network)] = Field(
        validation_alias="from", serialization_alias="from")
    to: Annotated[
        list[Annotated[ipaddress.IPv4Address, BeforeValidator(_external_address)]],
        BeforeValidator(_list_of("IPv4 addresses", "[198.51.100.7]")),
        AfterValidator(_unique("address")),
    ] = []
    ports: PortRange = PortRange(1024, 32767)
    # RFC 4787 §4.1 / §5; defaults: REQ-1 (MUST) for mapping, and for filtering the strict option AWS
    # NAT Gateway uses (REQ-8 recommends endpoint-independent for transparency, address-dependent for
    # stringency; natd offers endpoint-independent and address-and-port-dependent)
    mapping: Annotated[Literal["endpoint-independent", "address-and-port-dependent"],
                       BeforeValidator(_choice("mapping", MAPPINGS))] = "endpoint-independent"
    filtering: Annotated[Literal["address-and-port-dependent", "endpoint-independent"],
                         BeforeValidator(_choice("filtering", FILTERINGS))] = "address-and-port-dependent"
    # RFC 6888 REQ-4: how many external ports (mappings) one inside address may hold at once; None: no cap.
    # Over it, new mappings are dropped and the host gets ICMP Destination Unreachable code 13 (RFC 5508
    # REQ-8).
    max_ports_per_host: Annotated[int | None, BeforeValidator(_ports_per_host)] = None


def _proto(value: Any) -> str:
    if value in ("tcp", "udp"):
        return str(value)
    _fail(f"{_show(value)} is not a protocol a port forward can use; expected tcp or udp")


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        _fail(f"{_show(value)} is not a port; expected an integer 1-65535")
    return value


def _check_inside_host(addr: ipaddress.IPv4Address, written: Any) -> None:
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast or addr.is_reserved or addr.is_link_local:
        _fail(f"{_show(written)} cannot be an inside host; expected a unicast IPv4 address of a private "
              "host such as 10.0.2.80 (not 0.0.0.0, 127.0.0.0/8, 169.254.0.0/16, multicast or 240.0.0.0/4)")


def _inside_address(value: Any) -> ipaddress.IPv4Address:
    try:
        addr = ipaddress.IPv4Address(value) if isinstance(value, str | ipaddress.IPv4Address) else None
    except ValueError:
        addr = None
    if addr is None:
        _fail(f"{_show(value)} is not an IPv4 address; expected an inside host such as 10.0.3.5")
    _check_inside_host(addr, value)
    return addr


def _host_port(value: Any) -> tuple[ipaddress.IPv4Address, int | None]:
    expected = "expected ADDRESS or ADDRESS:PORT such as 10.0.2.80:8443"
    if not isinstance(value, str):
        _fail(f"{_show(value)} is not an inside endpoint; {expected}")
    host, sep, port = value.partition(":")
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError:
        _fail(f"{_show(value)} is not an inside endpoint; {expected}")
    _check_inside_host(addr, value)
    if not sep:
        return addr, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        _fail(f"{_show(value)} has no valid port after ':'; {expected} (ports 1-65535)")
    return addr, int(port)


class ForwardRule(_Section):
    """A port forward (DNAT): new connections to ``address``:``port`` go to ``to`` (RFC 5382 inbound)."""

    proto: Annotated[str, BeforeValidator(_proto)]
    port: Annotated[int, BeforeValidator(_port)]
    to: Annotated[tuple[ipaddress.IPv4Address, int | None], BeforeValidator(_host_port)]
    address: Annotated[ipaddress.IPv4Address | None, BeforeValidator(
        lambda v: None if v is None else _external_address(v))] = None  # None: the outside address

    @property
    def inside_addr(self) -> ipaddress.IPv4Address:
        return self.to[0]

    @property
    def inside_port(self) -> int:
        return self.to[1] if self.to[1] is not None else self.port

    @field_serializer("to")
    def _dump_to(self, to: tuple[ipaddress.IPv4Address, int | None]) -> str:
        return f"{to[0]}:{to[1]}" if to[1] is not None else str(to[0])


class StaticRule(_Section):
    """Static 1:1 NAT: ``inside`` always appears as ``outside`` (ports kept), and every new inbound
    connection to ``outside`` reaches ``inside`` (like an Elastic IP on an Internet Gateway)."""

    inside: Annotated[ipaddress.IPv4Address, BeforeValidator(_inside_address)]
    outside: Annotated[ipaddress.IPv4Address, BeforeValidator(_external_address)]


class Timeouts(_Section):
    """Conntrack idle timeouts in seconds, per protocol and TCP state."""

    tcp_syn_sent: Seconds = 120
    tcp_syn_recv: Seconds = 60
    tcp_established: Seconds = 7440
    tcp_fin_wait: Seconds = 240
    tcp_close_wait: Seconds = 240
    tcp_last_ack: Seconds = 240
    tcp_time_wait: Seconds = 120
    tcp_close: Seconds = 10
    udp_unreplied: Seconds = 120
    udp_replied: Seconds = 300
    icmp: Seconds = 60

    def _tcp(self) -> dict[int, int]:
        """TCP timeouts by natd's ct_state number (ebpf/lib/abi.h); 0 (none yet) counts as SYN_SENT."""
        return {0: self.tcp_syn_sent, 1: self.tcp_syn_sent, 2: self.tcp_syn_recv, 3: self.tcp_established,
                4: self.tcp_fin_wait, 5: self.tcp_close_wait, 6: self.tcp_last_ack, 7: self.tcp_time_wait,
                8: self.tcp_close}

    def for_state(self, proto: int, state: int, replied: bool) -> int:
        """Idle timeout in seconds of a flow of IP protocol ``proto`` (6, 17, 1) in conntrack ``state``."""
        if proto == PROTO_TCP:
            try:
                return self._tcp()[state]
            except KeyError:
                raise ValueError(f"unknown TCP conntrack state {state}; expected 0-8") from None
        if proto == PROTO_UDP:
            return self.udp_replied if replied else self.udp_unreplied
        if proto == PROTO_ICMP:
            return self.icmp
        raise ValueError(f"no conntrack timeout for IP protocol {proto}; "
                         "expected 6 (TCP), 17 (UDP) or 1 (ICMP)")

    def below_rfc_minimums(self) -> list[str]:
        """Human warnings for timeouts below the MUST minimums of RFC 5382 / 4787 / 5508.

        Checked: tcp_established (7440 s), the half-closed states tcp_fin_wait, tcp_close_wait and
        tcp_last_ack (240 s), udp_unreplied and udp_replied (120 s), icmp (60 s). Not checked: the handshake
        states tcp_syn_sent/tcp_syn_recv and the closed states tcp_time_wait/tcp_close, whose defaults follow
        Linux nf_conntrack (120/60/120/10 s); docs/config.md#timeouts explains why.
        """
        transitory = "transitory (half-closed) TCP connections (4 min)"
        checks = [
            ("tcp_established", 7440, "RFC 5382 REQ-5", "established TCP connections (2 h 4 min)"),
            ("tcp_fin_wait", 240, "RFC 5382 REQ-5", transitory),
            ("tcp_close_wait", 240, "RFC 5382 REQ-5", transitory),
            ("tcp_last_ack", 240, "RFC 5382 REQ-5", transitory),
            ("udp_unreplied", 120, "RFC 4787 REQ-5", "UDP mappings (2 min; 300 s or more is recommended)"),
            ("udp_replied", 120, "RFC 4787 REQ-5", "UDP mappings (2 min; 300 s or more is recommended)"),
            ("icmp", 60, "RFC 5508 REQ-2", "ICMP query sessions"),
        ]
        values = self.model_dump()
        return [f"conntrack.timeouts.{field} is {values[field]} s, below the {minimum} s minimum "
                f"{rfc} sets for {what}"
                for field, minimum, rfc, what in checks if values[field] < minimum]


class ConntrackConfig(_Section):
    """Connection tracking table size and idle timeouts."""

    max: Annotated[int, BeforeValidator(_int_between(1024, 16_777_216))] = 262144
    timeouts: Timeouts = Timeouts()


class MetricsConfig(_Section):
    """The Prometheus endpoint."""

    listen: Annotated[str, BeforeValidator(_listen)] = "127.0.0.1:9469"
    enabled: Annotated[bool, BeforeValidator(_bool)] = True

    @property
    def host(self) -> str:
        """Address to bind, without IPv6 brackets."""
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


class LogConfig(_Section):
    """Daemon log level and the NAT event log (RFC 6888 REQ-12 logging)."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_log_level)] = "info"
    events: Annotated[str | None, BeforeValidator(_event_log_path)] = None  # path, "-" (stderr) or None
    log_destinations: Annotated[bool, BeforeValidator(_bool)] = False


class StateConfig(_Section):
    """Where pinned BPF maps live (a bpffs directory)."""

    pin_root: Annotated[str, BeforeValidator(_abs_path)] = "/run/natd/bpf"


class Config(_Section):
    """The whole natd.yaml."""

    instance: Annotated[str, BeforeValidator(_instance)] = "default"
    inside: Annotated[
        list[IfName],
        BeforeValidator(_list_of("interface names", "[eth1]", nonempty=True)),
        AfterValidator(_unique("interface")),
    ]
    outside: IfName
    snat: Annotated[
        list[SnatRule],
        BeforeValidator(_list_of("snat rules", "[{from: 10.0.0.0/8}]", nonempty=True)),
    ]
    forward: Annotated[
        list[ForwardRule],
        BeforeValidator(_list_of("port forwards", "[{proto: tcp, port: 443, to: 10.0.2.80:8443}]")),
    ] = []
    static: Annotated[
        list[StaticRule],
        BeforeValidator(_list_of("static mappings", "[{inside: 10.0.3.5, outside: 203.0.113.10}]")),
    ] = []
    conntrack: ConntrackConfig = ConntrackConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    state: StateConfig = StateConfig()

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        problems: list[Problem] = []
        if self.outside in self.inside:
            problems.append((("outside",), f"'{self.outside}' is also listed in inside; "
                                           "the outside interface must be a different one"))
        if len(self.inside) + 1 > MAX_IFACES:
            problems.append((("inside",), f"{len(self.inside)} interfaces; expected at most {MAX_IFACES - 1} "
                                          f"(the datapath holds {MAX_IFACES} including outside)"))
        if len(self.snat) > MAX_RULES:
            problems.append((("snat",), f"{len(self.snat)} rules; expected at most {MAX_RULES}"))
        pool = {addr for rule in self.snat for addr in rule.to}
        if len(pool) > MAX_POOL:
            problems.append((("snat",), f"{len(pool)} distinct external addresses; "
                                        f"expected at most {MAX_POOL}"))
        problems += self._network_problems() + self._shared_address_problems()
        problems += self._forward_problems() + self._static_problems()
        _fail_all(problems)
        return self

    def _forward_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        seen: dict[tuple[str, str, int], int] = {}
        if len(self.forward) > MAX_FORWARDS:
            problems.append((("forward",), f"{len(self.forward)} port forwards; expected at most "
                                           f"{MAX_FORWARDS}"))
        statics = {s.outside: i for i, s in enumerate(self.static)}
        for i, fwd in enumerate(self.forward):
            key = (str(fwd.address or "outside"), fwd.proto, fwd.port)
            if key in seen:
                problems.append((("forward", i, "port"), f"{fwd.proto} port {fwd.port} on "
                                 f"{fwd.address or 'the outside address'} is already forwarded by "
                                 f"forward[{seen[key]}]"))
            seen.setdefault(key, i)
            if fwd.address is not None and fwd.address in statics:
                problems.append((("forward", i, "address"), f"{fwd.address} is static[{statics[fwd.address]}]"
                                 ".outside, which already sends every port to its inside host"))
        return problems

    def _static_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if len(self.static) > MAX_STATIC:
            problems.append((("static",), f"{len(self.static)} static mappings; expected at most "
                                          f"{MAX_STATIC}"))
        pool = {addr for rule in self.snat for addr in rule.to}
        inside: dict[ipaddress.IPv4Address, int] = {}
        outside: dict[ipaddress.IPv4Address, int] = {}
        for i, rule in enumerate(self.static):
            if rule.inside in inside:
                problems.append((("static", i, "inside"), f"{rule.inside} already has "
                                 f"static[{inside[rule.inside]}]; one external address per inside host"))
            if rule.outside in outside:
                problems.append((("static", i, "outside"), f"{rule.outside} is already the outside address "
                                 f"of static[{outside[rule.outside]}]; a static address belongs to one host"))
            if rule.outside in pool:
                problems.append((("static", i, "outside"), f"{rule.outside} is also in an snat 'to' pool; a "
                                 "static address must belong to its inside host alone"))
            if any(rule.outside in r.from_ for r in self.snat):
                problems.append((("static", i, "outside"), f"{rule.outside} is on a translated (snat from) "
                                 "network; an external address cannot be"))
            inside.setdefault(rule.inside, i)
            outside.setdefault(rule.outside, i)
        return problems

    def _network_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        first: dict[ipaddress.IPv4Network, int] = {}
        for i, rule in enumerate(self.snat):
            if rule.from_ in first:
                problems.append((("snat", i, "from"), f"{rule.from_} is already the network of "
                                 f"snat[{first[rule.from_]}]; each network may appear in one rule only"))
            first.setdefault(rule.from_, i)
            for j, addr in enumerate(rule.to):
                inner = next((k for k, r in enumerate(self.snat) if addr in r.from_), None)
                if inner is not None:
                    problems.append((("snat", i, "to", j), f"{addr} is inside snat[{inner}].from "
                                     f"{self.snat[inner].from_}; an external address cannot be on a "
                                     "translated network"))
        return problems

    def _shared_address_problems(self) -> list[Problem]:
        """Rules may share an external address only with the same port range: the datapath keeps one NAT
        port range per external address (ext_addrs) to tell unsolicited inbound traffic from the gateway's
        own. Rules with an empty ``to`` all share the outside interface's address."""
        problems: list[Problem] = []
        owner: dict[ipaddress.IPv4Address | None, int] = {}
        for i, rule in enumerate(self.snat):
            addrs: list[ipaddress.IPv4Address | None] = [*rule.to] or [None]
            for addr in addrs:
                k = owner.setdefault(addr, i)
                if self.snat[k].filtering != rule.filtering:
                    shared = addr if addr is not None else "the outside interface's address (empty to)"
                    problems.append((("snat", i, "filtering"), f"{rule.filtering} differs from "
                                     f"snat[{k}].filtering {self.snat[k].filtering}, and both rules "
                                     f"translate to {shared}; under endpoint-independent filtering an "
                                     "external port must identify one inside endpoint, so rules sharing an "
                                     "address must filter alike"))
                    break
                if self.snat[k].ports != rule.ports:
                    shared = addr if addr is not None else "the outside interface's address (empty to)"
                    problems.append((("snat", i, "ports"), f"{rule.ports} differs from snat[{k}].ports "
                                     f"{self.snat[k].ports}, and both rules translate to {shared}; rules "
                                     "sharing an external address must use the same port range (the datapath "
                                     "keeps one NAT port range per external address)"))
                    break
        return problems

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of the effective config (defaults filled in, keys sorted)."""
        canonical = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True,
                               separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def changes_needing_restart(self, new: Config) -> list[str]:
        """The RESTART_KEYS whose value differs in ``new``: a SIGHUP reload must refuse these."""
        old_dump, new_dump = self.model_dump(mode="json"), new.model_dump(mode="json")

        def get(dump: dict[str, Any], dotted: str) -> Any:
            for part in dotted.split("."):
                dump = dump[part]
            return dump

        return [key for key in RESTART_KEYS if get(old_dump, key) != get(new_dump, key)]


# --- YAML -> Config with file/line/key errors -----------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``; every error is a ConfigError with source=path."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration: {exc.strerror or exc}", source=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (bad byte at offset {exc.start})", source=source) from None
    return parse_config(text, source)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate YAML ``text``; ``source`` names it in errors."""
    root, data = _load_yaml(text, source)
    try:
        return Config.model_validate(data, context={"yaml": True})
    except ValidationError as exc:
        raise _config_error(exc, root, source) from None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _load_yaml(text: str, source: str) -> tuple[yaml.MappingNode, Any]:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == "tag:yaml.org,2002:null"):
            raise ConfigError("the file is empty; expected a mapping with at least the keys inside, outside "
                              "and snat (see docs/config.md)", source=source)
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"expected a mapping of keys ({', '.join(Config.yaml_keys())}) at the top "
                              "level, found a single value or a list", source=source, line=_line(root))
        _check_duplicate_keys(root, source)
        return root, loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            what += f" ({exc.context})"
        line = None if mark is None else int(mark.line) + 1
        lines = text.splitlines()
        if line is not None and line <= len(lines) and _UNQUOTED_V6.search(lines[line - 1]):
            what += '; quote IPv6 listen addresses: "[::1]:9469"'
        raise ConfigError(f"invalid YAML: {what}", source=source, line=line) from None
    except yaml.YAMLError as exc:  # e.g. ReaderError: a control character in the text
        raise ConfigError(f"invalid YAML: {exc}", source=source) from None
    finally:
        loader.dispose()


def _check_duplicate_keys(root: yaml.Node, source: str) -> None:
    """PyYAML keeps the last of two equal keys silently; natd refuses them (the first in file order)."""
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())]
    seen: set[int] = set()
    dups: list[tuple[int, str, str]] = []
    while stack:
        node, loc = stack.pop()
        if id(node) in seen:  # aliases share nodes (and may form cycles)
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                if key.value in first:
                    dups.append((_line(key), _dotted((*loc, key.value)),
                                 f"duplicate key '{key.value}' (first at line {first[key.value]}); "
                                 "each key may appear once"))
                first.setdefault(key.value, _line(key))
                stack.append((value, (*loc, key.value)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*loc, i)) for i, item in enumerate(node.value))
    if dups:
        line, key, message = min(dups)
        more = f" (+{len(dups) - 1} more)" if len(dups) > 1 else ""
        raise ConfigError(message + more, source=source, line=line, key=key)


def _dotted(loc: Loc) -> str:
    """('snat', 0, 'ports') -> 'snat[0].ports'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(root: yaml.Node, loc: Loc) -> int:
    """Line of the YAML node at ``loc``: a mapping entry's key line, a list item's line; for a part that
    does not exist (a missing key, a default), the nearest existing parent's line."""
    node, line = root, _line(root)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            entry = next(((k, v) for k, v in node.value
                          if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
            if entry is None:
                break
            line, node = _line(entry[0]), entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = _line(node)
        else:
            break
    return line


def _message(error: Any) -> str:
    """Messages for pydantic's own error types (ours come with their text already)."""
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{_show(value)} is not a mapping; expected key: value pairs"
    if kind == "list_type":
        return f"{_show(value)} is not a list"
    return str(error["msg"])


def _config_error(exc: ValidationError, root: yaml.Node, source: str) -> ConfigError:
    found: list[tuple[int, int, Loc, str]] = []
    for error in exc.errors():
        base = tuple(error["loc"])
        ctx = error.get("ctx") or {}
        if error["type"] == "natd":
            items = [((*base, *ctx["at"]), str(ctx["message"])), *(((*base, *a), m) for a, m in ctx["more"])]
        else:
            items = [(base, _message(error))]
        for loc, message in items:
            found.append((_line_of(root, loc), len(found), loc, message))
    found.sort()
    line, _, loc, message = found[0]
    if len(found) > 1:
        message += f" (+{len(found) - 1} more)"
    return ConfigError(message, source=source, line=line, key=_dotted(loc) or None)
