"""The admin's ACME pages: accounts (keys never shown), host states, pending challenges.

The host and certificate pages (``proxyadmin.admin``) show the same state through
``acme_state_html`` and offer "Request now" through ``request_now``.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from proxyadmin import crypto, pki
from proxyadmin.acme.models import Account, Challenge, HostState
from proxyadmin.models import Host

STATUS_CLASS: dict[str, str] = {
    HostState.Status.VALID: "status-ok",
    HostState.Status.PENDING: "status-warn",
    HostState.Status.FAILING: "status-bad",
}


def _when(value: Any) -> str:
    return f"{timezone.localtime(value):%Y-%m-%d %H:%M:%S %Z}" if value else "—"


def acme_state_html(state: HostState | None, brief: bool = False) -> str:
    """A host's ACME state in words: status, the CA's error, next renewal, last attempt."""
    if state is None:
        return format_html('<span class="status-warn">pending (the worker has not run yet)</span>')
    status = format_html('<strong class="{}">{}</strong>', STATUS_CLASS.get(state.status, ""),
                         state.get_status_display())
    if brief:
        return status
    next_label = "next renewal" if state.status == HostState.Status.VALID else "next attempt"
    parts = [status]
    if state.error:
        parts.append(format_html("CA error: {}", state.error))
    next_time = _when(state.next_attempt) if state.next_attempt else "now"
    parts.append(format_html("{}: {}", next_label, next_time))
    parts.append(format_html("last attempt: {}", _when(state.last_attempt)))
    if state.failures:
        parts.append(format_html("{} failed attempt(s) in a row", state.failures))
    return format_html("<br>".join(["{}"] * len(parts)), *parts)


def request_now(model_admin: admin.ModelAdmin, request: HttpRequest, hosts: QuerySet[Host]) -> None:
    names = []
    for host in hosts:
        if not host.acme:
            model_admin.message_user(request, f"Host '{host.name}' does not use ACME: skipped.",
                                     messages.WARNING)
            continue
        HostState.of(host).request_now()
        names.append(host.name)
    if names:
        model_admin.message_user(
            request, f"The ACME worker orders a certificate for {', '.join(names)} at its next pass "
                     "(within seconds when it runs).", messages.SUCCESS)


class AccountForm(forms.ModelForm):
    directory = forms.URLField(max_length=500, assume_scheme="https", help_text="The ACME directory URL.")
    eab_hmac_key = forms.CharField(
        label="external account binding HMAC key", required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Base64url, as the CA gave it. Stored encrypted, never shown; leave empty to keep it.",
    )

    class Meta:
        model = Account
        fields = ["directory", "email", "eab_kid"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is None:
            self.fields["directory"].initial = settings.ACME_DIRECTORY
            self.fields["email"].initial = settings.ACME_EMAIL

    def save(self, commit: bool = True) -> Account:
        account = super().save(commit=False)
        if not account.key_token:
            account.key_token = crypto.encrypt(pki.key_to_pem(ec.generate_private_key(ec.SECP256R1())))
        if self.cleaned_data.get("eab_hmac_key"):
            account.set_eab_hmac_key(self.cleaned_data["eab_hmac_key"].strip())
        if commit:
            account.save()
        return account


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    form = AccountForm
    list_display = ["directory", "email", "uri", "tos_agreed_at"]
    readonly_fields = ["uri", "terms_of_service", "tos_agreed_at", "key_display", "created_at"]

    @admin.display(description="account key")
    def key_display(self, obj: Account) -> str:
        return "EC P-256, encrypted at rest" if obj.key_token else "—"


@admin.register(HostState)
class HostStateAdmin(admin.ModelAdmin):
    list_display = ["host", "status", "error", "next_attempt", "last_attempt", "failures", "certificate"]
    list_filter = ["status"]
    list_select_related = ["host", "certificate"]
    actions = ["request_acme_now"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Request an ACME certificate now")
    def request_acme_now(self, request: HttpRequest, queryset: QuerySet[HostState]) -> None:
        request_now(self, request, Host.objects.filter(acme_state__in=queryset))


@admin.register(Challenge)
class ChallengeAdmin(admin.ModelAdmin):
    list_display = ["host", "kind", "name", "token", "created_at"]
    list_select_related = ["host"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
