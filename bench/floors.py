"""Floors the benchmarks measure in the same run: bare crypto and raw JetStream messaging.

A floor is the least work the same job needs, done with the libraries our code
is built on and nothing else, so ``ours / floor`` says how much our own code
(and joserfc) costs on top, on whatever machine the benchmark runs.

* ``CryptoFloor``: per report, 1 Ed25519 sign; per partner, X25519 keygen +
  ECDH + Concat KDF + AES-KW wrap + AES-256-GCM encrypt; per delivery, ECDH +
  KDF + unwrap + GCM decrypt + 1 Ed25519 verify; all through ``cryptography``
  directly, on the same byte sizes as our envelopes, in a tight loop.
* ``publish_floor`` / ``pull_floor``: a bare nats-py client publishes payloads
  of the same sizes to the member inboxes with ``Nats-Msg-Id`` and bounded
  pipelining, and pulls them back through the same durable consumers with
  explicit acks.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

from broker import keys
from broker.natsconfig import inbox_durable, inbox_stream
from broker.natsetup import connect_account


def kdf(z: bytes) -> bytes:
    """RFC 7518 §4.6.2 Concat KDF for ECDH-ES+A256KW (empty PartyUInfo/PartyVInfo)."""
    other = b"\x00\x00\x00\x0eECDH-ES+A256KW" + b"\x00" * 8 + (256).to_bytes(4, "big")
    return ConcatKDFHash(hashes.SHA256(), 32, other).derive(z)


class CryptoFloor:
    """The bare primitives for one report sent to ``partners`` and received by each.

    ``data`` is the presentation (plaintext) of one envelope, ``aad`` its JWE
    protected header, ``signing_input`` the JWS signing input: the sizes matter
    (GCM and SHA-512 are linear in them), the contents do not.
    """

    def __init__(self, data: bytes, aad: bytes, signing_input: bytes, partners: int = 10) -> None:
        self.data, self.aad, self.signing_input = data, aad, signing_input
        self.ed = Ed25519PrivateKey.generate()
        self.ed_pub = self.ed.public_key()
        self.x_priv = [X25519PrivateKey.generate() for _ in range(partners)]
        self.x_pub = [k.public_key() for k in self.x_priv]
        eph = X25519PrivateKey.generate()
        self.cek, self.iv = os.urandom(32), os.urandom(12)
        self.wrapped = aes_key_wrap(kdf(eph.exchange(self.x_pub[0])), self.cek)
        self.sealed = AESGCM(self.cek).encrypt(self.iv, data, aad)
        self.signature = self.ed.sign(signing_input)
        self.eph_pub = eph.public_key()

    def send(self) -> None:
        """Sign once, then wrap and encrypt for every partner."""
        self.ed.sign(self.signing_input)
        for pub in self.x_pub:
            eph = X25519PrivateKey.generate()
            kek = kdf(eph.exchange(pub))
            cek, iv = os.urandom(32), os.urandom(12)
            aes_key_wrap(kek, cek)
            AESGCM(cek).encrypt(iv, self.data, self.aad)

    def receive_one(self) -> None:
        """One partner's share: unwrap, decrypt, verify."""
        kek = kdf(self.x_priv[0].exchange(self.eph_pub))
        AESGCM(aes_key_unwrap(kek, self.wrapped)).decrypt(self.iv, self.sealed, self.aad)
        self.ed_pub.verify(self.signature, self.signing_input)

    def report(self) -> None:
        """Everything one report costs: the send side plus every partner's receive."""
        self.send()
        for _ in self.x_pub:
            self.receive_one()

    def rate(self, fn: Callable[[], None], seconds: float = 1.0, rounds: int = 3) -> float:
        """Calls per CPU second of ``fn``: the best of ``rounds`` runs of about ``seconds``."""
        best = 0.0
        for _ in range(rounds):
            count, start = 0, time.process_time()
            while (spent := time.process_time() - start) < seconds:
                for _ in range(10):
                    fn()
                count += 10
            best = max(best, count / spent)
        return best


async def publish_floor(
    url: str, keydir: Path, sender: str, subjects: Sequence[str], sizes: Sequence[int], window: int
) -> float:
    """Seconds to publish one payload per ``(subject, size)`` with at most ``window`` unacked."""
    seed = (keydir / sender / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(url, sender, seed)
    js = nc.jetstream()
    sem = asyncio.Semaphore(window)
    payloads = {n: b"x" * n for n in set(sizes)}
    tag = os.urandom(4).hex()

    async def one(i: int, subject: str, size: int) -> None:
        async with sem:
            # An ack that times out on a loaded machine is asked for again: the same
            # Nats-Msg-Id, so the hub stores the payload once whatever happened.
            for attempt in range(10):
                try:
                    await js.publish(
                        subject, payloads[size], headers={"Nats-Msg-Id": f"floor-{tag}-{i}"}
                    )
                except TimeoutError:
                    if attempt == 9:
                        raise
                else:
                    return

    start = time.perf_counter()
    await asyncio.gather(
        *(one(i, s, n) for i, (s, n) in enumerate(zip(subjects, sizes, strict=True)))
    )
    elapsed = time.perf_counter() - start
    await nc.close()
    return elapsed


STALL_S = 120.0
"""Seconds a floor puller waits for its next message before it gives up."""


async def pull_floor(
    url: str, keydir: Path, members: Sequence[str], each: int, batch: int
) -> float:
    """Seconds for every member to pull and ack ``each`` messages through its inbox consumer."""

    async def drain(member: str) -> None:
        seed = (keydir / member / keys.NATS_SEED_FILE).read_bytes().strip()
        nc = await connect_account(url, member, seed)
        js = nc.jetstream()
        sub = await js.pull_subscribe_bind(
            durable=inbox_durable(member), stream=inbox_stream(member)
        )
        got = 0
        # A fetch that times out is a slow moment (the publisher behind, a loaded
        # machine), not the end: the floor comes last in a long run, and an
        # exception here lost everything measured before it. Only a stall ends it.
        stalled_since = time.monotonic()
        while got < each:
            try:
                msgs = await sub.fetch(min(batch, each - got), timeout=10.0)
            except TimeoutError:  # nats-py raises its own or asyncio's, by where it waited
                if time.monotonic() - stalled_since > STALL_S:
                    raise RuntimeError(
                        f"messaging floor: {member} got {got} of {each} messages,"
                        f" then nothing for {STALL_S:.0f} s"
                    ) from None
                continue
            stalled_since = time.monotonic()
            for msg in msgs:
                await msg.ack()
            got += len(msgs)
        await nc.flush()
        await nc.close()

    start = time.perf_counter()
    await asyncio.gather(*(drain(m) for m in members))
    return time.perf_counter() - start
