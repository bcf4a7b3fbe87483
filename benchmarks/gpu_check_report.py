"""What gpu_check writes: a short result per part for the table, and the markdown of the whole check."""

from __future__ import annotations

from typing import Any


def summary_line(r: dict[str, Any]) -> str:
    """A short result per part for the table."""
    if r["status"] != "passed":
        return r.get("reason", "")
    name = r["part"]
    if name == "kernel-tests":
        return r.get("summary", "")
    if name == "kernel-cuda":
        cases = r.get("cases", [])
        worst = {m: max((c[k] for c in cases if c["mode"] == m for k in ("grad_weight", "grad_bias", "grad_features")),
                        default=0.0) for m in sorted({c["mode"] for c in cases})}
        return f"{len(cases)} cases within tolerance; worst relative error by mode {worst}; Triton path used: " \
               f"{r.get('triton_path_used')}"
    if name == "bench-kernel":
        h = r.get("whole_split_fused", {})
        return (f"fused whole split N={h.get('n')} C={h.get('c')} D={h.get('d')}: {h.get('ieee_fp32_ms', 0):.2f} ms "
                f"IEEE fp32 ({h.get('ieee_fp32_tflops', 0):.1f} TFLOP/s), {h.get('tf32_ms', 0):.2f} ms TF32 "
                f"({h.get('tf32_tflops', 0):.1f} TFLOP/s)")
    if name == "distill-steps":
        parts = [f"{m['mode']}: {m['s_per_step']:.3f} s/step, peak {m['peak_memory_gib']:.2f} GiB "
                 f"(chunk {m['copies_per_pass']}/{m['copies_per_step']}, real rows {m['real_rows_per_step']})"
                 for m in r.get("modes", [])]
        return "; ".join(parts)
    if name == "build":
        return (f"{r['build_img_s']} img/s build vs {r['bare_forward_img_s']} img/s bare forward "
                f"(ratio {r['ratio']}, {r['backbone']} {r['image_size']} px, {r['images']} JPEGs, {r['workers']} workers)")
    if name == "torchrun":
        runs = [f"nproc {d['nproc']}: exit 0, {d['steps_recorded']} steps, device {d['device']}, distributed backend "
                f"{(d['distributed'] or {}).get('backend')}" for d in r.get("distill", [])]
        coll = sorted({(c.get("world_size"), c.get("backend")) for c in r.get("collectives", [])})
        return "; ".join(runs) + f"; collectives ok (world size, backend): {coll}"
    return ""


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    from benchmarks.common import markdown_table

    rows = [{"part": r["part"], "status": r["status"], "seconds": r["seconds"], "timeout": r["timeout_s"],
             "result": summary_line(r).replace("|", "/")} for r in results]
    text = [f"{'DRY RUN ON CPU (plumbing only, tiny sizes; no GPU involved)' if meta['dry_run_cpu'] else 'CUDA'}: "
            f"{meta['passed']}/{len(results)} parts passed in {meta['wall_seconds']} s (budget {meta['budget_s']} s).\n",
            markdown_table(rows)]
    for r in results:
        if r["part"] == "distill-steps" and r.get("modes"):
            text += ["\n## distill-steps\n", f"Setup: {r['setup']}\n",
                     markdown_table([{k: m[k] for k in ("mode", "s_per_step", "peak_memory_gib", "copies_per_step",
                                                        "copies_per_pass", "real_rows_per_step", "real_plan")}
                                     for m in r["modes"]])]
        if r["part"] == "bench-kernel" and r.get("rows"):
            text += ["\n## bench-kernel\n", markdown_table(r["rows"])]
    return "\n".join(text) + "\n"
