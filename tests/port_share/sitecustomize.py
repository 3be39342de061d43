"""Loaded by a test's subprocess (``PYTHONPATH``): pick ports from the test worker's share.

The suite's workers each pick ports from their own share of the range
(``tests/conftest.py``, ``broker.natsproc.confine_ports``). A subprocess that
picks ports itself (``msmt demo`` starts a hub and gives every node a metrics
port) would walk the whole range from a random start, and could take a port
another worker had picked but not yet bound. ``node_world.in_port_share``
sets ``PYTHONPATH`` to this folder and ``CONFINE_PORTS`` to ``INDEX/COUNT``.
"""

import os

from broker.natsproc import confine_ports

_index, _, _count = os.environ["CONFINE_PORTS"].partition("/")
confine_ports(int(_index), int(_count))
