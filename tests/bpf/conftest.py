"""Fixtures of the bpf tier.

    natd_dp   session scope: a lab (tests/bpf/datapath.yaml) with PERMANENT neighbours on gw, the datapath
              compiled and pinned under /sys/fs/bpf/natd-test-<random>/, the rules of harness.RULES_YAML
              applied. Everything (pins, namespaces) is removed at teardown, also when tests fail.
    dp        function scope: natd_dp with an empty conntrack table (flows of earlier tests deleted).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from natd.config import parse_config
from natd.maps import LAYOUT_VERSION
from natd.rules import build_ruleset
from natd.tables import PinnedTables, pin_dir

from .harness import BPFFS, CT_MAX, GW_OUT, HOST1, NEXT_HOP, RULES_YAML, TOPOLOGY, NatDatapath


def _neighbours(lab: Any) -> dict[str, str]:
    """PERMANENT neighbours on gw with the peers' real MACs, so bpf_fib_lookup returns SUCCESS.

    netops.rtnl, not Lab.ipr: pyroute2 forks a child to open the netns socket and SIGTERMs it afterwards;
    rtnl blocks SIGTERM around that, so the child never runs the session's SIGTERM handler (which raises
    KeyboardInterrupt and would unwind a copy of pytest, finalizers and lab teardown included, in the child).
    """
    from natd_lab import netops

    macs: dict[str, str] = {}
    for node, ifname in (("host1", "eth0"), ("inet", "gw0"), ("host2", "eth0"), ("gw", "in1"), ("gw", "in2"),
                         ("gw", "out0")):
        key = ifname if node == "gw" else node
        with netops.rtnl(lab.ns(node)) as ipr:
            link = ipr.get_links(netops.link_index(ipr, lab.ns(node), ifname))[0]
            macs[key] = link.get_attr("IFLA_ADDRESS")
    with netops.rtnl(lab.ns("gw")) as ipr:
        for dst, ifname, node in ((HOST1, "in1", "host1"), (NEXT_HOP, "out0", "inet")):
            ipr.neigh("replace", dst=dst, lladdr=macs[node], state="permanent",
                      ifindex=netops.link_index(ipr, lab.ns("gw"), ifname))
    return macs


def _remove_pin_root(pin_root: str) -> None:
    """Unpin every map under pin_root (<pin_root>/<instance>/v<layout>/<map>) and remove the directories."""
    shutil.rmtree(pin_root)  # unlinking a pin unpins the map


@pytest.fixture(scope="session")
def natd_dp(lab_session: Any) -> Iterator[NatDatapath]:
    from natd_lab import Lab

    from natd.loader import Datapath, ensure_bpffs

    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab = Lab(TOPOLOGY)
    lab_session.track(lab)
    pin_root = f"{BPFFS}/natd-test-{secrets.token_hex(4)}"
    directory = pin_dir(pin_root, "bpftest", LAYOUT_VERSION)
    netns_fd = -1
    datapath = None
    tables = None
    try:
        # Compile and load first: a fatal LLVM error (e.g. the 512-byte stack exceeded) exits this process
        # from inside BCC, past every finalizer, and must not leave a lab behind.
        ensure_bpffs(pin_root)
        with warnings.catch_warnings():  # BCC warns about str (not bytes) source text and names
            warnings.simplefilter("ignore", DeprecationWarning)
            datapath = Datapath.load(directory, CT_MAX)
        lab.up()
        macs = _neighbours(lab)
        ifindex = {name: lab.ifindex("gw", name) for name in ("in1", "in2", "out0")}
        netns_fd = os.open(lab.ns_path("gw"), os.O_RDONLY)
        tables = PinnedTables(directory)
        config = parse_config(RULES_YAML, source="tests/bpf/conftest.py")
        tables.apply_rules(build_ruleset(config, ipaddress.IPv4Address(GW_OUT), [ifindex["out0"]]))
        tables.ensure_nat_secret()  # as natd does at start
        yield NatDatapath(lab, datapath, tables, netns_fd, ifindex, macs, directory)
    finally:
        if tables is not None:
            tables.close()
        if datapath is not None:
            with contextlib.suppress(Exception):
                datapath.bpf.cleanup()
        if os.path.isdir(pin_root):
            _remove_pin_root(pin_root)
        if netns_fd >= 0:
            os.close(netns_fd)
        lab.down()


@pytest.fixture
def dp(natd_dp: NatDatapath) -> NatDatapath:
    natd_dp.clear_flows()
    return natd_dp
