"""Which certificate serves a host, and why a host cannot be saved without one.

One rule for the admin's forms, ``importconfig``, the host list and the snapshot:
a host is served with the certificate the operator chose for it, or else with the
valid stored certificate that covers all its names and expires last. The default
certificate (Proxy settings) is for clients that send no SNI or an unknown name,
never a choice for a named host: a host that nothing covers is refused when it is
saved, unless it is about to get a certificate (from the local CA, or by ACME).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from django.utils import timezone

from proxyadmin import models as m
from proxycore.names import InvalidHostname, normalize_hostname, uncovered_names


def is_valid_at(cert: m.Certificate, now: dt.datetime) -> bool:
    return cert.not_before <= now <= cert.not_after


def best_certificate(
    certificates: Iterable[m.Certificate], names: list[str], now: dt.datetime
) -> m.Certificate | None:
    """The valid certificate that covers all ``names`` and expires last, if any."""
    covering = [
        c for c in certificates if is_valid_at(c, now) and not uncovered_names(c.sans, names)
    ]
    return max(covering, key=lambda c: c.not_after, default=None)


def served_certificate(
    host: m.Host, names: list[str], certificates: Iterable[m.Certificate], now: dt.datetime
) -> m.Certificate | None:
    """The certificate a node serves for ``host``: its own, or the best covering one."""
    if host.certificate_id is not None:
        return host.certificate
    return best_certificate(certificates, names, now) if names else None


@dataclass(frozen=True)
class ServedTo:
    """A host a certificate is served to, and whether the host chose it or it was picked."""

    host: m.Host
    chosen: bool


def hosts_served(
    hosts: Iterable[m.Host], certificates: Iterable[m.Certificate], now: dt.datetime
) -> dict[int, list[ServedTo]]:
    """The hosts each certificate is served to now (the snapshot's rule), by certificate pk.

    ``hosts`` should come with their names prefetched. Of several certificates for the
    same names, only the one served appears: the others are in no host's list.
    """
    stored = list(certificates)
    served: dict[int, list[ServedTo]] = {}
    for host in hosts:
        cert = served_certificate(host, host.hostnames(), stored, now)
        if cert is not None:
            served.setdefault(cert.pk, []).append(ServedTo(host, host.certificate_id is not None))
    return served


def normalized(raw_names: Iterable[str]) -> list[str]:
    """The names that are valid, normalised; the invalid ones are reported elsewhere."""
    names = []
    for raw in raw_names:
        try:
            name = normalize_hostname(raw)
        except InvalidHostname:
            continue
        if name not in names:
            names.append(name)
    return names


# How an operator gives a host a certificate, where the refusal is read.
ADMIN_CHOICES = (
    "upload a certificate that covers {it} (Certificates → Add) and choose it here; "
    "tick “Generate a certificate from the local CA”; or set ACME to obtain one automatically"
)
IMPORT_CHOICES = (
    "add a certificate that covers {it} to the file (or store one) and name it in 'certificate', "
    "or set 'acme' to obtain one automatically"
)


def missing_certificate(
    names: list[str], *, choices: str = ADMIN_CHOICES, now: dt.datetime | None = None,
    certificates: Iterable[m.Certificate] | None = None,
) -> str | None:
    """Why a host with ``names`` and no certificate of its own cannot be saved, or None.

    None when a valid stored certificate covers every name (it is chosen automatically).
    """
    if not names:
        return None
    now = now or timezone.now()
    stored = m.Certificate.objects.all() if certificates is None else certificates
    if best_certificate(stored, names, now) is not None:
        return None
    it = "it" if len(names) == 1 else "them"
    return (
        f"No valid stored certificate covers {', '.join(names)}, so this host would have none "
        f"to serve (the default certificate is only for clients without SNI). Choose one: "
        f"{choices.format(it=it)}."
    )
