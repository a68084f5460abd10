"""`python -m bench.run --smoke`: the benchmark's plumbing end to end, with tiny counts (not its numbers).

One round, well under a second per figure: the lab is built, every system is set up and measured, the
tables are printed and written, and nothing is left behind. The full benchmark (`make bench`) never runs
in `make test`.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
SYSTEM_ROWS = ["kernel forwarding, no NAT", "kernel NAT (nft masquerade)", "natd",
               "bare XDP redirect (limit)"]
LIMIT_S = 60.0


def _number(cell: str) -> float:
    m = re.fullmatch(r"(-?[0-9.]+)([kM]?)", cell.strip().split(" [")[0])
    assert m, f"not a number: {cell!r}"
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6}[m.group(2)]


def _table(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]  # skip header and rule


def test_bench_smoke_produces_every_systems_row(tmp_path: Path) -> None:
    readme = REPO / "bench" / "README.md"
    readme_before = readme.read_text() if readme.exists() else None
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--smoke", "--results-dir", str(tmp_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=LIMIT_S + 30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench tears its lab down on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"bench --smoke ran longer than {LIMIT_S + 30:.0f} s:\n{err[-3000:]}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"bench --smoke exited {proc.returncode}:\n{err[-4000:]}\n{out[-2000:]}"
    assert elapsed < LIMIT_S, f"bench --smoke took {elapsed:.0f} s (limit {LIMIT_S:.0f} s)"

    written = list(tmp_path.glob("*.md"))
    assert len(written) == 1, written
    text = written[0].read_text()
    assert text.strip() == out.strip(), "the table printed is the one written"
    rows = {r[0]: r[1:] for r in _table(text, "Systems")}
    assert set(SYSTEM_ROWS) <= set(rows), f"system rows: {sorted(rows)}"
    for name in SYSTEM_ROWS:
        values = [_number(c) for c in rows[name]]
        assert values and all(v > 0 for v in values), f"{name}: {rows[name]}"
    fast = {r[0]: r[1] for r in _table(text, "Fast path (BPF_PROG_TEST_RUN on the daemon's own programs)")}
    assert _number(fast["natd xdp_inside, established flow (SNAT + FIB + redirect)"]) > 0
    targets = {r[0]: r[1] for r in _table(text, "Targets")}
    assert _number(targets["daemon start to READY"].removesuffix(" s")) > 0
    assert "## Errors" not in text

    # nothing left behind: the lab's namespaces and natd's pins
    prefix = re.search(r"lab (nl[a-z0-9]{6}) up", err)
    assert prefix, err[-2000:]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert prefix.group(1) not in namespaces
    assert not (Path("/run/natd/bpf") / prefix.group(1)).exists()
    # a smoke run never rewrites the published summary
    assert (readme.read_text() if readme.exists() else None) == readme_before
