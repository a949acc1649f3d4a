"""Access lists on the control plane: rules as text, passwords hashed, every input bounded.

Rules are edited as text, one a line (``allow 10.0.0.0/8``), because a list of a
thousand CIDRs is a paste, not a thousand inline rows (and would exceed Django's
``DATA_UPLOAD_MAX_NUMBER_FIELDS``). Passwords are hashed with Django's PBKDF2 hasher
(``pbkdf2_sha256$iterations$salt$hash``): the data plane verifies that format with
``hashlib.pbkdf2_hmac`` and no Django (``proxycore.access``), which argon2 or bcrypt
would not allow without an extra native dependency in the proxy.
"""

from __future__ import annotations

import ipaddress
import re

from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.core.exceptions import ValidationError

from proxycore import access as core_access

MAX_RULES = 5000
MAX_USERS = 100
MAX_USERNAME = core_access.MAX_USERNAME
MAX_PASSWORD = core_access.MAX_PASSWORD
MAX_TRUSTED_PROXIES = 100
ACTIONS = ("allow", "deny")
# Django's own count (1,000,000 in Django 5.2): ~0.3-1 s of one core per hash, which the proxy
# pays once per new credential and then remembers (proxycore.credentials).
ITERATIONS = PBKDF2PasswordHasher.iterations
_USERNAME = re.compile(r"[^\x00-\x20:\x7f]+")  # no colon (Basic splits on it), no spaces or controls


def parse_source(text: str) -> str:
    """An address or CIDR network, normalised (host bits cleared); ValidationError if bad."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValidationError(f"'{text.strip()[:60]}' is not an IP address or CIDR network.") from None


def parse_rules(text: str) -> list[tuple[str, str]]:
    """``(action, source)`` pairs of rules text; one ValidationError naming every bad line."""
    rules: list[tuple[str, str]] = []
    errors: list[str] = []
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > MAX_RULES:
        raise ValidationError(f"{len(lines)} rules: an access list holds at most {MAX_RULES}.")
    for number, line in enumerate(lines, 1):
        action, _, source = line.partition(" ")
        if action.lower() not in ACTIONS or not source.strip():
            errors.append(f"rule {number}: '{line[:60]}' is not 'allow <address or CIDR>' or 'deny ...'.")
            continue
        try:
            rules.append((action.lower(), parse_source(source)))
        except ValidationError as exc:
            errors.append(f"rule {number}: {exc.messages[0]}")
        if len(errors) >= 20:
            break
    if errors:
        raise ValidationError(errors)
    return rules


def rules_text(rules: list[tuple[str, str]]) -> str:
    return "".join(f"{action} {source}\n" for action, source in rules)


def parse_trusted_proxies(text: str) -> list[str]:
    sources = [line.split("#", 1)[0].strip() for line in text.replace(",", "\n").splitlines()]
    sources = [s for s in sources if s]
    if len(sources) > MAX_TRUSTED_PROXIES:
        raise ValidationError(f"{len(sources)} trusted proxies: at most {MAX_TRUSTED_PROXIES}.")
    return [parse_source(s) for s in sources]


def check_username(username: str) -> str:
    if not username or len(username) > MAX_USERNAME or not _USERNAME.fullmatch(username):
        raise ValidationError(
            f"A username is 1 to {MAX_USERNAME} characters, without colons, spaces or control characters.")
    return username


def check_password(password: str) -> str:
    if not password or len(password.encode("utf-8")) > MAX_PASSWORD:
        raise ValidationError(f"A password is 1 to {MAX_PASSWORD} bytes.")
    return password


def hash_password(password: str) -> str:
    """A slow salted hash (Django's PBKDF2-SHA256, its iteration count) of a checked password."""
    hasher = PBKDF2PasswordHasher()
    return hasher.encode(check_password(password), hasher.salt(), iterations=ITERATIONS)


def password_matches(password: str, encoded: str) -> bool:
    """Does ``encoded`` (a stored hash) hold ``password``? (an import that repeats a clear
    password keeps the stored hash rather than making a new one each time)"""
    try:
        return core_access.PasswordHash(encoded).verify(password.encode("utf-8"))
    except (ValueError, TypeError):
        return False


def check_hash(encoded: str) -> str:
    """A stored hash as an export carries it: the format the data plane can verify."""
    try:
        core_access.PasswordHash(encoded)
    except (ValueError, TypeError):
        raise ValidationError("password_hash is not a pbkdf2_sha256 hash the proxy can verify.") from None
    return encoded


def check_realm(realm: str) -> str:
    if any(c in realm for c in '"\\') or any(ord(c) < 0x20 or ord(c) == 0x7F for c in realm):
        raise ValidationError("The realm cannot hold quotes, backslashes or control characters.")
    return realm
