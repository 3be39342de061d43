"""node.toml loading: paths, defaults, environment overrides, one-line errors naming the key."""

from __future__ import annotations

import datetime
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from pydantic import BaseModel

from broker import natsclient
from broker.config import ENV_OVERRIDES, NodeConfig, load_config, parse_config
from broker.errors import ConfigError
from broker.members import MEMBERS

BASE = """
member = "JPN"
base_dir = "../.."
policy = "nodes/JPN/policy.toml"
data_dir = "data/JPN"

[nats]
urls = ["nats://127.0.0.1:4222"]

[keys]
dir = "keys"
"""


def write(tmp_path: Path, text: str = BASE) -> Path:
    path = tmp_path / "nodes" / "JPN" / "node.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_paths_resolve_against_base_dir_and_defaults_follow(tmp_path: Path) -> None:
    config = load_config(write(tmp_path), env={})
    root = tmp_path.resolve()
    assert config.base_dir == root
    assert config.policy == root / "nodes/JPN/policy.toml"
    assert config.data_dir == root / "data/JPN"
    assert config.seed_path == root / "keys/JPN/nats.nk"
    assert config.roster_dir == root / "keys"
    assert config.authority_path == root / "keys/roster-authority.json"
    assert config.socket_path == root / "data/JPN/intake.sock"
    assert config.token_path == root / "data/JPN/intake.token"
    assert config.spool_path == root / "data/JPN/spool"
    assert config.store_path == root / "data/JPN/node.sqlite3"
    assert config.metrics.port == 9464


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "MSMT_NATS_URLS": "nats://10.0.0.1:4222, tls://10.0.0.2:4222",
        "MSMT_FETCH_BATCH": "7",
        "MSMT_DATA_DIR": "/srv/msmt",
        "MSMT_METRICS_LISTEN": "[::1]:9100",
    }
    config = load_config(write(tmp_path), env=env)
    assert config.nats.urls == ("nats://10.0.0.1:4222", "tls://10.0.0.2:4222")
    assert config.limits.fetch_batch == 7
    assert config.data_dir == Path("/srv/msmt")
    assert (config.metrics.host, config.metrics.port) == ("::1", 9100)


@pytest.mark.parametrize(
    ("env", "text", "message"),
    [
        ({"MSMT_FETCH_BATCH": "many"}, BASE, "config key limits.fetch_batch: "),
        ({"MSMT_FETCH_BATCH": "0"}, BASE, "config key limits.fetch_batch: "),
        (
            {"MSMT_METRICS_LISTEN": "0.0.0.0:9464"},
            BASE,
            "metrics.listen: '0.0.0.0:9464' is not a loopback",
        ),
        ({"MSMT_MEMBER": "PRK"}, BASE, "config key member: "),
        # A review: Arabic-Indic digits were port 1234; a superscript two was int()'s error.
        (
            {"MSMT_METRICS_LISTEN": "127.0.0.1:\u0661\u0662\u0663\u0664"},
            BASE,
            "is not HOST:PORT",
        ),
        ({"MSMT_METRICS_LISTEN": "127.0.0.1:\u00b2"}, BASE, "'127.0.0.1:\u00b2' is not HOST:PORT"),
        # A value the environment set is not in the file: the line says which variable.
        ({"MSMT_FETCH_BATCH": "0"}, BASE, "equal to 1 (set by MSMT_FETCH_BATCH)"),
        ({"MSMT_MEMBER": "PRK"}, BASE, " (set by MSMT_MEMBER)"),
        ({"MSMT_NATS_URLS": "http://hub:4222"}, BASE, " (set by MSMT_NATS_URLS)"),
        (
            {"MSMT_NATS_URLS": "http://hub:4222"},
            BASE,
            "nats.urls: 'http://hub:4222' is not a nats://",
        ),
        ({"MSMT_NATS_URLS": ""}, BASE, "config key nats.urls: "),
        ({}, BASE + "\n[limits]\nfetchbatch = 3\n", "config key limits.fetchbatch: unknown key"),
        ({}, BASE.replace('data_dir = "data/JPN"', ""), "config key data_dir: "),
        (
            {},
            BASE + "\n[limits]\nmax_record_bytes = 10000000\n",
            "config key limits.max_record_bytes",
        ),
        # A review: an empty path variable (Environment=MSMT_DATA_DIR=${UNSET}) was the
        # base folder, where the node started a second store and audit log: a fork.
        ({"MSMT_DATA_DIR": ""}, BASE, "config key data_dir: empty (''): give the path itself"),
        ({"MSMT_SPOOL_DIR": " "}, BASE, "config key intake.spool_dir: empty (' ')"),
        (
            {"MSMT_DATA_DIR": "data/JPN "},
            BASE,
            "data_dir: a path with spaces at its start or end ('data/JPN '): give the path"
            " itself (set by MSMT_DATA_DIR)",
        ),
        ({}, BASE.replace('"data/JPN"', '""'), "config key data_dir: empty"),
        # A review: a spool in the node's own folders filed its state and its
        # node.toml as feeds' batches (into rejected/).
        (
            {"MSMT_SPOOL_DIR": "data/JPN"},
            BASE,
            "is data_dir: the spool files every file in it as a feed's batch, this node's own"
            " among them; give a folder of its own (the default is <data_dir>/spool) (set by"
            " MSMT_SPOOL_DIR)",
        ),
        (
            {},
            BASE + '\n[intake]\nspool_dir = "nodes/JPN"\n',
            "is the folder of this node.toml: the spool files",
        ),
        ({"MSMT_SPOOL_DIR": "keys/JPN"}, BASE, "is the member's key folder"),
        ({"MSMT_SPOOL_DIR": "."}, BASE, "is base_dir"),
        # A partner's message larger than its whole daily budget could never be received.
        (
            {"MSMT_SENDER_BYTES_PER_DAY": "65536"},
            BASE,
            "config key limits.sender_bytes_per_day: 65536 is less than"
            " limits.max_message_bytes (1048576): a partner's message that large could"
            " never be received; give at least that (set by MSMT_SENDER_BYTES_PER_DAY)",
        ),
        (
            {},
            BASE + "\n[limits]\nmax_message_bytes = 8388608\nsender_bytes_per_day = 8388607\n",
            "config key limits.sender_bytes_per_day: 8388607 is less than",
        ),
        ({}, "member = [", "invalid TOML"),
        (
            {},
            BASE.replace("[nats]\n", '[nats]\ncert_file = "tls/jpn.pem"\n'),
            "config key nats.key_file: required when nats.cert_file is set",
        ),
        (
            {},
            BASE.replace("[nats]\n", '[nats]\nkey_file = "tls/jpn-key.pem"\n'),
            "config key nats.cert_file: required when nats.key_file is set",
        ),
        (
            {},
            BASE.replace("[nats]\n", '[nats]\nca_file = "tls/ca.pem"\n'),
            "config key nats.urls: 'nats://127.0.0.1:4222' is not a tls:// URL",
        ),
        (
            {"MSMT_NATS_URLS": "tls://hub-1:4222,nats://hub-2:4222"},
            BASE.replace("[nats]\n", '[nats]\nca_file = "tls/ca.pem"\n'),
            "config key nats.urls: 'nats://hub-2:4222' is not a tls:// URL",
        ),
        # A bad-input sweep: a malformed URL was nats-py's "invalid connect url option",
        # naming no URL, at each retry of a running node.
        (
            {},
            BASE.replace('urls = ["nats://127.0.0.1:4222"]', 'urls = ["nats://u:pw@[::1:9999"]'),
            "config key nats.urls: a URL is not well-formed (Invalid IPv6 URL); it is not shown",
        ),
        (
            {"MSMT_NATS_URLS": "nats://hub-1:99999"},
            BASE,
            "config key nats.urls: 'nats://hub-1:99999' has no valid port (Port out of range",
        ),
        (
            {},
            BASE.replace('urls = ["nats://127.0.0.1:4222"]', 'urls = ["nats://:4222"]'),
            "config key nats.urls: 'nats://:4222' names no host",
        ),
        # A bad-input sweep: a NUL in a path was a ValueError traceback.
        (
            {},
            BASE.replace('data_dir = "data/JPN"', 'data_dir = "data/J\\u0000PN"'),
            "config key data_dir: the path holds a NUL character (\\u0000)",
        ),
        (
            {},
            BASE.replace('base_dir = "../.."', 'base_dir = "..\\u0000"'),
            "config key base_dir: the path holds a NUL character",
        ),
        (
            {"MSMT_DATA_DIR": "data/J\0PN"},
            BASE,
            "config key data_dir: the path holds a NUL character",
        ),
    ],
)
def test_invalid_config_fails_with_one_line_naming_the_key(
    tmp_path: Path, env: dict[str, str], text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bad_value_from_the_file_names_no_variable(tmp_path: Path) -> None:
    # The same bad value from node.toml: the file is where to look, so no variable is named,
    # also while another key is overridden.
    text = BASE + "\n[limits]\nfetch_batch = 0\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={"MSMT_MEMBER": "USA"})
    assert str(info.value) == (
        "config key limits.fetch_batch: Input should be greater than or equal to 1"
    )


def test_a_socket_path_too_long_for_unix_sockets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config key intake\.socket: .* longer than a unix"):
        load_config(write(tmp_path), env={"MSMT_INTAKE_SOCKET": "/run/" + "s" * 120})


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config .*node\.toml"):
        load_config(tmp_path / "node.toml", env={})


def test_an_empty_file_is_named_as_such(tmp_path: Path) -> None:
    # A bad-input sweep: "config key member: Field required" named no file.
    (tmp_path / "node.toml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "node.toml", env={})
    assert str(info.value) == (
        f"config {tmp_path / 'node.toml'} is empty, and the environment does not set all a"
        " node needs: config key member: Field required (docs/NODE.md)"
    )
    # Where the environment sets all, an empty file is a config like any other.
    env = {
        "MSMT_MEMBER": "JPN",
        "MSMT_POLICY": "policy.toml",
        "MSMT_DATA_DIR": "data",
        "MSMT_NATS_URLS": "nats://127.0.0.1:4222",
        "MSMT_KEY_DIR": "keys",
    }
    assert load_config(tmp_path / "node.toml", env=env).member == "JPN"


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"config {path} is not UTF-8 text"


def test_a_password_in_a_hub_url_is_not_repeated(tmp_path: Path) -> None:
    url = "http://operator:hunter2-secret@hub.example:4222"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path), env={"MSMT_NATS_URLS": url})
    assert "hunter2" not in str(info.value)
    assert "'http://***@hub.example:4222' is not a nats:// or tls:// URL" in str(info.value)


def test_every_documented_variable_is_in_the_operator_guide() -> None:
    guide = (Path(__file__).parent.parent / "docs" / "NODE.md").read_text(encoding="utf-8")
    for name in ENV_OVERRIDES:
        assert name in guide


@pytest.mark.parametrize("member", MEMBERS)
def test_shipped_node_configs_load(member: str) -> None:
    path = Path(__file__).parent.parent / "nodes" / member / "node.toml"
    config = load_config(path, env={})
    assert config.member == member
    assert config.policy == (path.parent / "policy.toml").resolve()
    assert config.metrics.host == "127.0.0.1"


def test_a_policy_file_given_as_the_config_is_named_as_one() -> None:
    # It was "config key nats: Field required", naming neither the file nor the mistake.
    path = Path(__file__).parent.parent / "nodes" / "JPN" / "policy.toml"
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value) == f"config {path} is a policy file, not a node.toml (docs/NODE.md)"


TLS = BASE.replace(
    'urls = ["nats://127.0.0.1:4222"]',
    'urls = ["tls://hub:4222"]\nca_file = "tls/ca.pem"\n'
    'cert_file = "tls/jpn.pem"\nkey_file = "tls/jpn-key.pem"',
)


def test_tls_files_resolve_against_base_dir_and_are_read_when_the_context_is_built(
    tmp_path: Path,
) -> None:
    config = load_config(write(tmp_path, TLS), env={})
    root = tmp_path.resolve()
    assert config.nats.ca_file == root / "tls/ca.pem"
    assert config.nats.cert_file == root / "tls/jpn.pem"
    assert config.nats.key_file == root / "tls/jpn-key.pem"
    # Loading the config reads no TLS file; building the context (node start) does.
    with pytest.raises(ConfigError, match=r"^config key nats\.ca_file: cannot read .*ca\.pem"):
        config.nats.tls_context()
    (root / "tls").mkdir()
    (root / "tls/ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^config key nats\.ca_file: .* holds no PEM cert"):
        config.nats.tls_context()


def test_tls_files_can_come_from_the_environment(tmp_path: Path) -> None:
    env = {
        "MSMT_NATS_URLS": "tls://hub:4222",
        "MSMT_NATS_CA_FILE": "/etc/msmt/tls/ca.pem",
        "MSMT_NATS_CERT_FILE": "tls/jpn.pem",
        "MSMT_NATS_KEY_FILE": "tls/jpn-key.pem",
    }
    nats = load_config(write(tmp_path), env=env).nats
    assert nats.ca_file == Path("/etc/msmt/tls/ca.pem")
    assert nats.cert_file == tmp_path.resolve() / "tls/jpn.pem"
    assert nats.key_file == tmp_path.resolve() / "tls/jpn-key.pem"
    # The same rules as in the file: a certificate from the environment needs its key.
    del env["MSMT_NATS_KEY_FILE"]
    with pytest.raises(ConfigError, match=r"^config key nats\.key_file: required when"):
        load_config(write(tmp_path), env=env)


def test_no_tls_file_means_no_tls_context(tmp_path: Path) -> None:
    assert load_config(write(tmp_path), env={}).nats.tls_context() is None


def test_this_nats_py_has_the_hook_that_refuses_plaintext_on_tls_urls() -> None:
    # If a nats-py release renames or reshapes Client._process_info, this fails in CI
    # before the override silently stops running (TlsOnlyClient, test_tls).
    assert natsclient.plaintext_refusal_hooked()


@pytest.mark.parametrize(
    "replacement",
    [None, lambda self, info: None, lambda self, info, initial=False: None],
    ids=["removed", "no flag", "flag renamed"],
)
def test_a_nats_py_without_the_hook_refuses_tls_urls_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replacement: object
) -> None:
    if replacement is None:
        monkeypatch.delattr(Client, "_process_info")
    else:
        monkeypatch.setattr(Client, "_process_info", replacement)
    assert not natsclient.plaintext_refusal_hooked()
    with pytest.raises(ConfigError, match=r"^config key nats\.urls: nats-py .* plaintext"):
        load_config(write(tmp_path, TLS), env={})
    # A nats:// URL does not depend on the hook.
    assert load_config(write(tmp_path), env={}).nats.urls == ("nats://127.0.0.1:4222",)


def _leaf_keys(
    model: type[BaseModel] = NodeConfig, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every key a node.toml may hold, with its annotation (sections walked into)."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaf_keys(annotation, (*prefix, name))
        else:
            yield (*prefix, name), annotation


PATH_KEYS = {
    ("base_dir",),
    ("policy",),
    ("data_dir",),
    ("nats", "seed_file"),
    ("nats", "ca_file"),
    ("nats", "cert_file"),
    ("nats", "key_file"),
    ("keys", "dir"),
    ("keys", "roster_dir"),
    ("keys", "authority"),
    ("intake", "socket"),
    ("intake", "token_file"),
    ("intake", "spool_dir"),
}
STRING_KEYS = {("member",), ("metrics", "listen")}
ARRAY_KEYS = {("nats", "urls")}
BOOL_KEYS = {("intake", "shared_token")}
WHEN = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def _wrong_types() -> Iterator[tuple[tuple[str, ...], Any, str]]:
    """(key, a value of another TOML type, the reason expected) for every key."""
    keys = dict(_leaf_keys())
    # A key added without a case here fails the test below rather than go untested.
    assert set(keys) == PATH_KEYS | STRING_KEYS | ARRAY_KEYS | BOOL_KEYS | {
        k for k, annotation in keys.items() if annotation is int
    }
    not_ints: list[tuple[Any, str]] = [("100", "a string"), (100.0, "a float"), (True, "a boolean")]
    not_paths: list[tuple[Any, str]] = [
        (5, "an integer"),
        (False, "a boolean"),
        (WHEN, "a date-time"),
    ]
    for key, annotation in sorted(keys.items()):
        if annotation is int:
            for value, kind in not_ints:
                yield key, value, f"must be an integer, not {kind}"
        elif key in PATH_KEYS:
            for value, kind in not_paths:
                yield key, value, f"must be a path (a string), not {kind}"
        elif key == ("member",):
            yield key, 5, "Input should be 'JPN'"  # one of the trigraphs, named
        elif key in STRING_KEYS:
            yield key, 9464, "must be a string, not an integer"
        elif key in BOOL_KEYS:
            for value, kind in [("false", "a string"), (0, "an integer")]:
                yield key, value, f"must be true or false, not {kind}"
        else:
            yield key, "nats://127.0.0.1:4222", "must be an array, not a string"
            yield key, [4222], "must be a string, not an integer"


@pytest.mark.parametrize(("key", "value", "reason"), list(_wrong_types()))
def test_every_key_refuses_a_value_of_another_toml_type(
    tmp_path: Path, key: tuple[str, ...], value: Any, reason: str
) -> None:
    # Lax pydantic took fetch_batch = "100" (and 100.0, and true as 1) quietly.
    data = tomllib.loads(BASE)
    holder = data
    for part in key[:-1]:
        holder = holder.setdefault(part, {})
    holder[key[-1]] = value
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path, env={})
    assert str(info.value).startswith(f"config key {'.'.join(key)}: {reason}")


def test_a_quoted_integer_in_the_file_is_one_line_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE + '[limits]\nfetch_batch = "100"\n'), env={})
    assert str(info.value) == "config key limits.fetch_batch: must be an integer, not a string"
    with pytest.raises(ConfigError) as section:
        load_config(write(tmp_path, "limits = 100\n" + BASE), env={})
    assert str(section.value) == "config key limits: must be a table, not an integer"


def test_every_environment_override_is_read_as_its_keys_type(tmp_path: Path) -> None:
    # Variables are text: paths, the URL list and integers from them must still load.
    # Each one below its default (every default is in range, some at its top).
    ints = {
        k: NodeConfig.model_fields[k[0]].default.model_dump()[k[1]] - 1
        for k, annotation in _leaf_keys()
        if annotation is int
    }
    values = {
        name: (
            f"/srv/{'-'.join(keys)}"
            if keys in PATH_KEYS
            else f" {ints[keys]} "  # spaces around a number are no mistake
            if keys in ints
            else "false"  # the default is true
            if keys in BOOL_KEYS
            else {
                ("member",): "USA",
                ("metrics", "listen"): "[::1]:9100",
                ("nats", "urls"): "tls://a:4222,tls://b:4222",
            }[keys]
        )
        for name, keys in ENV_OVERRIDES.items()
    }
    config = load_config(write(tmp_path), env=values)
    for name, keys in ENV_OVERRIDES.items():
        got: Any = config
        for part in keys:
            got = getattr(got, part)
        if keys in PATH_KEYS:
            assert got == Path(values[name]), name
        elif keys in ints:
            assert got == ints[keys], name
        elif keys in ARRAY_KEYS:
            assert got == ("tls://a:4222", "tls://b:4222"), name
        elif keys in BOOL_KEYS:
            assert got is False, name
        else:
            assert got == values[name], name


@pytest.mark.parametrize(
    ("name", "key", "text", "wanted"),
    [
        *(
            ("MSMT_FETCH_BATCH", "limits.fetch_batch", text, "an integer")
            for text in ("many", "1.5", "true", "", "1e3", "0x10")
        ),
        # Only TOML's own words: "0" or "off" read as false by one tool, true by another.
        *(
            ("MSMT_INTAKE_SHARED_TOKEN", "intake.shared_token", text, "true or false")
            for text in ("False", "0", "no", "", "off")
        ),
    ],
)
def test_an_override_not_of_its_keys_type_is_one_line_naming_both(
    tmp_path: Path, name: str, key: str, text: str, wanted: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path), env={name: text})
    assert str(info.value) == f"config key {key}: {name}={text!r} is not {wanted}"


def test_a_node_toml_or_policy_every_user_may_change_is_refused(tmp_path: Path) -> None:
    # A review: a clone made under umask 000 left node.toml and policy.toml 0666, and any
    # local user could change what the node releases to its partners.
    path = write(tmp_path)
    path.chmod(0o666)
    with pytest.raises(
        ConfigError, match=r"node\.toml is writable by every local user \(mode 0666\)"
    ):
        load_config(path, env={})
    path.chmod(0o644)
    path.parent.chmod(0o777)  # its folder: the file could be replaced
    with pytest.raises(ConfigError, match=r"JPN is writable by every local user \(mode 0777\)"):
        load_config(path, env={})
    path.parent.chmod(0o1777)  # sticky: nobody replaces another's file
    config = load_config(path, env={})
    path.parent.chmod(0o755)
    config.policy.write_text('version = 1\nmember = "JPN"\n', encoding="utf-8")
    config.policy.chmod(0o666)
    with pytest.raises(ConfigError, match=r"policy\.toml is writable by every local user"):
        config.read_policy()
    config.policy.chmod(0o644)
    assert config.read_policy()[0].member == "JPN"


def test_a_file_too_large_to_be_a_configuration_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    # A review: a 2 GB sparse node.toml took 23 s and 4.2 GB of memory to be "invalid
    # TOML", a MemoryError traceback under ulimit -v; so did a policy, a key, a roster.
    from broker import files

    big = write(tmp_path)
    with big.open("r+b") as handle:
        handle.truncate(files.WHOLE_FILE_MAX + 1)
    with pytest.raises(ConfigError) as refused:
        load_config(big, env={})
    assert str(refused.value) == (
        f"cannot read config {big}: larger than 16 MiB: not a file msmt reads whole"
    )
    assert files.read_file_bytes(big, 5) == BASE.encode()[:5]  # a bounded read still reads
    with big.open("r+b") as handle:
        handle.truncate(files.WHOLE_FILE_MAX)
    with pytest.raises(ConfigError, match="invalid TOML"):  # as large as it may be: read
        load_config(big, env={})


def test_a_path_of_bytes_that_are_not_utf8_is_taken_as_the_system_gives_it(
    tmp_path: Path,
) -> None:
    # A review: a data_dir under a folder named with byte 0xff (os.fsdecode's
    # "\udcff") was a UnicodeEncodeError traceback from the socket path's length check.
    odd = os.fsdecode(bytes(tmp_path) + b"/odd\xffdir")
    config = load_config(write(tmp_path), env={"MSMT_DATA_DIR": odd})
    assert os.fsencode(config.socket_path) == bytes(tmp_path) + b"/odd\xffdir/intake.sock"


def _long_path(root: Path, size: int) -> Path:
    """A path under ``root`` of exactly ``size`` bytes, in names of 200 bytes at most."""
    text = str(root)
    while size - len(text) - 1 > 200:
        text += "/" + "a" * 200
    text += "/" + "b" * (size - len(text) - 1)
    return Path(text)


def test_a_data_dir_whose_name_is_too_long_is_one_line_naming_the_key(tmp_path: Path) -> None:
    # It was a traceback from the roster state's exists() at `msmt node run` and
    # `node check` (ENAMETOOLONG: a review's MSMT_DATA_DIR held a name of 300 bytes).
    data = tmp_path / ("d" * 300)
    env = {"MSMT_DATA_DIR": str(data), "MSMT_INTAKE_SOCKET": str(tmp_path / "s.sock")}
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path), env=env)
    assert str(info.value) == (
        f"config key data_dir: {data}: a name in it is 300 bytes, more than a file name may"
        " be there (255); give a shorter path (set by MSMT_DATA_DIR)"
    )


def test_a_path_key_longer_than_a_path_may_be_is_one_line(tmp_path: Path) -> None:
    keys = _long_path(tmp_path.resolve(), 4200)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path), env={"MSMT_KEY_DIR": str(keys)})
    assert str(info.value) == (
        f"config key keys.dir: {keys} is 4200 bytes, longer than a path may be (4095 bytes);"
        " give a shorter path (set by MSMT_KEY_DIR)"
    )


def test_a_data_dir_too_long_for_sqlite_is_refused_before_anything_is_made(
    tmp_path: Path,
) -> None:
    # 486 bytes: the audit log's path is 505, one past SQLite's limit. The start made
    # the folders, then stopped at "unable to open database file".
    root = tmp_path.resolve()
    socket = {"MSMT_INTAKE_SOCKET": str(tmp_path / "s.sock")}
    fits = _long_path(root, 485)
    assert load_config(write(tmp_path), env={"MSMT_DATA_DIR": str(fits), **socket}).data_dir == fits
    data = _long_path(root, 486)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path), env={"MSMT_DATA_DIR": str(data), **socket})
    assert str(info.value) == (
        f"config key data_dir: {data} is 486 bytes, too long for the audit log in it: SQLite"
        " opens a database path of at most 504 bytes, and the audit log's (audit/audit.sqlite"
        " in it) would be 505; give a shorter path (set by MSMT_DATA_DIR)"
    )
    assert not data.parent.exists()


@pytest.mark.parametrize("said", [-1, 0])
def test_a_file_system_that_gives_no_path_limits_is_held_to_the_usual_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, said: int
) -> None:
    # pathconf gives -1 where no limit is known, and a FUSE file system may say 0:
    # taken as they are, every path was "too long" (a review, from the code).
    monkeypatch.setattr(os, "pathconf", lambda _path, _name: said)
    socket = {"MSMT_INTAKE_SOCKET": str(tmp_path / "s.sock")}
    data = tmp_path / "data"
    assert load_config(write(tmp_path), env={"MSMT_DATA_DIR": str(data), **socket}).data_dir == data
    long = tmp_path / ("d" * 300)
    with pytest.raises(ConfigError, match=r"a name in it is 300 bytes, .* \(255\)"):
        load_config(write(tmp_path), env={"MSMT_DATA_DIR": str(long), **socket})
