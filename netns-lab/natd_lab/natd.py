"""Run the real natd daemon (and natctl) on a lab's gateway node.

natd is started the way users start it in a namespace, `ip netns exec <gw> natd --config FILE`, with a
NOTIFY_SOCKET this module owns, so start-up waits for the daemon's own READY=1 (sd_notify) rather than
sleeping. Stopping is by PID only; the lab's teardown kills it too if a test fails first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .errors import LabError
from .lab import Lab


def _bin(name: str) -> str:
    """natd/natctl next to the running interpreter (the venv), else from PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


class NatdError(LabError):
    pass


class NatdInLab:
    """natd on ``node`` of ``lab``. ``config`` is a dict (dumped to YAML) or YAML text."""

    def __init__(self, lab: Lab, config: dict[str, Any] | str, *, node: str = "gw") -> None:
        self.lab = lab
        self.node = node
        if isinstance(config, str):
            config = yaml.safe_load(config)
        assert isinstance(config, dict)
        config.setdefault("instance", lab.prefix)
        config.setdefault("metrics", {"listen": "127.0.0.1:9469"})
        self.config = config
        self.dir = Path(tempfile.mkdtemp(prefix=f"natd-{lab.prefix}-"))
        self.config_path = self.dir / "natd.yaml"
        # the config natd last started with: --detach needs a valid one, and tests break natd.yaml on purpose
        self.started_config_path = self.dir / "started.yaml"
        self.log_path = self.dir / "natd.log"
        self.notify_path = self.dir / "notify.sock"
        self.write_config(config)
        self.proc: subprocess.Popen[Any] | None = None
        self._sock: socket.socket | None = None
        self.messages: list[str] = []

    @property
    def instance(self) -> str:
        return str(self.config["instance"])

    @property
    def pin_root(self) -> str:
        return str(self.config.get("state", {}).get("pin_root", "/run/natd/bpf"))

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)

    # -- sd_notify --------------------------------------------------------------------------------
    def _open_notify(self) -> None:
        if self._sock is None:
            with contextlib.suppress(FileNotFoundError):
                self.notify_path.unlink()
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.bind(str(self.notify_path))

    def wait_for(self, field: str, timeout: float = 60.0) -> str:
        """Collect notify messages until one contains ``field`` (e.g. READY=1); returns it."""
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise NatdError(f"natd exited with {self.proc.returncode} before {field}:\n{self.log_tail()}")
            self._sock.settimeout(min(0.5, max(0.01, deadline - time.monotonic())))
            try:
                msg = self._sock.recv(65536).decode()
            except TimeoutError:
                continue
            self.messages.append(msg)
            if field in msg.split("\n"):
                return msg
        raise NatdError(f"natd did not send {field} within {timeout:.0f} s:\n{self.log_tail()}")

    def drain(self) -> list[str]:
        """Collect every notify message already sent (non-blocking); returns all messages so far."""
        if self._sock is not None:
            self._sock.setblocking(False)
            try:
                while True:
                    self.messages.append(self._sock.recv(65536).decode())
            except BlockingIOError:
                pass
            finally:
                self._sock.setblocking(True)
        return self.messages

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # -- life cycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0, extra_args: list[str] | None = None,
              env: dict[str, str] | None = None) -> NatdInLab:
        self._open_notify()
        self.started_config_path.write_text(self.config_path.read_text())
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the child
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **(env or {})}
        self.proc = self.lab.popen(self.node, [_bin("natd"), "--config", str(self.config_path),
                                               *(extra_args or [])],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.wait_for("READY=1", timeout)
        return self

    def reload(self, timeout: float = 30.0) -> str:
        """SIGHUP, then the READY=1 that ends the reload; returns that message (STATUS says how it went)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self.wait_for("RELOADING=1", timeout)
        return self.wait_for("READY=1", timeout)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
            self.drain()
            return rc
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise NatdError(f"natd did not stop within {timeout} s of SIGTERM:\n{self.log_tail()}") from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def uninstall(self) -> subprocess.CompletedProcess[str]:
        """natd --detach: program off the interfaces, pins removed."""
        config = self.started_config_path if self.started_config_path.exists() else self.config_path
        return self.lab.exec(self.node, [_bin("natd"), "--detach", "--config", str(config)],
                             timeout=60, check=False)

    def close(self) -> None:
        """Stop (if running), uninstall, remove temp files. Safe to call twice."""
        with contextlib.suppress(Exception):
            self.stop()
        if self.lab.is_up:
            with contextlib.suppress(Exception):
                self.uninstall()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for p in sorted(self.dir.glob("*")):
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    # -- looking at it ----------------------------------------------------------------------------
    def natctl(self, *args: str, check: bool = True,
               timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return self.lab.exec(self.node, [_bin("natctl"), "--instance", self.instance, "--pin-root",
                                         self.pin_root, *args], timeout=timeout, check=check)

    def metrics(self) -> str:
        listen = str(self.config.get("metrics", {}).get("listen", "127.0.0.1:9469"))
        return self.lab.exec(self.node, ["curl", "-sf", f"http://{listen}/metrics"], timeout=15).stdout

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample from /metrics by name and exact labels (None when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None
