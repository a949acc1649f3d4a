"""What an access list of 1,000 CIDRs and a rate limit cost per keep-alive request.

    python bench/access_cost.py [--low 2000] [--high 12000]

Runs ``bench/hotpath.py`` under callgrind with and without ``--guarded`` (the host gets
an access list of 1,000 CIDRs and a rate limit that is never reached), each at two
request counts, and prints the instructions per request of each (the difference of the
two totals over the requests between them: start-up and warm-up cancel out) and the
ratio. Instruction counts do not depend on what else the shared machine is doing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HOTPATH = Path(__file__).resolve().parent / "hotpath.py"


def instructions(requests: int, guarded: bool) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
               sys.executable, str(HOTPATH), "--requests", str(requests)]
    if guarded:
        command.append("--guarded")
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"no callgrind total in:\n{done.stderr}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=2000)
    parser.add_argument("--high", type=int, default=12000)
    args = parser.parse_args()
    per_request = {}
    for guarded in (False, True):
        low, high = instructions(args.low, guarded), instructions(args.high, guarded)
        per_request[guarded] = (high - low) / (args.high - args.low)
        label = "1,000 CIDRs + rate limit" if guarded else "no access list, no limit"
        print(f"{label:>26}: {per_request[guarded]:,.0f} instructions/request")
    print(f"{'cost':>26}: {(per_request[True] / per_request[False] - 1) * 100:+.1f} %")


if __name__ == "__main__":
    main()
