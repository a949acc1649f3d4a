"""Build the data plane's ``Snapshot`` from the database.

This is the only place where ORM objects turn into ``proxycore.config`` types.
Keys are decrypted here, once per build; the snapshot lives only in a proxy
node's memory.
"""

from __future__ import annotations

import datetime as dt

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from proxyadmin import accesslists, crypto
from proxyadmin import models as m
from proxyadmin.acme.models import Challenge
from proxyadmin.coverage import served_certificate
from proxycore import config as core


class SnapshotError(Exception):
    """The configuration cannot be turned into a snapshot; the message says why."""


def _bundle(cert: m.Certificate) -> core.CertificateBundle:
    try:
        key_pem = crypto.decrypt(cert.key_token)
    except crypto.KeyConfigError as exc:
        raise SnapshotError(f"certificate '{cert.name}': {exc}") from None
    return core.CertificateBundle(
        name=cert.name,
        chain_pem=cert.chain_pem.encode("ascii"),
        key_pem=key_pem,
        fingerprint_sha256=cert.fingerprint_sha256,
        serial=cert.serial,
        sans=tuple(cert.sans),
        not_after=cert.not_after,
    )


def _upstream(up: m.Upstream, bundles: dict[int, core.CertificateBundle]) -> core.Upstream:
    tls = None
    if up.tls:
        client = up.tls_client_certificate
        tls = core.UpstreamTLS(
            verify=up.tls_verify,
            ca_pem=up.tls_ca_bundle.encode("ascii"),
            server_name=up.tls_server_name,
            client_certificate=bundles[client.pk] if client is not None else None,
        )
    return core.Upstream(
        name=up.name,
        targets=tuple(
            core.Target(t.host, t.port, t.weight, t.enabled, t.draining) for t in up.targets.all()
        ),
        connect_timeout=up.connect_timeout,
        read_timeout=up.read_timeout,
        tls=tls,
        balancing=core.Balancing(up.balancing),
        health=core.HealthCheck(
            enabled=up.health_check_enabled,
            path=up.health_check_path,
            interval=up.health_check_interval,
            timeout=up.health_check_timeout,
            healthy_threshold=up.healthy_threshold,
            unhealthy_threshold=up.unhealthy_threshold,
            passive_failures=up.passive_failures,
            passive_cooldown=up.passive_cooldown,
        ),
    )


def _hsts(policy: m.HSTSPolicy | None) -> core.HSTS | None:
    if policy is None:
        return None
    return core.HSTS(
        max_age=policy.max_age,
        include_subdomains=policy.include_subdomains,
        preload=policy.preload,
        override_upstream=policy.override_upstream,
    )


def _client_auth(host: m.Host) -> core.ClientAuth:
    mode = core.ClientAuthMode(host.client_auth)
    if mode is core.ClientAuthMode.OFF:
        return core.ClientAuth()
    if host.client_ca is None:
        raise SnapshotError(f"host '{host.name}': client auth is {mode.value} but no CA bundle is set.")
    return core.ClientAuth(
        mode=mode,
        ca_pem=host.client_ca.bundle_pem.encode("ascii"),
        crl_pem=host.client_ca.crl_pem.encode("ascii"),
        forward_cert=host.forward_client_cert,
        forward_chain=host.forward_client_cert_chain,
    )


def _access_list(acl: m.AccessList) -> core.AccessList:
    try:
        rules = accesslists.parse_rules(acl.rules)
    except ValidationError as exc:
        raise SnapshotError(f"access list '{acl.name}': {'; '.join(exc.messages)}") from None
    return core.AccessList(
        name=acl.name,
        default=core.AccessAction(acl.default),
        rules=tuple(core.AccessRule(core.AccessAction(action), source) for action, source in rules),
        satisfy=core.Satisfy(acl.satisfy),
        users=tuple(core.BasicUser(u.username, u.password_hash) for u in acl.users.all()),
        realm=acl.realm,
        pass_authorization=acl.pass_authorization,
    )


def _rate_limit(host: m.Host) -> core.RateLimit | None:
    if not (host.rate_limit_rps or host.rate_limit_connections):
        return None
    return core.RateLimit(
        requests_per_second=host.rate_limit_rps or 0.0,
        burst=host.rate_limit_burst or 0,
        connections_per_client=host.rate_limit_connections or 0,
    )


def _listener_trust(row: m.ProxySettings | None) -> tuple[core.ListenerTrust, ...]:
    if row is None:
        return ()
    trust = []
    for listener, text, proxy_protocol in (
        ("https", row.https_trusted_proxies, row.https_proxy_protocol),
        ("http", row.http_trusted_proxies, row.http_proxy_protocol),
    ):
        try:
            sources = accesslists.parse_trusted_proxies(text)
        except ValidationError as exc:
            raise SnapshotError(f"{listener} trusted proxies: {'; '.join(exc.messages)}") from None
        if sources:
            trust.append(core.ListenerTrust(listener, tuple(sources), proxy_protocol))
    return tuple(trust)


def build_snapshot(now: dt.datetime | None = None) -> core.Snapshot:
    """Read the whole config in one transaction and return it as a ``Snapshot``."""
    now = now or timezone.now()
    with transaction.atomic():
        revision = m.ConfigRevision.current()
        certificates = list(m.Certificate.objects.all())
        bundles = {c.pk: _bundle(c) for c in certificates}
        settings_row = m.ProxySettings.objects.filter(pk=1).select_related("default_certificate").first()
        hosts = (
            m.Host.objects.all()
            .select_related("certificate", "upstream", "hsts_policy", "client_ca",
                            "upstream__tls_client_certificate", "access_list")
            .prefetch_related("names", "upstream__targets", "access_list__users")
        )
        access_lists: dict[int, core.AccessList] = {}
        upstreams: dict[int, core.Upstream] = {}
        routes = []
        for host in hosts:
            names = [n.name for n in host.names.all()]
            if not names:
                continue  # a host without names can match nothing
            if not host.enabled and host.mode != m.Host.Mode.HTTP:
                continue  # a disabled TCP host has no page to show: its names are unknown
            # Never a certificate that does not cover the host: with none of its own and none
            # covering its names, the route carries none (the default one is for no SNI).
            cert = served_certificate(host, names, certificates, now)
            if host.upstream_id not in upstreams:
                upstreams[host.upstream_id] = _upstream(host.upstream, bundles)
            acl = host.access_list
            if acl is not None and acl.pk not in access_lists:
                access_lists[acl.pk] = _access_list(acl)
            routes.append(
                core.HostRoute(
                    name=host.name,
                    names=tuple(names),
                    mode=core.Mode(host.mode),
                    upstream=upstreams[host.upstream_id],
                    certificate=bundles[cert.pk] if cert is not None else None,
                    hsts=_hsts(host.hsts_policy),
                    redirect=core.Redirect(host.redirect_http, host.redirect_status),
                    client_auth=_client_auth(host),
                    proxy_protocol=core.ProxyProtocol(host.proxy_protocol),
                    max_body_size=host.max_body_size,
                    allow_trace=host.allow_trace,
                    enabled=host.enabled,
                    access=access_lists[acl.pk] if acl is not None else None,
                    rate_limit=_rate_limit(host),
                )
            )
        challenges = list(Challenge.objects.all())
    default = settings_row.default_certificate if settings_row else None
    return core.Snapshot(
        revision=revision,
        hosts=tuple(routes),
        default_certificate=bundles[default.pk] if default is not None else None,
        strict_sni=settings_row.strict_sni if settings_row else False,
        acme_challenges=tuple(
            (c.token, c.key_authorization) for c in challenges if c.kind == Challenge.Kind.HTTP_01
        ),
        acme_tls_alpn=tuple(
            (c.name, c.digest()) for c in challenges if c.kind == Challenge.Kind.TLS_ALPN_01
        ),
        listener_trust=_listener_trust(settings_row),
    )
