"""Check-digit and checksum validation for the identifiers that sightings carry.

Each function returns ``None`` for a valid identifier or raises ``ValueError``
with a plain-words reason, which pydantic turns into a field error.

* IMO ship numbers: 7 digits whose last is a weighted check digit (IMO Res. A.1117(30)).
* MMSI: exactly 9 digits (ITU-R M.585).
* Bitcoin: base58check (P2PKH/P2SH) via the ``base58`` library, or segwit
  bech32/bech32m (BIP-173/BIP-350). No maintained library covers bech32m, so
  that checksum is written here after the BIP-350 reference code and tested
  with the BIP's own vectors.
* Ethereum: ``0x`` + 40 hex digits; mixed-case addresses must carry a valid
  EIP-55 checksum (keccak-256 from pycryptodome).

``canonical_address`` gives one spelling per address, for use as an identifier.
"""

from __future__ import annotations

import functools
import operator
import re
import sys
import threading
from types import ModuleType
from typing import Final

import base58

_IMO = re.compile(r"[0-9]{7}")
_MMSI = re.compile(r"[0-9]{9}")
_ETH = re.compile(r"0x[0-9a-fA-F]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ETH_TX = re.compile(r"0x[0-9a-f]{64}")


def imo_check_digit(first_six: str) -> int:
    """Return the IMO check digit for the first six digits of an IMO number."""
    return sum(int(d) * w for d, w in zip(first_six, range(7, 1, -1), strict=True)) % 10


def check_imo(value: str) -> None:
    """Validate a 7-digit IMO number and its check digit."""
    if not _IMO.fullmatch(value):
        raise ValueError("IMO number must be exactly 7 digits")
    expected = imo_check_digit(value[:6])
    if int(value[6]) != expected:
        # No digits in the reason: a receiver's audit entry must not quote the value.
        raise ValueError("IMO check digit does not match the first six digits")


def check_mmsi(value: str) -> None:
    """Validate an MMSI: exactly nine digits."""
    if not _MMSI.fullmatch(value):
        raise ValueError("MMSI must be exactly 9 digits")


# --- bech32 / bech32m (BIP-173, BIP-350) -------------------------------------------------

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_CONST = 1
_BECH32M_CONST = 0x2BC830A3


_GEN: Final = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
# For each value of the checksum's top five bits, the XOR of the generator terms
# BIP-173's loop would apply one by one: one lookup per character instead of
# five conditional XORs (addresses are checked on every transfer received).
_GEN_BY_TOP: Final = tuple(
    functools.reduce(operator.xor, (g for i, g in enumerate(_GEN) if top >> i & 1), 0)
    for top in range(32)
)
_CHARSET_VALUE: Final = {c: i for i, c in enumerate(_CHARSET)}
_PRINTABLE: Final = re.compile(r"[\x21-\x7e]*")


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        chk = (chk & 0x1FFFFFF) << 5 ^ v ^ _GEN_BY_TOP[chk >> 25]
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(x) >> 5 for x in hrp] + [0] + [ord(x) & 31 for x in hrp]


def _convertbits(
    data: list[int], frombits: int, tobits: int, *, pad: bool = False
) -> list[int] | None:
    acc = bits = 0
    out: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (tobits - bits)) & maxv)
    elif bits >= frombits or ((acc << (tobits - bits)) & maxv):
        return None
    return out


def decode_segwit(hrp: str, addr: str) -> tuple[int, bytes]:
    """Decode a segwit address to (witness version, program), per BIP-173/BIP-350.

    Raises ``ValueError`` for any checksum, length, case or version violation.
    """
    if addr.lower() != addr and addr.upper() != addr:
        raise ValueError("bech32 address mixes upper and lower case")
    addr = addr.lower()
    pos = addr.rfind("1")
    if pos < 1 or pos + 7 > len(addr) or len(addr) > 90:
        raise ValueError("bech32 address has a bad separator or length")
    if addr[:pos] != hrp:
        raise ValueError(f"bech32 address is not for {hrp!r}")
    if not (_PRINTABLE.fullmatch(addr) and _CHARSET_VALUE.keys() >= set(addr[pos + 1 :])):
        raise ValueError("bech32 address has a character outside the bech32 alphabet")
    data = [_CHARSET_VALUE[c] for c in addr[pos + 1 :]]
    const = _polymod(_hrp_expand(hrp) + data)
    if const not in (_BECH32_CONST, _BECH32M_CONST):
        raise ValueError("bech32 checksum does not match")
    version = data[0]
    program = _convertbits(data[1:-6], 5, 8)
    if program is None or not 2 <= len(program) <= 40:
        raise ValueError("segwit program has an invalid length")
    if version > 16:
        raise ValueError("segwit version is above 16")
    if version == 0 and len(program) not in (20, 32):
        raise ValueError("segwit v0 program must be 20 or 32 bytes")
    # BIP-350: v0 uses bech32, v1+ uses bech32m; the wrong one is invalid.
    if (version == 0) != (const == _BECH32_CONST):
        raise ValueError("segwit address uses the wrong checksum variant for its version")
    return version, bytes(program)


_BASE58: Final = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
# Human-readable parts and base58 version bytes of the other Bitcoin networks, so
# that a testnet address is refused as one rather than as a bad checksum.
_OTHER_NETWORK_HRP: Final = {"tb": "testnet", "bcrt": "regtest"}
_TESTNET_VERSIONS: Final = frozenset({0x6F, 0xC4})


def _bech32_hrp(value: str) -> str | None:
    """The human-readable part if ``value`` has the shape of a bech32 string, else None."""
    if value.lower() != value and value.upper() != value:
        return None
    lower = value.lower()
    pos = lower.rfind("1")
    data = lower[pos + 1 :]
    if pos < 1 or len(data) < 6 or not _CHARSET_VALUE.keys() >= set(data):
        return None
    hrp = lower[:pos]
    return hrp if _PRINTABLE.fullmatch(hrp) else None


def check_bitcoin_address(value: str) -> None:
    """Validate a Bitcoin mainnet address: base58check P2PKH/P2SH or segwit.

    The reason names the form found (bech32 or base58, and the network when it
    is another one) and never quotes the address.
    """
    if value[:3].lower() == "bc1":
        decode_segwit("bc", value)
        return
    try:
        raw = base58.b58decode_check(value)
    except ValueError:
        raw = None
    if raw is not None:
        if len(raw) == 21 and raw[0] in _TESTNET_VERSIONS:
            raise ValueError(
                "not a Bitcoin mainnet address: a testnet base58 address "
                "(version byte must be 0x00 or 0x05)"
            )
        if len(raw) != 21 or raw[0] not in (0x00, 0x05):
            raise ValueError("Bitcoin address is not a mainnet P2PKH or P2SH address")
        return
    hrp = _bech32_hrp(value)
    if hrp is not None:
        network = _OTHER_NETWORK_HRP.get(hrp)
        kind = f": a {network} segwit address" if network else ""
        raise ValueError(f"not a Bitcoin mainnet address{kind} (bech32 prefix must be bc1)")
    if value and set(value) <= _BASE58:
        raise ValueError("Bitcoin base58check checksum does not match")
    raise ValueError(
        "not a Bitcoin address: neither base58check (P2PKH/P2SH) nor bech32 starting with bc1"
    )


_HIGH_NIBBLE: Final = frozenset("89abcdef")


_KECCAK_LOCK: Final = threading.Lock()
_UNSET: Final = object()


def _keccak() -> ModuleType:
    # Imported on first use, not at start: most msmt processes never see an Ethereum
    # address. And with cffi hidden from pycryptodome for that one import, so that it
    # loads its keccak C code through ctypes (its own fallback, as under python -OO):
    # through cffi it first imports pycparser and parses the C declarations, ~65 ms of
    # CPU against ~20 ms, which every node paid at the first address it received
    # (bench/README.md, "receiver.py --quick": 0.2 ms a delivery). The same C code and
    # digests either way; if pycryptodome was loaded already, it stays as it was.
    with _KECCAK_LOCK:
        if "Crypto.Util._raw_api" not in sys.modules:
            saved = sys.modules.get("cffi", _UNSET)
            sys.modules["cffi"] = None  # type: ignore[assignment]  # import cffi: ImportError
            try:
                from Crypto.Hash import keccak  # noqa: PLC0415
            finally:
                if saved is _UNSET:
                    del sys.modules["cffi"]
                else:
                    sys.modules["cffi"] = saved  # type: ignore[assignment]
        from Crypto.Hash import keccak  # noqa: PLC0415
    return keccak


def eip55(address: str) -> str:
    """Return the EIP-55 mixed-case checksum encoding of a ``0x`` address."""
    body = address[2:].lower()
    digest = _keccak().new(digest_bits=256, data=body.encode("ascii")).hexdigest()
    # A letter is upper case where its nibble of the hash is 8 or more; digits
    # have no case, so upper() leaves them as they are.
    return "0x" + "".join(
        c.upper() if h in _HIGH_NIBBLE else c for c, h in zip(body, digest[:40], strict=True)
    )


def check_ethereum_address(value: str) -> None:
    """Validate an Ethereum address; mixed case must be a valid EIP-55 checksum."""
    if not _ETH.fullmatch(value):
        raise ValueError("Ethereum address must be 0x followed by 40 hex digits")
    body = value[2:]
    if body not in (body.lower(), body.upper()) and value != eip55(value):
        raise ValueError("Ethereum address fails its EIP-55 checksum")


def canonical_address(value: str) -> str:
    """One spelling per address: EIP-55 for Ethereum, lower case for bech32, base58 as is.

    Letter case in an Ethereum or bech32 address is only a spelling (the intake's
    ``same_content`` ignores it), while in base58 it is part of the value. Used
    where an address becomes an identifier (STIX wallet ids), so that one
    address is one object however each report spelt it. A string that is
    neither form is returned unchanged.
    """
    if _ETH.fullmatch(value):
        return eip55(value)
    if value[:3].lower() == "bc1" and _bech32_hrp(value) is not None:
        return value.lower()
    return value


def check_address(chain: str, value: str) -> None:
    """Validate ``value`` as an address on ``chain`` ("bitcoin" or "ethereum")."""
    if chain == "bitcoin":
        check_bitcoin_address(value)
    elif chain == "ethereum":
        check_ethereum_address(value)
    else:
        # Reached only when ``chain`` itself failed validation; that error is reported there.
        raise ValueError("no valid chain to check the address against")


def check_tx_hash(chain: str, value: str) -> None:
    """Validate a transaction hash: 64 lower-case hex (Bitcoin) or 0x + 64 (Ethereum)."""
    if chain not in ("bitcoin", "ethereum"):
        raise ValueError("no valid chain to check the hash against")
    pattern = _HEX64 if chain == "bitcoin" else _ETH_TX
    if not pattern.fullmatch(value):
        shape = "64 lower-case hex digits" if chain == "bitcoin" else "0x and 64 lower-case hex"
        raise ValueError(f"{chain} transaction hash must be {shape}")


def encode_segwit(hrp: str, version: int, program: bytes) -> str:
    """Encode a segwit address (bech32 for v0, bech32m for v1+); used by sample feeds."""
    data = [version, *(_convertbits(list(program), 8, 5, pad=True) or [])]
    const = _BECH32_CONST if version == 0 else _BECH32M_CONST
    values = _hrp_expand(hrp) + data
    polymod = _polymod([*values, 0, 0, 0, 0, 0, 0]) ^ const
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[d] for d in data + checksum)
