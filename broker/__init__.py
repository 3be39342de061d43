"""msmt-broker: policy-controlled sharing of sanctions-monitoring sightings among MSMT members."""

from __future__ import annotations

NO_VERSION = "0.0"
"""The version of a build that cannot say which it is: built without git history (a
source archive), or never installed."""

_VERSION: list[str] = []


def version() -> str:
    """The version of this build (PEP 440), as installed.

    The build takes it from git (hatch-vcs): ``0.1.devN+gHASH`` between releases,
    where N counts commits, so a later build has a larger N, and HASH names the
    commit (``.dDATE`` after it: built from a tree with uncommitted changes). An
    editable install keeps the version it was installed at, and code imported from
    another tree (``PYTHONPATH``) still reports the installed package's. Read when
    first asked, not at import: every process imports this package, and ``msmt``
    checks its code (``broker.code_check``) before it imports anything else.
    """
    if not _VERSION:
        import importlib.metadata  # noqa: PLC0415 - see above

        try:
            _VERSION.append(importlib.metadata.version("msmt-broker"))
        except importlib.metadata.PackageNotFoundError:
            _VERSION.append(NO_VERSION)
    return _VERSION[0]
