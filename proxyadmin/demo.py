"""The example configuration ``manage.py up --demo`` adds on first run.

A host ``localhost`` with a certificate from the local CA, an HSTS policy, and
the demo upstream (``manage.py demoupstream``) behind it, so a newcomer sees
traffic on the dashboard within a minute. The local CA certificate is written to
``var/local-ca.pem`` for ``curl --cacert``.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import transaction

from proxyadmin import localca
from proxyadmin import models as m
from proxyadmin.revisions import revision_batch

DEMO_HOST = "localhost"


def ca_path() -> Path:
    return Path(settings.VAR_DIR) / "local-ca.pem"


def install_demo(upstream_port: int) -> bool:
    """Create the demo configuration unless a host 'localhost' exists; True if created."""
    if m.HostName.objects.filter(name=DEMO_HOST).exists():
        write_ca()
        return False
    with revision_batch("up --demo"), transaction.atomic():
        policy, _ = m.HSTSPolicy.objects.get_or_create(
            name="demo (5 minutes)", defaults={"max_age": 300, "override_upstream": True}
        )
        upstream, created = m.Upstream.objects.get_or_create(name="demo upstream")
        if created:
            m.UpstreamTarget.objects.create(upstream=upstream, host="127.0.0.1", port=upstream_port)
        host = m.Host.objects.create(name="demo", upstream=upstream, hsts_policy=policy)
        m.HostName.objects.create(host=host, name=DEMO_HOST)
        certificate = localca.certificate_for_host(host)
        proxy_settings = m.ProxySettings.load()
        if proxy_settings.default_certificate is None:
            proxy_settings.default_certificate = certificate
            proxy_settings.save()
    write_ca()
    return True


def write_ca() -> Path:
    path = ca_path()
    path.write_text(localca.get_or_create_ca().certificate_pem)
    return path
