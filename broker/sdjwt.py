"""SD-JWT mechanics (RFC 9901): disclosures, digests, decoys and ``_sd`` processing.

Pure and generic: nothing here knows about sightings. The envelope module
decides which claims become disclosures; this module builds and checks them
exactly as RFC 9901 says, so any conforming SD-JWT library reads our output:

* a disclosure is ``base64url(UTF-8(JSON array))``, ``[salt, name, value]`` for an
  object property or ``[salt, value]`` for an array element (§4.2.1, §4.2.2);
* its digest is ``base64url(SHA-256(ASCII(disclosure)))``, over the encoded
  string exactly as received, never over re-serialised JSON (§4.2.3);
* decoys are digests of fresh random bytes, indistinguishable from real ones (§4.2.5);
* the verifier's processing rules are those of §7.1 steps 3-5, failing closed.

Failures raise ``ValueError`` with a one-line reason; callers translate it.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from pydantic_core import SchemaValidator, ValidationError, core_schema

SD_ALG: Final = "sha-256"
"""The only ``_sd_alg`` we produce or accept (the RFC's default)."""

SALT_BYTES: Final = 16
"""128-bit salts, the minimum RFC 9901 §9.3 recommends."""

SD: Final = "_sd"
MAX_DEPTH: Final = 64
"""Deepest nesting of claims ``process`` walks; real claims nest a few levels."""
ELLIPSIS: Final = "..."


def b64u_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


def b64u_decode(text: str) -> bytes:
    """Strict base64url decode: unpadded URL-safe alphabet only; ``ValueError`` otherwise."""
    # Fast path for the well-formed case (every segment, payload and
    # disclosure received): pydantic-core's base64 decoder, 5-6x binascii's
    # speed on a 5 KB ciphertext, fed the text as a JSON string. It also takes
    # the standard alphabet and padding, so '+', '/' and '=' are refused here,
    # and so are '\\' and '"', which JSON would read as an escape or the end
    # of the string; the length and the spare bits are checked here as well,
    # whatever the library does. It refuses every other character outside the
    # alphabet. Anything not taken goes to the full check, which raises the reason.
    # (Substring tests on the str: on bytes, each costs ~0.14 us in argument parsing.)
    rest = len(text) % 4
    if not (
        rest == 1
        or not text.isascii()
        or "+" in text
        or "/" in text
        or "=" in text
        or "\\" in text
        or '"' in text
        or (rest and _SPARE_BITS[rest] & _B64_VALUE.get(ord(text[-1]), 0))
    ):
        try:
            data: bytes = _B64_JSON.validate_json(f'"{text}"')
        except ValidationError:
            pass
        else:
            return data
    return _b64u_decode_checked(text)


def _b64u_decode_checked(text: str) -> bytes:
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("not unpadded base64url") from None
    # '+', '/' and '=' would survive the translation below, so they are refused
    # first; strict_mode then refuses every other character outside the alphabet.
    if len(data) % 4 == 1 or b"+" in data or b"/" in data or b"=" in data:
        raise ValueError("not unpadded base64url")
    if not has_canonical_tail(text):
        raise ValueError("not canonical base64url (non-zero trailing bits)")
    try:
        standard = data.translate(_TO_STANDARD) + b"=" * (-len(data) % 4)
        return binascii.a2b_base64(standard, strict_mode=True)
    except binascii.Error:
        raise ValueError("not unpadded base64url") from None


def has_canonical_tail(text: str) -> bool:
    """Whether the unused low bits of base64url text's final partial group are zero.

    Otherwise two different strings (two JWS, two envelopes) decode to the same
    bytes; we accept only the one canonical spelling.
    """
    spare = _SPARE_BITS[len(text) % 4]
    return not (spare and _B64_VALUE.get(ord(text[-1]), 0) & spare)


_TO_STANDARD: Final = bytes.maketrans(b"-_", b"+/")
_B64_VALUE: Final = {
    c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}
# By length mod 4: the bits of the last character that carry no data, and the
# padding the standard decoder wants (a remainder of 1 is refused before use).
_SPARE_BITS: Final = (0, 0, 0x0F, 0x03)
# Bytes from a JSON string holding base64 (URL-safe or standard, padding optional),
# and a list of them from a JSON array of such strings.
_B64_CONFIG: Final = core_schema.CoreConfig(val_json_bytes="base64")
_B64_JSON: Final = SchemaValidator(core_schema.bytes_schema(strict=True), _B64_CONFIG)
_B64_LIST_JSON: Final = SchemaValidator(
    core_schema.list_schema(core_schema.bytes_schema(strict=True), strict=True), _B64_CONFIG
)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        # Not named: the sender chose it, and a refusal reason reaches our audit log.
        raise ValueError("duplicate JSON member")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def loads_strict(data: bytes | str) -> Any:
    """Parse UTF-8 JSON, refusing duplicate member names and NaN/Infinity (RFC 8259 ambiguities).

    Two parsers that disagree on duplicates could see different claims under
    one signature, so a duplicate is an error rather than "last one wins".
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        # The codec's own words quote the byte: position only, as for JSON errors.
        raise ValueError(f"not valid JSON (not UTF-8 at byte {exc.start})") from None
    # Fast path: the decoder's own scanner, without the two Python frames of
    # JSONDecoder.decode. It runs the same hooks, so a value it returns for the
    # whole text is exactly what decode returns. Anything else (an error,
    # surrounding whitespace, trailing data) goes the slow way, which raises
    # the usual reason.
    try:
        value, end = _SCAN(text, 0)
    except (StopIteration, ValueError, RecursionError):
        pass
    else:
        if end == len(text):
            return _whole(text, value)
    return _loads_slow(text)


def _whole(text: str, value: Any) -> Any:
    if _SURROGATE_ESCAPE.search(text) is not None and _lone_surrogate(value):
        # "\ud800" alone parses to a string no UTF-8 holds: Go reads it as U+FFFD,
        # Rust's serde_json refuses the text, so one signed claim read three ways
        # (RFC 7493, I-JSON, section 2.1). A pair spelling one character is fine.
        raise ValueError("not valid JSON (an escaped lone surrogate)")
    return value


_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> bool:
    # A stack, not recursion: as deep as the parser went, and no deeper.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item) is not None:
                return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
    return False


def _loads_slow(text: str) -> Any:
    try:
        value = _STRICT.decode(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:
        # Hostile nesting ("[[[[...") exhausts the decoder's stack; still just bad input.
        raise ValueError("JSON nested too deeply") from None
    except ValueError as exc:
        # Python's own words for a huge integer name a sys setting: not the sender's business.
        if "integer string conversion" in str(exc):
            raise ValueError("not valid JSON (an integer of more than 4300 digits)") from None
        raise
    return _whole(text, value)


# One decoder for every call: json.loads with hooks would build a new one each time.
_STRICT: Final = json.JSONDecoder(
    object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
)
# The scanner JSONDecoder.__init__ builds from those hooks (typeshed leaves it out).
_SCAN: Final[Callable[[str, int], tuple[Any, int]]] = _STRICT.scan_once  # type: ignore[attr-defined]
# Likewise one encoder: json.dumps with these options builds a new one per call.
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def dumps_compact(value: Any) -> str:
    """Compact JSON, UTF-8 text kept as is: the form we put inside disclosures and payloads.

    For the values we sign (strings, integers, booleans, null, ASCII member
    names) this is byte for byte RFC 8785 canonical JSON, at half the cost of
    ``rfc8785.dumps`` (a test holds it to that). Verifiers never re-serialise:
    they hash and check exactly the bytes they received.
    """
    return _COMPACT.encode(value)


def hash_disclosure(encoded: str) -> str:
    """The RFC 9901 §4.2.3 digest: base64url(SHA-256(ASCII bytes of the encoded disclosure))."""
    return b64u_encode(hashlib.sha256(encoded.encode("ascii")).digest())


def new_salt() -> str:
    """A fresh base64url salt of ``SALT_BYTES`` random bytes from ``secrets``."""
    return b64u_encode(secrets.token_bytes(SALT_BYTES))


def new_salts(count: int) -> list[str]:
    """``count`` fresh salts as ``new_salt`` makes them, from one call to ``secrets``.

    Issuing salts every field of a report; one system call instead of one per field.
    """
    return _encode_salts(secrets.token_bytes(SALT_BYTES * count))


def _encode_salts(pool: bytes) -> list[str]:
    # Each 16-byte salt plus two zero bytes is 18 bytes, 24 characters with no
    # padding; the first 22 are the salt's unpadded encoding (the zeros only
    # fill the 22nd character's spare bits, which are zero in that encoding).
    count = len(pool) // SALT_BYTES
    chunks = [pool[i : i + SALT_BYTES] for i in range(0, SALT_BYTES * count, SALT_BYTES)]
    raw = binascii.b2a_base64(b"\0\0".join([*chunks, b""]), newline=False)
    text = raw.translate(_TO_URLSAFE).decode("ascii")
    return [text[i : i + 22] for i in range(0, 24 * count, 24)]


def new_decoys(count: int) -> list[str]:
    """``count`` decoy digests: SHA-256 of fresh random bytes, shaped like real ones (§4.2.5).

    One call to ``secrets`` for the whole batch: issuing pads three arrays per report.
    """
    pool = secrets.token_bytes(32 * count)
    return b64u_encode_digests(
        [hashlib.sha256(pool[i : i + 32]).digest() for i in range(0, 32 * count, 32)]
    )


def b64u_encode_digests(digests: Sequence[bytes]) -> list[str]:
    """``[b64u_encode(d) for d in digests]`` for 32-byte digests, in one base64 call.

    Each digest gets one zero byte appended: 33 bytes are 44 characters with no
    padding, and the first 43 are exactly the digest's unpadded encoding, since
    the zero byte only fills the last character's spare bits with zeros (which
    the canonical encoding has there too). Raises ``ValueError`` for another size.
    """
    if any(len(d) != 32 for d in digests):
        raise ValueError("b64u_encode_digests takes 32-byte digests only")
    return _encode_digests(digests)


def _encode_digests(digests: Sequence[bytes]) -> list[str]:
    # b64u_encode_digests for digests known to be 32 bytes (SHA-256 output).
    raw = binascii.b2a_base64(b"\0".join([*digests, b""]), newline=False)
    text = raw.translate(_TO_URLSAFE).decode("ascii")
    return [text[i : i + 43] for i in range(0, 44 * len(digests), 44)]


class Disclosure(NamedTuple):
    """One disclosure: its encoded form, digest, salt, claim name (``None`` in arrays) and value."""

    encoded: str
    digest: str
    salt: str
    name: str | None
    value: Any

    @classmethod
    def make(cls, name: str | None, value: Any, salt: str | None = None) -> Disclosure:
        """Build a disclosure for an object property (``name``) or array element (``None``).

        Raises ``ValueError`` for the reserved names ``_sd`` and ``...`` (§4.2.1).
        """
        salt = new_salt() if salt is None else salt
        if name in (SD, ELLIPSIS):
            raise ValueError(f"{name!r} may not be used as a claim name")
        array = [salt, value] if name is None else [salt, name, value]
        encoded = b64u_encode(dumps_compact(array).encode("utf-8"))
        return cls(encoded, hash_disclosure(encoded), salt, name, value)

    @classmethod
    def parse(cls, encoded: str) -> Disclosure:
        """Decode a received disclosure; raise ``ValueError`` if it is not well-formed."""
        salt, name, value = _decode_disclosure(encoded)
        return cls(encoded, hash_disclosure(encoded), salt, name, value)


def _decoded_or_empty(text: str) -> bytes:
    # For the count alone: a malformed one is refused by Disclosure.parse after.
    try:
        return b64u_decode(text)
    except ValueError:
        return b""


def structure(raw: bytes) -> int:
    """An upper bound on the arrays, objects and items of the JSON text ``raw``.

    Its ``[``, ``{`` and ``,`` outside strings, counted in C before any parse: a
    bound on the parse's and the checks' work and memory. Brackets in a name or a
    detail do not count (a review: an honest record with ``[mirror]`` tags in its
    handles was refused by every receiver when they did).
    """
    # Escapes out first (pairs of backslashes, then escaped quotes: each run of
    # backslashes pairs from its start, as JSON reads it), so that every quote left
    # opens or closes a string; the strings are then every other piece between quotes.
    # Linear, in C: a regex failing on an unterminated string was tried again at each
    # later quote ('"\\' * 70,000 in a payload, before its signature: 57 s; a review).
    plain = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    bare = b"".join(plain.split(b'"')[::2])
    return bare.count(b"[") + bare.count(b"{") + bare.count(b",")


def over_structure(raws: Iterable[bytes], limit: int) -> bool:
    """Whether the JSON texts ``raws`` hold more than ``limit`` in all, as ``structure`` counts.

    Their brackets and commas counted with strings first, which is never less and is
    all an honest envelope needs (about 3 us a payload, where the strings' removal
    takes 9): the exact count only when that is over the limit.
    """
    parts = list(raws)
    if sum(r.count(b"[") + r.count(b"{") + r.count(b",") for r in parts) <= limit:
        return False
    return sum(map(structure, parts)) > limit


def parse_disclosures(encoded: Sequence[str], max_structure: int | None = None) -> list[Disclosure]:
    """``[Disclosure.parse(e) for e in encoded]`` in fewer calls: the receive path's hot loop.

    Raises the ``ValueError`` of the first disclosure that is not well-formed,
    as the list comprehension would: all are decoded and checked, in order,
    before any is hashed (which cannot fail once all are strict base64url). With
    ``max_structure``, raises ``ValueError`` first if they hold more JSON arrays,
    objects and items than that in all (``structure``), before any is parsed.
    """
    raws = _b64u_decode_batch(encoded)
    if max_structure is not None:
        counted = raws if raws is not None else [_decoded_or_empty(e) for e in encoded]
        if over_structure(counted, max_structure):
            raise ValueError(
                f"the disclosures hold more than {max_structure} JSON arrays, objects and items"
            )
    if raws is None:
        return [Disclosure.parse(e) for e in encoded]
    parts: list[tuple[str, str | None, Any]] = []
    for text, raw in zip(encoded, raws, strict=True):
        try:
            json_text = raw.decode("utf-8")
            decoded, end = _SCAN(json_text, 0)
        except (UnicodeDecodeError, StopIteration, ValueError, RecursionError):
            json_text, decoded, end = "", None, None
        # What _decode_disclosure accepts at once; anything else (including
        # what the scanner alone cannot decide, such as an escaped surrogate)
        # goes through it for the reason.
        if (
            end != len(json_text)
            or _SURROGATE_ESCAPE.search(json_text) is not None
            or type(decoded) is not list
            or len(decoded) != 3
            or type(decoded[0]) is not str
            or type(decoded[1]) is not str
            or decoded[1] in (SD, ELLIPSIS)
        ):
            parts.append(_decode_disclosure(text))
        else:
            parts.append((decoded[0], decoded[1], decoded[2]))
    digests = _encode_digests([_sha256(e.encode("ascii")).digest() for e in encoded])
    # tuple.__new__ is what Disclosure(...) runs, without its Python-level frame.
    return [
        _new_tuple(Disclosure, (e, d, *part))
        for e, d, part in zip(encoded, digests, parts, strict=True)
    ]


_sha256: Final = hashlib.sha256
_new_tuple: Final = tuple.__new__


def _b64u_decode_batch(texts: Sequence[str]) -> list[bytes] | None:
    # [b64u_decode(t) for t in texts] in one call of the fast decoder when every
    # text passes b64u_decode's own pre-checks; with no '"' and no '\\' in any
    # of them, the JSON array built below holds exactly one string per text.
    # None if any does not pass or the decoder refuses one: the caller then
    # decodes each in turn, so the first bad one raises its own reason.
    whole = "".join(texts)
    if not (
        not whole.isascii()
        or "+" in whole
        or "/" in whole
        or "=" in whole
        or "\\" in whole
        or '"' in whole
        or any(
            len(t) % 4 == 1
            or (len(t) % 4 and _SPARE_BITS[len(t) % 4] & _B64_VALUE.get(ord(t[-1]), 0))
            for t in texts
        )
    ):
        joined = '","'.join(texts)
        try:
            out: list[bytes] = _B64_LIST_JSON.validate_json(f'["{joined}"]')
        except ValidationError:
            pass
        else:
            if len(out) == len(texts):
                return out
    return None


def _decode_disclosure(encoded: str) -> tuple[str, str | None, Any]:
    decoded = loads_strict(b64u_decode(encoded))
    if not isinstance(decoded, list) or len(decoded) not in (2, 3):
        raise ValueError("a disclosure must be a JSON array of 2 or 3 elements")
    if not isinstance(decoded[0], str):
        raise ValueError("a disclosure's salt must be a string")  # noqa: TRY004 - malformed input
    name: str | None = None
    if len(decoded) == 3:
        name = decoded[1]
        if not isinstance(name, str):
            raise ValueError("a disclosure's claim name must be a string")
        if name in (SD, ELLIPSIS):
            raise ValueError(f"disclosure uses the reserved claim name {name!r}")
    return decoded[0], name, decoded[-1]


def sd_array(digests: Iterable[str], pad_to: int) -> list[str]:
    """Return ``digests`` plus decoys, sorted (§4.2.5, §4.2.4.1).

    The total is padded up to a multiple of ``pad_to``, so the array's length
    says nothing finer than that about how many claims are hidden; sorting
    hides which digests were added in which order.
    """
    out = list(digests)
    total = max(pad_to, -(-len(out) // pad_to) * pad_to)
    out.extend(new_decoys(total - len(out)))
    return sorted(out)


def split_presentation(text: str) -> tuple[str, list[str], str]:
    """Split ``<jws>~<d1>~...~<dn>~[<kb-jwt>]`` into the JWS, disclosures and KB-JWT (§4).

    Raises ``ValueError`` if there is no ``~`` at all or a disclosure is empty.
    """
    parts = text.split("~")
    if len(parts) < 2:
        raise ValueError("an SD-JWT must contain at least one '~'")
    jws, *disclosures, kb_jwt = parts
    if not jws or "" in disclosures:
        raise ValueError("empty component in the SD-JWT")
    return jws, disclosures, kb_jwt


def join_presentation(jws: str, disclosures: Iterable[str]) -> str:
    """Join a JWS and encoded disclosures into an SD-JWT without key binding: ``jws~d~...~``."""
    return "".join([jws, "~", *(d + "~" for d in disclosures)])


def process(payload: Mapping[str, Any], disclosures: Sequence[Disclosure]) -> dict[str, Any]:
    """Apply disclosures to a verified payload per RFC 9901 §7.1 steps 3-5.

    Returns the processed claims (``_sd``, ``_sd_alg`` and undisclosed digests
    removed). Raises ``ValueError`` if ``_sd_alg`` is not sha-256, if two
    disclosures are identical, if a digest is referenced more than once, if a
    disclosure is unreferenced, of the wrong shape for where it is referenced,
    or if its claim name is already present in that object.
    """
    alg = payload.get("_sd_alg", SD_ALG)
    if alg != SD_ALG:
        raise ValueError(f"_sd_alg {alg!r} is not supported (only {SD_ALG})")
    by_digest: dict[str, Disclosure] = {}
    for disclosure in disclosures:
        if disclosure.digest in by_digest:
            raise ValueError("the same disclosure is included twice")
        by_digest[disclosure.digest] = disclosure
    state = _Walk(by_digest)
    claims = state.object(payload)
    claims.pop("_sd_alg", None)
    unused = set(by_digest) - state.seen
    if unused:
        raise ValueError(f"{len(unused)} disclosure(s) not referenced by any digest")
    return claims


# JSON scalars as the parser produces them: never a dict or list, so value()
# returns them unchanged.
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


class _Walk:
    """One pass over the payload, remembering every digest seen (§7.1 step 4)."""

    def __init__(self, by_digest: Mapping[str, Disclosure]) -> None:
        self.by_digest = by_digest
        self.seen: set[str] = set()

    def _see(self, digest: Any) -> Disclosure | None:
        if not isinstance(digest, str):
            raise ValueError("a digest must be a string")  # noqa: TRY004 - malformed input
        if digest in self.seen:
            raise ValueError("a digest is referenced more than once")
        self.seen.add(digest)
        return self.by_digest.get(digest)

    def value(self, value: Any, depth: int) -> Any:
        # An explicit bound: hostile nesting must fail as bad input, not as a
        # RecursionError deep inside the walk.
        if depth > MAX_DEPTH:
            raise ValueError(f"claims nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            return self.object(value, depth)
        if isinstance(value, list):
            return self.array(value, depth)
        return value

    def object(self, obj: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
        # value() inlined for scalars (most claims), which it returns as they
        # are unless the depth bound is already exceeded.
        shallow = depth < MAX_DEPTH
        out = {
            k: v if shallow and type(v) in _SCALARS else self.value(v, depth + 1)
            for k, v in obj.items()
            if k != SD
        }
        digests = obj.get(SD, [])
        if not isinstance(digests, list):
            raise ValueError("_sd must be an array of digests")  # noqa: TRY004 - malformed input
        # _see inlined (most digests are decoys): same checks in the same order.
        seen, by_digest = self.seen, self.by_digest
        for digest in digests:
            if not isinstance(digest, str) or digest in seen:
                self._see(digest)  # raises the reason
            seen.add(digest)
            disclosure = by_digest.get(digest)
            if disclosure is None:
                continue  # a decoy, or a claim this holder was not given
            if disclosure.name is None:
                raise ValueError("an array-element disclosure is referenced from an _sd array")
            if disclosure.name in out:
                raise ValueError("a disclosed claim name is already present in its object")
            value = disclosure.value
            out[disclosure.name] = (
                value if shallow and type(value) in _SCALARS else self.value(value, depth + 1)
            )
        return out

    def array(self, items: list[Any], depth: int) -> list[Any]:
        out = []
        for item in items:
            if isinstance(item, dict) and ELLIPSIS in item:
                if len(item) != 1:
                    raise ValueError("an array-element digest object must have only '...'")
                disclosure = self._see(item[ELLIPSIS])
                if disclosure is None:
                    continue
                if disclosure.name is not None:
                    raise ValueError("an object-property disclosure is referenced from an array")
                out.append(self.value(disclosure.value, depth + 1))
            else:
                out.append(self.value(item, depth + 1))
        return out
