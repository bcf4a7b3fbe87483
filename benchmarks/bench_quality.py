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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (FASHION_MNIST_IMAGE_SIZE, FASHION_MNIST_STORE, FASHION_MNIST_TRAIN_PER_CLASS,
                               RESULTS_DIR, WORK_DIR, fashion_mnist_store,
                               machine_line, markdown_table, save_figure, write_results)
from benchmarks.harness import distill_unless_done, fashion_mnist_refused, run_finished
from engine.distill.outdir import IMAGES_DIR, METRICS_FILE
from featurestore.runtime import atomic_write_json

DISTILL_BACKBONES = ("efficientnet-lite0", "dinov2-vits14-imgfocus")
HELD_OUT = "opennsfw-resnet50"
EVAL_BACKBONES = (*DISTILL_BACKBONES, HELD_OUT)
SHORT = {"efficientnet-lite0": "effnet", "dinov2-vits14-imgfocus": "dinov2", HELD_OUT: "nsfw-r50"}
IMAGE_SIZE = FASHION_MNIST_IMAGE_SIZE
TRAIN_PER_CLASS = FASHION_MNIST_TRAIN_PER_CLASS
AUGS = 2
SEEDS = 5
ABLATION_STEPS = 400
# Stores of augmented real views (issue 14: views 1 / 4 / 10 against accuracy and build time); the 1-view one
# only times the build (its distillation is the curve's lgm-effnet-400, on the main store).
STORE_VIEWS = (1, 4, 10)
TRANSFER_STEPS = 1000


@dataclass
class Run:
    """One distillation: its name, its options beyond the defaults, and which curve/table it belongs to."""

    name: str
    options: dict[str, Any]
    group: str
    store: str = "main"


# Steps of the curve per (distillation backbone, objective): every budget on the cheap CNN, fewer on the ViT
# (about 1.4x the step time here); 1000 steps everywhere, the budget the targets are read at.
CURVE = {("efficientnet-lite0", "lgm"): (200, 400, 1000, 2000), ("efficientnet-lite0", "clp"): (200, 400, 1000),
         ("dinov2-vits14-imgfocus", "lgm"): (200, 400, 1000), ("dinov2-vits14-imgfocus", "clp"): (400, 1000)}
QUICK_CURVE = {("efficientnet-lite0", "lgm"): (200, 400), ("efficientnet-lite0", "clp"): (400,)}


def plan(quick: bool) -> list[Run]:
    """Every run, in the order the targets need them: the sets the targets are read at and the base of the
    ablations first, then the ablations, then the rest of the curve. Results are written after every run, so
    a bench stopped early (or given less time) leaves the most useful part measured."""
    curve = {f"{objective}-{SHORT[backbone]}-{n}": Run(f"{objective}-{SHORT[backbone]}-{n}",
                                                       {"backbone": [backbone], "method": objective, "steps": n},
                                                       "curve")
             for (backbone, objective), steps in (QUICK_CURVE if quick else CURVE).items() for n in steps}
    if quick:
        return list(curve.values())
    # One change each against lgm-effnet-400 (the curve's run), evaluated on every backbone: the fixes of
    # issue 14 reverted, and the choices issue 12 asks about for transfer (pyramid, colour decorrelation,
    # augmentation of either side).
    base = {"backbone": [DISTILL_BACKBONES[0]], "steps": ABLATION_STEPS}
    ablations = [
        Run("abl-real-batch-authors", {**base, "real_batch": AUGS * 10}, "ablation"),   # ipc * augs * C
        Run("abl-init-noise", {**base, "init": "noise"}, "ablation"),   # the authors' default init
        Run("abl-param-pixels", {**base, "param": "pixels"}, "ablation"),
        Run("abl-real-views4", {**base}, "ablation", store="views4"),
        Run("abl-no-augmentation", {**base, "augment": False}, "ablation"),
        Run("abl-colour-rgb", {**base, "colour": "rgb"}, "ablation"),
        Run("abl-no-decorrelation", {**base, "colour": "rgb", "decorrelate": False}, "ablation"),
        # Issue 14's schedule fix reverted as far as it can be: the old fixed 200 steps per level ends a
        # 400-step run at 2 px and is refused now; 50 steps per level reaches full resolution at step 350.
        Run("abl-grow-every-50", {**base, "grow_every": 50}, "ablation"),
        Run("abl-real-views10", {**base}, "ablation", store="views10"),
    ]
    first = [curve.pop(name) for name in ("lgm-effnet-400", "lgm-effnet-1000", "clp-effnet-400", "lgm-dinov2-400")]
    # Both backbones at once, at the ablation budget beside the two single-backbone 400-step sets (cheap
    # enough to come early), and at the budget the targets are read at.
    both = [Run(f"both-{n}", {"backbone": list(DISTILL_BACKBONES), "steps": n}, "transfer")
            for n in (ABLATION_STEPS, TRANSFER_STEPS)]
    at_1000 = [curve.pop(f"{m}-{b}-1000") for m, b in (("clp", "effnet"), ("lgm", "dinov2"), ("clp", "dinov2"))]
    return (first + both[:1] + ablations[:3] + [curve.pop("clp-dinov2-400"), curve.pop("lgm-effnet-200")] + at_1000
            + both[1:] + ablations[3:] + list(curve.values()))


class Bench:
    def __init__(self, work: Path, data_root: str | None, device: str, quick: bool) -> None:
        self.work = work
        self.data_root = data_root
        self.device = device
        self.quick = quick
        self.stores = {"main": FASHION_MNIST_STORE, **{f"views{k}": work / f"fs-views{k}" for k in STORE_VIEWS}}
        self.cache_path = work / "eval-cache.json"
        self.cache: dict[str, Any] = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        self.timings: dict[str, float] = {}

    def save_cache(self) -> None:
        """Merge this process's entries into the file (another bench process may share --work: --runs)."""
        on_disk = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        self.cache = {**on_disk, **self.cache}
        atomic_write_json(self.cache_path, self.cache)

    def log(self, text: str) -> None:
        print(f"[bench_quality {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # --- stores (built once; a rerun finds them complete)
    def build_stores(self) -> None:
        backbones = EVAL_BACKBONES if not self.quick else DISTILL_BACKBONES
        self.log(f"stores: {', '.join(backbones)} (built once, found complete afterwards)")
        for backbone, seconds in fashion_mnist_store(backbones, data_root=self.data_root, device=self.device).items():
            self.timings[f"store {backbone}"] = seconds
        if not self.quick:
            self.build_views_store(1)  # only timed: its distillation is the curve's, on the main store

    def store_for(self, run: Run) -> Path:
        """The store a run reads, a views store built (and timed) the first time a run needs it."""
        if run.store.startswith("views"):
            self.build_views_store(int(run.store.removeprefix("views")))
        return self.stores[run.store]

    def build_views_store(self, views: int) -> None:
        """The train split with `views` stored views per image (distillation reads only train), timed: the
        build time is half of the views trade-off. A store found already built has no time to report."""
        from featurestore.build import build

        store, backbone = self.stores[f"views{views}"], DISTILL_BACKBONES[0]
        key = f"build seconds|train|views{views}"
        if key not in self.cache:
            self.log(f"store of the train split with {views} view(s) per image: {store}")
            split = store / backbone / "train"
            if split.exists() and not _complete(split):
                import shutil

                shutil.rmtree(store)  # a build cut short: start it again, so the whole build is timed
            existed = split.exists()
            started = time.perf_counter()
            build("fashion-mnist", backbone, store, splits=["train"], limit_per_class=TRAIN_PER_CLASS, views=views,
                  data_root=self.data_root, image_size=IMAGE_SIZE, device=self.device, quiet=True)
            self.cache[key] = None if existed else round(time.perf_counter() - started, 1)
            self.save_cache()
        self.timings[f"build train split, {views} view(s) (s)"] = self.cache[key]

    def view_timings(self) -> None:
        for views in () if self.quick else STORE_VIEWS:
            self.timings[f"build train split, {views} view(s) (s)"] = self.cache.get(f"build seconds|train|views{views}")

    # --- distillation runs and baselines (each a directory; done when its outputs exist)
    def run_dir(self, run: Run) -> Path:
        return self.work / "runs" / run.name

    def done(self, run: Run) -> bool:
        return run_finished(self.run_dir(run))

    def distill(self, run: Run) -> dict[str, Any]:
        """One distillation in a child process, so its peak memory is its own (not the bench's high-water
        mark) and a failing run is reported without ending the bench (RuntimeError with its last line)."""
        out = self.run_dir(run)
        if not self.done(run):
            self.log(f"distill {run.name}: {run.options}")
            distill_unless_done(out, {"store": str(self.store_for(run)), "augs": AUGS, "device": self.device,
                                      "quiet": True, **run.options}, isolated=True)
        metrics = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
        steps = [m for m in metrics if "loss" in m]
        return {"path": str(out / IMAGES_DIR), "seconds": steps[-1]["seconds"], "final_loss": steps[-1]["loss"],
                "peak_memory_mb": max(m["peak_memory_mb"] for m in steps),
                "seconds_per_step": steps[-1]["seconds"] / len(steps)}

    def baseline(self, kind: str, backbone: str, images: str | None = None) -> str:
        from engine.baselines import make_baseline

        out = self.work / "baselines" / f"{kind}-{SHORT[backbone]}"
        if not (out / "baseline.json").is_file():
            self.log(f"baseline {kind} on {backbone}")
            make_baseline(str(self.stores["main"]), backbone, kind, out, images=images, device=self.device, quiet=True)
        return str(out / IMAGES_DIR)

    # --- evaluation, cell by cell (cached)
    def evaluate(self, name: str, path: str, backbone: str) -> dict[str, Any]:
        from engine.evaluate import evaluate

        key = f"{path}|{backbone}|seeds{SEEDS}"
        if key not in self.cache:
            self.log(f"eval {name} on {backbone}")
            result = evaluate(str(self.stores["main"]), {name: path}, [backbone], seeds=SEEDS, device=self.device,
                              quiet=True)
            self.cache[key] = result.rows[name][backbone].to_json()
            self.save_cache()
        return self.cache[key]

    def evaluate_full(self, backbone: str) -> dict[str, Any]:
        from engine.evaluate import evaluate_full

        key = f"full|{backbone}|seeds{SEEDS}"
        if key not in self.cache:
            self.log(f"full-data probe on {backbone}")
            self.cache[key] = evaluate_full(str(self.stores["main"]), backbone, seeds=SEEDS, device=self.device,
                                            quiet=True).to_json()
            self.save_cache()
        return self.cache[key]


def _complete(split: Path) -> bool:
    """Whether a store split's build finished (its group attributes say so)."""
    try:
        return bool(json.loads((split / "zarr.json").read_text()).get("attributes", {}).get("complete"))
    except (OSError, ValueError):
        return False


def _cell(result: dict[str, Any] | None) -> str:
    return "-" if result is None else f"{result['top1_mean']:.1f} ± {result['top1_std']:.1f}"


def _mean(result: dict[str, Any] | None) -> float | None:
    return None if result is None else round(result["top1_mean"], 2)


def references(bench: Bench, args: argparse.Namespace, eval_backbones: tuple[str, ...],
               rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    refs: list[dict[str, Any]] = []
    for kind in ("random", "centroid"):
        for source in (DISTILL_BACKBONES[:1] if kind == "random" or args.quick else DISTILL_BACKBONES):
            path = bench.baseline(kind, source)
            ref = {"set": kind if kind == "random" else f"centroid ({SHORT[source]})", "made_with": SHORT[source]}
            for backbone in eval_backbones:
                ref[SHORT[backbone]] = bench.evaluate(ref["set"], path, backbone)
            refs.append(ref)
    lgm_1000 = next((r for r in rows if r["set"] == f"lgm-{SHORT[DISTILL_BACKBONES[0]]}-1000"), None)
    if lgm_1000 is not None:
        path = bench.baseline("neighbors", DISTILL_BACKBONES[0], images=lgm_1000["path"])
        ref = {"set": "neighbors (of lgm-effnet-1000)", "made_with": SHORT[DISTILL_BACKBONES[0]]}
        for backbone in eval_backbones:
            ref[SHORT[backbone]] = bench.evaluate(ref["set"], path, backbone)
        refs.append(ref)
    refs.append({"set": "full data", **{SHORT[b]: bench.evaluate_full(b) for b in eval_backbones}})
    return refs


def old_probe_init(bench: Bench, args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fix of the evaluation itself, reverted: the 400-step set and a baseline under the old probe init."""
    from engine.evaluate import evaluate

    base = next((r for r in rows if r["set"] == f"lgm-effnet-{ABLATION_STEPS}"), None)
    if args.quick or base is None:
        return {}
    result = {}
    for name, path in ((base["set"], base["path"]),
                       ("centroid (effnet)", str(args.work / "baselines" / "centroid-effnet" / IMAGES_DIR))):
        key = f"{path}|{DISTILL_BACKBONES[0]}|seeds{SEEDS}|uniform"
        if key not in bench.cache:
            bench.log(f"eval {name} on {DISTILL_BACKBONES[0]} with the uniform probe init")
            evaluated = evaluate(str(bench.stores["main"]), {name: path}, [DISTILL_BACKBONES[0]], seeds=SEEDS,
                                 device=args.device, quiet=True, probe_init="uniform")
            bench.cache[key] = evaluated.rows[name][DISTILL_BACKBONES[0]].to_json()
            bench.save_cache()
        result[name] = bench.cache[key]
    return result


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


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """The targets of issues 12 and 14 (defined at 1000 steps), read off the results at 400 and 1000 steps."""
    refs = {r["set"]: r for r in payload["references"]}
    rows = {r["set"]: r for r in payload["rows"]}
    summary: dict[str, Any] = {}
    for short in ("effnet", "dinov2"):
        full = refs["full data"].get(short)
        centroid = refs.get(f"centroid ({short})", {}).get(short)
        other = "dinov2" if short == "effnet" else "effnet"
        random_other = refs.get("random", {}).get(other)
        for objective, n in ((m, n) for n in (ABLATION_STEPS, TRANSFER_STEPS) for m in ("lgm", "clp")):
            row = rows.get(f"{objective}-{short}-{n}")
            if row is None or full is None:
                continue
            top1 = row[short]["top1_mean"]
            summary[f"{objective}-{short}-{n}"] = {
                "top1": round(top1, 2),
                "vs centroid (target >= +5)": None if centroid is None else round(top1 - centroid["top1_mean"], 2),
                "fraction of full (target >= 0.85)": round(top1 / full["top1_mean"], 3),
                f"on {other} vs random (target >= +3, goal +5)": None if random_other is None or other not in row
                else round(row[other]["top1_mean"] - random_other["top1_mean"], 2)}
    for n in (ABLATION_STEPS, TRANSFER_STEPS):
        both = rows.get(f"both-{n}")
        if both is None:
            continue
        entry = summary[f"both-{n}"] = {}
        for short in ("effnet", "dinov2"):
            single = rows.get(f"lgm-{short}-{n}")
            centroid = refs.get(f"centroid ({short})", {}).get(short)
            entry[short] = {
                "top1": round(both[short]["top1_mean"], 2),
                "vs centroid (target >= 0)": None if centroid is None else round(both[short]["top1_mean"] - centroid["top1_mean"], 2),
                "vs single-backbone set (target >= -3)": None if single is None else round(both[short]["top1_mean"] - single[short]["top1_mean"], 2)}
        singles = [rows.get(f"lgm-{s}-{n}") for s in ("effnet", "dinov2")]
        if all(singles):
            entry["time vs sum of single runs"] = round(both["seconds"] / sum(s["seconds"] for s in singles), 3)
            entry["peak memory vs sum of single runs"] = round(
                both["peak_memory_mb"] / sum(s["peak_memory_mb"] for s in singles), 3)
            entry["peak memory vs larger single run"] = round(
                both["peak_memory_mb"] / max(s["peak_memory_mb"] for s in singles), 3)
    return summary


def to_markdown(payload: dict[str, Any]) -> str:
    cols = payload["eval_backbones"]
    text = [f"Fashion-MNIST, {TRAIN_PER_CLASS} train images per class, the whole test split, {IMAGE_SIZE} px; ipc 1, "
            f"--augs {AUGS}, every other option at its default (the results record the init; before 2026-12-06 the default was --init zero); top-1 % (mean ± std over {SEEDS} probe "
            f"seeds) on each evaluation backbone ({HELD_OUT} is never a distillation backbone). Wall time of the "
            f"last invocation (work cached by an earlier one not counted): {payload['wall_seconds'] / 60:.0f} min"
            f"{' (--quick)' if payload['quick'] else ''}.\n"]
    if payload.get("not_run"):
        budget = payload.get("budget_minutes")
        text.append(f"**Not every run of the plan was made**{f' (--budget-minutes {budget})' if budget else ''}: "
                    f"{', '.join(payload['not_run'])}. A rerun reuses everything made and continues.\n")
    if payload.get("failed"):
        text.append("**Failed runs**: " + "; ".join(f"{k}: {v}" for k, v in payload["failed"].items()) + "\n")
    for group, title in (("curve", "Accuracy vs steps"), ("ablation", f"Ablations at {ABLATION_STEPS} steps "
                                                                     f"(efficientnet-lite0, LGM): one change each against lgm-effnet-400 (abl-no-decorrelation "
                                                                     f"is rgb too: read it against abl-colour-rgb; grey images have no colour to decorrelate)"),
                         ("transfer", "Distilled on both backbones at once")):
        rows = [r for r in payload["rows"] if r["group"] == group]
        if not rows:
            continue
        if group == "ablation":  # the base of the ablations first
            rows = [r for r in payload["rows"] if r["set"] == f"lgm-effnet-{ABLATION_STEPS}"] + rows
        table = [{"set": r["set"], "distilled on": r["distilled_on"], "method": r["method"], "steps": r["steps"],
                  "options": ", ".join(f"{k}={v}" for k, v in r["options"].items()) + (f" ({r['store']} store)" if r["store"] != "main" else ""),
                  **{c: _cell(r.get(c)) for c in cols}, "s/step": round(r["seconds_per_step"], 3),
                  "distill s": round(r["seconds"]), "peak MB": round(r["peak_memory_mb"])} for r in rows]
        text.append(f"### {title}\n\n" + markdown_table(table))
    views_rows = []
    for views in () if payload["quick"] else STORE_VIEWS:
        name = f"lgm-effnet-{ABLATION_STEPS}" if views == 1 else f"abl-real-views{views}"
        row = next((r for r in payload["rows"] if r["set"] == name), None)
        if row is not None:
            views_rows.append({"stored views": views, "set": name,
                               "train-split build (s)": payload["timings"].get(f"build train split, {views} view(s) (s)"),
                               **{c: _cell(row.get(c)) for c in cols}})
    if views_rows:
        text.append("### Real-side views: build time vs accuracy (efficientnet-lite0, 400 steps)\n\n"
                    "Build: the train split (5000 images) through efficientnet-lite0 once per view, on this "
                    "machine while the bench's other work ran; `None` = the store was found built.\n\n"
                    + markdown_table(views_rows))
    refs = [{"set": r["set"], **{c: _cell(r.get(c)) for c in cols}} for r in payload["references"]]
    text.append("### Real-image references\n\n" + markdown_table(refs))
    if payload.get("old_probe_init"):
        text.append("### The evaluation fix reverted (PyTorch's uniform probe init), on efficientnet-lite0\n\n"
                    + markdown_table([{"set": k, "uniform init": _cell(v)} for k, v in payload["old_probe_init"].items()]))
    text.append("### Targets\n\n```json\n" + json.dumps(payload["summary"], indent=2) + "\n```\n")
    text.append("![accuracy vs steps](bench_quality.png)\n")
    return "\n".join(text)


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    curve = [r for r in payload["rows"] if r["group"] == "curve"]
    sources = sorted({r["distilled_on"] for r in curve}) or ["effnet"]  # no run yet: the references alone
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4), squeeze=False)
    refs = {r["set"]: r for r in payload["references"]}
    for ax, source in zip(axes[0], sources):
        for objective, marker in (("lgm", "o"), ("clp", "s")):
            points = sorted((r["steps"], r) for r in curve if r["distilled_on"] == source and r["method"] == objective)
            for evaluated, colour in zip(payload["eval_backbones"], ("tab:blue", "tab:orange", "tab:green")):
                if points:
                    ax.plot([s for s, _ in points], [r[evaluated]["top1_mean"] for _, r in points], marker=marker,
                            color=colour, ls="-" if objective == "lgm" else "--",
                            label=f"{objective.upper()} on {evaluated}")
        for name, ls in (("random", ":"), (f"centroid ({source})", "-."), ("full data", "-")):
            if name in refs and source in refs[name]:
                ax.axhline(refs[name][source]["top1_mean"], color="grey", ls=ls, lw=1, label=f"{name} on {source}")
        ax.set_xscale("log")
        ax.set_xlabel("steps")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"distilled on {source} (1 image/class, --augs {AUGS})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def results_name(args: argparse.Namespace) -> str:
    return "bench_quality_quick" if args.quick else "bench_quality"


def write_all(payload: dict[str, Any], args: argparse.Namespace, out_dir: Path) -> None:
    """JSON + markdown + PNG of what is measured so far (each file atomically)."""
    payload["summary"] = summarize(payload)
    name = results_name(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(payload, out_dir / f"{name}.png")
    write_results(name, payload, to_markdown(payload).replace("bench_quality.png", f"{name}.png"), out_dir)


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
