"""Settings come from the environment; bad values fail with a message naming the variable."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from proxyadmin.env import envbool, envfloat, envint, read_or_create_secret

ROOT = Path(__file__).resolve().parent.parent


def run_manage(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    ours = ("PROXYADMIN_", "DATABASE_URL", "REDIS_URL")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    full_env.update({"PROXYADMIN_VAR_DIR": str(tmp_path / "var"), **env})
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=full_env,
        capture_output=True, text=True, timeout=120,
    )


def test_envbool_names_the_variable_on_a_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXYADMIN_DEBUG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="PROXYADMIN_DEBUG must be one of"):
        envbool("PROXYADMIN_DEBUG", False)
    monkeypatch.setenv("PROXYADMIN_DEBUG", "yes")
    assert envbool("PROXYADMIN_DEBUG", False) is True


def test_envint_refuses_words_and_small_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_DAYS", "ten")
    with pytest.raises(ImproperlyConfigured, match="X_DAYS must be a whole number"):
        envint("X_DAYS", 1)
    monkeypatch.setenv("X_DAYS", "0")
    with pytest.raises(ImproperlyConfigured, match="at least 1"):
        envint("X_DAYS", 1, minimum=1)


def test_envfloat_refuses_words_and_numbers_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXYADMIN_ROLLUP_FLUSH_SECONDS", "soon")
    with pytest.raises(ImproperlyConfigured, match="PROXYADMIN_ROLLUP_FLUSH_SECONDS must be a number"):
        envfloat("PROXYADMIN_ROLLUP_FLUSH_SECONDS", 10.0, 0.05, 60.0)
    monkeypatch.setenv("PROXYADMIN_ROLLUP_FLUSH_SECONDS", "120")
    with pytest.raises(ImproperlyConfigured, match=r"from 0\.05 to 60, not 120"):
        envfloat("PROXYADMIN_ROLLUP_FLUSH_SECONDS", 10.0, 0.05, 60.0)
    monkeypatch.setenv("PROXYADMIN_ROLLUP_FLUSH_SECONDS", "30")
    assert envfloat("PROXYADMIN_ROLLUP_FLUSH_SECONDS", 10.0, 0.05, 60.0) == 30.0


def test_generated_secret_is_kept_in_a_0600_file(tmp_path: Path) -> None:
    path = tmp_path / "var" / "secret"
    first = read_or_create_secret(path, lambda: "s3cret-value")
    assert first == "s3cret-value"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_or_create_secret(path, lambda: "other") == "s3cret-value"


def test_first_run_generates_secrets_into_var_without_printing_them(tmp_path: Path) -> None:
    result = run_manage(["check"], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    var = tmp_path / "var"
    for name in ("secret_key", "fernet_keys"):
        secret = (var / name).read_text().strip()
        assert secret
        assert stat.S_IMODE((var / name).stat().st_mode) == 0o600
        assert secret not in result.stdout + result.stderr


def test_bad_database_url_is_a_plain_error(tmp_path: Path) -> None:
    result = run_manage(["check"], {"DATABASE_URL": "nosuchdb://x/y"}, tmp_path)
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr


def test_bad_redis_url_is_a_plain_error(tmp_path: Path) -> None:
    result = run_manage(["check"], {"REDIS_URL": "http://127.0.0.1:6379"}, tmp_path)
    assert result.returncode != 0
    assert "REDIS_URL must start with redis://" in result.stderr


def test_sqlite_database_runs_in_wal_mode(tmp_path: Path) -> None:
    script = (
        "import django; django.setup();"
        "from django.db import connection;"
        "c = connection.cursor(); c.execute('PRAGMA journal_mode'); print(c.fetchone()[0])"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(PROXYADMIN_VAR_DIR=str(tmp_path / "var"), DJANGO_SETTINGS_MODULE="proxyadmin.settings")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "wal", out.stderr


def test_check_deploy_passes_with_production_settings(tmp_path: Path) -> None:
    result = run_manage(
        ["check", "--deploy", "--fail-level", "WARNING"],
        {"PROXYADMIN_DEBUG": "0", "PROXYADMIN_HTTPS": "1", "PROXYADMIN_ALLOWED_HOSTS": "admin.example.com"},
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
