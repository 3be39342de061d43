"""The fixed STIX objects every export carries: markings, identities and extension definitions.

The TLP 2.0 marking definitions and their extension definition are copied
field for field from oasis-open/cti-stix-common-objects (``objects/
marking-definition/`` and ``objects/extension-definition/``), so that tools
which know the official objects recognise them by id. The three extension
definitions authored by this project are described in docs/STIX.md; their
``schema`` is plain text, which STIX 2.1 section 7.3 allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from broker.stix_objects import (
    EXT_REPORT,
    EXT_TRANSACTION,
    EXT_WALLET,
    FIXED_CREATED,
    MEMBER_NAMES,
    PRODUCER_ID,
    TLP_CREATED,
    TLP_EXTENSION,
    TLP_MARKINGS,
    member_identity_id,
)

_OASIS_TLP_AUTHOR: Final = "identity--b3bca3c2-1f3d-4b54-b44f-dac42c3a8f01"

_REPORT_SCHEMA: Final = (
    "MSMT report property extension, for report SDOs. Properties: report_id (string, UUID), "
    "originator (string, ISO 3166-1 alpha-3 MSMT member), kind (string: vessel, worker or "
    "transfer), tlp (string, TLP 2.0 label), rel_to (list of string, optional: REL TO members "
    "in the order signed), "
    "issued_at (timestamp: the signed iat), received_at (timestamp), fields (list of "
    "{key: string, value: any JSON}: every field the receiving member was given, keyed by "
    "disclosure key 'path' or 'path#transform', value exactly as received: decimals as "
    "strings, pseudonyms as opaque 'hmac-sha256:<key id>:<base64url>' strings)."
)
_WALLET_SCHEMA: Final = (
    "New SCO 'cryptocurrency-wallet': a cryptocurrency address. Properties: value (string, "
    "required, the address in one spelling: Bitcoin base58check as received, bech32 in lower "
    "case, Ethereum in EIP-55 mixed case). Id-contributing property: value. Same type and "
    "property name as OpenCTI's observable."
)
_TRANSACTION_SCHEMA: Final = (
    "New SCO 'cryptocurrency-transaction': a blockchain transaction. Properties: value "
    "(string, required, the transaction hash in the chain's usual hex form). "
    "Id-contributing property: value. Addresses are linked by relationship SROs."
)


# A definition whose meaning changes gets a new version and ``modified``, so that
# a tool holding the earlier one (same id) takes the change: (version, modified).
_FIRST: Final = ("1.0.0", FIXED_CREATED)
_WALLET_VERSION: Final = ("1.1.0", "2026-12-04T00:00:00.000Z")  # value in one spelling
_REPORT_VERSION: Final = ("1.1.0", "2026-12-04T00:00:00.000Z")  # rel_to in the signed order


def _extension(
    ext_id: str,
    name: str,
    description: str,
    schema: str,
    kind: str,
    version: tuple[str, str] = _FIRST,
) -> dict[str, Any]:
    return {
        "type": "extension-definition",
        "spec_version": "2.1",
        "id": ext_id,
        "created_by_ref": PRODUCER_ID,
        "created": FIXED_CREATED,
        "modified": version[1],
        "name": name,
        "description": description,
        "schema": schema,
        "version": version[0],
        "extension_types": [kind],
    }


def tlp_marking(label: str) -> dict[str, Any]:
    """The official OASIS TLP 2.0 marking-definition object for ``label``."""
    return {
        "type": "marking-definition",
        "spec_version": "2.1",
        "id": TLP_MARKINGS[label],
        "created": TLP_CREATED,
        "name": f"TLP:{label}",
        "extensions": {
            TLP_EXTENSION: {"extension_type": "property-extension", "tlp_2_0": label.lower()}
        },
    }


def member_identity(member: str) -> dict[str, Any]:
    """The ``identity`` SDO of an MSMT member, the ``created_by_ref`` of what it reported."""
    ident = member_identity_id(member)
    return {
        "type": "identity",
        "spec_version": "2.1",
        "id": ident,
        "created_by_ref": ident,
        "created": FIXED_CREATED,
        "modified": FIXED_CREATED,
        "name": f"{MEMBER_NAMES[member]} (MSMT member {member})",
        "description": "A member of the Multilateral Sanctions Monitoring Team.",
        "identity_class": "organization",
        "sectors": ["government-national"],
    }


def fixed_objects(members: Sequence[str], tlps: Sequence[str]) -> list[dict[str, Any]]:
    """The producer, extension definitions, TLP markings used, and the members' identities."""
    producer = {
        "type": "identity",
        "spec_version": "2.1",
        "id": PRODUCER_ID,
        "created_by_ref": PRODUCER_ID,
        "created": FIXED_CREATED,
        "modified": FIXED_CREATED,
        "name": "msmt-broker",
        "description": "The MSMT message broker, which exports what a member node received.",
        "identity_class": "system",
    }
    tlp_extension = {
        "type": "extension-definition",
        "spec_version": "2.1",
        "id": TLP_EXTENSION,
        "created_by_ref": _OASIS_TLP_AUTHOR,
        "created": TLP_CREATED,
        "modified": TLP_CREATED,
        "name": "TLP 2.0",
        "description": "This defines TLP 2.0 as a STIX extension",
        "schema": "https://github.com/oasis-open/cti-stix-common-objects/tree/master/"
        "extension-definition-specifications/tlp-2.0",
        "version": "1.0.0",
        "extension_types": ["property-extension"],
    }
    return [
        producer,
        _extension(
            EXT_REPORT,
            "MSMT report",
            "The handling claims and every received field of an MSMT report.",
            _REPORT_SCHEMA,
            "property-extension",
            _REPORT_VERSION,
        ),
        _extension(
            EXT_WALLET,
            "cryptocurrency-wallet",
            "A cryptocurrency address, as an observable.",
            _WALLET_SCHEMA,
            "new-sco",
            _WALLET_VERSION,
        ),
        _extension(
            EXT_TRANSACTION,
            "cryptocurrency-transaction",
            "A blockchain transaction, as an observable.",
            _TRANSACTION_SCHEMA,
            "new-sco",
        ),
        tlp_extension,
        *(tlp_marking(label) for label in tlps),
        *(member_identity(m) for m in members),
    ]
