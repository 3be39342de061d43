"""TLS for a client's NATS connection: a private CA and a client certificate (mutual TLS).

A node (``node.toml``'s ``nats.ca_file``, ``nats.cert_file``, ``nats.key_file``) and
``msmt nats setup`` (``--tls-ca``, ``--tls-cert``, ``--tls-key``) share these rules,
each failing with one line that names the key or option at fault:

1. ``cert`` and ``key`` come together or not at all;
2. once any of the three is set, every server URL is ``tls://`` (nats-py connects
   in plaintext to a ``nats://`` server that does not demand TLS, and would then
   silently ignore the certificate);
3. each file exists, is readable and is PEM of the right kind (certificates in
   ``ca`` and ``cert``, an unencrypted private key in ``key``), and ``key`` is not
   open to other users (``broker.keys.check_private_file``);
4. the key belongs to the first certificate of ``cert``;
5. that certificate is within its validity period now (the hub would refuse it,
   and the node would only retry).

The context keeps hostname checking and ``CERT_REQUIRED`` and refuses anything
older than TLS 1.2. Without ``ca`` it trusts the system store, as before.

``broker.natsclient.TlsOnlyClient`` closes the gap rule 2 cannot. This module
imports no NATS client, so a command that only reads ``node.toml`` (``msmt
status``) does not load one.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from broker.errors import ConfigError, KeyMaterialError
from broker.files import read_file_bytes
from broker.keys import check_private_file
from broker.roster import format_time


class TlsNames(NamedTuple):
    """How errors name the URLs and the three files (config keys or command-line options)."""

    urls: str
    ca: str
    cert: str
    key: str


CONFIG_NAMES = TlsNames(
    "config key nats.urls",
    "config key nats.ca_file",
    "config key nats.cert_file",
    "config key nats.key_file",
)
"""Names for ``node.toml``'s ``[nats]`` keys."""

CLI_NAMES = TlsNames("--server", "--tls-ca", "--tls-cert", "--tls-key")
"""Names for ``msmt nats setup``'s options."""


def check_tls_settings(
    urls: Sequence[str],
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    names: TlsNames,
) -> None:
    """Check rules 1 and 2 (no file is read); raise ``ConfigError`` naming the culprit.

    A ``tls://`` URL is refused outright if this nats-py lacks the hook
    ``TlsOnlyClient`` overrides: the refusal of a plaintext server would silently
    never run, so failing here is the closed way.
    """
    if any(url.startswith("tls://") for url in urls):
        # Imported only here: nats-py and the aiohttp it loads are ~0.3 s that a
        # command reading node.toml for other reasons (msmt status) would pay.
        from broker import natsclient  # noqa: PLC0415

        if not natsclient.plaintext_refusal_hooked():
            raise ConfigError(
                f"{names.urls}: nats-py {natsclient.nats_version()} has no "
                "Client._process_info(info, initial_connection), which msmt needs to refuse "
                "a tls:// server offering plaintext; install the nats-py version "
                "pyproject.toml names"
            )
    if cert is not None and key is None:
        raise ConfigError(f"{names.key}: required when {_bare(names.cert)} is set")
    if key is not None and cert is None:
        raise ConfigError(f"{names.cert}: required when {_bare(names.key)} is set")
    if ca is None and cert is None:
        return
    for url in urls:
        if not url.startswith("tls://"):
            raise ConfigError(
                f"{names.urls}: {url!r} is not a tls:// URL, but TLS files are set "
                "(a nats:// connection may stay plaintext and ignore them)"
            )


def client_tls_context(
    urls: Sequence[str],
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    names: TlsNames,
) -> ssl.SSLContext | None:
    """The context to connect with, or ``None`` when no file is set (system defaults).

    Checks every rule above; raises ``ConfigError`` with one line naming the
    key or option at fault, so a bad file stops the caller before it connects.
    """
    check_tls_settings(urls, ca, cert, key, names)
    if ca is None and cert is None:
        return None
    if ca is not None:
        _certificates(ca, names.ca)
    try:
        context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{names.ca}: {ca} is not a usable CA bundle ({_reason(exc)})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # create_default_context sets both already; say so, so no later edit loosens them unseen.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if cert is not None and key is not None:
        leaf = _certificates(cert, names.cert)[0]
        private = _private_key(key, names.key)
        if _spki(leaf.public_key()) != _spki(private.public_key()):
            raise ConfigError(f"{names.key}: {key} is not the key of the certificate in {cert}")
        now = datetime.now(UTC)
        if now < leaf.not_valid_before_utc:
            raise ConfigError(
                f"{names.cert}: the certificate in {cert} is not valid before "
                f"{format_time(leaf.not_valid_before_utc)}"
            )
        if now > leaf.not_valid_after_utc:
            raise ConfigError(
                f"{names.cert}: the certificate in {cert} expired at "
                f"{format_time(leaf.not_valid_after_utc)}"
            )
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{names.cert}: cannot use {cert} with {key} ({_reason(exc)})"
            ) from None
    return context


def certificate_expiry(cert: Path, name: str) -> datetime:
    """When the first certificate in ``cert`` expires (for the node's expiry gauge)."""
    return _certificates(cert, name)[0].not_valid_after_utc


def _bare(name: str) -> str:
    return name.removeprefix("config key ")


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _read(path: Path, name: str) -> bytes:
    try:
        return read_file_bytes(path)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None


def _certificates(path: Path, name: str) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(_read(path, name))
    except ValueError:
        found = []
    if not found:
        raise ConfigError(f"{name}: {path} holds no PEM certificate")
    return found


def _private_key(path: Path, name: str) -> PrivateKeyTypes:
    data = _read(path, name)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography's way of saying the key is encrypted and needs a password.
        raise ConfigError(f"{name}: {path} is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{name}: {path} holds no PEM private key") from None
    try:
        check_private_file(path, "TLS key")
    except KeyMaterialError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return key


def _spki(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def url_problem(url: str) -> str | None:
    """Why ``url`` is no hub server's URL (``nats://`` or ``tls://``, a host, a port), or None.

    Checked before any connection: nats-py's own words for a malformed one
    (``invalid connect url option``) name no URL, and came at each retry.
    """
    shown = display_url(url)
    if not url.startswith(("nats://", "tls://")):
        return f"{shown!r} is not a nats:// or tls:// URL"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        # Unparsable, it cannot be shown without perhaps showing a password in it.
        return f"a URL is not well-formed ({exc}); it is not shown, as it may hold a password"
    try:
        port = parts.port
    except ValueError as exc:
        return f"{shown!r} has no valid port ({exc})"
    if not parts.hostname:
        return f"{shown!r} names no host"
    if port == 0:
        return f"{shown!r} names port 0"
    return None


def display_url(url: str) -> str:
    """``url`` fit for a message: any user and password in it replaced by ``***``.

    nats-py takes credentials in the URL (``nats://user:password@host``); an error
    line naming the server must not carry them.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(a malformed URL)"
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
