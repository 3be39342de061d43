"""``msmt demo`` end to end, and its HTML report in a real headless Chromium.

The demo runs once per module as the real CLI (``msmt demo --keep DIR``), so
its stores and logs can be checked independently of what it printed. The page
is opened through the DevTools protocol (a small websocket client on aiohttp):
unlike scraping ``--enable-logging`` output, that reports every uncaught
exception, every ``console.error`` and every console message the browser
itself logs (a Content-Security-Policy refusal, a failed load), and it sees
every network request the page makes, so "self-contained" is checked, not
assumed. A control page with a deliberate error proves the capture works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from node_world import MSMT, in_port_share

from broker import keys, keys_users
from broker.demo import scratch
from broker.demo_report import render
from broker.demo_view import Cell, Outcome, Point, SideBySide, first_failure, summary_line
from broker.demo_watch import wait_ready
from broker.demo_world import World
from broker.members import MEMBERS
from broker.natsproc import port_share, share_ports
from broker.store import Store

pytestmark = pytest.mark.integration

REPO = Path(__file__).parent.parent
CHROMIUM = "/usr/bin/chromium"
SIGHTINGS = 120


@dataclass
class DemoRun:
    """One finished ``msmt demo --keep`` run: its directory, exit code and output."""

    root: Path
    code: int
    out: str
    err: str

    def store_counts(self) -> dict[tuple[str, str], int]:
        """(sender, recipient) -> reports stored, read from the kept node stores."""
        counts: dict[tuple[str, str], int] = {}
        for member in MEMBERS:
            store = Store(self.root / "data" / member / "node.sqlite3", readonly=True)
            try:
                for sender in MEMBERS:
                    if sender != member:
                        counts[(sender, member)] = store.inbox_count(sender)
            finally:
                store.close()
        return counts


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    root = tmp_path_factory.mktemp("demo") / "kept"
    env = in_port_share({k: v for k, v in os.environ.items() if not k.startswith("MSMT_")})
    # Under umask 000 a Python writing bytecode makes the cache folders it adds 0777, in
    # the suite's shared cache prefix, and every msmt after refuses code others may
    # change (broker.code_check): a clean-clone run did. This run writes none.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    done = subprocess.run(
        [MSMT, "demo", "--keep", str(root), "--sightings", str(SIGHTINGS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
        # As a careless shell leaves it: what is kept must be private all the same.
        umask=0,
    )
    return DemoRun(root, done.returncode, done.stdout, done.stderr)


def test_demo_exits_zero_and_prints_matrix_views_and_audit(demo_run: DemoRun) -> None:
    assert demo_run.code == 0, demo_run.out[-3000:] + demo_run.err[-3000:]
    out = demo_run.out
    # The matrix: one row per member, each cell "stored/released", equal to the kept stores.
    counts = demo_run.store_counts()
    assert sum(counts.values()) > 0
    lines = out.splitlines()
    top = lines.index(next(ln for ln in lines if ln.startswith("Reports exchanged")))
    header, body = lines[top + 1], lines[top + 2 : top + 2 + len(MEMBERS)]
    rows = {ln.split()[0]: ln.split()[1:] for ln in body}
    assert lines[top + 2 + len(MEMBERS)].startswith("  recv")
    columns = header.split()[:-1]  # the last column is "sent"
    assert columns == list(MEMBERS)
    for sender in MEMBERS:
        cells = rows[sender][: len(MEMBERS)]
        for recipient, cell in zip(MEMBERS, cells, strict=True):
            if sender == recipient:
                assert cell == "-"
                continue
            stored, released = cell.split("/")
            assert int(stored) == counts[(sender, recipient)] == int(released)
    # Side by side: JPN's report as USA, FRA and GBR received it, reductions visible.
    assert "JPN's vessel report" in out
    assert re.search(r"as USA received it\s+as FRA received it\s+as GBR received it", out)
    position = next(ln for ln in out.splitlines() if ln.strip().startswith("vessel.position"))
    assert "[coarsen:0.5]" in position
    assert "[coarsen:1]" in position
    assert "(withheld)" in out
    assert "[pseudonym:kor-jpn-usa-2026]" in out or "hmac-sha256:kor-jpn-usa-2026:" in out
    # msmt audit verify on every node (cosigned by all ten partners), then replay.
    for member in MEMBERS:
        assert re.search(
            rf"^  {member}  OK\s+\d+ entries, \d+ signed checkpoints, .*cosigned by 10 of 10",
            out,
            re.MULTILINE,
        ), member
    assert "none: every send and receive reconciles with the policies" in out
    assert out.rstrip().splitlines()[-1].startswith("demo OK in ")
    # Live progress went out as plain lines (stdout is not a terminal here).
    assert re.search(r"submitted \d+/\d+\s+accepted \d+\s+sent \d+\s+received \d+", out)


def test_demo_keeps_everything_it_was_asked_to(demo_run: DemoRun) -> None:
    root = demo_run.root
    assert (root / "keys" / "roster.json.jws").is_file()
    assert (root / "report.html").is_file()
    for member in MEMBERS:
        assert (root / "nodes" / member / "node.toml").is_file()
        assert (root / "nodes" / member / "policy.toml").read_bytes() == (
            REPO / "nodes" / member / "policy.toml"
        ).read_bytes()
        assert (root / "data" / member / "audit" / "audit.sqlite").is_file()
        assert (root / "logs" / f"{member}.log").stat().st_size > 0
    # The kept logs are real: msmt audit verify agrees on its own.
    verified = subprocess.run(
        [
            MSMT,
            "audit",
            "verify",
            str(root / "data" / "KOR" / "audit"),
            "--keys",
            str(root / "keys"),
            "--cosigned",
            "--quorum",
            "10",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stderr


def test_what_the_demo_keeps_is_private_whatever_the_umask(demo_run: DemoRun) -> None:
    # Run under umask 000 (demo_run): every member's private keys, its store and its
    # log were 0666 and their folders 0777. Now 0700/0600, as msmt node run makes
    # its own, but for the roster files msmt keys init makes public on purpose.
    public = {
        keys.ROSTER_FILE,
        keys.ROSTER_SIG_FILE,
        keys.AUTHORITY_PUBLIC_FILE,
        keys.NATS_USERS_FILE,
        keys_users.NATS_USERS_SIG_FILE,
    }
    wrong: dict[str, str] = {}
    for path in [demo_run.root, *demo_run.root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            want = 0o700
        elif path.parent == demo_run.root / "keys" and path.name in public:
            want = 0o644
        else:
            want = 0o600
        if stat.S_IMODE(mode) != want:
            wrong[str(path.relative_to(demo_run.root))] = stat.filemode(mode)
    assert wrong == {}
    assert (demo_run.root / "data" / "KOR" / "node.sqlite3").is_file()  # the walk saw them


def test_the_demo_picks_its_ports_from_this_workers_share(demo_run: DemoRun) -> None:
    # The demo's own free_port() walked the whole range, so under `make test` its hub
    # or a node could take a port another worker had picked and not yet bound.
    # Started with in_port_share, it walks this worker's share only.
    kept = [demo_run.root / "nats" / "n1.conf"]
    kept += [demo_run.root / "nodes" / m / "node.toml" for m in MEMBERS]
    ports = [int(p) for path in kept for p in re.findall(r"127\.0\.0\.1:(\d+)", path.read_text())]
    # The hub's client and monitoring ports; each node's hub URL and metrics port.
    assert len(ports) == 2 + 2 * len(MEMBERS)
    share = share_ports(*port_share())
    assert [p for p in ports if p not in share] == [], (port_share(), share)


# --- headless Chromium over the DevTools protocol ---------------------------------------


@dataclass
class PageLoad:
    """What the browser reported while loading one page."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    probe: Any = None


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[str]:
    """A headless Chromium with remote debugging on a free port; yields its HTTP endpoint.

    It gets a temporary directory of its own, removed afterwards: Chromium keeps its
    singleton socket in ``$TMPDIR/org.chromium.Chromium.*``, and a killed browser
    left one in /tmp per run. The directory is not under ``tmp_path``, whose length
    would push the socket's path past the 107 bytes a unix socket's may have.
    """
    scratch = Path(tempfile.mkdtemp(prefix="msmt-chromium-"))
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        endpoint = None
        while endpoint is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            match = re.search(r"DevTools listening on ws://([^/]+)/", line)
            if match:
                endpoint = match.group(1)
        assert endpoint is not None, "chromium did not start its DevTools endpoint"
        # Chromium took the directory: its singleton socket is there, not in /tmp.
        assert list(scratch.glob("org.chromium.Chromium.*/SingletonSocket"))
        yield endpoint
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(scratch)


PROBE = """JSON.stringify({
  rendered: document.documentElement.getAttribute('data-rendered'),
  sections: Array.from(document.querySelectorAll('section[id]')).map(s => s.id),
  heat: Array.from(document.querySelectorAll('#heatmap td[data-n]')).map(
    td => [td.dataset.s, td.dataset.r, Number(td.dataset.n), Number(td.dataset.w)]),
  bars: document.querySelectorAll('#timeline rect').length,
  maps: Array.from(document.querySelectorAll('.maps figure')).map(
    f => [f.querySelector('figcaption').textContent, f.querySelectorAll('circle').length]),
  cells: Array.from(document.querySelectorAll('.sbs td.transformed .tag')).map(t => t.textContent),
  withheld: document.querySelectorAll('.sbs td.withheld').length,
  audit: Array.from(document.querySelectorAll('#audit-table tr[data-member]')).map(
    tr => [tr.dataset.member, tr.dataset.ok]),
  summary: document.getElementById('summary').textContent,
  width: document.body.scrollWidth
})"""


async def load_page(endpoint: str, url: str) -> PageLoad:
    """Open ``url`` in a new tab; collect errors and requests until load; run ``PROBE``."""
    result = PageLoad()
    async with aiohttp.ClientSession() as session:
        async with session.put(f"http://{endpoint}/json/new?about:blank") as resp:
            target = await resp.json()
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = iter(range(1, 1_000_000))
            replies: dict[int, asyncio.Future[Any]] = {}
            loaded = asyncio.Event()

            async def reader() -> None:
                async for msg in ws:
                    data = json.loads(msg.data)
                    method, params = data.get("method"), data.get("params", {})
                    if "id" in data:
                        replies.pop(data["id"]).set_result(data)
                    elif method == "Runtime.exceptionThrown":
                        details = params["exceptionDetails"]
                        text = details.get("exception", {}).get("description") or details["text"]
                        result.errors.append(f"exception: {text}")
                    elif method == "Runtime.consoleAPICalled" and params["type"] in (
                        "error",
                        "assert",
                    ):
                        args = [a.get("value", a.get("description")) for a in params["args"]]
                        result.errors.append(f"console.{params['type']}: {args}")
                    elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                        result.errors.append(f"log: {params['entry']['text']}")
                    elif method == "Network.requestWillBeSent":
                        result.requests.append(params["request"]["url"])
                    elif method == "Page.loadEventFired":
                        loaded.set()

            async def call(method: str, **params: Any) -> Any:
                n = next(ids)
                replies[n] = waiting = asyncio.get_running_loop().create_future()
                await ws.send_json({"id": n, "method": method, "params": params})
                reply = await asyncio.wait_for(waiting, 30)
                assert "error" not in reply, reply
                return reply["result"]

            task = asyncio.create_task(reader())
            try:
                for domain in ("Runtime", "Log", "Network", "Page"):
                    await call(f"{domain}.enable")
                await call("Page.navigate", url=url)
                await asyncio.wait_for(loaded.wait(), 30)
                await asyncio.sleep(0.3)  # late errors from timers, if any
                probe = await call("Runtime.evaluate", expression=PROBE, returnByValue=True)
                value = probe["result"].get("value")
                result.probe = json.loads(value) if isinstance(value, str) else None
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        async with session.get(f"http://{endpoint}/json/close/{target['id']}") as resp:
            await resp.read()
    return result


@pytest.mark.browser
async def test_capture_sees_errors_and_fetches_on_a_control_page(
    chromium: str, tmp_path: Path
) -> None:
    # Without this control, "no errors" could just mean nothing was listening.
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
        "<img src='http://127.0.0.1:9/x.png'>"
        "<script>console.error('sentinel-error'); undefinedFunction();</script></body></html>"
    )
    got = await load_page(chromium, page.as_uri())
    assert any("sentinel-error" in e for e in got.errors)
    assert any("undefinedFunction" in e for e in got.errors)
    assert "http://127.0.0.1:9/x.png" in got.requests


@pytest.mark.browser
async def test_report_renders_in_chromium_without_errors_or_fetches(
    chromium: str, demo_run: DemoRun
) -> None:
    assert demo_run.code == 0, demo_run.out[-2000:]
    page = demo_run.root / "report.html"
    got = await load_page(chromium, page.as_uri())
    assert got.errors == []
    assert got.requests == [page.as_uri()]  # nothing fetched but the file itself
    probe = got.probe
    assert probe["rendered"] == "yes"  # the inline script ran to its end
    assert probe["sections"] == ["matrix", "timeline-section", "map", "side-by-side", "audit"]
    # The heat map shows what the kept stores hold, cell by cell.
    counts = demo_run.store_counts()
    assert {(s, r): n for s, r, n, _ in probe["heat"]} == counts
    assert all(n == w for _, _, n, w in probe["heat"])
    assert probe["bars"] > 3
    captions = [re.fullmatch(r"(.+) \((\d+)\)", c) for c, _ in probe["maps"]]
    assert [m.group(1) for m in captions if m] == ["JPN (original)", "USA", "FRA", "GBR"]
    for m, (_, dots) in zip(captions, probe["maps"], strict=True):
        assert m is not None
        assert int(m.group(2)) == dots > 0
    assert {"coarsen:0.5", "coarsen:1", "hour"} <= set(probe["cells"])
    assert probe["withheld"] > 0
    assert probe["audit"] == [[m, "yes"] for m in MEMBERS]
    assert probe["summary"].startswith("demo OK")


# --- Ctrl-C, failure reasons, escaping -------------------------------------------------


def _as_from_a_terminal() -> None:
    # A demo started from a shell prompt gets Ctrl-C: SIGINT neither ignored nor
    # blocked, whatever the test runner's own process inherited (a shell starts
    # background jobs with SIGINT ignored, and children inherit that and the mask).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _start_demo(*args: str) -> subprocess.Popen[str]:
    env = in_port_share({k: v for k, v in os.environ.items() if not k.startswith("MSMT_")})
    return subprocess.Popen(
        [MSMT, "demo", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_as_from_a_terminal,  # noqa: PLW1509 - two signal calls, no locks taken
    )


def _until_ready(proc: subprocess.Popen[str]) -> tuple[Path, list[psutil.Process]]:
    """Read the demo's output until its nodes are ready; its scratch dir and child processes."""
    assert proc.stdout is not None
    scratch = None
    for line in proc.stdout:
        match = re.search(r"written under (\S+)", line)
        if match:
            scratch = Path(match.group(1))
        if "nodes ready" in line:
            break
    assert scratch is not None
    assert scratch.is_dir()
    # The nodes and the hub run in their own sessions, but they are still its children.
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= len(MEMBERS) + 1
    return scratch, children


def _signal_masks(pid: int) -> dict[str, str]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(
        ln.split(":\t", 1) for ln in status if ln.startswith(("SigIgn", "SigCgt", "SigBlk"))
    )


def _stop_all(proc: subprocess.Popen[str], children: list[psutil.Process]) -> list[int]:
    """Kill the demo if still running; return its children still running, then kill them.

    They run in their own sessions: a test failing before the demo stopped them left a
    hub and eleven nodes running (a clean-clone run's, found later still busy). What
    is returned is looked at before they are killed, so a test still sees a demo that
    left them.
    """
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
    left = _gone(children)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    return left


def _gone(children: list[psutil.Process]) -> list[int]:
    return [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_ctrl_c_stops_every_process_and_removes_the_scratch_directory() -> None:
    # Enough sightings that the run cannot finish before the signal lands: with 60,
    # a worker held off the CPU for a moment sent it after a clean exit 0.
    proc = _start_demo("--sightings", "600", "--html", os.devnull)
    children: list[psutil.Process] = []
    try:
        scratch, children = _until_ready(proc)
        # What the demo does with SIGINT as it gets it (signal 2 is bit 1 of each mask).
        # Blocked for a moment is normal: CPython blocks every signal around a fork,
        # and a clean-clone run sampled the demo as it started a child. Only a mask
        # that keeps it blocked would leave the signal pending for good.
        for _ in range(50):
            masks = _signal_masks(proc.pid)
            if not int(masks["SigBlk"], 16) & 2:
                break
            time.sleep(0.02)
        assert not int(masks["SigIgn"], 16) & 2, masks
        assert not int(masks["SigBlk"], 16) & 2, masks
        proc.send_signal(signal.SIGINT)
        # Pressed twice, as an impatient user does: the second landed in the clean-up
        # and cut it short, leaving the hub and nodes running (a review, with SIGTERM).
        # Sent once the clean-up has stopped its first process.
        deadline = time.monotonic() + 20
        while len(_gone(children)) == len(children) and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        left = _stop_all(proc, children)
    assert proc.returncode != 0, (masks, out[-1500:], err)
    assert "Traceback" not in err
    assert left == []
    assert not scratch.exists()


def test_a_node_dying_fails_the_demo_with_one_line_and_cleans_up(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    proc = _start_demo("--sightings", "600", "--keep", str(kept))
    children: list[psutil.Process] = []
    try:
        _, children = _until_ready(proc)
        victim = next(c for c in children if "nodes/USA/node.toml" in " ".join(c.cmdline()))
        victim.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        left = _stop_all(proc, children)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [
        f"msmt: error: the USA node died: {err.split('the USA node died: ')[1].strip()}"
    ]
    assert left == []
    assert (kept / "logs" / "USA.log").is_file()  # --keep keeps the evidence of a failed run


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    # A local user's trial: an empty folder it made 0777 (the README's /tmp/msmt-demo)
    # was taken, and its links there had root's demo overwrite any file.
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "theirs").mkdir()
    os.chown(tmp_path / "theirs", 54321, -1)
    (tmp_path / "link").symlink_to(tmp_path / "open")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "their-parent").mkdir()  # a second review: the kept folder swapped there
    os.chown(tmp_path / "their-parent", 54321, -1)
    for args, reason in (
        (["--keep", str(tmp_path / "full")], "must be a new or empty directory"),
        (["--keep", str(tmp_path / "open")], "nobody else may write to (owner uid 0, mode 0777)"),
        (["--keep", str(tmp_path / "theirs")], "of yours that nobody else may write to"),
        (["--keep", str(tmp_path / "link")], "must be a new or empty directory"),
        (["--keep", str(tmp_path / "a-file" / "x")], "cannot create it: Not a directory"),
        (
            ["--keep", str(tmp_path / "their-parent" / "demo")],
            f"{tmp_path / 'their-parent'} belongs to another user (uid 54321)",
        ),
        (
            ["--keep", str(tmp_path / "open" / "demo")],
            f"{tmp_path / 'open'} is writable by every local user",
        ),
        (["--nodes", str(tmp_path / "none")], "cannot read"),
    ):
        proc = _start_demo(*args)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, out + err
        assert len(err.strip().splitlines()) == 1
        assert err.startswith("msmt: error: ")
        assert reason in err
    assert not (tmp_path / "open" / "keys").exists()
    # A packaging review: the keys were written before the policies were read, so the
    # kept folder, no longer empty, was refused at the next try.
    proc = _start_demo("--keep", str(tmp_path / "kept"), "--nodes", str(tmp_path / "none"))
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, "cannot read" in err) == (2, True), out + err
    assert list((tmp_path / "kept").iterdir()) == []


def test_a_new_kept_directory_is_private(tmp_path: Path) -> None:
    with scratch(tmp_path / "new" / "demo") as root:
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
    # A third review: a clone made under umask 002 has group-writable folders, which
    # refusing would refuse the README's own demo-out (for a group of one user, mostly).
    (tmp_path / "group").mkdir(mode=0o775)
    (tmp_path / "group").chmod(0o775)
    with scratch(tmp_path / "group" / "demo") as root:
        assert root.parent == tmp_path / "group"


def _outcome(**changes: Any) -> Outcome:
    base: dict[str, Any] = {
        "members": ("JPN", "USA", "KOR"),
        "sightings": 2,
        "elapsed": 1.0,
        "expected": {("JPN", "USA"): {"r1", "r2"}, ("JPN", "KOR"): {"r1"}},
        "received": {("JPN", "USA"): {"r1", "r2"}, ("JPN", "KOR"): {"r1"}},
        "rejected": {"JPN": 0, "USA": 0, "KOR": 0},
        "audits": [],
        "replay_lines": ["none"],
        "replay_ok": True,
        "replay_matrix": {},
        "side_by_side": [],
        "timeline": [(0.0, "JPN", "USA", "vessel"), (0.4, "JPN", "KOR", "worker")],
        "vessels": {},
    }
    return Outcome(**(base | changes))


def test_failure_reasons_name_what_was_lost_and_what_failed() -> None:
    assert first_failure(_outcome(), [], {"JPN": 0}) == []
    lost = _outcome(received={("JPN", "USA"): {"r1"}})
    reasons = first_failure(lost, [], {"JPN": 0, "USA": -9})
    assert reasons[0] == "2 released reports never arrived (JPN->KOR, JPN->USA)"
    assert "the USA node exited with status -9" in reasons
    lost.failures = reasons
    assert summary_line(lost).startswith("demo FAILED after 1.0s: 2 released reports never arrived")
    extra = _outcome(received={("JPN", "USA"): {"r1", "r2", "r9"}, ("JPN", "KOR"): {"r1"}})
    assert first_failure(extra, [], {}) == [
        "1 reports arrived that the senders' policies did not release"
    ]


def test_report_escapes_everything_that_came_from_reports_and_logs() -> None:
    hostile = "<script>alert(1)</script>\"'&"
    view = SideBySide(
        originator="JPN",
        report_id=hostile,
        kind="vessel",
        viewers=("USA",),
        rows=(("vessel.name", hostile, (Cell(hostile, "coarsen:0.5"),)),),
    )
    outcome = _outcome(
        side_by_side=[view],
        vessels={hostile: [Point(35.0, 125.0, hostile, hostile)]},
        replay_lines=[hostile],
        failures=[hostile],
    )
    page = render(outcome)
    assert "<script>alert(1)" not in page
    assert page.count("<script>") == 1  # only the report's own inline script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;" in page


async def test_a_node_whose_metrics_port_was_taken_is_moved_to_another(tmp_path: Path) -> None:
    # free_port() can only say a port *was* free: another process may take it before the
    # node binds it. Take JPN's port on purpose; the demo must move JPN, not fail.
    world = World(tmp_path, REPO / "nodes")
    world.prepare()
    taken = world.nodes["JPN"].config.metrics.port
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        await world.start_hub()
        world.start_nodes()
        async with aiohttp.ClientSession() as session:
            await wait_ready(world, session)
        assert world.nodes["JPN"].config.metrics.port != taken
        refused = f"config key metrics.listen: cannot listen on 127.0.0.1:{taken}: "
        assert refused + "Address already in use" in world.nodes["JPN"].log_path.read_text()
        assert all(code == 0 for code in world.stop_nodes().values())
    finally:
        squatter.close()
        world.kill_all()
