"""Named intake feeds: the feeds file, its checks, and ``msmt feeds add|list|revoke``.

Real files in a temporary data directory and the real ``msmt`` command; the
node's side (the socket, the audit log) is in test_intake_feeds.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from node_world import msmt

from broker import feeds
from broker.errors import ConfigError, UsageError
from broker.store import Store

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
HASH = "ab" * 32


def write_feeds(path: Path, doc: object, mode: int = 0o600) -> None:
    path.write_text(json.dumps(doc))
    path.chmod(mode)


def entry(sha256: str = HASH, revoked_at: str | None = None) -> dict[str, object]:
    return {"sha256": sha256, "created_at": "2026-11-28T09:00:00Z", "revoked_at": revoked_at}


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ("[]", 'not an object of "version" and "feeds"'),
        ('{"version": 1}', 'not an object of "version" and "feeds"'),
        ('{"version": 2, "feeds": {}}', "version 2 is not 1"),
        ('{"version": true, "feeds": {}}', "version True is not 1"),
        ('{"version": 1, "feeds": []}', '"feeds" is not an object'),
        ('{"version": 1, "feeds": {}, "version": 1}', "duplicate JSON member"),
        ("{", "not valid JSON (Expecting property name"),
        (
            json.dumps({"version": 1, "feeds": {"JPN-AIS": entry()}}),
            "'JPN-AIS' is not a feed name (a-z, 0-9",
        ),
        (
            json.dumps({"version": 1, "feeds": {"socket:ais": entry()}}),
            "'socket:ais' is not a feed name",
        ),
        (
            json.dumps({"version": 1, "feeds": {"a" * 33: entry()}}),
            f"'{'a' * 33}' is not a feed name",
        ),
        (
            json.dumps({"version": 1, "feeds": {"ais": {**entry(), "token": "x"}}}),
            "feed 'ais' is not an object of sha256, created_at and revoked_at",
        ),
        (
            json.dumps({"version": 1, "feeds": {"ais": entry(sha256=HASH.upper())}}),
            "feed 'ais': sha256 is not 64 lower-case hex digits",
        ),
        (
            json.dumps({"version": 1, "feeds": {"ais": entry(revoked_at="yesterday")}}),
            "feed 'ais': revoked_at is not an RFC 3339 time",
        ),
        (
            json.dumps({"version": 1, "feeds": {"ais": entry(), "case": entry()}}),
            "feeds 'ais' and 'case' have the same token",
        ),
    ],
)
def test_a_malformed_feeds_file_is_refused_in_one_line_saying_why(
    tmp_path: Path, doc: str, reason: str
) -> None:
    path = tmp_path / "intake-feeds.json"
    path.write_text(doc)
    path.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        feeds.load(path)
    assert str(err.value).startswith(f"feeds file {path} is malformed: {reason}"), err.value
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o620, 0o604])
def test_a_feeds_file_other_users_may_open_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "intake-feeds.json"
    write_feeds(path, {"version": 1, "feeds": {}}, mode)
    with pytest.raises(ConfigError) as err:
        feeds.load(path)
    assert str(err.value) == (
        f"feeds file {path} is open to other users (mode {mode:04o}): chmod 600 it"
    )


def test_a_feeds_file_that_is_a_link_or_too_big_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    write_feeds(real, {"version": 1, "feeds": {}})
    link = tmp_path / "intake-feeds.json"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match=r"is a symbolic link$"):
        feeds.load(link)
    link.unlink()
    link.write_bytes(b" " * (feeds.MAX_FILE_BYTES + 1))
    link.chmod(0o600)
    with pytest.raises(ConfigError, match=r"is larger than 1048576 bytes$"):
        feeds.load(link)
    # A directory and a FIFO: the first was an IsADirectoryError traceback.
    link.unlink()
    link.mkdir()
    with pytest.raises(ConfigError, match=r"is not a regular file$"):
        feeds.load(link)
    link.rmdir()
    os.mkfifo(link)
    with pytest.raises(ConfigError, match=r"is not a regular file$"):
        feeds.load(link)


def test_no_feeds_file_is_no_named_feeds(tmp_path: Path) -> None:
    assert feeds.load(tmp_path / "intake-feeds.json") == feeds.NO_FEEDS


_NAMES = st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True)
_TIMES = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
).map(lambda t: t.replace(microsecond=0))


@given(
    st.dictionaries(
        _NAMES,
        st.tuples(st.binary(min_size=32, max_size=32), _TIMES, st.none() | _TIMES),
        max_size=8,
    )
)
def test_the_file_form_parses_back_to_the_same_feeds(
    found: dict[str, tuple[bytes, datetime, datetime | None]],
) -> None:
    by_hash = {digest: name for name, (digest, _, _) in found.items()}
    kept = {name: v for name, v in found.items() if by_hash[v[0]] == name}
    original = feeds.Feeds({n: feeds.Feed(n, *v) for n, v in kept.items()})
    assert feeds.parse(feeds.dump(original)) == original


def test_a_token_matches_its_feed_revoked_or_not_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "intake-feeds.json"
    ais = feeds.add(path, "ais", T0)
    case = feeds.add(path, "case", T0)
    feeds.revoke(path, "case", T0 + timedelta(hours=1))
    known = feeds.load(path)
    assert known.match(ais) == feeds.Feed("ais", hashlib.sha256(ais.encode()).digest(), T0, None)
    assert known.match(case) == feeds.Feed(
        "case", hashlib.sha256(case.encode()).digest(), T0, T0 + timedelta(hours=1)
    )
    assert known.match(ais[:-1]) is None
    assert known.match("") is None
    assert known.holds(known.by_name["ais"])
    assert not known.holds(known.by_name["case"])
    # 256 random bits, URL-safe, and only its hash is kept.
    assert len(ais) == 43
    assert ais not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["JPN", "socket:ais", "", "1st", "a" * 33, "ais feed", "aïs"])
def test_an_invalid_feed_name_is_refused_and_nothing_is_written(tmp_path: Path, name: str) -> None:
    path = tmp_path / "intake-feeds.json"
    with pytest.raises(UsageError, match="is not a feed name"):
        feeds.add(path, name, T0)
    assert not path.exists()


def test_a_name_in_use_or_once_revoked_is_never_given_a_new_token(tmp_path: Path) -> None:
    path = tmp_path / "intake-feeds.json"
    feeds.add(path, "ais", T0)
    before = path.read_bytes()
    with pytest.raises(UsageError, match="feed 'ais' exists"):
        feeds.add(path, "ais", T0)
    feeds.revoke(path, "ais", T0)
    with pytest.raises(UsageError, match="feed 'ais' was revoked; choose a new name"):
        feeds.add(path, "ais", T0)
    with pytest.raises(UsageError, match="feed 'ais' was revoked at 2026-11-28T09:00:00Z"):
        feeds.revoke(path, "ais", T0)
    with pytest.raises(UsageError, match="no feed 'case' in"):
        feeds.revoke(path, "case", T0)
    assert feeds.load(path).by_name["ais"].sha256 == json_hash(before, "ais")


def json_hash(data: bytes, name: str) -> bytes:
    return bytes.fromhex(json.loads(data)["feeds"][name]["sha256"])


def test_concurrent_adds_and_revokes_lose_none_of_them(tmp_path: Path) -> None:
    # Read, change, write under the lock: without it a later writer undoes an
    # earlier one, and a lost revocation leaves a token accepted.
    path = tmp_path / "intake-feeds.json"
    for i in range(8):
        feeds.add(path, f"old{i}", T0)
    failures: list[BaseException] = []

    def work(i: int) -> None:
        try:
            feeds.add(path, f"new{i}", T0)
            feeds.revoke(path, f"old{i}", T0)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    known = feeds.load(path).by_name
    assert sorted(known) == sorted([f"new{i}" for i in range(8)] + [f"old{i}" for i in range(8)])
    assert all(known[f"old{i}"].revoked_at is not None for i in range(8))
    assert all(known[f"new{i}"].revoked_at is None for i in range(8))


def test_the_node_view_follows_each_change_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "intake-feeds.json"
    view = feeds.FeedTokens(path)
    assert view.current() == feeds.NO_FEEDS
    token = feeds.add(path, "ais", T0)
    assert view.current().match(token) is not None
    assert view.current().match(token).revoked_at is None  # type: ignore[union-attr]
    feeds.revoke(path, "ais", T0)
    assert view.current().match(token).revoked_at == T0  # type: ignore[union-attr]
    # Unfit: fail closed, naming why, until it is mended.
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="open to other users"):
        view.current()
    with pytest.raises(ConfigError, match="open to other users"):
        view.current()
    path.chmod(0o600)
    assert view.current().match(token) is not None
    # An edit in place (same inode) is seen too.
    doc = json.loads(path.read_text())
    doc["feeds"]["ais"]["revoked_at"] = "2026-11-28T10:00:00Z"
    with path.open("r+") as handle:
        handle.write(json.dumps(doc))
        handle.truncate()
    assert view.current().by_name["ais"].revoked_at == T0 + timedelta(hours=1)
    path.unlink()
    assert view.current() == feeds.NO_FEEDS


# --- the command line ----------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        'member = "JPN"\npolicy = "policy.toml"\ndata_dir = "data"\n'
        '[nats]\nurls = ["nats://127.0.0.1:1"]\n[keys]\ndir = "keys"\n'
    )
    return path


def test_feeds_add_prints_the_token_once_and_list_never_shows_it(
    tmp_path: Path, config: Path
) -> None:
    added = msmt("feeds", "add", "jpn-ais", "--config", str(config))
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert added.stdout == token + "\n"
    assert len(token) == 43
    assert token not in added.stderr
    assert "socket:jpn-ais" in added.stderr
    data = tmp_path / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert token not in (data / "intake-feeds.json").read_text()
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert msmt("feeds", "revoke", "jpn-ais", "--config", str(config)).returncode == 0
    shown = msmt("feeds", "list", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    (line,) = shown.stdout.splitlines()
    assert line.startswith("jpn-ais ")
    assert " revoked 20" in line
    assert line.endswith("never used")
    for secret in (token, digest):
        assert secret not in shown.stdout + shown.stderr


def test_feeds_add_out_writes_a_private_file_and_never_overwrites_one(
    tmp_path: Path, config: Path
) -> None:
    out = tmp_path / "case.token"
    added = msmt("feeds", "add", "case", "--config", str(config), "--out", str(out))
    assert added.returncode == 0, added.stderr
    assert added.stdout == ""
    token = out.read_text().strip()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert token not in added.stderr
    feeds_file = tmp_path / "data" / "intake-feeds.json"
    assert feeds.load(feeds_file).match(token) is not None
    before = feeds_file.read_bytes()
    again = msmt("feeds", "add", "other", "--config", str(config), "--out", str(out))
    assert again.returncode == 2
    assert again.stderr == (
        f"msmt: error: --out {out} exists: a token file is never overwritten; give a new path\n"
    )
    assert out.read_text() == token + "\n"
    assert feeds_file.read_bytes() == before
    # A name taken: refused before the token file is made, so none is left behind.
    taken = tmp_path / "taken.token"
    refused = msmt("feeds", "add", "case", "--config", str(config), "--out", str(taken))
    assert refused.returncode == 2
    assert refused.stderr.startswith("msmt: error: feed 'case' exists")
    assert not taken.exists()
    # No link is followed to a file elsewhere.
    link = tmp_path / "link.token"
    link.symlink_to(tmp_path / "elsewhere")
    linked = msmt("feeds", "add", "third", "--config", str(config), "--out", str(link))
    assert linked.returncode == 2
    assert (
        linked.stderr
        == f"msmt: error: --out {link} exists: a token file is never overwritten; give a new path\n"
    )
    assert not (tmp_path / "elsewhere").exists()


def test_feeds_commands_refuse_an_unfit_file_in_one_line(tmp_path: Path, config: Path) -> None:
    path = tmp_path / "data" / "intake-feeds.json"
    path.parent.mkdir(mode=0o700)
    write_feeds(path, {"version": 1, "feeds": {"ais": entry()}}, 0o644)
    for args in (("list",), ("add", "case"), ("revoke", "ais")):
        done = msmt("feeds", *args, "--config", str(config))
        assert done.returncode == 2
        assert done.stderr == (
            f"msmt: error: feeds file {path} is open to other users (mode 0644): chmod 600 it\n"
        )
        assert done.stdout == ""
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert json.loads(path.read_text())["feeds"] == {"ais": entry()}


def test_feeds_add_on_a_data_dir_no_node_ran_on_says_the_environment_may_differ(
    tmp_path: Path, config: Path
) -> None:
    # A trial: the node ran from a unit with MSMT_DATA_DIR; `feeds add` from a shell
    # wrote the feed into node.toml's own data_dir, said the node takes it, and the
    # feed was refused (401) with no hint why.
    data = tmp_path / "data"
    added = msmt("feeds", "add", "ais", "--config", str(config), "--out", str(tmp_path / "t"))
    assert added.returncode == 0, added.stderr
    warning = added.stderr.splitlines()[-1]
    assert warning.startswith(f"msmt: warning: no node has run on data_dir {data} yet: ")
    assert "MSMT_DATA_DIR" in warning
    assert len(added.stderr.splitlines()) == 2
    revoked = msmt("feeds", "revoke", "other", "--config", str(config))
    assert revoked.returncode == 2
    assert revoked.stderr.startswith(f"msmt: error: no feed 'other' in {data}/intake-feeds.json (")
    assert "MSMT_DATA_DIR" in revoked.stderr
    assert revoked.stderr.count("\n") == 1
    # Where a node has run, nothing more is said.
    Store(data / "node.sqlite3").close()
    again = msmt("feeds", "add", "gps", "--config", str(config), "--out", str(tmp_path / "u"))
    assert again.returncode == 0, again.stderr
    assert "warning" not in again.stderr
    assert len(again.stderr.splitlines()) == 1
    revoked = msmt("feeds", "revoke", "other", "--config", str(config))
    assert revoked.stderr == f"msmt: error: no feed 'other' in {data}/intake-feeds.json\n"
