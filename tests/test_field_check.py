"""The per-field schema check a receiver runs (``validate_field``) against its JSON oracle.

``validate_field`` first offers a value to the field's adapter in strict Python
mode and only falls back to strict JSON mode (the value re-serialised and
parsed again) when that refuses. The fallback is what the check always was, so
the oracle below is the original function, kept verbatim: on real values, and
on hostile ones around every field's edges, both must accept the same values
and refuse the rest with the same reason.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker import envelope_format, field_check, identifiers, samples
from broker.errors import EnvelopeError
from broker.field_check import validate_field
from broker.sightings import (
    KINDS,
    SIGHTING_ADAPTER,
    Position,
    field_paths,
    leaf_values,
)
from broker.transforms import Transform, split_variant_key

_adapter = functools.cache(field_check._field_adapter)


def _oracle(kind: str, path: str, value: Any, chain: str | None = None) -> None:
    # validate_field as it was before the Python-mode fast path (commit 42c41c3).
    try:
        if path == "observed_at":
            field_check._TIME_ADAPTER.validate_json(json.dumps(value), strict=True)
            return
        head, _, name = path.partition(".")
        if head not in ("source", kind) or not name or "." in name:
            # With the reason it gives now: a path is named only if it is a known one.
            known = any(path in field_paths(k) for k in KINDS)
            raise ValueError(
                f"{repr(path) if known else 'a path that'} is not a field of {kind} reports"
            )
        adapter = _adapter(head, name)
        adapter.validate_json(json.dumps(value), strict=True)
    except ValidationError as exc:
        # With the reason it gives now for a lone surrogate, which json.dumps escapes.
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"{path}: holds a lone surrogate escape (\\ud800-\\udfff not in a pair),"
                " which is no Unicode character"
            ) from None
        first = exc.errors()[0]
        raise ValueError(f"{path}: {str(first['msg']).removeprefix('Value error, ')}") from None
    if kind == "transfer" and name in ("from_addresses", "to_addresses", "tx_hash"):
        chains = [chain] if chain else ["bitcoin", "ethereum"]
        items = value if isinstance(value, list) else [value]
        check = identifiers.check_tx_hash if name == "tx_hash" else identifiers.check_address
        for item in items:
            errors = []
            for candidate in chains:
                try:
                    check(candidate, item)
                    break
                except ValueError as exc:
                    errors.append(str(exc))
            else:
                raise ValueError(f"{path}: {errors[0]}")


def _outcome(fn: Any, *args: Any) -> tuple[str, str]:
    try:
        fn(*args)
    except ValueError as exc:
        return "refused", str(exc)
    except Exception as exc:  # noqa: BLE001 - recorded and compared, not swallowed
        return type(exc).__name__, str(exc)
    return "accepted", ""


def _assert_same(kind: str, path: str, value: Any, chain: str | None = None) -> None:
    expected = _outcome(_oracle, kind, path, value, chain)
    assert _outcome(validate_field, kind, path, value, chain) == expected, (kind, path, value)


# Real values: every field of a few hundred generated reports of all kinds.
REAL: list[tuple[str, str, Any, str | None]] = []
for _record in samples.generate(240, seed=9):
    _sighting = SIGHTING_ADAPTER.validate_json(json.dumps(_record))
    _leaves = leaf_values(_sighting)
    _chain = _leaves.get("transfer.chain")
    REAL += [(_sighting.kind, p, v, _chain) for p, v in _leaves.items()]
PATHS = [(kind, path) for kind in KINDS for path in field_paths(kind)]


@pytest.mark.parametrize(
    ("path", "text", "code"),
    [
        ("vessel.name", "SEA\nSTAR", "U+000A"),
        ("vessel.cargo", {"type": "coal", "description": "a\tb"}, "U+0009"),
        ("worker.employer", "Ace\x1b[8m", "U+001B"),
        ("worker.location", "Vladivostok\x85", "U+0085"),
        ("source.sensor", "SAR\u2029", "U+2029"),
        ("transfer.exchanges", ["Ex", "Ch\x7f"], "U+007F"),
    ],
)
def test_text_with_a_control_character_or_line_break_is_refused_naming_it(
    path: str, text: Any, code: str
) -> None:
    # A partner's name could otherwise split a line or hide text in an
    # analyst's terminal, log or STIX tool; the reason names the character.
    head = path.partition(".")[0]
    kind = head if head in KINDS else "vessel"
    with pytest.raises(ValueError, match=re.escape(code)) as info:
        validate_field(kind, path, text)
    assert str(info.value).startswith(path + ": ")
    with pytest.raises(ValueError, match=re.escape(code)):
        _oracle(kind, path, text)


def test_single_line_unicode_text_is_accepted() -> None:
    # The zero-width non-joiner and joiner some scripts need (Persian, emoji) are text.
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    for text in ("Chon Ma San", "Jin Kang 진강", "Société Générale", "أ ب ت", "x" * 200, persian):
        validate_field("vessel", "vessel.name", text)
        _oracle("vessel", "vessel.name", text)


def test_real_values_are_accepted_by_both_and_by_the_fast_path() -> None:
    assert {(k, p) for k, p, _, _ in REAL} == set(PATHS)
    for kind, path, value, chain in REAL:
        validate_field(kind, path, value, chain)
        _oracle(kind, path, value, chain)
        # The point of the change: valid values never need the JSON round trip.
        if path == "observed_at":
            assert field_check._passes(field_check._TIME_ADAPTER, value, strings=True)
        else:
            head, _, name = path.partition(".")
            adapter = field_check._ADAPTERS[(head, name)]
            assert field_check._passes(adapter, field_check._plain(value)), (path, value)


# Digits, separators and case that sit on the edges of the fields' formats;
# whitespace, NUL, ESC, NEL, LINE SEPARATOR, non-ASCII digits (Arabic-Indic
# three, fullwidth zero) and lone surrogates, which a JSON parser can produce
# from escapes.
_HOSTILE_CHARS = [
    *"0123456789.-+:TZz eE\t\n/_aA#\x00\x1b\x85\u2028\u00e9\u0663\uff10\ud800\udfff",
    "",
    "  ",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.lists(st.sampled_from(_HOSTILE_CHARS), max_size=12).map("".join),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _edit_text(draw: st.DrawFn, value: str) -> Any:
    chars = list(value)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(chars)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "case"]))
        char = draw(st.sampled_from(_HOSTILE_CHARS))
        if op == "insert":
            chars.insert(at, char)
        elif at < len(chars):
            chars[at] = {"delete": "", "replace": char, "case": chars[at].swapcase()}[op]
    # Only a short ASCII digit string becomes a number: value * 30 compounds
    # over draws, and int() refuses more than 4,300 digits (and "²" at all).
    as_int = int(value) if value.isascii() and value.isdigit() and len(value) < 40 else value
    return draw(st.sampled_from(["".join(chars), value, value * 30, as_int]))


def _edit_object(draw: st.DrawFn, value: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    out = dict(value)
    op = draw(st.sampled_from(["drop", "add", "change", "null"]))
    name = draw(st.sampled_from(sorted(out) or ["x"]))
    if op == "drop":
        out.pop(name, None)
    elif op == "add":
        out[draw(st.sampled_from([*keys, "extra"]))] = draw(scalars)
    elif op == "null":
        out[name] = None
    else:
        out[name] = draw(mutated(out.get(name, ""), keys))
    return out


def _edit_array(draw: st.DrawFn, value: list[Any], keys: list[str]) -> list[Any]:
    op = draw(st.sampled_from(["item", "empty", "repeat", "nest", "drop"]))
    at = draw(st.integers(0, max(len(value) - 1, 0)))
    edits: dict[str, Callable[[], list[Any]]] = {
        "empty": list,
        "repeat": lambda: value * draw(st.integers(2, 60)),
        "nest": lambda: [value],
        "drop": lambda: value[1:],
        "item": lambda: [*value[:at], draw(mutated(value[at], keys)), *value[at + 1 :]],
    }
    return edits[op if value else "empty"]()


@st.composite
def mutated(draw: st.DrawFn, value: Any, keys: list[str]) -> Any:
    """A JSON value near ``value``: a string edited, a member dropped or changed, a type swapped."""
    if isinstance(value, str):
        return _edit_text(draw, value)
    if isinstance(value, int) and not isinstance(value, bool):
        return draw(st.sampled_from([value, -value, value + 1, float(value), str(value), True, 0]))
    if isinstance(value, dict):
        return _edit_object(draw, value, keys)
    if isinstance(value, list):
        return _edit_array(draw, value, keys)
    return draw(json_values)


_KEYS = ["lat", "lon", "imo", "mmsi", "name", "platform", "handle", "type", "quantity_tonnes"]
_TIMES = [
    "2026-10-28T08:46:00Z",
    "2026-10-28T08:46:00+00:00",
    "2026-10-28T08:46:00-00:00",
    "2026-10-28T08:46:00.123456789Z",
    "2026-10-28T08:46:60Z",
    "2026-02-29T00:00:00Z",
    "2026-10-28 08:46:00Z",
    "2026-10-28t08:46:00z",
    "2026-10-28T08:46Z",
    "2026-10-28",
    "20261028T084600Z",
    "2026-10-28T08:46:00+0000",
    "2026-10-28T08:46:00+01:00",
    "1700000000",
    "+002026-10-28T08:46:00Z",
]
_DECIMALS = [
    "38.1",
    "-0.5",
    "90",
    "90.0000001",
    "-180",
    "1e2",
    "1.",
    ".5",
    "\u0663\u0668.\u0661",
    "0x10",
    " 1",
    "1_0",
]


_WHOLE = st.sampled_from(["0", "00", "9", "89", "90", "91", "179", "180", "181", "0090", "1000"])
# Plain decimals around the ranges' edges (7 vs 8 places, 90/180), and hostile ones.
_PLAIN = st.builds(
    lambda sign, whole, frac: f"{sign}{whole}{'.' if frac else ''}{frac}",
    st.sampled_from(["", "-"]),
    _WHOLE,
    st.text("0123456789", max_size=9),
)
_HOSTILE = st.builds(
    lambda sign, whole, dot, frac, tail: f"{sign}{whole}{dot}{frac}{tail}",
    st.sampled_from(["", "-", "+"]),
    st.one_of(st.just(""), _WHOLE),
    st.sampled_from(["", ".", ".", ","]),
    st.text("0123456789", max_size=9),
    st.sampled_from(["", "\n", " ", "e1", "E-2", "x", "\u0663"]),
)
_DEGREES = st.one_of(_PLAIN, _PLAIN, _HOSTILE)
_POSITIONS = st.one_of(
    st.fixed_dictionaries({"lat": _DEGREES, "lon": _DEGREES}),
    st.fixed_dictionaries({"lat": _DEGREES}),
    st.fixed_dictionaries({"lat": _DEGREES, "lon": _DEGREES, "alt": _DEGREES}),
    st.fixed_dictionaries({"lat": _DEGREES, "lng": _DEGREES}),
    st.fixed_dictionaries(
        {"lat": st.one_of(_DEGREES, scalars), "lon": st.one_of(_DEGREES, scalars)}
    ),
)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from([("vessel", "vessel.position"), ("transfer", "transfer.place")]), _POSITIONS)
def test_positions_get_the_oracles_answer(field: tuple[str, str], value: dict[str, Any]) -> None:
    # Positions have their own shortcut (plain decimals in range): around every
    # edge of it (signs, 90/180, 7 vs 8 places, exponents, a trailing newline)
    # the answer must be the schema's.
    _assert_same(*field, value)


def test_the_position_shortcut_takes_real_positions_and_only_plain_ones() -> None:
    real = [v for _, p, v, _ in REAL if p in ("vessel.position", "transfer.place")]
    assert real
    assert all(field_check.is_plain_position(v) for v in real)
    edges = {"90.0000000": True, "-90": True, "-0": True, "090": True, "90.0000001": False}
    edges |= dict.fromkeys(["1.12345678", "+1", "1.", ".5", "1e1", "1\n", "\u0663", "1,5"], False)
    cases = [({"lat": text, "lon": "0"}, plain) for text, plain in edges.items()]
    cases += [
        ({"lat": "0", "lon": text}, plain) for text, plain in edges.items() if "9" not in text
    ]
    lon_edges = {"180.0000000": True, "-180": True, "180.0000001": False, "-180.0000001": False}
    cases += [({"lat": "0", "lon": text}, plain) for text, plain in lon_edges.items()]
    for value, plain in cases:
        assert field_check.is_plain_position(value) is plain, value
        _assert_same("vessel", "vessel.position", value)


@settings(max_examples=800, deadline=None)
@given(st.data())
def test_near_valid_values_get_the_oracles_answer(data: st.DataObject) -> None:
    kind, path, value, chain = data.draw(st.sampled_from(REAL))
    value = data.draw(
        st.one_of(
            mutated(value, _KEYS),
            json_values,
            st.sampled_from(_TIMES + _DECIMALS),
            st.sampled_from([v for k, p, v, _ in REAL[:200]]),  # another field's value
            st.builds(lambda la, lo: {"lat": la, "lon": lo}, *[st.sampled_from(_DECIMALS)] * 2),
        )
    )
    chain = data.draw(st.sampled_from([chain, None, "bitcoin", "ethereum", "dogecoin"]))
    _assert_same(kind, path, value, chain)


@given(st.sampled_from(PATHS), json_values)
def test_arbitrary_json_gets_the_oracles_answer(field: tuple[str, str], value: Any) -> None:
    _assert_same(*field, value)


@pytest.mark.parametrize(
    "value",
    [
        ("tuple", "not JSON"),
        {"lat": "1", "lon": "2", 3: "int key"},
        float("nan"),
        float("inf"),
        b"bytes",
        [[["deep"]]],
        "a\ud800b",
    ],
    ids=repr,
)
def test_values_outside_json_go_the_json_way(value: Any) -> None:
    # Not produced by a JSON parser, but validate_field is public: same answer as before.
    for kind, path in PATHS:
        _assert_same(kind, path, value)


def test_unknown_paths_are_refused_alike() -> None:
    for kind, path in [
        ("vessel", "worker.country"),
        ("vessel", "vessel"),
        ("worker", "source.x.y"),
    ]:
        _assert_same(kind, path, "x")
    with pytest.raises(ValueError, match="no field"):
        validate_field("vessel", "vessel.nope", "x")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("vessel.CNRY.x", "a path that is not a field of vessel reports"),
        ("CNRY.imo", "a path that is not a field of vessel reports"),
        ("vessel.CNRYFIELDNAME34", "vessel has no field of that name"),
        ("worker.employer", "'worker.employer' is not a field of vessel reports"),
    ],
)
def test_an_unknown_path_is_named_only_if_it_is_a_known_one(path: str, reason: str) -> None:
    # A path may be a sender's disclosure name, and the reason may reach an audit log.
    with pytest.raises(ValueError, match=f"^{re.escape(reason)}$"):
        validate_field("vessel", path, "x")


def test_check_fields_does_not_quote_a_disclosure_name() -> None:
    with pytest.raises(EnvelopeError) as err:
        envelope_format.check_fields("vessel", {"vessel.CNRYFIELDNAME34": "x"})
    assert "CNRY" not in str(err.value)
    assert (
        err.value.reason == "a disclosure name that is not a field of vessel reports (schema 1.0)"
    )


# --- Transform.check_output("coarsen") and variant keys ----------------------------------


def _coarsen_oracle(transform: Transform, value: Any) -> None:
    # Transform.check_output for coarsen before its shortcut (commit a737467),
    # plus what it checks now: the value is a cell centre, as the transform writes it.
    Position.model_validate_json(rfc8785.dumps(value))
    if transform.apply(value, pseudonym_keys={}, path="vessel.position") != value:
        raise ValueError("not a cell centre")


_COARSEN = [Transform.parse(f"coarsen:{g}") for g in ("0.5", "1", "0.000001", "10", "1.3")]
_COARSENED_BY = [
    (t, t.apply(v, pseudonym_keys={}, path=p))
    for _, p, v, _ in REAL
    if p in ("vessel.position", "transfer.place")
    for t in _COARSEN
]
_COARSENED = [value for _, value in _COARSENED_BY]


def _assert_coarsen_same(value: Any) -> None:
    for transform in _COARSEN[:2]:
        expected = _outcome(_coarsen_oracle, transform, value)
        got = _outcome(transform.check_output, value)
        assert got[0] == expected[0], value
        # pydantic's own text would quote the value into a receiver's audit entry.
        assert "input_value" not in got[1]
        assert repr(value) not in got[1]


def test_real_coarsened_positions_take_the_shortcut_and_pass_both() -> None:
    assert len(_COARSENED) > 100
    for transform, value in _COARSENED_BY:
        assert field_check.is_plain_position(value), value
        _assert_coarsen_same(value)
        assert _outcome(transform.check_output, value) == ("accepted", "")
        assert _outcome(_coarsen_oracle, transform, value) == ("accepted", "")


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        _POSITIONS, json_values, st.sampled_from(_COARSENED).flatmap(lambda v: mutated(v, _KEYS))
    )
)
def test_coarsen_check_gets_the_oracles_answer(value: Any) -> None:
    # The shortcut may only accept what the schema accepts; everything else
    # goes to the original check, so refusals keep their type and reason.
    _assert_coarsen_same(value)


@pytest.mark.parametrize(
    "value",
    [
        {"lat": float("nan"), "lon": "1"},
        {"lat": 2**60, "lon": "1"},
        {"lat": "1", "lon": "2", 3: "int key"},
        {"lat": "a\ud800", "lon": "1"},
        {"lat": b"1", "lon": "1"},
        ("1", "2"),
        None,
        2**53,  # rfc8785 refuses it, and its own reason quoted the number (Hypothesis found it)
    ],
    ids=repr,
)
def test_coarsen_check_on_values_outside_json_answers_as_before(value: Any) -> None:
    _assert_coarsen_same(value)


_IDENTS = [
    "coarsen:0.5",
    "coarsen:0.50",
    "coarsen:11",
    "coarsen:",
    "coarsen:0.0000001",
    "round:1",
    "round:NaN",
    "hour",
    "hour:1",
    "pseudonym:k1",
    "pseudonym:bad key",
    "nope:1",
    "",
]


@given(st.lists(st.sampled_from(_IDENTS) | st.text(max_size=14), min_size=1, max_size=6))
def test_variant_keys_split_as_transform_parse_says_every_time(idents: list[str]) -> None:
    # split_variant_key caches parsed transforms: repeated and interleaved keys,
    # good and bad, must each get what Transform.parse gives, every time.
    for ident in idents * 2:
        expected = _outcome(Transform.parse, ident)
        assert _outcome(split_variant_key, f"vessel.position#{ident}") == expected
        if expected[0] == "accepted":
            assert split_variant_key(f"vessel.position#{ident}") == (
                "vessel.position",
                Transform.parse(ident),
            )


# --- fields_plainly_valid and check_fields: the batch shortcut -----------------------------


def _check_field_oracle(kind: str, key: str, value: Any, chain: str | None) -> None:
    path, transform = split_variant_key(key)
    if path not in field_paths(kind):
        raise ValueError(f"not a field of {kind} reports")
    if transform is None:
        validate_field(kind, path, value, chain)
        return
    if not transform.applies_to(path):
        raise ValueError(f"{transform.name} does not apply to this field")
    transform.check_output(value)


# A variant is named by its transform's general form, never the parameter it was sent with.
_FORMS = {
    "coarsen": "coarsen:<deg>",
    "round": "round:<step>",
    "hour": "hour",
    "pseudonym": "pseudonym:<key id>",
}


def _check_fields_oracle(kind: str, fields: dict[str, Any]) -> None:
    # envelope_format.check_fields before its batch shortcut (commit fa42ec2),
    # with the reasons it gives now.
    if kind == "transfer":
        envelope_format._check_one_category(fields)

    def named(key: str) -> str:
        path, sep, ident = key.partition("#")
        form = _FORMS.get(ident.partition(":")[0])
        return (f"{path}#{form}" if form else f"a variant of {path}") if sep else path

    # One form per known field, none null: the first key (in order) that breaks it.
    first: dict[str, str] = {}
    for key, value in fields.items():
        path = key.partition("#")[0]
        if path not in field_paths(kind):
            continue
        if value is None:
            reason = (
                f"{named(key)}: null; a field the report does not have is left out, not disclosed"
            )
            raise EnvelopeError("schema", reason)
        if path in first:
            forms = " and ".join(sorted({first[path], named(key)}))
            reason = f"{path} is disclosed twice, as {forms}; a partner is sent one form of a field"
            raise EnvelopeError("schema", reason)
        first[path] = named(key)
    chain = fields.get("transfer.chain")
    for key, value in fields.items():
        try:
            _check_field_oracle(kind, key, value, chain if isinstance(chain, str) else None)
        except ValueError as exc:
            path = key.partition("#")[0]
            if path not in field_paths(kind):
                reason = f"a disclosure name that is not a field of {kind} reports (schema 1.0)"
                raise EnvelopeError("schema", reason) from None
            why = str(exc).removeprefix(path + ": ")
            raise EnvelopeError("schema", f"{named(key)}: {why} (schema 1.0)") from None


REPORTS: list[tuple[str, dict[str, Any]]] = []
for _record in samples.generate(120, seed=11):
    _sighting = SIGHTING_ADAPTER.validate_json(json.dumps(_record))
    REPORTS.append((_sighting.kind, leaf_values(_sighting)))


def test_real_reports_take_the_batch_shortcut() -> None:
    assert {kind for kind, _ in REPORTS} == set(KINDS)
    for kind, fields in REPORTS:
        chain = fields.get("transfer.chain")
        assert field_check.fields_plainly_valid(kind, fields, chain), fields
        assert envelope_format._plainly_valid(kind, fields, chain)
        with_variant = {**fields, "observed_at#hour": "2026-10-28T08:00:00Z"}
        assert envelope_format._plainly_valid(kind, with_variant, chain)


def _check_outcome(fn: Any, *args: Any) -> tuple[str, str]:
    try:
        fn(*args)
    except EnvelopeError as exc:
        return exc.step, exc.reason
    return "accepted", ""


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_check_fields_gets_the_loops_answer(data: st.DataObject) -> None:
    # A real report's fields with some changed, added, dropped or swapped for
    # another kind's, and variants good and bad: the shortcut may only say
    # "valid" when every field is, and check_fields names the same field.
    kind, fields = data.draw(st.sampled_from(REPORTS))
    fields = dict(fields)
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["mutate", "drop", "add", "variant", "foreign"]))
        key = data.draw(st.sampled_from(sorted(fields) or ["observed_at"]))
        if op == "mutate":
            fields[key] = data.draw(mutated(fields.get(key, ""), _KEYS))
        elif op == "drop":
            fields.pop(key, None)
        elif op == "add":
            fields[data.draw(st.sampled_from([*field_paths(kind), "vessel.nope", "x"]))] = (
                data.draw(json_values)
            )
        elif op == "variant":
            ident = data.draw(st.sampled_from(_IDENTS))
            fields[f"{key}#{ident}"] = data.draw(
                st.one_of(json_values, st.sampled_from(_COARSENED), st.just(fields.get(key)))
            )
        else:
            _, other = data.draw(st.sampled_from(REPORTS))
            path = data.draw(st.sampled_from(sorted(other)))
            fields[path] = other[path]
    expected = _check_outcome(_check_fields_oracle, kind, fields)
    assert _check_outcome(envelope_format.check_fields, kind, fields) == expected
    if field_check.fields_plainly_valid(kind, fields, fields.get("transfer.chain")):
        plain = {k: v for k, v in fields.items() if "#" not in k}
        for path, value in plain.items():
            chain = fields.get("transfer.chain")
            validate_field(kind, path, value, chain if isinstance(chain, str) else None)
