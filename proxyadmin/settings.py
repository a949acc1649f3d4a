"""Django settings for proxyadmin, read from the environment.

Every setting a operator may change is an environment variable documented in the
README. With none set, the product runs on one machine with SQLite under
``var/`` and the in-memory channel layer, and generates its secrets into
``var/`` (mode 0600, git-ignored) on first run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import dj_database_url
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured

from proxyadmin.env import (
    envbool,
    envfile,
    envfloat,
    envint,
    envlist,
    envurl,
    private_sqlite_file,
    random_secret_key,
    secret_from_env_or_file,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("PROXYADMIN_VAR_DIR", BASE_DIR / "var")).resolve()
# Holds the secrets and the SQLite database: readable by this user only.
VAR_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)

DEBUG = envbool("PROXYADMIN_DEBUG", False)
SECRET_KEY = secret_from_env_or_file(
    "PROXYADMIN_SECRET_KEY", VAR_DIR / "secret_key", random_secret_key
)
# Comma-separated Fernet keys; the first encrypts, all decrypt (see proxyadmin.crypto).
PROXYADMIN_KEYS = secret_from_env_or_file(
    "PROXYADMIN_KEYS", VAR_DIR / "fernet_keys", lambda: Fernet.generate_key().decode()
)
ALLOWED_HOSTS = envlist("PROXYADMIN_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])

# When the admin is served over HTTPS (for instance behind this very proxy),
# cookies are marked secure and plain HTTP is redirected. Off by default because
# `manage.py up` serves the admin on http://127.0.0.1:8000.
HTTPS = envbool("PROXYADMIN_HTTPS", False)
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = HTTPS
SECURE_HSTS_SECONDS = envint("PROXYADMIN_HSTS_SECONDS", 31536000 if HTTPS else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
# The preload directive only allows submission to the browsers' lists; it submits nothing.
SECURE_HSTS_PRELOAD = envbool("PROXYADMIN_HSTS_PRELOAD", HTTPS)
if HTTPS:
    # Our proxy overwrites X-Forwarded-Proto, so it can be trusted when the
    # admin is reachable only through it.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = envlist("PROXYADMIN_CSRF_TRUSTED_ORIGINS", [])
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "proxyadmin.apps.ProxyAdminConfig",
    "proxyadmin.loginguard",
    "proxyadmin.acme",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "proxyadmin.csp.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "proxyadmin.revisions.RevisionMiddleware",
]

ROOT_URLCONF = "proxyadmin.urls"
ASGI_APPLICATION = "proxyadmin.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database_from_env() -> dict[str, object]:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        private_sqlite_file(VAR_DIR / "proxyadmin.sqlite3")  # it holds the encrypted keys and sessions
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "proxyadmin.sqlite3",
            "OPTIONS": {
                # WAL lets proxy nodes read the config while the admin writes.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
        }
    try:
        config = dict(dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a database URL I understand: {exc}") from None
    if not config.get("ENGINE"):
        raise ImproperlyConfigured("DATABASE_URL names a database engine proxyadmin does not know.")
    return config


DATABASES = {"default": _database_from_env()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


# Seconds a Redis socket read may take. A consumer's inbox is a blocking read of up to
# 5 s (channels_redis' brpop_timeout); redis-py 8 gives up on a read after 5 s by
# default, which closed idle agent links every 5 s. Keep this well above that wait.
REDIS_SOCKET_TIMEOUT = 15.0


REDIS_URL = os.environ.get("REDIS_URL", "").strip()


def _channel_layers_from_env() -> dict[str, object]:
    url = REDIS_URL
    if not url:
        return {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured("REDIS_URL must start with redis://, rediss:// or unix://.")
    host = {"address": url, "socket_timeout": REDIS_SOCKET_TIMEOUT, "socket_connect_timeout": 5}
    return {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [host]},
        }
    }


CHANNEL_LAYERS = _channel_layers_from_env()

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
# Serve static files straight from the apps, so `manage.py up` needs no collectstatic.
WHITENOISE_USE_FINDERS = True

# Days before expiry when a certificate is flagged in the admin and on the dashboard.
CERT_EXPIRY_WARNING_DAYS = envint("PROXYADMIN_CERT_WARNING_DAYS", 30, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("PROXYADMIN_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# The dashboard's chart library, installed by `npm ci` (see package.json) and served
# from node_modules/ as it is. Without it Django still starts; the dashboard says how to
# install it.
UPLOT_DIST = BASE_DIR / "node_modules" / "uplot" / "dist"
STATICFILES_DIRS = [("vendor/uplot", UPLOT_DIST)] if UPLOT_DIST.is_dir() else []

# --- Agent link and live dashboard --------------------------------------------
# The bearer token proxy nodes present on /ws/agent/; give every node the same one.
AGENT_TOKEN = secret_from_env_or_file("PROXYADMIN_AGENT_TOKEN", VAR_DIR / "agent_token", random_secret_key)
if len(AGENT_TOKEN) < 16:
    raise ImproperlyConfigured("PROXYADMIN_AGENT_TOKEN must be at least 16 characters long.")
# Days of per-minute traffic kept for the dashboard's history (the chart shows the last day).
TRAFFIC_HISTORY_DAYS = envint("PROXYADMIN_TRAFFIC_HISTORY_DAYS", 7, minimum=1)
# Seconds between two writes of the nodes' traffic into the rollup (one transaction per
# process, whatever the number of nodes; see proxyadmin/ledger.py). Below 1: tests only.
ROLLUP_FLUSH_SECONDS = envfloat("PROXYADMIN_ROLLUP_FLUSH_SECONDS", 10.0, 0.05, 60.0)
# Largest stats report taken from a node, in KiB (a 50-host report is about 30 KiB;
# daphne refuses websocket messages past 1 MiB before this is looked at).
AGENT_MAX_REPORT_KB = envint("PROXYADMIN_AGENT_MAX_REPORT_KB", 512, minimum=1)
# A node's name is held by one link at a time: this long after its last report, a link
# that stopped reporting (a dead peer daphne has not noticed) lets another one take it.
NODE_LEASE_SECONDS = envfloat("PROXYADMIN_NODE_LEASE_SECONDS", 10.0, 1.0, 300.0)

# --- Automatic certificates (ACME) ----------------------------------------------
# The directory every ACME host orders from (one account per directory), the contact
# address given to it, and a PEM bundle trusted for the directory's own HTTPS (a private
# CA, or pebble in the tests); empty: the system's trust store.
ACME_DIRECTORY = envurl("PROXYADMIN_ACME_DIRECTORY", "https://acme-v02.api.letsencrypt.org/directory")
ACME_EMAIL = os.environ.get("PROXYADMIN_ACME_EMAIL", "").strip()
if ACME_EMAIL and ("@" not in ACME_EMAIL or any(c.isspace() or c == "," for c in ACME_EMAIL)):
    raise ImproperlyConfigured(f"PROXYADMIN_ACME_EMAIL must be one e-mail address, not {ACME_EMAIL!r}.")
ACME_CA_BUNDLE = envfile("PROXYADMIN_ACME_CA_BUNDLE")
# External account binding (RFC 8555 §7.3.4), for CAs that require it: the key id and the
# base64url HMAC key the CA hands out, sent once, when the account is registered.
ACME_EAB_KID = os.environ.get("PROXYADMIN_ACME_EAB_KID", "").strip()
ACME_EAB_HMAC_KEY = os.environ.get("PROXYADMIN_ACME_EAB_HMAC_KEY", "").strip()
if bool(ACME_EAB_KID) != bool(ACME_EAB_HMAC_KEY):
    raise ImproperlyConfigured(
        "PROXYADMIN_ACME_EAB_KID and PROXYADMIN_ACME_EAB_HMAC_KEY go together: set both, or neither."
    )
if ACME_EAB_HMAC_KEY and not re.fullmatch(r"[A-Za-z0-9_-]{16,}={0,2}", ACME_EAB_HMAC_KEY):
    # The key itself is never repeated in the message.
    raise ImproperlyConfigured(
        "PROXYADMIN_ACME_EAB_HMAC_KEY must be the base64url HMAC key the CA gave you "
        "(letters, digits, - and _, at least 16 of them)."
    )
