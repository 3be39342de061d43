"""Fuzzing the envelope and intake parsers (issue 10, part 3): only our own errors, ever.

Hypothesis drives four attacker positions, from outside in:

* any text as an envelope (``broker.envelope.receive``);
* a valid envelope mutated (flips, cuts, inserts, swapped and repeated segments);
* a valid JWE to the victim whose *plaintext* is arbitrary, and whose JWS is
  validly signed by a member over an arbitrary (mutated) payload, so the claim,
  disclosure and schema steps behind decryption and signature are reached too;
* the format parsers on their own (``broker.envelope_format``), the record
  parser (``broker.validation.parse_record``) and the intake's NDJSON framing
  (``LineSplitter`` + ``Intake.process``).

The invariant: each call returns or raises an ``MsmtError``; any other
exception fails the test. ``test_atheris_campaign`` runs a bounded atheris
campaign over the same doors in a subprocess, with ``broker`` instrumented.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from envelope_world import Node, sig_key, sightings
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import OKPKey

from broker import envelope, envelope_format, sdjwt
from broker.errors import EnvelopeError, MsmtError
from broker.intake import Intake
from broker.samples import generate
from broker.sightings import field_paths
from broker.store import NewReport
from broker.validation import MAX_RECORD_BYTES, LineSplitter, parse_record

pytestmark = [pytest.mark.reliability, pytest.mark.fuzz]

JPN, USA = Node("JPN"), Node("USA")
RECORDS = generate(12, seed=77, originators=("JPN",))
ISSUED = [JPN.issue(s) for s in sightings(12, seed=78) if s.originator == "JPN"]
TOKENS = [JPN.present(i, "USA", list(i.disclosures)) for i in ISSUED]
FUZZ = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def only_our_errors(call: Callable[[], object]) -> str:
    """Run ``call``; an ``MsmtError`` is a refusal (fine), anything else escapes and fails.

    Returns the outcome (the refusing checklist step, or ``accepted``) for statistics.
    """
    try:
        call()
    except EnvelopeError as exc:
        return exc.step
    except MsmtError as exc:
        return type(exc).__name__
    return "accepted"


def outcome(call: Callable[[], object]) -> None:
    """``only_our_errors`` inside a Hypothesis test, with the outcome as an event."""
    event(only_our_errors(call))


def receive(token: str) -> object:
    return USA.receive(token, attested_sender="JPN")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def seal(plaintext: str) -> str:
    """A genuine JWE from JPN to USA around any plaintext (what a member can always make)."""
    return envelope._seal(
        plaintext.encode("utf-8"),
        sender="JPN",
        recipient="USA",
        report_id=ISSUED[0].report_id,
        recipient_kid="USA-enc-1",
        recipient_key=USA.roster.public_key("USA-enc-1"),
    )


def sign(payload: Any) -> str:
    """A JWS over ``payload`` validly signed with JPN's real key."""
    header = {"alg": "Ed25519", "typ": envelope_format.TYP, "kid": "JPN-sig-1"}
    key: OKPKey = sig_key("JPN")
    return jws.serialize_compact(header, json.dumps(payload).encode(), key, algorithms=["Ed25519"])


@st.composite
def mutated(draw: st.DrawFn, text: str) -> str:
    """``text`` with a few random edits of the kinds a corrupting channel or attacker makes."""
    out = text
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "swap", "repeat", "truncate"]))
        i = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out = out[:i] + draw(st.characters(max_codepoint=0x7F)) + out[i + 1 :]
        elif op == "cut":
            out = out[:i] + out[i + draw(st.integers(1, 40)) :]
        elif op == "insert":
            out = out[:i] + draw(st.text(max_size=20)) + out[i:]
        elif op == "truncate":
            out = out[:i]
        else:
            parts = out.split(".")
            a, b = draw(st.integers(0, len(parts) - 1)), draw(st.integers(0, len(parts) - 1))
            if op == "swap":
                parts[a], parts[b] = parts[b], parts[a]
            else:
                parts.insert(a, parts[b])
            out = ".".join(parts)
    return out


@st.composite
def mutated_json(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with one member, item or leaf somewhere replaced, dropped or added."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        op = draw(st.sampled_from(["recurse", "drop", "replace", "add"]))
        out = dict(value)
        if op == "recurse":
            out[key] = draw(mutated_json(value[key]))
        elif op == "drop":
            del out[key]
        elif op == "replace":
            out[key] = draw(json_value)
        else:
            out[draw(st.text(max_size=10))] = draw(json_value)
        return out
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(mutated_json(value[i])), *value[i + 1 :]]
    return draw(json_value)


# --- envelope ------------------------------------------------------------------------


def test_the_good_envelopes_are_accepted() -> None:
    # The fuzz below starts from these: they must really be valid, or it proves little.
    for token in TOKENS:
        assert USA.receive(token, attested_sender="JPN").originator == "JPN"


@FUZZ
@given(st.text(max_size=3000) | st.binary(max_size=3000).map(lambda b: b.decode("latin-1")))
def test_any_text_as_an_envelope(token: str) -> None:
    outcome(lambda: receive(token))


@FUZZ
@given(st.sampled_from(TOKENS).flatmap(mutated))
def test_mutated_envelopes(token: str) -> None:
    outcome(lambda: receive(token))


@FUZZ
@given(st.data())
def test_genuine_jwe_around_an_arbitrary_or_mutated_sd_jwt(data: st.DataObject) -> None:
    issued = data.draw(st.sampled_from(ISSUED))
    presentation = sdjwt.join_presentation(issued.jws, issued.disclosures.values())
    plaintext = data.draw(
        st.text(max_size=500)
        | mutated(presentation)
        | st.lists(st.text(max_size=60), max_size=6).map(lambda ds: "~".join([issued.jws, *ds, ""]))
    )
    outcome(lambda: receive(seal(plaintext)))


@FUZZ
@given(st.data())
def test_validly_signed_arbitrary_claims_and_disclosures(data: st.DataObject) -> None:
    # A member can sign anything with its own key: the checks behind the signature
    # (disclosures, freshness, schema) must hold against a signed lie.
    issued = data.draw(st.sampled_from(ISSUED))
    payload = json.loads(sdjwt.b64u_decode(issued.jws.split(".")[1]))
    disclosures = list(issued.disclosures.values())
    if data.draw(st.booleans()):
        payload = data.draw(mutated_json(payload))
        extra = data.draw(st.lists(json_value, max_size=3))
        disclosures += [b64(json.dumps(d).encode()) for d in extra]
    else:
        # Forged disclosures, each referenced from a digest array the signer controls.
        for _ in range(data.draw(st.integers(1, 3))):
            container = data.draw(st.sampled_from([None, "source", payload["kind"]]))
            names = [p.rpartition(".")[2] for p in field_paths(payload["kind"])]
            name = data.draw(st.sampled_from(names) | st.text(max_size=12))
            value = data.draw(json_value)
            with contextlib.suppress(ValueError):  # reserved names cannot even be built
                forged = sdjwt.Disclosure.make(name, value)
                target = payload if container is None else payload[container]
                target[sdjwt.SD] = sorted([*target[sdjwt.SD], forged.digest])
                disclosures.append(forged.encoded)
    disclosures = data.draw(st.permutations(disclosures))
    plaintext = sdjwt.join_presentation(sign(payload), disclosures)
    outcome(lambda: receive(seal(plaintext)))


@FUZZ
@given(
    st.one_of(
        st.text(max_size=400),
        st.sampled_from(TOKENS).flatmap(mutated),
        st.builds(
            lambda h, rest: b64(json.dumps(h).encode()) + rest,
            json_value,
            st.text(alphabet="AB._-", max_size=40),
        ),
        st.integers(),
        st.none(),
    )
)
def test_format_parser_jwe_header(token: object) -> None:
    def parse() -> None:
        header = envelope_format.parse_jwe_header(token, envelope_format.MAX_ENVELOPE_BYTES)
        envelope_format.check_header(
            header,
            expected={"alg": envelope.KEY_ALG, "enc": envelope.CONTENT_ENC, "cty": "x"},
        )

    outcome(parse)


@FUZZ
@given(st.binary(max_size=600) | st.text(max_size=600).map(str.encode))
def test_format_parser_claims(plaintext: bytes) -> None:
    expected = {"alg": "Ed25519", "typ": envelope_format.TYP}
    outcome(lambda: envelope_format.check_claims(plaintext, expected_header=expected))


@FUZZ
@given(
    st.sampled_from(["vessel", "worker", "transfer"]),
    st.dictionaries(st.text(max_size=30), json_value, max_size=5),
)
def test_format_parser_fields(kind: str, fields: dict[str, Any]) -> None:
    outcome(lambda: envelope_format.check_fields(kind, fields))


# --- intake --------------------------------------------------------------------------


@FUZZ
@given(
    st.binary(max_size=2000)
    | json_value.map(lambda v: json.dumps(v).encode())
    | st.sampled_from(RECORDS).flatmap(mutated_json).map(lambda v: json.dumps(v).encode())
)
def test_record_parser(raw: bytes) -> None:
    outcome(lambda: parse_record(raw))


def test_record_parser_at_and_over_the_size_limit() -> None:
    record = json.dumps(RECORDS[0])
    at_limit = record + " " * (MAX_RECORD_BYTES - len(record))  # JSON allows trailing space
    assert len(at_limit.encode()) == MAX_RECORD_BYTES
    assert only_our_errors(lambda: parse_record(at_limit)) == "accepted"
    with pytest.raises(MsmtError, match="limit"):
        parse_record(at_limit + " ")


@FUZZ
@given(
    st.lists(
        st.binary(max_size=300)
        | st.sampled_from(RECORDS).map(lambda r: json.dumps(r).encode())
        | st.sampled_from(RECORDS).flatmap(mutated_json).map(lambda v: json.dumps(v).encode()),
        max_size=12,
    ),
    st.lists(st.integers(1, 200), min_size=1, max_size=20),
    st.integers(256, 1024),
)
async def test_ndjson_framing_and_intake_answer_every_line(
    lines: list[bytes], cuts: list[int], limit: int
) -> None:
    stream = b"\n".join(lines)
    accepted: list[NewReport] = []

    async def acceptor(batch: list[NewReport], feed: str) -> list[bool]:
        # The intake's collaborator (the store), not the thing under test.
        accepted.extend(batch)
        return [True] * len(batch)

    splitter = LineSplitter(limit)
    intake = Intake("JPN", limit, acceptor)
    framed: list[tuple[int, Any]] = []
    answers: list[dict[str, Any]] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        chunk, pos = stream[pos : pos + cut], pos + cut
        got = splitter.feed(chunk)
        framed += got
        answers += await intake.process(got)
    tail = splitter.finish()
    framed += tail
    answers += await intake.process(tail)
    # The framing agrees with a plain split: every non-blank line, numbered, none over the limit.
    reference = [
        (n, raw.rstrip(b"\r")) for n, raw in enumerate(stream.split(b"\n"), 1) if raw.strip()
    ]
    assert [n for n, _ in framed] == [n for n, _ in reference]
    for (_, raw), (_, want) in zip(framed, reference, strict=True):
        if isinstance(raw, bytes):
            assert raw == want
            assert len(raw) <= limit
        else:
            assert len(want) > limit
    assert [a["line"] for a in answers] == [n for n, _ in reference]
    assert {a["status"] for a in answers} <= {"accepted", "rejected"}
    assert all(a.get("reason") in (None, "schema", "size") for a in answers)
    assert len(accepted) == sum(a["status"] == "accepted" for a in answers)


# --- atheris, when installed: a bounded coverage-guided campaign ------------------------

ATHERIS_RUNS = 20_000
ATHERIS_HARNESS = """
import sys
import atheris
with atheris.instrument_imports(include=["broker"]):
    import test_reliability_fuzz as harness
atheris.Setup(sys.argv, harness.atheris_one_input)
atheris.Fuzz()
"""


def test_atheris_campaign(tmp_path: Path) -> None:
    """A bounded, seeded, coverage-guided campaign over the same doors (needs atheris)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            ATHERIS_HARNESS,
            f"-runs={ATHERIS_RUNS}",
            "-seed=1",
            "-max_len=4096",
            # A failing input is written here, not into the checkout (libFuzzer's
            # default is the working directory, which must be this one for the import).
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=Path(__file__).parent,
    )
    assert "No module named 'atheris'" not in done.stderr, (
        "atheris is not installed: add 'atheris' to the test extras"
    )
    assert done.returncode == 0, (sorted(p.name for p in tmp_path.iterdir()), done.stderr[-3000:])
    assert f"Done {ATHERIS_RUNS} runs" in done.stderr, done.stderr[-3000:]


def atheris_one_input(data: bytes) -> None:
    """One atheris input: the first byte picks the door, the rest is the attacker's."""
    if not data:
        return
    door, body = data[0] % 4, data[1:]
    text = body.decode("latin-1")
    if door == 0:
        only_our_errors(lambda: receive(text))
    elif door == 1:
        token = TOKENS[len(body) % len(TOKENS)]
        i = int.from_bytes(body[:2] or b"\0", "big") % len(token)
        only_our_errors(lambda: receive(token[:i] + text[2:] + token[i + len(text[2:]) :]))
    elif door == 2:
        only_our_errors(lambda: receive(seal(text.encode("ascii", "replace").decode())))
    else:
        only_our_errors(lambda: parse_record(body))
