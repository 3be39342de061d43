"""The docs say what the code does: commands, options, metrics, config keys, log events.

Pure: reads README.md and docs/*.md, the click command tree, a fresh ``Metrics``
registry, the config model and the source's log calls; starts no hub or node.
Each test names the mismatches it finds, so a doc or code change that drifts
says where.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from annotated_types import Ge, Le
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel

from broker import feeds
from broker.cli import main as msmt
from broker.config import ENV_OVERRIDES, NodeConfig
from broker.hubusage import AccountUsage, StreamUsage, usage_registry
from broker.metrics import Metrics
from broker.store import Store

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NODE_MD = ROOT / "docs" / "NODE.md"


def _commands() -> dict[tuple[str, ...], click.Command]:
    found: dict[tuple[str, ...], click.Command] = {}

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        found[path] = cmd
        if isinstance(cmd, click.Group):
            # As msmt itself looks them up: the top group loads each family then.
            ctx = click.Context(cmd)
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None, (*path, name)
                walk(sub, (*path, name))

    walk(msmt, ())
    return found


def _options(cmd: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in cmd.params:
        if isinstance(param, click.Option):
            names.update(param.opts, param.secondary_opts)
    return names


def _code_snippets(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every code span, fenced or indented code line."""
    fenced = False
    for number, line in enumerate(text.replace("\\\n", " ").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            yield number, re.sub(r"(^|\s)#.*", "", line)  # a shell comment is prose
        else:
            for span in re.finditer(r"`([^`]+)`", line):
                yield number, span.group(1)


def _help_snippets() -> Iterator[tuple[str, str]]:
    """(command, text) of each code span and parenthesised ``(msmt ...)`` in the --help texts."""
    for path, cmd in _commands().items():
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            flat = " ".join(text.split())
            for span in [*re.findall(r"`([^`]+)`", flat), *re.findall(r"\((msmt [^)]*)\)", flat)]:
                yield f"msmt {' '.join(path)} --help", span


def _invocations() -> Iterator[tuple[str, str, list[str]]]:
    """(where, rest of the command line, words after msmt) of each ``msmt ...`` shown."""
    snippets = [
        (f"{doc.name}:{number}", snippet)
        for doc in DOCS
        for number, snippet in _code_snippets(doc.read_text(encoding="utf-8"))
    ]
    for where, snippet in [*snippets, *_help_snippets()]:
        for part in re.split(r"\|\||&&|;|\||\$\(", snippet):
            for m in re.finditer(r"(?:^|[\s/(])msmt(?=\s|$)((?:\s+[a-z][a-z0-9-]*)*)(.*)", part):
                yield where, m.group(2), m.group(1).split()


def test_every_documented_command_and_option_exists() -> None:
    commands = _commands()
    wrong, seen = [], 0
    for where, rest, words in _invocations():
        seen += 1
        path: tuple[str, ...] = ()
        for word in words:
            if (*path, word) not in commands:
                break
            path = (*path, word)
        cmd = commands[path]
        extra = words[len(path) :]
        if isinstance(cmd, click.Group) and extra:
            wrong.append(f"{where}: msmt {' '.join(words)}: no such command")
        for option in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", " ".join(extra) + rest):
            if option not in _options(cmd):
                wrong.append(f"{where}: msmt {' '.join(path)} has no option {option}")
    assert seen > 200  # the pattern still finds the docs' command lines
    assert wrong == []


def test_every_option_says_what_it_does() -> None:
    # An option with no help text is documented nowhere an operator looks first.
    silent = [
        f"msmt {' '.join(path)} {param.opts[0]}"
        for path, cmd in _commands().items()
        for param in cmd.params
        if isinstance(param, click.Option) and not param.help and param.opts != ["--version"]
    ]
    assert silent == []


_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "info": ("_info",),
    "histogram": ("", "_bucket", "_sum", "_count"),
}


def _exposed(metrics: Metrics) -> dict[str, set[str]]:
    """Every sample name the registry can expose, with its metric's label names."""
    names: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in _SUFFIXES[str(metric._type)]:
                names[metric._name + suffix] = set(metric._labelnames)
            # An info metric's labels are its value: the ones it was given.
            for family in metric.collect() if metric._type == "info" else ():
                for got in family.samples:
                    names[got.name] |= set(got.labels)
    return names


# Identifiers of the envelope and roster formats that share the prefix (docs/ENVELOPE.md,
# docs/KEYS.md): not metrics. Each must still be in the code (checked below).
NOT_METRICS = {
    "msmt_from",
    "msmt_to",
    "msmt_rid",
    "msmt_member",
    "msmt_policy",
    "msmt_schema",
    "msmt_version",
    "msmt_status",
    "msmt_issued_at",
    "msmt_valid_from",
    "msmt_valid_until",
    "msmt_retired_at",
    "msmt_revoked_at",
    "msmt_revoked_reason",
    "msmt_nats_user",
}


def _hub_exposed() -> dict[str, set[str]]:
    """What ``msmt nats usage --textfile`` writes for the hub (docs/DEPLOY.md), with labels."""
    stream = StreamUsage("INBOX_JPN", 1, 2, 3)
    names: dict[str, set[str]] = {}
    usage = AccountUsage("JPN", 2, 10, (stream,), ("INBOX_JPN",))
    for family in usage_registry([usage], 0.0).collect():
        for got in family.samples:
            names.setdefault(got.name, set()).update(got.labels)
    return names


def test_every_documented_metric_and_label_exists() -> None:
    exposed = _exposed(Metrics("JPN")) | _hub_exposed()
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "broker").rglob("*.py"))
    assert all(f'"{name}"' in source for name in NOT_METRICS)
    wrong = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"\b(msmt_[a-z0-9_]+)(\{[^}]*\})?", text):
            name, labels = m.group(1), m.group(2)
            where = f"{doc.name}:{text.count(chr(10), 0, m.start()) + 1}"
            if name in NOT_METRICS:
                continue
            if name not in exposed:
                wrong.append(f"{where}: no metric {name}")
                continue
            for label in re.findall(r"([a-z_]+)\s*(?:=~?|,|\})", labels or ""):
                if label not in exposed[name]:
                    wrong.append(f"{where}: {name} has no label {label}")
    assert wrong == []


def test_node_md_lists_every_metric() -> None:
    text = NODE_MD.read_text(encoding="utf-8")
    families = {
        n for n in _exposed(Metrics("JPN")) if not n.endswith(("_bucket", "_sum", "_count"))
    }
    assert sorted(n for n in families if f"`{n}" not in text) == []


def test_documented_increase_alerts_have_a_sample_before_the_first_event() -> None:
    # increase() sees nothing of a series born at 1 (broker/metrics.py): every alert
    # the docs give on a counter's increase must read series exported at 0.
    metrics = Metrics("JPN")
    exported = {
        (s.name, tuple(sorted(s.labels.items())))
        for f in metrics.registry.collect()
        for s in f.samples
    }
    alerts = re.findall(
        r"increase\((msmt_[a-z_]+)(?:\{([^}]*)\})?\[", (ROOT / "docs" / "DEPLOY.md").read_text()
    )
    assert alerts
    for name, selector in alerts:
        wanted = dict(re.findall(r'([a-z_]+)=~?"([^"]*)"', selector.replace("\\|", "|")))
        for label, pattern in wanted.items():
            for value in pattern.split("|"):
                assert any(
                    n == name and dict(labels).get(label) == value for n, labels in exported
                ), f"{name}{{{label}={value!r}}} is not exported at 0"
        if not wanted:
            assert any(n == name for n, _ in exported), f"{name} is not exported at 0"


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading``, as cells without backticks."""
    after = text[text.index(heading) :]
    rows = []
    for line in after.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif rows:
            break
    return rows[2:]


def test_env_table_is_the_code_overrides() -> None:
    rows = _table(NODE_MD.read_text(encoding="utf-8"), "### Environment overrides")
    documented = {row[0].strip("`"): row[1].split("`")[1] for row in rows}
    assert documented == {name: ".".join(keys) for name, keys in ENV_OVERRIDES.items()}


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, object]]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaf_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_config_table_has_every_key_with_its_default_and_range() -> None:
    rows = _table(NODE_MD.read_text(encoding="utf-8"), "## Configuration: `node.toml`")
    documented = {row[0].strip("`"): row for row in rows}
    fields = dict(_leaf_fields(NodeConfig))
    assert sorted(documented) == sorted(fields)
    for key, field in fields.items():
        if not key.startswith("limits."):
            continue
        _, default, meaning = documented[key]
        assert int(default) == field.default, key  # type: ignore[attr-defined]
        low = next(m.ge for m in field.metadata if isinstance(m, Ge))  # type: ignore[attr-defined]
        high = next(m.le for m in field.metadata if isinstance(m, Le))  # type: ignore[attr-defined]
        assert f"({low} to {high}" in meaning, key
    assert documented["metrics.listen"][1] == f"`{fields['metrics.listen'].default}`"  # type: ignore[attr-defined]
    assert documented["intake.shared_token"][1] == "`true`"


_DYNAMIC_EVENTS = {
    # log.warning(f"{what}_refused") in broker/auditnet_base.py
    "cosignature_refused",
    "checkpoint_refused",
    # PlanLoop._replanned(made, ..., dropped_event, ...) in broker/planloop.py
    "envelopes_signed_again",
    "not_signed_again",
    "envelopes_planned_for_waiting_partners",
    "not_planned",
}
_LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def _logged_events() -> tuple[set[str], int]:
    """Event names the code logs as literals, and how many log calls name theirs otherwise."""
    literal, dynamic = set(), 0
    for path in (ROOT / "broker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LEVELS
                and node.args
            ):
                continue
            event = node.args[1 if node.func.attr == "log" and len(node.args) > 1 else 0]
            if isinstance(event, ast.Constant) and isinstance(event.value, str):
                if re.fullmatch(r"[a-z]+(_[a-z]+)*", event.value):
                    literal.add(event.value)
            elif not isinstance(event, ast.Dict):  # a Prometheus Info's .info({...})
                dynamic += 1
    return literal, dynamic


def test_log_events_table_is_every_event_the_code_logs() -> None:
    rows = _table(NODE_MD.read_text(encoding="utf-8"), "## Log events")
    documented = {name for row in rows for name in re.findall(r"`([a-z_]+)`", row[0])}
    literal, dynamic = _logged_events()
    # A new log call naming its event from a variable must be added to _DYNAMIC_EVENTS.
    assert dynamic == 3
    planloop_py = (ROOT / "broker" / "planloop.py").read_text(encoding="utf-8")
    assert all(f'"{e}"' in planloop_py for e in _DYNAMIC_EVENTS if not e.endswith("_refused"))
    assert sorted(literal - documented) == []  # logged, not in the table
    assert sorted(documented - literal - _DYNAMIC_EVENTS) == []  # in the table, never logged


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cross_references_point_somewhere(doc: Path) -> None:
    def sections(path: Path) -> list[str]:
        text = path.read_text(encoding="utf-8")
        heads = re.findall(r"^#+\s+(.*)$", text, re.M)
        leads = re.findall(r"\*\*([^*]+?)\.?\*\*", text)  # a bold paragraph lead names one too
        return [" ".join(h.split()).lower() for h in heads + leads]

    text = doc.read_text(encoding="utf-8")
    wrong = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target, _, anchor = m.group(1).partition("#")
        if target.startswith("http"):
            continue
        path = (doc.parent / target) if target else doc
        if not path.exists():
            wrong.append(f"link to {m.group(1)}: no such file")
        elif anchor and anchor not in [
            _slug(h) for h in re.findall(r"^#+\s+(.*)$", path.read_text(encoding="utf-8"), re.M)
        ]:
            wrong.append(f"link to {m.group(1)}: no such heading")
    flat = " ".join(text.split())
    for m in re.finditer(r'(docs/[A-Z]+\.md|bench/README\.md),?\s+(?:section\s+)?"([^"]+)"', flat):
        path, section = ROOT / m.group(1), " ".join(m.group(2).split()).lower()
        if not path.exists():
            wrong.append(f"{m.group(1)}: no such file")
        elif not any(section in s for s in sections(path)):
            wrong.append(f'{m.group(1)}, "{m.group(2)}": no such section')
    for name in set(re.findall(r"\bdocs/[A-Za-z]+\.md", text)):
        if not (ROOT / name).exists():
            wrong.append(f"{name}: no such file")
    assert wrong == []


def test_status_json_keys_are_named_in_node_md(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What msmt status --json gives on a node's store, against what docs/NODE.md names.
    (tmp_path / "data").mkdir(mode=0o700)
    Store(tmp_path / "data" / "node.sqlite3").close()
    config = tmp_path / "node.toml"
    config.write_text(
        f'member = "JPN"\npolicy = "{ROOT / "nodes" / "JPN" / "policy.toml"}"\n'
        'data_dir = "data"\n[nats]\nurls = ["nats://127.0.0.1:1"]\n[keys]\ndir = "keys"\n',
        encoding="utf-8",
    )
    callback = _commands()[("status",)].callback
    assert callback is not None
    callback(config_path=config, as_json=True)
    shown = set(json.loads(capsys.readouterr().out))
    shown |= {
        key for figures in feeds.usage({"feed.socket.accepted": 1}, {}).values() for key in figures
    }
    text = NODE_MD.read_text(encoding="utf-8")
    assert len(shown) > 20
    assert sorted(key for key in shown if f"`{key}`" not in text) == []
