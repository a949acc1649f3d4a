"""The certificate form's check: the upload validated as Save would, nothing saved.

``certificate.js`` posts the form here before it submits it, so a refused upload keeps its
files and key in the browser (tests/test_certificate_form_browser.py drives that).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trustme
from django.contrib.auth.models import Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from proxyadmin.models import Certificate
from tests.conftest import make_cert, page_text, pem_chain_with_root

ADD_URL = "/admin/proxyadmin/certificate/add/"
CHECK_URL = "/admin/proxyadmin/certificate/check/"

pytestmark = pytest.mark.usefixtures("fast_password_hashing")


def upload(**fields: Any) -> dict[str, Any]:
    return {"name": "site", "chain_pem": "", "key_pem": "", "passphrase": "", **fields}


def errors(response: Any) -> dict[str, list[str]]:
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"
    return dict(json.loads(response.content)["errors"])


@pytest.mark.django_db
def test_check_returns_the_errors_per_field_and_saves_nothing(admin_client_logged_in: Client) -> None:
    chain, _ = make_cert(["site.example"])
    _, other_key = make_cert(["site.example"])
    response = admin_client_logged_in.post(CHECK_URL, upload(
        chain_file=SimpleUploadedFile("chain.pem", chain),
        key_file=SimpleUploadedFile("key.pem", other_key)))
    assert errors(response) == {
        "key_pem": ["The private key does not match the certificate: they are not a pair."]}
    assert not Certificate.objects.exists()


@pytest.mark.django_db
def test_check_never_sends_the_key_back(admin_client_logged_in: Client) -> None:
    chain, key = make_cert(["site.example"])
    for fields in ({"chain_pem": chain.decode(), "key_pem": key.decode(), "name": ""},
                   {"chain_pem": "x" + key.decode()}):
        response = admin_client_logged_in.post(CHECK_URL, upload(**fields))
        assert errors(response)
        body = response.content.decode()
        assert "PRIVATE KEY" not in body
        assert key.decode().splitlines()[1] not in body


@pytest.mark.django_db
def test_check_of_a_good_upload_has_no_errors_and_saves_nothing(
    admin_client_logged_in: Client, ca: trustme.CA
) -> None:
    leaf = ca.issue_cert("site.example")
    response = admin_client_logged_in.post(CHECK_URL, upload(
        chain_pem=pem_chain_with_root(ca, leaf).decode(), key_pem=leaf.private_key_pem.bytes().decode()))
    assert errors(response) == {}
    assert not Certificate.objects.exists()


@pytest.mark.django_db
def test_check_on_edit_uses_the_stored_key_and_changes_nothing(
    admin_client_logged_in: Client, ca: trustme.CA
) -> None:
    leaf = ca.issue_cert("site.example")
    chain = pem_chain_with_root(ca, leaf).decode()
    admin_client_logged_in.post(ADD_URL, upload(
        chain_pem=chain, key_pem=leaf.private_key_pem.bytes().decode(), _save="Save"))
    stored = Certificate.objects.get()
    url = f"/admin/proxyadmin/certificate/{stored.pk}/check/"
    assert errors(admin_client_logged_in.post(url, upload(name="renamed", chain_pem=chain))) == {}
    other, _ = make_cert(["site.example"])
    assert errors(admin_client_logged_in.post(url, upload(chain_pem=other.decode()))) == {
        "key_pem": ["The new certificate is not for the stored private key: "
                    "paste or upload its own key too."]}
    stored.refresh_from_db()
    assert (stored.name, stored.chain_pem) == ("site", chain)


@pytest.mark.django_db
def test_check_answers_only_a_post() -> None:
    User.objects.create_superuser("admin", "admin@example.com", "pw")
    client = Client()
    client.force_login(User.objects.get())
    assert client.get(CHECK_URL).status_code == 405


@pytest.mark.django_db
def test_check_refuses_a_post_without_the_csrf_token() -> None:
    user = User.objects.create_superuser("admin", "admin@example.com", "pw")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(CHECK_URL, upload()).status_code == 403
    client.get(ADD_URL)
    token = client.cookies["csrftoken"].value
    assert client.post(CHECK_URL, upload(csrfmiddlewaretoken=token)).status_code == 200


@pytest.mark.django_db
def test_check_is_for_staff_who_may_add_certificates() -> None:
    assert Client().post(CHECK_URL, upload()).status_code == 302  # to the login page
    user = User.objects.create_user("viewer", password="pw")
    client = Client()
    client.force_login(user)
    assert client.post(CHECK_URL, upload()).status_code == 302  # not staff: the login page again
    user.is_staff = True
    user.save()
    user.user_permissions.add(Permission.objects.get(codename="view_certificate"))
    assert client.post(CHECK_URL, upload()).status_code == 403


@pytest.mark.django_db
def test_certificate_form_loads_the_check_script_with_its_url(admin_client_logged_in: Client) -> None:
    html = page_text(admin_client_logged_in.get(ADD_URL))
    assert 'src="/static/proxyadmin/certificate.js"' in html
    assert f'id="certificate-check" hidden data-url="{CHECK_URL}"' in html
