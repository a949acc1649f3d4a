"""New upstreams start with active health checks on, however they are made.

Through importconfig (an entry that does not mention them), the admin's upstream form,
the model itself, and into the snapshot a node serves: "healthy" then means checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.test import Client

from proxyadmin import models as m
from proxyadmin.snapshot import build_snapshot
from tests.test_import_export import document, import_document

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]


def test_an_imported_upstream_that_does_not_mention_checks_is_checked(tmp_path: Path) -> None:
    import_document(tmp_path, document(upstreams=[
        {"name": "app", "targets": [{"host": "127.0.0.1", "port": 8081}]}]))
    assert m.Upstream.objects.get(name="app").health_check_enabled


def test_an_imported_upstream_may_still_turn_checks_off(tmp_path: Path) -> None:
    import_document(tmp_path, document(upstreams=[
        {"name": "app", "health_check_enabled": False, "targets": [{"host": "127.0.0.1", "port": 8081}]}]))
    assert not m.Upstream.objects.get(name="app").health_check_enabled


def test_an_upstream_made_in_code_is_checked_in_the_snapshot() -> None:
    upstream = m.Upstream.objects.create(name="app")
    upstream.targets.create(host="127.0.0.1", port=8081)
    host = m.Host.objects.create(name="web", upstream=upstream)
    host.names.create(name="www.example.com")
    [route] = build_snapshot().hosts
    assert route.upstream.health.enabled


def test_the_admin_add_upstream_form_starts_with_checks_on(admin_client_logged_in: Client) -> None:
    html = admin_client_logged_in.get("/admin/proxyadmin/upstream/add/").content.decode()
    assert re.search(r'<input type="checkbox" name="health_check_enabled"[^>]* checked', html)
