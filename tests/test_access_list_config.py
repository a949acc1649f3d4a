"""Access lists, users and rate limits as the operator sets them: import/export, bounds, snapshot."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from proxyadmin import accesslists, snapshot
from proxyadmin import models as m
from proxycore import access
from proxycore import config as core
from tests.test_import_export import document, export, import_document, new_certificate


@pytest.fixture(autouse=True)
def fast_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accesslists, "ITERATIONS", 1000)


def office(**fields: Any) -> dict[str, Any]:
    return {
        "name": "office", "default": "deny", "rules": [{"action": "allow", "source": "10.0.0.0/8"}],
        "satisfy": "any", "users": [{"username": "ops", "password": "correct horse"}], **fields,
    }


def config(acl: dict[str, Any] | None = None, **host: Any) -> dict[str, Any]:
    return document(
        certificates=[new_certificate("site", ["a.example"])],
        upstreams=[{"name": "app", "targets": [{"host": "127.0.0.1", "port": 9000}]}],
        access_lists=[acl or office()],
        hosts=[{"name": "web", "certificate": "site", "upstream": "app", "names": ["a.example"],
                "access_list": "office",
                "rate_limit": {"requests_per_second": 10, "burst": 20, "connections_per_client": 50},
                **host}],
    )


def refusal(tmp_path: Path, doc: dict[str, Any]) -> str:
    """What importconfig says refusing ``doc``; nothing of it is saved."""
    before = {model.__name__: model.objects.count() for model in m.CONFIG_MODELS}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    out = StringIO()
    with pytest.raises(CommandError) as failed:
        call_command("importconfig", str(path), stdout=out, stderr=out)
    assert {model.__name__: model.objects.count() for model in m.CONFIG_MODELS} == before
    return f"{failed.value}\n{out.getvalue()}"


@pytest.mark.django_db
def test_an_imported_list_and_limit_reach_the_snapshot_with_the_password_hashed(tmp_path: Path) -> None:
    output = import_document(tmp_path, config())
    assert "created access list 'office'" in output
    user = m.AccessUser.objects.get(username="ops")
    assert user.password_hash.startswith("pbkdf2_sha256$1000$")
    assert "correct horse" not in user.password_hash
    assert access.PasswordHash(user.password_hash).verify(b"correct horse")
    route = snapshot.build_snapshot().hosts[0]
    assert route.access is not None and route.access.rules == (
        core.AccessRule(core.AccessAction.ALLOW, "10.0.0.0/8"),)
    assert route.access.users[0].username == "ops"
    assert route.rate_limit == core.RateLimit(10.0, 20, 50)


@pytest.mark.django_db
def test_exports_keep_the_shape_and_carry_hashes_only_with_keys(tmp_path: Path) -> None:
    import_document(tmp_path, config())
    plain = json.loads(export()[0])
    assert plain["access_lists"] == [{
        "name": "office", "default": "deny", "rules": [{"action": "allow", "source": "10.0.0.0/8"}],
        "satisfy": "any", "realm": "", "pass_authorization": False, "users": [{"username": "ops"}],
    }]
    host = plain["hosts"][0]
    assert host["access_list"] == "office"
    assert host["rate_limit"] == {"requests_per_second": 10.0, "burst": 20, "connections_per_client": 50}
    assert "rate_limit_rps" not in host
    with_keys = json.loads(export("--with-keys")[0])
    assert with_keys["access_lists"][0]["users"][0]["password_hash"].startswith("pbkdf2_sha256$")
    assert "correct horse" not in json.dumps(with_keys)


@pytest.mark.django_db
def test_a_round_trip_with_keys_keeps_the_password_and_a_reimport_changes_nothing(tmp_path: Path) -> None:
    import_document(tmp_path, config())
    exported = export("--with-keys")[0]
    m.Host.objects.all().delete()
    m.AccessList.objects.all().delete()
    import_document(tmp_path, exported)
    assert access.PasswordHash(m.AccessUser.objects.get().password_hash).verify(b"correct horse")
    start = m.ConfigRevision.current()
    assert "unchanged access list 'office'" in import_document(tmp_path, exported)
    assert m.ConfigRevision.current() == start
    assert "unchanged access list 'office'" in import_document(tmp_path, config())  # same clear password
    # an export without keys keeps the stored users' hashes
    import_document(tmp_path, export()[0])
    assert access.PasswordHash(m.AccessUser.objects.get().password_hash).verify(b"correct horse")


@pytest.mark.django_db
def test_no_limit_when_the_rate_limit_is_null_or_absent(tmp_path: Path) -> None:
    import_document(tmp_path, config(rate_limit=None))
    assert snapshot.build_snapshot().hosts[0].rate_limit is None
    assert json.loads(export()[0])["hosts"][0]["rate_limit"] is None


@pytest.mark.django_db
def test_the_rule_bound_is_accepted_and_one_more_refused(tmp_path: Path) -> None:
    rules = [{"action": "deny", "source": f"10.{i // 256 % 256}.{i % 256}.0/24"} for i in range(accesslists.MAX_RULES)]
    import_document(tmp_path, config(office(rules=rules)))
    assert len(snapshot.build_snapshot().hosts[0].access.rules) == accesslists.MAX_RULES  # type: ignore[union-attr]
    too_many = config(office(name="big", rules=[*rules, {"action": "allow", "source": "::1"}]), access_list="big")
    assert f"at most {accesslists.MAX_RULES} rules" in refusal(tmp_path, too_many)


@pytest.mark.parametrize(("acl", "host", "problem"), [
    ({"rules": [{"action": "allow", "source": "10.0.0.0/33"}]}, {}, "rule 1: '10.0.0.0/33' is not an IP address"),
    ({"rules": [{"action": "permit", "source": "10.0.0.1"}]}, {}, "rule 1: 'permit 10.0.0.1' is not"),
    ({"users": [{"username": "a:b", "password": "x"}]}, {}, "without colons"),
    ({"users": [{"username": "u" * 151, "password": "x"}]}, {}, "1 to 150 characters"),
    ({"users": [{"username": "ops", "password": "x" * 1025}]}, {}, "1 to 1024 bytes"),
    ({"users": [{"username": "ops"}]}, {}, "the new user 'ops' needs a password"),
    ({"users": [{"username": "ops", "password_hash": "md5$x$y"}]}, {}, "not a pbkdf2_sha256 hash"),
    ({"users": [{"username": "ops", "password": "a"}, {"username": "ops", "password": "b"}]}, {}, "listed twice"),
    ({"users": [{"username": f"u{i}", "password": "x"} for i in range(101)]}, {}, "at most 100 users"),
    ({"realm": 'a"b'}, {}, "realm"),
    ({}, {"rate_limit": {"requests_per_second": 0}}, "rate_limit_rps"),
    ({}, {"rate_limit": {"requests_per_second": 200000}}, "rate_limit_rps"),
    ({}, {"rate_limit": {"burst": 5}}, "A burst needs a rate"),
    ({}, {"rate_limit": {"connections_per_client": 100001}}, "rate_limit_connections"),
    ({}, {"rate_limit": {"requests": 5}}, "unknown key 'requests'"),
    ({}, {"access_list": "nope"}, "no access list named 'nope'"),
    ({}, {"mode": "tcp"}, "A TCP host cannot ask for a password"),
], ids=["bad-cidr", "bad-action", "colon", "long-user", "long-password", "no-password", "foreign-hash",
        "twice", "users-bound", "realm", "zero-rate", "huge-rate", "burst-alone", "connections-bound",
        "unknown-key", "unknown-list", "tcp-with-users"])
@pytest.mark.django_db
def test_bad_input_is_refused_naming_the_problem(
    tmp_path: Path, acl: dict[str, Any], host: dict[str, Any], problem: str
) -> None:
    if host.get("mode") == "tcp":
        host = {**host, "rate_limit": None}
    message = refusal(tmp_path, config(office(**acl), **host))
    assert problem in message, message


@pytest.mark.django_db
def test_trusted_proxies_are_settings_per_listener(tmp_path: Path) -> None:
    import_document(tmp_path, config() | {"settings": {
        "https_trusted_proxies": "192.0.2.0/24\n2001:db8::1", "https_proxy_protocol": True}})
    assert snapshot.build_snapshot().listener_trust == (
        core.ListenerTrust("https", ("192.0.2.0/24", "2001:db8::1/128"), True),)
    bad = config() | {"settings": {"http_trusted_proxies": "not-a-network"}}
    assert "'not-a-network' is not an IP address" in refusal(tmp_path, bad)


@pytest.mark.django_db
def test_every_bound_itself_is_accepted(tmp_path: Path) -> None:
    users = [{"username": f"{i:03d}" + "u" * 147, "password": "p" * 1024} for i in range(accesslists.MAX_USERS)]
    limits = {"requests_per_second": 100_000, "burst": 1_000_000, "connections_per_client": 100_000}
    proxies = "\n".join(f"192.0.2.{i}" for i in range(accesslists.MAX_TRUSTED_PROXIES))
    import_document(tmp_path, config(office(users=users, realm="r" * 100), rate_limit=limits)
                    | {"settings": {"http_trusted_proxies": proxies}})
    route = snapshot.build_snapshot().hosts[0]
    assert route.access is not None and len(route.access.users) == accesslists.MAX_USERS
    assert route.rate_limit == core.RateLimit(100_000.0, 1_000_000, 100_000)
    too_many = "\n".join(f"192.0.2.{i}" for i in range(accesslists.MAX_TRUSTED_PROXIES + 1))
    assert "at most 100" in refusal(tmp_path, config() | {"settings": {"http_trusted_proxies": too_many}})
