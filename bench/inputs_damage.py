"""The damage ``bench/inputs.py`` does to one input file: generic, JSON, TOML and SQLite.

Each variant is a ``Damage``: it gets the path of a file already in place and
its original bytes, and leaves the damaged file (or a FIFO, a directory, a
symbolic link loop...) there instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Damage = Callable[[Path, bytes], None]
"""Damages the file at a path whose original bytes are given (the file is in place)."""


def put(data: bytes) -> Damage:
    def damage(path: Path, _original: bytes) -> None:
        path.write_bytes(data)

    return damage


def edit(change: Callable[[bytes], bytes]) -> Damage:
    def damage(path: Path, original: bytes) -> None:
        path.write_bytes(change(original))

    return damage


def truncate_at(fraction: float) -> Damage:
    return edit(lambda b: b[: int(len(b) * fraction)])


def flip_at(fraction: float) -> Damage:
    def change(b: bytes) -> bytes:
        if not b:
            return b
        i = min(int(len(b) * fraction), len(b) - 1)
        return b[:i] + bytes([b[i] ^ 0x20]) + b[i + 1 :]

    return edit(change)


def replace_with(make: Callable[[Path], None]) -> Damage:
    def damage(path: Path, _original: bytes) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        make(path)

    return damage


def chmod_000(path: Path, _original: bytes) -> None:
    path.chmod(0)


def other_file(relative: str) -> Damage:
    """The slot's file replaced by a file of another kind, from the world."""

    def damage(path: Path, _original: bytes) -> None:
        world = path
        while not (world / "extra").is_dir():
            world = world.parent
        shutil.copy(world / relative, path)

    return damage


def generic_variants(other: str) -> dict[str, Damage]:
    """What any input file can suffer, whatever its format."""
    rng = random.Random(14)
    cuts = sorted(rng.uniform(0.05, 0.95) for _ in range(3))
    return {
        "empty": put(b""),
        **{f"truncated@{c:.2f}": truncate_at(c) for c in cuts},
        **{f"flipped@{c:.2f}": flip_at(c) for c in cuts},
        "bom": edit(lambda b: b"\xef\xbb\xbf" + b),
        "invalid-utf8": edit(lambda b: b[: len(b) // 2] + b"\xff\xfe\xc3" + b[len(b) // 2 :]),
        "nul-bytes": put(b"\x00" * 4096),
        "long-10MB": edit(lambda b: b + b"A" * (10 << 20)),
        "directory": replace_with(lambda p: p.mkdir()),
        "fifo": replace_with(os.mkfifo),
        "symlink-loop": replace_with(lambda p: p.symlink_to(p.name)),
        "dangling-symlink": replace_with(lambda p: p.symlink_to("/nonexistent/x")),
        "dev-zero": replace_with(lambda p: p.symlink_to("/dev/zero")),
        "mode-000": chmod_000,
        "missing": replace_with(lambda _p: None),
        f"other-kind:{Path(other).name}": other_file(other),
    }


_WRONG_VALUES: dict[str, Any] = {
    "string": "x",
    "list": [],
    "object": {},
    "null": None,
    "2**70": 2**70,
    "-1": -1,
    "NaN": float("nan"),
    "Infinity": float("inf"),
    "-0": -0.0,
    "true": True,
}


def _json_paths(
    value: Any, prefix: tuple[Any, ...] = (), depth: int = 3
) -> Iterator[tuple[Any, ...]]:
    if depth == 0:
        return
    items: Any = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value[:2])
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        yield (*prefix, key)
        yield from _json_paths(child, (*prefix, key), depth - 1)


def _set_path(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    copy = json.loads(json.dumps(value))
    holder = copy
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = new
    return copy


def json_variants(original: bytes, paths: int) -> dict[str, Damage]:
    """Wrong JSON types at the first ``paths`` keys, duplicate keys, deep nesting."""
    variants: dict[str, Damage] = {
        "json-deep-10000": put(b"[" * 10_000 + b"]" * 10_000),
        "json-deep-object-10000": put(b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
        "json-top-list": put(b"[]"),
        "json-top-string": put(b'"x"'),
        "json-top-null": put(b"null"),
        "json-nan-literal": put(b"NaN"),
        "json-2**70": put(str(2**70).encode()),
    }
    try:
        doc = json.loads(original)
    except ValueError:
        return variants
    if isinstance(doc, dict) and doc:
        first = next(iter(doc))
        text = json.dumps(doc)
        dup = text[:-1] + f", {json.dumps(first)}: {json.dumps(doc[first])}}}"
        variants["json-duplicate-key"] = put(dup.encode())
        variants["json-extra-key"] = put((text[:-1] + ', "zz_extra": 1}').encode())
    for path in list(_json_paths(doc))[:paths]:
        for name, new in _WRONG_VALUES.items():
            label = "/".join(str(p) for p in path)
            variants[f"json:{label}={name}"] = put(json.dumps(_set_path(doc, path, new)).encode())
    return variants


_TOML_WRONG: dict[str, str] = {
    "string": '"x"',
    "list": "[]",
    "table": "{}",
    "2**70": str(2**70),
    "-1": "-1",
    "nan": "nan",
    "inf": "inf",
    "-0": "-0.0",
    "bool": "true",
    "datetime": "1979-05-27T07:32:00Z",
    "long": '"' + "A" * 100_000 + '"',
}


def toml_variants(original: bytes, keys: int) -> dict[str, Damage]:
    """Wrong TOML types at the first ``keys`` simple keys, a duplicate key, deep nesting."""
    variants: dict[str, Damage] = {
        "toml-deep-array-10000": edit(
            lambda b: b + b"\nzz_deep = " + b"[" * 10_000 + b"]" * 10_000 + b"\n"
        ),
        "toml-deep-table-10000": edit(
            lambda b: b + b"\nzz_deep = " + b"{a=" * 10_000 + b"1" + b"}" * 10_000 + b"\n"
        ),
        "toml-dotted-deep-1000": edit(lambda b: b"zz." * 1000 + b"x = 1\n" + b),
        "toml-crlf": edit(lambda b: b.replace(b"\n", b"\r\n")),
        "toml-bare-cr": edit(lambda b: b.replace(b"\n", b"\r", 1)),
    }
    lines = original.decode("utf-8", "replace").splitlines()
    simple = [
        i for i, ln in enumerate(lines) if "=" in ln and not ln.lstrip().startswith(("#", "["))
    ]
    if simple:
        again = ("\n" + lines[simple[0]]).encode()
        variants["toml-duplicate-key"] = edit(lambda b: b + again)
    for i in simple[:keys]:
        key = lines[i].split("=", 1)[0].strip()
        for name, new in _TOML_WRONG.items():

            def change(b: bytes, i: int = i, key: str = key, new: str = new) -> bytes:
                out = b.decode("utf-8").splitlines()
                out[i] = f"{key} = {new}"
                return ("\n".join(out) + "\n").encode()

            variants[f"toml:{key}@{i + 1}={name}"] = edit(change)
    return variants


def sqlite_variants(original: bytes) -> dict[str, Damage]:
    """A damaged SQLite file: pages overwritten, a foreign database, a wrong version."""

    def foreign(path: Path) -> None:
        path.unlink()
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("CREATE TABLE t (x)")
            db.execute("INSERT INTO t VALUES (1)")
            db.commit()

    def version(n: int) -> Damage:
        def damage(path: Path, _original: bytes) -> None:
            with contextlib.closing(sqlite3.connect(path)) as db:
                db.execute(f"PRAGMA user_version = {n}")
                db.commit()

        return damage

    def zero_pages(start: float) -> Damage:
        def change(b: bytes) -> bytes:
            i = int(len(b) * start) // 4096 * 4096 or 4096
            return b[:i] + b"\x00" * 4096 + b[i + 4096 :]

        return edit(change)

    def drop_table(path: Path, _original: bytes) -> None:
        with contextlib.closing(sqlite3.connect(path)) as db:
            table = db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"
            ).fetchone()[0]
            db.execute(f'DROP TABLE "{table}"')
            db.commit()

    def garbage_header(b: bytes) -> bytes:
        return b"SQLite format 3\x00" + b"\xff" * 84 + b[100:]

    return {
        "sqlite-foreign-db": lambda p, _o: foreign(p),
        "sqlite-user-version-999": version(999),
        "sqlite-user-version-0": version(0),
        "sqlite-zero-page@0.5": zero_pages(0.5),
        "sqlite-zero-page@0.9": zero_pages(0.9),
        "sqlite-header-garbage": edit(garbage_header),
        "sqlite-drop-first-table": drop_table,
        "sqlite-text-file": put(b"hello, not a database\n"),
    }


def wal_variants() -> dict[str, Damage]:
    """A ``-wal`` file beside the database: another database's, garbage, a FIFO."""
    return {
        "wal-from-other-db": other_file("extra/foreign.sqlite3-wal"),
        "wal-garbage": put(b"\x37\x7f\x06\x82" + b"\xaa" * 8000),
        "wal-fifo": replace_with(os.mkfifo),
        "wal-directory": replace_with(lambda p: p.mkdir()),
    }
