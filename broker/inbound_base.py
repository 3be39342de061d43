"""What ``Inbound`` holds, and what becomes of a message it refuses or holds.

``InboundBase`` holds ``broker.inbound.Inbound``'s settings and state, and the rules
that keep a hostile sender, or one ahead of us, from filling the audit log or stalling
the inbox: a source's refusals told one by one only within its quota a minute
(``RefusalQuota``; the rest folded into ``rejected_many`` entries), and messages held
(a key this roster lacks, an ``iat`` ahead of our clock) at most
``MAX_HELD_PER_SENDER`` a sender, while they may still pass. With the inbox subject's
rule (``attested_sender``) and ``BatchResult``. Apart from the checklist and the
commit (``broker.inbound``), so that each stays one sitting's read; synchronous, on
the store's thread, as ``Inbound`` is.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Literal

from joserfc.jwk import OKPKey

from broker import audit_events
from broker.audit_events import AuditEvent
from broker.auditlog import AuditLog
from broker.config import SENDER_BYTES_PER_DAY
from broker.envelope_format import HDR_RID, parse_jwe_header
from broker.errors import EnvelopeError, HeldError
from broker.log import Throttle, get_logger
from broker.members import is_member
from broker.roster import CLOCK_SKEW, Roster
from broker.sightings import is_report_id
from broker.store import Received, Store
from broker.store_inbox import utc_day

log = get_logger("receiver")

MAX_SKEW: Final = CLOCK_SKEW
"""How far in the future a report's ``iat`` may be (clock skew between nodes)."""

HOLD_LOG_EVERY_S: Final = 60.0
"""Held messages are logged at most this often per sender: each comes back many times."""
REFUSALS_LOGGED_PER_MINUTE: Final = 60
"""Refusals per source a minute that get an ``inbound_rejected`` line and a ``rejected``
audit entry of their own; the rest are counted, and folded into one ``rejected_many``
entry per source and batch. A hostile member's junk was refused 1,850 times a second
(red-team trial): a line and a 360-byte entry each, about 75 GB of audit log a day."""
MAX_HELD_PER_SENDER: Final = 64
"""Messages held at once per sender; more are refused. Ten partners' worth stays well
inside the consumer's ``max_ack_pending`` (1024), so a sender naming made-up keys
cannot stall the inbox for the others."""

Action = Literal["ack", "term", "hold"]

UNSTORED_STATE: Final = "receipts_unstored"
"""The status fact keeping the receipts the audit log holds and the store lacks (a crash
or a full disk between the two), as a JSON list of ``[sender, JWE hash]``: the start
that finds them records the log's size past them, and a second start would not."""
SENDER_BUDGET_STATE: Final = "sender_budget"
"""The status fact keeping the daily budget the running node holds partners to."""


def read_unstored(text: str) -> set[tuple[str, str]]:
    """What ``unstored_text`` kept; anything else (none yet, damaged) is none."""
    try:
        pairs = json.loads(text) if text else []
    except (ValueError, RecursionError):
        return set()
    if not isinstance(pairs, list):
        return set()
    return {
        (pair[0], pair[1])
        for pair in pairs
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
    }


def unstored_text(unstored: Iterable[tuple[str, str]]) -> str:
    """``UNSTORED_STATE``'s value: the receipts, sorted, as a JSON list of pairs."""
    return json.dumps([list(pair) for pair in sorted(unstored)], separators=(",", ":"))


class SenderBudget:
    """What each sender's stored envelopes took this UTC day, against ``limit`` bytes a day.

    A partner's valid reports are otherwise unbounded: an insider trial's member grew
    a receiver's store by 1.3 GB in 45 s with reports padded to the cap. Each message
    reserves its bytes before its checklist runs, so one over its sender's budget costs
    no decryption; ``keep`` counts what the batch stored, and ``free`` drops its
    reservations. ``used`` starts from the store's ``sender_bytes`` rows, which the
    commit that stores the reports adds to, so a restart carries the day on. A fixed
    UTC day, not a sliding one: at most twice the limit in the hours around midnight,
    and a refused sender knows when to send again.
    """

    def __init__(self, limit: int, day: str, used: Mapping[str, int]) -> None:
        self.limit = limit
        self.day = day
        self.used: dict[str, int] = dict(used)
        self._reserved: Counter[str] = Counter()

    def start(self, day: str, used: Mapping[str, int]) -> None:
        """Count against ``day`` from now on, whose totals so far are ``used`` (the store's)."""
        self.day, self.used = day, dict(used)
        self._reserved.clear()

    def reserve(self, sender: str, size: int) -> EnvelopeError | None:
        """Reserve ``size`` bytes of ``sender``'s budget for the day, or say why not."""
        spent = self.used.get(sender, 0) + self._reserved[sender]
        if spent + size > self.limit:
            return EnvelopeError(
                "budget",
                f"{sender}'s messages stored on {self.day} (UTC) take {spent} bytes and this one"
                f" {size}: over its budget of {self.limit} bytes a day"
                " (limits.sender_bytes_per_day); its sender may send it again the next day",
            )
        self._reserved[sender] += size
        return None

    def keep(self, stored: Mapping[str, int]) -> None:
        """Count what a batch's commit stored (bytes by sender) as spent."""
        for sender, size in stored.items():
            self.used[sender] = self.used.get(sender, 0) + size

    def free(self) -> None:
        """End a batch: its reservations go, whatever became of its messages."""
        self._reserved.clear()

    def ratio(self, sender: str, day: str) -> float:
        """How much of ``sender``'s budget for ``day`` is spent (past 1: the limit was lowered)."""
        return 0.0 if day != self.day else self.used.get(sender, 0) / self.limit


def _claimed_report_id(data: bytes, limit: int) -> str | None:
    """The report id a JWE's protected header names, if it parses and is a UUID."""
    try:
        header = parse_jwe_header(data.decode("ascii"), limit)
    except (UnicodeDecodeError, EnvelopeError):
        return None
    claimed = header.get(HDR_RID)
    return claimed if isinstance(claimed, str) and is_report_id(claimed) else None


def attested_sender(subject: str, me: str) -> str:
    """The hub-attested sender of an inbox subject; raise ``EnvelopeError`` if malformed."""
    parts = subject.split(".")
    if (
        len(parts) != 6
        or parts[0] != "from"
        or parts[2:5] != ["msmt", "to", me]
        or not is_member(parts[1])
    ):
        raise EnvelopeError("subject", "inbox subject is not from.<MEMBER>.msmt.to.<me>.<kind>")
    return parts[1]


def _source(subject: str) -> str:
    # Whom a refusal is counted against: the subject's sender if it is a member.
    sender = sender_field(subject)
    return sender if is_member(sender) else "unknown"


class RefusalQuota:
    """Per source, the first ``per_minute`` refusals of each minute are told one by one.

    A told refusal gets an ``inbound_rejected`` line and its own ``rejected``
    audit entry; the rest are only counted (and folded into ``rejected_many``
    entries). The minute starts at a source's first refusal after the last one
    ended. ``clock`` is monotonic seconds (injectable for tests).
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        # source -> (start of its minute, refusals told in it, refusals not told since).
        self._windows: dict[str, tuple[float, int, int]] = {}

    def take(self, source: str) -> int | None:
        """``None`` if this refusal is over the quota, else how many went untold before it."""
        now = self.clock()
        start, told, untold = self._windows.get(source, (now, 0, 0))
        if now - start >= 60.0:
            start, told = now, 0
        if told < self.per_minute:
            self._windows[source] = (start, told + 1, 0)
            return untold
        self._windows[source] = (start, told, untold + 1)
        return None


def sender_field(subject: str) -> str:
    """The sender an inbox subject names (its second token), unchecked."""
    # The second token of an inbox subject, unchecked (``attested_sender`` checks).
    parts = subject.split(".", 2)
    return parts[1] if len(parts) > 1 else ""


def _printable(text: str, limit: int = 200) -> str:
    # Audit reasons must be printable ASCII; envelope reasons quote peer input.
    clean = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else "?" for c in clean)[:limit] or "rejected"


@dataclass
class BatchResult:
    """What ``Inbound.process`` decided for each message, plus what it committed."""

    actions: list[Action]
    stored: list[Received] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    """Byte-identical redeliveries acked without storing again, by sender."""
    held: Counter[str] = field(default_factory=Counter)
    """Messages handed back for later, by sender: they name a key this roster lacks."""
    latencies: list[float] = field(default_factory=list)


class InboundBase:
    """``broker.inbound.Inbound``'s settings and state, and its refused and held messages."""

    def __init__(
        self,
        member: str,
        decryption_keys: Mapping[str, OKPKey],
        roster: Roster,
        store: Store,
        audit: AuditLog,
        freshness: timedelta,
        max_message_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        sender_bytes_per_day: int = SENDER_BYTES_PER_DAY,
        unstored: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.member = member
        self.decryption_keys = decryption_keys
        self.roster = roster
        self.store = store
        self.audit = audit
        self.freshness = freshness
        self.max_message_bytes = max_message_bytes
        self._hold_log = Throttle(HOLD_LOG_EVERY_S)  # one warning per sender per period
        self._refusals = RefusalQuota(REFUSALS_LOGGED_PER_MINUTE, clock)
        # sender -> JWE hashes of its messages held now, with when each was first
        # held (``clock``). Held messages stay unacked at the hub, so they count
        # against the consumer's max_ack_pending (1024): a sender naming made-up
        # keys could otherwise stall the whole inbox.
        self._held: dict[str, dict[str, float]] = {}
        self._clock = clock
        # (sender, JWE hash) of receipts whose entries are in the log but whose
        # store commit failed (a full disk), or that a start found so (a crash):
        # their redeliveries are not logged again, nor refused over the budget or as
        # too old (the log says they were received, when fresh). A trial's full store
        # and writable log had 80 entries an envelope. They are also kept in the
        # store's status (``UNSTORED_STATE``) until stored: those a start found at
        # once, the others with the next store write that commits.
        self._unstored: set[tuple[str, str]] = set(unstored)
        self._kept_unstored: set[tuple[str, str]] = set(self._unstored)
        today = utc_day(time.time())
        self.budget = SenderBudget(sender_bytes_per_day, today, store.sender_bytes(today))

    def _refused(
        self,
        subject: str,
        data: bytes,
        digest: str,
        now: datetime,
        step: str,
        reason: str,
        report_id: str | None,
        folded: dict[str, Counter[str]],
    ) -> AuditEvent | None:
        """Log a refused message and return its audit entry, or fold it if over its quota.

        A refusal over its source's quota is only counted, in ``folded`` (source
        -> step -> refusals), for the batch's ``rejected_many`` entries.
        """
        source = _source(subject)
        unlogged = self._refusals.take(source)
        if unlogged is None:
            folded.setdefault(source, Counter())[step] += 1
            return None
        # The report id once the signature vouched for it (a checked UUID); before
        # that (a key this node refuses or cannot open), the one the header claims,
        # named as a claim: the sender's operator needs it for ``msmt node resend
        # --report``. The audit entry keeps only a vouched-for id.
        named: dict[str, str | int]
        if report_id is not None:
            named = {"report_id": report_id}
        else:
            claimed = _claimed_report_id(data, self.max_message_bytes)
            named = {} if claimed is None else {"claimed_report_id": claimed}
        if unlogged:
            named["unlogged_before"] = unlogged
        log.warning(
            "inbound_rejected", sender=source, step=step, reason=_printable(reason), **named
        )
        return audit_events.rejected(
            self.member,
            now,
            source=source,
            step=step,
            reason=_printable(reason),
            report_id=report_id,
            jwe_sha256=digest,
        )

    def _hold(
        self, subject: str, digest: str, age: timedelta, exc: HeldError, result: BatchResult
    ) -> str | None:
        """Hold a message that may pass later (``None``), or say why it is not held."""
        sender = sender_field(subject)
        held = self._held.setdefault(sender, {})
        # A receipt the log holds was fresh when logged (``Delivery.logged``).
        fresh = age <= self.freshness + MAX_SKEW or (sender, digest) in self._unstored
        if len(held) >= MAX_HELD_PER_SENDER:
            # A place whose message never came back (the hub kept it, or made it up
            # and dropped it) frees once that message could only be refused: else
            # the sender's later reports were refused for good, "64 held already".
            stale = self._clock() - (self.freshness + MAX_SKEW).total_seconds()
            for old in [d for d, at in held.items() if at < stale]:
                del held[old]
        if fresh and (digest in held or len(held) < MAX_HELD_PER_SENDER):
            held.setdefault(digest, self._clock())
            result.actions.append("hold")
            result.held[sender] += 1
            self._log_hold(sender, exc)
            return None
        return "held until too old" if not fresh else f"not held: {len(held)} held already"

    def _release(self, subject: str, digest: str) -> None:
        # A held message came back and was decided: its place is free again.
        held = self._held.get(sender_field(subject))
        if held:
            held.pop(digest, None)

    def _log_hold(self, sender: str, exc: HeldError) -> None:
        if self._hold_log.due("held", sender):
            log.warning(
                "inbound_held",
                sender=sender,
                step=exc.step,
                reason=_printable(exc.reason),
                hint=exc.hint,
            )
