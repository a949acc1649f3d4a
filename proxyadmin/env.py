"""Small helpers that read settings from the environment (healthchecks style).

Every helper fails with ``ImproperlyConfigured`` and a plain sentence naming the
variable, never with a traceback deep inside Django. Secrets that are not given
are generated once into files under ``var/`` with mode 0600.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


def envbool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ImproperlyConfigured(f"{name} must be one of true/false/1/0/yes/no, not {raw!r}.")


def envint(name: str, default: int, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, not {raw!r}.") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {value}.")
    return value


def envfloat(name: str, default: float, minimum: float, maximum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {raw!r}.") from None
    if not minimum <= value <= maximum:
        raise ImproperlyConfigured(f"{name} must be from {minimum:g} to {maximum:g}, not {raw.strip()}.")
    return value


def envlist(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def read_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """Return the secret stored in ``path``, creating it (mode 0600) on first use."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if value:
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    # O_EXCL: if two processes start at once, one wins and the other reads its file.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def private_sqlite_file(path: Path) -> None:
    """Make the SQLite database owner-only (0600) before anything opens it.

    SQLite gives the ``-wal`` and ``-shm`` files it creates the database file's
    mode, so creating the database 0600 covers them; files left by an older
    version with the umask's mode are tightened here too.
    """
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))
    for name in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))):
        try:
            if name.stat().st_mode & 0o077:
                name.chmod(0o600)
        except FileNotFoundError:
            continue


def secret_from_env_or_file(name: str, path: Path, make: Callable[[], str]) -> str:
    raw = os.environ.get(name)
    if raw is not None and raw.strip():
        return raw.strip()
    return read_or_create_secret(path, make)


def random_secret_key() -> str:
    return secrets.token_urlsafe(50)


def envurl(name: str, default: str) -> str:
    """An http(s) URL, or ``default`` when the variable is unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.startswith(("https://", "http://")) or len(raw) < len("http://x"):
        raise ImproperlyConfigured(f"{name} must be an https:// (or http://) URL, not {raw!r}.")
    return raw


def envfile(name: str) -> str:
    """The path of a readable file, or "" when the variable is unset or empty."""
    raw = os.environ.get(name, "").strip()
    if raw and not Path(raw).is_file():
        raise ImproperlyConfigured(f"{name} names {raw!r}, which is not a readable file.")
    return raw
