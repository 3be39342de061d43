"""The policy file: TOML text in, a validated ``PolicySpec`` (or numbered problems) out.

This module only reads and checks the file's structure and names; what a rule
releases to whom is decided in ``broker.policy``. The format is documented in
``docs/POLICY.md``. Pure code: text in, values out.

TOML parsers report no positions for values, so ``_Locator`` finds line numbers
with a light scan of the source: it tracks table headers (counting ``[[rules]]``
entries), the line of each ``key =``, and the lines a multi-line value spans,
and finds a list element by looking for its quoted text within that span. It
is used only to point at lines in error messages, never to read values.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

import rfc8785

from broker.members import MEMBERS, is_member
from broker.sightings import KINDS, SOURCE_AND_METHOD_PATHS, TLP, field_paths
from broker.transforms import Transform

FORMAT: Final = "msmt-policy/1"
"""The ``format`` member of the normalized form; changes if its meaning changes."""

TLP_LABELS: Final[tuple[str, ...]] = get_args(TLP)
ALL_GROUP: Final = "MSMT"
ALL_PATHS: Final = frozenset(p for kind in KINDS for p in field_paths(kind))
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\[\]-]{0,63}")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]{0,63}")
_RULE_KEYS: Final = frozenset(
    {"name", "kinds", "partners", "tlp", "release", "withhold", "transforms"}
)
_TOP_KEYS: Final = frozenset({"version", "member", "groups", "pseudonym_keys", "rules"})

Effect = Literal["release", "withhold"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a policy file, at a 1-based line."""

    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: for these kinds, partners and TLP labels, release or withhold these fields.

    ``members`` is every partner the rule reaches (groups expanded, the policy's
    own member removed); ``named`` is the subset named by trigraph, which is what
    a TLP:RED release requires.
    """

    index: int
    name: str
    kinds: tuple[str, ...]
    partners: tuple[str, ...]
    members: frozenset[str]
    named: frozenset[str]
    tlp: tuple[str, ...]
    effect: Effect
    fields: tuple[str, ...]
    transforms: Mapping[str, Transform] = field(default_factory=dict)

    def covers(self, path: str) -> bool:
        """Whether a field pattern of this rule matches ``path`` (wildcards included)."""
        return any(_matches(pattern, path) for pattern in self.fields)

    def releases(self, path: str) -> bool:
        """Whether this rule, if a release rule, releases ``path``.

        Source-and-method fields are released only when named exactly; a
        wildcard never releases them.
        """
        if self.effect != "release":
            return False
        if path in SOURCE_AND_METHOD_PATHS:
            return path in self.fields
        return self.covers(path)

    def normalized(self) -> dict[str, Any]:
        """The rule in the normalized JSON form (see docs/POLICY.md)."""
        return {
            "name": self.name,
            "kinds": list(self.kinds),
            "partners": list(self.partners),
            "tlp": list(self.tlp),
            "effect": self.effect,
            "fields": list(self.fields),
            "transforms": {p: t.ident for p, t in sorted(self.transforms.items())},
        }


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A structurally valid policy: member, groups, pseudonym keys and rules in file order."""

    member: str
    groups: Mapping[str, tuple[str, ...]]
    pseudonym_keys: Mapping[str, frozenset[str]]
    rules: tuple[Rule, ...]

    def normalized(self) -> dict[str, Any]:
        """The normalized JSON form whose RFC 8785 bytes are hashed into the digest."""
        return {
            "format": FORMAT,
            "member": self.member,
            "groups": {name: list(members) for name, members in sorted(self.groups.items())},
            "pseudonym_keys": {
                key: {"partners": sorted(partners)}
                for key, partners in sorted(self.pseudonym_keys.items())
            },
            "rules": [rule.normalized() for rule in self.rules],
        }

    def digest(self) -> str:
        """Hex SHA-256 over the RFC 8785 bytes of the normalized form."""
        return hashlib.sha256(rfc8785.dumps(self.normalized())).hexdigest()


def _matches(pattern: str, path: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return path.startswith(pattern[:-1])
    return pattern == path


_KEY_PART = re.compile(r"""\s*([A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')\s*""")


def _key_path(text: str) -> tuple[list[str], int] | None:
    """Parse a (dotted) TOML key at the start of ``text``: its parts and where it ends."""
    parts: list[str] = []
    pos = 0
    while True:
        match = _KEY_PART.match(text, pos)
        if match is None:
            return None
        token = match.group(1)
        parts.append(token[1:-1] if token[0] in "\"'" else token)
        pos = match.end()
        if pos < len(text) and text[pos] == ".":
            pos += 1
            continue
        return parts, pos


def _depth_change(line: str) -> int:
    depth = 0
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote and (quote == "'" or line[i - 1] != "\\"):
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#":
            break
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
    return depth


def toml_lines(text: str) -> list[str]:
    """``text``'s lines as TOML counts them: ended by LF or CR LF only.

    Not ``str.splitlines``, which also ends one at U+2028, U+0085, a form feed and
    the like, inside a comment or string, and then named the line after the right one.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


class _Locator:
    """Line numbers for keys, tables and list elements of a TOML source (see module doc)."""

    def __init__(self, text: str) -> None:
        self.lines = toml_lines(text)
        self.keys: dict[tuple[str | int, ...], tuple[int, int]] = {}
        arrays: dict[tuple[str | int, ...], int] = {}
        table: tuple[str | int, ...] = ()
        depth = 0
        start: tuple[str | int, ...] | None = None
        for number, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            if depth > 0:
                depth += _depth_change(line)
                if start is not None and depth <= 0:
                    self.keys[start] = (self.keys[start][0], number)
                continue
            header = re.match(r"^\[(\[?)(.+?)\]?\]\s*(#.*)?$", line)
            if header and not re.match(r"^\[[^\]]*=", line):
                parsed = _key_path(header.group(2))
                if parsed is None:
                    continue
                table = (*self._resolve(tuple(parsed[0][:-1]), arrays), parsed[0][-1])
                if not header.group(1) and table in arrays:
                    table = (*table, arrays[table] - 1)
                if header.group(1):
                    index = arrays.get(table, 0)
                    arrays[table] = index + 1
                    table = (*table, index)
                self.keys.setdefault(table, (number, number))
                continue
            parsed = _key_path(line)
            if parsed is None or not line[parsed[1] :].startswith("="):
                continue
            start = (*table, *parsed[0])
            self.keys[start] = (number, number)
            depth = _depth_change(line[parsed[1] + 1 :])

    @staticmethod
    def _resolve(
        parts: tuple[str, ...], arrays: Mapping[tuple[str | int, ...], int]
    ) -> tuple[str | int, ...]:
        # [rules.transforms] after [[rules]] belongs to the latest rules entry.
        out: tuple[str | int, ...] = ()
        for part in parts:
            out = (*out, part)
            if out in arrays:
                out = (*out, arrays[out] - 1)
        return out

    def line(self, *path: str | int, needle: str | None = None) -> int:
        """The line of ``path`` (or of ``needle`` in its value); falls back to its parents."""
        for cut in range(len(path), 0, -1):
            span = self.keys.get(path[:cut])
            if span is None:
                continue
            if needle is not None:
                bare = re.compile(rf"(^|[\s{{,]){re.escape(needle)}\s*=")
                for number in range(span[0], span[1] + 1):
                    text = self.lines[number - 1]
                    if f'"{needle}"' in text or f"'{needle}'" in text or bare.search(text):
                        return number
            return span[0]
        return 1


class _Reader:
    """Collects problems while turning the parsed TOML into a ``PolicySpec``."""

    def __init__(self, text: str, member: str | None) -> None:
        self.loc = _Locator(text)
        self.expected = member
        self.problems: list[Problem] = []
        # Group names refused where they are declared: a rule naming one is not told
        # again that the group is unknown (a policy officer's trial found it misleading).
        self.refused_groups: set[str] = set()

    def fail(self, line: int, reason: str) -> None:
        self.problems.append(Problem(line, reason))

    def strings(self, value: object, where: tuple[str | int, ...], what: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(self.loc.line(*where), f"{what} must be a list of strings")
            return []
        for item in {v for v in value if value.count(v) > 1}:
            self.fail(self.loc.line(*where, needle=item), f"{what} lists {item!r} twice")
        return list(dict.fromkeys(value))

    def read(self, data: Mapping[str, Any]) -> PolicySpec | None:
        for key in sorted(set(data) - _TOP_KEYS):
            self.fail(self.loc.line(key), f"unknown setting {key!r}")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version != 1:
            self.fail(self.loc.line("version"), "the policy must say version = 1")
        member = data.get("member")
        if member is None:
            self.fail(self.loc.line("member"), 'the policy must say whose it is: member = "JPN"')
            member = self.expected or MEMBERS[0]
        elif not isinstance(member, str) or not is_member(member):
            self.fail(self.loc.line("member"), f"member must be a member trigraph, not {member!r}")
            member = self.expected or MEMBERS[0]
        elif self.expected is not None and member != self.expected:
            self.fail(self.loc.line("member"), f"this is {member}'s policy, not {self.expected}'s")
        groups = self.groups(data.get("groups", {}))
        keys = self.pseudonym_keys(data.get("pseudonym_keys", {}), groups, member)
        rules_data = data.get("rules", [])
        if not isinstance(rules_data, list) or not all(isinstance(r, dict) for r in rules_data):
            self.fail(self.loc.line("rules"), "rules must be an array of tables ([[rules]])")
            rules_data = []
        rules = [self.rule(i, r, groups, member) for i, r in enumerate(rules_data)]
        names: dict[str, int] = {}
        for rule in rules:
            if rule is not None and names.setdefault(rule.name, rule.index) != rule.index:
                self.fail(
                    self.loc.line("rules", rule.index, "name"),
                    f"rule name {rule.name!r} is used twice",
                )
        if self.problems:
            return None
        return PolicySpec(member, groups, keys, tuple(r for r in rules if r is not None))

    def groups(self, data: object) -> dict[str, tuple[str, ...]]:
        if not isinstance(data, dict):
            self.fail(self.loc.line("groups"), "groups must be a table of name = [members]")
            return {}
        out: dict[str, tuple[str, ...]] = {}
        folded: dict[str, str] = {}
        for name, members in data.items():
            where = ("groups", name)
            # Case is not enough to tell names apart: a group "kor" of USA would read
            # as KOR in a rule, and "EU" beside "eu" as one group.
            upper = name.upper()
            if upper == ALL_GROUP or is_member(upper) or not _NAME.fullmatch(name):
                self.fail(self.loc.line(*where), f"{name!r} cannot be a group name")
                self.refused_groups.add(name)
                continue
            if upper in folded:
                self.fail(
                    self.loc.line(*where),
                    f"group {name} differs from group {folded[upper]} only in case",
                )
                self.refused_groups.add(name)
                continue
            folded[upper] = name
            if not isinstance(members, list):
                self.fail(self.loc.line(*where), f"group {name} must be a list of strings")
                continue
            listed = self.strings(members, where, f"group {name}")
            for code in listed:
                if not is_member(code):
                    self.fail(
                        self.loc.line(*where, needle=code),
                        f"unknown member {code!r} in group {name}",
                    )
            if not members:
                self.fail(self.loc.line(*where), f"group {name} is empty")
            out[name] = tuple(sorted(c for c in listed if is_member(c)))
        return out

    def partners(
        self, names: list[str], where: tuple[str | int, ...], groups: Mapping[str, tuple[str, ...]]
    ) -> tuple[frozenset[str], frozenset[str]]:
        members: set[str] = set()
        named: set[str] = set()
        for name in names:
            if name == ALL_GROUP:
                members.update(MEMBERS)
            elif name in groups:
                members.update(groups[name])
            elif is_member(name):
                members.add(name)
                named.add(name)
            elif name not in self.refused_groups:
                self.fail(self.loc.line(*where, needle=name), f"unknown partner or group {name!r}")
        return frozenset(members), frozenset(named)

    def pseudonym_keys(
        self, data: object, groups: Mapping[str, tuple[str, ...]], member: str
    ) -> dict[str, frozenset[str]]:
        if not isinstance(data, dict):
            self.fail(self.loc.line("pseudonym_keys"), "pseudonym_keys must be tables")
            return {}
        out: dict[str, frozenset[str]] = {}
        for key_id, entry in data.items():
            where = ("pseudonym_keys", key_id)
            try:
                Transform.parse(f"pseudonym:{key_id}")
            except ValueError as exc:
                self.fail(self.loc.line(*where), str(exc))
                continue
            if not isinstance(entry, dict) or set(entry) != {"partners"}:
                self.fail(
                    self.loc.line(*where),
                    f"pseudonym key {key_id!r} needs exactly partners = [...]",
                )
                continue
            names = self.strings(entry["partners"], (*where, "partners"), "partners")
            members, _ = self.partners(names, (*where, "partners"), groups)
            # Who holds the key; may be nobody else. A holder can test guesses against
            # the pseudonyms it receives, a partner without the key can only link them.
            out[key_id] = members - {member}
        return out

    def rule(
        self, index: int, data: dict[str, Any], groups: Mapping[str, tuple[str, ...]], member: str
    ) -> Rule | None:
        before = len(self.problems)
        where: tuple[str | int, ...] = ("rules", index)
        for key in sorted(set(data) - _RULE_KEYS):
            self.fail(self.loc.line(*where, key), f"unknown rule setting {key!r}")
        name = data.get("name", f"rules[{index}]")
        if not isinstance(name, str) or not _RULE_NAME.fullmatch(name):
            # No spaces or colons, so a rule name never reads like a marking reason.
            self.fail(
                self.loc.line(*where, "name"),
                "rule name must be 1-64 letters, digits, '_', '.', '+', '-', '[' or ']'",
            )
        if "kinds" not in data or "partners" not in data:
            self.fail(self.loc.line(*where), "a rule needs kinds = [...] and partners = [...]")
            return None
        kinds = self.strings(data["kinds"], (*where, "kinds"), "kinds")
        self.not_empty(data["kinds"], (*where, "kinds"), "kinds")
        if kinds == ["*"]:
            kinds = list(KINDS)
        for kind in list(kinds):
            if kind not in KINDS:
                kinds.remove(kind)
                self.fail(
                    self.loc.line(*where, "kinds", needle=kind),
                    f'unknown report kind {kind!r} (kinds: {", ".join(KINDS)}, or "*")',
                )
        partner_names = self.strings(data["partners"], (*where, "partners"), "partners")
        self.not_empty(data["partners"], (*where, "partners"), "partners")
        members, named = self.partners(partner_names, (*where, "partners"), groups)
        if ("release" in data) == ("withhold" in data):
            self.fail(
                self.loc.line(*where),
                "a rule needs exactly one of release = [...] or withhold = [...]",
            )
            return None
        effect: Effect = "release" if "release" in data else "withhold"
        default_tlp = [t for t in TLP_LABELS if t != "RED"] if effect == "release" else TLP_LABELS
        tlp = self.strings(data.get("tlp", list(default_tlp)), (*where, "tlp"), "tlp")
        # An empty list is not "any": a rule that matches nothing is refused, since
        # an inert withhold rule would send what the officer meant to keep back.
        self.not_empty(data.get("tlp", default_tlp), (*where, "tlp"), "tlp")
        for label in tlp:
            if label not in TLP_LABELS:
                self.fail(
                    self.loc.line(*where, "tlp", needle=label),
                    f"unknown TLP label {label!r} (labels: {', '.join(TLP_LABELS)})",
                )
        fields = self.strings(data[effect], (*where, effect), effect)
        self.not_empty(data[effect], (*where, effect), effect)
        for pattern in fields:
            self.field_pattern(pattern, effect, kinds, (*where, effect))
        transforms = self.transforms(data.get("transforms", {}), where, effect, fields, kinds)
        if len(self.problems) > before:
            return None
        return Rule(
            index=index,
            name=str(name),
            kinds=tuple(sorted(kinds)),
            partners=tuple(sorted(partner_names)),
            members=members - {member},
            named=named - {member},
            tlp=tuple(sorted(tlp)),
            effect=effect,
            fields=tuple(sorted(fields)),
            transforms=MappingProxyType(transforms),
        )

    def field_pattern(
        self, pattern: str, effect: Effect, kinds: list[str], where: tuple[str | int, ...]
    ) -> None:
        line = self.loc.line(*where, needle=pattern)
        head = pattern[:-2] if pattern.endswith(".*") else pattern
        if pattern != "*" and not any(_matches(pattern, p) for p in ALL_PATHS):
            known = "a field path such as vessel.imo, a wildcard such as vessel.*, or *"
            self.fail(line, f"unknown field path {pattern!r} (expected {known})")
            return
        present = [p for k in kinds for p in field_paths(k) if _matches(pattern, p)]
        if not kinds:
            # Each kind unknown, and said so: "not a field of any reports" would be a
            # consequence, not another mistake (a policy officer's trial).
            return
        if not present:
            self.fail(
                line,
                f"rule can never match: {head!r} is not a field of "
                f"{' or '.join(kinds) or 'any'} reports",
            )
        elif (
            effect == "release"
            and pattern != head
            and all(p in SOURCE_AND_METHOD_PATHS for p in present)
        ):
            names = ", ".join(sorted(SOURCE_AND_METHOD_PATHS))
            self.fail(
                line,
                "rule can never match: a wildcard never releases source-and-method fields; "
                f"name them ({names})",
            )

    def not_empty(self, value: object, where: tuple[str | int, ...], what: str) -> None:
        if value == []:
            self.fail(self.loc.line(*where), f"rule can never match: {what} is empty")

    def transforms(
        self,
        data: object,
        where: tuple[str | int, ...],
        effect: Effect,
        fields: list[str],
        kinds: list[str],
    ) -> dict[str, Transform]:
        if not isinstance(data, dict):
            self.fail(
                self.loc.line(*where, "transforms"),
                'transforms must be a table of field = "transform"',
            )
            return {}
        out: dict[str, Transform] = {}
        for path, ident in data.items():
            line = self.loc.line(*where, "transforms", path, needle=path)
            if effect != "release":
                self.fail(line, "a withhold rule cannot have transforms")
                return {}
            if isinstance(ident, dict):
                # A bare dotted key (vessel.position = ...) is a nested table in TOML.
                dotted: list[str] = [path]
                inner: object = ident
                while isinstance(inner, dict) and len(inner) == 1:
                    key, inner = next(iter(inner.items()))
                    dotted.append(key)
                line = self.loc.line(*where, "transforms", *dotted)
                self.fail(line, f'quote the field path in transforms: "{".".join(dotted)}" = "…"')
                continue
            if path in _RULE_KEYS:
                # TOML puts every key after a [rules.transforms] header in that table.
                self.fail(
                    line,
                    f"{path!r} is inside the rule's transforms table: "
                    "write the rule's settings above [rules.transforms]",
                )
                continue
            if not isinstance(ident, str):
                self.fail(line, f'transform for {path!r} must be a string such as "coarsen:0.5"')
                continue
            transform = self.transform(path, ident, line, fields, kinds)
            if transform is not None:
                out[path] = transform
        return out

    def transform(
        self, path: str, ident: str, line: int, fields: list[str], kinds: list[str]
    ) -> Transform | None:
        try:
            transform = Transform.parse(ident)
        except ValueError as exc:
            self.fail(line, f"{path}: {exc}")
            return None
        if path not in ALL_PATHS:
            self.fail(line, f"unknown field path {path!r} in transforms")
        elif not transform.applies_to(path):
            self.fail(line, f"transform {ident!r} does not apply to {path}")
        elif not any(_matches(p, path) for p in fields):
            self.fail(line, f"transform for {path} but the rule does not release {path}")
        elif not kinds:
            pass  # every kind unknown, and said so: no kind to hold the path
        elif not any(path in field_paths(kind) for kind in kinds):
            # A wildcard release covers every path, but the rule applies only to its
            # kinds: this transform would never run, and another rule's raw release
            # of the field would go out instead of the reduced form.
            self.fail(
                line,
                f"transform for {path} but {path} is not a field of "
                f"{' or '.join(kinds) or 'any'} reports, the rule's kinds",
            )
        else:
            return transform
        return None


def read_policy(text: str, *, member: str | None) -> tuple[PolicySpec | None, list[Problem]]:
    """Parse and structurally check policy text; return the spec (if clean) and the problems.

    ``member``, if given, must be the file's own ``member``. Never raises for bad
    input: every problem comes back with its line, sorted by line.
    """
    if text.startswith("\ufeff"):
        # tomllib says only "Invalid statement" at line 1.
        return None, [
            Problem(
                1, "not valid TOML: starts with a byte order mark; save it as UTF-8 without one"
            )
        ]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"^(.*) \(at line (\d+), column \d+\)$", str(exc))
        if match:
            return None, [Problem(int(match.group(2)), f"not valid TOML: {match.group(1)}")]
        return None, [Problem(len(toml_lines(text.removesuffix("\n"))), f"not valid TOML: {exc}")]
    except RecursionError:  # arrays or inline tables nested deeper than tomllib's stack
        return None, [Problem(1, "not valid TOML: nested too deeply")]
    except ValueError:  # tomllib leaves int()'s refusal of over 4300 digits unwrapped
        return None, [Problem(1, "not valid TOML: an integer of over 4300 digits")]
    reader = _Reader(text, member)
    spec = reader.read(data)
    return spec, sorted(reader.problems, key=lambda p: p.line)


def locate(text: str) -> _Locator:
    """A line locator for ``text``, for problems found after structural checks."""
    return _Locator(text)
