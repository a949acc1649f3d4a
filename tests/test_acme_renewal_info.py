"""ACME Renewal Information (RFC 9773) against a stand-in CA: the identifier asked for, and
the renewal moved into the window the CA suggests.

Debian's pebble has no ``renewalInfo``, so a small HTTP server in the test plays the
directory and the renewalInfo resource. Everything on our side is real: the worker's
pass (``Command.run_pass``), our client (``protocol.make_client``) and certbot's library
underneath, over a real socket. The certificate identifier is computed here from the
certificate itself (base64url of the Authority Key Identifier's keyIdentifier, a dot,
base64url of the serial's DER bytes) and compared with the path the stand-in was asked.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme
from cryptography import x509
from django.utils import timezone

from proxyadmin import configio, pki
from proxyadmin import models as m
from proxyadmin.acme.management.commands.acme import Command
from proxyadmin.acme.models import Account, HostState, renewal_time

pytestmark = pytest.mark.django_db

NAMES = ["a.example", "b.example"]
RETRY_AFTER = 3600


class StandInCA(ThreadingHTTPServer):
    """A directory (with or without ``renewalInfo``) and one renewalInfo answer."""

    def __init__(self, window: tuple[dt.datetime, dt.datetime], offers_renewal_info: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), RenewalInfoHandler)
        self.base = f"http://127.0.0.1:{self.server_address[1]}"
        self.window, self.offers_renewal_info = window, offers_renewal_info
        self.asked: list[str] = []

    @property
    def directory(self) -> str:
        return f"{self.base}/directory"


class RenewalInfoHandler(BaseHTTPRequestHandler):
    server: StandInCA

    def do_GET(self) -> None:
        ca = self.server
        if self.path == "/directory":
            body: dict[str, Any] = {"newNonce": f"{ca.base}/nonce", "newAccount": f"{ca.base}/account",
                                    "newOrder": f"{ca.base}/order", "revokeCert": f"{ca.base}/revoke"}
            if ca.offers_renewal_info:
                body["renewalInfo"] = f"{ca.base}/renewal-info"
            self.answer(body)
        elif self.path.startswith("/renewal-info/"):
            ca.asked.append(self.path.removeprefix("/renewal-info/"))
            start, end = ca.window
            self.answer({"suggestedWindow": {"start": start.isoformat().replace("+00:00", "Z"),
                                             "end": end.isoformat().replace("+00:00", "Z")}},
                        {"Retry-After": str(RETRY_AFTER)})
        else:
            self.send_error(404)

    def answer(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stand_in(request: pytest.FixtureRequest, settings: Any) -> Iterator[StandInCA]:
    now = timezone.now().replace(microsecond=0)
    window = (now + dt.timedelta(days=3), now + dt.timedelta(days=4))
    ca = StandInCA(window, offers_renewal_info=getattr(request, "param", True))
    thread = threading.Thread(target=ca.serve_forever, daemon=True)
    thread.start()
    settings.ACME_DIRECTORY, settings.ACME_EMAIL, settings.ACME_CA_BUNDLE = ca.directory, "", ""
    # A registered account: the pass talks to the CA without registering.
    account = Account.for_directory(ca.directory)
    account.uri = f"{ca.base}/account/1"
    account.save()
    yield ca
    ca.shutdown()
    ca.server_close()


def valid_acme_host(ca: trustme.CA) -> tuple[HostState, x509.Certificate]:
    """An ACME host with a valid certificate (issued by ``ca``), renewal due in two months."""
    document = {"format": "proxyadmin-config", "version": 1,
                "upstreams": [{"name": "app", "targets": [{"host": "127.0.0.1", "port": 9000}]}],
                "hosts": [{"name": "site", "names": NAMES, "upstream": "app", "acme": "http-01"}]}
    assert not any(o.refused for o in configio.import_config(document))
    host = m.Host.objects.get(name="site")
    now = timezone.now()
    leaf = ca.issue_cert(*NAMES, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=89))
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes()
    cert = m.Certificate(name="site (ACME)", source=m.Certificate.Source.ACME)
    cert.set_inspected(pki.inspect_upload(chain_pem=chain, key_pem=leaf.private_key_pem.bytes(), now=now))
    cert.save()
    host.certificate = cert
    host.save()
    state = HostState.of(host)
    x509_leaf = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    state.note_issued(cert, renewal_time(x509_leaf.not_valid_before_utc, x509_leaf.not_valid_after_utc))
    state.ari_next_check = now - dt.timedelta(seconds=1)
    state.save()
    return state, x509_leaf


def ari_identifier(cert: x509.Certificate) -> str:
    """RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(DER serial), no padding."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki is not None
    serial = cert.serial_number.to_bytes(cert.serial_number.bit_length() // 8 + 1, "big")

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    return f"{b64(aki)}.{b64(serial)}"


def test_the_ca_is_asked_for_the_certificate_identifier_and_the_renewal_moves_into_its_window(
    stand_in: StandInCA, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    state, leaf = valid_acme_host(ca)
    before = timezone.now()
    caplog.set_level("INFO", logger="proxyadmin.acme")
    assert Command().run_pass() == 0  # nothing to order: only the renewal information is due
    assert stand_in.asked == [ari_identifier(leaf)]
    state.refresh_from_db()
    start, end = stand_in.window
    assert state.next_attempt is not None and start <= state.next_attempt <= end, (state.next_attempt, start)
    assert state.status == HostState.Status.VALID
    assert state.ari_next_check is not None
    asked_again_in = (state.ari_next_check - before).total_seconds()
    assert RETRY_AFTER - 5 < asked_again_in < RETRY_AFTER + 5  # the CA's Retry-After
    assert "The CA suggests renewing the certificate of host 'site'" in caplog.text

    assert Command().run_pass() == 0  # not asked again before Retry-After
    assert len(stand_in.asked) == 1
    assert not state.is_due(NAMES, start - dt.timedelta(minutes=1))
    assert state.is_due(NAMES, end)  # the next order comes inside the window


@pytest.mark.parametrize("stand_in", [False], indirect=True)
def test_a_directory_without_renewal_info_is_not_asked_again_for_six_hours(
    stand_in: StandInCA, ca: trustme.CA
) -> None:
    state, _ = valid_acme_host(ca)
    renew_at = state.next_attempt
    Command().run_pass()
    state.refresh_from_db()
    assert stand_in.asked == []
    assert state.next_attempt == renew_at  # a third of the lifetime left, as without ARI
    assert state.ari_next_check is not None
    assert dt.timedelta(hours=5, minutes=59) < state.ari_next_check - timezone.now() <= dt.timedelta(hours=6)
