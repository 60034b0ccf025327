"""The shipped monitoring contrib: promtool accepts the rules, the alerts fire, and every metric the
rules and the dashboard use is one milterd really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from milterd.core.metrics import Metrics

CONTRIB = Path(__file__).resolve().parents[1] / "contrib" / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/setup.sh installs Debian's prometheus package"
    return subprocess.run([promtool, *args], cwd=CONTRIB, capture_output=True, text=True,
                          timeout=120)


def test_promtool_check_rules():
    r = _promtool("check", "rules", "milterd-rules.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_rule_unit_tests():
    r = _promtool("test", "rules", "milterd-rules.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_config():
    r = _promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def _exported_names() -> set[str]:
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    for metric in Metrics().registry.collect():
        names.update(metric.name + s for s in suffixes.get(metric.type, ("",)))
    return names


def test_rules_and_dashboard_use_only_real_metric_names():
    exported = _exported_names() | {"up"}
    text = (CONTRIB / "milterd-rules.yml").read_text()
    dashboard = json.loads((CONTRIB / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\b(milterd_[a-z_]+)", text + "\n".join(exprs)))
    assert used, "no metric found"
    assert used <= exported, used - exported
    # The three Exchange counters are on the dashboard.
    for name in ("milterd_domain_secured_messages_received_total",
                 "milterd_domain_secured_messages_sent_total",
                 "milterd_domain_secured_outbound_session_failures_total"):
        assert any(name in e for e in exprs), name
