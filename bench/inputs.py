"""Not timed: every ``msmt`` command against damaged input files, arguments and environment.

    python bench/inputs.py [--quick] [--only SLOT] [--variant NAME] [--world DIR] [--code DIR]

Builds a small world with ``msmt demo --keep`` (or takes one made earlier with
``--world``), copies what the commands read (keys, node configs and policies,
JPN's and USA's data directories) and adds the files other commands take (a
prove JSON and its checkpoint note, witness keys, an evidence file, a key
request, a pseudonym key, a feed token, a report file). Then, for each input
*slot* (a file some commands read, ``SLOTS``), each *variant* of damage
(``inputs_damage``) and each command that reads the slot, it restores the
world, damages the one file, runs the command as nobody (so mode 000 means
something when this script runs as root) with its address space capped at
2 GiB, and classes the result:

* ``traceback``: ``Traceback`` on stderr;
* ``hang``: no exit within ``--timeout`` (30 s); a node that starts is stopped
  at once and counted ``accepted``;
* ``lines``: a failure whose stderr is not exactly one line (the commands of
  ``REPORTERS`` may print their own lines), or says nothing;
* ``exit``: an exit status other than the documented 1 and 2;
* ``state``: the command failed, yet a file of the world changed (the damaged
  file itself, ``-shm`` and lock files and SQLite's header change counter aside);
* ``accepted``: exit 0 on damaged input, for a reader to judge (a command
  that never reads the damaged key; a BOM; a trailing byte cut off a token);
* ``usage``, ``refused``: click's usage error, or one line and exit 1 or 2;
* ``warned``: exit 0 from a command that reads the file only to compare, and
  says on stdout that it did not (``WARNERS``: ``node check`` and the hub's
  users beside the roster, which a start never reads);
* ``stream``: ``validate`` or ``submit`` still reading a FIFO or ``/dev/zero``
  as their NDJSON, as they read a pipe: until its end.

Arguments and ``MSMT_*`` variables are tried the same way (``ARGUMENT_CASES``,
``ENV_CASES``; ``--only args``, ``--only env``). ``--code DIR`` runs the
commands on another checkout's ``broker/`` (``PYTHONPATH``), to compare with
the code before a fix. Prints one line per case that is not a clean refusal
and a summary by class; ``--out`` writes every case as NDJSON. Exit 1 when any
``traceback``, ``hang``, ``lines``, ``exit`` or ``state`` case is found.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from inputs_damage import (
    Damage,
    generic_variants,
    json_variants,
    sqlite_variants,
    toml_variants,
    wal_variants,
)
from sigterm import stop_on_sigterm

ROOT = Path(__file__).resolve().parent.parent
MSMT = ROOT / ".venv" / "bin" / "msmt"
NOBODY = 65534
TIMEOUT = 30.0
FAILING = ("traceback", "hang", "lines", "exit", "state")
CODE: Path | None = None
"""``--code``: a checkout whose ``broker`` the commands import instead of this one's."""


# --- the world -------------------------------------------------------------


def run_msmt(args: list[str], cwd: Path) -> str:
    """Run ``msmt`` for the world's set-up; its stdout, or exit with what went wrong."""
    done = subprocess.run(
        [str(MSMT), *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        sys.exit(f"set-up failed: msmt {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def build_world(demo: Path, pristine: Path) -> None:
    """Copy a demo's keys, configs and two nodes' data into ``pristine``; add the extra files."""
    pristine.mkdir(parents=True)
    for name in ("keys", "nodes"):
        shutil.copytree(demo / name, pristine / name, symlinks=True)
    for member in ("JPN", "USA"):
        shutil.copytree(demo / "data" / member, pristine / "data" / member, symlinks=True)
    extra = pristine / "extra"
    extra.mkdir()
    run_msmt(["keys", "pseudonym", "JPN", "pk1", "--dir", "keys"], pristine)
    shutil.copy(pristine / "keys/JPN/pseudonym/pk1.key", extra / "pk1.key")
    run_msmt(
        ["keys", "request", "JPN", "--first", "--dir", "extra/newkeys", "--out", "extra/req.json"],
        pristine,
    )
    run_msmt(
        ["feeds", "add", "f1", "--config", "nodes/JPN/node.toml", "--out", "extra/f1.token"],
        pristine,
    )
    prove = run_msmt(["audit", "prove", "data/JPN", "--entry", "1"], pristine)
    (extra / "prove.json").write_text(prove)
    (extra / "known.note").write_text(json.loads(prove)["checkpoint"])
    (extra / "report.ndjson").write_text(
        run_msmt(["samples", "generate", "--count", "3", "--originators", "JPN"], pristine)
    )
    newest = json.loads(
        run_msmt(
            ["inbox", "list", "--config", "nodes/USA/node.toml", "--json", "--limit", "1"], pristine
        )
    )
    (extra / "evidence.json").write_text(
        run_msmt(
            ["inbox", "evidence", "--config", "nodes/USA/node.toml", newest["report_id"]],
            pristine,
        )
    )
    (extra / "report_id").write_text(newest["report_id"])
    foreign_wal(extra / "foreign.sqlite3")
    sys.path.insert(0, str(ROOT))
    from broker.checkpoint import roster_witness_keys
    from broker.keys_roster import load_signed_roster

    roster = load_signed_roster(pristine / "keys").roster
    others = ["USA", "KOR", "GBR", "FRA"]
    vkeys = [key.vkey() for key in roster_witness_keys(roster, others)]
    (extra / "witnesses.txt").write_text("# cosigners\n" + "\n".join(vkeys) + "\n")
    subprocess.run(["/bin/chown", "-R", f"{NOBODY}:{NOBODY}", str(pristine)], check=True)


def foreign_wal(path: Path) -> None:
    """A database of another kind with a ``-wal`` file holding committed pages, copied aside."""
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=wal")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE entries (x)")
    db.executemany("INSERT INTO entries VALUES (?)", [(b"x" * 500,)] * 50)
    db.commit()
    shutil.copy(path.with_name(path.name + "-wal"), path.with_name(path.name + ".wal-copy"))
    db.close()
    shutil.copy(path.with_name(path.name + ".wal-copy"), path.with_name(path.name + "-wal"))


def tree_digest(top: Path, skip: Path) -> dict[str, str]:
    """Each file under ``top`` (but ``skip`` and volatile SQLite side files) -> its digest."""
    digests: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path == skip or name.endswith(("-shm", ".lock")):
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:  # a socket, a mode-000 file: named, not read
                digests[str(path.relative_to(top))] = f"unreadable: {exc.strerror}"
                continue
            if name.endswith("-wal") and not data:
                continue  # an empty -wal is none: a clean close removes it
            if data.startswith(b"SQLite format 3\0"):
                # A transaction that changed nothing still bumps the header's change
                # counter (bytes 24-27, 92-95): not a change to what was accepted.
                data = data[:24] + bytes(4) + data[28:92] + bytes(4) + data[96:]
            digests[str(path.relative_to(top))] = hashlib.sha256(data).hexdigest()
    return digests


# --- what reads what -------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One input file, the format-specific damage it gets, and the commands that read it.

    Commands are ``msmt`` command lines (``shlex`` words), run in the world; the
    first also gets the format-specific variants.
    """

    path: str  # relative to the world; a "*" matches a key's kid
    kind: str  # json, toml, sqlite, wal, text
    commands: tuple[str, ...]
    other: str = "keys/roster.json"  # a file of another kind, for "other-kind"
    structural: int = 6  # keys/paths given wrong types


JPN = "--config nodes/JPN/node.toml"
VERIFY = "audit verify data/JPN --keys keys"
RESEND = f"node resend {JPN} --to USA --since 2026-01-01T00:00:00Z"
REPORT = "extra/report.ndjson"
EXPLAIN = f"policy explain --member JPN --policy nodes/JPN/policy.toml --report {REPORT}"
NKEY = "UAGXPJHEXI4CPGLLQFOD2THMVLNMV23RQPNF4Z6WGOJ4MLHIJ4UCCOKC"
SLOTS: tuple[Slot, ...] = (
    Slot(
        "nodes/JPN/node.toml",
        "toml",
        (
            f"status {JPN}",
            f"inbox list {JPN}",
            f"feeds list {JPN}",
            f"export stix {JPN} --out extra/out.json",
            RESEND,
            f"submit {JPN} {REPORT}",
            f"node run {JPN}",
        ),
        other="nodes/JPN/policy.toml",
        structural=8,
    ),
    Slot(
        "nodes/JPN/policy.toml",
        "toml",
        (
            "policy check nodes/JPN/policy.toml",
            EXPLAIN,
            f"policy explain {JPN} --report {REPORT}",
            f"node run {JPN}",
        ),
        other="nodes/JPN/node.toml",
        structural=4,
    ),
    Slot(
        "keys/roster.json",
        "json",
        (
            "keys verify-roster --dir keys",
            f"status {JPN}",
            f"inbox check {JPN}",
            VERIFY,
            "keys rotate JPN --dir keys",
            "audit verify data/JPN --roster keys/roster.json",
        ),
        other="keys/roster-authority.json",
    ),
    Slot(
        "keys/roster.json.jws",
        "text",
        (
            "keys verify-roster --dir keys",
            f"inbox check {JPN}",
            "keys revoke JPN-sig-x --reason r --dir keys",
        ),
    ),
    Slot(
        "keys/roster-authority.json",
        "json",
        (
            "keys verify-roster --dir keys",
            f"inbox check {JPN}",
            VERIFY,
            "keys rotate JPN --dir keys",
        ),
    ),
    Slot(
        "keys/authority/roster-authority.jwk",
        "json",
        ("keys rotate JPN --dir keys", "keys accept extra/req.json --dir keys"),
    ),
    Slot(
        "keys/nats-users.json",
        "json",
        (
            f"keys accept-nats-user JPN {NKEY} --dir keys",
            "nats config --keys keys --authority keys/roster-authority.json --out extra/hub.conf",
            f"node check {JPN}",  # a copy beside the roster: the seed compared with it
        ),
    ),
    Slot(
        "keys/nats-users.json.jws",
        "text",
        (
            "nats config --keys keys --authority keys/roster-authority.json --out extra/hub.conf",
            "keys sign-nats-users --dir keys",
            f"node check {JPN}",
        ),
    ),
    Slot(
        "keys/JPN/JPN-sig-*.jwk",
        "json",
        (
            f"inbox check {JPN}",
            "keys request JPN --dir keys --out extra/req2.json",
            f"node run {JPN}",
        ),
    ),
    Slot("keys/JPN/JPN-enc-*.jwk", "json", (f"inbox check {JPN}", f"node run {JPN}")),
    Slot(
        "keys/JPN/nats.nk",
        "text",
        (f"inbox check {JPN}", "keys request JPN --dir keys --out extra/req2.json"),
    ),
    Slot("keys/JPN/pseudonym/pk1.key", "text", ("keys pseudonym JPN pk1 --dir keys",)),
    Slot("extra/pk1.key", "text", ("keys pseudonym USA pk9 --dir keys --from-file extra/pk1.key",)),
    Slot("extra/req.json", "json", ("keys accept extra/req.json --dir keys",)),
    Slot(
        "data/JPN/roster-state.json",
        "json",
        (f"status {JPN}", f"inbox check {JPN}", f"node run {JPN}"),
    ),
    Slot(
        "data/JPN/witness-state.json",
        "json",
        (
            "audit verify data/USA --keys keys --witness-state data/JPN/witness-state.json",
            f"node run {JPN}",
        ),
    ),
    Slot("extra/known.note", "text", (f"{VERIFY} --known extra/known.note",)),
    Slot("extra/prove.json", "json", (f"{VERIFY} --known extra/prove.json",)),
    Slot(
        "extra/witnesses.txt",
        "text",
        (f"{VERIFY} --cosigned --quorum 1 --witnesses extra/witnesses.txt",),
    ),
    Slot("extra/f1.token", "text", (f"submit {JPN} --token-file extra/f1.token {REPORT}",)),
    Slot("data/JPN/intake.token", "text", (f"submit {JPN} {REPORT}",)),
    Slot(
        "data/JPN/intake-feeds.json",
        "json",
        (
            f"feeds list {JPN}",
            f"feeds add f2 {JPN} --out extra/f2.token",
            f"feeds revoke f1 {JPN}",
        ),
    ),
    Slot("extra/report.ndjson", "json", (f"validate {REPORT}", EXPLAIN, f"submit {JPN} {REPORT}")),
    Slot(
        "extra/evidence.json",
        "json",
        ("audit evidence extra/evidence.json --log data/USA --keys keys",),
    ),
    Slot(
        "data/JPN/audit/audit.sqlite",
        "sqlite",
        (
            VERIFY,
            "audit prove data/JPN --entry 1",
            "audit entries data/JPN --keys keys",
            "audit replay data/JPN data/USA --keys keys --policies nodes",
            f"status {JPN}",
            f"inbox check {JPN}",
        ),
        other="data/USA/node.sqlite3",
    ),
    # The node first: a read-write open writes a -wal into its database.
    Slot("data/JPN/audit/audit.sqlite-wal", "wal", (f"node run {JPN}", VERIFY, f"status {JPN}")),
    Slot(
        "data/JPN/node.sqlite3",
        "sqlite",
        (
            f"status {JPN}",
            f"inbox list {JPN}",
            f"export stix {JPN} --out extra/out.json",
            f"inbox check {JPN}",
            RESEND,
            f"feeds list {JPN}",
        ),
        other="data/JPN/audit/audit.sqlite",
    ),
    Slot(
        "data/JPN/node.sqlite3-wal",
        "wal",
        (f"node run {JPN}", f"status {JPN}", f"inbox list {JPN}"),
    ),
)
"""Each input file and the commands that read it."""


def cases_for(slot: Slot, original: bytes, quick: bool) -> Iterator[tuple[str, Damage, list[str]]]:
    """(variant, its damage, the command it is tried with) for one slot."""
    generic = generic_variants(slot.other)
    specific: dict[str, Damage] = {}
    if slot.kind == "json":
        first_line = original.split(b"\n", 1)[0] if slot.path.endswith(".ndjson") else original
        specific = json_variants(first_line, 0 if quick else slot.structural)
    elif slot.kind == "toml":
        specific = toml_variants(original, 0 if quick else slot.structural)
    elif slot.kind == "sqlite":
        specific = sqlite_variants(original)
    elif slot.kind == "wal":
        specific = wal_variants()
    for command in slot.commands:
        for name, damage in generic.items():
            yield name, damage, shlex.split(command)
    for name, damage in specific.items():
        yield name, damage, shlex.split(slot.commands[0])


# --- arguments and environment ----------------------------------------------

NL = "bad\nmsmt: error: forged line"
BIG = str(2**70)
SINCE = f"node resend {JPN} --to USA --since"
NATS_CONFIG = "nats config --keys keys --authority keys/roster-authority.json --out extra/h.conf"
NATS_SETUP = "nats setup --keys keys --account JPN"
ARGUMENT_CASES: tuple[tuple[str, str], ...] = (
    # {NL} is a newline and a forged second line; {ESC} a terminal escape; {BIG} 2**70.
    ("config path with a newline", "status --config {NL}/node.toml"),
    ("config path with ESC", "status --config x{ESC}[31mred/node.toml"),
    ("config path empty", "status --config ''"),
    ("config in a missing dir", "status --config no/such/dir/node.toml"),
    ("validate newline path", "validate {NL}.ndjson"),
    ("submit newline path", f"submit {JPN} {{NL}}.ndjson"),
    ("policy check newline path", "policy check {NL}.toml"),
    ("audit verify newline dir", "audit verify {NL} --keys keys"),
    ("audit verify known newline", f"{VERIFY} --known {{NL}}"),
    ("keys dir newline", "keys verify-roster --dir {NL}"),
    ("export out newline dir", f"export stix {JPN} --out {{NL}}/x.json"),
    ("export out in missing dir", f"export stix {JPN} --out no/such/x.json"),
    ("export out is a dir", f"export stix {JPN} --out extra"),
    ("inbox limit 0", f"inbox list {JPN} --limit 0"),
    ("inbox limit 2**70", f"inbox list {JPN} --limit {{BIG}}"),
    ("inbox from bogus", f"inbox list {JPN} --from XXX"),
    ("inbox from newline", f"inbox list {JPN} --from {{NL}}"),
    ("inbox show bad id", f"inbox show {JPN} {{NL}}"),
    ("inbox show empty id", f"inbox show {JPN} ''"),
    ("inbox evidence long id", f"inbox evidence {JPN} {'x' * 100_000}"),
    ("prove entry 2**70", "audit prove data/JPN --entry {BIG}"),
    ("prove entry -1", "audit prove data/JPN --entry -1"),
    ("prove checkpoint 2**70", "audit prove data/JPN --entry 1 --checkpoint {BIG}"),
    ("prove checkpoint 0", "audit prove data/JPN --entry 1 --checkpoint 0"),
    ("entries type bogus", "audit entries data/JPN --keys keys --type bogus"),
    ("log-key garbage", "audit verify data/JPN --log-key x+y+z"),
    ("log-key newline", "audit verify data/JPN --log-key {NL}"),
    ("replay no policies dir", "audit replay data/JPN --keys keys --policies no/such"),
    ("replay same dir twice", "audit replay data/JPN data/JPN --keys keys --policies nodes"),
    ("resend since bad", f"{SINCE} yesterday"),
    ("resend since no zone", f"{SINCE} 2026-01-01T00:00:00"),
    ("resend since +25:00", f"{SINCE} 2026-01-01T00:00:00+25:00"),
    ("resend since month 13", f"{SINCE} 2026-13-01T00:00:00Z"),
    ("resend since year 0", f"{SINCE} 0000-01-01T00:00:00Z"),
    ("resend since year 9999 west", f"{SINCE} 9999-12-31T23:59:59-23:59"),
    ("resend since year 1 east", f"{SINCE} 0001-01-01T00:00:00+01:00"),
    ("resend since newline", f"{SINCE} {{NL}}"),
    ("resend until before since", f"{SINCE} 2026-02-01T00:00:00Z --until 2026-01-01T00:00:00Z"),
    ("resend to self", f"node resend {JPN} --to JPN --since 2026-01-01T00:00:00Z"),
    ("resend to empty", f"node resend {JPN} --to '' --since 2026-01-01T00:00:00Z"),
    ("resend report bad", f"node resend {JPN} --to USA --report {{NL}}"),
    ("export since bad", f"export stix {JPN} --since 2026-02-30T00:00:00Z"),
    ("export since no zone", f"export stix {JPN} --since 2026-01-01"),
    ("export since year 1 east", f"export stix {JPN} --since 0001-01-01T00:00:00+14:00"),
    ("export since year 9999 west", f"export stix {JPN} --since 9999-12-31T23:59:59-14:00"),
    ("samples count 0", "samples generate --count 0"),
    ("samples seed 2**70", "samples generate --count 1 --seed {BIG}"),
    ("samples seed -1", "samples generate --count 1 --seed -1"),
    ("samples originators bogus", "samples generate --count 1 --originators XXX,"),
    ("samples originators empty", "samples generate --count 1 --originators ''"),
    ("keys init valid-days -1", "keys init --dir extra/k2 --valid-days -1"),
    ("keys init valid-days 2**70", "keys init --dir extra/k2 --valid-days {BIG}"),
    ("keys init members empty", "keys init --dir extra/k2 --members ''"),
    ("keys init members bogus", "keys init --dir extra/k2 --members JPN,XXX"),
    ("keys init existing", "keys init --dir keys"),
    ("keys rotate bogus", "keys rotate XXX --dir keys"),
    ("keys rotate valid-days 10**6", "keys rotate JPN --dir keys --valid-days 1000000"),
    ("keys revoke unknown", "keys revoke JPN-sig-nope --reason x --dir keys"),
    ("keys revoke reason newline", "keys revoke JPN-sig-nope --reason {NL} --dir keys"),
    ("keys revoke reason empty", "keys revoke JPN-sig-nope --reason '' --dir keys"),
    ("keys pseudonym id traversal", "keys pseudonym JPN ../../x --dir keys"),
    ("keys pseudonym id newline", "keys pseudonym JPN {NL} --dir keys"),
    ("keys nats-user bogus", "keys nats-user XXX --dir keys"),
    ("keys accept-nats-user bad nkey", "keys accept-nats-user JPN Uxyz --dir keys"),
    (
        "keys accept fingerprint bad",
        "keys accept extra/req.json --dir keys --fingerprint sha256:zz",
    ),
    ("feeds add name newline", f"feeds add {{NL}} {JPN}"),
    ("feeds add name empty", f"feeds add '' {JPN}"),
    ("feeds add name long", f"feeds add {'a' * 10_000} {JPN}"),
    ("feeds add out missing dir", f"feeds add f3 {JPN} --out no/such/f3.token"),
    ("feeds add out newline", f"feeds add f3 {JPN} --out {{NL}}.token"),
    ("feeds revoke unknown", f"feeds revoke nope {JPN}"),
    ("nats config cluster 10", f"{NATS_CONFIG} --cluster 10"),
    ("nats config route-host newline", f"{NATS_CONFIG} --cluster 3 --route-host {{NL}}{{i}}"),
    ("nats config store-dir quote", f"{NATS_CONFIG} --store-dir 'x\"{{NL}}'"),
    ("nats config listen bogus", f"{NATS_CONFIG} --listen nope"),
    ("nats config listen newline", f"{NATS_CONFIG} --listen 0.0.0.0:4222{{NL}}"),
    ("nats config http bogus", f"{NATS_CONFIG} --http x:y"),
    ("nats setup server garbage", f"{NATS_SETUP} --server garbage"),
    ("nats setup server dead port", f"{NATS_SETUP} --server nats://127.0.0.1:1"),
    ("nats setup account bogus", "nats setup --keys keys --account XXX"),
    ("nats setup max-age nan", f"{NATS_SETUP} --max-age-days nan"),
    ("nats setup max-age inf", f"{NATS_SETUP} --max-age-days inf"),
    ("nats setup max-bytes -1", f"{NATS_SETUP} --max-bytes -1"),
    ("nats setup tls-ca missing", f"{NATS_SETUP} --server tls://127.0.0.1:1 --tls-ca no/such"),
    ("nats setup tls-ca not PEM", f"{NATS_SETUP} --server tls://127.0.0.1:1 --tls-ca {REPORT}"),
    ("node run log-level bogus", f"node run {JPN} --log-level LOUD"),
    ("policy explain member bogus", f"policy explain --member XXX --report {REPORT}"),
    ("policy check no files", "policy check"),
    ("policy check a dir", "policy check nodes"),
    ("audit verify quorum 0", f"{VERIFY} --cosigned --quorum 0"),
    ("audit verify quorum 11", f"{VERIFY} --cosigned --quorum 11"),
    ("audit verify jobs 0", f"{VERIFY} --jobs 0"),
    ("audit evidence no log", "audit evidence extra/evidence.json --keys keys"),
    ("schemas export out is file", f"schemas export --out {REPORT}"),
    ("demo sightings 0", "demo --sightings 0"),
)
"""Arguments out of range, empty, with control characters, naming nothing."""

ENV_CASES: tuple[tuple[str, str], ...] = tuple(
    (name, value)
    for name, values in {
        "MSMT_FETCH_BATCH": ("", " ", "abc", "-1", "0", BIG, "1e3", "\uff10"),  # fullwidth 0
        "MSMT_MAX_RECORD_BYTES": ("-0", BIG, "nan"),
        "MSMT_FRESHNESS_SECONDS": ("inf", "-1"),
        "MSMT_HOLD_SECONDS": ("9" * 5000,),
        "MSMT_SENDER_BYTES_PER_DAY": ("0", "65536", "1099511627777", "1 GiB"),
        "MSMT_NATS_URLS": ("", ",,,", "http://x", "nats://a\nb"),
        "MSMT_METRICS_LISTEN": ("", "0.0.0.0:1", "[::1]:99999", "localhost:"),
        "MSMT_MEMBER": ("", "XXX", "jpn", "USA"),
        "MSMT_DATA_DIR": ("", "/nonexistent/x", NL),
        "MSMT_BASE_DIR": ("", "/proc/self/fd/0"),
        "MSMT_KEY_DIR": ("/dev/null",),
        "MSMT_POLICY": ("/dev/zero", "nodes"),
        "MSMT_INTAKE_SHARED_TOKEN": ("yes", "TRUE", ""),
        "MSMT_INTAKE_SOCKET": ("x" * 200,),
    }.items()
    for value in values
)
"""``MSMT_*`` overrides that do not parse or name nothing useful (``msmt status`` reads them)."""


def argument_words(command: str) -> list[str]:
    """``command``'s words, with ``{NL}``, ``{ESC}`` and ``{BIG}`` put in each."""
    return [
        word.replace("{NL}", NL).replace("{ESC}", "\x1b").replace("{BIG}", BIG)
        for word in shlex.split(command)
    ]


MEMORY_LIMIT = 2 << 30
"""Address space a command may take: /dev/zero read as a config must not take the machine's."""


def as_nobody(argv: list[str]) -> list[str]:
    """``argv`` with its memory capped, run as nobody when this script is root."""
    limit = ["/usr/bin/prlimit", f"--as={MEMORY_LIMIT}", "--"]
    if os.geteuid() != 0:
        return [*limit, *argv]
    # prlimit first: run as nobody, it cannot exec the venv's interpreter.
    nobody = ["/usr/bin/setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    return [*limit, *nobody, *argv]


# --- running and judging ----------------------------------------------------


@dataclass
class Case:
    """One command run against one damaged world; the result's class once run."""

    slot: str
    variant: str
    argv: list[str]
    env: dict[str, str]
    rc: int | None = None
    stderr: str = ""
    stdout: str = ""
    seconds: float = 0.0
    changed: list[str] | None = None
    verdict: str = ""


WORKER_DENIED = (
    "msmt: error: cannot start the planning worker: Permission denied\n",
    "Permission denied: '" + str(MSMT.parent / "python"),  # before it was one line
)
"""A node's start that passed its checks, as nobody, up to its worker's exec."""

WARNERS = {"node check": "not compared with "}
"""Commands that go on past a damaged file they only compare with: their words for it."""

REPORTERS = ("validate", "policy check", "submit", "node resend")
"""Commands whose documented exit 1 may come with lines of their own (per record, per file)."""


def classify(case: Case) -> str:
    """The class of a finished case (module docstring)."""
    command = " ".join(case.argv[1:3])
    lines = case.stderr.strip("\n").split("\n") if case.stderr.strip() else []
    verdict = "refused"
    if case.rc is None and case.slot == REPORT and case.variant in ("fifo", "dev-zero"):
        verdict = "stream"  # NDJSON read from a pipe, or without end: until its end, by design
    elif case.rc is None:
        verdict = "hang"
    elif any(words in case.stderr for words in WORKER_DENIED):
        # The node's planning worker, started as nobody, cannot exec the venv's
        # interpreter where it lives under /root: the node had passed its checks.
        verdict = "accepted"
    elif "Traceback" in case.stderr:
        verdict = "traceback"
    elif case.rc == 0 and command in WARNERS and WARNERS[command] in case.stdout:
        verdict = "warned"
    elif case.rc == 0:
        verdict = "accepted"
    elif case.rc == 2 and "\nTry 'msmt " in case.stderr:
        verdict = "usage"  # click's own usage error: three lines and exit 2, by design
    elif case.rc not in (1, 2):
        verdict = "exit"
    elif case.changed:
        verdict = "state"
    elif len(lines) != 1 and not command.startswith(REPORTERS):
        verdict = "lines"
    elif not lines and not case.stdout.strip():
        verdict = "lines"  # a failure that says nothing
    return verdict


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    # The head keeps "Traceback", the tail the exception: a deep one is long.
    return text if len(text) <= 4000 else text[:1000] + " [...] " + text[-3000:]


def execute(world: Path, argv: list[str], env: dict[str, str]) -> tuple[int | None, str, str]:
    """Run ``argv`` in ``world``: (exit status, or None on a hang; stderr; stdout).

    A node that starts (``node_started``) is stopped with SIGTERM at once: with
    no hub it would run on, as it should, and that is no hang.
    """
    full_env = {"PATH": os.environ["PATH"], "HOME": str(world), "LANG": "C.UTF-8", **env}
    if CODE is not None:
        full_env["PYTHONPATH"] = str(CODE)
    start = time.monotonic()
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            as_nobody(argv),
            cwd=world,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        rc: int | None = None
        while time.monotonic() - start < TIMEOUT:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = proc.wait(timeout=0.2)
                break
            err.seek(0)
            if b'"node_started"' in err.read():
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=TIMEOUT)
                rc = 0
                break
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err.seek(0)
        out.seek(0)
        return rc, _tail(err.read()), _tail(out.read(20_000))


def run_case(
    pristine: Path,
    scratch: Path,
    where: tuple[str, str],
    damage: Damage | None,
    words: list[str],
    env: dict[str, str],
) -> Case:
    """Restore the world, damage ``where``'s slot file, run ``msmt WORDS``; the judged case."""
    world = scratch / "w"
    subprocess.run(["/bin/rm", "-rf", str(world)], check=True)
    subprocess.run(["/bin/cp", "-a", str(pristine), str(world)], check=True)
    slot, variant = where
    target = world / slot
    if damage is not None:
        original = target.read_bytes() if target.is_file() else b""
        if not target.exists():
            target.touch()
        damage(target, original)
        with contextlib.suppress(OSError):
            os.lchown(target, NOBODY, NOBODY)
    before = tree_digest(world, target)
    case = Case(slot, variant, [str(MSMT), *words], env)
    case.rc, case.stderr, case.stdout = execute(world, case.argv, env)
    after = tree_digest(world, target)
    case.changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    case.verdict = classify(case)
    return case


# --- driver -----------------------------------------------------------------

Job = tuple[tuple[str, str], Damage | None, list[str], dict[str, str]]


def plan(pristine: Path, wanted: list[str], variants: list[str], quick: bool) -> list[Job]:
    """Every case chosen by ``--only`` and ``--variant`` (all without them), not yet run."""

    def chosen(name: str) -> bool:
        return not wanted or any(w in name for w in wanted)

    def damaged(name: str) -> bool:
        return not variants or any(v in name for v in variants)

    jobs: list[Job] = []
    for pattern in SLOTS:
        slot = pattern
        if "*" in pattern.path:  # a key file, named by its kid
            found = sorted(pristine.glob(pattern.path))
            slot = replace(pattern, path=str(found[0].relative_to(pristine)))
        if chosen(slot.path):
            target = pristine / slot.path
            original = target.read_bytes() if target.is_file() else b""
            for variant, damage, words in cases_for(slot, original, quick):
                if damaged(variant):
                    jobs.append(((slot.path, variant), damage, words, {}))
    if chosen("args"):
        for label, command in ARGUMENT_CASES:
            jobs.append((("args", label), None, argument_words(command), {}))
    if chosen("env"):
        for name, value in ENV_CASES:
            jobs.append(
                (
                    ("env", f"{name}={value!r}"[:60]),
                    None,
                    shlex.split(f"status {JPN}"),
                    {name: value},
                )
            )
    return jobs


def run_all(top: Path, pristine: Path, jobs: list[Job], parallel: int) -> list[Case]:
    """Run the jobs, ``parallel`` at a time, each in a scratch world of its own."""
    free = [top / f"s{i}" for i in range(parallel)]
    for scratch in free:
        scratch.mkdir()

    def work(job: Job) -> Case:
        scratch = free.pop()  # list.pop and append are atomic under the GIL
        try:
            return run_case(pristine, scratch, *job)
        finally:
            free.append(scratch)

    results: list[Case] = []
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        for case in pool.map(work, jobs):
            results.append(case)
            if len(results) % 100 == 0:
                print(f"... {len(results)} of {len(jobs)}", flush=True)
            if case.verdict not in ("refused", "usage", "stream", "warned"):
                last = (case.stderr.strip().splitlines() or [""])[-1][:160]
                where = f"{case.slot} [{case.variant}] {' '.join(case.argv[1:3])}"
                print(f"{case.verdict:9} rc={case.rc} {where}: {last!r}", flush=True)
    return results


def main() -> None:
    """Parse the options, build the world, run every chosen case, print the summary."""
    global CODE, TIMEOUT  # noqa: PLW0603 - settings for the whole run
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Generic damage only.")
    parser.add_argument(
        "--only", action="append", default=[], help="Slot paths containing this; 'args', 'env'."
    )
    parser.add_argument(
        "--variant", action="append", default=[], help="Damage whose name contains this."
    )
    parser.add_argument("--world", type=Path, help="A directory 'msmt demo --keep' made.")
    parser.add_argument("--jobs", type=int, default=2, help="Cases run at a time.")
    parser.add_argument("--out", type=Path, help="Write every case as NDJSON here.")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="Seconds before a hang.")
    parser.add_argument("--code", type=Path, help="Run the commands on this checkout's broker/.")
    args = parser.parse_args()
    stop_on_sigterm()
    CODE = None if args.code is None else args.code.resolve()
    TIMEOUT = args.timeout
    if not MSMT.exists():
        sys.exit(f"{MSMT} is missing: run 'make .venv/.installed' first")
    top = Path(tempfile.mkdtemp(prefix="msmt-inputs-"))
    top.chmod(0o755)
    try:
        demo = args.world
        if demo is None:
            demo = top / "demo"
            run_msmt(["demo", "--sightings", "12", "--keep", str(demo)], ROOT)
        pristine = top / "pristine"
        build_world(demo, pristine)
        jobs = plan(pristine, args.only, args.variant, args.quick)
        print(f"{len(jobs)} cases, {args.jobs} at a time", flush=True)
        results = run_all(top, pristine, jobs, args.jobs)
    finally:
        subprocess.run(["/bin/rm", "-rf", str(top)], check=False)
    verdicts = Counter(c.verdict for c in results)
    commands = {" ".join(c.argv[1:3]) for c in results}
    print(
        f"\n{len(results)} runs ({len(commands)} commands); "
        + ", ".join(f"{k} {n}" for k, n in verdicts.most_common())
    )
    if args.out:
        with args.out.open("w") as out:
            for case in results:
                out.write(json.dumps(asdict(case)) + "\n")
    sys.exit(1 if any(verdicts[k] for k in FAILING) else 0)


if __name__ == "__main__":
    main()
