"""The benchmarks stop what they started when SIGTERM stops them, as Ctrl-C does."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest
from node_world import in_port_share, wait_for

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_a_benchmark_stopped_with_sigterm_stops_its_hub_and_removes_its_files(
    tmp_path: Path,
) -> None:
    # SIGTERM's default action ended the driver at once: its nats-server ran on
    # (and the eleven nodes of e2e.py), holding ports the next run needed. Stopped
    # while the hub starts (NatsServer.start waits for it). A stop once its nats-py
    # client runs is the next test's: timing it to land inside a fetch is not in a
    # test's hands.
    env = in_port_share({**os.environ, "TMPDIR": str(tmp_path)})
    argv = [sys.executable, str(BENCH / "hub_ack.py"), "--messages", "5000", "--rounds", "4"]
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    hubs: list[psutil.Process] = []
    try:
        parent = psutil.Process(driver.pid)

        def hub_started() -> bool:
            hubs[:] = [c for c in parent.children() if c.name() == "nats-server"]
            return bool(hubs) and any(tmp_path.iterdir())

        wait_for(hub_started, 60, "the benchmark's nats-server")
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=60)
        assert driver.returncode == 128 + signal.SIGTERM
        assert err.endswith(b"hub_ack.py: stopped by SIGTERM\n")
        assert [h.pid for h in hubs if h.is_running() and h.status() != "zombie"] == []
        assert list(tmp_path.iterdir()) == []
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.communicate()  # reaped, its pipes closed: not a warning in a later test
        for hub in hubs:
            if hub.is_running():
                hub.kill()


DRIVER = """
import asyncio, signal, sys
sys.path.insert(0, sys.argv[1])
from sigterm import run_stoppable
if sys.argv[2] == "SIGINT":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # started as a background job is
async def main():
    try:
        print("waiting", flush=True)
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        print("swallowed", flush=True)  # as Python 3.11's wait_for may, in nats-py
    try:
        await asyncio.sleep(60)
    finally:
        print("cleaned up", flush=True)
run_stoppable(main())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_whose_cancellation_is_swallowed_is_repeated(
    tmp_path: Path, signum: signal.Signals
) -> None:
    # Python 3.11's asyncio.wait_for, inside nats-py's fetch and requests, swallows
    # a cancellation that lands as its answer arrives: 3 of 10 stops of hub_ack.py
    # mid-round lost their first one, and a single cancellation let the driver run
    # its rounds to the end. A driver started with SIGINT ignored (a background
    # job) still stops on it.
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    argv = [sys.executable, str(script), str(BENCH), signum.name]
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert driver.stdout is not None
        assert driver.stdout.readline() == b"waiting\n"
        driver.send_signal(signum)
        out, err = driver.communicate(timeout=30)
        assert (out, err) == (
            b"swallowed\ncleaned up\n",
            f"driver.py: stopped by {signum.name}\n".encode(),
        )
        assert driver.returncode == 128 + signum
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.communicate()


def _bench_replay() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_replay", BENCH / "replay.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_replay_benchmark_times_the_timeline_wherever_the_cli_defines_it(
    tmp_path: Path,
) -> None:
    # The option moved from broker/cli/audit.py to audit_logs.py, and the benchmark,
    # looking in audit.py alone, skipped its --timeline run without a word.
    bench = _bench_replay()
    assert bench._has_timeline(str(BENCH.parent))
    for name, text in (("audit.py", 'option("--timeline")'), ("audit.py", "no such option")):
        checkout = tmp_path / name / text.replace(" ", "_")
        (checkout / "broker" / "cli").mkdir(parents=True)
        (checkout / "broker" / "cli" / name).write_text(text.replace("--timeline", '"--timeline"'))
        assert bench._has_timeline(str(checkout)) == ("--timeline" in text)


def test_the_replay_benchmark_takes_a_member_added_to_each_exchange_as_no_difference(
    tmp_path: Path,
) -> None:
    # Format 3 added receipt_kid to every exchange of --json: against any earlier
    # baseline the check said "DIFFER in exchanges" though nothing the baseline said
    # had changed.
    bench = _bench_replay()
    base = {"findings": [], "exchanges": [{"seq": 1, "recipient_kid": None}], "n": 1}

    def verdict(ours: dict[str, Any]) -> str:
        (tmp_path / "a.json").write_text(json.dumps(ours))
        (tmp_path / "b.json").write_text(json.dumps(base))
        return str(bench.same_json(tmp_path / "a.json", tmp_path / "b.json"))

    exchange = {"seq": 1, "recipient_kid": None, "receipt_kid": "usa-enc-1"}
    assert verdict(base | {"exchanges": [exchange], "more": 2}) == "identical members"
    changes: list[dict[str, Any]] = [
        {"exchanges": [{"seq": 2, "recipient_kid": None}]},
        {"exchanges": [{"seq": 1}]},
        {"exchanges": []},
        {"n": True},
        {"findings": [{"kind": "undelivered"}]},
    ]
    for changed in changes:
        assert verdict(base | changed).startswith("DIFFER in ")
