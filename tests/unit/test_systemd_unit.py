"""systemd/natd.service: `systemd-analyze verify` prints nothing, and the settings the daemon relies on
(Type=notify, the watchdog, SIGHUP reload, the config check before start, the capability set the
datapath was measured to need) are there. Needs systemd-analyze, not a running systemd, not root."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                       reason="systemd-analyze not installed (Debian: apt-get install systemd)"),
]

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "natd.service"
CHECK = REPO / "scripts" / "check-unit.sh"
NATD = "/usr/local/bin/natd"


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order; repeated keys stay (configparser would merge them)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {raw!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {raw!r} is not KEY=VALUE"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}= appears {len(found)} times"
    return found[0]


def verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify --root on a tree with this host's units, the unit, a stand-in for the
    installed natd and copies of the other Exec binaries (what scripts/check-unit.sh does)."""
    units_dir = Path("/lib/systemd/system").resolve()
    if not units_dir.is_dir():
        pytest.skip("no /lib/systemd/system on this host to resolve the unit's dependencies")
    root = tmp_path / "root"
    for d in ("usr/bin", "usr/sbin", "usr/lib/systemd", "etc/systemd/system"):
        (root / d).mkdir(parents=True)
    for link in ("bin", "sbin", "lib"):
        (root / link).symlink_to(f"usr/{link}")
    shutil.copytree(units_dir, root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(unit, root / "etc/systemd/system" / "natd.service")
    for key, value in parse_unit(unit)["Service"]:
        if not key.startswith("Exec"):
            continue
        binary = value.lstrip("@-:+!").split()[0]
        target = root / binary.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if binary == NATD:
            target.write_text("#!/bin/sh\nexit 0\n")
            target.chmod(0o755)
        elif Path(binary).exists():
            shutil.copy(Path(binary).resolve(), target)
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", "natd.service"],
                          capture_output=True, text=True, timeout=60, check=False)


def test_verify_prints_nothing(tmp_path: Path) -> None:
    proc = verify(UNIT, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == ""


def test_verify_harness_does_catch_problems(tmp_path: Path) -> None:
    """The check above is not vacuous: an unknown key and a wrong binary path are reported."""
    bad = tmp_path / "natd.service"
    bad.write_text(UNIT.read_text().replace("WatchdogSec=30", "WatchdogSec=30\nWatchDogSec=30")
                   .replace("/bin/kill", "/bin/no-such-kill"))
    proc = verify(bad, tmp_path)
    output = proc.stdout + proc.stderr
    assert "Unknown key 'WatchDogSec'" in output
    assert "/bin/no-such-kill" in output


def test_check_unit_script(tmp_path: Path) -> None:
    report = tmp_path / "security.txt"
    proc = subprocess.run([str(CHECK), str(report)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "Overall exposure level for natd.service" in report.read_text()


def test_service_settings() -> None:
    unit = parse_unit(UNIT)
    svc = unit["Service"]
    assert one(svc, "Type") == "notify"
    assert one(svc, "NotifyAccess") == "main"
    assert one(svc, "WatchdogSec") == "30"
    assert one(svc, "Restart") == "on-failure"
    assert one(svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    check, mount = values(svc, "ExecStartPre")
    assert check == f"{NATD} --check-config /etc/natd/natd.yaml"
    assert mount.startswith("+") and "mount -t bpf bpf /run/natd/bpf" in mount  # privileged, idempotent
    assert one(svc, "RuntimeDirectory") == "natd"
    assert one(svc, "RuntimeDirectoryPreserve") == "yes"  # or a stop would unpin a hitless restart's maps
    assert one(svc, "ExecStart") == f"{NATD} --config /etc/natd/natd.yaml"
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_hardening_keeps_what_the_datapath_needs() -> None:
    svc = parse_unit(UNIT)["Service"]
    assert set(one(svc, "CapabilityBoundingSet").split()) == {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"}
    assert values(svc, "SystemCallFilter") == ["@system-service", "~@privileged @resources", "bpf"]
    writable = {path for line in values(svc, "ReadWritePaths") for path in line.split()}
    assert writable == {"/run/natd", "/proc/sys/net/ipv4/conf"}  # pins, status, events; accept_local
    assert one(svc, "ProtectKernelTunables") == "yes"
    assert one(svc, "ProtectSystem") == "strict"
    assert one(svc, "MemoryDenyWriteExecute") == "yes"
    assert one(svc, "NoNewPrivileges") == "yes"
    families = set(one(svc, "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    # these would break natd: kernel headers for BCC, host networking, root's pins, /proc/sys reads
    for forbidden in ("ProtectKernelModules", "PrivateNetwork", "PrivateUsers", "ProcSubset", "User",
                      "DynamicUser"):
        assert not values(svc, forbidden), f"{forbidden}= must not be set (see systemd/README.md)"
