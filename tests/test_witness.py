"""tlog-witness logic against real logs: cosign honest growth, alarm on forks and rollbacks."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from audit_helpers import MEMBER, build_log, event, log_verifier, witness_verifier
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.audit_verify import verify_log
from broker.auditlog import AuditLog
from broker.auditnet_witness import save_witness_state
from broker.checkpoint import Checkpoint, parse_body, sign_checkpoint, verify_cosignature
from broker.errors import AuditError
from broker.merkle import EMPTY_ROOT, Levels, leaf_hash
from broker.note import parse
from broker.witness import (
    BadSignatureError,
    ConflictError,
    LogState,
    UnknownLogError,
    Witness,
    WitnessAlarmError,
    WitnessError,
    add_checkpoint_body,
    dump_state,
    load_state,
    parse_add_checkpoint,
)

LOG_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
USA_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(50, 82)))
NOW = 1_800_000_000


def _witness(state: dict[str, LogState] | None = None) -> Witness:
    return Witness("USA", USA_KEY, {MEMBER: [log_verifier(LOG_KEY)]}, state)


def _feed(witness: Witness, log: AuditLog) -> str:
    """Send the log's latest checkpoint to the witness the way the node does."""
    note = log.latest_checkpoint() or ""
    known = witness.state.get(MEMBER)
    old = known.size if known else 0
    proof = log.consistency_proof(old, log.size) if old else []
    request = parse_add_checkpoint(add_checkpoint_body(old, proof, note))
    return witness.add_checkpoint(request.old_size, request.proof, request.checkpoint, NOW)


def test_witness_cosigns_honest_growth_and_log_stores_it(tmp_path: Path) -> None:
    log = build_log(tmp_path, LOG_KEY, [3])
    witness = _witness()
    for n in (0, 4, 9, 1):
        if n:
            log.append_many([event(log.size + i) for i in range(n)])
        cosigned = _feed(witness, log)
        assert witness.state[MEMBER].size == log.size
        assert verify_cosignature(parse(cosigned), witness_verifier(USA_KEY, "USA")) == NOW
    assert log.add_cosignatures(cosigned, [witness_verifier(USA_KEY, "USA")]) == ["USA"]
    report = verify_log(
        tmp_path, [log_verifier(LOG_KEY)], witnesses=[witness_verifier(USA_KEY, "USA")], quorum=1
    )
    assert report.cosigners == ("USA",)


def test_rewritten_history_with_fresh_checkpoint_is_caught_by_a_witness(tmp_path: Path) -> None:
    # The owner rewrites entry 2 and re-signs everything with its real key: the
    # rewritten log verifies on its own, but a witness holding the old checkpoint
    # refuses to cosign and raises a fork alarm.
    honest = build_log(tmp_path / "honest", LOG_KEY, [5])
    witness = _witness()
    _feed(witness, honest)
    rewritten = AuditLog(tmp_path / "rewritten", MEMBER, LOG_KEY)
    rewritten.append_many([event(i) if i != 2 else event(102) for i in range(5)])
    rewritten.append_many([event(i) for i in range(5, 8)])
    verify_log(tmp_path / "rewritten", [log_verifier(LOG_KEY)])  # self-consistent
    with pytest.raises(WitnessAlarmError, match="fork detected on log JPN") as err:
        _feed(witness, rewritten)
    assert err.value.kind == "fork"
    assert witness.state[MEMBER].size == 5  # state unchanged by the refused checkpoint


def test_same_size_different_root_is_a_fork(tmp_path: Path) -> None:
    witness = _witness()
    _feed(witness, build_log(tmp_path / "a", LOG_KEY, [4]))
    other = AuditLog(tmp_path / "b", MEMBER, LOG_KEY)
    other.append_many([event(i + 50) for i in range(4)])
    with pytest.raises(WitnessAlarmError, match="two different roots for size 4"):
        witness.add_checkpoint(4, [], other.latest_checkpoint() or "", NOW)


def test_rollback_raises_the_alarm(tmp_path: Path) -> None:
    log = build_log(tmp_path, LOG_KEY, [3, 3])
    witness = _witness()
    _feed(witness, log)
    with pytest.raises(WitnessAlarmError, match="rollback") as err:
        witness.add_checkpoint(6, [], log.checkpoint_at(3), NOW)
    assert err.value.kind == "rollback"


def test_refusals_unknown_origin_bad_signature_and_conflict(tmp_path: Path) -> None:
    log = build_log(tmp_path, LOG_KEY, [2])
    witness = _witness()
    usa_note = sign_checkpoint(Checkpoint("USA", 1, bytes(32)), LOG_KEY).render()
    with pytest.raises(UnknownLogError):
        witness.add_checkpoint(0, [], usa_note, NOW)
    imposter = sign_checkpoint(Checkpoint(MEMBER, 2, bytes(32)), USA_KEY).render()
    with pytest.raises(BadSignatureError):
        witness.add_checkpoint(0, [], imposter, NOW)
    _feed(witness, log)
    log.append(event(2))
    with pytest.raises(ConflictError) as err:
        witness.add_checkpoint(0, [], log.latest_checkpoint() or "", NOW)
    assert err.value.size == 2
    with pytest.raises(WitnessError, match="not a base64 32-byte hash"):
        parse_add_checkpoint(b"old 2\nAAAA\n\n" + (log.latest_checkpoint() or "").encode())
    with pytest.raises(WitnessError, match="old <size>"):
        parse_add_checkpoint(b"old 02\n\n" + (log.latest_checkpoint() or "").encode())


@settings(max_examples=40, deadline=None)
@given(old=st.integers(1, 40), extra=st.integers(0, 40), victim=st.data())
def test_any_rewrite_below_the_witnessed_size_is_a_fork(
    old: int, extra: int, victim: st.DataObject
) -> None:
    # Pure property: the witness accepts every honest extension and refuses every
    # history that changed any entry it already cosigned.
    leaves = [leaf_hash(str(i).encode()) for i in range(old + extra)]
    honest = Levels(leaves)
    witness = Witness(
        "USA",
        USA_KEY,
        {MEMBER: [log_verifier(LOG_KEY)]},
        {MEMBER: LogState(old, honest.root(old))},
    )
    new = old + extra
    note = sign_checkpoint(Checkpoint(MEMBER, new, honest.root(new)), LOG_KEY).render()
    proof = honest.consistency_proof(old, new) if extra else []
    witness.add_checkpoint(old, proof, note, NOW)
    i = victim.draw(st.integers(0, old - 1))
    forked = Levels([leaf_hash(b"x") if j == i else h for j, h in enumerate(leaves)])
    fork_note = sign_checkpoint(Checkpoint(MEMBER, new, forked.root(new)), LOG_KEY).render()
    again = Witness(
        "USA", USA_KEY, {MEMBER: [log_verifier(LOG_KEY)]}, {MEMBER: LogState(old, honest.root(old))}
    )
    with pytest.raises(WitnessAlarmError):
        again.add_checkpoint(
            old, forked.consistency_proof(old, new) if extra else [], fork_note, NOW
        )


def test_state_round_trips_and_a_restarted_witness_keeps_its_memory(tmp_path: Path) -> None:
    log = build_log(tmp_path, LOG_KEY, [3])
    witness = _witness()
    _feed(witness, log)
    saved = dump_state(witness.state)
    restarted = _witness(load_state(saved))
    assert restarted.state == witness.state
    log.append(event(3))
    _feed(restarted, log)  # continues from size 3 with a consistency proof
    assert restarted.state[MEMBER].size == 4
    for bad in (b"[]", b"{", b'{"JPN":{"size":-1,"root":""}}', b'{"JPN":{"size":1}}'):
        with pytest.raises(WitnessError):
            load_state(bad)


def test_open_then_add_opened_is_add_checkpoint_in_two_steps(tmp_path: Path) -> None:
    # The node verifies a checkpoint once, before asking the log for a proof, then adds it.
    log = build_log(tmp_path, LOG_KEY, [3])
    one_step, two_steps = _witness(), _witness()
    for n in (0, 5, 2):
        if n:
            log.append_many([event(log.size + i) for i in range(n)])
        note = log.latest_checkpoint() or ""
        old = one_step.state[MEMBER].size if MEMBER in one_step.state else 0
        proof = log.consistency_proof(old, log.size) if old else []
        opened = two_steps.open(note)
        assert opened.checkpoint.size == log.size
        assert two_steps.add_opened(old, proof, opened, NOW) == one_step.add_checkpoint(
            old, proof, note, NOW
        )
        assert two_steps.state == one_step.state


def test_open_verifies_and_an_opened_checkpoint_serves_only_its_witness(tmp_path: Path) -> None:
    log = build_log(tmp_path, LOG_KEY, [3])
    note = log.latest_checkpoint() or ""
    impostor = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    forged = sign_checkpoint(parse_body(parse(note).text), impostor).render()
    witness = _witness()
    # Signed by a key this witness does not trust for the log: most often a rotation
    # in a roster not loaded yet, and the line says so.
    with pytest.raises(BadSignatureError, match=r"rotated its keys, restart with the new roster"):
        witness.open(forged)
    with pytest.raises(UnknownLogError):
        witness.open(note.replace(MEMBER, "KOR", 1))
    # An Opened carries the witness whose keys verified it; another witness refuses it.
    stranger = Witness("KOR", USA_KEY, {MEMBER: [log_verifier(impostor)]})
    with pytest.raises(WitnessError, match="not opened by this witness"):
        witness.add_opened(0, [], stranger.open(forged), NOW)
    assert witness.state == {}


def test_a_cosignature_that_cannot_be_made_leaves_the_state_unchanged(tmp_path: Path) -> None:
    log = build_log(tmp_path, LOG_KEY, [3])
    witness = _witness()
    with pytest.raises(AuditError, match="timestamp"):
        witness.add_checkpoint(0, [], log.latest_checkpoint() or "", -1)
    assert witness.state == {}


def test_hostile_state_and_add_checkpoint_bodies_raise_witness_errors(tmp_path: Path) -> None:
    root = base64.b64encode(bytes(32)).decode()
    for bad in (
        '{"JPN":{"size":1,"root":"\u00e9"}}'.encode(),
        b'{"JPN":{"size":1,"root":7}}',
        b'{"JPN":[1]}',
        # A bool is an int to Python; no log holds 2**64 entries. Either, read as
        # a size, set off a false alarm at the log's next checkpoint.
        f'{{"JPN":{{"size":true,"root":"{root}"}}}}'.encode(),
        f'{{"JPN":{{"size":{2**64},"root":"{root}"}}}}'.encode(),
        # Beyond what RFC 8785 JSON holds, so beyond what a witness ever saved.
        f'{{"JPN":{{"size":{2**53},"root":"{root}"}}}}'.encode(),
    ):
        with pytest.raises(WitnessError, match="malformed"):
            load_state(bad)
    assert load_state(f'{{"JPN":{{"size":{2**53 - 1},"root":"{root}"}}}}'.encode())
    long_origin = "\u00e9" * 5_000
    with pytest.raises(UnknownLogError) as err:
        _witness().open(f"{long_origin}\n1\nAAAA\n\n\u2014 JPN AAAAAAAA\n")
    assert len(str(err.value)) < 100
    # C2SP's request with old size 0: no previous checkpoint, an empty proof.
    log = build_log(tmp_path, LOG_KEY, [3])
    request = parse_add_checkpoint(add_checkpoint_body(0, [], log.latest_checkpoint() or ""))
    witness = _witness()
    witness.add_checkpoint(request.old_size, request.proof, request.checkpoint, NOW)
    assert witness.state[MEMBER].size == 3


def test_an_unknown_origin_is_named_only_if_it_is_a_member() -> None:
    # The origin line is the log's own text: it reaches the witness's log and
    # status, so a reason names it only if it is a member code (ours).
    witness = _witness()
    with pytest.raises(UnknownLogError) as err:
        witness.open("CNRYCKPT1 garbage\n1\nAAAA\n\n\u2014 JPN AAAAAAAA\n")
    assert "CNRY" not in str(err.value)
    assert str(err.value) == "witness USA does not follow a log of that origin"
    kor = sign_checkpoint(Checkpoint("KOR", 1, bytes(32)), LOG_KEY).render()
    with pytest.raises(UnknownLogError) as err:
        witness.open(kor)
    assert str(err.value) == (
        "witness USA does not follow log KOR (if KOR joined the roster since this node"
        " started, restart with the new roster)"
    )


def test_a_size_0_checkpoint_has_the_empty_trees_root_or_is_refused() -> None:
    # No consistency proof runs from size 0, so two roots at size 0 were both
    # cosigned: a split view no witness would ever alarm on (security review).
    witness = _witness()
    for root in (bytes(32), b"\x01" * 32):
        note = sign_checkpoint(Checkpoint(MEMBER, 0, root), LOG_KEY).render()
        with pytest.raises(AuditError, match="size 0 has a root other than the empty tree's"):
            witness.add_checkpoint(0, [], note, NOW)
    assert MEMBER not in witness.state
    empty = sign_checkpoint(Checkpoint(MEMBER, 0, EMPTY_ROOT), LOG_KEY).render()
    verify_cosignature(
        parse(witness.add_checkpoint(0, [], empty, NOW)), witness_verifier(USA_KEY, "USA")
    )
    assert witness.state[MEMBER] == LogState(0, EMPTY_ROOT)


def test_a_checkpoint_larger_than_the_state_holds_is_refused_not_a_crash(tmp_path: Path) -> None:
    # A review: a log's own key signed a checkpoint of size 2^60; the witness took it (it
    # knew nothing of the log yet), its state's RFC 8785 save failed, and every node that
    # witnessed it stopped. Refused as the witness's error now, and nothing recorded.
    witness = _witness()
    note = sign_checkpoint(Checkpoint(MEMBER, 2**60, bytes(32)), LOG_KEY).render()
    with pytest.raises(WitnessError, match=r"size 1152921504606846976 is beyond 9007199254740991"):
        witness.add_checkpoint(0, [], note, 1_800_000_000)
    assert MEMBER not in witness.state
    largest = sign_checkpoint(Checkpoint(MEMBER, 2**53 - 1, bytes(32)), LOG_KEY).render()
    assert witness.add_checkpoint(0, [], largest, 1_800_000_000)
    save_witness_state(tmp_path / "ws.json", witness.state)
    assert load_state((tmp_path / "ws.json").read_bytes())[MEMBER].size == 2**53 - 1
