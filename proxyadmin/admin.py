"""The admin: where operators manage hosts, certificates, upstreams and HSTS policies.

Private keys are write-only here: no form, list, history entry or export shows one.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.options import TO_FIELD_VAR, csrf_protect_m
from django.contrib.admin.utils import flatten_fieldsets, unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet, Subquery
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
    JsonResponse,
)
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from proxyadmin import coverage, forms, localca, pki, proxyhost
from proxyadmin import models as m
from proxyadmin.acme.admin import acme_state_html, request_now
from proxyadmin.acme.models import HostState
from proxyadmin.hoststatus import Overview, reported_access, reported_upstream, reporting_nodes
from proxyadmin.loginguard.forms import ThrottledAuthenticationForm

admin.site.site_header = "proxyadmin"
admin.site.site_title = "proxyadmin"
admin.site.index_title = "Proxy configuration"
admin.site.login_form = ThrottledAuthenticationForm
admin.site.site_url = "/dashboard/"  # "View site": the live dashboard, not the admin again

# The index by task: what operators come for first, the bookkeeping under "Administration".
TASK_ORDER = ("Host", "Upstream", "Certificate", "HSTSPolicy", "ClientCA", "ProxySettings",
              "Account", "HostState", "Challenge")
ADMINISTRATION = ("User", "Group", "ConfigRevision", "ProxyNode", "TrafficRollup", "LoginFailures")


def app_list_by_task(request: HttpRequest, app_label: str | None = None) -> list[dict[str, Any]]:
    apps = admin.AdminSite.get_app_list(admin.site, request, app_label)
    if app_label is not None:
        return apps
    models = [model for app in apps for model in app["models"]]
    tasks = sorted((x for x in models if x["object_name"] not in ADMINISTRATION),
                   key=lambda x: TASK_ORDER.index(x["object_name"]) if x["object_name"] in TASK_ORDER
                   else len(TASK_ORDER))
    kept = sorted((x for x in models if x["object_name"] in ADMINISTRATION),
                  key=lambda x: ADMINISTRATION.index(x["object_name"]))
    sections = [("Proxy configuration", "proxyadmin", tasks), ("Administration", "administration", kept)]
    return [{"name": name, "app_label": label, "app_url": apps[0]["app_url"] if label == "proxyadmin" else "",
             "has_module_perms": True, "models": listed} for name, label, listed in sections if listed]


admin.site.get_app_list = app_list_by_task  # type: ignore[method-assign]


def hosts_served_now() -> dict[int, list[coverage.ServedTo]]:
    """Which hosts each stored certificate is served to now, read once per page."""
    hosts = m.Host.objects.select_related("certificate").prefetch_related("names").order_by("name")
    return coverage.hosts_served(hosts, m.Certificate.objects.all(), timezone.now())


def served_to_html(served: list[coverage.ServedTo]) -> str:
    if not served:
        return format_html('<span class="status-off">{}</span>', "not served")
    return format_html_join("", '<div><a href="{}">{}</a> ({}{})</div>', (
        (reverse("admin:proxyadmin_host_change", args=[s.host.pk]), s.host.name,
         "chosen" if s.chosen else "automatic", "" if s.host.enabled else ", host disabled")
        for s in served))


class CertificateChangeList(ChangeList):
    """Works out which certificate each host is served once per page, for the serving column."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        served = hosts_served_now()
        for cert in self.result_list:
            cert.served_to = served.get(cert.pk, [])


@admin.register(m.Certificate)
class CertificateAdmin(admin.ModelAdmin):
    form = forms.CertificateForm
    list_display = ["name", "sans_display", "expiry", "serving", "key_display", "source", "chain_complete"]
    list_filter = ["source", "key_type"]
    search_fields = ["name", "subject", "sans", "fingerprint_sha256"]
    readonly_fields = [
        "subject", "sans_display", "issuer", "serial", "not_before", "not_after", "expiry",
        "key_display", "fingerprint_display", "chain_complete", "source", "used_by", "acme_display",
    ]
    change_list_template = "admin/proxyadmin/certificate/change_list.html"
    change_form_template = "admin/proxyadmin/certificate/change_form.html"

    def get_fieldsets(self, request: HttpRequest, obj: m.Certificate | None = None) -> Any:
        upload = (
            "Upload",
            {
                "fields": [
                    "name", "chain_pem", "chain_file", "key_pem", "key_file", "pkcs12_file",
                    "passphrase", "allow_incomplete",
                ],
                "description": "Paste PEM, or upload PEM files or a PKCS#12 file. The chain is "
                "checked (order, completeness, validity) and the key is encrypted at rest.",
            },
        )
        if obj is None:
            return [upload]
        details = ("Parsed from the certificate", {"fields": self.readonly_fields})
        return [details, upload]

    @admin.display(description="names (SANs)")
    def sans_display(self, obj: m.Certificate) -> str:
        return ", ".join(obj.sans) or "—"

    @admin.display(description="expires", ordering="not_after")
    def expiry(self, obj: m.Certificate) -> str:
        days = obj.days_to_expiry()
        if days < 0:
            # Whole days since expiry, rounded down like the days to come.
            ago = (timezone.now() - obj.not_after).days
            return format_html('<strong class="status-bad">expired {} days ago</strong>', ago)
        if obj.expires_soon():
            return format_html('<strong class="status-warn">⚠ in {} days</strong>', days)
        return format_html("in {} days", days)

    @admin.display(description="key")
    def key_display(self, obj: m.Certificate) -> str:
        return f"{obj.key_type} {obj.key_size}"

    @admin.display(description="SHA-256 fingerprint")
    def fingerprint_display(self, obj: m.Certificate) -> str:
        return obj.fingerprint_display()

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return CertificateChangeList

    @admin.display(description="serving")
    def serving(self, obj: m.Certificate) -> str:
        served = getattr(obj, "served_to", None)
        return served_to_html(served if served is not None else hosts_served_now().get(obj.pk, []))

    @admin.display(description="used by hosts")
    def used_by(self, obj: m.Certificate) -> str:
        # Served now, chosen or picked automatically (the snapshot's rule); a host that chose
        # it keeps it even when expired, so nothing that points at it is left out.
        return served_to_html(hosts_served_now().get(obj.pk, []))

    @admin.display(description="ACME")
    def acme_display(self, obj: m.Certificate) -> str:
        states = list(HostState.objects.filter(certificate=obj).select_related("host"))
        if not states:
            return "—"
        return format_html_join(format_html("<br>"), "{}: {}",
                                ((s.host.name, acme_state_html(s)) for s in states))

    @csrf_protect_m
    def changeform_view(
        self, request: HttpRequest, object_id: str | None = None, form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if request.method == "POST":
            self.inspect_before_transaction(request, object_id)
        return super().changeform_view(request, object_id, form_url, extra_context)

    def inspect_before_transaction(self, request: HttpRequest, object_id: str | None) -> None:
        """Check the upload before Django opens the transaction it saves in.

        With SQLite that transaction holds the database's write lock from its start;
        the form validated inside it reuses this inspection (``get_form``) instead.
        """
        inspections = forms.UploadInspections()
        request.certificate_inspections = inspections  # type: ignore[attr-defined]
        to_field = request.POST.get(TO_FIELD_VAR, request.GET.get(TO_FIELD_VAR))
        obj = self.get_object(request, unquote(object_id), to_field) if object_id else None
        if object_id and obj is None:
            return  # Django answers these itself
        if not (self.has_change_permission(request, obj) if obj else self.has_add_permission(request)):
            return
        fields = flatten_fieldsets(self.get_fieldsets(request, obj))
        form_class = self.get_form(request, obj, change=obj is not None, fields=fields)
        form_class(request.POST, request.FILES, instance=obj).is_valid()

    def get_form(
        self, request: HttpRequest, obj: m.Certificate | None = None, change: bool = False, **kwargs: Any
    ) -> Any:
        form_class = super().get_form(request, obj, change, **kwargs)
        inspections = getattr(request, "certificate_inspections", None)
        if inspections is None:
            return form_class
        return type(form_class.__name__, (form_class,), {"shared_inspections": inspections})

    def save_model(self, request: HttpRequest, obj: m.Certificate, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        inspected = form.inspected
        if inspected is not None and inspected.reordered:
            messages.info(request, "The chain was out of order; it was stored leaf first, each "
                                   "certificate followed by its issuer.")
        if inspected is not None and not inspected.complete:
            messages.warning(request, "The chain is incomplete; clients that do not trust its "
                                      "last issuer directly will refuse it.")

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view  # staff only, CSRF-protected
        extra = [
            path("local-ca.pem", view(self.download_local_ca), name="proxyadmin_local_ca"),
            path("check/", view(self.check_upload), name="proxyadmin_certificate_check"),
            path("<path:object_id>/check/", view(self.check_upload),
                 name="proxyadmin_certificate_check_change"),
        ]
        return extra + super().get_urls()

    def check_upload(self, request: HttpRequest, object_id: str | None = None) -> HttpResponse:
        """The errors Save would show, per field, as JSON; nothing is saved.

        ``certificate.js`` posts the form here before it submits it, so a refused upload
        keeps its chosen files, pasted key and passphrase in the browser: the page that
        Save renders could not give them back (the key is never rendered).
        """
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        obj = self.get_object(request, unquote(object_id)) if object_id is not None else None
        if object_id is not None and obj is None:
            raise Http404
        if not (self.has_change_permission(request, obj) if obj else self.has_add_permission(request)):
            raise PermissionDenied
        fields = flatten_fieldsets(self.get_fieldsets(request, obj))
        form = self.get_form(request, obj, change=obj is not None, fields=fields)(
            request.POST, request.FILES, instance=obj)
        errors = {} if form.is_valid() else {name: list(found) for name, found in form.errors.items()}
        return JsonResponse({"errors": errors})

    def download_local_ca(self, request: HttpRequest) -> HttpResponse:
        ca = localca.get_or_create_ca()
        response = HttpResponse(ca.certificate_pem, content_type="application/x-pem-file")
        response["Content-Disposition"] = 'attachment; filename="proxyadmin-local-ca.pem"'
        return response


@admin.register(m.ClientCA)
class ClientCAAdmin(admin.ModelAdmin):
    form = forms.ClientCAForm
    list_display = ["name", "subjects_display", "not_after", "crl_next_update"]
    readonly_fields = ["subjects_display", "not_after", "crl_next_update"]

    @admin.display(description="CAs")
    def subjects_display(self, obj: m.ClientCA) -> str:
        return format_html_join("", "<div>{}</div>", ((s,) for s in obj.subjects)) or "—"


@admin.register(m.HSTSPolicy)
class HSTSPolicyAdmin(admin.ModelAdmin):
    form = forms.HSTSPolicyForm
    list_display = ["name", "header", "override_upstream"]
    readonly_fields = ["header"]
    fields = ["name", "max_age", "include_subdomains", "preload", "override_upstream", "header"]

    @admin.display(description="header sent")
    def header(self, obj: m.HSTSPolicy) -> str:
        if obj.pk is None:
            return "Shown after saving."
        return format_html("<code>Strict-Transport-Security: {}</code>", obj.header_value())


class UpstreamTargetInline(admin.TabularInline):
    model = m.UpstreamTarget
    form = forms.UpstreamTargetForm
    formset = forms.UpstreamTargetFormSet
    extra = 0
    min_num = 1


# -- target health as the nodes report it (read-only) -------------------------

def target_state(target: dict[str, Any]) -> str:
    if target.get("enabled") is False:
        return "disabled"
    if target.get("draining"):
        return "draining"
    if target.get("healthy"):
        return "healthy"
    return "cooling down" if target.get("cooling_down") else "down"


def target_health_table(state: dict[str, Any]) -> str:
    targets = [t for t in state.get("targets", []) if isinstance(t, dict)]
    rows = format_html_join(
        "", '<tr><td>{}</td><td class="{}">{}</td><td>{}</td><td>{}</td></tr>',
        (
            (t.get("address", "?"), "" if target_state(t) == "healthy" else "status-bad",
             target_state(t), t.get("active", 0), t.get("last_error") or "—")
            for t in targets
        ),
    )
    return format_html(
        "<table><thead><tr><th>target</th><th>state</th><th>active connections</th>"
        "<th>last error</th></tr></thead><tbody>{}</tbody></table>",
        rows,
    )


class UpstreamChangeList(ChangeList):
    """Reads the reporting nodes once per page for the "healthy" column, not once per row."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        nodes = reporting_nodes()
        for upstream in self.result_list:
            upstream.reporting_nodes = nodes


@admin.register(m.Upstream)
class UpstreamAdmin(admin.ModelAdmin):
    form = forms.UpstreamForm
    inlines = [UpstreamTargetInline]
    list_display = [
        "name", "targets_display", "healthy_display", "balancing", "tls_display", "health_check_enabled",
    ]
    readonly_fields = ["tls_warning", "target_health"]

    def get_fieldsets(self, request: HttpRequest, obj: m.Upstream | None = None) -> Any:
        # The warning is a row of its own only when there is one: no stray empty label.
        if obj is not None and obj.tls and not obj.tls_verify:
            return self.fieldsets
        return [(name, {**opts, "fields": [f for f in opts["fields"] if f != "tls_warning"]})
                for name, opts in self.fieldsets or []]
    fieldsets = [
        (None, {"fields": ["name", "balancing", "connect_timeout", "read_timeout"]}),
        ("TLS to the upstream", {"fields": [
            "tls_warning", "tls", "tls_verify", "tls_ca_bundle", "tls_server_name",
            "tls_client_certificate",
        ]}),
        ("Health checks", {"fields": [
            "health_check_enabled", "health_check_path", "health_check_interval",
            "health_check_timeout", "healthy_threshold", "unhealthy_threshold",
            "passive_failures", "passive_cooldown",
        ]}),
        ("Target health", {
            "fields": ["target_health"],
            "description": "As each online or stale proxy node last reported it; nodes check "
                           "their targets each for itself.",
        }),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[m.Upstream]:
        return super().get_queryset(request).prefetch_related("targets")

    @admin.display(description="targets")
    def targets_display(self, obj: m.Upstream) -> str:
        return ", ".join(str(t) for t in obj.targets.all()) or "—"

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return UpstreamChangeList

    @admin.display(description="healthy")
    def healthy_display(self, obj: m.Upstream) -> str:
        nodes = getattr(obj, "reporting_nodes", None)
        for node, _status in nodes if nodes is not None else reporting_nodes():
            state = reported_upstream(node, obj.name)
            if state is not None:  # the freshest node that reports it
                healthy, total = state.get("healthy", 0), state.get("total", 0)
                status = "status-bad" if healthy < total else ""
                return format_html('<span class="{}" title="{}">{} / {}</span>',
                                   status, f"as node {node.name} reports it", healthy, total)
        return "—"

    @admin.display(description="target health")
    def target_health(self, obj: m.Upstream) -> str:
        if obj.pk is None:
            return "Shown after saving, once a proxy node reports this upstream."
        sections = [
            (node.name, status, target_health_table(state))
            for node, status in reporting_nodes()
            if (state := reported_upstream(node, obj.name)) is not None
        ]
        if not sections:
            return "No node reports this upstream yet."
        return format_html_join("", "<h3>{} ({})</h3>{}", sections)

    @admin.display(description="TLS")
    def tls_display(self, obj: m.Upstream) -> str:
        if not obj.tls:
            return "plain"
        if not obj.tls_verify:
            return format_html('<strong class="status-bad">{}</strong>', "⚠ TLS, not verified")
        return "TLS, verified"

    @admin.display(description="Warning")
    def tls_warning(self, obj: m.Upstream) -> str:
        if obj.pk and obj.tls and not obj.tls_verify:
            return format_html(
                '<strong class="status-bad">{}</strong>',
                "⚠ Certificate verification is off: the proxy accepts any certificate from "
                "these targets.",
            )
        return ""


class HostChangeList(ChangeList):
    """Reads what the status column needs (certificates, nodes, revision) once per page."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        overview = Overview.load()
        for host in self.result_list:
            host.overview = overview


class HostNameInline(admin.TabularInline):
    model = m.HostName
    form = forms.HostNameForm
    formset = forms.HostNameFormSet
    extra = 1
    verbose_name_plural = "names (exact, or *.example.com)"


@admin.register(m.Host)
class HostAdmin(admin.ModelAdmin):
    form = forms.HostForm
    inlines = [HostNameInline]
    list_display = [
        "name", "status_display", "names_display", "certificate_display", "upstream_display", "enabled",
    ]
    list_filter = ["enabled", "mode", "client_auth", "acme"]
    list_select_related = ["upstream", "certificate", "acme_state"]
    search_fields = ["name", "names__name"]
    actions = ["enable_hosts", "disable_hosts", "generate_local_certificate", "request_acme_now"]
    readonly_fields = ["acme_status", "access_activity"]
    fieldsets = [
        (None, {"fields": [
            "name", "enabled", "mode", "upstream", "certificate", "local_certificate", "max_body_size",
        ]}),
        ("Automatic certificate (ACME)", {"fields": ["acme", "acme_status"]}),
        ("HTTP", {"fields": ["hsts_policy", "redirect_http", "redirect_status", "allow_trace"]}),
        ("Client certificates (mTLS)", {"fields": [
            "client_auth", "client_ca", "forward_client_cert", "forward_client_cert_chain",
        ]}),
        ("To the upstream", {"fields": ["proxy_protocol"]}),
        ("Access and rate limits", {"fields": [
            "access_list", "rate_limit_rps", "rate_limit_burst", "rate_limit_connections", "access_activity",
        ]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[m.Host]:
        return super().get_queryset(request).prefetch_related("names")

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        if form.cleaned_data.get("local_certificate"):
            self.issue_local_certificate(request, form.instance)

    def issue_local_certificate(self, request: HttpRequest, host: m.Host) -> bool:
        try:
            cert = localca.certificate_for_host(host)
        except pki.CertificateProblem as exc:
            self.message_user(request, f"Host '{host.name}': {exc.message}", messages.ERROR)
            return False
        self.message_user(
            request,
            format_html(
                "Host '{}' now uses the new certificate '{}' for {}. "
                '<a href="{}">Download the local CA</a> to trust it.',
                host.name, cert.name, ", ".join(cert.sans), reverse("admin:proxyadmin_local_ca"),
            ),
            messages.SUCCESS,
        )
        return True

    change_list_template = "admin/proxyadmin/host/change_list.html"
    change_form_template = "admin/proxyadmin/host/change_form.html"

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        extra = [
            path("proxy-host/", view(lambda r: proxyhost.proxy_host_view(self, r)),
                 name="proxyadmin_host_proxy_add"),
            path("proxy-host/certificate/", view(lambda r: proxyhost.certificate_preview_view(self, r)),
                 name="proxyadmin_host_certificate_preview"),
            path("<path:object_id>/proxy-host/",
                 view(lambda r, object_id: proxyhost.proxy_host_view(self, r, object_id)),
                 name="proxyadmin_host_proxy_change"),
        ]
        return extra + super().get_urls()

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return HostChangeList

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        # The page operators live on gets the whole width: at 1366 px the navigation
        # sidebar (the index, again) would push the status columns off the screen.
        return super().changelist_view(request, {"is_nav_sidebar_enabled": False, **(extra_context or {})})

    @staticmethod
    def overview(obj: m.Host) -> Overview:
        return getattr(obj, "overview", None) or Overview.load()

    @admin.display(description="names")
    def names_display(self, obj: m.Host) -> str:
        return format_html_join("", '<div class="host-name">{}</div>',
                                ((n.name,) for n in obj.names.all())) or "—"

    @admin.display(description="status")
    def status_display(self, obj: m.Host) -> str:
        return format_html_join(
            "", '<div class="host-status status-{}">{}</div>',
            ((s.level, s.text) for s in self.overview(obj).status(obj)),
        )

    @admin.display(description="certificate served")
    def certificate_display(self, obj: m.Host) -> str:
        overview = self.overview(obj)
        cert = overview.served_certificate(obj)
        acme = format_html("<div>{}</div>", self.acme_display(obj)) if obj.acme else ""
        if cert is None:
            return format_html('<span class="status-bad">{}</span>{}', "none", acme)
        days = cert.days_to_expiry(overview.now)
        level = "bad" if days < 0 else "warn" if cert.expires_soon() else "ok"
        when = f"expired {-days} days ago" if days < 0 else f"expires in {days} days"
        chosen = "" if obj.certificate_id else " (automatic)"
        return format_html(
            '<a href="{}">{}</a>{}<div class="status-{}">{}</div>{}',
            reverse("admin:proxyadmin_certificate_change", args=[cert.pk]), cert.name, chosen, level, when,
            acme,
        )

    @admin.display(description="upstream", ordering="upstream__name")
    def upstream_display(self, obj: m.Host) -> str:
        health = self.overview(obj).upstream_health(obj.upstream)
        if health is None:
            state = format_html('<div class="status-off">{}</div>', "not reported")
        else:
            level = "bad" if health.healthy < health.total else "ok"
            state = format_html('<div class="status-{}" title="as node {} reports it">{} / {} healthy</div>',
                                level, health.node, health.healthy, health.total)
        return format_html('<a href="{}">{}</a>{}', reverse(
            "admin:proxyadmin_upstream_change", args=[obj.upstream_id]), obj.upstream.name, state)

    @admin.action(description="Enable the selected hosts")
    def enable_hosts(self, request: HttpRequest, queryset: QuerySet[m.Host]) -> None:
        enabled = []
        for host in queryset.filter(enabled=False).prefetch_related("names"):
            if not host.certificate_id and not host.acme:
                problem = coverage.missing_certificate(host.hostnames())
                if problem:
                    self.message_user(request, f"Host '{host.name}' stays disabled: {problem}",
                                      messages.ERROR)
                    continue
            host.enabled = True
            host.save(update_fields=["enabled"])
            self.log_change(request, host, [{"changed": {"fields": ["Enabled"]}}])
            enabled.append(host.name)
        if enabled:
            self.message_user(request, f"Enabled: {', '.join(enabled)}.", messages.SUCCESS)

    @admin.action(description="Disable the selected hosts (they answer 503)")
    def disable_hosts(self, request: HttpRequest, queryset: QuerySet[m.Host]) -> None:
        disabled = []
        for host in queryset.filter(enabled=True):
            host.enabled = False
            host.save(update_fields=["enabled"])
            self.log_change(request, host, [{"changed": {"fields": ["Enabled"]}}])
            disabled.append(host.name)
        if disabled:
            self.message_user(request, f"Disabled: {', '.join(disabled)}.", messages.SUCCESS)

    @admin.display(description="ACME")
    def acme_display(self, obj: m.Host) -> str:
        if not obj.acme:
            return "—"
        state = getattr(obj, "acme_state", None)
        return format_html("{}: {}", obj.acme, acme_state_html(state, brief=True))

    @admin.display(description="ACME status")
    def acme_status(self, obj: m.Host) -> str:
        return acme_state_html(getattr(obj, "acme_state", None)) if obj.pk and obj.acme else "—"

    @admin.display(description="Refused (reporting nodes)")
    def access_activity(self, obj: m.Host) -> str:
        if not obj.pk:
            return "—"
        seen = reported_access(obj.name)
        counts = format_html(
            "403 denied: {} · 401 unauthorized: {} · 429 rate limited: {} (since each node started)",
            seen["denied"], seen["unauthorized"], seen["rate_limited"])
        if not seen["limited_clients"]:
            return format_html("{}<br>No client rate-limited in the last 15 minutes.", counts)
        rows = format_html_join("", "<li><code>{}</code>: {}</li>", seen["limited_clients"])
        return format_html("{}<br>Most limited clients, last 15 minutes:<ul>{}</ul>", counts, rows)

    @admin.action(description="Request an ACME certificate now for the selected hosts")
    def request_acme_now(self, request: HttpRequest, queryset: QuerySet[m.Host]) -> None:
        request_now(self, request, queryset)

    @admin.action(description="Generate a certificate from the local CA for the selected hosts")
    def generate_local_certificate(self, request: HttpRequest, queryset: QuerySet[m.Host]) -> None:
        for host in queryset.prefetch_related("names"):
            if not host.hostnames():
                self.message_user(request, f"Host '{host.name}' has no names: skipped.", messages.WARNING)
                continue
            self.issue_local_certificate(request, host)


class AccessUserInline(admin.TabularInline):
    model = m.AccessUser
    form = forms.AccessUserForm
    formset = forms.AccessUserFormSet
    extra = 1
    fields = ["username", "password"]


@admin.register(m.AccessList)
class AccessListAdmin(admin.ModelAdmin):
    form = forms.AccessListForm
    inlines = [AccessUserInline]
    list_display = ["name", "default", "satisfy", "rule_count", "user_count", "hosts_display"]
    search_fields = ["name", "users__username"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[m.AccessList]:
        return super().get_queryset(request).prefetch_related("users", "hosts")

    @admin.display(description="rules")
    def rule_count(self, obj: m.AccessList) -> int:
        return sum(1 for line in obj.rules.splitlines() if line.strip())

    @admin.display(description="users")
    def user_count(self, obj: m.AccessList) -> int:
        return len(obj.users.all())

    @admin.display(description="used by")
    def hosts_display(self, obj: m.AccessList) -> str:
        return ", ".join(h.name for h in obj.hosts.all()) or "-"


@admin.register(m.ProxySettings)
class ProxySettingsAdmin(admin.ModelAdmin):
    form = forms.ProxySettingsForm

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        obj = m.ProxySettings.load()
        return HttpResponseRedirect(reverse("admin:proxyadmin_proxysettings_change", args=[obj.pk]))


@admin.register(m.ConfigRevision)
class ConfigRevisionAdmin(admin.ModelAdmin):
    list_display = ["id", "created_at", "actor", "summary"]
    readonly_fields = ["created_at", "actor", "summary"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows the control plane writes itself: staff look, never edit."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(m.ProxyNode)
class ProxyNodeAdmin(ReadOnlyAdmin):
    list_display = ["name", "status_display", "revision_display", "workers_display", "last_seen",
                    "last_error_display"]
    search_fields = ["name"]
    readonly_fields = (
        "name", "status_display", "revision_display", "workers_display", "version", "pid",
        "listeners_display",
        "connected", "last_seen", "started_at", "last_error_revision", "last_error",
    )
    fields = readonly_fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[m.ProxyNode]:
        # One query for the current revision of every row, not one per row.
        current = m.ConfigRevision.objects.order_by("-id").values("id")[:1]
        return super().get_queryset(request).annotate(current_revision=Subquery(current))

    # Deleting is allowed: it forgets a retired node (one that reconnects is added again).

    @admin.display(description="status")
    def status_display(self, obj: m.ProxyNode) -> str:
        status = {"online": "status-ok", "stale": "status-warn"}.get(obj.status, "status-bad")
        return format_html('<strong class="{}">{}</strong>', status, obj.status)

    @admin.display(description="workers")
    def workers_display(self, obj: m.ProxyNode) -> str:
        """Worker processes, as of the last rollup flush; restarts flagged."""
        if not obj.worker_restarts:
            return format_html("{}", obj.workers)
        return format_html('{} <strong class="status-warn">({} restarts)</strong>', obj.workers,
                           obj.worker_restarts)

    @admin.display(description="applied / current revision")
    def revision_display(self, obj: m.ProxyNode) -> str:
        current = getattr(obj, "current_revision", None) or 0
        applied = obj.applied_revision
        if applied is None:
            return format_html("— / {}", current)
        if applied < current:
            return format_html('<strong class="status-warn">{} / {}</strong>', applied, current)
        return format_html("{} / {}", applied, current)

    @admin.display(description="last error")
    def last_error_display(self, obj: m.ProxyNode) -> str:
        if not obj.last_error:
            return "—"
        return format_html("revision {}: {}", obj.last_error_revision, obj.last_error[:200])

    @admin.display(description="listeners")
    def listeners_display(self, obj: m.ProxyNode) -> str:
        return ", ".join(f"{lst.get('name')} {lst.get('address')}" for lst in obj.listeners or []) or "—"


@admin.register(m.TrafficRollup)
class TrafficRollupAdmin(ReadOnlyAdmin):
    list_display = [
        "minute", "host", "requests", "responses_2xx", "responses_3xx", "responses_4xx",
        "responses_5xx", "bytes_in", "bytes_out", "handshake_failures", "upstream_errors",
    ]
    list_filter = ["host"]
    date_hierarchy = "minute"
    search_fields = ["host"]
    readonly_fields = ["minute", "host", *m.TrafficRollup.COUNTERS]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
