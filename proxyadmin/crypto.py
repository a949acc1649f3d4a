"""Private keys at rest: MultiFernet over the keys in ``settings.PROXYADMIN_KEYS``.

The first key encrypts; every key decrypts, so a new key can be put in front and
``manage.py rotatekeys`` re-encrypts the stored tokens under it. Errors name the
setting, never the key material.
"""

from __future__ import annotations

import binascii

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

SETTING = "PROXYADMIN_KEYS"


class KeyConfigError(Exception):
    """The key-encryption keys are missing, malformed, or do not open a stored token."""


def parse_keys(raw: str) -> list[Fernet]:
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if not parts:
        raise KeyConfigError(f"{SETTING} is empty: give at least one Fernet key.")
    keys = []
    for index, part in enumerate(parts, start=1):
        try:
            keys.append(Fernet(part.encode()))
        except (ValueError, binascii.Error):
            raise KeyConfigError(
                f"{SETTING}: key number {index} is not a Fernet key "
                "(32 url-safe base64-encoded bytes, as Fernet.generate_key() makes)."
            ) from None
    return keys


def _multifernet() -> MultiFernet:
    return MultiFernet(parse_keys(str(getattr(settings, SETTING, "") or "")))


def encrypt(plaintext: bytes) -> str:
    return _multifernet().encrypt(plaintext).decode("ascii")


def decrypt(token: str) -> bytes:
    try:
        return _multifernet().decrypt(token.encode("ascii"))
    except InvalidToken:
        raise KeyConfigError(
            f"A stored private key cannot be decrypted with the keys in {SETTING}: "
            "the key that encrypted it is missing or wrong."
        ) from None


def rotate(token: str) -> str:
    """Re-encrypt ``token`` under the first key."""
    try:
        return _multifernet().rotate(token.encode("ascii")).decode("ascii")
    except InvalidToken:
        raise KeyConfigError(
            f"A stored private key cannot be decrypted with the keys in {SETTING}: "
            "put the old key after the new one before rotating."
        ) from None


def is_current(token: str) -> bool:
    """True when ``token`` opens with the first (encrypting) key."""
    try:
        parse_keys(str(settings.PROXYADMIN_KEYS))[0].decrypt(token.encode("ascii"))
    except InvalidToken:
        return False
    return True
