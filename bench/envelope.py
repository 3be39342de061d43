"""Benchmark the envelope against the bare cryptography it is built from.

    python bench/envelope.py [--quick]

Per report: issue (one Ed25519 signature) + present to 10 partners (10 JWEs).
Per presentation: receive (decrypt, verify, every checklist step), both for the
report with every field released as observed and for the same report with its
position released coarsened (``vessel.position#coarsen:0.5`` instead of
``vessel.position``; the floor and joserfc columns are those of the first,
whose sizes differ by a few bytes). Beside each,
the floor measured in the same run: the same primitives called directly through
``cryptography`` on the same sizes (1 Ed25519 sign + 10 x (X25519 keygen + ECDH +
Concat KDF + AES-KW + AES-256-GCM); 1 ECDH + KDF + unwrap + GCM decrypt + 1
verify). It also times joserfc alone on the same headers (a reference line:
the envelope used joserfc for its JWE and JWS until it moved to the fixed
profile in ``broker.jose``), to show what a general JOSE library costs on the
same work. Goal: ratio <= 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from floors import CryptoFloor
from joserfc import jwe, jws
from joserfc.jwk import OKPKey
from joserfc.registry import HeaderParameter

from broker import envelope, sdjwt
from broker.members import MEMBERS
from broker.roster import Roster, format_time
from broker.samples import example_records
from broker.sightings import SIGHTING_ADAPTER, leaf_values
from broker.transforms import Transform, variant_key

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
ORIGIN = "JPN"
COARSEN = Transform.parse("coarsen:0.5")
COARSE_KEY = variant_key("vessel.position", COARSEN)
PARTNERS = [m for m in MEMBERS if m != ORIGIN]  # 10 partners


def best(fns: list[Callable[[], Any]], number: int, repeat: int) -> list[float]:
    """Seconds per call of each function: the best of ``repeat`` runs of ``number`` calls.

    The functions take turns within each round, so a burst of load on a shared
    machine hits all of them alike instead of skewing one ratio; and the clock
    is this process's CPU time, so time spent descheduled is not counted.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.process_time()
            for _ in range(number):
                fn()
            times[i].append((time.process_time() - start) / number)
    return [min(t) for t in times]


def world() -> tuple[dict[str, OKPKey], dict[str, OKPKey], Roster]:
    sig = {m: OKPKey.generate_key("Ed25519") for m in MEMBERS}
    enc = {m: OKPKey.generate_key("X25519") for m in MEMBERS}
    keys = []
    for m in MEMBERS:
        for use, key in (("sig", sig[m]), ("enc", enc[m])):
            keys.append(
                {
                    **key.as_dict(private=False),
                    "kid": f"{m}-{use}",
                    "use": use,
                    "msmt_member": m,
                    "msmt_status": "active",
                    "msmt_valid_from": format_time(NOW - timedelta(days=30)),
                    "msmt_valid_until": format_time(NOW + timedelta(days=30)),
                }
            )
    return sig, enc, Roster.from_jwks({"keys": keys})


class Setup:
    """One originator, 10 partners, one sighting issued with every field released."""

    def __init__(self) -> None:
        self.sig, self.enc, self.roster = world()
        self.sighting = SIGHTING_ADAPTER.validate_json(json.dumps(example_records()["vessel"]))
        self.pubs = {m: self.roster.public_key(f"{m}-enc") for m in PARTNERS}
        self.sample = self.issue()
        self.keys = list(self.sample.disclosures)
        self.tokens = self.issue_and_present()
        self.token = self.tokens[PARTNERS.index("USA")]
        # The report also issued with its position coarsened, as a partner whose
        # policy coarsens the position receives it: the variant instead of the
        # exact position, every other field as before.
        position = leaf_values(self.sighting)["vessel.position"]
        variant = COARSEN.apply(position, pseudonym_keys={}, path="vessel.position")
        coarse = self.issue({COARSE_KEY: variant})
        self.coarse_keys = [k for k in self.keys if k != "vessel.position"] + [COARSE_KEY]
        self.coarse_token = self.present(coarse, self.coarse_keys, "USA")
        plaintext = sdjwt.join_presentation(
            self.sample.jws, [self.sample.disclosures[k] for k in self.keys]
        )
        self.data = envelope.padded([plaintext])[0]  # as encrypted, with its padding
        self.signing_input = self.sample.jws.rsplit(".", 1)[0].encode()
        self.header_b64 = self.token.split(".", 1)[0].encode()

    def issue(self, variants: dict[str, Any] | None = None) -> envelope.Issued:
        return envelope.issue(
            self.sighting,
            signing_key=self.sig[ORIGIN],
            kid=f"{ORIGIN}-sig",
            policy_digest="p",
            variants=variants or {},
            now=NOW,
        )

    def present(self, issued: envelope.Issued, keys: list[str], partner: str) -> str:
        return envelope.present(
            issued,
            disclosure_keys=keys,
            recipient=partner,
            recipient_kid=f"{partner}-enc",
            recipient_key=self.pubs[partner],
        )

    def issue_and_present(self) -> list[str]:
        # In one call, as the node's planner does: the envelopes are padded together.
        issued = self.issue()
        return envelope.present_all(
            issued,
            [envelope.Recipient(m, f"{m}-enc", self.pubs[m], self.keys) for m in PARTNERS],
        )

    def receive(self) -> envelope.Received:
        return self.receive_token(self.token)

    def receive_coarse(self) -> envelope.Received:
        return self.receive_token(self.coarse_token)

    def receive_token(self, token: str) -> envelope.Received:
        return envelope.receive(
            token,
            me="USA",
            decryption_keys={"USA-enc": self.enc["USA"]},
            roster=self.roster,
            attested_sender=ORIGIN,
            now=NOW,
            max_age=timedelta(days=1),
            max_skew=timedelta(minutes=5),
            is_replay=lambda jti: False,
        )


class _Registry(jwe.JWERegistry):
    # joserfc caps ciphertext at 64 KiB; the envelope's own limit is larger.
    max_ciphertext_length = envelope.MAX_ENVELOPE_BYTES


# What the envelope passed to joserfc before broker.jose: our header members, our algorithms.
JOSERFC_REGISTRY = _Registry(
    header_registry={
        name: HeaderParameter(name, "str")
        for name in (envelope.HDR_FROM, envelope.HDR_TO, envelope.HDR_RID)
    },
    algorithms=[envelope.KEY_ALG, envelope.CONTENT_ENC],
)


def bare(setup: Setup) -> tuple[Callable[[], None], Callable[[], None]]:
    """The floor: the same primitives on the same sizes, through cryptography directly."""
    floor = CryptoFloor(setup.data, setup.header_b64, setup.signing_input, len(PARTNERS))
    return floor.send, floor.receive_one


def jose_only(setup: Setup) -> tuple[Callable[[], None], Callable[[], None]]:
    """joserfc alone on the same headers and sizes: what the JOSE layer costs by itself."""
    header = json.loads(sdjwt.b64u_decode(setup.header_b64.decode()))
    header.pop("epk")
    registry = JOSERFC_REGISTRY
    verify_key = setup.roster.public_key(f"{ORIGIN}-sig")

    def send() -> None:
        jws.serialize_compact(
            {"alg": "Ed25519", "typ": envelope.TYP, "kid": "k"},
            setup.signing_input,
            setup.sig[ORIGIN],
            algorithms=["Ed25519"],
        )
        for m in PARTNERS:
            jwe.encrypt_compact(dict(header), setup.data, setup.pubs[m], registry=registry)

    def receive() -> None:
        jwe.decrypt_compact(setup.token, setup.enc["USA"], registry=registry)
        jws.deserialize_compact(setup.sample.jws, verify_key, algorithms=["Ed25519"])

    return send, receive


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    number, repeat = (10, 5) if args.quick else (50, 30)
    setup = Setup()
    setup.receive()
    assert COARSE_KEY in setup.receive_coarse().fields
    bare_send, bare_receive = bare(setup)
    jose_send, jose_receive = jose_only(setup)
    rows = [
        ("issue + present to 10", setup.issue_and_present, bare_send, jose_send, number),
        ("receive (per presentation)", setup.receive, bare_receive, jose_receive, number * 5),
        (
            "receive, position coarsened",
            setup.receive_coarse,
            bare_receive,
            jose_receive,
            number * 5,
        ),
    ]
    print(
        f"report: {len(setup.keys)} disclosures, plaintext {len(setup.data)} B,"
        f" JWE {len(setup.token)} B; best of {repeat} runs"
    )
    print(
        f"{'operation':28} {'envelope':>10} {'bare':>10} {'ratio':>6} {'joserfc':>10} {'ratio':>6}"
    )
    for name, ours_fn, bare_fn, jose_fn, n in rows:
        ours, floor, jose = best([ours_fn, bare_fn, jose_fn], n, repeat)
        print(
            f"{name:28} {ours * 1e6:8.0f}us {floor * 1e6:8.0f}us {ours / floor:5.2f}x"
            f" {jose * 1e6:8.0f}us {jose / floor:5.2f}x"
        )
    print("goal: envelope / bare <= 2.00x (joserfc column: the JOSE library alone)")


if __name__ == "__main__":
    main()
