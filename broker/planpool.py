"""Planning in a worker process, so the envelope crypto runs on a core of its own.

Planning (policy, one SD-JWT, a JWE per partner) is most of a publishing
node's CPU and holds the GIL; in a thread it competes with the event loop and
the store thread that publish and record the acks. ``PlanPool`` runs
``Planner.plan`` in one spawned worker process instead and returns the same
``OutboxItem``s (pickled; ~6 KB each, cheap beside the crypto).

* **Same inputs.** The worker is built from the parent's already checked
  ``Planner`` (``PlannerSpec``: signing key, the policy's text and digest,
  roster keys, pseudonym keys), not by reading files again, so it cannot plan with anything the
  node did not check at start. A node never reloads these at runtime (a new
  roster, policy or key takes a restart), so the worker never goes stale.
  The secrets travel only over the pipe to our own child process.
* **Started with the node** (``start``), so its imports are not paid by the
  first report; every member's node publishes, so every node needs it.
* **Fails loudly.** A worker that dies (killed, out of memory) breaks the pool:
  every call then raises ``BrokenProcessPool`` and the node's planner task
  fails, which stops the node with that reason (for systemd to restart it);
  a call that takes longer than ``PLAN_TIMEOUT`` raises ``TimeoutError`` the
  same way. Nothing is lost: unplanned reports stay unplanned in the store.
* **Shutdown.** The worker ignores SIGINT and SIGTERM (a service manager sends
  them to the whole group) so it finishes its batch; the node shuts the pool
  down after the planner loop ends. If the node itself is killed, the worker
  notices within ``ORPHAN_CHECK_S`` (its parent process changes) and exits.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from joserfc.jwk import OKPKey

from broker.errors import PolicyError
from broker.policy import load_policy
from broker.publisher import Planner, Signer
from broker.roster import Roster, RosterKey
from broker.store import OutboxItem

PLAN_TIMEOUT: Final = 300.0
"""Seconds one planning batch may take before the node gives up on the worker."""
ORPHAN_CHECK_S: Final = 0.5
"""How often the worker checks that the node that started it is still alive."""

Plans = tuple[dict[str, list[OutboxItem]], dict[str, str]]


@dataclass(frozen=True, slots=True)
class PlannerSpec:
    """Everything a ``Planner`` is made of, in picklable form."""

    member: str
    signing_jwk: dict[str, Any]
    kid: str
    policy_text: str
    policy_digest: str
    roster: tuple[RosterKey, ...]
    pseudonym_keys: dict[str, bytes]

    @classmethod
    def of(cls, planner: Planner, policy_text: str) -> PlannerSpec:
        """The spec of ``planner``, whose policy was loaded from ``policy_text``.

        The clock is not kept: the worker uses the current UTC time, as the node does.
        """
        return cls(
            member=planner.signer.member,
            signing_jwk=dict(planner.signer.key.as_dict(private=True)),
            kid=planner.signer.kid,
            policy_text=policy_text,
            policy_digest=planner.policy.digest,
            roster=tuple(planner.roster),
            pseudonym_keys=dict(planner.pseudonym_keys),
        )

    def build(self) -> Planner:
        """A planner equal to the one this spec was taken from.

        Raises ``PolicyError`` if the text is not the policy the node checked
        (its digest differs), so a worker never plans under another policy.
        """
        policy = load_policy(self.policy_text, member=self.member)
        if policy.digest != self.policy_digest:
            raise PolicyError("the planning worker's policy is not the one the node loaded")
        signer = Signer(self.member, OKPKey.import_key(self.signing_jwk), self.kid)
        return Planner(signer, policy, Roster(self.roster), self.pseudonym_keys)


_planner: Planner | None = None


def _exit_with(parent: int) -> None:
    # The task pipe does not reach end-of-file when the node is killed (the
    # worker holds both of its ends), so watch for the node's death instead.
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(1)


def _start_worker(spec: PlannerSpec, parent: int) -> None:
    global _planner  # noqa: PLW0603 - one planner per worker process, set once
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # ``parent`` comes from the node, not os.getppid() here: a node killed
    # while this worker was still importing has already been replaced as parent.
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="orphan").start()
    _planner = spec.build()


def _ready() -> bool:
    return _planner is not None


def _plan(rows: list[tuple[str, bytes]], limit: int, skip: set[str]) -> Plans:
    if _planner is None:  # the initializer failed, and then no task would run at all
        raise RuntimeError("planning worker was not initialised")
    return _planner.plan(rows, limit, skip)


class PlanPool:
    """``Planner.plan`` in one worker process (started by ``start`` or the first call)."""

    def __init__(self, planner: Planner, policy_text: str) -> None:
        self._spec = PlannerSpec.of(planner, policy_text)
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the node has threads (store, loop), and a forked
            # child could inherit a lock one of them held.
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(self._spec, os.getpid()),
            )
        return self._pool

    async def start(self) -> None:
        """Start the worker and wait until it is ready (its imports take ~0.5 s of CPU).

        Raises ``BrokenProcessPool`` if it cannot start (e.g. its policy check fails).
        """
        future = asyncio.get_running_loop().run_in_executor(self._executor(), _ready)
        await asyncio.wait_for(future, PLAN_TIMEOUT)

    async def plan(self, rows: list[tuple[str, bytes]], limit: int, skip: set[str]) -> Plans:
        """What ``Planner.plan`` returns for these arguments, computed in the worker.

        Raises ``BrokenProcessPool`` if the worker died and ``TimeoutError``
        after ``PLAN_TIMEOUT``; the node treats both as fatal.
        """
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor(), _plan, rows, limit, skip)
        return await asyncio.wait_for(future, PLAN_TIMEOUT)

    def shutdown(self) -> None:
        """Let the worker finish its batch and exit (blocks until it has)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def worker_pids(self) -> list[int]:
        """The worker's process id, if it is running (for tests and benchmarks)."""
        pool = self._pool
        procs = getattr(pool, "_processes", None) or {}
        return [p.pid for p in procs.values() if p.pid is not None]
