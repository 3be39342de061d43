"""Mutual TLS to the hub: a private CA and client certificates, against a real nats-server.

The hub's ``tls`` block demands a client certificate (``verify: true``). A node
with its CA, certificate and key becomes ready and delivers; one without the
certificate, or trusting another CA, keeps retrying with a one-line reason; a
bad TLS setting stops ``msmt node run`` at start with one line naming it; and
``msmt nats setup`` follows the same rules.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from node_world import MSMT, World, fetch, msmt, readyz, records_for, wait_for, write_node_config

from broker import keys, keys_custodian
from broker.natsconfig import accounts_config
from broker.natsetup import setup_account
from broker.natsproc import NatsServer
from broker.natstls import CLI_NAMES, client_tls_context
from broker.natsusers import load_users

pytestmark = pytest.mark.integration

MEMBERS = ("JPN", "USA")
ACCOUNTS = (*MEMBERS, keys.AUDIT_ACCOUNT)
# JPN releases everything to USA alone: the roster here holds only these two members.
JPN_POLICY = """
version = 1
member = "JPN"

[[rules]]
name = "usa"
kinds = ["*"]
partners = ["USA"]
release = ["*"]
"""


# --- a throwaway PKI ----------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A PEM certificate file and its PEM private-key file."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Pair:
    pair = Pair(folder / f"{stem}.pem", folder / f"{stem}-key.pem")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pair.key.chmod(0o600)  # as an operator keeps it; the node refuses a key others can read
    return pair


def _issue(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
    shift: timedelta = timedelta(0),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA (``issuer`` None, self-signed) or a leaf certificate signed by ``issuer``.

    Valid from an hour ago for a day, moved by ``shift`` (to make one expired or not yet valid).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC).replace(microsecond=0) + shift
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        return builder.sign(key, hashes.SHA256()), key
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer[1], hashes.SHA256()), key


@dataclass(frozen=True)
class Pki:
    """The hub's CA, its server certificate, two client certificates, and an unrelated CA."""

    ca: Path
    server: Pair
    jpn: Pair
    usa: Pair
    other_ca: Path
    expired: Pair
    not_yet_valid: Pair


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A throwaway PKI under ``tmp_path/pki``."""
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = _issue("msmt test CA", None)
    other = _issue("someone else's CA", None)
    return Pki(
        ca=_write(folder, "ca", *ca).cert,
        server=_write(folder, "server", *_issue("hub", ca, server=True)),
        jpn=_write(folder, "jpn", *_issue("JPN node", ca)),
        usa=_write(folder, "usa", *_issue("USA node", ca)),
        other_ca=_write(folder, "other-ca", *other).cert,
        expired=_write(folder, "expired", *_issue("JPN node", ca, shift=-timedelta(days=2))),
        not_yet_valid=_write(folder, "future", *_issue("JPN node", ca, shift=timedelta(days=2))),
    )


# --- a hub that demands client certificates -----------------------------------------------


@dataclass
class TlsWorld:
    """Keys for JPN and USA, a hub with ``tls { verify: true }``, and the node world around it."""

    world: World
    pki: Pki

    @property
    def url(self) -> str:
        """The hub's ``tls://`` URL (its certificate names 127.0.0.1)."""
        return f"tls://127.0.0.1:{self.world.server.port}"

    def write_config(
        self,
        member: str,
        *,
        ca: Path | None,
        pair: Pair | None,
        url: str | None = None,
        **extra: Path,
    ) -> Path:
        """Write ``member``'s node folder against the hub, with these TLS files (and keys)."""
        write_node_config(
            self.world.root, member, [url or self.url], JPN_POLICY if member == "JPN" else None
        )
        files = {"ca_file": ca} | (
            {} if pair is None else {"cert_file": pair.cert, "key_file": pair.key}
        )
        lines = "".join(
            f"{key} = {json.dumps(str(path))}\n"
            for key, path in (files | extra).items()
            if path is not None
        )
        path = self.world.config_path(member)
        path.write_text(path.read_text().replace("[nats]\n", "[nats]\n" + lines, 1))
        return path

    def launch(self, member: str) -> subprocess.Popen[bytes]:
        """Start ``member``'s ``msmt node run`` without waiting for it to become ready."""
        log = (self.world.root / f"{member}.log").open("ab")
        proc = subprocess.Popen(
            [MSMT, "node", "run", "--config", str(self.world.config_path(member))],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.world.procs[member] = proc
        return proc


@pytest.fixture
def tls_world(tmp_path: Path, pki: Pki) -> Iterator[TlsWorld]:
    """A hub demanding client certificates, with JPN's, USA's and AUDIT's streams set up."""
    keydir = tmp_path / "keys"
    keys_custodian.init_keys(keydir, MEMBERS, now=datetime.now(UTC) - timedelta(days=1))
    tls_block = (
        "tls {\n"
        f"  cert_file: {json.dumps(str(pki.server.cert))}\n"
        f"  key_file: {json.dumps(str(pki.server.key))}\n"
        f"  ca_file: {json.dumps(str(pki.ca))}\n"
        "  verify: true\n"
        "  timeout: 2\n"
        "}\n"
    )
    server = NatsServer(
        workdir=tmp_path / "nats", extra_config=accounts_config(load_users(keydir)) + tls_block
    )
    server.start()
    w = TlsWorld(World(tmp_path, keydir, server), pki)
    try:
        context = client_tls_context([w.url], pki.ca, pki.jpn.cert, pki.jpn.key, CLI_NAMES)

        async def setup() -> None:
            for account in ACCOUNTS:
                seed = (keydir / account / keys.NATS_SEED_FILE).read_bytes().strip()
                await setup_account(w.url, account, seed, tls=context)

        asyncio.run(setup())
        yield w
    finally:
        for member in list(w.world.procs):
            w.world.kill(member)
        server.kill()


def status(config: Path) -> dict[str, object]:
    """``msmt status --json`` of the node ``config`` describes."""
    done = msmt("status", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


# --- nodes ----------------------------------------------------------------------------


async def test_nodes_with_client_certificates_become_ready_and_deliver(
    tls_world: TlsWorld,
) -> None:
    pki, world = tls_world.pki, tls_world.world
    tls_world.write_config("JPN", ca=pki.ca, pair=pki.jpn)
    tls_world.write_config("USA", ca=pki.ca, pair=pki.usa)
    world.start("JPN")
    world.start("USA")
    records = records_for("JPN", 1, seed=7)
    answers = await world.submit("JPN", records)
    assert [a["status"] for a in answers] == ["accepted"]
    wait_for(
        lambda: world.inbox_ids("USA", "JPN") == [records[0]["report_id"]],
        30,
        "USA to store JPN's report",
    )
    # The certificate's end of validity is on /metrics, to alert on before it lapses.
    expires = x509.load_pem_x509_certificate(pki.jpn.cert.read_bytes()).not_valid_after_utc
    page = fetch(f"http://127.0.0.1:{world.config('JPN').metrics.port}/metrics")
    gauge = 'msmt_credential_expiry_timestamp_seconds{credential="tls_certificate"} '
    values = [float(line.removeprefix(gauge)) for line in page.splitlines() if gauge in line]
    assert values == [expires.timestamp()], page


def _refused(tls_world: TlsWorld, reason: str, hub: NatsServer | None = None) -> None:
    """JPN's node keeps retrying ``hub`` (the TLS one), never ready, ``reason`` in its status."""
    config = tls_world.world.config_path("JPN")
    store = tls_world.world.config("JPN").store_path
    proc = tls_world.launch("JPN")
    port = tls_world.world.config("JPN").metrics.port
    wait_for(
        lambda: store.exists() and reason in str(status(config)["last_error"]),
        30,
        f"JPN's status to say {reason!r}",
    )
    answer = status(config)
    error = str(answer["last_error"])
    # The first connect fails (node) or nats-py's error callback reports it (nats).
    assert error.startswith(("cannot connect to NATS: ", "nats: ")), error
    assert "\n" not in error
    assert answer["connected"] == "no"
    assert not readyz(port)
    assert proc.poll() is None, tls_world.world.log_tail("JPN")
    log = tls_world.world.log_tail("JPN")
    assert "Traceback" not in log
    assert reason in log
    # The hub is retried every half second; one persisting reason is logged once a minute.
    logged = (tls_world.world.root / "JPN.log").read_text().count('"node_error"')
    hub = hub or tls_world.world.server
    dialled = _connections(hub)
    time.sleep(4)
    assert (tls_world.world.root / "JPN.log").read_text().count('"node_error"') == logged
    assert proc.poll() is None
    # Retried indeed (an onboarding trial: after a certificate it refused, the node's
    # first connect waited for ever on nats-py's close, and never tried again).
    assert _connections(hub) > dialled


def _connections(hub: NatsServer) -> int:
    """How many connections ``hub`` has taken since it started (its /varz)."""
    varz = json.loads(fetch(f"http://127.0.0.1:{hub.http_port}/varz"))
    return int(varz["total_connections"])


def test_a_node_without_a_client_certificate_is_refused_and_keeps_retrying(
    tls_world: TlsWorld,
) -> None:
    tls_world.write_config("JPN", ca=tls_world.pki.ca, pair=None)
    _refused(tls_world, "certificate required")


def test_a_node_trusting_another_ca_refuses_the_hub_and_keeps_retrying(
    tls_world: TlsWorld,
) -> None:
    tls_world.write_config("JPN", ca=tls_world.pki.other_ca, pair=tls_world.pki.jpn)
    _refused(tls_world, "certificate verify failed")


@pytest.fixture
def plain_hub(tls_world: TlsWorld) -> Iterator[NatsServer]:
    """A second hub with the same accounts that does not offer TLS at all."""
    world = tls_world.world
    plain = NatsServer(
        workdir=world.root / "plain",
        extra_config=accounts_config(load_users(world.keydir)),
    )
    plain.start()
    try:
        yield plain
    finally:
        plain.kill()


def test_a_node_refuses_a_hub_that_offers_plaintext_on_its_tls_url(
    tls_world: TlsWorld, plain_hub: NatsServer
) -> None:
    # nats-py would carry on in plaintext here, ignoring the CA and the certificate.
    url = f"tls://127.0.0.1:{plain_hub.port}"
    tls_world.write_config("JPN", ca=tls_world.pki.ca, pair=tls_world.pki.jpn, url=url)
    _refused(tls_world, "did not offer TLS on a tls:// URL", plain_hub)
    config = tls_world.world.config_path("JPN")
    assert "refusing to go on in plaintext" in str(status(config)["last_error"])
    # JPN reached the plaintext server but sent it nothing: no CONNECT, no nkey.
    connz = json.loads(fetch(f"http://127.0.0.1:{plain_hub.http_port}/connz?state=all"))
    assert connz["total"] > 0
    assert [c["in_bytes"] for c in connz["connections"]] == [0] * connz["total"], connz


# --- bad settings stop the node at start ----------------------------------------------


def _open_copy(key: Path) -> Path:
    copy = key.with_name(f"open-{key.name}")
    copy.write_bytes(key.read_bytes())
    copy.chmod(0o644)
    return copy


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("cert without key", "config key nats.key_file: required when nats.cert_file is set"),
        ("key without cert", "config key nats.cert_file: required when nats.key_file is set"),
        ("missing key file", "config key nats.key_file: cannot read "),
        ("non-PEM CA", "config key nats.ca_file: "),
        ("non-PEM cert", "config key nats.cert_file: "),
        ("another's key", "config key nats.key_file: "),
        ("key open to others", "config key nats.key_file: TLS key "),
        ("expired cert", "config key nats.cert_file: the certificate in "),
        ("cert not yet valid", "config key nats.cert_file: the certificate in "),
        ("nats:// URL", "config key nats.urls: 'nats://127.0.0.1:"),
    ],
)
def test_a_bad_tls_setting_stops_the_node_at_start_with_one_line(
    tls_world: TlsWorld, case: str, message: str
) -> None:
    pki = tls_world.pki
    policy = tls_world.world.root / "nodes" / "JPN" / "policy.toml"
    nats_url = f"nats://127.0.0.1:{tls_world.world.server.port}"
    written = {
        "cert without key": lambda: tls_world.write_config(
            "JPN", ca=pki.ca, pair=None, cert_file=pki.jpn.cert
        ),
        "key without cert": lambda: tls_world.write_config(
            "JPN", ca=None, pair=None, key_file=pki.jpn.key
        ),
        "missing key file": lambda: tls_world.write_config(
            "JPN", ca=pki.ca, pair=Pair(pki.jpn.cert, pki.jpn.key.with_name("gone.pem"))
        ),
        "non-PEM CA": lambda: tls_world.write_config("JPN", ca=policy, pair=pki.jpn),
        "non-PEM cert": lambda: tls_world.write_config(
            "JPN", ca=pki.ca, pair=Pair(policy, pki.jpn.key)
        ),
        "another's key": lambda: tls_world.write_config(
            "JPN", ca=pki.ca, pair=Pair(pki.jpn.cert, pki.usa.key)
        ),
        "nats:// URL": lambda: tls_world.write_config("JPN", ca=pki.ca, pair=pki.jpn, url=nats_url),
        "key open to others": lambda: tls_world.write_config(
            "JPN", ca=pki.ca, pair=Pair(pki.jpn.cert, _open_copy(pki.jpn.key))
        ),
        "expired cert": lambda: tls_world.write_config("JPN", ca=pki.ca, pair=pki.expired),
        "cert not yet valid": lambda: tls_world.write_config(
            "JPN", ca=pki.ca, pair=pki.not_yet_valid
        ),
    }
    config = written[case]()
    done = msmt("node", "run", "--config", str(config), timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"msmt: error: {message}"), done.stderr
    if case == "expired cert":
        assert re.search(r" expired at 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ$", done.stderr)
    if case == "cert not yet valid":
        assert re.search(r" is not valid before 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ$", done.stderr)
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout


# --- msmt nats setup --------------------------------------------------------------------


def test_nats_setup_uses_the_ca_and_client_certificate(tls_world: TlsWorld) -> None:
    pki, world = tls_world.pki, tls_world.world
    base = ["nats", "setup", "--server", tls_world.url, "--keys", str(world.keydir)]
    base += ["--account", "JPN", "--tls-ca", str(pki.ca)]
    done = msmt(*base, "--tls-cert", str(pki.jpn.cert), "--tls-key", str(pki.jpn.key))
    assert done.returncode == 0, done.stderr
    assert "stream INBOX_JPN: unchanged" in done.stdout
    # Nothing on stderr: asyncio warned at every TLS close (nats-py's start_tls), and
    # cron mails whatever a job prints (a review of msmt nats usage).
    assert done.stderr == ""
    usage = ["nats", "usage", *base[2:], "--tls-cert", str(pki.jpn.cert)]
    used = msmt(*usage, "--tls-key", str(pki.jpn.key), "--quiet")
    assert (used.returncode, used.stdout, used.stderr) == (0, "", "")

    refused = msmt(*base)
    assert refused.returncode == 2, refused.stdout
    assert refused.stderr.startswith(f"msmt: error: cannot connect to {tls_world.url} as JPN: "), (
        refused.stderr
    )
    # The hub's alert, or (when the reset overtakes it) the hint at a missing certificate.
    assert re.search("certificate required|demands a client certificate", refused.stderr)
    assert refused.stderr.count("\n") == 1, refused.stderr

    half = msmt(*base, "--tls-cert", str(pki.jpn.cert))
    assert half.returncode == 2
    assert half.stderr == "msmt: error: --tls-key: required when --tls-cert is set\n"

    plain = f"nats://127.0.0.1:{world.server.port}"
    # Without --tls-*, a nats:// URL to this hub: nats-py tries TLS against the system's
    # CAs, and the line says what to give (a trial got the certificate error alone).
    bare = msmt("nats", "setup", "--server", plain, "--keys", str(world.keydir), "--account", "JPN")
    assert bare.returncode == 2
    assert bare.stderr.rstrip().endswith(
        "(the hub requires TLS: give a tls:// URL and its CA with --tls-ca)"
    ), bare.stderr
    downgraded = msmt(*base[:2], "--server", plain, *base[4:])
    assert downgraded.returncode == 2
    assert downgraded.stderr.startswith(f"msmt: error: --server: '{plain}' is not a tls:// URL")


def test_nats_setup_refuses_a_hub_it_cannot_verify_within_seconds(tls_world: TlsWorld) -> None:
    # An onboarding trial: against a hub certificate it refused (another CA, a wrong host
    # name, expired), setup hung for good: nats-py's close after the failed TLS upgrade
    # waited for a stream that would never say it closed. provision.sh would hang too.
    pki, world = tls_world.pki, tls_world.world
    began = time.monotonic()
    done = msmt(
        *["nats", "setup", "--server", tls_world.url, "--keys", str(world.keydir)],
        *["--account", "JPN", "--tls-ca", str(pki.other_ca)],
        *["--tls-cert", str(pki.jpn.cert), "--tls-key", str(pki.jpn.key)],
        timeout=60,
    )
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith(f"msmt: error: cannot connect to {tls_world.url} as JPN: ")
    assert "certificate verify failed" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert time.monotonic() - began < 30  # two tries of the 5 s connect timeout, and a start


def test_nats_setup_refuses_a_plaintext_server_on_a_tls_url(
    tls_world: TlsWorld, plain_hub: NatsServer
) -> None:
    url = f"tls://127.0.0.1:{plain_hub.port}"
    done = msmt(
        "nats", "setup", "--server", url, "--keys", str(tls_world.world.keydir), "--account", "JPN"
    )
    assert done.returncode == 2, done.stdout
    assert done.stderr == (
        f"msmt: error: cannot connect to {url} as JPN: nats: 127.0.0.1:{plain_hub.port} "
        "did not offer TLS on a tls:// URL; refusing to go on in plaintext\n"
    )
