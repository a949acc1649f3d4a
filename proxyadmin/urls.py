"""URL routes of the control plane."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import path

from proxyadmin import views


def home(request: HttpRequest) -> HttpResponseRedirect:
    return HttpResponseRedirect("/admin/")


urlpatterns = [
    path("", home),
    path("admin/", admin.site.urls),
    path("dashboard/", views.dashboard, name="dashboard"),
]
