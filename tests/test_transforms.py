"""Release transforms: each output has the schema's shape and stays close to the input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.field_check import validate_field
from broker.sightings import Position
from broker.transforms import Transform, split_variant_key, variant_key

NO_KEYS: dict[str, bytes] = {}
KEYS = {"k1": b"\x01" * 32, "k2": b"\x02" * 32}


def coarsen(grid: str, lat: str, lon: str) -> dict[str, str]:
    out = Transform.parse(f"coarsen:{grid}").apply(
        {"lat": lat, "lon": lon}, pseudonym_keys=NO_KEYS, path="vessel.position"
    )
    assert isinstance(out, dict)
    return out


@pytest.mark.parametrize(
    ("grid", "lat", "lon", "expected"),
    [
        ("0.5", "36.4652", "124.2874", {"lat": "36.25", "lon": "124.25"}),
        ("1", "-0.1", "-0.1", {"lat": "-0.5", "lon": "-0.5"}),
        # Integral centres must stay plain decimals, not "1.3E+2".
        ("4", "10", "129", {"lat": "10", "lon": "130"}),
        # Tiny grids must not give "5E-7".
        ("0.000001", "0.0000001", "0", {"lat": "0.0000005", "lon": "0.0000005"}),
        # Poles and the antimeridian: the centre stays in range.
        ("0.5", "90", "180", {"lat": "89.75", "lon": "179.75"}),
        ("1.3", "-90", "-180", {"lat": "-89.05", "lon": "-178.75"}),
    ],
)
def test_coarsen_gives_plain_in_range_cell_centres(
    grid: str, lat: str, lon: str, expected: dict[str, str]
) -> None:
    out = coarsen(grid, lat, lon)
    assert out == expected
    Transform.parse(f"coarsen:{grid}").check_output(out)


@settings(max_examples=300)
@given(
    grid=st.decimals(min_value="0.000001", max_value="10", places=6),
    lat=st.decimals(min_value=-90, max_value=90, places=7),
    lon=st.decimals(min_value=-180, max_value=180, places=7),
)
def test_coarsen_output_is_a_valid_position_near_the_input(
    grid: Decimal, lat: Decimal, lon: Decimal
) -> None:
    ident = f"coarsen:{format(grid.normalize(), 'f')}"
    transform = Transform.parse(ident)
    out = transform.apply(
        {"lat": str(lat), "lon": str(lon)}, pseudonym_keys=NO_KEYS, path="vessel.position"
    )
    transform.check_output(out)
    Position.model_validate({"lat": out["lat"], "lon": out["lon"]})
    validate_field("vessel", "vessel.position", out)
    # Within one and a half cells of the truth (half a cell, plus one cell where
    # a pole or the antimeridian moved the centre to the neighbouring cell).
    assert abs(Decimal(out["lat"]) - lat) <= grid * Decimal("1.5")
    assert abs(Decimal(out["lon"]) - lon) <= grid * Decimal("1.5")


@settings(max_examples=300)
@given(
    step=st.decimals(min_value="0.0001", max_value="100000", places=4),
    amount=st.decimals(min_value="0.0001", max_value="1000000000000", places=4),
)
def test_round_gives_the_nearest_multiple_as_plain_decimal(step: Decimal, amount: Decimal) -> None:
    ident = f"round:{format(step.normalize(), 'f')}"
    transform = Transform.parse(ident)
    out = transform.apply(str(amount), pseudonym_keys=NO_KEYS, path="transfer.amount")
    transform.check_output(out)
    assert "E" not in out
    value = Decimal(out)
    assert value % step == 0
    assert abs(value - amount) <= step / 2


def test_round_keeps_precision_for_huge_amounts() -> None:
    out = Transform.parse("round:10").apply(
        "1" + "0" * 40 + "4", pseudonym_keys=NO_KEYS, path="transfer.amount"
    )
    assert out == "1" + "0" * 41


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
def test_hour_truncates_to_the_hour(when: datetime) -> None:
    when = when.replace(tzinfo=UTC)
    text = when.isoformat().replace("+00:00", "Z")
    transform = Transform.parse("hour")
    out = transform.apply(text, pseudonym_keys=NO_KEYS, path="observed_at")
    transform.check_output(out)
    truncated = datetime.fromisoformat(out)
    assert truncated <= when < truncated + timedelta(hours=1)
    assert truncated.minute == truncated.second == truncated.microsecond == 0


def test_pseudonym_is_keyed_and_separated_by_field() -> None:
    transform = Transform.parse("pseudonym:k1")
    a = transform.apply("9575565", pseudonym_keys=KEYS, path="vessel.imo")
    transform.check_output(a)
    assert a == transform.apply("9575565", pseudonym_keys=KEYS, path="vessel.imo")
    assert a != transform.apply("9575566", pseudonym_keys=KEYS, path="vessel.imo")
    assert a != transform.apply("9575565", pseudonym_keys=KEYS, path="vessel.counterpart")
    other = Transform.parse("pseudonym:k2")
    b = other.apply("9575565", pseudonym_keys=KEYS, path="vessel.imo")
    assert b.split(":")[2] != a.split(":")[2]
    with pytest.raises(ValueError, match="pseudonym must look like"):
        transform.check_output(b)
    with pytest.raises(ValueError, match="no pseudonym key"):
        Transform.parse("pseudonym:k3").apply("x", pseudonym_keys=KEYS, path="vessel.name")


@pytest.mark.parametrize(
    ("ident", "reason"),
    [
        ("blur", "unknown transform"),
        ("hour:2", "takes no parameter"),
        ("coarsen", "needs a parameter"),
        ("coarsen:0", "positive"),
        ("coarsen:11", "at most 10 degrees"),
        ("coarsen:0.0000001", "at most 6 decimal places"),
        ("coarsen:1E-3", "plain positive decimal"),
        ("round: 5", "plain positive decimal"),
        ("round:NaN", "plain positive decimal"),
        ("round:-1", "plain positive decimal"),
        ("pseudonym:bad key", "key id"),
    ],
)
def test_bad_transform_ids_are_refused(ident: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Transform.parse(ident)


def test_applies_to_and_variant_keys() -> None:
    assert Transform.parse("coarsen:0.5").applies_to("vessel.position")
    assert not Transform.parse("coarsen:0.5").applies_to("vessel.imo")
    assert Transform.parse("hour").applies_to("observed_at")
    assert Transform.parse("round:1").applies_to("transfer.volume")
    assert not Transform.parse("pseudonym:k1").applies_to("source.sensor")
    t = Transform.parse("coarsen:0.5")
    assert variant_key("vessel.position", t) == "vessel.position#coarsen:0.5"
    assert variant_key("vessel.position", None) == "vessel.position"
    assert split_variant_key("vessel.position#coarsen:0.5") == ("vessel.position", t)


@pytest.mark.parametrize(
    "ident",
    ["CNRYXFORM", "CNRY:1", "coarsen:CNRY", "round:CNRY1", "round:1CNRY", "coarsen:-CNRY"],
)
def test_a_refused_transform_id_is_not_quoted(ident: str) -> None:
    # A receiver parses the ids in a sender's disclosure keys; its reasons reach its audit log.
    with pytest.raises(ValueError, match=r"transform|step") as err:
        Transform.parse(ident)
    assert "CNRY" not in str(err.value)


@pytest.mark.parametrize(
    ("ident", "value", "sent"),
    [
        ("pseudonym:CNRYPSEUD50", "hmac-sha256:CNRYPSEUD50:x", "CNRYPSEUD50"),
        ("pseudonym:CNRYPSEUD50", "9575565", "CNRYPSEUD50"),
        ("coarsen:0.654321", {"lat": "38.5", "lon": "124.5"}, "0.654321"),
        ("round:987654321", "5", "987654321"),
    ],
)
def test_a_refused_output_does_not_quote_the_parameter(
    ident: str, value: object, sent: str
) -> None:
    # The parameter is part of the disclosure key a sender chose: described, not quoted.
    with pytest.raises(ValueError, match="variant's") as err:
        Transform.parse(ident).check_output(value)
    assert sent not in str(err.value)
