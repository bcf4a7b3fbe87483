"""Store mode versus end-to-end mode of the same distillation, side by side in one benchmark run: time per
step and peak memory.

For each configuration (classes C, images per class, augmented copies) the same method, backbone,
synthetic set and step count run in these modes:
- `end-to-end`: real images are loaded, augmented and pushed through the backbone every step, the
  authors' real batch (ipc * augs * C rows), and the whole synthetic graph is kept (the authors' way:
  `--real-source images --real-batch ipc*augs*C --chunk M`);
- `default`: what `engine distill` does with its defaults (stored features; `--real-batch auto`: the
  whole split every step within the compute budget; `--chunk auto`: chunked back-propagation only when
  the kept graph would exceed the memory budget);
- `store+chunk`: stored features with chunked back-propagation forced (`--chunk 16`): the memory bound.
Each measurement runs in a fresh child process (same machine, same run), so peak RSS is that mode's
own and not the high-water mark of an earlier one. The rows with C = 100 / 300 / 1000 and one copy per
image show the step time growing linearly with the number of synthetic images. Those rows grow the
synthetic set with M, and with it the set's own memory (parameters and Adam's moments); the
store-only configuration 10x1x100 grows the copies alone, 50x over the first row's set (end-to-end is
not run there: it keeps 1000 copies' graph and 1000 real images', ~23 GB like the C = 1000 row). Accuracy per wall-clock
second is benchmarks/bench_time_to_accuracy.py's subject.

Writes benchmarks/results/bench_distill.{json,md} and bench_distill.png.
    python -m benchmarks.bench_distill                 # CPU default, ~20 min on 2 cores
    python -m benchmarks.bench_distill --size 224 --backbone dinov2-vitb14 --configs 100x1x10 1000x1x3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_line, markdown_table, save_figure, write_results
from benchmarks.harness import run_child
from engine.distill.outdir import METRICS_FILE

MODES = {
    "end-to-end": {"real_source": "images", "chunk": "full-graph", "real_batch": "authors"},
    "default": {},
    "store+chunk": {"chunk": 16},
}


def parse_config(text: str) -> tuple[int, int, int]:
    c, ipc, augs = (int(v) for v in text.lower().split("x"))
    return c, ipc, augs


def make_imagefolder(root: Path, num_classes: int, per_class: dict[str, int]) -> None:
    """Procedural class-conditional images (the `synthetic` generator) written as PNG files."""
    from PIL import Image

    from featurestore.datasets.gratings import GratingsConfig, render_grating

    cfg = GratingsConfig(num_classes=num_classes)
    for split, n in per_class.items():
        for c in range(num_classes):
            d = root / split / f"class{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = d / f"{i:04d}.png"
                if not path.exists():
                    Image.fromarray(render_grating(c, split, c * 10_000 + i, cfg)).save(path)


# Memory the synthetic set itself needs, whatever the method or the number of copies: per value of its N
# = C * ipc images' parameters, the parameters and Adam's two moments, float32 — what any Adam-based
# distillation holds (the authors' code besides holds the decoded images, their graph and the gradient;
# our step decodes pass by pass and, with one backbone in one process, updates each image as its gradient
# completes: engine.distill.backprop). It grows with C; the memory "flat in copies" is what lies above it.
def intrinsic_mb(result) -> float | None:
    """Three float32 tensors of the parameters' size (a `pixels` parameterization); None for the pyramid
    (its levels: not what this bench runs)."""
    if result.config["synthetic"]["kind"] != "pixels":
        return None
    decoded = result.images.numel()
    params = decoded // 3 if result.config["resolved"]["colour"] == "grey" else decoded
    return 3 * 4 * params / 2**20


def child(spec: dict) -> dict:
    """One measured run (in its own process): distill `steps` steps, report time/step and peak memory."""
    import torch

    from engine.distill import DistillConfig, distill
    from engine.distill.memory import current_memory_mb, peak_memory_mb, reset_peak_memory

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    # VmHWM, unlike ru_maxrss, starts afresh at exec: the parent's memory (inherited through fork) does not count.
    rss_start = current_memory_mb(cpu)
    if torch.cuda.is_available():
        reset_peak_memory(torch.device("cuda"))
    cfg = DistillConfig(**spec["config"])
    t = time.time()
    result = distill(cfg)
    wall = time.time() - t
    rows = [json.loads(line) for line in (Path(cfg.out) / METRICS_FILE).read_text().splitlines() if line]
    step_s = [r["step_seconds"] for r in rows[1:]] or [rows[0]["step_seconds"]]  # first step warms up
    peak = peak_memory_mb(cpu)
    intrinsic = intrinsic_mb(result)
    out = {"seconds_per_step": statistics.median(step_s), "wall_seconds": wall, "peak_rss_mb": peak,
           "rss_at_start_mb": rss_start, "intrinsic_mb": intrinsic,
           "above_intrinsic_mb": None if intrinsic is None else peak - intrinsic, "final_loss": result.losses[-1]}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = peak_memory_mb(torch.device("cuda"))
    return out


def run_measurement(config: dict) -> dict:
    """One measured run in a fresh child process (its peak memory its own); a failure becomes {"error": why}."""
    with tempfile.TemporaryDirectory() as tmp:
        config = dict(config, out=str(Path(tmp) / "out"))
        done = run_child([sys.executable, "-m", "benchmarks.bench_distill", "--child", json.dumps({"config": config})])
        return done.last_json() if done.ok else {"error": done.reason()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--size", type=int, default=112, help="backbone input size (px)")
    p.add_argument("--configs", nargs="+", default=["10x1x2", "10x1x10", "40x1x10", "100x1x8", "100x1x1",
                                                     "300x1x1", "1000x1x1"],
                   help="CxIPCxAUGS configurations, e.g. 10x1x4")
    p.add_argument("--store-only-configs", nargs="*", default=["10x1x100"],
                   help="configurations run in the store modes only (default, store+chunk): copies beyond "
                        "what end-to-end fits in memory")
    p.add_argument("--steps", type=int, default=2, help="measured steps per run (the first is warm-up)")
    p.add_argument("--memory-repeats", type=int, default=3,
                   help="runs of the two rows that set the memory growth figure (its median)")
    p.add_argument("--train-per-class", type=int, default=30, help="real images per class (at most 3000 in all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default=None, help="where to keep the generated images and stores")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_distill_"))
    print(f"bench_distill: {machine_line()}\nwork dir {work}", file=sys.stderr)
    configs = [(parse_config(c), list(MODES)) for c in args.configs]
    configs += [(parse_config(c), [m for m in MODES if m != "end-to-end"]) for c in args.store_only_configs]
    rows = measure(configs, build_stores([cfg for cfg, _ in configs], args, work), args)
    md = write_bench(rows, args)
    print("\n".join(md))
    return 0


def build_stores(configs: list[tuple[int, int, int]], args: argparse.Namespace, work: Path) -> dict[int, Path]:
    """One store per number of classes, of procedural images written as PNG files: C -> its store."""
    from featurestore.build import build

    stores: dict[int, Path] = {}
    for c in sorted({cfg[0] for cfg in configs}):
        data = work / f"images-{c}"
        # Enough real images for the authors' batch (ipc * augs * C), within a few thousand files.
        per_class = max(2, min(args.train_per_class, 3000 // c))
        make_imagefolder(data, c, {"train": per_class, "val": 2})
        stores[c] = work / f"fs-{c}"
        build("imagefolder", args.backbone, stores[c], data_root=data, image_size=args.size, dtype="fp32",
              device=args.device, quiet=True)
    return stores


def measure(configs: list[tuple[tuple[int, int, int], list[str]]], stores: dict[int, Path],
            args: argparse.Namespace) -> list[dict]:
    """Every configuration in each of its modes, each a measured run in its own child process; then the two
    rows that set the memory growth figure again (`remeasure_growth_ends`)."""
    rows = []
    for (c, ipc, augs), modes in configs:
        for mode in modes:
            res = measure_one(c, ipc, augs, mode, stores[c], args)
            rows.append({"C": c, "ipc": ipc, "augs": augs, "M": c * ipc * augs, "mode": mode,
                         "store_only": "end-to-end" not in modes, **res})
    remeasure_growth_ends(rows, stores, args)
    return rows


def measure_one(c: int, ipc: int, augs: int, mode: str, store: Path, args: argparse.Namespace) -> dict:
    """One configuration in one mode, in its own child process."""
    m = c * ipc * augs
    opts = MODES[mode]
    config = {"store": str(store), "backbone": args.backbone, "out": "", "ipc": ipc, "augs": augs,
              "steps": args.steps, "param": "pixels",  # a pyramid needs more steps than are timed here
              "device": args.device, "quiet": True, "checkpoint_every": 10_000}
    if "real_source" in opts:
        config["real_source"] = opts["real_source"]
    if "chunk" in opts:
        config["chunk"] = m if opts["chunk"] == "full-graph" else opts["chunk"]
    if opts.get("real_batch") == "authors":
        config["real_batch"] = ipc * augs * c
    print(f"  C={c} ipc={ipc} augs={augs} (M={m}) {mode} ...", file=sys.stderr, flush=True)
    res = run_measurement(config)
    print(f"    {res}", file=sys.stderr, flush=True)
    return res


def growth_ends(rows: list[dict]) -> tuple[dict, dict] | None:
    """The store+chunk rows that set the memory growth figure, among the rows that run every mode: sorted by
    (M, C), the first (smallest M; on a tie the smaller C) and the last (largest M; on a tie the larger C).
    The figure is the last's peak over the first's."""
    table = sorted((r for r in rows if r["mode"] == "store+chunk" and not r.get("store_only") and "error" not in r),
                   key=lambda r: (r["M"], r["C"]))
    return (table[0], table[-1]) if len(table) >= 2 else None


def peaks_of(row: dict) -> list[float]:
    """Every peak measured for a row: several where it ran again (`remeasure_growth_ends`), else one."""
    return row.get("peak_rss_mb_runs") or [row["peak_rss_mb"]]


def peak_of(row: dict) -> float:
    """A row's peak: the median of its runs."""
    return statistics.median(peaks_of(row))


def remeasure_growth_ends(rows: list[dict], stores: dict[int, Path], args: argparse.Namespace) -> None:
    """A fresh process's peak varies from run to run by a few percent here (the allocator's reuse, the
    page cache): the two rows of the growth figure run `--memory-repeats` times in all, alternating, and
    keep every peak in `peak_rss_mb_runs`; the figure is the ratio of the medians."""
    ends = growth_ends(rows)
    if ends is None:
        return
    for row in ends:
        row["peak_rss_mb_runs"] = [row["peak_rss_mb"]]
    for _ in range(args.memory_repeats - 1):
        for row in ends:
            res = measure_one(row["C"], row["ipc"], row["augs"], row["mode"], stores[row["C"]], args)
            if "error" not in res:
                row["peak_rss_mb_runs"].append(res["peak_rss_mb"])


def write_bench(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """bench_distill.{json,md,png} in benchmarks/results; the markdown's parts."""
    summary = summarize(rows)
    payload = {"backbone": args.backbone, "size": args.size, "steps": args.steps, "rows": rows, "summary": summary}
    md = [f"Backbone `{args.backbone}` at {args.size} px; {args.steps} steps per run (median step time after "
          "the first); peak memory = peak RSS of a fresh child process per run (CUDA: max allocated).\n",
          "`intrinsic_mb`: the synthetic set's own memory, 4 bytes x 3 x its parameter values: the "
          "parameters and Adam's two moments, held by any Adam-based distillation (one backbone in one "
          "process updates each image as its gradient completes, so no gradient of the set is held); it "
          "grows with C * ipc whatever the method. "
          "`above_intrinsic_mb` = peak - intrinsic: what the copies, the real side and the backbone cost.\n",
          markdown_table(rows, ["C", "ipc", "augs", "M", "mode", "seconds_per_step", "peak_rss_mb",
                                "rss_at_start_mb", "intrinsic_mb", "above_intrinsic_mb", "final_loss"]),
          "\n## Summary\n", "```json\n" + json.dumps(summary, indent=2) + "\n```\n",
          "What grows with C, phase by phase (a measurement written by hand, kept when this file is "
          "regenerated): [bench_distill_growth.md](bench_distill_growth.md).\n"]
    write_results("bench_distill", payload, "\n".join(md))
    plot(rows, RESULTS_DIR / "bench_distill.png")
    return md


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    by = {(r["C"], r["ipc"], r["augs"], r["mode"]): r for r in ok}
    ratios = []
    for (c, ipc, augs, mode), row in by.items():
        if mode == "default" and (c, ipc, augs, "end-to-end") in by:
            e2e = by[(c, ipc, augs, "end-to-end")]
            ratios.append({"config": f"{c}x{ipc}x{augs}", "time e2e/default": e2e["seconds_per_step"] / row["seconds_per_step"],
                           "memory e2e/default": e2e["peak_rss_mb"] / row["peak_rss_mb"]})
    out: dict = {"per configuration": ratios}
    if ratios:
        out["time e2e/default (min over configurations)"] = min(r["time e2e/default"] for r in ratios)
        out["memory e2e/default (max over configurations)"] = max(r["memory e2e/default"] for r in ratios)
    chunked = sorted((r for r in ok if r["mode"] == "store+chunk"), key=lambda r: (r["M"], r["C"]))
    ends = growth_ends(rows)
    if ends is not None:
        # Over the table's rows that run every mode (as in earlier runs, comparable with them): the largest
        # M there grows C 100x, and with it the synthetic set's own memory.
        first, last = ends
        out["store+chunk memory growth (peak, largest/smallest M, rows run in every mode)"] = \
            peak_of(last) / peak_of(first)
        out["M growth"] = last["M"] / first["M"]
        out["store+chunk memory growth, the peaks (MB)"] = {
            f"{r['C']}x{r['ipc']}x{r['augs']}": {"runs": peaks_of(r), "median": peak_of(r)} for r in ends}
        if last.get("intrinsic_mb") is not None and first.get("intrinsic_mb") is not None:
            # The peak without the synthetic set's own memory (which grows with C).
            out["store+chunk memory growth above intrinsic (largest/smallest M, rows run in every mode)"] = \
                (peak_of(last) - last["intrinsic_mb"]) / (peak_of(first) - first["intrinsic_mb"])
    at_fixed_set = {}
    for c, ipc in sorted({(r["C"], r["ipc"]) for r in chunked}):
        same = [r for r in chunked if (r["C"], r["ipc"]) == (c, ipc)]
        if len(same) >= 2:  # the same synthetic set (C x ipc images), several M: only the copies grow
            at_fixed_set[f"{c}x{ipc}"] = {"M": [same[0]["M"], same[-1]["M"]],
                                         "peak growth": peak_of(same[-1]) / peak_of(same[0])}
    if at_fixed_set:
        out["store+chunk memory growth at a fixed set (C x ipc; peak, largest/smallest M)"] = at_fixed_set
        # "Flat in copies" read where only the copies grow: the widest range of M for one set.
        name, widest = max(at_fixed_set.items(), key=lambda kv: kv[1]["M"][1] / kv[1]["M"][0])
        out["store+chunk memory growth in copies (fixed set, widest M range)"] = {
            "set": name, "M": widest["M"], "M growth": widest["M"][1] / widest["M"][0],
            "peak growth": widest["peak growth"]}
    linear = sorted((r for r in ok if r["mode"] == "default" and r["ipc"] == 1 and r["augs"] == 1), key=lambda r: r["C"])
    if len(linear) >= 2:
        out["default s/step per synthetic image (augs 1)"] = {str(r["C"]): r["seconds_per_step"] / r["C"] for r in linear}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = [(mode, lambda r, mode=mode: r["mode"] == mode and r["augs"] > 1 and not r.get("store_only"))
              for mode in MODES]
    series.append(("default, C = 100/300/1000, augs 1", lambda r: r["mode"] == "default" and r["augs"] == 1))
    # Each store-only configuration's set (C x ipc) in store+chunk mode over all its M: the copies alone grow.
    for c, ipc in sorted({(r["C"], r["ipc"]) for r in rows if r.get("store_only")}):
        series.append((f"store+chunk, {c}x{ipc} images: copies only",
                       lambda r, c=c, ipc=ipc: r["mode"] == "store+chunk" and (r["C"], r["ipc"]) == (c, ipc)))
    for label, keep in series:
        pts = sorted((r["M"], r["peak_rss_mb"], r["seconds_per_step"]) for r in rows if "error" not in r and keep(r))
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    axes[0].set(xlabel="synthetic copies per step M = C*ipc*augs", ylabel="peak memory (MB)", xscale="log")
    axes[1].set(xlabel="M", ylabel="seconds per step", xscale="log")
    ticks = sorted({r["M"] for r in rows})
    for ax in axes:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"store vs end-to-end distillation ({machine_line()})", fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
