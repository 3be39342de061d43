"""The envelope's wire format: its constants and the parsing checks of the receive checklist.

Kept apart from ``broker.envelope`` (which issues, presents and runs the
checklist) so each reads in one sitting. Every check raises
``EnvelopeError(step, reason)``; reasons name fields and members, never values.
Nor do they quote any other text the sender chose (a member name, claim name,
disclosure key, kind or algorithm): a reason names only what the receiver
defines (members, known field paths, kinds, transforms), and describes the rest.
docs/ENVELOPE.md describes the same bytes in prose.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, get_args

from broker import sdjwt
from broker.errors import EnvelopeError
from broker.field_check import fields_plainly_valid, validate_field
from broker.members import MEMBERS, is_member
from broker.roster import KID
from broker.sightings import (
    KINDS,
    SCHEMA_VERSION,
    TLP,
    CryptoTransfer,
    FuelTransfer,
    check_observation_year,
    field_paths,
    is_uuid_text,
)
from broker.transforms import FORMS, VARIANT_SEP, split_variant_key

TYP: Final = "msmt+sd-jwt"
"""JWS ``typ`` and JWE ``cty``: media type ``application/msmt+sd-jwt`` (RFC 9901 §9.11)."""
JWS_ALG: Final = "Ed25519"
KEY_ALG: Final = "ECDH-ES+A256KW"
CONTENT_ENC: Final = "A256GCM"
HDR_FROM: Final = "msmt_from"
HDR_TO: Final = "msmt_to"
HDR_RID: Final = "msmt_rid"
PAD_BLOCK: Final = 256
"""A sender pads a report's plaintexts with spaces to one length, a multiple of this."""
CLAIM_SCHEMA: Final = "msmt_schema"
CLAIM_POLICY: Final = "msmt_policy"
DECOY_BUCKET: Final = 16
"""Every ``_sd`` array is padded with decoys to a multiple of this many digests."""
MAX_ENVELOPE_BYTES: Final = 256 * 1024
"""Largest compact JWE we parse; a 64 KiB record grows to well under this."""
MAX_PADDED_PLAINTEXT: Final = 3 * (MAX_ENVELOPE_BYTES - 4096) // 4
"""The longest plaintext padding makes: base64url grows it by 4/3; 4 KiB is room for the rest."""


MAX_DISCLOSURES: Final = 512
"""More disclosures than any report can have (fields plus variants); a bound on work."""
MAX_HEADER_CHARS: Final = 4096
"""Longest JWE or JWS protected header parsed (base64url): ours are a few hundred."""
# At most this many JSON arrays, objects and items in each part (``sdjwt.structure``:
# its brackets and commas outside strings), counted before it is parsed. An insider's
# envelope of 62,000 empty lists in its header, or 46,000 in its payload, cost a
# receiver 50 ms of CPU to refuse and a backlog of 300 of them 700 MiB (a trial), a
# flat list of 60,000 numbers in a signed disclosure 25 ms (a review). Ours, over 1,500
# generated records with every field disclosed: a JWE header 11, a payload 66 (its _sd
# arrays, decoys included), the disclosures 45 in all; the schema's longest lists
# (50 items) stay far inside.
MAX_HEADER_STRUCTURE: Final = 64
MAX_PAYLOAD_STRUCTURE: Final = 1024
MAX_DISCLOSED_STRUCTURE: Final = 2048
_JWE_MEMBERS: Final = frozenset({"alg", "enc", "cty", "kid", "epk", HDR_FROM, HDR_TO, HDR_RID})
_JWS_MEMBERS: Final = frozenset({"alg", "typ", "kid"})
_CLAIMS: Final = frozenset(
    {"iss", "jti", "iat", "kind", CLAIM_SCHEMA, CLAIM_POLICY, "tlp", "_sd_alg", sdjwt.SD, "source"}
)
_TLPS: Final = frozenset(get_args(TLP))
_COMPACT_JWE_CHARS: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."


def _b64_json(segment: str, what: str, max_structure: int) -> Any:
    try:
        raw = sdjwt.b64u_decode(segment)
    except ValueError as exc:
        raise EnvelopeError("format", f"{what}: {exc}") from None
    if sdjwt.over_structure((raw,), max_structure):
        raise EnvelopeError(
            "format", f"{what} holds more than {max_structure} JSON arrays, objects and items"
        )
    try:
        return sdjwt.loads_strict(raw)
    except ValueError as exc:
        raise EnvelopeError("format", f"{what}: {exc}") from None


def _header_segment(segment: str, what: str) -> Any:
    if len(segment) > MAX_HEADER_CHARS:
        raise EnvelopeError(
            "format", f"{what} is {len(segment)} characters; limit {MAX_HEADER_CHARS}"
        )
    return _b64_json(segment, what, MAX_HEADER_STRUCTURE)


def recipient_kid(head: object) -> str | None:
    """The ``kid`` in a JWE protected header segment (base64url JSON), or None.

    None too for a kid no roster could hold (``broker.roster.KID``), which no key
    of ours encrypted to: a damaged row's, say, which an audit entry cannot name.
    """
    try:
        text = head.decode() if isinstance(head, bytes) else str(head)
        header = json.loads(sdjwt.b64u_decode(text))
    except (ValueError, UnicodeDecodeError):
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) and KID.fullmatch(kid) else None


def parse_jwe_header(token: object, limit: int) -> dict[str, Any]:
    """Checklist step 1: bound the size and parse the JWE protected header strictly."""
    return parse_jwe(token, limit)[0]


def parse_jwe(token: object, limit: int) -> tuple[dict[str, Any], list[str]]:
    """Checklist step 1, as ``parse_jwe_header``; also return the five segments.

    The caller hands the segments on to ``jose.open_segments`` instead of
    splitting a token of several kilobytes again.
    """
    if not isinstance(token, str) or not token.isascii():
        raise EnvelopeError("format", "envelope is not ASCII text")
    if len(token) > limit:
        raise EnvelopeError("format", f"envelope is {len(token)} bytes; limit {limit}")
    parts = token.split(".")
    if not _is_compact_jwe(token, parts):
        # The likeliest slip of a sender's own code gets its own words.
        padded = "=" in token and _is_compact_jwe(token.replace("=", ""), parts)
        raise EnvelopeError(
            "format",
            "a JWE segment has base64 padding ('='); RFC 7515 base64url has none"
            if padded
            else "not a compact JWE: five base64url segments",
        )
    # joserfc decodes leniently; a receiver that accepted two spellings of one
    # envelope would log two different hashes for it, so only canonical ones pass.
    if not all(sdjwt.has_canonical_tail(p) for p in parts):
        raise EnvelopeError("format", "a JWE segment is not canonical base64url")
    header = _header_segment(parts[0], "JWE protected header")
    if not isinstance(header, dict):
        raise EnvelopeError("format", "JWE protected header is not a JSON object")
    return header, parts


def _is_compact_jwe(token: str, parts: list[str]) -> bool:
    # Five base64url segments: only alphabet characters and dots (deleting those
    # leaves nothing), without a regex over the whole envelope. The encrypted-key
    # segment may be empty here so that a direct-agreement JWE is refused by the
    # header check, which names the algorithm.
    return (
        len(parts) == 5
        and all(parts[i] for i in (0, 2, 3, 4))
        and not token.encode("ascii").translate(None, _COMPACT_JWE_CHARS)
    )


# Registered JOSE header parameters and JWT claims (RFC 7515, 7516, 7518, 7519, 7797, 8555,
# 9901): the names a JOSE or JWT library adds on its own (`apu`, `zip`, `exp`, ...).
_REGISTERED: Final = frozenset(
    {"alg", "enc", "zip", "jku", "jwk", "kid", "x5u", "x5c", "x5t", "x5t#S256", "typ", "cty"}
    | {"crit", "epk", "apu", "apv", "iv", "tag", "p2s", "p2c", "b64", "url", "nonce"}
    | {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "cnf", "_sd", "_sd_alg"}
)


def _exact_members(obj: Mapping[str, Any], allowed: frozenset[str], step: str, what: str) -> None:
    if obj.keys() == allowed:
        return
    # The missing names are ours; the unexpected ones are the sender's, so only counted,
    # except registered ones: those a sender's engineer must learn to drop (a trial's node
    # written from the docs got "1 unexpected"), and no sender can choose their text.
    extra, missing = set(obj) - allowed, sorted(allowed - set(obj))
    if extra or missing:
        named = sorted(extra & _REGISTERED)[:3]  # the line stays short whatever was sent
        which = f" ({', '.join(named)}{', ...' if len(named) < len(extra) else ''})"
        raise EnvelopeError(
            step, f"{what}: {len(extra)} unexpected{which if named else ''}, missing {missing}"
        )


_MEDIA_TYPED: Final = frozenset({"typ", "cty"})


def _same_media_type(name: str, value: Any, expected: str) -> bool:
    # Asked only of a value not exactly the expected one (the hot path compares
    # first). ``typ`` and ``cty`` name a media type: RFC 7515 §4.1.9-10 has a
    # recipient read a value without "/" as if "application/" were prepended, and
    # media type names are case-insensitive (RFC 2045 §5.1), so each spelling of
    # the one type is it. Every other member is compared exactly.
    if name not in _MEDIA_TYPED or not isinstance(value, str):
        return False

    def full(text: str) -> str:
        return (text if "/" in text else f"application/{text}").lower()

    return full(value) == full(expected)


def check_header(header: Mapping[str, Any], *, expected: Mapping[str, str]) -> None:
    """Checklist step 2: exactly our JWE header members, with the exact algorithms."""
    _exact_members(header, _JWE_MEMBERS, "header", "JWE header")
    for name, value in expected.items():
        if header[name] != value and not _same_media_type(name, header[name], value):
            raise EnvelopeError("header", f"{name} is not {value}")
    for name in ("kid", HDR_FROM, HDR_TO, HDR_RID):
        if not isinstance(header[name], str) or not 0 < len(header[name]) <= 200:
            raise EnvelopeError("header", f"{name} must be a non-empty string")
    epk = header["epk"]
    if not (
        isinstance(epk, dict)
        and set(epk) == {"kty", "crv", "x"}
        and (epk["kty"], epk["crv"]) == ("OKP", "X25519")
        and isinstance(epk["x"], str)
    ):
        raise EnvelopeError("header", "epk must be a public OKP X25519 key (kty, crv, x only)")


@dataclass(frozen=True, slots=True)
class Parsed:
    """The SD-JWT inside an envelope, split and type-checked but not yet verified."""

    jws: str
    kid: str
    payload: dict[str, Any]
    disclosures: list[str]


def check_claims(plaintext: bytes, *, expected_header: Mapping[str, str]) -> Parsed:
    """Checklist step 5: split the SD-JWT, check the JWS header and claim types.

    Trailing spaces are the sender's padding (docs/ENVELOPE.md §4.1), not part
    of the SD-JWT, which cannot hold a space.
    """
    try:
        presentation = plaintext.rstrip(b" ").decode("ascii")
        jws_text, disclosures, kb_jwt = sdjwt.split_presentation(presentation)
    except UnicodeDecodeError:
        raise EnvelopeError("format", "the SD-JWT is not ASCII") from None
    except ValueError as exc:
        raise EnvelopeError("format", str(exc)) from None
    if kb_jwt:
        raise EnvelopeError("format", "a key-binding JWT is not part of this format")
    if len(disclosures) > MAX_DISCLOSURES:
        raise EnvelopeError("format", f"{len(disclosures)} disclosures; limit {MAX_DISCLOSURES}")
    segments = jws_text.split(".")
    if len(segments) != 3:
        raise EnvelopeError("format", "the SD-JWT's JWS is not a compact JWS")
    header = _header_segment(segments[0], "JWS header")
    if not isinstance(header, dict):
        raise EnvelopeError("format", "JWS header is not a JSON object")
    _exact_members(header, _JWS_MEMBERS, "format", "JWS header")
    for name, value in expected_header.items():
        if header[name] != value and not _same_media_type(name, header[name], value):
            raise EnvelopeError("format", f"JWS {name} is not {value}")
    if not isinstance(header["kid"], str):
        raise EnvelopeError("format", "JWS kid is not a string")
    payload = _b64_json(segments[1], "JWS payload", MAX_PAYLOAD_STRUCTURE)
    if not isinstance(payload, dict):
        raise EnvelopeError("format", "JWS payload is not a JSON object")
    _check_claim_types(payload)
    return Parsed(jws_text, header["kid"], payload, disclosures)


def fields_of(
    payload: Mapping[str, Any],
    processed: Mapping[str, Any],
    parsed: list[sdjwt.Disclosure],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Map each disclosure to its disclosure key: ``(fields, encoded disclosures)``.

    Raises ``ValueError`` for a disclosure placed where this format puts none.
    """
    # Map each disclosure to its key by the _sd array that references it. Our
    # format has exactly three such arrays; a digest anywhere else is refused.
    kind = payload["kind"]
    where: dict[str, str | None] = dict.fromkeys(payload[sdjwt.SD])
    for container in ("source", kind):
        where.update(dict.fromkeys(payload[container][sdjwt.SD], container))
    fields: dict[str, Any] = {}
    encoded: dict[str, str] = {}
    for disclosure in parsed:
        if disclosure.digest not in where or disclosure.name is None:
            raise ValueError("a disclosure is referenced from a place this format does not use")
        container = where[disclosure.digest]
        name = disclosure.name
        field = name.partition("#")[0]
        if "." in field or (container is None and field != "observed_at"):
            raise ValueError(
                f"a claim name disclosed {_IN[container]} is not a field of this format"
            )
        key = name if container is None else f"{container}.{name}"
        value = processed[name] if container is None else processed[container][name]
        if value is not disclosure.value and value != disclosure.value:
            # Processing took ``_sd`` or ``...`` out of it: not where this format puts any,
            # and what would be stored is not what was signed.
            known = _known_key(kind, key)
            raise ValueError(
                f"disclosed value of {known} holds SD-JWT digests"
                if known is not None
                else f"a value disclosed {_IN[container]} holds SD-JWT digests"
            )
        fields[key] = value
        encoded[key] = disclosure.encoded
    return fields, encoded


# Where in the payload a disclosure is referenced from, in words (the kind is a known one).
_IN: Final[Mapping[str | None, str]] = {
    None: "at the top level",
    "source": "in source",
    **{kind: f"in {kind}" for kind in KINDS},
}


def _check_claim_types(payload: dict[str, Any]) -> None:
    kind = payload.get("kind")
    if kind not in KINDS:
        # Also what a partner's later version with a kind added meets here: said so.
        raise EnvelopeError("format", f"kind is not one this version knows: {', '.join(KINDS)}")
    optional = {"rel_to"} & set(payload)
    _exact_members(payload, _CLAIMS | {kind} | optional, "format", "claims")
    problems = {
        "iss": is_member(payload["iss"]) if isinstance(payload["iss"], str) else False,
        "jti": is_uuid_text(payload["jti"]),
        "iat": type(payload["iat"]) is int and 0 < payload["iat"] < 2**33,
        CLAIM_SCHEMA: payload[CLAIM_SCHEMA] == SCHEMA_VERSION,
        CLAIM_POLICY: isinstance(payload[CLAIM_POLICY], str)
        and 0 < len(payload[CLAIM_POLICY]) <= 200,
        "tlp": isinstance(payload["tlp"], str) and payload["tlp"] in _TLPS,
        "_sd_alg": payload["_sd_alg"] == sdjwt.SD_ALG,
        sdjwt.SD: isinstance(payload[sdjwt.SD], list),
        "rel_to": "rel_to" not in payload or _is_member_list(payload["rel_to"]),
    }
    for name in ("source", kind):
        obj = payload[name]
        problems[name] = (
            isinstance(obj, dict) and set(obj) == {sdjwt.SD} and isinstance(obj[sdjwt.SD], list)
        )
    bad = [name for name, ok in problems.items() if not ok]
    if bad:
        raise EnvelopeError("format", f"claim {bad[0]} is missing or malformed")


def _is_member_list(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, str) and m in MEMBERS for m in value)
        and len(set(value)) == len(value)
    )


def check_fields(kind: str, fields: Mapping[str, Any]) -> None:
    """Checklist step 12: each disclosed value is valid for its field or variant.

    The reason names the field, never its value.
    """
    chain = fields.get("transfer.chain")
    chain = chain if isinstance(chain, str) else None
    if kind == "transfer":
        _check_one_category(fields)
    _check_one_form(kind, fields)
    if _plainly_valid(kind, fields, chain):
        return
    paths = _PATH_SETS[kind]
    for key, value in fields.items():
        try:
            _check_field(kind, key, value, paths, chain)
        except ValueError as exc:
            # The reasons are the schema's and the transforms' own, which name the
            # rule and never quote the value (audit entries must not hold content).
            # The key is the sender's: named only as a known field path.
            where = _known_key(kind, key)
            if where is None:
                raise EnvelopeError(
                    "schema",
                    f"a disclosure name that is not a field of {kind} reports "
                    f"(schema {SCHEMA_VERSION})",
                ) from None
            why = str(exc).removeprefix(f"{key.partition(VARIANT_SEP)[0]}: ")
            raise EnvelopeError("schema", f"{where}: {why} (schema {SCHEMA_VERSION})") from None


def check_observed_year(fields: Mapping[str, Any]) -> None:
    """Step 12 on arrival: ``observed_at`` and its ``#hour`` variant are from 2000 on."""
    for key in ("observed_at", f"observed_at{VARIANT_SEP}hour"):
        value = fields.get(key)
        if isinstance(value, str):
            try:
                check_observation_year(value)
            except ValueError as exc:
                raise EnvelopeError("schema", f"{key}: {exc} (schema {SCHEMA_VERSION})") from None


def _check_one_form(kind: str, fields: Mapping[str, Any]) -> None:
    # A policy releases each field to a partner in one form, exact or reduced
    # (docs/POLICY.md), and a field the report does not have is left out, never
    # disclosed as null: a presentation otherwise is no sender's that keeps to
    # the format. Only known paths are named; others are refused by the loop.
    named: dict[str, str] = {}  # field path -> the first of its disclosures, as named
    for key, value in fields.items():
        where = _known_key(kind, key)
        if where is None:
            continue
        if value is None:
            raise EnvelopeError(
                "schema",
                f"{where}: null; a field the report does not have is left out, not disclosed",
            )
        path = key.partition(VARIANT_SEP)[0]
        if path not in named:
            named[path] = where
        else:
            forms = " and ".join(sorted({named[path], where}))
            raise EnvelopeError(
                "schema",
                f"{path} is disclosed twice, as {forms}; a partner is sent one form of a field",
            )


def _known_key(kind: str, key: str) -> str | None:
    """A disclosure key in the receiver's words, or ``None`` if its path is not a known field.

    A plain key is its field path; a variant's transform is named in its general
    form (``vessel.imo#pseudonym:<key id>``), since the parameter is the sender's.
    """
    path, sep, ident = key.partition(VARIANT_SEP)
    if path not in _PATH_SETS[kind]:
        return None
    if not sep:
        return path
    form = FORMS.get(ident.partition(":")[0])
    return f"{path}{VARIANT_SEP}{form}" if form is not None else f"a variant of {path}"


def _check_one_category(fields: Mapping[str, Any]) -> None:
    # Each field is checked on its own, so a transfer's category (crypto or
    # fuel, which may be withheld) must be checked across them: fields of both,
    # or of the other category than the one disclosed, make no valid transfer.
    found = {
        _CATEGORY_OF[path]
        for path in (key.partition(VARIANT_SEP)[0] for key in fields)
        if path in _CATEGORY_OF
    }
    category = fields.get("transfer.category")
    if isinstance(category, str):
        found.add(category)
    if len(found) > 1:
        # A category disclosed as something else than crypto or fuel is the sender's text.
        both = found <= _CATEGORIES
        raise EnvelopeError(
            "schema",
            f"transfer fields of both categories, {' and '.join(sorted(found))} "
            f"(schema {SCHEMA_VERSION})"
            if both
            else "transfer.category is not the category of the other transfer fields "
            f"(schema {SCHEMA_VERSION})",
        )


# The transfer fields that only one category has.
_CATEGORY_OF: Final = {
    f"transfer.{name}": category
    for model, category, other in (
        (CryptoTransfer, "crypto", FuelTransfer),
        (FuelTransfer, "fuel", CryptoTransfer),
    )
    for name in model.model_fields
    if name not in other.model_fields
}
_CATEGORIES: Final = frozenset(_CATEGORY_OF.values())


def _plainly_valid(kind: str, fields: Mapping[str, Any], chain: str | None) -> bool:
    # True only if the loop in check_fields would pass every field: variants
    # through _check_field itself, plain fields through the schema's batch
    # shortcut. False says nothing; the loop then decides and names the field.
    plain: dict[str, Any] = {}
    paths = _PATH_SETS[kind]
    for key, value in fields.items():
        if VARIANT_SEP not in key:
            if key not in paths:
                return False
            plain[key] = value
            continue
        try:
            _check_field(kind, key, value, paths, chain)
        except ValueError:
            return False
    return fields_plainly_valid(kind, plain, chain)


# Membership is asked once per field received; a set answers it in one step.
_PATH_SETS: Final = {kind: frozenset(field_paths(kind)) for kind in KINDS}


def _check_field(
    kind: str, key: str, value: Any, paths: Collection[str], chain: str | None
) -> None:
    path, transform = split_variant_key(key)
    if path not in paths:
        raise ValueError(f"not a field of {kind} reports")
    if transform is None:
        validate_field(kind, path, value, chain)
        return
    if not transform.applies_to(path):
        raise ValueError(f"{transform.name} does not apply to this field")
    transform.check_output(value)


def check_variant(key: str, value: Any, values: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``key`` transforms a field in ``values`` and ``value`` fits."""
    path, transform = split_variant_key(key)
    if transform is None or path not in values or not transform.applies_to(path):
        raise ValueError("not a transform of a field present in this report")
    transform.check_output(value)
