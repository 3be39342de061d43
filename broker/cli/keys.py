"""Commands for key material (``msmt keys ...``) and the NATS hub (``msmt nats ...``)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import click

from broker import (
    keyrequest,
    keys_custodian,
    keys_roster,
    keys_users,
    log,
    natsconfig,
    natstls,
    natsusers,
    pseudonym_keys,
)
from broker import keys as keyfiles
from broker.cli.options import Finite, echo_line, stdin_buffer
from broker.errors import KeyMaterialError, UsageError, WriteError
from broker.files import read_file_bytes
from broker.members import MEMBERS, parse_members
from broker.roster import format_time
from broker.store_file import flock_holder

_KEYDIR = click.option(
    "--dir",
    "keydir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("keys"),
    show_default=True,
    help="The key directory.",
)
_AUTHORITY = click.option(
    "--authority",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The pinned roster-authority public key (default: the one in the key directory).",
)
_VALID_DAYS = click.option(
    "--valid-days",
    type=click.IntRange(1, 3650),
    default=keyfiles.DEFAULT_VALID_DAYS,
    show_default=True,
    help="How long new keys stay valid.",
)


_Command = TypeVar("_Command", bound=Callable[..., None])


@contextlib.contextmanager
def _locked(keydir: Path) -> Iterator[None]:
    # The directory itself is locked: a lock file would be a write into whatever
    # --dir names, even a directory the command then refuses (a node's data_dir).
    try:
        fd = os.open(keydir, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        yield  # nothing there to race on yet: the command makes it, or says what is missing
        return
    except OSError as exc:
        raise WriteError(f"cannot lock {keydir}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WriteError(
                f"another msmt keys command is running on {keydir}{_holder(keydir)}:"
                " nothing was changed; run this one again once it has finished"
            ) from None
        except OSError as exc:  # a file system without flock: not run unguarded
            raise WriteError(f"cannot lock {keydir}: {exc.strerror}") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def _holder(keydir: Path) -> str:
    try:
        pid = flock_holder(keydir)
    except OSError:  # no /proc/locks
        return ""
    return f" (pid {pid})" if pid else ""


def _writes_keys(command: _Command) -> _Command:
    """Run the command holding an exclusive ``flock`` on its ``--dir``; not waited for.

    Two at once (a rotate and an accept, say) would each write the roster they
    read, the later undoing the earlier, and one would take the other's roster
    staged mid-write for one cut short (``_finish_roster_write``) and finish or
    undo it. The second is refused with one line, ``WriteError`` (exit 1),
    having changed nothing: the custodian should know what else is running.
    """

    @functools.wraps(command)
    def locked(*args: Any, **kwargs: Any) -> None:
        with _locked(kwargs["keydir"]):
            command(*args, **kwargs)

    return cast(_Command, locked)


def _finish_roster_write(keydir: Path) -> None:
    # Before a command that writes the roster: one cut short by a crash is
    # finished or undone first, and the operator is told which.
    done = keys_custodian.finish_roster_write(keydir)
    if done is not None:
        echo_line(f"msmt: {done}", err=True)


@click.group(name="keys")
def keys_group() -> None:
    """Member keys, NATS users and the signed public roster."""


@keys_group.command(name="init")
@_KEYDIR
@click.option(
    "--members",
    default=",".join(MEMBERS),
    show_default=True,
    help="Comma-separated members to make keys for.",
)
@click.option("--force", is_flag=True, help="Replace existing keys (all old keys are lost).")
@_VALID_DAYS
@_writes_keys
def keys_init(keydir: Path, members: str, force: bool, valid_days: int) -> None:
    """Create each member's signing, encryption and NATS keys, and a signed roster."""
    try:
        chosen = parse_members(members)
    except ValueError as exc:
        raise UsageError(f"--members: {exc}") from None
    signed = keys_custodian.init_keys(keydir, chosen, force=force, valid_days=valid_days)
    echo_line(f"wrote keys for {', '.join(chosen)} and AUDIT under {keydir}")
    click.echo(f"roster version {signed.version}: {len(signed.roster)} public keys")
    authority = keyfiles.load_authority(keydir / keyfiles.AUTHORITY_PUBLIC_FILE)
    echo_line(
        f"pin {keydir / keyfiles.AUTHORITY_PUBLIC_FILE} in every node; keep "
        f"{keydir / keyfiles.AUTHORITY_PRIVATE_FILE} offline"
    )
    click.echo(f"authority thumbprint (RFC 7638): {authority.thumbprint()}")


@keys_group.command(name="rotate")
@click.argument("member")
@_KEYDIR
@_VALID_DAYS
@_writes_keys
def keys_rotate(member: str, keydir: Path, valid_days: int) -> None:
    """Give MEMBER new active keys; its old ones retire (they still verify older reports)."""
    _finish_roster_write(keydir)
    sig, enc = keys_custodian.rotate_keys(keydir, member.upper(), valid_days=valid_days)
    version = keys_roster.load_signed_roster(keydir).version
    click.echo(f"{member.upper()}: new keys {sig} and {enc}; roster version {version}")


@keys_group.command(name="revoke")
@click.argument("kid")
@click.option("--reason", required=True, help="Why (one line; recorded in the roster).")
@_KEYDIR
@_writes_keys
def keys_revoke(kid: str, reason: str, keydir: Path) -> None:
    """Mark KID revoked: nothing signed with it verifies again."""
    _finish_roster_write(keydir)
    keys_custodian.revoke_key(keydir, kid, reason)
    signed = keys_roster.load_signed_roster(keydir)
    revoked = signed.roster.get(kid)
    # When: what auditors compare sends with (msmt audit replay's to-revoked-key).
    at = "" if revoked.revoked_at is None else f" at {format_time(revoked.revoked_at)}"
    click.echo(f"revoked {kid}{at}; roster version {signed.version}")
    owner = revoked.member
    # A member without an active key of this use cannot start its node (no signing
    # key) or be sent anything (no encryption key) until it is rotated.
    if not any(
        k.member == owner and k.use == revoked.use and k.status == "active" for k in signed.roster
    ):
        click.echo(
            f"warning: {owner} has no active {revoked.use} key left: run 'msmt keys rotate "
            f"{owner}' if you hold its keys (as in the demo); otherwise {owner} makes a key "
            f"request ('msmt keys request {owner}', with --new-nats-user if its NATS seed may "
            "be disclosed too) and you accept it with --fingerprint after a phone call"
        )
    # A key request signed by the current key is accepted with no call: whoever
    # stole the key may already have rotated the member to keys of its own, which
    # revoking the stolen one leaves in force (a compromise drill's thief did).
    later = [
        k
        for k in signed.roster
        if k.member == owner and k.status != "revoked" and k.valid_from > revoked.valid_from
    ]
    if later:
        names = ", ".join(f"{k.kid} (since {format_time(k.valid_from)})" for k in later)
        click.echo(
            f"warning: {owner}'s keys made after {kid} stay in force: {names}. A key request "
            f"signed by {kid} needed no call; if {owner} did not make them itself, revoke "
            "them too (docs/KEYS.md, 'After a compromise')"
        )


@keys_group.command(name="suspend")
@click.argument("member")
@_KEYDIR
@_writes_keys
def keys_suspend(member: str, keydir: Path) -> None:
    """Cut MEMBER off: its NATS user goes, its active keys retire as of now, none are made.

    What its keys signed before still verifies; nothing new goes to it or is taken
    from it. It comes back with a key request (accepted with --fingerprint).
    """
    _finish_roster_write(keydir)
    member = member.upper()
    retired, users_version = keys_custodian.suspend_member(keydir, member)
    if users_version is not None:
        users = f"{keydir / keyfiles.NATS_USERS_FILE} (version {users_version}, signed)"
        echo_line(
            f"{member}'s NATS user removed from {users}: regenerate the hub's configuration"
            " with 'msmt nats config' and reload every hub server (send it SIGHUP), which"
            f" closes {member}'s connections"
        )
        click.echo(_SEND_USERS)
    version = keys_roster.load_signed_roster(keydir).version
    if retired:
        click.echo(f"{member}: retired {', '.join(retired)}")
    click.echo(
        f"roster version {version}: publish {keyfiles.ROSTER_FILE} and {keyfiles.ROSTER_SIG_FILE}"
        f" to every member and restart each node with it: what waits in its outbox for"
        f" {member} is taken back, and new reports wait for {member} (take it out of the"
        " policy to plan none for it)"
    )
    click.echo(
        f"to come back, {member} makes a key request ('msmt keys request {member}'), which you"
        " accept with --fingerprint after a phone call (docs/KEYS.md, 'A member leaves')"
    )


@keys_group.command(name="authority")
@_KEYDIR
@click.option(
    "--audit",
    is_flag=True,
    help="Also make the AUDIT account's NATS user here (the custodian runs the audit archive).",
)
@_writes_keys
def keys_authority(keydir: Path, audit: bool) -> None:
    """Start a custodian's key directory: the roster authority and an empty signed roster.

    No member's keys are made here: each member makes its own with 'msmt keys
    request' and sends the request; 'msmt keys accept' puts it into the roster.
    """
    keyrequest.init_authority(keydir, audit=audit)
    authority = keyfiles.load_authority(keydir / keyfiles.AUTHORITY_PUBLIC_FILE)
    echo_line(f"wrote the roster authority and an empty roster version 1 under {keydir}")
    if audit:
        echo_line(f"wrote the AUDIT account's NATS user ({keydir / keyfiles.AUDIT_ACCOUNT})")
    echo_line(
        f"send {keydir / keyfiles.AUTHORITY_PUBLIC_FILE} to every member, who pins it; keep "
        f"{keydir / keyfiles.AUTHORITY_PRIVATE_FILE} offline"
    )
    click.echo(f"authority thumbprint (RFC 7638): {authority.thumbprint()}")


@keys_group.command(name="request")
@click.argument("member")
@_KEYDIR
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the request (default: <dir>/<new sig kid>.request.json).",
)
@_AUTHORITY
@click.option(
    "--first",
    is_flag=True,
    help="MEMBER's first request: <dir>/<MEMBER>/ may be new, but must hold no keys.",
)
@click.option(
    "--new-nats-user",
    is_flag=True,
    help="Make a new NATS seed (after a compromise); the old one is kept, renamed.",
)
@_writes_keys
def keys_request(
    member: str,
    keydir: Path,
    out: Path | None,
    authority: Path | None,
    first: bool,
    new_nats_user: bool,
) -> None:
    """Make MEMBER's new keys here, and a key request for the roster custodian.

    Run by the member on its own machine: the private keys stay in <dir>/<MEMBER>/;
    the request carries only the public keys and the NATS user's public nkey. It is
    signed by the new key, and by MEMBER's current key if the roster here lists one.
    <dir>/<MEMBER>/ and <dir>/roster.json must exist, unless --first.
    """
    made = keyrequest.make_request(
        keydir,
        member.upper(),
        out=out,
        authority=authority,
        first=first,
        new_nats_user=new_nats_user,
    )
    echo_line(f"wrote key request {made.path}")
    echo_line(f"new keys {made.sig_kid} and {made.enc_kid} (mode 0600 in {keydir / made.member})")
    if made.replaced_nats_seed is not None:
        echo_line(
            f"NATS user {made.nats_user} (new; the old seed is kept as "
            f"{made.replaced_nats_seed}): the node logs in with it once the custodian has "
            "accepted the request with --replace-nats-user and the hub has reloaded"
        )
    elif not made.nats_created and made.endorsed_by is None:
        click.echo(
            f"NATS user {made.nats_user} (kept; after a compromise make the request with "
            "--new-nats-user, or whoever holds the seed keeps the member's hub login)"
        )
    else:
        click.echo(f"NATS user {made.nats_user} ({'new' if made.nats_created else 'kept'})")
    if made.endorsed_by is not None:
        click.echo(f"signed by the new key and by the current key {made.endorsed_by}")
    else:
        click.echo(
            f"signed by the new key only ({made.not_endorsed}): the custodian will compare "
            "the fingerprint with you"
        )
    click.echo(f"fingerprint {made.fingerprint}")
    # It is public, and a custodian accepts it from anyone: deleting these keys while
    # it can still be accepted would rotate the member to keys nobody holds.
    click.echo(
        f"acceptable until {format_time(made.acceptable_until)}: keep the new key files until"
        " then, even if you never send this request (whoever hands it to the custodian gets"
        " it accepted)"
    )
    if made.endorsed_by is not None:
        # "No call is needed" was false for a member whose key the custodian had retired
        # meanwhile (msmt keys suspend, or a rotation not installed here): this roster is
        # only the member's copy, and the custodian, rightly, asked for the fingerprint.
        click.echo(
            f"send the request to the roster custodian: it needs no phone call if the "
            f"custodian's roster still lists {made.endorsed_by} as active, as yours does (the "
            "custodian may still compare the fingerprint with you); if that key was retired or "
            "revoked since (a suspension, a rotation), the custodian asks you for the "
            "fingerprint by phone; the node uses the new keys once you install the roster that "
            "lists them"
        )
        # An onboarding trial left its node running through the accept, as an operator
        # does who reads only this output: partners refused for good what the node
        # signed with the retired key past the grace (docs/KEYS.md says so; this did not).
        click.echo(
            "stop this node before the custodian accepts it, and start it with the new"
            " roster: what it signs with the old key after the accept is refused once"
            " partners have that roster, and must be sent again (msmt node resend;"
            " docs/KEYS.md)"
        )
    else:
        click.echo(
            "send the request to the roster custodian and read the fingerprint out to them by "
            "phone; the node uses the new keys once you install the roster that lists them"
        )


@keys_group.command(name="accept")
@click.argument("request", type=click.Path(dir_okay=False, path_type=Path))
@_KEYDIR
@click.option(
    "--fingerprint",
    default=None,
    help="sha256:... as the member read it out; needed unless a current key signed the request.",
)
@click.option(
    "--replace-nats-user",
    is_flag=True,
    help="Accept a request that replaces the member's NATS user (after a compromise).",
)
@_VALID_DAYS
@_writes_keys
def keys_accept(
    request: Path,
    keydir: Path,
    fingerprint: str | None,
    replace_nats_user: bool,
    valid_days: int,
) -> None:
    """Check the key REQUEST a member sent and put its public keys into the signed roster.

    The member's previous active keys retire as of now (as with 'msmt keys rotate').
    Refused, with one line and nothing written, unless every check passes.
    """
    _finish_roster_write(keydir)
    done = keyrequest.accept_request(
        keydir,
        request,
        expected_fingerprint=fingerprint,
        replace_nats_user=replace_nats_user,
        valid_days=valid_days,
    )
    echo_line(f"accepted {request} from {done.member}, authorized by {done.authorized_by}")
    click.echo(f"fingerprint {done.fingerprint}")
    click.echo(f"made {format_time(done.made_at)} ({_made_ago(datetime.now(UTC) - done.made_at)})")
    span = f"{format_time(done.valid_from)}..{format_time(done.valid_until)}"
    click.echo(f"{done.member}: new keys {done.sig_kid} and {done.enc_kid}, active {span}")
    if done.retired:
        click.echo(f"{done.member}: retired {', '.join(done.retired)}")
    users = f"{keydir / keyfiles.NATS_USERS_FILE} (version {done.users_version}, signed)"
    if done.previous_nats_user is None:
        # Tried on nats-server 2.15: after a reload that adds an account, the new
        # account receives but its own publishes get no JetStream response.
        echo_line(
            f"{done.member}'s NATS user added in {users}, a new account on the hub: regenerate "
            "the hub's configuration with 'msmt nats config' and RESTART every hub server (one "
            "at a time); a reload does not set up a new account, whose publishes then fail"
        )
    elif done.previous_nats_user != done.nats_user:
        echo_line(
            f"{done.member}'s NATS user changed in {users}: regenerate the hub's configuration "
            "with 'msmt nats config' and reload every hub server (send it SIGHUP); "
            "the old user's connections are closed"
        )
    if done.users_version is not None:
        click.echo(_SEND_USERS)
    click.echo(
        f"roster version {done.version}: publish {keyfiles.ROSTER_FILE} and "
        f"{keyfiles.ROSTER_SIG_FILE} to every member"
    )


@keys_group.command(name="nats-user")
@click.argument("account")
@_KEYDIR
@_writes_keys
def keys_nats_user(account: str, keydir: Path) -> None:
    """Make ACCOUNT's NATS user here: <dir>/<ACCOUNT>/nats.nk. Only AUDIT (the auditor).

    Prints the public key (U...), which goes to the roster custodian; the seed stays
    here. An existing seed is never overwritten.
    """
    path, user = natsusers.make_user(keydir, account.upper())
    echo_line(f"wrote {path} (mode 0600)")
    click.echo(f"NATS user {user}")
    click.echo(
        f"send the NATS user (not the seed) to the roster custodian, who runs 'msmt keys "
        f"accept-nats-user {account.upper()} {user}'"
    )


@keys_group.command(name="accept-nats-user")
@click.argument("account")
@click.argument("nkey")
@_KEYDIR
@click.option(
    "--replace-nats-user",
    is_flag=True,
    help="Replace a different NATS user already recorded for ACCOUNT.",
)
@_writes_keys
def keys_accept_nats_user(account: str, nkey: str, keydir: Path, replace_nats_user: bool) -> None:
    """Record NKEY (U...) as ACCOUNT's NATS user in <dir>/nats-users.json. Only AUDIT."""
    done = natsusers.record_user(keydir, account.upper(), nkey, replace=replace_nats_user)
    signed = "" if done.version is None else f" (version {done.version}, signed)"
    echo_line(f"{account.upper()}'s NATS user {done.outcome} in {done.path}{signed}")
    if done.version is not None:
        click.echo(_SEND_USERS)
    if done.outcome == "added":
        click.echo(
            "regenerate the hub's configuration with 'msmt nats config' and start the hub, or "
            "RESTART every hub server (one at a time) if it runs: the account is new"
        )
    elif done.outcome == "replaced":
        click.echo(
            "regenerate the hub's configuration with 'msmt nats config' and reload every hub "
            "server (send it SIGHUP); the old user's connections are closed"
        )


_SEND_USERS: Final = (
    f"give the hub operator {keyfiles.NATS_USERS_FILE} and {keys_users.NATS_USERS_SIG_FILE}"
    " together; 'msmt nats config' verifies them with the pinned roster-authority key"
)


@keys_group.command(name="sign-nats-users")
@_KEYDIR
@_writes_keys
def keys_sign_nats_users(keydir: Path) -> None:
    """Sign <dir>/nats-users.json again, as its next version, with the roster authority.

    For a file written before msmt signed it (msmt nats config refuses it unsigned),
    or a write cut short between the file and its signature. The users stay as they are.
    """
    version = natsusers.sign_users(keydir)
    echo_line(
        f"signed {keydir / keyfiles.NATS_USERS_FILE} as version {version}"
        f" ({keys_users.NATS_USERS_SIG_FILE})"
    )
    # Signed as it stands: what it says is now what the hub will trust, so show it.
    for account, nkey in sorted(natsusers.load_users(keydir).items()):
        click.echo(f"{account} {nkey}")
    click.echo(_SEND_USERS)


@keys_group.command(name="verify-roster")
@_KEYDIR
@_AUTHORITY
@click.option("--min-version", type=click.IntRange(0), default=0, help="Last version accepted.")
def keys_verify_roster(keydir: Path, authority: Path | None, min_version: int) -> None:
    """Check the roster's signature and version, then list its keys."""
    signed = keys_roster.load_signed_roster(
        keydir, authority_path=authority, min_version=min_version, authority_option="--authority"
    )
    pinned = keyfiles.load_authority(authority or keydir / keyfiles.AUTHORITY_PUBLIC_FILE)
    click.echo(f"roster version {signed.version}: signature ok, {len(signed.roster)} keys")
    click.echo(f"signed by {pinned.kid}, thumbprint (RFC 7638) {pinned.thumbprint()}")
    for key in signed.roster:
        # When it stopped: what an auditor compares sends with (msmt audit replay).
        since = key.revoked_at if key.status == "revoked" else key.retired_at
        click.echo(
            f"{key.member} {key.use} {key.kid} {key.status} "
            f"{format_time(key.valid_from)}..{format_time(key.valid_until)}"
            + ("" if since is None else f" ({key.status} at {format_time(since)})")
        )


@keys_group.command(name="pseudonym")
@click.argument("member")
@click.argument("key_id")
@_KEYDIR
@click.option(
    "--from-file",
    "source",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    default=None,
    help="Import the key file the member who created KEY_ID sent (- reads stdin).",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Overwrite an existing, different key: every pseudonym made with it changes.",
)
@_writes_keys
def keys_pseudonym(
    member: str, key_id: str, keydir: Path, source: Path | None, replace: bool
) -> None:
    """Create MEMBER's pseudonym key KEY_ID (32 random bytes), or import a partner's copy.

    The key lands in <dir>/<MEMBER>/pseudonym/<KEY_ID>.key, mode 0600, where the node
    looks for each key its policy's [pseudonym_keys] names.
    """
    path = pseudonym_keys.key_file(keydir, member.upper(), key_id)
    if source is None:
        key = pseudonym_keys.new_key()
    else:
        where = "stdin" if str(source) == "-" else str(source)
        key = pseudonym_keys.decode(_read_key_source(source), where)
    outcome = pseudonym_keys.store_key(path, key, replace=replace)
    verb = "imported" if outcome == "created" and source is not None else outcome
    echo_line(f"{verb} {path}" + ("" if outcome == "unchanged" else " (mode 0600)"))
    click.echo(f"fingerprint {pseudonym_keys.fingerprint(key)}")
    if source is None:
        again = " --replace" if outcome == "replaced" else ""
        echo_line(
            f"send {path} to each partner listed under [pseudonym_keys.{key_id}] over a "
            f"channel you trust; they run 'msmt keys pseudonym <THEM> {key_id} "
            f"--from-file FILE{again}' and compare the fingerprint with you"
        )


def _read_key_source(source: Path) -> bytes:
    # Read one byte past the limit, so an oversized file is refused without reading it all.
    limit = pseudonym_keys.MAX_FILE_BYTES + 1
    if str(source) == "-":
        return stdin_buffer().read(limit)
    try:
        return read_file_bytes(source, limit)
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}") from None


@click.group(name="nats")
def nats_group() -> None:
    """The NATS hub: server configuration and JetStream streams."""


@nats_group.command(name="config")
@click.option(
    "--keys",
    "keydir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("keys"),
    show_default=True,
    help="The key directory (nats-users.json: every member's public nkey, and its .jws).",
)
@click.option(
    "--authority",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The roster-authority public key you pinned (its thumbprint compared with the"
    " custodian), which signed nats-users.json.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The hub.conf to write.",
)
@click.option(
    "--cluster",
    type=click.IntRange(0, 9),
    default=0,
    show_default=True,
    help="Servers in the hub: 0 for a single server (no cluster block), else 2 to 9.",
)
@click.option("--route-host", default="nats-{i}", show_default=True, help="Route host pattern.")
@click.option(
    "--store-dir",
    default="/data/jetstream",
    show_default=True,
    help="The JetStream store directory (relative: to the server's working directory).",
)
@click.option(
    "--listen", default="0.0.0.0:4222", show_default=True, help="Where nodes connect (HOST:PORT)."
)
@click.option(
    "--http",
    default="127.0.0.1:8222",
    show_default=True,
    help="Monitoring endpoint (HOST:PORT); it shows every connection, so keep it private.",
)
@click.option(
    "--tls-include",
    help="A file of the clients' tls block's settings (cert_file, key_file, ...), included;"
    " relative: to the hub.conf's directory.",
)
@click.option(
    "--route-tls-include",
    help="The same for the routes between the hub's servers (with --cluster).",
)
def nats_config(
    keydir: Path,
    authority: Path,
    out: Path,
    cluster: int,
    route_host: str,
    store_dir: str,
    listen: str,
    http: str,
    tls_include: str | None,
    route_tls_include: str | None,
) -> None:
    """Write the hub's nats-server configuration (accounts, users, exports, imports).

    Only from a nats-users.json whose signature verifies with the roster authority
    key pinned (--authority), and never from one older than the hub.conf it replaces
    was made from, nor another authority's.
    TLS settings are included from files of their own (--tls-include,
    --route-tls-include), so writing the configuration again keeps them. A hub.conf
    with TLS is not overwritten by one without.
    """
    if "{i}" not in route_host and cluster:
        raise UsageError("--route-host must contain {i}")
    bracketed = route_host.startswith("[") and route_host.endswith("]")  # an IPv6 address
    if re.search(r"[/\s]", route_host) or (":" in route_host and not bracketed):
        # Routes are nats://HOST:6222: a port or scheme here wrote "HOST:40010:6222".
        raise UsageError(f"--route-host {route_host!r}: a host name pattern alone (no port)")
    for option, include in (
        ("--tls-include", tls_include),
        ("--route-tls-include", route_tls_include),
    ):
        if include is not None:
            _check_include(option, include, out)
    # The pin is named, never taken from the key directory: whoever changed the users on
    # their way could have put their own authority key beside them (a review).
    signed = keys_users.load_signed_users(keydir, authority_path=authority)
    old = _old_config(out)
    _check_not_older(out, old, signed)
    text = natsconfig.server_config(
        signed,
        cluster=cluster,
        route_host=route_host,
        store_dir=store_dir,
        listen=listen,
        http=http,
        tls_include=tls_include,
        route_tls_include=route_tls_include,
    )
    dropped = _tls_dropped(old, text)
    if dropped is not None:
        # An onboarding trial appended the tls block to hub.conf, as DEPLOY.md said;
        # writing the file again for a new member's user dropped it, and the hub,
        # reloaded, served plaintext (the nodes refused it: an outage).
        raise UsageError(
            f"--out {out} sets TLS at {dropped!r}, which this run would drop: TLS set there"
            " would be off at the hub's reload; put the tls blocks' settings in files and"
            " pass --tls-include FILE and --route-tls-include FILE (docs/DEPLOY.md, TLS), or"
            " move the file away first"
        )
    keyfiles.write_public(out, text.encode())
    echo_line(
        f"wrote {out} from {keydir / keyfiles.NATS_USERS_FILE} version {signed.version},"
        f" signed by {signed.signer} (RFC 7638 thumbprint {signed.thumbprint}):"
        f" {', '.join(sorted(signed.users))}"
    )


def _old_config(out: Path) -> str | None:
    """The hub.conf that ``--out`` would replace, or None if there is none."""
    try:
        return out.read_text(errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot read it: {exc.strerror}") from None


def _check_not_older(out: Path, old: str | None, signed: keys_users.SignedUsers) -> None:
    """Refuse users older than those the hub.conf ``old`` was made from, or another signer's.

    The users are signed, but an older signed file names a user since replaced (after
    a compromise: the thief holds its seed) as well as a newer one: whoever puts it in
    the hub operator's way would log in again. The guard is the first line of the file
    it replaces (``natsconfig.made_from``): a hub.conf made elsewhere starts afresh.
    """
    if old is None:
        return
    try:
        before = natsconfig.made_from(old)
    except ValueError as exc:
        raise UsageError(f"--out {out}: {exc}; move the file away first") from None
    if before is None:
        return
    version, thumbprint = before
    if thumbprint != signed.thumbprint:
        raise KeyMaterialError(
            f"--out {out} was made from users signed by another roster authority (thumbprint"
            f" {thumbprint}, now {signed.thumbprint}): check --authority; if the authority"
            " was replaced, move the old file away first"
        )
    if version > signed.version:
        raise KeyMaterialError(
            f"{keyfiles.NATS_USERS_FILE} is version {signed.version}, older than version"
            f" {version}, which {out} was made from (a rollback): ask the custodian for the"
            " latest, and compare its version with them"
        )


def _check_include(option: str, include: str, out: Path) -> None:
    """Refuse an include file nats-server would not find, or one that is a tls block itself.

    nats-server reads an include relative to the configuration's folder, not to where
    the command ran, and joins even an absolute path onto that folder; a file it cannot
    find stops the server at its next restart (a trial: `--tls-include
    sub/tls-client.conf` from another folder, which a member joining, restarted, would
    have hit; a review: an absolute path).
    """
    if Path(include).is_absolute():
        raise UsageError(
            f"{option} {include}: a path relative to {out.name}'s folder, where nats-server"
            " reads it (it joins even an absolute path onto that folder)"
        )
    path = out.parent / include
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise UsageError(
            f"{option} {include}: cannot read {path} ({exc.strerror}): nats-server reads it"
            f" relative to {out.name}'s folder"
        ) from None
    found = sorted(natsconfig.tls_places(text))
    if found:
        raise UsageError(
            f"{option} {include}: it holds {found[0]!r}; give the tls block's settings alone"
            " (cert_file, key_file, ...): nats config writes the block around them"
        )


def _tls_dropped(old: str | None, text: str) -> str | None:
    """Where the hub.conf ``old`` sets TLS that ``text``, written over it, would not; or None.

    Any ``tls`` block or ``include`` of the old file, wherever it is (the clients', a
    cluster's, a websocket's, an include holding one), the new configuration must carry
    in the same place: nats config writes only what its options say.
    """
    if old is None:
        return None
    dropped = natsconfig.tls_places(old) - natsconfig.tls_places(text)
    return min(dropped) if dropped else None


def _made_ago(age: timedelta) -> str:
    """How long ago a request was made, said plainly (it may be dated a little ahead)."""
    if age < timedelta(0):
        # Within the skew accept allows: "-1 days ago" read as a bug (an onboarding trial).
        return f"{int(-age.total_seconds())} s ahead of this machine's clock"
    if age.days == 0:
        return "less than a day ago"
    return f"{age.days} day{'s' if age.days > 1 else ''} ago"


def _hub_options(command: _Command) -> _Command:
    """The options that say which hub server to reach and with what: setup's and usage's."""
    for option in reversed(
        (
            click.option(
                "--server",
                "url",
                default="nats://127.0.0.1:4222",
                show_default=True,
                help="A hub server's URL (nats:// or tls://).",
            ),
            click.option(
                "--keys",
                "keydir",
                type=click.Path(file_okay=False, path_type=Path),
                default=Path("keys"),
                show_default=True,
                help="The key directory (<dir>/ACCOUNT/nats.nk: the account's NATS seed).",
            ),
            click.option(
                "--tls-ca",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="PEM bundle of the CA that signed the hub's certificate (default: system"
                " store).",
            ),
            click.option(
                "--tls-cert",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="PEM client certificate (chain), for a hub that demands one; needs --tls-key.",
            ),
            click.option(
                "--tls-key",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="PEM private key of --tls-cert (unencrypted).",
            ),
        )
    ):
        command = option(command)
    return command


def _hub_account(
    url: str,
    keydir: Path,
    account: str,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> tuple[str, bytes, ssl.SSLContext | None]:
    """The account (upper case), its NATS seed and the TLS context, checked; else one line."""
    account = account.upper()
    if account not in (*MEMBERS, keyfiles.AUDIT_ACCOUNT):
        raise UsageError(f"unknown account {account!r}: a member trigraph or AUDIT")
    problem = natstls.url_problem(url)
    if problem is not None:
        raise UsageError(f"--server: {problem}")
    tls = natstls.client_tls_context([url], tls_ca, tls_cert, tls_key, natstls.CLI_NAMES)
    path = keydir / account / keyfiles.NATS_SEED_FILE
    try:
        seed = read_file_bytes(path).strip()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {path}: {exc.strerror}") from None
    public = keyfiles.nats_public(seed, str(path))
    # Another account's seed connects, then times out on every request (its user may
    # not use this account's reply subjects): 20 s, and the hub blamed. Where the key
    # directory lists the users (the hub's own, for msmt nats config), say it at once.
    users = keydir / keyfiles.NATS_USERS_FILE
    if users.exists():
        listed = natsusers.load_users(keydir).get(account)
        if listed is not None and listed != public:
            raise KeyMaterialError(
                f"{path} is not {account}'s NATS user: {users} lists {listed} for"
                f" {account}, and this seed is {public}'s (another account's seed?)"
            )
    return account, seed, tls


@nats_group.command(name="setup")
@_hub_options
@click.option("--account", required=True, help="A member trigraph, or AUDIT.")
@click.option(
    "--max-bytes",
    type=click.IntRange(natsconfig.MIN_MAX_BYTES),
    default=None,
    help="The inbox's size (a member; a new one 128 MiB), or each member's archive (AUDIT;"
    " a new one 32 MiB); within the quota. Without it a stream that exists keeps its own.",
)
@click.option(
    "--max-age-days",
    type=Finite(min=natsconfig.MIN_INBOX_AGE_DAYS),
    default=None,
    help="How long an unread report stays in the inbox (a new one 30; without it an"
    " existing one keeps its own); archives keep all.",
)
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=None,
    help="Copies of each stream on the hub's servers. Without it a stream that exists"
    " keeps its own, and a new one gets 1.",
)
@click.option(
    "--quiet", "-q", is_flag=True, help="One line per stream or consumer, without its settings."
)
def nats_setup(
    url: str,
    keydir: Path,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    account: str,
    max_bytes: int | None,
    max_age_days: float | None,
    replicas: int | None,
    quiet: bool,
) -> None:
    """Create or update ACCOUNT's streams and consumer; running it twice changes nothing.

    Prints what it did to each stream and consumer, and the settings each now has
    (with --quiet, only what it did). --tls-* need a tls:// --server: the same
    rules as node.toml's nats.ca_file, nats.cert_file and nats.key_file.
    """
    # Imported here: nats-py loads aiohttp (~0.3 s), which no keys command uses.
    from broker import natsetup  # noqa: PLC0415

    # Its warnings (an inbox switched, the shared archive retired) go to stderr: left
    # unconfigured, structlog printed them among the results on stdout.
    log.configure()
    account, seed, tls = _hub_account(url, keydir, account, tls_ca, tls_cert, tls_key)
    defaults = natsetup.InboxLimits()
    limits = natsetup.InboxLimits(
        max_bytes=max_bytes or defaults.max_bytes,
        max_age_days=max_age_days or defaults.max_age_days,
        replicas=replicas or 1,
    )
    audit_bytes = max_bytes or natsetup.AUDIT_MAX_BYTES
    results = asyncio.run(
        natsetup.setup_account(
            url,
            account,
            seed,
            limits,
            audit_max_bytes=audit_bytes,
            tls=tls,
            # Re-run without --replicas on a cluster, setup would otherwise scale
            # every stream down to one copy, quietly (a trial's did); without
            # --max-bytes (deploy/provision.sh) set a sized inbox back to 128 MiB.
            keep=frozenset(
                field
                for field, given in (
                    ("num_replicas", replicas),
                    ("max_bytes", max_bytes),
                    ("max_age", max_age_days),
                )
                if given is None
            ),
        )
    )
    for result in results:
        for line in result.lines()[:1] if quiet else result.lines():
            click.echo(line)


@nats_group.command(name="usage")
@_hub_options
@click.option(
    "--account",
    "accounts",
    multiple=True,
    required=True,
    help="A member trigraph, or AUDIT (its members' archives); repeat for more.",
)
@click.option(
    "--textfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the figures there for node_exporter's textfile collector (a name"
    " ending in .prom, in its --collector.textfile.directory).",
)
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Print no figures, only errors and warnings (from cron, with --textfile).",
)
def nats_usage(
    url: str,
    keydir: Path,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    accounts: tuple[str, ...],
    textfile: Path | None,
    quiet: bool,
) -> None:
    """Show how full each account's streams are, and its storage against its quota.

    Every stream setup makes refuses what is published to it once full: a member's
    inbox refuses partners' reports, and a member's archive (in AUDIT) its
    checkpoints. Run it from cron with --textfile, and the shipped alerts
    MsmtHubStreamFilling and MsmtHubUsageStale watch them (docs/DEPLOY.md).
    """
    # Imported here: nats-py loads aiohttp (~0.3 s), which no keys command uses.
    from broker import hubusage  # noqa: PLC0415

    log.configure()  # as setup: warnings to stderr, never among the figures

    if textfile is not None and textfile.suffix != ".prom":
        raise UsageError(
            f"--textfile: {textfile} must end in .prom: node_exporter reads no other file"
        )
    checked = [_hub_account(url, keydir, a, tls_ca, tls_cert, tls_key) for a in accounts]

    async def ask() -> list[hubusage.AccountUsage]:
        return [await hubusage.account_usage(url, a, seed, tls=tls) for a, seed, tls in checked]

    usages = asyncio.run(ask())
    for usage in usages if not quiet else ():
        for line in hubusage.usage_lines(usage):
            click.echo(line)
    if textfile is not None:
        hubusage.write_textfile(textfile, usages, time.time())


COMMANDS: tuple[click.Command, ...] = (keys_group, nats_group)
