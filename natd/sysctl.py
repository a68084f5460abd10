"""The few kernel settings natd reads or sets in the gateway's own network namespace (/proc injectable)."""

from __future__ import annotations

import logging
import os

from natd.errors import EnvironmentError_

log = logging.getLogger("natd.sysctl")


def read_local_port_range(proc: str = "/proc") -> tuple[int, int]:
    """net.ipv4.ip_local_port_range: where the gateway's own connections take their source ports."""
    with open(f"{proc}/sys/net/ipv4/ip_local_port_range") as fh:
        lo, hi = fh.read().split()
    return int(lo), int(hi)


def enable_accept_local(ifname: str, proc: str = "/proc") -> bool:
    """Let the kernel forward an already-translated packet (source = the gateway's own address) that
    arrives on an inside interface. XDP hands such a packet to the kernel when the next hop's MAC is
    not resolved yet (bpf_fib_lookup says NO_NEIGH), or when it is too big for the outside link without
    DF (the kernel fragments it, RFC 4787 REQ-13a); without accept_local the kernel drops it as a
    martian source. Only traffic spoofing the gateway's own address is affected otherwise.
    Returns True when natd changed the setting."""
    path = f"{proc}/sys/net/ipv4/conf/{ifname}/accept_local"
    try:
        with open(path) as fh:
            if fh.read().strip() == "1":
                return False
        with open(path, "w") as fh:
            fh.write("1")
    except OSError as exc:
        raise EnvironmentError_(f"cannot set {path} to 1: {os.strerror(exc.errno or 0)}") from exc
    log.info("set net.ipv4.conf.%s.accept_local=1 (first packets of a flow while ARP resolves)", ifname)
    return True
