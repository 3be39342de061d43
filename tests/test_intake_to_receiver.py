"""What the intake accepts, every partner accepts: feed record -> issue -> present -> receive.

The intake and the receiver check the same schema, but the receiver sees each
value as the originator signed it (its JSON form after ``leaf_values``), not as
the feed wrote it. A value whose signed form the receiver's own check refuses
(``1E-8`` for ``"0.00000001"``) is accepted at intake and then lost at every
partner, so these tests go the whole way through ``broker.envelope``.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from envelope_world import Node
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from broker import samples
from broker.sightings import leaf_values
from broker.transforms import Transform, variant_key
from broker.validation import InvalidRecordError, parse_new_record, parse_record

JPN, USA = Node("JPN"), Node("USA")
_PLAIN = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _templates() -> dict[str, dict[str, Any]]:
    # One JPN record of each shape that carries decimals: a vessel with cargo,
    # a crypto transfer, a fuel transfer; and a worker for the text fields.
    records = samples.generate(60, seed=4, originators=("JPN",))
    vessel = next(r for r in records if r["kind"] == "vessel" and "cargo" in r["vessel"])
    crypto = next(
        r for r in records if r["kind"] == "transfer" and r["transfer"]["category"] == "crypto"
    )
    fuel = next(
        r for r in records if r["kind"] == "transfer" and r["transfer"]["category"] == "fuel"
    )
    worker = next(r for r in records if r["kind"] == "worker")
    return {"vessel": vessel, "crypto": crypto, "fuel": fuel, "worker": worker}


TEMPLATES = _templates()


def _round_trip(record: dict[str, Any], variants: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields USA receives when JPN releases every field, then every variant, of ``record``.

    A partner is sent one form of a field, so the variants go in a second presentation
    of the same signed report, in place of the fields they reduce.
    """
    sighting = parse_record(json.dumps(record))
    issued = JPN.issue(sighting, variants=variants or {})
    exact = [k for k in issued.disclosures if "#" not in k]
    reduced = {k.partition("#")[0]: k for k in issued.disclosures if "#" in k}
    fields = dict(USA.receive(JPN.present(issued, "USA", exact)).fields)
    if reduced:
        keys = [reduced.get(k, k) for k in exact]
        fields |= USA.receive(JPN.present(issued, "USA", keys)).fields
    return fields


@pytest.mark.parametrize(
    ("template", "path", "value"),
    [
        ("crypto", "transfer.amount", "0.00000001"),  # one satoshi
        ("crypto", "transfer.amount", "0.000000000000000001"),  # one wei, in ETH
        ("fuel", "transfer.volume", "0.0000005"),
        ("vessel", "vessel.cargo.quantity_tonnes", "0.0000001"),
        ("vessel", "vessel.position.lat", "0.0000001"),
        ("vessel", "vessel.position.lat", "-0.0000001"),
        ("vessel", "vessel.position.lat", "0.0000000"),
        ("vessel", "vessel.position.lon", "-0.0000009"),
        ("fuel", "transfer.place.lat", "0.0000001"),
        ("fuel", "transfer.place.lon", "0.0000010"),
        ("vessel", "vessel.position.lat", "38.1250000"),
    ],
)
def test_a_tiny_decimal_reaches_the_partner_exactly_as_sent(
    template: str, path: str, value: str
) -> None:
    record = samples.edited(TEMPLATES[template], path, value)
    fields = _round_trip(record)
    # Positions are disclosed whole; the other decimals as themselves.
    head, _, name = path.rpartition(".")
    got = fields[head][name] if head in fields else fields[path]
    assert got == value


def test_tiny_amounts_and_positions_survive_rounding_and_coarsening() -> None:
    record = samples.edited(TEMPLATES["crypto"], "transfer.amount", "0.00000003")
    rounded = Transform.parse("round:0.00000002")
    key = variant_key("transfer.amount", rounded)
    value = rounded.apply("0.00000003", pseudonym_keys={}, path="transfer.amount")
    assert _round_trip(record, {key: value})[key] == value == "0.00000004"
    record = samples.edited(
        TEMPLATES["vessel"], "vessel.position", {"lat": "0.0000001", "lon": "-0.0000001"}
    )
    coarse = Transform.parse("coarsen:0.000001")
    key = variant_key("vessel.position", coarse)
    value = coarse.apply(record["vessel"]["position"], pseudonym_keys={}, path="vessel.position")
    assert _round_trip(record, {key: value})[key] == value


# --- the property: anything the intake accepts, a partner receives unchanged ------------

_WHOLE = st.text("0123456789", min_size=1, max_size=4)
# Leading zeros are drawn apart, or tiny values (below 1E-6, where str() of a
# Decimal turns to exponent form) would hardly ever come up.
_FRACTION = st.builds(
    lambda zeros, digits: "0" * zeros + digits,
    st.integers(0, 12),
    st.text("0123456789", max_size=8),
)
DECIMALS = st.builds(
    lambda sign, whole, frac: f"{sign}{whole}{'.' if frac else ''}{frac}",
    st.sampled_from(["", "", "-"]),
    _WHOLE,
    _FRACTION,
)
TIMES = st.builds(
    lambda when, digits: (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}T{when.hour:02d}:{when.minute:02d}:"
        f"{when.second:02d}{'.' if digits else ''}{f'{when.microsecond:06d}'[:digits]}Z"
    ),
    st.datetimes(min_value=datetime(1999, 12, 31), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    st.integers(0, 6),
)
TEXTS = st.text(min_size=0, max_size=205)
# Field path -> the values a feed might send there, valid and not.
EDITS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "vessel": {
        "observed_at": TIMES,
        "vessel.position.lat": DECIMALS,
        "vessel.position.lon": DECIMALS,
        "vessel.cargo.quantity_tonnes": DECIMALS,
        "vessel.name": TEXTS,
        "source.sensor": TEXTS,
    },
    "crypto": {
        "observed_at": TIMES,
        "transfer.amount": DECIMALS,
        "transfer.exchanges": st.lists(TEXTS, max_size=3),
    },
    "fuel": {
        "transfer.volume": DECIMALS,
        "transfer.place.lat": DECIMALS,
        "transfer.place.lon": DECIMALS,
        "transfer.vessels": st.lists(
            st.fixed_dictionaries({"name": TEXTS}), min_size=1, max_size=3
        ),
    },
    "worker": {
        "observed_at": TIMES,
        "worker.workers": st.integers(-2, 100_002),
        "worker.location": TEXTS,
        "worker.employer": TEXTS,
    },
}
_ROUND = {"transfer.amount": "round:0.00000001", "transfer.volume": "round:1000"}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(st.data())
def test_whatever_the_intake_accepts_a_partner_receives_unchanged(data: st.DataObject) -> None:
    template = data.draw(st.sampled_from(sorted(EDITS)))
    edits = EDITS[template]
    paths = data.draw(st.lists(st.sampled_from(sorted(edits)), min_size=1, unique=True))
    record = TEMPLATES[template]
    sent: dict[str, Any] = {}
    for path in paths:
        sent[path] = data.draw(edits[path], label=path)
        record = samples.edited(record, path, sent[path])
    try:
        # As the intake reads a feed's record: with the text rules for new reports.
        sighting = parse_new_record(json.dumps(record))
    except InvalidRecordError:
        reject()
    exact = leaf_values(sighting)
    variants = {}
    for path, ident in _ROUND.items():
        if path in exact:
            transform = Transform.parse(ident)
            variants[variant_key(path, transform)] = transform.apply(
                exact[path], pseudonym_keys={}, path=path
            )
    fields = _round_trip(record, variants)
    # Every signed field arrives, and is what the originator signed.
    assert fields == {**exact, **variants}
    # The decimals are plain and mean exactly what the feed sent.
    for path, text in sent.items():
        if edits[path] is DECIMALS:
            head, _, name = path.rpartition(".")
            got = fields[head][name] if head in fields else fields[path]
            assert _PLAIN.fullmatch(got), (path, got)
            assert Decimal(got) == Decimal(text)
