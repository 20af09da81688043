"""deploy/prometheus/alerts.yml: valid rules (`promtool check rules`), and each alert fires on a server whose series
cross its threshold and not on one that stays below (`promtool test rules alerts_test.yml`). That the metric names
the rules read are the ones a live server exports is checked in tests/serve/test_health.py."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import missing_asset

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")


@pytest.fixture(autouse=True)
def promtool():
    if PROMTOOL is None:
        missing_asset("needs promtool from Debian's prometheus package (`make test` installs it as root: "
                      "apt-get install prometheus)")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=120)


def test_the_alert_rules_are_valid():
    result = run("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_each_alert_fires_on_the_bad_server_and_not_on_the_good_one():
    names = {rule["alert"] for group in yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
             for rule in group["rules"]}
    cases = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"][0]["alert_rule_test"]
    assert {case["alertname"] for case in cases} == names  # every alert has its case
    result = run("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
