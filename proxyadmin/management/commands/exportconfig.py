"""``manage.py exportconfig``: write the whole proxy configuration as JSON.

Private keys are left out unless ``--with-keys``; then a warning goes to
stderr and an ``--output`` file is created readable by its owner only.
"""

from __future__ import annotations

import os
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from proxyadmin import configio, crypto

KEYS_WARNING = (
    "Warning: this export holds private keys in clear. Protect it like the keys themselves "
    "(owner-only file, encrypted storage) and delete it when it is no longer needed."
)


class Command(BaseCommand):
    help = "Write the proxy configuration as JSON to stdout or --output (keys only with --with-keys)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--with-keys", action="store_true",
            help="Include the certificates' private keys, in clear.",
        )
        parser.add_argument("--output", "-o", metavar="FILE", help="Write to FILE instead of stdout.")

    def handle(self, *args: Any, with_keys: bool, output: str | None, **options: Any) -> None:
        text = self.render(with_keys)
        if with_keys:
            self.stderr.write(KEYS_WARNING)
        if output:
            self.write_file(output, text, private=with_keys)
        else:
            self.stdout.write(text, ending="")

    def render(self, with_keys: bool) -> str:
        try:
            return configio.to_json(configio.export_config(with_keys=with_keys))
        except crypto.KeyConfigError as exc:
            raise CommandError(f"{exc} Nothing was exported.") from None

    def write_file(self, path: str, text: str, *, private: bool) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                if private:  # an existing file keeps its mode on open: narrow it before writing
                    os.fchmod(out.fileno(), 0o600)
                out.write(text)
        except OSError as exc:
            raise CommandError(f"Cannot write {path}: {exc.strerror}.") from None
        self.stderr.write(f"Wrote the configuration to {path}.")
