"""The node's metrics as a Prometheus server reads them (pure: no node, no hub)."""

from __future__ import annotations

from broker.members import MEMBERS
from broker.metrics import ALERTED_INTAKE_REFUSALS, ALERTED_REJECTIONS, Metrics


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    """One sample's value, or None when the series is not exported at all."""
    return metrics.registry.get_sample_value(name, labels)


def increase(before: float | None, after: float | None) -> float | None:
    """What Prometheus's ``increase()`` sees between two scrapes: nothing without both."""
    return None if before is None or after is None else after - before


def test_alerted_series_start_at_zero() -> None:
    # An operator trial restored a node from a backup: every partner counted one
    # rollback alarm, but the series first appeared at 1, so the documented
    # increase(msmt_audit_alarms_total[15m]) > 0 had no sample to compare with.
    metrics = Metrics("JPN")
    for log in MEMBERS:  # a fork or rollback of any log, ours included; a twin of ours
        for kind in ("fork", "rollback", "twin"):
            labels = {"kind": kind, "log": log}
            want = None if kind == "twin" and log != "JPN" else 0.0
            assert sample(metrics, "msmt_audit_alarms_total", labels) == want, labels
            assert sample(metrics, "msmt_audit_alarm_active", labels) == want, labels
    for step in ALERTED_REJECTIONS:
        assert sample(metrics, "msmt_rejected_total", {"reason": step}) == 0.0
    for reason in ALERTED_INTAKE_REFUSALS:
        assert sample(metrics, "msmt_intake_rejected_total", {"reason": reason}) == 0.0
    for partner in MEMBERS:
        held = sample(metrics, "msmt_received_held_total", {"sender": partner})
        assert held == (None if partner == "JPN" else 0.0), partner


def test_the_first_event_is_an_increase() -> None:
    metrics = Metrics("USA")
    labels = {"kind": "rollback", "log": "JPN"}
    before = sample(metrics, "msmt_audit_alarms_total", labels)
    metrics.audit_alarms.labels(**labels).inc()
    assert increase(before, sample(metrics, "msmt_audit_alarms_total", labels)) == 1.0
    # A label nobody alerts on still appears only with its first event.
    assert sample(metrics, "msmt_rejected_total", {"reason": "replay"}) is None


def test_the_rendered_page_carries_the_zeros() -> None:
    page = Metrics("GBR").render().decode()
    assert 'msmt_audit_alarms_total{kind="twin",log="GBR"} 0.0' in page
    assert 'msmt_audit_alarm_active{kind="fork",log="JPN"} 0.0' in page
    # 11 logs that can fork or roll back, one that can have a twin: 23 series each.
    assert page.count("\nmsmt_audit_alarms_total{") == 23
    assert page.count("\nmsmt_audit_alarm_active{") == 23
    assert 'msmt_received_held_total{sender="JPN"} 0.0' in page
    assert 'msmt_received_held_total{sender="GBR"}' not in page
