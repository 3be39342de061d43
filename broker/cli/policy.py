"""Commands for the policy family: ``msmt policy check`` and ``msmt policy explain``.

``check`` is what an operator runs before deploying a policy; ``explain`` shows,
before anything is sent, which partner would receive which field of a report.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from broker.cli.options import echo_line, error_line
from broker.config import NodeConfig, load_config
from broker.errors import InputError, KeyMaterialError, MsmtError, PolicyError, UsageError
from broker.files import read_file_text
from broker.members import MEMBERS
from broker.policy import Decision, Policy, Release, check_policy, load_policy
from broker.policy_file import read_policy
from broker.sightings import SightingModel, field_paths
from broker.validation import InvalidRecordError, parse_record


def _read(path: Path, what: str) -> str:
    try:
        return read_file_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read {what} {path}: {reason}") from None


@click.group(name="policy")
def policy_group() -> None:
    """Check releasability policies and preview what each partner would receive."""


@policy_group.command(name="check")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def check(files: tuple[Path, ...]) -> None:
    """Check policy FILES; print FILE:LINE: REASON for each problem.

    Exit 0 when every policy is clean (one summary line each, with its digest),
    1 when any has problems, 2 when a file cannot be read.
    """
    status = 0
    for path in files:
        try:
            text = _read(path, "policy")
        except UsageError as exc:
            click.echo(error_line(exc), err=True)
            status = 2
            continue
        problems = check_policy(text)
        for problem in problems:
            echo_line(f"{path}:{problem.line}: {problem.reason}")
        if problems:
            status = max(status, 1)
            continue
        spec, _ = read_policy(text, member=None)
        assert spec is not None  # noqa: S101 - no problems means it parsed
        echo_line(
            f"{path}: ok: {spec.member}, rules {len(spec.rules)}, "
            f"groups {len(spec.groups)}, pseudonym keys {len(spec.pseudonym_keys)}, "
            f"digest {spec.digest()}"
        )
    sys.exit(status)


def _report(path: Path) -> SightingModel:
    text = _read(path, "report")
    try:
        json.loads(text)
        # The file's line ends are not the record's: the node reads a line without its
        # newline, so a record of the largest size it takes passes here too.
        raw = text.rstrip("\n")
    except (ValueError, RecursionError):  # ValueError: also an integer of over 4300 digits
        # NDJSON: explain the first record (or refuse the nesting, as parse_record does).
        raw = next((line for line in text.split("\n") if line.strip()), "")
    try:
        return parse_record(raw)
    except InvalidRecordError as exc:
        raise InputError(f"{path}: not a valid sighting: {exc}") from None


def _holds_key(policy: Policy, partner: str, release: Release) -> bool | None:
    """Whether ``partner`` holds the key of a pseudonym ``release`` (``None``: not a pseudonym)."""
    if release.transform is None or release.transform.name != "pseudonym":
        return None
    return partner in policy.pseudonym_keys.get(str(release.transform.param), ())


def _cell(policy: Policy, partner: str, decision: Decision, path: str) -> str:
    release = decision.released.get(path)
    if release is not None:
        if release.transform is None:
            return "released"
        # A key holder can test guesses: flag it where the officer looks.
        return release.transform.ident + ("*" if _holds_key(policy, partner, release) else "")
    return "withheld" if path in decision.withheld else ""


def _table(policy: Policy, sighting: SightingModel, decisions: dict[str, Decision]) -> list[str]:
    present = [
        p
        for p in field_paths(sighting.kind)
        if any(p in d.withheld or p in d.released for d in decisions.values())
    ]
    prefix = f"{sighting.kind}."
    headers = ["partner", "sent", *(p.removeprefix(prefix) for p in present)]
    rows = [
        [partner, "yes" if d.sends else "no", *(_cell(policy, partner, d, p) for p in present)]
        for partner, d in decisions.items()
    ]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    if any("*" in cell for row in rows for cell in row):
        lines.append("")
        lines.append(
            "* the partner holds this pseudonym key: it can test guesses, so a guessable "
            "identifier (IMO, MMSI, a listed name or address) is as good as released"
        )
    lines.append("")
    lines.append("why withheld:")
    for partner, d in decisions.items():
        reasons: dict[str, list[str]] = {}
        for path, reason in d.withheld.items():
            reasons.setdefault(reason, []).append(path.removeprefix(prefix))
        whole = not d.released and len(reasons) == 1
        text = "; ".join(
            f"{reason}: {'all fields' if whole else ', '.join(paths)}"
            for reason, paths in reasons.items()
        )
        lines.append(f"  {partner}  {text or '-'}")
    return lines


def _as_json(
    policy: Policy, sighting: SightingModel, decisions: dict[str, Decision], onward: bool
) -> dict[str, Any]:
    return {
        "member": policy.member,
        "policy_digest": policy.digest,
        "report_id": str(sighting.report_id),
        "kind": sighting.kind,
        "originator": sighting.originator,
        "tlp": sighting.tlp,
        "rel_to": list(sighting.rel_to) if sighting.rel_to is not None else None,
        "onward": onward,
        "partners": {
            partner: {
                "sent": d.sends,
                "released": {
                    path: {
                        "rule": r.rule,
                        "transform": None if r.transform is None else r.transform.ident,
                        "disclosure_key": r.disclosure_key,
                        # For a pseudonym: whether the partner holds its key (and so
                        # can test guesses); null for other forms.
                        "partner_holds_key": _holds_key(policy, partner, r),
                    }
                    for path, r in d.released.items()
                },
                "withheld": dict(d.withheld),
            }
            for partner, d in decisions.items()
        },
    }


@policy_group.command(name="explain")
@click.option(
    "--member",
    type=click.Choice(MEMBERS),
    help="The member whose policy decides (or give --config).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A node's node.toml: its member and the policy file it names.",
)
@click.option(
    "--report",
    "report_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="One sighting as JSON, or NDJSON (the first record is used).",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Policy file [default: nodes/<MEMBER>/policy.toml].",
)
@click.option(
    "--onward", is_flag=True, help="Preview passing on a report another member originated."
)
@click.option("--json", "as_json", is_flag=True, help="Print the decisions as JSON.")
def explain(
    member: str | None,
    config_path: Path | None,
    report_path: Path,
    policy_path: Path | None,
    onward: bool,
    as_json: bool,
) -> None:
    """Show which partner would receive which field of a report, and why, before sending.

    Partners are rows and fields are columns; each cell is ``released``, the
    transform applied (e.g. ``coarsen:0.5``), or ``withheld``. With ``--config``,
    the node's own policy file (what its next start would apply; ``msmt status``
    says whether the running node still has it).
    """
    config = None
    if config_path is not None:
        config = load_config(config_path)
        if member is not None and member != config.member:
            raise UsageError(f"--member {member}, but {config_path} is {config.member}'s node")
        member, policy_path = config.member, policy_path or config.policy
    if member is None:
        raise UsageError("give --member or --config")
    path = policy_path or Path("nodes") / member / "policy.toml"
    if policy_path is None and not path.exists():
        # The default is relative to where the command runs: say so, and the way out.
        raise UsageError(
            f"no policy at {path} (the default, relative to the current directory): "
            "give --policy FILE or --config NODE_TOML"
        )
    policy = load_policy(_read(path, "policy"), member=member, source=str(path))
    sighting = _report(report_path)
    if sighting.originator != member and not onward:
        raise UsageError(
            f"{report_path}: the report was originated by {sighting.originator}; "
            "add --onward to preview passing it on"
        )
    try:
        decisions = policy.decide_all(sighting, onward=onward)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(_as_json(policy, sighting, decisions, onward), indent=2))
        return
    rel_to = ",".join(sighting.rel_to) if sighting.rel_to else "-"
    click.echo(
        f"report {sighting.report_id} ({sighting.kind}) from {sighting.originator}, "
        f"TLP:{sighting.tlp}, REL TO {rel_to}{', passed on' if onward else ''}"
    )
    echo_line(f"policy {path} ({policy.member}), digest {policy.digest}")
    click.echo("")
    for line in _table(policy, sighting, decisions):
        click.echo(line)
    if config is not None:
        for line in _keyless(config, [p for p, d in decisions.items() if d.sends]):
            echo_line(line)


def _keyless(config: NodeConfig, partners: list[str]) -> list[str]:
    """Notes on the ``partners`` sent to that the node's roster has no valid encryption key for.

    What is released to one waits (``awaiting_key``) until it has a key: a departure
    review found explain saying "sent yes" for a suspended member.
    """
    from broker.node_files import load_roster  # noqa: PLC0415 - its imports, only here

    try:
        roster = load_roster(config).roster
    except (MsmtError, OSError) as exc:
        return ["", f"roster not read ({exc}): whether each partner has a key is not shown"]
    now = datetime.now(UTC)
    notes = []
    for partner in partners:
        try:
            roster.current(partner, "enc", now)
        except KeyMaterialError as exc:
            notes.append(
                f"  {partner}  {exc}: what is released to it waits until it has one"
                " (msmt status: awaiting_key)"
            )
    return ["", "no valid key in the node's roster:", *notes] if notes else []


COMMANDS: tuple[click.Command, ...] = (policy_group,)
