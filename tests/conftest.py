"""Shared fixtures: real nats-server processes on free loopback ports, and the node tests' world."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The shared test worlds hold asserts of their own; rewritten, a failing one shows
# its values as a test's would. This must run before they are first imported.
pytest.register_assert_rewrite("node_world", "reliability_world")

from hypothesis import HealthCheck, settings  # noqa: E402
from node_world import World, setup_accounts, start_hub  # noqa: E402
from xdist.scheduler import LoadScopeScheduling  # noqa: E402

from broker import keys  # noqa: E402
from broker.members import MEMBERS  # noqa: E402
from broker.natsproc import (  # noqa: E402
    NatsServer,
    confine_ports,
    make_cluster,
    start_cluster,
)

# `make test` runs workers side by side, each picking ports in turn from a random
# start: once their walks met, and one node's metrics port was taken by the other
# worker between its pick and its bind. Each worker picks from its own share.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw"):
    confine_ports(int(_WORKER[2:]), int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))

# Timings are for benchmarks, never tests: on a shared 2-core machine a stalled
# draw (a strategy's first regex compile, another job's burst) tripped
# Hypothesis's too_slow health check and per-example deadline although every
# property held. Tests opt in to other suppressions themselves.
settings.register_profile("msmt", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("msmt")

# `make test` runs three workers (pytest -n 3) on two cores, because the integration
# tests wait more than they compute: two workers kept 1.2 of the 2 cores busy
# (session 24), three 1.6. The five-minute soak, light steady load, takes one
# worker. The suite's integration tests take another, one at a time in a plain
# run's order. The LIGHT modules take the third, one at a time: the shorter
# integration modules, each test with one hub at most and a few nodes. Each PURE
# module (no hub, no node process: CPU only) is a unit of its own, taken by
# whichever worker is free first, after the soak or the light modules. Moving a
# module between the suite and LIGHT balances the two: on a slow machine (session
# 25) the suite took 644 s, LIGHT 652 s, the soak 310 s and PURE 279 s in all.
PURE = frozenset(
    f"tests/{name}.py::"
    for name in (
        "test_auditlog",
        "test_canonical",
        "test_checkpoint",
        "test_config",
        "test_docs",
        "test_envelope",
        "test_envelope_interop",
        "test_feeds",
        "test_field_check",
        "test_identifiers",
        "test_jose",
        "test_keys",
        "test_keys_custody",
        "test_keys_request",
        "test_merkle",
        "test_metrics",
        "test_policy",
        "test_policy_cli",
        "test_pseudonym_keys",
        "test_receiver_linger",
        "test_reliability_fuzz",
        "test_sdjwt",
        "test_sightings",
        "test_stix",
        "test_tcpproxy",
        "test_transforms",
        "test_witness",
    )
)
SOAK = "tests/test_reliability_resources.py::"
LIGHT = frozenset(
    f"tests/{name}.py::"
    for name in (
        "test_audit_cli",
        "test_audit_replay",
        "test_auditlog_open",
        "test_auditnet",
        "test_cli",
        "test_deploy",
        "test_evidence",
        "test_intake",
        "test_intake_conflict_node",
        "test_intake_feeds",
        "test_intake_to_receiver",
        "test_keys_hub",
        "test_keys_request_node",
        "test_nats_isolation",
        "test_nats_quota",
        "test_nats_refused",
        "test_natsconfig",
        "test_node_clock",
        "test_node_operator",
        "test_node_start_files",
        "test_node_twin",
        "test_plan_commit",
        "test_plan_loop",
        "test_plan_retry",
        "test_planpool",
        "test_publish_refused",
        "test_publisher_wake",
        "test_reliability_hostile",
        "test_resend",
        "test_store",
        "test_tls",
    )
)


# _split_scope is xdist's own (private) hook for naming a test's unit of work.
# Were a new xdist to drop or rename it, this class would silently fall back to
# one unit per module, and integration tests would run two at a time: refuse
# to start instead.
# _assign_work_unit and workqueue (an OrderedDict of units, taken from the front)
# are private too.
for _hook in ("_split_scope", "_assign_work_unit"):
    if not callable(getattr(LoadScopeScheduling, _hook, None)):
        raise pytest.UsageError(
            f"this pytest-xdist has no LoadScopeScheduling.{_hook}: "
            "update SoakBesideSuite in tests/conftest.py"
        )


class SoakBesideSuite(LoadScopeScheduling):  # type: ignore[misc]  # xdist has no type hints
    """Units of work: the soak, the suite, the light modules, and each pure module.

    The suite's tests start and kill nats-servers and nodes and several wait on
    timers, so one worker takes them all, one at a time, in the order a plain
    ``pytest`` run would. The light modules are one unit too, so never two of them
    run at a time. (``--dist loadgroup`` would say this with marks, but it stopped
    grouping with pytest 9.2: pytest-xdist issue #1386.)
    """

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.partition("::")[0] + "::"
        if module in PURE:
            return module
        if module == SOAK:
            return "soak"
        return "light" if module in LIGHT else "suite"

    def _assign_work_unit(self, node: object) -> None:
        # xdist hands out the unit with the most tests first. The three long units
        # go first instead, one to each worker, and the pure modules fill in after.
        for scope in ("light", "soak", "suite"):
            if scope in self.workqueue:
                self.workqueue.move_to_end(scope, last=False)
        super()._assign_work_unit(node)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: `pytest -p no:xdist` still runs
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> SoakBesideSuite:
    """Schedule ``pytest -n`` runs as :class:`SoakBesideSuite`."""
    return SoakBesideSuite(config, log)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A single real nats-server with JetStream, stopped at the end of the test."""
    server = NatsServer(workdir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """A real 3-server JetStream cluster on loopback."""
    servers = make_cluster(tmp_path / "cluster", 3)
    try:
        # Inside the try: a server that fails to start must not leave the others running.
        start_cluster(servers)
        yield servers
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """All 11 members' keys, a real hub with their accounts and inboxes set up, and no node yet.

    Every node the test started as a subprocess is killed at the end, then the hub.
    """
    keydir, server = start_hub(tmp_path, MEMBERS)
    setup_accounts(server.url, keydir, (*MEMBERS, keys.AUDIT_ACCOUNT))
    w = World(tmp_path, keydir, server)
    try:
        yield w
    finally:
        for member in list(w.procs):
            w.kill(member)
        server.kill()
