"""A host on a local-CA certificate passes sslyze's check against Mozilla's "intermediate"
profile: protocols, suites, key-exchange groups, certificate curve and lifetime.

sslyze is not a dev dependency: it pins cryptography below the version the project runs
on, so it lives in a virtualenv of its own. The test runs its command line, found on
PATH or named by ``SSLYZE``, and is skipped without it:

    python3 -m venv /tmp/sslyze && /tmp/sslyze/bin/pip install sslyze
    SSLYZE=/tmp/sslyze/bin/sslyze .venv/bin/pytest tests/test_mozilla_intermediate.py
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from proxyadmin import localca, pki
from proxycore import config as core
from tests.proxyharness import route, running_node

SSLYZE = os.environ.get("SSLYZE") or shutil.which("sslyze")


@pytest.mark.skipif(SSLYZE is None, reason="sslyze is not installed (see this module's docstring)")
@pytest.mark.django_db
def test_a_local_ca_host_passes_sslyzes_mozilla_intermediate_check(tmp_path: Path) -> None:
    assert SSLYZE is not None
    cert, key_pem = localca.issue(["localhost"])
    ca_file = tmp_path / "local-ca.pem"
    ca_file.write_text(localca.get_or_create_ca().certificate_pem)
    chain = pki.to_pem([cert]).encode()
    bundle = core.CertificateBundle(
        name="localhost", chain_pem=chain, key_pem=key_pem,
        fingerprint_sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        serial=f"{cert.serial_number:x}", sans=("localhost",), not_after=cert.not_valid_after_utc,
    )
    # Nothing listens on port 9: sslyze looks at the handshakes (its HTTP probe gets a 502).
    snapshot = core.Snapshot(revision=1, hosts=(route("localhost", ("localhost",), 9, bundle),))
    with running_node(snapshot) as node:
        out = subprocess.run(
            [SSLYZE, "--mozilla_config=intermediate", f"--certinfo_ca_file={ca_file}",
             f"localhost:{node.https_port}{{127.0.0.1}}"],
            capture_output=True, text=True, timeout=120,
        )
    report = out.stdout[out.stdout.find("COMPLIANCE AGAINST"):]
    assert out.returncode == 0, report or out.stdout + out.stderr
    assert "OK - Compliant" in report, report
