"""Run one proxycore node for the benchmark, without Django: a Snapshot built from files.

    python bench/launch_proxycore.py --cert C --key K --https-port P --backend-port B \
        [--access-log FILE]

One host (``localhost``) with the bench certificate (also the default certificate),
an HSTS policy, one upstream target on 127.0.0.1:B, the HTTP listener on an
ephemeral port, the product's default limits, uvloop. The access log, when asked
for, is written the way ``manage.py runproxy --access-log FILE`` writes it: one
line per request, through the same once-a-second buffer. Prints ``ready <https port>``
once listening; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import signal
import sys
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop
from cryptography import x509

from proxycore import config as core
from proxycore.accesslog import AccessLogWriter
from proxycore.limits import Limits
from proxycore.server import ProxyNode
from proxycore.workers import NodeSupervisor

HSTS_MAX_AGE = 31536000


def certificate_bundle(cert_path: Path, key_path: Path) -> core.CertificateBundle:
    chain_pem = cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(chain_pem)
    return core.CertificateBundle(
        name="bench", chain_pem=chain_pem, key_pem=key_path.read_bytes(),
        fingerprint_sha256=hashlib.sha256(chain_pem).hexdigest(),
        serial=f"{cert.serial_number:x}", sans=("localhost",),
        not_after=cert.not_valid_after_utc.astimezone(dt.UTC),
    )


def bench_snapshot(bundle: core.CertificateBundle, backend_port: int) -> core.Snapshot:
    upstream = core.Upstream(name="backend", targets=(core.Target("127.0.0.1", backend_port),))
    host = core.HostRoute(
        name="bench", names=("localhost",), mode=core.Mode.HTTP, upstream=upstream,
        certificate=bundle,
        hsts=core.HSTS(max_age=HSTS_MAX_AGE, include_subdomains=True, preload=False,
                       override_upstream=True),
    )
    return core.Snapshot(revision=1, hosts=(host,), default_certificate=bundle)


async def serve_until_stopped(port: int) -> None:
    """Say ``ready <port>``, then wait for SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"ready {port}", flush=True)
    await stop.wait()


async def serve(snapshot: core.Snapshot, https_port: int, access: BinaryIO | None,
                resumption: bool = True, max_connections: int | None = None) -> None:
    writer = AccessLogWriter(access) if access is not None else None
    # Without resumption (the product's own switch): what nginx's ``ssl_session_cache off;
    # ssl_session_tickets off`` and HAProxy's ``no-tls-tickets`` + ``tune.ssl.cachesize 0`` do.
    limits = Limits(max_connections=max_connections) if max_connections else None
    node = ProxyNode(snapshot, https_address=("127.0.0.1", https_port), http_address=("127.0.0.1", 0),
                     limits=limits, access_log=writer, session_resumption=resumption)
    await node.start()
    flusher = asyncio.get_running_loop().create_task(writer.flush_every_second()) if writer else None
    await serve_until_stopped(node.https_port)
    await node.stop(1.0)
    if flusher is not None and writer is not None:
        flusher.cancel()
        writer.flush()
    print("stats " + json.dumps(node.stats.as_dict()), flush=True)


async def serve_workers(snapshot: core.Snapshot, https_port: int, access_log: Path | None,
                        resumption: bool, workers: int, max_connections: int | None) -> None:
    """The product's node of worker processes (``runproxy --workers N``), without Django."""
    limits = Limits(max_connections=max_connections) if max_connections else Limits()
    node = NodeSupervisor(snapshot, workers=workers, https_address=("127.0.0.1", https_port),
                          http_address=("127.0.0.1", 0), limits=limits,
                          access_log=str(access_log) if access_log else None, session_resumption=resumption)
    await node.start()
    await serve_until_stopped(node.listeners[0].port)
    await node.stop(1.0)
    print("stats " + json.dumps(node.as_dict()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--https-port", type=int, required=True)
    parser.add_argument("--backend-port", type=int, required=True)
    parser.add_argument("--access-log", type=Path, help="file for the access log; none: no log")
    parser.add_argument("--no-resumption", action="store_true",
                        help="issue no session tickets (full-handshake measurement)")
    parser.add_argument("--max-connections", type=int, help="the node's connection limit per listener")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes (runproxy --workers); 1: one process, as before")
    args = parser.parse_args()
    snapshot = bench_snapshot(certificate_bundle(args.cert, args.key), args.backend_port)
    if args.workers > 1:
        uvloop.run(serve_workers(snapshot, args.https_port, args.access_log, not args.no_resumption,
                                 args.workers, args.max_connections))
        return
    access = open(args.access_log, "ab") if args.access_log else None  # noqa: SIM115
    try:
        uvloop.run(serve(snapshot, args.https_port, access, not args.no_resumption, args.max_connections))
    finally:
        if access is not None:
            access.close()


if __name__ == "__main__":
    main()
