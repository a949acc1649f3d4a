"""What the control plane tells proxy nodes and dashboards through the channel layer.

The group names, and every message sent to a group: ``config.changed`` for the
agents, ``state`` and ``nodes`` for the dashboards (``tick`` is
``proxyadmin.coalesce``'s). The consumers (``proxyadmin.consumers``) relay these;
``proxyadmin.ingest``, the revision watcher (``proxyadmin.revisionwatcher``) and
the ``ConfigRevision`` signal connected in ``ProxyAdminConfig.ready()`` send them.
Nothing here imports the consumers, so models, commands and consumers can all use
it without an import cycle.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_save
from django.urls import reverse
from django.utils import timezone

from proxyadmin import traffic
from proxyadmin.acme.models import dashboard_warnings as acme_warnings
from proxyadmin.models import Certificate, ConfigRevision, Host, ProxyNode, Upstream
from proxycore import agentproto

log = logging.getLogger("proxyadmin.agentlink")

AGENTS_GROUP = "agents"
DASHBOARD_GROUP = "dashboard"


# -- to the agents ------------------------------------------------------------


def config_changed(revision: int) -> dict[str, Any]:
    """``config.changed`` as the group event and as the node's message (the same dict)."""
    return agentproto.ConfigChanged(revision).to_message()


# -- to the dashboards (sync, database) -----------------------------------------


def host_pages() -> dict[str, str]:
    """Each configured host's admin page, by the name nodes report it under."""
    return {name: reverse("admin:proxyadmin_host_change", args=[pk])
            for pk, name in Host.objects.values_list("pk", "name")}


def nodes_message(seen: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The node table; sent when nodes or the config change, so it carries the host links too.

    ``seen``: when control-plane processes last heard from nodes (``proxyadmin.liveness``),
    fresher than the rows, which are written once per rollup flush.
    """
    current = ConfigRevision.current()
    now = timezone.now()
    seen = seen or {}

    def live(name: str) -> dt.datetime | None:
        return dt.datetime.fromtimestamp(seen[name], tz=dt.UTC) if name in seen else None

    nodes = [n.as_dashboard(current, now, live(n.name)) for n in ProxyNode.objects.all()]
    return {"type": "nodes", "nodes": nodes, "host_pages": host_pages()}


def expiring_certificates(now: dt.datetime) -> list[dict[str, Any]]:
    horizon = now + dt.timedelta(days=settings.CERT_EXPIRY_WARNING_DAYS)
    return [
        {
            "name": cert.name,
            "not_after": cert.not_after.timestamp(),
            "days": cert.days_to_expiry(now),
            "url": reverse("admin:proxyadmin_certificate_change", args=[cert.pk]),
        }
        for cert in Certificate.objects.filter(not_after__lt=horizon).order_by("not_after")
    ]


def config_warnings() -> list[str]:
    unverified = Upstream.objects.filter(tls=True, tls_verify=False).values_list("name", flat=True)
    warnings = [f"upstream '{name}' does not verify its targets' certificates" for name in unverified]
    return warnings + acme_warnings(timezone.now())


def dashboard_state() -> dict[str, Any]:
    now = timezone.now()
    nodes = nodes_message()
    return {
        "type": "state",
        "revision": ConfigRevision.current(),
        "nodes": nodes["nodes"],
        "host_pages": nodes["host_pages"],
        "history": traffic.history(now),
        "certificates": expiring_certificates(now),
        "warnings": config_warnings(),
    }


# -- recent requests ----------------------------------------------------------------

# A dashboard showing a host's recent requests asks the nodes for its lines for this long,
# and renews the request every 10 s; staff pages cannot make nodes do more than this.
RECENT_WATCH_SECONDS = 30
RECENT_WATCH_MIN_INTERVAL = 5.0
MAX_BROWSER_MESSAGE = 1024


def parse_recent_watch(text: str | None) -> str | None:
    """The host a page asks the recent requests of ("" to stop showing them); None if malformed."""
    if text is None or len(text) > MAX_BROWSER_MESSAGE:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("type") != "recent.watch":
        return None
    host = message.get("host")
    if host is None:
        return ""
    valid = isinstance(host, str) and 0 < len(host) <= agentproto.MAX_NAME_LENGTH and "\x00" not in host
    return host if valid else None


def recent_lines_message(message: agentproto.RecentRequests) -> dict[str, Any]:
    """A node's ``requests`` as the group event the dashboards' consumers take (``recent.lines``)."""
    return {"type": "recent.lines", "node": message.node,
            "hosts": {host: [[seq, line] for seq, line in lines] for host, lines in message.hosts.items()}}


# -- a new revision -----------------------------------------------------------------


def announce_config_changed(revision: int) -> None:
    """Tell every connected node and dashboard about a new revision (run on commit).

    With the in-memory channel layer this reaches only the consumers of the process
    that made the revision; the revision watcher of each daphne process covers the
    rest. A failure here must not fail the admin's save, so it is logged and dropped.
    """
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(AGENTS_GROUP, config_changed(revision))
        async_to_sync(layer.group_send)(DASHBOARD_GROUP, nodes_message())
    except Exception:
        log.warning("could not announce config revision %d to the proxy nodes", revision, exc_info=True)


def _on_revision_saved(
    sender: type[ConfigRevision], instance: ConfigRevision, created: bool, raw: bool = False,
    **kwargs: object,
) -> None:
    if not created or raw:
        return
    revision = instance.pk
    transaction.on_commit(lambda: announce_config_changed(revision), robust=True)


def connect_signals() -> None:
    """Every process that makes a revision (admin, ``importconfig``, shell) announces it."""
    post_save.connect(_on_revision_saved, sender=ConfigRevision, dispatch_uid="announce-new-config-revision")
