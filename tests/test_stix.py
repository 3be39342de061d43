"""``msmt export stix``: bundles validated by the OASIS validator, markings, ids, disclosure.

Inputs are generated sightings (``broker.samples``) turned into what a partner
receives: a subset of the disclosure keys, some of them as released variants
(coarsened positions, rounded amounts, hour-truncated times, pseudonyms).
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid5

import pytest
import rfc8785
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stix2validator import ValidationOptions, validate_instance, validate_string

from broker import keys_custodian, samples
from broker.cli import main
from broker.errors import InputError
from broker.identifiers import canonical_address
from broker.sightings import SIGHTING_ADAPTER, leaf_values
from broker.stix import ReceivedReport, bundle, check_report, select_since
from broker.stix_defs import tlp_marking
from broker.stix_objects import (
    EXT_REPORT,
    MSMT_NAMESPACE,
    TLP_MARKINGS,
    member_identity_id,
    sco_id,
)
from broker.store import Received as StoredReport
from broker.store import Store
from broker.transforms import Transform, variant_key

VECTORS = Path(__file__).parent / "vectors" / "stix-tlp"
KEYS = {"FVEY-2026": b"k" * 32}
IAT = datetime(2026, 11, 2, tzinfo=UTC)
RECEIVED = datetime(2026, 11, 3, tzinfo=UTC)
VARIANTS = {
    "vessel.position": ("coarsen:0.5", "coarsen:1"),
    "transfer.place": ("coarsen:0.5",),
    "transfer.amount": ("round:1000",),
    "transfer.volume": ("round:100",),
    "observed_at": ("hour",),
    "vessel.imo": ("pseudonym:FVEY-2026",),
    "vessel.name": ("pseudonym:FVEY-2026",),
    "vessel.counterpart": ("pseudonym:FVEY-2026",),
    "transfer.from_addresses": ("pseudonym:FVEY-2026",),
    "transfer.tx_hash": ("pseudonym:FVEY-2026",),
    "transfer.vessels": ("pseudonym:FVEY-2026",),
    "worker.employer": ("pseudonym:FVEY-2026",),
}
# The validator's warnings that docs/STIX.md justifies; any other warning fails.
JUSTIFIED = (
    re.compile(r"\{103\} Given ID value \S+ is not a valid UUIDv4 ID\."),
    re.compile(r"\{244\} .* is a User Account Object with an 'account_type' of '[a-z0-9-]+'"),
)


def all_forms(record: Mapping[str, Any]) -> dict[str, Any]:
    """Every disclosure key a partner could get for ``record``: exact values and variants."""
    sighting = SIGHTING_ADAPTER.validate_json(json.dumps(record))
    exact = leaf_values(sighting)
    out = dict(exact)
    for path, idents in VARIANTS.items():
        if path in exact:
            for ident in idents:
                transform = Transform.parse(ident)
                key = variant_key(path, transform)
                out[key] = transform.apply(exact[path], pseudonym_keys=KEYS, path=path)
    return out


def pick(forms: Iterable[str], rng: random.Random, share: float) -> list[str]:
    """Keys a partner could be sent: each field at most once, exact or as one variant."""
    by_path: dict[str, list[str]] = {}
    for key in sorted(forms):
        by_path.setdefault(key.partition("#")[0], []).append(key)
    return sorted(rng.choice(keys) for keys in by_path.values() if rng.random() < share)


def received(
    record: Mapping[str, Any],
    keys: Iterable[str] | None = None,
    *,
    at: datetime = RECEIVED,
) -> ReceivedReport:
    """``record`` as a partner that got ``keys`` (default: every exact field) received it."""
    forms = all_forms(record)
    chosen = set(leaf_values(SIGHTING_ADAPTER.validate_json(json.dumps(record))))
    if keys is not None:
        chosen = set(keys)
    return ReceivedReport(
        report_id=record["report_id"],
        originator=record["originator"],
        kind=record["kind"],
        tlp=record["tlp"],
        rel_to=tuple(record["rel_to"]) if "rel_to" in record else None,
        iat=IAT,
        received_at=at,
        fields={k: forms[k] for k in sorted(chosen & set(forms))},
    )


def validate(stix: dict[str, Any]) -> None:
    """Assert the bundle is valid STIX 2.1 with no errors and only the justified warnings."""
    result = validate_instance(stix, ValidationOptions(version="2.1", enforce_refs=True))
    errors = [str(e) for e in result.errors]
    assert result.is_valid, errors[:5]
    assert errors == []
    unexplained = [str(w) for w in result.warnings if not any(j.search(str(w)) for j in JUSTIFIED)]
    assert unexplained == []


def by_id(stix: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["id"]: o for o in stix["objects"]}


def test_bundle_of_many_full_reports_validates() -> None:
    records = samples.generate(150, seed=11)
    stix = bundle(received(r) for r in records)
    validate(stix)
    # The text form is what the CLI writes; the validator must accept it too.
    assert validate_string(json.dumps(stix), ValidationOptions(version="2.1")).is_valid
    reports = [o for o in stix["objects"] if o["type"] == "report"]
    assert len(reports) == 150
    kinds = {o["type"] for o in stix["objects"]}
    assert {"infrastructure", "sighting", "location", "identity", "relationship"} <= kinds
    assert {"cryptocurrency-wallet", "cryptocurrency-transaction", "user-account"} <= kinds
    assert {"observed-data", "marking-definition", "extension-definition"} <= kinds


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), share=st.floats(0.0, 1.0))
def test_any_subset_of_fields_and_variants_validates(seed: int, share: float) -> None:
    rng = random.Random(seed)
    records = samples.generate(9, seed=seed)
    reports = []
    for record in records:
        reports.append(received(record, pick(all_forms(record), rng, share)))
    validate(bundle(reports))


def _atoms(value: Any) -> set[str]:
    """Distinctive text pieces of a JSON value, as they could appear in a bundle."""
    if isinstance(value, Mapping):
        return set().union(*(_atoms(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_atoms(v) for v in value)) if value else set()
    text = str(value)
    out = {text}
    if re.fullmatch(r"-?[0-9]+\.[0-9]+", text):
        out.add(repr(float(text)))  # a coordinate as a JSON number
    if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text):
        out = {text[:16]}  # a time to the minute, however it is formatted
    return {a for a in out if len(a) >= 5}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), share=st.floats(0.0, 1.0))
def test_a_field_not_received_never_appears(seed: int, share: float) -> None:
    rng = random.Random(seed)
    record = samples.generate(1 + seed % 3, seed=seed)[-1]
    forms = all_forms(record)
    got = pick(forms, rng, share)
    text = json.dumps(bundle([received(record, got)]))
    baseline = json.dumps(bundle([received(record, [])]))
    # What was received may legitimately contain a piece of what was not
    # ("134.5" inside "134.5123"); only a piece found nowhere else is a leak.
    seen = " ".join(json.dumps(forms[k]) for k in got) + baseline
    for key in set(forms) - set(got):
        for atom in _atoms(forms[key]):
            if atom not in seen:
                assert atom not in text, f"{key} leaked into the bundle"


def test_coarsened_position_is_exported_as_received_and_exact_digits_are_absent() -> None:
    record = next(r for r in samples.generate(30, seed=5) if r["kind"] == "vessel")
    exact = record["vessel"]["position"]
    stix = bundle([received(record, ["vessel.position#coarsen:0.5", "vessel.name"])])
    validate(stix)
    (location,) = [o for o in stix["objects"] if o["type"] == "location"]
    coarse = all_forms(record)["vessel.position#coarsen:0.5"]
    assert (location["latitude"], location["longitude"]) == (
        float(coarse["lat"]),
        float(coarse["lon"]),
    )
    assert location["precision"] == pytest.approx(0.25 * 2**0.5 * 111_320, abs=1)
    text = json.dumps(stix)
    assert exact["lat"] not in text
    assert exact["lon"] not in text


def test_tiny_coordinates_are_exact_numbers_though_written_with_an_exponent() -> None:
    record = next(r for r in samples.generate(30, seed=5) if r["kind"] == "vessel")
    record["vessel"] = dict(record["vessel"], position={"lat": "-0.0000001", "lon": "0.0000999"})
    stix = bundle([received(record, ["vessel.position", "vessel.name"])])
    validate(stix)
    # The text the CLI writes: -1e-07 is the JSON number -0.0000001 (docs/STIX.md "Numbers").
    text = json.dumps(stix, indent=2)
    assert '"latitude": -1e-07' in text
    (location,) = [
        o for o in json.loads(text, parse_float=Decimal)["objects"] if o["type"] == "location"
    ]
    assert (location["latitude"], location["longitude"]) == (
        Decimal("-0.0000001"),
        Decimal("0.0000999"),
    )


def test_pseudonymised_imo_names_the_vessel_only_within_its_key() -> None:
    record = next(r for r in samples.generate(30, seed=6) if r["kind"] == "vessel")
    key = "vessel.imo#pseudonym:FVEY-2026"
    stix = bundle([received(record, [key, "vessel.flag"])])
    validate(stix)
    pseudonym = all_forms(record)[key]
    (vessel,) = [o for o in stix["objects"] if o["type"] == "infrastructure"]
    # The pseudonym names its key, so two keys' pseudonyms of one IMO never merge.
    assert vessel["name"] == f"IMO pseudonym {pseudonym}"
    assert pseudonym.startswith("hmac-sha256:FVEY-2026:")
    assert "aliases" not in vessel
    assert record["vessel"]["imo"] not in json.dumps(stix)
    (report,) = [o for o in stix["objects"] if o["type"] == "report"]
    extension = next(iter(report["extensions"].values()))
    assert {"key": key, "value": pseudonym} in extension["fields"]
    # The same IMO from another originator under the same key: the same name.
    other = dict(record, report_id=str(uuid5(MSMT_NAMESPACE, "same-imo")), originator="NZL")
    names = {
        o["name"]
        for o in bundle([received(record, [key]), received(other, [key])])["objects"]
        if o["type"] == "infrastructure"
    }
    assert names == {vessel["name"]}


def test_vessel_mapping() -> None:
    record = next(
        r
        for r in samples.generate(60, seed=7)
        if r["kind"] == "vessel" and "counterpart" in r["vessel"]
    )
    stix = bundle([received(record)])
    objects = by_id(stix)
    author = member_identity_id(record["originator"])
    (sighting,) = [o for o in stix["objects"] if o["type"] == "sighting"]
    vessel = objects[sighting["sighting_of_ref"]]
    place = objects[sighting["where_sighted_refs"][0]]
    assert vessel["type"] == "infrastructure"
    imo = f"IMO {record['vessel']['imo']}"
    assert vessel["name"] == f"{record['vessel']['name']} ({imo})"
    assert vessel["aliases"] == [imo]
    assert place["latitude"] == float(record["vessel"]["position"]["lat"])
    assert "precision" not in place  # exact positions claim no coarsening
    assert sighting["first_seen"] == record["observed_at"].replace("Z", ".000Z")
    counterpart = [o for o in stix["objects"] if o.get("target_ref", "").startswith("infra")]
    other = record["vessel"]["counterpart"]
    assert objects[counterpart[0]["target_ref"]]["name"] == f"{other['name']} (IMO {other['imo']})"
    assert counterpart[0]["source_ref"] == vessel["id"]
    for obj in stix["objects"]:
        if obj["type"] in ("infrastructure", "sighting", "location", "relationship", "report"):
            assert obj["created_by_ref"] == author
            assert obj["object_marking_refs"][0] == TLP_MARKINGS[record["tlp"]]


def test_worker_mapping() -> None:
    record = next(
        r
        for r in samples.generate(60, seed=18)
        if r["kind"] == "worker" and r["worker"]["sector"] == "information_technology"
    )
    stix = bundle([received(record)])
    validate(stix)
    objects = by_id(stix)
    (sighting,) = [o for o in stix["objects"] if o["type"] == "sighting"]
    group = objects[sighting["sighting_of_ref"]]
    place = objects[sighting["where_sighted_refs"][0]]
    worker = record["worker"]
    assert (group["identity_class"], group["sectors"]) == ("group", ["technology"])
    short = f"{record['originator']} report {record['report_id'][:8]}"
    assert group["name"] == f"{worker['workers']} DPRK workers ({short})"
    alpha2 = {"RUS": "RU", "CHN": "CN", "LAO": "LA", "ARE": "AE", "NGA": "NG", "KHM": "KH"}
    assert place["country"] == alpha2.get(worker["country"], "MN")
    assert place["city"] == worker["location"]
    links = [o for o in stix["objects"] if o["type"] == "relationship"]
    (employed,) = [o for o in links if o.get("description") == "employed by"]
    assert employed["source_ref"] == group["id"]
    employer = objects[employed["target_ref"]]
    assert employer["name"] == worker["employer"]
    logins = sorted(o["account_login"] for o in stix["objects"] if o["type"] == "user-account")
    assert logins == sorted(i["handle"] for i in worker["online_identities"])
    # Without the country, the city is only described: STIX needs a country for a location.
    partial = bundle([received(record, ["worker.location", "worker.workers"])])
    assert not [o for o in partial["objects"] if o["type"] == "location"]
    (report,) = [o for o in partial["objects"] if o["type"] == "report"]
    assert f"worker.location: {worker['location']}" in report["description"]


def test_fuel_transfer_mapping() -> None:
    record = next(
        r
        for r in samples.generate(60, seed=19)
        if r["kind"] == "transfer" and r["transfer"]["category"] == "fuel"
    )
    keys = ["transfer.vessels", "transfer.place#coarsen:0.5", "transfer.volume#round:100"]
    stix = bundle([received(record, keys)])
    validate(stix)
    objects = by_id(stix)
    sightings = [o for o in stix["objects"] if o["type"] == "sighting"]
    names = sorted(objects[s["sighting_of_ref"]]["name"] for s in sightings)
    assert names == sorted(f"{v['name']} (IMO {v['imo']})" for v in record["transfer"]["vessels"])
    (place,) = {s["where_sighted_refs"][0] for s in sightings}
    assert "precision" in objects[place]
    (report,) = [o for o in stix["objects"] if o["type"] == "report"]
    rounded = all_forms(record)["transfer.volume#round:100"]
    assert f"transfer.volume#round:100: {rounded}" in report["description"]
    # transfer.category was not received: the fuel fields alone route it here.
    assert not [o for o in stix["objects"] if o["type"].startswith("cryptocurrency")]


def _names(stix: Mapping[str, Any], kind: str) -> list[str]:
    return sorted(o["name"] for o in stix["objects"] if o["type"] == kind)


def test_names_that_identify_nothing_are_specific_to_their_report() -> None:
    records = samples.generate(80, seed=22)
    vessels = [r for r in records if r["kind"] == "vessel"][:3]
    workers = [r for r in records if r["kind"] == "worker"][:2]
    # Reports withholding every identifier, and worker groups of one size.
    withheld = [received(r, ["vessel.flag", "vessel.position"]) for r in vessels]
    groups = [received(r, ["worker.workers"]) for r in workers]
    groups[1] = replace(groups[1], fields=dict(groups[0].fields))
    stix = bundle(withheld + groups)
    validate(stix)
    expected = sorted(
        f"Unidentified vessel ({r['originator']} report {r['report_id'][:8]})" for r in vessels
    )
    assert _names(stix, "infrastructure") == expected
    count = groups[0].fields["worker.workers"]
    group_names = [n for n in _names(stix, "identity") if "DPRK workers" in n]
    assert group_names == sorted(
        f"{count} DPRK workers ({r['originator']} report {r['report_id'][:8]})" for r in workers
    )
    # A name alone identifies nothing either: ships share names and change them.
    named = bundle([received(vessels[0], ["vessel.name"])])
    short = f"{vessels[0]['originator']} report {vessels[0]['report_id'][:8]}"
    assert _names(named, "infrastructure") == [
        f"{vessels[0]['vessel']['name']} (as named in {short})"
    ]


def test_one_imo_under_two_spellings_shares_its_alias() -> None:
    record = next(r for r in samples.generate(30, seed=23) if r["kind"] == "vessel")
    respelt = dict(record, report_id=str(uuid5(MSMT_NAMESPACE, "respelt")), originator="NZL")
    respelt["vessel"] = dict(record["vessel"], name=record["vessel"]["name"] + " II")
    keys = ["vessel.imo", "vessel.mmsi", "vessel.name"]
    stix = bundle([received(record, keys), received(respelt, keys)])
    vessels = [o for o in stix["objects"] if o["type"] == "infrastructure"]
    imo = f"IMO {record['vessel']['imo']}"
    assert sorted(v["name"] for v in vessels) == sorted(
        f"{name} ({imo})" for name in (record["vessel"]["name"], respelt["vessel"]["name"])
    )
    # Tools that merge by alias (OpenCTI) merge these two; the MMSI is no alias.
    assert [v["aliases"] for v in vessels] == [[imo], [imo]]
    only_imo = bundle([received(record, ["vessel.imo", "vessel.mmsi"])])
    assert _names(only_imo, "infrastructure") == [imo]
    assert "aliases" not in next(o for o in only_imo["objects"] if o["type"] == "infrastructure")


def test_hour_variant_spans_the_hour() -> None:
    record = next(r for r in samples.generate(30, seed=8) if r["kind"] == "vessel")
    stix = bundle([received(record, ["observed_at#hour", "vessel.name"])])
    (sighting,) = [o for o in stix["objects"] if o["type"] == "sighting"]
    start = datetime.fromisoformat(record["observed_at"]).replace(minute=0, second=0)
    assert sighting["first_seen"] == start.strftime("%Y-%m-%dT%H:00:00.000Z")
    assert sighting["last_seen"] == (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:00:00.000Z")


def test_crypto_transfer_mapping_and_shared_wallets_merge() -> None:
    record = next(
        r
        for r in samples.generate(60, seed=9)
        if r["kind"] == "transfer" and r["transfer"]["category"] == "crypto"
    )
    # The same transfer reported by a second member under a stricter TLP and REL TO.
    other = dict(record, report_id=str(uuid5(MSMT_NAMESPACE, "other")), originator="NZL")
    other.update(tlp="RED", rel_to=["AUS", "CAN"])
    stix = bundle([received(record), received(other)])
    validate(stix)
    wallets = [o for o in stix["objects"] if o["type"] == "cryptocurrency-wallet"]
    addresses = record["transfer"]["from_addresses"] + record["transfer"]["to_addresses"]
    assert sorted(w["value"] for w in wallets) == sorted(set(addresses))
    statements = 1 + ("rel_to" in record)  # NZL's REL TO, and the first report's if any
    for wallet in wallets:
        assert wallet["object_marking_refs"][0] == TLP_MARKINGS["RED"]
        assert len(wallet["object_marking_refs"]) == 1 + statements
    (tx,) = [o for o in stix["objects"] if o["type"] == "cryptocurrency-transaction"]
    assert tx["value"] == record["transfer"]["tx_hash"]


def _respelt(record: Mapping[str, Any], name: str, address: str, spelling: str) -> ReceivedReport:
    """``record`` reported again by NZL with ``address`` spelt ``spelling`` (as intake allows)."""
    transfer = dict(record["transfer"])
    for side in ("from_addresses", "to_addresses"):
        transfer[side] = [spelling if a == address else a for a in transfer[side]]
    other = dict(record, report_id=str(uuid5(MSMT_NAMESPACE, name)), originator="NZL")
    return received(dict(other, transfer=transfer))


def test_an_address_in_two_spellings_is_one_wallet() -> None:
    records = [
        r
        for r in samples.generate(80, seed=9)
        if r["kind"] == "transfer" and r["transfer"]["category"] == "crypto"
    ]
    eth = next(r for r in records if r["transfer"]["chain"] == "ethereum")
    btc = next(
        r
        for r in records
        if any(a.startswith("bc1") for a in r["transfer"]["from_addresses"])
        and any(
            a[0] in "13" for a in r["transfer"]["from_addresses"] + r["transfer"]["to_addresses"]
        )
    )
    checksummed = eth["transfer"]["from_addresses"][0]
    segwit = next(a for a in btc["transfer"]["from_addresses"] if a.startswith("bc1"))
    assert checksummed != checksummed.lower()
    reports = [
        received(eth),
        received(btc),
        _respelt(eth, "eth", checksummed, checksummed.lower()),
        _respelt(btc, "btc", segwit, segwit.upper()),
    ]
    stix = bundle(reports)
    validate(stix)
    wallets = {o["value"]: o["id"] for o in stix["objects"] if o["type"] == "cryptocurrency-wallet"}
    assert checksummed.lower() not in wallets
    assert segwit.upper() not in wallets
    for wallet in (checksummed, segwit):
        naming = [
            o
            for o in stix["objects"]
            if o.get("object_refs")
            and wallets[wallet] in o["object_refs"]
            and o["type"] == "report"
        ]
        assert len(naming) == 2
    # The id is the SCO rule's, over the one spelling.
    assert wallets[checksummed] == sco_id("cryptocurrency-wallet", {"value": checksummed})
    # A base58 address keeps its case: it is part of the value.
    addresses = btc["transfer"]["from_addresses"] + btc["transfer"]["to_addresses"]
    base58 = {a for a in addresses if a[0] in "13"}
    assert base58
    assert base58 <= set(wallets)
    # The report keeps each address as it was spelt.
    respelt = next(
        o
        for o in stix["objects"]
        if o["type"] == "report" and "NZL" in o["name"] and "ethereum" in o["description"]
    )
    assert checksummed.lower() in respelt["description"]


def test_a_shared_wallet_takes_the_markings_of_the_reports_in_its_bundle() -> None:
    record = next(
        r
        for r in samples.generate(60, seed=9)
        if r["kind"] == "transfer" and r["transfer"]["category"] == "crypto"
    )
    clear = dict(record, originator="FRA", tlp="CLEAR")
    clear.pop("rel_to", None)
    amber = dict(record, report_id=str(uuid5(MSMT_NAMESPACE, "usa")), originator="USA")
    amber.update(tlp="AMBER", rel_to=["GBR", "CAN"])
    address = record["transfer"]["from_addresses"][0]

    def wallet(stix: dict[str, Any]) -> dict[str, Any]:
        return next(o for o in stix["objects"] if o.get("value") == canonical_address(address))

    alone = wallet(bundle([received(clear)]))
    shared = wallet(bundle([received(clear), received(amber)]))
    # One id, and the markings of the reports in the bundle: docs/STIX.md "Shared observables".
    assert alone["id"] == shared["id"]
    assert alone["object_marking_refs"] == [TLP_MARKINGS["CLEAR"]]
    statement = uuid5(MSMT_NAMESPACE, "USA/rel-to/CAN, GBR")
    assert shared["object_marking_refs"] == [
        TLP_MARKINGS["AMBER"],
        f"marking-definition--{statement}",
    ]


def test_tlp_markings_are_the_official_oasis_objects() -> None:
    for label, mid in TLP_MARKINGS.items():
        official = json.loads((VECTORS / f"{mid}.json").read_text())["objects"][0]
        assert tlp_marking(label) == official
    ext_file = VECTORS / "extension-definition--60a3c5c5-0d10-413e-aab3-9e08dde9e88d.json"
    official_ext = json.loads(ext_file.read_text())["objects"][0]
    record = samples.generate(1, seed=1)[0]
    objects = by_id(bundle([received(record)]))
    assert objects[official_ext["id"]] == official_ext
    assert objects[TLP_MARKINGS[record["tlp"]]] == tlp_marking(record["tlp"])


def test_rel_to_is_a_statement_marking_on_every_object() -> None:
    record = dict(samples.generate(1, seed=2)[0], rel_to=["GBR", "USA"])
    stix = bundle([received(record)])
    validate(stix)
    (statement,) = [o for o in stix["objects"] if o.get("definition_type") == "statement"]
    assert statement["definition"]["statement"].startswith("REL TO GBR, USA")
    for obj in stix["objects"]:
        mine = obj.get("created_by_ref") == member_identity_id(record["originator"])
        if mine and obj["type"] not in ("marking-definition", "identity"):
            assert statement["id"] in obj["object_marking_refs"]


def test_rel_to_is_in_the_signed_order_in_the_extension_only() -> None:
    record = dict(samples.generate(1, seed=2)[0], rel_to=["USA", "GBR", "CAN"])
    signed = bundle([received(record)])
    (report,) = [o for o in signed["objects"] if o["type"] == "report"]
    assert report["extensions"][EXT_REPORT]["rel_to"] == ["USA", "GBR", "CAN"]
    # The statement marking is one per set of members, whatever the order signed.
    ordered = bundle([received(dict(record, rel_to=["CAN", "GBR", "USA"]))])
    statements = [
        [o for o in stix["objects"] if o.get("definition_type") == "statement"]
        for stix in (signed, ordered)
    ]
    assert statements[0] == statements[1]
    assert statements[0][0]["name"] == "REL TO CAN, GBR, USA"
    name = f"{record['originator']}/rel-to/CAN, GBR, USA"
    assert statements[0][0]["id"] == f"marking-definition--{uuid5(MSMT_NAMESPACE, name)}"


def test_ids_are_deterministic_across_exports() -> None:
    records = samples.generate(30, seed=12)
    first = bundle(received(r) for r in records)
    again = bundle(received(r) for r in reversed(records))
    assert first == again
    partial = bundle(received(r) for r in records[:10])
    assert set(by_id(partial)) <= set(by_id(first))
    record = records[0]
    expected = uuid5(MSMT_NAMESPACE, f"{record['originator']}/{record['report_id']}/report")
    assert f"report--{expected}" in by_id(first)


def test_documented_id_names_give_the_documented_ids() -> None:
    # The examples of docs/STIX.md "Ids", for implementers in other languages.
    assert member_identity_id("FRA") == "identity--22b3d724-a399-577a-a09c-49fc537a4485"
    marking = "63b361bc-ebb9-5b22-9160-86775bd02ee7"
    assert str(uuid5(MSMT_NAMESPACE, "JPN/rel-to/GBR, USA")) == marking
    report = "FRA/4a9b528b-6963-4321-a461-b55ef55b7bea/report"
    assert str(uuid5(MSMT_NAMESPACE, report)) == "8a7a9249-ab56-5896-9242-860581e992d0"
    wallet = {"value": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"}
    assert sco_id("cryptocurrency-wallet", wallet).endswith("30c92b53-d888-51f1-86a2-51ceb419496e")
    account = {"account_type": "github", "account_login": "dev795"}
    assert sco_id("user-account", account).endswith("abd61d03-0698-5260-a88a-a04510d88963")
    # And the exporter uses those names: a real bundle, checked id by id.
    record = dict(
        next(
            r
            for r in samples.generate(60, seed=24)
            if r["kind"] == "worker" and r["worker"].get("online_identities")
        ),
        rel_to=["USA", "GBR"],
    )
    stix = bundle([received(record)])
    objects = by_id(stix)
    origin, rid = record["originator"], record["report_id"]
    assert member_identity_id(origin) in objects
    members = f"{origin}/rel-to/GBR, USA"
    assert f"marking-definition--{uuid5(MSMT_NAMESPACE, members)}" in objects
    for kind, role in (("report", "report"), ("identity", "workers"), ("sighting", "sighting")):
        assert f"{kind}--{uuid5(MSMT_NAMESPACE, f'{origin}/{rid}/{role}')}" in objects
    for handle in record["worker"]["online_identities"]:
        platform = "-".join(handle["platform"].lower().replace("_", " ").split())
        contributing = {"account_type": platform, "account_login": handle["handle"]}
        assert sco_id("user-account", contributing) in objects
    digest = rfc8785.dumps(stix["objects"]).decode()
    assert stix["id"] == f"bundle--{uuid5(MSMT_NAMESPACE, 'bundle/' + digest)}"


def test_since_selects_by_time_received() -> None:
    records = samples.generate(6, seed=13)
    reports = [received(r, at=RECEIVED + timedelta(hours=i)) for i, r in enumerate(records)]
    chosen = select_since(reports, RECEIVED + timedelta(hours=4))
    assert [r.report_id for r in chosen] == [r["report_id"] for r in records[4:]]
    names = {o["name"] for o in bundle(chosen)["objects"] if o["type"] == "report"}
    assert len(names) == 2
    assert all(r["report_id"] in " ".join(names) for r in records[4:])
    assert select_since(reports, None) == reports


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"tlp": "AMBER+"}, "TLP is not a TLP 2.0 label"),
        ({"kind": "aircraft"}, "unknown kind"),
        ({"originator": "PRK"}, "originator is not an MSMT member"),
        ({"rel_to": ("XXX",)}, "REL TO lists a non-member"),
        ({"report_id": "not-a-uuid"}, "report id is not a UUID"),
        (
            {"fields": {"vessel.colour": "red"}},
            "a disclosure name that is not a field of vessel reports",
        ),
        ({"fields": {"vessel.imo": "1234568"}}, "vessel.imo: IMO check digit does not match"),
    ],
)
def test_malformed_report_is_refused_with_one_line(change: dict[str, Any], reason: str) -> None:
    record = next(r for r in samples.generate(3, seed=14) if r["kind"] == "vessel")
    good = received(record)
    bad = replace(good, **change)
    with pytest.raises(InputError, match=re.escape(reason)) as info:
        check_report(bad)
    assert "\n" not in str(info.value)
    assert "1234568" not in str(info.value)
    with pytest.raises(InputError):
        bundle([good, bad])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), share=st.floats(0.0, 1.0))
def test_report_extension_holds_exactly_the_received_fields(seed: int, share: float) -> None:
    rng = random.Random(seed)
    record = samples.generate(1 + seed % 3, seed=seed)[-1]
    report = received(record, pick(all_forms(record), rng, share))
    (sdo,) = [o for o in bundle([report])["objects"] if o["type"] == "report"]
    extension = sdo["extensions"][EXT_REPORT]
    assert {f["key"]: f["value"] for f in extension.get("fields", [])} == dict(report.fields)
    assert (extension["report_id"], extension["tlp"]) == (report.report_id, report.tlp)
    assert extension.get("rel_to") == (list(report.rel_to) if report.rel_to else None)


def _described_fields(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The ``key: value`` lines of a report description, after ``Fields as received:``."""
    lines = report["description"].split("\n")
    if "Fields as received:" not in lines:
        return []
    rest = lines[lines.index("Fields as received:") + 1 :]
    # Keys never contain ": " (paths and transform ids), so the first one splits.
    return [(key, value) for key, _, value in (line.partition(": ") for line in rest)]


def _leaves(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [str(value)]


def test_report_description_carries_every_received_leaf_of_every_kind() -> None:
    records = samples.generate(60, seed=21)
    reports = [received(r) for r in records]
    stix = bundle(reports)
    validate(stix)
    sdos = {
        o["extensions"][EXT_REPORT]["report_id"]: o
        for o in stix["objects"]
        if o["type"] == "report"
    }
    shapes = set()
    for report in reports:
        lines = dict(_described_fields(sdos[report.report_id]))
        assert set(lines) == set(report.fields)
        for key, value in report.fields.items():
            for leaf in _leaves(value):
                assert leaf in lines[key], f"{key} of a {report.kind} report"
        shapes.add((report.kind, report.fields.get("transfer.category")))
    assert shapes == {
        ("vessel", None),
        ("worker", None),
        ("transfer", "fuel"),
        ("transfer", "crypto"),
    }


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), share=st.floats(0.0, 1.0))
def test_report_description_reads_back_as_exactly_the_received_fields(
    seed: int, share: float
) -> None:
    rng = random.Random(seed)
    record = samples.generate(1 + seed % 3, seed=seed)[-1]
    report = received(record, pick(all_forms(record), rng, share))
    (sdo,) = [o for o in bundle([report])["objects"] if o["type"] == "report"]
    lines = _described_fields(sdo)
    assert [key for key, _ in lines] == sorted(report.fields)
    for key, text in lines:
        value = report.fields[key]
        # Strings as they are, anything else as JSON: the layout docs/STIX.md gives.
        assert (text if isinstance(value, str) else json.loads(text)) == value


def test_copies_of_one_report_merge_into_one() -> None:
    record = next(r for r in samples.generate(3, seed=16) if r["kind"] == "vessel")
    first = received(record, ["vessel.name", "observed_at"])
    onward = received(record, ["vessel.name", "vessel.flag"], at=RECEIVED + timedelta(hours=2))
    stix = bundle([onward, first])
    validate(stix)
    (sdo,) = [o for o in stix["objects"] if o["type"] == "report"]
    keys = [f["key"] for f in sdo["extensions"][EXT_REPORT]["fields"]]
    assert keys == ["observed_at", "vessel.flag", "vessel.name"]
    assert sdo["extensions"][EXT_REPORT]["received_at"] == "2026-11-03T00:00:00.000Z"
    forged = replace(first, fields={"vessel.name": "OTHER NAME"})
    with pytest.raises(InputError, match=r"two stored copies disagree on vessel\.name"):
        bundle([first, forged])
    stricter = replace(first, tlp="RED")
    with pytest.raises(InputError, match="disagree on their signed claims"):
        bundle([first, stricter])


# --- the command line -------------------------------------------------------

JPN_CONFIG = Path(__file__).parent.parent / "nodes" / "JPN" / "node.toml"
MSMT = str(Path(sys.executable).parent / "msmt")


def _run(args: list[str], env: Mapping[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, args, env=dict(env or {}))


def test_cli_missing_config_is_one_line(tmp_path: Path) -> None:
    result = _run(["export", "stix", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert result.stderr.startswith("msmt: error: cannot read config")
    assert result.stderr.count("\n") == 1


def test_cli_invalid_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('member = "JPN"\n[nats\n')
    result = _run(["export", "stix", "--config", str(config)])
    assert result.exit_code == 2
    assert "invalid TOML" in result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_missing_store_is_one_line(tmp_path: Path) -> None:
    env = {"MSMT_DATA_DIR": str(tmp_path / "data")}
    result = _run(["export", "stix", "--config", str(JPN_CONFIG)], env)
    assert result.exit_code == 2  # as msmt status and msmt inbox say it
    assert result.stderr.startswith("msmt: error: no node store at ")
    # The node may run with MSMT_DATA_DIR from its unit, which this shell lacks.
    assert "MSMT_DATA_DIR or other MSMT_* variables" in result.stderr
    assert result.stderr.count("\n") == 1
    # A store that cannot even be looked for: another user's 0700 data directory
    # raised PermissionError from Path.is_file (a traceback). A file in place of the
    # directory is another such error, and one that root gets too.
    (tmp_path / "file").write_text("")
    env = {"MSMT_DATA_DIR": str(tmp_path / "file")}
    for command in (["export", "stix"], ["status"], ["inbox", "list"]):
        result = _run([*command, "--config", str(JPN_CONFIG)], env)
        assert result.exit_code == 2, command
        assert result.stderr == (
            f"msmt: error: cannot reach the node store at {tmp_path / 'file' / 'node.sqlite3'}:"
            " Not a directory\n"
        ), command
    # A symlink loop on the way was a RuntimeError from pathlib.
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    result = _run(
        ["export", "stix", "--config", str(JPN_CONFIG)], {"MSMT_DATA_DIR": str(tmp_path / "loop")}
    )
    assert result.exit_code == 2
    assert result.stderr == (
        f"msmt: error: config key data_dir: {tmp_path / 'loop'} cannot be resolved:"
        " a symbolic link loop\n"
    )


def test_cli_bad_since_is_one_line(tmp_path: Path) -> None:
    result = _run(["export", "stix", "--config", str(JPN_CONFIG), "--since", "yesterday"])
    assert result.exit_code == 2
    assert "--since 'yesterday' is not an RFC 3339 time" in result.stderr
    assert result.stderr.count("\n") == 1


def _store(
    path: Path,
    reports: Iterable[ReceivedReport],
    kids: Mapping[str, str] | None = None,
    sender: str | None = None,
) -> None:
    """Write ``reports`` into a real node store file, as the node's receiver does.

    ``kids``: each originator's signing key id (None: received before nodes kept it);
    ``sender``: the member that sent them on, if not their originator.
    """
    store = Store(path)
    try:
        for report in reports:
            store.store_received(
                [
                    StoredReport(
                        sender=sender or report.originator,
                        originator=report.originator,
                        report_id=report.report_id,
                        kind=report.kind,
                        tlp=report.tlp,
                        rel_to=report.rel_to,
                        iat=report.iat.timestamp(),
                        fields=dict(report.fields),
                        paths=tuple(report.fields),
                        jwe_sha256="00" * 32,
                        jwe="",
                        signing_kid=None if kids is None else kids[report.originator],
                        expires_at=0.0,
                    )
                ],
                now=report.received_at.timestamp(),
            )
    finally:
        store.close()


def test_cli_exports_a_real_store_and_since_filters(tmp_path: Path) -> None:
    records = samples.generate(12, seed=17)
    reports = [received(r, at=RECEIVED + timedelta(hours=i)) for i, r in enumerate(records)]
    _store(tmp_path / "data" / "node.sqlite3", reports)
    env = {"MSMT_DATA_DIR": str(tmp_path / "data")}

    everything = _run(["export", "stix", "--config", str(JPN_CONFIG)], env)
    assert everything.exit_code == 0, everything.stderr
    stix = json.loads(everything.stdout)
    assert stix == bundle(reports)  # what was stored is exactly what was exported
    validate(stix)

    out = tmp_path / "recent.json"
    since = ["--since", "2026-11-03T08:00:00Z", "--out", str(out)]
    recent = _run(["export", "stix", "--config", str(JPN_CONFIG), *since], env)
    assert recent.exit_code == 0, recent.stderr
    assert recent.stdout == ""
    assert recent.stderr == f"4 reports exported to {out}\n"
    written = json.loads(out.read_text())
    assert written == bundle(reports[8:])
    assert validate_string(out.read_text(), ValidationOptions(version="2.1")).is_valid


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_cli_exports_to_a_stdout_that_is_not_utf8_as_escaped_json(
    tmp_path: Path, encoding: str
) -> None:
    # A review: a vessel name in Hangul to a stdout in ASCII (PYTHONIOENCODING, a C
    # locale) was a UnicodeEncodeError traceback and no bundle at all.
    records = samples.generate(12, seed=17)
    vessel = next(r for r in records if r["kind"] == "vessel")
    vessel["vessel"]["name"] = "\ubc31\ub450\uc0b0 \u00c9TOILE"
    reports = [received(r, at=RECEIVED) for r in records]
    _store(tmp_path / "data" / "node.sqlite3", reports)
    env = {**os.environ, "MSMT_DATA_DIR": str(tmp_path / "data"), "PYTHONIOENCODING": encoding}
    done = subprocess.run(
        [MSMT, "export", "stix", "--config", str(JPN_CONFIG)],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout.isascii()
    assert json.loads(done.stdout) == bundle(reports)


def test_cli_leaves_out_reports_signed_by_a_key_since_revoked(tmp_path: Path) -> None:
    # An operator's trial: revoking JPN's signing key left what it had signed in the
    # export and the inbox listing, unmarked. Real keys and roster, real store file.
    keydir = tmp_path / "keys"
    now = datetime.now(UTC)
    roster = keys_custodian.init_keys(
        keydir, ("JPN", "KOR", "USA"), now=now - timedelta(days=1)
    ).roster
    kids = {m: roster.current(m, "sig", now).kid for m in ("JPN", "KOR")}
    records = [r for r in samples.generate(44, seed=29) if r["originator"] in kids]
    reports = [received(r, at=RECEIVED + timedelta(hours=i)) for i, r in enumerate(records)]
    jpn = [r for r in reports if r.originator == "JPN"]
    kor = [r for r in reports if r.originator == "KOR"]
    assert len(jpn) == len(kor) == 4
    signed, old = jpn[:3], jpn[3]
    path = tmp_path / "data" / "node.sqlite3"
    _store(path, [*signed, *kor], kids)
    _store(path, [old])  # received before nodes recorded the signing key
    _store(path, signed[:1], kids, sender="KOR")  # and a copy KOR sent on: one report
    env = {"MSMT_DATA_DIR": str(tmp_path / "data"), "MSMT_KEY_DIR": str(keydir)}
    export = ["export", "stix", "--config", str(JPN_CONFIG)]
    listing = ["inbox", "list", "--config", str(JPN_CONFIG)]

    before = _run(export, env)
    assert before.exit_code == 0, before.stderr
    assert before.stderr == ""
    assert json.loads(before.stdout) == bundle(reports)

    keys_custodian.revoke_key(keydir, kids["JPN"], "stolen in the test")
    after = _run(export, env)
    assert after.exit_code == 0, after.stderr
    assert after.stderr == (
        "3 reports left out: signed by a key since revoked (msmt inbox list shows them)\n"
    )
    # KOR's reports, and JPN's from before nodes recorded the key, exactly as before.
    assert json.loads(after.stdout) == bundle([*kor, old])
    validate(json.loads(after.stdout))
    out = tmp_path / "recent.json"
    since = ["--since", _when(signed[2].received_at), "--out", str(out)]
    recent = _run([*export, *since], env)
    assert recent.exit_code == 0, recent.stderr
    kept = [r for r in [*kor, old] if r.received_at >= signed[2].received_at]
    assert recent.stderr == (
        "1 report left out: signed by a key since revoked (msmt inbox list shows them)\n"
        f"{len(kept)} reports exported to {out}\n"
    )
    assert json.loads(out.read_text()) == bundle(kept)

    # The listing shows them, marked; the copy KOR sent on too, since JPN signed it.
    revoked = f"key {kids['JPN']} is revoked"
    rows = [json.loads(line) for line in _run([*listing, "--json"], env).stdout.splitlines()]
    marked = {(r["sender"], r["report_id"]) for r in rows if r["signer_revoked"] == revoked}
    assert marked == {
        *(("JPN", r.report_id) for r in signed),
        ("KOR", signed[0].report_id),
    }
    assert {r["signer_revoked"] for r in rows} == {revoked, None}
    assert {r["signing_kid"] for r in rows if r["report_id"] == old.report_id} == {None}
    text = _run(listing, env)
    assert text.exit_code == 0, text.stderr
    flagged = [
        line for line in text.stdout.splitlines() if line.endswith(f"SIGNER REVOKED ({revoked})")
    ]
    assert len(flagged) == 4
    assert text.stdout.count("SIGNER REVOKED") == 4
    show = _run(["inbox", "show", "--config", str(JPN_CONFIG), kor[0].report_id], env)
    assert json.loads(show.stdout)["signer_revoked"] is None
    assert json.loads(show.stdout)["signing_kid"] == kids["KOR"]

    # The roster decides what is left out: one the node would refuse stops the export.
    (keydir / "roster.json.jws").unlink()
    for args in (export, listing):
        refused = _run(args, env)
        assert refused.exit_code != 0
        assert refused.stderr.startswith("msmt: error: ")
        assert refused.stderr.count("\n") == 1
        assert refused.stdout == ""


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("observed", "first", "last"),
    [
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000Z", "0001-01-01T00:00:00.000Z"),
        ("0999-05-06T07:08:09.123456Z", "0999-05-06T07:08:09.123Z", "0999-05-06T07:08:09.123Z"),
        ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999Z"),
    ],
)
def test_timestamps_have_four_digit_years_in_any_year(observed: str, first: str, last: str) -> None:
    # A receiver takes any year an older originator signed; strftime("%Y")
    # wrote year 1 as "1", which made the whole bundle invalid STIX.
    record = next(r for r in samples.generate(30, seed=8) if r["kind"] == "vessel")
    exact = received(record)
    stix = bundle([replace(exact, fields={**exact.fields, "observed_at": observed})])
    validate(stix)
    (sighting,) = [o for o in stix["objects"] if o["type"] == "sighting"]
    assert (sighting["first_seen"], sighting["last_seen"]) == (first, last)


@pytest.mark.parametrize(
    ("hour", "last"),
    [
        ("0001-01-01T00:00:00Z", "0001-01-01T01:00:00.000Z"),
        ("9999-12-31T23:00:00Z", "9999-12-31T23:59:59.999Z"),
    ],
)
def test_an_hour_variant_at_either_end_of_time_still_exports(hour: str, last: str) -> None:
    record = next(r for r in samples.generate(30, seed=8) if r["kind"] == "vessel")
    only_name = received(record, ["vessel.name"])
    stix = bundle([replace(only_name, fields={**only_name.fields, "observed_at#hour": hour})])
    validate(stix)
    (sighting,) = [o for o in stix["objects"] if o["type"] == "sighting"]
    assert sighting["first_seen"] == hour.replace(":00Z", ":00.000Z")
    assert sighting["last_seen"] == last


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("fields = 'not json'", "its fields column is not JSON"),
        ("fields = '[]'", "its fields column is not a JSON object"),
        ("paths = 'SECRETVALUE'", "its paths column is not JSON"),
        ("rel_to = '[\"SECRETVALUE\", 5]'", "its rel_to column is not a list of names"),
        ("iat = 'SECRETVALUE'", "its iat column is not a time"),
        ("received_at = 1e300", "its received_at column is not a time"),
        ("iat = -1e20", "its iat column is not a time"),
        ("tlp = X'414D424552'", "a text column holds bytes or a number"),
    ],
)
def test_a_damaged_store_row_stops_export_and_inbox_with_one_line(
    tmp_path: Path, damage: str, why: str
) -> None:
    # A hostile auditor's trial: each of these gave a Python traceback.
    reports = [received(r) for r in samples.generate(3, seed=23)]
    path = tmp_path / "data" / "node.sqlite3"
    _store(path, reports)
    with sqlite3.connect(path) as db:
        rowid = db.execute(
            "SELECT rowid FROM inbox WHERE report_id = ?", (reports[1].report_id,)
        ).fetchone()[0]
        db.execute(f"UPDATE inbox SET {damage} WHERE rowid = ?", (rowid,))  # noqa: S608
    env = {"MSMT_DATA_DIR": str(tmp_path / "data")}
    expected = f"msmt: error: store {path}: inbox row {rowid} is damaged ({why});"
    for args in (
        ["export", "stix", "--config", str(JPN_CONFIG)],
        ["inbox", "list", "--config", str(JPN_CONFIG)],
        ["inbox", "show", "--config", str(JPN_CONFIG), reports[1].report_id],
    ):
        result = _run(args, env)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith(expected), (args, result.stderr)
        assert result.stderr.endswith(" restore the store from a backup\n")
        assert result.stderr.count("\n") == 1
        assert "SECRETVALUE" not in result.output


def test_cli_out_writes_only_a_regular_file(tmp_path: Path) -> None:
    # Run as root, --out /dev/full was replaced by a regular file of reports, and a
    # symlink by a file (its target untouched): the rename takes whatever is there.
    _store(tmp_path / "data" / "node.sqlite3", [received(samples.generate(1, seed=3)[0])])
    env = {"MSMT_DATA_DIR": str(tmp_path / "data")}
    target = tmp_path / "target.json"
    target.write_text("kept")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for out, what in (
        (link, "a symbolic link"),
        (fifo, "not a regular file"),
    ):
        result = _run(["export", "stix", "--config", str(JPN_CONFIG), "--out", str(out)], env)
        assert result.exit_code == 2, out
        assert result.stderr == (
            f"msmt: error: --out {out} is {what}: give a regular file's path, or leave"
            " --out out for stdout\n"
        )
    assert link.is_symlink()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert target.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data",
        "fifo",
        "link.json",
        "target.json",
    ]
    # A regular file is replaced, as before.
    result = _run(["export", "stix", "--config", str(JPN_CONFIG), "--out", str(target)], env)
    assert result.exit_code == 0, result.stderr
    assert json.loads(target.read_text())["type"] == "bundle"


def test_cli_stdout_that_fails_is_one_line_and_not_success(tmp_path: Path) -> None:
    # A bundle cut short by a full disk or a reader that went away must not exit 0
    # (the reader may import what it got), nor print a traceback.
    _store(tmp_path / "data" / "node.sqlite3", [received(r) for r in samples.generate(40, seed=5)])
    args = [MSMT, "export", "stix", "--config", str(JPN_CONFIG)]
    env = {**os.environ, "MSMT_DATA_DIR": str(tmp_path / "data")}
    with open("/dev/full", "wb") as full:
        done = subprocess.run(args, stdout=full, stderr=subprocess.PIPE, env=env, check=False)
    assert done.returncode == 1
    assert done.stderr == (
        b"msmt: error: cannot write the bundle to stdout: No space left on device\n"
    )
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the first byte
    try:
        done = subprocess.run(args, stdout=writer, stderr=subprocess.PIPE, env=env, check=False)
    finally:
        os.close(writer)
    assert done.returncode == 1
    assert done.stderr == b"msmt: error: stdout was closed before the whole bundle was written\n"
