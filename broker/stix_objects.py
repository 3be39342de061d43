"""The STIX 2.1 objects of an export: one report's objects, and the fixed ones each bundle needs.

docs/STIX.md is the mapping table this module implements. Every value written
comes from the report's received ``fields`` (or its handling claims); where a
field has several received forms, the most precise one is used (the exact
value, else the finest coarsening or rounding); pseudonyms are carried only as
opaque strings, never as the identifier they hide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final
from uuid import UUID, uuid5

import rfc8785

from broker.identifiers import canonical_address
from broker.transforms import split_variant_key

MSMT_NAMESPACE: Final = UUID("5b97faa6-0569-4b13-b73f-80f354b4d9bf")
"""Namespace of this project's UUIDv5 ids (STIX 2.1 forbids the SCO namespace for SDOs)."""
SCO_NAMESPACE: Final = UUID("00abedb4-aa42-466c-9c01-fed23315a9b7")
"""The STIX 2.1 section 2.9 namespace for SCO ids."""

PRODUCER_ID: Final = "identity--fcbdabc7-cd3a-47b0-a2f2-94e4a386b180"
"""The msmt-broker project, author of the extension definitions below."""
EXT_REPORT: Final = "extension-definition--6ce09168-cb45-46ed-a4ab-299fb5b050bd"
EXT_WALLET: Final = "extension-definition--36b8b35c-a93d-4050-95cf-539c0c73642d"
EXT_TRANSACTION: Final = "extension-definition--64dd7a57-26d9-4026-ae3a-6a382139bfee"
TLP_EXTENSION: Final = "extension-definition--60a3c5c5-0d10-413e-aab3-9e08dde9e88d"
"""The OASIS TLP 2.0 property extension (cti-stix-common-objects)."""

TLP_MARKINGS: Final[dict[str, str]] = {
    # Official TLP 2.0 marking definitions, oasis-open/cti-stix-common-objects.
    "CLEAR": "marking-definition--94868c89-83c2-464b-929b-a1a8aa3c8487",
    "GREEN": "marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb",
    "AMBER": "marking-definition--55d920b0-5e8b-4f79-9ee9-91f868d9b421",
    "AMBER+STRICT": "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003",
    "RED": "marking-definition--e828b379-4e03-4974-9ac4-e53a884c97c1",
}
_TLP_ORDER: Final = tuple(TLP_MARKINGS)  # least to most restrictive
_TLP_IDS: Final = frozenset(TLP_MARKINGS.values())
TLP_CREATED: Final = "2022-10-01T00:00:00.000Z"
FIXED_CREATED: Final = "2026-01-01T00:00:00.000Z"
"""``created`` of objects that belong to no one report, so their content never changes."""

_CONFIDENCE: Final = {
    "low": 15,
    "moderate": 50,
    "high": 85,
}  # STIX 2.1 Appendix A None/Low/Med/High
_SECTORS: Final = {
    "construction": "construction",
    "information_technology": "technology",
    "mining": "mining",
    "medical": "healthcare",
    "restaurant": "hospitality-leisure",
    "textiles": "manufacturing",
}
_METRES_PER_DEGREE: Final = 111_320
MEMBER_NAMES: Final = {
    "JPN": "Japan",
    "USA": "United States",
    "KOR": "Republic of Korea",
    "GBR": "United Kingdom",
    "FRA": "France",
    "AUS": "Australia",
    "CAN": "Canada",
    "DEU": "Germany",
    "ITA": "Italy",
    "NLD": "Netherlands",
    "NZL": "New Zealand",
}
# ISO 3166-1 alpha-3 -> alpha-2 (Debian iso-codes 4.15): STIX location.country is alpha-2.
_ISO3166_PAIRS: Final = (
    "ABWAW AFGAF AGOAO AIAAI ALAAX ALBAL ANDAD AREAE ARGAR ARMAM ASMAS ATAAQ ATFTF ATGAG AUSAU"
    " AUTAT AZEAZ BDIBI BELBE BENBJ BESBQ BFABF BGDBD BGRBG BHRBH BHSBS BIHBA BLMBL BLRBY BLZBZ"
    " BMUBM BOLBO BRABR BRBBB BRNBN BTNBT BVTBV BWABW CAFCF CANCA CCKCC CHECH CHLCL CHNCN CIVCI"
    " CMRCM CODCD COGCG COKCK COLCO COMKM CPVCV CRICR CUBCU CUWCW CXRCX CYMKY CYPCY CZECZ DEUDE"
    " DJIDJ DMADM DNKDK DOMDO DZADZ ECUEC EGYEG ERIER ESHEH ESPES ESTEE ETHET FINFI FJIFJ FLKFK"
    " FRAFR FROFO FSMFM GABGA GBRGB GEOGE GGYGG GHAGH GIBGI GINGN GLPGP GMBGM GNBGW GNQGQ GRCGR"
    " GRDGD GRLGL GTMGT GUFGF GUMGU GUYGY HKGHK HMDHM HNDHN HRVHR HTIHT HUNHU IDNID IMNIM INDIN"
    " IOTIO IRLIE IRNIR IRQIQ ISLIS ISRIL ITAIT JAMJM JEYJE JORJO JPNJP KAZKZ KENKE KGZKG KHMKH"
    " KIRKI KNAKN KORKR KWTKW LAOLA LBNLB LBRLR LBYLY LCALC LIELI LKALK LSOLS LTULT LUXLU LVALV"
    " MACMO MAFMF MARMA MCOMC MDAMD MDGMG MDVMV MEXMX MHLMH MKDMK MLIML MLTMT MMRMM MNEME MNGMN"
    " MNPMP MOZMZ MRTMR MSRMS MTQMQ MUSMU MWIMW MYSMY MYTYT NAMNA NCLNC NERNE NFKNF NGANG NICNI"
    " NIUNU NLDNL NORNO NPLNP NRUNR NZLNZ OMNOM PAKPK PANPA PCNPN PERPE PHLPH PLWPW PNGPG POLPL"
    " PRIPR PRKKP PRTPT PRYPY PSEPS PYFPF QATQA REURE ROURO RUSRU RWARW SAUSA SDNSD SENSN SGPSG"
    " SGSGS SHNSH SJMSJ SLBSB SLESL SLVSV SMRSM SOMSO SPMPM SRBRS SSDSS STPST SURSR SVKSK SVNSI"
    " SWESE SWZSZ SXMSX SYCSC SYRSY TCATC TCDTD TGOTG THATH TJKTJ TKLTK TKMTM TLSTL TONTO TTOTT"
    " TUNTN TURTR TUVTV TWNTW TZATZ UGAUG UKRUA UMIUM URYUY USAUS UZBUZ VATVA VCTVC VENVE VGBVG"
    " VIRVI VNMVN VUTVU WLFWF WSMWS YEMYE ZAFZA ZMBZM ZWEZW"
)
_ISO3166: Final = {pair[:3]: pair[3:] for pair in _ISO3166_PAIRS.split()}


_LAST_INSTANT: Final = datetime.max.replace(tzinfo=UTC)
_LAST_HOUR: Final = _LAST_INSTANT.replace(minute=0, second=0, microsecond=0)


def stix_time(value: datetime) -> str:
    """Format an aware datetime as a STIX timestamp in UTC, to the millisecond.

    Always a 4-digit year: ``strftime("%Y")`` writes year 1 as ``1``, which
    makes the timestamp, and with it the whole bundle, invalid STIX.
    """
    utc = value.astimezone(UTC)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
        f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


def member_identity_id(member: str) -> str:
    """The deterministic ``identity`` id of an MSMT member."""
    return f"identity--{uuid5(MSMT_NAMESPACE, f'member/{member}')}"


def sco_id(kind: str, contributing: Mapping[str, Any]) -> str:
    """STIX 2.1 section 2.9 SCO id: UUIDv5 of the JCS bytes of the id-contributing properties."""
    return f"{kind}--{uuid5(SCO_NAMESPACE, rfc8785.dumps(dict(contributing)).decode())}"


def best_form(fields: Mapping[str, Any], path: str) -> tuple[Any, str | None]:
    """The most precise received form of ``path``: ``(value, transform id or None)``.

    The exact value if received, else the variant with the finest step
    (coarsening grid, rounding step, or the hour); ``(None, None)`` if there is
    none. Pseudonyms are never chosen: they hide the value rather than reduce it.
    """
    if path in fields:
        return fields[path], None
    best: tuple[Any, str, Decimal] | None = None
    for key in sorted(fields):
        base, transform = split_variant_key(key)
        if base != path or transform is None or transform.name == "pseudonym":
            continue
        step = Decimal(transform.param) if transform.param else Decimal(0)
        if best is None or step < best[2]:
            best = (fields[key], transform.ident, step)
    return (best[0], best[1]) if best else (None, None)


def coordinates(position: Mapping[str, str]) -> tuple[float, float]:
    """A decimal-string position as JSON numbers, because STIX ``location`` requires numbers.

    The one place an exact decimal becomes a float: positions have at most 7
    decimal places, and the shortest repr of the double gives back the same digits.
    """
    return float(Decimal(position["lat"])), float(Decimal(position["lon"]))


def cell_precision(transform: str | None) -> float | None:
    """Metres from a coarsening cell's centre to its corner (None for an exact position)."""
    if transform is None or not transform.startswith("coarsen:"):
        return None
    grid = float(Decimal(transform.partition(":")[2]))
    return float(math.ceil(grid / 2 * math.sqrt(2) * _METRES_PER_DEGREE))


def seen_span(fields: Mapping[str, Any]) -> tuple[str, str] | None:
    """(first, last) seen as STIX timestamps from ``observed_at`` or ``observed_at#hour``.

    An hour-truncated time stands for that whole hour, so it spans it.
    """
    value, transform = best_form(fields, "observed_at")
    if value is None:
        return None
    start = datetime.fromisoformat(value)
    end = start
    if transform == "hour":
        # The last hour of year 9999 ends past what a timestamp can hold.
        end = start + timedelta(hours=1) if start < _LAST_HOUR else _LAST_INSTANT
    return stix_time(start), stix_time(end)


def vessel_identifier(ref: Mapping[str, Any], pseudonym: str | None = None) -> str | None:
    """What identifies a vessel across reports: ``IMO n``, else ``MMSI n``, else None.

    ``pseudonym`` is a received ``vessel.imo`` or ``vessel.mmsi`` pseudonym, used
    only without an exact number: the same number under the same key always
    gives the same pseudonym (which names its key), so it identifies the vessel
    among that key's pseudonyms and never across keys. A name is no identifier:
    names are shared by unrelated ships and changed by the ones evading sanctions.
    """
    for key, label in (("imo", "IMO"), ("mmsi", "MMSI")):
        if key in ref:
            return f"{label} {ref[key]}"
    return pseudonym


def vessel_name(ref: Mapping[str, Any], where: str, pseudonym: str | None = None) -> str:
    """The ``infrastructure`` name of a vessel; ``where`` is ``<originator> report <8 hex>``.

    Tools such as OpenCTI take an Infrastructure's name (and aliases) as its
    identity and merge objects that share one, so a name must either identify
    the vessel (``NAME (IMO n)``, ``IMO n``) or be specific to one report.
    """
    ident = vessel_identifier(ref, pseudonym)
    if ident is not None:
        return f"{ref['name']} ({ident})" if "name" in ref else ident
    if "name" in ref:
        return f"{ref['name']} (as named in {where})"
    return f"Unidentified vessel ({where})"


def _slug(text: str) -> str:
    return "-".join(text.lower().replace("_", " ").split())


class _Report:
    """Builds the objects of one report into a ``BundleBuilder``."""

    def __init__(self, owner: BundleBuilder, head: Mapping[str, Any], fields: Mapping[str, Any]):
        self.owner = owner
        self.head = head
        self.fields = fields
        self.created = stix_time(head["iat"])
        self.author = member_identity_id(head["originator"])
        self.markings = [TLP_MARKINGS[head["tlp"]]]
        statement = owner.rel_to_marking(head["originator"], head["rel_to"])
        if statement is not None:
            self.markings.append(statement)
        self.refs: list[str] = []

    def _id(self, kind: str, role: str) -> str:
        name = f"{self.head['originator']}/{self.head['report_id']}/{role}"
        return f"{kind}--{uuid5(MSMT_NAMESPACE, name)}"

    def sdo(self, kind: str, role: str, **props: Any) -> str:
        obj = {
            "type": kind,
            "spec_version": "2.1",
            "id": self._id(kind, role),
            "created_by_ref": self.author,
            "created": self.created,
            "modified": self.created,
            **{k: v for k, v in props.items() if v is not None and v != []},
            "object_marking_refs": self.markings,
        }
        self.owner.objects[obj["id"]] = obj
        self.refs.append(obj["id"])
        return str(obj["id"])

    def related(self, role: str, source: str, target: str, description: str) -> str:
        return self.sdo(
            "relationship",
            role,
            relationship_type="related-to",
            source_ref=source,
            target_ref=target,
            description=description,
        )

    def sco(self, kind: str, extension: str | None, **given: Any) -> str:
        # Every property given is id-contributing (value; account_type, account_login).
        props = {k: v for k, v in given.items() if v is not None}
        obj: dict[str, Any] = {"type": kind, "spec_version": "2.1", "id": sco_id(kind, props)}
        obj.update(props)
        if extension is not None:
            obj["extensions"] = {extension: {"extension_type": "new-sco"}}
        self.owner.add_sco(obj, self.head["tlp"], self.markings)
        self.refs.append(obj["id"])
        return str(obj["id"])

    def location(self, role: str, path: str, label: str) -> str | None:
        position, transform = best_form(self.fields, path)
        if position is None:
            return None
        lat, lon = coordinates(position)
        reduced = (
            f" (coarsened to a {transform.partition(':')[2]} degree cell)" if transform else ""
        )
        return self.sdo(
            "location",
            role,
            name=f"{label}{reduced}",
            description=f"Position as received, from {path}{'#' + transform if transform else ''}.",
            latitude=lat,
            longitude=lon,
            precision=cell_precision(transform),
        )

    @property
    def where(self) -> str:
        """``<originator> report <first 8 hex of the id>``: makes a name specific to this report."""
        return f"{self.head['originator']} report {self.head['report_id'][:8]}"

    def vessel(
        self, role: str, ref: Mapping[str, Any], description: str, pseudonym: str | None = None
    ) -> str:
        name = vessel_name(ref, self.where, pseudonym)
        ident = vessel_identifier(ref, pseudonym)
        return self.sdo(
            "infrastructure",
            role,
            name=name,
            description=description,
            # "unknown" is the one infrastructure-type-ov value a ship fits.
            infrastructure_types=["unknown"],
            # OpenCTI merges by alias as by name: only the identifier, so that two
            # spellings of a name merge, and an MMSI (changed with the flag,
            # spoofed in identity tampering) never fuses two hulls with IMOs.
            aliases=[ident] if ident is not None and ident != name else None,
        )

    def sighting(self, role: str, of: str, where: str | None, description: str) -> str:
        span = seen_span(self.fields)
        return self.sdo(
            "sighting",
            role,
            sighting_of_ref=of,
            where_sighted_refs=[where] if where else None,
            first_seen=span[0] if span else None,
            last_seen=span[1] if span else None,
            count=1,
            confidence=_confidence(self.fields),
            description=description,
        )

    def finish(self) -> None:
        head, fields = self.head, self.fields
        lines = [f"MSMT {head['kind']} report {head['report_id']} from {head['originator']}."]
        lines += received_lines(fields)
        extension: dict[str, Any] = {
            "extension_type": "property-extension",
            "report_id": head["report_id"],
            "originator": head["originator"],
            "kind": head["kind"],
            "tlp": head["tlp"],
            "issued_at": stix_time(head["iat"]),
            "received_at": stix_time(head["received_at"]),
        }
        if fields:  # STIX forbids empty lists
            extension["fields"] = [{"key": key, "value": fields[key]} for key in sorted(fields)]
        if head["rel_to"] is not None:
            # The signed order: the extension is the report as received. (The
            # statement marking sorts, so one list has one marking id.)
            extension["rel_to"] = list(head["rel_to"])
        refs = list(dict.fromkeys(self.refs)) or [self.author]
        self.refs = []
        self.sdo(
            "report",
            "report",
            name=f"MSMT {head['kind']} report {head['report_id']} ({head['originator']})",
            description="\n".join(lines),
            report_types=["threat-report"],
            published=self.created,
            object_refs=refs,
            confidence=_confidence(fields),
            labels=["msmt", f"msmt-{head['kind']}"],
            extensions={EXT_REPORT: extension},
        )


def _confidence(fields: Mapping[str, Any]) -> int | None:
    value = fields.get("source.confidence")
    return _CONFIDENCE.get(value) if isinstance(value, str) else None


def show_value(value: Any) -> str:
    """A received value on one line: a string as it is, anything else as RFC 8785 JSON.

    Strings need no quoting: the schema refuses control characters and line
    breaks in every string field, so a value can never start a second line.
    """
    return value if isinstance(value, str) else rfc8785.dumps(value).decode()


def received_lines(fields: Mapping[str, Any]) -> list[str]:
    """The report description's field lines: ``Fields as received:`` then ``key: value``.

    One line per received disclosure key, in key order, every form (variants and
    pseudonyms included): MISP keeps a report's description and drops its
    extension, so this is the one place such a tool can keep every field from.
    """
    if not fields:
        return []
    return ["Fields as received:", *(f"{key}: {show_value(fields[key])}" for key in sorted(fields))]


def _describe(fields: Mapping[str, Any], paths: tuple[str, ...]) -> list[str]:
    """One ``path: value`` line per received field among ``paths`` (most precise form)."""
    out = []
    for path in paths:
        value, transform = best_form(fields, path)
        if value is not None:
            out.append(f"{path}{'#' + transform if transform else ''}: {show_value(value)}")
    return out


def _vessel_report(rep: _Report) -> None:
    f = rep.fields
    ref = {k: f[f"vessel.{k}"] for k in ("imo", "mmsi", "name") if f"vessel.{k}" in f}
    facts = _describe(f, ("vessel.flag", "vessel.activity", "vessel.cargo"))
    hidden = [
        f"{label} pseudonym {value}"
        for path, label in (("vessel.imo", "IMO"), ("vessel.mmsi", "MMSI"))
        for key, value in sorted(f.items())
        if key.startswith(f"{path}#pseudonym:")
    ]
    pseudonym = hidden[0] if hidden else None
    vessel = rep.vessel("vessel", ref, "\n".join(["Vessel reported to MSMT.", *facts]), pseudonym)
    name = vessel_name(ref, rep.where, pseudonym)
    place = rep.location("position", "vessel.position", f"Position of {name}")
    rep.sighting("sighting", vessel, place, "\n".join(facts) or "Vessel sighting.")
    counterpart = f.get("vessel.counterpart")
    if isinstance(counterpart, Mapping):
        other = rep.vessel("counterpart", counterpart, "Counterpart in a ship-to-ship transfer.")
        rep.related("counterpart-link", vessel, other, "ship-to-ship transfer counterpart")


def _fuel(rep: _Report) -> None:
    f = rep.fields
    facts = _describe(f, ("transfer.product", "transfer.volume", "transfer.unit"))
    place = rep.location("place", "transfer.place", "Place of fuel transfer")
    vessels = f.get("transfer.vessels")
    ids: list[str] = []
    for i, ref in enumerate(vessels if isinstance(vessels, list) else []):
        ids.append(rep.vessel(f"vessel-{i}", ref, "Vessel in a fuel transfer."))
        rep.sighting(f"sighting-{i}", ids[-1], place, "\n".join(["Fuel transfer.", *facts]))
    for i, other in enumerate(ids[1:], start=1):
        rep.related(f"transfer-link-{i}", ids[0], other, "fuel transfer between vessels")


def _crypto(rep: _Report) -> None:
    f = rep.fields
    # The id-contributing value is the address's one spelling, so that EIP-55 and
    # lower-case spellings of an address are one wallet; as spelt is in the report.
    senders = [
        rep.sco("cryptocurrency-wallet", EXT_WALLET, value=canonical_address(a))
        for a in f.get("transfer.from_addresses", [])
    ]
    receivers = [
        rep.sco("cryptocurrency-wallet", EXT_WALLET, value=canonical_address(a))
        for a in f.get("transfer.to_addresses", [])
    ]
    observed = list(dict.fromkeys(senders + receivers))
    if "transfer.tx_hash" in f:
        tx = rep.sco("cryptocurrency-transaction", EXT_TRANSACTION, value=f["transfer.tx_hash"])
        observed.append(tx)
        for i, wallet in enumerate(senders):
            rep.related(f"from-{i}", tx, wallet, "transaction sent from this address")
        for i, wallet in enumerate(receivers):
            rep.related(f"to-{i}", tx, wallet, "transaction sent to this address")
    else:
        for i, src in enumerate(senders):
            for j, dst in enumerate(receivers):
                rep.related(f"flow-{i}-{j}", src, dst, "funds transferred to this address")
    span = seen_span(f)
    if span is not None and observed:
        rep.sdo(
            "observed-data",
            "observed",
            first_observed=span[0],
            last_observed=span[1],
            number_observed=1,
            object_refs=observed,
            confidence=_confidence(f),
        )


def _worker_report(rep: _Report) -> None:
    f = rep.fields
    facts = _describe(f, ("worker.sector", "worker.workers", "worker.human_rights_concerns"))
    count = f.get("worker.workers")
    group = rep.sdo(
        "identity",
        "workers",
        # A head count is no identity: the report makes the name specific.
        name=f"{f'{count} ' if isinstance(count, int) else ''}DPRK workers ({rep.where})",
        identity_class="group",
        sectors=[_SECTORS[s] for s in [f.get("worker.sector")] if s in _SECTORS],
        description="\n".join(["North Korean workers abroad.", *facts]),
    )
    country = _ISO3166.get(f.get("worker.country", ""))
    place = None
    # No STIX location without a country, region or coordinates: without an
    # alpha-2 country, the city is only in the report description's field lines.
    if country is not None:
        city = f.get("worker.location")
        place = rep.sdo(
            "location",
            "place",
            name=city or f["worker.country"],
            country=country,
            city=city,
        )
        rep.sdo(
            "relationship",
            "located-at",
            relationship_type="located-at",
            source_ref=group,
            target_ref=place,
        )
    employer = None
    if "worker.employer" in f:
        employer = rep.sdo(
            "identity", "employer", name=f["worker.employer"], identity_class="organization"
        )
        rep.related("employer-link", group, employer, "employed by")
    if "worker.front_company" in f:
        front = rep.sdo(
            "identity", "front", name=f["worker.front_company"], identity_class="organization"
        )
        rep.related("front-link", employer or group, front, "front company")
    accounts = f.get("worker.online_identities")
    for i, account in enumerate(accounts if isinstance(accounts, list) else []):
        user = rep.sco(
            "user-account",
            None,
            account_type=_slug(account["platform"]) or None,
            account_login=account["handle"],
        )
        rep.related(f"account-{i}", group, user, "online account used by the workers")
    rep.sighting("sighting", group, place, "\n".join(facts) or "Workers sighting.")


_FUEL_PATHS: Final = frozenset(
    {"transfer.product", "transfer.volume", "transfer.unit", "transfer.vessels", "transfer.place"}
)


def _base_paths(fields: Mapping[str, Any]) -> set[str]:
    return {split_variant_key(key)[0] for key in fields}


class BundleBuilder:
    """Accumulates the objects of one bundle; an SCO seen in several reports is one object."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.scos: dict[str, dict[str, Any]] = {}
        self.statements: dict[str, dict[str, Any]] = {}
        self._sco_tlp: dict[str, str] = {}
        self._tlps: set[str] = set()
        self._members: set[str] = set()

    def rel_to_marking(self, originator: str, rel_to: tuple[str, ...] | None) -> str | None:
        """The statement marking for a REL TO list (added once), or None without REL TO."""
        if rel_to is None:
            return None
        members = ", ".join(sorted(rel_to))
        mid = f"marking-definition--{uuid5(MSMT_NAMESPACE, f'{originator}/rel-to/{members}')}"
        self.statements[mid] = {
            "type": "marking-definition",
            "spec_version": "2.1",
            "id": mid,
            "created_by_ref": member_identity_id(originator),
            "created": FIXED_CREATED,
            "name": f"REL TO {members}",
            "definition_type": "statement",
            "definition": {"statement": f"REL TO {members} (MSMT releasability, {originator})"},
        }
        return mid

    def add_sco(self, obj: dict[str, Any], tlp: str, markings: list[str]) -> None:
        """Add or merge an SCO: it keeps the strictest TLP and every REL TO of its reports."""
        sid = str(obj["id"])
        held = self.scos.setdefault(sid, obj)
        strictest = max(self._sco_tlp.get(sid, "CLEAR"), tlp, key=_TLP_ORDER.index)
        self._sco_tlp[sid] = strictest
        statements = {m for m in held.get("object_marking_refs", []) if m not in _TLP_IDS}
        statements.update(m for m in markings if m not in _TLP_IDS)
        held["object_marking_refs"] = [TLP_MARKINGS[strictest], *sorted(statements)]

    def add_report(self, **head: Any) -> None:
        """Add the objects of one checked report (see ``broker.stix.ReceivedReport``)."""
        fields = head.pop("fields")
        self._tlps.add(head["tlp"])
        self._members.add(head["originator"])
        rep = _Report(self, head, fields)
        kind = head["kind"]
        if kind == "vessel":
            _vessel_report(rep)
        elif kind == "worker":
            _worker_report(rep)
        elif kind != "transfer":
            # Not a bare report that still validates: a kind added without its mapping
            # (stix.check_report refuses a kind this version does not know).
            raise ValueError(f"no STIX mapping for kind {kind!r}")
        elif fields.get("transfer.category") == "fuel" or _FUEL_PATHS & _base_paths(fields):
            _fuel(rep)
        else:
            _crypto(rep)
        rep.finish()

    def bundle(self) -> dict[str, Any]:
        """The bundle: fixed objects first, then report objects, then SCOs, all deterministic."""
        from broker.stix_defs import fixed_objects  # noqa: PLC0415

        objects = [
            *fixed_objects(sorted(self._members), [t for t in _TLP_ORDER if t in self._tlps]),
            *(self.statements[k] for k in sorted(self.statements)),
            *self.objects.values(),
            *(self.scos[k] for k in sorted(self.scos)),
        ]
        digest = rfc8785.dumps(objects).decode()
        return {
            "type": "bundle",
            "id": f"bundle--{uuid5(MSMT_NAMESPACE, 'bundle/' + digest)}",
            "objects": objects,
        }
