"""``manage.py up``: the whole product in one command.

Runs the migrations, creates the admin account on first run, installs the
dashboard's chart library with npm when it is missing, and supervises the
control plane (daphne: admin on 127.0.0.1:8000), the ACME worker (``manage.py acme``)
and one proxy node (runproxy: HTTPS on 127.0.0.1:8443, HTTP on 127.0.0.1:8080) until
Ctrl-C, SIGTERM or SIGHUP, then stops them (``proxyadmin.supervisor``).
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from proxyadmin import chartlib, demo
from proxyadmin.supervisor import STOP_GRACE, Child, Supervisor
from proxycore.workers import MAX_WORKERS

MANAGE = settings.BASE_DIR / "manage.py"
ADMIN_USER_ENV = "PROXYADMIN_ADMIN_USER"
ADMIN_PASSWORD_ENV = "PROXYADMIN_ADMIN_PASSWORD"  # noqa: S105 (a variable's name)
# The node cuts what is still in flight itself, inside the supervisor's grace: it then
# stops gracefully (access log flushed, agent link closed) instead of being killed.
NODE_STOP_DEADLINE = STOP_GRACE - 2


def parse_address(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(f"{what} must look like 127.0.0.1:8000, not {value!r}.")
    return host.strip("[]"), int(port)


class Command(BaseCommand):
    help = "Migrate, create the admin account on first run, and run the control plane."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--admin", default="127.0.0.1:8000",
                            help="address of the admin and dashboard (default 127.0.0.1:8000)")
        parser.add_argument("--https", default="127.0.0.1:8443",
                            help="HTTPS listener of the proxy node (default 127.0.0.1:8443)")
        parser.add_argument("--http", default="127.0.0.1:8080",
                            help="HTTP listener of the proxy node (default 127.0.0.1:8080)")
        parser.add_argument("--metrics", default=None, metavar="HOST:PORT",
                            help="Prometheus metrics of the proxy node at http://HOST:PORT/metrics "
                                 "(default: off)")
        parser.add_argument("--no-proxy", action="store_true", help="run the admin only")
        parser.add_argument("--no-session-resumption", action="store_true",
                            help="the proxy node resumes no TLS session (runproxy's option)")
        parser.add_argument("--workers", type=int, default=None,
                            help="worker processes of the proxy node (runproxy's option; default: "
                                 "the CPUs this process may use)")
        parser.add_argument("--demo", action="store_true",
                            help="add a working example on first run (host 'localhost', its "
                                 "certificate, an HSTS policy) and run its demo upstream")
        parser.add_argument("--demo-upstream", default="127.0.0.1:8081",
                            help="address of the demo upstream (default 127.0.0.1:8081)")

    def handle(self, *args: Any, **options: Any) -> None:
        admin_host, admin_port = parse_address(options["admin"], "--admin")
        for option in ("https", "http"):
            parse_address(options[option], f"--{option}")
        if options["metrics"] is not None:
            parse_address(options["metrics"], "--metrics")
        demo_port = parse_address(options["demo_upstream"], "--demo-upstream")[1]
        if options["workers"] is not None and not 1 <= options["workers"] <= MAX_WORKERS:
            raise CommandError(f"--workers must be between 1 and {MAX_WORKERS}, not {options['workers']}.")
        try:
            self.prepare_and_supervise(options, admin_host, admin_port, demo_port)
        except KeyboardInterrupt:  # Ctrl-C before the children started: nothing to stop
            self.stderr.write("Interrupted before the product started.")
            sys.exit(130)

    def prepare_and_supervise(
        self, options: dict[str, Any], admin_host: str, admin_port: int, demo_port: int,
    ) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        self.ensure_admin_account()
        chartlib.ensure_installed(settings.BASE_DIR, settings.UPLOT_DIST, self.stdout)
        children = [self.daphne_child(admin_host, admin_port), self.acme_child()]
        lines = [f"Admin:  http://{options['admin']}/admin/",
                 f"Dashboard:  http://{options['admin']}/dashboard/"]
        if options["demo"]:
            children.append(self.demo_child(options["demo_upstream"]))
            lines += self.demo_lines(demo.install_demo(demo_port), options["https"])
        if not options["no_proxy"]:
            children.append(self.proxy_child(options["https"], options["http"], options["metrics"],
                                             control=f"http://{options['admin']}",
                                             resumption=not options["no_session_resumption"],
                                             workers=options["workers"]))
            lines += [f"Proxy:  https://{options['https']}/  and  http://{options['http']}/"]
            if options["metrics"] is not None:
                lines += [f"Metrics: http://{options['metrics']}/metrics"]
        self.stdout.write("\n".join([*lines, "Press Ctrl-C to stop."]))
        self.stdout.flush()
        sys.exit(Supervisor(children).run())

    def ensure_admin_account(self) -> None:
        user_model = get_user_model()
        if user_model.objects.filter(is_superuser=True).exists():
            return
        username = os.environ.get(ADMIN_USER_ENV, "admin")
        password = os.environ.get(ADMIN_PASSWORD_ENV)
        generated = not password
        password = password or secrets.token_urlsafe(12)
        user_model.objects.create_superuser(username=username, email="", password=password)
        if generated:
            # Shown once, on the terminal that ran `up`; it is stored only hashed.
            self.stdout.write(self.style.WARNING(
                f"Created the admin account '{username}' with password: {password}\n"
                "It is shown only this once; change it in the admin."
            ))
        else:
            self.stdout.write(f"Created the admin account '{username}' ({ADMIN_PASSWORD_ENV}).")

    def demo_lines(self, created: bool, https: str) -> list[str]:
        port = https.rpartition(":")[2]
        return [
            "Demo:   " + ("added host 'localhost' (local CA certificate, HSTS, demo upstream)"
                          if created else "host 'localhost' is configured"),
            f"        curl --cacert {demo.ca_path()} https://localhost:{port}/",
        ]

    def demo_child(self, listen: str) -> Child:
        argv = [sys.executable, str(MANAGE), "demoupstream", "--listen", listen]
        return Child("demo upstream", argv)

    def proxy_child(
        self, https: str, http: str, metrics: str | None = None, control: str | None = None,
        resumption: bool = True, workers: int | None = None,
    ) -> Child:
        argv = [sys.executable, str(MANAGE), "runproxy", "--https", https, "--http", http,
                "--stop-deadline", f"{NODE_STOP_DEADLINE:g}"]
        if not resumption:
            argv.append("--no-session-resumption")
        if workers is not None:
            argv += ["--workers", str(workers)]
        if control is not None:
            argv += ["--control", control]
        if metrics is not None:
            argv += ["--metrics", metrics]
        return Child("proxy node (runproxy)", argv)

    def acme_child(self) -> Child:
        return Child("ACME worker", [sys.executable, str(MANAGE), "acme"])

    def daphne_child(self, host: str, port: int) -> Child:
        argv = [sys.executable, "-m", "daphne", "-b", host, "-p", str(port),
                "proxyadmin.asgi:application"]
        return Child("control plane (daphne)", argv)
