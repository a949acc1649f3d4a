"""App configuration: connects the signals that make and announce config revisions."""

from __future__ import annotations

from django.apps import AppConfig


class ProxyAdminConfig(AppConfig):
    name = "proxyadmin"
    verbose_name = "Proxy configuration"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here, not at the top: Django imports this module before the models exist.
        from proxyadmin import announce, revisions

        revisions.connect_signals()
        announce.connect_signals()
