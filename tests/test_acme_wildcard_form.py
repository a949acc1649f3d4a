"""The host form says on its ACME field that wildcard names cannot use http-01 or tls-alpn-01.

Through the real admin add and change pages (Django's test client): the refusal is
shown on the "Automatic certificate (ACME)" field, where the choice was made, and
nothing is saved.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

from proxyadmin.models import Host, Upstream
from tests.conftest import page_text
from tests.test_host_names import HOST_ADD_URL, host_post, stored_certificate

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

REFUSAL = "a wildcard name can only be validated by dns-01"


@pytest.fixture
def upstream() -> Upstream:
    upstream = Upstream.objects.create(name="app")
    upstream.targets.create(host="127.0.0.1", port=9000)
    return upstream


def acme_field_row(response: Any) -> str:
    """The HTML of the ACME field's row on the host page, its error list included."""
    text = page_text(response)
    row = re.search(r'<div class="form-row[^"]*field-acme[^"]*">(.*?)<div class="form-row', text, re.S)
    assert row is not None, "no ACME field on the page"
    return row.group(1)


def test_adding_an_acme_host_with_a_wildcard_name_says_so_on_the_acme_field(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    response = admin_client_logged_in.post(
        HOST_ADD_URL, host_post(upstream, ["example.com", "*.example.com"], acme="http-01"))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert REFUSAL in " ".join(errors["acme"]) and "*.example.com" in " ".join(errors["acme"])
    row = acme_field_row(response)
    assert "errorlist" in row and REFUSAL in row and "uses http-01" in row
    assert not Host.objects.exists()


def test_turning_acme_on_for_a_host_with_a_wildcard_name_is_refused_on_the_change_page(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    stored_certificate("wild", ["*.example.com"])
    assert admin_client_logged_in.post(
        HOST_ADD_URL, host_post(upstream, ["*.example.com"])).status_code == 302
    host = Host.objects.get(name="web")
    data = host_post(upstream, ["*.example.com"], acme="any", **{
        "names-INITIAL_FORMS": "1", "names-0-id": str(host.names.get().pk), "names-0-host": str(host.pk),
    })
    response = admin_client_logged_in.post(f"/admin/proxyadmin/host/{host.pk}/change/", data)
    assert response.status_code == 200
    row = acme_field_row(response)
    assert REFUSAL in row and "uses http-01 or tls-alpn-01" in row
    host.refresh_from_db()
    assert host.acme == ""


def test_a_deleted_wildcard_row_or_acme_off_is_accepted(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    deleting = host_post(upstream, ["example.com", "*.example.com"], acme="tls-alpn-01",
                         **{"names-1-DELETE": "on"})
    response = admin_client_logged_in.post(HOST_ADD_URL, deleting)
    assert response.status_code == 302, page_text(response)
    assert list(Host.objects.get(name="web").names.values_list("name", flat=True)) == ["example.com"]
    stored_certificate("wild", ["*.example.org"])
    off = host_post(upstream, ["*.example.org"], name="wild")
    assert admin_client_logged_in.post(HOST_ADD_URL, off).status_code == 302
