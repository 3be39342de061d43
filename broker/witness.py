"""C2SP ``tlog-witness`` logic (pure): check a new checkpoint against the last one seen, cosign.

A witness keeps, per origin, the latest checkpoint size and root it has
cosigned. It cosigns a new checkpoint only if the log's signature verifies
and a consistency proof links it to that state, so a log that rewrote its
history cannot get a cosignature, and any two cosigned views are consistent.

The caller persists ``state`` durably *before* publishing the cosignature
(a witness that forgets its state can be rolled back). The request body of
the C2SP HTTP API (``old <size>``, proof lines, blank line, checkpoint) is
supported by ``parse_add_checkpoint`` so the same bytes can travel on NATS.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.checkpoint import (
    MAX_LOG_SIZE,
    Checkpoint,
    UntrustedSignerError,
    cosign,
    open_checkpoint,
)
from broker.errors import AuditError, ConfigError
from broker.files import read_file_bytes
from broker.members import is_member
from broker.merkle import HASH_SIZE, ProofError, verify_consistency
from broker.note import Note, NoteError, Verifier, b64decode_strict, excerpt

_OLD_RE: Final = re.compile(r"old (0|[1-9][0-9]{0,19})")


class WitnessError(AuditError):
    """The witness refused a checkpoint; ``status`` is the tlog-witness HTTP status it maps to."""

    status = 400


class UnknownLogError(WitnessError):
    """The checkpoint's origin is not a log this witness follows (404)."""

    status = 404


class BadSignatureError(WitnessError):
    """The checkpoint is not validly signed by the log's key (403)."""

    status = 403


class ConflictError(WitnessError):
    """The request's old size is not the witness's latest size for the log (409).

    ``size`` tells the log which size to prove consistency from.
    """

    status = 409

    def __init__(self, origin: str, size: int, claimed: int) -> None:
        super().__init__(f"{origin}: witness is at size {size}, request claims old size {claimed}")
        self.size = size


class WitnessAlarmError(WitnessError):
    """The log is misbehaving: it forked or rolled back (422). Raise the alarm; never cosign.

    ``kind`` is ``"fork"`` (a different history for a size already seen) or
    ``"rollback"`` (a smaller size than already cosigned).
    """

    status = 422

    def __init__(self, kind: str, origin: str, detail: str) -> None:
        super().__init__(f"{kind} detected on log {origin}: {detail}")
        self.kind = kind
        self.origin = origin


MAX_STATE_SIZE: Final = MAX_LOG_SIZE
"""The largest log size a witness cosigns and records (``checkpoint.MAX_LOG_SIZE``)."""


def _within_state(origin: str, size: int) -> None:
    # Its state is RFC 8785 JSON, which holds integers up to 2^53 - 1: a review's
    # checkpoint of size 2^60, signed by the log's own key, failed the save and stopped
    # every node that witnessed it. Refused at the open, before a proof is asked for
    # (a review: a witness that knew the log asked one first, and failed then).
    if size > MAX_STATE_SIZE:
        raise WitnessError(
            f"{excerpt(origin)}'s checkpoint of size {size} is beyond {MAX_STATE_SIZE},"
            " the largest a witness's state holds"
        )


@dataclass(frozen=True, slots=True)
class LogState:
    """The latest size and root a witness has cosigned for one origin."""

    size: int
    root: bytes


@dataclass(frozen=True, slots=True)
class Opened:
    """A checkpoint whose log signature ``Witness.open`` verified (steps 1-2), and by whom."""

    checkpoint: Checkpoint
    note: Note
    witness: Witness = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class AddCheckpoint:
    """A parsed add-checkpoint request: the old size, the proof, and the signed checkpoint."""

    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: bytes


def add_checkpoint_body(old_size: int, proof: Sequence[bytes], checkpoint: str) -> bytes:
    """Build a tlog-witness add-checkpoint request body."""
    lines = [f"old {old_size}\n"] + [base64.b64encode(h).decode() + "\n" for h in proof]
    return ("".join(lines) + "\n" + checkpoint).encode()


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    """Parse an add-checkpoint request body; raise ``WitnessError`` if malformed."""
    head, sep, checkpoint = body.partition(b"\n\n")
    if not sep:
        raise WitnessError("add-checkpoint body has no blank line before the checkpoint")
    try:
        lines = head.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise WitnessError("add-checkpoint header is not ASCII") from None
    match = _OLD_RE.fullmatch(lines[0])
    if not match:
        raise WitnessError("add-checkpoint body must start with 'old <size>'")
    if len(lines) - 1 > 63:
        raise WitnessError("add-checkpoint proof has more than 63 hashes")
    proof = []
    for i, line in enumerate(lines[1:]):
        raw = b64decode_strict(line) or b""
        if len(raw) != HASH_SIZE:
            raise WitnessError(f"add-checkpoint proof line {i} is not a base64 32-byte hash")
        proof.append(raw)
    return AddCheckpoint(int(match.group(1)), tuple(proof), checkpoint)


class Witness:
    """One member acting as witness for the other members' logs.

    ``logs`` maps each followed origin to the keys that may sign its checkpoints;
    ``state`` is the persisted latest state per origin (empty for new logs).
    """

    def __init__(
        self,
        name: str,
        key: Ed25519PrivateKey,
        logs: Mapping[str, Sequence[Verifier]],
        state: Mapping[str, LogState] | None = None,
    ) -> None:
        self.name = name
        self._key = key
        self._logs = {origin: tuple(keys) for origin, keys in logs.items()}
        self.state: dict[str, LogState] = dict(state or {})

    def open(self, checkpoint: bytes | str) -> Opened:
        """Steps 1-2 of ``add_checkpoint``: parse the note and verify the log's signature.

        Raises ``WitnessError`` (malformed), ``UnknownLogError`` or
        ``BadSignatureError``. A caller that must fetch a proof first opens the
        checkpoint before asking (so a forgery costs no round trip) and hands
        the result to ``add_opened``, which then need not verify it again.
        """
        try:
            origin = _origin(checkpoint)
        except NoteError as exc:
            raise WitnessError(f"malformed checkpoint: {exc}") from None
        keys = self._logs.get(origin)
        if keys is None:
            # The origin line is the log's text: named only if it is a member's log.
            # A member's log: most often one that joined the roster after this node
            # started (it reads the roster only then), as for a rotated key below.
            log = (
                f"log {origin} (if {origin} joined the roster since this node started,"
                " restart with the new roster)"
                if is_member(origin)
                else "a log of that origin"
            )
            raise UnknownLogError(f"witness {self.name} does not follow {log}")
        try:
            cp, note = open_checkpoint(checkpoint, keys)
        except NoteError as exc:
            # Most often a partner's rotated log key, in a roster this node has not
            # loaded yet: say so, since the line shows in every node's status then.
            hint = (
                f" (if {origin} rotated its keys, restart with the new roster)"
                if isinstance(exc, UntrustedSignerError)
                else ""
            )
            raise BadSignatureError(f"checkpoint of {origin}: {exc}{hint}") from None
        _within_state(cp.origin, cp.size)
        return Opened(cp, note, self)

    def add_checkpoint(
        self, old_size: int, proof: Sequence[bytes], checkpoint: bytes | str, now: int
    ) -> str:
        """Check a new checkpoint and return the cosignature note (checkpoint + our line).

        Checklist (each step raises; state changes only after all pass):
          1. the note parses and its origin is a log we follow (``UnknownLogError``);
          2. it is signed by that log's key (``BadSignatureError``);
          3. ``old_size`` is our latest size for the origin (``ConflictError``);
          4. the new size is not below it (``WitnessAlarmError`` rollback);
          5. equal sizes must have equal roots, otherwise a valid consistency
             proof must link our root to the new one (``WitnessAlarmError`` fork);
          6. cosign it at time ``now``, and record the new state.
        """
        return self.add_opened(old_size, proof, self.open(checkpoint), now)

    def add_opened(self, old_size: int, proof: Sequence[bytes], opened: Opened, now: int) -> str:
        """Steps 3-6 of ``add_checkpoint`` for a checkpoint this witness's ``open`` verified.

        Raises ``WitnessError`` for an ``Opened`` made by another witness (its
        keys are not ours), then as ``add_checkpoint``.
        """
        if opened.witness is not self:
            raise WitnessError("checkpoint was not opened by this witness")
        cp, note = opened.checkpoint, opened.note
        origin = cp.origin
        known = self.state.get(origin, LogState(0, b""))
        if old_size != known.size:
            raise ConflictError(origin, known.size, old_size)
        if cp.size < known.size:
            raise WitnessAlarmError("rollback", origin, f"size {cp.size} after size {known.size}")
        self._check_consistent(cp, known, proof)
        # Signed before the state moves: a cosignature that cannot be made
        # (a clock out of range) leaves the witness where it was.
        line = cosign(note, self.name, self._key, now)
        self.state[origin] = LogState(cp.size, cp.root)
        return Note(note.text, (line,)).render()

    @staticmethod
    def _check_consistent(cp: Checkpoint, known: LogState, proof: Sequence[bytes]) -> None:
        if known.size == 0:
            if proof:
                raise WitnessError("a first checkpoint needs no consistency proof")
            return
        if cp.size == known.size:
            if proof or cp.root != known.root:
                raise WitnessAlarmError(
                    "fork", cp.origin, f"two different roots for size {cp.size}"
                )
            return
        try:
            verify_consistency(known.size, cp.size, known.root, cp.root, proof)
        except ProofError as exc:
            # A log can always prove an honest extension; failing means its history changed.
            raise WitnessAlarmError(
                "fork", cp.origin, f"size {cp.size} is not an extension of size {known.size}: {exc}"
            ) from None


def dump_state(state: Mapping[str, LogState]) -> bytes:
    """Serialise a witness's state (RFC 8785 JSON) for the caller to store durably."""
    return rfc8785.dumps(
        {
            o: {"size": st.size, "root": base64.b64encode(st.root).decode()}
            for o, st in state.items()
        }
    )


def load_witness_state(path: Path) -> dict[str, LogState]:
    """Read the persisted witness state; raise ``ConfigError`` if it is unreadable.

    A configuration error (exit status 2): restarting cannot mend the file, and
    the sample systemd unit does not restart on 2.
    """
    try:
        data = read_file_bytes(path)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        problem = str(exc.strerror)
    else:
        try:
            return load_state(data)
        except WitnessError as exc:
            problem = str(exc)
    raise ConfigError(
        f"{path} is unreadable: {problem}: restore it from a backup; without it this node"
        " would cosign every partner's log afresh, forgetting what it cosigned (docs/DEPLOY.md)"
    )


def load_state(data: bytes) -> dict[str, LogState]:
    """Parse ``dump_state`` output; raise ``WitnessError`` naming the bad origin."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):  # also an integer of over 4300 digits
        raise WitnessError("witness state is not JSON") from None
    if not isinstance(raw, dict):
        raise WitnessError("witness state is not a JSON object")
    state = {}
    for origin, item in raw.items():
        fields = item if isinstance(item, dict) else {}
        size, root_text = fields.get("size"), fields.get("root")
        root = b64decode_strict(root_text) if isinstance(root_text, str) else None
        # A bool is an int to Python, and no log holds 2**64 entries: either, read as
        # a size, would set off a false alarm at that log's next checkpoint.
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_STATE_SIZE:
            raise WitnessError(f"witness state for {excerpt(origin)} is malformed")
        if root is None or len(root) != HASH_SIZE:
            raise WitnessError(f"witness state for {excerpt(origin)} is malformed")
        state[origin] = LogState(size, root)
    return state


def _origin(data: bytes | str) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    origin = text.split("\n", 1)[0]
    if not origin or "\u2014" in origin:
        raise NoteError("checkpoint has no origin line")
    return origin


__all__ = [
    "AddCheckpoint",
    "BadSignatureError",
    "ConflictError",
    "LogState",
    "Opened",
    "UnknownLogError",
    "Witness",
    "WitnessAlarmError",
    "WitnessError",
    "add_checkpoint_body",
    "dump_state",
    "load_state",
    "parse_add_checkpoint",
]
