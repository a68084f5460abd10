"""The daemon's own state for `natctl status`: what the maps cannot tell (pid, config digest, reaper
health, interface events), as a small JSON file under /run written atomically (write + rename), so a
reader never sees half a file. Kept outside the bpffs: a bpffs holds only BPF objects."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

STATUS_DIR = "/run/natd/status"


def status_path(instance: str, status_dir: str = STATUS_DIR) -> str:
    return os.path.join(status_dir, f"{instance}.json")


def write_status(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".status-")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_status(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
