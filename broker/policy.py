"""The releasability policy engine: per report and per partner, which fields go out, and how.

A member's policy (``nodes/<MEMBER>/policy.toml``, format in ``docs/POLICY.md``)
is loaded once with ``load_policy``; ``Policy.decide`` then answers, for one
sighting and one partner, which field paths are released (raw or transformed,
and by which rule) and why every other present field is withheld. Pure code:
no I/O, no clock, no keys except those the caller passes to ``variants``.

Decision order for one partner (each step only narrows):

1. The partner must be another member; the policy's own member and the
   report's originator get nothing.
2. Passing a report on (``onward=True``): TLP:RED and TLP:AMBER+STRICT are never
   passed on; TLP:AMBER only to partners the report's REL TO names.
3. REL TO: a partner outside the report's ``rel_to`` gets nothing.
4. Per field: a withhold rule that applies wins over every release; otherwise
   the release rules that apply decide, a transformed release beating a raw
   one. No release rule means withheld (default deny). For TLP:RED only rules
   that list RED and name the partner by trigraph apply. Source-and-method
   fields are released only by a rule naming them.

The whole (partner, kind, TLP) table is computed when the policy is loaded,
which is also how ``check_policy`` finds conflicting releases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from broker.errors import KeyMaterialError, PolicyError
from broker.members import MEMBERS, is_member
from broker.policy_file import (
    TLP_LABELS,
    PolicySpec,
    Problem,
    Rule,
    locate,
    read_policy,
)
from broker.sightings import KINDS, SOURCE_AND_METHOD_PATHS, SightingModel, field_paths, leaf_values
from broker.transforms import Transform, variant_key

__all__ = [
    "Decision",
    "Policy",
    "Problem",
    "Release",
    "Rule",
    "check_policy",
    "load_policy",
    "variants",
    "DEFAULT_DENY",
]

DEFAULT_DENY: Final = "default deny"
WILDCARD_SM: Final = "source and method: only a rule naming it releases it"
SELF: Final = "partner is this member"
ORIGINATOR: Final = "partner is the originator"
TLP_RED: Final = "TLP:RED"
REL_TO: Final = "REL TO"
ONWARD_STRICT: Final = "TLP:AMBER+STRICT is never passed on"
ONWARD_RED: Final = "TLP:RED is never passed on"
ONWARD_AMBER: Final = "TLP:AMBER is passed on only within REL TO"
CONFLICT: Final = "conflicting transforms"


@dataclass(frozen=True, slots=True)
class Release:
    """One field released to a partner: raw (``transform is None``) or transformed, and why."""

    path: str
    transform: Transform | None
    rule: str

    @property
    def disclosure_key(self) -> str:
        """The disclosure this release is sent as: ``path`` or ``path#<transform id>``."""
        return variant_key(self.path, self.transform)


@dataclass(frozen=True, slots=True)
class Decision:
    """What one partner receives of one report, and why each present field is or is not sent.

    A decision with nothing released means the partner gets no message at all.
    """

    partner: str
    released: Mapping[str, Release]
    withheld: Mapping[str, str]
    policy_digest: str
    onward: bool = field(default=False)

    def disclosure_keys(self) -> frozenset[str]:
        """The disclosure keys the partner receives (``path`` or ``path#<transform>``)."""
        return frozenset(r.disclosure_key for r in self.released.values())

    @property
    def sends(self) -> bool:
        """Whether the partner receives a message at all."""
        return bool(self.released)


_Cell = Release | str
_Table = dict[tuple[str, str, str], dict[str, _Cell]]


def _resolve(  # noqa: PLR0911 - one return per outcome, in the documented order
    applying: list[Rule], partner: str, tlp: str, path: str
) -> tuple[_Cell, tuple[Release, ...]]:
    """Decide one field for one partner and TLP; also return every release that applied.

    ``applying`` is the rules whose kinds include the report's and whose
    partners include ``partner``, in file order.
    """
    withheld = [r for r in applying if r.effect == "withhold" and tlp in r.tlp and r.covers(path)]
    if withheld:
        return withheld[0].name, ()
    # Every applying release rule narrows the form; for TLP:RED only those that
    # name the partner by trigraph may authorize the release itself.
    candidates = [r for r in applying if r.releases(path) and tlp in r.tlp]
    releases = tuple(Release(path, r.transforms.get(path), r.name) for r in candidates)
    forms = {r.transform for r in releases if r.transform is not None}
    if len(forms) > 1:
        return CONFLICT, releases
    releasers = [r for r in candidates if tlp != "RED" or partner in r.named]
    if not releasers:
        if tlp == "RED" and any(r.releases(path) for r in applying):
            return TLP_RED, ()
        if path in SOURCE_AND_METHOD_PATHS and any(
            r.effect == "release" and tlp in r.tlp and r.covers(path) for r in applying
        ):
            return WILDCARD_SM, ()
        return DEFAULT_DENY, ()
    if not forms:
        return Release(path, None, releasers[0].name), releases
    # A transformed release beats a raw one, whichever rule supplied the transform.
    (form,) = forms
    rule = next((r for r in releasers if r.transforms.get(path) == form), releasers[0])
    return Release(path, form, rule.name), releases


def _analyse(spec: PolicySpec) -> tuple[_Table, list[tuple[Rule, str, str, Release, Release]]]:
    table: _Table = {}
    conflicts: list[tuple[Rule, str, str, Release, Release]] = []
    by_name = {r.name: r for r in spec.rules}
    for partner in MEMBERS:
        if partner == spec.member:
            continue
        for kind in KINDS:
            applying = [r for r in spec.rules if kind in r.kinds and partner in r.members]
            for tlp in TLP_LABELS:
                cells: dict[str, _Cell] = {}
                for path in field_paths(kind):
                    cell, releases = _resolve(applying, partner, tlp, path)
                    cells[path] = cell
                    if cell == CONFLICT:
                        first = next(r for r in releases if r.transform is not None)
                        other = next(
                            r for r in releases if r.transform not in (None, first.transform)
                        )
                        conflicts.append((by_name[other.rule], partner, path, first, other))
                table[(partner, kind, tlp)] = cells
    return table, conflicts


def _semantic_problems(spec: PolicySpec, text: str) -> tuple[list[Problem], _Table]:
    loc = locate(text)
    problems: list[Problem] = []
    for rule in spec.rules:
        where = ("rules", rule.index)
        if not rule.members:
            problems.append(
                Problem(
                    loc.line(*where, "partners"),
                    f"rule can never match: it names no partner but {spec.member} itself",
                )
            )
        elif rule.effect == "release" and rule.tlp == ("RED",) and not rule.named:
            problems.append(
                Problem(
                    loc.line(*where, "partners"),
                    "rule can never match: a TLP:RED release must name partners by trigraph, "
                    "not by group",
                )
            )
        for path, transform in rule.transforms.items():
            if transform.name != "pseudonym":
                continue
            if str(transform.param) not in spec.pseudonym_keys:
                line = loc.line(*where, "transforms", path, needle=path)
                problems.append(
                    Problem(
                        line,
                        f"pseudonym key {transform.param!r} is not declared in [pseudonym_keys]",
                    )
                )
    table, conflicts = _analyse(spec)
    seen: set[tuple[str, str, str]] = set()
    for rule, partner, path, first, other in conflicts:
        key = (first.rule, other.rule, path)
        if key in seen:
            continue
        seen.add(key)
        line = loc.line("rules", rule.index, "transforms", path, needle=path)
        problems.append(
            Problem(
                line,
                f"{path} is released to {partner} in two forms: "
                f"{first.transform.ident if first.transform else 'raw'} by {first.rule} "
                f"and {other.transform.ident if other.transform else 'raw'} by {other.rule}",
            )
        )
    return sorted(problems, key=lambda p: p.line), table


def check_policy(text: str, *, member: str | None = None) -> list[Problem]:
    """Every problem in policy ``text``, sorted by line; empty if the policy is clean.

    Checks structure and names (unknown fields, partners, groups, transforms),
    rules that can never match, undeclared pseudonym keys, and fields released to
    one partner in two different transforms.
    """
    spec, problems = read_policy(text, member=member)
    if spec is None:
        return problems
    return _semantic_problems(spec, text)[0]


class Policy:
    """A loaded, checked policy: decides per report and partner what is released.

    Built by ``load_policy``; building one from a ``PolicySpec`` directly runs the
    same checks and raises ``PolicyError`` (``text`` and ``source`` only make the
    message point at a line).
    """

    def __init__(self, spec: PolicySpec, *, text: str = "", source: str = "<policy>") -> None:
        self.spec = spec
        self.member = spec.member
        self.rules = spec.rules
        self.pseudonym_keys = spec.pseudonym_keys
        self.normalized = spec.normalized()
        self.digest = spec.digest()
        problems, self._table = _semantic_problems(spec, text)
        if problems:
            raise PolicyError(f"{source}:{problems[0].line}: {problems[0].reason}")

    def decide(self, sighting: SightingModel, partner: str, *, onward: bool = False) -> Decision:
        """What ``partner`` receives of ``sighting`` under this policy.

        ``onward`` marks a report this member received from another originator
        and is passing on. Raises ``PolicyError`` for an unknown partner, or for
        a report this member did not originate unless ``onward`` is set.
        """
        return self._decide(sighting, leaf_values(sighting), partner, onward)

    def decide_all(self, sighting: SightingModel, *, onward: bool = False) -> dict[str, Decision]:
        """Decisions for every member except the originator and this member, in MSMT order.

        Raises ``PolicyError`` as ``decide`` does.
        """
        present = leaf_values(sighting)
        return {
            partner: self._decide(sighting, present, partner, onward)
            for partner in MEMBERS
            if partner not in (sighting.originator, self.member)
        }

    def releasable(
        self,
        partner: str,
        *,
        kind: str,
        tlp: str,
        originator: str,
        rel_to: Iterable[str] | None,
        onward: bool = False,
    ) -> Mapping[str, Release | str]:
        """For every field path of ``kind``: the ``Release`` ``partner`` gets, or why not.

        The same answer ``decide`` gives, from a report's handling fields alone,
        so an auditor can replay a send without the report. Raises
        ``PolicyError`` for an unknown partner or kind, or for a report this
        member did not originate unless ``onward`` is set.
        """
        if not is_member(partner):
            raise PolicyError(f"unknown partner {partner!r}")
        if kind not in KINDS or tlp not in TLP_LABELS:
            raise PolicyError(f"unknown report kind {kind!r} or TLP label {tlp!r}")
        if not onward and originator != self.member:
            raise PolicyError(
                f"report was originated by {originator}, not {self.member}; "
                "deciding for it means passing it on (onward)"
            )
        reason = self._marking(partner, originator, tlp, rel_to, onward)
        if reason is not None:
            return MappingProxyType(dict.fromkeys(field_paths(kind), reason))
        return MappingProxyType(self._table[(partner, kind, tlp)])

    def _decide(
        self, sighting: SightingModel, present: dict[str, Any], partner: str, onward: bool
    ) -> Decision:
        cells = self.releasable(
            partner,
            kind=sighting.kind,
            tlp=sighting.tlp,
            originator=sighting.originator,
            rel_to=sighting.rel_to,
            onward=onward,
        )
        released: dict[str, Release] = {}
        withheld: dict[str, str] = {}
        for path in present:
            cell = cells.get(path, DEFAULT_DENY)
            if isinstance(cell, Release):
                released[path] = cell
            else:
                withheld[path] = cell
        return self._decision(partner, released, withheld, onward)

    def _marking(  # noqa: PLR0911 - one return per marking, in checklist order
        self, partner: str, originator: str, tlp: str, rel_to: Iterable[str] | None, onward: bool
    ) -> str | None:
        allowed = None if rel_to is None else frozenset(rel_to)
        if partner == self.member:
            return SELF
        if partner == originator:
            return ORIGINATOR
        if onward:
            if tlp == "RED":
                return ONWARD_RED
            if tlp == "AMBER+STRICT":
                return ONWARD_STRICT
            if tlp == "AMBER" and (allowed is None or partner not in allowed):
                return ONWARD_AMBER
        if allowed is not None and partner not in allowed:
            return REL_TO
        return None

    def _decision(
        self, partner: str, released: dict[str, Release], withheld: dict[str, str], onward: bool
    ) -> Decision:
        return Decision(
            partner=partner,
            released=MappingProxyType(released),
            withheld=MappingProxyType(withheld),
            policy_digest=self.digest,
            onward=onward,
        )


def load_policy(text: str, *, member: str, source: str = "<policy>") -> Policy:
    """Parse and check policy ``text`` for ``member``; return the ``Policy``.

    Raises ``PolicyError`` with ``<source>:<line>: <reason>`` for the first
    problem ``check_policy`` finds, so a broken policy never decides anything.
    """
    spec, problems = read_policy(text, member=member)
    if spec is None or problems:
        first = problems[0]
        raise PolicyError(f"{source}:{first.line}: {first.reason}")
    return Policy(spec, text=text, source=source)


def variants(
    sighting: SightingModel,
    decisions: Iterable[Decision],
    pseudonym_keys: Mapping[str, bytes],
) -> dict[str, Any]:
    """The transformed values the decisions need, by disclosure key (``path#<transform>``).

    The envelope signs each as its own disclosure. Raises ``KeyMaterialError``
    if a pseudonym key is not in ``pseudonym_keys``, and ``PolicyError`` if a
    transform produces a value of the wrong shape (it then is not sent).
    """
    present = leaf_values(sighting)
    out: dict[str, Any] = {}
    for decision in decisions:
        for release in decision.released.values():
            transform = release.transform
            key = release.disclosure_key
            if transform is None or key in out:
                continue
            if transform.name == "pseudonym" and str(transform.param) not in pseudonym_keys:
                raise KeyMaterialError(f"pseudonym key {transform.param!r} is not loaded")
            try:
                value = transform.apply(
                    present[release.path], pseudonym_keys=pseudonym_keys, path=release.path
                )
                transform.check_output(value)
            except ValueError as exc:
                raise PolicyError(
                    f"transform {transform.ident} of {release.path} failed: {exc}"
                ) from exc
            out[key] = value
    return out
