"""Unit tests for natd.sdnotify against real AF_UNIX datagram sockets (a path and an abstract name)
standing in for systemd's notification socket: exact bytes, order, and failure behaviour."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from natd.sdnotify import Notifier

pytestmark = pytest.mark.unit


class Listener:
    """The systemd side: a bound datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def pending(self) -> list[bytes]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2.0)
        return out


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, Listener]]:
    path = str(tmp_path / "notify")
    listener = Listener(path)
    yield path, listener
    listener.sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, Listener]]:
    name = f"natd-test-{uuid.uuid4().hex}"
    listener = Listener("\0" + name)
    yield "@" + name, listener
    listener.sock.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)


def test_path_socket_messages_in_order(path_socket: tuple[str, Listener]) -> None:
    path, listener = path_socket
    n = Notifier(path, clock=lambda: 1234.5678905)
    assert n.enabled
    assert n.status("compiling the XDP program")
    assert n.ready("translating: 1 snat rules")
    assert n.reloading()
    assert n.ready()
    assert n.watchdog()
    assert n.stopping()
    assert n.extend_timeout(1.5)
    got = [listener.recv() for _ in range(7)]
    assert got == [
        b"STATUS=compiling the XDP program",
        b"READY=1\nSTATUS=translating: 1 snat rules",
        b"RELOADING=1\nMONOTONIC_USEC=1234567890",
        b"READY=1",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"EXTEND_TIMEOUT_USEC=1500000",
    ]
    assert listener.pending() == []
    n.close()


def test_abstract_socket(abstract_socket: tuple[str, Listener]) -> None:
    name, listener = abstract_socket
    with Notifier(name) as n:
        assert n.enabled and n.socket_path == name
        assert n.ready("up")
        assert n.watchdog()
    assert listener.recv() == b"READY=1\nSTATUS=up"
    assert listener.recv() == b"WATCHDOG=1"


def test_default_is_notify_socket_from_the_environment(abstract_socket: tuple[str, Listener],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    name, listener = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    assert Notifier().ready()
    assert listener.recv() == b"READY=1"


def test_reloading_uses_clock_monotonic_by_default(path_socket: tuple[str, Listener]) -> None:
    path, listener = path_socket
    before = time.monotonic_ns() // 1000
    Notifier(path).reloading()
    after = time.monotonic_ns() // 1000
    first, second = listener.recv().split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC" and before <= int(value) <= after


def test_notify_fields_keep_order_and_lose_newlines(path_socket: tuple[str, Listener]) -> None:
    path, listener = path_socket
    n = Notifier(path)
    assert n.notify(STATUS="reload rejected: a.yaml:3: snat: bad\nsecond line", ERRNO=22, READY=True)
    assert listener.recv() == b"STATUS=reload rejected: a.yaml:3: snat: bad second line\nERRNO=22\nREADY=1"
    assert n.send("FDSTORE=0")
    assert listener.recv() == b"FDSTORE=0"
    assert n.status("caf\u00e9")
    assert listener.recv() == "STATUS=caf\u00e9".encode()


def test_disabled_without_notify_socket() -> None:
    n = Notifier()
    assert not n.enabled and n.socket_path is None
    assert n.ready("x") is False
    assert n.watchdog() is False
    assert Notifier("").enabled is False


def test_unsupported_address_is_disabled_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="natd.sdnotify"):
        n = Notifier("vsock:2:1234")
    assert not n.enabled
    assert n.ready() is False
    assert "notifications are off" in caplog.text


def test_vanished_socket_never_raises_and_logs_once(path_socket: tuple[str, Listener],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path, listener = path_socket
    n = Notifier(path)
    assert n.ready()
    assert listener.recv() == b"READY=1"
    listener.sock.close()
    os.unlink(path)
    with caplog.at_level(logging.DEBUG, logger="natd.sdnotify"):
        assert n.watchdog() is False
        assert n.watchdog() is False
        assert n.stopping() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and path in warnings[0].getMessage()
    # systemd comes back (re-exec): sending works again, and that is said once
    again = Listener(path)
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="natd.sdnotify"):
            assert n.watchdog()
        assert again.recv() == b"WATCHDOG=1"
        assert "work again" in caplog.text
    finally:
        again.sock.close()


def test_missing_socket_from_the_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="natd.sdnotify"):
        assert n.ready() is False
        assert n.ready() is False
    assert len(caplog.records) == 1


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "1", None),           # meant for another process
    ("1000", None, 0.0005),
    ("0", None, None),
    ("-5", None, None),
    ("soon", None, None),
    ("30000000", "not-a-pid", None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert Notifier("@unused").watchdog_interval() == expected
