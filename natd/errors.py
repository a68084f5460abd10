"""Every error natd raises on purpose, in one tree.

    NatdError                 base: the CLI prints str(err) and exits 1, never a traceback
    ├── ConfigError           the YAML is invalid; carries file, line and key
    ├── EnvironmentError_     the host cannot run natd (not root, no BPF, no bpffs, headers missing)
    ├── InterfaceError        a configured interface does not exist / vanished
    ├── BpfError              compiling, loading, attaching or a map syscall failed
    │   └── LayoutMismatchError   pinned maps were written by another map layout version
    └── StateError            pinned state is missing or unreadable (natctl without a running natd)

Messages name the thing and the fix, e.g. "interface eth9 not found; interfaces: eth0, eth1".
"""

from __future__ import annotations


class NatdError(Exception):
    """Base of every deliberate natd error."""


class ConfigError(NatdError):
    """The configuration is invalid. ``source``/``line``/``key`` locate it when known."""

    def __init__(self, message: str, *, source: str = "<config>", line: int | None = None,
                 key: str | None = None) -> None:
        self.source = source
        self.line = line
        self.key = key
        self.message = message
        where = source if line is None else f"{source}:{line}"
        what = f"{key}: {message}" if key else message
        super().__init__(f"{where}: {what}")


class EnvironmentError_(NatdError):
    """The host lacks something natd needs (root, BPF, bpffs, kernel headers)."""


class InterfaceError(NatdError):
    """A configured network interface is missing."""


class BpfError(NatdError):
    """A BPF compile/load/attach or map operation failed."""


class LayoutMismatchError(BpfError):
    """Pinned maps belong to a different map layout version."""


class StateError(NatdError):
    """Pinned natd state is missing or unreadable."""
