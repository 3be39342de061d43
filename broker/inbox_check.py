"""Check a node's inbox against the envelopes it kept and its own audit log.

The inbox holds received reports in the clear, and ``msmt export stix`` and
``msmt inbox`` read them from there; a row edited or deleted on disk would be
believed. ``check`` finds both: each row whose envelope was kept is verified
again (``evidence.make`` and ``evidence.check``: the originator's signature,
disclosures, schema, markings) and compared with what the row says, and the
rows are matched one for one with the log's ``received`` entries. The log
itself is ``msmt audit verify``'s to check. Problems name the row's report and
sender and the column that differs, never a value.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from joserfc.jwk import OKPKey

from broker import evidence
from broker.envelope import Received
from broker.errors import EnvelopeError
from broker.roster import Roster
from broker.store import InboxEntry, Store


@dataclass
class InboxCheck:
    """What ``check`` found: rows checked against an envelope, rows without one, problems."""

    verified: int = 0
    not_kept: int = 0
    key_not_held: int = 0
    """Rows whose kept envelope is the one received (its hash is the log's) but whose
    decryption key this node no longer holds: their columns cannot be checked again."""
    problems: list[str] = field(default_factory=list)


def _differs(entry: InboxEntry, got: Received) -> list[str]:
    # Column by column, as the receiver wrote them from the verified envelope; JSON
    # compared as text, so that 83.0 is not 83 and true is not 1.
    signed: Mapping[str, tuple[object, object]] = {
        "originator": (entry.originator, got.originator),
        "kind": (entry.kind, got.kind),
        "tlp": (entry.tlp, got.tlp),
        "rel_to": (entry.rel_to, got.rel_to),
        "iat": (entry.iat, got.iat.timestamp()),
        "paths": (entry.paths, got.paths),
        "fields": (_canonical(entry.fields), _canonical(dict(got.fields))),
        # A row from before nodes recorded the key has none to compare.
        "signing_kid": (entry.signing_kid, None if entry.signing_kid is None else got.signing_kid),
    }
    return [name for name, (stored, real) in signed.items() if stored != real]


def _against_envelope(
    entry: InboxEntry, jwe: str, me: str, decryption_keys: Mapping[str, OKPKey], roster: Roster
) -> str | None:
    """How the row differs from its kept envelope, or None; ``KeyNotHeldError`` if unopenable."""
    if hashlib.sha256(jwe.encode("utf-8")).hexdigest() != entry.jwe_sha256:
        return "the kept envelope is not the one received"
    try:
        kept = evidence.make(
            jwe, received_at=entry.received_at, decryption_keys=decryption_keys, me=me
        )
        got = evidence.check(kept, roster)
    except evidence.KeyNotHeldError:
        raise
    except EnvelopeError as exc:
        return f"the kept envelope does not verify at {exc}"
    if (got.sender, got.report_id) != (entry.sender, entry.report_id):
        return "the kept envelope is another report's"
    differ = _differs(entry, got)
    if differ:
        verb = "differs" if len(differ) == 1 else "differ"
        return f"{', '.join(differ)} {verb} from the signed envelope"
    return None


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _shown(text: str) -> str:
    # Columns of a damaged row may hold anything: never a line break or escape code.
    return text if text.isprintable() and len(text) <= 64 else ascii(text[:64])


def check(
    store: Store,
    received: Iterable[tuple[int, str, str, str, float]],
    *,
    me: str,
    decryption_keys: Mapping[str, OKPKey],
    roster: Roster,
    kept_since: float | None,
) -> InboxCheck:
    """Check every inbox row against its kept envelope and the log's receipts.

    ``received`` is the log's (index, sender, report id, JWE hash, time) per
    ``received`` entry. A report may be received more than once (sent again after
    the seen-set forgot it); the row keeps the first copy, so one of its receipts
    must name it. ``kept_since`` is when the store began keeping envelopes (None:
    always), so a row without one is old only if its receipt is older.
    """
    result = InboxCheck()
    logged: dict[tuple[str, str], list[tuple[int, str, float]]] = {}
    for index, sender, report_id, digest, at in received:
        logged.setdefault((sender, report_id), []).append((index, digest, at))
    for entry in store.inbox_rows():
        if isinstance(entry, str):
            result.problems.append(entry)  # its receipt, if any, is reported missing below
            continue
        where = f"report {_shown(entry.report_id)} from {_shown(entry.sender)}"
        receipts = logged.pop((entry.sender, entry.report_id), [])
        mine = [at for _, digest, at in receipts if digest == entry.jwe_sha256]
        if not mine:
            result.problems.append(f"{where}: no received entry in the audit log names it")
        jwe = store.kept_envelope(entry.sender, entry.report_id)
        if jwe is None:
            # The log's time, not the row's: a row's own columns are what is in question.
            if kept_since is not None and mine and min(mine) < kept_since + 1:
                result.not_kept += 1
            else:
                result.problems.append(f"{where}: its kept envelope is missing")
            continue
        try:
            problem = _against_envelope(entry, jwe, me, decryption_keys, roster)
        except evidence.KeyNotHeldError:
            # Lost keys (a drill: every row received before counted as a problem, so the
            # check failed for good); the envelope's hash matched the signed log's.
            result.key_not_held += 1
            continue
        if problem is not None:
            result.problems.append(f"{where}: {problem}")
        else:
            result.verified += 1
    for (sender, report_id), receipts in sorted(logged.items(), key=lambda item: item[1]):
        result.problems.append(
            f"audit entry {receipts[0][0]}: report {report_id} received from {sender}"
            " is not in the inbox"
        )
    return result


__all__ = ["InboxCheck", "check"]
