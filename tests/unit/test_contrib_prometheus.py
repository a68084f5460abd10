"""contrib/prometheus: the example scrape config and the alert rules, checked by Prometheus' own promtool.

`promtool check config` / `check rules` validate syntax, PromQL and templates. `promtool test rules` then
feeds synthetic series to every alert and checks when it fires and when it does not (on a copy without
annotations: promtool compares those verbatim, and they are prose). The metric names are checked against
what natd.metrics really exports, so a renamed metric cannot leave an alert that never fires.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from natd.config import parse_config
from natd.metrics import NatdCollector, ReaperStatus
from natd.tables import FakeTables

pytestmark = pytest.mark.unit

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "prometheus"
CONFIG, RULES = CONTRIB / "prometheus.yml", CONTRIB / "natd-alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package prometheus; scripts/setup.sh installs it)")

GW = 'instance="gw1:9469",job="natd"'
LABELS = {"instance": "gw1:9469", "job": "natd"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


@needs_promtool
def test_example_config_is_valid() -> None:
    res = promtool("check", "config", str(CONFIG))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout


@needs_promtool
def test_alert_rules_are_valid() -> None:
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr


def alerts() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_the_rules_cover_what_the_issue_asks_for() -> None:
    assert {"NatdConntrackTableNearlyFull", "NatdPortAllocationErrors",
            "NatdConnectionAttemptsFarAboveEstablished", "NatdEventsLost", "NatdReaperStale"} <= set(alerts())
    full = alerts()["NatdConntrackTableNearlyFull"]
    assert (full["expr"].strip(), full["for"]) == (
        "natd_conntrack_entries / natd_conntrack_entries_limit > 0.9", "5m")


def test_the_rules_use_metrics_natd_exports() -> None:
    config = parse_config("inside: [a]\noutside: b\nsnat: [{from: 10.0.0.0/8}]\n")
    collector = NatdCollector(FakeTables(), config, ReaperStatus())
    exported = set()
    for family in collector.describe():
        exported.add(family.name)
        if family.type == "counter":
            exported.add(family.name + "_total")
    used = {name for rule in alerts().values() for name in re.findall(r"\bnatd_\w+", rule["expr"])}
    assert used and used <= exported, f"not exported by natd: {sorted(used - exported)}"


def series(name: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{GW}}}", "values": values}


def fires(alert: str, at: str, severity: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": {**LABELS, "severity": severity}}]}


def silent(alert: str, at: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


# (input series, expectations) per scenario; one minute per sample
SCENARIOS: dict[str, tuple[list[dict[str, str]], list[dict[str, Any]]]] = {
    "table 95% full": (
        [series("natd_conntrack_entries", "950x10"), series("natd_conntrack_entries_limit", "1000x10")],
        [silent("NatdConntrackTableNearlyFull", "4m"),
         fires("NatdConntrackTableNearlyFull", "6m", "warning")]),
    "table half full": (
        [series("natd_conntrack_entries", "500x10"), series("natd_conntrack_entries_limit", "1000x10")],
        [silent("NatdConntrackTableNearlyFull", "10m")]),
    "port allocation errors": (
        [series("natd_port_allocation_errors_total", "0x5 0+10x10 110x30")],
        [silent("NatdPortAllocationErrors", "4m"), fires("NatdPortAllocationErrors", "9m", "warning"),
         silent("NatdPortAllocationErrors", "30m")]),
    "a scan: many attempts, few established": (
        [series("natd_connection_attempts_total", "0+6000x30"),
         series("natd_connections_established_total", "0+60x30")],
        [silent("NatdConnectionAttemptsFarAboveEstablished", "12m"),
         fires("NatdConnectionAttemptsFarAboveEstablished", "28m", "info")]),
    "busy but healthy": (
        [series("natd_connection_attempts_total", "0+6000x30"),
         series("natd_connections_established_total", "0+3000x30")],
        [silent("NatdConnectionAttemptsFarAboveEstablished", "28m")]),
    "events lost": (
        [series("natd_events_lost_total", "0x5 40x20")],
        [silent("NatdEventsLost", "4m"), fires("NatdEventsLost", "8m", "warning"),
         silent("NatdEventsLost", "20m")]),
    "event log not writable": (
        [series("natd_events_write_errors_total", "0x3 5+5x10")],
        [fires("NatdEventLogWriteErrors", "6m", "warning")]),
    "reaper stuck since minute 2": (
        [series("natd_reaper_last_success_timestamp_seconds", "0+60x2 120x20")],
        [silent("NatdReaperStale", "6m"), fires("NatdReaperStale", "9m", "critical")]),
    "reaper fine": (
        [series("natd_reaper_last_success_timestamp_seconds", "0+60x20")],
        [silent("NatdReaperStale", "20m")]),
    "natd down": (
        [series("up", "1x3 0x10")],
        [silent("NatdDown", "4m"), fires("NatdDown", "6m", "critical")]),
}


@needs_promtool
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_alerts_fire_when_they_should(scenario: str, tmp_path: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    inputs, expectations = SCENARIOS[scenario]
    test = {"rule_files": ["rules.yml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": inputs, "alert_rule_test": expectations}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    res = promtool("test", "rules", str(tmp_path / "test.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
