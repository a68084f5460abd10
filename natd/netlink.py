"""Interfaces and addresses of the gateway, through pyroute2 (netlink; no shelling out to ip)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from natd.errors import InterfaceError


class Interfaces:
    """Read-only view of the current network namespace's links."""

    def __init__(self, ipr: Any = None) -> None:
        if ipr is None:
            from pyroute2 import IPRoute

            ipr = IPRoute()
        self._ipr = ipr

    def close(self) -> None:
        self._ipr.close()

    def names(self) -> list[str]:
        return sorted(str(link.get_attr("IFLA_IFNAME")) for link in self._ipr.get_links())

    def ifindex(self, name: str) -> int:
        found = self._ipr.link_lookup(ifname=name)
        if not found:
            raise InterfaceError(f"interface {name} not found; interfaces: {', '.join(self.names())}")
        return int(found[0])

    def ipv4_addrs(self, name: str | None = None) -> list[ipaddress.IPv4Address]:
        kwargs: dict[str, Any] = {"family": socket.AF_INET}
        if name is not None:
            kwargs["index"] = self.ifindex(name)
        return [ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS")) for a in self._ipr.get_addr(**kwargs)]

    def is_up(self, name: str) -> bool:
        links = self._ipr.get_links(self.ifindex(name))
        return bool(links and links[0]["flags"] & 1)
