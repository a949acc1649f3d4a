"""Automatic certificates (ACME, RFC 8555): accounts, per-host state, challenges, the worker."""
