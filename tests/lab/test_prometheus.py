"""A real Prometheus (Debian's `prometheus`) scraping natd in the lab: what it stores is what natctl says.

Prometheus runs inside the gateway's namespace (natd's metrics listen on 127.0.0.1 there) with a config and
a TSDB in a temporary directory and a 1 s scrape interval. Long-lived UDP flows (default timeouts: minutes)
are opened through natd; once a reaper sweep has counted them and Prometheus has scraped the result, its
natd_conntrack_entries equals `natctl -C`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from natd_lab.apps import UDP_ASK, start_peer_echo

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="prometheus not installed (Debian package prometheus; scripts/setup.sh "
                              "installs it)"),
]

PROM = "127.0.0.1:19090"  # inside the gateway's namespace: no clash with anything on the host
ALERTS = Path(__file__).resolve().parents[2] / "contrib" / "prometheus" / "natd-alerts.yml"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def query(lab: Any, promql: str) -> list[dict[str, Any]]:
    url = f"http://{PROM}/api/v1/query?query={urllib.parse.quote(promql)}"
    res = lab.exec("gw", ["curl", "-sf", url], timeout=15, check=False)
    if res.returncode != 0:
        return []
    body = json.loads(res.stdout)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def value(lab: Any, promql: str) -> float | None:
    result = query(lab, promql)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_sees_what_natctl_counts(lab: Any, natd_factory: Any, tmp_path: Path) -> None:
    natd = natd_factory(lab)
    listen = natd.config["metrics"]["listen"]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "natd", "static_configs": [{"targets": [listen]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "data").mkdir()
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - handed to the child
    prom = lab.popen("gw", ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                            f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={PROM}"],
                     stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        ready = ["curl", "-sf", f"http://{PROM}/-/ready"]
        wait_for("prometheus to be ready", lambda: lab.exec("gw", ready, check=False).returncode == 0)
        # flows that outlive the test: UDP with a reply (udp_replied: 300 s by default)
        start_peer_echo(lab, "srv1", 18090, 15390)
        for host in ("host1", "host2", "host1", "host2", "host1"):
            lab.exec(host, [sys.executable, "-c", UDP_ASK, lab.addr("srv1"), "15390"], timeout=20)
        count = int(natd.natctl("-C").stdout)
        assert count == 5
        # one reaper sweep (<= 5 s) counts them, one scrape (1 s) stores the count
        wait_for("natd_conntrack_entries == natctl -C in Prometheus",
                 lambda: value(lab, "natd_conntrack_entries") == count)
        assert int(natd.natctl("-C").stdout) == count, "no flow came or went meanwhile"
        assert value(lab, 'up{job="natd"}') == 1
        assert value(lab, "natd_conntrack_entries_limit") == 262144
        assert value(lab, "natd_connection_attempts_total") == count
        assert value(lab, "natd_events_lost_total") == 0
        # the shipped alert rules load and evaluate against natd's real metrics: none fires here
        rules = json.loads(lab.exec("gw", ["curl", "-sf", f"http://{PROM}/api/v1/rules"]).stdout)
        loaded = [r for g in rules["data"]["groups"] for r in g["rules"]]
        assert len(loaded) >= 5 and all(r["health"] == "ok" for r in loaded), loaded
        assert [r["name"] for r in loaded if r["state"] != "inactive"] == []
    finally:
        prom.terminate()  # by PID; lab teardown would kill it too
        try:
            prom.wait(timeout=15)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(5)
