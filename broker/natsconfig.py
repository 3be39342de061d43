"""The hub's nats-server configuration: one account per member, plus ``AUDIT`` and ``SYS``.

Reports travel as a cross-account *service* (see docs/KEYS.md for why not a stream):

* Recipient ``R`` exports the service ``from.*.msmt.to.R.>`` with
  ``account_token_position: 2``, so account ``S`` may import only the slot
  ``from.S.msmt.to.R.>`` that carries its own account name.
* Sender ``S`` imports that slot as its local ``msmt.to.R.>``. ``S`` publishes
  ``msmt.to.R.<kind>``; the server rewrites it to ``from.S.msmt.to.R.<kind>`` in
  ``R``'s account, where ``R``'s inbox stream stores it. The sender token is the
  server's word, not the message's, and JetStream's publish ack flows back to ``S``
  through the service import's response path.

Audit: each member exports ``msmt.audit.M.checkpoint`` / ``.cosignature`` as streams
to every other member and ``AUDIT`` (which archives them, one stream per member, so
no member can fill the archive of another), and ``msmt.audit.M.proof`` as a
request/reply service so a witness can ask for a consistency proof.

Storage: every account has a JetStream quota (``account_quotas``): file storage only,
a bounded number of streams and consumers, and every stream must declare its
``max_bytes``. A member's user may create and update its own inbox (``msmt nats
setup`` runs as that user), so the quota, not the stream settings, is what bounds
what an account can store. nats-server refuses to start if the quotas together
exceed its JetStream store, so no account can fill the hub's disk for the others.

The configuration is built as plain data and rendered as JSON, which nats-server's
configuration syntax accepts as is, so what the server reads is what a reader sees.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from broker.errors import KeyMaterialError, UsageError
from broker.keys import AUDIT_ACCOUNT, NATS_USERS_FILE
from broker.keys_users import SignedUsers
from broker.members import MEMBERS, is_member

SYS_ACCOUNT: Final = "SYS"
AUDIT_STREAM: Final = "AUDIT_ARCHIVE"
"""The archive shared by all members up to 0.x; ``archive_stream`` names today's."""
AUDIT_KINDS: Final = ("checkpoint", "cosignature")

MiB: Final = 1024**2
INBOX_MAX_BYTES: Final = 128 * MiB
"""Default ``max_bytes`` of a member's inbox stream (``msmt nats setup --max-bytes``)."""
MIN_MAX_BYTES: Final = MiB
"""The smallest ``max_bytes`` ``msmt nats setup --max-bytes`` gives a stream."""
MIN_INBOX_AGE_DAYS: Final = 0.01
"""The shortest ``max_age`` ``msmt nats setup --max-age-days`` gives an inbox (14.4 minutes)."""
ARCHIVE_MAX_BYTES: Final = 32 * MiB
"""Default ``max_bytes`` of each member's archive stream in ``AUDIT``."""
QUOTA_HEADROOM: Final = 2
"""An account's quota is this many times what its default streams need: room to
enlarge them with ``msmt nats setup --max-bytes`` (and to keep the shared archive
of older versions), and no more."""
QUOTA_REPLICAS: Final = 3
"""Replicas the quota allows for by default: JetStream counts every replica of a
stream against its account, so an R3 inbox needs three times its ``max_bytes``."""


@dataclass(frozen=True, slots=True)
class AccountQuota:
    """One account's JetStream limits, as nats-server's account ``jetstream`` block."""

    max_file: int
    max_streams: int
    max_consumers: int

    def block(self) -> dict[str, Any]:
        """The ``jetstream`` block: no memory storage, every stream declares ``max_bytes``."""
        return {
            "max_mem": 0,
            "max_file": self.max_file,
            "max_streams": self.max_streams,
            "max_consumers": self.max_consumers,
            "max_bytes_required": True,
        }


def account_quotas(
    *,
    replicas: int = QUOTA_REPLICAS,
    inbox_bytes: int = INBOX_MAX_BYTES,
    archive_bytes: int = ARCHIVE_MAX_BYTES,
) -> tuple[AccountQuota, AccountQuota]:
    """Return the quotas of a member account and of ``AUDIT``, for streams of ``replicas``.

    A member needs one inbox stream and one consumer (a few more consumers are
    allowed for an operator's look); ``AUDIT`` one archive stream per possible
    member plus the retired shared archive (``AUDIT_STREAM``) that older
    versions made.
    """
    if replicas < 1:
        raise UsageError("replicas must be at least 1")
    member = AccountQuota(
        max_file=QUOTA_HEADROOM * inbox_bytes * replicas, max_streams=1, max_consumers=4
    )
    audit = AccountQuota(
        max_file=QUOTA_HEADROOM * len(MEMBERS) * archive_bytes * replicas,
        max_streams=len(MEMBERS) + 1,
        max_consumers=16,
    )
    return member, audit


def store_bytes(replicas: int) -> int:
    """A hub server's JetStream store (``max_file_store``): every account's quota, summed.

    Each of the eleven members (those yet to join too) and ``AUDIT``: about 3.4 GiB
    for one replica, 10.3 GiB for three (docs/DEPLOY.md, "Quotas").
    """
    member, audit = account_quotas(replicas=replicas)
    return len(MEMBERS) * member.max_file + audit.max_file


def archive_stream(member: str) -> str:
    """The name of ``member``'s archive stream in ``AUDIT``: its checkpoints and cosignatures."""
    return f"{AUDIT_STREAM}_{member}"


def archive_subjects(member: str) -> list[str]:
    """The subjects ``member``'s archive stream captures: only ``member`` may publish them."""
    return [f"msmt.audit.{member}.{kind}" for kind in AUDIT_KINDS]


def inbox_stream(member: str) -> str:
    """The name of ``member``'s inbox stream (in its own account)."""
    return f"INBOX_{member}"


def inbox_durable(member: str) -> str:
    """The name of the durable pull consumer ``member``'s node reads its inbox with."""
    return f"{member}_NODE"


def inbox_subjects(member: str) -> list[str]:
    """The subjects ``member``'s inbox stream captures: server-attested ``from.<S>`` reports."""
    return [f"from.*.msmt.to.{member}.>"]


def inbox_prefix(account: str) -> str:
    """The reply-inbox prefix the account's user must pass to ``nats.connect(inbox_prefix=)``."""
    return f"_INBOX_{account}"


def _js_api(stream: str, durable: str | None) -> list[str]:
    """JetStream API subjects for one stream (and one consumer) of the user's own account."""
    subjects = [
        "$JS.API.INFO",
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.UPDATE.{stream}",
        f"$JS.API.STREAM.INFO.{stream}",
    ]
    consumer = durable or "*"
    subjects += [
        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
        f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]
    return subjects


def member_account(
    member: str, nkey: str, members: tuple[str, ...], quota: AccountQuota | None = None
) -> dict[str, Any]:
    """Return the account block of ``member``: its quota, user, exports and imports."""
    partners = [p for p in members if p != member]
    audience = [*partners, AUDIT_ACCOUNT]
    publish = [f"msmt.to.{p}.>" for p in partners]
    publish += [f"msmt.audit.{member}.{kind}" for kind in AUDIT_KINDS]
    publish += [f"msmt.audit.{p}.proof" for p in partners]
    publish += _js_api(inbox_stream(member), inbox_durable(member))
    subscribe = [f"{inbox_prefix(member)}.>", f"msmt.audit.{member}.proof"]
    subscribe += [f"msmt.audit.*.{kind}" for kind in AUDIT_KINDS]
    exports: list[dict[str, Any]] = [
        {
            "service": f"from.*.msmt.to.{member}.>",
            "account_token_position": 2,
            "accounts": partners,
        },
        {"service": f"msmt.audit.{member}.proof", "accounts": audience},
    ]
    exports += [
        {"stream": f"msmt.audit.{member}.{kind}", "accounts": audience} for kind in AUDIT_KINDS
    ]
    imports: list[dict[str, Any]] = []
    for partner in partners:
        imports.append(
            {
                "service": {"account": partner, "subject": f"from.{member}.msmt.to.{partner}.>"},
                "to": f"msmt.to.{partner}.>",
            }
        )
        imports.append({"service": {"account": partner, "subject": f"msmt.audit.{partner}.proof"}})
        imports += [
            {"stream": {"account": partner, "subject": f"msmt.audit.{partner}.{kind}"}}
            for kind in AUDIT_KINDS
        ]
    return {
        # The user may update its own inbox (setup runs as that user): these limits,
        # not the stream's settings, bound what the account can store.
        "jetstream": (quota or account_quotas()[0]).block(),
        "users": [
            {
                "nkey": nkey,
                "permissions": {
                    "publish": {"allow": publish},
                    "subscribe": {"allow": subscribe},
                    # Lets the node answer proof requests on their one-shot reply subject.
                    "allow_responses": {"max": 1, "expires": "1m"},
                },
            }
        ],
        "exports": exports,
        "imports": imports,
    }


def audit_account(
    nkey: str, members: tuple[str, ...], quota: AccountQuota | None = None
) -> dict[str, Any]:
    """Return the ``AUDIT`` account: imports every member's audit subjects and archives them.

    Its user manages one archive stream per member (``archive_stream``), for
    every member there may be, and the shared archive older versions made.
    """
    publish = [f"msmt.audit.{m}.proof" for m in members]
    for stream in (AUDIT_STREAM, *(archive_stream(m) for m in MEMBERS)):
        publish += _js_api(stream, None)
        publish.append(f"$JS.API.STREAM.MSG.GET.{stream}")
    imports: list[dict[str, Any]] = []
    for member in members:
        imports.append({"service": {"account": member, "subject": f"msmt.audit.{member}.proof"}})
        imports += [
            {"stream": {"account": member, "subject": f"msmt.audit.{member}.{kind}"}}
            for kind in AUDIT_KINDS
        ]
    return {
        "jetstream": (quota or account_quotas()[1]).block(),
        "users": [
            {
                "nkey": nkey,
                "permissions": {
                    "publish": {"allow": publish},
                    "subscribe": {"allow": [f"{inbox_prefix(AUDIT_ACCOUNT)}.>", "msmt.audit.>"]},
                },
            }
        ],
        "imports": imports,
    }


def accounts_config(
    users: Mapping[str, str],
    *,
    replicas: int = QUOTA_REPLICAS,
    inbox_bytes: int = INBOX_MAX_BYTES,
    archive_bytes: int = ARCHIVE_MAX_BYTES,
) -> str:
    """Render the ``accounts`` and ``system_account`` blocks for ``users`` (account -> nkey).

    Each account's storage quota allows for streams of ``replicas`` and the given
    sizes (``account_quotas``).
    ``users`` must hold ``AUDIT`` and at least two members; raises ``KeyMaterialError``
    otherwise or if a key is not a user public nkey.
    """
    for account, nkey in users.items():
        if not (is_member(account) or account == AUDIT_ACCOUNT):
            raise KeyMaterialError(f"{NATS_USERS_FILE}: unknown account {account!r}")
        if not (isinstance(nkey, str) and nkey.startswith("U") and len(nkey) == 56):
            raise KeyMaterialError(f"{NATS_USERS_FILE}: {account} has no user public nkey")
    members = tuple(m for m in MEMBERS if m in users)
    if AUDIT_ACCOUNT not in users or len(members) < 2:
        raise KeyMaterialError(f"{NATS_USERS_FILE}: needs AUDIT and at least two members")
    member_quota, audit_quota = account_quotas(
        replicas=replicas, inbox_bytes=inbox_bytes, archive_bytes=archive_bytes
    )
    accounts: dict[str, Any] = {
        m: member_account(m, users[m], members, member_quota) for m in members
    }
    accounts[AUDIT_ACCOUNT] = audit_account(users[AUDIT_ACCOUNT], members, audit_quota)
    # SYS has no users: the hub operator watches it through the monitoring port.
    accounts[SYS_ACCOUNT] = {}
    return (
        f"accounts: {json.dumps(accounts, indent=2)}\nsystem_account: {json.dumps(SYS_ACCOUNT)}\n"
    )


_HOST: Final = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")


def host_port(text: str, what: str) -> str:
    """Return ``text`` if it is ``HOST:PORT`` (name, IPv4 or [IPv6]); else raise ``UsageError``."""
    host, sep, port = text.rpartition(":")
    digits = port.isascii() and port.isdecimal()  # int() takes other scripts' digits
    if not (sep and _HOST.fullmatch(host) and digits and 0 < int(port) < 65536):
        raise UsageError(f"{what} {text!r} is not HOST:PORT (e.g. 127.0.0.1:4222)")
    return text


_CONF_TOKEN: Final = re.compile(
    r"""\"(?:[^\"\\\n]|\\.)*\"|'[^'\n]*'|(?:\#|//)[^\n]*|[{}\[\];,:=]|[^\s{}\[\];,:=\"'\#]+"""
)
"""nats-server's configuration as tokens: strings, comments, punctuation, bare words."""


_PUNCTUATION: Final = frozenset("[];,:=")


def tls_places(text: str) -> Counter[str]:
    """Where a nats-server configuration sets TLS: each ``tls`` key and ``include``, in context.

    Keyed by the blocks around it (``cluster: tls``, ``tls: include "x"``), keys read as
    nats-server reads them: any case, quoted or not, after a newline, ``;``, ``,`` or
    ``}`` alike. A line-by-line look missed some (a review, a trial: ``TLS {``,
    ``"tls": {``, ``...;tls {``) and took one block's line for another's.
    """
    places: Counter[str] = Counter()
    tokens = [t for t in _CONF_TOKEN.findall(text) if not t.startswith(("#", "//"))]
    stack: list[str] = []
    key = ""
    for i, item in enumerate(tokens):
        if item == "{":
            stack.append(key)
            key = ""
        elif item == "}":
            if stack:
                stack.pop()
            key = ""
        elif item not in _PUNCTUATION:
            word = item.strip("\"'").lower()
            where = "/".join(stack)
            if word == "include" and i + 1 < len(tokens):
                places[f"{where}: include {tokens[i + 1]}"] += 1
            elif word == "tls":
                places[f"{where}: tls"] += 1
            key = word
    return places


def _conf_string(value: str, option: str) -> str:
    """``value`` as a quoted string nats-server reads back as it is.

    Its strings take a backslash before a quote or a backslash, but no "u" escape:
    json.dumps's for an accent made a hub.conf it refused (a review: a non-ASCII
    ``--store-dir``).
    """
    if not value.isprintable():
        raise UsageError(f"{option} {value!r}: control characters nats-server cannot read")
    return json.dumps(value, ensure_ascii=False)


def _tls_block(include: str | None, indent: str) -> list[str]:
    # nats-server reads an include relative to the configuration file's directory, and
    # its quoted strings have no escapes: json.dumps's would name another file (a review
    # found "tlsé.conf", 'tl"s.conf' and 'tl\s.conf' each gave a hub.conf it refused).
    if include is None:
        return []
    if not include or any(ch in include for ch in '"\\') or not include.isprintable():
        raise UsageError(
            f"--tls-include/--route-tls-include {include!r}: a path without quotes,"
            " backslashes or control characters, which nats-server's include cannot take"
        )
    return [f"{indent}tls {{", f'{indent}  include "{include}"', f"{indent}}}"]


MADE_FROM: Final = "# made by msmt nats config from"
_MADE_FROM_LINE: Final = (
    MADE_FROM + " nats-users.json version {version}, signed by {signer} (RFC 7638 thumbprint"
    " {thumbprint})"
)
_MADE_FROM_RE: Final = re.compile(
    re.escape(MADE_FROM)
    + r" nats-users\.json version ([1-9][0-9]{0,15}), signed by (\S+) \(RFC 7638 thumbprint"
    r" ([A-Za-z0-9_-]{43})\)"
)


def made_from(text: str) -> tuple[int, str] | None:
    """The users' version and signer's thumbprint a configuration says it was made from.

    ``None`` if no line says so (written by hand, or by an msmt before signing). Raises
    ``ValueError`` for such a line that does not parse, or two: an edit that would
    otherwise turn the rollback guard off unseen (a review).
    """
    # Any line that names it, wherever it is: a BOM, a blank or a comment line put above
    # it turned the guard off unseen (a review).
    marked = [
        line.strip().lstrip("\ufeff")
        for line in text.splitlines()
        if "made by msmt nats config" in " ".join(line.split())
    ]
    if not marked:
        return None
    found = _MADE_FROM_RE.fullmatch(marked[0]) if len(marked) == 1 else None
    if found is None:
        raise ValueError(
            f"its line saying what it was made from is not one msmt nats config writes"
            f" ({len(marked)} such line{'s' if len(marked) > 1 else ''}): {marked[0][:120]!r}"
        )
    return int(found[1]), found[3]


def server_config(
    signed: SignedUsers,
    *,
    cluster: int = 0,
    route_host: str = "nats-{i}",
    store_dir: str = "/data/jetstream",
    listen: str = "0.0.0.0:4222",
    http: str = "127.0.0.1:8222",
    tls_include: str | None = None,
    route_tls_include: str | None = None,
) -> str:
    """Return a complete nats-server configuration for the hub, from the verified users.

    Its first line names the users' version and signer (``made_from``), so that the
    next run can refuse an older file put in its place.

    ``tls_include`` and ``route_tls_include`` name files holding the settings of the
    clients' and the routes' ``tls`` blocks (``cert_file``, ...), included rather than
    written here, so that generating the file again keeps TLS on.

    With ``cluster`` > 1 it adds a cluster block whose routes are ``route_host``
    formatted with ``i`` = 1..cluster on port 6222; each server's name comes from
    the ``SERVER_NAME`` environment variable so one file serves every server.
    The account quotas allow for one replica per stream on a single server and
    three in a cluster (``--replicas 3``). ``listen`` is where clients connect,
    ``http`` the monitoring endpoint (``/healthz``, ``/jsz``): loopback by default,
    since it shows every connection and account.
    """
    if cluster < 0 or cluster == 1:
        raise UsageError("--cluster must be 0 (single server) or at least 2")
    if route_tls_include is not None and not cluster:
        raise UsageError("--route-tls-include: only a cluster (--cluster) has routes")
    replicas = min(cluster, QUOTA_REPLICAS) if cluster else 1
    lines = [
        _MADE_FROM_LINE.format(
            version=signed.version, signer=signed.signer, thumbprint=signed.thumbprint
        ),
        f"listen: {_conf_string(host_port(listen, '--listen'), '--listen')}",
        f"http: {_conf_string(host_port(http, '--http'), '--http')}",
        "jetstream {",
        f"  store_dir: {_conf_string(store_dir, '--store-dir')}",
        # A node marks an envelope sent, for good, on the hub's ack; nats-server's
        # default fsyncs only every two minutes, so an OS crash or power cut would
        # lose acked reports. "always" fsyncs each write before the ack.
        "  sync_interval: always",
        # Without it the store's limit is 75% of the disk space free at each start:
        # a hub restarted after its disk filled got 141 MB beside 516 MB it held,
        # and refused every publish (a disk-full trial). Room for every quota.
        f"  max_file_store: {store_bytes(replicas)}",
        "}",
        # Reports are small; a bound on payload size protects every inbox.
        "max_payload: 1MB",
        *_tls_block(tls_include, ""),
    ]
    if cluster:
        routes = [
            _conf_string(f"nats://{route_host.format(i=i)}:6222", "--route-host")
            for i in range(1, cluster + 1)
        ]
        lines = [
            lines[0],
            "server_name: $SERVER_NAME",
            *lines[1:],
            "cluster {",
            '  name: "msmt"',
            "  listen: 0.0.0.0:6222",
            f"  routes: [{', '.join(routes)}]",
            *_tls_block(route_tls_include, "  "),
            "}",
        ]
    return "\n".join(lines) + "\n" + accounts_config(signed.users, replicas=replicas)
