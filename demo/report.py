"""demo/report.md and demo/report.html: the setup, the accuracy table, each run's loss summary, the figures
(copied to demo/assets/) and the time of each stage."""

from __future__ import annotations

import html
import itertools
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

from demo.settings import BACKBONES, BASELINE_KINDS, CURVE_EVERY, DEMO_DIR, Demo, distill_runs
from engine.distill.outdir import CONFIG_FILE, GRID_FILE, LOSS_PLOT_FILE, METRICS_FILE


def _loss_summary(out: Path) -> str:
    path = out / METRICS_FILE
    if not path.is_file():
        return ""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in records if "loss" in r]
    if not rows:
        return ""
    quick_probes = [r for r in records if "probe_top1" in r]
    quick_probe = f", cheap probe {quick_probes[-1]['probe_top1']:.1f}% at the end" if quick_probes else ""
    return (f"{len(rows)} steps, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, "
            f"{rows[-1]['seconds'] / max(len(rows), 1):.2f} s/step, peak memory "
            f"{max(r.get('peak_memory_mb', 0) for r in rows):.0f} MB{quick_probe}")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def write_report(demo: Demo, val_rows: int, eval_cfg: Any, table_md: str, wall: float) -> Path:
    """demo/report.md and demo/report.html, with the images copied next to them (demo/assets/)."""
    figures = _copy_figures(demo)
    setup = _setup_text(demo, val_rows, eval_cfg)
    time_note = (f"Wall seconds of each stage when it was computed (a stage reused from an earlier run keeps "
                 f"the time it took then; one an interrupted run had begun counts only the part done last). "
                 f"This invocation: {_minutes(wall)}.")
    report = DEMO_DIR / "report.md"
    report.write_text(_report_markdown(demo, setup, table_md, figures, time_note))
    (DEMO_DIR / "report.html").write_text(_report_html(demo, setup, table_md, figures, time_note))
    return report


def _copy_figures(demo: Demo) -> list[tuple[str, str]]:
    """The runs' grids and loss plots and the baselines' grids copied to demo/assets/: (title, path)."""
    assets = DEMO_DIR / "assets"
    shutil.rmtree(assets, ignore_errors=True)  # the other mode's figures would linger next to this report
    assets.mkdir()
    figures: list[tuple[str, str]] = []
    for run_name, _, backbones in distill_runs(demo.args):
        out = demo.mode_dir / f"distill-{run_name}"
        slug = run_name.lower().replace(" ", "-")
        for name in (GRID_FILE, LOSS_PLOT_FILE):
            if (out / name).is_file():
                shutil.copyfile(out / name, assets / f"{slug}-{name}")
                what = ("distilled images" if name == GRID_FILE else
                        "loss and probe accuracy during the run" if demo.args.full else "loss during the run")
                figures.append((f"{run_name} ({' + '.join(backbones)}): {what}", f"assets/{slug}-{name}"))
    for kind in BASELINE_KINDS:
        grid = demo.work / f"baseline-{kind}" / GRID_FILE
        if grid.is_file():
            shutil.copyfile(grid, assets / f"{kind}-grid.png")
            figures.append((f"{kind} real images", f"assets/{kind}-grid.png"))
    return figures


def _setup_text(demo: Demo, val_rows: int, eval_cfg: Any) -> str:
    """The report's first paragraph: what was run, on what, with which options."""
    args, mode, runs = demo.args, demo.mode, distill_runs(demo.args)
    run_list = "; ".join(f"{name} on `{' + '.join(backbones)}`" for name, _, backbones in runs)
    # The init is whatever `engine distill` defaults to (another release may change it): read it from the runs.
    inits = sorted({json.loads(path.read_text()).get("arguments", {}).get("init", "?") for path in
                    (demo.mode_dir / f"distill-{name}" / CONFIG_FILE for name, _, _ in runs) if path.is_file()})
    # The ± of the table is over probe seeds on one test set; the test set's own sampling error adds to it.
    sampling_error = 100 * math.sqrt(0.7 * 0.3 / max(val_rows, 1))
    setup = (
        f"Mode **{mode}** (`make {mode}`). Dataset **{demo.dataset}**: {args.limit_per_class} train and "
        f"{args.val_limit_per_class} val images per class. The val split ({val_rows} images) is the table's "
        f"test set: enough for a demo table, whose accuracies also carry a sampling error of about "
        f"{sampling_error:.1f} points (binomial, at 70 %) that the ± over probe seeds does not show. "
        f"Backbones {', '.join(f'`{b}`' for b in BACKBONES)} at {args.image_size} px. "
        f"One image per class distilled with the defaults of `engine distill` (`--init {', '.join(inits)}`) "
        f"but `--steps {args.steps} --augs {args.augs}` (a CPU budget; the authors run 5000 steps with 10 "
        f"copies){f' and `--eval-every {CURVE_EVERY}` (the curves)' if args.full else ''}: {run_list}. "
        f"Probe evaluation: {eval_cfg.seeds} seeds, {eval_cfg.epochs} epochs. Store: `{demo.store}`. The last column "
        "of the table is the mean over the backbones a set was not distilled on (transfer).")
    if not args.full:
        setup += (" `make demo-full` adds LGM on both backbones at once and the probe-accuracy curves "
                  "of every run.")
    return setup


def _report_markdown(demo: Demo, setup: str, table_md: str, figures: list[tuple[str, str]], time_note: str) -> str:
    mode, times = demo.mode, demo.times
    fallback = "" if demo.dataset == "fashion-mnist" else (
        "\n> Fashion-MNIST was not available, so this run used the built-in `gratings` dataset.\n")
    md = [
        f"# probe-distill demo report ({mode})", "", setup, fallback,
        "## Accuracy (top-1 %, linear probe, mean ± std over seeds; test = the store's val features)", "",
        "\n".join(line for line in table_md.strip().splitlines() if not line.startswith("# ")), "",
        "## Distillation runs", "",
    ]
    md += [f"- {run_name}: {_loss_summary(demo.mode_dir / f'distill-{run_name}')}"
           for run_name, _, _ in distill_runs(demo.args)]
    md += ["", "## Figures", ""]
    md += [f"### {title}\n\n![{title}]({path})\n" for title, path in figures]
    md += [f"## Time ({mode})", "", time_note, "", "| stage | seconds | this invocation |", "|---|---|---|"]
    md += [f"| {label} | {'-' if s is None else f'{s:.0f}'} | {'computed' if computed else 'reused'} |"
           for label, s, computed in times.rows]
    md += [f"| **total** | **{times.total():.0f}** ({_minutes(times.total())}) | |", ""]
    return "\n".join(md)


def _report_html(demo: Demo, setup: str, table_md: str, figures: list[tuple[str, str]], time_note: str) -> str:
    mode, times = demo.mode, demo.times
    body = [f"<h1>probe-distill demo report ({html.escape(mode)})</h1>",
            f"<p>{_inline_markdown_to_html(setup)}</p>",
            "<h2>Accuracy (top-1 %)</h2>", _markdown_table_to_html(table_md),
            "<h2>Figures</h2>"]
    body += [f"<h3>{html.escape(t)}</h3><img src='{html.escape(p)}' style='max-width:100%'>" for t, p in figures]
    body += [f"<h2>Time ({html.escape(mode)})</h2><p>{html.escape(time_note)}</p><table>",
             "<tr><th>stage</th><th>seconds</th><th>this invocation</th></tr>"]
    body += [f"<tr><td>{html.escape(label)}</td><td>{'-' if s is None else f'{s:.0f}'}</td>"
             f"<td>{'computed' if computed else 'reused'}</td></tr>" for label, s, computed in times.rows]
    body += [f"<tr><th>total</th><th>{times.total():.0f} ({_minutes(times.total())})</th><th></th></tr></table>"]
    return ("<!doctype html><meta charset='utf-8'><title>probe-distill demo</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}td,th{border:1px solid #ccc;"
            "padding:4px 8px}table{border-collapse:collapse}</style>" + "\n".join(body))


def _inline_markdown_to_html(text: str) -> str:
    """Escape, then the two inline marks the report uses: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _markdown_table_to_html(md: str) -> str:
    """The first table of `md` (eval.md: top-1; the top-5 table follows it) as HTML."""
    lines = md.splitlines()
    start = next((k for k, line in enumerate(lines) if line.startswith("|")), len(lines))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    if not rows:
        return f"<pre>{html.escape(md)}</pre>"
    out = ["<table>"]
    for k, line in enumerate(rows):
        if set(line.replace("|", "").strip()) <= set("-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        tag = "th" if k == 0 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)
