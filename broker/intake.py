"""Local-only intake from feeds: records answered one by one, and the unix-socket HTTP endpoint.

Feeds never hold the member's keys and plaintext never crosses the hub, so the
only ways in are local: ``POST /v1/reports`` on a unix socket (mode 0600, in a
0700 data directory) with ``Authorization: Bearer <token>``, body streamed
NDJSON; and files moved atomically into the spool directory (``broker.spool``),
whose records ``Intake`` here answers too.

Every record gets one answer line (NDJSON), in input order::

    {"line": 1, "status": "accepted", "report_id": "..."}
    {"line": 2, "status": "rejected", "reason": "schema", "report_id": "...",
     "errors": [{"path": ..., "reason": ...}]}
    {"line": 3, "status": "rejected", "reason": "size", "detail": "..."}
    {"line": 4, "status": "rejected", "reason": "duplicate", "report_id": "..."}
    {"line": 5, "status": "rejected", "reason": "conflict", "report_id": "...",
     "fields": ["observed_at", "vessel.name"], "detail": "..."}
    {"line": 6, "status": "rejected", "reason": "unavailable", "detail": "store ...: disk is full"}

"duplicate" is a resend of what was accepted (the same content, however
spelt); "conflict" is other content under an id already accepted, which the
node never signs: a correction needs a new report id. A conflict names the
fields that differ (paths only, never values), but only to the feed that gave
the accepted version: to any other feed, and for a report whose feed the store
does not know, it has no ``fields`` and its detail names none. Named otherwise, a
feed that knows another's report id could learn that report field by field,
one guess a try (a trial recovered an IMO number in 121,375 tries).

"accepted" is only written after the record is committed to the store (and its
audit entry appended): the ``Acceptor`` returns only then.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import stat
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import aiohttp
from aiohttp import web
from pydantic import BaseModel

from broker.errors import ConfigError, StoreError, UsageError, WriteError
from broker.feeds import NO_FEEDS, Feed, Feeds, FeedTokens
from broker.files import read_file_text, write_durably
from broker.log import Throttle, get_logger
from broker.serving import BoundedRunner, refusals_close
from broker.sightings import (
    HANDLING_FIELDS,
    KINDS,
    SightingModel,
    field_paths,
    is_report_id,
    same_content,
)
from broker.store import Accepted, Earlier, NewReport
from broker.validation import (
    InvalidRecordError,
    Line,
    LineSplitter,
    Oversize,
    parse_new_record,
    parse_record,
)

log = get_logger("intake")
_T = TypeVar("_T")
ANSWER_GRACE_S: Final = 1.0
"""Seconds a stop lets an answer write wait for the feed to read before it drops the
connection: a feed that reads the answers waiting for it within them ends cleanly (one
reading a backlog of a megabyte at a few hundred KB/s is dropped all the same: a review)."""

Acceptor = Callable[[list[NewReport], str], Awaitable[list[bool]]]
"""Durably accept a batch from a feed channel; True per new report, False per id taken.

May raise ``StoreError``, and must return only once the batch is committed.
Returning ``Store.accept``'s ``Accepted`` (with the records stored earlier and
their feeds) lets the intake answer "conflict" instead of "duplicate" for other
content, naming the fields that differ to the feed that gave the first version."""


class Refusal(NamedTuple):
    """A refused record as the audit log may hold it: never a field's value."""

    reason: str
    """The answer's reason (``schema``, ``size``, ``duplicate``, ``conflict``)."""
    detail: str
    """Where, in at most 200 printable ASCII characters."""
    report_id: str | None = None
    """The record's id: read from a valid record (duplicate, conflict), or the id a
    refused record gives when it is in the form of one (schema)."""


RejectRecorder = Callable[[list[Refusal], str], Awaitable[None]]
"""Durably record refused records, before they are answered."""

MAX_BATCH: Final = 500
"""Most records committed in one transaction."""

LISTEN_BACKLOG: Final = 1024
"""Connections the intake socket queues before a connect fails with EAGAIN.

A unix-socket connect beyond the backlog fails at once rather than waiting,
so aiohttp's default of 128 refused feeds in a burst (118 of 400 at once).
Linux caps it at ``net.core.somaxconn`` (4096 by default)."""


class Intake:
    """Validates lines and hands good ones to the acceptor; answers every line.

    ``feed`` names the channel (``socket``, ``spool``) in the audit log; a named
    feed's request passes its own name (``socket:NAME``) to ``process``.
    ``counts`` tallies outcomes for metrics, ``feed_counts`` records accepted and
    rejected by feed (``"<feed>.accepted"``). Details of schema errors go to the
    feed only: the audit log and the counters get the reason and the field path,
    never a value.
    """

    def __init__(
        self,
        member: str,
        max_bytes: int,
        acceptor: Acceptor,
        *,
        feed: str = "socket",
        record_rejects: RejectRecorder | None = None,
    ) -> None:
        self.member = member
        self.max_bytes = max_bytes
        self.acceptor = acceptor
        self.feed = feed
        self.record_rejects = record_rejects
        self.refusing: str | None = None  # set while the store cannot accept
        self._refusals = Throttle()
        self.counts: Counter[str] = Counter()
        self.feed_counts: Counter[str] = Counter()

    async def process(self, lines: list[Line], feed: str | None = None) -> list[dict[str, Any]]:
        """Answer a batch of lines in order; good records are committed in one transaction.

        ``feed`` names who sent them in the audit log (default: this channel's ``feed``).
        """
        feed = feed or self.feed
        answers: list[dict[str, Any] | None] = []
        batch: list[NewReport] = []
        sightings: list[SightingModel] = []
        slots: list[int] = []
        for number, raw in lines:
            answer, checked = self._check(number, raw)
            answers.append(answer)
            if checked is not None:
                slots.append(len(answers) - 1)
                batch.append(checked[0])
                sightings.append(checked[1])
        if batch:
            try:
                fresh = await self.acceptor(batch, feed)
            except StoreError as exc:
                self.refusing = str(exc)
            else:
                self.refusing = None
            # Once a minute per channel: a spool file is retried every 0.5 s while the
            # disk is full (157 lines in a trial), and a feed resends at once.
            unlogged = None if self.refusing is None else self._refusals.check("refused", feed)
            if unlogged is not None:
                log.error(
                    "intake_refused",
                    reason=self.refusing,
                    records=len(batch),
                    feed=feed,
                    **({"unlogged_before": unlogged} if unlogged else {}),
                )
            if self.refusing is not None:
                for slot in slots:
                    answers[slot] = {
                        "line": lines[slot][0],
                        "status": "rejected",
                        "reason": "unavailable",
                        "detail": self.refusing,
                    }
            else:
                earlier = fresh.earlier if isinstance(fresh, Accepted) else {}
                for i, (slot, report, new) in enumerate(zip(slots, batch, fresh, strict=True)):
                    stored = None if new else earlier.get(i)
                    answers[slot] = _answer(lines[slot][0], report, new, sightings[i], stored, feed)
        done = [a for a in answers if a is not None]
        refused = [_summary(a) for a in done if a["status"] == "rejected"]
        refused = [r for r in refused if r.reason != "unavailable"]
        if refused and self.record_rejects is not None:
            await self.record_rejects(refused, feed)
        for answer in done:
            self.counts[
                answer["status"] if answer["status"] == "accepted" else answer["reason"]
            ] += 1
            self.feed_counts[f"{feed}.{answer['status']}"] += 1
        return done

    def _check(
        self, number: int, raw: bytes | Oversize
    ) -> tuple[dict[str, Any] | None, tuple[NewReport, SightingModel] | None]:
        if isinstance(raw, Oversize):
            detail = f"record is at least {raw.size} bytes; limit {self.max_bytes}"
            return _rejected(number, "size", detail=detail), None
        try:
            sighting = parse_new_record(raw)
        except InvalidRecordError as exc:
            problems = [{"path": p.path, "reason": p.reason} for p in exc.problems]
            if any(p.reason.startswith("record is ") for p in exc.problems):
                return _rejected(number, "size", detail=str(exc)), None
            # Which report the feed meant, when its id itself is sound: the feed can
            # match the answer to its own records, and the audit entry names it.
            rid = None if any(p.path == "report_id" for p in exc.problems) else _claimed_id(raw)
            extra = {"report_id": rid} if rid else {}
            return _rejected(number, "schema", **extra, errors=problems), None
        if sighting.originator != self.member:
            reason = f"this node signs for {self.member}, not {sighting.originator}"
            # The record parsed, so its id is a checked UUID: name it (docs/NODE.md).
            return _rejected(
                number,
                "schema",
                report_id=str(sighting.report_id),
                errors=[{"path": "originator", "reason": reason}],
            ), None
        return None, (NewReport(str(sighting.report_id), sighting.kind, raw), sighting)


def _claimed_id(raw: bytes) -> str | None:
    """The record's ``report_id`` if it is a JSON object with one in the right form."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):  # hostile nesting: refused already, for itself
        return None
    rid = record.get("report_id") if isinstance(record, dict) else None
    return rid if isinstance(rid, str) and is_report_id(rid) else None


def _answer(
    number: int,
    report: NewReport,
    new: bool,
    sighting: SightingModel,
    stored: Earlier | None,
    feed: str,
) -> dict[str, Any]:
    # A taken id is a duplicate unless the record stored under it (when the
    # acceptor says) has other content.
    if new:
        return {"line": number, "status": "accepted", "report_id": report.report_id}
    if stored is None or stored.record == report.record:
        return _rejected(number, "duplicate", report_id=report.report_id)
    try:
        earlier = parse_record(stored.record)
    except InvalidRecordError:
        # Rules tightened since it was stored: other content unless byte-identical,
        # since answering "duplicate" could hide a change; which fields, unknown.
        earlier = None
    if earlier is not None and same_content(earlier, sighting):
        return _rejected(number, "duplicate", report_id=report.report_id)
    # Which fields differ is told only to the feed whose version was accepted: it
    # knows both versions already. To another feed (or when unknown: None never
    # equals a feed) each answer would say whether one guessed field is right.
    ours = stored.feed == feed
    fields = [] if earlier is None or not ours else differing_paths(earlier, sighting)
    # Paths only: they are the schema's own names (both records parsed), never a value.
    where = f" in {', '.join(fields)}" if fields else ""
    detail = (
        f"report_id {report.report_id} was accepted earlier with different content{where};"
        " send a correction under a new report_id"
    )
    extra: dict[str, Any] = {"fields": fields} if fields else {}
    return _rejected(number, "conflict", report_id=report.report_id, **extra, detail=detail)


def differing_paths(earlier: SightingModel, later: SightingModel) -> list[str]:
    """The field paths (e.g. ``vessel.name``) where two sightings differ; never their values.

    A field differs when putting ``later``'s value into ``earlier`` changes what
    ``same_content`` sees, so a respelling (``"38.10"`` for ``"38.1"``) is no
    difference. Nested objects are followed down to the fields that differ;
    a list, or an object of another type, is named as a whole.
    """
    if type(earlier) is not type(later):
        return ["kind"]
    paths: list[str] = []

    def walk(
        old: BaseModel, new: BaseModel, prefix: str, rebuild: Callable[[BaseModel], Any]
    ) -> None:
        for name in type(old).model_fields:
            theirs = getattr(new, name)

            def swap(value: Any, node: BaseModel = old, name: str = name) -> Any:
                return rebuild(node.model_copy(update={name: value}))

            if same_content(swap(theirs), earlier):
                continue
            ours = getattr(old, name)
            if isinstance(ours, BaseModel) and type(ours) is type(theirs):
                walk(ours, theirs, f"{prefix}{name}.", swap)
            else:
                paths.append(prefix + name)

    walk(earlier, later, "", lambda whole: whole)
    return paths


_KNOWN_PATHS: Final = frozenset(
    {"kind", "source", *HANDLING_FIELDS, *KINDS}
    | {path for kind in KINDS for path in field_paths(kind)}
)


def _known(path: str) -> str:
    # A feed chooses its own (unknown) field names; only schema names may reach the audit log.
    if not path:
        return "(record)"
    head = ".".join(path.split("[", 1)[0].split(".")[:2])
    return head if head in _KNOWN_PATHS else "(unknown field)"


def _summary(answer: dict[str, Any]) -> Refusal:
    # What the audit log may hold: the reason and where, never a field's value.
    reason = str(answer["reason"])
    if reason == "schema":
        paths = sorted({_known(str(e["path"])) for e in answer.get("errors", [])})
        # The id, when named, is in the form of one (_claimed_id): its own field, no content.
        return Refusal(reason, ("invalid field " + ", ".join(paths))[:200], answer.get("report_id"))
    if reason == "size":
        limit = answer.get("detail", "").rpartition(" ")[2]
        return Refusal(reason, f"record over the {limit} byte limit")
    # A duplicate or conflict was parsed: its id is a checked UUID, its own field.
    rid = answer.get("report_id")
    if reason == "conflict":
        return Refusal(reason, f"report {rid} was accepted with other content", rid)
    return Refusal(reason, f"report {rid} was already accepted", rid)


def _rejected(number: int, reason: str, **extra: Any) -> dict[str, Any]:
    return {"line": number, "status": "rejected", "reason": reason, **extra}


def answer_bytes(answers: Iterable[dict[str, Any]]) -> bytes:
    """Encode answers as NDJSON."""
    return b"".join(json.dumps(a, separators=(",", ":")).encode() + b"\n" for a in answers)


# --- the unix-socket HTTP endpoint ------------------------------------------


def ensure_token(path: Path) -> str:
    """Return the intake token, creating it (random, mode 0600) on first start."""
    if not path.exists():
        # Whole and durable, never written over: created in place and cut by a power
        # cut, it came back 0 bytes, and the node then refused to start on it.
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_durably(path, (secrets.token_urlsafe(32) + "\n").encode(), replace=False)
        except FileExistsError:
            pass  # another start made it meanwhile: that one is the token
        except OSError as exc:
            raise WriteError(f"cannot create intake token {path}: {exc.strerror}") from None
    return read_token(path)


def read_token(path: Path) -> str:
    """Read an intake token file; raise ``UsageError`` unless it holds one token, private.

    A token is one line of at least 16 visible ASCII characters (ours are 43, URL-safe
    base64). Anything else is the wrong file, and is said so before its permissions
    are: told to chmod a feed's data file, a user did, and the file's newlines then
    reached an HTTP header. No message quotes the file: it may hold a secret.
    """
    try:
        mode = path.stat().st_mode
        token = read_file_text(path, "ascii").strip()
    except OSError as exc:
        raise UsageError(f"cannot read intake token {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        # The codec's own message would quote a byte of the secret.
        raise UsageError(f"intake token {path} is not ASCII text") from None
    if not all("!" <= c <= "~" for c in token):
        raise UsageError(
            f"intake token {path} is not one token: it holds spaces, control characters"
            " or more than one line (is it the right file?)"
        )
    if len(token) < 16:
        raise UsageError(f"intake token {path} is too short")
    if mode & 0o077:
        raise UsageError(f"intake token {path} is readable by others: chmod 600 it")
    return token


SHARED_TOKEN_OFF: Final = "shared token off"  # noqa: S105 - a reason, not a secret
"""Why a request with the shared token is refused where ``intake.shared_token = false``."""

_REFUSED: Final = {
    # The holder of the shared token learns only what it already had reason to
    # think: that its token is the node's shared one. It learns what to do instead.
    SHARED_TOKEN_OFF: "this node refuses the shared intake.token (intake.shared_token = false):"
    " send with the feed's own token (msmt feeds add)",
}
"""The 401's reason where it is not the one line every other refusal gets."""


class _Gate:
    """Who a request's bearer token is: the channel's own token, or a live named feed.

    Keeps the refusals for the throttled ``intake_token_refused`` warning.
    """

    def __init__(
        self, intake: Intake, token: str | None, feeds: FeedTokens | None, *, shared: bool
    ) -> None:
        self.intake = intake
        self.expected = None if token is None else token.encode()
        self.shared = shared
        self.feeds = feeds
        self.throttle = Throttle()
        self.unlogged = Counter[str]()  # refused requests since the last warning, by why
        self.revoked: set[str] = set()  # revoked feeds whose tokens came since then

    def admit(self, given: list[str]) -> Feed | str | None:
        """``None`` for the channel's own token, the named ``Feed``, or why it is refused."""
        # Exactly one Authorization header; the scheme is case-insensitive (RFC 9110
        # §11.1), the token compared in constant time.
        if len(given) != 1:
            return "no Authorization header" if not given else "several headers"
        scheme, _, credentials = given[0].partition(" ")
        if scheme.lower() != "bearer":
            return "not a Bearer token"
        # surrogateescape: bytes that are not UTF-8 compare as the bytes sent.
        sent = credentials.encode("utf-8", "surrogateescape")
        if self.expected is not None and hmac.compare_digest(sent, self.expected):
            return None if self.shared else SHARED_TOKEN_OFF
        return self._named(credentials)

    def _named(self, credentials: str) -> Feed | str:
        known = self.current()
        if known is None:
            return "feeds file unfit"
        found = known.match(credentials)
        if found is None:
            return "wrong token"
        if found.revoked_at is not None:
            # The operator's own name for a token it retired: not a secret (the
            # audit log holds it), and it says which feed still knocks.
            self.revoked.add(found.name)
            self.intake.feed_counts[f"{found.audit_name}.revoked"] += 1
            return "revoked feed token"
        return found

    def current(self) -> Feeds | None:
        """The named feeds now, or ``None`` while the feeds file is unfit."""
        # Fail closed: while the file is unfit no named feed is let in (the
        # channel's own token still is); the operator sees why once a minute.
        try:
            return NO_FEEDS if self.feeds is None else self.feeds.current()
        except ConfigError as exc:
            if self.throttle.due("feeds", "file"):
                log.error("intake_feeds_unreadable", reason=str(exc))  # noqa: TRY400
            return None

    def refuse(self, why: str) -> web.Response:
        """Count and (once a minute) log a refused token; the 401 names the scheme (RFC 6750 §3)."""
        # A feed with a stale token is otherwise invisible to the operator; one
        # line a minute, not one per request, so a flood cannot fill the log.
        feed = self.intake.feed
        self.intake.counts["token"] += 1
        self.unlogged[why] += 1
        if self.throttle.due("token", feed):
            named = {"revoked_feeds": sorted(self.revoked)} if self.revoked else {}
            log.warning("intake_token_refused", requests=dict(self.unlogged), feed=feed, **named)
            self.unlogged.clear()
            self.revoked.clear()
        return web.json_response(
            {"error": _REFUSED.get(why, "missing or wrong bearer token")},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="msmt-intake"'},
        )


def make_app(
    intake: Intake, token: str | None, feeds: FeedTokens | None = None, *, shared: bool = True
) -> web.Application:
    """The intake HTTP application: ``POST /v1/reports`` with a bearer token.

    The token is the channel's own (``intake.token``: feed ``socket``) or, with
    ``feeds``, a named feed's (feed ``socket:NAME``), looked up afresh for each
    request, so a feed added or revoked counts from the next one. With
    ``shared=False`` the channel's own token is refused (401 saying why), and
    ``token`` (``None`` if there is none) only tells it apart from a wrong one. A request
    streaming when its feed is revoked ends before its next batch is committed.
    A refused token is counted (``intake.counts["token"]``) and logged at most
    once a minute, never with the token sent, naming a feed only when the
    token was a revoked feed's. When the app shuts down, a request
    waiting for more of its body ends at once: what was read is answered, the
    rest is not (so not accepted), and the feed sends it again.
    """
    stopping = asyncio.Event()
    gate = _Gate(intake, token, feeds, shared=shared)

    async def submit(request: web.Request) -> web.StreamResponse:
        feed = gate.admit(request.headers.getall("Authorization", []))
        if isinstance(feed, str):
            return gate.refuse(feed)
        name = intake.feed if feed is None else feed.audit_name
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            return await answer(request, response, feed, name)
        except ConnectionError:
            # The feed went away mid-request (killed, its connection cut): what was
            # answered is committed, a line not yet complete is not taken, and the
            # feed resends what it had no answer for (answered duplicate). aiohttp's
            # own line for it was an error ("Error handling request"), one per feed
            # killed in bench/chaos.py, as if the node had failed.
            log.info("intake_request_ended", reason="the feed closed the connection", feed=name)
            return response

    async def answer(
        request: web.Request, response: web.StreamResponse, feed: Feed | None, name: str
    ) -> web.StreamResponse:
        splitter = LineSplitter(intake.max_bytes)
        while True:
            chunk = await _next_chunk(request, stopping)
            if chunk is None:
                # Stopping: a line not yet complete is left unanswered, not guessed at.
                log.info("intake_request_ended", reason="node stopping")
                break
            if feed is not None and not ((known := gate.current()) and known.holds(feed)):
                # Revoked (or the file became unfit) while streaming: nothing more is taken.
                log.info("intake_request_ended", reason="feed no longer valid", feed=name)
                break
            lines = splitter.feed(chunk) if chunk else splitter.finish()
            # Each network chunk's complete lines are committed together, so a
            # slow feed still gets prompt answers and a fast one batched fsyncs.
            for i in range(0, len(lines), MAX_BATCH):
                answers = await intake.process(lines[i : i + MAX_BATCH], name)
                written = response.write(answer_bytes(answers))
                if not await _unless_stopping(written, stopping, ANSWER_GRACE_S):
                    return _cut_off(request, response)
            if not chunk:
                break
        if not await _unless_stopping(response.write_eof(), stopping, ANSWER_GRACE_S):
            return _cut_off(request, response)
        return response

    async def on_shutdown(_app: web.Application) -> None:
        stopping.set()

    app = web.Application(client_max_size=1024**3, middlewares=[refusals_close])
    app.router.add_post("/v1/reports", submit)
    app.on_shutdown.append(on_shutdown)
    return app


async def _next_chunk(request: web.Request, stopping: asyncio.Event) -> bytes | None:
    """The next piece of the body (``b""`` at its end), or None once ``stopping`` is set.

    aiohttp's shutdown waits up to its timeout for every open request, so a feed
    that holds its request open between records (streaming as they come) held
    up each stop by that long before being cut off mid-answer.
    """
    if stopping.is_set():
        return None
    # Cancelling the read cancels only its wait: bytes not yet read stay unread.
    read = await _unless_stopping(request.content.readany(), stopping)
    return read[0] if read else None


async def _unless_stopping(
    step: Awaitable[_T], stopping: asyncio.Event, grace: float = 0.0
) -> tuple[_T] | None:
    """``(result,)`` of ``step``, or None if it is not done ``grace`` s after ``stopping`` is set.

    ``step`` is then cancelled.
    """

    async def stopped() -> None:
        await stopping.wait()
        await asyncio.sleep(grace)

    task = asyncio.ensure_future(step)
    stop = asyncio.ensure_future(stopped())
    try:
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        task.cancel()  # only if still waiting
    return (task.result(),) if task in done else None


def _cut_off(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """End a request whose feed leaves its answers unread as the node stops.

    Its answers wait in the socket's buffers (the node stops reading meanwhile),
    so no clean end could reach the feed: the connection is dropped. What was
    answered but not read is committed all the same; the feed resends those
    records, and they are answered ``duplicate``.
    """
    log.info("intake_request_ended", reason="node stopping; the feed left its answers unread")
    if request.transport is not None:
        request.transport.abort()
    return response


def _set_aside_stale_socket(path: Path) -> Path | None:
    """Move a stale socket left by a killed run out of the way; refuse any other file.

    It is renamed, not unlinked, so its inode stays allocated until the new socket
    is bound: the new socket then has a different inode number, which is what a
    still-stopping older node compares before removing "its" socket.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot prepare intake socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        # A mistyped intake.socket must not cost the operator a file.
        raise UsageError(f"intake socket {path} exists and is not a socket: move it away")
    aside = path.with_name(f".{path.name}.stale-{secrets.token_hex(4)}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return None  # gone meanwhile: nothing to set aside
    except OSError as exc:
        raise UsageError(f"cannot replace stale intake socket {path}: {exc.strerror}") from None
    return aside


def _remove_own_socket(path: Path, ident: tuple[int, int]) -> None:
    # Only the socket this process bound: a newer node may already have replaced it
    # (same data directory, started before this one finished stopping), and removing
    # that one would cut its feeds off. The check and the unlink are two calls; a
    # replacement landing between them is the one race left, and it needs two nodes
    # racing on one data directory.
    try:
        found = path.lstat()
        if stat.S_ISSOCK(found.st_mode) and (found.st_dev, found.st_ino) == ident:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        # Shutdown goes on: a socket left behind is cleared at the next start.
        log.warning("intake_socket_left", path=str(path), error=exc.strerror)


class _UnixRunner(BoundedRunner):
    """An ``AppRunner`` whose ``cleanup`` also removes the socket file it served on."""

    def __init__(self, app: web.Application, path: Path, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.socket_path = path
        self.socket_ident: tuple[int, int] | None = None  # (st_dev, st_ino) once bound

    async def cleanup(self) -> None:
        """Stop serving, let requests finish, then remove the socket if it is still ours."""
        try:
            await super().cleanup()
        finally:
            if self.socket_ident is not None:
                _remove_own_socket(self.socket_path, self.socket_ident)
                self.socket_ident = None


async def serve_unix(app: web.Application, path: Path) -> web.AppRunner:
    """Serve ``app`` on a unix socket at ``path`` with mode 0600; return the runner.

    A stale socket at ``path`` is replaced; any other file there is refused with
    ``UsageError``. The runner's ``cleanup()`` removes the socket again, unless
    another process has replaced it in the meantime.
    """
    aside = _set_aside_stale_socket(path)
    # On shutdown a feed mid-stream gets a few seconds to finish its batch, so the
    # whole stop stays inside a service manager's timeout.
    runner = _UnixRunner(
        app, path, listener="intake", handle_signals=False, access_log=None, shutdown_timeout=10.0
    )
    try:
        await runner.setup()
        await web.UnixSite(runner, str(path), backlog=LISTEN_BACKLOG).start()
        os.chmod(path, 0o600)
        bound = os.lstat(path)
        runner.socket_ident = (bound.st_dev, bound.st_ino)
    finally:
        if aside is not None:
            with contextlib.suppress(OSError):
                os.unlink(aside)
    return runner


# --- the client side, for ``msmt submit`` ---------------------------------------


class RecordCount:
    """Counts the records in a byte stream as the node counts them: its non-blank lines.

    (A line of only spaces longer than the record limit is one the node answers
    ``size`` and this does not count; more answers than counted is no loss.)
    """

    def __init__(self) -> None:
        self.records = 0
        self._open = False  # the current line has more than whitespace

    def feed(self, chunk: bytes) -> None:
        """Count the lines that ``chunk`` completes."""
        *ended, rest = chunk.split(b"\n")
        for piece in ended:
            self.records += self._open or bool(piece.strip())
            self._open = False
        self._open = self._open or bool(rest.strip())

    def finish(self) -> None:
        """Count a last line without a newline."""
        self.records += self._open
        self._open = False


async def _reason(resp: aiohttp.ClientResponse) -> str:
    """``": REASON"`` from a refusal's JSON body (``{"error": ...}``), or ``""`` if none."""
    # The node's own words, from its own socket: kept to one short line all the same.
    try:
        body = json.loads(await resp.content.read(1024))
    except (aiohttp.ClientError, OSError, ValueError):
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return f": {' '.join(error.split())[:300]}" if isinstance(error, str) else ""


async def submit(
    socket: Path,
    token: str,
    chunks: AsyncIterator[bytes],
    on_answer: Callable[[dict[str, Any]], None],
) -> None:
    """Stream NDJSON chunks to a node's intake socket; call ``on_answer`` per answer line.

    Raises ``UsageError`` if the node cannot be reached, refuses the token, or
    ends its answers before it has answered every record sent (it is stopping,
    or the feed was revoked meanwhile): records without an answer were not accepted.
    """
    sent_all = False
    sent = RecordCount()

    async def body() -> AsyncIterator[bytes]:
        # Set before the body's end goes out, so before the node can see it and
        # answer the last record: an answer stream that ends while this is unset
        # was cut short.
        nonlocal sent_all
        async for chunk in chunks:
            sent.feed(chunk)
            yield chunk
        sent.finish()
        sent_all = True

    connector = aiohttp.UnixConnector(path=str(socket))
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.post(
                "http://msmt-node/v1/reports",
                data=body(),
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/x-ndjson",
                },
            ) as resp,
        ):
            if resp.status == 401:
                raise UsageError(
                    f"the node at {socket} refused the intake token{await _reason(resp)}"
                )
            if resp.status != 200:
                raise UsageError(f"the node at {socket} answered HTTP {resp.status}")
            answered = 0
            answers = aiter(resp.content)
            while True:
                try:
                    line = await anext(answers)
                except StopAsyncIteration:
                    break
                except (aiohttp.ClientError, OSError) as exc:
                    # The node went away mid-answer (killed, say): aiohttp's own text
                    # speaks of transfer lengths; what the feed needs is what to do.
                    raise UsageError(
                        f"the connection to the node at {socket} broke before every record"
                        f" was answered ({type(exc).__name__}): those without an answer may"
                        " or may not have been accepted; send them again"
                    ) from None
                if line.strip():
                    answered += 1
                    on_answer(json.loads(line))
            # All sent is not all read: a node that stops (or ends the request
            # otherwise) after the last bytes went out leaves the rest unanswered.
            if not sent_all or answered < sent.records:
                raise UsageError(
                    f"the node at {socket} ended the request before answering every record"
                    " (is it stopping, or was this feed's token revoked?): those without an"
                    " answer were not accepted; send them again"
                )
    except aiohttp.ClientConnectorError as exc:
        # aiohttp's own text names "ssl:default" and the host; the OS reason is what helps.
        reason = exc.os_error.strerror or str(exc.os_error)
        raise UsageError(f"cannot reach the node at {socket}: {reason} (is it running?)") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UsageError(f"cannot reach the node at {socket}: {exc}") from None
