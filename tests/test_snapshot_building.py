"""The snapshot: the frozen contract the data plane consumes, built from the DB."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from django.utils import timezone

from proxyadmin import models as m
from proxyadmin import pki
from proxyadmin.snapshot import SnapshotError, build_snapshot
from proxycore import config as core
from tests.conftest import make_cert


def stored_cert(name: str, names: list[str], days: int = 90) -> tuple[m.Certificate, bytes]:
    now = dt.datetime.now(dt.UTC)
    cert_pem, key_pem = make_cert(names, not_after=now + dt.timedelta(days=days))
    inspected = pki.inspect_upload(chain_pem=cert_pem, key_pem=key_pem, now=timezone.now())
    cert = m.Certificate(name=name)
    cert.set_inspected(inspected)
    cert.save()
    return cert, inspected.key_pem


def make_host(name: str, names: list[str], **fields: object) -> m.Host:
    upstream, _ = m.Upstream.objects.get_or_create(name="app")
    if not upstream.targets.exists():
        m.UpstreamTarget.objects.create(upstream=upstream, host="127.0.0.1", port=9000, weight=3)
    host = m.Host.objects.create(name=name, upstream=upstream, **fields)
    for n in names:
        m.HostName.objects.create(host=host, name=n)
    return host


@pytest.mark.django_db
def test_snapshot_carries_hosts_with_decrypted_keys_and_settings() -> None:
    cert, key_pem = stored_cert("site", ["a.example", "*.a.example"])
    policy = m.HSTSPolicy.objects.create(name="year", max_age=31536000, include_subdomains=True)
    make_host("a", ["a.example", "www.a.example"], certificate=cert, hsts_policy=policy,
              redirect_status=301, proxy_protocol="v2")
    settings_row = m.ProxySettings.load()
    settings_row.default_certificate = cert
    settings_row.strict_sni = True
    settings_row.save()

    snap = build_snapshot()

    assert snap.revision == m.ConfigRevision.current() > 0
    (route,) = snap.hosts
    assert route.names == ("a.example", "www.a.example")
    assert route.mode is core.Mode.HTTP
    assert route.certificate is not None and route.certificate.key_pem == key_pem
    assert route.certificate.chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert route.hsts is not None
    assert route.hsts.header_value == "max-age=31536000; includeSubDomains"
    assert route.redirect == core.Redirect(enabled=True, status=301)
    assert route.proxy_protocol is core.ProxyProtocol.V2
    assert route.upstream.targets == (core.Target("127.0.0.1", 9000, 3),)
    assert snap.default_certificate == route.certificate
    assert snap.strict_sni is True


@pytest.mark.django_db
def test_snapshot_is_immutable_and_uses_tuples() -> None:
    make_host("a", ["a.example"])
    snap = build_snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.revision = 99  # type: ignore[misc]
    assert isinstance(snap.hosts, tuple)
    assert isinstance(snap.hosts[0].names, tuple)
    assert isinstance(snap.hosts[0].upstream.targets, tuple)


@pytest.mark.django_db
def test_host_without_certificate_gets_the_best_covering_one() -> None:
    stored_cert("short", ["*.b.example"], days=20)
    longest, _ = stored_cert("long", ["*.b.example", "b.example"], days=200)
    stored_cert("other", ["c.example"], days=300)
    make_host("b", ["x.b.example", "b.example"])
    (route,) = build_snapshot().hosts
    assert route.certificate is not None and route.certificate.name == longest.name


@pytest.mark.django_db
def test_disabled_http_hosts_are_kept_as_disabled_and_tcp_ones_left_out() -> None:
    # A disabled HTTP host is answered with a 503 page (the node must know it); a disabled
    # TCP host has no page, so its names are simply not served.
    make_host("on", ["on.example"])
    make_host("off", ["off.example"], enabled=False)
    make_host("pipe", ["pipe.example"], enabled=False, mode="tcp")
    assert [(h.name, h.enabled) for h in build_snapshot().hosts] == [("off", False), ("on", True)]


@pytest.mark.django_db
def test_client_auth_carries_the_ca_bundle(ca: object) -> None:
    import trustme

    assert isinstance(ca, trustme.CA)
    bundle = m.ClientCA(name="clients")
    bundle.set_bundle(pki.inspect_ca_bundle(ca.cert_pem.bytes(), timezone.now()))
    bundle.save()
    make_host("m", ["m.example"], client_auth="required", client_ca=bundle,
              forward_client_cert_chain=True)
    (route,) = build_snapshot().hosts
    assert route.client_auth.mode is core.ClientAuthMode.REQUIRED
    assert route.client_auth.ca_pem == bundle.bundle_pem.encode()
    assert route.client_auth.forward_chain is True


@pytest.mark.django_db
def test_upstream_tls_with_client_certificate() -> None:
    cert, key_pem = stored_cert("client", ["proxy.internal"])
    host = make_host("t", ["t.example"], mode="tcp")
    up = host.upstream
    up.tls, up.tls_server_name, up.tls_client_certificate = True, "backend.internal", cert
    up.save()
    (route,) = build_snapshot().hosts
    assert route.mode is core.Mode.TCP
    assert route.upstream.tls is not None
    assert route.upstream.tls.server_name == "backend.internal"
    assert route.upstream.tls.client_certificate is not None
    assert route.upstream.tls.client_certificate.key_pem == key_pem


@pytest.mark.django_db
def test_undecryptable_key_rejects_the_whole_snapshot(settings: object) -> None:
    from cryptography.fernet import Fernet
    from django.test import override_settings

    stored_cert("site", ["a.example"])
    with override_settings(PROXYADMIN_KEYS=Fernet.generate_key().decode()), pytest.raises(
        SnapshotError, match=r"certificate 'site'.*PROXYADMIN_KEYS"
    ):
        build_snapshot()
