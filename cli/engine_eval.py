"""`engine eval` and `engine baseline`: thin wrappers over engine.evaluate and engine.baselines."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import List, Optional

import typer

from cli.options import command, config_params
from engine.baselines import BASELINE_KINDS, BaselineConfig
from engine.evaluate import EvalConfig
from featurestore.errors import UserError


def _unique_names(dirs: list[Path], names: list[str]) -> list[str]:
    from engine.evaluate import resolve_image_dir

    if names and len(names) != len(dirs):
        raise UserError(f"got {len(names)} --name for {len(dirs)} --images: give one --name per --images, or none")
    if not names:
        for d in dirs:
            root = resolve_image_dir(d)
            # A distill/baseline output dir is named after the run, not after its `images` folder.
            names.append(root.parent.name if root.name == "images" else root.name)
    seen = set()
    for n in names:
        if n in seen:
            raise UserError(f"two image sets are named '{n}': tell them apart with --name NAME per --images")
        seen.add(n)
    return names


def _param(name: str, annotation, info) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


_EVAL_ONLY = [
    _param("store", str, typer.Option(..., "--store", help="Feature store (its val split is the test set).")),
    _param("images", Optional[List[Path]], typer.Option(
        None, "--images", help="ImageFolder dir (or a distill/baseline output dir); repeat for several sets.")),
    _param("name", Optional[List[str]], typer.Option(None, "--name", help="Row name per --images (default: dir name).")),
    _param("backbone", List[str], typer.Option(..., "--backbone", help="Evaluation backbone; repeat for several.")),
    _param("out", Optional[Path], typer.Option(None, "--out", help="Where eval.json / eval.md go (default: <set dir's "
                                                                   "parent>/eval for one set, else ./eval).")),
]


def _eval(store: str, images, name, backbone, out, **options) -> None:
    from engine.evaluate import check_eval_out, default_out_dir, evaluate, write_eval_outputs

    dirs = list(images or [])
    names = _unique_names(dirs, list(name or []))
    out_dir = check_eval_out(out if out is not None else default_out_dir(dirs))
    result = evaluate(store, dict(zip(names, dirs)), backbone, **options)
    header, rows = result.table("top1")
    typer.echo("top-1 accuracy (%), mean ± std over seeds " + str(result.config["seeds"]))
    typer.echo("| " + " | ".join(header) + " |")
    typer.echo("|" + "---|" * len(header))
    for r in rows:
        typer.echo("| " + " | ".join(r) + " |")
    json_path, md_path = write_eval_outputs(result, out_dir)  # after printing: a failed write loses no result
    typer.echo(f"wrote {json_path} and {md_path}")


eval_command = command(_eval, _EVAL_ONLY + config_params(EvalConfig),
                       doc="Linear-probe evaluation of image sets on frozen backbones, tested on the store's "
                           "val features.")

_BASELINE_ONLY = [
    _param("store", str, typer.Option(..., "--store", help="Feature store (its train split supplies the images).")),
    _param("backbone", str, typer.Option(..., "--backbone", help="Backbone whose stored embeddings rank the images.")),
    _param("kind", str, typer.Option(..., "--kind", help=" | ".join(BASELINE_KINDS))),
    _param("out", Path, typer.Option(..., "--out", help="New output dir: images/<class>/<k>.png + baseline.json.")),
]


def _baseline(store: str, backbone: str, kind: str, out: Path, **options) -> None:
    from engine.baselines import make_baseline

    record = make_baseline(store, backbone, kind, out, **options)
    typer.echo(f"wrote {record['num_images']} {kind} images to {out / 'images'} and {out / 'baseline.json'}")


baseline_command = command(_baseline, _BASELINE_ONLY + config_params(BaselineConfig),
                           doc="Real-image baselines in ImageFolder layout: random, centroid (faiss L2), "
                               "neighbors (faiss cosine).")
