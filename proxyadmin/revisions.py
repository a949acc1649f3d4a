"""The config revision counter: every change of a config model makes a new revision.

A save or delete of any model in ``CONFIG_MODELS`` is recorded by signal. Inside
``revision_batch()`` (one admin request, one import) the changes are gathered
into a single ``ConfigRevision`` with the actor and a short summary; outside a
batch each change makes its own revision.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.db.models import Model
from django.db.models.signals import post_delete, post_save
from django.http import HttpRequest, HttpResponse

from proxyadmin.models import CONFIG_MODELS, ConfigRevision

MAX_SUMMARY_LINES = 20


class _Batch:
    def __init__(self, actor: str) -> None:
        self.actor = actor
        self.changes: list[str] = []


_current_batch: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar(
    "proxyadmin_revision_batch", default=None
)


def _summarise(changes: list[str]) -> str:
    unique = list(dict.fromkeys(changes))
    lines = unique[:MAX_SUMMARY_LINES]
    if len(unique) > MAX_SUMMARY_LINES:
        lines.append(f"... and {len(unique) - MAX_SUMMARY_LINES} more changes")
    return "\n".join(lines)


def record_change(description: str, actor: str = "system") -> ConfigRevision | None:
    batch = _current_batch.get()
    if batch is not None:
        batch.changes.append(description)
        return None
    return ConfigRevision.objects.create(actor=actor, summary=description)


@contextmanager
def revision_batch(actor: str) -> Iterator[_Batch]:
    """Gather the config changes made inside into one revision, made on exit."""
    outer = _current_batch.get()
    if outer is not None:  # nested: the outer batch records everything
        yield outer
        return
    batch = _Batch(actor)
    token = _current_batch.set(batch)
    try:
        yield batch
    finally:
        _current_batch.reset(token)
        # Made even when the block failed part-way: an extra revision only costs a
        # reload, a missing one would leave nodes on stale config.
        if batch.changes:
            ConfigRevision.objects.create(actor=batch.actor, summary=_summarise(batch.changes))


def _describe(instance: Model, verb: str) -> str:
    return f"{verb} {instance._meta.verbose_name} '{instance}'"


def _on_save(sender: type[Model], instance: Model, created: bool, raw: bool = False, **_: Any) -> None:
    if raw:  # loaddata: fixtures are not operator changes
        return
    record_change(_describe(instance, "added" if created else "changed"))


def _on_delete(sender: type[Model], instance: Model, **_: Any) -> None:
    record_change(_describe(instance, "deleted"))


def connect_signals() -> None:
    for model in CONFIG_MODELS:
        post_save.connect(_on_save, sender=model, dispatch_uid=f"revision-save-{model.__name__}")
        post_delete.connect(_on_delete, sender=model, dispatch_uid=f"revision-del-{model.__name__}")


class RevisionMiddleware:
    """Gathers the config changes of one request into one revision, with its user."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return self.get_response(request)
        user = getattr(request, "user", None)
        actor = user.get_username() if user is not None and user.is_authenticated else "anonymous"
        with revision_batch(actor):
            return self.get_response(request)
