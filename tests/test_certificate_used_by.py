"""Which hosts a certificate is served to: its page and the certificate list say so.

A host that chose the certificate, and one that gets it by automatic choice (the valid
certificate covering all its names that expires last), are both listed, marked "chosen"
or "automatic"; of several certificates for the same names, only the one served lists
the host.
"""

from __future__ import annotations

import pytest
from django.test import Client

from tests.conftest import page_text
from tests.test_admin_pages import changelist_row, store
from tests.test_host_list_status import host, in_days

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

CERTIFICATES_URL = "/admin/proxyadmin/certificate/"


def used_by(client: Client, cert_pk: int) -> str:
    text = page_text(client.get(f"{CERTIFICATES_URL}{cert_pk}/change/"))
    return text.split('class="form-row field-used_by"')[1].split('class="form-row')[0]


def test_certificate_page_lists_a_host_that_uses_it_by_automatic_choice(
    admin_client_logged_in: Client,
) -> None:
    cert = store("site", ["www.example.com"], in_days(90))
    web = host("web", ("www.example.com",))
    text = used_by(admin_client_logged_in, cert.pk)
    assert f'<a href="/admin/proxyadmin/host/{web.pk}/change/">web</a> (automatic)' in text


def test_certificate_page_lists_a_host_that_chose_it(admin_client_logged_in: Client) -> None:
    cert = store("site", ["www.example.com"], in_days(90))
    host("web", ("www.example.com",), certificate=cert, enabled=False)
    assert ">web</a> (chosen, host disabled)" in used_by(admin_client_logged_in, cert.pk)


def test_certificate_page_of_a_certificate_no_host_is_served_says_so(
    admin_client_logged_in: Client,
) -> None:
    cert = store("other", ["other.example.com"], in_days(90))
    host("web", ("www.example.com",), certificate=store("site", ["www.example.com"], in_days(90)))
    assert "not served" in used_by(admin_client_logged_in, cert.pk)


def test_list_marks_which_of_two_certificates_for_the_same_names_is_served(
    admin_client_logged_in: Client,
) -> None:
    store("older", ["www.example.com"], in_days(30))
    store("newer", ["www.example.com"], in_days(90))
    host("web", ("www.example.com",))
    text = page_text(admin_client_logged_in.get(CERTIFICATES_URL))
    assert '<th scope="col" class="column-serving">' in text
    assert ">web</a> (automatic)" in changelist_row(text, "newer")
    assert "not served" in changelist_row(text, "older")
    assert ">web</a>" not in changelist_row(text, "older")


def test_list_shows_the_chosen_certificate_as_served_over_a_later_one(
    admin_client_logged_in: Client,
) -> None:
    older = store("older", ["www.example.com"], in_days(30))
    store("newer", ["www.example.com"], in_days(90))
    host("web", ("www.example.com",), certificate=older)
    host("api", ("*.example.com",))
    text = page_text(admin_client_logged_in.get(CERTIFICATES_URL))
    assert ">web</a> (chosen)" in changelist_row(text, "older")
    assert "not served" in changelist_row(text, "newer")
