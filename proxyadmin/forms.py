"""Validation of everything an operator enters, shared by the admin and ``importconfig``.

Each form names the field and the problem in plain words; nothing is saved
unless every check passes.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.forms.models import BaseInlineFormSet
from django.utils import timezone

from proxyadmin import accesslists, coverage, crypto, localca, pki
from proxyadmin import models as m
from proxycore.names import InvalidHostname, normalize_hostname, uncovered_names

MAX_UPLOAD_BYTES = 1024 * 1024


def _read_upload(field: forms.Field, upload: Any, label: str) -> bytes:
    if upload is None:
        return b""
    if upload.size > MAX_UPLOAD_BYTES:
        raise ValidationError(f"The {label} file is larger than 1 MiB; that is not a certificate file.")
    upload.seek(0)  # a form validated twice (before and inside a transaction) reads it twice
    return bytes(upload.read())


class UploadInspections:
    """Certificate uploads already inspected, by their inputs: for one request or one import.

    Inspecting a chain is the slow part of saving a certificate. A caller validates
    its forms once before it opens a transaction (with SQLite, ``BEGIN IMMEDIATE``
    takes the database's write lock), and the forms validated again inside it
    reuse the results, so nothing else waits on the lock while a chain is checked.
    """

    def __init__(self) -> None:
        self._results: dict[tuple[object, ...], pki.InspectedCertificate | pki.CertificateProblem] = {}

    def inspect(self, *, known_issuers: list[Any], **upload: Any) -> pki.InspectedCertificate:
        # ``now`` is left out of the key: the second look comes within the same request.
        inputs = (tuple(known_issuers), *sorted((k, v) for k, v in upload.items() if k != "now"))
        result = self._results.get(inputs)
        if result is None:
            try:
                result = pki.inspect_upload(known_issuers=known_issuers, **upload)
            except pki.CertificateProblem as exc:
                result = exc
            self._results[inputs] = result
        if isinstance(result, pki.CertificateProblem):
            raise result
        return result


class WriteOnlyTextarea(forms.Textarea):
    """A textarea that never renders its value back, not even after a form error."""

    def format_value(self, value: Any) -> None:
        return None


class ChainTextarea(forms.Textarea):
    """A textarea that renders back only the certificates of a paste.

    A key pasted together with the chain must not come back in the page after a
    form error: only the CERTIFICATE blocks are shown again.
    """

    def format_value(self, value: Any) -> str | None:
        text = super().format_value(value)
        if not text or "PRIVATE KEY" not in text:
            return text
        certs, _ = pki.split_pem_blocks(text.encode())
        return "\n".join(block.decode(errors="replace") for block in certs)


class CertificateForm(forms.ModelForm):
    """Upload as pasted PEM, PEM files, or PKCS#12; the key is write-only."""

    chain_file = forms.FileField(
        required=False, label="…or chain file (PEM)",
        help_text="Instead of pasting: a .pem/.crt file with the certificate and its intermediates.",
    )
    key_pem = forms.CharField(
        required=False, label="Private key (PEM)", strip=False,
        widget=WriteOnlyTextarea(attrs={"rows": 6, "autocomplete": "off", "spellcheck": "false"}),
        help_text="Write-only: it is encrypted at rest and never shown again. "
        "Leave empty on edit to keep the stored key.",
    )
    key_file = forms.FileField(required=False, label="…or private key file (PEM)")
    pkcs12_file = forms.FileField(
        required=False, label="…or PKCS#12 file (.p12/.pfx)",
        help_text="Holds the certificate, its chain and the key; enter its passphrase below.",
    )
    passphrase = forms.CharField(
        required=False, strip=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="For an encrypted PEM key or a PKCS#12 file. Not stored.",
    )
    allow_incomplete = forms.BooleanField(
        required=False, label="Accept an incomplete chain",
        help_text="Only if your clients trust the issuer of the last certificate directly.",
    )

    class Meta:
        model = m.Certificate
        fields = ["name", "chain_pem"]
        widgets = {"chain_pem": ChainTextarea(attrs={"rows": 10, "spellcheck": "false"})}
        labels = {"chain_pem": "Certificate chain (PEM)"}

    # Set on a subclass by a caller that validates the upload before it opens a transaction.
    shared_inspections: UploadInspections | None = None

    def __init__(self, *args: Any, inspections: UploadInspections | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["chain_pem"].required = False
        self.inspected: pki.InspectedCertificate | None = None
        self.inspections = inspections or self.shared_inspections or UploadInspections()

    def clean(self) -> dict[str, Any]:
        data = super().clean() or self.cleaned_data
        if self.errors:
            return data
        pasted = (data.get("chain_pem") or "").encode()
        chain_upload = _read_upload(self.fields["chain_file"], data.get("chain_file"), "chain")
        key = (data.get("key_pem") or "").encode()
        key += _read_upload(self.fields["key_file"], data.get("key_file"), "key")
        p12 = _read_upload(self.fields["pkcs12_file"], data.get("pkcs12_file"), "PKCS#12")
        if (chain_upload or p12) and self._is_stored_chain(pasted):
            # On edit the textarea still shows the stored chain; an uploaded file replaces it.
            pasted = b""
        chain = pasted + chain_upload
        passphrase = (data.get("passphrase") or "").encode() or None
        stored_key = not key.strip() and not p12 and bool(self.instance.pk) and b"PRIVATE KEY" not in chain
        if stored_key:
            try:
                key = self.instance.private_key_pem()
            except crypto.KeyConfigError as exc:
                self.add_error("key_pem", str(exc))
                return data
            passphrase = None
        try:
            self.inspected = self.inspections.inspect(
                chain_pem=chain, key_pem=key, passphrase=passphrase, pkcs12_data=p12 or None,
                now=timezone.now(), known_issuers=localca.known_issuers(),
                allow_incomplete=bool(data.get("allow_incomplete")),
            )
        except pki.CertificateProblem as exc:
            field = exc.field if exc.field in self.fields else None
            message = exc.message
            if stored_key and exc.field == "key_pem":
                message = ("The new certificate is not for the stored private key: "
                           "paste or upload its own key too.")
            self.add_error(field, message)
            return data
        self._check_hosts_still_covered()
        return data

    def _is_stored_chain(self, pasted: bytes) -> bool:
        return bool(self.instance.pk) and pasted.split() == self.instance.chain_pem.encode().split()

    def _check_hosts_still_covered(self) -> None:
        if not self.instance.pk or self.inspected is None:
            return
        sans = pki.dns_names(self.inspected.leaf)
        for host in self.instance.hosts.prefetch_related("names"):
            missing = uncovered_names(sans, host.hostnames())
            if missing:
                self.add_error(
                    "chain_pem",
                    f"Host '{host.name}' uses this certificate, but the new one does not cover "
                    f"{', '.join(missing)}.",
                )

    def save(self, commit: bool = True) -> m.Certificate:
        assert self.inspected is not None, "save() called on an invalid form"
        self.instance.set_inspected(self.inspected)
        return super().save(commit)


class ClientCAForm(forms.ModelForm):
    bundle_file = forms.FileField(required=False, label="…or bundle file (PEM)")

    class Meta:
        model = m.ClientCA
        fields = ["name", "bundle_pem", "crl_pem"]
        widgets = {
            "bundle_pem": forms.Textarea(attrs={"rows": 10, "spellcheck": "false"}),
            "crl_pem": forms.Textarea(attrs={"rows": 6, "spellcheck": "false"}),
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["bundle_pem"].required = False
        self.certs: list[Any] = []
        self.crls: list[Any] = []

    def clean(self) -> dict[str, Any]:
        data = super().clean() or self.cleaned_data
        if self.errors:
            return data
        bundle = (data.get("bundle_pem") or "").encode()
        upload = _read_upload(self.fields["bundle_file"], data.get("bundle_file"), "bundle")
        if upload and self.instance.pk and bundle.split() == self.instance.bundle_pem.encode().split():
            bundle = b""  # on edit the textarea still shows the stored bundle; the file replaces it
        bundle += upload
        if not bundle.strip():
            self.add_error("bundle_pem", "Paste or upload at least one CA certificate (PEM).")
            return data
        try:
            self.certs = pki.inspect_ca_bundle(bundle, timezone.now())
        except pki.CertificateProblem as exc:
            self.add_error("bundle_pem", exc.message)
            return data
        crl = (data.get("crl_pem") or "").strip()
        self.crls = []
        if crl:
            try:
                self.crls = pki.inspect_crls(crl.encode(), self.certs, timezone.now())
            except pki.CertificateProblem as exc:
                self.add_error("crl_pem", exc.message)
        return data

    def save(self, commit: bool = True) -> m.ClientCA:
        self.instance.set_bundle(self.certs)
        self.instance.set_crls(self.crls)
        return super().save(commit)


class HSTSPolicyForm(forms.ModelForm):
    class Meta:
        model = m.HSTSPolicy
        fields = ["name", "max_age", "include_subdomains", "preload", "override_upstream"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or self.cleaned_data
        if data.get("preload"):
            problems = []
            if (data.get("max_age") or 0) < m.PREFERRED_HSTS_PRELOAD_MAX_AGE:
                problems.append(f"max-age of at least {m.PREFERRED_HSTS_PRELOAD_MAX_AGE} (one year)")
            if not data.get("include_subdomains"):
                problems.append("includeSubDomains")
            if problems:
                self.add_error(
                    "preload", "Preload lists accept a site only with " + " and ".join(problems) + "."
                )
        return data


def validate_target_host(value: str) -> str:
    value = value.strip()
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    try:
        name = normalize_hostname(value)
    except InvalidHostname as exc:
        raise ValidationError(str(exc)) from None
    if name.startswith("*."):
        raise ValidationError("An upstream server needs a real name, not a wildcard.")
    return name


class UpstreamForm(forms.ModelForm):
    class Meta:
        model = m.Upstream
        fields = [
            "name", "balancing", "connect_timeout", "read_timeout", "tls", "tls_verify",
            "tls_ca_bundle", "tls_server_name", "tls_client_certificate", "health_check_enabled",
            "health_check_path", "health_check_interval", "health_check_timeout",
            "healthy_threshold", "unhealthy_threshold", "passive_failures", "passive_cooldown",
        ]
        widgets = {"tls_ca_bundle": forms.Textarea(attrs={"rows": 5, "spellcheck": "false"})}
        labels = {"tls_client_certificate": "Client certificate (mTLS to the upstream)",
                  "health_check_enabled": "Active health checks"}

    def clean_tls_ca_bundle(self) -> str:
        bundle = self.cleaned_data.get("tls_ca_bundle") or ""
        if not bundle.strip():
            return ""
        try:
            return pki.to_pem(pki.inspect_ca_bundle(bundle.encode(), timezone.now()))
        except pki.CertificateProblem as exc:
            raise ValidationError(exc.message) from None

    def clean_health_check_path(self) -> str:
        # It becomes the request line of the health check: no room for a space or CR/LF.
        path = self.cleaned_data.get("health_check_path") or ""
        if not path.startswith("/") or any(c.isspace() or not c.isprintable() for c in path):
            raise ValidationError(
                "The health check path must start with '/' and hold no spaces or control characters."
            )
        return path

    def clean_tls_server_name(self) -> str:
        name = (self.cleaned_data.get("tls_server_name") or "").strip()
        return validate_target_host(name) if name else ""

    def clean(self) -> dict[str, Any]:
        data = super().clean() or self.cleaned_data
        if not data.get("tls"):
            for field in ("tls_ca_bundle", "tls_server_name", "tls_client_certificate"):
                if data.get(field):
                    self.add_error(field, "Only used with TLS to the upstream: tick TLS or clear this.")
        return data


class UpstreamTargetFormSet(BaseInlineFormSet):
    """An upstream without a target could only ever answer 502."""

    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        kept = [f for f in self.forms if f.cleaned_data and not f.cleaned_data.get("DELETE")]
        if not kept:
            raise ValidationError("An upstream needs at least one target: enter its host and port.")


class UpstreamTargetForm(forms.ModelForm):
    class Meta:
        model = m.UpstreamTarget
        fields = ["host", "port", "weight", "enabled", "draining"]

    def clean_host(self) -> str:
        value = (self.cleaned_data.get("host") or "").strip()
        with_port = HOST_WITH_PORT.fullmatch(value)
        if with_port:
            raise ValidationError(
                f"Put the port in Port: enter {with_port[1]} here and {with_port[2]} under Port."
            )
        return validate_target_host(value)


# "127.0.0.1:7081" or "[::1]:7081" typed into a target's Host field (a bare IPv6 address is not).
HOST_WITH_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\s]+):(\d{1,5})")


def acme_wildcard_refusal(wildcards: list[str], acme: str) -> str:
    """Why an ACME host cannot have ``wildcards`` (said on the ACME field and on the names)."""
    kinds = acme if acme != m.Host.Acme.ANY else "http-01 or tls-alpn-01"
    return (f"{', '.join(wildcards)}: a wildcard name can only be validated by dns-01, and ACME "
            f"here uses {kinds}. Turn ACME off for this host or list the names one by one.")


# The prefix of the host's names in the admin's POST: the inline's default, HostName.host's related_name.
NAMES_PREFIX = "names"


class HostForm(forms.ModelForm):
    local_certificate = forms.BooleanField(
        required=False, label="Generate a certificate from the local CA",
        help_text="On saving, the local CA issues a certificate for all the names and the host "
                  "uses it. Download the local CA from the certificate list to trust it.",
    )

    class Meta:
        model = m.Host
        fields = [
            "name", "enabled", "mode", "upstream", "certificate", "max_body_size", "hsts_policy",
            "redirect_http", "redirect_status", "client_auth", "client_ca", "forward_client_cert",
            "forward_client_cert_chain", "proxy_protocol", "allow_trace", "acme", "access_list",
            "rate_limit_rps", "rate_limit_burst", "rate_limit_connections",
        ]

    # How the refusal of a host without a certificate words the ways to get one.
    certificate_choices: str | None = None

    def __init__(self, *args: Any, names: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # importconfig passes the names; the admin posts them in the names inline.
        self.names = names

    def clean(self) -> dict[str, Any]:
        data = super().clean() or self.cleaned_data
        self._check_certificate_choice(data)
        if data.get("client_auth", m.Host.ClientAuth.OFF) != m.Host.ClientAuth.OFF and not data.get(
            "client_ca"
        ):
            self.add_error("client_ca", "Client authentication needs a client CA bundle to verify against.")
        if data.get("mode") == m.Host.Mode.TCP and data.get("hsts_policy"):
            self.add_error("hsts_policy", "HSTS is an HTTP header; a TCP host sends none. Clear it.")
        self._check_access(data)
        wildcards = [n for n in self.submitted_names() if n.startswith("*.")]
        if data.get("acme") and wildcards:
            self.add_error("acme", acme_wildcard_refusal(wildcards, data["acme"]))
        return data

    def _check_access(self, data: dict[str, Any]) -> None:
        """A TCP host has no requests: only address rules and connection limits apply to it."""
        tcp = data.get("mode") == m.Host.Mode.TCP
        acl = data.get("access_list")
        if tcp and acl is not None and acl.users.exists():
            self.add_error("access_list", f"A TCP host cannot ask for a password, and the access list "
                                          f"'{acl.name}' has users. Choose a list of address rules only.")
        if tcp and data.get("rate_limit_rps"):
            self.add_error("rate_limit_rps", "A TCP host has no requests to limit; "
                                             "use connections per client.")
        if data.get("rate_limit_burst") and not data.get("rate_limit_rps"):
            self.add_error("rate_limit_burst", "A burst needs a rate (requests per second).")

    def _check_certificate_choice(self, data: dict[str, Any]) -> None:
        """A host is saved only with a certificate that covers it, or one on its way."""
        local = data.get("local_certificate")
        if local and (data.get("certificate") or data.get("acme")):
            self.add_error("local_certificate", "Choose one: a stored certificate, the local CA, or ACME.")
            return
        if local or data.get("certificate") or data.get("acme"):
            return  # a chosen certificate's coverage is checked with the names
        names = coverage.normalized(self.submitted_names() if self.names is None else self.names)
        choices = self.certificate_choices or (
            coverage.ADMIN_CHOICES if self.names is None else coverage.IMPORT_CHOICES)
        problem = coverage.missing_certificate(names, choices=choices)
        if problem:
            self.add_error("certificate", problem)

    def submitted_names(self) -> list[str]:
        """The names posted with this form in the admin's names inline, deleted rows left out.

        The inline checks them itself (``HostNameFormSet``); they are read here too so
        that the ACME field says why it cannot be on, next to where it was chosen.
        """
        try:
            total = min(int(self.data.get(f"{NAMES_PREFIX}-TOTAL_FORMS", 0)), 1000)
        except (TypeError, ValueError):
            return []
        names = []
        for index in range(total):
            if self.data.get(f"{NAMES_PREFIX}-{index}-DELETE"):
                continue
            name = str(self.data.get(f"{NAMES_PREFIX}-{index}-name") or "").strip().lower()
            if name:
                names.append(name)
        return names


def clean_host_names(
    raw_names: list[str], certificate: m.Certificate | None, host: m.Host | None, acme: str = ""
) -> tuple[list[str], list[str]]:
    """Normalise a host's names and check them; returns (names, error messages).

    With ``acme`` on, wildcards are refused (http-01 and tls-alpn-01 cannot validate
    them), and a certificate from ACME need not cover new names: the worker orders one
    that does.
    """
    errors: list[str] = []
    names: list[str] = []
    for raw in raw_names:
        try:
            name = normalize_hostname(raw)
        except InvalidHostname as exc:
            errors.append(str(exc))
            continue
        if name in names:
            errors.append(f"'{name}' is listed twice.")
            continue
        names.append(name)
    if not names and not errors:
        errors.append("A host needs at least one name.")
    taken = m.HostName.objects.filter(name__in=names).select_related("host")
    if host is not None and host.pk:
        taken = taken.exclude(host=host)
    errors += [f"'{t.name}' is already used by host '{t.host.name}'." for t in taken]
    wildcards = [name for name in names if name.startswith("*.")]
    if acme and wildcards:
        errors.append(acme_wildcard_refusal(wildcards, acme))
    if certificate is not None and not (acme and certificate.source == m.Certificate.Source.ACME):
        missing = uncovered_names(certificate.sans, names)
        if missing:
            errors.append(
                f"The certificate '{certificate.name}' does not cover {', '.join(missing)} "
                f"(it covers: {', '.join(certificate.sans) or 'no DNS names'})."
            )
    return names, errors


class HostNameForm(forms.ModelForm):
    class Meta:
        model = m.HostName
        fields = ["name"]

    def validate_unique(self) -> None:
        # Uniqueness across hosts is checked by the formset, with a clearer message.
        pass


class HostNameFormSet(BaseInlineFormSet):
    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        kept = [
            f for f in self.forms
            if f.cleaned_data and not f.cleaned_data.get("DELETE") and f.cleaned_data.get("name")
        ]
        host = self.instance
        certificate = host.certificate if host.certificate_id else None
        names, errors = clean_host_names(
            [f.cleaned_data["name"] for f in kept], certificate, host, acme=host.acme
        )
        if errors:
            raise ValidationError(errors)
        for form, name in zip(kept, names, strict=True):
            form.instance.name = name
            form.cleaned_data["name"] = name


class ProxySettingsForm(forms.ModelForm):
    class Meta:
        model = m.ProxySettings
        fields = [
            "default_certificate", "strict_sni", "https_trusted_proxies", "https_proxy_protocol",
            "http_trusted_proxies", "http_proxy_protocol",
        ]

    def clean_https_trusted_proxies(self) -> str:
        return "\n".join(accesslists.parse_trusted_proxies(self.cleaned_data["https_trusted_proxies"]))

    def clean_http_trusted_proxies(self) -> str:
        return "\n".join(accesslists.parse_trusted_proxies(self.cleaned_data["http_trusted_proxies"]))


class AccessListForm(forms.ModelForm):
    class Meta:
        model = m.AccessList
        fields = ["name", "default", "rules", "satisfy", "realm", "pass_authorization"]
        widgets = {"rules": forms.Textarea(attrs={"rows": 12, "cols": 60, "spellcheck": "false"})}

    def clean_rules(self) -> str:
        return accesslists.rules_text(accesslists.parse_rules(self.cleaned_data["rules"]))

    def clean_realm(self) -> str:
        return accesslists.check_realm(self.cleaned_data["realm"])


class AccessUserForm(forms.ModelForm):
    """A Basic user; the password is write-only: never shown, blank keeps the stored one."""

    password = forms.CharField(
        required=False, strip=False, max_length=accesslists.MAX_PASSWORD,
        widget=forms.PasswordInput(render_value=False),
        help_text="Stored only as a salted PBKDF2 hash. Leave blank to keep the current password.",
    )

    class Meta:
        model = m.AccessUser
        fields = ["username"]

    def clean_username(self) -> str:
        return accesslists.check_username(self.cleaned_data["username"])

    def clean(self) -> dict[str, Any]:
        data = super().clean() or self.cleaned_data
        password = data.get("password") or ""
        if password:
            try:
                self.instance.password_hash = accesslists.hash_password(password)
            except ValidationError as exc:
                self.add_error("password", exc)
        elif not self.instance.password_hash and data.get("username") and not data.get("DELETE"):
            self.add_error("password", "A new user needs a password.")
        return data

    def validate_unique(self) -> None:
        pass  # checked by the formset, with the username in the message


class AccessUserFormSet(BaseInlineFormSet):
    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        kept = [f for f in self.forms if f.cleaned_data and not f.cleaned_data.get("DELETE")]
        if len(kept) > accesslists.MAX_USERS:
            raise ValidationError(f"An access list holds at most {accesslists.MAX_USERS} users.")
        seen: set[str] = set()
        for form in kept:
            name = str(form.cleaned_data.get("username"))
            if name in seen:
                raise ValidationError(f"The user '{name}' is listed twice.")
            seen.add(name)
