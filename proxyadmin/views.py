"""The live dashboard page (staff only).

The page is a skeleton: ``static/proxyadmin/dashboard.js`` fills it from the
``/ws/dashboard/`` websocket (``proxyadmin.consumers``) and draws the charts with
uPlot, which ``npm ci`` installs into ``node_modules/`` and Django serves as
``static/vendor/uplot/`` (see ``STATICFILES_DIRS``).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.staticfiles import finders
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from proxycore.agentproto import MAX_RECENT_PER_HOST

UPLOT_SCRIPT = "vendor/uplot/uPlot.iife.min.js"
UPLOT_STYLESHEET = "vendor/uplot/uPlot.min.css"
DASHBOARD_SOCKET_PATH = "/ws/dashboard/"


def chart_library_installed() -> bool:
    """Whether ``npm ci`` has put uPlot where the static files finders look."""
    return finders.find(UPLOT_SCRIPT) is not None


@never_cache
@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    context = {
        **admin.site.each_context(request),
        "title": "Dashboard",
        # The charts need the room the admin's app sidebar would take.
        "is_nav_sidebar_enabled": False,
        "chart_library_installed": chart_library_installed(),
        "uplot_script": UPLOT_SCRIPT,
        "uplot_stylesheet": UPLOT_STYLESHEET,
        "socket_path": DASHBOARD_SOCKET_PATH,
        "cert_warning_days": settings.CERT_EXPIRY_WARNING_DAYS,
        "recent_lines": MAX_RECENT_PER_HOST,
    }
    return render(request, "proxyadmin/dashboard.html", context)
