"""The node's metrics as a Prometheus server reads them, and the port that serves them (no hub)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from broker import serving
from broker.members import MEMBERS
from broker.metrics import (
    INTAKE_REFUSALS,
    REJECTION_STEPS,
    Metrics,
    is_loopback_host,
    make_app,
    serve_tcp,
)


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
    for step in REJECTION_STEPS:
        assert sample(metrics, "msmt_rejected_total", {"reason": step}) == 0.0
    for reason in INTAKE_REFUSALS:
        assert sample(metrics, "msmt_intake_rejected_total", {"reason": reason}) == 0.0
    for partner in MEMBERS:
        for name, label in (
            ("msmt_received_held_total", "sender"),
            ("msmt_received_total", "sender"),
            ("msmt_received_duplicate_total", "sender"),
            ("msmt_published_total", "partner"),
        ):
            got = sample(metrics, name, {label: partner})
            assert got == (None if partner == "JPN" else 0.0), (name, partner)


def test_every_step_and_reason_the_docs_name_is_exported_at_zero() -> None:
    # A monitoring trial: 35 schema refusals first appeared at 35, and increase() over
    # the hour said 0. Every step docs/NODE.md lists for refused messages, and every
    # reason an intake answer gives (docs/NODE.md, the intake's answers), starts at 0.
    text = " ".join((Path(__file__).parent.parent / "docs" / "NODE.md").read_text().split())
    listed = text.split("counted by reason (the checklist step: ", 1)[1].split(")", 1)[0]
    steps = re.findall(r"`([a-z]+)`", listed)
    assert len(steps) >= 15, listed
    assert set(steps) <= set(REJECTION_STEPS)
    reasons = re.findall(
        r'"reason": "([a-z]+)"', (Path(__file__).parent.parent / "broker" / "intake.py").read_text()
    )
    assert set(reasons) == set(INTAKE_REFUSALS) - {"token"}


def test_the_first_event_is_an_increase() -> None:
    metrics = Metrics("USA")
    labels = {"kind": "rollback", "log": "JPN"}
    before = sample(metrics, "msmt_audit_alarms_total", labels)
    metrics.audit_alarms.labels(**labels).inc()
    assert increase(before, sample(metrics, "msmt_audit_alarms_total", labels)) == 1.0
    # A label no step has still appears only with its first event.
    assert sample(metrics, "msmt_rejected_total", {"reason": "later"}) is None


def test_the_rendered_page_carries_the_zeros() -> None:
    page = Metrics("GBR").render().decode()
    assert 'msmt_audit_alarms_total{kind="twin",log="GBR"} 0.0' in page
    assert 'msmt_audit_alarm_active{kind="fork",log="JPN"} 0.0' in page
    # 11 logs that can fork or roll back, one that can have a twin: 23 series each.
    assert page.count("\nmsmt_audit_alarms_total{") == 23
    assert page.count("\nmsmt_audit_alarm_active{") == 23
    assert 'msmt_received_held_total{sender="JPN"} 0.0' in page
    assert 'msmt_received_held_total{sender="GBR"}' not in page


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1:9464", True),
        ("127.0.0.2", True),
        ("localhost:9464", True),
        ("LOCALHOST", True),
        ("[::1]:9464", True),
        ("::1", True),
        ("attacker.example:9464", False),
        ("10.0.0.5:9464", False),
        ("127.0.0.1.attacker.example", False),
        ("[::1", False),
        ("[::1]evil.example", False),
        ("[::1]:", False),
        ("localhost:evil", False),
        ("127.0.0.1:9464x", False),
        ("", False),
    ],
)
def test_a_host_header_is_loopback_only_if_it_names_this_machine(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


async def test_the_metrics_port_refuses_other_host_names_and_half_sent_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A security review: a page whose name an attacker points at 127.0.0.1 (DNS
    # rebinding) read the traffic figures from a browser on the node's machine; and
    # any local user could hold connections open until the node ran out of descriptors.
    monkeypatch.setattr(serving, "HEADER_TIMEOUT_S", 0.5)
    runner = await serve_tcp(make_app(Metrics("JPN"), lambda: None), "127.0.0.1", 0)
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/metrics"
            async with session.get(url) as ok:
                assert ok.status == 200
                assert "msmt_published_total" in await ok.text()
            async with session.get(url, headers={"Host": "attacker.example"}) as refused:
                assert refused.status == 421
                assert "msmt_" not in await refused.text()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and no more
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        await runner.cleanup()


def test_a_partial_deployment_exports_series_for_the_rosters_members_only() -> None:
    # A 3-member deployment's node exported every per-partner family at 0 for all ten
    # other MSMT members: dashboards and "by partner" tables listed seven that are not there.
    page = Metrics("JPN", {"JPN", "USA", "KOR"}).render().decode()
    for name, label in (
        ("msmt_received_total", "sender"),
        ("msmt_received_duplicate_total", "sender"),
        ("msmt_sender_budget_used_ratio", "sender"),
        ("msmt_published_total", "partner"),
        ("msmt_outbox_oldest_seconds", "partner"),
        ("msmt_partner_inbox_went_back_total", "partner"),
    ):
        shown = re.findall(rf'\n{name}{{{label}="([A-Z]+)"}} 0\.0', page)
        assert shown == ["USA", "KOR"], (name, shown)
    # Held, for all ten: a member the roster lacks is what a hold is for (a newer roster
    # elsewhere), and its first hold must count as an increase for MsmtReceivedHeld.
    held = re.findall(r'\nmsmt_received_held_total{sender="([A-Z]+)"} 0\.0', page)
    assert held == [m for m in MEMBERS if m != "JPN"]
    # Forks and rollbacks of the three logs, a twin of ours: 7 series each.
    assert page.count("\nmsmt_audit_alarms_total{") == 7
    assert page.count("\nmsmt_audit_alarm_active{") == 7
    assert 'msmt_audit_alarms_total{kind="fork",log="GBR"}' not in page
