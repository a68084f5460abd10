"""The verifier's budget: a program the verifier needs more than 1M instructions to check does not load,
and every branch added to the datapath costs some of it (measured on 6.18: ~19.5k per port try of
snat_create's loop, ~155 per byte of ICMP checksum validation, ~100k per path that can create a flow).
This fails while there is still room, naming the figure, instead of natd failing to start after the next
change."""

from __future__ import annotations

import pytest

from natd import bpfsys

from .harness import NatDatapath

pytestmark = pytest.mark.bpf

VERIFIER_LIMIT = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS
HEADROOM = 0.15


@pytest.mark.parametrize("program", ["xdp_inside", "xdp_outside"])
def test_each_program_leaves_the_verifier_headroom(natd_dp: NatDatapath, program: str) -> None:
    used = bpfsys.prog_verified_insns(natd_dp.datapath.prog_fd(program))
    print(f"{program}: {used} verified instructions ({used / VERIFIER_LIMIT:.0%} of the limit)")
    assert 0 < used <= VERIFIER_LIMIT * (1 - HEADROOM), (
        f"{program} needs {used} verified instructions, within {HEADROOM:.0%} of the verifier's "
        f"{VERIFIER_LIMIT}: the next branch may stop natd from loading; make a path cheaper first")
