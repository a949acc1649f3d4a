"""``manage.py importconfig FILE``: apply a JSON config made by ``exportconfig``.

Every object is validated with the admin's forms first; the import is applied
whole, as one config revision, or not at all. It merges: objects are matched by
name, created or updated, and objects missing from the file are left alone.
"""

from __future__ import annotations

import sys
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from proxyadmin import configio, crypto


class Command(BaseCommand):
    help = (
        "Import the proxy configuration from a JSON file made by exportconfig. "
        "Merges by name; never deletes objects missing from the file."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("file", help="The JSON file, or - for standard input.")
        parser.add_argument(
            "--dry-run", action="store_true",
            help="Validate and report what would change, then apply nothing.",
        )

    def handle(self, *args: Any, file: str, dry_run: bool, **options: Any) -> None:
        document = self.read(file)
        outcomes = self.apply(document, dry_run)
        for outcome in outcomes:
            self.stdout.write(outcome.line())
        self.conclude(outcomes, dry_run)

    def read(self, path: str) -> dict[str, Any]:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"Cannot read {path}: {exc.strerror}.") from None
        except UnicodeDecodeError:
            raise CommandError(f"{path} is not UTF-8 text; nothing was imported.") from None
        try:
            return configio.read_document(text)
        except configio.ConfigFileError as exc:
            raise CommandError(f"{path}: {exc} Nothing was imported.") from None

    def apply(self, document: dict[str, Any], dry_run: bool) -> list[configio.Outcome]:
        try:
            return configio.import_config(document, dry_run=dry_run)
        except crypto.KeyConfigError as exc:
            raise CommandError(f"{exc} Nothing was imported.") from None
        except DatabaseError as exc:
            raise CommandError(f"The database refused the import ({exc}); nothing was imported.") from None

    def conclude(self, outcomes: list[configio.Outcome], dry_run: bool) -> None:
        refused = sum(outcome.refused for outcome in outcomes)
        if refused:
            raise CommandError(
                f"{refused} of {len(outcomes)} objects refused (see above); nothing was imported."
            )
        counts = ", ".join(
            f"{sum(o.verb == verb for o in outcomes)} {verb}"
            for verb in ("created", "changed", "unchanged")
        )
        if dry_run:
            self.stdout.write(f"Dry run: {len(outcomes)} objects valid ({counts}); nothing was imported.")
        else:
            self.stdout.write(self.style.SUCCESS(f"Imported {len(outcomes)} objects ({counts})."))
