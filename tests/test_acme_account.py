"""The ACME account against pebble: external account binding from the settings, and a changed
contact address told to the CA.

pebble runs in its EAB mode (``externalAccountBindingRequired``, one key id with its
HMAC key) for the first test; what pebble lists as the account's contact is read back
from pebble with certbot's client (a POST-as-GET of the account), not from our database.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

from tests.acmeharness import Stack, acme_stack, needs_pebble
from tests.proxyharness import Upstream
from tests.test_acme_issuance import NAMES, acme_config

pytestmark = needs_pebble

KID = "proxyadmin-test-kid"
HMAC_KEY = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")

CONTACT_AT_THE_CA = (
    "from django.conf import settings; from proxyadmin.acme import protocol; "
    "from proxyadmin.acme.models import Account; "
    "acme = protocol.make_client(Account.objects.get(directory=settings.ACME_DIRECTORY)); "
    "print(','.join(acme.query_registration(acme.net.account).body.contact))"
)


def request_now(stack: Stack) -> None:
    stack.shell("from proxyadmin.acme.models import HostState; "
                "print(HostState.objects.get(host__name='site').request_now())")


def test_a_ca_requiring_external_account_binding_refuses_without_it_and_registers_with_the_settings(
    tmp_path: Path, upstream: Upstream
) -> None:
    with acme_stack(tmp_path, eab={KID: HMAC_KEY}) as stack:
        stack.project.import_config(acme_config(upstream.port, "http-01"))
        refused = stack.acme_once()
        state = stack.host_state("site")
        assert state["status"] == "failing", state
        error = str(state["error"])
        assert "must include a value for the 'externalAccountBinding' field" in error, error  # pebble's words
        assert "externalAccountRequired" in error  # and its problem type ...
        assert "set PROXYADMIN_ACME_EAB_KID and PROXYADMIN_ACME_EAB_HMAC_KEY" in error  # ... and what to do
        assert "Registered the ACME account" not in refused.stderr

        stack.project.env.update({"PROXYADMIN_ACME_EAB_KID": KID, "PROXYADMIN_ACME_EAB_HMAC_KEY": HMAC_KEY})
        request_now(stack)
        run = stack.acme_once()
        assert f"bound to the external account {KID}" in run.stderr, run.stderr
        assert stack.host_state("site")["status"] == "valid"
        stack.wait_served(NAMES)
        assert stack.shell("from proxyadmin.acme.models import Account; a = Account.objects.get(); "
                           f"print(a.eab_kid, a.eab_hmac_key() == {HMAC_KEY!r}, {HMAC_KEY!r} in a.eab_hmac_token)"
                           ) == f"{KID} True False"
        logs = refused.stderr + run.stdout + run.stderr + "".join(
            p.read_text(errors="replace") for p in tmp_path.glob("*.log") if p.name != "pebble.log")
        assert HMAC_KEY not in logs


def test_a_wrong_hmac_key_is_refused_by_the_ca_and_shown_on_the_host(tmp_path: Path, upstream: Upstream) -> None:
    with acme_stack(tmp_path, eab={KID: HMAC_KEY}) as stack:
        wrong = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        stack.project.env.update({"PROXYADMIN_ACME_EAB_KID": KID, "PROXYADMIN_ACME_EAB_HMAC_KEY": wrong})
        stack.project.import_config(acme_config(upstream.port, "http-01"))
        stack.acme_once()
        state = stack.host_state("site")
        assert state["status"] == "failing" and "unauthorized" in str(state["error"]).lower(), state


def test_a_changed_contact_address_is_told_to_the_ca_at_the_next_pass(tmp_path: Path, upstream: Upstream) -> None:
    with acme_stack(tmp_path) as stack:
        stack.project.import_config(acme_config(upstream.port, "http-01"))
        stack.acme_once()
        assert stack.host_state("site")["status"] == "valid"
        assert stack.shell(CONTACT_AT_THE_CA) == "mailto:ops@example.com"

        stack.project.env["PROXYADMIN_ACME_EMAIL"] = "security@example.com"
        run = stack.acme_once()
        assert "Ordering" not in run.stderr  # nothing was due: the contact alone made it connect
        assert ("from ops@example.com to security@example.com; "
                "the CA now lists mailto:security@example.com.") in run.stderr, run.stderr
        assert stack.shell(CONTACT_AT_THE_CA) == "mailto:security@example.com"
        assert stack.shell("from proxyadmin.acme.models import Account; "
                           "print(Account.objects.get().email)") == "security@example.com"
        again = stack.acme_once()
        assert "Changed the contact" not in again.stderr


def test_half_an_external_account_binding_or_a_bad_hmac_key_stops_the_program(tmp_path: Path) -> None:
    from tests.test_settings_from_env import run_manage

    for env, words in [
        ({"PROXYADMIN_ACME_EAB_KID": KID}, "go together: set both, or neither"),
        ({"PROXYADMIN_ACME_EAB_HMAC_KEY": HMAC_KEY}, "go together: set both, or neither"),
        ({"PROXYADMIN_ACME_EAB_KID": KID, "PROXYADMIN_ACME_EAB_HMAC_KEY": "not base64url!"},
         "PROXYADMIN_ACME_EAB_HMAC_KEY must be the base64url HMAC key"),
    ]:
        out = run_manage(["check"], env, tmp_path)
        assert out.returncode != 0 and words in out.stderr, out.stderr[-500:]
        assert HMAC_KEY not in out.stderr and "not base64url!" not in out.stderr
