"""The ``msmt`` entry point itself: Ctrl-C that no command handles is one line and exit 130,
and a stdout that fails is one line and exit 1, for every command.

A real ``msmt`` process each time. The Ctrl-C is a ``KeyboardInterrupt`` raised
where Python's SIGINT handler would raise it, at the import of a named module
(a ``sitecustomize`` import hook), so it lands at the same point on every run:
a real signal would land wherever the process happened to be.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from audit_helpers import build_log, log_verifier
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from node_world import MSMT, REPO

import broker
from broker import cli as cli_module
from broker import feeds, keys, keys_custodian, samples
from broker.cli import FAMILIES
from broker.cli.options import rfc3339
from broker.errors import UsageError
from broker.store import Store
from broker.store_file import STORE_FORMAT

HOOK = """
import os, sys

class _CtrlC:
    # Raises KeyboardInterrupt as the named module is about to be imported.
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["INTERRUPT_AT_MODULE"]:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, _CtrlC())
"""


def _interrupted_run(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(HOOK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    env.update(PYTHONPATH=str(tmp_path), INTERRUPT_AT_MODULE=module)
    return subprocess.run(
        [MSMT, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("module", "args"),
    [
        # While the CLI itself is imported, by the console script's entry point (a
        # bad-input sweep: a traceback and a kill by SIGINT)...
        ("click", ("--version",)),
        # ...while a command's family loads, before it runs (most of a second)...
        ("broker.cli.status", ("status", "--config", str(REPO / "nodes/JPN/node.toml"))),
        # ...or every family, for the list of commands.
        ("broker.cli.audit", ("--help",)),
        # Inside a command (node run loads the daemon). A real SIGINT there is a clean
        # stop now, as node run records it from its first line (test_node_start_files):
        # the hook's KeyboardInterrupt stands for one raised in a command that does not.
        ("broker.node", ("node", "run", "--config", str(REPO / "nodes/JPN/node.toml"))),
    ],
)
def test_ctrl_c_while_starting_is_one_line_and_exit_130(
    tmp_path: Path, module: str, args: tuple[str, ...]
) -> None:
    done = _interrupted_run(tmp_path, module, *args)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "msmt: interrupted\n"
    assert done.stdout == ""


def test_a_ctrl_c_while_a_family_loads_is_held_until_it_has_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Raised inside the import, pydantic wrapped it in a SchemaError as it built a
    # model's validator: a traceback (a bad-input sweep). It is held, then raised.
    loaded: list[str] = []

    def load(family: str) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # bytecodes: where a handler that raises would
            pass
        loaded.append(family)

    monkeypatch.setattr(cli_module, "_load", load)
    with pytest.raises(KeyboardInterrupt):
        cli_module._load_holding_sigint("data")
    assert loaded == ["data"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_entry_point_imports_the_cli_only_under_its_guard() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, broker.entry; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = set(ast.literal_eval(done.stdout))
    assert not {"click", "broker.cli", "pydantic", "signal"} & loaded


def test_the_hook_interrupts_nothing_it_is_not_asked_to(tmp_path: Path) -> None:
    # The same hook, aimed at a module msmt never imports: the command runs as usual,
    # so the interruptions above are the hook's doing, not the environment's.
    done = _interrupted_run(tmp_path, "no.such.module", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("msmt, version ")


# Run as msmt, then print which command families it imported (last line of stderr).
LOADED = """
import atexit, sys
from broker.cli import main
atexit.register(lambda: print(sorted(m for m in sys.modules if m.startswith("broker.cli.")),
                              file=sys.stderr))
main()
"""


@pytest.mark.parametrize(
    ("args", "families"),
    [
        (["status", "--help"], ["node", "status"]),  # node's: the config, the store
        (["submit", "--help"], ["node", "submit"]),  # node's: the config
        (["feeds", "list", "--help"], ["feeds", "node", "status"]),  # open_store, feed_line
        (["nats", "setup", "--help"], ["keys"]),
        (["--version"], []),
        (["no-such-command"], []),
        (
            ["--help"],
            [
                "audit",
                "data",
                "demo",
                "export",
                "feeds",
                "inbox",
                "keys",
                "node",
                "policy",
                "status",
                "submit",
            ],
        ),
    ],
    ids=" ".join,
)
def test_a_command_loads_only_its_own_family(args: list[str], families: list[str]) -> None:
    # Each family loads most of the broker; every `msmt submit` a feed runs and
    # every node start paid for all eight (1.6-1.9 s against 1.5 on a slow machine).
    done = subprocess.run(
        [sys.executable, "-c", LOADED, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    loaded = ast.literal_eval(done.stderr.splitlines()[-1])
    # A family's parts (broker.cli.<family>_<part>) load with it.
    assert sorted({m.partition("_")[0] for m in loaded}) == sorted(
        ["broker.cli.options", *(f"broker.cli.{f}" for f in families)]
    )
    assert done.returncode == (2 if args == ["no-such-command"] else 0), done.stderr


# Run as msmt, then print which network clients it imported (last line of stderr).
CLIENTS = """
import atexit, sys
from broker.cli import main
atexit.register(lambda: print(sorted(m for m in ("nats", "aiohttp") if m in sys.modules),
                              file=sys.stderr))
main()
"""


@pytest.mark.parametrize(
    ("args", "clients"),
    [
        (["status", "--config", "@CONFIG"], []),
        (["feeds", "list", "--config", "@CONFIG"], []),
        (["policy", "check", "@POLICY"], []),
        (["keys", "init", "--dir", "@KEYS", "--members", "JPN,USA"], []),
        (["submit", "--config", "@CONFIG"], ["aiohttp"]),  # refused: no node runs
        (["node", "check", "--config", "@CONFIG"], []),  # refused: no keys in the checkout
    ],
    ids=lambda args: " ".join(args[:2]) if isinstance(args, list) else None,
)
def test_a_command_that_never_reaches_the_hub_loads_no_network_client(
    tmp_path: Path, args: list[str], clients: list[str]
) -> None:
    # nats-py loads aiohttp, ~0.3 s of a command's ~1 s on a slow machine: the TLS
    # rules that reading node.toml checks, the intake and nats setup load them
    # only where they are used.
    Store(tmp_path / "node.sqlite3").close()  # what status reads, as a node leaves it
    feeds.add(tmp_path / "intake-feeds.json", "jpn-ais", datetime.now(UTC))
    paths = {
        "@CONFIG": JPN_CONFIG,
        "@POLICY": str(REPO / "nodes/JPN/policy.toml"),
        "@KEYS": str(tmp_path / "keys"),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    env["MSMT_DATA_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", CLIENTS, *(paths.get(a, a) for a in args)],
        input="",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert ast.literal_eval(done.stderr.splitlines()[-1]) == clients
    assert done.returncode == (2 if args[0] in ("submit", "node") else 0), done.stderr


def test_every_command_family_is_listed_with_exactly_its_commands() -> None:
    # A command missing from FAMILIES would be missing from msmt, and its tests would
    # say only "No such command". A family's parts (broker.cli.<family>_<part>) add
    # their commands to its group, and its own module loads them.
    modules = {p.stem for p in (REPO / "broker" / "cli").glob("*.py")} - {"__init__", "options"}
    families = {m for m in modules if "_" not in m}
    assert set(FAMILIES.values()) == families
    assert {m.partition("_")[0] for m in modules} == families
    for family in families:
        module = importlib.import_module(f"broker.cli.{family}")
        names = {command.name for command in module.COMMANDS}
        assert names == {name for name, f in FAMILIES.items() if f == family}, family


JPN_CONFIG = str(REPO / "nodes/JPN/node.toml")


def _run_with_stdout(how: str, args: list[str], data: Path) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    env["MSMT_DATA_DIR"] = str(data)
    if how == "file":
        with (data / "out").open("wb") as out:
            return subprocess.run(
                [MSMT, *args],
                stdout=out,
                capture_output=False,
                stderr=subprocess.PIPE,
                env=env,
                timeout=60,
                check=False,
            )
    if how == "full":
        with open("/dev/full", "wb") as full:
            return subprocess.run(
                [MSMT, *args], stdout=full, stderr=subprocess.PIPE, env=env, timeout=60, check=False
            )
    if how == "closed":  # the shell's ">&-": no fd 1 at all when msmt starts
        shell = ["/bin/sh", "-c", 'exec "$@" >&-', "sh", MSMT, *args]
        return subprocess.run(shell, stderr=subprocess.PIPE, env=env, timeout=60, check=False)
    reader, writer = os.pipe()
    os.close(reader)  # "| head -0": the reader is gone before the first byte
    try:
        return subprocess.run(
            [MSMT, *args], stdout=writer, stderr=subprocess.PIPE, env=env, timeout=60, check=False
        )
    finally:
        os.close(writer)


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--config", JPN_CONFIG],
        ["feeds", "list", "--config", JPN_CONFIG],
        ["--help"],  # click's own output
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_a_stdout_that_fails_is_one_line_and_exit_1_for_every_command(
    tmp_path: Path, args: list[str]
) -> None:
    # Output cut short must not pass for whole (exit 0, as ">&-" gave), nor be click's
    # silent exit 1 for a closed pipe, nor a traceback for a full disk.
    Store(tmp_path / "node.sqlite3").close()  # what status reads, as a node leaves it
    feeds.add(tmp_path / "intake-feeds.json", "jpn-ais", datetime.now(UTC))
    written = _run_with_stdout("file", args, tmp_path)
    assert (written.returncode, written.stderr) == (0, b"")
    assert (tmp_path / "out").stat().st_size > 0  # so each of these writes to stdout
    closed = b"msmt: error: stdout was closed before the whole output was written\n"
    for how in ("pipe", "closed"):
        done = _run_with_stdout(how, args, tmp_path)
        assert (how, done.returncode, done.stderr) == (how, 1, closed)
    done = _run_with_stdout("full", args, tmp_path)
    assert (done.returncode, done.stderr) == (
        1,
        b"msmt: error: cannot write the output to stdout: No space left on device\n",
    )


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_a_file_cut_short_by_its_size_limit_is_output_cut_short(
    tmp_path: Path, unbuffered: bool
) -> None:
    # A review: `ulimit -f 4` (or a full disk past the first block) cut an evidence
    # file at 4 KiB and the command exited 0: unbuffered (PYTHONUNBUFFERED, as
    # containers set it) the text layer dropped every short write's count.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    with (tmp_path / "out").open("wb") as out:
        done = subprocess.run(
            [MSMT, "samples", "generate", "--count", "12"],
            stdout=out,
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=small_files,  # a limit set in the child only
            timeout=60,
            check=False,
        )
    assert (done.returncode, done.stderr) == (
        1,
        b"msmt: error: cannot write the output to stdout: File too large\n",
    )
    assert (tmp_path / "out").stat().st_size == 4096


def test_a_reader_that_leaves_midway_through_a_large_write_is_output_cut_short() -> None:
    # "| head -c 10" on one large write: Python's buffered writer returned the short
    # count, which the text layer dropped, and the command exited 0 with 2.4 MB
    # unwritten (a bad-input sweep). The reader here takes 10 bytes and leaves.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    command = [MSMT, "samples", "generate", "--count", "5000"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as run:
        assert run.stdout is not None
        assert run.stderr is not None
        assert len(run.stdout.read(10)) == 10
        run.stdout.close()
        err = run.stderr.read()
        code = run.wait(timeout=60)
    assert (code, err) == (
        1,
        b"msmt: error: stdout was closed before the whole output was written\n",
    )
    # Read whole, the same output is 2.4 MB and exit 0.
    whole = subprocess.run(command, capture_output=True, env=env, timeout=60, check=False)
    assert (whole.returncode, whole.stderr) == (0, b"")
    assert len(whole.stdout.splitlines()) == 5000


def _run_with_stderr(how: str, args: list[str]) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    if how == "closed":  # the shell's "2>&-": no fd 2 at all when msmt starts
        shell = ["/bin/sh", "-c", 'exec "$@" 2>&-', "sh", MSMT, *args]
        return subprocess.run(shell, stdout=subprocess.PIPE, env=env, timeout=60, check=False)
    with open("/dev/full", "wb") as full:
        return subprocess.run(
            [MSMT, *args], stdout=subprocess.PIPE, stderr=full, env=env, timeout=60, check=False
        )


@pytest.mark.parametrize("how", ["closed", "full"])
@pytest.mark.parametrize(
    "args",
    [
        ["status", "--config", "/nonexistent/node.toml"],  # ours: MsmtError, exit 2
        ["status", "--no-such-option"],  # click's usage error, exit 2
    ],
    ids=lambda args: args[-1],
)
def test_a_stderr_that_fails_keeps_the_exit_status_and_out_of_stdout(
    how: str, args: list[str]
) -> None:
    # The error line has nowhere to go. /dev/full made our own line's write raise
    # (exit 1 and a traceback, to /dev/full too); with fd 2 closed, click wrote
    # its usage error to stdout, where a script's output goes.
    done = _run_with_stderr(how, args)
    assert (done.returncode, done.stdout) == (2, b"")


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "-"],
        ["keys", "pseudonym", "JPN", "k1", "--dir", "{keys}", "--from-file", "-"],
        ["submit", "--config", JPN_CONFIG, "--token-file", "{token}", "-"],
    ],
    ids=lambda args: args[0],
)
def test_a_closed_stdin_given_as_input_is_one_line(tmp_path: Path, args: list[str]) -> None:
    # "<&-": sys.stdin is None, and reading "-" was an AttributeError traceback.
    token = tmp_path / "token"
    token.write_text("x" * 43)
    token.chmod(0o600)
    filled = [a.format(keys=tmp_path / "keys", token=token) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    shell = ["/bin/sh", "-c", 'exec "$@" <&-', "sh", MSMT, *filled]
    done = subprocess.run(shell, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (
        2,
        "msmt: error: stdin is closed: give a file, or pipe the input in\n",
    )
    assert not (tmp_path / "keys").exists()  # nothing imported


def _msmt(
    *args: str, data: Path, limit_memory: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    environ.update(MSMT_DATA_DIR=str(data), **(env or {}))

    def cap() -> None:  # /dev/zero read whole, without the fix, must not take the machine's
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run(
        [MSMT, *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,  # a FIFO read as a file waits for a writer that never comes
        check=False,
        preexec_fn=cap if limit_memory else None,
    )


def test_an_error_line_escapes_the_newline_or_escape_in_what_it_names(tmp_path: Path) -> None:
    # A path is echoed into the error: a newline in it must not split the line,
    # nor forge a second "msmt: error:" line in whatever log collects stderr.
    forged = tmp_path / "a\nmsmt: error: forged" / "node.toml"
    done = _msmt("status", "--config", str(forged), data=tmp_path)
    shown = str(forged).replace("\n", "\\n")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"msmt: error: cannot read config {shown}: No such file or directory\n"
    # policy check prints its own error lines, one per file it cannot read.
    red = tmp_path / "x\x1b[31m.toml"
    done = _msmt("policy", "check", str(red), data=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        f"msmt: error: cannot read policy {tmp_path}/x\\x1b[31m.toml: No such file or directory\n"
    )


# A folder name that, printed raw, would end the line, forge one of msmt's own and
# turn the terminal red; and how it is shown (as error lines show it).
HOSTILE = "a\nmsmt: error: forged\x1b[31m"
HOSTILE_SHOWN = "a\\nmsmt: error: forged\\x1b[31m"


@pytest.mark.parametrize(
    "command", ["keys authority", "schemas export", "policy check", "validate"]
)
def test_a_success_line_escapes_the_newline_or_escape_in_the_path_it_names(
    tmp_path: Path, command: str
) -> None:
    # "wrote <path>" and its like printed the path as it was: a newline in a name
    # forged a second line for whoever reads the output, and \x1b[ restyled the terminal.
    folder = tmp_path / HOSTILE
    folder.mkdir()
    shown = f"{tmp_path}/{HOSTILE_SHOWN}"
    if command == "keys authority":
        done = _msmt("keys", "authority", "--dir", str(folder / "keys"), data=tmp_path)
        lines = [
            f"wrote the roster authority and an empty roster version 1 under {shown}/keys",
            f"send {shown}/keys/roster-authority.json to every member, who pins it; keep"
            f" {shown}/keys/authority/roster-authority.jwk offline",
        ]
    elif command == "schemas export":
        done = _msmt("schemas", "export", "--out", str(folder / "schemas"), data=tmp_path)
        written = sorted(p for p in (folder / "schemas").rglob("*") if p.is_file())
        lines = [f"{shown}/{p.relative_to(folder)}" for p in written]
    elif command == "policy check":
        policy = folder / "policy.toml"
        policy.write_bytes((REPO / "nodes" / "JPN" / "policy.toml").read_bytes())
        done = _msmt("policy", "check", str(policy), data=tmp_path)
        lines = done.stdout.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"{shown}/policy.toml: ok: JPN, "), lines
    else:
        feed = folder / "feed.ndjson"
        feed.write_text('{"kind": "vessel"}\n')
        done = _msmt("validate", str(feed), data=tmp_path)
        lines = done.stdout.splitlines()
        assert lines
        assert all(ln.startswith(f"{shown}/feed.ndjson:1: ") for ln in lines), lines
    assert done.returncode == (1 if command == "validate" else 0), done.stderr
    output = done.stdout + done.stderr
    assert "\x1b" not in output
    assert not [ln for ln in output.splitlines() if ln.startswith("msmt: error: forged")]
    assert set(lines) <= set(done.stdout.splitlines()), done.stdout


def test_an_error_naming_a_huge_value_keeps_its_start_and_its_reason(tmp_path: Path) -> None:
    # A 100 KB argument was echoed whole into the one line; the reason after it
    # (here strerror) must survive the cut.
    huge = tmp_path / ("x" * 100_000) / "node.toml"
    done = _msmt("status", "--config", str(huge), data=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.count("\n") == 1
    assert len(done.stderr) < 4200
    assert done.stderr.startswith(f"msmt: error: cannot read config {tmp_path}/xxx")
    assert "characters left out ...] xxx" in done.stderr
    assert done.stderr.endswith("x/node.toml: File name too long\n")


NOT_A_FILE = "not a regular file (a FIFO, socket or device)"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("status", "--config", "{fifo}"), "cannot read config {fifo}"),
        (("policy", "check", "{fifo}"), "cannot read policy {fifo}"),
        (("keys", "verify-roster", "--dir", "{keys}"), "cannot read {keys}/roster.json"),
        (
            ("submit", "--config", JPN_CONFIG, "--token-file", "{fifo}", "/dev/null"),
            "cannot read intake token {fifo}",
        ),
    ],
    ids=lambda value: value[0] if isinstance(value, tuple) else "",
)
def test_a_fifo_named_as_an_input_file_is_refused_at_once(
    tmp_path: Path, args: tuple[str, ...], reason: str
) -> None:
    # Each command reads the FIFO where it expects a file: without a writer it
    # would wait for ever (the subprocess's timeout fails the test).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    keydir = tmp_path / "keys"
    keys_custodian.init_keys(keydir, ["JPN", "USA"])
    (keydir / keys.ROSTER_FILE).unlink()
    os.mkfifo(keydir / keys.ROSTER_FILE)
    done = _msmt(*(a.format(fifo=fifo, keys=keydir) for a in args), data=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"msmt: error: {reason.format(fifo=fifo, keys=keydir)}: {NOT_A_FILE}\n"


def test_a_device_named_as_the_config_is_refused_before_a_byte_is_read(tmp_path: Path) -> None:
    # /dev/zero never ends: read whole, it took memory until a MemoryError traceback.
    done = _msmt("status", "--config", "/dev/zero", data=tmp_path, limit_memory=True)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"msmt: error: cannot read config /dev/zero: {NOT_A_FILE}\n"


def test_input_files_nested_too_deeply_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    # Deeper than the parsers' stack: RecursionError, which no loader caught.
    toml = tmp_path / "deep.toml"
    toml.write_text("a = " + "[" * 10_000 + "]" * 10_000 + "\n")
    keydir = tmp_path / "keys"
    keys_custodian.init_keys(keydir, ["JPN", "USA"])
    (keydir / keys.ROSTER_FILE).write_text("[" * 10_000 + "]" * 10_000)
    done = _msmt("status", "--config", str(toml), data=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"msmt: error: config {toml}: invalid TOML: nested too deeply\n"
    done = _msmt("policy", "check", str(toml), data=tmp_path)
    assert (done.returncode, done.stderr) == (1, "")
    assert done.stdout == f"{toml}:1: not valid TOML: nested too deeply\n"
    done = _msmt("keys", "verify-roster", "--dir", str(keydir), data=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"msmt: error: {keydir}/roster.json is not valid JSON: nested too deeply\n"
    )


def test_an_integer_of_over_4300_digits_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    # int() refuses over 4300 digits with a ValueError that tomllib and json leave
    # unwrapped, and that MSMT_* integers met too: each was a traceback.
    huge = "9" * 5000
    config = tmp_path / "node.toml"
    config.write_text((REPO / "nodes/JPN/node.toml").read_text() + f"\nzz = {huge}\n")
    done = _msmt("status", "--config", str(config), data=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"msmt: error: config {config}: invalid TOML: an integer of over 4300 digits\n"
    )
    done = _msmt("status", "--config", JPN_CONFIG, data=tmp_path, env={"MSMT_HOLD_SECONDS": huge})
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "msmt: error: config key limits.hold_seconds: MSMT_HOLD_SECONDS is an integer of"
        " 5000 digits\n"
    )
    policy = tmp_path / "policy.toml"
    policy.write_text(f"version = {huge}\n")
    done = _msmt("policy", "check", str(policy), data=tmp_path)
    assert (done.returncode, done.stderr) == (1, "")
    assert done.stdout == f"{policy}:1: not valid TOML: an integer of over 4300 digits\n"
    report = tmp_path / "report.json"
    report.write_text(f'{{"report_id": {huge}}}\n')
    done = _msmt(
        "policy", "explain", "--member", "JPN", "--report", str(report),
        "--policy", str(REPO / "nodes/JPN/policy.toml"), data=tmp_path,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(f"msmt: error: {report}: not a valid sighting: ")
    assert done.stderr.count("\n") == 1


def test_validate_holds_one_record_not_a_whole_line(tmp_path: Path) -> None:
    # A line of 1.25 GiB (a sparse file of zeros: /dev/zero is one without end)
    # under a 1 GiB memory cap: read whole, it was a MemoryError traceback.
    huge = tmp_path / "zeros.ndjson"
    with huge.open("wb") as out:
        out.truncate(5 << 28)
    with huge.open("ab") as out:
        out.write(b"\n" + (REPO / "samples/feed.ndjson").read_bytes().split(b"\n")[0] + b"\n")
    done = _msmt("validate", str(huge), data=tmp_path, limit_memory=True)
    assert (done.returncode, done.stderr) == (1, "1 valid, 1 invalid\n")
    assert done.stdout == f"{huge}:1: (record): record is {5 << 28} bytes; limit 65536\n"


def test_a_token_file_that_is_not_one_token_is_one_line_before_any_chmod_advice(
    tmp_path: Path,
) -> None:
    # A feed's data file given as the token: it was first told to chmod the file,
    # and then its newlines went into the HTTP header, a traceback.
    feed = tmp_path / "feed.ndjson"
    feed.write_text('{"secret-looking": 1}\n{"second": 2}\n')
    feed.chmod(0o644)
    two_lines = tmp_path / "two.token"
    two_lines.write_text("a" * 40 + "\n" + "b" * 32 + "\n")
    two_lines.chmod(0o600)
    for path in (feed, two_lines):
        done = _msmt("submit", "--config", JPN_CONFIG, "--token-file", str(path), data=tmp_path)
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr == (
            f"msmt: error: intake token {path} is not one token: it holds spaces, control"
            " characters or more than one line (is it the right file?)\n"
        )
    # One token, one line, still refused for its permissions.
    one = tmp_path / "one.token"
    one.write_text("c" * 43 + "\n")
    one.chmod(0o644)
    done = _msmt("submit", "--config", JPN_CONFIG, "--token-file", str(one), data=tmp_path)
    assert (done.returncode, done.stderr) == (
        2,
        f"msmt: error: intake token {one} is readable by others: chmod 600 it\n",
    )


def test_submit_before_the_node_ever_started_says_where_the_token_comes_from(
    tmp_path: Path,
) -> None:
    done = _msmt("submit", "--config", JPN_CONFIG, "-", data=tmp_path / "data")
    assert (done.returncode, done.stdout) == (2, "")
    token = tmp_path / "data" / "intake.token"
    assert done.stderr == (
        f"msmt: error: cannot read intake token {token}: No such file or directory: the node"
        " writes it at its first start (has `msmt node run` run?)\n"
    )


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (
            ["status", "--confg", "x"],
            "No such option '--confg'. (Did you mean one of: '--config', '--json'?)"
            " (see msmt status --help)",
        ),
        (
            ["keys", "pseudonym", "KOR"],
            "Missing argument 'KEY_ID'. (see msmt keys pseudonym --help)",
        ),
        (
            ["inbox", "list", "--limit", "abc"],
            "Invalid value for '--limit': 'abc' is not a valid integer range."
            " (see msmt inbox list --help)",
        ),
        (["frobnicate"], "No such command 'frobnicate'. (see msmt --help)"),
        # A bad-input sweep: NaN passed a click.FloatRange, and inf one with no maximum.
        (
            ["audit", "verify", "x", "--wait", "nan"],
            "Invalid value for '--wait': 'nan' is not a finite number"
            " (see msmt audit verify --help)",
        ),
        (
            ["nats", "setup", "--account", "JPN", "--max-age-days", "inf"],
            "Invalid value for '--max-age-days': 'inf' is not a finite number"
            " (see msmt nats setup --help)",
        ),
    ],
    ids=["option", "missing", "value", "command", "nan", "inf"],
)
def test_a_command_line_click_refuses_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], reason: str
) -> None:
    # Click shows these as three lines (usage, a hint, the error); every other
    # error of ours is one line, which a wrapper script can log as it is.
    done = _msmt(*args, data=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"msmt: error: {reason}\n")


def test_help_version_and_a_group_named_alone_are_as_click_shows_them(tmp_path: Path) -> None:
    helped = _msmt("status", "--help", data=tmp_path)
    assert (helped.returncode, helped.stderr) == (0, "")
    assert helped.stdout.startswith("Usage: msmt status [OPTIONS]\n")
    version = _msmt("--version", data=tmp_path)
    assert (version.returncode, version.stdout) == (
        0,
        f"msmt, version {broker.version()}\nstore format {STORE_FORMAT}\n",
    )
    alone = _msmt("keys", data=tmp_path)
    assert alone.returncode == 2
    assert alone.stderr.startswith("Usage: msmt keys [OPTIONS] COMMAND [ARGS]...\n")
    assert "verify-roster" in alone.stderr


def test_validate_of_a_pretty_printed_record_says_what_ndjson_is(tmp_path: Path) -> None:
    # It gave one error per line of the file (24 for the example), then a hint.
    example = REPO / "schemas" / "examples" / "vessel.json"
    done = _msmt("validate", str(example), data=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"msmt: error: {example}: line 1 is not a whole record: NDJSON holds one record per"
        " line; a pretty-printed file can be given as `jq -c . FILE | msmt validate -`\n"
    )
    # A record cut short on line 1 is not taken for one spread over lines.
    invalid = _msmt("validate", "--quiet", str(REPO / "samples" / "invalid.ndjson"), data=tmp_path)
    assert invalid.returncode == 1
    assert invalid.stderr.endswith(" valid, 35 invalid\n")


def test_an_rfc3339_option_takes_lower_case_t_and_z_as_the_rfc_allows() -> None:
    # An analyst's --since 2026-12-06t11:45:40z was refused as "not an RFC 3339 time".
    upper = rfc3339("--since", "2026-12-06T11:45:40Z")
    assert rfc3339("--since", "2026-12-06t11:45:40z") == upper
    assert rfc3339("--since", "2026-12-06t20:45:40+09:00") == upper
    with pytest.raises(UsageError, match=r"^--since 'yesterday' is not an RFC 3339 time$"):
        rfc3339("--since", "yesterday")
    with pytest.raises(UsageError, match="needs a time zone"):
        rfc3339("--since", "2026-12-06t11:45:40")


def test_reading_stdin_at_a_terminal_says_so_first(tmp_path: Path) -> None:
    # `msmt validate` with no file read the terminal silently; a new user took it for hung.
    record = json.dumps(samples.generate(1, seed=3)[0]).encode()
    master, slave = os.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    with subprocess.Popen(
        [MSMT, "validate"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        os.close(slave)
        os.write(master, record + b"\n\x04")  # a line, then Ctrl-D at the start of the next
        out, err = proc.communicate(timeout=60)
    os.close(master)
    assert (proc.returncode, out) == (0, "")
    assert err == (
        "reading from the terminal: type or paste the input, then Ctrl-D\n1 valid, 0 invalid\n"
    )
    # Piped, it says nothing of the kind.
    piped = subprocess.run(
        [MSMT, "validate"], input=record + b"\n", capture_output=True, env=env, check=False
    )
    assert (piped.returncode, piped.stderr) == (0, b"1 valid, 0 invalid\n")


def test_an_audit_file_that_holds_nothing_usable_is_named(tmp_path: Path) -> None:
    # A bad-input sweep: "roster is not a JWK Set: no 'keys' list" named no file, and an
    # empty --witnesses file was "a quorum of 1 needs at least 1 witness keys".
    log, roster, witnesses = tmp_path / "log", tmp_path / "roster.json", tmp_path / "w.txt"
    key = Ed25519PrivateKey.generate()
    build_log(log, key, [2]).close()
    roster.write_text('{"x": 1}\n')
    witnesses.write_text("")
    done = _msmt("audit", "verify", str(log), "--roster", str(roster), data=tmp_path)
    reason = "roster is not a JWK Set: no 'keys' list"
    assert (done.returncode, done.stderr) == (2, f"msmt: error: --roster {roster}: {reason}\n")
    vkey = log_verifier(key).vkey()
    done = _msmt(
        "audit", "verify", str(log), "--log-key", vkey, "--cosigned", "--quorum", "1",
        "--witnesses", str(witnesses), data=tmp_path,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (
        2,
        f"msmt: error: --witnesses {witnesses} holds no verifier key\n",
    ), done.stderr
