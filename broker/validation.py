"""Turn raw feed input (NDJSON lines) into validated sightings, with plain-words errors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Final

from pydantic import ValidationError

from broker.errors import InputError
from broker.sightings import (
    KINDS,
    SIGHTING_ADAPTER,
    SightingModel,
    leaf_values,
    may_hide_text,
    new_id_problem,
    new_text_problem,
    odd_spacing,
    repeated_value,
    uncomposed_text,
)

MAX_RECORD_BYTES = 64 * 1024
"""Largest single NDJSON record a feed may send; real sightings are a few KiB."""
NOT_NFC: Final = (
    "is not in Unicode normalization form NFC: compose it (NFC) before sending,"
    " so that one name has one spelling"
)
"""Why a new record's text in another normalization form is refused (``uncomposed_text``)."""


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One reason a record is invalid: a dotted field path and a plain reason."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class InvalidRecordError(InputError):
    """A feed record failed validation; ``problems`` lists every field at fault."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


# The tags pydantic puts in an error's location: the kinds, and the transfer categories.
_TAGS = frozenset({*KINDS, "crypto", "fuel"})


def _path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        # Discriminated unions put the chosen tag in the location (``vessel.vessel.imo``);
        # a feed author wants the path as written in the record.
        if i == 0 and item in _TAGS and len(loc) > 1:
            continue
        if i > 0 and item in ("crypto", "fuel") and loc[i - 1] == "transfer":
            continue
        parts.append(f"[{item}]" if isinstance(item, int) else str(item))
    return ".".join(parts).replace(".[", "[")


def _reason(err: dict[str, object]) -> str:
    msg = str(err.get("msg", "invalid"))
    kind = err.get("type")
    if kind == "extra_forbidden":
        return "unknown field"
    # No tag (``{}``, a transfer without ``category``) is a missing field like any other.
    if kind in ("missing", "union_tag_not_found"):
        return "required field is missing"
    # JSON Schema's "integer" takes 12.0 (the same number); the node wants the
    # integer's own spelling, as receivers do, so the reason says exactly that.
    if kind == "int_type" and isinstance(err.get("input"), float):
        return "must be an integer written without a fraction or exponent (12, not 12.0)"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx")
        expected = ctx.get("expected_tags") if isinstance(ctx, dict) else "?"
        return f"unknown value; expected one of {expected}"
    return msg.removeprefix("Value error, ")


def problems_of(exc: ValidationError) -> list[FieldProblem]:
    """Translate a pydantic error into field problems a feed author can act on."""
    errors = exc.errors()
    out = []
    for e in errors:
        if e["type"] == "too_short" and _has_item_error(e["loc"], errors):
            # ``rel_to: ["BAD"]`` is one error: the dropped item leaves the tuple
            # "too short after validation", which is only an echo of it.
            continue
        path = _path(e["loc"])
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            # The tag itself is the field at fault: name it (``kind``, ``transfer.category``).
            tag = str(e.get("ctx", {}).get("discriminator", "")).strip("'")
            path = f"{path}.{tag}" if path else tag
        out.append(FieldProblem(path, _reason(dict(e))))
    return out


def _has_item_error(loc: tuple[int | str, ...], errors: list[Any]) -> bool:
    return any(len(e["loc"]) > len(loc) and e["loc"][: len(loc)] == loc for e in errors)


_JSON_POSITION = re.compile(r"^(?P<what>.*?),? at line (?P<line>\d+),? column (?P<col>\d+)$")


_LONE_SURROGATE: Final = frozenset(
    {"unexpected end of hex escape", "lone leading surrogate in hex escape"}
)
"""jiter's words for an escaped UTF-16 surrogate without its pair (``\\ud800`` alone)."""


def _json_reason(what: str, line: int, column: int) -> str:
    if what in _LONE_SURROGATE:
        what = "an escaped lone surrogate (a \\uD800-\\uDFFF escape without its pair)"
    # An NDJSON record is one line, so its own "line 1" would read as the file's
    # line 1 (``msmt validate`` prints file lines): give the column alone.
    where = f"column {column}" if line == 1 else f"line {line} column {column} of the record"
    return f"not valid JSON: {what} at {where}"


def _not_text(raw: bytes | str) -> str | None:
    """Why ``raw`` is not JSON text at all, in words a feed author can act on, or ``None``.

    The JSON parser only says "expected value at column 1" for a byte order mark
    and "invalid unicode code point" for bytes that are not UTF-8.
    """
    if raw.startswith(b"\xef\xbb\xbf") if isinstance(raw, bytes) else raw.startswith("\ufeff"):
        return "not valid JSON: starts with a byte order mark (EF BB BF); send UTF-8 without one"
    if isinstance(raw, bytes):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return (
                f"not UTF-8 text at byte {exc.start + 1} (0x{raw[exc.start]:02X}: {exc.reason});"
                " JSON is UTF-8 (was this written as Latin-1?)"
            )
    return None


def _jiter_reason(msg: str) -> str:
    """Reword pydantic's "Invalid JSON: <what> at line L column C" in the project's terms."""
    msg = msg.removeprefix("Invalid JSON: ")
    found = _JSON_POSITION.match(msg)
    if found is None:
        return f"not valid JSON: {msg}"
    return _json_reason(found["what"], int(found["line"]), int(found["col"]))


def parse_record(raw: bytes | str) -> SightingModel:
    """Validate one JSON record and return the sighting.

    Raises ``InvalidRecordError`` (an ``InputError``) for oversized input, bad JSON,
    or any schema violation; never a raw pydantic or JSON error.
    """
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_RECORD_BYTES:
        raise InvalidRecordError(
            [FieldProblem("", f"record is {size} bytes; limit {MAX_RECORD_BYTES}")]
        )
    try:
        sighting = SIGHTING_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        problems = problems_of(exc)
        bad_json = [e for e in exc.errors() if e["type"] == "json_invalid"]
        if bad_json:
            reason = _not_text(raw) or _jiter_reason(str(bad_json[0]["msg"]))
            problems = [FieldProblem("", reason)]
        raise InvalidRecordError(problems) from None
    try:
        twice = duplicate_key(raw)
    except json.JSONDecodeError as exc:
        reason = _json_reason(exc.msg, exc.lineno, exc.colno)
        raise InvalidRecordError([FieldProblem("", reason)]) from None
    except ValueError as exc:
        raise InvalidRecordError([FieldProblem("", f"not valid JSON: {exc}")]) from None
    if twice is not None:
        raise InvalidRecordError([FieldProblem(twice, "appears more than once in its object")])
    return sighting


def parse_new_record(raw: bytes | str) -> SightingModel:
    """``parse_record``, for a record a feed sends now, held to today's rules too.

    Its id random (v4), no invisible or text-direction character in its text, its
    text in normalization form NFC, no enumerated value listed twice. Records stored
    before (planned again, compared with one sent again) are read with
    ``parse_record`` alone: what was accepted then stays readable (``new_id_problem``,
    ``new_text_problem``, ``uncomposed_text``, ``repeated_value``).
    """
    sighting = parse_record(raw)
    problem = new_id_problem(sighting.report_id)
    if problem is not None:
        raise InvalidRecordError([FieldProblem("report_id", problem)])
    text = raw if isinstance(raw, str) else raw.decode("utf-8")  # parse_record read it so
    fields = leaf_values(sighting)
    if may_hide_text(text):
        hidden = new_text_problem(fields)
        if hidden is not None:
            raise InvalidRecordError([FieldProblem(*hidden)])
        uncomposed = uncomposed_text(fields)
        if uncomposed is not None:
            raise InvalidRecordError([FieldProblem(uncomposed, NOT_NFC)])
    spaced = odd_spacing(fields)
    if spaced is not None:
        raise InvalidRecordError([FieldProblem(*spaced)])
    repeated = repeated_value(sighting)
    if repeated is not None:
        raise InvalidRecordError([FieldProblem(repeated, "lists a value more than once")])
    return sighting


class _Duplicate(Exception):  # noqa: N818 - control flow inside duplicate_key only
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Duplicate
    return out


class _Pairs(list[tuple[str, Any]]):
    """An object's members in order, kept so the duplicated one can be named."""


def duplicate_key(raw: bytes | str) -> str | None:
    """Return the path of a member name that appears twice in one object, or None.

    pydantic (like most parsers) keeps the last of duplicate members, so
    ``"tlp": "GREEN", ..., "tlp": "RED"`` would be signed as RED while another
    reader sees GREEN; RFC 7493 (I-JSON) requires names to be unique. Raises
    ``ValueError`` if ``raw`` is not JSON that Python's parser reads.
    """
    try:
        json.loads(raw, object_pairs_hook=_unique_pairs)
    except _Duplicate:
        # Rare: parse again keeping every member, to name the first repeated one.
        return _first_repeat(json.loads(raw, object_pairs_hook=_Pairs), "")
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return None


def _first_repeat(value: Any, path: str) -> str | None:
    if isinstance(value, _Pairs):
        seen: set[str] = set()
        for name, item in value:
            where = f"{path}.{name}" if path else name
            if name in seen:
                return where
            seen.add(name)
            found = _first_repeat(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_repeat(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


@dataclass(frozen=True, slots=True)
class LineResult:
    """The outcome for one NDJSON line: a sighting or the reason it was refused."""

    line: int
    sighting: SightingModel | None
    error: InvalidRecordError | None


def validate_lines(lines: Iterable[bytes]) -> Iterator[LineResult]:
    """Validate NDJSON lines one by one; blank lines are skipped, not counted as errors.

    A line's ending (LF or CRLF) is not part of its record, as at intake
    (``msmt submit``): an error is reported the same by both.
    """
    for number, line in enumerate(lines, start=1):
        raw = line.removesuffix(b"\n").rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            yield LineResult(number, parse_new_record(raw), None)
        except InvalidRecordError as exc:
            yield LineResult(number, None, exc)


@dataclass(frozen=True, slots=True)
class Oversize:
    """A line that exceeded the record limit; only its size is kept."""

    size: int


Line = tuple[int, bytes | Oversize]


class LineSplitter:
    """Split a byte stream into numbered NDJSON lines, never buffering more than the limit.

    A line longer than ``max_bytes`` is discarded as it streams and reported as
    ``Oversize``, so a feed cannot make the node hold an unbounded line.
    Blank lines are skipped but still counted, so line numbers match the input.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._over = 0  # bytes dropped from the current oversized line
        self._line = 0

    def feed(self, chunk: bytes) -> list[Line]:
        """Add bytes; return the lines completed by them."""
        out: list[Line] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            self._take(piece)
            if nl < 0:
                return out
            self._end(out)
            start = nl + 1

    def finish(self) -> list[Line]:
        """Return the last line if the stream did not end with a newline."""
        out: list[Line] = []
        if self._buf or self._over:
            self._end(out)
        return out

    def _take(self, piece: bytes) -> None:
        if self._over:
            self._over += len(piece)
        elif len(self._buf) + len(piece) > self.max_bytes:
            self._over = len(self._buf) + len(piece)
            self._buf.clear()
        else:
            self._buf += piece

    def _end(self, out: list[Line]) -> None:
        self._line += 1
        if self._over:
            out.append((self._line, Oversize(self._over)))
        elif self._buf.strip():
            out.append((self._line, bytes(self._buf).rstrip(b"\r")))
        self._buf.clear()
        self._over = 0


def validate_stream(stream: BinaryIO) -> Iterator[LineResult]:
    """``validate_lines`` over a byte stream, holding at most one record's bytes at a time.

    A line longer than ``MAX_RECORD_BYTES`` is refused by its size as it streams,
    as the node's intake does: read whole, ``/dev/zero`` (one line without end)
    took memory until a ``MemoryError``.
    """
    splitter = LineSplitter(MAX_RECORD_BYTES)
    # One system read at a time where the stream allows it: a buffered read(n) reads
    # on until n bytes, so at a terminal it took Ctrl-D as the end of that read, and a
    # second Ctrl-D was needed to end the input.
    read = getattr(stream, "read1", stream.read)

    def lines() -> Iterator[Line]:
        while chunk := read(1 << 16):
            yield from splitter.feed(chunk)
        yield from splitter.finish()

    for number, raw in lines():
        if isinstance(raw, Oversize):
            reason = f"record is {raw.size} bytes; limit {MAX_RECORD_BYTES}"
            yield LineResult(number, None, InvalidRecordError([FieldProblem("", reason)]))
        else:
            yield from (replace(result, line=number) for result in validate_lines([raw]))
