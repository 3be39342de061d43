"""When a part batch waits for company (``receiver_pull.Linger``; pure: no node, no hub)."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from broker.receiver_pull import (
    LINGER_COMPANY,
    LINGER_S,
    RATE_SAMPLE,
    Linger,
    hold_delay,
    hub_pending,
    published_at,
)


def fed(rate: float, count: int = RATE_SAMPLE, start: float = 1000.0) -> Linger:
    """A ``Linger`` that saw ``count`` deliveries at ``rate`` per second, ending now."""
    pace = Linger(LINGER_S)
    for n in range(count):
        pace.arrived(start + n / rate)
    return pace


def test_a_light_load_is_not_held_back() -> None:
    # At 20 reports/s a 60 ms wait gathered ~1 more: a lone report waited for nothing.
    assert fed(20.0).wait(pending=0) == 0.0


def test_a_steady_trickle_waits_for_company() -> None:
    # At 100/s e2e's receivers gathered ~6 a commit: the linger's saving is kept.
    assert fed(100.0).wait(pending=0) == LINGER_S
    assert fed(1000.0).wait(pending=0) == LINGER_S


def test_the_threshold_is_the_expected_company() -> None:
    slowest = LINGER_COMPANY / LINGER_S  # deliveries/s that bring the company within the wait
    assert fed(slowest * 1.01).wait(pending=0) == LINGER_S
    assert fed(slowest * 0.99).wait(pending=0) == 0.0


def test_too_few_arrivals_say_nothing_of_a_rate() -> None:
    assert Linger(LINGER_S).wait(pending=0) == 0.0
    assert fed(1000.0, count=RATE_SAMPLE - 1).wait(pending=0) == 0.0


def test_a_lone_report_after_a_pause_is_not_held_back() -> None:
    pace = fed(200.0)
    pace.arrived(1000.0 + 5.0)  # five seconds of nothing, then one
    assert pace.wait(pending=0) == 0.0


def test_deliveries_already_waiting_are_company() -> None:
    # A node kept off the cores sees a steady stream late and bunched: the span of
    # its last arrivals looks slow, but what came while it verified says otherwise.
    pace = fed(200.0)
    pace.arrived(1000.0 + 0.5)
    pace.arrived(1000.0 + 0.5)
    assert pace.wait(pending=0, waiting=1) == 0.0
    assert pace.wait(pending=0, waiting=int(LINGER_COMPANY)) == LINGER_S


def test_what_the_hub_still_holds_is_worth_waiting_for() -> None:
    # A backlog (a pre-filled inbox, a partner back after an outage) comes at once.
    assert Linger(LINGER_S).wait(pending=1) == LINGER_S
    assert fed(1.0).wait(pending=40) == LINGER_S


def test_no_linger_configured_never_waits() -> None:
    pace = Linger(0.0)
    for n in range(RATE_SAMPLE):
        pace.arrived(float(n) / 1000)
    assert pace.wait(pending=5) == 0.0


def test_a_rate_needs_two_arrivals() -> None:
    with pytest.raises(ValueError, match="two arrivals"):
        Linger(LINGER_S, sample=1)


@pytest.mark.parametrize(
    ("reply", "pending"),
    [
        # nats-server's two $JS.ACK forms: without and with the domain and account hash.
        ("$JS.ACK.INBOX_USA.inbox.1.5011.4002.1764900000000000000.7", 7),
        ("$JS.ACK.hub.ACCHASH.INBOX_USA.inbox.1.5011.4002.1764900000000000000.0.k3Y", 0),
        ("$JS.ACK.hub.ACCHASH.INBOX_USA.inbox.2.5011.4002.1764900000000000000.31.k3Y", 31),
        ("_INBOX.not.an.ack.subject", 0),  # not the hub's: no backlog to wait for
    ],
)
def test_pending_is_read_from_the_ack_subject(reply: str, pending: int) -> None:
    msg = Msg(_client=None, subject="from.JPN.msmt.to.USA.sighting", reply=reply, data=b"")  # type: ignore[arg-type]
    assert hub_pending(msg) == pending


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.s.c.x.1.1.1.0",  # an id that is no number
        "$JS.ACK.s.c.1.1.1.99999999999999999999999999.0",  # a time out of range
        "_INBOX.x",  # not an ack subject at all
    ],
)
def test_a_malformed_ack_subject_costs_a_held_message_nothing(reply: str) -> None:
    # A fuzzer: hold_delay and the hub's publish time of a held message read nats-py's
    # parse of the subject unguarded, and the error stopped the node.
    msg = Msg(_client=None, subject="from.JPN.msmt.to.USA.sighting", reply=reply, data=b"")  # type: ignore[arg-type]
    assert hold_delay(60.0, msg) == 60.0  # as a first delivery
    assert published_at(msg) is None  # unknown: the receiver counts from now
    assert hub_pending(msg) == 0
