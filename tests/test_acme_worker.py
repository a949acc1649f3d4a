"""The ACME worker against pebble when things go wrong: lagging nodes, crashes, two workers, failures.

Real processes and sockets throughout (daphne, a runproxy node, pebble). A node that
lags is a node row that says it is online and never applies a revision: the worker must
name it and never ask the CA to validate.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import trustme

from tests.acmeharness import Stack, acme_stack, needs_pebble
from tests.proxyharness import Upstream, tls_connect
from tests.test_acme_issuance import NAMES, acme_config

pytestmark = needs_pebble

LAGGING_NODE = (
    "from datetime import timedelta; from django.utils import timezone; "
    "from proxyadmin.models import ProxyNode; "
    "ProxyNode.objects.create(name='edge-late', connected=True, applied_revision=1, "
    "last_seen=timezone.now() + timedelta(minutes=10)); print('ok')"
)


def expire_lease(stack: Stack) -> None:
    """What a minute without renewal does to a crashed worker's lease."""
    stack.shell("from datetime import timedelta; from django.utils import timezone; "
                "from proxyadmin.acme.models import Lease; "
                "print(Lease.objects.update(expires_at=timezone.now() - timedelta(seconds=1)))")


def test_a_lagging_node_is_named_and_the_ca_is_never_asked(tmp_path: Path, upstream: Upstream) -> None:
    with acme_stack(tmp_path) as stack:
        stack.shell(LAGGING_NODE)
        stack.project.import_config(acme_config(upstream.port, "http-01"))
        run = stack.project.manage("acme", "--once", "--node-wait", "2")
        state = stack.host_state("site")
        assert state["status"] == "failing"
        assert "proxy node 'edge-late' has not applied config revision" in str(state["error"])
        assert "the CA was not asked to validate" in str(state["error"])
        assert "edge-late" in run.stderr
        pebble_log = (tmp_path / "pebble.log").read_text()
        assert "Added order" in pebble_log
        assert "/chalZ/" not in pebble_log  # no challenge was answered: nothing to validate


def test_a_worker_killed_mid_order_is_completed_by_the_next_pass(tmp_path: Path, upstream: Upstream) -> None:
    with acme_stack(tmp_path) as stack:
        stack.shell(LAGGING_NODE)  # holds the first worker between publishing and validating
        stack.project.import_config(acme_config(upstream.port, "http-01"))
        worker = stack.start_acme()
        assert worker.stdout is not None
        for line in worker.stdout:
            if "Published" in line:
                break
        time.sleep(0.3)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        assert stack.shell("from proxyadmin.acme.models import Challenge; print(Challenge.objects.count())") == "2"
        stack.shell("from proxyadmin.models import ProxyNode; "
                    "print(ProxyNode.objects.filter(name='edge-late').delete())")
        refused = stack.acme_once()  # the dead worker's lease has not run out yet
        assert "Another ACME worker holds the lease" in refused.stderr
        expire_lease(stack)
        run = stack.acme_once()
        assert "Removed the challenges of an interrupted ACME order for host 'site'" in run.stderr
        assert stack.host_state("site")["status"] == "valid"
        stack.wait_served(NAMES)


def test_two_workers_at_once_make_one_order(tmp_path: Path, upstream: Upstream) -> None:
    with acme_stack(tmp_path) as stack:
        stack.project.import_config(acme_config(upstream.port, "http-01"))
        workers = [stack.start_acme(), stack.start_acme()]
        outputs = [w.communicate(timeout=120)[0] for w in workers]
        assert all(w.returncode == 0 for w in workers), outputs
        assert sum(out.count("Ordering a certificate") for out in outputs) == 1, outputs
        assert (tmp_path / "pebble.log").read_text().count("Added order") == 1
        assert stack.shell("from proxyadmin.models import Certificate; "
                           "print(Certificate.objects.filter(source='acme').count())") == "1"


def old_certificate_config(ca: trustme.CA, upstream_port: int) -> dict[str, object]:
    leaf = ca.issue_cert(*NAMES)
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes()
    config = acme_config(upstream_port, "http-01")
    config["certificates"] = [{"name": "old", "chain_pem": chain.decode(),
                               "key_pem": leaf.private_key_pem.bytes().decode()}]
    hosts = config["hosts"]
    assert isinstance(hosts, list)
    hosts[0]["certificate"] = "old"
    return config


def test_an_unreachable_challenge_shows_the_ca_error_backs_off_and_keeps_the_old_certificate(
    tmp_path: Path, upstream: Upstream, ca: trustme.CA
) -> None:
    with acme_stack(tmp_path, http_listener=False) as stack:
        stack.project.import_config(old_certificate_config(ca, upstream.port))
        stack.acme_once()
        first = stack.host_state("site")
        assert first["status"] == "failing"
        assert "connection refused" in str(first["error"]).lower(), first  # pebble's own words
        assert first["certificate"] == "old"
        stack.shell("from proxyadmin.acme.models import HostState; "
                    "print(HostState.objects.get(host__name='site').request_now())")
        stack.acme_once()
        second = stack.host_state("site")
        assert second["failures"] == 2
        backoff = [float(s["next_attempt"]) - float(s["last_attempt"]) for s in (first, second)]  # type: ignore[arg-type]
        assert 55 < backoff[0] < 65 and 115 < backoff[1] < 125, backoff
        sock = tls_connect(stack.https_port, ca, NAMES[0])  # the old certificate, trusted by its CA
        sock.close()
