"""Planning in a worker process, so the envelope crypto runs on a core of its own.

Planning (policy, one SD-JWT, a JWE per partner) is most of a publishing
node's CPU and holds the GIL; in a thread it competes with the event loop and
the store thread that publish and record the acks. ``PlanPool`` runs
``Planner.plan`` in one child process (``python -m broker.planpool``) instead
and returns the same ``OutboxItem``s (pickled over its stdin/stdout pipes;
~6 KB each, cheap beside the crypto: ~0.1 ms per report of the node's CPU).

* **Same inputs.** The worker is built from the parent's already checked
  ``Planner`` (``PlannerSpec``: signing key, the policy's text and digest,
  roster keys, pseudonym keys), not by reading files again, so it cannot plan
  with anything the node did not check at start. A node never reloads these at
  runtime (a new roster, policy or key takes a restart), so the worker never
  goes stale. The secrets travel only over the pipe to our own child process.
* **Started with the node** (``start``), so its imports are not paid by the
  first report; every member's node publishes, so every node needs it.
* **Fails loudly.** A worker that exits, fails or does not answer within
  ``PLAN_TIMEOUT`` raises ``PlanWorkerError``; the node's planner lets it
  through, which stops the node with that reason (for systemd to restart it).
  Nothing is lost: unplanned reports stay unplanned in the store. A failure
  inside the worker is reported by exception type only, never its message
  (which could quote a report).
* **Shutdown.** The worker ignores the node's stop signals (SIGINT, SIGTERM, SIGHUP,
  SIGQUIT, SIGUSR1, SIGUSR2: a service manager or a closed terminal sends them to the
  whole group) so it finishes its batch;
  the node closes its stdin after the planner loop ends and it exits. If the
  node is killed, the kernel kills the worker with it (Linux
  ``PR_SET_PDEATHSIG``); elsewhere it exits at end-of-file on its stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import pickle
import signal
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

from joserfc.jwk import OKPKey

from broker.errors import MsmtError, PolicyError
from broker.planner import Planner, Plans, Signer
from broker.policy import load_policy
from broker.private_memory import keep_memory_private
from broker.roster import Roster, RosterKey
from broker.stopsignals import SIGNALS

PLAN_TIMEOUT: Final = 300.0
"""Seconds the worker may take to start or to plan one batch before the node gives up."""
STOP_TIMEOUT: Final = 10.0
"""Seconds a stopping worker may take to finish (its batch, or exiting) before it is given up."""
PIPE_BUFFER: Final = 8 * 2**20
"""Bytes of a worker's answer buffered before reading pauses."""
_PR_SET_PDEATHSIG: Final = 1


class PlanWorkerError(MsmtError):
    """The planning worker exited, failed or stopped answering; the node must stop."""


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


class PlanPool:
    """``Planner.plan`` in one worker process, started by ``start`` (or the first call)."""

    def __init__(self, planner: Planner, policy_text: str) -> None:
        self._spec = PlannerSpec.of(planner, policy_text)
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._broken: str | None = None
        self._stopping = asyncio.Event()
        self._given_up = False  # a call was abandoned: the worker is killed, not waited for

    async def start(self) -> None:
        """Start the worker and wait until it is ready (its imports take ~0.5 s of CPU).

        Raises ``PlanWorkerError`` if it cannot start (e.g. its policy check fails).
        """
        async with self._lock:
            if self._proc is None:
                self._proc = await self._spawn()
                await self._call((self._spec, os.getpid()))

    async def _spawn(self) -> asyncio.subprocess.Process:
        """The worker process; ``PlanWorkerError`` if it cannot be started (no descriptors left)."""
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                # -P: the node's working directory is not on the import path, so
                # a file there cannot stand in for a module in the process that
                # holds the signing and pseudonym keys.
                "-P",
                "-m",
                "broker.planpool",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                # A batch's answer is ~3 MB: read it without pausing every 128 KiB.
                limit=PIPE_BUFFER,
                # Out of the terminal's process group: a Ctrl-C while the worker is
                # still importing would kill it with a traceback before it can
                # ignore SIGINT. The node stops it; PR_SET_PDEATHSIG ends it if not.
                start_new_session=True,
            )
        except OSError as exc:
            # Its pipes need descriptors, its fork memory: each was a traceback.
            low = (
                " (is the descriptor limit, ulimit -n, too low?)"
                if exc.errno == errno.EMFILE
                else ""
            )
            raise PlanWorkerError(
                f"cannot start the planning worker: {exc.strerror or exc}{low}"
            ) from None

    async def plan(self, rows: list[tuple[str, bytes]], limit: int) -> Plans:
        """What ``Planner.plan`` returns for these arguments, computed in the worker.

        Raises ``PlanWorkerError`` if the worker died, failed or took longer
        than ``PLAN_TIMEOUT``; the node treats that as fatal.
        """
        await self.start()
        async with self._lock:
            plans: Plans = await self._call((rows, limit))
            return plans

    def stopping(self) -> None:
        """The node is stopping: a call that waits ``STOP_TIMEOUT`` longer is given up.

        Nothing is lost by it: what the worker was planning stays unplanned in the
        store, and is planned at the next start. Without it, a hung worker held
        each stop for ``PLAN_TIMEOUT``, past any service manager's patience.
        """
        self._stopping.set()

    async def _call(self, request: object) -> Any:
        if self._broken is not None:
            raise PlanWorkerError(self._broken)
        exchange = asyncio.ensure_future(self._exchange(request))
        stop = asyncio.ensure_future(self._stop_waited())
        try:
            done, _ = await asyncio.wait(
                {exchange, stop}, timeout=PLAN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
            exchange.cancel()  # only if still waiting
        if exchange in done:
            return exchange.result()
        # A half-read answer leaves the pipe out of step: never use it again.
        self._given_up = True
        self._broken = (
            f"the planning worker did not answer within {STOP_TIMEOUT:g} s of the stop"
            if stop in done
            else f"the planning worker did not answer within {PLAN_TIMEOUT:g} s"
        )
        raise PlanWorkerError(self._broken)

    async def _stop_waited(self) -> None:
        await self._stopping.wait()
        await asyncio.sleep(STOP_TIMEOUT)

    async def _exchange(self, request: object) -> Any:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise PlanWorkerError("the planning worker is not running")
        data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            proc.stdin.write(len(data).to_bytes(8, "big"))
            proc.stdin.write(data)
            await proc.stdin.drain()
            size = int.from_bytes(await proc.stdout.readexactly(8), "big")
            # From our own child over its private pipe, which only we can write.
            status, value = pickle.loads(await proc.stdout.readexactly(size))  # noqa: S301
        except (ConnectionError, asyncio.IncompleteReadError):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 1.0)
            self._broken = f"the planning worker exited (status {proc.returncode})"
            raise PlanWorkerError(self._broken) from None
        if status != "ok":
            self._broken = f"the planning worker failed: {value}"
            raise PlanWorkerError(self._broken)
        return value

    async def shutdown(self) -> None:
        """Let the worker finish its batch and exit (killed after ``STOP_TIMEOUT``)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._broken = "the planning worker was shut down"
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            # One that did not answer is not waited for again (it may be stopped).
            await asyncio.wait_for(proc.wait(), 0 if self._given_up else STOP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def worker_pids(self) -> list[int]:
        """The worker's process id, if it was started (for tests and benchmarks)."""
        return [] if self._proc is None else [self._proc.pid]


# --- the worker process ----------------------------------------------------------


def _read(inp: BinaryIO) -> Any:
    head = inp.read(8)
    if len(head) < 8:
        return None  # end of file: the node closed our stdin or died
    size = int.from_bytes(head, "big")
    data = inp.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)  # noqa: S301 - from the node that started us, over our own pipe


class _Chunks(list[bytes]):
    """A file for ``pickle.Pickler`` that keeps the pieces it is given, uncopied."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Keep ``data`` (a copy only if it is not ``bytes``, which cannot change)."""
        self.append(data if type(data) is bytes else bytes(data))
        return len(data)


def _pickled(value: object) -> list[bytes]:
    """``pickle.dumps(value, HIGHEST_PROTOCOL)``'s bytes, in pieces.

    ``dumps`` grows one buffer for a batch's ~3 MB answer, copying it as it
    grows (~70 us per report of the worker's CPU); a ``Pickler`` writing to a
    file hands over its frames and each envelope's bytes as they are (~13 us).
    """
    chunks = _Chunks()
    pickle.Pickler(chunks, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return chunks


def _write(out: BinaryIO, value: object) -> None:
    chunks = _pickled(value)
    out.write(sum(map(len, chunks)).to_bytes(8, "big"))
    out.writelines(chunks)
    out.flush()


def _die_with_parent() -> None:
    # Linux: the kernel kills us when the node exits, even mid-batch.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def serve(inp: BinaryIO, out: BinaryIO) -> int:
    """The worker's loop: a spec, then planning requests until end of file; returns an exit code."""
    for sig in SIGNALS:  # the node's stop signals: a group's signal is the node's to take
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()
    keep_memory_private()  # it holds the signing and pseudonym keys too
    first = _read(inp)
    if first is None:
        return 1
    spec, parent = first
    if os.getppid() != parent:
        return 1  # the node died before the death signal was armed
    try:
        planner = spec.build()
    except MsmtError as exc:
        _write(out, ("error", str(exc)))
        return 1
    _write(out, ("ok", None))
    while (request := _read(inp)) is not None:
        rows, limit = request
        try:
            reply: tuple[str, object] = ("ok", planner.plan(rows, limit))
        except Exception as exc:  # noqa: BLE001 - reported by type: a message could quote a report
            reply = ("error", f"{type(exc).__name__} while planning")
        _write(out, reply)
    return 0


def main() -> None:
    """Entry point of ``python -m broker.planpool`` (started by ``PlanPool`` only)."""
    # The replies get a private copy of stdout; fd 1 then points at stderr, so
    # nothing a library prints can corrupt them.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        code = serve(sys.stdin.buffer, out)
    except BrokenPipeError:
        # The node is gone (killed: the death signal may not have reached us yet)
        # and its answer with it. Exit at once: a traceback, or the flush of what
        # is left, would only put noise in the node's log.
        os._exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
