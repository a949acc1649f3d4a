"""What the ACME worker keeps in the database: accounts, per-host state, challenges, its lease.

None of these is config in the revision sense: saving one makes no revision by
itself. The worker makes the revisions that matter explicitly (challenges
published, challenges removed, a certificate stored), so that status updates
never make proxy nodes reload.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import josepy as jose
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from django.db import IntegrityError, models, transaction
from django.utils import timezone

from proxyadmin import crypto, pki
from proxyadmin.models import Certificate, Host
from proxycore.names import uncovered_names


class Account(models.Model):
    """One ACME account per directory; its key is generated here and kept encrypted."""

    directory = models.URLField(max_length=500, unique=True, help_text="The ACME directory URL.")
    email = models.CharField(
        "contact e-mail", max_length=254, blank=True,
        help_text="Where the CA sends expiry and policy notices (PROXYADMIN_ACME_EMAIL).",
    )
    # The account key (EC P-256, PEM) as a MultiFernet token: never shown, never exported.
    key_token = models.TextField(editable=False)
    uri = models.CharField("account URL", max_length=500, blank=True, editable=False)
    terms_of_service = models.CharField(max_length=500, blank=True, editable=False)
    tos_agreed_at = models.DateTimeField("terms of service agreed", null=True, editable=False)
    eab_kid = models.CharField(
        "external account binding key id", max_length=200, blank=True,
        help_text="For CAs that require external account binding (EAB): the key id they gave you.",
    )
    # The EAB HMAC key (base64url, as CAs hand it out) as a MultiFernet token, or empty.
    eab_hmac_token = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "ACME account"

    def __str__(self) -> str:
        return self.directory

    @classmethod
    def for_directory(cls, directory: str, email: str = "") -> Account:
        """The directory's account, created with a new key on first use."""
        existing = cls.objects.filter(directory=directory).first()
        if existing is not None:
            return existing
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            with transaction.atomic():
                return cls.objects.create(
                    directory=directory, email=email, key_token=crypto.encrypt(pki.key_to_pem(key))
                )
        except IntegrityError:  # another worker made it first
            return cls.objects.get(directory=directory)

    def prepare_registration(self, email: str, eab_kid: str, eab_hmac_key: str) -> None:
        """Before the account is registered: take the contact and, when the settings give
        one, the external account binding from the settings (an EAB entered in the admin
        stays when they give none)."""
        if self.uri:
            return
        self.email = email
        if eab_kid:
            self.eab_kid = eab_kid
            self.set_eab_hmac_key(eab_hmac_key)
        self.save(update_fields=["email", "eab_kid", "eab_hmac_token"])

    def jwk(self) -> jose.JWKEC:
        key = load_pem_private_key(crypto.decrypt(self.key_token), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return jose.JWKEC(key=key)

    def set_eab_hmac_key(self, value: str) -> None:
        self.eab_hmac_token = crypto.encrypt(value.encode("ascii")) if value else ""

    def eab_hmac_key(self) -> str:
        return crypto.decrypt(self.eab_hmac_token).decode("ascii") if self.eab_hmac_token else ""


class HostState(models.Model):
    """Where one ACME host stands: its status, the CA's last error, when it is tried next."""

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        VALID = "valid", "valid"
        FAILING = "failing", "failing"

    # Capped exponential backoff after failures: 1 min, 2, 4, ... at most 6 hours.
    BACKOFF_FIRST = dt.timedelta(minutes=1)
    BACKOFF_MAX = dt.timedelta(hours=6)

    host = models.OneToOneField(Host, on_delete=models.CASCADE, related_name="acme_state")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    error = models.TextField(blank=True, help_text="The CA's own words for the last failure.")
    failures = models.PositiveIntegerField(default=0, help_text="Failed attempts in a row.")
    last_attempt = models.DateTimeField(null=True, blank=True)
    next_attempt = models.DateTimeField(
        null=True, blank=True,
        help_text="Renewal time when valid, the end of the backoff when failing; empty: now.",
    )
    certificate = models.ForeignKey(
        Certificate, null=True, blank=True, on_delete=models.SET_NULL, related_name="acme_states",
        help_text="The last certificate issued for this host.",
    )
    order_uri = models.CharField("order in progress", max_length=500, blank=True)
    ari_next_check = models.DateTimeField(
        "next renewal information check", null=True, blank=True,
        help_text="When the CA's renewal information (RFC 9773) is asked for again.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "ACME host state"

    def __str__(self) -> str:
        return f"{self.host.name}: {self.status}"

    @classmethod
    def of(cls, host: Host) -> HostState:
        state, _ = cls.objects.get_or_create(host=host)
        return state

    def needs_certificate(self, names: list[str]) -> bool:
        """No ACME certificate covering every name is attached to the host."""
        cert = self.host.certificate
        if cert is None or cert.source != Certificate.Source.ACME:
            return True
        return bool(uncovered_names(cert.sans, names))

    def is_due(self, names: list[str], now: dt.datetime) -> bool:
        if self.next_attempt is None or self.next_attempt <= now:
            return True
        # A new name is ordered at once, unless the host is backing off after failures.
        return self.status != self.Status.FAILING and self.needs_certificate(names)

    def backoff(self) -> dt.timedelta:
        return min(self.BACKOFF_FIRST * 2 ** max(self.failures - 1, 0), self.BACKOFF_MAX)

    def note_attempt(self, now: dt.datetime) -> None:
        self.last_attempt = now
        if self.status == self.Status.VALID and not self.needs_certificate(self.host.hostnames()):
            return  # a renewal: the host keeps showing valid while it runs
        self.status = self.Status.PENDING
        self.save()

    def note_issued(self, cert: Certificate, renew_at: dt.datetime) -> None:
        self.status = self.Status.VALID
        self.error = ""
        self.failures = 0
        self.certificate = cert
        self.next_attempt = renew_at
        self.order_uri = ""
        self.save()

    def note_failure(self, error: str, now: dt.datetime) -> None:
        self.status = self.Status.FAILING
        self.error = error[:4000]
        self.failures += 1
        self.next_attempt = now + self.backoff()
        self.order_uri = ""
        self.save()

    def request_now(self) -> None:
        """Try at the next pass, whatever the schedule (the admin's "Request now")."""
        self.next_attempt = timezone.now()
        self.save(update_fields=["next_attempt", "updated_at"])


def renewal_time(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When a third of the certificate's lifetime is left."""
    return not_after - (not_after - not_before) / 3


class Challenge(models.Model):
    """A challenge every proxy node answers while its order is in progress."""

    class Kind(models.TextChoices):
        HTTP_01 = "http-01", "http-01"
        TLS_ALPN_01 = "tls-alpn-01", "tls-alpn-01"

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="acme_challenges")
    kind = models.CharField(max_length=12, choices=Kind.choices)
    name = models.CharField(max_length=253, help_text="The DNS name being validated.")
    token = models.CharField(max_length=200)
    key_authorization = models.CharField(max_length=300)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        verbose_name = "ACME challenge"

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"

    def digest(self) -> bytes:
        """tls-alpn-01: the SHA-256 of the key authorization (RFC 8737 §3)."""
        return hashlib.sha256(self.key_authorization.encode("ascii")).digest()


class Lease(models.Model):
    """Who does ACME work now: one worker per cluster, until ``expires_at`` unless renewed."""

    name = models.CharField(max_length=50, unique=True)
    holder = models.CharField(max_length=200)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder}"

    @classmethod
    def acquire(cls, name: str, holder: str, seconds: float, now: dt.datetime) -> bool:
        """Take or renew the lease; True when ``holder`` has it until ``now + seconds``.

        One conditional UPDATE, so two workers racing for an expired lease cannot both win.
        """
        until = now + dt.timedelta(seconds=seconds)
        try:
            with transaction.atomic():
                cls.objects.get_or_create(name=name, defaults={"holder": holder, "expires_at": until})
        except IntegrityError:
            pass  # made by the other worker at the same moment: the UPDATE decides
        free = models.Q(holder=holder) | models.Q(expires_at__lte=now)
        return cls.objects.filter(free, name=name).update(holder=holder, expires_at=until) == 1

    @classmethod
    def release(cls, name: str, holder: str) -> None:
        cls.objects.filter(name=name, holder=holder).delete()


def dashboard_warnings(now: dt.datetime) -> list[str]:
    """Failing orders, and certificates that expire before the worker's next attempt."""
    warnings = []
    states = HostState.objects.filter(host__enabled=True).exclude(host__acme="").select_related(
        "host", "host__certificate"
    )
    for state in states:
        name = state.host.name
        if state.status == HostState.Status.FAILING:
            warnings.append(f"ACME: the certificate order for host '{name}' is failing "
                            f"({state.failures} attempts): {state.error}")
        cert = state.host.certificate
        if cert is not None and state.next_attempt is not None and cert.not_after <= state.next_attempt:
            warnings.append(f"ACME: the certificate '{cert.name}' of host '{name}' expires "
                            f"{cert.not_after:%Y-%m-%d %H:%M} UTC, before the next attempt "
                            f"({state.next_attempt:%Y-%m-%d %H:%M} UTC)")
    return warnings
