"""Loader logic that needs no kernel: source assembly for BCC, bpffs detection, layout refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from natd.errors import LayoutMismatchError
from natd.loader import assemble_source, check_pinned_layout, ebpf_dir, mount_fstype, remove_pins

pytestmark = pytest.mark.unit


def test_assemble_inlines_every_local_header_once_with_line_markers() -> None:
    src = assemble_source(ebpf_dir() / "natd.c")
    assert '#include "' not in src  # BCC rewrites map calls only in the main buffer
    assert src.count("#ifndef NATD_ABI_H") == 1
    assert f'#line 1 "{(ebpf_dir() / "lib" / "nat.h").resolve()}"' in src
    assert "int xdp_inside(struct xdp_md *ctx)" in src and "int xdp_outside(struct xdp_md *ctx)" in src


def test_mount_fstype_picks_the_deepest_mount(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("22 1 0:21 / / rw - ext4 /dev/vda rw\n"
                    "30 22 0:30 / /run rw - tmpfs tmpfs rw\n"
                    "31 30 0:31 / /run/natd/bpf rw - bpf bpf rw\n")
    assert mount_fstype("/run/natd/bpf/x/v5", str(info)) == ("/run/natd/bpf", "bpf")
    assert mount_fstype("/run/other", str(info)) == ("/run", "tmpfs")


def test_pinned_state_of_another_layout_is_refused(tmp_path: Path) -> None:
    """An upgrade with a new map layout must not start beside the old pins with an empty table."""
    old = tmp_path / "edge" / "v1"
    old.mkdir(parents=True)
    (old / "ct_orig").write_text("")
    with pytest.raises(LayoutMismatchError) as err:
        check_pinned_layout(str(tmp_path / "edge" / "v9"), 1024)
    assert "map layout v1" in str(err.value) and "natd --detach" in str(err.value)


def test_no_pins_is_a_fresh_start(tmp_path: Path) -> None:
    assert check_pinned_layout(str(tmp_path / "edge" / "v9"), 1024) is False


def test_remove_pins_removes_the_instance_directory_when_empty(tmp_path: Path) -> None:
    pins = tmp_path / "edge" / "v9"
    pins.mkdir(parents=True)
    for name in ("ct_orig", "ct_reply"):
        (pins / name).write_text("")
    assert remove_pins(str(pins)) == ["ct_orig", "ct_reply"]
    assert not (tmp_path / "edge").exists()
