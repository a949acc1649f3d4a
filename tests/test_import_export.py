"""exportconfig / importconfig: the whole config as JSON, imported all or nothing."""

from __future__ import annotations

import json
import stat
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import trustme
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from proxyadmin import localca, pki
from proxyadmin import models as m
from tests.conftest import make_cert, pem_chain_with_root


def store_certificate(name: str, chain_pem: bytes, key_pem: bytes) -> m.Certificate:
    inspected = pki.inspect_upload(chain_pem=chain_pem, key_pem=key_pem, now=timezone.now())
    cert = m.Certificate(name=name)
    cert.set_inspected(inspected)
    cert.save()
    return cert


def build_config(ca: trustme.CA) -> None:
    """One of everything, with every kind of reference set."""
    leaf = ca.issue_cert("a.example", "b.example")
    site = store_certificate(
        "site", pem_chain_with_root(ca, leaf), leaf.private_key_pem.bytes()
    )
    client = store_certificate("to-upstream", *make_cert(["client.example"]))
    partners = m.ClientCA(name="partners")
    partners.set_bundle(pki.load_certificates(ca.cert_pem.bytes()))
    partners.save()
    strict = m.HSTSPolicy.objects.create(
        name="strict", max_age=63072000, include_subdomains=True, preload=True
    )
    app = m.Upstream.objects.create(
        name="app", tls=True, tls_ca_bundle=ca.cert_pem.bytes().decode(),
        tls_server_name="app.internal", tls_client_certificate=client, connect_timeout=2.5,
        balancing=m.Upstream.Balancing.LEAST_CONNECTIONS,
    )
    m.UpstreamTarget.objects.create(upstream=app, host="10.0.0.1", port=8443, weight=3)
    m.UpstreamTarget.objects.create(upstream=app, host="10.0.0.2", port=8443, draining=True)
    web = m.Host.objects.create(
        name="web", certificate=site, upstream=app, hsts_policy=strict,
        client_auth=m.Host.ClientAuth.OPTIONAL, client_ca=partners,
        redirect_status=m.Host.RedirectStatus.MOVED_301, max_body_size=1024,
    )
    for name in ("a.example", "b.example"):
        m.HostName.objects.create(host=web, name=name)
    m.ProxySettings.objects.create(pk=1, default_certificate=site, strict_sni=True)


def wipe_config() -> None:
    for model in (m.Host, m.Upstream, m.ProxySettings, m.HSTSPolicy, m.ClientCA, m.Certificate):
        model.objects.all().delete()


def row_counts() -> dict[str, int]:
    return {model.__name__: model.objects.count() for model in m.CONFIG_MODELS}


def export(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("exportconfig", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def import_document(tmp_path: Path, document: Any, *args: str) -> str:
    path = tmp_path / "config.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    out = StringIO()
    call_command("importconfig", str(path), *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def document(**sections: Any) -> dict[str, Any]:
    return {"format": "proxyadmin-config", "version": 1, **sections}


def new_certificate(name: str, names: list[str]) -> dict[str, Any]:
    cert_pem, key_pem = make_cert(names)
    return {"name": name, "chain_pem": cert_pem.decode(), "key_pem": key_pem.decode()}


def without_revision(exported: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(exported)
    data.pop("revision")
    return data


@pytest.mark.django_db
def test_round_trip_with_keys_recreates_the_config_in_an_empty_database(
    ca: trustme.CA, tmp_path: Path
) -> None:
    build_config(ca)
    key_before = m.Certificate.objects.get(name="site").private_key_pem()
    exported, warning = export("--with-keys")
    assert "private keys in clear" in warning
    wipe_config()
    assert m.Host.objects.count() == 0

    output = import_document(tmp_path, exported)

    assert "created host 'web'" in output and "created proxy settings" in output
    assert without_revision(export("--with-keys")[0]) == without_revision(exported)
    assert m.Certificate.objects.get(name="site").private_key_pem() == key_before
    host = m.Host.objects.get(name="web")
    assert host.hostnames() == ["a.example", "b.example"]
    assert host.upstream.targets.get(host="10.0.0.1").weight == 3


@pytest.mark.django_db
def test_a_local_ca_certificate_moves_to_a_database_without_that_ca(tmp_path: Path) -> None:
    app = m.Upstream.objects.create(name="app")
    m.UpstreamTarget.objects.create(upstream=app, host="127.0.0.1", port=9000)
    web = m.Host.objects.create(name="web", upstream=app)
    m.HostName.objects.create(host=web, name="a.example")
    generated = localca.certificate_for_host(web)
    exported, _ = export("--with-keys")
    wipe_config()
    m.LocalCA.objects.all().delete()

    import_document(tmp_path, exported)

    moved = m.Certificate.objects.get(name=generated.name)
    assert moved.source == "generated" and moved.fingerprint_sha256 == generated.fingerprint_sha256
    assert m.Host.objects.get(name="web").certificate == moved


@pytest.mark.django_db
def test_reimport_into_the_same_database_changes_nothing(ca: trustme.CA, tmp_path: Path) -> None:
    build_config(ca)
    exported, _ = export()
    start = m.ConfigRevision.current()

    output = import_document(tmp_path, exported)

    lines = output.splitlines()[:-1]
    assert len(lines) == 7
    assert all(line.startswith("unchanged ") for line in lines), output
    assert m.ConfigRevision.current() == start


@pytest.mark.django_db
def test_export_without_keys_holds_no_private_key_and_never_the_token(ca: trustme.CA) -> None:
    build_config(ca)
    tokens = list(m.Certificate.objects.values_list("key_token", flat=True))
    plain, warning = export()
    with_keys, _ = export("--with-keys")
    assert "PRIVATE KEY" not in plain and "key_pem" not in plain and warning == ""
    assert "PRIVATE KEY" in with_keys
    for text in (plain, with_keys):
        assert "key_token" not in text
        assert not any(token in text for token in tokens)


@pytest.mark.django_db
def test_export_with_keys_to_a_file_is_owner_only(ca: trustme.CA, tmp_path: Path) -> None:
    build_config(ca)
    target = tmp_path / "export.json"
    target.write_text("old")
    target.chmod(0o644)
    stdout, warning = export("--with-keys", "--output", str(target))
    assert stdout == ""
    assert "private keys in clear" in warning
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert json.loads(target.read_text())["certificates"][0]["key_pem"].startswith("-----BEGIN")


@pytest.mark.django_db
def test_import_makes_exactly_one_revision_by_importconfig(tmp_path: Path) -> None:
    start = m.ConfigRevision.objects.count()
    import_document(tmp_path, document(
        certificates=[new_certificate("site", ["a.example"])],
        hsts_policies=[{"name": "strict", "max_age": 600}],
        upstreams=[{"name": "app", "targets": [{"host": "127.0.0.1", "port": 9000}]}],
        hosts=[{"name": "web", "certificate": "site", "upstream": "app", "names": ["A.example."]}],
    ))
    assert m.ConfigRevision.objects.count() == start + 1  # ids are not contiguous on PostgreSQL
    revision = m.ConfigRevision.objects.first()
    assert revision is not None and revision.actor == "importconfig"
    assert "added host 'web'" in revision.summary
    assert m.Host.objects.get(name="web").hostnames() == ["a.example"]


@pytest.mark.django_db
def test_dry_run_validates_references_within_the_file_and_saves_nothing(tmp_path: Path) -> None:
    before, start = row_counts(), m.ConfigRevision.current()
    output = import_document(tmp_path, document(
        certificates=[new_certificate("site", ["a.example"])],
        upstreams=[{"name": "app", "targets": [{"host": "127.0.0.1", "port": 9000}]}],
        hosts=[{"name": "web", "certificate": "site", "upstream": "app", "names": ["a.example"]}],
        settings={"default_certificate": "site"},
    ), "--dry-run")
    assert "created host 'web'" in output and "nothing was imported" in output
    assert row_counts() == before
    assert m.ConfigRevision.current() == start


@pytest.mark.django_db
def test_a_bad_certificate_refuses_the_whole_import(tmp_path: Path) -> None:
    m.HSTSPolicy.objects.create(name="strict", max_age=600)
    before, start = row_counts(), m.ConfigRevision.current()
    bad = new_certificate("broken", ["a.example"])
    bad["key_pem"] = new_certificate("other", ["a.example"])["key_pem"]
    out = StringIO()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document(
        hsts_policies=[{"name": "strict", "max_age": 1200}, {"name": "new", "max_age": 60}],
        certificates=[bad],
    )))
    with pytest.raises(CommandError, match="1 of 3 objects refused"):
        call_command("importconfig", str(path), stdout=out)
    assert "refused certificate 'broken': key_pem: The private key does not match" in out.getvalue()
    assert "PRIVATE KEY" not in out.getvalue()
    assert row_counts() == before
    assert m.HSTSPolicy.objects.get(name="strict").max_age == 600
    assert m.ConfigRevision.current() == start


@pytest.mark.django_db
def test_a_host_whose_names_the_certificate_does_not_cover_is_refused(tmp_path: Path) -> None:
    out = StringIO()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document(
        certificates=[new_certificate("site", ["a.example"])],
        upstreams=[{"name": "app", "targets": [{"host": "127.0.0.1", "port": 9000}]}],
        hosts=[{"name": "web", "certificate": "site", "upstream": "app",
                "names": ["a.example", "b.example"]}],
    )))
    with pytest.raises(CommandError, match="nothing was imported"):
        call_command("importconfig", str(path), stdout=out)
    assert "refused host 'web': names: The certificate 'site' does not cover b.example" in (
        out.getvalue()
    )
    assert m.Certificate.objects.count() == 0


@pytest.mark.django_db
def test_a_certificate_without_key_updates_the_stored_one_or_is_refused(tmp_path: Path) -> None:
    cert_pem, key_pem = make_cert(["a.example"])
    store_certificate("site", cert_pem, key_pem)
    entry = {"name": "site", "chain_pem": cert_pem.decode(), "source": "acme"}
    assert "changed certificate 'site'" in import_document(tmp_path, document(certificates=[entry]))
    stored = m.Certificate.objects.get(name="site")
    assert stored.source == "acme"
    assert stored.private_key_pem() == pki.key_to_pem(pki.load_private_key(key_pem, None))

    with pytest.raises(CommandError, match="objects refused"):
        import_document(tmp_path, document(certificates=[{**entry, "name": "elsewhere"}]))
    assert not m.Certificate.objects.filter(name="elsewhere").exists()


@pytest.mark.django_db
def test_import_merges_and_replaces_the_lists_inside_an_object(tmp_path: Path) -> None:
    m.HSTSPolicy.objects.create(name="kept", max_age=600)
    app = m.Upstream.objects.create(name="app", read_timeout=30)
    m.UpstreamTarget.objects.create(upstream=app, host="10.0.0.1", port=80)
    output = import_document(tmp_path, document(
        upstreams=[{"name": "app", "targets": [{"host": "10.0.0.2", "port": 80, "weight": 5}]}],
    ))
    assert output.startswith("changed upstream 'app'")
    app.refresh_from_db()
    assert app.read_timeout == 30  # absent from the entry: kept
    assert [(t.host, t.weight) for t in app.targets.all()] == [("10.0.0.2", 5)]
    assert m.HSTSPolicy.objects.filter(name="kept").exists()


@pytest.mark.django_db
def test_invalid_values_are_refused_with_the_field_named(tmp_path: Path) -> None:
    out = StringIO()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document(
        hsts_policies=[{"name": "p", "max_age": 600, "preload": True}],
        hosts=[{"name": "web", "upstream": "missing", "names": ["a.example"]}],
    )))
    with pytest.raises(CommandError, match="2 of 2 objects refused"):
        call_command("importconfig", str(path), stdout=out)
    assert "refused HSTS policy 'p': preload: Preload lists accept" in out.getvalue()
    assert "refused host 'web': upstream: no upstream named 'missing'." in out.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object at the top"),
        ({"format": "other", "version": 1}, "not a proxyadmin config export"),
        ({"format": "proxyadmin-config"}, "'version' is missing"),
        ({"format": "proxyadmin-config", "version": "1"}, "'version' must be an integer"),
        ({"format": "proxyadmin-config", "version": 2}, "version 2 is not supported"),
        (document(hostz=[]), "the document: unknown key 'hostz'"),
        (document(hsts_policies=[{"name": "p", "max_agee": 5}]),
         r"hsts_policies\[0\] \(HSTS policy 'p'\): unknown key 'max_agee'"),
        (document(hsts_policies=[{"max_age": 5}]), "missing key 'name'"),
        (document(hsts_policies=[{"name": "p", "max_age": "5"}]),
         "'max_age' must be an integer, not a string"),
        (document(hosts=[{"name": "h", "enabled": 1}]), "'enabled' must be true or false"),
        (document(upstreams=[{"name": "u", "targets": [{"host": "x", "port": 1, "wieght": 2}]}]),
         r"upstream 'u'\): targets\[0\]: unknown key 'wieght'"),
        (document(hsts_policies=[{"name": "p"}, {"name": "p"}]), "listed twice"),
        (document(settings={"strict_sni": True, "default": None}), "settings: unknown key"),
    ],
)
@pytest.mark.django_db
def test_an_unreadable_file_is_refused_with_a_clear_message(
    tmp_path: Path, content: Any, message: str
) -> None:
    with pytest.raises(CommandError, match=message) as caught:
        import_document(tmp_path, content)
    assert "Nothing was imported" in str(caught.value)
    assert m.HSTSPolicy.objects.count() == 0


@pytest.mark.django_db
def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match=r"Cannot read .*missing\.json: No such file"):
        call_command("importconfig", str(tmp_path / "missing.json"), stdout=StringIO())
