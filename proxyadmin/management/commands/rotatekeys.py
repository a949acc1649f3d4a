"""``manage.py rotatekeys``: re-encrypt every stored private key under the first key.

Put a new Fernet key in front of PROXYADMIN_KEYS (keep the old ones after it),
run this, then the old keys can be dropped.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import models, transaction

from proxyadmin import crypto
from proxyadmin.models import Certificate, LocalCA


class Command(BaseCommand):
    help = "Re-encrypt every stored private key under the first key of PROXYADMIN_KEYS."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            with transaction.atomic():
                counts = [self.rotate(model) for model in (Certificate, LocalCA)]
        except crypto.KeyConfigError as exc:
            raise CommandError(f"{exc} Nothing was changed.") from None
        rotated = sum(c[0] for c in counts)
        total = sum(c[1] for c in counts)
        self.stdout.write(
            f"Re-encrypted {rotated} of {total} stored keys under the first key of "
            f"{crypto.SETTING}; the other {total - rotated} already used it."
        )

    def rotate(self, model: type[models.Model]) -> tuple[int, int]:
        """Rotate ``model``'s key tokens; returns (rotated, total)."""
        rotated = total = 0
        rows = model.objects.select_for_update().values_list("pk", "key_token")  # type: ignore[attr-defined]
        for pk, token in rows:
            total += 1
            if crypto.is_current(token):
                continue
            # update(), not save(): the keys themselves do not change, so proxy
            # nodes need no reload and no config revision is made.
            model.objects.filter(pk=pk).update(key_token=crypto.rotate(token))  # type: ignore[attr-defined]
            rotated += 1
        return rotated, total
