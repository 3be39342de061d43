"""``msmt keys pseudonym``: keys the node loads, never overwritten by accident, shared by import."""

from __future__ import annotations

import base64
import hashlib
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from broker import keys, keys_custodian, pseudonym_keys
from broker.cli import main
from broker.config import NodeConfig, load_config
from broker.errors import KeyMaterialError
from broker.node_files import load_pseudonym_keys
from broker.policy import load_policy

REPO = Path(__file__).resolve().parent.parent
KEY_ID = "kor-jpn-usa-2026"  # the key the shipped KOR policy names


SEED = b"<a NATS user seed>"
"""Stands for ``nkeys_seed()`` in a parametrized case."""


def nkeys_seed() -> bytes:
    """A real NATS user seed, as ``msmt keys init`` writes one."""
    with tempfile.TemporaryDirectory() as tmp:
        keys_custodian.init_keys(Path(tmp) / "keys", ("JPN",))
        return (Path(tmp) / "keys" / "JPN" / keys.NATS_SEED_FILE).read_bytes().strip()


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "keys"
    keys_custodian.init_keys(path, ("KOR", "JPN", "USA"))
    return path


@pytest.fixture
def keydir(template: Path, tmp_path: Path) -> Path:
    # Only the member directories matter here; a copy is cheaper than init_keys per test.
    path = tmp_path / "keys"
    for member in ("KOR", "JPN", "USA"):
        (path / member).mkdir(parents=True, mode=0o700)
        for source in (template / member).iterdir():
            shutil.copy(source, path / member / source.name)  # with its mode: private stay 0600
    return path


def run(*args: str, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(main, ["keys", "pseudonym", *args], input=stdin)


def node_config(keydir: Path, member: str) -> NodeConfig:
    toml = keydir.parent / f"{member}.toml"
    toml.write_text(
        f'member = "{member}"\npolicy = "policy.toml"\ndata_dir = "data"\n'
        f'[nats]\nurls = ["nats://127.0.0.1:4222"]\n[keys]\ndir = "{keydir}"\n'
    )
    return load_config(toml, env={})


def kor_loads(keydir: Path) -> dict[str, bytes]:
    """What KOR's node loads for the shipped KOR policy, through the node's own loader."""
    text = (REPO / "nodes" / "KOR" / "policy.toml").read_text()
    return load_pseudonym_keys(node_config(keydir, "KOR"), load_policy(text, member="KOR"))


def assert_one_line_error(result: Result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)  # not a traceback
    assert result.stderr.startswith("msmt: error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    for needle in needles:
        assert needle in result.stderr


def test_created_key_is_what_the_node_loads_private_and_fingerprinted(keydir: Path) -> None:
    with pytest.raises(KeyMaterialError, match="is missing: make it with `msmt keys pseudonym KOR"):
        kor_loads(keydir)  # the node refuses to start without it
    result = run("kor", KEY_ID, "--dir", str(keydir))
    assert result.exit_code == 0, result.output
    path = keydir / "KOR" / "pseudonym" / f"{KEY_ID}.key"
    assert f"created {path} (mode 0600)" in result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = kor_loads(keydir)
    assert list(loaded) == [KEY_ID]
    assert len(loaded[KEY_ID]) == 32
    assert f"fingerprint sha256:{hashlib.sha256(loaded[KEY_ID]).hexdigest()}" in result.output
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_key_file_the_node_cannot_decode_is_refused_without_quoting_it(keydir: Path) -> None:
    folder = keydir / "KOR" / "pseudonym"
    folder.mkdir(mode=0o700)
    path = folder / f"{KEY_ID}.key"
    path.write_bytes(b"\xfe" + b"A" * 42)
    path.chmod(0o600)
    with pytest.raises(KeyMaterialError) as err:
        kor_loads(keydir)
    # The codec's own text would have shown the key's first byte (0xfe).
    assert str(err.value) == f"pseudonym key {KEY_ID}: {path} is not ASCII text"


def test_a_nats_seed_in_place_of_a_key_stops_the_node_at_start(keydir: Path) -> None:
    # Copied in by hand, or imported before the import refused it (a review): the node
    # used it as a key, and a key file is what members send each other.
    folder = keydir / "KOR" / "pseudonym"
    folder.mkdir(mode=0o700)
    path = folder / f"{KEY_ID}.key"
    seed = nkeys_seed()
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    with pytest.raises(KeyMaterialError) as err:
        kor_loads(keydir)
    assert str(err.value).startswith(
        f"pseudonym key {KEY_ID}: {path} is a NATS seed, not a pseudonym key: put the key"
    )
    assert seed.decode() not in str(err.value)


def test_two_keys_are_never_the_same(keydir: Path) -> None:
    assert run("KOR", "a", "--dir", str(keydir)).exit_code == 0
    assert run("KOR", "b", "--dir", str(keydir)).exit_code == 0
    folder = keydir / "KOR" / "pseudonym"
    assert (folder / "a.key").read_bytes() != (folder / "b.key").read_bytes()


def test_an_existing_key_is_refused_unless_replace_is_given(keydir: Path) -> None:
    assert run("KOR", KEY_ID, "--dir", str(keydir)).exit_code == 0
    before = snapshot(keydir)
    result = run("KOR", KEY_ID, "--dir", str(keydir))
    assert_one_line_error(result, 2, "already exists", "changes every pseudonym", "--replace")
    assert snapshot(keydir) == before
    old = kor_loads(keydir)[KEY_ID]

    result = run("KOR", KEY_ID, "--dir", str(keydir), "--replace")
    assert result.exit_code == 0, result.output
    assert "replaced " in result.output
    assert "--from-file FILE --replace" in result.output  # partners must replace theirs too
    path = keydir / "KOR" / "pseudonym" / f"{KEY_ID}.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert kor_loads(keydir)[KEY_ID] != old


def test_partners_import_the_same_bytes_from_a_file_or_stdin(keydir: Path) -> None:
    assert run("KOR", KEY_ID, "--dir", str(keydir)).exit_code == 0
    sent = keydir / "KOR" / "pseudonym" / f"{KEY_ID}.key"
    key = kor_loads(keydir)[KEY_ID]
    fingerprint = f"fingerprint sha256:{hashlib.sha256(key).hexdigest()}"

    result = run("JPN", KEY_ID, "--dir", str(keydir), "--from-file", str(sent))
    assert result.exit_code == 0, result.output
    assert "imported " in result.output
    assert fingerprint in result.output
    result = run("usa", KEY_ID, "--dir", str(keydir), "--from-file", "-", stdin=sent.read_bytes())
    assert result.exit_code == 0, result.output
    for member in ("JPN", "USA"):
        path = keydir / member / "pseudonym" / f"{KEY_ID}.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert pseudonym_keys.decode(path.read_bytes(), str(path)) == key

    # Importing the same key again changes nothing and succeeds; a different one is refused.
    before = snapshot(keydir)
    result = run("JPN", KEY_ID, "--dir", str(keydir), "--from-file", str(sent))
    assert result.exit_code == 0, result.output
    assert "unchanged " in result.output
    other = keydir.parent / "other.key"
    other.write_bytes(pseudonym_keys.encode(bytes(32)))
    result = run("JPN", KEY_ID, "--dir", str(keydir), "--from-file", str(other))
    assert_one_line_error(result, 2, "already exists")
    assert snapshot(keydir) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["KOR", "bad/id"], "pseudonym key id must be 1-64 letters"),
        (["KOR", "../../../etc/x"], "pseudonym key id must be 1-64 letters"),
        (["KOR", "a" * 65], "pseudonym key id must be 1-64 letters"),
        (["KOR", ""], "pseudonym key id is empty"),
        (["XYZ", KEY_ID], "unknown member 'XYZ'"),
        # A member with no keys in this directory (a trial: KOR's key imported at JPN
        # under KOR's name): the line says whose name it takes.
        (
            ["NZL", KEY_ID],
            "/NZL: name the member whose node uses the key (to import a partner's key, your own",
        ),
        (["JPN", KEY_ID, "--from-file", "/nonexistent/k.key"], "cannot read /nonexistent/k.key"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    keydir: Path, args: list[str], needle: str
) -> None:
    before = snapshot(keydir)
    assert_one_line_error(run(*args, "--dir", str(keydir)), 2, needle)
    assert snapshot(keydir) == before


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "is not a pseudonym key"),
        (b"hello world\n", "is not a pseudonym key"),
        (base64.urlsafe_b64encode(bytes(31)) + b"\n", "holds 31 bytes"),
        (base64.b64encode(b"\xfb" * 32) + b"\n", "is not a pseudonym key"),  # '+', '/' alphabet
        (base64.urlsafe_b64encode(bytes(32))[:-2] + b"\n", "holds 31 bytes"),  # cut short
        (b"A" * 45 + b"\n", "bad base64url length"),
        (pseudonym_keys.encode(bytes(32)) * 2, "is not a pseudonym key"),  # two lines
        (b"A" * 5000, "is not a pseudonym key"),
        # A leak hunt: the member's NATS seed passed for a key, and a key file is sent
        # to partners (docs/POLICY.md).
        (SEED, "is a NATS seed, not a pseudonym key"),
    ],
)
def test_a_mangled_key_file_is_refused_on_import(keydir: Path, content: bytes, needle: str) -> None:
    source = keydir.parent / "sent.key"
    # A seed is made here, not at collection: each test worker must collect the same ids.
    source.write_bytes(nkeys_seed() + b"\n" if content == SEED else content)
    before = snapshot(keydir)
    result = run("JPN", KEY_ID, "--dir", str(keydir), "--from-file", str(source))
    assert_one_line_error(result, 2, needle, str(source))
    assert snapshot(keydir) == before


def test_the_no_replace_write_never_clobbers_a_key_that_appeared_meanwhile(tmp_path: Path) -> None:
    # store_key checks first; the write itself is link(), which fails if the name exists.
    path = tmp_path / "pseudonym" / "k.key"
    path.parent.mkdir()
    path.write_bytes(b"written by someone else\n")
    with pytest.raises(FileExistsError):
        pseudonym_keys._write(path, pseudonym_keys.encode(bytes(32)), replace=False)
    assert path.read_bytes() == b"written by someone else\n"
    assert [p.name for p in path.parent.iterdir()] == ["k.key"]


def test_pseudonym_keys_stay_out_of_git() -> None:
    path = f"keys/KOR/pseudonym/{KEY_ID}.key"
    ignored = subprocess.run(["git", "check-ignore", "-q", path], check=False, cwd=REPO)
    assert ignored.returncode == 0


@given(
    key=st.binary(min_size=32, max_size=96),
    padded=st.booleans(),
    around=st.sampled_from([b"", b"\n", b"\r\n", b"  \n", b"\n\n"]),
)
def test_the_node_loader_reads_every_file_the_import_accepts_as_the_same_key(
    key: bytes, padded: bool, around: bytes
) -> None:
    text = base64.urlsafe_b64encode(key)
    data = (text if padded else text.rstrip(b"=")) + around
    assert pseudonym_keys.decode(data, "f") == key
    with tempfile.TemporaryDirectory() as tmp:
        keydir = Path(tmp) / "keys"
        folder = keydir / "KOR" / "pseudonym"
        folder.mkdir(parents=True)
        (folder / "k.key").write_bytes(data)
        (folder / "k.key").chmod(0o600)
        policy = load_policy(
            'version = 1\nmember = "KOR"\n[pseudonym_keys.k]\npartners = ["JPN"]\n', member="KOR"
        )
        assert load_pseudonym_keys(node_config(keydir, "KOR"), policy) == {"k": key}


@given(st.binary(min_size=32, max_size=96))
def test_encode_then_decode_is_the_identity(key: bytes) -> None:
    encoded = pseudonym_keys.encode(key)
    assert encoded.endswith(b"\n")
    assert encoded.count(b"\n") == 1
    assert pseudonym_keys.decode(encoded, "f") == key
