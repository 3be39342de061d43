"""The MSMT membership: the 11 ISO 3166-1 alpha-3 trigraphs used in REL TO markings."""

from __future__ import annotations

from typing import Final, Literal, get_args

Member = Literal["JPN", "USA", "KOR", "GBR", "FRA", "AUS", "CAN", "DEU", "ITA", "NLD", "NZL"]
"""A member trigraph; the type pydantic models validate against."""

MEMBERS: Final[tuple[str, ...]] = get_args(Member)
"""All members, in the order the MSMT lists them."""


def is_member(code: str) -> bool:
    """Return whether ``code`` is one of the 11 member trigraphs (exact, upper case)."""
    return code in MEMBERS


def parse_members(text: str) -> tuple[str, ...]:
    """Parse a comma-separated member list such as ``"JPN,USA"``.

    Raises ``ValueError`` naming the first unknown or repeated trigraph; callers
    translate it into their own error type.
    """
    seen: list[str] = []
    for raw in text.split(","):
        code = raw.strip().upper()
        if not is_member(code):
            raise ValueError(f"unknown member {raw.strip()!r} (members: {', '.join(MEMBERS)})")
        if code in seen:
            raise ValueError(f"member {code} listed twice")
        seen.append(code)
    return tuple(seen)
