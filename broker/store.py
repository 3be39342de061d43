"""The node's durable store: one SQLite file in WAL mode.

Tables:

* ``reports``: records accepted from feeds, with whether the per-partner plan exists
  and which feed accepted each (NULL for one accepted before the store recorded it);
* ``outbox``: one row per (report, partner) with the exact JWE to publish and a
  state, ``pending`` until the hub acknowledged it, then ``sent`` (and the JWE's
  bytes dropped: the audit log keeps its hash);
* ``awaiting_key``: partners a planned report has no envelope for yet, because
  the roster had no valid encryption key for them (planned when it has);
* ``reissue``: outbox rows to sign again before they are published (again):
  ``stale`` ones waited pending for half the freshness window, ``operator``
  ones were asked for by ``msmt node resend`` after a partner refused them;
* ``inbox``: the verified disclosed fields received from partners, the key
  their originator signed them with (to tell which a later revocation
  withdrew), and each envelope exactly as it arrived (evidence of what its
  originator signed; ``msmt inbox evidence``);
* ``seen``: the replay seen-set, ``(sender, jti) -> JWE hash``, kept only for the
  freshness window (older messages fail the freshness check anyway);
* ``sender_bytes``: each sender's envelope bytes stored per UTC day, against the
  receiver's budget (``limits.sender_bytes_per_day``), kept across restarts;
* ``counters`` and ``state``: figures and the last error, for ``msmt status``.

Every method is one transaction over a batch, so a caller that batches pays
one fsync per batch. ``synchronous=FULL`` makes a commit durable before it
returns: "accepted" and "sent" are promises to operators. A full disk
(``SQLITE_FULL``) raises ``StoreError`` and the transaction rolls back, so
nothing already committed is touched. The class is synchronous; the daemon
calls it from one worker thread. What a store file is (its schema and format, the
writer's lock, the checks at open) is ``broker.store_file``; ``Store`` is written in
three parts: ``broker.store_base`` (open, transactions, reads, status),
``broker.store_outbox`` (what the node sends) and ``broker.store_inbox`` (what it
receives).
"""

from __future__ import annotations

from broker.store_base import AUDIT_SIZE, StoreBase
from broker.store_inbox import InboxEntry, InboxTables, Received, SeenState
from broker.store_outbox import (
    Accepted,
    Earlier,
    NewReport,
    OutboxItem,
    OutboxTables,
    Withholding,
)

__all__ = [
    "AUDIT_SIZE",
    "Accepted",
    "Earlier",
    "InboxEntry",
    "NewReport",
    "OutboxItem",
    "Received",
    "SeenState",
    "Store",
    "StoreBase",
    "Withholding",
]


class Store(OutboxTables, InboxTables):
    """The node's SQLite store; see the module docstring for the tables.

    ``max_pages`` caps the file (SQLite ``max_page_count``); past it, writes fail
    exactly as on a full disk, which lets an operator bound the store and lets
    tests exercise the disk-full path. Raises ``StoreError`` when the file
    cannot be opened or written.
    """
