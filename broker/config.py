"""The node's configuration: ``node.toml``, overridden by ``MSMT_*`` environment variables.

Relative paths in the file are resolved against ``base_dir``, which is itself
relative to the directory holding the config file (default: that directory).
The shipped ``nodes/<MEMBER>/node.toml`` files set ``base_dir = "../.."`` so
that their paths read as paths from the repository root.

Every environment variable in ``ENV_OVERRIDES`` replaces one key of the file;
an override that does not parse fails exactly like a bad key in the file.
Any invalid value raises ``ConfigError`` with one line naming the key, so a
node refuses to start rather than run half-configured.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.errors import ConfigError
from broker.members import Member
from broker.natstls import CONFIG_NAMES, check_tls_settings, client_tls_context, display_url
from broker.policy import Policy, load_policy
from broker.validation import MAX_RECORD_BYTES

ENV_OVERRIDES: Final[dict[str, tuple[str, ...]]] = {
    "MSMT_MEMBER": ("member",),
    "MSMT_BASE_DIR": ("base_dir",),
    "MSMT_NATS_URLS": ("nats", "urls"),  # comma-separated
    "MSMT_NATS_SEED_FILE": ("nats", "seed_file"),
    "MSMT_NATS_CA_FILE": ("nats", "ca_file"),
    "MSMT_NATS_CERT_FILE": ("nats", "cert_file"),
    "MSMT_NATS_KEY_FILE": ("nats", "key_file"),
    "MSMT_KEY_DIR": ("keys", "dir"),
    "MSMT_ROSTER_DIR": ("keys", "roster_dir"),
    "MSMT_ROSTER_AUTHORITY": ("keys", "authority"),
    "MSMT_POLICY": ("policy",),
    "MSMT_DATA_DIR": ("data_dir",),
    "MSMT_INTAKE_SOCKET": ("intake", "socket"),
    "MSMT_INTAKE_TOKEN_FILE": ("intake", "token_file"),
    "MSMT_SPOOL_DIR": ("intake", "spool_dir"),
    "MSMT_METRICS_LISTEN": ("metrics", "listen"),
    "MSMT_MAX_RECORD_BYTES": ("limits", "max_record_bytes"),
    "MSMT_PUBLISH_MAX_IN_FLIGHT": ("limits", "publish_max_in_flight"),
    "MSMT_FETCH_BATCH": ("limits", "fetch_batch"),
    "MSMT_FRESHNESS_SECONDS": ("limits", "freshness_seconds"),
    "MSMT_HOLD_SECONDS": ("limits", "hold_seconds"),
    "MSMT_MAX_MESSAGE_BYTES": ("limits", "max_message_bytes"),
}
"""Environment variable -> the config key it overrides (documented in docs/NODE.md)."""

_LIST_KEYS: Final = frozenset({("nats", "urls")})
MAX_SOCKET_PATH: Final = 107
"""sockaddr_un holds 108 bytes including the terminating NUL (Linux)."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NatsSection(_Section):
    """How to reach the hub: server URLs, the member's nkey seed file, and optional TLS files.

    ``seed_file`` defaults to ``<keys.dir>/<MEMBER>/nats.nk``. ``ca_file`` (a
    private CA bundle instead of the system store) and ``cert_file`` with
    ``key_file`` (a client certificate for a hub that demands one) require
    every URL to be ``tls://``; ``parse_config`` checks that.
    """

    urls: Annotated[tuple[str, ...], Field(min_length=1)]
    seed_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            if not url.startswith(("nats://", "tls://")):
                raise ValueError(f"{display_url(url)!r} is not a nats:// or tls:// URL")
        return urls

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for the hub, or ``None`` when no TLS file is set.

        Reads and checks the files; raises ``ConfigError`` naming the key at fault.
        """
        return client_tls_context(
            self.urls, self.ca_file, self.cert_file, self.key_file, CONFIG_NAMES
        )


class KeysSection(_Section):
    """Where the member's private keys, the signed roster and the pinned authority key live.

    ``roster_dir`` (default ``dir``) holds ``roster.json`` and ``roster.json.jws``;
    ``authority`` (default ``<roster_dir>/roster-authority.json``) is the pinned
    roster-authority public key. Pin it from a trusted copy: a node trusts any
    roster that key signed.
    """

    dir: Path
    roster_dir: Path | None = None
    authority: Path | None = None


class IntakeSection(_Section):
    """Local-only intake: the unix socket, its bearer-token file, and the spool directory."""

    socket: Path | None = None
    token_file: Path | None = None
    spool_dir: Path | None = None


class LimitsSection(_Section):
    """Bounds on input sizes, pipelining and replay retention."""

    max_record_bytes: Annotated[int, Field(ge=256, le=MAX_RECORD_BYTES)] = MAX_RECORD_BYTES
    publish_max_in_flight: Annotated[int, Field(ge=1, le=10_000)] = 256
    fetch_batch: Annotated[int, Field(ge=1, le=1_000)] = 100
    freshness_seconds: Annotated[int, Field(ge=60, le=30 * 86_400)] = 86_400
    hold_seconds: Annotated[int, Field(ge=1, le=3_600)] = 60
    max_message_bytes: Annotated[int, Field(ge=4096, le=8 * 1024 * 1024)] = 1024 * 1024


class MetricsSection(_Section):
    """The loopback HTTP listener for /healthz, /readyz and /metrics."""

    listen: str = "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _loopback(cls, listen: str) -> str:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{listen!r} is not HOST:PORT")
        try:
            loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            # Metrics reveal traffic volumes per partner: never expose them off-host.
            raise ValueError(f"{listen!r} is not a loopback address")
        return listen

    @property
    def host(self) -> str:
        """The listen host (without brackets)."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The listen port."""
        return int(self.listen.rpartition(":")[2])


class NodeConfig(_Section):
    """A validated ``node.toml``, with every path made absolute.

    Build it with ``load_config``; paths are resolved there, not here.
    """

    member: Member
    base_dir: Path = Path()
    nats: NatsSection
    keys: KeysSection
    policy: Path
    data_dir: Path
    intake: IntakeSection = IntakeSection()
    limits: LimitsSection = LimitsSection()
    metrics: MetricsSection = MetricsSection()

    def read_policy(self) -> tuple[Policy, str]:
        """Load and check the member's policy file; return it and its text.

        Raises ``ConfigError`` if the file cannot be read as UTF-8 and
        ``PolicyError`` (naming the line) if it does not check.
        """
        try:
            text = self.policy.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read policy {self.policy}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"policy {self.policy} is not UTF-8 text") from None
        return load_policy(text, member=self.member, source=str(self.policy)), text

    @property
    def seed_path(self) -> Path:
        """The member's NATS nkey seed file."""
        return self.nats.seed_file or self.keys.dir / self.member / "nats.nk"

    @property
    def roster_dir(self) -> Path:
        """The directory holding ``roster.json`` and its signature."""
        return self.keys.roster_dir or self.keys.dir

    @property
    def authority_path(self) -> Path:
        """The pinned roster-authority public key."""
        return self.keys.authority or self.roster_dir / "roster-authority.json"

    @property
    def roster_state_path(self) -> Path:
        """The highest roster version this node accepted (``keys.load_pinned_roster``)."""
        return self.data_dir / "roster-state.json"

    @property
    def store_path(self) -> Path:
        """The node's SQLite store."""
        return self.data_dir / "node.sqlite3"

    @property
    def audit_dir(self) -> Path:
        """Where the audit log lives."""
        return self.data_dir / "audit"

    @property
    def socket_path(self) -> Path:
        """The intake unix socket (default ``<data_dir>/intake.sock``)."""
        return self.intake.socket or self.data_dir / "intake.sock"

    @property
    def token_path(self) -> Path:
        """The intake bearer-token file (default ``<data_dir>/intake.token``)."""
        return self.intake.token_file or self.data_dir / "intake.token"

    @property
    def feeds_path(self) -> Path:
        """The named feeds' token hashes (``msmt feeds``): ``<data_dir>/intake-feeds.json``."""
        return self.data_dir / "intake-feeds.json"

    @property
    def spool_path(self) -> Path:
        """The spool directory (default ``<data_dir>/spool``)."""
        return self.intake.spool_dir or self.data_dir / "spool"


def _set(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        sub = tree.setdefault(key, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"config key {key} must be a table")
        tree = sub
    tree[keys[-1]] = value


def _coerce_env(keys: tuple[str, ...], text: str) -> Any:
    # Everything else stays text: pydantic turns "50" into 50 and names the key if it cannot.
    if keys in _LIST_KEYS:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc if not isinstance(part, int)) or "(top level)"


_PATH_KEYS: Final = (
    ("nats", "seed_file"),
    ("nats", "ca_file"),
    ("nats", "cert_file"),
    ("nats", "key_file"),
    ("keys", "dir"),
    ("keys", "roster_dir"),
    ("keys", "authority"),
    ("policy",),
    ("data_dir",),
    ("intake", "socket"),
    ("intake", "token_file"),
    ("intake", "spool_dir"),
)


def parse_config(
    data: Mapping[str, Any], config_dir: Path, env: Mapping[str, str] | None = None
) -> NodeConfig:
    """Validate a parsed config (plus environment overrides) and resolve its paths.

    ``config_dir`` is the directory relative ``base_dir`` is resolved against.
    Raises ``ConfigError`` naming the first bad key.
    """
    tree: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    environ = os.environ if env is None else env
    for name, keys in ENV_OVERRIDES.items():
        if name in environ:
            _set(tree, keys, _coerce_env(keys, environ[name]))
    try:
        config = NodeConfig.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(f"config key {_where(first['loc'])}: {msg}") from None
    base = _resolve(config_dir / config.base_dir, "base_dir")
    resolved = config.model_dump()
    resolved["base_dir"] = base
    for keys in _PATH_KEYS:
        holder = resolved
        for key in keys[:-1]:
            holder = holder[key]
        value = holder[keys[-1]]
        if value is not None:
            holder[keys[-1]] = _resolve(base / value, ".".join(keys))
    config = NodeConfig.model_validate(resolved)
    nats = config.nats
    check_tls_settings(nats.urls, nats.ca_file, nats.cert_file, nats.key_file, CONFIG_NAMES)
    if len(str(config.socket_path).encode()) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"config key intake.socket: {config.socket_path} is longer than a unix socket "
            f"path may be ({MAX_SOCKET_PATH} bytes); set intake.socket to a shorter path"
        )
    return config


def _resolve(path: Path, key: str) -> Path:
    # A symlink loop on the way is a RuntimeError from pathlib, not an OSError.
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "a symbolic link loop"
        raise ConfigError(f"config key {key}: {path} cannot be resolved: {reason}") from None


def load_config(path: Path, env: Mapping[str, str] | None = None) -> NodeConfig:
    """Read, override from the environment, and validate ``node.toml``.

    Raises ``ConfigError`` with one line: an unreadable file, bad TOML (with its
    line), or the first invalid key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: invalid TOML: {exc}") from None
    return parse_config(data, path.parent, env)
