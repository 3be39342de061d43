"""Realistic sample feeds and a file of invalid records, for tests, docs and the demo.

Everything is generated from a seeded ``random.Random``, so the same seed gives
the same feed. Positions fall in the Yellow Sea and the East Sea, where
ship-to-ship transfers to North Korean tankers have been reported; IMO numbers
carry valid check digits; crypto addresses carry valid checksums.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import base58

from broker.identifiers import eip55, encode_segwit, imo_check_digit
from broker.members import MEMBERS

_SEAS: Final = {
    # (lat min, lat max, lon min, lon max), loosely the open water of each sea.
    "yellow": (34.0, 38.5, 121.0, 125.5),
    "east": (36.0, 41.5, 130.0, 136.0),
    "east_china": (29.0, 32.5, 122.5, 126.5),
}
_NAMES: Final = (
    "YU JONG 2",
    "CHON MA SAN",
    "SAEBYOL",
    "KUM UN SAN 3",
    "ANSAN 1",
    "NEW REGENT",
    "SUN RISE 8",
    "DIAMOND 8",
    "PO MING",
    "JI SONG 6",
    "HUA FU",
    "KATRIN",
    "LUCKY STAR",
    "OCEAN GLORY",
    "MIN NING DE YOU 078",
    "SHANG YUAN BAO",
    "WAN HENG 11",
    "YUK TUNG",
)
_FLAGS: Final = ("PRK", "SLE", "TGO", "PAN", "MNG", "SLE", "KNA", "CMR", "TZA", "BLZ")
_SENSORS: Final = (
    ("SAR", "satellite", "imagery"),
    ("EO", "patrol aircraft", "imagery"),
    ("AIS", "terrestrial receiver", "ais"),
    ("radar", "coast guard cutter", "radar"),
    ("HUMINT", "liaison service", "humint"),
    ("chain analysis", "analytics vendor", "blockchain"),
    ("bank reporting", "FIU", "financial"),
    ("open source", "researcher", "osint"),
)
_CITIES: Final = (
    ("RUS", "Vladivostok"),
    ("CHN", "Dandong"),
    ("CHN", "Shenyang"),
    ("LAO", "Vientiane"),
    ("ARE", "Dubai"),
    ("NGA", "Lagos"),
    ("KHM", "Phnom Penh"),
    ("MNG", "Ulaanbaatar"),
)
_EMPLOYERS: Final = (
    "Sinsang Construction",
    "Pyongyang Gyonghung",
    "Chosun Expo",
    "Yanbian Silverstar",
    "Volasys Silver Star",
    "Mansudae Overseas",
    "Korea Sobaeksu Trading",
)
_EXCHANGES: Final = ("Exchange A", "OTC desk Hong Kong", "Mixer Sinbad", "Bridge Avalanche")


def _imo(rng: random.Random) -> str:
    six = str(rng.randint(800_000, 999_999))
    return six + str(imo_check_digit(six))


def _mmsi(rng: random.Random) -> str:
    return str(rng.choice((445, 457, 351, 667, 341))) + f"{rng.randint(0, 999_999):06d}"


def _position(rng: random.Random) -> dict[str, str]:
    lat0, lat1, lon0, lon1 = _SEAS[rng.choice(sorted(_SEAS))]
    lat = Decimal(str(rng.uniform(lat0, lat1))).quantize(Decimal("0.0001"))
    lon = Decimal(str(rng.uniform(lon0, lon1))).quantize(Decimal("0.0001"))
    return {"lat": str(lat), "lon": str(lon)}


def _btc(rng: random.Random) -> str:
    payload = rng.randbytes(20)
    if rng.random() < 0.5:
        return base58.b58encode_check(bytes([rng.choice((0, 5))]) + payload).decode()
    return encode_segwit("bc", 0, payload)


def _eth(rng: random.Random) -> str:
    return eip55("0x" + rng.randbytes(20).hex())


def _header(rng: random.Random, kind: str, originator: str, base: datetime) -> dict[str, Any]:
    sensor, platform, method = rng.choice(_SENSORS)
    observed = base - timedelta(minutes=rng.randint(0, 60 * 24 * 7))
    rec: dict[str, Any] = {
        "kind": kind,
        "report_id": str(uuid.UUID(bytes=rng.randbytes(16), version=4)),
        "originator": originator,
        "observed_at": observed.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "tlp": rng.choices(("CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED"), (1, 3, 6, 2, 1))[0],
        "source": {
            "sensor": sensor,
            "platform": platform,
            "collection_method": method,
            "confidence": rng.choice(("low", "moderate", "high")),
        },
    }
    if rng.random() < 0.2:
        rec["rel_to"] = sorted(rng.sample([m for m in MEMBERS if m != originator], 4))
    return rec


def vessel_record(rng: random.Random, originator: str, base: datetime) -> dict[str, Any]:
    """One plausible vessel sighting as a JSON-ready dict."""
    rec = _header(rng, "vessel", originator, base)
    vessel: dict[str, Any] = {
        "imo": _imo(rng),
        "name": rng.choice(_NAMES),
        "flag": rng.choice(_FLAGS),
        "position": _position(rng),
        "activity": rng.choice(("ship_to_ship_transfer", "port_call", "ais_gap", "loitering")),
    }
    if rng.random() < 0.8:
        vessel["mmsi"] = _mmsi(rng)
    if vessel["activity"] == "ship_to_ship_transfer":
        vessel["counterpart"] = {"imo": _imo(rng), "name": rng.choice(_NAMES)}
        vessel["cargo"] = {
            "type": rng.choice(("refined_petroleum", "coal", "crude_oil")),
            "quantity_tonnes": str(rng.randint(300, 5000)),
        }
    rec["vessel"] = vessel
    return rec


def worker_record(rng: random.Random, originator: str, base: datetime) -> dict[str, Any]:
    """One plausible workers-abroad sighting as a JSON-ready dict."""
    rec = _header(rng, "worker", originator, base)
    country, city = rng.choice(_CITIES)
    sector = rng.choice(("construction", "information_technology", "fishing", "restaurant"))
    worker: dict[str, Any] = {
        "country": country,
        "location": city,
        "employer": rng.choice(_EMPLOYERS),
        "workers": rng.randint(1, 400)
        if sector != "information_technology"
        else rng.randint(1, 12),
        "sector": sector,
    }
    if rng.random() < 0.5:
        worker["front_company"] = rng.choice(_EMPLOYERS) + " Ltd"
    if sector == "information_technology":
        worker["online_identities"] = [
            {"platform": p, "handle": f"dev{rng.randint(100, 9999)}"}
            for p in rng.sample(["github", "upwork", "telegram", "linkedin"], 2)
        ]
    else:
        worker["human_rights_concerns"] = sorted(
            rng.sample(
                [
                    "forced_labour",
                    "wage_confiscation",
                    "passport_confiscation",
                    "surveillance",
                    "excessive_hours",
                ],
                2,
            )
        )
    rec["worker"] = worker
    return rec


def transfer_record(rng: random.Random, originator: str, base: datetime) -> dict[str, Any]:
    """One plausible crypto or fuel transfer sighting as a JSON-ready dict."""
    rec = _header(rng, "transfer", originator, base)
    if rng.random() < 0.6:
        chain = rng.choice(("bitcoin", "ethereum"))
        addr = _btc if chain == "bitcoin" else _eth
        tx = hashlib.sha256(rng.randbytes(32)).hexdigest()
        rec["transfer"] = {
            "category": "crypto",
            "chain": chain,
            "from_addresses": [addr(rng) for _ in range(rng.randint(1, 3))],
            "to_addresses": [addr(rng)],
            "tx_hash": tx if chain == "bitcoin" else "0x" + tx,
            "amount": str(Decimal(rng.randint(1, 10**8)) / Decimal(10**4)),
            "asset": "BTC" if chain == "bitcoin" else rng.choice(("ETH", "USDT")),
            "exchanges": rng.sample(list(_EXCHANGES), rng.randint(0, 2)),
        }
    else:
        rec["transfer"] = {
            "category": "fuel",
            "product": rng.choice(("refined_petroleum", "crude_oil")),
            "volume": str(rng.randint(200, 8000)),
            "unit": rng.choice(("tonnes", "barrels", "kilolitres")),
            "vessels": [{"imo": _imo(rng), "name": rng.choice(_NAMES)} for _ in range(2)],
            "place": _position(rng),
        }
    return rec


_MAKERS: Final = {"vessel": vessel_record, "worker": worker_record, "transfer": transfer_record}


def generate(
    count: int,
    *,
    seed: int = 1,
    originators: tuple[str, ...] = MEMBERS,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Generate ``count`` valid records of every kind in turn, cycling through originators."""
    rng = random.Random(seed)
    base = now or datetime(2026, 11, 1, tzinfo=UTC)
    kinds = tuple(_MAKERS)
    records = [
        _MAKERS[kinds[i % len(kinds)]](rng, originators[i % len(originators)], base)
        for i in range(count)
    ]
    for rec in records:
        # Two members' feeds made with the same seed (a trial's usual way) must not
        # share report ids, or each member's store would hold the other's ids.
        digest = hashlib.sha256(f"{rec['report_id']} {rec['originator']}".encode()).digest()
        rec["report_id"] = str(uuid.UUID(bytes=digest[:16], version=4))
    return records


def example_records() -> dict[str, dict[str, Any]]:
    """One fixed example of each kind, used in ``schemas/examples/`` and the docs."""
    rng = random.Random(2026)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    return {kind: make(rng, "JPN", base) for kind, make in _MAKERS.items()}


def invalid_records() -> list[tuple[str, str, dict[str, Any] | str]]:
    """Records that each break one validation rule: ``(rule, field path, record)``.

    The record is a dict, or raw text where the rule is about JSON itself.
    """
    rng = random.Random(7)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    v = vessel_record(rng, "JPN", base)
    w = worker_record(rng, "USA", base)
    c = transfer_record(random.Random(3), "KOR", base)
    while c["transfer"]["category"] != "crypto" or c["transfer"]["chain"] != "bitcoin":
        c = transfer_record(rng, "KOR", base)
    e = dict(
        c,
        transfer=dict(
            c["transfer"],
            chain="ethereum",
            asset="ETH",
            from_addresses=[_eth(rng)],
            to_addresses=[_eth(rng)],
            tx_hash="0x" + "ab" * 32,
        ),
    )

    imo = v["vessel"]["imo"]
    bad_imo = imo[:6] + str((int(imo[6]) + 1) % 10)
    eth = e["transfer"]["from_addresses"][0]
    bad_eth = eth[:2] + eth[2:].swapcase() if eth[2:].lower() != eth[2:] else "0x" + "aB" * 20
    btc = c["transfer"]["from_addresses"][0]
    bad_btc = btc[:-1] + ("q" if btc[-1] != "q" else "p")
    return [
        ("json", "", '{"kind": "vessel", '),
        ("unknown kind", "kind", edited(v, "kind", "aircraft")),
        ("unknown field", "vessel.colour", edited(v, "vessel.colour", "red")),
        ("missing field", "vessel.imo", edited(v, "vessel.imo", _DELETE)),
        ("IMO check digit", "vessel.imo", edited(v, "vessel.imo", bad_imo)),
        ("IMO length", "vessel.imo", edited(v, "vessel.imo", "12345")),
        ("MMSI digits", "vessel.mmsi", edited(v, "vessel.mmsi", "44512300")),
        ("latitude range", "vessel.position.lat", edited(v, "vessel.position.lat", "91.0")),
        ("float coordinate", "vessel.position.lon", edited(v, "vessel.position.lon", 124.5)),
        ("timezone missing", "observed_at", edited(v, "observed_at", "2026-11-01T10:00:00")),
        ("timezone not UTC", "observed_at", edited(v, "observed_at", "2026-11-01T10:00:00+09:00")),
        ("unknown originator", "originator", edited(v, "originator", "PRK")),
        ("bad TLP", "tlp", edited(v, "tlp", "AMBER+")),
        ("rel_to member", "rel_to[0]", edited(v, "rel_to", ["XXX"])),
        ("rel_to twice", "rel_to", edited(v, "rel_to", ["USA", "USA"])),
        ("report id", "report_id", edited(v, "report_id", "not-a-uuid")),
        ("confidence", "source.confidence", edited(v, "source.confidence", "certain")),
        ("worker count", "worker.workers", edited(w, "worker.workers", 0)),
        ("worker count type", "worker.workers", edited(w, "worker.workers", "12")),
        (
            "bitcoin checksum",
            "transfer.from_addresses",
            edited(c, "transfer.from_addresses", [bad_btc]),
        ),
        (
            "ethereum EIP-55",
            "transfer.from_addresses",
            edited(e, "transfer.from_addresses", [bad_eth]),
        ),
        ("tx hash", "transfer.tx_hash", edited(c, "transfer.tx_hash", "xyz")),
        ("amount float", "transfer.amount", edited(c, "transfer.amount", 1.5)),
        ("amount negative", "transfer.amount", edited(c, "transfer.amount", "-3")),
        ("transfer category", "transfer.category", edited(c, "transfer.category", "cash")),
        ("member twice", "tlp", to_ndjson([v]).rstrip("\n")[:-1] + ',"tlp":"RED"}'),
        ("time without T", "observed_at", edited(v, "observed_at", "2026-11-01 10:00:00Z")),
        ("time without seconds", "observed_at", edited(v, "observed_at", "2026-11-01T10:00Z")),
        ("Unix time", "observed_at", edited(v, "observed_at", "1761991200")),
        ("zero time", "observed_at", edited(v, "observed_at", "0001-01-01T00:00:00Z")),
        ("report id case", "report_id", edited(v, "report_id", v["report_id"].upper())),
        ("nil report id", "report_id", edited(v, "report_id", str(uuid.UUID(int=0)))),
        ("newline in a name", "vessel.name", edited(v, "vessel.name", "SEA\nSTAR")),
        ("escape in a name", "worker.employer", edited(w, "worker.employer", "Ace\x1b[8mLtd")),
        ("line separator", "source.platform", edited(v, "source.platform", "Sat\u2028B")),
    ]


_DELETE: Final = object()


def edited(record: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``record`` with the member at dotted ``path`` set to ``value``."""
    out: dict[str, Any] = json.loads(json.dumps(record))
    *parents, last = path.split(".")
    node = out
    for name in parents:
        node = node[name]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


def to_ndjson(records: list[dict[str, Any]]) -> str:
    """Serialize records as NDJSON text, one compact record per line."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
