"""The node's SQLite store, on a real file: durability, idempotence, replay set, disk full."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from annotated_types import Le
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from node_world import without_dac_override

from broker.auditlog import AuditLog
from broker.config import LimitsSection
from broker.errors import StoreError, StoreTooNewError
from broker.store import NewReport, OutboxItem, Received, Store
from broker.store_file import KEPT_SINCE, PAGE_SIZE, STORE_FORMAT, writer_pid


def rep(i: int, size: int = 10) -> NewReport:
    return NewReport(f"00000000-0000-4000-8000-{i:012d}", "vessel", b"x" * size)


def item(rid: str, partner: str) -> OutboxItem:
    return OutboxItem(
        rid, partner, f"msmt.to.{partner}.vessel", f"jwe {rid} {partner}".encode(), "{}"
    )


def received(sender: str, rid: str, digest: str = "h1", expires: float = 100.0) -> Received:
    return Received(
        sender=sender,
        originator=sender,
        report_id=rid,
        kind="vessel",
        tlp="AMBER",
        rel_to=("JPN", "USA") if sender == "KOR" else None,
        iat=1_790_000_000.0,
        fields={"vessel.imo": "9321483"},
        paths=("vessel.imo",),
        jwe_sha256=digest,
        jwe=f"jwe {sender} {rid}",
        signing_kid=f"{sender}-sig-1",
        expires_at=expires,
    )


def test_wal_mode_and_accept_is_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    store = Store(path)
    assert store.accept([rep(1), rep(2), rep(1)]) == [True, True, False]
    store.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Store(path)
    assert again.accept([rep(2), rep(3)]) == [False, True]
    assert [r for r, _ in again.unplanned(10)] == [
        rep(1).report_id,
        rep(2).report_id,
        rep(3).report_id,
    ]


def test_unaudited_reports_are_listed_until_confirmed(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.accept([rep(1), rep(2)])
    assert store.unaudited() == [(rep(1).report_id, "vessel"), (rep(2).report_id, "vessel")]
    store.mark_audited([rep(1).report_id])
    assert store.unaudited() == [(rep(2).report_id, "vessel")]


def test_a_later_mark_commits_with_the_next_write_and_counts_for_the_planner(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    store.accept([rep(1), rep(2), rep(3)])
    r1, r2, r3 = rep(1).report_id, rep(2).report_id, rep(3).report_id
    store.mark_audited_later([r1])
    # Counted at once: listed as confirmed, and the planner may take it.
    assert store.unaudited() == [(r2, "vessel"), (r3, "vessel")]
    assert store.unplanned(10, audited_only=True) == [(r1, b"x" * 10)]
    store.close()  # a crash before any write: the mark was never committed
    store = Store(path)
    assert [rid for rid, _ in store.unaudited()] == [r1, r2, r3]
    store.mark_audited_later([r1, r2])
    store.plan({r3: []})  # any write commits the waiting marks with it
    store.close()
    store = Store(path)
    assert store.unaudited() == [(r3, "vessel")]
    assert store.unplanned(10, audited_only=True) == [(r1, b"x" * 10), (r2, b"x" * 10)]


def test_a_later_mark_waits_through_a_failed_write_for_the_next(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    store.accept([rep(1)])
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store.close()
    store = Store(path, max_pages=pages + 1)  # far short of a big write
    store.mark_audited_later([rep(1).report_id])
    with pytest.raises(StoreError, match="database or disk is full"):
        store.accept([rep(i, size=100_000) for i in range(2, 5)])
    assert store.unaudited() == []  # rolled back with the write, and still waiting
    store.bump({"intake.accepted": 1})  # a small write that fits carries it
    store.close()
    assert Store(path).unaudited() == []


def test_only_the_kind_of_write_that_failed_clears_it(tmp_path: Path) -> None:
    # A full-disk trial: a receiver's batches failed while its status writes and the
    # writability probe, small, still committed, and each cleared write_failed:
    # /readyz flapped back to ready with the disk still full.
    path = tmp_path / "s.db"
    store = Store(path)
    store.accept([rep(1)])
    store.set_state({"write_checked_at": "0"})
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store.close()
    store = Store(path, max_pages=pages + 1)  # far short of a big write
    with pytest.raises(StoreError, match="database or disk is full"):
        store.accept([rep(i, size=100_000) for i in range(2, 5)])
    failed = store.write_failed
    assert failed is not None
    assert store.writable()  # the probe's small write fits...
    store.bump({"intake.accepted": 1})
    assert store.prune_seen() == 0  # ...as does a small write of another kind (a review)
    assert store.write_failed == failed  # ...and says nothing of room for the batch
    store._db.execute("PRAGMA max_page_count=1073741823")  # room again
    assert store.accept([rep(2, size=100_000)]) == [True]
    assert store.write_failed is None  # a write of data clears it
    # A small write's own failure is cleared by the next small write that commits.
    store._db.execute(
        f"PRAGMA max_page_count={store._db.execute('PRAGMA page_count').fetchone()[0]}"
    )
    with pytest.raises(StoreError, match="database or disk is full"):
        store.set_state({f"key{i}": "v" * 20_000 for i in range(4)})
    assert store.write_failed is not None
    assert store.writable()
    assert store.write_failed is None
    # A batch, then a status write, both refused: the status write that then fits leaves
    # the batch's failure standing (a review: one slot for the kind let it go).
    with pytest.raises(StoreError, match="database or disk is full"):
        store.accept([rep(i, size=100_000) for i in range(7, 10)])
    batch = store.write_failed
    with pytest.raises(StoreError, match="database or disk is full"):
        store.set_state({f"key{i}": "w" * 20_000 for i in range(4)})
    assert store.writable()
    assert store.write_failed == batch
    store.close()


def test_plan_returns_the_envelopes_as_pending_reads_them(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.accept([rep(1), rep(2)])
    r1, r2 = rep(1).report_id, rep(2).report_id
    planned = [item(r1, "USA"), item(r1, "KOR"), item(r2, "USA")]
    stored = store.plan({r1: planned[:2], r2: planned[2:]})
    read = store.pending(10)
    assert stored == planned == read  # every field but the row, which compares apart
    assert [i.rowid for i in stored or []] == [i.rowid for i in read]
    # A row that was there already (a report planned twice) is not told apart: None.
    assert store.plan({r1: [item(r1, "USA"), item(r1, "GBR")]}) is None


# Tables that grow with every report a node ever took, sent or received: nothing is pruned.
_GROWING = ("reports", "outbox", "inbox")


def _full_scans(db: sqlite3.Connection, statements: list[str]) -> list[str]:
    """The statements whose plan reads a growing table whole, and how."""
    found = []
    for sql in statements:
        plan = db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
        for _, _, _, step in plan:
            words = step.split()
            if words[0] == "SCAN" and words[1] in (*_GROWING, "o", "r", "i"):
                found.append(f"{step}: {sql}")
    return found


def test_what_runs_every_second_reads_no_growing_table_whole(tmp_path: Path) -> None:
    # A soak trial: the housekeeping's count of envelopes queued to be signed again
    # scanned every envelope ever sent, once a second (7 ms at 25,000, 75 ms at
    # 271,000, with nothing queued). A plan, not a time: the same on any machine.
    store = Store(tmp_path / "s.db")
    ids = [rep(i).report_id for i in range(40)]
    store.accept([rep(i) for i in range(40)])
    store.plan({rid: [item(rid, "USA"), item(rid, "KOR")] for rid in ids})
    store.mark_sent(store.pending(100))
    store.queue_resend("USA", report_ids=ids[:3])
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    # What the housekeeping tick and msmt status read.
    assert store.outbox_depths() == (3, 0)
    assert store.outbox_by_partner()["USA"]["resend"] == 3
    assert store.unaudited() == [(rid, "vessel") for rid in ids]
    assert set(store.outbox_oldest()) == {"USA"}  # every 15 s
    store._db.set_trace_callback(None)
    selects = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
    assert len(selects) >= 3
    assert _full_scans(store._db, selects) == []
    # The test itself can fail: the join this replaced reads the outbox whole.
    old = (
        "SELECT count(*) FROM reissue q JOIN outbox o ON o.report_id = q.report_id"
        " AND o.partner = q.partner WHERE o.state = 'sent'"
    )
    assert _full_scans(store._db, [old]) != []
    store.close()


def test_inbox_check_reads_the_rows_a_batch_at_a_time_up_to_the_last_at_its_start(
    tmp_path: Path,
) -> None:
    # All at once took 1.48 GB at 100,000 rows (a long-life trial); a batch at a time,
    # the rows a running node adds meanwhile are not read (their receipts were not).
    store = Store(tmp_path / "s.db")
    store.store_received([received("USA", f"r{i}") for i in range(5)])
    rows = store.inbox_rows(batch=2)
    first = next(rows)
    store.store_received([received("KOR", "later")])
    rest = list(rows)
    assert [e.report_id for e in [first, *rest] if not isinstance(e, str)] == [
        f"r{i}" for i in range(5)
    ]
    assert len(list(store.inbox_rows(batch=2))) == 6
    assert list(Store(tmp_path / "empty.db").inbox_rows()) == []
    store.close()


def test_the_inbox_commands_read_by_index(tmp_path: Path) -> None:
    # A long-life trial: inbox list (newest first), export --since and inbox show or
    # evidence (by report id) each read the whole inbox, envelopes and all (0.5 s,
    # 6 s and 0.2 s warm at 100,000 reports; a read of 0.8 GB cold).
    store = Store(tmp_path / "s.db")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.inbox(limit=100)
    store.inbox(since=1.0, limit=None)
    store.inbox_entry(rep(1).report_id)
    store._db.set_trace_callback(None)
    selects = [sql for sql in statements if "FROM inbox" in sql]
    assert len(selects) == 3
    steps = [step for sql in selects for *_, step in store._db.execute(f"EXPLAIN QUERY PLAN {sql}")]
    assert all(" USING INDEX inbox_" in step for step in steps), steps
    assert not [step for step in steps if "TEMP B-TREE" in step], steps
    store.close()


def test_outbox_plan_send_cycle(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.accept([rep(1), rep(2)])
    r1, r2 = rep(1).report_id, rep(2).report_id
    assert store.outbox_depth() == 2
    store.plan({r1: [item(r1, "USA"), item(r1, "KOR")], r2: []})
    assert store.unplanned(10) == []
    assert store.outbox_depth() == 2  # two envelopes awaiting an ack
    pending = store.pending(10)
    assert [(p.report_id, p.partner) for p in pending] == [(r1, "USA"), (r1, "KOR")]
    # The hub deduplicates by the envelope's hash, which only its sender knows.
    assert pending[0].msg_id == hashlib.sha256(pending[0].jwe).hexdigest()
    assert pending[0].msg_id != pending[1].msg_id
    assert store.pending(10, skip=[pending[0].rowid]) == [pending[1]]
    # A partner held back (its inbox full) is left out, from its own index.
    assert store.pending(10, held={"USA"}) == [pending[1]]
    assert store.pending(10, skip=[pending[1].rowid], held={"USA"}) == []
    assert store.pending(1, held={"GBR"}) == [pending[0]]
    store.mark_sent([pending[0]])
    assert store.outbox_depth() == 1
    assert store.sent_to("USA") == 1
    assert store.sent_to("KOR") == 0
    # Planning twice (a crash between plan and restart) adds nothing.
    store.plan({r1: [item(r1, "USA")]})
    assert store.outbox_depth() == 1


def test_the_oldest_report_waiting_for_each_partner(tmp_path: Path) -> None:
    # For msmt_outbox_oldest_seconds{partner}: an alert names the partner whose reports
    # wait; envelopes awaiting a key (by design, for weeks) do not count.
    store = Store(tmp_path / "s.db")
    store.accept([rep(1)], now=1000.0)
    store.accept([rep(2)], now=2000.0)
    r1, r2 = rep(1).report_id, rep(2).report_id
    why = "GBR has no active enc key valid now"
    store.plan({r1: [item(r1, "USA"), item(r1, "KOR")], r2: [item(r2, "USA")]}, {r1: {"GBR": why}})
    assert store.outbox_oldest() == {"KOR": 1000.0, "USA": 1000.0}
    usa_r1 = next(p for p in store.pending(10) if p.report_id == r1 and p.partner == "USA")
    store.mark_sent([usa_r1])
    assert store.outbox_oldest() == {"KOR": 1000.0, "USA": 2000.0}
    # A sent envelope queued to be signed again waits again.
    store.queue_resend("USA", report_ids=[r1])
    assert store.outbox_oldest() == {"KOR": 1000.0, "USA": 1000.0}
    store.close()


def test_partners_awaiting_a_key_are_kept_until_planned(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    store.accept([rep(1, size=20), rep(2)], now=1000.0)
    r1, r2 = rep(1).report_id, rep(2).report_id
    why = "GBR has no active enc key valid now"
    store.plan({r1: [item(r1, "USA")], r2: []}, {r1: {"GBR": why, "FRA": why}})
    assert store.unplanned(10) == []
    assert store.outbox_depth() == 3  # USA's envelope, and GBR's and FRA's still to make
    # msmt status splits the depth by partner, so an operator sees who holds it up.
    waits = {"unacked": 0, "resend": 0, "awaiting_key": 1, "oldest_accepted_at": 1000.0}
    assert store.outbox_by_partner() == {
        "FRA": waits,
        "GBR": waits,
        "USA": waits | {"unacked": 1, "awaiting_key": 0},
    }
    assert [(r, rec, sorted(ps)) for r, rec, ps in store.awaiting(10)] == [
        (r1, b"x" * 20, ["FRA", "GBR"])
    ]
    # A read-only reader (msmt status) counts them too.
    store.close()
    assert Store(path, readonly=True).outbox_depth() == 3
    assert len(Store(path, readonly=True).outbox_by_partner()) == 3
    store = Store(path)
    # Planned again: GBR's key is valid now, FRA's still is not. USA's envelope in
    # the new plan is not wanted: it has one already, which stays as it is.
    queued, dropped = store.awaited(
        {r1: [item(r1, "GBR"), item(r1, "USA")]},
        {r1: {"FRA": "FRA has no active enc key valid now"}},
        {r1: ("GBR", "FRA")},
    )
    assert (queued, dropped) == (1, [])
    assert [(p.report_id, p.partner) for p in store.pending(10)] == [(r1, "USA"), (r1, "GBR")]
    assert store.awaiting(10) == [(r1, b"x" * 20, ("FRA",))]
    # The policy no longer releases anything to FRA: it stops waiting, nothing is made.
    assert store.awaited({r1: [item(r1, "USA")]}, {}, {r1: ("FRA",)}) == (0, [(r1, "FRA")])
    assert store.awaiting(10) == []
    assert store.outbox_depth() == 2


def test_an_older_store_without_the_awaiting_table_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("DROP TABLE awaiting_key")
    assert Store(path, readonly=True).outbox_depth() == 0
    assert Store(path, readonly=True).outbox_by_partner() == {}


def test_a_store_in_a_newer_format_is_refused_and_an_older_one_is_stamped(
    tmp_path: Path,
) -> None:
    # An upgrade trial rolled a node back onto a store a newer build had used: the old
    # build ran on, storing reports without their envelopes, and msmt inbox check then
    # called each of them tampered. A build must refuse a format it does not know.
    path = tmp_path / "s.db"
    Store(path).close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == STORE_FORMAT
        raw.execute("PRAGMA user_version = 0")  # as stores from before the stamp read
    Store(path).close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == STORE_FORMAT
        raw.execute(f"PRAGMA user_version = {STORE_FORMAT + 1}")
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(StoreError) as refused:
            Store(path, readonly=readonly)
        assert str(refused.value) == (
            f"store {path} is in format {STORE_FORMAT + 1}, written by a newer msmt; this one"
            f" reads up to format {STORE_FORMAT}: run the newer version again"
            " (docs/DEPLOY.md, 'Upgrading a node', says what restoring the backup would cost)"
        )
        assert isinstance(refused.value, StoreTooNewError)  # exit 2 at a node's start
    assert path.read_bytes() == before
    # The refused writer let go of its lock: the newer build can open the store at once.
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 0")
    Store(path).close()


def test_sent_envelopes_leave_only_their_facts_and_their_pages_are_reused(tmp_path: Path) -> None:
    # The outbox must not grow by an envelope's size for every envelope ever sent:
    # a node sends ~6 KB per partner and report, for years. After 3,000 envelopes
    # of 6,000 bytes (18 MB), sent in batches as a node does, the file holds about
    # their facts and one batch in flight.
    store = Store(tmp_path / "s.db")
    facts = json.dumps({"kind": "vessel", "released": ["vessel.imo"] * 12})
    for batch in range(30):
        reports = [rep(batch * 10 + i) for i in range(10)]
        store.accept(reports)
        store.plan(
            {
                r.report_id: [
                    OutboxItem(r.report_id, p, f"msmt.to.{p}.vessel", os.urandom(6000), facts)
                    for p in ("USA", "KOR", "GBR", "FRA", "AUS", "CAN", "DEU", "ITA", "NLD", "NZL")
                ]
                for r in reports
            }
        )
        store.mark_sent(store.pending(1000), now=float(batch))
    assert store.outbox_depth() == 0
    assert store.sent_to("NZL") == 300
    (sent,) = store._db.execute(
        "SELECT subject, jwe, audit, sent_at FROM outbox WHERE report_id = ? AND partner = 'USA'",
        (rep(42).report_id,),
    ).fetchall()
    assert sent == ("msmt.to.USA.vessel", b"", facts, 4.0)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    assert pages * store._db.execute("PRAGMA page_size").fetchone()[0] < 18_000_000 / 6


def test_a_new_store_has_large_pages_and_an_older_one_keeps_its_own(tmp_path: Path) -> None:
    # Page size is fixed when a file is first written: a new store gets PAGE_SIZE;
    # a store made with SQLite's default 4 KB pages keeps them and works as before.
    new = Store(tmp_path / "new.db")
    assert new._db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 16384
    old_path = tmp_path / "old.db"
    db = sqlite3.connect(old_path)
    db.execute("PRAGMA page_size=4096")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.close()
    old = Store(old_path)
    assert old._db.execute("PRAGMA page_size").fetchone()[0] == 4096
    for store in (new, old):
        store.accept([rep(1)])
        store.plan({rep(1).report_id: [item(rep(1).report_id, "USA")]})
        store.mark_sent(store.pending(10))
        assert (store.outbox_depth(), store.sent_to("USA")) == (0, 1)
        store.close()


@settings(max_examples=50, deadline=None)
@given(jwe=st.binary(max_size=9000))
def test_an_envelopes_hash_is_computed_once_and_is_its_sha256(jwe: bytes) -> None:
    envelope = OutboxItem("r", "USA", "msmt.to.USA.vessel", jwe, "{}")
    want = hashlib.sha256(jwe).hexdigest()
    assert envelope.jwe_sha256 == want
    assert envelope.msg_id == envelope.jwe_sha256 == want  # the second read is the cached one
    # The cache is no part of the value: equal, hashed and pickled as before.
    fresh = OutboxItem("r", "USA", "msmt.to.USA.vessel", jwe, "{}")
    assert envelope == fresh
    assert hash(envelope) == hash(fresh)
    assert pickle.loads(pickle.dumps(envelope)).jwe_sha256 == want  # noqa: S301 - our own bytes


def signed(rid: str, partner: str, iat: int, tag: str = "") -> OutboxItem:
    audit = json.dumps({"iat": iat, "kind": "vessel"})
    return OutboxItem(rid, partner, f"msmt.to.{partner}.vessel", f"jwe{tag} {rid}".encode(), audit)


def outbox_rows(store: Store) -> dict[tuple[str, str], tuple[str, bytes]]:
    rows = store._db.execute("SELECT report_id, partner, state, jwe FROM outbox").fetchall()
    return {(r[0], r[1]): (r[2], bytes(r[3])) for r in rows}


def test_envelopes_pending_since_before_a_time_are_signed_again_in_place(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.accept([rep(1), rep(2)])
    r1, r2 = rep(1).report_id, rep(2).report_id
    legacy = OutboxItem(r2, "GBR", "msmt.to.GBR.vessel", b"jwe legacy", "{}")  # no iat recorded
    store.plan({r1: [signed(r1, "USA", 100), signed(r1, "KOR", 500)], r2: [legacy]})
    assert store.queue_stale(issued_before=100) == 0
    assert store.queue_stale(issued_before=101) == 1  # only USA's, signed at 100
    assert store.queue_stale(issued_before=101) == 0  # already queued
    assert store.reissues(10) == [(r1, rep(1).record, ("USA",))]
    # The publisher may hold the old bytes: their ack must not mark the new ones sent.
    (old_usa,) = [i for i in store.pending(10) if i.partner == "USA"]
    assert (
        store.reissued({r1: [signed(r1, "USA", 900, "new"), signed(r1, "KOR", 900)]}, {r1: ["USA"]})
        == []
    )
    assert store.reissues(10) == []
    store.mark_sent([old_usa])
    rows = outbox_rows(store)
    assert rows[(r1, "USA")] == ("pending", f"jwenew {r1}".encode())
    assert rows[(r1, "KOR")] == ("pending", f"jwe {r1}".encode())  # not queued: untouched
    assert store.outbox_depth() == 3
    (new_usa,) = [i for i in store.pending(10) if i.partner == "USA"]
    store.mark_sent([new_usa])
    # Sent, its bytes are dropped: the audit log keeps their hash.
    assert outbox_rows(store)[(r1, "USA")] == ("sent", b"")


def test_envelopes_signed_in_the_future_are_signed_again(tmp_path: Path) -> None:
    # By a clock that ran ahead (a trial: a day) and has been set right since:
    # partners would refuse them as issued in the future.
    store = Store(tmp_path / "s.db")
    store.accept([rep(1)])
    r1 = rep(1).report_id
    store.plan({r1: [signed(r1, "USA", 1000), signed(r1, "KOR", 1061), signed(r1, "GBR", 500)]})
    assert store.queue_stale(issued_before=400, issued_after=1061) == 0
    assert store.queue_stale(issued_before=400, issued_after=1060) == 1  # only KOR's
    assert store.queue_stale(issued_before=501, issued_after=1060) == 1  # and GBR's, too old
    assert store.reissues(10) == [(r1, rep(1).record, ("GBR", "KOR"))]


def test_a_pending_envelope_the_policy_no_longer_releases_is_dropped_not_sent(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    store.accept([rep(1)])
    r1 = rep(1).report_id
    store.plan({r1: [signed(r1, "USA", 100), signed(r1, "KOR", 100)]})
    (usa,) = [i for i in store.pending(10) if i.partner == "USA"]
    store.mark_sent([usa])
    assert store.queue_stale(issued_before=200) == 1  # KOR's; USA's is sent
    assert store.queue_resend("USA", report_ids=[r1]) == (1, [])
    assert store.reissued({r1: []}, {r1: ["USA", "KOR"]}) == [(r1, "USA"), (r1, "KOR")]
    # Sent stays as it was (the log records it); pending never goes out.
    assert outbox_rows(store) == {(r1, "USA"): ("sent", b"")}
    assert store.reissue_count() == 0


def test_a_row_dropped_while_held_back_does_not_hold_back_the_next_envelope(
    tmp_path: Path,
) -> None:
    # The publisher holds back the rows it has in flight (or waiting for a retry)
    # by their rowid. SQLite gives a new row one past the highest rowid left, so
    # without the store's own numbering the next envelope planned would take the
    # rowid of the one just dropped, and wait for that one's ack or timeout.
    store = Store(tmp_path / "s.db")
    store.accept([rep(1), rep(2), rep(3)])
    r1, r2, r3 = rep(1).report_id, rep(2).report_id, rep(3).report_id
    store.plan({r1: [signed(r1, "USA", 100), signed(r1, "KOR", 100)]})
    held = [i.rowid for i in store.pending(10)]  # both in flight
    assert len(set(held)) == 2
    # In flight, KOR's (the highest row) is queued again and the policy no longer
    # releases it: its row is dropped. Then the next report is planned.
    assert store.queue_resend("KOR", report_ids=[r1]) == (1, [])
    assert store.reissued({r1: []}, {r1: ["KOR"]}) == [(r1, "KOR")]
    store.plan({r2: [signed(r2, "KOR", 100)]})
    assert [(i.report_id, i.partner) for i in store.pending(10, skip=held)] == [(r2, "KOR")]
    # Marking sent moves a row: that takes a fresh rowid too.
    (usa,) = [i for i in store.pending(10) if i.partner == "USA"]
    store.mark_sent([usa])
    store.plan({r3: [signed(r3, "USA", 100)]})
    rowids = [r[0] for r in store._db.execute("SELECT rowid FROM outbox")]
    assert len(rowids) == 3
    assert set(rowids).isdisjoint(held)
    assert [(i.report_id, i.partner) for i in store.pending(10, skip=held)] == [
        (r2, "KOR"),
        (r3, "USA"),
    ]


def test_resend_queues_what_the_hub_acknowledged_for_one_partner_in_a_time_range(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    store.accept([rep(i) for i in range(1, 5)])
    ids = [rep(i).report_id for i in range(1, 5)]
    store.plan({rid: [signed(rid, "USA", 1), signed(rid, "GBR", 1)] for rid in ids})
    pending = store.pending(10)
    for at, rid in zip((10.0, 20.0, 30.0), ids, strict=False):
        store.mark_sent([i for i in pending if i.report_id == rid], now=at)
    # ids[3] is still pending: it goes out anyway, so a time range leaves it.
    assert store.queue_resend("USA", sent_from=20.0, sent_until=30.0) == (1, [])
    # Asked again, what was queued before counts: 20.0 (queued already) and 30.0.
    assert store.queue_resend("USA", sent_from=20.0) == (2, [])
    assert store.queue_resend("GBR", report_ids=[ids[0], "nope"]) == (1, ["nope"])
    assert store.reissue_count() == 3
    assert sorted((rid, partners) for rid, _, partners in store.reissues(10)) == sorted(
        [(ids[0], ("GBR",)), (ids[1], ("USA",)), (ids[2], ("USA",))]
    )
    # Queued sent envelopes are work still to do.
    assert store.outbox_depth() == 2 + 3
    by_partner = store.outbox_by_partner()
    assert {p: (c["unacked"], c["resend"]) for p, c in by_partner.items()} == {
        "GBR": (1, 1),
        "USA": (1, 2),
    }


def test_received_is_idempotent_and_seen_state_tells_redelivery_from_replay(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    assert store.seen_state("USA", "r1", "h1") == "new"
    assert store.store_received([received("USA", "r1"), received("KOR", "r1")]) == [True, True]
    assert store.store_received([received("USA", "r1")]) == [False]
    assert store.seen_state("USA", "r1", "h1") == "redelivered"
    assert store.seen_state("USA", "r1", "other") == "replay"
    assert store.seen_state("GBR", "r1", "h1") == "new"
    assert store.has_received("USA", "h1")
    assert not store.has_received("GBR", "h1")
    assert not store.has_received("USA", "h2")
    assert store.inbox_count() == 2
    assert {e.sender for e in store.inbox_entry("r1")} == {"USA", "KOR"}
    (entry,) = store.inbox(sender="USA")
    assert entry.fields == {"vessel.imo": "9321483"}
    assert (entry.tlp, entry.rel_to, entry.iat) == ("AMBER", None, 1_790_000_000.0)
    (kor,) = store.inbox(sender="KOR")
    assert kor.rel_to == ("JPN", "USA")
    assert entry.paths == ("vessel.imo",)


def test_a_received_rows_fields_are_stored_as_json_dumps_sorted_writes_them(
    tmp_path: Path,
) -> None:
    # The store encodes with one shared encoder; the text must stay what
    # json.dumps(fields, sort_keys=True) gave: non-ASCII escaped, keys sorted at every level.
    fields = {"vessel.name": "Été 北", "vessel.position": {"lon": "1.5", "lat": "-2"}, "a": [2, 1]}
    store = Store(tmp_path / "s.db")
    store.store_received([replace(received("USA", "r1"), fields=fields)])
    with sqlite3.connect(tmp_path / "s.db") as db:
        (text,) = db.execute("SELECT fields FROM inbox").fetchone()
    db.close()
    assert text == json.dumps(fields, sort_keys=True)
    assert text.isascii()


def test_seen_set_is_pruned_by_freshness_window_but_inbox_still_refuses(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.store_received(
        [received("USA", "old", expires=10.0), received("USA", "new", expires=1e12)]
    )
    assert store.prune_seen(now=11.0) == 1
    assert store.seen_count() == 1
    # The stored report itself still marks the id as taken.
    assert store.seen_state("USA", "old", "different") == "replay"


def test_seen_before_answers_a_batch_as_seen_state_answers_each(tmp_path: Path) -> None:
    # The receiver's replay step asks for a whole batch at once: each answer must be
    # seen_state's (not "new"), from the seen-set, or from the inbox once pruned.
    store = Store(tmp_path / "s.db")
    store.store_received([received("USA", "r1", expires=1e12), received("KOR", "r2", expires=10.0)])
    assert store.prune_seen(now=11.0) == 1  # KOR's r2 is now only in the inbox
    with sqlite3.connect(tmp_path / "s.db") as db:  # USA's r1 only in the seen-set
        db.execute("DELETE FROM inbox WHERE sender = 'USA' AND report_id = 'r1'")
    db.close()
    pairs = [("USA", "r1"), ("KOR", "r2"), ("GBR", "r1"), ("USA", "r2"), ("KOR", "r1")]
    pairs += [("USA", "r1"), ("KOR", "r2")]  # the same message twice in a batch
    assert store.seen_before(pairs) == [True, True, False, False, False, True, True]
    assert store.seen_before(pairs) == [store.seen_state(s, j, "h1") != "new" for s, j in pairs]
    assert store.seen_before([]) == []


def test_batch_lookups_take_the_largest_fetch_batch(tmp_path: Path) -> None:
    # Each pair is bound as parameters, at most 256 rows a statement: the most a
    # receiver's batch can hold must stay within SQLite's limits, here the 999
    # parameters a statement it allowed by default before 3.32, and an answer in a
    # later statement must come back in its place.
    bounds = LimitsSection.model_fields["fetch_batch"].metadata
    (largest,) = [bound.le for bound in bounds if isinstance(bound, Le)]
    assert isinstance(largest, int)
    store = Store(tmp_path / "s.db")
    store._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    store.store_received([received("USA", "r7", "h7"), received("USA", "r700", "h700")])
    pairs = [("USA", f"r{i}") for i in range(largest)]
    assert store.seen_before(pairs) == [i in (7, 700) for i in range(largest)]
    hashes = [("USA", f"h{i}") for i in range(largest)]
    assert store.received_digests(hashes) == {("USA", "h7"), ("USA", "h700")}


@settings(max_examples=40, deadline=None)
@given(
    stored=st.lists(
        st.tuples(st.sampled_from(["USA", "KOR"]), st.integers(0, 9), st.booleans()), max_size=20
    ),
    asked=st.lists(
        st.tuples(st.sampled_from(["USA", "KOR", "GBR"]), st.integers(0, 12)), max_size=70
    ),
)
def test_seen_before_agrees_with_seen_state_at_any_batch_size(
    tmp_path_factory: pytest.TempPathFactory,
    stored: list[tuple[str, int, bool]],
    asked: list[tuple[str, int]],
) -> None:
    # The batch's rows are padded to a power of two with its last one repeated:
    # whatever the size, each answer is its own (a pad asking for anything else
    # would answer for it, or leave an index unanswered).
    store = Store(tmp_path_factory.mktemp("d") / "s.db")
    store.store_received(
        [received(s, f"r{n}", expires=10.0 if pruned else 1e12) for s, n, pruned in stored]
    )
    store.prune_seen(now=11.0)  # some only in the inbox now
    pairs = [(sender, f"r{n}") for sender, n in asked]
    assert store.seen_before(pairs) == [store.seen_state(s, j, "h1") != "new" for s, j in pairs]


def test_counters_and_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.bump({"rejected.signature": 2, "received": 1})
    store.bump({"rejected.signature": 3})
    assert store.counters() == {"rejected.signature": 5, "received": 1}
    store.set_state({"connected": "yes", "last_error": "x"})
    store.set_state({"connected": "no"})
    assert store.state() == {"connected": "no", "last_error": "x"}


def test_record_status_commits_counters_and_facts_together_and_nothing_when_empty(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    store.record_status({"received.JPN": 2}, {"connected": "yes"})
    store.record_status({"received.JPN": 3, "published.USA": 1}, {"inbox_lag": "0"})
    before = store._db.total_changes
    store.record_status({}, {})  # what an idle node's housekeeping passes: writes nothing
    assert store._db.total_changes == before
    store.close()
    again = Store(path, readonly=True)
    assert again.counters() == {"received.JPN": 5, "published.USA": 1}
    assert again.state() == {"connected": "yes", "inbox_lag": "0"}


def test_disk_full_is_a_store_error_and_loses_nothing_accepted(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path, max_pages=40)
    accepted: list[str] = []
    error: StoreError | None = None
    for i in range(1000):
        batch = [rep(i * 10 + j, size=2000) for j in range(10)]
        try:
            store.accept(batch)
        except StoreError as exc:
            error = exc
            break
        accepted += [r.report_id for r in batch]
    assert error is not None
    assert "database or disk is full" in str(error)
    assert accepted  # some batches went in before the cap
    store.close()
    again = Store(path)
    assert [r for r, _ in again.unplanned(10_000)] == accepted


def test_readonly_store_refuses_writes(tmp_path: Path) -> None:
    Store(tmp_path / "s.db").accept([rep(1)])
    ro = Store(tmp_path / "s.db", readonly=True)
    assert ro.outbox_depth() == 1
    with pytest.raises(StoreError, match="readonly"):
        ro.accept([rep(2)])


def test_missing_readonly_store_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open store"):
        Store(tmp_path / "absent.db", readonly=True)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=30), max_size=60))
def test_accept_reports_each_id_new_exactly_once(
    tmp_path_factory: pytest.TempPathFactory, ids: list[int]
) -> None:
    store = Store(tmp_path_factory.mktemp("h") / "s.db")
    seen: set[int] = set()
    expected = []
    for i in ids:
        expected.append(i not in seen)
        seen.add(i)
    half = len(ids) // 2
    got = store.accept([rep(i) for i in ids[:half]]) + store.accept([rep(i) for i in ids[half:]])
    assert got == expected
    assert len(store.unplanned(1000)) == len(seen)


def test_received_digests_answers_for_a_whole_batch(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    assert store.received_digests([]) == set()
    store.store_received([received("USA", "r1", "h1"), received("KOR", "r2", "h2")])
    asked = [("USA", "h1"), ("KOR", "h1"), ("KOR", "h2"), ("USA", "h3"), ("USA", "h1")]
    # Same sender and same bytes only: KOR never sent h1, nobody stored h3.
    assert store.received_digests(asked) == {("USA", "h1"), ("KOR", "h2")}


@settings(max_examples=40, deadline=None)
@given(
    stored=st.lists(
        st.tuples(st.sampled_from(["USA", "KOR", "GBR"]), st.integers(0, 9)), max_size=20
    ),
    asked=st.lists(
        st.tuples(st.sampled_from(["USA", "KOR", "GBR", "FRA"]), st.integers(0, 12)), max_size=40
    ),
)
def test_received_digests_agrees_with_has_received(
    tmp_path_factory: pytest.TempPathFactory,
    stored: list[tuple[str, int]],
    asked: list[tuple[str, int]],
) -> None:
    store = Store(tmp_path_factory.mktemp("d") / "s.db")
    store.store_received(
        [received(sender, f"r{i}-{sender}-{n}", f"h{n}") for i, (sender, n) in enumerate(stored)]
    )
    pairs = [(sender, f"h{n}") for sender, n in asked]
    assert store.received_digests(pairs) == {p for p in pairs if store.has_received(*p)}


def test_accept_hands_back_the_record_stored_under_each_taken_id(tmp_path: Path) -> None:
    # The intake compares it with the new record: a resend is a duplicate,
    # other content under the same id a conflict.
    store = Store(tmp_path / "s.db")
    first = store.accept([rep(1, size=3)], feed="socket:jpn-ais")
    assert first == [True]
    assert first.earlier == {}
    later = NewReport(rep(1).report_id, "vessel", b"y" * 5)
    got = store.accept(
        [rep(2, size=4), later, NewReport(rep(2).report_id, "vessel", b"z")], feed="spool"
    )
    assert got == [True, False, False]
    # Index -> stored record and the feed that gave it, so the intake names the
    # differing fields to that feed only; a report earlier in the same batch counts too.
    assert got.earlier == {1: (b"xxx", "socket:jpn-ais"), 2: (b"xxxx", "spool")}
    assert [bytes(r) for _, r in store.unplanned(10)] == [b"xxx", b"xxxx"]
    assert store.accept([rep(3)]) == [True]  # no feed given: unknown
    assert store.accept([rep(3, size=2)]).earlier == {0: (b"x" * 10, None)}


def _old_inbox(raw: sqlite3.Connection, *, jwe: str | None) -> None:
    """An earlier version's inbox table with report r-old: with the ``jwe`` column
    (holding ``jwe``) unless ``jwe`` is None, and never the ``signing_kid`` column."""
    kept = ", jwe TEXT" if jwe is not None else ""
    raw.execute(
        "CREATE TABLE inbox (sender TEXT NOT NULL, originator TEXT NOT NULL,"
        " report_id TEXT NOT NULL, kind TEXT NOT NULL, received_at REAL NOT NULL,"
        " tlp TEXT NOT NULL, rel_to TEXT, iat REAL NOT NULL, fields TEXT NOT NULL,"
        f" paths TEXT NOT NULL, jwe_sha256 TEXT NOT NULL{kept}, PRIMARY KEY (sender, report_id))"
    )
    values = ("JPN", "JPN", "r-old", "vessel", 1.0, "AMBER", None, 1.0, "{}", "[]", "h0")
    row = values if jwe is None else (*values, jwe)
    raw.execute(f"INSERT INTO inbox VALUES ({', '.join('?' * len(row))})", row)  # noqa: S608 - placeholders only


def test_a_store_from_before_envelopes_were_kept_gains_the_column_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.sqlite3"
    with sqlite3.connect(path) as raw:
        # The inbox table as an earlier version created it, with one report in it.
        _old_inbox(raw, jwe=None)
    old = Store(path, readonly=True)  # read-only: no column added, and no error either
    assert old.kept_envelope("JPN", "r-old") is None
    old.close()
    before = time.time()
    store = Store(path)
    # When the store began keeping envelopes, for msmt inbox check.
    assert before <= float(store.state()[KEPT_SINCE]) <= time.time()
    assert store.store_received([received("JPN", "r-new")]) == [True]
    assert store.kept_envelope("JPN", "r-old") is None
    assert store.kept_envelope("JPN", "r-new") == "jwe JPN r-new"
    assert [e.report_id for e in store.inbox()] == ["r-new", "r-old"]
    since = store.state()[KEPT_SINCE]
    store.close()
    again = Store(path)  # opening again adds nothing twice
    assert again.kept_envelope("JPN", "r-new") == "jwe JPN r-new"
    assert again.state()[KEPT_SINCE] == since
    assert KEPT_SINCE not in Store(tmp_path / "new.sqlite3").state()  # kept from the start
    again.close()


def test_a_store_from_before_signing_keys_were_recorded_gains_the_column_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.sqlite3"
    with sqlite3.connect(path) as raw:
        # The inbox table as the previous version created it (envelopes kept), one report in it.
        _old_inbox(raw, jwe="jwe JPN r-old")
    # Read-only (msmt inbox list while the old daemon runs): no column added, no error.
    old = Store(path, readonly=True)
    (entry,) = old.inbox()
    assert (entry.report_id, entry.signing_kid) == ("r-old", None)
    assert old.inbox_entry("r-old") == [entry]
    assert list(old.inbox_rows()) == [entry]
    old.close()
    store = Store(path)
    assert store.store_received([received("JPN", "r-new")]) == [True]
    got = {e.report_id: e.signing_kid for e in store.inbox()}
    assert got == {"r-new": "JPN-sig-1", "r-old": None}
    assert store.kept_envelope("JPN", "r-old") == "jwe JPN r-old"
    assert KEPT_SINCE not in store.state()  # this store kept envelopes already
    store.close()
    again = Store(path)  # opening again adds nothing twice
    assert {e.report_id: e.signing_kid for e in again.inbox()} == got
    again.close()
    with sqlite3.connect(path) as raw:
        columns = [row[1] for row in raw.execute("PRAGMA table_info(inbox)")]
    assert columns.count("signing_kid") == 1


def test_a_signing_kid_that_is_not_text_is_a_damaged_row(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    store = Store(path)
    store.store_received([received("JPN", "r-1")])
    store._db.execute("UPDATE inbox SET signing_kid = X'00ff'")
    with pytest.raises(StoreError, match=r"inbox row 1 is damaged \(a text column holds bytes"):
        store.inbox()
    assert list(store.inbox_rows()) == [
        "inbox row 1 is damaged (a text column holds bytes or a number)"
    ]
    store.close()


def _small_files() -> None:
    # In the child: no file may grow past 8 KiB (EFBIG), as on a full disk, without
    # root; ignored SIGXFSZ makes that an error rather than a kill.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))


def test_a_store_whose_shm_file_cannot_grow_says_the_disk_may_be_full(tmp_path: Path) -> None:
    # On a full disk SQLite says only "disk I/O error" (a resource trial): it could
    # not grow the -shm file every WAL database needs to be opened, even to read.
    path = tmp_path / "node.sqlite3"
    Store(path).close()
    opening = (
        "import sys\nfrom pathlib import Path\nfrom broker.errors import StoreError\n"
        "from broker.store import Store\n"
        "try:\n    Store(Path(sys.argv[1]), readonly=sys.argv[2] == 'ro')\n"
        "except StoreError as exc:\n    print(exc)\n"
    )
    for mode in ("rw", "ro"):
        done = subprocess.run(
            [sys.executable, "-c", opening, str(path), mode],
            capture_output=True,
            text=True,
            preexec_fn=_small_files,
            check=False,
        )
        assert done.stdout == (
            f"cannot open store {path}: disk I/O error (SQLITE_IOERR_SHMSIZE: its -shm file"
            " could not grow; is the disk full?)\n"
        ), (mode, done.stderr)


_OPEN_BOTH = """
import sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from broker.auditlog import AuditLog, connect
from broker.errors import StoreError
from broker.store import Store
data, readonly = Path(sys.argv[1]), sys.argv[2] == "ro"
for open_it in (
    lambda: Store(data / "node.sqlite3", readonly=readonly),
    lambda: connect(data / "audit" / "audit.sqlite", readonly=True) if readonly
    else AuditLog(data / "audit", "JPN", Ed25519PrivateKey.generate()),
):
    try:
        open_it().close()
        print("opened")
    except StoreError as exc:
        print(exc)
"""


def _data_dir(tmp_path: Path) -> Path:
    """A data directory holding a store and an audit log, closed."""
    data = tmp_path / "data"
    Store(data / "node.sqlite3").close()
    AuditLog(data / "audit", "JPN", Ed25519PrivateKey.generate()).close()
    return data


def _open_both(data: Path, mode: str, prefix: list[str]) -> list[str]:
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _OPEN_BOTH, str(data), mode],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_data_dir_the_user_may_not_write_is_named_with_why(tmp_path: Path) -> None:
    # SQLite said "attempt to write a readonly database" (or "unable to open database
    # file"), and the store's lock "[Errno 13] Permission denied: '...lock'".
    prefix = without_dac_override()  # root writes any folder: as root, not so
    data = _data_dir(tmp_path)
    (data / "audit").chmod(0o500)
    data.chmod(0o500)
    try:
        opened = _open_both(data, "rw", prefix)
    finally:
        data.chmod(0o700)
        (data / "audit").chmod(0o700)
    uid = os.geteuid()
    assert opened == [
        f"cannot open store {data}/node.sqlite3: the folder {data} is not writable by uid {uid}"
        f" (mode 0500, owner uid {uid})",
        f"cannot open audit log {data}/audit/audit.sqlite: the folder {data}/audit is not"
        f" writable by uid {uid} (mode 0500, owner uid {uid})",
    ]
    (data / "node.sqlite3").chmod(0o400)
    try:
        opened = _open_both(data, "rw", prefix)
    finally:
        (data / "node.sqlite3").chmod(0o600)
    assert opened[0] == (
        f"cannot open store {data}/node.sqlite3: {data}/node.sqlite3 is not writable by uid"
        f" {uid} (mode 0400, owner uid {uid})"
    )


def test_a_data_dir_on_a_read_only_mount_says_so(tmp_path: Path) -> None:
    # A read-only bind mount of the data directory, in a mount namespace of the child's
    # own: "unable to open database file" for the log, even to read it (msmt status).
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a read-only bind mount")
    data = _data_dir(tmp_path)
    mount = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(data)]
    if subprocess.run([*mount, "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no mount namespace here")
    assert _open_both(data, "rw", mount) == [
        f"cannot open store {data}/node.sqlite3: the folder {data} is not writable: it is on a"
        " read-only file system",
        f"cannot open audit log {data}/audit/audit.sqlite: the folder {data}/audit is not"
        " writable: it is on a read-only file system",
    ]
    assert _open_both(data, "ro", mount)[1] == (
        f"cannot open audit log {data}/audit/audit.sqlite: the folder {data}/audit is not"
        " writable: it is on a read-only file system"
    )


def test_writer_pid_reads_the_kernels_lock_table_without_taking_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    assert writer_pid(path) is None  # no lock file: never opened for writing
    store = Store(path)
    try:
        assert writer_pid(path) == os.getpid()
    finally:
        store.close()
    assert writer_pid(path) is None  # the file stays, the lock went with the store
    # Asking took no lock: a writer can still take it at once.
    Store(path).close()

    lock = os.stat(tmp_path / "node.sqlite3.lock")
    device = f"{os.major(lock.st_dev):02x}:{os.minor(lock.st_dev):02x}:{lock.st_ino}"
    table = tmp_path / "locks"
    # A process waiting for the lock (``->``) does not hold it; another inode is not ours;
    # a holder in another pid namespace shows as pid 0 (held, pid unknown).
    table.write_text(
        f"1: FLOCK  ADVISORY  WRITE 4242 {device}9 0 EOF\n"
        f"1: -> FLOCK  ADVISORY  WRITE 77 {device} 0 EOF\n"
    )
    assert writer_pid(path, table) is None
    table.write_text(
        f"2: POSIX  ADVISORY  WRITE 88 {device} 0 EOF\n3: FLOCK  ADVISORY  WRITE 0 {device} 0 EOF\n"
    )
    assert writer_pid(path, table) == 0
    table.unlink()
    with pytest.raises(FileNotFoundError):
        writer_pid(path, table)


def test_a_read_of_a_damaged_store_in_a_snapshot_is_a_store_error(tmp_path: Path) -> None:
    # Three bytes put in the middle of the file: the read fails, and so did the
    # end of the snapshot's transaction, whose raw error replaced the read's
    # (msmt inbox check showed a sqlite3.DatabaseError traceback).
    path = tmp_path / "node.sqlite3"
    store = Store(path)
    store.store_received([received("JPN", f"r-{i}") for i in range(300)])
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + b"\xff\xfe\xc3" + data[len(data) // 2 :])
    damaged = Store(path, readonly=True)
    with pytest.raises(StoreError, match="malformed"), damaged.snapshot():
        damaged.inbox(limit=1000)
    damaged.close()


def test_a_read_of_damaged_pages_says_to_restore_from_a_backup(tmp_path: Path) -> None:
    # A bad-input sweep: pages zeroed in a store gave node check and inbox list the bare
    # "store node.sqlite3: database disk image is malformed".
    path = tmp_path / "node.sqlite3"
    store = Store(path)
    store.store_received(
        [received("USA", f"{i:08d}-0000-4000-8000-000000000000") for i in range(400)]
    )
    store.close()
    pages = path.stat().st_size // PAGE_SIZE
    with path.open("r+b") as raw:  # every page but the schema's
        raw.seek(PAGE_SIZE)
        raw.write(bytes(PAGE_SIZE * (pages - 1)))
    damaged = Store(path, readonly=True)
    try:
        with pytest.raises(StoreError) as info:
            damaged.inbox(limit=1000)
    finally:
        damaged.close()
    assert str(info.value) == (
        "store node.sqlite3 is damaged: database disk image is malformed; restore it from a"
        " backup (docs/DEPLOY.md, 'Backing up and restoring a node')"
    )


def test_the_wal_is_cut_back_once_a_long_read_that_held_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A race trial: an `msmt inbox check` held one read for 65 s while the node wrote
    # on, and the store's -wal file grew from 17 to 83 MB (345 MB under two loops of
    # such reads) and stayed so while the node ran: SQLite reuses a WAL, and shrinks
    # it only to a journal_size_limit. Here the limit is 1 MiB, and the node's writes
    # are 1 MB status values, 20 of them (past the 1,000-page checkpoint at 16 KB).
    import broker.store_base

    monkeypatch.setattr(broker.store_base, "WAL_LIMIT", 1024 * 1024)
    path = tmp_path / "node.sqlite3"
    store = Store(path)
    wal = path.with_name(path.name + "-wal")
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM state").fetchone()  # holds its snapshot
        for i in range(20):
            store.set_state({"filler": f"{i}" * 1_000_000})
        held = wal.stat().st_size
        assert held > 16 * 1024 * 1024  # nothing could be checkpointed past the reader
        reader.execute("COMMIT")
        for i in range(3):  # the next writes checkpoint it all, then restart the WAL
            store.set_state({"filler": f"{i}"})
        assert wal.stat().st_size <= 1024 * 1024, (held, wal.stat().st_size)
        assert store.state()["filler"] == "2"  # nothing lost on the way
    finally:
        reader.close()
        store.close()


def test_a_schema_is_created_whole_or_not_at_all(tmp_path: Path) -> None:
    # A race trial: readers during a node's very first start saw some tables and not
    # others (`msmt status`: "no such table: state"; the audit tools: "it has no
    # checkpoints table"), each statement having been its own transaction.
    from broker.store_file import create_schema

    db = sqlite3.connect(tmp_path / "x.sqlite3", isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError):
            create_schema(db, "CREATE TABLE first (a);\nCREATE TABLE second (;")
        assert not db.in_transaction
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == []
        create_schema(db, "CREATE TABLE first (a);\nCREATE TABLE second (b);")
        names = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        assert names == {"first", "second"}
    finally:
        db.close()


@pytest.mark.parametrize("name", ["AU#S", "AU?S", "AU%53", "A U"])
def test_a_store_in_a_folder_with_uri_characters_opens_read_only_as_itself(
    tmp_path: Path, name: str
) -> None:
    # A review: the read-only open built "file:<path>?mode=ro" unescaped, so "#" cut the
    # path (an empty stray file made, opened read-write), and "%53" read another folder's
    # store ("AUS").
    (tmp_path / "AUS").mkdir()
    other = Store(tmp_path / "AUS" / "node.sqlite3")
    other.set_state({"member": "other"})
    other.close()
    (tmp_path / name).mkdir()
    store = Store(tmp_path / name / "node.sqlite3")
    store.set_state({"member": "this"})
    store.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert Store(tmp_path / name / "node.sqlite3", readonly=True).state()["member"] == "this"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def to_key(rid: str, partner: str, kid: str | None, iat: int = 100) -> OutboxItem:
    """An envelope whose protected header names ``kid`` (none: no kid at all)."""
    header = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", **({"kid": kid} if kid else {})}
    head = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=")
    return OutboxItem(
        rid,
        partner,
        f"msmt.to.{partner}.vessel",
        head + b".wrapped.iv.ct.tag",
        json.dumps({"iat": iat}),
    )


def test_pending_envelopes_to_a_key_no_longer_accepted_wait_for_the_partners_next(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    store.accept([rep(1), rep(2)])
    r1, r2 = rep(1).report_id, rep(2).report_id
    store.plan(
        {
            r1: [to_key(r1, "USA", "USA-enc-1"), to_key(r1, "KOR", "KOR-enc-1")],
            r2: [to_key(r2, "KOR", "KOR-enc-1"), to_key(r2, "GBR", None)],
        }
    )
    (sent,) = [i for i in store.pending(10) if i.partner == "USA"]
    store.mark_sent([sent])  # gone already: never taken back
    store.queue_stale(issued_before=101)  # r2's KOR envelope queued to be signed again
    asked: list[tuple[str, str]] = []

    def refused(partner: str, kid: str) -> str | None:
        asked.append((partner, kid))
        return "key KOR-enc-1 is revoked" if partner == "KOR" else None

    found = store.unkeyed(refused)
    assert asked == [("KOR", "KOR-enc-1")]  # once per partner and key
    by_pair = {(w.report_id, w.partner): w for w in found}
    assert sorted(by_pair) == sorted([(r1, "KOR"), (r2, "KOR"), (r2, "GBR")])
    assert len(store.pending(10)) == 3  # found, not yet taken: their entries come first
    kept = {(i.report_id, i.partner): i for i in store.pending(10)}
    for pair, w in by_pair.items():
        # What the withheld entry records: the exact envelope's hash, its key, its facts.
        assert w.jwe_sha256 == hashlib.sha256(kept[pair].jwe).hexdigest()
        assert w.recipient_kid == (None if pair[1] == "GBR" else "KOR-enc-1")
        assert w.audit == kept[pair].audit
    assert store.withhold(found) == {"KOR": 2, "GBR": 1}
    assert store.pending(10) == []
    assert store.reissues(10) == []  # the queue's rows went with the envelopes
    assert store.awaiting(10) == [
        (r1, rep(1).record, ("KOR",)),
        (r2, rep(2).record, ("GBR", "KOR")),
    ]
    reasons = {
        (r[0], r[1]): r[2]
        for r in store._db.execute("SELECT report_id, partner, reason FROM awaiting_key")
    }
    assert reasons == {
        (r1, "KOR"): "key KOR-enc-1 is revoked",
        (r2, "KOR"): "key KOR-enc-1 is revoked",
        (r2, "GBR"): "its envelope names no recipient key",
    }
    assert store.outbox_depths() == (0, 3)
    assert store.unkeyed(refused) == []  # nothing pending is left to take back
    # Partners that still have no key are left out of what is planned again.
    assert store.awaiting(10, without={"KOR"}) == [(r2, rep(2).record, ("GBR",))]
    assert store.awaiting(10, without={"KOR", "GBR"}) == []
