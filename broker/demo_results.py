"""After the demo's run: what the stores hold, ``msmt audit verify`` and ``replay``, what to show.

The checks are the ones the CLI commands run (``verify_log`` with the roster's
log and witness keys and a quorum; ``replay`` over every log with the copied
policies), called in-process on the stopped nodes' files.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Final

from broker import keys_roster
from broker.audit_events import parse_entry
from broker.audit_replay import replay
from broker.audit_replay_text import render_tables, status_line
from broker.audit_verify import load, verify_log
from broker.checkpoint import roster_log_keys, roster_revoked_log_keys, roster_witness_keys
from broker.demo_view import AuditResult, Point, SideBySide
from broker.demo_view import side_by_side as make_side_by_side
from broker.demo_watch import QUORUM
from broker.demo_world import World
from broker.errors import MsmtError
from broker.members import MEMBERS
from broker.sightings import leaf_values
from broker.store import InboxEntry, Store
from broker.validation import parse_record

VIEWS: Final = (("JPN", ("USA", "FRA", "GBR")), ("KOR", ("JPN", "FRA", "GBR")))
"""Reports shown side by side: an originator, and three partners' copies of one of its reports."""


def read_inboxes(world: World) -> dict[str, list[InboxEntry]]:
    """Every node's stored received reports."""
    out: dict[str, list[InboxEntry]] = {}
    for member, node in world.nodes.items():
        if not node.config.store_path.exists():
            out[member] = []
            continue
        store = Store(node.config.store_path, readonly=True)
        try:
            out[member] = store.inbox(limit=None)
        finally:
            store.close()
    return out


def verify_audits(world: World) -> list[AuditResult]:
    """``msmt audit verify --keys keys --cosigned --quorum 10`` on every node's log."""
    roster = keys_roster.load_signed_roster(world.keydir).roster
    results = []
    for member, node in world.nodes.items():
        others = [m for m in MEMBERS if m != member]
        try:
            report = verify_log(
                node.config.audit_dir,
                roster_log_keys(roster, member),
                witnesses=roster_witness_keys(roster, others),
                quorum=QUORUM,
                revoked_keys=roster_revoked_log_keys(roster, member),
            )
        except MsmtError as exc:
            results.append(AuditResult(member, ok=False, detail=str(exc)))
            continue
        root = base64.b64encode(report.root).decode()
        results.append(
            AuditResult(
                member,
                ok=True,
                detail=(
                    f"{report.size} entries, {report.checkpoints} signed checkpoints, root "
                    f"{root[:16]}..., cosigned by {len(report.cosigners)} of "
                    f"{len(others)} partners (quorum {QUORUM})"
                ),
                size=report.size,
                cosigners=report.cosigners,
            )
        )
    return results


def replay_all(world: World) -> tuple[bool, list[str], dict[tuple[str, str], int]]:
    """``msmt audit replay`` over every log: reconciled, summary lines, delivered-sends matrix.

    Each log was verified by ``verify_audits`` first, as the command does.
    """
    policies = {p.digest: p for p in world.policies.values()}
    logs: dict[str, list[dict[str, Any]]] = {}
    try:
        for node in world.nodes.values():
            loaded = load(node.config.audit_dir)
            data = loaded.entries(0, loaded.tree.size)
            logs[loaded.origin] = [parse_entry(d, i) for i, d in enumerate(data)]
        result = replay(logs, policies)
    except MsmtError as exc:
        return False, [f"FAIL: {exc}"], {}
    tables = render_tables(result, sorted(logs), timeline=False).splitlines()
    findings_at = next(i for i, ln in enumerate(tables) if ln.startswith("Findings"))
    lines = [status_line(result, len(logs)), *tables[findings_at:]]
    ok = not result.findings and set(result.statuses()) == {"delivered"}
    return ok, lines, dict(result.matrix)


def _position(fields: dict[str, Any]) -> tuple[float, float, str] | None:
    for key, value in fields.items():
        if key.split("#")[0] == "vessel.position" and isinstance(value, dict):
            note = key.partition("#")[2]
            return float(value["lat"]), float(value["lon"]), note
    return None


def views(
    records: dict[str, list[dict[str, Any]]], inboxes: dict[str, list[InboxEntry]]
) -> tuple[list[SideBySide], dict[str, list[Point]]]:
    """The side-by-side reports, and the first originator's vessel positions as seen."""
    by_key = {(e.sender, e.report_id, viewer): e for viewer, es in inboxes.items() for e in es}
    shown: list[SideBySide] = []
    for originator, viewers in VIEWS:
        candidates = [r for r in records.get(originator, []) if r["kind"] == "vessel"]
        # Prefer a ship-to-ship transfer that every viewer received something of.
        candidates.sort(
            key=lambda r: (
                -sum((originator, r["report_id"], v) in by_key for v in viewers),
                "counterpart" not in r["vessel"],
            )
        )
        if not candidates:
            continue
        record = candidates[0]
        leaves = leaf_values(parse_record(json.dumps(record)))
        got = {
            v: (
                by_key[(originator, record["report_id"], v)].fields
                if (originator, record["report_id"], v) in by_key
                else None
            )
            for v in viewers
        }
        shown.append(make_side_by_side(originator, record, leaves, got))
    points: dict[str, list[Point]] = {}
    originator, viewers = VIEWS[0]
    vessels = [r for r in records.get(originator, []) if r["kind"] == "vessel"]
    points[f"{originator} (original)"] = [
        Point(
            float(r["vessel"]["position"]["lat"]),
            float(r["vessel"]["position"]["lon"]),
            r["vessel"]["name"],
            "exact",
        )
        for r in vessels
    ]
    for viewer in viewers:
        seen = []
        for r in vessels:
            entry = by_key.get((originator, r["report_id"], viewer))
            pos = _position(entry.fields) if entry is not None else None
            if pos is not None:
                seen.append(
                    Point(
                        pos[0],
                        pos[1],
                        str(entry.fields.get("vessel.name", "")) if entry else "",
                        pos[2] or "exact",
                    )
                )
        points[viewer] = seen
    return shown, points
