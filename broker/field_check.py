"""The per-field schema check a receiver runs on what a partner disclosed (pure).

A receiver gets a subset of a report's fields, so each is checked on its own
against its field's schema (``validate_field``), with shortcuts for the common
plain values held to the same answers by tests/test_field_check.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Union

from pydantic import ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from broker import identifiers
from broker.sightings import (
    _ALL_PATHS,
    _BODY_MODELS,
    KINDS,
    SourceMethod,
    UtcDatetime,
    field_paths,
)


def _field_adapter(head: str, name: str) -> TypeAdapter[Any]:
    return TypeAdapter(_field_form(head, name))


def _field_form(head: str, name: str) -> Any:
    models = (SourceMethod,) if head == "source" else _BODY_MODELS[head]
    # A runtime-built type form; a name in both transfer models (``category``) takes either.
    found: list[Any] = [
        Annotated[m.model_fields[name].annotation, m.model_fields[name]]
        for m in models
        if name in m.model_fields
    ]
    if not found:
        raise ValueError(f"{head} has no field of that name")
    return found[0] if len(found) == 1 else Union[tuple(found)]  # noqa: UP007


_ADAPTERS: dict[tuple[str, str], TypeAdapter[Any]] = {}
_TIME_ADAPTER: Final[TypeAdapter[datetime]] = TypeAdapter(UtcDatetime)


def validate_field(kind: str, path: str, value: Any, chain: str | None = None) -> None:
    """Check one disclosed field's JSON value against the schema; raise ``ValueError``.

    A receiver validates each field it was given on its own, since partners get
    subsets of a report. ``chain`` (if disclosed) lets crypto addresses and
    hashes be checked against their chain; without it, any supported chain will do.
    """
    try:
        _validate_field(kind, path, value, chain)
    except ValidationError as exc:
        if not _encodable(json.dumps(value, ensure_ascii=False)):
            # The JSON check's own words ("unexpected end of hex escape") do not
            # say what a sender's engineer must fix.
            raise ValueError(
                f"{path}: holds a lone surrogate escape (\\ud800-\\udfff not in a pair),"
                " which is no Unicode character"
            ) from None
        first = exc.errors()[0]
        raise ValueError(f"{path}: {str(first['msg']).removeprefix('Value error, ')}") from None


# What decides is the field's schema applied to the value's JSON text in strict
# mode (validate_json below): the same rules a feed record meets at intake.
# Re-serialising every value costs more than the check, so a value is first
# offered to the same adapter in strict *Python* mode, which for JSON-shaped
# input is at least as strict (it takes no string for a datetime and no list
# for a tuple, so those are converted or go the JSON way). Only its "valid" is
# trusted; anything it refuses is decided, and its reason given, by the JSON
# check. tests/test_field_check.py holds the two to the same answers.
_JSON_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_NOT_PLAIN: Final = object()


def _scalar(value: Any) -> bool:
    # A lone surrogate (which a JSON "\\ud800" escape yields) is no JSON text
    # validate_json would take; strict Python mode takes it in a plain str.
    kind = type(value)
    return kind in _JSON_SCALARS and (kind is not str or value.isascii() or _encodable(value))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _flat_object(value: dict[Any, Any]) -> bool:
    return all(type(k) is str and _scalar(v) for k, v in value.items())


def _plain(value: Any) -> Any:
    # The value as strict Python mode expects it: a JSON array becomes a tuple.
    # Only the shapes the schema has (scalars, objects of scalars, arrays of
    # either) are converted; anything else is _NOT_PLAIN and goes the JSON way.
    if _scalar(value):
        return value
    kind = type(value)
    if kind is dict:
        return value if _flat_object(value) else _NOT_PLAIN
    if kind is list and all(
        _scalar(item) or (type(item) is dict and _flat_object(item)) for item in value
    ):
        return tuple(value)
    return _NOT_PLAIN


def _passes(adapter: TypeAdapter[Any], value: Any, *, strings: bool = False) -> bool:
    # The core validator directly: TypeAdapter's methods only forward to it.
    try:
        if strings:
            adapter.validator.validate_strings(value, strict=True)
        else:
            adapter.validator.validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


# Positions are in every vessel report and fuel transfer, and pydantic checks
# their decimal bounds and places in Python (~5 us). Two plain decimal strings
# within range with at most 7 places are a valid Position (``_decimal_text``
# takes them, and each constraint holds); anything else meets the adapter.
_POSITION_FIELDS: Final = frozenset({("vessel", "position"), ("transfer", "place")})
_PLAIN_DEGREES: Final = re.compile(r"-?[0-9]{1,3}(?:\.[0-9]{1,7})?")


def is_plain_position(value: Any) -> bool:
    """Whether ``value`` is plainly a valid ``Position``: two plain in-range decimal strings.

    ``True`` only for values the ``Position`` schema accepts (a shortcut for
    hot paths, held to the schema by tests); ``False`` says nothing, and the
    caller then asks the schema, which gives the reason.
    """
    if type(value) is not dict or len(value) != 2:
        return False
    lat, lon = value.get("lat"), value.get("lon")
    return (
        type(lat) is str
        and type(lon) is str
        and _PLAIN_DEGREES.fullmatch(lat) is not None
        and _PLAIN_DEGREES.fullmatch(lon) is not None
        and -90 <= Decimal(lat) <= 90
        and -180 <= Decimal(lon) <= 180
    )


def _validate_field(kind: str, path: str, value: Any, chain: str | None) -> None:
    if path == "observed_at":
        if not (
            type(value) is str and _scalar(value) and _passes(_TIME_ADAPTER, value, strings=True)
        ):
            _TIME_ADAPTER.validate_json(_json(value), strict=True)
        return
    head, _, name = path.partition(".")
    if head not in ("source", kind) or not name or "." in name:
        # The path may be a sender's disclosure name: named only if it is a known one.
        what = repr(path) if path in _ALL_PATHS else "a path that"
        raise ValueError(f"{what} is not a field of {kind} reports")
    adapter = _ADAPTERS.get((head, name))
    if adapter is None:
        adapter = _ADAPTERS[(head, name)] = _field_adapter(head, name)
    if (head, name) in _POSITION_FIELDS and is_plain_position(value):
        return
    plain = _plain(value)
    if plain is _NOT_PLAIN or not _passes(adapter, plain):
        adapter.validate_json(_json(value), strict=True)
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


def _json(value: Any) -> str:
    return json.dumps(value)


def fields_plainly_valid(kind: str, values: Mapping[str, Any], chain: str | None = None) -> bool:
    """Whether every ``path: value`` in ``values`` passes ``validate_field``; a shortcut.

    ``True`` only if each would pass ``validate_field(kind, path, value,
    chain)``; ``False`` says nothing, and the caller then checks each field on
    its own, which names the first that fails. A receiver checks about ten
    fields per report: the plain ones go to pydantic in one call instead of ten.
    """
    batch: dict[str, Any] = {}
    batched = _BATCHED[kind]
    for path, value in values.items():
        if path in batched:
            plain = _plain(value)
            if plain is _NOT_PLAIN:
                return False
            batch[path] = plain
            continue
        # The time, positions, chain-checked and unknown fields: as validate_field says.
        try:
            validate_field(kind, path, value, chain)
        except ValueError:
            return False
    return _BATCH_ADAPTERS[kind].validator.isinstance_python(batch, strict=True)


def _batch_adapter(kind: str, paths: frozenset[str]) -> TypeAdapter[Any]:
    # One TypedDict per kind whose members are the field paths, each with the
    # very type form _field_adapter gives it, all optional: validating it is
    # validating each present field on its own (no validator spans fields).
    members = {p: _field_form(*p.split(".")) for p in sorted(paths)}
    # The functional form, since the member names are paths, not identifiers.
    make: Any = TypedDict
    form = make(f"{kind.title()}Fields", members, total=False)
    form.__pydantic_config__ = ConfigDict(extra="forbid")
    return TypeAdapter(form)


# Fields whose whole check is their adapter in strict Python mode; the rest
# (the time, positions with their own shortcut, crypto addresses and hashes
# checked against the chain) are checked by validate_field one by one.
_CHAIN_CHECKED: Final = frozenset(
    {"transfer.from_addresses", "transfer.to_addresses", "transfer.tx_hash"}
)
_BATCHED: Final = {
    kind: frozenset(field_paths(kind))
    - {"observed_at", "vessel.position", "transfer.place"}
    - _CHAIN_CHECKED
    for kind in KINDS
}
_BATCH_ADAPTERS: Final = {kind: _batch_adapter(kind, _BATCHED[kind]) for kind in KINDS}
