"""The node's configuration: ``node.toml``, overridden by ``MSMT_*`` environment variables.

Relative paths in the file are resolved against ``base_dir``, which is itself
relative to the directory holding the config file (default: that directory).
The shipped ``nodes/<MEMBER>/node.toml`` files set ``base_dir = "../.."`` so
that their paths read as paths from the repository root.

Every environment variable in ``ENV_OVERRIDES`` replaces one key of the file;
an override that does not parse fails exactly like a bad key in the file.
Any invalid value raises ``ConfigError`` with one line naming the key, so a
node refuses to start rather than run half-configured.

Types are strict: TOML has real integers, strings and arrays, so ``"100"``,
``100.0`` or ``true`` where an integer belongs is refused, not converted. Only
paths (TOML strings) and ``nats.urls`` (an array, held as a tuple) are
converted; environment variables, always text, are parsed by the key's type.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
)

from broker.errors import ConfigError
from broker.files import read_file_text, writable_by_all
from broker.members import Member
from broker.natstls import CONFIG_NAMES, check_tls_settings, client_tls_context, url_problem
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
    "MSMT_INTAKE_SHARED_TOKEN": ("intake", "shared_token"),  # true or false
    "MSMT_METRICS_LISTEN": ("metrics", "listen"),
    "MSMT_MAX_RECORD_BYTES": ("limits", "max_record_bytes"),
    "MSMT_PUBLISH_MAX_IN_FLIGHT": ("limits", "publish_max_in_flight"),
    "MSMT_FETCH_BATCH": ("limits", "fetch_batch"),
    "MSMT_FRESHNESS_SECONDS": ("limits", "freshness_seconds"),
    "MSMT_HOLD_SECONDS": ("limits", "hold_seconds"),
    "MSMT_MAX_MESSAGE_BYTES": ("limits", "max_message_bytes"),
    "MSMT_SENDER_BYTES_PER_DAY": ("limits", "sender_bytes_per_day"),
}
"""Environment variable -> the config key it overrides (documented in docs/NODE.md)."""

SENDER_BYTES_PER_DAY: Final = 1 << 30
"""``limits.sender_bytes_per_day``'s default, 1 GiB: thousands of times an honest member's
day of sightings, and a bound on what one partner can add to a node's disk a day (an
insider trial's partner added 1.3 GB in 45 s with valid reports padded to the cap)."""

_LIST_KEYS: Final = frozenset({("nats", "urls")})
MAX_SOCKET_PATH: Final = 107
"""sockaddr_un holds 108 bytes including the terminating NUL (Linux)."""
SQLITE_PATH_MAX: Final = 504
"""The longest database path SQLite opens: its unix VFS's 512 bytes (``MAX_PATHNAME``), less
the 8 of ``-journal``; past it, only "unable to open database file"."""
DATA_DIR_DEEPEST: Final = "audit/audit.sqlite"
"""The node's longest database path below ``data_dir`` (``audit_dir`` / ``auditlog.DB_FILE``)."""


class _Section(BaseModel):
    # Strict: a string where an integer belongs is a mistake to name, not to
    # convert (lax mode took fetch_batch = "100"). ConfigPath is the exception.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _path_text(value: object) -> object:
    # An empty value was the base folder (Path("") is "."): MSMT_DATA_DIR= from an unset
    # variable started a second store and audit log there, a fork of the node (a review).
    if isinstance(value, str) and (not value.strip() or value != value.strip()):
        what = "empty" if not value.strip() else "a path with spaces at its start or end"
        raise ValueError(f"{what} ({value!r}): give the path itself")
    return value


ConfigPath = Annotated[Path, Strict(False), BeforeValidator(_path_text)]
"""A path key: a TOML string (or a ``Path`` once resolved), the one conversion allowed;
never empty text, nor text with spaces at either end."""


class NatsSection(_Section):
    """How to reach the hub: server URLs, the member's nkey seed file, and optional TLS files.

    ``seed_file`` defaults to ``<keys.dir>/<MEMBER>/nats.nk``. ``ca_file`` (a
    private CA bundle instead of the system store) and ``cert_file`` with
    ``key_file`` (a client certificate for a hub that demands one) require
    every URL to be ``tls://``; ``parse_config`` checks that.
    """

    # A TOML array arrives as a list: converted to a tuple, each item still a strict string.
    urls: Annotated[tuple[str, ...], Field(min_length=1, strict=False)]
    seed_file: ConfigPath | None = None
    ca_file: ConfigPath | None = None
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            problem = url_problem(url)
            if problem is not None:
                raise ValueError(problem)
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

    dir: ConfigPath
    roster_dir: ConfigPath | None = None
    authority: ConfigPath | None = None


class IntakeSection(_Section):
    """Local-only intake: the unix socket, its bearer-token file, and the spool directory.

    ``shared_token = false`` refuses the shared ``token_file`` (feed ``socket``):
    only named feeds' tokens (``msmt feeds``) are let in at the socket.
    """

    socket: ConfigPath | None = None
    token_file: ConfigPath | None = None
    spool_dir: ConfigPath | None = None
    shared_token: bool = True


class LimitsSection(_Section):
    """Bounds on input sizes, pipelining and replay retention."""

    max_record_bytes: Annotated[int, Field(ge=256, le=MAX_RECORD_BYTES)] = MAX_RECORD_BYTES
    publish_max_in_flight: Annotated[int, Field(ge=1, le=10_000)] = 256
    fetch_batch: Annotated[int, Field(ge=1, le=1_000)] = 100
    freshness_seconds: Annotated[int, Field(ge=60, le=30 * 86_400)] = 86_400
    hold_seconds: Annotated[int, Field(ge=1, le=3_600)] = 60
    max_message_bytes: Annotated[int, Field(ge=4096, le=8 * 1024 * 1024)] = 1024 * 1024
    # What one partner's messages may add to the store in a UTC day (``SenderBudget``).
    sender_bytes_per_day: Annotated[int, Field(ge=65_536, le=1 << 40)] = SENDER_BYTES_PER_DAY


class MetricsSection(_Section):
    """The loopback HTTP listener for /healthz, /readyz and /metrics."""

    listen: str = "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _loopback(cls, listen: str) -> str:
        host, sep, port = listen.rpartition(":")
        if not sep or not (port.isascii() and port.isdecimal()) or not 0 < int(port) < 65536:
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
    base_dir: ConfigPath = Path()
    nats: NatsSection
    keys: KeysSection
    policy: ConfigPath
    data_dir: ConfigPath
    intake: IntakeSection = IntakeSection()
    limits: LimitsSection = LimitsSection()
    metrics: MetricsSection = MetricsSection()

    def read_policy(self) -> tuple[Policy, str]:
        """Load and check the member's policy file; return it and its text.

        Raises ``ConfigError`` if the file cannot be read as UTF-8 and
        ``PolicyError`` (naming the line) if it does not check.
        """
        open_to_all = writable_by_all(self.policy)
        if open_to_all is not None:
            raise ConfigError(
                f"policy {self.policy}: {open_to_all}: anyone could change what this node"
                " releases; chmod o-w it"
            )
        try:
            text = read_file_text(self.policy)
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
        """The highest roster version this node accepted (``keys_roster.load_pinned_roster``)."""
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


def _key_type(keys: tuple[str, ...]) -> Any:
    """The annotation of the config key ``keys`` (``int`` for ``limits.fetch_batch``)."""
    model: type[BaseModel] = NodeConfig
    for key in keys[:-1]:  # the sections on the way (ENV_OVERRIDES names only those)
        model = cast("type[BaseModel]", model.model_fields[key].annotation)
    return model.model_fields[keys[-1]].annotation


def _coerce_env(name: str, keys: tuple[str, ...], text: str) -> Any:
    # An environment variable is always text: parsed here by the key's type, as
    # TOML would have typed it, since the model itself converts nothing but paths.
    if keys in _LIST_KEYS:
        return [part.strip() for part in text.split(",") if part.strip()]
    if _key_type(keys) is int:
        if re.fullmatch(r"-?[0-9]+", text.strip()) is None:
            raise ConfigError(f"config key {'.'.join(keys)}: {name}={text!r} is not an integer")
        try:
            return int(text)
        except ValueError:  # over 4300 digits, which int() refuses; no limit is near that
            digits = len(text.strip().lstrip("-"))
            raise ConfigError(
                f"config key {'.'.join(keys)}: {name} is an integer of {digits} digits"
            ) from None
    if _key_type(keys) is bool:
        if text.strip() not in ("true", "false"):
            raise ConfigError(f"config key {'.'.join(keys)}: {name}={text!r} is not true or false")
        return text.strip() == "true"
    return text


_EXPECTED: Final = {
    "int_type": "an integer",
    "string_type": "a string",
    "path_type": "a path (a string)",
    "tuple_type": "an array",
    "model_type": "a table",
    "bool_type": "true or false",
}
"""Pydantic's type errors, by the TOML type the key wants."""


_TOML_TYPES: Final = (
    (bool, "a boolean"),  # before int: a bool is an int in Python
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
    (datetime.datetime, "a date-time"),  # before date, its base class
    (datetime.date, "a date"),
    (datetime.time, "a time"),
)


def _toml_type(value: object) -> str:
    """What the file (or an override) gave, in TOML's words."""
    return next((words for kind, words in _TOML_TYPES if isinstance(value, kind)), "a value")


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
    overridden: dict[str, str] = {}
    for name, keys in ENV_OVERRIDES.items():
        if name in environ:
            _set(tree, keys, _coerce_env(name, keys, environ[name]))
            overridden[".".join(keys)] = name
    try:
        config = NodeConfig.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] in _EXPECTED:
            msg = f"must be {_EXPECTED[first['type']]}, not {_toml_type(first['input'])}"
        where = _where(first["loc"])
        # A value from the environment (a unit's Environment= line) is not in the
        # file the line points at: say where it came from.
        source = f" (set by {overridden[where]})" if where in overridden else ""
        raise ConfigError(f"config key {where}: {msg}{source}") from None
    base = _resolve(config_dir / config.base_dir, "base_dir")
    resolved = config.model_dump()
    resolved["base_dir"] = base
    _check_length(base, "base_dir", overridden)
    for keys in _PATH_KEYS:
        holder = resolved
        for key in keys[:-1]:
            holder = holder[key]
        value = holder[keys[-1]]
        if value is not None:
            name = ".".join(keys)
            holder[keys[-1]] = _resolve(base / value, name)
            _check_length(holder[keys[-1]], name, overridden)
    config = NodeConfig.model_validate(resolved)
    limits = config.limits
    if limits.sender_bytes_per_day < limits.max_message_bytes:
        # A message larger than the day's whole budget would be refused every day.
        key = "limits.sender_bytes_per_day"
        source = f" (set by {overridden[key]})" if key in overridden else ""
        raise ConfigError(
            f"config key {key}: {limits.sender_bytes_per_day} is less than"
            f" limits.max_message_bytes ({limits.max_message_bytes}): a partner's message"
            f" that large could never be received; give at least that{source}"
        )
    nats = config.nats
    check_tls_settings(nats.urls, nats.ca_file, nats.cert_file, nats.key_file, CONFIG_NAMES)
    if len(os.fsencode(config.socket_path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"config key intake.socket: {config.socket_path} is longer than a unix socket "
            f"path may be ({MAX_SOCKET_PATH} bytes); set intake.socket to a shorter path"
        )
    _check_spool_apart(config, config_dir, overridden)
    return config


def _check_spool_apart(config: NodeConfig, config_dir: Path, overridden: Mapping[str, str]) -> None:
    """Refuse a spool folder that holds the node's own files: it would file them as batches.

    A review set ``intake.spool_dir`` to the data directory and the node moved its token,
    roster state and witness state into ``rejected/``; to the node's folder, its
    ``node.toml`` and policy; empty (the base folder), the repository's files.
    """
    spool = config.spool_path.resolve()
    own = {
        "base_dir": config.base_dir,
        "the folder of this node.toml": config_dir,
        "data_dir": config.data_dir,
        "the audit log's folder": config.audit_dir,
        "keys.dir": config.keys.dir,
        "the member's key folder": config.keys.dir / config.member,
        "keys.roster_dir": config.roster_dir,
        "the policy's folder": config.policy.parent,
        "the folder of nats.seed_file": config.seed_path.parent,
        "the folder of keys.authority": config.authority_path.parent,
        "the folder of intake.token_file": config.token_path.parent,
        "the folder of intake.socket": config.socket_path.parent,
    }
    own |= {
        f"the folder of nats.{name}": path.parent
        for name, path in (
            ("ca_file", config.nats.ca_file),
            ("cert_file", config.nats.cert_file),
            ("key_file", config.nats.key_file),
        )
        if path is not None
    }
    for what, folder in own.items():
        if spool == folder.resolve():
            source = (
                f" (set by {overridden['intake.spool_dir']})"
                if "intake.spool_dir" in overridden
                else ""
            )
            raise ConfigError(
                f"config key intake.spool_dir: {spool} is {what}: the spool files every"
                f" file in it as a feed's batch, this node's own among them; give a folder"
                f" of its own (the default is <data_dir>/spool){source}"
            )


def _resolve(path: Path, key: str) -> Path:
    # A symlink loop on the way is a RuntimeError from pathlib, not an OSError.
    if "\0" in str(path):
        # No system call takes it (ValueError: embedded null byte, a traceback once).
        raise ConfigError(f"config key {key}: the path holds a NUL character (\\u0000)")
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "a symbolic link loop"
        raise ConfigError(f"config key {key}: {path} cannot be resolved: {reason}") from None


def _path_limit(folder: str, name: str, usual: int) -> int:
    """``os.pathconf(folder, name)``, or ``usual`` where the system gives no limit.

    -1 means none is known, and a FUSE file system may say 0: every path would be
    "too long" then (a review, from the code).
    """
    try:
        limit = os.pathconf(folder, name)
    except (OSError, ValueError):
        return usual
    return limit if limit > 0 else usual


def _check_length(path: Path, key: str, overridden: Mapping[str, str]) -> None:
    """Refuse a path the system would refuse as too long (ENAMETOOLONG), or SQLite below it.

    A name longer than the file system takes, or a whole path past its limit, was a
    traceback from the first file a command looked for (``msmt node run``, ``node
    check``; a review gave ``MSMT_DATA_DIR`` a name of 300 bytes); a ``data_dir``
    whose audit log's path passes SQLite's limit, "unable to open database file"
    after its folders were made.
    """
    # The limits of the file system the path is on, so far as it exists yet.
    there = next((str(p) for p in path.parents if os.path.isdir(p)), "/")
    name_max, path_max = (
        _path_limit(there, "PC_NAME_MAX", 255),
        _path_limit(there, "PC_PATH_MAX", 4096),
    )
    source = f" (set by {overridden[key]})" if key in overridden else ""
    longest = max(len(os.fsencode(part)) for part in path.parts)
    if longest > name_max:
        raise ConfigError(
            f"config key {key}: {path}: a name in it is {longest} bytes, more than a file"
            f" name may be there ({name_max}); give a shorter path{source}"
        )
    size = len(os.fsencode(path))
    if size >= path_max:
        raise ConfigError(
            f"config key {key}: {path} is {size} bytes, longer than a path may be"
            f" ({path_max - 1} bytes); give a shorter path{source}"
        )
    deepest = path / DATA_DIR_DEEPEST
    if key == "data_dir" and len(os.fsencode(deepest)) > SQLITE_PATH_MAX:
        raise ConfigError(
            f"config key {key}: {path} is {size} bytes, too long for the audit log in it:"
            f" SQLite opens a database path of at most {SQLITE_PATH_MAX} bytes, and the"
            f" audit log's ({DATA_DIR_DEEPEST} in it) would be {len(os.fsencode(deepest))};"
            f" give a shorter path{source}"
        )


def load_config(path: Path, env: Mapping[str, str] | None = None) -> NodeConfig:
    """Read, override from the environment, and validate ``node.toml``.

    Raises ``ConfigError`` with one line: an unreadable file, bad TOML (with its
    line), or the first invalid key.
    """
    open_to_all = writable_by_all(path)
    if open_to_all is not None:
        raise ConfigError(
            f"config {path}: {open_to_all}: anyone could change this node's settings; chmod o-w it"
        )
    try:
        text = read_file_text(path)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: invalid TOML: {exc}") from None
    except RecursionError:  # arrays or inline tables nested deeper than tomllib's stack
        raise ConfigError(f"config {path}: invalid TOML: nested too deeply") from None
    except ValueError:  # tomllib leaves int()'s refusal of over 4300 digits unwrapped
        raise ConfigError(f"config {path}: invalid TOML: an integer of over 4300 digits") from None
    if "rules" in data and "nats" not in data:
        # Rather than "config key nats: Field required" (a new user's trial).
        raise ConfigError(f"config {path} is a policy file, not a node.toml (docs/NODE.md)")
    try:
        return parse_config(data, path.parent, env)
    except ConfigError as exc:
        if data:
            raise
        # "config key member: Field required" named no file. (An empty file is fine
        # where the environment sets all a node needs.)
        raise ConfigError(
            f"config {path} is empty, and the environment does not set all a node needs:"
            f" {exc} (docs/NODE.md)"
        ) from None
