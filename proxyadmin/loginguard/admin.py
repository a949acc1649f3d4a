"""Login failures in the admin: staff look, and delete a row to lift its lock early."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from proxyadmin.loginguard.models import LoginFailures


@admin.register(LoginFailures)
class LoginFailuresAdmin(admin.ModelAdmin):
    list_display = ["kind", "failures", "window_start", "locked_until"]
    list_filter = ["kind"]
    readonly_fields = ["kind", "key", "failures", "window_start", "locked_until"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
