"""Export the public data contract: JSON Schema files and example records.

The files under ``schemas/`` are generated from the pydantic models so that a
feed written in any language can validate before it submits. A test regenerates
them and fails on any drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from pydantic import TypeAdapter

from broker.files import make_folder, write_durably
from broker.sightings import MODELS, Sighting

SCHEMA_BASE: Final = "https://msmt-broker.invalid/schemas/"


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def schema_documents() -> dict[str, str]:
    """Return ``{file name: JSON text}`` for every schema file, deterministically."""
    docs: dict[str, str] = {}
    for kind, model in MODELS.items():
        schema = model.model_json_schema(mode="validation")
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"{SCHEMA_BASE}{kind}.schema.json",
            **schema,
        }
        docs[f"{kind}.schema.json"] = _dump(schema)
    union = TypeAdapter(Sighting).json_schema(mode="validation")
    union = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{SCHEMA_BASE}sighting.schema.json",
        "title": "Sighting",
        **union,
    }
    docs["sighting.schema.json"] = _dump(union)
    return docs


def example_documents() -> dict[str, str]:
    """Return ``{file name: JSON text}`` with one valid example record per kind."""
    from broker.samples import example_records  # noqa: PLC0415 - samples imports us indirectly

    return {f"examples/{kind}.json": _dump(rec) for kind, rec in example_records().items()}


def export(out: Path) -> list[Path]:
    """Write every schema and example file under ``out``; return the paths written.

    Each whole or not at all (a full-disk trial found a 0-byte schema left behind,
    which a feed author's validator would read as the contract). Raises ``OSError``.
    """
    written: list[Path] = []
    for name, text in {**schema_documents(), **example_documents()}.items():
        path = out / name
        # 0755 whatever the umask: under umask 000 the folders were 0777, and any
        # user could swap the contract a feed author validates against.
        make_folder(path.parent)
        write_durably(path, text.encode("utf-8"))
        path.chmod(0o644)  # public: the contract every feed author reads
        written.append(path)
    return written
