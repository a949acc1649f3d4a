"""The ACME protocol, through certbot's ``acme`` library: client, account, orders, challenges.

All JWS signing, nonces and retries on ``badNonce`` are the library's. What is added
here: the tls-alpn-01 challenge type (RFC 8737), which the library no longer ships
(it parses it as an unrecognised challenge), registered the library's own way;
a client that trusts ``PROXYADMIN_ACME_CA_BUNDLE``; and the CA's errors as plain text.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import josepy as jose
from acme import challenges, client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from django.conf import settings
from django.utils import timezone

from proxyadmin import pki
from proxyadmin.acme.models import Account

USER_AGENT = "proxyadmin"
NETWORK_TIMEOUT = 30
# The library's own wait before asking a directory without renewalInfo again (RFC 9773 §4.3.3).
NO_RENEWAL_INFO_RECHECK = dt.timedelta(hours=6)


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The answer to a tls-alpn-01 challenge: an empty object, as for http-01."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """tls-alpn-01 (RFC 8737): the nodes answer with a certificate carrying the digest."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: jose.JWK, **unused_kwargs: Any) -> str:
        return self.key_authorization(account_key)


KINDS: dict[str, type[challenges.KeyAuthorizationChallenge]] = {
    "http-01": challenges.HTTP01,
    "tls-alpn-01": TLSALPN01,
}


def problem_text(error: BaseException) -> str:
    """The CA's own words for ``error`` (a problem document), or the exception's."""
    if isinstance(error, messages.Error):
        words = error.detail or error.title or error.description or ""
        code = error.code or error.typ
        text = f"{words} ({code})" if words else str(code)
        if error.code == "externalAccountRequired":
            text += ("; this CA requires external account binding: set PROXYADMIN_ACME_EAB_KID "
                     "and PROXYADMIN_ACME_EAB_HMAC_KEY to the key id and HMAC key it gave you")
        for sub in error.subproblems or ():
            text += f"; {problem_text(sub)}"
        return text
    if isinstance(error, errors.ValidationError):
        return "; ".join(authorization_error(a) for a in error.failed_authzrs)
    return str(error) or type(error).__name__


def authorization_error(authzr: messages.AuthorizationResource) -> str:
    name = authzr.body.identifier.value
    for challb in authzr.body.challenges:
        if challb.error is not None:
            return f"{name}: {problem_text(challb.error)}"
    return f"{name}: the authorization is {authzr.body.status.name}"


def make_client(account: Account) -> client.ClientV2:
    """A client of the account's directory, registering the account on first use."""
    jwk = account.jwk()
    net = client.ClientNetwork(jwk, alg=jose.ES256, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
    if settings.ACME_CA_BUNDLE:
        # requests takes a CA bundle's path where a bool goes; the library passes it on as is.
        net.verify_ssl = settings.ACME_CA_BUNDLE  # type: ignore[assignment]
    directory = client.ClientV2.get_directory(account.directory, net)
    acme = client.ClientV2(directory, net)
    if account.uri:
        net.account = messages.RegistrationResource(body=messages.Registration(), uri=account.uri)
    else:
        register(acme, account, jwk)
    return acme


def register(acme: client.ClientV2, account: Account, jwk: jose.JWK) -> None:
    """Create the account at the CA, agreeing to its terms of service, and record both."""
    eab = None
    if account.eab_kid:
        eab = messages.ExternalAccountBinding.from_data(
            account_public_key=jwk.public_key(), kid=account.eab_kid,
            hmac_key=account.eab_hmac_key(), directory=acme.directory,
        )
    registration = messages.NewRegistration.from_data(
        email=account.email or None, terms_of_service_agreed=True, external_account_binding=eab,
    )
    try:
        regr = acme.new_account(registration)
        uri = regr.uri
    except errors.ConflictError as exists:  # the key is known there already
        uri = exists.location
        acme.net.account = messages.RegistrationResource(body=messages.Registration(), uri=uri)
    meta = getattr(acme.directory, "meta", None)
    account.uri = uri or ""
    account.terms_of_service = (getattr(meta, "terms_of_service", None) or "")[:500]
    account.tos_agreed_at = timezone.now()
    account.save(update_fields=["uri", "terms_of_service", "tos_agreed_at"])


def update_contact(acme: client.ClientV2, account: Account, email: str) -> tuple[str, ...]:
    """Make ``email`` the account's only contact at the CA (none when empty); what the CA lists now."""
    regr = acme.net.account
    assert regr is not None, "update_contact needs a registered account (make_client)"
    update = messages.Registration.from_data(email=email) if email else messages.Registration(contact=())
    updated = acme.update_registration(regr, update)
    account.email = email
    account.save(update_fields=["email"])
    return tuple(updated.body.contact)


def new_key_and_csr(names: list[str]) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a CSR for ``names``; (key PEM, CSR PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return pki.key_to_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def pick_challenge(
    authzr: messages.AuthorizationResource, kinds: list[str]
) -> messages.ChallengeBody | None:
    """The authorization's challenge of the first kind in ``kinds`` that the CA offers."""
    for kind in kinds:
        for challb in authzr.body.challenges:
            if isinstance(challb.chall, KINDS[kind]):
                return challb
    return None


def aware(when: dt.datetime) -> dt.datetime:
    """The library's times are naive local times in places; make them aware."""
    return when if when.tzinfo is not None else when.astimezone()


def offers_renewal_info(acme: client.ClientV2) -> bool:
    try:
        acme.directory["renewalInfo"]
    except KeyError:
        return False
    return True


def renewal_info(acme: client.ClientV2, chain_pem: str) -> tuple[dt.datetime | None, dt.datetime]:
    """The CA's suggested renewal time (RFC 9773) if it offers ``renewalInfo``, and when to ask again."""
    try:
        suggested, ask_again = acme.renewal_time(chain_pem.encode("ascii"))
    except errors.ARIError as exc:
        return None, aware(exc.retry_after)
    return (aware(suggested) if suggested is not None else None), aware(ask_again)
