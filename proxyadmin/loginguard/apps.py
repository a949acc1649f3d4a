"""The login-throttling app: its own migrations, apart from the proxy configuration's."""

from __future__ import annotations

from django.apps import AppConfig


class LoginGuardConfig(AppConfig):
    name = "proxyadmin.loginguard"
    label = "loginguard"
    verbose_name = "Login throttling"
    default_auto_field = "django.db.models.BigAutoField"
