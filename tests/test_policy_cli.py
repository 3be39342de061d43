"""``msmt policy check`` and ``msmt policy explain``, through the real click group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from broker import keys_custodian, samples
from broker.cli import main
from broker.members import MEMBERS
from broker.policy import load_policy
from broker.validation import parse_record

ROOT = Path(__file__).parent.parent
POLICIES = [str(ROOT / "nodes" / m / "policy.toml") for m in MEMBERS]


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def write_report(tmp_path: Path, **changes: Any) -> Path:
    rec = {**samples.example_records()["vessel"], "tlp": "AMBER", **changes}
    rec.pop("rel_to", None) if "rel_to" not in changes else None
    path = tmp_path / "report.json"
    path.write_text(json.dumps(rec, indent=2))
    return path


def test_check_passes_every_example_policy_with_one_line_each() -> None:
    result = run("policy", "check", *POLICIES)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(MEMBERS)
    for member, path, line in zip(MEMBERS, POLICIES, lines, strict=True):
        digest = load_policy(Path(path).read_text(), member=member).digest
        assert line.startswith(f"{path}: ok: {member}, ")
        assert line.endswith(f"digest {digest}")


def test_check_reports_file_line_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text(
        'version = 1\nmember = "JPN"\n\n[[rules]]\nkinds = ["vessel"]\n'
        'partners = ["USA", "ASEAN"]\nrelease = ["vessel.colour"]\n'
    )
    result = run("policy", "check", POLICIES[0], str(bad))
    assert result.exit_code == 1
    assert f"{bad}:6: unknown partner or group 'ASEAN'" in result.output
    assert f"{bad}:7: unknown field path 'vessel.colour'" in result.output
    assert f"{POLICIES[0]}: ok: JPN" in result.output
    assert "Traceback" not in result.output


def test_check_exits_2_for_an_unreadable_file(tmp_path: Path) -> None:
    result = run("policy", "check", str(tmp_path / "missing.toml"), POLICIES[1])
    assert result.exit_code == 2
    assert "cannot read policy" in result.output
    assert f"{POLICIES[1]}: ok: USA" in result.output


def test_check_reports_invalid_toml_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text('version = 1\nmember = "JPN"\n[[rules]\n')
    result = run("policy", "check", str(bad))
    assert result.exit_code == 1
    assert result.output.startswith(f"{bad}:3: not valid TOML: ")


def test_a_bare_cr_in_a_policy_is_refused_not_read_as_a_line_end(tmp_path: Path) -> None:
    # A review: a CR alone ended KOR's comment, so the next words became a release rule
    # that msmt policy check passed, while tomllib and every TOML tool refuse the file.
    text = Path(POLICIES[0]).read_text()
    first_comment = text.index("#")
    end = text.index("\n", first_comment)
    bad = tmp_path / "policy.toml"
    bad.write_bytes((text[:end] + "\r" + text[end + 1 :]).encode())
    line = text[:end].count("\n") + 1
    result = run("policy", "check", str(bad))
    assert result.exit_code == 1
    assert result.output == f"{bad}:{line}: not valid TOML: Found invalid character '\\r'\n"
    crlf = tmp_path / "crlf.toml"  # CR LF line ends are fine, as before
    crlf.write_bytes(text.replace("\n", "\r\n").encode())
    assert run("policy", "check", str(crlf)).exit_code == 0


def test_explain_table_shows_every_partner_and_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    report = write_report(tmp_path)
    result = run("policy", "explain", "--member", "JPN", "--report", str(report))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("partner"))
    assert header.split() == [
        "partner", "sent", "observed_at", "source.sensor", "source.platform",
        "source.collection_method", "source.confidence", "imo", "mmsi", "name", "flag",
        "position", "activity",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines if line[:3] in MEMBERS and "  " in line}
    assert set(rows) == set(MEMBERS) - {"JPN"}
    assert rows["USA"][1:] == ["yes"] + ["released"] * 11
    assert rows["DEU"][1:4] == ["yes", "hour", "withheld"]
    assert rows["DEU"][11] == "coarsen:0.5"
    assert rows["GBR"][11] == "coarsen:1"
    assert "  USA  -" in lines
    assert (
        "  DEU  default deny: source.sensor, source.platform, source.collection_method, "
        "source.confidence"
    ) in lines
    red = run(
        "policy", "explain", "--member", "JPN", "--report", str(write_report(tmp_path, tlp="RED"))
    )
    assert red.exit_code == 0, red.output
    # Fields some rule would release are withheld by the marking; the rest by default.
    assert (
        "  FRA  TLP:RED: observed_at, imo, mmsi, name, flag, position, activity; "
        "default deny: source.sensor, source.platform, source.collection_method, "
        "source.confidence"
    ) in red.output.splitlines()
    assert (
        "digest " + load_policy((ROOT / "nodes/JPN/policy.toml").read_text(), member="JPN").digest
        in result.output
    )


def test_explain_json_matches_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    report = write_report(tmp_path, tlp="RED", originator="USA")
    policy_path = ROOT / "nodes/USA/policy.toml"
    result = run(
        "policy", "explain", "--member", "USA", "--report", str(report), "--json",
        "--policy", str(policy_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    policy = load_policy(policy_path.read_text(), member="USA")
    sighting = parse_record(report.read_text())
    decisions = policy.decide_all(sighting)
    assert data["policy_digest"] == policy.digest
    assert data["tlp"] == "RED"
    assert set(data["partners"]) == set(decisions)
    for partner, decision in decisions.items():
        entry = data["partners"][partner]
        assert entry["sent"] == decision.sends
        assert entry["withheld"] == dict(decision.withheld)
        assert {p: (r["rule"], r["transform"]) for p, r in entry["released"].items()} == {
            p: (r.rule, None if r.transform is None else r.transform.ident)
            for p, r in decision.released.items()
        }
    assert data["partners"]["GBR"]["sent"] is True
    assert data["partners"]["GBR"]["released"]["vessel.imo"]["rule"] == "red-vessels-to-gbr"
    assert data["partners"]["CAN"] == {
        "sent": False,
        "released": {},
        "withheld": dict.fromkeys(decisions["CAN"].withheld, "TLP:RED"),
    }


def test_explain_flags_pseudonyms_the_partner_holds_the_key_of(tmp_path: Path) -> None:
    # KOR holds jk and can test guesses against its pseudonyms; GBR cannot.
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'version = 1\nmember = "JPN"\n[pseudonym_keys.jk]\npartners = ["KOR"]\n'
        '[[rules]]\nkinds = ["vessel"]\npartners = ["KOR", "GBR"]\n'
        'release = ["vessel.imo", "observed_at"]\n'
        'transforms = { "vessel.imo" = "pseudonym:jk" }\n'
    )
    report = write_report(tmp_path, originator="JPN")
    args = (
        "policy",
        "explain",
        "--member",
        "JPN",
        "--report",
        str(report),
        "--policy",
        str(policy),
    )
    table = run(*args)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    imo = next(line for line in lines if line.startswith("partner")).split().index("imo")
    rows = {line.split()[0]: line.split() for line in lines if line[:3] in MEMBERS}
    assert rows["KOR"][imo] == "pseudonym:jk*"
    assert rows["GBR"][imo] == "pseudonym:jk"
    assert "* the partner holds this pseudonym key: it can test guesses" in table.output
    data = json.loads(run(*args, "--json").output)["partners"]
    assert data["KOR"]["released"]["vessel.imo"]["partner_holds_key"] is True
    assert data["GBR"]["released"]["vessel.imo"]["partner_holds_key"] is False
    assert data["GBR"]["released"]["observed_at"]["partner_holds_key"] is None


def test_explain_reads_the_first_ndjson_record(tmp_path: Path) -> None:
    records = samples.generate(6, seed=2, originators=("KOR",))
    feed = tmp_path / "feed.ndjson"
    feed.write_text(samples.to_ndjson(records))
    result = run(
        "policy", "explain", "--member", "KOR", "--report", str(feed), "--json",
        "--policy", str(ROOT / "nodes/KOR/policy.toml"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["report_id"] == records[0]["report_id"]


def test_explain_takes_a_record_of_the_largest_size_the_node_takes(tmp_path: Path) -> None:
    # A feed trial: a one-record file of exactly 65,536 bytes and its newline, which the
    # node accepts and msmt validate passes, was refused by explain as "record is 65537
    # bytes": the file's line end was counted as part of the record.
    rec = {**samples.example_records()["vessel"], "tlp": "AMBER"}
    text = json.dumps(rec)
    text = text[:-1] + " " * (65536 - len(text.encode())) + "}"  # JSON allows the spaces
    assert len(text.encode()) == 65536
    policy = str(ROOT / "nodes/JPN/policy.toml")
    for ending in ("\n", "\n\n", ""):
        report = tmp_path / "report.json"
        report.write_bytes((text + ending).encode())
        result = run("policy", "explain", "--member", "JPN", "--report", str(report),
                     "--policy", policy, "--json")  # fmt: skip
        assert result.exit_code == 0, (ending, result.output)
        assert json.loads(result.output)["report_id"] == rec["report_id"]
    over = tmp_path / "over.json"
    over.write_bytes((text[:-1] + " }\n").encode())
    result = run("policy", "explain", "--member", "JPN", "--report", str(over), "--policy", policy)
    assert result.exit_code == 1
    assert "record is 65537 bytes; limit 65536" in result.output


def test_explain_refuses_a_report_it_did_not_originate_unless_onward(tmp_path: Path) -> None:
    report = write_report(tmp_path, originator="KOR", tlp="AMBER+STRICT")
    policy = str(ROOT / "nodes/JPN/policy.toml")
    args = ["policy", "explain", "--member", "JPN", "--report", str(report), "--policy", policy]
    refused = run(*args)
    assert refused.exit_code == 2
    assert "originated by KOR; add --onward" in refused.output
    onward = run(*args, "--onward", "--json")
    assert onward.exit_code == 0, onward.output
    partners = json.loads(onward.output)["partners"]
    assert "KOR" not in partners
    assert not any(p["sent"] for p in partners.values())
    assert set(partners["USA"]["withheld"].values()) == {"TLP:AMBER+STRICT is never passed on"}


def test_explain_bad_inputs_give_one_line(tmp_path: Path) -> None:
    policy = str(ROOT / "nodes/JPN/policy.toml")
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "vessel"}')
    result = run("policy", "explain", "--member", "JPN", "--report", str(bad), "--policy", policy)
    assert result.exit_code == 1
    assert result.output.startswith(f"msmt: error: {bad}: not a valid sighting")
    missing = run(
        "policy", "explain", "--member", "JPN", "--report", str(bad),
        "--policy", str(tmp_path / "none.toml"),
    )  # fmt: skip
    assert missing.exit_code == 2
    assert "cannot read policy" in missing.output
    wrong = run(
        "policy", "explain", "--member", "USA", "--report", str(bad), "--policy", policy,
    )  # fmt: skip
    assert wrong.exit_code == 2
    assert "this is JPN's policy, not USA's" in wrong.output


def test_explain_outside_the_repository_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default policy path is relative: run elsewhere, it says so and how to go on.
    report = write_report(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = run("policy", "explain", "--member", "JPN", "--report", str(report))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "msmt: error: no policy at nodes/JPN/policy.toml (the default, relative to the "
        "current directory): give --policy FILE or --config NODE_TOML\n"
    )


def test_explain_with_config_uses_the_nodes_member_and_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from anywhere: the node's config names its member and policy file.
    folder = tmp_path / "nodes" / "JPN"
    folder.mkdir(parents=True)
    (folder / "policy.toml").write_text(
        'version = 1\nmember = "JPN"\n[[rules]]\nkinds = ["vessel"]\npartners = ["NZL"]\n'
        'release = ["vessel.imo"]\n'
    )
    config = folder / "node.toml"
    config.write_text(
        'member = "JPN"\nbase_dir = "../.."\npolicy = "nodes/JPN/policy.toml"\n'
        'data_dir = "data/JPN"\n[nats]\nurls = ["nats://127.0.0.1:4222"]\n[keys]\ndir = "keys"\n'
    )
    report = write_report(tmp_path)
    monkeypatch.chdir(ROOT)  # where nodes/JPN/policy.toml is the repository's example
    result = run("policy", "explain", "--config", str(config), "--report", str(report), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [p for p, d in data["partners"].items() if d["sent"]] == ["NZL"]
    wrong = run(
        "policy", "explain", "--config", str(config), "--member", "USA", "--report", str(report)
    )
    assert (wrong.exit_code, wrong.stderr) == (
        2,
        f"msmt: error: --member USA, but {config} is JPN's node\n",
    )
    neither = run("policy", "explain", "--report", str(report))
    assert (neither.exit_code, neither.stderr) == (2, "msmt: error: give --member or --config\n")


def test_msmt_policy_check_runs_as_a_program() -> None:
    msmt = Path(sys.executable).with_name("msmt")
    proc = subprocess.run(
        [str(msmt), "policy", "check", *POLICIES],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": ok: ") == len(MEMBERS)


def test_explain_with_config_names_partners_the_roster_has_no_key_for(tmp_path: Path) -> None:
    # A departure review: explain said "sent yes" for a suspended member, whose share
    # waits (awaiting_key) until it is back.
    keys_custodian.init_keys(tmp_path / "keys", MEMBERS)
    folder = tmp_path / "nodes" / "JPN"
    folder.mkdir(parents=True)
    (folder / "policy.toml").write_text(
        'version = 1\nmember = "JPN"\n[[rules]]\nkinds = ["vessel"]\npartners = ["NZL", "USA"]\n'
        'release = ["vessel.imo"]\n'
    )
    config = folder / "node.toml"
    config.write_text(
        'member = "JPN"\nbase_dir = "../.."\npolicy = "nodes/JPN/policy.toml"\n'
        'data_dir = "data/JPN"\n[nats]\nurls = ["nats://127.0.0.1:4222"]\n[keys]\ndir = "keys"\n'
    )
    report = write_report(tmp_path)
    args = ("policy", "explain", "--config", str(config), "--report", str(report))
    before = run(*args)
    assert before.exit_code == 0, before.output
    assert "no valid key" not in before.stdout
    keys_custodian.suspend_member(tmp_path / "keys", "NZL")
    after = run(*args)
    assert after.exit_code == 0, after.output
    assert after.stdout.endswith(
        "\nno valid key in the node's roster:\n  NZL  NZL has no active enc key valid now: what"
        " is released to it waits until it has one (msmt status: awaiting_key)\n"
    )
    rows = [line.split()[:2] for line in after.stdout.splitlines() if line[:4] in ("NZL ", "USA ")]
    assert rows[:2] == [["USA", "yes"], ["NZL", "yes"]]  # the table as before: the policy's
    (tmp_path / "keys" / "roster.json").write_text("{}")
    unread = run(*args)
    assert unread.exit_code == 0, unread.output
    assert "\nroster not read (" in unread.stdout
    assert unread.stdout.endswith("whether each partner has a key is not shown\n")
