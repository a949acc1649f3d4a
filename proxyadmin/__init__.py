"""proxyadmin: the control plane (Django admin, dashboard, agent link) of the proxy."""
