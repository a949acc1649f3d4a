"""The ACME app: its own models and migrations, apart from the proxy configuration's."""

from __future__ import annotations

from django.apps import AppConfig


class AcmeConfig(AppConfig):
    name = "proxyadmin.acme"
    label = "acme"
    verbose_name = "Automatic certificates (ACME)"
    default_auto_field = "django.db.models.BigAutoField"
