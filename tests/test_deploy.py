"""The shipped alert rules and dashboard: valid, tested, and only about metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
EXPORTED = {  # SPEC §8, as exported (counters with _total, the histogram's series)
    "relay_queue_depth",
    "relay_queue_oldest_age_seconds",
    "relay_messages_received_total",
    "relay_messages_rejected_total",
    "relay_deliveries_total",
    "relay_smtp_replies_total",
    "relay_delivery_delay_seconds_bucket",
    "relay_delivery_delay_seconds_sum",
    "relay_delivery_delay_seconds_count",
    "relay_connections_open",
    "relay_provider_suspended",
    "relay_admission_refused_total",
    "relay_spool_messages",
    "relay_spool_bytes",
    "relay_config_reload_success",
    # cluster (SPEC §8, §9): exported by nodes with `cluster.redis`
    "relay_cluster_redis_up",
    "relay_cluster_nodes",
    "relay_account_guard_tripped",
}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: install the Debian package prometheus (see README)"
    return path


def test_rules_are_valid():
    result = subprocess.run(
        [promtool(), "check", "rules", "relay-alerts.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests_pass():
    result = subprocess.run(
        [promtool(), "test", "rules", "relay-alerts.test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _metric_names(expression: str) -> set[str]:
    return set(re.findall(r"\brelay_[a-z_]+\b", expression))


def test_rules_and_dashboard_query_only_exported_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "relay-alerts.yml").read_text())
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= _metric_names(rule["expr"])
    dashboard = json.loads((DEPLOY / "grafana" / "relay-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= _metric_names(target["expr"])
    assert used, "no relay metric referenced at all"
    assert used <= EXPORTED, f"unknown metrics: {sorted(used - EXPORTED)}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
