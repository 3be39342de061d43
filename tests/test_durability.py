"""Files outside SQLite survive a power cut once a command or the node says they are written.

A rename (or a new name) is durable only once its folder is fsynced: a power-cut
trial (an ext4 image copied mid-run) brought back a revoked feed, a roster version
the custodian then signed again differently, a witness state older than the
cosignatures already published (the witness then cosigned a fork), an empty
``intake.token`` and empty spool answers. These tests watch the real calls (``os.open``
creating a file, ``os.replace``, ``os.link``, ``os.fsync``, each still done) and check
that every name made in a folder is followed by an fsync of that folder before the call
returns.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker import feeds, keys_custodian, keys_roster, spool
from broker.auditnet import save_witness_state
from broker.errors import WriteError
from broker.files import write_durably, write_output
from broker.intake import ensure_token
from broker.log import Throttle
from broker.witness import LogState


def _folder(dst: Any, dir_fd: int | None) -> str:
    base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
    return os.path.realpath(os.path.dirname(os.path.join(base, os.fsdecode(dst))))


@dataclass
class Calls:
    """What was named in which folder, and which files and folders were fsynced, in order."""

    events: list[tuple[str, str]] = field(default_factory=list)

    def unsynced(self) -> list[str]:
        """Folders a name was made in with no fsync of the folder after it."""
        waiting: list[str] = []
        for kind, path in self.events:
            if kind == "named" and path not in waiting:
                waiting.append(path)
            elif kind == "synced" and path in waiting:
                waiting.remove(path)
        return waiting

    def synced(self, path: Path) -> bool:
        """Whether ``path`` (a file or folder) was fsynced."""
        return ("synced", os.path.realpath(path)) in self.events


@contextlib.contextmanager
def watched(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    calls = Calls()
    real_replace, real_rename, real_link, real_fsync = os.replace, os.rename, os.link, os.fsync
    real_open = os.open

    def named(real: Any) -> Any:
        def call(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            result = real(src, dst, *args, **kwargs)
            calls.events.append(("named", _folder(dst, kwargs.get("dst_dir_fd"))))
            return result

        return call

    def fsync(fd: Any) -> None:
        number = fd if isinstance(fd, int) else fd.fileno()
        real_fsync(number)
        calls.events.append(("synced", os.path.realpath(os.readlink(f"/proc/self/fd/{number}"))))

    def opened(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_CREAT:
            calls.events.append(("named", _folder(path, kwargs.get("dir_fd"))))
        return fd

    monkeypatch.setattr(os, "open", opened)
    monkeypatch.setattr(os, "replace", named(real_replace))
    monkeypatch.setattr(os, "rename", named(real_rename))
    monkeypatch.setattr(os, "link", named(real_link))
    monkeypatch.setattr(os, "fsync", fsync)
    yield calls


def test_the_checker_sees_a_rename_left_unsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with watched(monkeypatch) as calls:
        (tmp_path / "a").write_text("x")
        (tmp_path / "a").replace(tmp_path / "b")
    assert calls.unsynced() == [os.path.realpath(tmp_path)]


@pytest.mark.parametrize("replace", [True, False])
def test_write_durably_syncs_the_file_then_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replace: bool
) -> None:
    target = tmp_path / "state.json"
    with watched(monkeypatch) as calls:
        write_durably(target, b"{}", replace=replace)
    assert calls.unsynced() == []
    # The temporary file made, its bytes synced, its name made final, the folder synced.
    assert [kind for kind, _ in calls.events] == ["named", "synced", "named", "synced"]
    assert target.read_bytes() == b"{}"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    if not replace:
        with pytest.raises(FileExistsError):
            write_durably(target, b"[]", replace=False)
        assert target.read_bytes() == b"{}"
        assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_feed_revoked_stays_revoked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "feeds.json"
    feeds.add(path, "ais", datetime.now(UTC))
    with watched(monkeypatch) as calls:
        feeds.revoke(path, "ais", datetime.now(UTC))
    assert calls.unsynced() == []
    assert feeds.load(path).by_name["ais"].revoked_at is not None


def test_a_rotated_roster_stays_rotated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keydir = tmp_path / "keys"
    keys_custodian.init_keys(keydir, ["JPN", "USA"])
    with watched(monkeypatch) as calls:
        keys_custodian.rotate_keys(keydir, "JPN")
    assert calls.unsynced() == []
    assert keys_roster.load_signed_roster(keydir).version == 2


def test_the_witness_state_is_durable_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cosignatures it records are published once it returns.
    path = tmp_path / "witness-state.json"
    state = {"JPN": LogState(size=3, root=bytes(32))}
    with watched(monkeypatch) as calls:
        save_witness_state(path, state)
    assert calls.unsynced() == []
    assert [p.name for p in tmp_path.iterdir()] == ["witness-state.json"]


def test_the_intake_token_is_whole_and_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "data" / "intake.token"
    with watched(monkeypatch) as calls:
        token = ensure_token(path)
    assert calls.unsynced() == []
    assert path.read_text() == token + "\n"
    assert ensure_token(path) == token  # never made again


def test_an_output_file_is_durable_when_the_command_says_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with watched(monkeypatch) as calls:
        write_output(tmp_path / "bundle.json", b"{}\n")
    assert calls.unsynced() == []


def _file_a_batch(root: Path) -> tuple[dict[str, Path], str]:
    """A spool with one batch and its answers ready, filed into done/; the folders, its name."""
    folders = {name: root / name for name in ("spool", "done", "rejected")}
    for folder in folders.values():
        folder.mkdir()
    (folders["spool"] / "batch.ndjson").write_text("{}\n")
    (folders["rejected"] / spool.ANSWERS).write_text('{"status":"accepted"}\n')
    fds = {n: os.open(f, os.O_RDONLY | os.O_DIRECTORY) for n, f in folders.items()}
    try:
        return folders, spool._file_away(fds["spool"], "batch.ndjson", fds["done"], fds["rejected"])
    finally:
        for fd in fds.values():
            os.close(fd)


def test_a_filed_spool_batch_and_its_answers_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with watched(monkeypatch) as calls:
        folders, filed = _file_a_batch(tmp_path)
    assert calls.unsynced() == []
    assert sorted(p.name for p in folders["done"].iterdir()) == [filed, f"{filed}.result.ndjson"]
    # The batch's leaving the spool is durable too: else it came back to be read again.
    assert calls.synced(folders["spool"])


def _failing(monkeypatch: pytest.MonkeyPatch, name: str, code: int, *, folders: bool) -> None:
    """Make ``os.<name>`` fail with ``code`` (on a folder's fd only, with ``folders``)."""
    real = getattr(os, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        if not folders or os.path.isdir(os.readlink(f"/proc/self/fd/{args[0]}")):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, call)


def test_a_folder_that_cannot_be_synced_still_files_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A review injected EIO into the folders' fsync: the batch stayed in the spool, and
    # each poll read it again and left another answers file in done/.
    _failing(monkeypatch, "fsync", errno.EIO, folders=True)
    monkeypatch.setattr(spool, "_SYNC_FAILED", Throttle())  # none said yet
    with capture_logs() as logs:
        folders, filed = _file_a_batch(tmp_path)
    assert list(folders["spool"].iterdir()) == []
    assert sorted(p.name for p in folders["done"].iterdir()) == [filed, f"{filed}.result.ndjson"]
    # Said, though, once for the minute: the disk is failing.
    assert [(e["event"], e["reason"]) for e in logs if e["log_level"] == "warning"] == [
        (
            "spool_sync_failed",
            "Input/output error: filed all the same, and a power cut may undo it",
        )
    ]


def test_a_new_file_is_made_where_hard_links_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vfat, exFAT and some network shares refuse link(): a token file was made there
    # before writes went through a temporary file.
    _failing(monkeypatch, "link", errno.EPERM, folders=False)
    target = tmp_path / "feed.token"
    write_durably(target, b"secret\n", replace=False)
    assert target.read_bytes() == b"secret\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["feed.token"]
    with pytest.raises(FileExistsError):
        write_durably(target, b"other\n", replace=False)
    assert target.read_bytes() == b"secret\n"


def test_a_new_file_whose_folder_cannot_be_synced_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Else `feeds add --out` failed, and its token file for the feed not added stayed,
    # refused as existing at the next try.
    _failing(monkeypatch, "fsync", errno.EIO, folders=True)
    with pytest.raises(OSError, match="Input/output error"):
        write_durably(tmp_path / "feed.token", b"secret\n", replace=False)
    assert list(tmp_path.iterdir()) == []


def test_an_intake_token_that_cannot_be_made_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "intake.token"
    _failing(monkeypatch, "fsync", errno.EIO, folders=False)
    with pytest.raises(WriteError) as raised:
        ensure_token(path)
    assert str(raised.value) == f"cannot create intake token {path}: Input/output error"
    assert list(tmp_path.iterdir()) == []


def test_a_roster_swap_is_not_stopped_between_its_two_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A review injected EIO into the folder's fsync after the roster's rename: the swap
    # stopped there, the new roster beside the old signature, refused by every node.
    keydir = tmp_path / "keys"
    keys_custodian.init_keys(keydir, ["JPN", "USA"])
    staged_sig = keydir / keys_roster.ROSTER_SIG_STAGED
    real = os.fsync

    def fsync(fd: int) -> None:
        halfway = staged_sig.exists() and not (keydir / keys_roster.ROSTER_STAGED).exists()
        if halfway and os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    keys_custodian.rotate_keys(keydir, "JPN")
    monkeypatch.undo()
    assert keys_roster.load_signed_roster(keydir).version == 2
