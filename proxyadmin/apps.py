"""App configuration: wires the signals that bump the config revision."""

from __future__ import annotations

from django.apps import AppConfig


class ProxyAdminConfig(AppConfig):
    name = "proxyadmin"
    verbose_name = "Proxy configuration"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from proxyadmin import revisions

        revisions.connect_signals()
