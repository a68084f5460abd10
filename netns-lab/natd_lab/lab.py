"""Build, use and tear down a lab: one network namespace per node, veth pairs between them.

    lab = Lab(load_topology("default"))      # prefix None -> unique "nl" + 6 characters
    with lab:                                # up() ... down(), also on exceptions
        lab.exec("host1", ["ping", "-c1", lab.addr("gw", "in1")])

Teardown always runs: on ``with`` exit, from ``atexit`` while a lab is up, and ``down()`` is idempotent
and removes every namespace of the prefix, even after ``up()`` failed half way.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import os
import shlex
import subprocess
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import netops, registry
from .errors import ExecError, ExecTimeout, LabBuildError, LabError
from .topology import Endpoint, Topology, load_topology, parse_topology

Command = Sequence[str] | str


class Lab:
    """A lab built from a ``Topology``. See the module docstring and netns-lab/README.md."""

    def __init__(self, topology: Topology | str | Path, prefix: str | None = None) -> None:
        self.topology = topology if isinstance(topology, Topology) else load_topology(topology)
        self.prefix = registry.check_prefix(prefix) if prefix is not None else registry.new_prefix()
        self._procs: list[subprocess.Popen[Any]] = []
        self._state = "new"  # new -> building -> up -> down
        self._atexit_registered = False
        self.build_seconds: float | None = None

    # ------------------------------------------------------------------------------------ naming

    def __repr__(self) -> str:
        return f"Lab(topology={self.topology.name!r}, prefix={self.prefix!r}, state={self._state!r})"

    @property
    def nodes(self) -> list[str]:
        return list(self.topology.nodes)

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(n) for n in self.topology.nodes]

    @property
    def is_up(self) -> bool:
        return self._state == "up"

    def _node(self, node: str) -> str:
        if node not in self.topology.nodes:
            raise LabError(f"lab {self.prefix} has no node {node!r}; nodes: {', '.join(self.nodes)}")
        return node

    def ns(self, node: str) -> str:
        """Namespace name of ``node``: '<prefix>-<node>'."""
        return registry.ns_name(self.prefix, self._node(node))

    def ns_path(self, node: str) -> str:
        """/run/netns/<prefix>-<node>: open it and setns() to enter the node (e.g. from a daemon)."""
        return str(registry.NETNS_DIR / self.ns(node))

    def endpoint(self, node: str, ifname: str) -> Endpoint:
        return self.topology.endpoint(self._node(node), ifname)

    def peer(self, node: str, ifname: str) -> tuple[str, str]:
        """(node, ifname) at the other end of the veth ``node:ifname``."""
        p = self.topology.peer(self._node(node), ifname)
        return p.node, p.ifname

    def addr(self, node: str, ifname: str | None = None) -> str:
        """First address (no prefix length) of ``node``, or of its interface ``ifname``."""
        if ifname is not None:
            ends = [self.endpoint(node, ifname)]
        else:
            ends = self.topology.endpoints(self._node(node))
        for e in ends:
            if e.addrs:
                return str(e.addrs[0].ip)
        where = f"{node}:{ifname}" if ifname else f"node {node}"
        raise LabError(f"{where} has no address in topology {self.topology.name}")

    # ------------------------------------------------------------------------------------ life cycle

    def __enter__(self) -> Lab:
        if not self.is_up:
            self.up()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def up(self) -> Lab:
        """Build the lab. On any failure (or Ctrl-C) everything built is removed and LabBuildError raised."""
        if self._state == "up":
            return self
        if self._state != "new":
            raise LabError(f"lab {self.prefix} was already {self._state}; make a new Lab() to build again")
        if os.geteuid() != 0:
            raise LabError("building a lab needs root (network namespaces, veths); run as root / with sudo")
        clash = registry.namespaces_of(self.prefix)
        if clash:
            raise LabError(f"prefix {self.prefix} is in use (namespaces: {', '.join(clash)}); "
                           f"choose another prefix or run: natd-lab down {self.prefix}")
        registry.claim_prefix(self.prefix, self._state_data("building"))  # raises if the prefix is taken
        self._state = "building"
        self._register_atexit()
        started = time.monotonic()
        try:
            self._build()
            self._write_state("up")
        except BaseException as exc:
            self.down()
            if isinstance(exc, Exception):
                raise LabBuildError(f"building lab {self.prefix} (topology {self.topology.name}) failed, "
                                    f"everything built was removed again: {exc}") from exc
            raise
        self._state = "up"
        self.build_seconds = time.monotonic() - started
        return self

    def _build(self) -> None:
        topo = self.topology
        for node in topo.nodes:
            netops.create_namespace(self.ns(node))
        for node, spec in topo.nodes.items():
            ns = self.ns(node)
            with netops.rtnl(ns) as ipr:
                netops.set_link(ipr, ns, "lo", up=True)
            for key, value in spec.sysctls.items():
                netops.write_sysctl(ns, key, value)
        for link in topo.links:
            a_ns, b_ns = self.ns(link.a.node), self.ns(link.b.node)
            with netops.rtnl(a_ns) as ipr:
                netops.add_veth(ipr, a_ns, link.a.ifname, b_ns, link.b.ifname)
        for node in topo.nodes:
            ns = self.ns(node)
            with netops.rtnl(ns) as ipr:
                for e in topo.endpoints(node):
                    mtu = next(lk.mtu for lk in topo.links if lk.peer(node, e.ifname) is not None)
                    netops.set_link(ipr, ns, e.ifname, mtu=mtu)
                    for a in e.addrs:
                        netops.add_address(ipr, ns, e.ifname, a)
                    netops.set_link(ipr, ns, e.ifname, up=True)
        for e in topo.endpoints():
            peer = topo.peer(e.node, e.ifname)
            netops.set_offloads(self.ns(e.node), e.ifname, tx_checksum=False,
                                gro=True if topo.nodes[peer.node].is_gateway else None)
        for node, routes in topo.routes.items():
            ns = self.ns(node)
            with netops.rtnl(ns) as ipr:
                for r in routes:
                    netops.add_route(ipr, ns, r)

    def down(self) -> None:
        """Stop every process started with popen() and remove every namespace of this prefix. Idempotent.

        A Lab that never started up() (or whose up() found the prefix taken) owns nothing and removes nothing.
        """
        self._stop_processes()
        if self._state == "new":
            return
        for name in registry.namespaces_of(self.prefix):
            if pids := registry.pids_in_namespace(name):
                warnings.warn(f"lab {self.prefix}: processes not started by this Lab still run in {name} "
                              f"(PIDs {', '.join(map(str, pids))}); the namespace is removed but lives on "
                              "until they exit", RuntimeWarning, stacklevel=2)
        registry.cleanup_prefix(self.prefix)
        self._state = "down"
        self._unregister_atexit()

    def detach(self) -> None:
        """Leave the lab up after this process exits (no atexit teardown); `natd-lab down` removes it."""
        self._unregister_atexit()
        self._procs.clear()

    @classmethod
    def attach(cls, prefix: str) -> Lab:
        """A Lab object for a lab that is already up (e.g. made by `natd-lab up`), from its state file.

        It does not tear the lab down at exit; call down() to remove it.
        """
        state = registry.read_state(registry.check_prefix(prefix))
        if state is None:
            raise LabError(f"no natd lab {prefix!r} (no state file {registry.state_path(prefix)}); "
                           "see: natd-lab status")
        topo = parse_topology(state.get("topology_data"), source=str(state.get("topology_source", prefix)))
        lab = cls(topo, prefix=prefix)
        lab._state = "up" if state.get("status") == "up" else str(state.get("status", "unknown"))
        return lab

    def _write_state(self, status: str) -> None:
        registry.write_state(self.prefix, self._state_data(status))

    def _state_data(self, status: str) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "status": status,
            "topology": self.topology.name,
            "topology_source": self.topology.source,
            "topology_data": dict(self.topology.raw),
            "namespaces": self.namespaces,
            "pid": os.getpid(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True

    def _unregister_atexit(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self._atexit)
            self._atexit_registered = False

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self.down()

    def _stop_processes(self, grace: float = 3.0) -> None:
        procs, self._procs = self._procs, []
        running = [p for p in procs if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()  # SIGTERM to p.pid only
        deadline = time.monotonic() + grace
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()  # SIGKILL to p.pid only
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=2.0)

    # ------------------------------------------------------------------------------------ running things

    def _argv(self, node: str, cmd: Command) -> list[str]:
        argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
        if not argv:
            raise LabError("empty command")
        return argv

    def exec(self, node: str, cmd: Command, *, timeout: float = 10.0, check: bool = True,
             input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in ``node``'s namespace and wait; output captured as text.

        ``env`` adds variables to this process's environment; ``input`` is fed to stdin.
        check=True raises ExecError (a CalledProcessError) on a non-zero exit; a timeout kills the command
        and raises ExecTimeout (a TimeoutExpired).
        """
        argv = self._argv(node, cmd)
        ns = self.ns(node)
        try:
            res = subprocess.run(netops.ns_argv(ns, argv), capture_output=True, text=True, timeout=timeout,
                                 input=input, env={**os.environ, **env} if env else None, check=False,
                                 stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise ExecTimeout(node, ns, argv, timeout, exc.stdout, exc.stderr) from None
        if check and res.returncode != 0:
            raise ExecError(node, ns, argv, res.returncode, res.stdout, res.stderr)
        return subprocess.CompletedProcess(argv, res.returncode, res.stdout, res.stderr)

    def popen(self, node: str, cmd: Command, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in ``node``'s namespace. down() terminates it (SIGTERM, then SIGKILL, by PID)."""
        argv = netops.ns_argv(self.ns(node), self._argv(node, cmd))
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, **popen_kwargs)
        self._procs.append(proc)
        return proc

    # ------------------------------------------------------------------------------------ links

    def ifindex(self, node: str, ifname: str) -> int:
        ns = self.ns(node)
        with netops.rtnl(ns) as ipr:
            return netops.link_index(ipr, ns, ifname)

    def set_link(self, node: str, ifname: str, *, up: bool | None = None, mtu: int | None = None) -> None:
        """Bring ``node:ifname`` up/down and/or change its MTU (for fault tests)."""
        ns = self.ns(node)
        with netops.rtnl(ns) as ipr:
            netops.set_link(ipr, ns, ifname, up=up, mtu=mtu)

    def ipr(self, node: str) -> Any:
        """A pyroute2 IPRoute bound to ``node``'s namespace; the caller closes it (use ``with``)."""
        from pyroute2 import IPRoute

        return IPRoute(netns=self.ns(node), flags=0)
