"""Shared test fixtures: certificates are made here, never read from files."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from django.contrib.auth.models import User
from django.test import Client

from proxycore import compiled
from tests.processes import Project
from tests.proxyharness import LoopThread, Upstream


def pytest_configure(config: pytest.Config) -> None:
    """Never test a compiled module older than its source (setup.py compiles in place)."""
    stale = compiled.stale_modules()
    if stale:
        pytest.exit(f"compiled modules older than their source: {', '.join(stale)}; "
                    "run .venv/bin/pip install -e . again (or delete proxycore/*.so)", returncode=2)


@pytest.fixture(autouse=True)
def short_rollup_flush(settings: Any) -> None:
    """Nodes' traffic is written to the rollup every 0.2 s in tests (ROLLUP_FLUSH_SECONDS)."""
    settings.ROLLUP_FLUSH_SECONDS = 0.2


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def pem_chain_with_root(ca: trustme.CA, leaf: trustme.LeafCert) -> bytes:
    """The leaf's chain plus the root, so the chain is complete without trust stores."""
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + ca.cert_pem.bytes()


def make_cert(
    names: list[str],
    *,
    key: object | None = None,
    issuer: tuple[x509.Certificate, object] | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A self-signed (or ``issuer``-signed) certificate; returns (cert PEM, key PEM)."""
    now = dt.datetime.now(dt.UTC)
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "test")])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=90))
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    key_pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def cert_factory() -> Callable[..., tuple[bytes, bytes]]:
    return make_cert


@pytest.fixture
def small_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture
def fast_password_hashing(settings: Any) -> None:
    """The superuser's login need not cost a second of PBKDF2 per test (modules opt in by ``pytestmark``)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def admin_client_logged_in(db: None) -> Client:
    User.objects.create_superuser("admin", "admin@example.com", "correct horse battery")
    client = Client()
    assert client.login(username="admin", password="correct horse battery")
    return client


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    """An event loop in a background thread for test upstreams."""
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def upstream(loop_thread: LoopThread) -> Iterator[Upstream]:
    """A recording HTTP/1.1 upstream that echoes each request as JSON."""
    server = Upstream(loop_thread).start()
    yield server
    server.stop()


def page_text(response: Any) -> str:
    """A response's HTML with its character references unescaped."""
    return html.unescape(response.content.decode())


# ---- channels -----------------------------------------------------------------------


@pytest.fixture
def empty_channel_layer() -> Iterator[None]:
    """The channel layer flushed before and after the test (modules opt in by ``pytestmark``)."""
    layer = get_channel_layer()
    async_to_sync(layer.flush)()
    yield
    async_to_sync(layer.flush)()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Runs an async test scenario to its end from a sync test."""
    async_to_sync(scenario)()


# ---- processes ----------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """A migrated control-plane database in the test's temp dir."""
    p = Project(tmp_path)
    p.manage("migrate", "--verbosity", "0")
    return p
