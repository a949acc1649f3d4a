"""Private keys are stored only as MultiFernet tokens and can be rotated to a new key."""

from __future__ import annotations

from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings
from django.utils import timezone

from proxyadmin import crypto, pki
from proxyadmin.models import Certificate
from tests.conftest import make_cert


def store_certificate(name: str = "site") -> tuple[Certificate, bytes]:
    cert_pem, key_pem = make_cert([f"{name}.example"])
    inspected = pki.inspect_upload(chain_pem=cert_pem, key_pem=key_pem, now=timezone.now())
    cert = Certificate(name=name)
    cert.set_inspected(inspected)
    cert.save()
    return cert, inspected.key_pem


def test_encrypt_decrypt_round_trip_and_no_plaintext() -> None:
    token = crypto.encrypt(b"-----BEGIN PRIVATE KEY-----\nabc\n")
    assert "PRIVATE KEY" not in token
    assert crypto.decrypt(token) == b"-----BEGIN PRIVATE KEY-----\nabc\n"


def test_malformed_key_setting_names_the_setting() -> None:
    with override_settings(PROXYADMIN_KEYS="not-a-key"), pytest.raises(
        crypto.KeyConfigError, match="PROXYADMIN_KEYS: key number 1 is not a Fernet key"
    ):
        crypto.encrypt(b"x")
    with override_settings(PROXYADMIN_KEYS=" , "), pytest.raises(
        crypto.KeyConfigError, match="PROXYADMIN_KEYS is empty"
    ):
        crypto.encrypt(b"x")


def test_wrong_key_gives_a_clear_error_not_a_traceback() -> None:
    token = crypto.encrypt(b"secret")
    with override_settings(PROXYADMIN_KEYS=Fernet.generate_key().decode()), pytest.raises(
        crypto.KeyConfigError, match="cannot be decrypted with the keys in PROXYADMIN_KEYS"
    ):
        crypto.decrypt(token)


@pytest.mark.django_db
def test_rotatekeys_reencrypts_every_key_under_the_first_key(settings: object) -> None:
    old = Fernet.generate_key().decode()
    new = Fernet.generate_key().decode()
    with override_settings(PROXYADMIN_KEYS=old):
        cert, key_pem = store_certificate()
        old_token = cert.key_token
    with override_settings(PROXYADMIN_KEYS=f"{new},{old}"):
        out = StringIO()
        call_command("rotatekeys", stdout=out)
        assert "Re-encrypted 1 of 1" in out.getvalue()
        cert.refresh_from_db()
        assert cert.key_token != old_token
    # Only the new key is needed from now on.
    with override_settings(PROXYADMIN_KEYS=new):
        assert cert.private_key_pem() == key_pem
        out = StringIO()
        call_command("rotatekeys", stdout=out)
        assert "Re-encrypted 0 of 1" in out.getvalue()


@pytest.mark.django_db
def test_rotatekeys_without_the_old_key_changes_nothing_and_says_why() -> None:
    old = Fernet.generate_key().decode()
    with override_settings(PROXYADMIN_KEYS=old):
        cert, _ = store_certificate()
    token = cert.key_token
    with override_settings(PROXYADMIN_KEYS=Fernet.generate_key().decode()), pytest.raises(
        CommandError, match=r"PROXYADMIN_KEYS.*Nothing was changed"
    ):
        call_command("rotatekeys", stdout=StringIO())
    cert.refresh_from_db()
    assert cert.key_token == token


@pytest.mark.django_db
def test_database_dump_holds_no_private_key() -> None:
    store_certificate()
    out = StringIO()
    call_command("dumpdata", "proxyadmin", stdout=out)
    dump = out.getvalue()
    assert "site.example" in dump
    assert "PRIVATE KEY" not in dump
