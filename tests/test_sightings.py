"""Sighting models, the validator, the sample generator and the exported schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from broker import samples, schemas
from broker.cli import main
from broker.sightings import SIGHTING_ADAPTER, VesselSighting, field_paths, leaf_values
from broker.validation import InvalidRecordError, parse_record, validate_lines

ROOT = Path(__file__).parent.parent


def test_generated_records_are_all_valid_and_cover_every_kind() -> None:
    records = samples.generate(600, seed=11)
    kinds = {parse_record(json.dumps(r)).kind for r in records}
    assert kinds == {"vessel", "worker", "transfer"}
    categories = {r["transfer"]["category"] for r in records if r["kind"] == "transfer"}
    chains = {r["transfer"].get("chain") for r in records if r["kind"] == "transfer"}
    assert categories == {"crypto", "fuel"}
    assert {"bitcoin", "ethereum"} <= chains


def test_generator_is_deterministic_per_seed() -> None:
    assert samples.generate(20, seed=5) == samples.generate(20, seed=5)
    assert samples.generate(20, seed=5) != samples.generate(20, seed=6)


@pytest.mark.parametrize(
    ("rule", "path", "record"), samples.invalid_records(), ids=lambda v: str(v)[:20]
)
def test_each_invalid_record_is_refused_naming_its_field(
    rule: str, path: str, record: dict[str, object] | str
) -> None:
    raw = record if isinstance(record, str) else json.dumps(record)
    with pytest.raises(InvalidRecordError) as info:
        parse_record(raw)
    assert path in [p.path for p in info.value.problems], (rule, info.value.problems)


def test_bundled_sample_files_match_the_generator() -> None:
    # The committed sample feeds are what the generator makes; the demo and docs use them.
    feed = (ROOT / "samples/feed.ndjson").read_text()
    assert feed == samples.to_ndjson(samples.generate(300, seed=1))
    results = list(validate_lines((ROOT / "samples/invalid.ndjson").read_bytes().splitlines()))
    assert len(results) == len(samples.invalid_records())
    assert all(r.error is not None for r in results)


def test_models_are_frozen_and_forbid_extras() -> None:
    rec = samples.example_records()["vessel"]
    sighting = SIGHTING_ADAPTER.validate_python(json.loads(json.dumps(rec)), strict=False)
    assert isinstance(sighting, VesselSighting)
    with pytest.raises(ValidationError):
        sighting.tlp = "RED"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        VesselSighting.model_validate({**rec, "extra": 1})


def test_decimals_round_trip_exactly() -> None:
    rec = samples.example_records()["vessel"]
    rec["vessel"]["position"] = {"lat": "38.1250000", "lon": "-0.5"}
    out = parse_record(json.dumps(rec)).model_dump(mode="json")
    assert out["vessel"]["position"] == {"lat": "38.1250000", "lon": "-0.5"}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("vessel", "position", "lat"), "38.125\n"),
        (("vessel", "imo"), "9575565\n"),
        (("vessel", "mmsi"), "341462521\n"),
    ],
)
def test_a_trailing_newline_is_not_a_second_spelling(path: tuple[str, ...], value: str) -> None:
    # Python's "$" matches before a final newline; intake and receive must not
    # accept "38.125\n" beside "38.125" as the same value.
    rec = samples.example_records()["vessel"]
    parse_record(json.dumps(rec))
    target = rec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(InvalidRecordError, match=".".join(path)):
        parse_record(json.dumps(rec))


def test_leaf_values_cover_field_paths_and_omit_absent_optionals() -> None:
    for kind, rec in samples.example_records().items():
        sighting = parse_record(json.dumps(rec))
        leaves = leaf_values(sighting)
        assert set(leaves) <= set(field_paths(kind))
        assert "source.sensor" in leaves
        assert all(v is not None for v in leaves.values())


def test_exported_schemas_have_not_drifted_from_the_models() -> None:
    for name, text in {**schemas.schema_documents(), **schemas.example_documents()}.items():
        on_disk = (ROOT / "schemas" / name).read_text(encoding="utf-8")
        assert on_disk == text, f"schemas/{name} drifted: run `make schemas`"


def test_every_schema_property_has_a_description() -> None:
    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                assert "description" in prop, f"{where}.{name} has no description"
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for name, text in schemas.schema_documents().items():
        walk(json.loads(text), name)


def test_validate_cli_exit_codes_and_lines(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", str(ROOT / "samples/feed.ndjson")])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(main, ["validate", str(ROOT / "samples/invalid.ndjson")])
    assert bad.exit_code == 1
    assert "invalid.ndjson:5: vessel.imo: IMO check digit" in bad.stdout
    missing = runner.invoke(main, ["validate", str(tmp_path / "nope.ndjson")])
    assert missing.exit_code == 2
    assert "cannot read" in missing.output
    assert "Traceback" not in missing.output


def test_validate_reads_stdin_and_skips_blank_lines() -> None:
    text = samples.to_ndjson(samples.generate(3)) + "\n\n"
    result = CliRunner().invoke(main, ["validate", "-"], input=text)
    assert result.exit_code == 0
    assert "3 valid, 0 invalid" in result.output


def test_samples_generate_for_one_originator() -> None:
    result = CliRunner().invoke(
        main, ["samples", "generate", "--count", "6", "--originators", "JPN"]
    )
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["originator"] for r in records] == ["JPN"] * 6
    bad = CliRunner().invoke(main, ["samples", "generate", "--originators", "JPN,XXX"])
    assert bad.exit_code == 2
    assert "unknown member 'XXX'" in bad.output
