"""Small building blocks that act inside one lab namespace, never in the root namespace.

Links, addresses and routes go through pyroute2 sockets opened *inside* the namespace
(``IPRoute(netns=...)``); veths are created directly in their namespaces, so no interface ever exists
in the root namespace, not even for a moment. Sysctls and ethtool features are set by running
``sysctl``/``ethtool`` under ``ip netns exec``: /proc/sys/net and the ethtool ioctl act on the namespace
of the calling process, and pyroute2's Ethtool has no namespace support, so a child in the namespace is
the safe way (this process never calls setns()).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import LabError
from .registry import NETNS_DIR
from .topology import IPInterface, Route


def ns_argv(namespace: str, cmd: Sequence[str]) -> list[str]:
    """argv that runs ``cmd`` inside ``namespace``; `ip netns exec` execs it, so the PID is cmd's."""
    return ["ip", "netns", "exec", namespace, *cmd]


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Turn a netlink/OS failure into a LabError that says which step failed."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        yield
    except LabError:
        raise
    except NetlinkError as exc:
        msg = os.strerror(exc.code) if isinstance(exc.code, int) and exc.code > 0 else str(exc)
        raise LabError(f"{what}: {msg} (netlink error {exc.code})") from exc
    except OSError as exc:
        raise LabError(f"{what}: {exc}") from exc


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends.

    pyroute2 creates namespaces and netns sockets in a forked child; a Ctrl-C that interrupted the wait
    for that child could let the child finish *after* teardown looked for namespaces, leaving one behind.
    Blocking the signals makes each such step all-or-nothing; a pending signal fires right after it.
    """
    deferred = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def create_namespace(name: str) -> None:
    from pyroute2 import netns

    if (NETNS_DIR / name).exists():
        raise LabError(f"network namespace {name} already exists; pick another prefix or remove the old lab "
                       f"(natd-lab down {name.split('-', 1)[0]})")
    with step(f"creating network namespace {name}"), signals_deferred():
        netns.create(name)


@contextlib.contextmanager
def rtnl(namespace: str) -> Iterator[Any]:
    """A pyroute2 IPRoute bound to an existing namespace (never creates one)."""
    from pyroute2 import IPRoute

    if not (NETNS_DIR / namespace).exists():
        raise LabError(f"network namespace {namespace} does not exist (is the lab up?)")
    with step(f"opening netlink in namespace {namespace}"), signals_deferred():
        ipr = IPRoute(netns=namespace, flags=0)
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(ipr: Any, namespace: str, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        names = sorted(link.get("ifname") for link in ipr.get_links())
        raise LabError(f"no interface {ifname!r} in namespace {namespace} (it has: {', '.join(names)})")
    return int(found[0])


def add_veth(ipr: Any, namespace: str, ifname: str, peer_ns: str, peer_ifname: str) -> None:
    """Create veth ``ifname`` in ``namespace`` whose peer ``peer_ifname`` is born in ``peer_ns``."""
    with step(f"creating veth {namespace}:{ifname} <-> {peer_ns}:{peer_ifname}"):
        ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer_ifname, "net_ns_fd": peer_ns})


def set_link(ipr: Any, namespace: str, ifname: str, *, up: bool | None = None,
             mtu: int | None = None) -> None:
    index = link_index(ipr, namespace, ifname)
    kwargs: dict[str, Any] = {}
    if mtu is not None:
        kwargs["mtu"] = mtu
    if up is not None:
        kwargs["state"] = "up" if up else "down"
    if kwargs:
        with step(f"setting {', '.join(f'{k}={v}' for k, v in kwargs.items())} on {namespace}:{ifname}"):
            ipr.link("set", index=index, **kwargs)


def add_address(ipr: Any, namespace: str, ifname: str, addr: IPInterface) -> None:
    index = link_index(ipr, namespace, ifname)
    with step(f"adding address {addr} to {namespace}:{ifname}"):
        ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)


def add_route(ipr: Any, namespace: str, route: Route) -> None:
    version = (route.dst.version if route.dst is not None
               else route.via.version if route.via is not None else 4)
    dst = str(route.dst) if route.dst is not None else ("0.0.0.0/0" if version == 4 else "::/0")
    kwargs: dict[str, Any] = {"dst": dst, "family": socket.AF_INET if version == 4 else socket.AF_INET6}
    if route.via is not None:
        kwargs["gateway"] = str(route.via)
    if route.dev is not None:
        kwargs["oif"] = link_index(ipr, namespace, route.dev)
    via = f" via {route.via}" if route.via else ""
    dev = f" dev {route.dev}" if route.dev else ""
    with step(f"adding route {route.dst_text}{via}{dev} in {namespace}"):
        ipr.route("add", **kwargs)


def run_in(namespace: str, cmd: Sequence[str], *, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ns_argv(namespace, cmd), capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)


def _checked(namespace: str, cmd: Sequence[str], what: str) -> None:
    try:
        res = run_in(namespace, cmd)
    except FileNotFoundError as exc:
        raise LabError(f"{what}: {exc.filename} not found; install iproute2/ethtool/procps") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what}: '{' '.join(cmd)}' timed out") from exc
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip()
        raise LabError(f"{what}: '{' '.join(cmd)}' exited {res.returncode}: {detail}")


def write_sysctl(namespace: str, key: str, value: str) -> None:
    """Write a net.* sysctl inside ``namespace`` (the topology parser only lets net.* keys through)."""
    if not key.startswith("net."):
        raise LabError(f"refusing sysctl {key}: only per-namespace net.* sysctls are set by the lab")
    _checked(namespace, ["sysctl", "-q", "-w", f"{key}={value}"],
             f"setting sysctl {key}={value} in {namespace}")


def set_offloads(namespace: str, ifname: str, *, tx_checksum: bool, gro: bool | None) -> None:
    """`ethtool -K ifname tx on|off [gro on|off]` inside ``namespace``."""
    args = ["ethtool", "-K", ifname, "tx", "on" if tx_checksum else "off"]
    if gro is not None:
        args += ["gro", "on" if gro else "off"]
    _checked(namespace, args, f"setting offloads on {namespace}:{ifname}")

