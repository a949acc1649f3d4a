"""Failed admin logins, counted per user name and per client address, in the database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import NamedTuple

from django.db import models, transaction
from django.utils.crypto import salted_hmac


class ThrottleKey(NamedTuple):
    kind: str
    key: str


class LoginFailures(models.Model):
    """Failed logins of one user name or one client address in the current window.

    Rows are keyed by an HMAC of the name or address (with the secret key), so a
    password typed into the user name field is never stored. Only names and
    addresses that failed within the last ``WINDOW`` or are locked have a row:
    each failure first deletes the rows past both, and an address may make at
    most ``LIMITS[ADDRESS]`` rows per window before it is locked out.
    """

    class Kind(models.TextChoices):
        USER = "user", "user name"
        ADDRESS = "address", "client address"

    # Online guessing gets at most 5 tries per account and 20 per address every 15
    # minutes; a person who mistypes a password a few times is not locked out.
    LIMITS = {Kind.USER: 5, Kind.ADDRESS: 20}
    WINDOW = dt.timedelta(minutes=15)
    LOCKOUT = dt.timedelta(minutes=15)

    key = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    failures = models.PositiveIntegerField(default=0)
    window_start = models.DateTimeField(db_index=True)
    locked_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "login failures"

    def __str__(self) -> str:
        return f"{self.kind} {self.key[:12]}: {self.failures} failures"

    @staticmethod
    def keys_for(user_name: str, address: str) -> tuple[ThrottleKey, ThrottleKey]:
        """The (user name, address) keys of a login attempt."""
        def digest(kind: str, value: str) -> str:
            return salted_hmac("proxyadmin.loginguard", f"{kind}:{value}", algorithm="sha256").hexdigest()

        kinds = LoginFailures.Kind
        return (ThrottleKey(kinds.USER, digest(kinds.USER, user_name.casefold())),
                ThrottleKey(kinds.ADDRESS, digest(kinds.ADDRESS, address)))

    @classmethod
    def locked_until_for(cls, keys: Sequence[ThrottleKey], now: dt.datetime) -> dt.datetime | None:
        """When the latest lock on any of ``keys`` ends, if one is in force."""
        locks = cls.objects.filter(key__in=[k.key for k in keys], locked_until__gt=now)
        return locks.aggregate(until=models.Max("locked_until"))["until"]

    @classmethod
    def record_failure(cls, keys: Sequence[ThrottleKey], now: dt.datetime) -> dt.datetime | None:
        """Count a failed login against each key; when a lock now holds, when it ends."""
        with transaction.atomic():
            cls.objects.filter(
                models.Q(locked_until__isnull=True) | models.Q(locked_until__lte=now),
                window_start__lte=now - cls.WINDOW,
            ).delete()
            for kind, key in keys:
                row, _ = cls.objects.select_for_update().get_or_create(
                    key=key, defaults={"kind": kind, "window_start": now}
                )
                row.count_failure(now)
                row.save()
        return cls.locked_until_for(keys, now)

    def count_failure(self, now: dt.datetime) -> None:
        if self.window_start <= now - self.WINDOW:
            self.failures, self.window_start = 0, now
        self.failures += 1
        if self.failures >= self.LIMITS[self.Kind(self.kind)]:
            self.locked_until = now + self.LOCKOUT
            self.failures, self.window_start = 0, now

    @classmethod
    def forget(cls, key: ThrottleKey) -> None:
        cls.objects.filter(key=key.key).delete()
