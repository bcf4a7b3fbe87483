"""What bench_quality writes: the targets read off its results, the markdown tables, the accuracy-vs-steps
figure, and the three files (JSON + markdown + PNG)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.bench_quality_plan import (ABLATION_STEPS, AUGS, HELD_OUT, IMAGE_SIZE, SEEDS, STORE_VIEWS,
                                           TRAIN_PER_CLASS, TRANSFER_STEPS)
from benchmarks.common import markdown_table, save_figure, write_results


def _cell(result: dict[str, Any] | None) -> str:
    return "-" if result is None else f"{result['top1_mean']:.1f} ± {result['top1_std']:.1f}"


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
