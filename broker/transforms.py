"""Release transforms: a field released in a reduced form instead of as observed.

A transform is named by a short id, which is also how its output is disclosed:
the variant of ``vessel.position`` coarsened to a 0.5° grid is the disclosure
key ``vessel.position#coarsen:0.5``. The originator signs each variant as its
own disclosure, so a partner verifies the reduced value against the signature
without ever receiving the exact one.

========================  ==============================  ==============================
id                        applies to                      output
========================  ==============================  ==============================
``coarsen:<deg>``         positions                       centre of the grid cell
``round:<step>``          amounts and volumes             nearest multiple of ``step``
``hour``                  ``observed_at``                 the time truncated to the hour
``pseudonym:<key id>``    identifiers, names, addresses   ``hmac-sha256:<key id>:<b64url>``
========================  ==============================  ==============================

Pure code: values in, values out. Pseudonym keys are passed in by the caller.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from typing import Any, Final

import rfc8785
from pydantic import ValidationError

from broker.field_check import is_plain_position
from broker.sightings import Position

NAMES: Final = ("coarsen", "round", "hour", "pseudonym")

POSITION_PATHS: Final = frozenset({"vessel.position", "transfer.place"})
AMOUNT_PATHS: Final = frozenset({"transfer.amount", "transfer.volume"})
TIME_PATHS: Final = frozenset({"observed_at"})
PSEUDONYM_PATHS: Final = frozenset(
    {
        "vessel.imo",
        "vessel.mmsi",
        "vessel.name",
        "vessel.counterpart",
        "worker.employer",
        "worker.front_company",
        "worker.online_identities",
        "transfer.from_addresses",
        "transfer.to_addresses",
        "transfer.tx_hash",
        "transfer.exchanges",
        "transfer.vessels",
    }
)
_APPLIES: Final = {
    "coarsen": POSITION_PATHS,
    "round": AMOUNT_PATHS,
    "hour": TIME_PATHS,
    "pseudonym": PSEUDONYM_PATHS,
}
FORMS: Final = {
    "coarsen": "coarsen:<deg>",
    "round": "round:<step>",
    "hour": "hour",
    "pseudonym": "pseudonym:<key id>",
}
"""Each transform id in its general form, as the table above writes it.

A receiver's reason names a variant by this form, never by the parameter in
the disclosure key: that parameter is text the sender chose.
"""
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PSEUDONYM = re.compile(r"hmac-sha256:([A-Za-z0-9_.-]{1,64}):([A-Za-z0-9_-]{43})")
# What round writes (_plain): never an exponent, which a sender could make
# "1E+999999999" and so overflow the check's decimal context.
_ROUNDED = re.compile(r"[0-9]+(\.[0-9]+)?")
VARIANT_SEP: Final = "#"


_PLAIN_DECIMAL = re.compile(r"[0-9]{1,12}(\.[0-9]{1,12})?")


def _positive_decimal(text: str, what: str) -> Decimal:
    # Only plain decimals: the parameter is part of the disclosure key, so
    # "1E+3", " 0.5" or "NaN" would give odd keys (or none) for the same step.
    if not _PLAIN_DECIMAL.fullmatch(text):
        raise ValueError(f"{what} must be a plain positive decimal such as 0.5")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{what} must be a decimal number") from None
    if value <= 0:
        raise ValueError(f"{what} must be a positive decimal")
    return value


def _plain(value: Decimal) -> str:
    # Positions and amounts are plain decimal strings; str(Decimal) would switch
    # to exponent form ("1.3E+2", "5E-7"), which the schema refuses.
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


@dataclass(frozen=True, slots=True)
class Transform:
    """One transform with its parameter; ``Transform.parse("coarsen:0.5")`` builds one."""

    name: str
    param: str | None = None

    @classmethod
    def parse(cls, ident: str) -> Transform:
        """Parse a transform id; raise ``ValueError`` with a plain reason if unknown or bad.

        The reason never quotes ``ident``: a receiver parses the ids in a sender's
        disclosure keys, and its reasons reach its audit log.
        """
        name, _, param = ident.partition(":")
        if name not in NAMES:
            raise ValueError(f"unknown transform (known: {', '.join(NAMES)})")
        if name == "hour":
            if param:
                raise ValueError("transform 'hour' takes no parameter")
            return cls(name)
        if not param:
            raise ValueError(f"transform {name!r} needs a parameter, as in {name}:<value>")
        if name in ("coarsen", "round"):
            step = _positive_decimal(param, f"{name} step")
            if name == "coarsen" and step > 10:
                raise ValueError("coarsen grid must be at most 10 degrees")
            if name == "coarsen" and -step.as_tuple().exponent > 6:  # type: ignore[operator]
                # A cell centre adds half a step; positions carry at most 7 places.
                raise ValueError("coarsen grid must have at most 6 decimal places")
        elif not _KEY_ID.fullmatch(param):
            raise ValueError("pseudonym key id must be 1-64 letters, digits, '.', '_' or '-'")
        return cls(name, param)

    @property
    def ident(self) -> str:
        """The transform id, e.g. ``coarsen:0.5``; part of the disclosure key."""
        return self.name if self.param is None else f"{self.name}:{self.param}"

    def applies_to(self, path: str) -> bool:
        """Return whether this transform can reduce the field at ``path``."""
        return path in _APPLIES[self.name]

    def apply(self, value: Any, *, pseudonym_keys: Mapping[str, bytes], path: str) -> Any:
        """Return the reduced JSON value of ``value`` (a field's JSON form at ``path``).

        Raises ``ValueError`` if a pseudonym key is missing.
        """
        if self.name == "coarsen":
            return _coarsen(value, Decimal(str(self.param)))
        if self.name == "round":
            step = Decimal(str(self.param))
            # Enough precision for any amount the schema admits, so quantize
            # never overflows the default 28 digits.
            with localcontext() as ctx:
                ctx.prec = len(str(value)) + len(str(self.param)) + 4
                rounded = (Decimal(value) / step).quantize(Decimal(1), ROUND_HALF_EVEN) * step
                return _plain(rounded)
        if self.name == "hour":
            when = datetime.fromisoformat(value)
            return (
                when.replace(minute=0, second=0, microsecond=0).isoformat().replace("+00:00", "Z")
            )
        key = pseudonym_keys.get(str(self.param))
        if key is None:
            raise ValueError(f"no pseudonym key {self.param!r} is configured")
        return _pseudonym(key, str(self.param), path, value)

    def check_output(self, value: Any) -> None:
        """Raise ``ValueError`` unless ``value`` is something this transform produces.

        Coarsened, rounded and hour values must be fixed points of the transform
        (a cell centre, a multiple of the step, a whole hour, each in the exact text
        it gives), so a variant key cannot pass off a finer value. A pseudonym can
        be checked only for its form. The reason never quotes the value, nor the
        parameter: a receiver checks transforms named in a sender's disclosure keys.
        """
        if self.name == "coarsen":
            # A plainly valid position (every one a transform produces) needs no
            # JSON round trip; anything else meets the schema, which gives the reason.
            if not is_plain_position(value):
                _check_position(value)
            if _coarsen(value, Decimal(str(self.param))) != value:
                raise ValueError(
                    "position is not the centre of a cell of the variant's grid, "
                    "written as coarsen writes it"
                )
            return
        if self.name == "round":
            # Rounding may legitimately reach zero.
            if not isinstance(value, str) or not _ROUNDED.fullmatch(value):
                raise ValueError("rounded amount must be a plain non-negative decimal string")
            if self.apply(value, pseudonym_keys={}, path="") != value:
                raise ValueError(
                    "amount is not a multiple of the variant's step, written as round writes it"
                )
            return
        if self.name == "hour":
            if not isinstance(value, str) or not value.endswith(":00:00Z"):
                raise ValueError("time truncated to the hour must end in :00:00Z")
            try:
                whole = self.apply(value, pseudonym_keys={}, path="") == value
            except ValueError:
                whole = False
            if not whole:
                raise ValueError("time truncated to the hour must be YYYY-MM-DDTHH:00:00Z")
            return
        match = _PSEUDONYM.fullmatch(value) if isinstance(value, str) else None
        if match is None or match.group(1) != self.param:
            raise ValueError(
                "pseudonym must look like hmac-sha256:<the variant's key id>:<43 base64url>"
            )


def _check_position(value: Any) -> None:
    # The schema decides, on the value's JSON text, without quoting the value.
    try:
        text = rfc8785.dumps(value)
    except ValueError:
        # rfc8785's own text quotes the value it cannot encode (2**53, say).
        raise ValueError("position is not a JSON value RFC 8785 can encode") from None
    try:
        Position.model_validate_json(text)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    # pydantic's own text quotes the input; its first error's location and message do not.
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    why = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {why}" if where else why


def _coarsen(value: Mapping[str, str], grid: Decimal) -> dict[str, str]:
    def snap(text: str, limit: int) -> str:
        cell = (Decimal(text) / grid).to_integral_value(ROUND_FLOOR)
        centre = cell * grid + grid / 2
        # The cell holding a pole or the antimeridian can have its centre out of
        # range (and a grid that does not divide 90 overshoots at -90 too); use
        # the neighbouring cell, whose centre is still within half a step.
        if centre > limit:
            centre -= grid
        elif centre < -limit:
            centre += grid
        return _plain(centre)

    return {"lat": snap(value["lat"], 90), "lon": snap(value["lon"], 180)}


def _pseudonym(key: bytes, key_id: str, path: str, value: Any) -> str:
    # Domain-separated by key id and field path, over RFC 8785 bytes, so the same
    # identifier in two fields (or under two keys) gives unrelated pseudonyms.
    message = b"msmt-pseudonym-v1\x00" + key_id.encode() + b"\x00" + path.encode() + b"\x00"
    mac = hmac.new(key, message + rfc8785.dumps(value), hashlib.sha256).digest()
    return f"hmac-sha256:{key_id}:{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def variant_key(path: str, transform: Transform | None) -> str:
    """The disclosure key for a field as released: ``path`` or ``path#<transform id>``."""
    return path if transform is None else f"{path}{VARIANT_SEP}{transform.ident}"


def split_variant_key(key: str) -> tuple[str, Transform | None]:
    """Split a disclosure key into its field path and transform (``ValueError`` if bad)."""
    path, sep, ident = key.partition(VARIANT_SEP)
    return (path, _parse_cached(ident)) if sep else (path, None)


# A receiver splits every variant key of every report, and a node's policies
# use a handful of transform ids. Transforms are immutable, so one parsed
# value can be shared; a bad id raises every time (exceptions are not cached),
# and the bound keeps hostile ids from growing the cache.
_parse_cached: Final = functools.lru_cache(maxsize=256)(Transform.parse)
