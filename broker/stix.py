"""Export of received reports as a STIX 2.1 bundle, for OpenCTI, MISP and other CTI tools.

``bundle(reports)`` takes what a node received (``ReceivedReport``: the handling
claims plus the disclosed fields, keyed by disclosure key) and returns one
STIX 2.1 bundle as a JSON-ready dict. ``broker.stix_objects`` builds the
objects and docs/STIX.md has the mapping table. In short:

* each report is a ``report`` SDO whose ``msmt-report`` property extension
  carries every disclosed field exactly as received (pseudonyms as opaque
  strings, decimals as strings), and whose description lists them one
  ``key: value`` line each for tools that keep only text (MISP), so nothing
  is lost and nothing is added;
* vessels are ``infrastructure`` SDOs with a ``sighting`` at a ``location``;
  workers are a ``group`` ``identity`` with employer and place; crypto
  addresses and transactions are ``cryptocurrency-wallet`` and
  ``cryptocurrency-transaction`` SCOs defined by this project's extension
  definitions; fuel transfers are the vessels sighted at the transfer's place;
* every object carries the report's official TLP 2.0 marking and, with REL TO,
  a statement marking; every SDO and SRO has ``created_by_ref`` = originator.

Ids are deterministic (UUIDv5), so a re-export never duplicates objects in the
tool it is imported into. A field the partner did not receive cannot appear:
every value is read from ``fields`` and nothing is looked up elsewhere.
Pure code apart from ``load_received``, which reads a node's store and roster:
a report whose originator's signing key the roster has since revoked is left
out (``leave_out_withdrawn``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from broker.envelope_format import check_fields
from broker.errors import EnvelopeError, InputError
from broker.members import is_member
from broker.sightings import KINDS
from broker.stix_objects import TLP_MARKINGS, BundleBuilder

if TYPE_CHECKING:
    from broker.roster import Roster
    from broker.store import InboxEntry


@dataclass(frozen=True, slots=True)
class ReceivedReport:
    """One verified report as this node received it: the input of ``bundle``.

    * ``report_id``: the report's UUID, as text;
    * ``originator``: the member that signed it (not an onward sender);
    * ``kind``: ``vessel``, ``worker`` or ``transfer``;
    * ``tlp``: its TLP 2.0 label (``CLEAR`` ... ``RED``);
    * ``rel_to``: its REL TO members, or None;
    * ``iat``: the signed issue time; ``received_at``: when this node stored it
      (both timezone-aware, UTC);
    * ``fields``: each disclosure key received (``vessel.imo``,
      ``vessel.position#coarsen:0.5``) -> its JSON value as verified. The
      export never shows a field that is not here.
    """

    report_id: str
    originator: str
    kind: str
    tlp: str
    rel_to: tuple[str, ...] | None
    iat: datetime
    received_at: datetime
    fields: Mapping[str, Any]


def check_report(report: ReceivedReport) -> None:
    """Raise ``InputError`` unless ``report`` is a well-formed received report.

    The node verified it on receipt; checking again here means a damaged or
    hand-edited store row fails the export with one line instead of giving an
    invalid bundle. The reason names the report and field, never a value.
    """
    where = f"received report {report.report_id!s:.40} from {report.originator!s:.3}"
    try:
        UUID(report.report_id)
    except (ValueError, TypeError, AttributeError):
        raise InputError(f"{where}: report id is not a UUID") from None
    if not is_member(report.originator):
        raise InputError(f"{where}: originator is not an MSMT member")
    if report.kind not in KINDS:
        raise InputError(f"{where}: unknown kind")
    if report.tlp not in TLP_MARKINGS:
        raise InputError(f"{where}: TLP is not a TLP 2.0 label")
    if report.rel_to is not None and (
        not report.rel_to or not all(is_member(m) for m in report.rel_to)
    ):
        raise InputError(f"{where}: REL TO lists a non-member")
    for name, when in (("iat", report.iat), ("received_at", report.received_at)):
        if when.utcoffset() is None:
            raise InputError(f"{where}: {name} has no time zone")
    try:
        check_fields(report.kind, report.fields)
    except EnvelopeError as exc:
        raise InputError(f"{where}: {exc.reason}") from None


def bundle(reports: Iterable[ReceivedReport]) -> dict[str, Any]:
    """Build one STIX 2.1 bundle (a JSON-ready dict) from received reports.

    Copies of one report (same originator and id, e.g. the original and an
    onward share) become one report with the union of their fields, since the
    node received all of them. Raises ``InputError`` naming the first malformed
    report. The output is a function of the set of reports alone.
    """
    builder = BundleBuilder()
    for report in sorted(merge_copies(reports), key=lambda r: (r.received_at, r.originator)):
        builder.add_report(
            report_id=report.report_id,
            originator=report.originator,
            kind=report.kind,
            tlp=report.tlp,
            rel_to=report.rel_to,
            iat=report.iat,
            received_at=report.received_at,
            fields=report.fields,
        )
    return builder.bundle()


def merge_copies(reports: Iterable[ReceivedReport]) -> list[ReceivedReport]:
    """Check each report and merge copies of the same one; sorted by (originator, id).

    Copies carry the same signed claims, so a copy that disagrees on a claim or
    on a field's value was not made from the same signed report: ``InputError``.
    """
    merged: dict[tuple[str, str], ReceivedReport] = {}
    for report in reports:
        check_report(report)
        key = (report.originator, report.report_id)
        held = merged.get(key)
        if held is None:
            merged[key] = report
            continue
        where = f"received report {report.report_id} from {report.originator}"
        claims = ("kind", "tlp", "rel_to", "iat")
        if any(getattr(held, c) != getattr(report, c) for c in claims):
            raise InputError(f"{where}: two stored copies disagree on their signed claims")
        clash = [
            k for k in held.fields if k in report.fields and held.fields[k] != report.fields[k]
        ]
        if clash:
            raise InputError(f"{where}: two stored copies disagree on {clash[0]}")
        merged[key] = replace(
            held,
            received_at=min(held.received_at, report.received_at),
            fields={**held.fields, **report.fields},
        )
    return [merged[k] for k in sorted(merged)]


def select_since(reports: Iterable[ReceivedReport], since: datetime | None) -> list[ReceivedReport]:
    """The reports received at or after ``since`` (all of them when ``since`` is None)."""
    return [r for r in reports if since is None or r.received_at >= since]


def load_received(config_path: Path, since: datetime | None) -> tuple[list[ReceivedReport], int]:
    """Read the reports a node received at or after ``since`` from its store (read-only).

    Returns them and how many were left out because the roster has since revoked
    the key their originator signed them with (``leave_out_withdrawn``).
    Read-only, so it works while the daemon runs. Raises ``ConfigError`` for a
    bad config, ``UsageError`` for a store that is missing or out of reach,
    ``StoreError`` for one that cannot be read, and
    ``KeyMaterialError`` for a roster the node would refuse, each as one line.
    """
    from broker.config import load_config  # noqa: PLC0415 - keeps the pure part import-light
    from broker.keys_roster import load_pinned_roster  # noqa: PLC0415
    from broker.store import Store  # noqa: PLC0415
    from broker.store_file import require_store  # noqa: PLC0415

    config = load_config(config_path)
    require_store(config.store_path)
    store = Store(config.store_path, readonly=True)
    try:
        # Chosen in SQL (indexed), a second early for the float's rounding: the
        # exact comparison is leave_out_withdrawn's. All of them were read before, to
        # export a day's share (a long-life trial: 449 MB at 100,000 reports).
        start = None if since is None else since.timestamp() - 1
        entries = store.inbox(since=start, limit=None)
    finally:
        store.close()
    roster = None
    if any(e.signing_kid is not None for e in entries):
        # As the node loads it, not recorded; rows from before nodes recorded the
        # signing key need no roster (msmt inbox check re-verifies those).
        roster = load_pinned_roster(
            config.roster_dir, config.authority_path, config.roster_state_path, record=False
        ).roster
    kept, left_out = leave_out_withdrawn(entries, roster, since)
    return [from_inbox(e) for e in kept], left_out


def leave_out_withdrawn(
    entries: Iterable[InboxEntry], roster: Roster | None, since: datetime | None = None
) -> tuple[list[InboxEntry], int]:
    """The entries received at or after ``since`` whose signer ``roster`` still trusts.

    Also returns how many reports (by originator and id) were left out. A report
    is left out whole when any stored copy names a key the roster withdrew
    (``Roster.withdrawn``): copies of one report carry its originator's one
    signature. A copy with no key recorded is kept, as before nodes recorded it.
    ``roster`` may be None only when no entry names a key.
    """
    entries = list(entries)
    withdrawn = {
        (e.originator, e.report_id)
        for e in entries
        if e.signing_kid is not None
        and (roster is None or roster.withdrawn(e.signing_kid) is not None)
    }
    # Compared as ``select_since`` does, on the time as exported.
    chosen = [
        e for e in entries if since is None or datetime.fromtimestamp(e.received_at, UTC) >= since
    ]
    kept = [e for e in chosen if (e.originator, e.report_id) not in withdrawn]
    left_out = {(e.originator, e.report_id) for e in chosen} & withdrawn
    return kept, len(left_out)


def from_inbox(entry: InboxEntry) -> ReceivedReport:
    """A stored ``InboxEntry`` (times in Unix seconds) as export input."""
    return ReceivedReport(
        report_id=entry.report_id,
        originator=entry.originator,
        kind=entry.kind,
        tlp=entry.tlp,
        rel_to=tuple(entry.rel_to) if entry.rel_to is not None else None,
        iat=datetime.fromtimestamp(entry.iat, UTC),
        received_at=datetime.fromtimestamp(entry.received_at, UTC),
        fields=entry.fields,
    )
