"""node.toml loading: paths, defaults, environment overrides, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.aio.client import Client

from broker import natstls
from broker.config import ENV_OVERRIDES, load_config
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
    ],
)
def test_invalid_config_fails_with_one_line_naming_the_key(
    tmp_path: Path, env: dict[str, str], text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_socket_path_too_long_for_unix_sockets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config key intake\.socket: .* longer than a unix"):
        load_config(write(tmp_path), env={"MSMT_INTAKE_SOCKET": "/run/" + "s" * 120})


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config .*node\.toml"):
        load_config(tmp_path / "node.toml", env={})


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
    assert natstls.plaintext_refusal_hooked()


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
    assert not natstls.plaintext_refusal_hooked()
    with pytest.raises(ConfigError, match=r"^config key nats\.urls: nats-py .* plaintext"):
        load_config(write(tmp_path, TLS), env={})
    # A nats:// URL does not depend on the hook.
    assert load_config(write(tmp_path), env={}).nats.urls == ("nats://127.0.0.1:4222",)
