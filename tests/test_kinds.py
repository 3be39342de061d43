"""Every report kind is wired in everywhere a kind needs to be (pure, no hub).

Written by a trial that added a kind end to end (coal exports) and found that nothing
told it of half the places, nor failed when one was left out.

A kind is declared once, in ``broker.sightings`` (``KINDS``, its models); these
tests fail if one is added there but left out of a place that lists kinds or
their fields by hand: the schema files and examples, the sample generator, the
feed's error paths, the transforms' field sets, the STIX mapping, the demo's
timeline and the docs' tables.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from broker import samples, sightings, transforms, validation
from broker.demo_report import KIND_COLOURS
from broker.sightings import KINDS, SIGHTING_ADAPTER, field_paths, leaf_values
from broker.stix import ReceivedReport, bundle

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_has_a_schema_file_and_an_example(kind: str) -> None:
    assert (ROOT / "schemas" / f"{kind}.schema.json").is_file()
    example = json.loads((ROOT / "schemas" / "examples" / f"{kind}.json").read_text())
    assert example["kind"] == kind
    SIGHTING_ADAPTER.validate_json(json.dumps(example))


def test_the_sample_feed_has_every_kind() -> None:
    made = {r["kind"] for r in samples.generate(len(KINDS) * 2, seed=1)}
    assert made == set(KINDS)
    feed = (ROOT / "samples" / "feed.ndjson").read_text().splitlines()
    assert {json.loads(line)["kind"] for line in feed} == set(KINDS)


def test_the_invalid_records_break_a_rule_of_every_kind() -> None:
    broken = {path.partition(".")[0] for _rule, path, _rec in samples.invalid_records()}
    assert set(KINDS) <= broken


@pytest.mark.parametrize("kind", KINDS)
def test_a_feed_error_names_the_field_as_written(kind: str) -> None:
    # pydantic puts the union's tag in the location; the feed's path has it once.
    record = samples.example_records()[kind]
    body = record[kind]
    name = next(n for n, v in body.items() if isinstance(v, str))
    bad = samples.edited(record, f"{kind}.{name}", 12)
    with pytest.raises(validation.InvalidRecordError) as info:
        validation.parse_record(json.dumps(bad))
    assert [p.path for p in info.value.problems] == [f"{kind}.{name}"]


def _schema_of(model: type[BaseModel], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = model.model_json_schema()["properties"][name]
    first: dict[str, Any] = schema["anyOf"][0] if "anyOf" in schema else schema
    return first


def _body_fields() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for kind, models in sightings._BODY_MODELS.items():
        for model in models:
            for name in model.model_fields:
                out.append((kind, f"{kind}.{name}", _schema_of(model, name)))
    return out


def test_every_amount_can_be_rounded_and_every_position_coarsened() -> None:
    # By the field's type, not its name: a positive decimal is an amount, a
    # Position (lat and lon) a place.
    for _kind, path, schema in _body_fields():
        if schema.get("pattern") == sightings._POSITIVE_PATTERN:
            assert path in transforms.AMOUNT_PATHS, path
        if schema.get("$ref", "").endswith("/Position"):
            assert path in transforms.POSITION_PATHS, path


def test_every_imo_number_can_be_pseudonymised() -> None:
    for _kind, path, schema in _body_fields():
        if schema.get("pattern") == "^[0-9]{7}$":
            assert path in transforms.PSEUDONYM_PATHS, path


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_maps_to_stix_objects_of_its_own(kind: str) -> None:
    record = samples.example_records()[kind]
    fields = leaf_values(SIGHTING_ADAPTER.validate_python(record, strict=False))
    when = datetime(2026, 11, 2, tzinfo=UTC)
    report = ReceivedReport(record["report_id"], "JPN", kind, "GREEN", None, when, when, fields)
    types = {o["type"] for o in bundle([report])["objects"]}
    # A kind with no mapping would export as a bare report.
    assert types - {"identity", "extension-definition", "marking-definition", "report"}


def test_the_demo_timeline_has_a_colour_for_every_kind() -> None:
    assert set(KIND_COLOURS) == set(KINDS)


def _table_rows(text: str, first_cell: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |")]


@pytest.mark.parametrize("kind", KINDS)
def test_policy_md_lists_the_field_paths_of_each_kind(kind: str) -> None:
    text = (DOCS / "POLICY.md").read_text()
    (row,) = _table_rows(text, f"`{kind}`")
    listed = re.findall(r"`([a-z_.]+)`", row.split("|")[2])
    common = [p for p in field_paths(kind) if not p.startswith(f"{kind}.")]
    assert listed == [p for p in field_paths(kind) if p not in common]


def test_policy_md_transform_table_is_the_code() -> None:
    text = (DOCS / "POLICY.md").read_text()
    for name, paths in (
        ("round", transforms.AMOUNT_PATHS),
        ("coarsen", transforms.POSITION_PATHS),
        ("pseudonym", transforms.PSEUDONYM_PATHS),
    ):
        (row,) = [ln for ln in text.splitlines() if ln.startswith(f"| `{name}:")]
        assert set(re.findall(r"`([a-z_]+\.[a-z_]+)`", row)) == set(paths), name


@pytest.mark.parametrize(
    ("doc", "row"),
    [("ENVELOPE.md", "| `kind` | string |"), ("STIX.md", "| `kind` |")],
)
def test_the_docs_kind_rows_name_every_kind(doc: str, row: str) -> None:
    (line,) = [ln for ln in (DOCS / doc).read_text().splitlines() if ln.startswith(row)]
    for kind in KINDS:
        assert f"`{kind}`" in line, (doc, kind)
