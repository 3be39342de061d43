"""Identifier checks against the standards' own vectors (BIP-350, EIP-55, IMO)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import base58
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import identifiers

VECTORS = json.loads((Path(__file__).parent / "vectors/bip350/segwit.json").read_text())


def _script(version: int, program: bytes) -> str:
    op = version + 0x50 if version else 0
    return bytes([op, len(program)]).hex() + program.hex()


@pytest.mark.parametrize(("address", "hrp", "script"), VECTORS["valid"])
def test_bip350_valid_segwit_addresses_decode_to_their_script(
    address: str, hrp: str, script: str
) -> None:
    version, program = identifiers.decode_segwit(hrp, address)
    assert _script(version, program) == script
    assert identifiers.encode_segwit(hrp, version, program) == address.lower()


@pytest.mark.parametrize(("address", "why"), VECTORS["invalid"])
def test_bip350_invalid_segwit_addresses_are_refused(address: str, why: str) -> None:
    hrp = "tb" if address.lower().startswith("tb") else "bc"
    with pytest.raises(ValueError, match=r".+"):
        identifiers.decode_segwit(hrp, address)


def test_mainnet_check_refuses_testnet_segwit() -> None:
    with pytest.raises(ValueError, match="Bitcoin"):
        identifiers.check_bitcoin_address(VECTORS["valid"][1][0])


_TESTNET_SEGWIT = "tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        # Each form is named for what it is, not as a failed base58 checksum.
        (
            _TESTNET_SEGWIT,
            "not a Bitcoin mainnet address: a testnet segwit address (bech32 prefix must be bc1)",
        ),
        (
            _TESTNET_SEGWIT.upper(),
            "not a Bitcoin mainnet address: a testnet segwit address (bech32 prefix must be bc1)",
        ),
        (
            "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx",
            "not a Bitcoin mainnet address: a regtest segwit address (bech32 prefix must be bc1)",
        ),
        (
            "ltc1qw508d6qejxtdg4y5r3zarvary0c5xw7kgmn4n9",
            "not a Bitcoin mainnet address (bech32 prefix must be bc1)",
        ),
        (
            base58.b58encode_check(b"\x6f" + bytes(20)).decode(),
            "not a Bitcoin mainnet address: a testnet base58 address "
            "(version byte must be 0x00 or 0x05)",
        ),
        (
            base58.b58encode_check(b"\xc4" + bytes(20)).decode(),
            "not a Bitcoin mainnet address: a testnet base58 address "
            "(version byte must be 0x00 or 0x05)",
        ),
        (
            base58.b58encode_check(b"\x30" + bytes(20)).decode(),
            "Bitcoin address is not a mainnet P2PKH or P2SH address",
        ),
        ("1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN3", "Bitcoin base58check checksum does not match"),
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5", "bech32 checksum does not match"),
        (
            "0x52908400098527886E0F7030069857D2E4169EE7",
            "not a Bitcoin address: neither base58check (P2PKH/P2SH) nor bech32 starting with bc1",
        ),
        (
            "",
            "not a Bitcoin address: neither base58check (P2PKH/P2SH) nor bech32 starting with bc1",
        ),
    ],
)
def test_bitcoin_reason_names_the_form_and_network(address: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the whole reason is compared below
        identifiers.check_bitcoin_address(address)
    assert str(info.value) == reason
    if address:
        assert address.lower() not in str(info.value).lower()


# EIP-55's own examples (all-caps, all-lower and normal forms).
EIP55 = [
    "0x52908400098527886E0F7030069857D2E4169EE7",
    "0x8617E340B3D01FA5F11F306F4090FD50E238070D",
    "0xde709f2102306220921060314715629080e2fb77",
    "0x27b1fdb04752bbc536007a920d24acb045561c26",
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
    "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
]


@pytest.mark.parametrize("address", EIP55)
def test_eip55_vectors_validate(address: str) -> None:
    identifiers.check_ethereum_address(address)


@pytest.mark.parametrize("address", EIP55[4:])
def test_eip55_mixed_case_vectors_round_trip(address: str) -> None:
    assert identifiers.eip55(address.lower()) == address


@pytest.mark.parametrize("cffi_first", [False, True])
def test_eip55_first_use_loads_keccak_without_cffi_and_leaves_cffi_as_it_was(
    cffi_first: bool,
) -> None:
    # A fresh interpreter: the first eip55 imports pycryptodome's keccak with cffi
    # hidden (ctypes: ~20 ms of CPU, not ~65); afterwards cffi is what it was before,
    # imported or importable, and the digests are EIP-55's own.
    code = "\n".join(
        [
            "import sys",
            "import cffi" if cffi_first else "",
            "before = sys.modules.get('cffi')",
            "from broker import identifiers",
            f"for a in {EIP55[4:]!r}:",
            "    assert identifiers.eip55(a.lower()) == a, a",
            "from Crypto.Util import _raw_api",
            "assert not hasattr(_raw_api, 'ffi'), 'pycryptodome loaded through cffi'",
            "assert sys.modules.get('cffi') is before",
            "import cffi",
            "print('ok')",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("address", EIP55[4:])
def test_eip55_one_flipped_letter_is_refused(address: str) -> None:
    i = next(i for i, c in enumerate(address[2:], start=2) if c.isalpha())
    flipped = address[:i] + address[i].swapcase() + address[i + 1 :]
    with pytest.raises(ValueError, match="EIP-55"):
        identifiers.check_ethereum_address(flipped)


@pytest.mark.parametrize("address", EIP55)
def test_canonical_ethereum_address_is_eip55_in_any_spelling(address: str) -> None:
    expected = identifiers.eip55(address)
    body = address[2:]
    for spelling in (address, "0x" + body.lower(), "0x" + body.upper()):
        assert identifiers.canonical_address(spelling) == expected
    identifiers.check_ethereum_address(expected)


@pytest.mark.parametrize(
    "address", [a for a, hrp, _ in VECTORS["valid"] if hrp == "bc"], ids=lambda a: a[:12]
)
def test_canonical_bech32_address_is_lower_case(address: str) -> None:
    # BIP-173: either case is the same address; lower case is the one it recommends.
    assert identifiers.canonical_address(address.upper()) == address.lower()
    assert identifiers.canonical_address(address.lower()) == address.lower()


def test_canonical_base58_address_keeps_its_case() -> None:
    # In base58 the case is part of the value: changing it is another (invalid) address.
    for address in ("1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2", "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy"):
        assert identifiers.canonical_address(address) == address


def test_imo_check_digit_worked_example() -> None:
    # The example the IMO scheme is usually explained with: 9074729.
    identifiers.check_imo("9074729")
    assert identifiers.imo_check_digit("907472") == 9
    # The reason quotes no digit: a receiver's audit entry carries it.
    with pytest.raises(ValueError, match=r"^IMO check digit does not match the first six digits$"):
        identifiers.check_imo("9074721")


@given(st.integers(min_value=100_000, max_value=999_999), st.integers(0, 9))
def test_imo_exactly_one_check_digit_is_valid(six: int, digit: int) -> None:
    number = f"{six}{digit}"
    valid = digit == identifiers.imo_check_digit(str(six))
    if valid:
        identifiers.check_imo(number)
    else:
        with pytest.raises(ValueError, match="check digit"):
            identifiers.check_imo(number)


def test_bitcoin_base58check() -> None:
    identifiers.check_bitcoin_address("1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2")
    identifiers.check_bitcoin_address("3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy")
    with pytest.raises(ValueError, match="checksum"):
        identifiers.check_bitcoin_address("1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN3")
    testnet = base58.b58encode_check(b"\x6f" + bytes(20)).decode()
    with pytest.raises(ValueError, match="mainnet"):
        identifiers.check_bitcoin_address(testnet)


def test_mmsi() -> None:
    identifiers.check_mmsi("445123000")
    for bad in ("44512300", "4451230001", "44512300a"):
        with pytest.raises(ValueError, match="9 digits"):
            identifiers.check_mmsi(bad)


# Python's ``$`` also matches before a final newline; ``"9074729\n"`` must not
# pass as a second spelling of IMO 9074729 (matching, dedup and STIX key on it).
@pytest.mark.parametrize(
    ("check", "valid"),
    [
        (identifiers.check_imo, "9074729"),
        (identifiers.check_mmsi, "123456789"),
        (identifiers.check_ethereum_address, "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"),
        (lambda v: identifiers.check_tx_hash("bitcoin", v), "a" * 64),
        (lambda v: identifiers.check_tx_hash("ethereum", v), "0x" + "b" * 64),
    ],
)
@pytest.mark.parametrize("suffix", ["\n", "\r\n", " "])
def test_identifier_with_trailing_newline_or_space_is_refused(
    check: Callable[[str], None], valid: str, suffix: str
) -> None:
    check(valid)
    with pytest.raises(ValueError, match=r"must|not"):
        check(valid + suffix)
