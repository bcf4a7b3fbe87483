"""Benchmark: what distilled sets are worth with the defaults, at several step budgets, on the distillation
backbone and on the others (issues 12 and 14).

Fashion-MNIST (the Debian package dataset-fashion-mnist): 500 train images per class, the whole 10k test
split, 112 px; distillation backbones efficientnet-lite0 and dinov2-vits14-imgfocus in turn, evaluation on
both plus opennsfw-resnet50 (held out: never a distillation backbone); ipc 1, `--augs 2` (a CPU budget;
the authors use 10), every other option at its default (the init as `engine distill` defaults it, recorded in each run), 5 probe seeds.

- the curve: LGM and CLP at 200 to 2000 steps (CURVE below) beside random, centroid, neighbors and the
  full-data probe, with the wall time of each run;
- ablations at 400 steps, one change each against the curve's lgm-effnet-400, every set evaluated on all
  three backbones: the fixes of issue 14 reverted, and the transfer choices of issue 12 (no pyramid, no
  colour decorrelation, no augmentation, augmented real side);
- transfer (issue 12): a set distilled on both backbones at once (1000 steps), its time and peak memory
  against the two single-backbone runs.

Every finished run, baseline and evaluation cell is cached under --work and skipped on a rerun, so the
bench resumes after an interruption. The results (JSON + markdown + PNG) are written, atomically, when the
bench ends (an interrupted bench leaves the committed ones as they were); progress results are rewritten
under --work/progress after every run. `--budget-minutes M` makes only the runs that fit in M minutes
(plan order: what the targets need first) and lists the others.

    python -m benchmarks.bench_quality --quick     # a subset (3 runs on efficientnet-lite0)
    python -m benchmarks.bench_quality             # everything (see the README for the measured time)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_quality_plan import DISTILL_BACKBONES, EVAL_BACKBONES, SHORT, Run, plan
from benchmarks.bench_quality_report import results_name, write_all
from benchmarks.bench_quality_runs import Bench, old_probe_init, references
from benchmarks.common import RESULTS_DIR, WORK_DIR, machine_line
from benchmarks.harness import fashion_mnist_refused

# Step time of a distillation backbone set relative to efficientnet-lite0 alone (measured here: the ViT is
# 1.4-1.7x), to estimate a run not yet seen under --budget-minutes.
STEP_COST = {"effnet": 1.0, "dinov2": 1.5, "effnet+dinov2": 2.5}


def estimated_seconds(bench: Bench, run: Run, rows: list[dict[str, Any]], eval_seconds: float) -> float | None:
    """Seconds a run will take (its views store if not built, distill, its evaluation), from the step times of
    the runs made so far; 0 for a run already made."""
    if bench.done(run):
        return 0.0
    build = 0.0
    if run.store.startswith("views") and f"build seconds|train|{run.store}" not in bench.cache:
        build = int(run.store.removeprefix("views")) * (bench.cache.get("build seconds|train|views1") or 120.0)
    source = "+".join(SHORT[b] for b in run.options["backbone"])
    per_step = [r["seconds_per_step"] / STEP_COST.get(r["distilled_on"], 1.0) * STEP_COST.get(source, 1.0)
                for r in rows if r["distilled_on"] == source] or \
               [r["seconds_per_step"] / STEP_COST.get(r["distilled_on"], 1.0) * STEP_COST.get(source, 1.0) for r in rows]
    return None if not per_step else build + max(per_step) * run.options["steps"] + eval_seconds


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Stores, references, then the runs in plan order (with --budget-minutes: those whose estimated time
    fits in what is left). Progress results are rewritten under --work after each run; the results in
    --out-dir only at the end."""
    bench = Bench(args.work, args.data_root, args.device, args.quick)
    started = time.perf_counter()
    bench.build_stores()
    eval_backbones = DISTILL_BACKBONES if args.quick else EVAL_BACKBONES
    runs = plan(args.quick)
    if args.runs:
        unknown = sorted(set(args.runs) - {run.name for run in runs})
        if unknown:
            raise SystemExit(f"error: no run named {', '.join(unknown)} in the plan (--runs); "
                             f"the plan: {', '.join(run.name for run in runs)}")
        runs = [run for run in runs if run.name in args.runs]
    rows: list[dict[str, Any]] = []
    not_run: list[str] = []
    failed: dict[str, str] = {}
    eval_seconds = 180.0  # until one is measured
    for index, run in enumerate(runs):
        payload = collect(bench, args, eval_backbones, rows, not_run + [r.name for r in runs[index:]], failed, started)
        write_all(payload, args, args.work / "progress")
        if args.budget_minutes is not None:
            left = args.budget_minutes * 60 - (time.perf_counter() - started)
            estimate = estimated_seconds(bench, run, rows, eval_seconds)
            if not bench.done(run) and (left <= 0 or (estimate is not None and estimate > left)):
                bench.log(f"skip {run.name}: about {0 if estimate is None else estimate / 60:.0f} min, "
                          f"{max(left, 0) / 60:.0f} min of --budget-minutes left")
                not_run.append(run.name)
                continue
        try:
            info = bench.distill(run)
        except RuntimeError as err:
            bench.log(f"{run.name} FAILED: {err}")
            failed[run.name] = str(err)
            continue
        row = {"set": run.name, "group": run.group, "distilled_on": "+".join(SHORT[b] for b in run.options["backbone"]),
               "method": run.options.get("method", "lgm"), "steps": run.options["steps"],
               "options": {k: v for k, v in run.options.items() if k not in ("backbone", "method", "steps")},
               "store": run.store, **info}
        eval_started = time.perf_counter()
        for backbone in eval_backbones:
            row[SHORT[backbone]] = bench.evaluate(run.name, info["path"], backbone)
        if time.perf_counter() - eval_started > 10:  # measured, not read from the cache
            eval_seconds = time.perf_counter() - eval_started
        rows.append(row)
    payload = collect(bench, args, eval_backbones, rows, not_run, failed, started)
    write_all(payload, args, args.work / "progress")
    committed = args.out_dir / f"{results_name(args)}.json"
    held = len(json.loads(committed.read_text()).get("rows", [])) if committed.is_file() else 0
    if args.runs:
        bench.log(f"--runs: results in {args.work / 'progress'} only; a bench without --runs gathers every run made")
    elif (not_run or failed) and held > len(rows):
        bench.log(f"{committed} holds {held} runs, this bench {len(rows)}: left as it is; these results are in "
                  f"{args.work / 'progress'} (a rerun continues the runs not made)")
    else:
        write_all(payload, args, args.out_dir)
    return payload


def collect(bench: Bench, args: argparse.Namespace, eval_backbones: tuple[str, ...], rows: list[dict[str, Any]],
            not_run: list[str], failed: dict[str, str], started: float) -> dict[str, Any]:
    bench.view_timings()
    return {"rows": rows, "references": references(bench, args, eval_backbones, rows),
            "old_probe_init": old_probe_init(bench, args, rows),
            "eval_backbones": [SHORT[b] for b in eval_backbones], "timings": bench.timings,
            "wall_seconds": round(time.perf_counter() - started, 1), "quick": args.quick,
            "budget_minutes": args.budget_minutes, "not_run": not_run, "failed": failed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset (efficientnet-lite0, 200/400 steps)")
    parser.add_argument("--work", type=Path, default=WORK_DIR / "quality",
                        help="cached stores, runs and evaluations (reused by a rerun)")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", nargs="+", default=None, metavar="NAME",
                        help="only these runs of the plan (a second process may share --work: the cache merges)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="start a run only while its estimated time fits in what is left of this budget; "
                             "the results list the runs not made (a rerun continues them)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if fashion_mnist_refused(args.data_root):
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    payload = run_bench(args)
    print(f"wrote {results_name(args)}.json/.md/.png under {args.out_dir} ({payload['wall_seconds'] / 60:.0f} min; "
          f"{machine_line()})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
