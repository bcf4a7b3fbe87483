"""`make bench`: the engine's benchmarks at their default size (bench_quality has its own `make bench-quality`).
bench_real_scale needs ~2.7 GB of temp disk and ~6 GB of memory at a time.

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
    ["benchmarks.bench_time_to_accuracy"],  # needs Fashion-MNIST (the Debian package)
]
NEEDS_FASHION_MNIST = {"benchmarks.bench_time_to_accuracy"}


def main() -> int:
    from benchmarks.common import fashion_mnist_missing

    missing = fashion_mnist_missing()
    have_fashion_mnist = missing is None
    if missing:
        print(f"note: {missing}; the benchmarks that need it are skipped", file=sys.stderr)
    failed = []
    for cmd in BENCHMARKS:
        if cmd[0] in NEEDS_FASHION_MNIST and not have_fashion_mnist:
            print(f"\n==> skipped: python -m {' '.join(cmd)} (no Fashion-MNIST)", file=sys.stderr)
            continue
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
