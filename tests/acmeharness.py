"""A real ACME server for tests: Debian's pebble, with pebble-challtestsrv as its DNS.

challtestsrv answers every name with 127.0.0.1 (and no IPv6), and pebble validates
http-01 and tls-alpn-01 on the ports given: a proxy node's HTTP and HTTPS listeners.
Pebble's own HTTPS certificate is made here (trustme); its root, which signs what it
issues, is fetched from its management interface. Tests skip when pebble is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.processes import ROOT, Project, daphne, process, wait_for_http, wait_for_port
from tests.proxyharness import free_port

PEBBLE = shutil.which("pebble")
CHALLTESTSRV = shutil.which("pebble-challtestsrv")

needs_pebble = pytest.mark.skipif(
    not (PEBBLE and CHALLTESTSRV), reason="needs pebble and pebble-challtestsrv (apt-get install pebble)"
)


@dataclass
class Pebble:
    directory: str
    ca_bundle: Path  # trusts pebble's own HTTPS (PROXYADMIN_ACME_CA_BUNDLE)
    root_pem: bytes  # the root of the certificates pebble issues
    log: Path
    dns_management: int  # challtestsrv's management port

    def add_a(self, name: str, *addresses: str) -> None:
        """challtestsrv answers ``name``'s A queries with ``addresses`` (its management API)."""
        body = json.dumps({"host": name, "addresses": list(addresses)}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.dns_management}/add-a", data=body)
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 (loopback)
            assert response.status == 200


def _get(url: str, cafile: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    with urllib.request.urlopen(url, context=context, timeout=5) as response:  # noqa: S310 (loopback)
        return bytes(response.read())


@contextlib.contextmanager
def pebble(tmp_path: Path, http_port: int, tls_port: int, *, eab: dict[str, str] | None = None,
           default_ipv4: str = "127.0.0.1") -> Iterator[Pebble]:
    """pebble and its DNS, validating on 127.0.0.1:``http_port`` (http-01) and ``tls_port``.

    ``eab``: external account binding required, with these key ids and base64url HMAC keys.
    ``default_ipv4`` empty: no name resolves but those given A records (``Pebble.add_a``).
    """
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, bundle = tmp_path / "pebble-cert.pem", tmp_path / "pebble-key.pem", tmp_path / "pebble-ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    ca.cert_pem.write_to_path(str(bundle))
    # No random sleeps, no rejected nonces, no reused authorizations: every order validates.
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
    log = tmp_path / "pebble.log"
    # A port free_port() found may be taken before pebble binds it (another test's process
    # in between): pebble then exits, and it is started again on new ports.
    for attempt in range(1, 4):
        acme_port, management_port, dns_port, dns_management = (
            free_port(), free_port(), free_port(), free_port())
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{acme_port}", "managementListenAddress": f"127.0.0.1:{management_port}",
            "certificate": str(cert), "privateKey": str(key), "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": eab is not None,
            **({"externalAccountMACKeys": eab} if eab else {}),
        }}
        config_path = tmp_path / "pebble.json"
        config_path.write_text(json.dumps(config))
        dns = [str(CHALLTESTSRV), "-defaultIPv6", "", "-defaultIPv4", default_ipv4,
               "-dns01", f"127.0.0.1:{dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", "",
               "-management", f"127.0.0.1:{dns_management}"]
        server = [str(PEBBLE), "-config", str(config_path), "-dnsserver", f"127.0.0.1:{dns_port}"]
        with process(dns, env, tmp_path / "challtestsrv.log") as dns_proc, process(server, env, log) as proc:
            if not all(_listens(port, (proc, dns_proc))
                       for port in (acme_port, management_port, dns_management)):
                assert attempt < 3, f"pebble did not start: {log.read_text()[-2000:]}"
                continue
            root = _get(f"https://127.0.0.1:{management_port}/roots/0", bundle)
            yield Pebble(f"https://127.0.0.1:{acme_port}/dir", bundle, root, log, dns_management)
            return


def _listens(port: int, procs: tuple[subprocess.Popen[bytes], ...], timeout: float = 40) -> bool:
    """Whether something listens on 127.0.0.1:``port`` before ``timeout`` or before one of
    ``procs`` (the ones that should) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        if any(proc.poll() is not None for proc in procs):
            return False
        time.sleep(0.1)
    return False


@dataclass
class Stack:
    """A control plane (daphne) and one proxy node, with an ACME directory configured."""

    project: Project
    pebble: Pebble
    http_port: int
    https_port: int
    admin_port: int

    def acme_once(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.project.manage("acme", "--once", "--node-wait", "15", *args, check=check)

    def start_acme(self, *args: str) -> subprocess.Popen[str]:
        return self.project.start("acme", "--once", "--node-wait", "15", *args)

    def wait_served(self, names: list[str], timeout: float = 10) -> float:
        """Waits until the node serves, for every name, a chain pebble's root verifies; seconds."""
        started = time.monotonic()
        while True:
            try:
                for name in names:
                    served_leaf(self.https_port, name, self.pebble.root_pem)
                return time.monotonic() - started
            except OSError:  # ssl.SSLError included: not (yet) pebble's certificate
                assert time.monotonic() - started < timeout, "pebble's certificate is not served"
                time.sleep(0.05)

    def shell(self, code: str) -> str:
        """What ``code`` printed last, run by ``manage.py shell``."""
        return self.project.manage("shell", "-c", code).stdout.strip().splitlines()[-1]

    def host_state(self, host: str) -> dict[str, object]:
        code = (
            "import json; from proxyadmin.acme.models import HostState as S; "
            f"s = S.objects.filter(host__name={host!r}).select_related('host__certificate').first(); "
            "c = s and s.host.certificate; "
            "print(json.dumps(s and {'status': s.status, 'error': s.error, 'failures': s.failures, "
            "'next_attempt': s.next_attempt.timestamp() if s.next_attempt else None, "
            "'last_attempt': s.last_attempt.timestamp() if s.last_attempt else None, "
            "'certificate': c and c.name, 'source': c and c.source, 'serial': c and c.serial}))"
        )
        return dict(json.loads(self.shell(code)) or {})


@contextlib.contextmanager
def acme_stack(tmp_path: Path, *, node_name: str = "edge-1", http_listener: bool = True,
               eab: dict[str, str] | None = None, default_ipv4: str = "127.0.0.1") -> Iterator[Stack]:
    """pebble, daphne and one runproxy node on free ports, all on one project database.

    Without ``http_listener`` the node has no HTTP listener: pebble's http-01 port is closed.
    ``eab`` and ``default_ipv4`` are pebble's (see ``pebble``).
    """
    http_port, https_port, admin_port = free_port(), free_port(), free_port()
    project = Project(tmp_path)
    project.manage("migrate", "--verbosity", "0")
    with pebble(tmp_path, http_port, https_port, eab=eab, default_ipv4=default_ipv4) as server:
        project.env.update({
            "PROXYADMIN_ACME_DIRECTORY": server.directory,
            "PROXYADMIN_ACME_CA_BUNDLE": str(server.ca_bundle),
            "PROXYADMIN_ACME_EMAIL": "ops@example.com",
        })
        node = [sys.executable, "manage.py", "runproxy", "--name", node_name, "--no-access-log",
                "--https", f"127.0.0.1:{https_port}",
                "--http", f"127.0.0.1:{http_port}" if http_listener else "off",
                "--control", f"http://127.0.0.1:{admin_port}"]
        with daphne(project, admin_port):
            wait_for_http(f"http://127.0.0.1:{admin_port}/admin/login/")
            with process(node, project.env, tmp_path / "node.log"):
                wait_for_port(https_port)
                wait_for_text(tmp_path / "daphne.log", f"proxy node {node_name} connected")
                yield Stack(project, server, http_port, https_port, admin_port)


def wait_for_text(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {path.name}"
        time.sleep(0.05)


def served_leaf(port: int, name: str, root_pem: bytes) -> x509.Certificate:
    """The certificate the node serves for ``name``, once its chain verified against ``root_pem``."""
    context = ssl.create_default_context(cadata=root_pem.decode("ascii"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


__all__ = ["ROOT", "Pebble", "Stack", "acme_stack", "needs_pebble", "pebble", "served_leaf", "wait_for_text"]
