"""Commands for named intake feeds: ``msmt feeds add|list|revoke``.

Each feed gets its own bearer token, so the audit log names the feed behind
each report (``socket:NAME``) and one feed can be cut off alone. The node keeps
only the tokens' hashes (``broker.feeds``) and notices a change at the next
request, so none of these needs the node stopped.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from broker import feeds
from broker.cli.node import open_store
from broker.cli.options import CONFIG as _CONFIG
from broker.cli.options import echo_line
from broker.cli.status import feed_line
from broker.config import NodeConfig, load_config
from broker.errors import UsageError, WriteError
from broker.files import write_durably
from broker.roster import format_time


@click.group(name="feeds")
def feeds_group() -> None:
    """Named intake feeds, each with its own bearer token."""


def _write_new(path: Path, token: str) -> None:
    # O_EXCL: a token file is never overwritten (it may be another feed's, in
    # use); O_NOFOLLOW: nor written through a link planted at that path.
    # Linked into place: whole, surviving a power cut, and failing if anything (a
    # link too) is at that path.
    try:
        write_durably(path, (token + "\n").encode("ascii"), replace=False)
    except FileExistsError:
        raise UsageError(
            f"--out {path} exists: a token file is never overwritten; give a new path"
        ) from None
    except OSError as exc:
        raise WriteError(f"cannot write --out {path}: {exc.strerror}") from None


def _no_node_here(config: NodeConfig) -> str:
    """Why a feed added here may never reach the node, or ``""`` when a node has run here.

    The node may run with ``MSMT_DATA_DIR`` (a systemd unit's ``Environment=``) while
    this command, run from a shell, reads the data directory node.toml names.
    """
    if config.store_path.exists():
        return ""
    return (
        f"no node has run on data_dir {config.data_dir} yet: if the node runs with"
        " MSMT_DATA_DIR or other MSMT_* variables set (a systemd unit's Environment=),"
        " run this command with the same ones"
    )


@feeds_group.command(name="add")
@_CONFIG
@click.argument("name")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the token to this new file (mode 0600) instead of printing it.",
)
def feeds_add(config_path: Path, name: str, out: Path | None) -> None:
    """Add feed NAME with a new random token, and print the token (only this once).

    NAME is a-z, 0-9, '_' and '-', starting with a letter, at most 32
    characters; a name once used is never given to another token. The node
    keeps only the token's SHA-256 and takes the token from its next request,
    without a restart; the audit log names the feed's reports ``socket:NAME``.
    The feed sends with ``msmt submit --token-file FILE``. ``--out`` refuses a
    file that exists. Exit 0 when added, 2 when not (nothing changed).
    """
    config = load_config(config_path)
    elsewhere = _no_node_here(config)
    written: list[Path] = []

    def write(token: str) -> None:
        if out is not None:
            _write_new(out, token)
            written.append(out)

    try:
        token = feeds.add(config.feeds_path, name, datetime.now(UTC), write)
    except BaseException:
        # The token file of a feed that was not added would be a dead credential.
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if out is None:
        click.echo(token)
        where = "it is shown only now"
    else:
        where = f"its token is in {out} (mode 0600), nowhere else"
    echo_line(
        f"feed {name!r} added as socket:{name}; {where}. The node accepts it from its next"
        " request.",
        err=True,
    )
    if elsewhere:
        click.echo(f"msmt: warning: {elsewhere}, or the node never sees this feed", err=True)


def _figures(config: NodeConfig) -> dict[str, dict[str, object]]:
    # The node's counts by feed, when it has run; never an error, since the file
    # is what this command is about.
    if not config.store_path.exists():
        return {}
    store = open_store(config)
    try:
        return feeds.usage(store.counters(), store.state())
    finally:
        store.close()


@feeds_group.command(name="list")
@_CONFIG
def feeds_list(config_path: Path) -> None:
    """List the named feeds: created, revoked, and what each sent (never a token).

    The figures (records accepted and rejected, when last used) are the node's
    as of its last status write (about once a second while it runs). The last
    line is the shared ``intake.token`` (feed ``socket``), once it has sent records
    or where it is turned off (``intake.shared_token = false``).
    """
    config = load_config(config_path)
    known = feeds.load(config.feeds_path)
    figures = _figures(config)
    if not known.by_name:
        echo_line(f"no named feeds (msmt feeds add NAME; file {config.feeds_path})", err=True)
    for feed in sorted(known.by_name.values(), key=lambda f: f.name):
        state = "active" if feed.revoked_at is None else f"revoked {format_time(feed.revoked_at)}"
        used = figures.get(feed.audit_name)
        line = "never used" if used is None else feed_line(used)
        click.echo(f"{feed.name:<24} created {format_time(feed.created_at)}  {state:<28}  {line}")
    shared = figures.get(feeds.CHANNEL)
    if not config.intake.shared_token:
        before = "" if shared is None else f"; before: {feed_line(shared)}"
        click.echo(f"{'(intake.token)':<24} off (intake.shared_token = false){before}")
    elif shared is not None:
        click.echo(f"{'(intake.token)':<24} shared token, feed socket: {feed_line(shared)}")


@feeds_group.command(name="revoke")
@_CONFIG
@click.argument("name")
def feeds_revoke(config_path: Path, name: str) -> None:
    """Revoke feed NAME: the node refuses its token from the next request, without a restart.

    A request of that feed still streaming ends before its next batch is
    committed (its feed sees the records without an answer as not accepted).
    The name stays in the file, revoked, and is never given to a new token.
    """
    config = load_config(config_path)
    now = datetime.now(UTC)
    try:
        feeds.revoke(config.feeds_path, name, now)
    except UsageError as exc:
        elsewhere = _no_node_here(config)
        if not elsewhere:
            raise
        raise UsageError(f"{exc} ({elsewhere})") from None
    click.echo(f"feed {name!r} revoked at {format_time(now)}")


COMMANDS: tuple[click.Command, ...] = (feeds_group,)
