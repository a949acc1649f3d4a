"""ACME end to end against pebble, through real sockets: daphne, a runproxy node, ``manage.py acme``.

A host saved with ACME on (by ``importconfig``, as the admin would) gets a certificate
from pebble for both its names; the node then serves a chain that verifies against
pebble's root for each name. The time from saving the host to the node serving the new
certificate is printed (run with ``-s`` to see it).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.acmeharness import Stack, acme_stack, needs_pebble, served_leaf
from tests.proxyharness import Upstream

pytestmark = needs_pebble

NAMES = ["example.com", "www.example.com"]


def acme_config(upstream_port: int, acme: str | None, names: list[str] | None = None) -> dict[str, object]:
    return {
        "format": "proxyadmin-config", "version": 1,
        "upstreams": [{"name": "app", "targets": [{"host": "127.0.0.1", "port": upstream_port}]}],
        "hosts": [{"name": "site", "names": names or NAMES, "upstream": "app", "acme": acme}],
    }


def serves_pebble_certificate(stack: Stack, name: str) -> bool:
    try:
        served_leaf(stack.https_port, name, stack.pebble.root_pem)
    except OSError:  # ssl.SSLError included: not (yet) a chain pebble's root verifies
        return False
    return True


def test_http01_issuance_for_a_two_name_host_is_served_for_both_names(
    tmp_path: Path, upstream: Upstream
) -> None:
    with acme_stack(tmp_path) as stack:
        saved = time.monotonic()
        stack.project.import_config(acme_config(upstream.port, "http-01"))
        stack.acme_once()
        while not all(serves_pebble_certificate(stack, name) for name in NAMES):
            assert time.monotonic() - saved < 60, "the pebble certificate is not served"
            time.sleep(0.05)
        took = time.monotonic() - saved
        print(f"\nsaved host to serving the pebble-issued certificate: {took:.2f} s")
        state = stack.host_state("site")
        assert state["status"] == "valid", state
        assert state["source"] == "acme"
        leaves = {served_leaf(stack.https_port, n, stack.pebble.root_pem).serial_number for n in NAMES}
        assert leaves == {int(str(state["serial"]), 16)}  # one certificate for both names
        assert "Pebble" in stack.shell(
            "from proxyadmin.models import Certificate as C; print(C.objects.get(source='acme').issuer)"
        )
        # The challenges are gone again, and nothing is due until renewal.
        assert stack.shell("from proxyadmin.acme.models import Challenge; "
                           "print(Challenge.objects.count())").strip() == "0"
        again = stack.acme_once()
        assert "Ordering" not in again.stderr


def export(stack: Stack, *args: str) -> dict[str, object]:
    return dict(json.loads(stack.project.manage("exportconfig", *args).stdout))


def keys_in_clear(text: str) -> bool:
    return "PRIVATE KEY" in text


def test_keys_are_never_in_clear_in_the_database_exports_or_logs(tmp_path: Path, upstream: Upstream) -> None:
    with acme_stack(tmp_path) as stack:
        stack.project.import_config(acme_config(upstream.port, "http-01"))
        run = stack.acme_once()
        assert stack.host_state("site")["status"] == "valid"
        database = (tmp_path / "var" / "proxyadmin.sqlite3")
        subprocess.run(["sqlite3", str(database), "PRAGMA wal_checkpoint(FULL);"], check=False,
                       capture_output=True)
        raw = b"".join(p.read_bytes() for p in database.parent.glob("proxyadmin.sqlite3*"))
        assert b"PRIVATE KEY" not in raw
        assert b"BEGIN CERTIFICATE" in raw  # the chain itself is stored in clear, as it should be
        plain = export(stack)
        assert not keys_in_clear(json.dumps(plain))
        assert json.dumps(plain["hosts"]).count('"acme": "http-01"') == 1
        logs = run.stdout + run.stderr + "".join(
            p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
        assert not keys_in_clear(logs)
        with_keys = export(stack, "--with-keys")
        assert keys_in_clear(json.dumps(with_keys))  # asked for: the certificate's key only


def test_tls_alpn01_issuance_needs_no_http_listener(tmp_path: Path, upstream: Upstream) -> None:
    with acme_stack(tmp_path, http_listener=False) as stack:
        stack.project.import_config(acme_config(upstream.port, "tls-alpn-01"))
        run = stack.acme_once()
        assert "with tls-alpn-01" in run.stderr
        stack.wait_served(NAMES)  # the node reloads within a second of the pass's end
        assert stack.host_state("site")["status"] == "valid"


def test_the_running_worker_serves_a_saved_host_within_seconds_and_stops_on_sigterm(
    tmp_path: Path, upstream: Upstream
) -> None:
    with acme_stack(tmp_path) as stack:
        worker = stack.project.start("acme", "--node-wait", "15")  # as `up` runs it
        try:
            saved = time.monotonic()
            stack.project.import_config(acme_config(upstream.port, "any"))
            while not all(serves_pebble_certificate(stack, name) for name in NAMES):
                assert time.monotonic() - saved < 60, "the pebble certificate is not served"
                time.sleep(0.05)
            took = time.monotonic() - saved
            print(f"\nsaved host to serving (long-running worker): {took:.2f} s")
        finally:
            worker.terminate()
            out, _ = worker.communicate(timeout=15)
        assert worker.returncode == 0, out
        assert "The ACME worker stopped." in out and "Traceback" not in out
        assert stack.shell("from proxyadmin.acme.models import Lease; print(Lease.objects.count())") == "0"
