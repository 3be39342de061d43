"""Named intake feeds: each feed its own bearer token, which the node keeps only as a hash.

The feeds file (``<data_dir>/intake-feeds.json``, mode 0600) lists each feed by
name with the SHA-256 of its token, when it was added and, once revoked, when::

    {"feeds": {"jpn-ais": {"created_at": "2026-11-28T09:00:00Z", "revoked_at": null,
                           "sha256": "<64 hex digits>"}},
     "version": 1}

A token is 256 random bits (43 URL-safe characters), shown once by ``msmt feeds
add`` and never stored. The audit log names a named feed's reports ``socket:NAME``
(the channel, then the feed): the colon keeps the name apart from the channel
names ``socket``, ``spool`` and ``recovered``, and from members (rejected
entries' ``source``), now and for any channel added later. A revoked feed stays
in the file, so its name is never given to another token (one name, one token,
for the node's life) and a refused request can say it was that feed's.

``msmt feeds`` writes the file under a lock, atomically (temp file, fsync,
rename); the node reads it again whenever it changes (``FeedTokens``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from broker.errors import ConfigError, KeyMaterialError, UsageError, WriteError
from broker.keys import json_bytes, write_private
from broker.roster import format_time, parse_time
from broker.sdjwt import loads_strict

VERSION: Final = 1
CHANNEL: Final = "socket"
"""The channel a named feed comes in by; its audit name is ``socket:NAME``."""
NAME_RULE: Final = "a-z, 0-9, '_' and '-', starting with a letter, at most 32 characters"
_NAME: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_ENTRY_KEYS: Final = frozenset({"sha256", "created_at", "revoked_at"})
FEED_COUNTER: Final = "feed."
"""The node's counters by feed: ``feed.<feed>.accepted``, ``.rejected`` (records) and
``.revoked`` (requests refused as a revoked feed's)."""
FEED_USED: Final = "feed_last_used."
"""The node's status facts ``feed_last_used.<feed>``: when it last sent records, to the second."""
SHARED_STATE: Final = "intake_shared_token"
"""The node's state: ``on`` or ``off``, whether its last start let the shared intake.token in."""
MAX_FILE_BYTES: Final = 1 << 20
"""A feeds file larger than this is refused rather than read (some 5,000 feeds fit)."""


def is_feed_name(name: str) -> bool:
    """Whether ``name`` is a valid feed name (``NAME_RULE``)."""
    return _NAME.fullmatch(name) is not None


def new_token() -> str:
    """A fresh feed token: 256 random bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    """The SHA-256 of a token, as the feeds file keeps it."""
    # surrogateescape: a header's undecodable bytes hash as those bytes, never raise.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True)
class Feed:
    """One named feed: its token's hash, when it was added and, if revoked, when."""

    name: str
    sha256: bytes
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def audit_name(self) -> str:
        """How the audit log, the counters and the log name this feed (``socket:NAME``)."""
        return f"{CHANNEL}:{self.name}"


@dataclass(frozen=True, slots=True)
class Feeds:
    """The named feeds of one node, by name."""

    by_name: Mapping[str, Feed]

    def match(self, token: str) -> Feed | None:
        """The feed (revoked or not) whose token this is, or ``None``.

        Every hash is compared, in constant time, whether or not one matched.
        """
        digest = token_hash(token)
        found = None
        for feed in self.by_name.values():
            if hmac.compare_digest(digest, feed.sha256):
                found = feed
        return found

    def holds(self, feed: Feed) -> bool:
        """Whether ``feed`` is still here with the same token and not revoked."""
        now = self.by_name.get(feed.name)
        return now is not None and now.revoked_at is None and now.sha256 == feed.sha256


NO_FEEDS: Final = Feeds({})


# --- the file's form (pure) ---------------------------------------------------


def parse(data: bytes) -> Feeds:
    """Parse a feeds file's bytes; ``ValueError`` with a short reason if malformed.

    Checklist: 1. UTF-8 JSON, no member given twice; 2. an object of exactly
    ``version`` (1) and ``feeds``; 3. each feed's name fits ``NAME_RULE``; 4. each
    entry is exactly ``sha256`` (64 lower-case hex digits), ``created_at`` and
    ``revoked_at`` (RFC 3339 UTC, or null); 5. no two feeds share a token hash.
    """
    doc = loads_strict(data)
    if not isinstance(doc, dict) or set(doc) != {"version", "feeds"}:
        raise ValueError('not an object of "version" and "feeds"')
    if doc["version"] != VERSION or isinstance(doc["version"], bool):
        raise ValueError(f"version {doc['version']!r} is not {VERSION}")
    if not isinstance(doc["feeds"], dict):
        raise ValueError('"feeds" is not an object')  # noqa: TRY004 - one error type for parse
    by_name: dict[str, Feed] = {}
    seen: dict[bytes, str] = {}
    for name, entry in doc["feeds"].items():
        if not is_feed_name(name):
            raise ValueError(f"{name!r} is not a feed name ({NAME_RULE})")
        feed = _entry(name, entry)
        if feed.sha256 in seen:
            raise ValueError(f"feeds {seen[feed.sha256]!r} and {name!r} have the same token")
        seen[feed.sha256] = name
        by_name[name] = feed
    return Feeds(by_name)


def _entry(name: str, entry: Any) -> Feed:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise ValueError(f"feed {name!r} is not an object of sha256, created_at and revoked_at")
    digest = entry["sha256"]
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise ValueError(f"feed {name!r}: sha256 is not 64 lower-case hex digits")
    try:
        created = parse_time(entry["created_at"], f"feed {name!r}: created_at")
        revoked = entry["revoked_at"]
        if revoked is not None:
            revoked = parse_time(revoked, f"feed {name!r}: revoked_at")
    except KeyMaterialError as exc:
        raise ValueError(str(exc)) from None
    return Feed(name, bytes.fromhex(digest), created, revoked)


def dump(feeds: Feeds) -> bytes:
    """The file's bytes for ``feeds`` (indented, sorted, a final newline)."""
    return json_bytes(
        {
            "version": VERSION,
            "feeds": {
                f.name: {
                    "sha256": f.sha256.hex(),
                    "created_at": format_time(f.created_at),
                    "revoked_at": None if f.revoked_at is None else format_time(f.revoked_at),
                }
                for f in feeds.by_name.values()
            },
        }
    )


# --- the file -------------------------------------------------------------------


def load(path: Path) -> Feeds:
    """Read the feeds file (none: no named feeds); ``ConfigError`` in one line if it is unfit.

    Refused: a file other users may read or write, a symbolic link or other non-file,
    over ``MAX_FILE_BYTES``, or malformed (``parse``).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return NO_FEEDS
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"feeds file {path} is a symbolic link") from None
        raise ConfigError(f"cannot read feeds file {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        # Checked before fdopen, which raises IsADirectoryError for a directory.
        os.close(fd)
        raise ConfigError(f"feeds file {path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        if mode & 0o077:
            raise ConfigError(
                f"feeds file {path} is open to other users (mode {stat.S_IMODE(mode):04o}):"
                " chmod 600 it"
            )
        try:
            data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read feeds file {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"feeds file {path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return parse(data)
    except ValueError as exc:
        raise ConfigError(f"feeds file {path} is malformed: {exc}") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two operators adding and revoking at once must not each write the file
    # they read: the later write would undo the earlier, and a lost revocation
    # leaves a token accepted. The lock file is never removed (unlinking it
    # would let a third process lock a new inode meanwhile).
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot lock feeds file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def _save(path: Path, feeds: Feeds) -> None:
    try:
        write_private(path, dump(feeds))
    except OSError as exc:
        raise WriteError(f"cannot write feeds file {path}: {exc.strerror}") from None


def add(
    path: Path, name: str, now: datetime, write_token: Callable[[str], None] | None = None
) -> str:
    """Add feed ``name`` with a fresh token and return the token; ``UsageError`` if it cannot.

    ``write_token``, if given, is called with the token before the feeds file is
    written (to put it in a file first): if it raises, nothing is added. A name
    in use, or once used and revoked, is refused: one name, one token.
    """
    if not is_feed_name(name):
        raise UsageError(f"{name!r} is not a feed name ({NAME_RULE})")
    with _locked(path):
        feeds = load(path)
        old = feeds.by_name.get(name)
        if old is not None:
            what = "exists" if old.revoked_at is None else "was revoked; choose a new name"
            raise UsageError(f"feed {name!r} {what} (feeds file {path})")
        token = new_token()
        if write_token is not None:
            write_token(token)
        feed = Feed(name, token_hash(token), now)
        _save(path, Feeds({**feeds.by_name, name: feed}))
    return token


def revoke(path: Path, name: str, now: datetime) -> None:
    """Revoke feed ``name`` as of ``now``; ``UsageError`` if there is no such live feed."""
    with _locked(path):
        feeds = load(path)
        feed = feeds.by_name.get(name)
        if feed is None:
            raise UsageError(f"no feed {name!r} in {path}")
        if feed.revoked_at is not None:
            raise UsageError(f"feed {name!r} was revoked at {format_time(feed.revoked_at)}")
        _save(path, Feeds({**feeds.by_name, name: replace(feed, revoked_at=now)}))


class FeedTokens:
    """The named feeds as the running node sees them: read again whenever the file changes.

    Each ``current()`` costs one ``stat``; the file is read only when its inode,
    size, times or mode differ from the last read, so ``msmt feeds add`` and
    ``revoke`` (an atomic rename: a new inode) apply from the next request.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, ...] | None = None
        self._feeds = NO_FEEDS
        self._problem: str | None = None

    def current(self) -> Feeds:
        """The feeds as the file is now; ``ConfigError`` while it is unfit (fail closed)."""
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            seen: tuple[int, ...] = ()
        except OSError as exc:
            raise ConfigError(f"cannot read feeds file {self.path}: {exc.strerror}") from None
        else:
            seen = (
                found.st_dev,
                found.st_ino,
                found.st_size,
                found.st_mtime_ns,
                found.st_ctime_ns,
                found.st_mode,
            )
        if seen != self._seen:
            # Recorded before the read: a change racing it differs from ``seen``
            # and is read at the next call; the feeds are never staler than that.
            self._seen = seen
            try:
                self._feeds, self._problem = load(self.path), None
            except ConfigError as exc:
                self._feeds, self._problem = NO_FEEDS, str(exc)
        if self._problem is not None:
            raise ConfigError(self._problem)
        return self._feeds


def usage(counters: Mapping[str, int], state: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Figures by feed (``socket``, ``spool``, ``socket:NAME``) from the node's counters and facts.

    Each: ``accepted`` and ``rejected`` records, ``revoked`` (requests refused as a
    revoked feed's) and ``last_used`` ("" if never).
    """
    found: dict[str, dict[str, Any]] = {}
    for name, value in counters.items():
        if name.startswith(FEED_COUNTER):
            feed, _, outcome = name.removeprefix(FEED_COUNTER).rpartition(".")
            found.setdefault(feed, {})[outcome] = value
    for key, text in state.items():
        if key.startswith(FEED_USED):
            found.setdefault(key.removeprefix(FEED_USED), {})["last_used"] = text
    return {
        feed: {
            "accepted": got.get("accepted", 0),
            "rejected": got.get("rejected", 0),
            "revoked": got.get("revoked", 0),
            "last_used": got.get("last_used", ""),
        }
        for feed, got in sorted(found.items())
    }
