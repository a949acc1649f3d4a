"""From the admin's rows to a node's answers: a password hashed by Django, verified without it."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from proxyadmin import models as m
from proxyadmin import snapshot
from tests.proxyharness import Upstream, basic, connect_from, read_response, running_node
from tests.test_import_export import document, import_document, new_certificate


def insecure_client() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the certificate is not what this test is about
    return ctx


@pytest.mark.django_db
def test_an_imported_list_is_enforced_by_a_node_built_from_the_database(
    tmp_path: Path, upstream: Upstream
) -> None:
    import_document(tmp_path, document(
        certificates=[new_certificate("site", ["a.example"])],
        upstreams=[{"name": "app", "targets": [{"host": "127.0.0.1", "port": upstream.port}]}],
        access_lists=[{"name": "office", "default": "deny", "satisfy": "any",
                       "rules": [{"action": "allow", "source": "127.0.0.1/32"}],
                       "users": [{"username": "ops", "password": "correct horse"}]}],
        hosts=[{"name": "web", "certificate": "site", "upstream": "app", "names": ["a.example"],
                "access_list": "office", "rate_limit": {"requests_per_second": 100, "burst": 2}}],
    ))
    assert m.AccessUser.objects.get().password_hash.startswith("pbkdf2_sha256$1000000$")  # Django's count

    def ask(source: str, extra: str = "") -> tuple[int, dict[bytes, list[bytes]], bytes]:
        raw = connect_from(source, node.https_port)
        sock = insecure_client().wrap_socket(raw, server_hostname="a.example")
        sock.sendall(f"GET / HTTP/1.1\r\nHost: a.example\r\n{extra}\r\n".encode())
        try:
            return read_response(sock)
        finally:
            sock.close()

    with running_node(snapshot.build_snapshot()) as node:
        assert ask("127.0.0.1")[0] == 200
        assert ask("127.0.0.2")[0] == 401
        status, _, body = ask("127.0.0.2", basic("ops", "correct horse"))
        assert status == 200
        assert "authorization" not in [n.lower() for n, _ in json.loads(body)["headers"]]
        assert ask("127.0.0.2", basic("ops", "wrong"))[0] in (401, 429)  # (the burst is 2)
