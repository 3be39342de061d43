"""RFC 6962 / 9162 Merkle tree: transparency-dev vectors and Hypothesis properties."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import AuditError
from broker.merkle import (
    EMPTY_ROOT,
    CompactRange,
    Levels,
    ProofError,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parent / "vectors" / "merkle"
INCLUSION = sorted((VECTORS / "inclusion").rglob("*.json"))
CONSISTENCY = sorted((VECTORS / "consistency").rglob("*.json"))


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def _proof(value: list[str] | None) -> list[bytes]:
    return [_b64(p) for p in value or []]


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_vector_sets_are_present() -> None:
    # Guard against a silently empty parametrisation.
    assert len(INCLUSION) > 50
    assert len(CONSISTENCY) > 50
    assert any(_load(p)["wantErr"] for p in INCLUSION)
    assert any(not _load(p)["wantErr"] for p in CONSISTENCY)


@pytest.mark.parametrize("path", INCLUSION, ids=lambda p: str(p.relative_to(VECTORS)))
def test_inclusion_vectors(path: Path) -> None:
    v = _load(path)
    args = (_b64(v["leafHash"]), v["leafIdx"], v["treeSize"], _proof(v["proof"]), _b64(v["root"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("path", CONSISTENCY, ids=lambda p: str(p.relative_to(VECTORS)))
def test_consistency_vectors(path: Path) -> None:
    v = _load(path)
    args = (v["size1"], v["size2"], _b64(v["root1"]), _b64(v["root2"]), _proof(v["proof"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def _reference_mth(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 9162 §2.1.1's recursive definition."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(_reference_mth(leaves[:k]), _reference_mth(leaves[k:]))


def test_known_roots_from_rfc_test_data() -> None:
    # The transparency-dev reference tree: leaves are these byte strings.
    data = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ]
    leaves = [leaf_hash(d) for d in data]
    assert Levels(leaves).root().hex() == (
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    )
    assert Levels(leaves).root(3).hex() == (
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"
    )


def _leaves(n: int, seed: int = 0) -> list[bytes]:
    return [leaf_hash(f"{seed}:{i}".encode()) for i in range(n)]


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 300), data=st.data())
def test_inclusion_proofs_verify(size: int, data: st.DataObject) -> None:
    leaves = _leaves(size)
    tree = Levels(leaves)
    sub = data.draw(st.integers(1, size), label="tree size")
    index = data.draw(st.integers(0, sub - 1), label="leaf index")
    root = tree.root(sub)
    assert root == _reference_mth(leaves[:sub])
    proof = tree.inclusion_proof(index, sub)
    verify_inclusion(leaves[index], index, sub, proof, root)
    # Any single-byte change to the proof, the leaf, or the root breaks it.
    blobs = [leaves[index], root, *proof]
    which = data.draw(st.integers(0, len(blobs) - 1), label="which hash")
    pos = data.draw(st.integers(0, 31), label="byte")
    flip = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(blobs[which])
    bad[pos] ^= flip
    blobs[which] = bytes(bad)
    with pytest.raises(ProofError):
        verify_inclusion(blobs[0], index, sub, blobs[2:], blobs[1])
    # The wrong index fails too.
    if sub > 1:
        with pytest.raises(ProofError):
            verify_inclusion(leaves[index], (index + 1) % sub, sub, proof, root)


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 300), data=st.data())
def test_consistency_proofs_verify(size: int, data: st.DataObject) -> None:
    tree = Levels(_leaves(size))
    new = data.draw(st.integers(1, size), label="new size")
    old = data.draw(st.integers(1, new), label="old size")
    old_root, new_root = tree.root(old), tree.root(new)
    proof = tree.consistency_proof(old, new)
    verify_consistency(old, new, old_root, new_root, proof)
    blobs = [old_root, new_root, *proof]
    which = data.draw(st.integers(0, len(blobs) - 1), label="which hash")
    pos = data.draw(st.integers(0, 31), label="byte")
    bad = bytearray(blobs[which])
    bad[pos] ^= 0x01
    blobs[which] = bytes(bad)
    with pytest.raises(ProofError):
        verify_consistency(old, new, blobs[0], blobs[1], blobs[2:])


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 200), data=st.data())
def test_forked_history_is_not_consistent(size: int, data: st.DataObject) -> None:
    # A log that rewrote any entry below ``old`` cannot prove consistency.
    leaves = _leaves(size)
    old = data.draw(st.integers(1, size))
    victim = data.draw(st.integers(0, old - 1))
    forked = list(leaves)
    forked[victim] = leaf_hash(b"rewritten")
    honest, fork = Levels(leaves), Levels(forked)
    with pytest.raises(ProofError):
        verify_consistency(
            old, size, honest.root(old), fork.root(size), fork.consistency_proof(old, size)
        )


@given(size=st.integers(0, 600))
def test_compact_range_matches_full_tree(size: int) -> None:
    leaves = _leaves(size, seed=7)
    rng = CompactRange()
    for leaf in leaves:
        rng.append(leaf)
    assert rng.root() == _reference_mth(leaves)
    # Restoring from persisted nodes continues identically.
    restored = CompactRange(rng.size, rng.nodes)
    restored.append(leaf_hash(b"next"))
    rng.append(leaf_hash(b"next"))
    assert restored.root() == rng.root()


@settings(max_examples=60)
@given(size=st.integers(0, 300), data=st.data())
def test_a_tree_grown_by_appends_is_the_tree_built_at_once(size: int, data: st.DataObject) -> None:
    # verify's wait for a quorum grows the packed tree a leaf at a time, and a node's
    # proof tree its levels above the chunks: each must equal the tree built whole.
    leaves = _leaves(size, seed=11)
    grown = Levels([])
    for leaf in leaves:
        grown.append(leaf)
    whole = Levels.from_packed(bytearray(b"".join(leaves)))
    assert grown.size == whole.size == size
    for k in range(size + 1):
        assert grown.root(k) == whole.root(k) == _reference_mth(leaves[:k])
    if size:
        index = data.draw(st.integers(0, size - 1))
        assert grown.leaf(index) == leaves[index]
        assert grown.inclusion_proof(index, size) == whole.inclusion_proof(index, size)
        old = data.draw(st.integers(1, size))
        assert grown.consistency_proof(old, size) == whole.consistency_proof(old, size)


def test_a_tree_refuses_hashes_that_are_not_32_bytes() -> None:
    with pytest.raises(AuditError, match="a leaf hash is not 32 bytes"):
        Levels([leaf_hash(b"a"), b"short"])
    with pytest.raises(AuditError, match="a leaf hash is not 32 bytes"):
        Levels([b"a" * 31, b"b" * 33])  # the right total, shifted (a review)
    with pytest.raises(AuditError, match="65 bytes of leaf hashes is not a whole number"):
        Levels.from_packed(bytearray(65))
    tree = Levels([leaf_hash(b"a")])
    with pytest.raises(AuditError, match="a leaf hash is not 32 bytes"):
        tree.append(b"x" * 33)
    with pytest.raises(AuditError, match="no leaf 1 in a tree of size 1"):
        tree.leaf(1)


def test_empty_root_is_sha256_of_nothing() -> None:
    assert CompactRange().root() == hashlib.sha256(b"").digest() == Levels([]).root()


def test_compact_range_rejects_wrong_node_count() -> None:
    with pytest.raises(AuditError):
        CompactRange(3, [leaf_hash(b"a")])


def test_a_proof_from_a_tree_larger_than_the_leaves_says_so() -> None:
    # Once "no leaf 5 in a tree of size 12", as if leaf 5 were absent; it is the tree
    # of size 12 that is (a log whose checkpoint claims more entries than it holds).
    tree = Levels([leaf_hash(bytes([i])) for i in range(8)])
    with pytest.raises(AuditError, match=r"^no tree of size 12: 8 leaves are known$"):
        tree.inclusion_proof(5, 12)
    with pytest.raises(AuditError, match=r"^no leaf 9 in a tree of size 8$"):
        tree.inclusion_proof(9, 8)
    verify_inclusion(leaf_hash(b"\x05"), 5, 8, tree.inclusion_proof(5, 8), tree.root())


def _audit_md_inclusion_verifier() -> Any:
    """docs/AUDIT.md's "these lines of Python", compiled to read the proof from ``PROOF``."""
    text = (Path(__file__).parent.parent / "docs" / "AUDIT.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "inclusion_path" in b]
    assert len(blocks) == 1
    assert blocks[0].count("json.load(sys.stdin)") == 1
    return compile(blocks[0].replace("json.load(sys.stdin)", "PROOF"), "docs/AUDIT.md", "exec")


def _doc_accepts(snippet: Any, proof: dict[str, Any]) -> bool:
    try:
        exec(snippet, {"PROOF": proof, "print": lambda *_: None})  # noqa: S102 - the doc's lines
    except AssertionError:
        return False
    return True


def _code_accepts(leaf: bytes, index: int, size: int, path: list[bytes], root: bytes) -> bool:
    try:
        verify_inclusion(leaf, index, size, path, root)
    except ProofError:
        return False
    return True


def test_the_inclusion_check_audit_md_gives_users_refuses_what_verify_inclusion_does() -> None:
    # A user checking `msmt audit prove` output with the doc's lines must not accept a
    # proof for another index or tree size: a trial's copy took leaf 3 of a 3-leaf tree.
    snippet = _audit_md_inclusion_verifier()
    entries = [f"entry {i}".encode() for i in range(12)]
    tree = Levels([leaf_hash(e) for e in entries])
    disagreements = []
    for size in range(1, 13):
        root = tree.root(size)
        for index in range(size):
            path = tree.inclusion_proof(index, size)
            for claimed_index in range(15):
                for claimed_size in range(1, 15):
                    proof = {
                        "entry": base64.b64encode(entries[index]).decode(),
                        "leaf_index": claimed_index,
                        "tree_size": claimed_size,
                        "inclusion_path": [base64.b64encode(p).decode() for p in path],
                        "root_hash": base64.b64encode(root).decode(),
                    }
                    doc = _doc_accepts(snippet, proof)
                    leaf = leaf_hash(entries[index])
                    if doc != _code_accepts(leaf, claimed_index, claimed_size, path, root):
                        disagreements.append((index, size, claimed_index, claimed_size, doc))
    assert disagreements == []


def _audit_md_consistency_verifier() -> Any:
    """docs/AUDIT.md's consistency lines, compiled to read ``PROOF`` and ``OLD_ROOT``."""
    text = (Path(__file__).parent.parent / "docs" / "AUDIT.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "consistency_path" in b]
    assert len(blocks) == 1
    code = blocks[0].replace("json.load(sys.stdin)", "PROOF").replace("sys.argv[1]", "OLD_ROOT")
    return compile(code, "docs/AUDIT.md", "exec")


def test_the_consistency_check_audit_md_gives_users_refuses_what_verify_consistency_does() -> None:
    # The lines an auditor runs on `msmt audit prove --from-size` output: for every
    # pair of sizes, right and wrong claimed sizes and a right and a wrong kept root,
    # they accept exactly what the code's RFC 9162 verifier accepts.
    snippet = _audit_md_consistency_verifier()
    tree = Levels([leaf_hash(f"entry {i}".encode()) for i in range(12)])
    other = Levels([leaf_hash(f"other {i}".encode()) for i in range(12)])
    disagreements, accepted = [], 0
    for old in range(1, 13):
        for new in range(old, 13):
            path = tree.consistency_proof(old, new)
            for claimed_old in range(1, 14):
                for claimed_new in range(claimed_old, 14):
                    for kept in (tree.root(old), other.root(old)):
                        proof = {
                            "old_size": claimed_old,
                            "tree_size": claimed_new,
                            "consistency_path": [base64.b64encode(p).decode() for p in path],
                            "root_hash": base64.b64encode(tree.root(new)).decode(),
                        }
                        try:
                            exec(  # noqa: S102 - the doc's lines
                                snippet,
                                {
                                    "PROOF": proof,
                                    "OLD_ROOT": base64.b64encode(kept).decode(),
                                    "print": lambda *_: None,
                                },
                            )
                            doc = True
                        except SystemExit:  # its early "consistent" for equal sizes
                            doc = True
                        except (AssertionError, IndexError):
                            doc = False
                        try:
                            verify_consistency(claimed_old, claimed_new, kept, tree.root(new), path)
                            code = True
                        except ProofError:
                            code = False
                        accepted += code
                        if doc != code:
                            disagreements.append((old, new, claimed_old, claimed_new, doc))
    assert disagreements == []
    assert accepted >= 78  # every true pair of sizes, with the right kept root
