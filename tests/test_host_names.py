"""Host names: normalised to one stored form, checked for validity, uniqueness and coverage."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from proxyadmin import pki
from proxyadmin.models import Certificate, Host, HostName, Upstream
from proxycore.names import InvalidHostname, name_matches, normalize_hostname, uncovered_names
from tests.conftest import make_cert, page_text

HOST_ADD_URL = "/admin/proxyadmin/host/add/"


pytestmark = pytest.mark.usefixtures("fast_password_hashing")


def stored_certificate(name: str, sans: list[str]) -> Certificate:
    cert_pem, key_pem = make_cert(sans)
    inspected = pki.inspect_upload(chain_pem=cert_pem, key_pem=key_pem, now=timezone.now())
    cert = Certificate(name=name)
    cert.set_inspected(inspected)
    cert.save()
    return cert


def host_post(upstream: Upstream, names: list[str], **fields: Any) -> dict[str, Any]:
    """The POST of the host add page: the host's fields and its inline names."""
    data: dict[str, Any] = {
        "name": "web",
        "enabled": "on",
        "mode": "http",
        "upstream": str(upstream.pk),
        "certificate": "",
        "max_body_size": "10485760",
        "hsts_policy": "",
        "redirect_http": "on",
        "redirect_status": "308",
        "client_auth": "off",
        "client_ca": "",
        "forward_client_cert": "on",
        "proxy_protocol": "off",
        "names-TOTAL_FORMS": str(len(names)),
        "names-INITIAL_FORMS": "0",
        "names-MIN_NUM_FORMS": "0",
        "names-MAX_NUM_FORMS": "1000",
        "_save": "Save",
    }
    for index, name in enumerate(names):
        data[f"names-{index}-name"] = name
    data.update(fields)
    return data


@pytest.fixture
def upstream(db: None) -> Upstream:
    upstream = Upstream.objects.create(name="app")
    upstream.targets.create(host="127.0.0.1", port=9000)
    return upstream


# --- normalisation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("WWW.Example.COM", "www.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("bücher\u3002example", "xn--bcher-kva.example"),  # ideographic full stop
        ("www\uff0eexample\uff0ecom", "www.example.com"),  # fullwidth full stop
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("example.com.", "example.com"),
        ("  example.com  ", "example.com"),
        ("*.Example.com", "*.example.com"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("localhost", "localhost"),
    ],
)
def test_names_are_stored_lower_case_punycode_without_trailing_dot(raw: str, stored: str) -> None:
    assert normalize_hostname(raw) == stored


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("a.*.example.com", "'a.*.example.com': '*' is allowed only as the whole left-most label."),
        ("f*o.example.com", "'f*o.example.com': '*' is allowed only as the whole left-most label."),
        ("*.com", "'*.com': a wildcard needs at least two labels after '*.'."),
        ("*", "'*': a wildcard needs at least two labels after '*.'."),
        ("192.0.2.10", "'192.0.2.10' is an IP address; TLS clients send names, not addresses"),
        ("[2001:db8::1]", "'[2001:db8::1]' is an IP address"),
        ("a" * 64 + ".example.com", "may hold only letters, digits and inner hyphens, up to 63"),
        ("_dmarc.example.com", "the label '_dmarc' may hold only letters, digits and inner hyphens"),
        ("-web.example.com", "the label '-web' may hold only letters"),
        ("web..example.com", "the label '' may hold only letters"),
        ("", "A host name cannot be empty."),
        (".", "A host name cannot be empty."),
        (".".join(["abcdefghi"] * 26), "is longer than 253 characters."),
    ],
)
def test_invalid_names_are_refused_with_the_reason(raw: str, message: str) -> None:
    with pytest.raises(InvalidHostname) as info:
        normalize_hostname(raw)
    assert message in str(info.value)


# --- matching -----------------------------------------------------------------------------


def test_exact_name_matches_only_itself() -> None:
    assert name_matches("www.example.com", "www.example.com")
    assert not name_matches("www.example.com", "example.com")
    assert not name_matches("www.example.com", "a.www.example.com")


def test_wildcard_covers_exactly_one_label() -> None:
    assert name_matches("*.example.com", "a.example.com")
    assert name_matches("*.example.com", "*.example.com")
    assert not name_matches("*.example.com", "example.com")
    assert not name_matches("*.example.com", "a.b.example.com")
    assert not name_matches("*.example.com", ".example.com")
    assert not name_matches("*.example.com", "a.example.org")


def test_wildcard_name_is_not_covered_by_a_wider_wildcard() -> None:
    assert not name_matches("*.example.com", "*.a.example.com")


def test_uncovered_names_lists_what_no_pattern_covers_in_order() -> None:
    sans = ["example.com", "*.Example.com"]
    names = ["example.com", "www.example.com", "a.b.example.com", "example.org"]
    assert uncovered_names(sans, names) == ["a.b.example.com", "example.org"]
    assert uncovered_names([], ["example.com"]) == ["example.com"]
    assert uncovered_names(sans, []) == []


# --- the host admin -----------------------------------------------------------------------


@pytest.mark.django_db
def test_host_add_page_has_the_names_inline_management_form(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    response = admin_client_logged_in.get(HOST_ADD_URL)
    assert response.status_code == 200
    body = response.content.decode()
    for field in ("TOTAL_FORMS", "INITIAL_FORMS", "MIN_NUM_FORMS", "MAX_NUM_FORMS"):
        assert f'name="names-{field}"' in body
    assert 'name="names-0-name"' in body


@pytest.mark.django_db
def test_host_with_inline_names_is_saved_with_normalised_names(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    stored_certificate("covering", ["*.example.com", "xn--bcher-kva.example"])
    response = admin_client_logged_in.post(
        HOST_ADD_URL, host_post(upstream, ["WWW.Example.COM", "bücher.example", "api.example.com."])
    )
    assert response.status_code == 302, page_text(response)
    host = Host.objects.get(name="web")
    assert sorted(host.hostnames()) == ["api.example.com", "www.example.com", "xn--bcher-kva.example"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("a.*.example.com", "'*' is allowed only as the whole left-most label."),
        ("*.com", "a wildcard needs at least two labels after '*.'."),
        ("192.0.2.10", "is an IP address; TLS clients send names, not addresses, in SNI."),
        ("a" * 64 + ".example.com", "up to 63 characters."),
        ("under_score.example.com", "the label 'under_score' may hold only letters, digits"),
    ],
)
def test_host_with_an_invalid_name_is_refused_with_the_reason(
    admin_client_logged_in: Client, upstream: Upstream, raw: str, message: str
) -> None:
    response = admin_client_logged_in.post(HOST_ADD_URL, host_post(upstream, [raw]))
    assert response.status_code == 200
    assert message in page_text(response)
    assert not Host.objects.exists()


@pytest.mark.django_db
def test_host_needs_at_least_one_name(admin_client_logged_in: Client, upstream: Upstream) -> None:
    response = admin_client_logged_in.post(HOST_ADD_URL, host_post(upstream, [""]))
    assert response.status_code == 200
    assert "A host needs at least one name." in page_text(response)
    assert not Host.objects.exists()


@pytest.mark.django_db
def test_the_same_name_twice_in_one_host_is_refused(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    response = admin_client_logged_in.post(
        HOST_ADD_URL, host_post(upstream, ["www.example.com", "WWW.example.com."])
    )
    assert response.status_code == 200
    assert "'www.example.com' is listed twice." in page_text(response)


@pytest.mark.django_db
def test_name_used_by_another_host_is_refused_naming_that_host(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    other = Host.objects.create(name="shop", upstream=upstream)
    HostName.objects.create(host=other, name="www.example.com")
    response = admin_client_logged_in.post(HOST_ADD_URL, host_post(upstream, ["WWW.example.com"]))
    assert response.status_code == 200
    assert "'www.example.com' is already used by host 'shop'." in page_text(response)
    assert list(Host.objects.values_list("name", flat=True)) == ["shop"]


@pytest.mark.django_db
def test_certificate_not_covering_the_names_is_refused_naming_the_missing_names(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    cert = stored_certificate("example", ["example.com", "*.example.com"])
    response = admin_client_logged_in.post(
        HOST_ADD_URL,
        host_post(
            upstream,
            ["www.example.com", "a.b.example.com", "example.org"],
            certificate=str(cert.pk),
        ),
    )
    assert response.status_code == 200
    assert (
        "The certificate 'example' does not cover a.b.example.com, example.org "
        "(it covers: example.com, *.example.com)."
    ) in page_text(response)
    assert not Host.objects.exists()


@pytest.mark.django_db
def test_certificate_covering_the_names_through_a_wildcard_is_accepted(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    cert = stored_certificate("example", ["*.example.com"])
    response = admin_client_logged_in.post(
        HOST_ADD_URL, host_post(upstream, ["www.example.com"], certificate=str(cert.pk))
    )
    assert response.status_code == 302, page_text(response)
    assert Host.objects.get(name="web").certificate == cert


@pytest.mark.django_db
def test_editing_a_host_keeps_its_own_names_without_a_conflict(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    host = Host.objects.create(name="web", upstream=upstream)
    kept = HostName.objects.create(host=host, name="www.example.com")
    stored_certificate("covering", ["*.example.com"])
    data = host_post(upstream, ["www.example.com", "Api.Example.com"])
    data.update({"names-INITIAL_FORMS": "1", "names-0-id": str(kept.pk), "names-0-host": str(host.pk)})
    response = admin_client_logged_in.post(f"/admin/proxyadmin/host/{host.pk}/change/", data)
    assert response.status_code == 302, page_text(response)
    assert sorted(host.hostnames()) == ["api.example.com", "www.example.com"]


@pytest.mark.django_db
def test_deleting_every_name_of_a_host_is_refused(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    host = Host.objects.create(name="web", upstream=upstream)
    only = HostName.objects.create(host=host, name="www.example.com")
    data = host_post(upstream, ["www.example.com"])
    data.update({"names-INITIAL_FORMS": "1", "names-0-id": str(only.pk),
                 "names-0-host": str(host.pk), "names-0-DELETE": "on"})
    response = admin_client_logged_in.post(f"/admin/proxyadmin/host/{host.pk}/change/", data)
    assert response.status_code == 200
    assert "A host needs at least one name." in page_text(response)
    assert host.hostnames() == ["www.example.com"]


@pytest.mark.django_db
def test_choosing_a_certificate_that_misses_a_kept_name_is_refused(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    host = Host.objects.create(name="web", upstream=upstream)
    kept = HostName.objects.create(host=host, name="www.example.com")
    cert = stored_certificate("other", ["www.example.org"])
    data = host_post(upstream, ["www.example.com"], certificate=str(cert.pk))
    data.update({"names-INITIAL_FORMS": "1", "names-0-id": str(kept.pk), "names-0-host": str(host.pk)})
    response = admin_client_logged_in.post(f"/admin/proxyadmin/host/{host.pk}/change/", data)
    assert response.status_code == 200
    assert (
        "The certificate 'other' does not cover www.example.com (it covers: www.example.org)."
        in page_text(response)
    )
    host.refresh_from_db()
    assert host.certificate is None
