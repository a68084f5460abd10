"""Compile, load and attach the XDP program with BCC; prepare the pin directory.

BCC rewrites map method calls (`ct_orig.lookup(&k)`) only in the main source buffer, not in included
headers, so the loader inlines ebpf/lib's headers into one buffer (with #line markers, so compiler
errors still name the real file and line).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from natd import bpfsys
from natd.errors import BpfError, EnvironmentError_, LayoutMismatchError, StateError
from natd.maps import LAYOUT_VERSION, CtEntry, CtKey, CtReplyValue

log = logging.getLogger("natd.loader")

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def ebpf_dir() -> Path:
    """The C sources: $NATD_EBPF_DIR, else the source tree next to this package."""
    env = os.environ.get("NATD_EBPF_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parent.parent / "ebpf", Path("/usr/share/natd/ebpf")]
    for cand in candidates:
        if (cand / "natd.c").is_file():
            return cand
    raise EnvironmentError_(
        f"natd's C sources not found (looked in {', '.join(map(str, candidates))}); set NATD_EBPF_DIR")


def assemble_source(entry: Path, include_dirs: list[Path] | None = None) -> str:
    """entry with every local #include "x.h" inlined once (include guards make repeats harmless)."""
    dirs = [entry.parent, entry.parent / "lib", *(include_dirs or [])]
    seen: set[Path] = set()

    def expand(path: Path) -> list[str]:
        out = [f'#line 1 "{path}"\n']
        for lineno, line in enumerate(path.read_text().splitlines(keepends=True), start=1):
            m = _INCLUDE.match(line)
            if not m:
                out.append(line)
                continue
            found = next((d / m.group(1) for d in [path.parent, *dirs] if (d / m.group(1)).is_file()), None)
            if found is None:
                raise BpfError(f"{path}:{lineno}: #include \"{m.group(1)}\" not found in {path.parent}")
            found = found.resolve()
            if found not in seen:
                seen.add(found)
                out.extend(expand(found))
                out.append(f'#line {lineno + 1} "{path}"\n')
        return out

    return "".join(expand(entry.resolve()))


BPF_FS_MAGIC_TYPE = "bpf"


def mount_fstype(path: str, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str]:
    """(mount point, fs type) of the mount that holds path."""
    best = ("/", "")
    real = os.path.realpath(path)
    with open(mountinfo) as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            mnt = left.split()[4].replace("\\040", " ")
            fstype = right.split()[0]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype)
    return best


def ensure_bpffs(pin_root: str, mountinfo: str = "/proc/self/mountinfo") -> None:
    """Pins need a bpffs. Mount one when missing (a gateway box needs it anyway)."""
    mnt, fstype = mount_fstype(pin_root if os.path.exists(pin_root) else os.path.dirname(pin_root), mountinfo)
    if fstype == BPF_FS_MAGIC_TYPE:
        os.makedirs(pin_root, exist_ok=True)
        return
    target = "/sys/fs/bpf" if pin_root.startswith("/sys/fs/bpf") else pin_root
    os.makedirs(target, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", os.fsencode(target), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise EnvironmentError_(
            f"{pin_root} is not on a bpffs (it is on {fstype or 'unknown'} at {mnt}) and mounting one at "
            f"{target} failed: {os.strerror(err)}; run: mount -t bpf bpf {target}")
    log.warning("mounted a bpffs at %s; inside 'ip netns exec' it lives only as long as this process's "
                "mount namespace: mount it on the host (make setup does) for state that outlives natd",
                target)
    os.makedirs(pin_root, exist_ok=True)


def check_pinned_layout(pin_dir: str, ct_max: int) -> bool:
    """True when pinned maps exist and fit this natd; raises when they exist and do not."""
    parent = os.path.dirname(pin_dir)
    mine = os.path.basename(pin_dir)
    others = sorted(d for d in (os.listdir(parent) if os.path.isdir(parent) else [])
                    if d.startswith("v") and d != mine and os.path.exists(os.path.join(parent, d, "ct_orig")))
    if others:
        raise LayoutMismatchError(
            f"{parent} holds pinned state of map layout {', '.join(others)}; this natd uses {mine} and would "
            f"start with an empty table beside it, dropping those flows. Stop the old natd with its own "
            f"'natd --detach', or remove {os.path.join(parent, others[0])} to start fresh")
    path = os.path.join(pin_dir, "ct_orig")
    if not os.path.exists(path):
        return False
    expect = {"ct_orig": (CtKey, CtEntry), "ct_reply": (CtKey, CtReplyValue)}
    for name, (k, v) in expect.items():
        try:
            with bpfsys.BpfMap.open_pinned(os.path.join(pin_dir, name)) as m:
                m.expect_layout(ctypes.sizeof(k), ctypes.sizeof(v), os.path.join(pin_dir, name))
                if m.info.max_entries != ct_max:
                    raise LayoutMismatchError(
                        f"pinned conntrack table {m.name} holds {m.info.max_entries} entries but "
                        f"conntrack.max is {ct_max}; keep conntrack.max at {m.info.max_entries} or drop all "
                        f"flows with 'natd --detach --config FILE' before changing it")
        except StateError:
            return False
    return True


@dataclass
class Datapath:
    """The loaded program: BCC object, program fds, and where it is attached."""

    bpf: Any
    functions: dict[str, Any]
    attached: dict[str, int] = field(default_factory=dict)  # ifname -> xdp flags used

    @classmethod
    def load(cls, pin_dir: str, ct_max: int, src_dir: Path | None = None) -> Datapath:
        try:
            from bcc import BPF  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise EnvironmentError_(
                "python module bcc not found: install Debian's python3-bpfcc and run natd from a venv made "
                "with --system-site-packages (make setup does both)") from exc
        src = assemble_source((src_dir or ebpf_dir()) / "natd.c")
        os.makedirs(pin_dir, exist_ok=True)
        cflags = [f'-DNATD_PIN_DIR="{pin_dir}"', f"-DNATD_CT_MAX={ct_max}", "-Wno-macro-redefined",
                  "-Wno-compare-distinct-pointer-types"]
        try:
            bpf = BPF(text=src, cflags=cflags)
            functions = {name: bpf.load_func(name, BPF.XDP) for name in ("xdp_inside", "xdp_outside")}
        except Exception as exc:  # BCC raises bare Exception; its details went to stderr
            raise BpfError(f"compiling/loading the XDP program failed: {exc} (the compiler/verifier output "
                           f"is above; kernel headers at /lib/modules/{os.uname().release}/build?)") from exc
        return cls(bpf, functions)

    def attach(self, ifname: str, function: str, native: bool = True) -> None:
        from bcc import BPF

        fn = self.functions[function]
        if native:
            try:
                BPF.attach_xdp(ifname, fn, XDP_FLAGS_DRV_MODE)
                self.attached[ifname] = XDP_FLAGS_DRV_MODE
                return
            except Exception as exc:
                log.warning("native XDP on %s failed (%s); falling back to generic (skb) mode", ifname, exc)
        try:
            BPF.attach_xdp(ifname, fn, XDP_FLAGS_SKB_MODE)
        except Exception as exc:
            raise BpfError(f"attaching {function} to {ifname} failed: {exc}") from exc
        self.attached[ifname] = XDP_FLAGS_SKB_MODE

    def detach_all(self) -> None:
        from bcc import BPF

        for ifname, flags in list(self.attached.items()):
            try:
                BPF.remove_xdp(ifname, flags)
            except Exception as exc:  # the interface may be gone already
                log.warning("detaching XDP from %s: %s", ifname, exc)
            del self.attached[ifname]

    def prog_fd(self, function: str) -> int:
        return int(self.functions[function].fd)


def remove_pins(pin_dir: str) -> list[str]:
    """Unpins every map of this layout (a real uninstall: all flows are gone after this)."""
    removed = []
    if os.path.isdir(pin_dir):
        for name in sorted(os.listdir(pin_dir)):
            os.unlink(os.path.join(pin_dir, name))
            removed.append(name)
        os.rmdir(pin_dir)
    with contextlib.suppress(OSError):  # <pin_root>/<instance>, when no other layout is pinned there
        os.rmdir(os.path.dirname(pin_dir))
    return removed


__all__ = ["LAYOUT_VERSION", "Datapath", "assemble_source", "check_pinned_layout", "ensure_bpffs",
           "remove_pins"]
