"""Access lists, Basic credentials and rate limits, decided without sockets."""

from __future__ import annotations

import base64
import time
from dataclasses import replace

import pytest

from proxycore import access, proxyproto
from proxycore import config as core
from proxycore import decide as d
from proxycore.access import AccessPolicy, AddressTable, address_key
from proxycore.ratelimit import HostLimiter
from proxycore.stats import RECENT_TOP, HostStats
from tests.proxyharness import password_hash
from tests.test_decisions import A, head, on_https

ALLOW, DENY = core.AccessAction.ALLOW, core.AccessAction.DENY


def acl(*rules: tuple[core.AccessAction, str], default: core.AccessAction = DENY, users: int = 0,
        satisfy: core.Satisfy = core.Satisfy.ANY) -> core.AccessList:
    return core.AccessList(
        name="office", default=default, rules=tuple(core.AccessRule(a, s) for a, s in rules),
        satisfy=satisfy,
        users=tuple(core.BasicUser(f"u{i}", password_hash("pw")) for i in range(users)),
    )


def allows(table_or_list: core.AccessList, ip: str) -> bool:
    return AccessPolicy(table_or_list).table.allows(address_key(ip))


def decide_for(policy: AccessPolicy | None, allowed: bool = True, credentials: int = 0,
               retry_after: int = 0) -> d.Decision:
    return d.decide(head(), A, A, https=True, https_port=8443, policy=policy, address_allowed=allowed,
                    credentials=credentials, retry_after=retry_after)


# ---- address rules --------------------------------------------------------------------


def test_the_first_matching_rule_wins_then_the_default() -> None:
    rules = acl((DENY, "10.1.2.3"), (ALLOW, "10.0.0.0/8"), (DENY, "0.0.0.0/0"), default=ALLOW)
    assert not allows(rules, "10.1.2.3")
    assert allows(rules, "10.1.2.4")
    assert not allows(rules, "192.0.2.1")
    assert allows(acl(default=ALLOW), "192.0.2.1")
    assert not allows(acl(), "192.0.2.1")


@pytest.mark.parametrize(("ip", "allowed"), [
    ("192.168.0.255", False), ("192.168.1.0", True), ("192.168.1.255", True), ("192.168.2.0", False),
])
def test_cidr_edges_are_inclusive_of_the_network_and_its_broadcast(ip: str, allowed: bool) -> None:
    assert allows(acl((ALLOW, "192.168.1.0/24")), ip) is allowed


def test_ipv6_rules_and_ipv4_mapped_clients() -> None:
    rules = acl((ALLOW, "2001:db8::/32"), (ALLOW, "127.0.0.0/8"), (DENY, "::/0"))
    assert allows(rules, "2001:db8:ffff::1")
    assert not allows(rules, "2001:db9::1")
    assert allows(rules, "::ffff:127.0.0.5")  # a dual-stack listener's IPv4 client
    assert not allows(rules, "::1")
    assert allows(acl((ALLOW, "::1")), "::1")


def test_a_thousand_cidrs_compile_to_one_sorted_table() -> None:
    rules = [(ALLOW if i % 2 else DENY, f"10.{i // 256}.{i % 256}.0/24") for i in range(1000)]
    policy = AccessPolicy(acl(*rules, default=ALLOW))
    assert len(policy.table.starts) <= 2 * 1000 + 1
    assert not policy.table.allows(address_key("10.0.0.7"))
    assert policy.table.allows(address_key("10.0.1.7"))
    assert not policy.table.allows(address_key("10.3.230.9"))  # i = 998
    assert policy.table.allows(address_key("10.3.231.9"))
    assert policy.table.allows(address_key("11.0.0.1"))  # no rule: the default


def test_an_unparsable_peer_gets_the_default() -> None:
    assert AddressTable([(False, "0.0.0.0/0")], True).allows(address_key("not-an-ip"))


# ---- decisions ------------------------------------------------------------------------


def test_an_address_the_list_denies_gets_403() -> None:
    decision = decide_for(AccessPolicy(acl()), allowed=False)
    assert (decision.action, decision.status) == (d.LOCAL, 403)


def test_satisfy_any_lets_an_allowed_address_in_without_a_password() -> None:
    assert decide_for(AccessPolicy(acl(users=1)), allowed=True).action == d.FORWARD


def test_satisfy_any_asks_another_address_for_a_password() -> None:
    policy = AccessPolicy(acl(users=1))
    decision = decide_for(policy, allowed=False, credentials=access.CRED_NONE)
    assert (decision.status, decision.headers) == (
        401, [(b"www-authenticate", b'Basic realm="office", charset="UTF-8"')])
    assert decide_for(policy, allowed=False, credentials=access.CRED_PRESENT).action == d.AUTHENTICATE
    assert decide_for(policy, allowed=False, credentials=access.CRED_VERIFIED).action == d.FORWARD
    assert decide_for(policy, allowed=False, credentials=access.CRED_MALFORMED).status == 401


def test_satisfy_all_needs_both_address_and_password() -> None:
    policy = AccessPolicy(acl(users=1, satisfy=core.Satisfy.ALL))
    assert decide_for(policy, allowed=False, credentials=access.CRED_VERIFIED).status == 403
    assert decide_for(policy, allowed=True, credentials=access.CRED_NONE).status == 401
    assert decide_for(policy, allowed=True, credentials=access.CRED_VERIFIED).action == d.FORWARD


def test_over_the_rate_is_429_with_retry_after_before_any_password_check() -> None:
    decision = decide_for(AccessPolicy(acl(users=1)), allowed=False, credentials=access.CRED_PRESENT,
                          retry_after=2)
    assert (decision.status, decision.headers) == (429, [(b"retry-after", b"2")])
    assert decide_for(None, retry_after=1).status == 429
    assert decide_for(AccessPolicy(acl()), allowed=False, retry_after=1).status == 403


def test_access_rules_come_after_421() -> None:
    decision = on_https(head(host="b.example"), replace(A, name="b"))
    assert decision.status == 421


# ---- Basic credentials ------------------------------------------------------------------


def b64(text: bytes) -> bytes:
    return base64.b64encode(text)


@pytest.mark.parametrize("value", [
    b"Basic !!!notbase64", b"Basic " + b64(b"nocolon"), b"Bearer " + b64(b"a:b"), b"Basic " + b64(b":pw"),
    b"Basic " + b64(b"u:" + b"x" * 5000),
], ids=["bad-base64", "no-colon", "other-scheme", "no-user", "huge"])
def test_malformed_credentials_are_refused(value: bytes) -> None:
    assert access.basic_credentials(value) is None


def test_a_well_formed_credential_is_read() -> None:
    assert access.basic_credentials(b"basic " + b64("é:p:w".encode())) == ("é", b"p:w")


def test_the_authorization_value_is_found_case_blind_and_twice_is_malformed() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nauthorization:  Basic abc \r\n\r\n"
    assert access.authorization(raw) == b"Basic abc"
    assert access.authorization(raw[:-2] + b"AUTHORIZATION: Basic x\r\n\r\n") == b""
    assert access.authorization(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") is None


def test_the_password_hash_is_djangos_pbkdf2_format() -> None:
    encoded = password_hash("s3cret", iterations=1200)
    parsed = access.PasswordHash(encoded)
    assert parsed.verify(b"s3cret") and not parsed.verify(b"S3cret")
    with pytest.raises(ValueError):
        access.PasswordHash("argon2$argon2id$v=19$...")
    with pytest.raises(ValueError):
        access.PasswordHash(password_hash("x").replace("$1000$", "$999999999$"))


def test_a_changed_password_changes_the_lists_identity() -> None:
    before = AccessPolicy(acl(users=1))
    after = AccessPolicy(replace(acl(users=1), users=(core.BasicUser("u0", password_hash("new")),)))
    assert before.identity != after.identity


# ---- rate limits ----------------------------------------------------------------------


def test_a_reload_that_changes_the_limit_applies_to_existing_buckets() -> None:
    limiter = HostLimiter()
    assert limiter.take(core.RateLimit(requests_per_second=1, burst=1), 1, 0.0) == 0
    assert limiter.take(core.RateLimit(requests_per_second=1, burst=1), 1, 0.0) == 1
    assert limiter.take(core.RateLimit(requests_per_second=10, burst=5), 1, 0.5) == 0  # 5 tokens back


def test_the_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    limiter = HostLimiter()
    limit = core.RateLimit(requests_per_second=2, burst=3)
    assert [limiter.take(limit, 1, 100.0) for _ in range(4)] == [0, 0, 0, 1]
    assert limiter.take(limit, 2, 100.0) == 0  # another client has its own bucket
    assert limiter.take(limit, 1, 100.5) == 0  # half a second: one token back
    assert limiter.take(limit, 1, 100.5) == 1


def test_tracked_clients_are_bounded_least_recently_seen_dropped() -> None:
    limiter = HostLimiter(max_clients=3)
    limit = core.RateLimit(requests_per_second=1, burst=1)
    for now, client in enumerate((1, 2, 3, 1, 4)):
        limiter.take(limit, client, float(now))
    assert list(limiter.buckets) == [3, 1, 4]


def test_connections_per_client_are_counted_and_given_back() -> None:
    limiter = HostLimiter()
    limit = core.RateLimit(connections_per_client=2)
    assert limiter.connect(limit, 7) and limiter.connect(limit, 7)
    assert not limiter.connect(limit, 7)
    limiter.disconnect(7)
    assert limiter.connect(limit, 7)
    limiter.disconnect(7)
    limiter.disconnect(7)
    assert limiter.connections == {}


def test_top_limited_clients_are_a_bounded_summable_map() -> None:
    stats = HostStats()
    now = time.time()
    for i in range(RECENT_TOP + 5):
        for _ in range(i + 1):
            stats.limited(f"192.0.2.{i}", now)
    top = stats.as_dict()["limited_clients"]
    assert len(top) == RECENT_TOP
    assert top["192.0.2.24"] == 25 and "192.0.2.0" not in top
    assert stats.as_dict()["rate_limited"] == sum(range(1, RECENT_TOP + 6))
    stats.limited_clients.add("old", now - 16 * 60)
    assert "old" not in stats.limited_clients.top(now)


# ---- inbound PROXY headers ----------------------------------------------------------------


def test_proxy_headers_v1_and_v2_are_read_and_bounded() -> None:
    v1 = proxyproto.encode_v1(("192.0.2.7", 5555), ("127.0.0.1", 443))
    assert proxyproto.parse_header(v1 + b"rest") == (("192.0.2.7", 5555), len(v1))
    assert proxyproto.parse_header(v1[:10]) is None
    v2 = proxyproto.encode_v2(("2001:db8::7", 1), ("::1", 443), alpn="h2")
    assert proxyproto.parse_header(v2) == (("2001:db8::7", 1), len(v2))
    assert proxyproto.parse_header(b"PROXY UNKNOWN\r\n") == (None, 15)
    for bad in (b"GET / HTTP/1.1\r\n", b"PROXY TCP4 x y 1 2\r\n", b"PROXY " + b"1" * 200):
        with pytest.raises(proxyproto.BadProxyHeader):
            proxyproto.parse_header(bad)
    with pytest.raises(proxyproto.BadProxyHeader):
        proxyproto.parse_header(proxyproto.V2_SIGNATURE + b"\x21\x11\xff\xff")


def test_the_compiled_table_agrees_with_first_match_on_random_rules() -> None:
    import ipaddress
    import random

    rng = random.Random(14)
    for _ in range(20):
        rules: list[tuple[bool, str]] = []
        for _ in range(rng.randint(1, 60)):
            if rng.random() < 0.7:
                net = ipaddress.ip_network((rng.choice([0x0A000000, 0xC0A80000]) | rng.getrandbits(16),
                                            rng.randint(8, 32)), strict=False)
            else:
                net = ipaddress.ip_network((0x20010DB8 << 96 | rng.getrandbits(32) << 64, rng.randint(32, 128)),
                                           strict=False)
            rules.append((rng.random() < 0.5, str(net)))
        default = rng.random() < 0.5
        table = AddressTable(rules, default)
        networks = [(allow, ipaddress.ip_network(source)) for allow, source in rules]
        probes = [str(n.network_address) for _, n in networks] + [str(n.broadcast_address) for _, n in networks]
        probes += [str(ipaddress.IPv4Address(rng.choice([0x0A000000, 0xC0A80000]) | rng.getrandbits(16)))
                   for _ in range(50)]
        for probe in probes:
            ip = ipaddress.ip_address(probe)
            expected = next((allow for allow, n in networks if n.version == ip.version and ip in n), default)
            assert table.allows(address_key(probe)) is expected, (rules, probe)


def test_five_thousand_rules_compile_quickly() -> None:
    rules = [(i % 3 == 0, f"10.{i // 256 % 256}.{i % 256}.0/{24 - i % 8}") for i in range(5000)]
    start = time.perf_counter()
    AddressTable(rules, False)
    assert time.perf_counter() - start < 2.0


def test_the_authorization_bound() -> None:
    longest = b"Basic " + b64(b"u" * access.MAX_USERNAME + b":" + b"p" * access.MAX_PASSWORD)
    assert len(longest) <= access.MAX_AUTHORIZATION
    assert access.basic_credentials(longest) is not None
    padded = longest + b" " * (access.MAX_AUTHORIZATION - len(longest))
    assert access.basic_credentials(padded) is not None  # exactly at the bound
    assert access.basic_credentials(padded + b" ") is None


def test_a_removed_hosts_buckets_are_forgotten() -> None:
    from proxycore.ratelimit import Limiters

    limiters = Limiters()
    kept, gone = limiters.host("a"), limiters.host("b")
    assert gone.connect(core.RateLimit(connections_per_client=1), 7)
    limiters.retain({"a"})
    assert limiters.hosts == {"a": kept}
    gone.disconnect(7)  # a connection still holding its slot gives it back to its own limiter
    assert gone.connections == {}
