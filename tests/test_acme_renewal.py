"""Renewal against pebble with traffic flowing: no request fails, and the new serial is served.

The host's renewal time is moved to now (what the clock does when a third of the lifetime
is left); the next pass orders again, and the node swaps certificates in one reload while
requests keep coming on new TLS connections.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

from tests.acmeharness import acme_stack, needs_pebble, served_leaf
from tests.proxyharness import Upstream, read_response
from tests.test_acme_issuance import NAMES, acme_config

pytestmark = needs_pebble


class Traffic(threading.Thread):
    """GETs on new TLS connections, verified against ``root_pem``, until stopped; counts failures."""

    def __init__(self, port: int, root_pem: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.context = port, ssl.create_default_context(cadata=root_pem.decode())
        self.ok, self.failed, self.stopping = 0, [], threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, \
                        self.context.wrap_socket(raw, server_hostname=NAMES[0]) as tls:
                    tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAMES[0]}\r\n\r\n".encode())
                    status = read_response(tls)[0]
                self.ok += status == 200
                if status != 200:
                    self.failed.append(status)
            except OSError as exc:
                self.failed.append(repr(exc))
            time.sleep(0.01)


def test_a_due_renewal_is_served_without_a_failed_request(tmp_path: Path, upstream: Upstream) -> None:
    with acme_stack(tmp_path) as stack:
        stack.project.import_config(acme_config(upstream.port, "http-01"))
        stack.acme_once()
        stack.wait_served(NAMES)
        first = served_leaf(stack.https_port, NAMES[0], stack.pebble.root_pem)
        traffic = Traffic(stack.https_port, stack.pebble.root_pem)
        traffic.start()
        stack.shell("from django.utils import timezone; from proxyadmin.acme.models import HostState; "
                    "print(HostState.objects.update(next_attempt=timezone.now()))")
        run = stack.acme_once()
        assert "Ordering a certificate for host 'site'" in run.stderr
        deadline = time.monotonic() + 10
        while served_leaf(stack.https_port, NAMES[0], stack.pebble.root_pem).serial_number == first.serial_number:
            assert time.monotonic() < deadline, "the renewed certificate is not served"
            time.sleep(0.05)
        time.sleep(0.5)
        traffic.stopping.set()
        traffic.join(10)
        assert traffic.failed == [] and traffic.ok > 20, (traffic.ok, traffic.failed)
        state = stack.host_state("site")
        assert state["status"] == "valid" and state["certificate"] == "site (ACME)"
        assert stack.shell("from proxyadmin.models import Certificate; print(Certificate.objects.count())") == "1"
