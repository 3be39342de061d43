"""``broker.canonical.dumps`` is RFC 8785: the RFC's published vectors, and ``rfc8785.dumps``.

The fast path (the C JSON encoder) is pinned to the reference library by
Hypothesis over arbitrary values of its domain and over real audit entries,
and each of those tests asserts the value was in the fast path's domain, so a
silent fallback to ``rfc8785`` would not make them pass vacuously.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from broker import audit_events as ev
from broker import canonical
from broker.members import MEMBERS
from broker.roster import KID
from broker.sightings import KINDS

VECTORS = Path(__file__).parent / "vectors" / "jcs"
NAMES = sorted(p.stem for p in (VECTORS / "input").glob("*.json"))
I_JSON = 2**53 - 1


@pytest.mark.parametrize("name", NAMES)
def test_rfc8785_vectors(name: str) -> None:
    value = json.loads((VECTORS / "input" / f"{name}.json").read_text(encoding="utf-8"))
    assert canonical.dumps(value) == (VECTORS / "output" / f"{name}.json").read_bytes()


def test_vectors_exercise_both_paths() -> None:
    # arrays, french and unicode take the fast path; weird (a non-BMP key) and
    # values (floats) must not, and still match the RFC above.
    domain = {
        name: canonical._in_domain(json.loads((VECTORS / "input" / f"{name}.json").read_bytes()))
        for name in NAMES
    }
    assert domain == {
        "arrays": True,
        "french": True,
        "structures": False,
        "unicode": True,
        "values": False,
        "weird": False,
    }


def test_weird_vector_without_its_non_bmp_key_on_the_fast_path() -> None:
    # The vector's escapes and U+0080/U+20AC/U+FB33 keys, through the C encoder.
    value = json.loads((VECTORS / "input" / "weird.json").read_text(encoding="utf-8"))
    del value["\U0001f602"]
    assert canonical._in_domain(value)
    expected = rfc8785.dumps(value)
    assert canonical.dumps(value) == expected
    assert b'"\\r":"Carriage Return"' in expected
    assert b"Control\x7f" in expected


# Text over all of Unicode but lone surrogates, with the characters that need
# escaping made likely.
TEXT = st.text(
    st.one_of(
        st.sampled_from('"\\\b\f\n\r\t\x00\x1f\x7f\u2028\u00e9\ufb33\U0001f602/'),
        st.characters(exclude_categories=["Cs"]),
    ),
    max_size=12,
)
BMP_KEY = st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=8)
DOMAIN_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-I_JSON, I_JSON),
    st.sampled_from([0, -1, I_JSON, -I_JSON, 2**31, -(2**31)]),
    TEXT,
)
DOMAIN = st.recursive(
    DOMAIN_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(BMP_KEY, inner, max_size=5),
    ),
    max_leaves=25,
)


@given(DOMAIN)
def test_fast_path_equals_rfc8785(value: Any) -> None:
    assert canonical._in_domain(value)
    assert canonical.dumps(value) == rfc8785.dumps(value)


ANY_SCALARS = st.one_of(
    DOMAIN_SCALARS,
    st.integers(),
    st.floats(),
    st.sampled_from([I_JSON + 1, -I_JSON - 1, 2**64, math.inf, math.nan, -0.0, 1e21]),
)
ANY = st.recursive(
    ANY_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(TEXT, inner, max_size=4),
    ),
    max_leaves=20,
)


def _outcome(fn: Any, value: Any) -> bytes | type[Exception]:
    try:
        return bytes(fn(value))
    except rfc8785.CanonicalizationError as exc:
        return type(exc)


@given(ANY)
def test_any_value_equals_rfc8785_or_fails_like_it(value: Any) -> None:
    assert _outcome(canonical.dumps, value) == _outcome(rfc8785.dumps, value)


@pytest.mark.parametrize(
    "value",
    [
        "\ud800",
        {"a": ["ok", "\udfff"]},
        {"\ud83d": 1},
        I_JSON + 1,
        [-I_JSON - 1],
        {"n": math.nan},
        {1: "non-string key"},
        object(),
    ],
)
def test_outside_the_domain_raises_like_rfc8785(value: Any) -> None:
    # Both raise, and the same error (rfc8785 itself lets a lone surrogate in a
    # key escape as UnicodeEncodeError; we hand such a value to it unchanged).
    errors = (rfc8785.CanonicalizationError, UnicodeEncodeError)
    with pytest.raises(errors) as ours:
        canonical.dumps(value)
    with pytest.raises(errors) as theirs:
        rfc8785.dumps(value)
    assert type(ours.value) is type(theirs.value)


# --- real audit entries ---------------------------------------------------------

MEMBER = st.sampled_from(sorted(MEMBERS))
HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
SEGMENT = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
DISCLOSURE = st.builds(
    lambda path, transform: ".".join(path) + ("" if transform is None else f"#{transform}"),
    st.lists(SEGMENT, min_size=1, max_size=3),
    st.none() | st.from_regex(r"[A-Za-z0-9_.:=-]{1,20}", fullmatch=True),
)
AT = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
).map(lambda t: t - timedelta(microseconds=t.microsecond % 1000))


@st.composite
def events(draw: st.DrawFn) -> ev.AuditEvent:  # noqa: PLR0911 - one return per entry type
    member, at = draw(MEMBER), draw(AT)
    report_id = draw(st.uuids())
    kind = draw(st.sampled_from(KINDS))
    which = draw(st.sampled_from(ev.TYPES))
    if which == "sent":
        return ev.sent(
            member,
            at,
            partner=draw(MEMBER),
            report_id=report_id,
            kind=kind,
            released=draw(st.lists(DISCLOSURE, max_size=12)),
            policy_digest=draw(HEX64),
            jwe_sha256=draw(HEX64),
            originator=draw(MEMBER),
            tlp=draw(st.sampled_from(ev.TLPS)),
            rel_to=draw(st.none() | st.lists(MEMBER, max_size=11)),
            recipient_kid=draw(st.from_regex(KID, fullmatch=True)),
        )
    if which == "received":
        return ev.received(
            member,
            at,
            sender=draw(MEMBER),
            report_id=report_id,
            kind=kind,
            fields=draw(st.lists(DISCLOSURE, max_size=12)),
            jwe_sha256=draw(HEX64),
            recipient_kid=draw(st.from_regex(KID, fullmatch=True)),
        )
    if which == "rejected":
        return ev.rejected(
            member,
            at,
            source=draw(st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True)),
            step=draw(st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True)),
            # Printable ASCII: quotes and backslashes need escaping.
            reason=draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)),
            report_id=draw(st.none() | st.just(report_id)),
            jwe_sha256=draw(st.none() | HEX64),
        )
    if which == "rejected_many":
        step = st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True)
        steps = draw(st.dictionaries(step, st.integers(1, 2**40), min_size=1, max_size=8))
        return ev.rejected_many(
            member,
            at,
            source=draw(st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True)),
            count=sum(steps.values()),
            steps=steps,
        )
    if which == "key":
        rotated = draw(st.booleans())
        return ev.key_changed(
            member,
            at,
            action="rotated" if rotated else "revoked",
            kid=draw(st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)),
            new_kid="k2" if rotated else None,
        )
    if which == "policy":
        return ev.policy_changed(
            member, at, policy_digest=draw(HEX64), previous_digest=draw(st.none() | HEX64)
        )
    return ev.accepted(member, at, report_id=report_id, kind=kind, feed="socket")


@given(events(), st.integers(0, I_JSON), st.none() | st.binary(min_size=32, max_size=32))
def test_sealed_audit_entries_equal_rfc8785(
    event: ev.AuditEvent, seq: int, prev: bytes | None
) -> None:
    entry = dict(event.fields, v=ev.VERSION, seq=seq, prev=prev.hex() if prev else "")
    assert canonical._in_domain(entry)
    data = event.seal(seq, prev)
    assert data == rfc8785.dumps(entry)
    assert ev.parse_entry(data, seq) == entry
