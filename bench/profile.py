"""Profile proxycore under the keep-alive load, without nginx or HAProxy beside it.

    python bench/profile.py                       # req/s and CPU us/request, 3 runs
    python bench/profile.py --cprofile out.prof   # the node under cProfile (slower; call counts)
    python bench/profile.py --py-spy out.svg      # the node under py-spy record (sampling)
    python bench/profile.py --access-log          # with the access log on

Starts the shared backend (nginx, 1 worker) and one proxycore node as bench/run.py
does, then runs ``wrk -t1 -c50`` against ``/small`` (or ``--path``) and prints
requests/s and the node's CPU time per request. CPU per request is the figure to
compare between two versions of the code: it moves far less with machine noise
than requests/s.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.certs import make_certificates
from bench.load import LOADS, run_wrk, warm_up
from bench.servers import BENCH_DIR, _start, free_port, start_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--load", choices=[load.key for load in LOADS], default="keepalive")
    parser.add_argument("--access-log", action="store_true")
    tool = parser.add_mutually_exclusive_group()
    tool.add_argument("--cprofile", type=Path, help="write cProfile stats here")
    tool.add_argument("--py-spy", type=Path,
                      help="write a py-spy flame graph here (SVG; a .txt name: collapsed stacks)")
    parser.add_argument("--proxy-command", help="run this instead of launch_proxycore.py "
                        "(gets --cert --key --https-port --backend-port)")
    args = parser.parse_args()
    load = next(load for load in LOADS if load.key == args.load)
    with tempfile.TemporaryDirectory(prefix="proxyprof-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers (not root) read the static files under it
        certs = make_certificates(workdir)
        backend = start_backend(workdir)
        port = free_port()
        default = [str(BENCH_DIR / "launch_proxycore.py")]
        launcher = args.proxy_command.split() if args.proxy_command else default
        argv = [*launcher, "--cert", str(certs.chain), "--key", str(certs.key),
                "--https-port", str(port), "--backend-port", str(backend.port)]
        if args.access_log:
            argv += ["--access-log", str(workdir / "access.log")]
        if args.cprofile:
            argv = [sys.executable, "-m", "cProfile", "-o", str(args.cprofile.resolve()), *argv]
        elif args.py_spy:
            fmt = "raw" if args.py_spy.suffix == ".txt" else "flamegraph"
            native = [] if os.environ.get("PROFILE_NO_NATIVE") else ["--native"]
            argv = ["py-spy", "record", "--rate", "500", *native, "-f", fmt,
                    "-o", str(args.py_spy.resolve()), "--", sys.executable, *argv]
        elif argv[0].endswith(".py"):
            argv = [sys.executable, *argv]
        proxy = _start(workdir, "proxy", "proxy", port, argv)
        try:
            warm_up(proxy, load, 1.0)
            for _ in range(args.runs):
                result = run_wrk(proxy, load, args.duration, backend)
                print(f"{result.per_second:9.0f} req/s  {result.megabytes_per_second:8.1f} MB/s  "
                      f"{result.cpu_us_per_request:6.1f} us/req  errors {sum(result.errors.values())}"
                      f" non-2xx {result.non_2xx}", flush=True)
        finally:
            if args.py_spy:  # py-spy writes its output on SIGINT (and passes it on)
                proxy.proc.send_signal(signal.SIGINT)
                proxy.proc.wait(30)
            output = proxy.stop()
            print(output[-2000:] if args.cprofile or args.py_spy else "", end="")
            backend.stop()


if __name__ == "__main__":
    main()
