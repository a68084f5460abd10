"""Lab names, state files and clean-up of whole labs.

A lab is recognised by its prefix. Every namespace of a lab is named ``<prefix>-<node>``. ``Lab.up()``
writes ``/run/natd-lab/<prefix>.json`` *before* it creates any namespace and ``down()`` removes it last,
so a namespace whose prefix has a state file belongs to natd-lab. Auto-generated prefixes
(``nl`` + 6 characters of [a-z0-9]) are also recognised without a state file, for labs whose process was
killed in the middle of ``up()``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import string
from pathlib import Path
from typing import Any

from .errors import LabError

NETNS_DIR = Path("/run/netns")
STATE_DIR = Path("/run/natd-lab")

PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,9}$")
AUTO_PREFIX_RE = re.compile(r"^nl[a-z0-9]{6}$")
NS_NAME_RE = re.compile(r"^(?P<prefix>[a-z][a-z0-9]{1,9})-(?P<node>[a-z][a-z0-9_]{0,14})$")


def new_prefix() -> str:
    """A fresh, unused prefix: 'nl' + 6 random characters of [a-z0-9]."""
    alphabet = string.ascii_lowercase + string.digits
    taken = set(list_labs())
    while True:
        prefix = "nl" + "".join(secrets.choice(alphabet) for _ in range(6))
        if prefix not in taken:
            return prefix


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise LabError(f"bad lab prefix {prefix!r}: 2-10 characters of a-z and 0-9 starting with a letter "
                       "(e.g. nlab12); leave it out to get a unique one")
    return prefix


def ns_name(prefix: str, node: str) -> str:
    return f"{prefix}-{node}"


def list_namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def namespaces_of(prefix: str) -> list[str]:
    """Every existing namespace named ``<prefix>-<node>``."""
    return [n for n in list_namespaces() if (m := NS_NAME_RE.match(n)) and m["prefix"] == prefix]


# ----------------------------------------------------------------------------------------------- state


def state_path(prefix: str) -> Path:
    return STATE_DIR / f"{check_prefix(prefix)}.json"


def write_state(prefix: str, state: dict[str, Any]) -> None:
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = state_path(prefix)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
    tmp.replace(path)


def claim_prefix(prefix: str, state: dict[str, Any]) -> None:
    """Create the state file exclusively: the lab that creates it owns the prefix (atomic, no races)."""
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        with state_path(prefix).open("x") as f:
            f.write(json.dumps(state, indent=2, default=str) + "\n")
    except FileExistsError:
        raise LabError(f"prefix {prefix} is in use (state file {state_path(prefix)} exists); choose another "
                       f"prefix, or remove the old lab: natd-lab down {prefix}") from None


def read_state(prefix: str) -> dict[str, Any] | None:
    """The state file of lab ``prefix``, or None when it has none (or it is unreadable)."""
    try:
        data = json.loads(state_path(prefix).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def remove_state(prefix: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(prefix).unlink()


def state_prefixes() -> list[str]:
    try:
        names = [p.stem for p in STATE_DIR.glob("*.json")]
    except OSError:
        return []
    return sorted(n for n in names if PREFIX_RE.match(n))


def is_lab_prefix(prefix: str) -> bool:
    """True when ``prefix`` is a natd lab: it has a state file or looks auto-generated."""
    if not PREFIX_RE.match(prefix):
        return False
    return state_path(prefix).exists() or bool(AUTO_PREFIX_RE.match(prefix))


def list_labs() -> dict[str, list[str]]:
    """Every natd lab on this machine: prefix -> its namespaces (sorted; may be empty for a stale state)."""
    labs: dict[str, list[str]] = {p: [] for p in state_prefixes()}
    for name in list_namespaces():
        m = NS_NAME_RE.match(name)
        if m and (m["prefix"] in labs or AUTO_PREFIX_RE.match(m["prefix"])):
            labs.setdefault(m["prefix"], []).append(name)
    return dict(sorted(labs.items()))


# ------------------------------------------------------------------------------------------- clean-up


def remove_namespace(name: str) -> bool:
    """Unmount and unlink /run/netns/<name> (what `ip netns del` does). False if it did not exist."""
    from pyroute2 import netns  # imported late: parsing topologies must not need pyroute2

    try:
        netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise LabError(f"cannot remove network namespace {name}: {exc.strerror}; "
                       f"try: ip netns del {name}") from exc
    return True


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove every namespace ``<prefix>-*`` and the lab's state file. Returns the namespaces removed.

    Processes still running inside those namespaces are not touched (they were not started here);
    a namespace stays alive in the kernel until its last process exits.
    """
    check_prefix(prefix)
    removed = [name for name in namespaces_of(prefix) if remove_namespace(name)]
    remove_state(prefix)
    return removed


def pids_in_namespace(name: str) -> list[int]:
    """PIDs of processes whose network namespace is /run/netns/<name> (for warnings, never for killing)."""
    try:
        st = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return []
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            pst = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return sorted(pids)
