"""Shared pytest set-up: root gating for `lab`/`bpf` tests and netns lab fixtures.

Fixtures:
    lab           function scope: the default topology, up, unique prefix; torn down even on failure
    lab_factory   function scope: lab_factory(topology="default", prefix=None, up=True) -> Lab
    lab_session   session scope: remembers every prefix built in this session and removes any
                  namespace of those prefixes left over at the end (the last line of defence)
"""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from natd_lab import Lab, Topology

ROOT_MARKERS = {
    "lab": "needs root: lab tests create network namespaces and veths; run as root "
           "(sudo .venv/bin/pytest -m lab)",
    "bpf": "needs root: bpf tests compile and load BPF programs; run as root (sudo .venv/bin/pytest -m bpf)",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    for item in items:
        for name, reason in ROOT_MARKERS.items():
            if item.get_closest_marker(name) is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


class LabSession:
    """Every lab prefix this pytest session built, so the session can clean up whatever is left."""

    def __init__(self) -> None:
        self.prefixes: list[str] = []
        self._old_sigterm: Any = None

    def track(self, lab_or_prefix: Lab | str) -> None:
        """Remember a prefix (also one built outside Lab, e.g. by the CLI) for the session clean-up."""
        prefix = lab_or_prefix if isinstance(lab_or_prefix, str) else lab_or_prefix.prefix
        if prefix not in self.prefixes:
            self.prefixes.append(prefix)
        self._catch_sigterm()

    def _catch_sigterm(self) -> None:
        """SIGTERM would kill pytest without finalizers; make it a KeyboardInterrupt so teardown runs."""
        if self._old_sigterm is not None:
            return

        owner = os.getpid()

        def handler(signum: int, frame: FrameType | None) -> None:
            # pyroute2 forks helpers (netns sockets) that inherit this handler and get SIGTERMed when
            # done: a child must just exit, not unwind a copy of pytest and tear down the labs.
            if os.getpid() != owner:
                os._exit(0)
            raise KeyboardInterrupt("SIGTERM")

        try:
            self._old_sigterm = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old_sigterm = signal.SIG_DFL

    def finish(self) -> None:
        from natd_lab import cleanup_prefix

        leftovers = {p: cleanup_prefix(p) for p in self.prefixes}
        self.prefixes.clear()
        if self._old_sigterm is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        left = {p: ns for p, ns in leftovers.items() if ns}
        if left:
            warnings.warn(f"lab namespaces were left behind by their tests and removed at session end: "
                          f"{left}", RuntimeWarning, stacklevel=1)


@pytest.fixture(scope="session")
def lab_session(request: pytest.FixtureRequest) -> LabSession:
    session = LabSession()
    request.addfinalizer(session.finish)
    return session


LabFactory = Callable[..., "Lab"]


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest, lab_session: LabSession) -> LabFactory:
    """Build labs from any topology; each is torn down by a finalizer, also when the test fails.

    lab_factory(topology: str | Path | Topology = "default", prefix: str | None = None, up: bool = True)
    """
    from natd_lab import Lab

    def make(topology: str | Path | Topology = "default", prefix: str | None = None, up: bool = True) -> Lab:
        lab = Lab(topology, prefix=prefix)
        lab_session.track(lab)
        request.addfinalizer(lab.down)  # registered before up(): a half-built lab is removed too
        if up:
            lab.up()
        return lab

    return make


@pytest.fixture
def lab(lab_factory: LabFactory) -> Iterator[Lab]:
    """The default topology, up, with a unique prefix (host1, host2, gw, inet, srv1, srv2)."""
    yield lab_factory("default")


# --- natd on a lab gateway -----------------------------------------------------------------------------

DEFAULT_NATD_CONFIG: dict[str, Any] = {
    "inside": ["in1", "in2"],
    "outside": "out0",
    "snat": [{"from": "10.0.0.0/16", "ports": "20000-29999"}],
}


def _natd_config(**overrides: Any) -> dict[str, Any]:
    import copy

    cfg = copy.deepcopy(DEFAULT_NATD_CONFIG)
    cfg.update(overrides)
    return cfg


@pytest.fixture
def natd_factory(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """natd_factory(lab, config=None, start=True, node="gw") -> NatdInLab; stopped and uninstalled by a
    finalizer."""
    from natd_lab.natd import NatdInLab

    def make(lab: Lab, config: dict[str, Any] | None = None, start: bool = True,
             node: str = "gw") -> NatdInLab:
        natd = NatdInLab(lab, config if config is not None else _natd_config(), node=node)
        request.addfinalizer(natd.close)
        if start:
            natd.start()
        return natd

    return make


@pytest.fixture(scope="module")
def nat_lab(request: pytest.FixtureRequest, lab_session: LabSession) -> Iterator[tuple[Lab, Any]]:
    """One default lab with natd running on gw, shared by a module's tests (a compile takes ~3 s)."""
    from natd_lab import Lab
    from natd_lab.natd import NatdInLab

    lab = Lab("default")
    lab_session.track(lab)
    request.addfinalizer(lab.down)
    lab.up()
    natd = NatdInLab(lab, _natd_config())
    request.addfinalizer(natd.close)
    natd.start()
    yield lab, natd
