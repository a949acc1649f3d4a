"""The data plane's sans-I/O core runs the same compiled (mypyc, setup.py) or as Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxycore import COMPILED, compiled

ROOT = Path(__file__).resolve().parent.parent

# Heads through both rewriting functions; the subprocess prints the same for its modules.
PROBE = r"""
import json, sys
from proxycore import compiled, http1, routing
from proxycore.config import HSTS
out = {"state": compiled.state()}
requests = [b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nX_Forwarded_For: 9\r\n\r\n",
            b"GET http://a/b?c HTTP/1.0\r\nAccept: */*\r\n\r\n"]
responses = [b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
             b"HTTP/1.0 404 Nope\r\nStrict-Transport-Security: max-age=1\r\nKeep-Alive: 5\r\nContent-Length: 0\r\n\r\n"]
hsts = HSTS(max_age=60, include_subdomains=True, preload=False, override_upstream=False)
out["requests"] = [routing.upstream_request_head(http1.RequestParser().feed(raw)[0], b"x: 1\r\n").hex()
                   for raw in requests]
heads = []
for raw in responses:
    parser = http1.ResponseParser()
    parser.expect(b"GET")
    heads.append(routing.client_response_head(parser.feed(raw)[0], hsts, https=True).hex())
out["responses"] = heads
print(json.dumps(out))
"""


def probe(pure: bool) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROXYADMIN_PURE_PYTHON", None)
    if pure:
        env["PROXYADMIN_PURE_PYTHON"] = "1"
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_state_says_which_build_this_process_imported() -> None:
    # A module counts as compiled exactly when its extension sits beside its source and
    # PROXYADMIN_PURE_PYTHON does not send the import to the .py file.
    here = ROOT / "proxycore"
    built = {f"proxycore.{name}" for name in COMPILED if list(here.glob(f"{name}.cpython-*.so"))}
    expected = set() if os.environ.get("PROXYADMIN_PURE_PYTHON") else built
    assert set(compiled.compiled_modules()) == expected
    assert compiled.state() == ("compiled" if expected else "python")  # (conftest refuses "stale")


def test_pure_python_and_the_default_build_rewrite_heads_alike() -> None:
    default, pure = probe(pure=False), probe(pure=True)
    assert pure["state"] == "python"
    assert default["state"] in ("compiled", "python")
    assert default["requests"] == pure["requests"]
    assert default["responses"] == pure["responses"]
    # and both are right: the listed and the underscore forwarding fields are gone
    first = bytes.fromhex(str(pure["requests"][0]))  # type: ignore[index]
    assert first == b"GET /a HTTP/1.1\r\nHost: a\r\nx: 1\r\n\r\n"


def test_a_compiled_module_older_than_its_source_is_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not compiled.compiled_modules():
        pytest.skip("the core runs as Python here: nothing compiled to go stale")
    record = tmp_path / "sources.json"
    record.write_text(json.dumps({"proxycore/http1.py": "0" * 64}))
    monkeypatch.setattr(compiled, "_SOURCES", record)
    assert "proxycore.http1" in compiled.stale_modules()
    assert compiled.state().startswith("stale: ")
