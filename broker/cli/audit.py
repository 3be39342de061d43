"""Commands for the audit family: ``msmt audit verify``, ``prove`` and ``replay``.

All read a node's data directory directly (``DIR/audit.sqlite``, opened
read-only). Trust never comes from the directory being audited: the log's
public key comes from a signed roster (``--keys``), a JWK Set the auditor
trusts (``--roster``), or note verifier keys (``--log-key``).

The commands are written in parts, each apart so that it stays one sitting's read:
``broker.cli.audit_base`` (the group, and the keys and logs every command trusts),
``broker.cli.audit_tree`` (``verify``, ``prove``), ``broker.cli.audit_logs``
(``entries``, ``replay``) and ``broker.cli.audit_envelope`` (``evidence``). Importing
a part adds its commands to the group; this module, the family click loads, imports
them all.
"""

from __future__ import annotations

import click

from broker.cli import audit_envelope, audit_logs, audit_tree  # noqa: F401 - their commands join the group
from broker.cli.audit_base import audit_group

COMMANDS: tuple[click.Command, ...] = (audit_group,)
