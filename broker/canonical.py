r"""RFC 8785 (JCS) canonical JSON, fast for the values the node writes most: audit entries.

``dumps`` gives exactly ``rfc8785.dumps``'s bytes. Values made only of ``str``,
``int`` (within the I-JSON range +-(2**53 - 1)), ``bool``, ``None``, lists,
tuples and dicts whose keys hold no character above U+FFFF go through the
standard library's C JSON encoder; anything else (floats, non-BMP keys,
subclasses such as enums) goes to ``rfc8785`` itself rather than being guessed.

Why the C encoder is RFC 8785 on that domain:

* strings (RFC 8785 3.2.2.2): ``ensure_ascii=False`` writes every character as
  UTF-8 except ``"``, ``\`` and U+0000-U+001F, which it escapes as ``\"``,
  ``\\``, ``\b \t \n \f \r`` or ``\u00xx`` with lowercase hex: exactly
  the RFC's rule. A lone surrogate fails the UTF-8 encoding; then ``rfc8785``
  raises its own error, as it would have anyway.
* integers (3.2.2.3): within +-(2**53 - 1) an integer-valued double prints as
  its decimal digits, which is what ``int.__repr__`` gives.
* literals: ``true``, ``false``, ``null``; no whitespace (``separators``).
* key order (3.2.3): ``sort_keys`` orders by code point; that equals the
  RFC's UTF-16 code-unit order whenever no key holds a character above U+FFFF
  (only those become surrogate pairs, which sort below U+E000-U+FFFF).

The Hypothesis tests in ``tests/test_canonical.py`` hold this to
``rfc8785.dumps`` and to the RFC's published examples.
"""

from __future__ import annotations

import json
from typing import Any, Final

import rfc8785

_INT_MAX: Final = 2**53 - 1
_encode: Final = json.JSONEncoder(
    ensure_ascii=False,
    check_circular=False,
    allow_nan=False,
    sort_keys=True,
    separators=(",", ":"),
).encode


def _bmp_key(key: object) -> bool:
    return type(key) is str and (key.isascii() or max(key, default="") <= "\uffff")


def _in_domain(value: Any) -> bool:
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return True
    if kind is int:
        return bool(-_INT_MAX <= value <= _INT_MAX)
    # Strings inline: audit entries are mostly strings, and a call per item
    # cost as much as the encoding itself.
    if kind is list or kind is tuple:
        return all(type(v) is str or _in_domain(v) for v in value)
    if kind is dict:
        return all(_bmp_key(k) and (type(v) is str or _in_domain(v)) for k, v in value.items())
    return False


def encode_in_domain(value: Any) -> bytes:
    """The C encoder's bytes for a value the caller knows is in the domain above.

    Only for values built from ASCII keys, strings, ``None``, lists and integers
    within I-JSON (such as rebuilt audit entries), where they are RFC 8785; for
    anything else use ``dumps``.
    """
    return _encode(value).encode("utf-8")


def dumps(value: Any) -> bytes:
    """The RFC 8785 canonical bytes of ``value``, identical to ``rfc8785.dumps(value)``.

    Raises ``rfc8785.CanonicalizationError`` (a ``ValueError``) exactly when
    ``rfc8785.dumps`` does, because every such value is handed to it.
    """
    if _in_domain(value):
        try:
            return _encode(value).encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: rfc8785 raises its own error for it below
    return rfc8785.dumps(value)
