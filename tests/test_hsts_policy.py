"""HSTS policies: preload only under the hstspreload.org rules; the admin shows the exact header."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from proxyadmin.forms import HSTSPolicyForm
from proxyadmin.models import Host, HSTSPolicy, Upstream
from tests.conftest import page_text
from tests.test_host_names import host_post, stored_certificate

ADD_URL = "/admin/proxyadmin/hstspolicy/add/"
ONE_YEAR = 31536000


pytestmark = pytest.mark.usefixtures("fast_password_hashing")


def policy_form(max_age: int | str, include_subdomains: bool, preload: bool) -> HSTSPolicyForm:
    data: dict[str, Any] = {"name": "strict", "max_age": str(max_age), "override_upstream": "on"}
    if include_subdomains:
        data["include_subdomains"] = "on"
    if preload:
        data["preload"] = "on"
    return HSTSPolicyForm(data=data)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("max_age", "include_subdomains", "message"),
    [
        (300, False, "Preload lists accept a site only with max-age of at least 31536000 (one year) "
                     "and includeSubDomains."),
        (ONE_YEAR - 1, True, "Preload lists accept a site only with max-age of at least 31536000 "
                             "(one year)."),
        (ONE_YEAR, False, "Preload lists accept a site only with includeSubDomains."),
    ],
)
def test_preload_is_refused_without_a_year_of_max_age_and_include_subdomains(
    max_age: int, include_subdomains: bool, message: str
) -> None:
    form = policy_form(max_age, include_subdomains, preload=True)
    assert not form.is_valid()
    assert form.errors == {"preload": [message]}


@pytest.mark.django_db
@pytest.mark.parametrize("max_age", [ONE_YEAR, 2 * ONE_YEAR])
def test_preload_with_a_year_of_max_age_and_include_subdomains_is_accepted(max_age: int) -> None:
    form = policy_form(max_age, include_subdomains=True, preload=True)
    assert form.is_valid(), form.errors
    assert form.save().header_value() == f"max-age={max_age}; includeSubDomains; preload"


@pytest.mark.django_db
def test_short_max_age_without_preload_is_accepted() -> None:
    form = policy_form(300, include_subdomains=False, preload=False)
    assert form.is_valid(), form.errors


@pytest.mark.django_db
def test_max_age_that_is_not_a_whole_number_is_refused_without_a_crash() -> None:
    form = policy_form("a year", include_subdomains=True, preload=True)
    assert not form.is_valid()
    assert form.errors["max_age"] == ["Enter a whole number."]


@pytest.mark.parametrize(
    ("include_subdomains", "preload", "header"),
    [
        (False, False, "max-age=600"),
        (True, False, "max-age=600; includeSubDomains"),
        (True, True, "max-age=600; includeSubDomains; preload"),
    ],
)
def test_header_value_lists_the_directives_in_rfc_6797_form(
    include_subdomains: bool, preload: bool, header: str
) -> None:
    policy = HSTSPolicy(max_age=600, include_subdomains=include_subdomains, preload=preload)
    assert policy.header_value() == header


@pytest.mark.django_db
def test_admin_refuses_preload_with_a_short_max_age(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(
        ADD_URL,
        {"name": "strict", "max_age": "86400", "include_subdomains": "on", "preload": "on",
         "_save": "Save"},
    )
    assert response.status_code == 200
    assert (
        "Preload lists accept a site only with max-age of at least 31536000 (one year)."
        in page_text(response)
    )
    assert not HSTSPolicy.objects.exists()


@pytest.mark.django_db
def test_admin_refuses_a_negative_max_age(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(ADD_URL, {"name": "strict", "max_age": "-1", "_save": "Save"})
    assert response.status_code == 200
    assert "Ensure this value is greater than or equal to 0." in page_text(response)


@pytest.mark.django_db
def test_admin_change_page_and_list_show_the_exact_header(admin_client_logged_in: Client) -> None:
    add_page = page_text(admin_client_logged_in.get(ADD_URL))
    assert "Shown after saving." in add_page
    response = admin_client_logged_in.post(
        ADD_URL,
        {"name": "strict", "max_age": str(ONE_YEAR), "include_subdomains": "on", "preload": "on",
         "override_upstream": "on", "_save": "Save"},
    )
    assert response.status_code == 302, page_text(response)
    policy = HSTSPolicy.objects.get(name="strict")
    header = "<code>Strict-Transport-Security: max-age=31536000; includeSubDomains; preload</code>"
    change = page_text(admin_client_logged_in.get(f"/admin/proxyadmin/hstspolicy/{policy.pk}/change/"))
    assert header in change
    assert header in page_text(admin_client_logged_in.get("/admin/proxyadmin/hstspolicy/"))


@pytest.fixture
def upstream(db: None) -> Upstream:
    upstream = Upstream.objects.create(name="app")
    upstream.targets.create(host="127.0.0.1", port=9000)
    return upstream


@pytest.mark.django_db
def test_hsts_policy_on_a_tcp_host_is_refused(admin_client_logged_in: Client, upstream: Upstream) -> None:
    policy = HSTSPolicy.objects.create(name="strict")
    response = admin_client_logged_in.post(
        "/admin/proxyadmin/host/add/",
        host_post(upstream, ["db.example.com"], mode="tcp", hsts_policy=str(policy.pk)),
    )
    assert response.status_code == 200
    assert "HSTS is an HTTP header; a TCP host sends none. Clear it." in page_text(response)
    assert not Host.objects.exists()


@pytest.mark.django_db
def test_hsts_policy_on_an_http_host_is_accepted(admin_client_logged_in: Client, upstream: Upstream) -> None:
    policy = HSTSPolicy.objects.create(name="strict")
    stored_certificate("site", ["www.example.com"])
    response = admin_client_logged_in.post(
        "/admin/proxyadmin/host/add/",
        host_post(upstream, ["www.example.com"], hsts_policy=str(policy.pk)),
    )
    assert response.status_code == 302, page_text(response)
    assert Host.objects.get(name="web").hsts_policy == policy
