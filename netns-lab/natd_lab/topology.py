"""Topology files: parse and validate the YAML that describes a lab.

Schema (every key other than ``name`` and ``nodes`` is optional)::

    name: default
    description: free text
    nodes:                      # each becomes namespace "<prefix>-<node>"
      host1: {}
      gw: {role: gateway, sysctls: {net.ipv4.ip_forward: 1}}
    links:                      # veth pairs; interface names as seen inside each namespace
      - {a: host1:eth0, a_addr: 10.0.1.42/24, b: gw:in1, b_addr: 10.0.1.1/24, mtu: 1500}
    routes:
      host1: [{dst: default, via: 10.0.1.1}]      # also: {dst: 192.0.2.0/24, via: ..., dev: eth0}

``a_addr``/``b_addr`` take one address or a list of addresses, each with a prefix length.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import TopologyError

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TOPOLOGY_DIR = Path(__file__).resolve().parent.parent / "topologies"
ROLES = ("host", "gateway", "router", "server")
GATEWAY_ROLE = "gateway"

NODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,14}$")
# IFNAMSIZ is 16 including the NUL: 15 characters; no '/', ':' or whitespace.
IFNAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$")
SYSCTL_RE = re.compile(r"^net\.[A-Za-z0-9_.\-/]+$")

_TOP_KEYS = ("name", "description", "nodes", "links", "routes")
_NODE_KEYS = ("role", "sysctls")
_LINK_KEYS = ("a", "a_addr", "b", "b_addr", "mtu")
_ROUTE_KEYS = ("dst", "via", "dev")


@dataclass(frozen=True)
class Node:
    name: str
    role: str = "host"
    sysctls: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_gateway(self) -> bool:
        return self.role == GATEWAY_ROLE


@dataclass(frozen=True)
class Endpoint:
    """One end of a veth pair: interface ``ifname`` inside node ``node``."""

    node: str
    ifname: str
    addrs: tuple[IPInterface, ...] = ()

    def __str__(self) -> str:
        return f"{self.node}:{self.ifname}"


@dataclass(frozen=True)
class Link:
    a: Endpoint
    b: Endpoint
    mtu: int | None = None

    def peer(self, node: str, ifname: str) -> Endpoint | None:
        if (self.a.node, self.a.ifname) == (node, ifname):
            return self.b
        if (self.b.node, self.b.ifname) == (node, ifname):
            return self.a
        return None


@dataclass(frozen=True)
class Route:
    dst: IPNetwork | None  # None: default route
    via: IPAddress | None = None
    dev: str | None = None

    @property
    def dst_text(self) -> str:
        return "default" if self.dst is None else str(self.dst)


@dataclass(frozen=True)
class Topology:
    name: str
    nodes: Mapping[str, Node]
    links: tuple[Link, ...] = ()
    routes: Mapping[str, tuple[Route, ...]] = field(default_factory=dict)
    description: str = ""
    source: str = "<topology>"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def endpoints(self, node: str | None = None) -> list[Endpoint]:
        """Every veth end in link order (both ends of each link), optionally only those of ``node``."""
        ends = [e for link in self.links for e in (link.a, link.b)]
        return [e for e in ends if node is None or e.node == node]

    def endpoint(self, node: str, ifname: str) -> Endpoint:
        for e in self.endpoints(node):
            if e.ifname == ifname:
                return e
        names = ", ".join(e.ifname for e in self.endpoints(node)) or "none"
        raise TopologyError(f"node {node} has no interface {ifname!r} (its interfaces: {names})",
                            source=self.source)

    def peer(self, node: str, ifname: str) -> Endpoint:
        """The other end of the veth ``node:ifname``."""
        for link in self.links:
            if (p := link.peer(node, ifname)) is not None:
                return p
        self.endpoint(node, ifname)  # raises the clear error
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- loading


def available_topologies() -> list[str]:
    """Names of the topology files shipped in netns-lab/topologies/."""
    return sorted(p.stem for p in TOPOLOGY_DIR.glob("*.yaml"))


def resolve_topology_path(name_or_path: str | Path) -> Path:
    """A path as is when it names a file; otherwise ``topologies/<name>.yaml``."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml"))
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise TopologyError(f"no such topology file: {path}", source=str(path))
        return path
    path = TOPOLOGY_DIR / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(available_topologies()) or "none"
        raise TopologyError(f"unknown topology {text!r}; known topologies: {known} "
                            f"(in {TOPOLOGY_DIR}), or pass a path to a .yaml file", source=text)
    return path


def load_topology(name_or_path: str | Path) -> Topology:
    """Load a topology by name (a file in netns-lab/topologies/) or by path, and validate it."""
    path = resolve_topology_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TopologyError(f"not valid YAML: {exc}", source=str(path)) from exc
    except OSError as exc:
        raise TopologyError(f"cannot read: {exc.strerror}", source=str(path)) from exc
    return parse_topology(data, source=str(path))


def parse_topology(data: Any, *, source: str = "<topology>") -> Topology:
    """Validate an already-loaded mapping (e.g. from YAML or a test) and build a ``Topology``."""
    return _Parser(source).topology(data)


# ---------------------------------------------------------------------------------------------- parsing


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def err(self, key: str | None, message: str) -> TopologyError:
        return TopologyError(message, source=self.source, key=key)

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.err(key, f"must be a mapping, got {type(value).__name__} {value!r}")
        for k in value:
            if not isinstance(k, str):
                raise self.err(key, f"keys must be strings, got {k!r}")
            if allowed is not None and k not in allowed:
                close = difflib.get_close_matches(k, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.err(f"{key}.{k}" if key else k,
                               f"unknown key (allowed: {', '.join(allowed)}){hint}")
        return value

    def topology(self, data: Any) -> Topology:
        top = self.mapping(data, "", _TOP_KEYS) if data is not None else None
        if not top:
            raise self.err(None, "empty topology; it needs at least 'name' and 'nodes'")
        name = top.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise self.err("name", f"required: a word of letters, digits, '_', '.', '-' (got {name!r})")
        description = top.get("description") or ""
        if not isinstance(description, str):
            raise self.err("description", "must be a string")
        if "nodes" not in top:
            raise self.err("nodes", "required: a mapping of node name -> {role, sysctls}")
        nodes = self.nodes(top["nodes"])
        links = self.links(top.get("links"), nodes)
        routes = self.routes(top.get("routes"), nodes, links)
        return Topology(name=name, nodes=nodes, links=links, routes=routes, description=description,
                        source=self.source, raw=top)

    # nodes ---------------------------------------------------------------------------------------

    def nodes(self, value: Any) -> dict[str, Node]:
        raw = self.mapping(value, "nodes")
        if not raw:
            raise self.err("nodes", "needs at least one node")
        nodes: dict[str, Node] = {}
        for name, spec in raw.items():
            key = f"nodes.{name}"
            if not NODE_RE.match(name):
                raise self.err(key, "node names are 1-15 characters of a-z, 0-9, '_', starting with a "
                               "letter (they become namespace names '<prefix>-<node>')")
            spec = self.mapping(spec, key, _NODE_KEYS)
            role = spec.get("role", "host")
            if role not in ROLES:
                close = difflib.get_close_matches(str(role), ROLES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.err(f"{key}.role", f"unknown role {role!r} (roles: {', '.join(ROLES)}){hint}")
            nodes[name] = Node(name=name, role=role, sysctls=self.sysctls(spec.get("sysctls"), key))
        return nodes

    def sysctls(self, value: Any, node_key: str) -> dict[str, str]:
        key = f"{node_key}.sysctls"
        raw = self.mapping(value, key)
        out: dict[str, str] = {}
        for name, val in raw.items():
            if not SYSCTL_RE.match(name):
                raise self.err(f"{key}.{name}", "only per-namespace 'net.*' sysctls are allowed "
                               "(e.g. net.ipv4.ip_forward); anything else could change the host")
            if isinstance(val, bool):
                val = int(val)
            if not isinstance(val, int | str) or (isinstance(val, str) and "\n" in val):
                raise self.err(f"{key}.{name}", f"value must be a number or a one-line string, got {val!r}")
            out[name.replace("/", ".")] = str(val)
        return out

    # links ---------------------------------------------------------------------------------------

    def links(self, value: Any, nodes: Mapping[str, Node]) -> tuple[Link, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.err("links", f"must be a list of links, got {type(value).__name__}")
        links: list[Link] = []
        seen_ends: dict[tuple[str, str], str] = {}
        seen_addrs: dict[IPAddress, str] = {}
        for i, spec in enumerate(value):
            key = f"links[{i}]"
            spec = self.mapping(spec, key, _LINK_KEYS)
            ends: list[Endpoint] = []
            for side in ("a", "b"):
                if side not in spec:
                    raise self.err(f"{key}.{side}", "required: 'node:ifname', e.g. host1:eth0")
                node, ifname = self.endpoint_ref(spec[side], f"{key}.{side}", nodes)
                if (node, ifname) in seen_ends:
                    raise self.err(f"{key}.{side}", f"interface {node}:{ifname} is already used by "
                                   f"{seen_ends[(node, ifname)]}; interface names must be unique per node")
                seen_ends[(node, ifname)] = key
                addrs = self.addrs(spec.get(f"{side}_addr"), f"{key}.{side}_addr")
                for a in addrs:
                    if a.ip in seen_addrs:
                        raise self.err(f"{key}.{side}_addr",
                                       f"address {a.ip} is already assigned in {seen_addrs[a.ip]}")
                    seen_addrs[a.ip] = f"{key}.{side}_addr"
                ends.append(Endpoint(node=node, ifname=ifname, addrs=addrs))
            mtu = spec.get("mtu")
            bad_mtu = isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535
            if mtu is not None and bad_mtu:
                raise self.err(f"{key}.mtu", f"must be an integer 68..65535 (veth limits), got {mtu!r}")
            links.append(Link(a=ends[0], b=ends[1], mtu=mtu))
        return tuple(links)

    def endpoint_ref(self, value: Any, key: str, nodes: Mapping[str, Node]) -> tuple[str, str]:
        if not isinstance(value, str) or value.count(":") != 1:
            raise self.err(key, f"must be 'node:ifname', e.g. host1:eth0, got {value!r}")
        node, ifname = value.split(":")
        if node not in nodes:
            raise self.err(key, f"unknown node {node!r}; declared nodes: {', '.join(nodes)}")
        if ifname == "lo" or not IFNAME_RE.match(ifname):
            raise self.err(key, f"bad interface name {ifname!r}: 1-15 characters (IFNAMSIZ) of letters, "
                           "digits, '_', '.', '-', starting with a letter, and not 'lo'")
        return node, ifname

    def addrs(self, value: Any, key: str) -> tuple[IPInterface, ...]:
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        out: list[IPInterface] = []
        for item in items:
            if not isinstance(item, str) or "/" not in item:
                raise self.err(key, f"{item!r} needs a prefix length, e.g. 10.0.1.42/24")
            try:
                out.append(ipaddress.ip_interface(item))
            except ValueError as exc:
                raise self.err(key, f"not an address with prefix length: {exc}") from exc
        return tuple(out)

    # routes --------------------------------------------------------------------------------------

    def routes(self, value: Any, nodes: Mapping[str, Node],
               links: tuple[Link, ...]) -> dict[str, tuple[Route, ...]]:
        raw = self.mapping(value, "routes")
        out: dict[str, tuple[Route, ...]] = {}
        for node, items in raw.items():
            key = f"routes.{node}"
            if node not in nodes:
                raise self.err(key, f"unknown node {node!r}; declared nodes: {', '.join(nodes)}")
            if not isinstance(items, list):
                raise self.err(key, "must be a list of routes, e.g. [{dst: default, via: 10.0.1.1}]")
            ends = [e for link in links for e in (link.a, link.b) if e.node == node]
            out[node] = tuple(self.route(spec, f"{key}[{i}]", node, ends) for i, spec in enumerate(items))
        return out

    def route(self, spec: Any, key: str, node: str, ends: list[Endpoint]) -> Route:
        spec = self.mapping(spec, key, _ROUTE_KEYS)
        if "dst" not in spec:
            raise self.err(f"{key}.dst", "required: 'default' or a prefix like 192.0.2.0/24")
        dst_text = spec["dst"]
        dst: IPNetwork | None = None
        if dst_text != "default":
            try:
                dst = ipaddress.ip_network(str(dst_text))
            except ValueError as exc:
                raise self.err(f"{key}.dst", f"'default' or a prefix like 192.0.2.0/24: {exc}") from exc
        via: IPAddress | None = None
        if spec.get("via") is not None:
            try:
                via = ipaddress.ip_address(str(spec["via"]))
            except ValueError as exc:
                raise self.err(f"{key}.via", f"must be an address: {exc}") from exc
        dev = spec.get("dev")
        if via is None and dev is None:
            raise self.err(key, "needs 'via' (a next-hop address) or 'dev' (an interface of the node)")
        if dev is not None and dev not in {e.ifname for e in ends}:
            names = ", ".join(e.ifname for e in ends) or "none"
            raise self.err(f"{key}.dev", f"node {node} has no interface {dev!r} (its interfaces: {names})")
        if via is not None:
            if dst is not None and dst.version != via.version:
                raise self.err(f"{key}.via", f"IPv{via.version} next hop for an IPv{dst.version} prefix")
            own = [a for e in ends for a in e.addrs]
            if any(a.ip == via for a in own):
                raise self.err(f"{key}.via", f"{via} is an address of {node} itself; use the neighbour's")
            if dev is None and not any(via in a.network for a in own):
                nets = ", ".join(str(a.network) for a in own) or "none"
                raise self.err(f"{key}.via", f"next hop {via} is not on a subnet connected to {node} "
                               f"(connected: {nets}); fix the address or give 'dev'")
        return Route(dst=dst, via=via, dev=dev)
