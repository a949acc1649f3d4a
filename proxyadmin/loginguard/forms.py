"""The admin's login form, throttled by ``LoginFailures``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
from typing import Any

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import ValidationError
from django.http import HttpRequest
from django.utils import timezone

from proxyadmin.loginguard.models import LoginFailures


def client_address(request: HttpRequest) -> str:
    """The address a login attempt is counted against.

    ``REMOTE_ADDR``, except with ``PROXYADMIN_HTTPS``, where the admin is reached
    through this proxy (settings trust its ``X-Forwarded-Proto`` then): the proxy
    replaces any ``X-Forwarded-For`` a client sends with the client's address.
    An IPv6 client counts as its /64, which one host can fill with addresses.
    """
    address = request.META.get("REMOTE_ADDR") or ""
    if settings.HTTPS:
        address = request.META.get("HTTP_X_FORWARDED_FOR", "").rsplit(",", 1)[-1].strip() or address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address or "unknown"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class ThrottledAuthenticationForm(AdminAuthenticationForm):
    """Refuses a login while its user name or client address is locked out, and counts failures."""

    error_messages = {
        **AdminAuthenticationForm.error_messages,
        "throttled": "Too many failed logins for this user name or from this address. "
        "Try again in %(wait)s.",
    }

    def clean(self) -> dict[str, Any]:
        user_name = self.cleaned_data.get("username")
        if not user_name or self.cleaned_data.get("password") is None or self.request is None:
            return super().clean()  # a missing field reports itself
        keys = LoginFailures.keys_for(user_name, client_address(self.request))
        now = timezone.now()
        locked_until = LoginFailures.locked_until_for(keys, now)
        if locked_until is not None:
            raise self.throttled(locked_until - now)
        try:
            cleaned = super().clean()
        except ValidationError:
            locked_until = LoginFailures.record_failure(keys, now)
            if locked_until is not None:
                raise self.throttled(locked_until - now) from None
            raise
        LoginFailures.forget(keys[0])
        return cleaned

    def throttled(self, left: dt.timedelta) -> ValidationError:
        minutes = max(1, math.ceil(left.total_seconds() / 60))
        wait = "1 minute" if minutes == 1 else f"{minutes} minutes"
        return ValidationError(self.error_messages["throttled"], code="throttled", params={"wait": wait})
