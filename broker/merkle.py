"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs, and their verification (pure).

Leaf hash ``SHA-256(0x00 || d)``, interior node ``SHA-256(0x01 || left || right)``;
the tree over ``n`` leaves splits at the largest power of two below ``n``
(RFC 9162 §2.1.1). Proof generation follows RFC 9162 §2.1.3.1 / §2.1.4.1 and
verification follows the numbered algorithms of §2.1.3.2 / §2.1.4.2, so any
RFC 6962 verifier accepts what we produce and we accept only what they would.

Two tree shapes are offered: ``CompactRange`` (the right edge only, for cheap
appends in the log store) and ``Levels`` (every aligned perfect subtree, built
level by level, for verifying a whole log and producing proofs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

from broker.errors import AuditError

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
"""The root of the empty tree, ``SHA-256()`` (RFC 9162 §2.1.1)."""

_sha256 = hashlib.sha256


class ProofError(AuditError):
    """An inclusion or consistency proof is malformed or does not verify."""


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 6962 leaf hash ``SHA-256(0x00 || data)``."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 interior node hash ``SHA-256(0x01 || left || right)``."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Return the largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


class CompactRange:
    """The right edge of a tree: one perfect-subtree hash per set bit of ``size``.

    Appending is amortised one node hash per leaf, and the root is a fold of at
    most log2(n) hashes, so a store never recomputes the tree from scratch.
    """

    __slots__ = ("_nodes", "size")

    def __init__(self, size: int = 0, nodes: Sequence[bytes] = ()) -> None:
        if len(nodes) != size.bit_count() or any(len(h) != HASH_SIZE for h in nodes):
            raise AuditError(f"compact range for size {size} needs {size.bit_count()} hashes")
        self.size = size
        self._nodes = list(nodes)

    @property
    def nodes(self) -> tuple[bytes, ...]:
        """The subtree hashes, largest (leftmost) first, for persisting."""
        return tuple(self._nodes)

    def append(self, leaf: bytes) -> None:
        """Append one leaf hash, merging completed perfect subtrees."""
        node = leaf
        size = self.size
        nodes = self._nodes
        while size & 1:
            node = _sha256(b"\x01" + nodes.pop() + node).digest()
            size >>= 1
        nodes.append(node)
        self.size += 1

    def root(self) -> bytes:
        """Return the tree head of everything appended so far."""
        if not self._nodes:
            return EMPTY_ROOT
        acc = self._nodes[-1]
        for node in reversed(self._nodes[:-1]):
            acc = _sha256(b"\x01" + node + acc).digest()
        return acc


class Levels:
    """Every aligned perfect subtree hash of a tree, built bottom-up from its leaf hashes.

    Level ``k`` holds the hash of leaves ``[i * 2**k, (i + 1) * 2**k)`` for each
    ``i``. From these, the root of any prefix and any proof cost O(log n) lookups.
    Each level is one ``bytearray`` of 32-byte hashes: the whole tree takes 64
    bytes an entry, where a list of ``bytes`` objects per level took 176 (an
    auditor's ``msmt audit verify`` holds the tree of a year's log).
    """

    __slots__ = ("_rows", "size")

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if any(len(leaf) != HASH_SIZE for leaf in leaves):
            # Checked one by one: a short and a long hash add up, and shift the rest.
            raise AuditError(f"a leaf hash is not {HASH_SIZE} bytes")
        self._build(bytearray(b"".join(leaves)))

    @classmethod
    def from_packed(cls, leaves: bytearray) -> Levels:
        """The tree of ``leaves``, 32-byte hashes end to end; it keeps (and extends) the array."""
        if len(leaves) % HASH_SIZE:
            raise AuditError(f"{len(leaves)} bytes of leaf hashes is not a whole number of them")
        tree = cls.__new__(cls)
        tree._build(leaves)
        return tree

    def _build(self, leaves: bytearray) -> None:
        self.size = len(leaves) // HASH_SIZE
        self._rows = [leaves]
        level = leaves
        pair = 2 * HASH_SIZE
        while len(level) >= pair:
            # Two neighbours are one 64-byte slice of the level; an odd last node is
            # not a perfect subtree of the next level, so it is dropped.
            above = bytearray()
            for i in range(0, len(level) - pair + 1, pair):
                above += _sha256(b"\x01" + level[i : i + pair]).digest()
            self._rows.append(above)
            level = above

    def append(self, leaf: bytes) -> None:
        """Append one leaf hash, completing the perfect subtrees it closes."""
        if len(leaf) != HASH_SIZE:
            raise AuditError(f"a leaf hash is not {HASH_SIZE} bytes")
        rows = self._rows
        rows[0] += leaf
        self.size += 1
        k = 0
        while len(rows[k]) % (2 * HASH_SIZE) == 0:  # an even number of nodes: the last pair closed
            if k + 1 == len(rows):
                rows.append(bytearray())
            rows[k + 1] += _sha256(b"\x01" + rows[k][-2 * HASH_SIZE :]).digest()
            k += 1

    def leaf(self, index: int) -> bytes:
        """Return the leaf hash at ``index``."""
        if not 0 <= index < self.size:
            raise AuditError(f"no leaf {index} in a tree of size {self.size}")
        return self._subtree(0, index)

    def range_hash(self, lo: int, hi: int) -> bytes:
        """Return MTH of leaves ``[lo, hi)`` (RFC 9162 §2.1.1) for the ranges proofs use."""
        if not 0 <= lo < hi <= self.size:
            raise AuditError(f"no subtree [{lo}, {hi}) in a tree of size {self.size}")
        # Decompose [lo, hi) into aligned perfect subtrees, left to right; the
        # MTH of a range that starts on a split point folds them right to left.
        parts: list[bytes] = []
        pos = lo
        while pos < hi:
            level = (pos & -pos).bit_length() - 1 if pos else (hi - pos).bit_length() - 1
            while pos + (1 << level) > hi:
                level -= 1
            parts.append(self._subtree(level, pos >> level))
            pos += 1 << level
        acc = parts[-1]
        for node in reversed(parts[:-1]):
            acc = node_hash(node, acc)
        return acc

    def _subtree(self, level: int, index: int) -> bytes:
        # The hash of the perfect subtree of 2**level leaves at ``index``; a subclass
        # that keeps only some levels in memory overrides this alone.
        start = index * HASH_SIZE
        node = bytes(self._rows[level][start : start + HASH_SIZE])
        if len(node) != HASH_SIZE:  # past the level's end: a caller's bug, never a short hash
            raise AuditError(
                f"no subtree {index} of 2**{level} leaves in a tree of size {self.size}"
            )
        return node

    def root(self, size: int | None = None) -> bytes:
        """Return the tree head of the first ``size`` leaves (all of them by default)."""
        size = self.size if size is None else size
        return EMPTY_ROOT if size == 0 else self.range_hash(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Return PATH(index, D[0:size]) per RFC 9162 §2.1.3.1."""
        if not 0 <= index < size:
            raise AuditError(f"no leaf {index} in a tree of size {size}")
        if size > self.size:
            # Not "no leaf": the leaf may well be there, the tree asked for is not.
            raise AuditError(f"no tree of size {size}: {self.size} leaves are known")
        path: list[bytes] = []
        lo, hi, m = 0, size, index
        while hi - lo > 1:
            k = _split(hi - lo)
            if m < k:
                path.append(self.range_hash(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.range_hash(lo, lo + k))
                lo, m = lo + k, m - k
        path.reverse()
        return path

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        """Return PROOF(old, D[0:new]) per RFC 9162 §2.1.4.1 (``0 < old <= new``)."""
        if not 0 < old <= new <= self.size:
            raise AuditError(
                f"no consistency proof from size {old} to {new} (log size {self.size})"
            )
        path: list[bytes] = []
        lo, hi, m, complete = 0, new, old, True
        while m != hi - lo:
            k = _split(hi - lo)
            if m <= k:
                path.append(self.range_hash(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.range_hash(lo, lo + k))
                lo, m, complete = lo + k, m - k, False
        if not complete:
            path.append(self.range_hash(lo, hi))
        path.reverse()
        return path


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def verify_inclusion(
    leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes
) -> None:
    """Verify an inclusion proof (RFC 9162 §2.1.3.2); raise ``ProofError`` if it fails.

    Checklist:
      0. every hash is 32 bytes (a short or long hash is malformed, not "unequal");
      1. ``index < size``;
      2-4. chain the path from the leaf, as the RFC's loop does, failing if the
         path is longer than the tree is tall;
      5. the path is fully consumed (``sn == 0``) and the result equals ``root``.
    """
    _check_hash(leaf, "leaf hash")
    _check_hash(root, "root hash")
    for i, p in enumerate(path):
        _check_hash(p, f"proof hash {i}")
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is tall")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short for the tree size")
    if r != root:
        raise ProofError("inclusion proof does not lead to the root hash")


def _trivially_consistent(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, path: Sequence[bytes]
) -> bool:
    """Run checklist steps 0-1; return True when equal sizes settle it, raise if they fail."""
    for i, p in enumerate(path):
        _check_hash(p, f"proof hash {i}")
    if new_size < old_size:
        raise ProofError(f"new size {new_size} is smaller than old size {old_size}")
    if old_size == 0:
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if old_size == new_size:
        if path:
            raise ProofError("sizes are equal but the proof is not empty")
        if old_root != new_root:
            raise ProofError("sizes are equal but the roots differ")
        return True
    return False


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, path: Sequence[bytes]
) -> None:
    """Verify a consistency proof (RFC 9162 §2.1.4.2); raise ``ProofError`` if it fails.

    Checklist:
      0. every hash is 32 bytes; ``0 < old_size <= new_size`` (a proof from the
         empty tree proves nothing, so it is refused rather than waved through);
      1. equal sizes need an empty path and equal roots; otherwise the path is non-empty;
      2-6. run the RFC's loop, rebuilding both roots from the path;
      7. both rebuilt roots match and the path is fully consumed.
    """
    if _trivially_consistent(old_size, new_size, old_root, new_root, path):
        return
    _check_hash(old_root, "old root hash")
    _check_hash(new_root, "new root hash")
    if not path:
        raise ProofError("consistency proof is empty")
    nodes = list(path)
    if old_size & (old_size - 1) == 0:
        nodes.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = nodes[0]
    for c in nodes[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is tall")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short for the tree sizes")
    if fr != old_root:
        raise ProofError("consistency proof does not rebuild the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not rebuild the new root")
