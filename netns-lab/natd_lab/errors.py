"""Errors natd_lab raises on purpose. Messages name the thing and the fix.

    LabError              base; the CLI prints str(err) and exits 1
    ├── TopologyError     a topology file is invalid (names the file and the key)
    ├── LabBuildError     building a lab failed half way (everything built was removed again)
    ├── ExecError         a command run in a lab node failed (also a subprocess.CalledProcessError)
    └── ExecTimeout       a command run in a lab node timed out (also a subprocess.TimeoutExpired)
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


class LabError(Exception):
    """Base of every deliberate natd_lab error."""


class TopologyError(LabError):
    """The topology is invalid. ``source`` is the file, ``key`` the dotted path of the bad key."""

    def __init__(self, message: str, *, source: str = "<topology>", key: str | None = None) -> None:
        self.source = source
        self.key = key
        self.message = message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


class LabBuildError(LabError):
    """``Lab.up()`` failed; the partial lab has been torn down before this is raised."""


def _fmt_cmd(cmd: Sequence[str]) -> str:
    return " ".join(cmd)


def _tail(text: str | bytes | None, limit: int = 2000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


class ExecError(LabError, subprocess.CalledProcessError):
    """A command in a lab node exited non-zero (raised by ``Lab.exec(..., check=True)``)."""

    def __init__(self, node: str, namespace: str, cmd: Sequence[str], returncode: int,
                 stdout: str | None, stderr: str | None) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, list(cmd), stdout, stderr)
        self.node = node
        self.namespace = namespace

    def __str__(self) -> str:
        parts = [f"command in lab node {self.node} (netns {self.namespace}) exited {self.returncode}: "
                 f"{_fmt_cmd(self.cmd)}"]
        if out := _tail(self.stdout):
            parts.append(f"stdout: {out}")
        if err := _tail(self.stderr):
            parts.append(f"stderr: {err}")
        return "\n".join(parts)


class ExecTimeout(LabError, subprocess.TimeoutExpired):
    """A command in a lab node ran longer than its timeout and was killed."""

    def __init__(self, node: str, namespace: str, cmd: Sequence[str], timeout: float,
                 stdout: str | bytes | None, stderr: str | bytes | None) -> None:
        subprocess.TimeoutExpired.__init__(self, list(cmd), timeout, stdout, stderr)
        self.node = node
        self.namespace = namespace

    def __str__(self) -> str:
        msg = (f"command in lab node {self.node} (netns {self.namespace}) timed out after "
               f"{self.timeout:g} s and was killed: {_fmt_cmd(self.cmd)}; raise timeout= if it needs longer")
        if err := _tail(self.stderr):
            msg += f"\nstderr: {err}"
        return msg
