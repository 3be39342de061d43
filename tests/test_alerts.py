"""The shipped Prometheus alert rules (deploy/prometheus/) against promtool and the node's metrics.

A monitoring trial ran docs/DEPLOY.md's alert table against a real Prometheus: one row
did not parse as written, two "growing" rows fired at rest and missed a stuck outbox,
and a stopped node, freshness refusals and refused feed records had no alert. The rules
now ship as a file that promtool checks and unit-tests (``alerts_test.yml``), and that
reads only series the node exports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from broker.hubusage import AccountUsage, StreamUsage, usage_registry
from broker.metrics import INTAKE_REFUSALS, REJECTION_STEPS, Metrics

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
DEPLOY_MD = Path(__file__).resolve().parent.parent / "docs" / "DEPLOY.md"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    # Installed by `make test` (scripts/install-debian.sh), as chromium is.
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: `make promtool` installs it"
    return subprocess.run(
        [promtool, *args], cwd=RULES, capture_output=True, text=True, check=False, timeout=60
    )


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _hub_families() -> dict[str, set[str]]:
    # What ``msmt nats usage --textfile`` writes (for the msmt-hub rules): every gauge,
    # with the labels its samples carry.
    stream = StreamUsage("AUDIT_ARCHIVE_JPN", 1, 2, 3)
    usage = AccountUsage("AUDIT", 2, 10, (stream,), ("AUDIT_ARCHIVE_NZL",))
    registry = usage_registry([usage], 0.0)
    families: dict[str, set[str]] = {}
    for family in registry.collect():
        assert family.type == "gauge", family.name
        for sample in family.samples:
            families.setdefault(sample.name, set()).update(sample.labels)
    return families


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in checked.stdout
    tested = _promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_rules_read_only_series_and_labels_a_node_exports() -> None:
    # Every sample name each metric family can have, labelled or not yet set.
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "info": ("_info",),
        "histogram": ("_bucket", "_sum", "_count"),
    }
    exported = {
        family.name + suffix
        for family in Metrics("JPN").registry.collect()
        for suffix in suffixes[family.type]
    } | set(_hub_families())
    for rule in _rules():
        expr = rule["expr"]
        for name in re.findall(r"\bmsmt_[a-z_]+", expr):
            assert name in exported, (rule["alert"], name)
        for values in re.findall(r'reason=~?"([a-z|]+)"', expr):
            known = set(REJECTION_STEPS) if "msmt_rejected_total" in expr else set(INTAKE_REFUSALS)
            assert set(values.split("|")) <= known, (rule["alert"], values)


def test_the_rules_read_counters_through_increase_and_group_on_labels_the_series_have() -> None:
    # The slips a name check misses: a gauge under increase() (or a counter compared
    # raw) reads nonsense, and a label grouped or joined on, or named in a summary, that
    # the series lack leaves every alert without it. Label names from the families
    # themselves: some series (witnessed, uncosigned, credential expiry) appear only
    # once a running node sets them.
    families: dict[str, tuple[str | None, set[str]]] = {}
    for metric in vars(Metrics("JPN")).values():
        if isinstance(metric, MetricWrapperBase):
            (family,) = metric.describe()
            suffix = "_total" if family.type == "counter" else ""
            families[family.name + suffix] = (family.type, set(metric._labelnames))
    families |= {name: ("gauge", labels) for name, labels in _hub_families().items()}
    for rule in _rules():
        expr, alert = rule["expr"], rule["alert"]
        labels = {"instance", "job"}  # the scrape's, on every series and on up
        for name in set(re.findall(r"\bmsmt_[a-z_]+", expr)):
            kind, names = families[name]
            rated = re.search(rf"\b(?:increase|rate)\(\s*{name}\b", expr) is not None
            assert rated == (kind == "counter"), (alert, name, kind)
            labels |= names
        labels |= set(re.findall(r'label_replace\([^"]*"(\w+)"', expr))
        used = {
            label.strip()
            for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr)
            for label in group.split(",")
        }
        used |= set(re.findall(r"\$labels\.(\w+)", rule["annotations"]["summary"]))
        assert used <= labels, (alert, used - labels)


def test_docs_deploy_names_every_shipped_alert() -> None:
    text = DEPLOY_MD.read_text()
    assert "deploy/prometheus/alerts.yml" in text
    missing = [rule["alert"] for rule in _rules() if f"`{rule['alert']}`" not in text]
    assert missing == []


def test_docs_deploy_table_gives_each_rule_as_shipped() -> None:
    # The table says severity, expression and duration in words an operator copies:
    # a rule retuned in alerts.yml alone would leave the docs' threshold behind.
    rows = {
        name: (severity, " ".join(expr.replace("\\|", "|").split()), minutes)
        for name, severity, expr, minutes in re.findall(
            r"^\| `(Msmt\w+)` \((\w+)\): `(.*?)`(?: for (\d+) minutes?)?[ |(]",
            DEPLOY_MD.read_text(),
            re.MULTILINE,
        )
    }
    shipped = {
        rule["alert"]: (
            rule["labels"]["severity"],
            " ".join(rule["expr"].split()),
            rule["for"].removesuffix("m") if "for" in rule else "",
        )
        for rule in _rules()
    }
    assert rows == shipped
