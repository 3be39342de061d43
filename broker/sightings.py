"""Sighting models: the three report kinds and their common header (pydantic v2).

Every model is frozen and ``extra="forbid"``. Coordinates, amounts and volumes
are exact decimals carried as JSON strings (``"38.1250"``), never floats, so that
two implementations hash the same bytes. Timestamps are RFC 3339 in UTC, written
with ``Z``. Field paths such as ``vessel.imo`` or ``source.sensor`` are the unit of
release: the policy engine decides per path and the envelope discloses per path.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, Self, TypeGuard
from uuid import RFC_4122, UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from broker import identifiers
from broker.members import Member

SCHEMA_VERSION: Final = "1.0"
"""Version of the sighting schema; goes into every envelope."""

KINDS: Final = ("vessel", "worker", "transfer")
"""The three report kinds, which are also the names of their body objects."""

TLP = Literal["CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED"]
"""Traffic Light Protocol 2.0 labels (FIRST), strictest last."""

_DECIMAL_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _decimal_text(value: object) -> object:
    # Floats are refused outright: a float has already lost the exact value the
    # originator meant, and two JSON encoders may print it differently.
    if isinstance(value, str):
        if not _DECIMAL_TEXT.fullmatch(value):
            raise ValueError('must be a plain decimal string such as "38.125"')
        return Decimal(value)
    if isinstance(value, Decimal):
        return value
    raise ValueError('must be a decimal written as a JSON string, such as "38.125"')


def _decimal_json(value: Decimal) -> str:
    # str(Decimal("0.00000001")) is "1E-8", which _DECIMAL_TEXT (and so every
    # receiver) refuses; "f" keeps the digits as sent, trailing zeros included.
    return format(value, "f")


# RFC 3339 section 5.6 with "Z" only: pydantic alone also takes Unix times as
# strings, a space, "_" or "t" for the "T", no seconds, and "+00:00", and it
# drops fraction digits past the sixth; a signed time has one spelling, exact.
_TIME_TEXT: Final = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z"
_RFC3339_UTC: Final = re.compile(_TIME_TEXT)
_TIME_FORM: Final = (
    '"YYYY-MM-DDTHH:MM:SSZ" (at most 6 fraction digits), e.g. "2026-11-01T10:00:00Z"'
)


def _rfc3339_text(value: object) -> object:
    # Parsed here, not by pydantic: a before-validator hands on a Python value,
    # which strict mode would refuse as a string.
    if not isinstance(value, str):
        return value
    if not _RFC3339_UTC.fullmatch(value):
        raise ValueError(f"must be an RFC 3339 time in UTC, {_TIME_FORM}")
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"is not a valid time: {exc}") from None


def _utc(value: datetime) -> datetime:
    if value.utcoffset() != timedelta(0):
        raise ValueError("must be in UTC (offset Z)")
    return value


def _string_schema(pattern: str) -> WithJsonSchema:
    # The exported JSON Schema gets standard keywords (a decimal string's range
    # as a pattern) instead of pydantic's own "ge"/"decimal_places", which no
    # JSON Schema validator knows, and no "number", which the model refuses.
    return WithJsonSchema({"type": "string", "pattern": pattern})


ExactDecimal = Annotated[
    Decimal,
    BeforeValidator(_decimal_text),
    PlainSerializer(_decimal_json, return_type=str, when_used="json"),
    _string_schema(r"^-?[0-9]+(\.[0-9]+)?$"),
]
UtcDatetime = Annotated[
    AwareDatetime,
    BeforeValidator(_rfc3339_text),
    AfterValidator(_utc),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": f"^{_TIME_TEXT}$"}),
]

# Ranges as patterns, for the exported schema only (the model checks the
# values): any leading zeros, then at most 7 significant decimal places.
_LAT_PATTERN: Final = r"^-?0*([0-8]?[0-9](\.[0-9]{1,7}0*)?|90(\.0+)?)$"
_LON_PATTERN: Final = r"^-?0*((1[0-7][0-9]|[0-9]?[0-9])(\.[0-9]{1,7}0*)?|180(\.0+)?)$"
_POSITIVE_PATTERN: Final = r"^(0*[1-9][0-9]*(\.[0-9]+)?|0+\.0*[1-9][0-9]*)$"
Latitude = Annotated[
    ExactDecimal, Field(ge=-90, le=90, decimal_places=7), _string_schema(_LAT_PATTERN)
]
Longitude = Annotated[
    ExactDecimal, Field(ge=-180, le=180, decimal_places=7), _string_schema(_LON_PATTERN)
]
PositiveDecimal = Annotated[ExactDecimal, Field(gt=0), _string_schema(_POSITIVE_PATTERN)]

_EXAMPLE_UUID: Final = "0f14b58e-1c9c-4e89-807f-c84adc47a049"
_UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NOT_CHOSEN: Final = (
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
)


def is_uuid_text(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a UUID's canonical text: lower-case 8-4-4-4-12.

    Exactly the strings ``str(UUID(value)) == value`` holds for. The one check of
    report ids' spelling: feeds', envelopes' (``jti``) and the audit log's.
    """
    return isinstance(value, str) and _UUID_TEXT.fullmatch(value) is not None


def _uuid_text(value: object) -> object:
    # UUID() also takes upper case, braces, "urn:uuid:" and no hyphens, and the
    # node would answer with another spelling than the feed sent; receivers
    # (envelope_format) take only the canonical one.
    if not isinstance(value, str):
        return value
    if not is_uuid_text(value):
        raise ValueError("must be a UUID in lower-case 8-4-4-4-12 form, e.g. " + _EXAMPLE_UUID)
    return UUID(value)


def is_report_id(value: str) -> bool:
    """Whether ``value`` is a report id as feeds must write one (lower-case UUID text)."""
    return is_uuid_text(value) and value not in _NOT_CHOSEN


def new_text_problem(fields: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first field path whose text holds a character new reports may not, and why.

    ``fields`` maps paths to JSON values (``leaf_values``, or a report's disclosed
    fields). Held only to what a feed sends now and what arrives from now on: reports
    stored or received before keep their text, to plan, export and serve as evidence.
    """
    for path, value in fields.items():
        for text in _strings(value):
            if text.isascii():
                continue
            found = _HIDDEN.search(text)
            if found is not None:
                return path, (
                    f"character {found.start() + 1} is U+{ord(found.group()):04X}, an"
                    " invisible or text-direction character, which could hide or reorder"
                    " what the text shows"
                )
            found = _MISPLACED.search(text)
            if found is not None:
                return path, (
                    f"character {found.start() + 1} is U+{ord(found.group()):04X}, a joiner or"
                    " selector where it joins or selects nothing (README.md, the field rules),"
                    " where it could hide text"
                )
    return None


def uncomposed_text(fields: Mapping[str, Any]) -> str | None:
    """The first field path whose text is not in Unicode normalization form NFC.

    Held only to what a feed sends now: one name in two spellings (a Hangul name
    composed, or in its decomposed jamo) is two values, with two pseudonyms under one
    key. A partner's report is not refused for it (an older node's feed could send it).
    """
    for path, value in fields.items():
        for text in _strings(value):
            if not text.isascii() and not unicodedata.is_normalized("NFC", text):
                return path
    return None


def odd_spacing(fields: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first field path whose text has a space leading, trailing, doubled or odd, and where.

    Held only to what a feed sends now, as ``uncomposed_text`` is: a partner's report is
    not refused for it. Trim and collapse a fixed-width source's padding (AIS names).
    """
    for path, value in fields.items():
        for text in _strings(value):
            # Printable ASCII holds no space but U+0020: three checks in C, not the
            # regex, for nearly every text (the regex doubled this check's cost).
            if (
                text.isascii()
                and text.isprintable()
                and not (text.startswith(" ") or text.endswith(" ") or "  " in text)
            ):
                continue
            found = _ODD_SPACE.search(text)
            if found is not None:
                at = found.start()
                char = text[at]
                return path, (
                    f"character {at + 1} is U+{ord(char):04X}, a space at the start or end,"
                    " beside another, or of another kind than U+0020, U+00A0, U+202F or"
                    " U+3000: spaces that look alike make values that differ (trim and"
                    " collapse them)"
                )
    return None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def may_hide_text(raw: str) -> bool:
    r"""Whether a record's JSON text may hold what ``new_text_problem`` refuses.

    Any character beyond ASCII, or any ``\u`` escape (which may spell one): a check
    in C, so that only such records pay for the walk over their fields.
    """
    return "\\u" in raw or not raw.isascii()


def repeated_value(sighting: SightingModel) -> str | None:
    """The path of a list of enumerated values listing one twice, or ``None``.

    ``worker.human_rights_concerns`` was unbounded: 2,100 of one value made a record
    every receiver refused for its structure (a review). Refused in what a feed sends
    now; what was stored before is read as it is.
    """
    if isinstance(sighting, WorkerSighting):
        concerns = sighting.worker.human_rights_concerns
        if len(set(concerns)) != len(concerns):
            return "worker.human_rights_concerns"
    return None


def _chosen_uuid(value: UUID) -> UUID:
    if str(value) in _NOT_CHOSEN:
        raise ValueError("must not be the nil or max UUID: each report needs its own id")
    return value


_RANDOM_UUID_TEXT: Final = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def new_id_problem(report_id: UUID) -> str | None:
    """Why a feed may not give a new report this id, or ``None``: it must be random (v4).

    The id travels in the clear, in every envelope's header, to the hub (docs/METADATA.md);
    a version 1 or 6 UUID carries the clock and network address of the host that made it,
    a version 7 its clock, and a version 3 or 5 is the hash of a name (a case number) that
    can be guessed. Only new records are held to it: reports stored or received before,
    under any UUID, are kept, planned and matched as they were.
    """
    if report_id.variant == RFC_4122 and report_id.version == 4:
        return None
    made = f"version {report_id.version}" if report_id.variant == RFC_4122 else "another variant"
    return (
        f"must be a random UUID (version 4, as uuid4() makes), not {made}: the id reaches the"
        " hub in the clear, and other versions carry a clock, a host's address or a name"
    )


ReportId = Annotated[
    UUID,
    BeforeValidator(_uuid_text),
    AfterValidator(_chosen_uuid),
    WithJsonSchema(
        {
            "type": "string",
            "format": "uuid",
            # What a feed must send now (new_id_problem); the model itself also reads
            # the ids of reports stored before, of any version.
            "pattern": "^" + _RANDOM_UUID_TEXT + "$",
        }
    ),
]
Trigraph = Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 3166-1 alpha-3 code")]
# Names, handles and details are single-line text. A control character (C0,
# DEL, C1) or a Unicode line break is refused: carried into STIX, a terminal or
# a partner's database it could split a line, hide text or truncate a value.
# One spelling for both: Python's re and ECMA-262 (JSON Schema patterns) read it alike.
_CONTROL_CHARS: Final = r"\x00-\x1f\x7f-\x9f\u2028\u2029"
_NOT_TEXT: Final = re.compile(f"[{_CONTROL_CHARS}]")
# And, in what arrives or is sent from now on (not in what was stored or received
# before: new_text_problem), Unicode's default-ignorable code points
# (DerivedCoreProperties.txt): shown as nothing, they hide text, and the bidi controls
# and marks among them reorder it. An insider trial's "GOOD SHIP \u202eGNAYGNOYP\u202c"
# read "GOOD SHIP PYONGYANG" in an analyst's tools after msmt export stix; a review hid
# "PYONGYANG" in tag characters after "GOOD SHIP". Kept, where they join or select:
# the zero-width non-joiner and joiner (U+200C, U+200D), which Persian, Indic scripts and
# emoji need, the Mongolian vowel separator (U+180E), and the variation selectors
# (U+180B-180D, U+180F, U+FE00-FE0F, U+E0100-E01EF), which choose a glyph (_MISPLACED).
# The schemas' pattern holds the ones below U+10000 (_HIDDEN_CHARS: an ECMA-262 pattern
# without the u flag cannot hold the rest), the node all of them and the placement.
_HIDDEN_CHARS: Final = (
    r"\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u200b\u200e\u200f\u202a-\u202e"
    r"\u2060-\u206f\u2800\u3164\ufdd0-\ufdef\ufeff\uffa0\ufff0-\ufff8\ufffe\uffff"
)
# Also shown as nothing, or as a blank no name needs: the braille blank U+2800, the
# musical null notehead U+1D159, and the noncharacters (a second review hid PYONGYANG
# between braille blanks and selectors).
_HIDDEN_ASTRAL: Final = (
    r"\U0001bca0-\U0001bca3\U0001d159\U0001d173-\U0001d17a\U000e0000-\U000e00ff"
    r"\U000e01f0-\U000e0fff"
    + "".join(f"\\U{plane:04x}fffe\\U{plane:04x}ffff" for plane in range(1, 17))
)
_HIDDEN: Final = re.compile(f"[{_HIDDEN_CHARS}{_HIDDEN_ASTRAL}]")
# The kept ones are shown as nothing too: a run of them after "GOOD SHIP" carried
# PYONGYANG bit by bit (a review), and placed between any two letters they still carry a
# few bits each (a second review). Each must join or select where its script or emoji
# uses it: no selector first, or after another, a joiner or a space; no joiner first or
# last, next to another or to ASCII, or before a space (but a ZWJ or ZWNJ after a
# virama, as Malayalam's chillus and the half forms end a word); U+FE00-FE0D not after
# ASCII, U+FE0E/FE0F after ASCII only on a keycap's #, * or digit; an ideographic
# selector only after an ideograph; Mongolian's selectors only after a Mongolian letter,
# and its vowel separator only between one (or its selector) and A or E.
_JOINERS: Final = "\u200c\u200d"
_SELECTORS: Final = "\ufe00-\ufe0f\u180b-\u180d\u180f\U000e0100-\U000e01ef"
_VIRAMAS: Final = "\u094d\u09cd\u0a4d\u0acd\u0b4d\u0bcd\u0c4d\u0ccd\u0d4d\u0dca"
_MONGOLIAN: Final = "\u1820-\u18aa"
_IDEOGRAPHS: Final = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_MISPLACED: Final = re.compile(
    "|".join(
        (
            f"(?:^|(?<=[{_SELECTORS}{_JOINERS}\u180e\\s]))[{_SELECTORS}]",
            f"(?:^|(?<=[{_JOINERS}\u180e\\s\\x00-\\x7f]))[{_JOINERS}]",
            f"[{_JOINERS}](?=[{_JOINERS}]|(?!\\s)[\\x00-\\x7f])",
            f"(?<![{_VIRAMAS}])[{_JOINERS}](?=$|\\s)",
            "(?<=[\\x00-\\x7f])[\\ufe00-\\ufe0d\\u180b-\\u180d\\u180f\\U000e0100-\\U000e01ef]",
            "(?<![#*0-9])(?<=[\\x00-\\x7f])[\\ufe0e\\ufe0f]",
            f"(?<![{_IDEOGRAPHS}])[\\U000e0100-\\U000e01ef]",
            f"(?<![{_MONGOLIAN}])[\\u180b-\\u180d\\u180f]",
            f"(?<![{_MONGOLIAN}\\u180b-\\u180d\\u180f])\u180e|\u180e(?![\\u1820\\u1821])",
        )
    )
)
# Spaces, in what a feed sends now (not on arrival): none leading or trailing, no two
# together, and only the ones names use (U+0020, U+00A0, U+202F before Mongolian
# suffixes, U+3000 between a Japanese family and given name): a second review carried
# PYONGYANG in 19 trailing spaces of 14 kinds after "YUK TUNG".
_ODD_SPACE: Final = re.compile(r"^\s|\s$|\s\s|[\u1680\u2000-\u200a\u205f]")


def _single_line(value: str) -> str:
    found = _NOT_TEXT.search(value)
    if found is not None:
        raise ValueError(
            f"character {found.start() + 1} is U+{ord(found.group()):04X}, a control"
            " character or line break; text must be a single printable line"
        )
    return value


Text = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        # What a feed must send now: new_text_problem's characters too.
        json_schema_extra={"pattern": f"^[^{_CONTROL_CHARS}{_HIDDEN_CHARS}]*$"},
    ),
    AfterValidator(_single_line),
]


def _checked(check: Any) -> Any:
    def run(value: str) -> str:
        check(value)
        return value

    return AfterValidator(run)


Imo = Annotated[
    str,
    _checked(identifiers.check_imo),
    Field(examples=["9321483"], json_schema_extra={"pattern": "^[0-9]{7}$"}),
]
Mmsi = Annotated[
    str,
    _checked(identifiers.check_mmsi),
    Field(examples=["445123000"], json_schema_extra={"pattern": "^[0-9]{9}$"}),
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class SourceMethod(_Frozen):
    """Source and method: the most sensitive fields, released only by name."""

    sensor: Text = Field(description="Sensor that made the observation, e.g. 'SAR', 'AIS'.")
    platform: Text = Field(
        description="Platform carrying the sensor, e.g. a satellite or patrol aircraft."
    )
    collection_method: Literal[
        "imagery", "sigint", "humint", "osint", "ais", "radar", "financial", "blockchain", "liaison"
    ] = Field(description="Collection discipline.")
    confidence: Literal["low", "moderate", "high"] = Field(
        description="Originator's confidence in the observation."
    )


class Position(_Frozen):
    """A WGS 84 position in exact decimal degrees."""

    lat: Latitude = Field(
        description="Latitude in decimal degrees, north positive, as a string (-90 to 90,"
        " at most 7 decimal places)."
    )
    lon: Longitude = Field(
        description="Longitude in decimal degrees, east positive, as a string (-180 to 180,"
        " at most 7 decimal places)."
    )


class VesselRef(_Frozen):
    """Another vessel, identified by whatever the observer could establish."""

    imo: Imo | None = Field(
        default=None,
        description="IMO number with valid check digit (checked by the node, not by this schema).",
    )
    mmsi: Mmsi | None = Field(default=None, description="9-digit MMSI.")
    name: Text | None = Field(default=None, description="Name as painted or broadcast.")

    @model_validator(mode="after")
    def _identified(self) -> Self:
        if self.imo is None and self.mmsi is None and self.name is None:
            raise ValueError("a vessel needs at least one of imo, mmsi or name")
        return self


class Cargo(_Frozen):
    """What was transferred or loaded."""

    type: Literal[
        "refined_petroleum", "crude_oil", "coal", "iron_ore", "seafood", "textiles", "sand", "other"
    ] = Field(description="Cargo category.")
    quantity_tonnes: PositiveDecimal | None = Field(
        default=None,
        description="Estimated quantity in metric tonnes, as a positive decimal string.",
    )
    description: Text | None = Field(default=None, description="Free-text detail.")


class Vessel(_Frozen):
    """A ship-to-ship transfer or a suspicious port call."""

    imo: Imo = Field(
        description="IMO number, 7 digits with a valid check digit (checked by the node,"
        " not by this schema)."
    )
    mmsi: Mmsi | None = Field(default=None, description="MMSI, 9 digits, if broadcast.")
    name: Text = Field(description="Vessel name as painted or broadcast.")
    flag: Trigraph = Field(description="Flag state claimed, ISO 3166-1 alpha-3.")
    position: Position = Field(description="Where the vessel was observed.")
    activity: Literal[
        "ship_to_ship_transfer", "port_call", "ais_gap", "loitering", "identity_tampering"
    ] = Field(description="What the vessel was doing.")
    counterpart: VesselRef | None = Field(
        default=None, description="The other vessel in a ship-to-ship transfer."
    )
    cargo: Cargo | None = Field(default=None, description="Cargo observed or assessed.")


class OnlineIdentity(_Frozen):
    """An account used by an IT worker: platform and handle."""

    platform: Text = Field(description="Service, e.g. 'github', 'upwork', 'telegram'.")
    handle: Text = Field(description="Account name or address on that service.")


class Worker(_Frozen):
    """North Korean workers abroad, including remote IT workers."""

    country: Trigraph = Field(description="Country where the workers are, ISO 3166-1 alpha-3.")
    location: Text = Field(description="City, site or region.")
    employer: Text = Field(description="Employer as it presents itself.")
    front_company: Text | None = Field(
        default=None, description="Front company believed to stand behind the employer."
    )
    workers: Annotated[int, Field(ge=1, le=100_000)] = Field(
        description=(
            "Number of workers observed or assessed, written as a JSON integer"
            " (12, not 12.0 or 1.2e1)."
        )
    )
    sector: Literal[
        "construction",
        "information_technology",
        "fishing",
        "logging",
        "restaurant",
        "textiles",
        "medical",
        "mining",
        "other",
    ] = Field(description="Economic sector.")
    online_identities: tuple[OnlineIdentity, ...] = Field(
        default=(), max_length=50, description="Accounts used by IT workers."
    )
    # Each at most once in what a feed sends now (repeated_value; the schema's
    # uniqueItems): "surveillance" 2,100 times (34 KB) made a record every receiver
    # refused, its disclosures over their bound (a review).
    human_rights_concerns: Annotated[
        tuple[
            Literal[
                "forced_labour",
                "wage_confiscation",
                "passport_confiscation",
                "surveillance",
                "excessive_hours",
                "unsafe_conditions",
                "restricted_movement",
            ],
            ...,
        ],
        WithJsonSchema(
            {
                "type": "array",
                "uniqueItems": True,
                "items": {
                    "enum": [
                        "forced_labour",
                        "wage_confiscation",
                        "passport_confiscation",
                        "surveillance",
                        "excessive_hours",
                        "unsafe_conditions",
                        "restricted_movement",
                    ],
                    "type": "string",
                },
            }
        ),
    ] = Field(default=(), description="Human-rights concerns noted by the observer.")


Chain = Literal["bitcoin", "ethereum"]


# Each chain's address and hash shapes, for the exported schema only: the
# checksums (base58check, bech32/bech32m, EIP-55) are beyond JSON Schema, and
# identifiers.py checks them.
_ADDRESSES: Final = "valid for the chain (its checksum is checked by the node, not by this schema)"


def _on_chain(chain: str, address: str, tx_hash: str, shapes: tuple[str, str]) -> dict[str, Any]:
    # One "if chain is X then its addresses and hash look like this" clause.
    items = {"description": f"On {chain}: {shapes[0]}.", "items": {"pattern": address}}
    return {
        "if": {
            "properties": {"chain": {"description": f"The chain is {chain}.", "const": chain}},
            "required": ["chain"],
        },
        "then": {
            "properties": {
                "from_addresses": items,
                "to_addresses": items,
                "tx_hash": {"description": f"On {chain}: {shapes[1]}.", "pattern": tx_hash},
            }
        },
    }


# Each chain's address and hash shapes, for the exported schema only: the
# checksums (base58check, bech32/bech32m, EIP-55) are beyond JSON Schema, and
# identifiers.py checks them.
_CHAIN_SCHEMA: Final[list[Any]] = [
    _on_chain(
        "bitcoin",
        r"^([13][1-9A-HJ-NP-Za-km-z]{25,34}|bc1[02-9ac-hj-np-z]{8,87}|BC1[02-9AC-HJ-NP-Z]{8,87})$",
        r"^[0-9a-f]{64}$",
        ("base58check P2PKH or P2SH, or bech32/bech32m segwit", "64 lower-case hex digits"),
    ),
    _on_chain(
        "ethereum",
        r"^0x[0-9a-fA-F]{40}$",
        r"^0x[0-9a-f]{64}$",
        ("0x and 40 hex digits, EIP-55 if mixed case", "0x and 64 lower-case hex digits"),
    ),
]


class CryptoTransfer(_Frozen):
    """A movement of crypto-assets, such as laundering of stolen funds."""

    model_config = ConfigDict(json_schema_extra={"allOf": _CHAIN_SCHEMA})

    category: Literal["crypto"] = Field(description="Discriminator: a crypto-asset transfer.")
    chain: Chain = Field(description="Blockchain the transaction is on.")
    from_addresses: tuple[str, ...] = Field(
        min_length=1, max_length=50, description=f"Sending addresses, {_ADDRESSES}."
    )
    to_addresses: tuple[str, ...] = Field(
        min_length=1, max_length=50, description=f"Receiving addresses, {_ADDRESSES}."
    )
    tx_hash: str = Field(
        description="Transaction hash in the chain's usual hex form: 64 lower-case hex digits,"
        " with 0x on Ethereum.",
        json_schema_extra={"pattern": r"^(0x)?[0-9a-f]{64}$"},
    )
    amount: PositiveDecimal = Field(
        description="Amount moved, in units of the asset, as a positive decimal string."
    )
    asset: Annotated[str, Field(pattern=r"^[A-Z0-9]{2,10}$")] = Field(
        description="Asset ticker, e.g. BTC, ETH, USDT."
    )
    exchanges: tuple[Text, ...] = Field(
        default=(), max_length=20, description="Exchanges or services the funds passed through."
    )

    @field_validator("from_addresses", "to_addresses")
    @classmethod
    def _addresses(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        chain = info.data.get("chain")
        for i, addr in enumerate(value):
            try:
                identifiers.check_address(chain or "", addr)
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        return value

    @field_validator("tx_hash")
    @classmethod
    def _tx_hash(cls, value: str, info: ValidationInfo) -> str:
        identifiers.check_tx_hash(info.data.get("chain") or "", value)
        return value


class FuelTransfer(_Frozen):
    """A transfer of refined petroleum or crude oil, usually ship to ship."""

    category: Literal["fuel"] = Field(description="Discriminator: a fuel transfer.")
    product: Literal["refined_petroleum", "crude_oil"] = Field(description="What was moved.")
    volume: PositiveDecimal = Field(
        description="Volume moved, in `unit`, as a positive decimal string."
    )
    unit: Literal["tonnes", "barrels", "kilolitres"] = Field(description="Unit of `volume`.")
    vessels: tuple[VesselRef, ...] = Field(
        min_length=1, max_length=10, description="Vessels involved."
    )
    place: Position = Field(description="Where the transfer happened.")


Transfer = Annotated[CryptoTransfer | FuelTransfer, Field(discriminator="category")]


_EARLIEST_OBSERVATION: Final = datetime(2000, 1, 1, tzinfo=UTC)
_BEFORE_2000: Final = "is before 2000-01-01: a zero or placeholder time, not an observation"
OBSERVED_AHEAD: Final = timedelta(minutes=5)
"""How far past this machine's clock a whole record's ``observed_at`` may be (clock skew)."""
# The same form in the years 2000 to 9999, as _plausible below requires.
_OBSERVED_PATTERN: Final = "^[2-9][0-9]{3}" + _TIME_TEXT.removeprefix("[0-9]{4}") + "$"


class _Header(_Frozen):
    report_id: ReportId = Field(
        description="Report id, a random (version 4) UUID chosen by the originator, in"
        " lower-case 8-4-4-4-12 form."
    )
    originator: Member = Field(description="The member that observed and signs the report.")
    observed_at: Annotated[
        UtcDatetime,
        WithJsonSchema({"type": "string", "format": "date-time", "pattern": _OBSERVED_PATTERN}),
    ] = Field(
        description="When the activity was observed: RFC 3339 in UTC with Z, at most 6 fraction"
        " digits, in the year 2000 or later, and at most 5 minutes ahead of the clock of"
        " the node that takes it from the feed."
    )
    tlp: TLP = Field(description="Originator's TLP 2.0 handling marking.")
    rel_to: tuple[Member, ...] | None = Field(
        default=None,
        min_length=1,
        description="REL TO: if given, only these members may receive the report.",
        json_schema_extra={"uniqueItems": True},
    )
    source: SourceMethod = Field(description="Source and method (most sensitive).")

    @field_validator("observed_at")
    @classmethod
    def _plausible(cls, value: datetime) -> datetime:
        # A zero time such as Go's 0001-01-01 or the Unix epoch is a feed's bug,
        # not an observation. Receivers refuse it too (check_observation_year),
        # as the schema's pattern does.
        if value < _EARLIEST_OBSERVATION:
            raise ValueError(_BEFORE_2000)
        # A time ahead of the clock is a feed's bug too (a wrong zone, a local time
        # labelled Z); once shared, every partner would hold a report from the future.
        # Only at intake: a receiver's clock is not the originator's.
        if value > datetime.now(UTC) + OBSERVED_AHEAD:
            raise ValueError(
                "is in the future (more than 5 minutes past this machine's clock):"
                " an observation has already happened"
            )
        return value

    @field_validator("rel_to")
    @classmethod
    def _unique_rel_to(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists a member twice")
        return value


class VesselSighting(_Header):
    """A sighting of a vessel: ship-to-ship transfer, port call, AIS gap and so on."""

    kind: Literal["vessel"] = Field(description="Report kind.")
    vessel: Vessel = Field(description="The vessel and what it did.")


class WorkerSighting(_Header):
    """A sighting of North Korean workers abroad, including IT workers."""

    kind: Literal["worker"] = Field(description="Report kind.")
    worker: Worker = Field(description="The workers and who employs them.")


class TransferSighting(_Header):
    """A sighting of a transfer of funds (crypto-assets) or fuel."""

    kind: Literal["transfer"] = Field(description="Report kind.")
    transfer: Transfer = Field(description="The transfer: crypto or fuel.")


Sighting = Annotated[
    VesselSighting | WorkerSighting | TransferSighting, Field(discriminator="kind")
]
"""Any sighting, told apart by ``kind``."""

SightingModel = VesselSighting | WorkerSighting | TransferSighting

SIGHTING_ADAPTER: Final[TypeAdapter[SightingModel]] = TypeAdapter(Sighting)
"""Validates any sighting from JSON text or from a dict."""

MODELS: Final[dict[str, type[VesselSighting | WorkerSighting | TransferSighting]]] = {
    "vessel": VesselSighting,
    "worker": WorkerSighting,
    "transfer": TransferSighting,
}

# Fields that always travel as plain claims: they route and mark the report,
# so a partner may never receive a report without them.
HANDLING_FIELDS: Final = ("report_id", "originator", "kind", "tlp", "rel_to")

_BODY_MODELS: Final[dict[str, tuple[type[BaseModel], ...]]] = {
    "vessel": (Vessel,),
    "worker": (Worker,),
    "transfer": (CryptoTransfer, FuelTransfer),
}


def field_paths(kind: str) -> tuple[str, ...]:
    """Every releasable field path of a kind, e.g. ``("observed_at", "source.sensor", ...)``.

    Handling fields (id, originator, kind, TLP, REL TO) are not in the list: they
    are always sent. For ``transfer`` the crypto and fuel fields are merged.
    """
    return _FIELD_PATHS[kind]


def _paths_of(kind: str) -> tuple[str, ...]:
    paths = ["observed_at", *(f"source.{f}" for f in SourceMethod.model_fields)]
    for model in _BODY_MODELS[kind]:
        paths.extend(f"{kind}.{f}" for f in model.model_fields if f"{kind}.{f}" not in paths)
    return tuple(paths)


# Computed once: the receive path asks for every envelope, and pydantic builds
# model_fields anew on each access (~7 us per call).
_FIELD_PATHS: Final = {kind: _paths_of(kind) for kind in KINDS}
# Every kind's paths: a reason may name one of these, never another path it was given.
_ALL_PATHS: Final = frozenset(p for paths in _FIELD_PATHS.values() for p in paths)


SOURCE_AND_METHOD_PATHS: Final = frozenset(f"source.{f}" for f in SourceMethod.model_fields)
"""Paths that a wildcard never releases; only a rule naming them can."""


def leaf_values(sighting: SightingModel) -> dict[str, Any]:
    """Map each releasable path present in ``sighting`` to its JSON value.

    Values are in JSON form (decimals and times as strings); absent optional
    fields are left out, so their absence is not itself disclosed. A list the
    record left out is absent too, not ``[]``: "not reported" is not "none".
    """
    data = sighting.model_dump(mode="json", exclude_none=True, exclude_unset=True)
    out: dict[str, Any] = {"observed_at": data["observed_at"]}
    for name, value in data["source"].items():
        out[f"source.{name}"] = value
    for name, value in data[sighting.kind].items():
        out[f"{sighting.kind}.{name}"] = value
    return out


def same_content(a: SightingModel, b: SightingModel) -> bool:
    """Whether two sightings say the same: equal values, however each was spelt.

    Decimals compare by value (``"38.10"`` is ``"38.1"``), times by instant,
    and Ethereum and bech32 addresses ignore letter case; everything else,
    including the order of lists, must be equal. The intake uses it to tell a
    feed's harmless resend from a correction under an id already accepted.
    """
    return _content(a) == _content(b)


def _content(sighting: SightingModel) -> dict[str, Any]:
    data = sighting.model_dump()
    if isinstance(sighting, TransferSighting) and isinstance(sighting.transfer, CryptoTransfer):
        for name in ("from_addresses", "to_addresses"):
            data["transfer"][name] = tuple(_address_key(a) for a in data["transfer"][name])
    return data


def _address_key(address: str) -> str:
    # EIP-55 and bech32 letter case is a spelling; base58 case is the value.
    if address.startswith("0x") or address[:3].lower() == "bc1":
        return address.lower()
    return address


def check_observation_year(text: str) -> None:
    """Raise ``ValueError`` if ``text``, an ``observed_at`` in RFC 3339 form, is before 2000.

    The schema's pattern (``^[2-9][0-9]{3}-``) says the same. Receivers apply it
    to what arrives (``envelope_format.check_observed_year``, at step 12), the
    exact time and its ``#hour`` variant alike; ``validate_field`` does not, so
    that a report an older node stored with such a time still reads and exports.
    """
    if text < "2000":
        raise ValueError(_BEFORE_2000)
