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
    problems: list[str] = field(default_factory=list)


def _differs(entry: InboxEntry, got: Received) -> list[str]:
    # Column by column: what the receiver wrote from the verified envelope.
    signed: Mapping[str, object] = {
        "originator": got.originator,
        "kind": got.kind,
        "tlp": got.tlp,
        "rel_to": got.rel_to,
        "iat": got.iat.timestamp(),
        "paths": got.paths,
        "fields": dict(got.fields),
    }
    return [name for name, value in signed.items() if getattr(entry, name) != value]


def check(
    store: Store,
    received: Iterable[tuple[int, str, str, str]],
    *,
    me: str,
    decryption_keys: Mapping[str, OKPKey],
    roster: Roster,
) -> InboxCheck:
    """Check every inbox row against its kept envelope and the log's receipts.

    ``received`` is the log's (index, sender, report id, JWE hash) per ``received``
    entry. A report may be received more than once (sent again after the seen-set
    forgot it); the row keeps the first copy, so one of its receipts must name it.
    """
    result = InboxCheck()
    logged: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for index, sender, report_id, digest in received:
        logged.setdefault((sender, report_id), []).append((index, digest))
    entries = store.inbox(limit=max(1, store.inbox_count()))
    for entry in entries:
        where = f"report {entry.report_id} from {entry.sender}"
        receipts = logged.pop((entry.sender, entry.report_id), [])
        if entry.jwe_sha256 not in {digest for _, digest in receipts}:
            result.problems.append(f"{where}: no received entry in the audit log names it")
        jwe = store.kept_envelope(entry.sender, entry.report_id)
        if jwe is None:
            result.not_kept += 1
            continue
        if hashlib.sha256(jwe.encode("ascii")).hexdigest() != entry.jwe_sha256:
            result.problems.append(f"{where}: the kept envelope is not the one received")
            continue
        try:
            kept = evidence.make(
                jwe, received_at=entry.received_at, decryption_keys=decryption_keys, me=me
            )
            got = evidence.check(kept, roster)
        except EnvelopeError as exc:
            result.problems.append(f"{where}: the kept envelope does not verify at {exc}")
            continue
        if (got.sender, got.report_id) != (entry.sender, entry.report_id):
            result.problems.append(f"{where}: the kept envelope is another report's")
            continue
        differ = _differs(entry, got)
        if differ:
            verb = "differs" if len(differ) == 1 else "differ"
            result.problems.append(f"{where}: {', '.join(differ)} {verb} from the signed envelope")
            continue
        result.verified += 1
    for (sender, report_id), receipts in sorted(logged.items(), key=lambda item: item[1]):
        result.problems.append(
            f"audit entry {receipts[0][0]}: report {report_id} received from {sender}"
            " is not in the inbox"
        )
    return result


__all__ = ["InboxCheck", "check"]
