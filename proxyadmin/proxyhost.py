"""The "proxy host" page: a route in one form, inside the admin.

Names first; "forward to" as ``host:port`` lines (or an existing upstream), the
upstream made or updated behind the scenes; how the host gets its certificate (a
stored one, the local CA, or ACME) with the certificate that will be served shown;
HSTS as presets; the redirect; mTLS, PROXY protocol and limits folded away. The
host's own rules are not repeated here: the host is validated by the admin's
``HostForm`` and ``clean_host_names``, its targets by ``UpstreamTargetForm``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from proxyadmin import coverage, localca
from proxyadmin import forms as pf
from proxyadmin import models as m
from proxycore.names import uncovered_names


@dataclass(frozen=True)
class HSTSPreset:
    label: str
    max_age: int
    include_subdomains: bool = False
    preload: bool = False


YEAR = m.PREFERRED_HSTS_PRELOAD_MAX_AGE
HSTS_PRESETS = {
    "off": None,
    "test": HSTSPreset("5 minutes (for testing)", 300),
    "year": HSTSPreset("1 year", YEAR),
    "year-subdomains": HSTSPreset("1 year + subdomains", YEAR, include_subdomains=True),
    "preload": HSTSPreset("Preload-ready (1 year + subdomains + preload)", YEAR, True, True),
}
HSTS_CHOICES = [("off", "Off")] + [
    (key, preset.label) for key, preset in HSTS_PRESETS.items() if preset is not None
] + [("custom", "Custom")]

PAGE_CHOICES = (
    "pick a stored certificate that covers {it} (Certificates → Add to upload one), "
    "generate one from the local CA, or obtain one automatically (ACME)"
)
TLS_CHOICES = [
    ("stored", "Use a stored certificate"),
    ("local_ca", "Generate one from the local CA"),
    ("acme", "Obtain one automatically (ACME)"),
]
ACME_CHOICES = [c for c in m.Host.Acme.choices if c[0]]
TARGET_LINE = re.compile(r"^(?:[a-z]+://)?(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})/?$")


def parse_targets(text: str) -> list[tuple[str, int]]:
    """``host:port`` lines (blank lines skipped) as validated (host, port) pairs."""
    targets: list[tuple[str, int]] = []
    problems = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line:
            continue
        match = TARGET_LINE.match(line)
        if not match:
            problems.append(f"'{line}': write host:port, for example 127.0.0.1:8080.")
            continue
        form = pf.UpstreamTargetForm({"host": match[1], "port": match[2], "weight": 1, "enabled": "on"})
        if not form.is_valid():
            problems += [f"'{line}': {e}" for errors in form.errors.values() for e in errors]
            continue
        target = (form.cleaned_data["host"], form.cleaned_data["port"])
        if target in targets:
            problems.append(f"'{line}' is listed twice.")
        targets.append(target)
    if problems:
        raise ValidationError(problems)
    return targets


class ProxyHostForm(forms.Form):
    names = forms.CharField(
        label="Domain names", widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
        help_text="One a line: example.com, www.example.com, or *.example.com.",
    )
    forward_to = forms.CharField(
        label="Forward to", required=False,
        widget=forms.Textarea(attrs={"rows": 2, "spellcheck": "false", "placeholder": "127.0.0.1:8080"}),
        help_text="host:port of the server(s) behind the proxy, one a line. Several share the load.",
    )
    upstream = forms.ModelChoiceField(
        m.Upstream.objects.all(), required=False, label="…or an existing upstream",
        help_text="Instead of the lines above: an upstream from the Upstreams page.",
    )
    tls = forms.ChoiceField(label="Certificate", choices=TLS_CHOICES, initial="stored",
                            widget=forms.RadioSelect)
    certificate = forms.ModelChoiceField(
        m.Certificate.objects.all(), required=False, label="Stored certificate",
        empty_label="Automatic: the valid one that covers every name",
    )
    acme = forms.ChoiceField(label="ACME challenge", choices=ACME_CHOICES, initial=m.Host.Acme.ANY,
                             required=False)
    hsts = forms.ChoiceField(label="HSTS", choices=HSTS_CHOICES, initial="off")
    hsts_max_age = forms.IntegerField(label="Custom max-age (seconds)", required=False, min_value=0)
    hsts_include_subdomains = forms.BooleanField(label="Custom: includeSubDomains", required=False)
    redirect_http = forms.BooleanField(label="Redirect HTTP to HTTPS", required=False, initial=True)
    name = forms.CharField(label="Label", required=False, max_length=200,
                           help_text="How the host is listed in the admin; empty: its first name.")
    enabled = forms.BooleanField(required=False, initial=True)
    # Advanced, folded away.
    mode = forms.ChoiceField(choices=m.Host.Mode.choices, initial=m.Host.Mode.HTTP)
    client_auth = forms.ChoiceField(label="Client certificates (mTLS)", choices=m.Host.ClientAuth.choices,
                                    initial=m.Host.ClientAuth.OFF)
    client_ca = forms.ModelChoiceField(m.ClientCA.objects.all(), required=False, label="Client CA bundle")
    proxy_protocol = forms.ChoiceField(label="PROXY protocol to the upstream",
                                       choices=m.Host.ProxyProtocol.choices, initial=m.Host.ProxyProtocol.OFF)
    max_body_size = forms.IntegerField(label="Largest request body (bytes; 0: no limit)", min_value=0,
                                       initial=10 * 1024 * 1024)
    access_list = forms.ModelChoiceField(
        m.AccessList.objects.all(), required=False, label="Access list", empty_label="None: open to all",
        help_text="Address rules and Basic users, from the Access lists page.",
    )
    rate_limit_rps = forms.FloatField(label="Requests per second per client", required=False,
                                      help_text="Per proxy node. Empty: no limit.")
    rate_limit_burst = forms.IntegerField(label="Burst", required=False,
                                          help_text="Requests at once before the rate applies.")
    rate_limit_connections = forms.IntegerField(label="Connections per client", required=False,
                                                help_text="Concurrent, per proxy node. Empty: no limit.")

    BASIC = ("names", "forward_to", "upstream")
    TLS = ("tls", "certificate", "acme")
    HTTP = ("hsts", "hsts_max_age", "hsts_include_subdomains", "redirect_http", "name", "enabled")
    ADVANCED = ("mode", "client_auth", "client_ca", "proxy_protocol", "max_body_size", "access_list",
                "rate_limit_rps", "rate_limit_burst", "rate_limit_connections")
    LIMITS = ("rate_limit_rps", "rate_limit_burst", "rate_limit_connections")

    def __init__(self, *args: Any, host: m.Host | None = None, **kwargs: Any) -> None:
        self.host = host
        # Read before validation: the host form clears the upstream it is not given.
        self.own_upstream = host.upstream if host is not None else None
        if host is not None and "initial" not in kwargs:
            kwargs["initial"] = initial_for(host)
        super().__init__(*args, **kwargs)
        self.targets: list[tuple[str, int]] = []
        self.host_form: pf.HostForm | None = None
        self.host_names: list[str] = []

    def basic_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in self.BASIC]

    def tls_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in self.TLS]

    def http_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in self.HTTP]

    def advanced_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in self.ADVANCED]

    def clean_forward_to(self) -> str:
        text = self.cleaned_data.get("forward_to") or ""
        self.targets = parse_targets(text)
        return text

    def clean(self) -> dict[str, Any]:
        data = super().clean() or self.cleaned_data
        if self.errors:
            return data
        if not self.targets and not data.get("upstream"):
            self.add_error("forward_to", "Where should the traffic go? Enter host:port, or pick an upstream.")
        elif self.targets and data.get("upstream"):
            self.add_error("upstream", "Either host:port lines or an upstream, not both.")
        if data["hsts"] == "custom" and data.get("hsts_max_age") is None:
            self.add_error("hsts_max_age", "Enter the max-age of the custom HSTS policy.")
        if data["hsts"] != "off" and data["mode"] == m.Host.Mode.TCP:
            self.add_error("hsts", "HSTS is an HTTP header; a TCP host sends none. Choose Off.")
        if not self.errors:
            self._check_host(data)
        return data

    def _check_host(self, data: dict[str, Any]) -> None:
        """The admin's own host rules, on the host this page would save."""
        raw = [line.strip() for line in data["names"].splitlines() if line.strip()]
        tls, redirect = data["tls"], m.Host.RedirectStatus.PERMANENT_308.value
        host_data = {
            "name": data.get("name") or (coverage.normalized(raw) or raw or [""])[0],
            "mode": data["mode"], "max_body_size": data["max_body_size"],
            "redirect_status": self.host.redirect_status if self.host else redirect,
            "client_auth": data["client_auth"], "proxy_protocol": data["proxy_protocol"],
            "certificate": data["certificate"].pk if tls == "stored" and data.get("certificate") else "",
            "acme": (data.get("acme") or m.Host.Acme.ANY) if tls == "acme" else "",
            "client_ca": data["client_ca"].pk if data.get("client_ca") else "",
            "access_list": data["access_list"].pk if data.get("access_list") else "",
            **{key: data[key] for key in self.LIMITS if data.get(key) is not None},
            **{key: "on" for key in ("enabled", "redirect_http") if data.get(key)},
            **({"local_certificate": "on"} if tls == "local_ca" else {}),
            **({"forward_client_cert": "on"} if self.host is None or self.host.forward_client_cert else {}),
            **({"allow_trace": "on"} if self.host is not None and self.host.allow_trace else {}),
        }
        form = pf.HostForm(host_data, instance=self.host or m.Host(), names=raw)
        form.certificate_choices = PAGE_CHOICES
        form.fields["upstream"].required = False  # made or chosen when saving
        fields = {"certificate": "certificate", "local_certificate": "tls", "acme": "acme",
                  "client_ca": "client_ca", "name": "name", "client_auth": "client_auth",
                  "access_list": "access_list", **{key: key for key in self.LIMITS}}
        for field, errors in form.errors.items():
            for error in errors:
                self.add_error(fields.get(field) if field in fields else None, error)
        certificate = form.cleaned_data.get("certificate") if form.is_valid() else None
        names, problems = pf.clean_host_names(raw, certificate, self.host, acme=host_data["acme"])
        for problem in problems:
            self.add_error("names", problem)
        self.host_form, self.host_names = form, names

    @transaction.atomic
    def save(self) -> m.Host:
        assert self.host_form is not None and self.is_valid(), "save() on an invalid form"
        data = self.cleaned_data
        host = self.host_form.save(commit=False)
        host.upstream = data.get("upstream") or self._upstream_with_targets(host)
        host.hsts_policy = hsts_policy(data)
        host.save()
        host.names.exclude(name__in=self.host_names).delete()
        have = set(host.names.values_list("name", flat=True))
        for name in self.host_names:
            if name not in have:
                host.names.create(name=name)
        if data["tls"] == "local_ca":
            localca.certificate_for_host(host)
        return host

    def _upstream_with_targets(self, host: m.Host) -> m.Upstream:
        """The host's own upstream (used by no other host) with these targets, or a new one."""
        upstream = self.own_upstream
        if upstream is None or upstream.hosts.exclude(pk=host.pk).exists():
            upstream = m.Upstream.objects.create(name=unique_name(m.Upstream, host.name),
                                                 health_check_enabled=True)
        wanted = set(self.targets)
        upstream.targets.exclude(
            pk__in=[t.pk for t in upstream.targets.all() if (t.host, t.port) in wanted]).delete()
        have = {(t.host, t.port) for t in upstream.targets.all()}
        for target_host, port in self.targets:
            if (target_host, port) not in have:
                upstream.targets.create(host=target_host, port=port)
        return upstream


def unique_name(model: type[m.Upstream] | type[m.HSTSPolicy], base: str) -> str:
    name, n = base[:190], 1
    while model.objects.filter(name=name).exists():
        n += 1
        name = f"{base[:190]} {n}"
    return name


def hsts_policy(data: dict[str, Any]) -> m.HSTSPolicy | None:
    """The stored policy with the chosen values, made under the preset's name if none has them."""
    choice = data["hsts"]
    if choice == "off":
        return None
    preset = HSTS_PRESETS.get(choice)
    if preset is None:
        sub = bool(data.get("hsts_include_subdomains"))
        preset = HSTSPreset(f"max-age={data['hsts_max_age']}{'; includeSubDomains' if sub else ''}",
                            data["hsts_max_age"], sub)
    found = m.HSTSPolicy.objects.filter(
        max_age=preset.max_age, include_subdomains=preset.include_subdomains, preload=preset.preload,
        override_upstream=True,
    ).order_by("id").first()
    return found or m.HSTSPolicy.objects.create(
        name=unique_name(m.HSTSPolicy, preset.label), max_age=preset.max_age,
        include_subdomains=preset.include_subdomains, preload=preset.preload,
    )


def initial_for(host: m.Host) -> dict[str, Any]:
    """The page's fields for a stored host."""
    policy = host.hsts_policy
    hsts = "off"
    if policy is not None:
        hsts = next((key for key, p in HSTS_PRESETS.items() if p is not None and
                     (p.max_age, p.include_subdomains, p.preload) ==
                     (policy.max_age, policy.include_subdomains, policy.preload)), "custom")
    own_upstream = not host.upstream.hosts.exclude(pk=host.pk).exists()
    return {
        "names": "\n".join(host.hostnames()),
        "forward_to": "\n".join(f"{t.host}:{t.port}" for t in host.upstream.targets.all())
        if own_upstream else "",
        "upstream": None if own_upstream else host.upstream,
        "tls": "acme" if host.acme else "stored",
        "certificate": host.certificate, "acme": host.acme or m.Host.Acme.ANY,
        "hsts": hsts, "hsts_max_age": policy.max_age if policy else None,
        "hsts_include_subdomains": policy.include_subdomains if policy else False,
        "redirect_http": host.redirect_http, "name": host.name, "enabled": host.enabled,
        "mode": host.mode, "client_auth": host.client_auth, "client_ca": host.client_ca,
        "proxy_protocol": host.proxy_protocol, "max_body_size": host.max_body_size,
        "access_list": host.access_list, "rate_limit_rps": host.rate_limit_rps,
        "rate_limit_burst": host.rate_limit_burst, "rate_limit_connections": host.rate_limit_connections,
    }


def certificate_preview(raw_names: list[str], tls: str, certificate: m.Certificate | None,
                        host: m.Host | None = None) -> dict[str, Any]:
    """What the TLS section says will be served, for the page and its JSON endpoint."""
    names = coverage.normalized(raw_names)
    if not names:
        return {"level": "off", "text": "Enter the names to see which certificate will be served."}
    if tls == "local_ca":
        return {"level": "ok", "text": f"A new certificate from the local CA for {', '.join(names)}."}
    if tls == "acme":
        served = coverage.served_certificate(host, names, m.Certificate.objects.all(), timezone.now()) \
            if host is not None else None
        now = f" Until then: '{served.name}'." if served is not None else ""
        return {"level": "warn", "text": f"Ordered by ACME for {', '.join(names)} (pending).{now}"}
    if certificate is not None:
        missing = uncovered_names(certificate.sans, names)
        if missing:
            return {"level": "bad", "text": f"'{certificate.name}' does not cover {', '.join(missing)}."}
        if not coverage.is_valid_at(certificate, timezone.now()):
            return {"level": "bad", "text": f"'{certificate.name}' is not valid now."}
        return {"level": "ok", "text": f"'{certificate.name}' (chosen), expires in "
                                       f"{certificate.days_to_expiry()} days."}
    best = coverage.best_certificate(m.Certificate.objects.all(), names, timezone.now())
    if best is None:
        return {"level": "bad", "text": f"No valid stored certificate covers {', '.join(names)}: "
                                        "generate one from the local CA, or use ACME."}
    return {"level": "ok", "text": f"'{best.name}' (automatic: covers every name), expires in "
                                   f"{best.days_to_expiry()} days."}


# -- the views (wired by HostAdmin.get_urls) ------------------------------------------------


def _may_save(request: HttpRequest, host: m.Host | None) -> bool:
    user = request.user
    host_perm = "proxyadmin.change_host" if host is not None else "proxyadmin.add_host"
    upstream_perms = ("proxyadmin.add_upstream", "proxyadmin.change_upstream")
    return user.has_perm(host_perm) and user.has_perms(upstream_perms)


def proxy_host_view(model_admin: Any, request: HttpRequest, object_id: str | None = None) -> HttpResponse:
    """Add (no ``object_id``) or edit a host as a proxy host."""
    host = get_object_or_404(m.Host, pk=object_id) if object_id is not None else None
    if not _may_save(request, host):
        raise PermissionDenied
    if request.method == "POST":
        form = ProxyHostForm(request.POST, host=host)
        if form.is_valid():
            saved = form.save()
            message = "Changed as a proxy host." if host is not None else "Added as a proxy host."
            (model_admin.log_change if host is not None else model_admin.log_addition)(
                request, saved, message)
            model_admin.message_user(request, format_html(
                "Host '{}' saved: {} forwarded to upstream '{}'.",
                saved.name, ", ".join(saved.hostnames()), saved.upstream.name), messages.SUCCESS)
            return HttpResponseRedirect(reverse("admin:proxyadmin_host_changelist"))
    else:
        form = ProxyHostForm(host=host)
    bound = form.data if form.is_bound else None
    names = str(bound.get("names", "") if bound else form.initial.get("names", "")).splitlines()
    tls = str(bound.get("tls", "stored") if bound else form.initial.get("tls", "stored"))
    chosen = bound.get("certificate") if bound else getattr(form.initial.get("certificate"), "pk", None)
    context = {
        **model_admin.admin_site.each_context(request),
        "title": f"Proxy host '{host.name}'" if host is not None else "Add a proxy host",
        "form": form, "host": host, "opts": m.Host._meta,
        "preview": certificate_preview(names, tls, _certificate(chosen), host),
        "preview_url": reverse("admin:proxyadmin_host_certificate_preview"),
        "is_nav_sidebar_enabled": False,
    }
    return TemplateResponse(request, "admin/proxyadmin/host/proxy_host.html", context)


def _certificate(pk: object) -> m.Certificate | None:
    if not pk or not str(pk).isdigit():
        return None
    return m.Certificate.objects.filter(pk=int(str(pk))).first()


def certificate_preview_view(model_admin: Any, request: HttpRequest) -> JsonResponse:
    """The TLS section's line for the names typed so far: ?names=…&tls=…&certificate=…&host=…"""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    host_pk = request.GET.get("host", "")
    host = m.Host.objects.filter(pk=int(host_pk)).first() if host_pk.isdigit() else None
    names = request.GET.get("names", "")[:20000].splitlines()[:100]
    return JsonResponse(certificate_preview(
        names, request.GET.get("tls", "stored"), _certificate(request.GET.get("certificate")), host))
