"""The node's Basic-credential checks: remembered successes, the bounded pool, failure throttling."""

from __future__ import annotations

import asyncio
import base64

from proxycore import config as core
from proxycore import credentials
from proxycore.access import AccessPolicy
from proxycore.credentials import CredentialCache, Verifier
from tests.proxyharness import password_hash


def policy(iterations: int = 1000) -> AccessPolicy:
    user = core.BasicUser("ops", password_hash("pw", iterations=iterations))
    return AccessPolicy(core.AccessList("staging", users=(user,)))


def header(username: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{username}:{password}".encode())


def outcomes(verifier: Verifier, checks: list[tuple[AccessPolicy, bytes, str]]) -> list[int]:
    async def run() -> list[int]:
        loop = asyncio.get_running_loop()
        futures = []
        for acl, value, client in checks:
            future: asyncio.Future[int] = loop.create_future()
            verifier.verify(acl, value, client, future.set_result)
            futures.append(future)
        return list(await asyncio.gather(*futures))

    try:
        return asyncio.run(run())
    finally:
        verifier.close()


def test_a_success_is_remembered_for_its_list_only_until_it_expires() -> None:
    cache = CredentialCache(size=2, ttl=10.0)
    staging, other = policy(), AccessPolicy(core.AccessList("other"))
    cache.remember(staging, b"Basic x", 100.0)
    assert cache.known(staging, b"Basic x", 105.0)
    assert not cache.known(other, b"Basic x", 105.0)
    assert not cache.known(staging, b"Basic x", 111.0)


def test_the_cache_is_bounded_least_recently_used_first_out() -> None:
    cache = CredentialCache(size=2, ttl=10.0)
    acl = policy()
    for value in (b"a", b"b"):
        cache.remember(acl, value, 0.0)
    assert cache.known(acl, b"a", 1.0)  # a is now the most recently used
    cache.remember(acl, b"c", 1.0)
    assert cache.known(acl, b"a", 2.0) and not cache.known(acl, b"b", 2.0)
    assert len(cache.entries) == 2


def test_right_wrong_and_unknown_users() -> None:
    acl = policy()
    found = outcomes(Verifier(), [(acl, header("ops", "pw"), "192.0.2.1"), (acl, header("ops", "no"), "192.0.2.1"),
                                  (acl, header("nobody", "pw"), "192.0.2.1")])
    assert found == [credentials.OK, credentials.WRONG, credentials.WRONG]


def test_a_full_queue_answers_busy_instead_of_waiting() -> None:
    acl = policy(iterations=200_000)  # slow enough that the queue fills before one finishes
    checks = [(acl, header("ops", f"guess{i}"), f"192.0.2.{i}") for i in range(credentials.MAX_PENDING + 3)]
    found = outcomes(Verifier(), checks)
    assert found.count(credentials.BUSY) == 3
    assert found[: credentials.MAX_PENDING] == [credentials.WRONG] * credentials.MAX_PENDING


def test_a_client_that_keeps_failing_is_throttled_then_forgiven() -> None:
    verifier = Verifier()
    for _ in range(credentials.MAX_FAILURES):
        verifier.failed("192.0.2.1", 100.0)
    assert verifier.throttled("192.0.2.1", 100.0 + credentials.FAILURE_WINDOW - 1)
    assert not verifier.throttled("192.0.2.2", 100.0)
    assert not verifier.throttled("192.0.2.1", 100.0 + credentials.FAILURE_WINDOW)
