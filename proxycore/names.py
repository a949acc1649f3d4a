"""Host names: normalisation to the stored form, and wildcard matching.

Names are stored and compared as lower-case ASCII (IDNA names as punycode),
without a trailing dot. A wildcard is allowed only as the whole left-most label
(``*.example.com``) and, as in RFC 6125, matches exactly one label.
"""

from __future__ import annotations

import ipaddress
import re

import idna

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_NAME_LENGTH = 253
# UTS #46 label separators that browsers read as '.', as in "bücher。example".
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


class InvalidHostname(ValueError):
    """A host name that cannot be served; the message says why in plain words."""


def _to_ascii(label: str) -> str:
    if label.isascii():
        return label.lower()
    try:
        return idna.encode(label, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise InvalidHostname(f"{label!r} is not a valid internationalised name: {exc}") from None


def normalize_hostname(raw: str) -> str:
    """Return the stored form of ``raw`` or raise ``InvalidHostname``."""
    name = raw.strip().translate(_DOTS).rstrip(".")
    if not name:
        raise InvalidHostname("A host name cannot be empty.")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise InvalidHostname(
            f"{name!r} is an IP address; TLS clients send names, not addresses, in SNI."
        )
    labels = name.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
        if len(labels) < 2:
            raise InvalidHostname(f"{name!r}: a wildcard needs at least two labels after '*.'.")
    if any("*" in label for label in labels):
        raise InvalidHostname(f"{name!r}: '*' is allowed only as the whole left-most label.")
    ascii_labels = [_to_ascii(label) for label in labels]
    for label in ascii_labels:
        if not _LABEL.match(label):
            raise InvalidHostname(
                f"{name!r}: the label {label!r} may hold only letters, digits and inner hyphens, "
                "up to 63 characters."
            )
    result = ".".join((["*"] if wildcard else []) + ascii_labels)
    if len(result) > MAX_NAME_LENGTH:
        raise InvalidHostname(f"{name!r} is longer than {MAX_NAME_LENGTH} characters.")
    return result


def name_matches(pattern: str, name: str) -> bool:
    """True when the (normalised) ``pattern`` covers the (normalised) ``name``.

    ``*.example.com`` covers ``a.example.com`` and the literal ``*.example.com``,
    but neither ``example.com`` nor ``a.b.example.com``.
    """
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    head, dot, rest = name.partition(".")
    return bool(dot) and bool(head) and rest == pattern[2:]


def uncovered_names(patterns: tuple[str, ...] | list[str], names: list[str]) -> list[str]:
    """The names that no pattern (for instance a certificate's DNS SANs) covers."""
    lowered = [p.lower() for p in patterns]
    return [n for n in names if not any(name_matches(p, n) for p in lowered)]
