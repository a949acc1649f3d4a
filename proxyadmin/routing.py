"""Websocket routes of the control plane.

The agent route takes the bearer token only: it is deliberately outside the
session and origin middleware (nodes send no Origin and have no session). The
dashboard route is for browsers: the Origin must be an allowed host and the
session must be a staff member's.
"""

from __future__ import annotations

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from proxyadmin.consumers import AgentConsumer, DashboardConsumer

websocket_urlpatterns = [
    path("ws/agent/", AgentConsumer.as_asgi()),
    path("ws/dashboard/", AllowedHostsOriginValidator(AuthMiddlewareStack(DashboardConsumer.as_asgi()))),
]
