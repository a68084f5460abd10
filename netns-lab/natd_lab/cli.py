"""natd-lab: build, inspect and remove natd test labs (network namespaces + veths).

Exit codes: 0 ok, 1 failure (build failed, no such lab, not root), 2 bad usage (arguments, unknown
topology name or node). `exec` passes the command's own exit code through.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from . import netops, registry
from .errors import LabError, TopologyError
from .lab import Lab
from .topology import available_topologies, load_topology, resolve_topology_path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

EPILOG = """\
examples:
  natd-lab up                              # default topology, unique prefix; prints the prefix
  natd-lab up --topology default --prefix nlab1
  natd-lab status                          # every lab on this machine
  natd-lab status nlab1                    # nodes, interfaces, addresses of one lab
  natd-lab exec nlab1 host1 -- ping -c1 10.0.1.1
  natd-lab down nlab1
  natd-lab down --all                      # every natd lab (state file or auto 'nl' prefix)
  natd-lab check netns-lab/topologies/default.yaml

exit codes: 0 ok, 1 failure, 2 bad usage; exec passes the command's exit code through
"""


class UsageError(Exception):
    """Bad arguments: exit 2."""


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise LabError(f"natd-lab {what} needs root (network namespaces); run it with sudo")


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so `finally`/`except` teardown runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace) -> int:
    try:
        topo = load_topology(args.topology)
    except TopologyError as exc:
        if "unknown topology" in exc.message or "no such topology file" in exc.message:
            raise UsageError(str(exc)) from exc
        raise
    if args.prefix is not None:
        try:
            registry.check_prefix(args.prefix)
        except LabError as exc:
            raise UsageError(str(exc)) from exc
    _need_root("up")
    lab = Lab(topo, prefix=args.prefix)
    try:
        with _signals_raise():
            lab.up()
    except KeyboardInterrupt:
        with _signals_ignored():
            lab.down()
        print(f"natd-lab: interrupted; lab {lab.prefix} removed again", file=sys.stderr)
        return 130
    lab.detach()
    if args.json:
        print(json.dumps(_lab_summary(lab), indent=2))
    else:
        print(lab.prefix)
        print(_describe(lab), file=sys.stderr if args.quiet else sys.stdout)
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    if args.all == (args.prefix is not None):
        raise UsageError("give a PREFIX or --all (not both)")
    _need_root("down")
    prefixes = list(registry.list_labs()) if args.all else [args.prefix]
    if not args.all:
        try:
            registry.check_prefix(args.prefix)
        except LabError as exc:
            raise UsageError(str(exc)) from exc
        if not registry.namespaces_of(args.prefix) and registry.read_state(args.prefix) is None:
            print(f"natd-lab: no lab {args.prefix}; nothing to do", file=sys.stderr)
            return EXIT_OK
        if not registry.is_lab_prefix(args.prefix) and not args.force:
            found = registry.namespaces_of(args.prefix)
            where = f"; namespaces {', '.join(found)}" if found else ""
            raise LabError(f"{args.prefix} is not a natd lab (no state file "
                           f"{registry.state_path(args.prefix)}{where}); "
                           "add --force to remove its '<prefix>-*' namespaces anyway")
    if not prefixes:
        print("no natd labs; nothing to do")
    with _signals_ignored():
        for prefix in prefixes:
            removed = registry.cleanup_prefix(prefix)
            names = f" ({', '.join(removed)})" if removed else ""
            print(f"{prefix}: removed {len(removed)} namespaces{names}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    labs = registry.list_labs()
    if args.prefix is None:
        rows = [_short_status(p, ns) for p, ns in labs.items()]
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("no natd labs")
        else:
            for r in rows:
                print(f"{r['prefix']:<12} {r['status']:<9} {r['topology']:<12} "
                      f"{len(r['namespaces'])} namespaces  created {r['created']}  pid {r['pid']}")
        return EXIT_OK
    if args.prefix not in labs:
        raise LabError(f"no natd lab {args.prefix!r}; labs: {', '.join(labs) or 'none'}")
    info = _short_status(args.prefix, labs[args.prefix])
    try:
        lab = Lab.attach(args.prefix)
    except LabError:
        lab = None
    if args.json:
        info["nodes"] = _live_interfaces(lab) if lab else {}
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"lab {info['prefix']}: {info['status']}, topology {info['topology']}, created {info['created']}")
    if lab is None:
        print("  (no readable state file; namespaces: " + ", ".join(info["namespaces"]) + ")")
        return EXIT_OK
    for node, ifaces in _live_interfaces(lab).items():
        print(f"  {node:<8} netns {lab.ns(node)}")
        for i in ifaces:
            print(f"    {i['ifname']:<10} {i['state']:<5} {' '.join(i['addrs'])}")
    return EXIT_OK


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given; e.g. natd-lab exec PREFIX host1 -- ping -c1 10.0.1.1")
    try:
        registry.check_prefix(args.prefix)
    except LabError as exc:
        raise UsageError(str(exc)) from exc
    _need_root("exec")
    ns = registry.ns_name(args.prefix, args.node)
    if not (registry.NETNS_DIR / ns).exists():
        nodes = [n.split("-", 1)[1] for n in registry.namespaces_of(args.prefix)]
        if not nodes:
            raise LabError(f"no natd lab {args.prefix!r} is up; see: natd-lab status")
        raise UsageError(f"lab {args.prefix} has no node {args.node!r}; nodes: {', '.join(nodes)}")
    proc = subprocess.Popen(netops.ns_argv(ns, cmd))
    with _signals_ignored():  # the command gets the terminal's Ctrl-C itself; we wait for its exit code
        rc = proc.wait()
    return rc if rc >= 0 else 128 - rc


def cmd_check(args: argparse.Namespace) -> int:
    try:
        resolve_topology_path(args.topology)
    except TopologyError as exc:
        raise UsageError(str(exc)) from exc
    topo = load_topology(args.topology)
    print(f"{topo.source}: ok: topology {topo.name}, {len(topo.nodes)} nodes, {len(topo.links)} links, "
          f"{sum(len(r) for r in topo.routes.values())} routes")
    return EXIT_OK


# --------------------------------------------------------------------------------------------- output


def _short_status(prefix: str, namespaces: list[str]) -> dict[str, Any]:
    state = registry.read_state(prefix) or {}
    status = state.get("status", "orphan")
    if state and not namespaces:
        status = "stale"
    elif status == "building" and not _pid_alive(state.get("pid")):
        status = "broken"  # its builder died half way: natd-lab down PREFIX
    return {"prefix": prefix, "status": status, "topology": state.get("topology", "?"),
            "created": state.get("created", "?"), "pid": state.get("pid", "?"), "namespaces": namespaces}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_interfaces(lab: Lab) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for node in lab.nodes:
        rows: list[dict[str, Any]] = []
        try:
            with lab.ipr(node) as ipr:
                addrs: dict[int, list[str]] = {}
                for a in ipr.get_addr():
                    addrs.setdefault(a["index"], []).append(f"{a.get('address')}/{a['prefixlen']}")
                for link in ipr.get_links():
                    rows.append({"ifname": link.get("ifname"), "index": link["index"],
                                 "state": link.get("state", "?"), "mtu": link.get("mtu"),
                                 "addrs": addrs.get(link["index"], [])})
        except Exception as exc:  # a half-removed lab: report, do not crash status
            rows.append({"ifname": "?", "index": 0, "state": "error", "mtu": None, "addrs": [str(exc)]})
        out[node] = rows
    return out


def _lab_summary(lab: Lab) -> dict[str, Any]:
    topo = lab.topology
    return {
        "prefix": lab.prefix,
        "topology": topo.name,
        "nodes": {n: {"netns": lab.ns(n), "role": topo.nodes[n].role,
                      "interfaces": {e.ifname: [str(a) for a in e.addrs] for e in topo.endpoints(n)}}
                  for n in lab.nodes},
        "build_seconds": lab.build_seconds,
    }


def _describe(lab: Lab) -> str:
    topo = lab.topology
    lines = [f"lab {lab.prefix} is up: topology {topo.name}, {len(topo.nodes)} nodes, {len(topo.links)} links"
             f" (built in {lab.build_seconds or 0:.2f} s)"]
    for n in lab.nodes:
        ifs = ", ".join(f"{e.ifname} {' '.join(str(a) for a in e.addrs) or '-'}" for e in topo.endpoints(n))
        lines.append(f"  {n:<8} {topo.nodes[n].role:<8} netns {lab.ns(n):<16} {ifs}")
    lines.append(f"run in a node:  natd-lab exec {lab.prefix} NODE -- CMD...")
    lines.append(f"remove it:      natd-lab down {lab.prefix}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="natd-lab", description="Build natd test labs from network namespaces "
                                "and veth pairs.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="build a lab and leave it up; prints its prefix")
    up.add_argument("--topology", "-t", default="default",
                    help=f"name in netns-lab/topologies/ ({', '.join(available_topologies())}) or a path")
    up.add_argument("--prefix", "-p", help="namespace name prefix (default: unique 'nl' + 6 characters)")
    up.add_argument("--json", action="store_true", help="print a JSON summary")
    up.add_argument("--quiet", "-q", action="store_true", help="print only the prefix on stdout")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="remove a lab (or --all)")
    down.add_argument("prefix", nargs="?", metavar="PREFIX")
    down.add_argument("--all", action="store_true", help="remove every natd lab on this machine")
    down.add_argument("--force", action="store_true",
                      help="remove PREFIX-* namespaces even without a state file")
    down.set_defaults(func=cmd_down)

    st = sub.add_parser("status", help="list labs, or show one lab's nodes and interfaces")
    st.add_argument("prefix", nargs="?", metavar="PREFIX")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    ex = sub.add_parser("exec", help="run a command in a node's namespace: exec PREFIX NODE -- CMD...")
    ex.add_argument("prefix", metavar="PREFIX")
    ex.add_argument("node", metavar="NODE")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    ex.set_defaults(func=cmd_exec)

    ck = sub.add_parser("check", help="validate a topology file (no root needed)")
    ck.add_argument("topology", metavar="TOPOLOGY", help="name or path")
    ck.set_defaults(func=cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage
    try:
        rc: int = args.func(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"natd-lab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LabError as exc:
        print(f"natd-lab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
