"""natd's command line without root: --check-config, usage errors, privilege check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from natd import daemon
from natd.errors import EnvironmentError_

pytestmark = pytest.mark.unit

GOOD = "inside: [in1]\noutside: out0\nsnat:\n  - from: 10.0.0.0/16\n    ports: 20000-29999\n"


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "natd.yaml"
    path.write_text(GOOD)
    assert daemon.main(["--check-config", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_config_names_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "natd.yaml"
    path.write_text(GOOD.replace("20000-29999", "29999-20000"))
    assert daemon.main(["--check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:5: snat[0].ports:" in err
    assert "Traceback" not in err


def test_missing_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.main(["--check-config", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


def test_config_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        daemon.main([])
    assert exc.value.code == 2
    assert "--config FILE is required" in capsys.readouterr().err


def test_not_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EnvironmentError_, match="needs root"):
        daemon.require_privileges()


def test_kernel_without_bpf_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(EnvironmentError_, match="no bpf\\(\\) syscall"):
        daemon.require_privileges(proc=str(tmp_path))


def test_reap_interval_follows_the_shortest_timeout() -> None:
    from natd.config import Timeouts

    assert daemon.reap_interval(Timeouts()) == 2.5  # tcp_close 10 s / 4
    assert daemon.reap_interval(Timeouts(tcp_close=1, udp_unreplied=1)) == 0.5
    assert daemon.reap_interval(Timeouts(tcp_close=3600, tcp_syn_recv=3600, tcp_syn_sent=3600,
                                         tcp_time_wait=3600, icmp=3600, udp_unreplied=3600)) == 5.0
