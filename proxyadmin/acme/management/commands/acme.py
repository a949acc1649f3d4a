"""``manage.py acme``: the ACME worker, one per cluster (``up`` runs it; ``--once`` for one pass).

Each pass takes the cluster's lease (a row with an expiry, so two control planes on
one database never order the same certificate twice, and a crashed worker's lease
runs out), then, for every ACME host that is due (new, names changed, renewal
time, or backoff over): order a certificate for all its names; publish the
challenges as a config revision; wait until every online proxy node has applied
that revision; only then tell the CA to validate; poll; finalize with a CSR
(fresh P-256 key); store the chain as a certificate of source ``acme`` (key
encrypted) and attach it to the host; remove the challenges. Both last steps are one
revision, so nodes swap certificates in one reload and drop no connection.

An order cut short (crash, restart, lost lease) leaves challenges behind and no
certificate: the next pass removes them and starts a new order.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import signal
import socket
import time
from types import FrameType
from typing import Any

from acme import messages
from acme.client import ClientV2
from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.db.models import ProtectedError
from django.utils import timezone

from proxyadmin import pki, revisions
from proxyadmin.acme import protocol
from proxyadmin.acme.models import Account, Challenge, HostState, Lease, renewal_time
from proxyadmin.models import Certificate, ConfigRevision, Host, ProxyNode

log = logging.getLogger("proxyadmin.acme")

ACTOR = "acme"
LEASE = "acme-worker"
# With no node linked to the control plane, unlinked nodes still poll the database every
# second: give them that long to pick the challenges up.
UNLINKED_NODES_GRACE = 1.5
# After the CA could not be reached for the account's contact or renewal information.
UPKEEP_RETRY = dt.timedelta(minutes=5)


class OrderFailed(Exception):
    """The order cannot go on; the message says why in plain words (the CA's, when it gave some)."""


class LeaseLost(Exception):
    """Another worker holds the lease now: stop without touching the order."""


class Command(BaseCommand):
    help = "Obtain and renew certificates for ACME hosts (one worker per cluster)."

    lease_seconds = 60.0
    node_wait = 60.0  # seconds every online node gets to apply the challenges' revision
    validation_wait = 90.0  # seconds the CA gets to validate every name
    interval = 1.0  # seconds between passes of the long-running worker

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="one pass, then exit")
        parser.add_argument("--node-wait", type=float, default=self.node_wait, metavar="SECONDS",
                            help="how long every online proxy node gets to apply the challenges "
                                 f"before the order fails (default {self.node_wait:g})")

    upkeep_after = dt.datetime.min.replace(tzinfo=dt.UTC)
    acme: ClientV2 | None = None

    def handle(self, *args: Any, **options: Any) -> None:
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.node_wait = options["node_wait"]
        if options["once"]:
            self.run_once()
            return
        signal.signal(signal.SIGTERM, _exit_on_signal)
        log.info("The ACME worker started, ordering from %s.", settings.ACME_DIRECTORY)
        try:
            self.run_forever()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            Lease.release(LEASE, self.holder)
            log.info("The ACME worker stopped.")

    # -- the lease ------------------------------------------------------------------------

    def take_lease(self) -> bool:
        return Lease.acquire(LEASE, self.holder, self.lease_seconds, timezone.now())

    def keep_lease(self) -> None:
        """Renew the lease before a step that talks to the CA; stop if it went to another worker."""
        if not self.take_lease():
            raise LeaseLost("another ACME worker took over the lease")

    def lease_holder(self) -> str:
        lease = Lease.objects.filter(name=LEASE).first()
        return f"{lease.holder} until {lease.expires_at:%H:%M:%S}" if lease else "nobody"

    def run_once(self) -> int:
        """One pass if this worker gets the lease; the number of hosts that got a certificate."""
        if not self.take_lease():
            log.info("Another ACME worker holds the lease (%s); this pass does nothing.",
                     self.lease_holder())
            return 0
        try:
            return self.run_pass()
        finally:
            Lease.release(LEASE, self.holder)

    def run_forever(self) -> None:
        waiting = False
        while True:
            if self.take_lease():
                if waiting:
                    log.info("This ACME worker now holds the lease.")
                waiting = False
                self.run_pass()
            elif not waiting:
                log.info("Another ACME worker holds the lease (%s); waiting.", self.lease_holder())
                waiting = True
            time.sleep(self.interval)

    # -- a pass ---------------------------------------------------------------------------

    def run_pass(self) -> int:
        """Clean up after an interrupted order, order for every due host, then keep the
        account's contact and the CA's renewal suggestions up to date."""
        self.remove_leftover_challenges()
        issued = 0
        self.acme = None
        for host, names in self.due_hosts(timezone.now()):
            try:
                issued += self.obtain(self.client(), host, names)
            except LeaseLost:
                log.warning("The ACME worker lost its lease during the order for host '%s'; "
                            "the worker that holds it now starts it again.", host.name)
                return issued
            except Exception as exc:  # every failure, whatever its kind, is the host's state
                self.fail(host, exc)
        self.upkeep(timezone.now())
        return issued

    def client(self) -> ClientV2:
        """This pass's client of the directory, connected on first use."""
        if self.acme is None:
            self.acme = self.connect()
        return self.acme

    def upkeep(self, now: dt.datetime) -> None:
        """A changed contact address told to the CA; renewal information asked for when due.

        Neither is any host's failure: when the CA cannot be reached, say so and leave
        it for ``UPKEEP_RETRY`` rather than asking again every pass.
        """
        if now < self.upkeep_after:
            return
        contact_changed = Account.objects.filter(directory=settings.ACME_DIRECTORY).exclude(
            uri="").exclude(email=settings.ACME_EMAIL).exists()
        renewal_info_due = HostState.objects.filter(
            status=HostState.Status.VALID, ari_next_check__lte=now, certificate__isnull=False).exists()
        if not (contact_changed or renewal_info_due):
            return
        try:
            acme = self.client()  # connecting tells the CA a changed contact
            if renewal_info_due:
                self.check_renewal_info(acme)
        except Exception as exc:
            self.upkeep_after = now + UPKEEP_RETRY
            log.warning("The ACME worker could not reach %s to update the account or ask for "
                        "renewal information: %s. It tries again at %s.", settings.ACME_DIRECTORY,
                        protocol.problem_text(exc), f"{self.upkeep_after:%Y-%m-%d %H:%M:%S} UTC")

    def due_hosts(self, now: dt.datetime) -> list[tuple[Host, list[str]]]:
        hosts = (Host.objects.filter(enabled=True).exclude(acme=Host.Acme.OFF)
                 .select_related("certificate").prefetch_related("names"))
        due = []
        for host in hosts:
            names = [n.name for n in host.names.all()]
            if names and HostState.of(host).is_due(names, now):
                due.append((host, names))
        return due

    def connect(self) -> ClientV2:
        """A client of the directory: the account registered on first use, its contact kept
        equal to ``PROXYADMIN_ACME_EMAIL``."""
        account = Account.for_directory(settings.ACME_DIRECTORY, settings.ACME_EMAIL)
        registered = bool(account.uri)
        account.prepare_registration(settings.ACME_EMAIL, settings.ACME_EAB_KID, settings.ACME_EAB_HMAC_KEY)
        acme = protocol.make_client(account)
        if not registered:
            binding = f", bound to the external account {account.eab_kid}" if account.eab_kid else ""
            log.info("Registered the ACME account %s at %s (contact %s%s), agreeing to the terms "
                     "of service %s.", account.uri, account.directory, account.email or "none",
                     binding, account.terms_of_service or "(none published)")
        elif account.email != settings.ACME_EMAIL:
            old = account.email
            listed = protocol.update_contact(acme, account, settings.ACME_EMAIL)
            log.info("Changed the contact of the ACME account %s from %s to %s; the CA now lists %s.",
                     account.uri, old or "none", settings.ACME_EMAIL or "none",
                     ", ".join(listed) or "no contact")
        return acme

    def remove_leftover_challenges(self) -> None:
        hosts = sorted(set(Challenge.objects.values_list("host__name", flat=True)))
        if not hosts:
            return
        with transaction.atomic():
            Challenge.objects.all().delete()
            HostState.objects.exclude(order_uri="").update(order_uri="")
            summary = f"removed the ACME challenges of an interrupted order: {', '.join(hosts)}"
            ConfigRevision.objects.create(actor=ACTOR, summary=summary)
        log.info("Removed the challenges of an interrupted ACME order for %s; it starts again.",
                 ", ".join(f"host '{h}'" for h in hosts))

    # -- one order ------------------------------------------------------------------------

    def obtain(self, acme: ClientV2, host: Host, names: list[str]) -> int:
        """Order, validate, finalize and store a certificate for ``host``; 1 when stored."""
        state = HostState.of(host)
        state.note_attempt(timezone.now())
        kinds = self.challenge_kinds(host, state)
        log.info("Ordering a certificate for host '%s' (%s) from %s, with %s.",
                 host.name, ", ".join(names), settings.ACME_DIRECTORY, " or ".join(kinds))
        key_pem, csr_pem = protocol.new_key_and_csr(names)
        self.keep_lease()
        order = acme.new_order(csr_pem)
        state.order_uri = order.uri or ""
        state.save(update_fields=["order_uri", "updated_at"])
        answers = self.choose_challenges(order, kinds)
        if answers:
            revision = self.publish(host, acme, answers)
            self.wait_for_nodes(revision)
            self.keep_lease()
            jwk = acme.net.key
            assert jwk is not None
            for _, challb in answers:
                acme.answer_challenge(challb, challb.chall.response(jwk))
            order = self.poll_authorizations(acme, order)
        self.keep_lease()
        deadline = dt.datetime.now() + dt.timedelta(seconds=self.validation_wait)
        order = acme.finalize_order(order, deadline)
        self.keep_lease()
        cert = self.store(host, state, key_pem, order.fullchain_pem, acme)
        log.info("Stored the certificate '%s' for host '%s' (%s), issued by %s, valid until %s; "
                 "renewal from %s.", cert.name, host.name, ", ".join(cert.sans), cert.issuer,
                 f"{cert.not_after:%Y-%m-%d %H:%M} UTC", f"{state.next_attempt:%Y-%m-%d %H:%M} UTC")
        return 1

    def challenge_kinds(self, host: Host, state: HostState) -> list[str]:
        """The challenge kinds to use, most preferred first.

        "Either" starts with tls-alpn-01 (it needs only the HTTPS listener, which every
        host has) and alternates with http-01 after each failure.
        """
        if host.acme != Host.Acme.ANY:
            return [host.acme]
        kinds = ["tls-alpn-01", "http-01"]
        return kinds if state.failures % 2 == 0 else kinds[::-1]

    def choose_challenges(
        self, order: messages.OrderResource, kinds: list[str]
    ) -> list[tuple[str, messages.ChallengeBody]]:
        """(name, challenge) for every name the CA has yet to validate."""
        answers = []
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # the CA remembers an earlier validation of this name
            challb = protocol.pick_challenge(authzr, kinds)
            if challb is None:
                raise OrderFailed(f"the CA offers no {' or '.join(kinds)} challenge for "
                                  f"{authzr.body.identifier.value}")
            answers.append((authzr.body.identifier.value, challb))
        return answers

    def publish(
        self, host: Host, acme: ClientV2, answers: list[tuple[str, messages.ChallengeBody]]
    ) -> int:
        """Put the challenges in the configuration (one revision); that revision."""
        jwk = acme.net.key
        assert jwk is not None
        rows = []
        for name, challb in answers:
            rows.append(Challenge(host=host, kind=challb.chall.typ, name=name,
                                  token=challb.chall.encode("token"),
                                  key_authorization=challb.chall.key_authorization(jwk)))
        with transaction.atomic():
            Challenge.objects.filter(host=host).delete()
            Challenge.objects.bulk_create(rows)
            revision = ConfigRevision.objects.create(
                actor=ACTOR, summary=f"published the ACME challenges of host '{host.name}' "
                                     f"({', '.join(r.kind + ' ' + r.name for r in rows)})",
            )
        log.info("Published %d ACME challenge(s) for host '%s' in config revision %d.",
                 len(rows), host.name, revision.pk)
        return revision.pk

    def wait_for_nodes(self, revision: int) -> None:
        """Return once every online proxy node serves ``revision``; fail after ``node_wait`` s."""
        started = time.monotonic()
        while True:
            now = timezone.now()
            online = [n for n in ProxyNode.objects.all() if n.status_at(now) == ProxyNode.Status.ONLINE]
            lagging = [n for n in online if (n.applied_revision or 0) < revision]
            waited = time.monotonic() - started
            if not lagging and (online or waited >= UNLINKED_NODES_GRACE):
                if online:
                    log.info("Every online proxy node (%s) serves config revision %d after %.1f s.",
                             ", ".join(n.name for n in online), revision, waited)
                return
            if waited >= self.node_wait:
                raise OrderFailed("; ".join(self.lagging_text(n, revision) for n in lagging)
                                  + f" after {self.node_wait:g} s; the CA was not asked to validate")
            self.keep_lease()
            time.sleep(0.1)

    def lagging_text(self, node: ProxyNode, revision: int) -> str:
        text = (f"proxy node '{node.name}' has not applied config revision {revision} "
                f"(it serves {node.applied_revision if node.applied_revision is not None else 'none'})")
        if node.last_error:
            text += f", it rejected revision {node.last_error_revision}: {node.last_error}"
        return text

    def poll_authorizations(self, acme: ClientV2, order: messages.OrderResource) -> messages.OrderResource:
        """Wait until the CA has decided on every name; fail with its words if it refused one."""
        deadline = time.monotonic() + self.validation_wait
        pending = list(order.authorizations)
        done: list[messages.AuthorizationResource] = []
        while pending:
            self.keep_lease()
            for authzr in list(pending):
                updated, _ = acme.poll(authzr)
                if updated.body.status != messages.STATUS_PENDING:
                    pending.remove(authzr)
                    done.append(updated)
            if pending:
                if time.monotonic() > deadline:
                    raise OrderFailed(f"the CA had not validated {len(pending)} name(s) after "
                                      f"{self.validation_wait:g} s")
                time.sleep(0.25)
        failed = [a for a in done if a.body.status != messages.STATUS_VALID]
        if failed:
            raise OrderFailed("; ".join(protocol.authorization_error(a) for a in failed))
        return order.update(authorizations=done)

    def store(
        self, host: Host, state: HostState, key_pem: bytes, fullchain_pem: str, acme: ClientV2
    ) -> Certificate:
        """Store the chain, attach it to the host and remove its challenges: one revision."""
        inspected = pki.inspect_upload(chain_pem=fullchain_pem.encode("ascii"), key_pem=key_pem,
                                       now=timezone.now(), allow_incomplete=True)
        leaf = inspected.leaf
        renew_at = renewal_time(leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        suggested, ask_again = protocol.renewal_info(acme, inspected.chain_pem)
        with transaction.atomic(), revisions.revision_batch(ACTOR):
            current = host.certificate
            replace = (current is not None and current.source == Certificate.Source.ACME
                       and list(current.hosts.values_list("pk", flat=True)) == [host.pk])
            cert = current if replace and current is not None else Certificate(
                name=self.certificate_name(host), source=Certificate.Source.ACME)
            previous = current if current is not None and not replace else None
            cert.set_inspected(inspected)
            cert.save()
            if host.certificate_id != cert.pk:
                host.certificate = cert
                host.save(update_fields=["certificate"])
            Challenge.objects.filter(host=host).delete()
            revisions.record_change(f"removed the ACME challenges of host '{host.name}'")
            state.ari_next_check = ask_again
            state.note_issued(cert, suggested or renew_at)
        if previous is not None and previous.source == Certificate.Source.ACME:
            self.delete_if_unused(previous)
        return cert

    def certificate_name(self, host: Host) -> str:
        limit = Certificate._meta.get_field("name").max_length or 200
        name, n = host.name[: limit - 9] + " (ACME)", 1
        while Certificate.objects.filter(name=name).exists():
            n += 1
            name = host.name[: limit - 12] + f" (ACME {n})"
        return name

    def delete_if_unused(self, cert: Certificate) -> None:
        try:
            cert.delete()
        except ProtectedError:
            return  # still a default certificate or an upstream's client certificate
        log.info("Deleted the certificate '%s', which no host uses any more.", cert.name)

    def fail(self, host: Host, exc: Exception) -> None:
        text = protocol.problem_text(exc)
        state = HostState.of(host)
        state.note_failure(text, timezone.now())
        if Challenge.objects.filter(host=host).exists():
            with transaction.atomic():
                Challenge.objects.filter(host=host).delete()
                ConfigRevision.objects.create(
                    actor=ACTOR, summary=f"removed the ACME challenges of host '{host.name}' (failed order)"
                )
        known = isinstance(exc, OrderFailed | messages.Error) or type(exc).__module__.startswith("acme")
        log.log(logging.WARNING if known else logging.ERROR,
                "The certificate order for host '%s' failed (attempt %d): %s. Next attempt at %s.",
                host.name, state.failures, text, f"{state.next_attempt:%Y-%m-%d %H:%M:%S} UTC",
                exc_info=not known)

    def check_renewal_info(self, acme: ClientV2) -> None:
        """RFC 9773: move valid hosts' renewal to the CA's suggested window when it offers one."""
        now = timezone.now()
        states = HostState.objects.filter(
            status=HostState.Status.VALID, ari_next_check__lte=now, certificate__isnull=False
        ).select_related("certificate", "host")
        if not protocol.offers_renewal_info(acme):
            # Asked again when the directory may have changed, not at every pass.
            states.update(ari_next_check=now + protocol.NO_RENEWAL_INFO_RECHECK)
            return
        for state in states:
            assert state.certificate is not None
            suggested, ask_again = protocol.renewal_info(acme, state.certificate.chain_pem)
            state.ari_next_check = ask_again
            if suggested is not None and suggested != state.next_attempt:
                log.info("The CA suggests renewing the certificate of host '%s' at %s.",
                         state.host.name, f"{suggested:%Y-%m-%d %H:%M} UTC")
                state.next_attempt = suggested
            state.save(update_fields=["ari_next_check", "next_attempt", "updated_at"])


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
