"""Admin logins are throttled: 5 failures for a user name or 20 from an address within 15
minutes lock it out for 15 minutes, right password or not; through the real login page."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client, RequestFactory
from django.utils import timezone

from proxyadmin.loginguard.forms import client_address
from proxyadmin.loginguard.models import LoginFailures
from tests.conftest import page_text

pytestmark = [pytest.mark.usefixtures("fast_password_hashing"), pytest.mark.django_db]

LOGIN_URL = "/admin/login/?next=/admin/"
PASSWORD = "correct horse battery"
WRONG = "Please enter the correct username and password for a staff account."
LOCKED = ("Too many failed logins for this user name or from this address. "
          "Try again in 15 minutes.")


@pytest.fixture
def staff() -> None:
    for name in ("admin", "other"):
        User.objects.create_superuser(name, f"{name}@example.com", PASSWORD)


def log_in(user: str, password: str, address: str = "127.0.0.1") -> tuple[bool, str]:
    """One attempt through the admin's login page: (logged in, the page's text)."""
    client = Client(REMOTE_ADDR=address)
    response = client.post(LOGIN_URL, {"username": user, "password": password})
    if response.status_code == 302:
        assert response["Location"] == "/admin/"
        return True, ""
    assert response.status_code == 200
    return False, page_text(response)


def fail(times: int, user: str = "admin", address: str = "127.0.0.1") -> str:
    text = ""
    for _ in range(times):
        ok, text = log_in(user, "wrong password", address)
        assert not ok
    return text


def move_back(delta: dt.timedelta) -> None:
    """The clock, as the rows see it: every window and lock started ``delta`` earlier."""
    for row in LoginFailures.objects.all():
        row.window_start -= delta
        if row.locked_until is not None:
            row.locked_until -= delta
        row.save()


def test_four_failures_only_say_the_password_is_wrong(staff: None) -> None:
    assert WRONG in fail(4)
    assert log_in("admin", PASSWORD)[0]


def test_fifth_failure_locks_the_user_name_even_for_the_right_password(staff: None) -> None:
    assert LOCKED in fail(5)
    ok, text = log_in("admin", PASSWORD)
    assert not ok and LOCKED in text
    assert WRONG not in text


def test_a_locked_user_name_is_locked_from_every_address(staff: None) -> None:
    fail(5, address="192.0.2.1")
    ok, text = log_in("admin", PASSWORD, address="198.51.100.7")
    assert not ok and LOCKED in text


def test_another_user_still_logs_in_from_the_same_address(staff: None) -> None:
    fail(5, user="admin")
    assert log_in("other", PASSWORD)[0]


def test_twenty_failures_from_one_address_lock_it_for_every_user_name(staff: None) -> None:
    for index in range(5):
        fail(4, user=f"guess{index}", address="192.0.2.1")  # 20 failures, none locks a user name
    ok, text = log_in("other", PASSWORD, address="192.0.2.1")
    assert not ok and LOCKED in text
    assert log_in("other", PASSWORD, address="192.0.2.2")[0]


def test_the_lock_ends_after_fifteen_minutes(staff: None) -> None:
    fail(5)
    move_back(dt.timedelta(minutes=14, seconds=50))
    ok, text = log_in("admin", PASSWORD)
    assert not ok and "Try again in 1 minute." in text
    move_back(dt.timedelta(seconds=11))
    assert log_in("admin", PASSWORD)[0]


def test_failures_older_than_fifteen_minutes_do_not_count(staff: None) -> None:
    fail(4)
    move_back(dt.timedelta(minutes=15))
    assert WRONG in fail(4)
    assert log_in("admin", PASSWORD)[0]


def test_a_successful_login_clears_the_user_names_failures(staff: None) -> None:
    fail(4)
    assert log_in("admin", PASSWORD)[0]
    assert WRONG in fail(4)
    assert log_in("admin", PASSWORD)[0]


def test_user_name_case_does_not_escape_the_count(staff: None) -> None:
    for name in ("admin", "Admin", "ADMIN", "aDmin", "admiN"):
        fail(1, user=name)
    ok, text = log_in("admin", PASSWORD)
    assert not ok and LOCKED in text


def test_rows_hold_no_user_name_address_or_password(staff: None) -> None:
    fail(1, user="hunter2-typed-as-a-name", address="203.0.113.9")
    stored = repr(list(LoginFailures.objects.values()))
    for secret in ("hunter2", "203.0.113.9", "wrong password"):
        assert secret not in stored
    assert sorted(LoginFailures.objects.values_list("kind", "failures")) == [("address", 1), ("user", 1)]


def test_rows_past_their_window_and_lock_are_deleted(staff: None) -> None:
    fail(5, user="old", address="192.0.2.1")
    move_back(dt.timedelta(minutes=16))
    fail(1, user="new", address="192.0.2.2")
    assert sorted(LoginFailures.objects.values_list("kind", "failures")) == [("address", 1), ("user", 1)]


def test_an_empty_form_is_not_counted(staff: None) -> None:
    response = Client().post(LOGIN_URL, {"username": "admin", "password": ""})
    assert response.status_code == 200
    assert not LoginFailures.objects.exists()


def request_from(remote: str, forwarded: str | None = None) -> Any:
    headers = {"HTTP_X_FORWARDED_FOR": forwarded} if forwarded is not None else {}
    return RequestFactory().post("/admin/login/", REMOTE_ADDR=remote, **headers)


def test_forwarded_address_counts_only_when_the_admin_is_behind_the_proxy(settings: Any) -> None:
    settings.HTTPS = False
    assert client_address(request_from("127.0.0.1", "192.0.2.1")) == "127.0.0.1"
    settings.HTTPS = True
    assert client_address(request_from("127.0.0.1", "192.0.2.1")) == "192.0.2.1"
    assert client_address(request_from("127.0.0.1", "10.9.9.9, 192.0.2.1")) == "192.0.2.1"
    assert client_address(request_from("127.0.0.1")) == "127.0.0.1"


def test_an_ipv6_client_counts_as_its_slash_64(settings: Any) -> None:
    settings.HTTPS = False
    assert client_address(request_from("2001:db8:1:2:aaaa::1")) == "2001:db8:1:2::/64"
    assert client_address(request_from("2001:db8:1:2:bbbb::7")) == "2001:db8:1:2::/64"


def test_lock_state_is_shared_through_the_database(staff: None) -> None:
    # What another daphne process would see: a lock made by a row alone.
    keys = LoginFailures.keys_for("admin", "127.0.0.1")
    LoginFailures.objects.create(key=keys[0].key, kind="user", window_start=timezone.now(),
                                 locked_until=timezone.now() + dt.timedelta(minutes=15))
    ok, text = log_in("admin", PASSWORD)
    assert not ok and LOCKED in text


def test_staff_lift_a_lock_by_deleting_its_row_in_the_admin(staff: None) -> None:
    fail(5)
    client = Client()
    client.force_login(User.objects.get(username="other"))
    assert client.get("/admin/loginguard/loginfailures/").status_code == 200
    for row in LoginFailures.objects.filter(kind="user"):
        response = client.post(f"/admin/loginguard/loginfailures/{row.pk}/delete/", {"post": "yes"})
        assert response.status_code == 302
    assert log_in("admin", PASSWORD)[0]
