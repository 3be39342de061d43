"""Audit log entries (pure): one constructor per event, and the sealed RFC 8785 entry format.

An entry records *that* something happened, never *what a report said*: it
holds identifiers (report id, members, key ids), disclosure keys (field paths,
with ``#transform`` when a transform was applied), digests (policy, JWE) and a
short machine reason, never a field value. Constructors validate every
argument against a narrow pattern so report content cannot slip in.

``seal`` adds the position-dependent parts when the store appends the entry:

* ``seq``: the entry's index in the log (so a deleted, inserted or reordered
  entry is pinpointed, not only a root mismatch);
* ``prev``: hex of the RFC 6962 leaf hash of the previous entry ("" for entry 0),
  so an edited entry is pinpointed by the link after it.

``at`` is the event's own UTC time, independent of the sequence.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, get_args
from uuid import UUID

from broker import canonical
from broker.errors import AuditError, KeyMaterialError
from broker.members import is_member
from broker.roster import KID, format_time, parse_time
from broker.sightings import TLP, is_uuid_text

TLPS: Final = get_args(TLP)

VERSION: Final = 3
"""The format this version writes; 2 added ``sent``'s ``recipient_kid``, and ``withheld``;
3 added ``received``'s ``recipient_kid`` (``_CHANGES``)."""
VERSIONS: Final = tuple(range(1, VERSION + 1))
"""The formats this version reads: every entry an earlier version wrote (1, 2) is read as it was."""
TYPES: Final = (
    "accepted",
    "sent",
    "withheld",
    "received",
    "rejected",
    "rejected_many",
    "key",
    "policy",
)
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
# After "#", a transform as a policy writes it: the longest is "pseudonym:" and a key id
# of 64 characters (broker.transforms); a cap of 64 refused key ids of 55 to 64, which
# a receiver takes (a docs review).
_DISCLOSURE: Final = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*(#[A-Za-z0-9_.:=-]{1,74})?")
_KIND: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_TOKEN: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_REASON: Final = re.compile(r"[ -~]{1,200}")
_INT_MAX: Final = 2**53 - 1  # I-JSON (RFC 7493): what every JSON parser reads exactly
# Fields every type carries, and the extra fields each type must carry.
_COMMON: Final = frozenset({"v", "seq", "prev", "type", "at", "member"})
_SEND: Final = frozenset(
    {
        "partner",
        "report_id",
        "kind",
        "originator",
        "tlp",
        "rel_to",
        "released",
        "policy_digest",
        "jwe_sha256",
        "recipient_kid",
    }
)
_FIELDS: Final[dict[str, frozenset[str]]] = {
    "accepted": frozenset({"report_id", "kind", "feed"}),
    "sent": _SEND,
    "withheld": _SEND | {"reason"},
    "received": frozenset({"sender", "report_id", "kind", "fields", "jwe_sha256", "recipient_kid"}),
    "rejected": frozenset({"source", "step", "reason", "report_id", "jwe_sha256"}),
    "rejected_many": frozenset({"source", "count", "steps"}),
    "key": frozenset({"action", "kid", "new_kid"}),
    "policy": frozenset({"policy_digest", "previous_digest"}),
}
"""The fields of each type in this version's format (``VERSION``); earlier formats' are
derived from them (``_FORMATS``)."""


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event, not yet placed in a log; ``seal`` makes it an entry."""

    fields: Mapping[str, Any]

    @property
    def type(self) -> str:
        """The event type (one of ``TYPES``)."""
        return str(self.fields["type"])

    def seal(self, seq: int, prev: bytes | None) -> bytes:
        """Return the entry bytes at index ``seq`` after an entry whose leaf hash is ``prev``."""
        entry = dict(self.fields, v=VERSION, seq=seq, prev=prev.hex() if prev else "")
        return canonical.dumps(entry)


def _member(value: str, what: str) -> str:
    if not is_member(value):
        raise AuditError(f"audit {what} {value!r} is not an MSMT member")
    return value


def _report_id(value: UUID | str) -> str:
    # Canonical text (lower-case 8-4-4-4-12) is exactly what str(UUID(value)) gives
    # back unchanged, and it is all a receiver, a replay or a verify passes: each
    # entry a new id, so the cache below missed and UUID() cost 4-12 us an entry.
    if is_uuid_text(value):
        return value
    return _parsed_report_id(value)


# The checks below are pure, and a node records the same report id, disclosure
# keys and time for up to 10 partners in a row: their answers are cached (an
# invalid value raises every time; exceptions are not cached).
@functools.lru_cache(maxsize=4096)
def _parsed_report_id(value: UUID | str) -> str:
    try:
        return str(UUID(str(value)))
    except ValueError:
        raise AuditError(f"audit report id {value!r} is not a UUID") from None


def _hex64(value: str, what: str) -> str:
    if not _HEX64.fullmatch(value):
        raise AuditError(f"audit {what} must be 64 lowercase hex digits")
    return value


def _kind(value: str) -> str:
    # Any kind a later version may add, not only this version's KINDS: an auditor's
    # older build must still read a newer member's log (a trial adding a kind saw
    # `audit replay` refuse such a log whole). A node logs only kinds it validated.
    if not isinstance(value, str) or not _KIND.fullmatch(value):
        raise AuditError(f"audit kind {value!r} is not a report kind's name")
    return value


def _token(value: str, what: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise AuditError(f"audit {what} {value!r} is not a short identifier")
    return value


def _kid(value: str) -> str:
    # A roster's form (broker.roster.KID), the only one a node encrypts to: wider
    # than that (":-:"), an entry would name a key no roster can hold.
    if not isinstance(value, str) or not KID.fullmatch(value):
        raise AuditError(f"audit recipient kid {value!r:.80} is not a roster key id")
    return value


def _disclosures(values: Iterable[str], what: str) -> list[str]:
    return list(_checked_disclosures(tuple(values), what))


@functools.lru_cache(maxsize=1024)
def _checked_disclosures(values: tuple[str, ...], what: str) -> tuple[str, ...]:
    out = sorted(set(values))
    for value in out:
        if not _DISCLOSURE.fullmatch(value):
            raise AuditError(f"audit {what} {value!r} is not a field path or disclosure key")
    return tuple(out)


def _utc_text(at: datetime) -> str:
    # Checked before the cache: aware datetimes of one instant in different
    # zones are equal (and hash alike), so only UTC ones may reach it.
    offset = at.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise AuditError("audit event time must be UTC")
    return _format_utc(at)


@functools.lru_cache(maxsize=16)
def _format_utc(at: datetime) -> str:
    return format_time(at)


def _base(kind: str, member: str, at: datetime) -> dict[str, Any]:
    return {"type": kind, "member": _member(member, "member"), "at": _utc_text(at)}


def accepted(
    member: str, at: datetime, *, report_id: UUID | str, kind: str, feed: str
) -> AuditEvent:
    """A report was accepted from one of ``member``'s feeds."""
    base = _base("accepted", member, at)
    return AuditEvent(
        base
        | {"report_id": _report_id(report_id), "kind": _kind(kind), "feed": _token(feed, "feed")}
    )


def sent(
    member: str,
    at: datetime,
    *,
    partner: str,
    report_id: UUID | str,
    kind: str,
    released: Iterable[str],
    policy_digest: str,
    jwe_sha256: str,
    originator: str,
    tlp: str,
    rel_to: Iterable[str] | None,
    recipient_kid: str,
) -> AuditEvent:
    """A report was sent to ``partner`` with these disclosure keys, under this policy.

    ``released`` holds disclosure keys (``path`` or ``path#transform``), never values;
    ``jwe_sha256`` is the hex SHA-256 of the exact compact JWE published, and
    ``recipient_kid`` the ``kid`` of the partner's key it is encrypted to (so an
    auditor can tell which reports a key that is later revoked could open). The
    handling markings (``originator``, ``tlp``, ``rel_to``; no content) are
    recorded so an auditor can replay the policy decision without the report.
    """
    return AuditEvent(
        _base("sent", member, at)
        | _send_fields(
            partner, report_id, kind, released, policy_digest, jwe_sha256, originator, tlp, rel_to
        )
        | {"recipient_kid": _kid(recipient_kid)}
    )


def withheld(
    member: str,
    at: datetime,
    *,
    partner: str,
    report_id: UUID | str,
    kind: str,
    released: Iterable[str],
    policy_digest: str,
    jwe_sha256: str,
    originator: str,
    tlp: str,
    rel_to: Iterable[str] | None,
    recipient_kid: str | None,
    reason: str,
) -> AuditEvent:
    """An envelope made for ``partner`` was taken back unsent as far as this node knows.

    A start takes back what waits in the outbox encrypted to a key the roster now
    refuses (``reason``: revoked, say), to plan it again when the partner has a
    valid key. The envelope may still have reached the hub before (published, and
    its ack lost in a crash): this entry records everything a ``sent`` entry would,
    so that a receipt of it is matched and judged against the policy.
    ``recipient_kid`` is None for an envelope whose header names no key (a damaged
    row), which is taken back for that.
    """
    if not _REASON.fullmatch(reason):
        raise AuditError("audit withholding reason must be 1-200 printable ASCII characters")
    return AuditEvent(
        _base("withheld", member, at)
        | _send_fields(
            partner, report_id, kind, released, policy_digest, jwe_sha256, originator, tlp, rel_to
        )
        | {
            "recipient_kid": None if recipient_kid is None else _kid(recipient_kid),
            "reason": reason,
        }
    )


def _send_fields(
    partner: str,
    report_id: UUID | str,
    kind: str,
    released: Iterable[str],
    policy_digest: str,
    jwe_sha256: str,
    originator: str,
    tlp: str,
    rel_to: Iterable[str] | None,
) -> dict[str, Any]:
    """The fields a ``sent`` entry of version 1 holds (and later ones, and ``withheld``)."""
    if tlp not in TLPS:
        raise AuditError(f"audit TLP {tlp!r} is not one of {', '.join(TLPS)}")
    marking = None if rel_to is None else sorted(_member(m, "REL TO member") for m in set(rel_to))
    return {
        "partner": _member(partner, "partner"),
        "report_id": _report_id(report_id),
        "kind": _kind(kind),
        "originator": _member(originator, "originator"),
        "tlp": tlp,
        "rel_to": marking,
        "released": _disclosures(released, "released field"),
        "policy_digest": _hex64(policy_digest, "policy digest"),
        "jwe_sha256": _hex64(jwe_sha256, "JWE hash"),
    }


def _sent_v1(member: str, at: datetime, fields: Mapping[str, Any]) -> AuditEvent:
    """A ``sent`` entry as version 1 wrote it: without the recipient's key."""
    return AuditEvent(_base("sent", member, at) | _send_fields(**fields))


def received(
    member: str,
    at: datetime,
    *,
    sender: str,
    report_id: UUID | str,
    kind: str,
    fields: Iterable[str],
    jwe_sha256: str,
    recipient_kid: str,
) -> AuditEvent:
    """A report from ``sender`` was received and verified, with these disclosure keys.

    ``recipient_kid`` is the ``kid`` the envelope's protected header names, the key of
    ``member``'s own that opened it: what the sender's ``sent`` entry says it encrypted
    to is then not the sender's word alone (an auditor compares the two).
    """
    return AuditEvent(
        _base("received", member, at)
        | _receipt_fields(sender, report_id, kind, fields, jwe_sha256)
        | {"recipient_kid": _kid(recipient_kid)}
    )


def _receipt_fields(
    sender: str, report_id: UUID | str, kind: str, fields: Iterable[str], jwe_sha256: str
) -> dict[str, Any]:
    """The fields a ``received`` entry of versions 1 and 2 holds (and later ones)."""
    return {
        "sender": _member(sender, "sender"),
        "report_id": _report_id(report_id),
        "kind": _kind(kind),
        "fields": _disclosures(fields, "received field"),
        "jwe_sha256": _hex64(jwe_sha256, "JWE hash"),
    }


def _received_v2(member: str, at: datetime, fields: Mapping[str, Any]) -> AuditEvent:
    """A ``received`` entry as versions 1 and 2 wrote it: without the key that opened it."""
    return AuditEvent(_base("received", member, at) | _receipt_fields(**fields))


def rejected(
    member: str,
    at: datetime,
    *,
    source: str,
    step: str,
    reason: str,
    report_id: UUID | str | None = None,
    jwe_sha256: str | None = None,
) -> AuditEvent:
    """Input was rejected at checklist ``step``; ``source`` is a member or a feed name.

    ``reason`` must be the verifier's one-line reason, printable ASCII up to 200
    characters; callers must not put field values in it.
    """
    if not _REASON.fullmatch(reason):
        raise AuditError("audit reject reason must be 1-200 printable ASCII characters")
    fields: dict[str, Any] = _base("rejected", member, at) | {
        "source": _token(source, "source"),
        "step": _token(step, "step"),
        "reason": reason,
        "report_id": None if report_id is None else _report_id(report_id),
        "jwe_sha256": None if jwe_sha256 is None else _hex64(jwe_sha256, "JWE hash"),
    }
    return AuditEvent(fields)


def rejected_many(
    member: str, at: datetime, *, source: str, count: int, steps: Mapping[str, int]
) -> AuditEvent:
    """``count`` messages from ``source`` were rejected, ``steps[step]`` at each checklist step.

    Written instead of one ``rejected`` entry each once ``source`` is over its
    quota (``broker.inbound_base``): counts only, no report ids, hashes or reasons.
    ``count`` is the sum of ``steps``, each at least 1.
    """
    if not isinstance(steps, Mapping) or not steps:
        raise AuditError("audit bulk refusal steps must be a non-empty object")
    counted = {_token(step, "step"): _positive(n, "step count") for step, n in steps.items()}
    if _positive(count, "count") != sum(counted.values()):
        raise AuditError("audit bulk refusal count is not the sum of its step counts")
    fields = {
        "source": _token(source, "source"),
        "count": count,
        "steps": dict(sorted(counted.items())),
    }
    return AuditEvent(_base("rejected_many", member, at) | fields)


def _positive(value: object, what: str) -> int:
    # ``bool`` is an ``int`` that compares equal to 1: refused, or True would pass for 1.
    if type(value) is not int or not 1 <= value <= _INT_MAX:
        raise AuditError(f"audit {what} must be an integer from 1 to 2**53-1")
    return value


def key_changed(
    member: str, at: datetime, *, action: str, kid: str, new_kid: str | None = None
) -> AuditEvent:
    """One of ``member``'s keys was rotated (to ``new_kid``) or revoked."""
    if action not in ("rotated", "revoked"):
        raise AuditError(f"audit key action {action!r} is not 'rotated' or 'revoked'")
    if (action == "rotated") != (new_kid is not None):
        raise AuditError("a rotation names the new kid; a revocation does not")
    return AuditEvent(
        _base("key", member, at)
        | {
            "action": action,
            "kid": _token(kid, "kid"),
            "new_kid": None if new_kid is None else _token(new_kid, "kid"),
        }
    )


def policy_changed(
    member: str, at: datetime, *, policy_digest: str, previous_digest: str | None
) -> AuditEvent:
    """``member``'s release policy changed to the one with this digest."""
    return AuditEvent(
        _base("policy", member, at)
        | {
            "policy_digest": _hex64(policy_digest, "policy digest"),
            "previous_digest": None
            if previous_digest is None
            else _hex64(previous_digest, "policy digest"),
        }
    )


def parse_entry(data: bytes, seq: int) -> dict[str, Any]:
    """Parse entry ``seq`` and check its envelope; raise ``AuditError`` saying what is wrong.

    Checklist: 1. JSON object; 2. exactly RFC 8785 canonical bytes; 3. a version this
    one reads (``VERSIONS``); 4. ``seq`` equals its position; 5. a type that version
    has, with exactly the fields that version gave it;
    6. every field is what that type's constructor would produce from it (member,
    time, identifiers, sorted disclosure keys...). The ``prev`` link is checked by the caller,
    which knows the previous entry's hash and so can name the altered entry.

    Steps 2 and 6 are one comparison: the bytes must be exactly the canonical
    encoding of the entry rebuilt by its constructor, so a value that only
    compares equal (``true`` for ``1``, ``1.0``) is refused. When a check fails,
    non-canonical bytes are named as such first, whatever else is wrong.
    """
    try:
        entry = json.loads(data)
    except (ValueError, RecursionError):  # ValueError: also an integer of over 4300 digits
        raise AuditError("is not JSON") from None
    if not isinstance(entry, dict):
        raise AuditError("is not a JSON object")
    try:
        _rebuild(entry, seq, data)
    except AuditError:
        _refuse_if_not_canonical(entry, data)
        raise
    return entry


def _refuse_if_not_canonical(entry: dict[str, Any], data: bytes) -> None:
    try:
        canonical_form = canonical.dumps(entry)
    except ValueError:  # an integer beyond I-JSON's range, which RFC 8785 cannot write
        raise AuditError("is not RFC 8785 canonical JSON") from None
    except RecursionError:  # deeper than the encoders go; no entry nests beyond 2
        raise AuditError("is nested too deeply") from None
    if canonical_form != data:
        raise AuditError("is not RFC 8785 canonical JSON")


_Builder = Callable[[str, datetime, Mapping[str, Any]], AuditEvent]
_BUILDERS: Final[dict[str, _Builder]] = {
    "accepted": lambda m, at, f: accepted(m, at, **f),
    "sent": lambda m, at, f: sent(m, at, **f),
    "withheld": lambda m, at, f: withheld(m, at, **f),
    "received": lambda m, at, f: received(m, at, **f),
    "rejected": lambda m, at, f: rejected(m, at, **f),
    "rejected_many": lambda m, at, f: rejected_many(m, at, **f),
    "key": lambda m, at, f: key_changed(m, at, **f),
    "policy": lambda m, at, f: policy_changed(m, at, **f),
}
_CHANGES: Final[dict[int, dict[str, tuple[frozenset[str], _Builder] | None]]] = {
    3: {"received": (frozenset({"recipient_kid"}), _received_v2)},
    2: {"sent": (frozenset({"recipient_kid"}), _sent_v1), "withheld": None},
}
"""What each version changed from the one before it: per type, the fields it added and the
constructor of the form the version before wrote, or ``None`` for a type it introduced."""


def _formats() -> dict[int, tuple[dict[str, frozenset[str]], dict[str, _Builder]]]:
    """Each version's types with their exact fields and constructors.

    This version's (``_FIELDS``, ``_BUILDERS``), then each earlier one's, undoing one
    version's ``_CHANGES`` at a time: a format is written down once, as what changed.
    """
    fields, builders = dict(_FIELDS), dict(_BUILDERS)
    formats = {VERSION: (fields, builders)}
    for version in range(VERSION, 1, -1):
        fields, builders = dict(fields), dict(builders)
        for kind, change in _CHANGES[version].items():
            if change is None:
                del fields[kind], builders[kind]
            else:
                added, builders[kind] = change
                fields[kind] -= added
        formats[version - 1] = (fields, builders)
    return formats


_FORMATS: Final = _formats()


def _rebuild(entry: Mapping[str, Any], seq: int, data: bytes) -> None:
    """Checks 3-6: ``data`` must be the entry exactly as its constructor makes it.

    This re-applies every pattern the constructors enforce (members, UUIDs,
    disclosure keys, digests, reason text), so a replay never meets a value of
    the wrong type or shape, even in an entry the node itself signed.
    """
    version = entry.get("v")
    if type(version) is not int or version not in VERSIONS:
        raise AuditError(f"has unknown version {version!r}")
    known, builders = _FORMATS[version]
    if type(entry.get("seq")) is not int or entry["seq"] != seq:
        raise AuditError(f"carries seq {entry.get('seq')!r} (deleted, inserted or reordered)")
    kind = entry.get("type")
    if not isinstance(kind, str):
        # An array or object is no key of _FIELDS, and cannot even be looked up.
        raise AuditError("has a type that is not a string")
    if kind not in known:
        raise AuditError(
            f"has unknown type {kind!r}" + (f" in version {version}" if kind in _FIELDS else "")
        )
    if set(entry) != _COMMON | known[kind]:
        raise AuditError(f"has the wrong fields for a {kind!r} entry")
    prev = entry["prev"]
    if not isinstance(prev, str) or not (prev == "" or _HEX64.fullmatch(prev)):
        raise AuditError("has a malformed prev link")
    fields = {k: v for k, v in entry.items() if k not in _COMMON}
    try:
        at = parse_time(entry["at"], "time")
        event = builders[kind](entry["member"], at, fields)
    except (KeyMaterialError, AuditError, TypeError, ValueError) as exc:
        raise AuditError(f"is not a valid {kind!r} entry: {exc}") from None
    expected = dict(event.fields, v=version, seq=seq, prev=prev)
    # Constructors give only ASCII keys and strings, and integers within
    # I-JSON, where the C encoder is RFC 8785 (broker.canonical): no walk.
    if canonical.encode_in_domain(expected) != data:
        # Canonical JSON (checked first by the caller) whose values a node would have
        # written otherwise: name the members, not their values.
        differ = sorted(k for k in expected if expected[k] != entry.get(k))
        which = ", ".join(differ) if differ else "its members"
        raise AuditError(
            f"is not a valid {kind!r} entry: {which} not in the form a node writes"
            " (docs/AUDIT.md, 'Entry format')"
        )
