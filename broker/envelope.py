"""The signed selective-disclosure envelope: an SD-JWT inside a per-partner JWE.

A report is signed once by its originator as an SD-JWT (RFC 9901) in which every
releasable field, and every reduced variant of one, is its own salted
disclosure. For each partner, ``present`` takes exactly the disclosures the
policy releases to it and encrypts ``<jws>~<d>~...~`` as a compact JWE to that
partner's X25519 key; fields not released are never in the ciphertext at all.
``receive`` runs the verification checklist and returns a typed ``Received``
(``receive_batch``: for many envelopes, a step at a time across them);
``represent`` passes a subset of a verified report onward. docs/ENVELOPE.md
describes the bytes. Pure: no I/O, and the clock is always passed in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from types import MappingProxyType
from typing import Any, Final, NoReturn

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from broker import jose, sdjwt
from broker.envelope_format import (
    CLAIM_POLICY,
    CLAIM_SCHEMA,
    CONTENT_ENC,
    DECOY_BUCKET,
    HDR_FROM,
    HDR_RID,
    HDR_TO,
    JWS_ALG,
    KEY_ALG,
    MAX_DISCLOSED_STRUCTURE,
    MAX_ENVELOPE_BYTES,
    MAX_PADDED_PLAINTEXT,
    MAX_PAYLOAD_STRUCTURE,
    PAD_BLOCK,
    TYP,
    Parsed,
    check_claims,
    check_fields,
    check_header,
    check_observed_year,
    check_variant,
    fields_of,
    parse_jwe,
)
from broker.errors import (
    EnvelopeError,
    InputError,
    IssuedAheadError,
    KeyMaterialError,
    UnknownKeyError,
    UsageError,
)
from broker.members import MEMBERS, is_member
from broker.roster import CLOCK_SKEW, Roster, format_time
from broker.sightings import (
    KINDS,
    SCHEMA_VERSION,
    SightingModel,
    leaf_values,
    new_text_problem,
)

# The JWE is broker.jose's fixed profile; the one JWS per report stays with joserfc.
_JWS_REGISTRY: Final = jws.JWSRegistry(algorithms=[JWS_ALG])
_ED25519: Final = _JWS_REGISTRY.get_alg(JWS_ALG)


@dataclass(frozen=True, slots=True)
class Issued:
    """A signed report: the compact JWS and the encoded disclosure for every disclosure key."""

    jws: str
    disclosures: Mapping[str, str]
    originator: str
    report_id: str
    kind: str


@dataclass(frozen=True, slots=True)
class Received:
    """A verified report as one partner received it; built only by ``receive``.

    ``fields`` maps each disclosure key received (``vessel.imo``,
    ``vessel.position#coarsen:0.5``) to its JSON value; ``sender`` is the member
    that handed it over, which differs from ``originator`` for onward shares.
    """

    originator: str
    sender: str
    recipient: str
    report_id: str
    kind: str
    tlp: str
    rel_to: tuple[str, ...] | None
    iat: datetime
    schema_version: str
    policy_digest: str
    signing_kid: str
    fields: Mapping[str, Any]
    paths: tuple[str, ...]
    jws: str
    disclosures: Mapping[str, str]
    jwe_sha256: str
    recipient_kid: str
    """The ``kid`` the protected header names: the recipient's key that opened it."""

    @property
    def presentation(self) -> str:
        """The SD-JWT as received (``<jws>~<d>~...~``), for onward sharing or archiving."""
        return sdjwt.join_presentation(self.jws, (self.disclosures[k] for k in self.paths))


def _container(key: str) -> tuple[str | None, str]:
    # "vessel.position#coarsen:0.5" lives in the "vessel" object as "position#coarsen:0.5";
    # "observed_at" and its variants are top-level claims.
    path, sep, ident = key.partition("#")
    head, dot, name = path.partition(".")
    if not dot:
        return None, key
    return head, name + sep + ident


def issue(
    sighting: SightingModel,
    *,
    signing_key: OKPKey,
    kid: str,
    policy_digest: str,
    variants: Mapping[str, Any] = MappingProxyType({}),
    now: datetime,
) -> Issued:
    """Sign ``sighting`` once as an SD-JWT with every field and variant a disclosure.

    ``variants`` maps variant keys (``vessel.position#coarsen:0.5``) to reduced
    values already computed by ``broker.transforms``. Raises ``InputError`` if a
    variant key is malformed, names an absent field, or its value has the wrong shape,
    and ``UsageError`` if the key is not an Ed25519 private key, ``now`` is naive,
    or ``kid``/``policy_digest`` are empty (a receiver would refuse the report).
    """
    if signing_key.curve_name != "Ed25519" or not signing_key.is_private:
        raise UsageError("the signing key must be an Ed25519 private key")
    if now.utcoffset() is None:
        raise UsageError("now must be timezone-aware")
    if not kid or not 0 < len(policy_digest) <= 200:
        raise UsageError("kid must be set and the policy digest must be 1-200 characters")
    values = leaf_values(sighting)
    for key, value in variants.items():
        try:
            check_variant(key, value, values)
        except ValueError as exc:
            raise InputError(f"variant {key}: {exc}") from None
    values.update(variants)
    kind = sighting.kind
    groups: dict[str | None, list[str]] = {None: [], "source": [], kind: []}
    encoded: dict[str, str] = {}
    salts = sdjwt.new_salts(len(values))
    for (key, value), salt in zip(values.items(), salts, strict=True):
        container, name = _container(key)
        disclosure = sdjwt.Disclosure.make(name, value, salt)
        groups[container].append(disclosure.digest)
        encoded[key] = disclosure.encoded
    report_id = str(sighting.report_id)
    payload: dict[str, Any] = {
        "iss": sighting.originator,
        "jti": report_id,
        "iat": int(now.timestamp()),
        "kind": kind,
        CLAIM_SCHEMA: SCHEMA_VERSION,
        CLAIM_POLICY: policy_digest,
        "tlp": sighting.tlp,
        "_sd_alg": sdjwt.SD_ALG,
        sdjwt.SD: sdjwt.sd_array(groups[None], DECOY_BUCKET),
        "source": {sdjwt.SD: sdjwt.sd_array(groups["source"], DECOY_BUCKET)},
        kind: {sdjwt.SD: sdjwt.sd_array(groups[kind], DECOY_BUCKET)},
    }
    if sighting.rel_to is not None:
        payload["rel_to"] = list(sighting.rel_to)
    header = {"alg": JWS_ALG, "typ": TYP, "kid": kid}
    body = sdjwt.dumps_compact(payload).encode("utf-8")
    # Never signed if every receiver would refuse it (docs/ENVELOPE.md §5, steps 5 and
    # 9): a review found a schema-valid record that was, its list unbounded.
    disclosed = [sdjwt.b64u_decode(e) for e in encoded.values()]
    if sdjwt.over_structure((body,), MAX_PAYLOAD_STRUCTURE) or sdjwt.over_structure(
        disclosed, MAX_DISCLOSED_STRUCTURE
    ):
        raise InputError(
            "the report holds more JSON arrays, objects and items than receivers take"
            f" (payload {MAX_PAYLOAD_STRUCTURE}, disclosures {MAX_DISCLOSED_STRUCTURE} in all)"
        )
    token = jws.serialize_compact(header, body, signing_key, registry=_JWS_REGISTRY)
    return Issued(token, MappingProxyType(encoded), sighting.originator, report_id, kind)


@dataclass(frozen=True, slots=True)
class Recipient:
    """One partner of ``present_all``: its encryption key and the disclosures released to it."""

    partner: str
    kid: str
    key: OKPKey
    disclosure_keys: Collection[str]


def _seal(
    plaintext: bytes,
    *,
    sender: str,
    recipient: str,
    report_id: str,
    recipient_kid: str,
    recipient_key: OKPKey,
) -> str:
    # joserfc's OKPKey holds the cryptography key object (imported once, where
    # the roster or key file was loaded), so nothing is re-imported per message.
    public = recipient_key.public_key
    if not isinstance(public, X25519PublicKey):
        raise UsageError(f"recipient key {recipient_kid} is not an X25519 key")
    header = {
        "alg": KEY_ALG,
        "enc": CONTENT_ENC,
        "cty": TYP,
        "kid": recipient_kid,
        HDR_FROM: sender,
        HDR_TO: recipient,
        HDR_RID: report_id,
    }
    return jose.seal(header, plaintext, public)


def padded(presentations: Sequence[str]) -> list[bytes]:
    """The plaintexts that ``present_all`` encrypts for these presentations.

    Each presentation, then spaces up to one length for all: the next multiple
    of ``PAD_BLOCK`` at or above the longest, but never past
    ``MAX_PADDED_PLAINTEXT`` (docs/ENVELOPE.md §4.1).
    """
    longest = max((len(p) for p in presentations), default=0)
    length = min(-(-longest // PAD_BLOCK) * PAD_BLOCK, MAX_PADDED_PLAINTEXT)
    return [p.encode("ascii").ljust(length, b" ") for p in presentations]


def _select(available: Mapping[str, str], keys: Collection[str], what: str) -> list[str]:
    missing = sorted(set(keys) - set(available))
    if missing:
        raise UsageError(f"{what} has no disclosure for {', '.join(missing)}")
    return [available[k] for k in sorted(set(keys))]


def present_all(issued: Issued, recipients: Sequence[Recipient]) -> list[str]:
    """Encrypt the JWS and exactly each recipient's disclosures to it, in order.

    The plaintexts are padded with spaces to one length, the next multiple of
    ``PAD_BLOCK`` at or above the longest: the hub sees every envelope of a
    report, and their lengths would otherwise tell how much each partner was
    released (docs/ENVELOPE.md §4.1). The sender in the header is the
    originator. Raises ``UsageError`` if a key was not issued for this report
    or a recipient key is not X25519.
    """
    what = f"report {issued.report_id}"
    presentations = [
        sdjwt.join_presentation(issued.jws, _select(issued.disclosures, to.disclosure_keys, what))
        for to in recipients
    ]
    return [
        _seal(
            plaintext,
            sender=issued.originator,
            recipient=to.partner,
            report_id=issued.report_id,
            recipient_kid=to.kid,
            recipient_key=to.key,
        )
        for to, plaintext in zip(recipients, padded(presentations), strict=True)
    ]


def present(
    issued: Issued,
    *,
    disclosure_keys: Collection[str],
    recipient: str,
    recipient_kid: str,
    recipient_key: OKPKey,
) -> str:
    """Encrypt the JWS and exactly the disclosures ``disclosure_keys`` to one partner.

    ``present_all`` for one recipient, so padded alone.
    """
    return present_all(
        issued, [Recipient(recipient, recipient_kid, recipient_key, disclosure_keys)]
    )[0]


def represent(
    received: Received,
    *,
    disclosure_keys: Collection[str],
    recipient: str,
    recipient_kid: str,
    recipient_key: OKPKey,
) -> str:
    """Share a subset of a verified report onward; the originator's signature still holds.

    The sender in the header is the member that received it; padded as
    ``present`` pads. Raises ``UsageError`` for any key it never received: a
    holder cannot add fields.
    """
    chosen = _select(received.disclosures, disclosure_keys, "the received report")
    return _seal(
        padded([sdjwt.join_presentation(received.jws, chosen)])[0],
        sender=received.recipient,
        recipient=recipient,
        report_id=received.report_id,
        recipient_kid=recipient_kid,
        recipient_key=recipient_key,
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """One envelope for ``receive_batch`` and what its transport says of it (``None``: nothing).

    ``logged``: the caller's own audit log holds this envelope's receipt already
    (its store lost the commit that followed: a crash, a full disk), so step 10
    does not judge its age again: it was fresh when it was logged, and refused
    now it would be lost though the log says received.
    """

    token: str
    attested_sender: str | None
    attested_kind: str | None = None
    logged: bool = False


def receive(
    token: str,
    *,
    me: str,
    decryption_keys: Mapping[str, OKPKey],
    roster: Roster,
    attested_sender: str | None,
    now: datetime,
    max_age: timedelta,
    max_skew: timedelta,
    is_replay: Callable[[str], bool] | None = None,
    accept_onward_from: Collection[str] = (),
    attested_kind: str | None = None,
    logged: bool = False,
) -> Received:
    """Decrypt and verify one envelope addressed to ``me``; return what it discloses.

    ``attested_sender`` and ``attested_kind`` are what the transport says of the
    message (NATS account, subject), ``None`` where it says nothing. ``is_replay(jti)``
    only asks; the caller records the jti after success. A report whose sender is
    not its originator (an onward share) is accepted only from members in
    ``accept_onward_from``. ``logged`` as in ``Delivery``. Raises
    ``EnvelopeError(step, reason)`` at the first
    failing step, with ``report_id`` set once the signature has verified; the
    reason never contains report content. Raises ``UsageError`` if ``now`` is naive.
    """

    def replays(asked: Sequence[tuple[int, str]]) -> list[int]:
        return [i for i, jti in asked if is_replay is not None and is_replay(jti)]

    (outcome,) = receive_batch(
        [Delivery(token, attested_sender, attested_kind, logged)],
        me=me,
        decryption_keys=decryption_keys,
        roster=roster,
        now=now,
        max_age=max_age,
        max_skew=max_skew,
        replays=None if is_replay is None else replays,
        accept_onward_from=accept_onward_from,
    )
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def receive_batch(
    deliveries: Sequence[Delivery],
    *,
    me: str,
    decryption_keys: Mapping[str, OKPKey],
    roster: Roster,
    now: datetime,
    max_age: timedelta,
    max_skew: timedelta,
    replays: Callable[[Sequence[tuple[int, str]]], Collection[int]] | None = None,
    accept_onward_from: Collection[str] = (),
) -> list[Received | Exception]:
    """``receive`` for each delivery, one checklist step at a time across the batch.

    Each message's checklist runs in its order and stops at its first failure, as
    in ``receive``; what that failure raised (an ``EnvelopeError``, or whatever a
    step raised unexpectedly) is returned in the message's place instead, so a bad
    message costs only itself. ``replays(asked)`` is the replay step's question for
    the whole batch, asked once (if any message reaches the step) with ``(i, jti)``
    of every delivery ``i`` that reached it, in index order; it returns those
    ``i`` whose jti the caller's seen-set has had. It must answer each as if
    asked alone, not from the others' outcomes (it cannot see them yet); what it
    raises is the outcome of every message it was asked about.
    Raises ``UsageError`` if ``now`` is naive.

    Step by step rather than message by message: each step's code and tables
    then stay in the CPU's caches across the batch instead of taking turns with
    the crypto, JSON, schema and SQLite of the others (bench/README.md,
    "fifteenth session": ~15 % of a delivery's CPU at batches of 8-86).
    """
    if now.utcoffset() is None:
        raise UsageError("now must be timezone-aware")

    # Verification checklist; each step raises EnvelopeError and they run in this order.
    def envelope(o: _Opening) -> None:
        # 1. format: size limit, ASCII, five segments, protected header is a JSON
        #    object without duplicate members.
        header, o.segments = parse_jwe(o.token, MAX_ENVELOPE_BYTES)
        # 2. header: exactly the members we produce (so no crit, zip, jku, ...), alg,
        #    enc and cty exact, routing members are strings.
        check_header(header, expected={"alg": KEY_ALG, "enc": CONTENT_ENC, "cty": TYP})
        o.header = header
        # 3. recipient: the header names me, and its kid is one of my decryption keys.
        if header[HDR_TO] != me:
            to = header[HDR_TO] if is_member(header[HDR_TO]) else "a non-member"
            raise EnvelopeError("recipient", f"addressed to {to}, not {me}")
        key = decryption_keys.get(header["kid"])
        if key is None:
            _not_mine(header["kid"], roster, now)
        # raw_value, not private_key: the same object when it is a private key, without
        # joserfc's isinstance checks against every private key type (~0.5 us).
        private = key.raw_value
        if not isinstance(private, X25519PrivateKey):
            raise UsageError(f"decryption key {header['kid']!r:.80} is not an X25519 private key")
        o.private = private

    def decrypt(o: _Opening) -> None:
        # 4. decrypt (authenticates the protected header too): epk a public X25519
        #    key of 32 bytes and not low-order; encrypted key 40 bytes, IV 12, tag 16;
        #    the CEK unwraps and the GCM tag verifies (broker.jose.open_segments, its
        #    steps 1-8).
        o.plaintext = jose.open_segments(o.segments, o.header, o.private)

    # 5-9: ``_claims``, ``_signature``, ``_disclosures``.
    def fresh(o: _Opening) -> None:
        # 10. freshness: iat no older than max_age (but for a delivery the caller's log
        #     holds the receipt of: judged when it was logged) and no further ahead
        #     than max_skew.
        _check_fresh(o.iat, now=now, max_age=None if o.logged else max_age, max_skew=max_skew)

    def replay(live: Sequence[_Opening]) -> None:
        # 11. replay: the caller's seen-set has not had this jti. One question for
        #     every message that got here, so that the caller can answer them
        #     together (the receiver: one SQLite statement, not one each).
        if replays is None or not live:
            return
        try:
            found = set(replays([(o.index, o.parsed.payload["jti"]) for o in live]))
        except Exception as exc:  # noqa: BLE001 - each message's outcome, as in _run
            for o in live:
                o.error = exc
            return
        for o in live:
            if o.index in found:
                error = EnvelopeError("replay", f"report {o.jti} was already received")
                error.report_id = o.jti  # as _run names it for a step's refusal
                o.error = error

    # 12-13: ``_content``.
    def expiry(o: _Opening) -> None:
        # 3, completed once the signed iat is known: a decryption key that has expired
        #    opens only envelopes made while it was valid (queued on the hub while this
        #    node was down across the expiry); a sender must not encrypt to it later.
        kid = o.header["kid"]
        until = roster.get(kid).valid_until if kid in roster else None
        if until is not None and o.iat > until + CLOCK_SKEW:
            raise EnvelopeError(
                "recipient",
                f"key {kid} expired at {format_time(until)}, before the envelope was made",
            )

    openings = [
        _Opening(d.token, d.attested_sender, d.attested_kind, i, d.logged)
        for i, d in enumerate(deliveries)
    ]
    return _run(
        openings,
        (
            envelope,
            decrypt,
            partial(_claims, accept_onward_from=accept_onward_from),
            partial(_signature, roster=roster),
            _disclosures,
            fresh,
            _Across(replay),
            partial(_content, me=me, arriving=True),
            expiry,
            partial(_result, me=me),
        ),
    )


def check_kept(token: str, content_key: bytes, *, roster: Roster) -> Received:
    """Verify an envelope a partner kept, decrypting it with the content key it revealed.

    Every step of ``receive`` but two, which held when it arrived (its
    ``received`` audit entry records that): freshness and replay. The recipient
    is the one the header names; an onward share from any member is accepted.
    Raises ``EnvelopeError(step, reason)`` at the first failing step.
    """
    header, _ = parse_jwe(token, MAX_ENVELOPE_BYTES)
    check_header(header, expected={"alg": KEY_ALG, "enc": CONTENT_ENC, "cty": TYP})
    me = header[HDR_TO]
    if not is_member(me):
        raise EnvelopeError("recipient", "addressed to a non-member")
    opening = _Opening(token, None, None, 0)
    opening.header = header
    opening.plaintext = jose.open_with_key(token, header, content_key)
    (outcome,) = _run(
        [opening],
        (
            partial(_claims, accept_onward_from=MEMBERS),
            partial(_signature, roster=roster),
            _disclosures,
            partial(_content, me=me),
            partial(_result, me=me),
        ),
    )
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


@dataclass(slots=True)
class _Opening:
    # One envelope on its way through the checklist: what each step found, for the next.
    token: str
    attested_sender: str | None
    attested_kind: str | None
    index: int
    logged: bool = False  # Delivery.logged
    error: Exception | None = None  # the first failure, which decides the message
    jti: str | None = None  # set once the signature has verified: the originator's own
    header: dict[str, Any] = field(init=False)
    segments: list[str] = field(init=False)
    private: X25519PrivateKey = field(init=False)
    plaintext: bytes = field(init=False)
    parsed: Parsed = field(init=False)
    iat: datetime = field(init=False)
    fields: dict[str, Any] = field(init=False)
    encoded: dict[str, str] = field(init=False)
    received: Received = field(init=False)  # set by the last step: every step passed


@dataclass(frozen=True, slots=True)
class _Across:
    # A step taken for every opening still undecided at once; it sets their errors.
    step: Callable[[Sequence[_Opening]], None]


def _run(
    openings: Sequence[_Opening], steps: Sequence[Callable[[_Opening], None] | _Across]
) -> list[Received | Exception]:
    # Each step across every opening still undecided; a step's exception decides its
    # message. From the signature on, the originator vouches for jti: a refusal names it.
    for step in steps:
        if isinstance(step, _Across):
            step.step([o for o in openings if o.error is None])
            continue
        for opening in openings:
            if opening.error is None:
                try:
                    step(opening)
                except Exception as exc:  # noqa: BLE001 - the message's outcome, for its caller
                    if isinstance(exc, EnvelopeError) and opening.jti is not None:
                        exc.report_id = opening.jti
                    opening.error = exc
    return [o.received if o.error is None else o.error for o in openings]


def _claims(o: _Opening, *, accept_onward_from: Collection[str]) -> None:
    # 5. format: <jws>~<d>~...~ in ASCII without key binding; JWS header exact;
    #    claims well-typed.
    o.parsed = check_claims(o.plaintext, expected_header={"alg": JWS_ALG, "typ": TYP})
    payload = o.parsed.payload
    o.iat = datetime.fromtimestamp(payload["iat"], UTC)
    # 6. sender: header sender = attested sender (when given); = iss unless an
    #    onward share from a member we accept those from; header rid = jti; the
    #    attested kind (when given) = the signed kind, so the hub's routing is true.
    _check_sender(o.header, payload, o.attested_sender, accept_onward_from)
    if o.attested_kind is not None and o.attested_kind != payload["kind"]:
        # The transport's kind is the subject the sender published on: named if a known kind.
        kind = o.attested_kind
        sent = repr(kind) if kind in KINDS else "a kind that is not one of ours"
        raise EnvelopeError("sender", f"sent as {sent} but the signed kind is {payload['kind']}")


def _signature(o: _Opening, *, roster: Roster) -> None:
    # 7. key: the signing kid is in the roster, belongs to iss, is a sig key, and
    #    is usable (not revoked, not retired, within validity) at iat.
    # 8. signature over the exact JWS bytes received.
    parsed = o.parsed
    _verify_signature(
        parsed.jws, kid=parsed.kid, iss=parsed.payload["iss"], iat=o.iat, roster=roster
    )
    o.jti = parsed.payload["jti"]


def _disclosures(o: _Opening) -> None:
    # 9. disclosures: each well-formed, none twice, each referenced exactly once,
    #    none unreferenced, no claim collisions, and placed where our format allows.
    payload = o.parsed.payload
    try:
        parsed = sdjwt.parse_disclosures(o.parsed.disclosures, MAX_DISCLOSED_STRUCTURE)
        processed = sdjwt.process(payload, parsed)
        o.fields, o.encoded = fields_of(payload, processed, parsed)
    except ValueError as exc:
        raise EnvelopeError("disclosures", str(exc)) from None
    # 10 (freshness) and 11 (replay) are the receiver's: not for a kept envelope,
    # whose were checked on arrival.


def _content(o: _Opening, *, me: str, arriving: bool = False) -> None:
    payload = o.parsed.payload
    # 12. schema: every disclosed value is valid for its field (or is what its
    #     transform produces), and a transfer's fields are of one category.
    check_fields(payload["kind"], o.fields)
    if arriving:
        # And as the schema's pattern has it, an observation from 2000 on. Only
        # for what arrives: a report an older node stored with an earlier time
        # still exports, and its kept envelope still serves as evidence.
        check_observed_year(o.fields)
        # Likewise refused in what arrives, not in what a node kept before.
        hidden = new_text_problem(o.fields)
        if hidden is not None:
            raise EnvelopeError("schema", f"{hidden[0]}: {hidden[1]}")
    # 13. markings: the originator's REL TO, if any, names me. Its policy should
    #     never have sent it here; keeping it would break the originator's caveat.
    rel_to = payload.get("rel_to")
    if rel_to is not None and me not in rel_to:
        raise EnvelopeError("markings", f"REL TO {', '.join(rel_to)} does not include {me}")


def _result(o: _Opening, *, me: str) -> None:
    # Every step passed: what the envelope discloses.
    payload, fields = o.parsed.payload, o.fields
    rel_to = payload.get("rel_to")
    o.received = Received(
        originator=payload["iss"],
        sender=o.header[HDR_FROM],
        recipient=me,
        report_id=payload["jti"],
        kind=payload["kind"],
        tlp=payload["tlp"],
        rel_to=tuple(rel_to) if rel_to is not None else None,
        iat=o.iat,
        schema_version=payload[CLAIM_SCHEMA],
        policy_digest=payload[CLAIM_POLICY],
        signing_kid=o.parsed.kid,
        fields=MappingProxyType(fields),
        paths=tuple(sorted(fields)),
        jws=o.parsed.jws,
        disclosures=MappingProxyType(o.encoded),
        jwe_sha256=hashlib.sha256(o.token.encode("ascii")).hexdigest(),
        recipient_kid=o.header["kid"],
    )


def _check_sender(
    header: Mapping[str, Any],
    payload: Mapping[str, Any],
    attested_sender: str | None,
    accept_onward_from: Collection[str],
) -> None:
    # The header sender is the sender's text: named only if it is a member.
    sender, iss = header[HDR_FROM], payload["iss"]
    who = (
        f"header sender {sender} is"
        if is_member(sender)
        else "header sender is not one of the members, so"
    )
    if attested_sender is not None and sender != attested_sender:
        raise EnvelopeError("sender", f"{who} not {attested_sender}")
    if sender != iss and not (is_member(sender) and sender in accept_onward_from):
        raise EnvelopeError("sender", f"{who} not the originator {iss}")
    if header[HDR_RID] != payload["jti"]:
        raise EnvelopeError("sender", "header report id does not match the signed jti")


def _not_mine(kid: str, roster: Roster, now: datetime) -> NoReturn:
    # A kid the roster lists (revoked, say) is refused with its status; one it
    # does not list may be a key of ours rotated in a roster this node lacks yet.
    if kid in roster:
        key = roster.get(kid)
        why = key.usable_at(now) or f"key {kid} is not one of my keys"
        raise EnvelopeError("recipient", f"{why}: I hold no private key for it")
    raise UnknownKeyError("recipient", "header kid is in neither my keys nor my roster")


def _verify_signature(jws_text: str, *, kid: str, iss: str, iat: datetime, roster: Roster) -> None:
    if kid not in roster:
        raise UnknownKeyError("key", "signing kid is not in the roster")
    try:
        roster.check(kid, member=iss, use="sig", at=iat, skew=CLOCK_SKEW)
        public = roster.public_key(kid)
    except (KeyMaterialError, JoseError, ValueError) as exc:
        raise EnvelopeError("key", str(exc)) from None
    # The JWS header was parsed and pinned in step 5, so the algorithm is called
    # directly on the received bytes instead of parsing the JWS a second time.
    signing_input, _, signature = jws_text.rpartition(".")
    try:
        raw = sdjwt.b64u_decode(signature)
    except ValueError as exc:
        # A fixed text about the spelling (never the value), which tells a sender's
        # engineer what to fix: a trial's own node got "cannot verify (ValueError)".
        raise EnvelopeError("signature", f"the JWS signature is {exc}") from None
    try:
        _ED25519.check_key(public)
        valid = _ED25519.verify(signing_input.encode("ascii"), raw, public)
    except (JoseError, ValueError) as exc:
        raise EnvelopeError("signature", f"cannot verify ({type(exc).__name__})") from None
    if not valid:
        raise EnvelopeError("signature", "the originator's signature does not verify")


def _check_fresh(
    iat: datetime, *, now: datetime, max_age: timedelta | None, max_skew: timedelta
) -> None:
    if max_age is not None and now - iat > max_age:
        raise EnvelopeError("freshness", f"issued {_seconds(now - iat)} ago; limit {max_age}")
    if iat - now > max_skew:
        raise IssuedAheadError(
            "freshness",
            f"issued {_seconds(iat - now)} in the future; limit {max_skew}"
            " (the sender's clock ahead, or ours behind)",
        )


def _seconds(span: timedelta) -> timedelta:
    # Whole seconds, rounded up: past a limit never reads as equal to it.
    return timedelta(seconds=math.ceil(span.total_seconds()))


__all__ = [
    # the API
    "Delivery",
    "Issued",
    "Received",
    "Recipient",
    "check_kept",
    "issue",
    "padded",
    "present",
    "present_all",
    "receive",
    "receive_batch",
    "represent",
    # wire constants, defined in broker.envelope_format
    "CLAIM_POLICY",
    "CLAIM_SCHEMA",
    "CONTENT_ENC",
    "DECOY_BUCKET",
    "HDR_FROM",
    "HDR_RID",
    "HDR_TO",
    "JWS_ALG",
    "KEY_ALG",
    "MAX_ENVELOPE_BYTES",
    "MAX_PADDED_PLAINTEXT",
    "PAD_BLOCK",
    "TYP",
]
