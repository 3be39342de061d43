"""A witness told, by its operator, to take a partner's forked log from a new checkpoint.

A member restored from a backup has a log that no longer extends what the witnesses
cosigned: each raises a rollback or fork alarm and never cosigns that log again
(docs/DEPLOY.md, "What a restore means"). Only people can decide that the fork is a
restore and not a rewritten history: the restored member's operator reads its log's
size and root (``msmt audit verify``) and gives them to the others out of band; each
witness's operator who accepts it runs ``msmt node reanchor`` with the node stopped.

``reanchor`` replaces what the witness state holds for that log by the given size and
root, and first appends what it held, with the new values, the time and the reason, to
``witness-reanchored.jsonl`` beside it: the evidence of the cosigned history the
witness let go, for the auditors. The node then asks the log for a proof from the new
size, as from any it cosigned: a size or root that is not the log's is a conflict again.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from broker.errors import AuditError
from broker.files import write_durably
from broker.merkle import HASH_SIZE
from broker.roster import format_time
from broker.witness import LogState, dump_state, load_witness_state

REANCHORED_FILE: Final = "witness-reanchored.jsonl"
"""Beside the witness state: one JSON line for each log a reanchor let go, kept for good."""


@dataclass(frozen=True, slots=True)
class Reanchored:
    """What ``reanchor`` replaced (``None``: the witness held nothing of that log) and by what."""

    before: LogState | None
    after: LogState


def reanchor(
    state_path: Path, log: str, size: int, root: bytes, reason: str, now: datetime
) -> Reanchored:
    """Record what the witness held of ``log``, then hold ``size`` and ``root`` instead.

    Raises ``AuditError`` (nothing changed) if the evidence line cannot be written
    durably, and if the state cannot be saved after it (the line then says what was
    to be done, and running the command again is safe).
    """
    if len(root) != HASH_SIZE:
        raise AuditError(f"a root is {HASH_SIZE} bytes, not {len(root)}")
    state = load_witness_state(state_path)
    before = state.get(log)
    after = LogState(size, root)
    try:  # made before the evidence line: it must never record what could not be saved
        data = dump_state({**state, log: after})
    except ValueError as exc:
        raise AuditError(f"cannot hold size {size} in the witness state: {exc}") from None
    line = {
        "at": format_time(now),
        "log": log,
        "before": None if before is None else _shown(before),
        "after": _shown(after),
        "reason": reason,
    }
    _append_durably(
        state_path.with_name(REANCHORED_FILE),
        json.dumps(line, sort_keys=True, ensure_ascii=True).encode() + b"\n",
    )
    try:  # as the node saves it (auditnet_witness), without loading the network client
        write_durably(state_path, data)
    except OSError as exc:
        raise AuditError(
            f"cannot save witness state {state_path}: {exc.strerror} (the reanchor is"
            f" recorded in {REANCHORED_FILE}: run it again once there is room)"
        ) from None
    return Reanchored(before, after)


def _shown(state: LogState) -> dict[str, object]:
    return {"size": state.size, "root": base64.b64encode(state.root).decode()}


def _append_durably(path: Path, line: bytes) -> None:
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(path, flags, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO put there would hang it
                raise OSError(errno.EINVAL, "not a regular file")
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AuditError(f"cannot record the reanchor in {path}: {exc.strerror}") from None
