"""Every change of a config model makes a new ConfigRevision, with who and what."""

from __future__ import annotations

import pytest
from django.test import Client

from proxyadmin.models import ConfigRevision, HSTSPolicy, Upstream, UpstreamTarget
from proxyadmin.revisions import revision_batch


@pytest.mark.django_db
def test_save_and_delete_each_bump_the_revision() -> None:
    seen = [ConfigRevision.current()]
    policy = HSTSPolicy.objects.create(name="strict")
    seen.append(ConfigRevision.current())
    policy.max_age = 600
    policy.save()
    seen.append(ConfigRevision.current())
    policy.delete()
    seen.append(ConfigRevision.current())
    assert seen == sorted(set(seen)), "every change must raise the revision"
    latest = ConfigRevision.objects.first()
    assert latest is not None and latest.pk == seen[-1]
    assert "deleted HSTS policy 'strict'" in latest.summary


@pytest.mark.django_db
def test_a_batch_makes_one_revision_with_its_actor() -> None:
    start = ConfigRevision.objects.count()
    with revision_batch("importconfig"):
        up = Upstream.objects.create(name="app")
        UpstreamTarget.objects.create(upstream=up, host="127.0.0.1", port=9000)
    assert ConfigRevision.objects.count() == start + 1
    rev = ConfigRevision.objects.first()
    assert rev is not None and rev.actor == "importconfig"
    assert "added upstream 'app'" in rev.summary
    assert "added upstream target '127.0.0.1:9000'" in rev.summary


@pytest.mark.django_db
def test_an_admin_save_makes_one_revision_naming_the_user(admin_client_logged_in: Client) -> None:
    start = ConfigRevision.objects.count()
    response = admin_client_logged_in.post(
        "/admin/proxyadmin/upstream/add/",
        {
            "name": "web", "balancing": "round_robin", "connect_timeout": "5", "read_timeout": "60",
            "tls_verify": "on", "health_check_path": "/", "health_check_interval": "5",
            "health_check_timeout": "2", "healthy_threshold": "2", "unhealthy_threshold": "3",
            "passive_failures": "3", "passive_cooldown": "10",
            "targets-TOTAL_FORMS": "2", "targets-INITIAL_FORMS": "0",
            "targets-MIN_NUM_FORMS": "1", "targets-MAX_NUM_FORMS": "1000",
            "targets-0-host": "127.0.0.1", "targets-0-port": "9001", "targets-0-weight": "1",
            "targets-0-enabled": "on",
            "targets-1-host": "127.0.0.1", "targets-1-port": "9002", "targets-1-weight": "2",
            "targets-1-enabled": "on",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert ConfigRevision.objects.count() == start + 1
    rev = ConfigRevision.objects.first()
    assert rev is not None and rev.actor == "admin"
    assert "added upstream 'web'" in rev.summary


@pytest.mark.django_db
def test_a_refused_admin_form_makes_no_revision(admin_client_logged_in: Client) -> None:
    start = ConfigRevision.objects.count()
    response = admin_client_logged_in.post(
        "/admin/proxyadmin/hstspolicy/add/",
        {"name": "p", "max_age": "600", "preload": "on", "override_upstream": "on"},
    )
    assert response.status_code == 200
    assert ConfigRevision.objects.count() == start
