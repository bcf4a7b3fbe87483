"""`make bench`: every benchmark at its default size (~27 minutes in all on 2 CPU cores; bench_real_scale alone
took 9.5 min on a shared, busy machine and needs ~2.7 GB of temp disk and ~6 GB of memory at a time).

Each writes JSON + markdown (and PNG where there is a curve) to benchmarks/results/, stamped with the
machine. On a GPU box run the modules directly with larger flags (see each module's --help).
"""

from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = [
    ["benchmarks.bench_kernel"],
    ["benchmarks.bench_build", "--per-class", "100"],
    ["benchmarks.bench_distill"],
    ["benchmarks.bench_real_scale"],
]


def main() -> int:
    failed = []
    for cmd in BENCHMARKS:
        print(f"\n==> python -m {' '.join(cmd)}", file=sys.stderr, flush=True)
        t = time.time()
        done = subprocess.run([sys.executable, "-m", *cmd])
        print(f"    {cmd[0]}: exit {done.returncode} after {time.time() - t:.0f} s", file=sys.stderr, flush=True)
        if done.returncode != 0:
            failed.append(cmd[0])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("results in benchmarks/results/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
