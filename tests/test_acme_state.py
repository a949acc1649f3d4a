"""ACME on the control plane without a CA: the host field, import/export, the snapshot's
challenges, the lease, backoff and renewal times, the dashboard's warnings, the admin."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from proxyadmin import announce, configio, pki
from proxyadmin import models as m
from proxyadmin.acme.models import Account, Challenge, HostState, Lease, dashboard_warnings, renewal_time
from proxyadmin.snapshot import build_snapshot
from tests.conftest import make_cert

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def document(acme: Any, names: list[str]) -> dict[str, Any]:
    return {
        "format": "proxyadmin-config", "version": 1,
        "upstreams": [{"name": "app", "targets": [{"host": "127.0.0.1", "port": 9000}]}],
        "hosts": [{"name": "site", "names": names, "upstream": "app", "acme": acme}],
    }


def site(acme: str = "http-01", names: tuple[str, ...] = ("a.example", "b.example")) -> m.Host:
    outcomes = configio.import_config(document(acme, list(names)))
    assert not any(o.refused for o in outcomes), [o.line() for o in outcomes]
    return m.Host.objects.get(name="site")


def acme_certificate(host: m.Host, names: list[str], not_after: dt.datetime) -> m.Certificate:
    chain, key = make_cert(names, not_before=not_after - dt.timedelta(days=90), not_after=not_after)
    cert = m.Certificate(name=f"{host.name} (ACME)", source=m.Certificate.Source.ACME)
    cert.set_inspected(pki.inspect_upload(chain_pem=chain, key_pem=key, now=not_after - dt.timedelta(days=1)))
    cert.save()
    host.certificate = cert
    host.save()
    return cert


def test_a_wildcard_name_is_refused_on_an_acme_host_with_the_reason() -> None:
    outcomes = configio.import_config(document("http-01", ["*.example.com"]))
    [line] = [o.line() for o in outcomes if o.refused]
    assert "a wildcard name can only be validated by dns-01" in line
    # ACME off, the wildcard is fine: what is refused then is a host no certificate covers.
    [line] = [o.line() for o in configio.import_config(document(None, ["*.example.com"])) if o.refused]
    assert "dns-01" not in line and "No valid stored certificate covers *.example.com" in line


def test_the_export_carries_the_challenge_or_null_and_the_import_sets_it() -> None:
    site("any")
    assert configio.export_config()["hosts"][0]["acme"] == "any"
    # ACME off, the host needs a stored certificate that covers it.
    chain, key = make_cert(["a.example", "b.example"])
    cert = m.Certificate(name="covering")
    cert.set_inspected(pki.inspect_upload(chain_pem=chain, key_pem=key, now=timezone.now()))
    cert.save()
    configio.import_config(document(None, ["a.example", "b.example"]))
    assert m.Host.objects.get(name="site").acme == ""
    assert configio.export_config()["hosts"][0]["acme"] is None
    again = configio.import_config(document(None, ["a.example", "b.example"]))
    assert [o.verb for o in again] == ["unchanged", "unchanged"]
    [bad] = [o for o in configio.import_config(document("dns-01", ["a.example"])) if o.refused]
    assert "acme" in bad.line()


def test_a_host_whose_names_change_keeps_its_acme_certificate_until_the_new_one() -> None:
    host = site()
    acme_certificate(host, ["a.example", "b.example"], NOW + dt.timedelta(days=60))
    assert not any(o.refused for o in configio.import_config(document("http-01", ["a.example", "c.example"])))
    state = HostState.of(host)
    state.note_issued(host.certificate, NOW + dt.timedelta(days=30))  # type: ignore[arg-type]
    assert state.is_due(["a.example", "c.example"], NOW)  # c.example is not covered
    assert not state.is_due(["a.example", "b.example"], NOW)


def test_the_snapshot_carries_http01_tokens_and_tls_alpn01_digests() -> None:
    host = site("any")
    Challenge.objects.create(host=host, kind="http-01", name="a.example", token="tok", key_authorization="tok.thumb")
    Challenge.objects.create(host=host, kind="tls-alpn-01", name="b.example", token="t2", key_authorization="t2.thumb")
    snapshot = build_snapshot()
    assert snapshot.acme_challenges == (("tok", "tok.thumb"),)
    assert snapshot.acme_tls_alpn == (("b.example", hashlib.sha256(b"t2.thumb").digest()),)


def test_the_lease_is_held_by_one_worker_until_it_runs_out() -> None:
    assert Lease.acquire("acme-worker", "one", 60, NOW)
    assert not Lease.acquire("acme-worker", "two", 60, NOW + dt.timedelta(seconds=59))
    assert Lease.acquire("acme-worker", "one", 60, NOW + dt.timedelta(seconds=30))  # renewed
    assert not Lease.acquire("acme-worker", "two", 60, NOW + dt.timedelta(seconds=89))
    assert Lease.acquire("acme-worker", "two", 60, NOW + dt.timedelta(seconds=91))  # ran out
    Lease.release("acme-worker", "one")  # not its lease any more: nothing happens
    assert not Lease.acquire("acme-worker", "one", 60, NOW + dt.timedelta(seconds=92))


def test_failures_back_off_exponentially_up_to_six_hours() -> None:
    state = HostState.of(site())
    waits = []
    for _ in range(12):
        state.note_failure("urn:ietf:params:acme:error:connection", NOW)
        waits.append((state.next_attempt - NOW).total_seconds())  # type: ignore[operator]
    assert waits[:4] == [60, 120, 240, 480]
    assert waits[-1] == 6 * 3600
    assert not state.is_due(["a.example", "b.example"], NOW + dt.timedelta(hours=5))


def test_renewal_is_due_when_a_third_of_the_lifetime_is_left() -> None:
    start = NOW
    assert renewal_time(start, start + dt.timedelta(days=90)) == start + dt.timedelta(days=60)
    assert renewal_time(start, start + dt.timedelta(days=6)) == start + dt.timedelta(days=4)


def test_the_dashboard_warns_of_failing_orders_and_certificates_expiring_before_the_next_attempt() -> None:
    host = site()
    cert = acme_certificate(host, ["a.example", "b.example"], timezone.now() + dt.timedelta(hours=1))
    state = HostState.of(host)
    state.note_failure("Connection refused (connection)", timezone.now())
    state.next_attempt = timezone.now() + dt.timedelta(hours=2)
    state.save()
    warnings = dashboard_warnings(timezone.now())
    assert any("is failing (1 attempts): Connection refused" in w for w in warnings)
    assert any(f"the certificate '{cert.name}' of host 'site' expires" in w for w in warnings)
    assert set(warnings) <= set(announce.dashboard_state()["warnings"])


def test_the_admin_shows_the_acme_state_and_requests_now(admin_client_logged_in: Client) -> None:
    host = site()
    state = HostState.of(host)
    state.note_failure("Fetching http://a.example/.well-known/acme-challenge/x: Connection refused", NOW)
    page = admin_client_logged_in.get(f"/admin/proxyadmin/host/{host.pk}/change/").content.decode()
    assert "failing" in page and "Connection refused" in page and "next attempt" in page
    listing = admin_client_logged_in.get("/admin/proxyadmin/host/").content.decode()
    assert "request_acme_now" in listing
    admin_client_logged_in.post("/admin/proxyadmin/host/", {
        "action": "request_acme_now", "_selected_action": [str(host.pk)],
    })
    state.refresh_from_db()
    assert state.next_attempt is not None and state.next_attempt <= timezone.now()
    assert state.failures == 1  # the backoff still grows from here


def test_the_account_page_never_shows_the_keys(admin_client_logged_in: Client) -> None:
    account = Account.for_directory("https://acme.example/directory", "ops@example.com")
    account.set_eab_hmac_key("c2VjcmV0LWhtYWMta2V5LXZhbHVl")
    account.save()
    page = admin_client_logged_in.get(f"/admin/acme/account/{account.pk}/change/").content.decode()
    assert "encrypted at rest" in page
    assert "PRIVATE KEY" not in page and "c2VjcmV0LWhtYWMta2V5LXZhbHVl" not in page
    assert account.key_token not in page
    assert "BEGIN" not in account.key_token and account.eab_hmac_key() == "c2VjcmV0LWhtYWMta2V5LXZhbHVl"


def test_bad_acme_settings_stop_the_program_with_a_sentence(tmp_path: Any) -> None:
    from tests.test_settings_from_env import run_manage

    for env, words in [
        ({"PROXYADMIN_ACME_DIRECTORY": "acme.example/dir"}, "PROXYADMIN_ACME_DIRECTORY must be an https://"),
        ({"PROXYADMIN_ACME_CA_BUNDLE": str(tmp_path / "missing.pem")}, "PROXYADMIN_ACME_CA_BUNDLE names"),
        ({"PROXYADMIN_ACME_EMAIL": "ops at example.com"}, "PROXYADMIN_ACME_EMAIL must be one e-mail address"),
    ]:
        out = run_manage(["check"], env, tmp_path)
        assert out.returncode != 0 and words in out.stderr, out.stderr[-500:]
