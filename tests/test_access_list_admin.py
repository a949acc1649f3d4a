"""Access lists in the admin: users' passwords write-only and hashed; the proxy host page's fields."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from proxyadmin import accesslists
from proxyadmin import models as m
from proxycore import access
from tests.conftest import page_text
from tests.test_proxy_host_page import ADD_URL, route

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

ACL_ADD_URL = "/admin/proxyadmin/accesslist/add/"


@pytest.fixture(autouse=True)
def fast_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accesslists, "ITERATIONS", 1000)


def acl_post(users: list[tuple[str, str]], rules: str = "allow 10.0.0.0/8\ndeny ::/0", **fields: Any) -> dict[str, Any]:
    data = {"name": "office", "default": "deny", "rules": rules, "satisfy": "any", "realm": "",
            "users-TOTAL_FORMS": str(len(users)), "users-INITIAL_FORMS": "0",
            "users-MIN_NUM_FORMS": "0", "users-MAX_NUM_FORMS": "1000", **fields}
    for i, (username, password) in enumerate(users):
        data[f"users-{i}-username"] = username
        data[f"users-{i}-password"] = password
    return data


def test_a_user_is_stored_hashed_and_the_password_never_shown(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(ACL_ADD_URL, acl_post([("ops", "correct horse")]))
    assert response.status_code == 302, page_text(response)
    acl = m.AccessList.objects.get(name="office")
    user = acl.users.get()
    assert access.PasswordHash(user.password_hash).verify(b"correct horse")
    assert acl.rules == "allow 10.0.0.0/8\ndeny ::/0\n"
    page = admin_client_logged_in.get(f"/admin/proxyadmin/accesslist/{acl.pk}/change/").content.decode()
    assert "correct horse" not in page and user.password_hash not in page


def test_bad_rules_and_users_are_refused_naming_the_line(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(ACL_ADD_URL, acl_post([("a:b", "x")], rules="allow 10.0.0.0/8\nallow 300.1.1.1"))
    text = page_text(response)
    assert "rule 2: '300.1.1.1' is not an IP address" in text
    assert "without colons" in text
    response = admin_client_logged_in.post(ACL_ADD_URL, acl_post([("ops", "")]))
    assert "A new user needs a password." in page_text(response)
    assert not m.AccessList.objects.exists()


def test_the_proxy_host_page_sets_the_list_and_the_limits(admin_client_logged_in: Client) -> None:
    acl = m.AccessList.objects.create(name="office", rules="allow 10.0.0.0/8\n")
    response = admin_client_logged_in.post(ADD_URL, route(
        tls="local_ca", access_list=str(acl.pk), rate_limit_rps="10", rate_limit_burst="20",
        rate_limit_connections="50"))
    assert response.status_code == 302, page_text(response)
    host = m.Host.objects.get()
    assert (host.access_list, host.rate_limit_rps, host.rate_limit_burst, host.rate_limit_connections) == (
        acl, 10.0, 20, 50)
    page = page_text(admin_client_logged_in.get(f"/admin/proxyadmin/host/{host.pk}/proxy-host/"))
    assert "Access list" in page and "Requests per second per client" in page


def test_the_proxy_host_page_refuses_a_rate_out_of_range(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(ADD_URL, route(tls="local_ca", rate_limit_rps="0"))
    assert response.status_code == 200
    assert "Ensure this value is greater than or equal to 0.01" in page_text(response)
    assert not m.Host.objects.exists()


def test_a_blank_password_keeps_the_stored_one(admin_client_logged_in: Client) -> None:
    admin_client_logged_in.post(ACL_ADD_URL, acl_post([("ops", "correct horse")]))
    acl = m.AccessList.objects.get()
    user = acl.users.get()
    data = acl_post([("ops", "")], **{"users-INITIAL_FORMS": "1", "users-0-id": str(user.pk),
                                      "users-0-access_list": str(acl.pk)})
    response = admin_client_logged_in.post(f"/admin/proxyadmin/accesslist/{acl.pk}/change/", data)
    assert response.status_code == 302, page_text(response)
    assert acl.users.get().password_hash == user.password_hash
