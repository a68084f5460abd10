"""netns-lab: topology parsing (unit) and lab building/teardown (lab, needs root)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from natd_lab import (
    ExecError,
    Lab,
    LabBuildError,
    LabError,
    TopologyError,
    cleanup_prefix,
    list_labs,
    load_topology,
    new_prefix,
    parse_topology,
    read_state,
)
from natd_lab import cli as lab_cli
from natd_lab.registry import NETNS_DIR, namespaces_of, write_state

unit = pytest.mark.unit
needs_lab = pytest.mark.lab

PING_OK = ["ping", "-c1", "-W1"]
PING_FAIL = ["ping", "-c1", "-W0.5"]  # for pings that are expected to fail: do not wait long


def base_topology() -> dict[str, Any]:
    return {
        "name": "t",
        "nodes": {"a": {}, "r": {"role": "gateway", "sysctls": {"net.ipv4.ip_forward": 1}}},
        "links": [{"a": "a:eth0", "a_addr": "10.9.0.2/24", "b": "r:eth0", "b_addr": "10.9.0.1/24"}],
        "routes": {"a": [{"dst": "default", "via": "10.9.0.1"}]},
    }


# ============================================================================================= unit


@unit
def test_default_topology_is_the_documented_one() -> None:
    topo = load_topology("default")
    assert list(topo.nodes) == ["host1", "host2", "gw", "inet", "srv1", "srv2"]
    assert topo.nodes["gw"].role == "gateway"
    assert topo.nodes["gw"].sysctls == {"net.ipv4.ip_forward": "1"}
    assert topo.nodes["inet"].sysctls == {"net.ipv4.ip_forward": "1"}
    links = {(str(lk.a), str(lk.b)): ([str(x) for x in lk.a.addrs], [str(x) for x in lk.b.addrs])
             for lk in topo.links}
    assert links == {
        ("host1:eth0", "gw:in1"): (["10.0.1.42/24"], ["10.0.1.1/24"]),
        ("host2:eth0", "gw:in2"): (["10.0.2.80/24"], ["10.0.2.1/24"]),
        ("gw:out0", "inet:gw0"): (["203.0.113.1/29"], ["203.0.113.6/29"]),
        ("inet:srv1", "srv1:eth0"): (["198.51.100.1/24"], ["198.51.100.10/24"]),
        ("inet:srv2", "srv2:eth0"): (["203.0.113.81/28"], ["203.0.113.80/28"]),
    }
    routes = {n: [(r.dst_text, str(r.via)) for r in rs] for n, rs in topo.routes.items()}
    assert routes == {
        "host1": [("default", "10.0.1.1")], "host2": [("default", "10.0.2.1")],
        "gw": [("default", "203.0.113.6")], "srv1": [("default", "198.51.100.1")],
        "srv2": [("default", "203.0.113.81")], "inet": [("192.0.2.0/24", "203.0.113.1")],
    }
    assert topo.peer("gw", "out0").node == "inet"


PARSER_CASES: list[tuple[Callable[[dict[str, Any]], Any], str, str]] = [
    (lambda t: t.pop("nodes"), "nodes", "required"),
    (lambda t: t.update(extra=1), "extra", "unknown key"),
    (lambda t: t["nodes"]["r"].update(sysctl={}), "nodes.r.sysctl", "did you mean 'sysctls'"),
    (lambda t: t["nodes"]["r"].update(role="gatway"), "nodes.r.role", "did you mean 'gateway'"),
    (lambda t: t["nodes"].update({"Bad-Name": {}}), "nodes.Bad-Name", "node names"),
    (lambda t: t["nodes"]["r"].update(sysctls={"kernel.pid_max": 1}), "nodes.r.sysctls.kernel.pid_max",
     "net.*"),
    (lambda t: t["links"][0].update(a="x:eth0"), "links[0].a", "unknown node 'x'"),
    (lambda t: t["links"][0].update(a="a-eth0"), "links[0].a", "node:ifname"),
    (lambda t: t["links"][0].update(b="r:averyveryverylongname"), "links[0].b", "IFNAMSIZ"),
    (lambda t: t["links"][0].update(a_addr="10.9.0.2"), "links[0].a_addr", "prefix length"),
    (lambda t: t["links"][0].update(a_addr="10.9.0.300/24"), "links[0].a_addr", "not an address"),
    (lambda t: t["links"][0].update(b_addr="10.9.0.2/24"), "links[0].b_addr", "already assigned"),
    (lambda t: t["links"][0].update(mtu=20), "links[0].mtu", "68..65535"),
    (lambda t: t["links"].append(dict(t["links"][0], b="r:eth1", a_addr=None, b_addr=None)), "links[1].a",
     "already used"),
    (lambda t: t["routes"].update(zz=[]), "routes.zz", "unknown node"),
    (lambda t: t["routes"]["a"][0].update(via="10.8.0.1"), "routes.a[0].via", "not on a subnet"),
    (lambda t: t["routes"]["a"][0].update(dst="10.1.1.1/8"), "routes.a[0].dst", "host bits"),
    (lambda t: t["routes"]["a"][0].pop("via"), "routes.a[0]", "needs 'via'"),
    (lambda t: t["routes"]["a"][0].update(dev="eth9"), "routes.a[0].dev", "no interface 'eth9'"),
]


@unit
@pytest.mark.parametrize(("mutate", "key", "words"), PARSER_CASES,
                         ids=[f"{k}={w}" for _, k, w in PARSER_CASES])
def test_parser_errors_name_the_key(mutate: Callable[[dict[str, Any]], Any], key: str, words: str) -> None:
    topo = base_topology()
    mutate(topo)
    with pytest.raises(TopologyError) as info:
        parse_topology(topo, source="t.yaml")
    assert info.value.key == key
    assert words in str(info.value)
    assert str(info.value).startswith(f"t.yaml: {key}: ")


@unit
def test_load_topology_by_path_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(base_topology()))
    assert load_topology(path).name == "t"
    assert load_topology(str(path)).nodes["r"].is_gateway
    with pytest.raises(TopologyError, match=r"unknown topology 'nope'; known topologies: .*default"):
        load_topology("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology(bad)
    with pytest.raises(TopologyError, match="no such topology file"):
        load_topology(tmp_path / "missing.yaml")


@unit
def test_prefixes() -> None:
    topo = parse_topology(base_topology())
    auto = Lab(topo)
    assert re.fullmatch(r"nl[a-z0-9]{6}", auto.prefix)
    assert Lab(topo).prefix != auto.prefix
    assert Lab(topo, prefix="nlab12").ns("r") == "nlab12-r"
    for bad in ("Nlab", "n", "nl-ab", "nlabcdefghijk", "1ab"):
        with pytest.raises(LabError, match="bad lab prefix"):
            Lab(topo, prefix=bad)
    with pytest.raises(LabError, match=r"no node 'x'; nodes: a, r"):
        Lab(topo, prefix="nlab12").ns("x")
    lab = Lab(load_topology("default"), prefix="nlab12")
    assert lab.addr("host1") == "10.0.1.42"
    assert lab.addr("gw", "out0") == "203.0.113.1"
    assert lab.addr("gw") == "10.0.1.1"
    assert lab.peer("gw", "out0") == ("inet", "gw0")


@unit
def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        lab_cli.main(["bogus"])
    assert info.value.code == 2
    assert lab_cli.main(["down"]) == 2
    assert lab_cli.main(["down", "nlab1", "--all"]) == 2
    assert lab_cli.main(["check", "nope"]) == 2
    assert lab_cli.main(["exec", "nlab1", "host1"]) == 2
    assert lab_cli.main(["check", "default"]) == 0
    out = capsys.readouterr()
    assert "default: ok" not in out.err and "ok: topology default" in out.out
    with pytest.raises(SystemExit) as info:
        lab_cli.main(["--help"])
    assert info.value.code == 0
    assert "examples:" in capsys.readouterr().out


# ============================================================================================= lab


def ping(lab: Lab, node: str, dst: str, *, expect_ok: bool = True) -> bool:
    res = lab.exec(node, [*(PING_OK if expect_ok else PING_FAIL), dst], check=False)
    return res.returncode == 0


def icmp_in_echos(lab: Lab, node: str) -> int:
    lines = [ln.split() for ln in lab.exec(node, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InEchos")])


@needs_lab
def test_every_node_pings_its_next_hop(lab: Lab) -> None:
    for node, routes in lab.topology.routes.items():
        for r in routes:
            assert r.via is not None
            assert ping(lab, node, str(r.via)), f"{node} cannot ping its next hop {r.via}"


@needs_lab
def test_gateway_reaches_the_servers(lab: Lab) -> None:
    assert ping(lab, "gw", lab.addr("srv1"))
    assert ping(lab, "gw", lab.addr("srv2"))
    assert ping(lab, "host2", lab.addr("gw", "in2"))


@needs_lab
def test_without_nat_private_hosts_get_no_answers(lab: Lab) -> None:
    """Plain forwarding on gw, no NAT: the request reaches srv1, the reply has no way back to 10/8."""
    before = icmp_in_echos(lab, "srv1")
    assert not ping(lab, "host1", lab.addr("srv1"), expect_ok=False)
    assert icmp_in_echos(lab, "srv1") > before, "the request never reached srv1: forwarding is broken"
    res = lab.exec("inet", ["ip", "route", "get", lab.addr("host1")], check=False)
    assert res.returncode != 0 and "unreachable" in res.stderr.lower()
    assert ping(lab, "gw", lab.addr("srv1"))


@needs_lab
def test_offloads_lo_and_sysctls_are_applied(lab: Lab) -> None:
    root_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    for e in lab.topology.endpoints():
        feats = lab.exec(e.node, ["ethtool", "-k", e.ifname]).stdout
        assert re.search(r"^tx-checksumming: off", feats, re.M), f"{e}: tx checksum offload still on"
        gro_on = re.search(r"^generic-receive-offload: on", feats, re.M) is not None
        peer_is_gw = lab.topology.nodes[lab.peer(e.node, e.ifname)[0]].is_gateway
        if peer_is_gw:
            assert gro_on, f"{e}: peer is a gateway, GRO must be on for XDP_REDIRECT to deliver"
    for node in lab.nodes:
        assert "UP" in lab.exec(node, ["ip", "-br", "link", "show", "lo"]).stdout
        want = "1" if node in ("gw", "inet") else "0"
        assert lab.exec(node, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == want
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == root_forward


@needs_lab
def test_api_ifindex_set_link_exec_popen(lab: Lab) -> None:
    shown = json.loads(lab.exec("gw", ["ip", "-j", "link", "show", "in1"]).stdout)
    assert lab.ifindex("gw", "in1") == shown[0]["ifindex"]
    with pytest.raises(LabError, match="no interface 'nope' in namespace"):
        lab.ifindex("gw", "nope")

    lab.set_link("gw", "in1", up=False)
    assert not ping(lab, "host1", "10.0.1.1", expect_ok=False)
    lab.set_link("gw", "in1", up=True)
    assert any(ping(lab, "host1", "10.0.1.1") for _ in range(5))

    with pytest.raises(ExecError) as info:
        lab.exec("srv1", ["sh", "-c", "echo oops >&2; exit 3"])
    assert info.value.returncode == 3 and "srv1" in str(info.value) and "oops" in str(info.value)
    assert isinstance(info.value, subprocess.CalledProcessError)

    # TCP through the lab: a socat echo server in srv2 (popen), a client in gw.
    server = lab.popen("srv2", ["socat", "TCP-LISTEN:7007,reuseaddr,fork", "EXEC:cat"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(50):
        res = lab.exec("gw", ["socat", "-T2", "-", f"TCP:{lab.addr('srv2')}:7007"], input="hello\n",
                       check=False)
        if res.returncode == 0:
            break
        time.sleep(0.05)
    assert res.stdout == "hello\n", res.stderr
    assert server.poll() is None


@needs_lab
def test_down_stops_processes_and_leaves_nothing(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory("default")
    assert list_labs()[lab.prefix] == sorted(lab.namespaces)
    assert read_state(lab.prefix) is not None
    sleeper = lab.popen("srv1", ["sleep", "600"])
    lab.down()
    assert sleeper.poll() is not None, "popen'd process survived down()"
    assert namespaces_of(lab.prefix) == []
    assert read_state(lab.prefix) is None
    assert lab.prefix not in list_labs()
    lab.down()  # idempotent


@needs_lab
def test_failed_up_cleans_up(lab_factory: Callable[..., Lab]) -> None:
    """A route the parser accepts (dev given) but the kernel rejects: up() fails at its last step."""
    topo = base_topology()
    topo["routes"]["a"].append({"dst": "192.0.2.0/24", "via": "10.7.7.7", "dev": "eth0"})
    lab = lab_factory(parse_topology(topo), up=False)
    with pytest.raises(LabBuildError, match=r"adding route 192.0.2.0/24 via 10.7.7.7 dev eth0") as info:
        lab.up()
    assert "everything built was removed" in str(info.value)
    assert namespaces_of(lab.prefix) == [] and read_state(lab.prefix) is None

    topo = base_topology()
    topo["nodes"]["r"]["sysctls"]["net.ipv4.no_such_knob"] = 1
    lab = lab_factory(parse_topology(topo), up=False)
    with pytest.raises(LabBuildError, match=r"net\.ipv4\.no_such_knob"):
        lab.up()
    assert namespaces_of(lab.prefix) == []


@needs_lab
def test_prefix_clash_and_cleanup_prefix(lab_factory: Callable[..., Lab], lab_session: Any) -> None:
    first = lab_factory(parse_topology(base_topology()))
    second = Lab(parse_topology(base_topology()), prefix=first.prefix)
    with pytest.raises(LabError, match="is in use"):
        second.up()
    second.down()  # owns nothing: must not remove the first lab
    assert ping(first, "a", "10.9.0.1"), "the clash must not have touched the first lab"

    stale = new_prefix()
    lab_session.track(stale)
    write_state(stale, {"prefix": stale, "status": "building"})  # e.g. a builder killed with SIGKILL
    with pytest.raises(LabError, match=r"state file .* exists"):
        Lab(parse_topology(base_topology()), prefix=stale).up()
    assert stale in list_labs()
    assert cleanup_prefix(stale) == [] and stale not in list_labs()
    assert sorted(cleanup_prefix(first.prefix)) == sorted(first.namespaces)
    assert first.prefix not in list_labs()


def run_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "natd_lab", *args], capture_output=True, text=True,
                          timeout=30, check=False, **kwargs)


@needs_lab
def test_cli_up_status_exec_down(lab_session: Any) -> None:
    prefix = new_prefix()
    lab_session.track(prefix)
    try:
        res = run_cli("up", "--prefix", prefix, "--quiet")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == prefix
        status = json.loads(run_cli("status", prefix, "--json").stdout)
        assert status["status"] == "up" and len(status["namespaces"]) == 6
        assert "10.0.1.42/24" in {a for i in status["nodes"]["host1"] for a in i["addrs"]}
        assert run_cli("exec", prefix, "host1", "--", "ping", "-c1", "-W1", "10.0.1.1").returncode == 0
        assert run_cli("exec", prefix, "host1", "--", "sh", "-c", "exit 7").returncode == 7
        assert run_cli("exec", prefix, "nosuch", "--", "true").returncode == 2
        assert run_cli("up", "--prefix", prefix).returncode == 1  # in use
        assert Lab.attach(prefix).addr("gw", "out0") == "203.0.113.1"
        res = run_cli("down", prefix)
        assert res.returncode == 0, res.stderr
        assert namespaces_of(prefix) == []
        assert run_cli("down", prefix).returncode == 0  # nothing left: still fine
    finally:
        cleanup_prefix(prefix)


@needs_lab
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_interrupted_up_tears_down(tmp_path: Path, lab_session: Any, sig: signal.Signals) -> None:
    """A long chain topology; the signal arrives once namespaces exist, so it lands inside up()."""
    n = 24
    topo = {"name": "chain", "nodes": {f"n{i}": {} for i in range(n)},
            "links": [{"a": f"n{i}:r", "b": f"n{i + 1}:l"} for i in range(n - 1)]}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(topo))
    prefix = new_prefix()
    lab_session.track(prefix)
    proc = subprocess.Popen([sys.executable, "-m", "natd_lab", "up", "-t", str(path), "-p", prefix],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not any(NETNS_DIR.glob(f"{prefix}-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, (out, err)
        assert "removed again" in err
        assert namespaces_of(prefix) == [] and read_state(prefix) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup_prefix(prefix)


@unit
def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root"):
        Lab(parse_topology(base_topology())).up()
