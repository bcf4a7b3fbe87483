"""What bench_real_scale writes: the markdown of its rows and of the ImageNet-1k whole run, and the
conclusions read off them."""

from __future__ import annotations

from typing import Any

from benchmarks.bench_real_scale_estimate import AUGS, GPU_ASSUMPTIONS, IPC
from benchmarks.bench_real_scale_measure import BULK_CHUNKS, CHUNK_ROWS
from benchmarks.common import fmt_bytes, fmt_s, markdown_table
from engine.real import REAL_MACS_BUDGET


def markdown(rows: list[dict[str, Any]], run: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    text = [*_method_notes(meta), markdown_table([_table_row(r, meta) for r in rows])]
    if run:
        text += _whole_run_section(run)
    text += ["## Conclusions\n", *meta["conclusions"]]
    return "\n".join(text) + "\n"


def _table_row(r: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """One row of the main table, as a reader reads it."""
    return {
        "N": r["n"], "C": r["c"], "D": r["d"], "GFLOP/step": round(r["gflop_per_step"], 1),
        "CPU s/step": f"{r['cpu_s_per_step']:.3g}", "how": r["cpu_how"],
        "CPU GFLOP/s": round(r["cpu_gflops"], 1),
        "grad peak extra": fmt_bytes(r["grad_peak_extra_bytes"]),
        "on disk (fp16)": fmt_bytes(r["bytes_on_disk"]), f"in memory ({meta['memory_dtype']})":
            fmt_bytes(r["bytes_in_memory"]),
        "load (one-off)": "n/a" if r["load_s"] is None else f"{r['load_s']:.3g} s" +
        ("" if r["load_how"] == "measured" else " (extrap.)"),
        f"load, {BULK_CHUNKS} chunks/read": "n/a" if r["load_bulk_s"] is None else f"{r['load_bulk_s']:.3g} s",
        "auto on CPU": r["auto_cpu"], "auto on GPU": r["auto_gpu"],
        "GPU est. fp32": fmt_s(r["gpu_fp32_s_per_step"]), "GPU est. TF32": fmt_s(r["gpu_tf32_s_per_step"]),
    }


def _method_notes(meta: dict[str, Any]) -> list[str]:
    """How the CPU columns were measured and the GPU columns computed (the paragraphs above the table)."""
    a = GPU_ASSUMPTIONS
    return [
        f"Whole-split real gradient (`linear_ce_grad` over all N rows, random head W ~ N(0, 0.01^2), b = 0, random "
        f"labels). Features: random fp16 in a chunked Zarr v3 array on disk ({CHUNK_ROWS}-row chunks, no codec), "
        f"read back chunk by chunk into {meta['memory_dtype']} memory once (the `load` column, one chunk per read as "
        f"`StoreSplit.load` does; the next column reads {BULK_CHUNKS} chunks per read; both after dropping the files' "
        f"page cache{'' if meta['cold_reads'] else ' — the drop failed here: warm reads'}); "
        f"the gradient step then reuses them. CPU s/step: median of {meta['repeats']} calls after one warm call; "
        f"'extrapolated from n rows' = measured on the first n rows, scaled linearly in N (calls longer than "
        f"{meta['max_seconds']} s were not run). Peak extra memory: {meta['memory_method']}. "
        f"Torch threads {meta['torch_threads']}; 1-min load average before the run {meta['load_average_start']}, "
        f"up to {meta['load_average_max_during']} during it (this run's own {meta['torch_threads']} threads count in "
        f"it){meta['busy_note']}.",
        "",
        f"GPU columns are NOT measured: roofline estimates `max(FLOPs / rate, bytes / bandwidth)` at ASSUMED rates "
        f"for one {a['gpu']}: IEEE fp32 GEMM {a['fp32_tflops']:.0f} TFLOP/s sustained (what the engine gets by "
        f"default: torch's fp32 matmul precision is IEEE unless the user enables TF32), TF32 {a['tf32_tflops']:.0f} "
        f"TFLOP/s sustained (conservative; ~400-495 is the dense peak), HBM {a['hbm_tb_s']:.0f} TB/s. Traffic model: "
        f"{a['traffic_model']}. `auto`: `engine.real.plan_real_batch('auto', N, C, D, ipc*augs*C, device)` with "
        f"ipc = {IPC}, augs = {AUGS}; budgets {REAL_MACS_BUDGET['cpu']:.3g} (cpu) and {REAL_MACS_BUDGET['cuda']:.3g} "
        f"(cuda) multiply-adds.",
        "",
    ]


def _whole_run_section(run: dict[str, Any]) -> list[str]:
    """The ImageNet-1k whole run: each mode's real side per step and per run, and what it assumes."""
    a = GPU_ASSUMPTIONS
    s = run["sizes"]
    return [f"## ImageNet-1k, whole run: real side only (N = {s['n']}, C = {s['c']}, D = {s['d']}, "
            f"{s['steps']} steps)\n",
            markdown_table([{
                "mode": m["mode"], "rows/step": m["real_rows_per_step"],
                "TFLOP/step": f"{m['tflop_per_step']:.3g}",
                "this CPU s/step": f"{m['cpu_s_per_step']:.3g}", f"CPU run ({s['steps']} steps)": m["cpu_run"],
                "GPU s/step est. (IEEE fp32; ViT: bf16)": "n/a" if m["gpu_s_per_step"] is None
                else fmt_s(m["gpu_s_per_step"]),
                "GPU s/step est. (TF32)": "n/a" if m["gpu_tf32_s_per_step"] is None
                else fmt_s(m["gpu_tf32_s_per_step"]),
                "GPU run est.": "n/a" if m["gpu_run"] is None else
                m["gpu_run"] + ("" if m["gpu_tf32_run"] is None else f" fp32 / {m['gpu_tf32_run']} TF32"),
                "note": m["note"]} for m in run["modes"]]),
            f"End-to-end cost assumes {run['vit_b14_gflops_assumed']} GFLOPs per ViT-B/14 forward at 224 px "
            f"(a stated assumption: 257 tokens at patch 14, and if the figure counts multiply-adds, as fvcore's "
            f"do, the true FLOPs are up to ~2x higher, so this side is underestimated) at an assumed "
            f"{a['bf16_tflops_vit']:.0f} TFLOP/s bf16 on the GPU. The authors call real-image loading their "
            f"bottleneck: it is NOT included (no number for it is assumed), so end-to-end figures are lower "
            f"bounds.\n"]


def conclusions(rows: list[dict[str, Any]], run: dict[str, Any] | None) -> list[str]:
    out = []
    if run:
        full, cpu_auto, gpu_auto, e2e = run["modes"]
        s = run["sizes"]
        out.append(
            f"- Exact (whole-split) gradients on ImageNet-1k (N = {s['n']}, C = {s['c']}, D = {s['d']}, "
            f"{full['tflop_per_step']:.2f} TFLOP per step) cost **{fmt_s(full['cpu_s_per_step'])} per step on this "
            f"CPU** ({full['cpu_how']}) and an estimated **~{fmt_s(full['gpu_tf32_s_per_step'])} (TF32) to "
            f"~{fmt_s(full['gpu_s_per_step'])} (IEEE fp32, the engine's default) per step on one H100/H200** "
            f"(assumed rates, not measured): milliseconds on a GPU, minutes on this CPU.")
        out.append(
            f"- A 5000-step run's real side: store mode with the whole split {full['gpu_tf32_run']} (TF32) to "
            f"{full['gpu_run']} (fp32) of GPU time; `--real-batch auto` on a GPU chooses "
            f"{'the whole split' if gpu_auto['real_rows_per_step'] == s['n'] else str(gpu_auto['real_rows_per_step']) + ' rows'} "
            f"at this size; on a CPU it samples {cpu_auto['real_rows_per_step']} rows ({fmt_s(cpu_auto['cpu_s_per_step'])} "
            f"per step, {cpu_auto['cpu_run']} per run here). End to end (the authors), the real forward alone is "
            f"{e2e['tflop_per_step']:.0f} TFLOP per step, {e2e['tflop_per_step'] / full['tflop_per_step']:.0f}x the "
            f"whole-split gradient: ~{e2e['gpu_run']} of GPU compute per run at the assumed rate, before any image "
            f"decoding or loading (not included).")
    big = [r for r in rows if r["n"] == max(x["n"] for x in rows)]
    if big:
        worst = max(big, key=lambda r: r["bytes_in_memory"])
        out.append(
            f"- Memory: the features dominate ({fmt_bytes(worst['bytes_in_memory'])} in memory at N = {worst['n']}, "
            f"D = {worst['d']}; {fmt_bytes(worst['bytes_on_disk'])} on disk as fp16); the gradient call itself adds "
            f"at most {fmt_bytes(max((r['grad_peak_extra_bytes'] or 0) for r in rows))} above its inputs at any size "
            f"here (row-blocked: it does not grow with N).")
    loads = [r for r in rows if r["load_how"] == "measured" and r["load_s"]]
    if loads:
        r = max(loads, key=lambda x: x["n"] * x["d"])
        out.append(f"- One-off load (Zarr store on disk -> memory, chunk by chunk as "
                   f"`StoreSplit.load` reads): {r['load_s']:.1f} s for N = {r['n']}, D = {r['d']} "
                   f"({fmt_bytes(r['bytes_on_disk'] / r['load_s'])}/s of fp16), paid once per run; reading "
                   f"{BULK_CHUNKS} chunks per call takes {r['load_bulk_s']:.1f} s "
                   f"({r['load_s'] / r['load_bulk_s']:.1f}x faster)" +
                   (": at this size the chunk-by-chunk load is dominated by Zarr's per-read overhead." if
                    r["load_s"] > 1.5 * r["load_bulk_s"] else
                    ": Zarr's per-read overhead is a small part at this size; the rest is reading and converting "
                    "the bytes (the page cache of the files was dropped first; cold and warm reads took about the "
                    "same time in a spot check on this machine's virtual disk)."))
    out.append("- Measured vs extrapolated: every CPU figure marked 'extrapolated' comes from a measured prefix of "
               "the same loaded split (linear in N); every GPU figure and every end-to-end figure is computed from "
               "stated assumptions, none was measured on a GPU.")
    return out


def busy_note(meta: dict[str, Any], cores: int) -> str:
    """Whether other work shared the CPU: the load before the run, or the load during it beyond our threads."""
    others = meta["load_average_max_during"] - meta["torch_threads"]
    if meta["load_average_start"] > 0.75 * cores or others > 0.5 * cores:
        return (f" — the machine is shared and other work was running (load before {meta['load_average_start']}, "
                f"up to ~{max(others, 0):.1f} beyond this run's threads): CPU times are pessimistic")
    return ""
