"""bench_quality's work, each piece cached under --work and skipped on a rerun: the stores, the distillation
runs (each in a child process), the real-image baselines and every evaluation cell; the reference rows."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_quality_plan import (ABLATION_STEPS, AUGS, DISTILL_BACKBONES, EVAL_BACKBONES, IMAGE_SIZE, SEEDS,
                                           SHORT, STORE_VIEWS, TRAIN_PER_CLASS, Run)
from benchmarks.common import FASHION_MNIST_STORE, fashion_mnist_store
from benchmarks.harness import distill_unless_done, run_finished
from engine.distill.outdir import IMAGES_DIR, METRICS_FILE
from featurestore.runtime import atomic_write_json


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
