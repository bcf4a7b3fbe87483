"""The `fs` commands: build and inspect feature stores (stage 1). Thin: parse, call featurestore, print.
The entry point (signals first, then this module) is cli/fs.py."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.common import user_errors
from cli.options import command, config_params
from featurestore.build import BuildConfig

app = typer.Typer(help="Build and inspect feature stores: frozen-backbone features of a labelled dataset.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _console() -> Console:
    # Piped output (scripts, CI logs) has no terminal width; rich would assume 80 and wrap every cell.
    return Console() if sys.stdout.isatty() else Console(width=160)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _build(**options) -> None:
    from featurestore.build import build

    report = build(**options)
    if report.rank != 0:  # under torchrun the ranks share one result: rank 0 reports it
        return
    store = options["store"]
    for res in report.splits:
        where = f"{report.backbone}/{res.split}"
        if res.repaired_units or res.repaired_statistics:
            units = ", ".join(map(str, res.repaired_units))
            what = f"{len(res.repaired_units)} damaged unit(s) ({units}) recomputed" if res.repaired_units else ""
            if res.repaired_statistics:
                what += ("; " if what else "") + "class statistics merged again"
            typer.echo(f"{where}: repaired: {what}")
        if res.already_complete:
            nothing = "no damage found, nothing to do" if options.get("repair") else "nothing to do"
            typer.echo(f"{where}: already complete ({res.rows} rows), {nothing}")
        elif res.complete:
            skipped = f", {res.skipped} skipped (listed in `fs info --store {store}`)" if res.skipped else ""
            typer.echo(f"{where}: complete, {res.rows} rows ({res.written} computed now){skipped}")
            if res.empty_classes:
                typer.echo(f"{where}: warning: no usable images in class(es) {', '.join(res.empty_classes)}",
                           err=True)
        else:
            typer.echo(f"{where}: {res.written} rows computed; {res.units_done}/{res.units_total} units done, "
                       f"the remaining ones belong to other shards (rerun without --shard to finish them)")


app.command("build")(command(
    _build, config_params(BuildConfig),
    doc="""Stream DATASET through BACKBONE into the store (resumable: rerun to finish an interrupted build).

    Multi-GPU / multi-node: launch with torchrun (or srun with MASTER_ADDR set); every rank takes a
    contiguous share of the work and rank 0 prints the summary."""))


@app.command("info")
@user_errors
def info_command(
    store: Annotated[str, typer.Option("--store", "-s", help="feature store folder or fsspec URL")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")] = False,
) -> None:
    """What a store holds: backbones, splits, N, D, dtype, classes, size, completeness, skipped files."""
    from featurestore.info import store_info

    info = store_info(store)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console = _console()
    ds = info["dataset"]
    console.print(f"store {info['path']}  (schema {info['schema_version']}, written by probe-distill "
                  f"{info['tool_version']}, {_human_bytes(info['size_bytes'])})")
    console.print(f"dataset {ds['name']}  root {ds.get('root')}  {info['num_classes']} classes")
    table = Table()
    for col in ("backbone", "split", "N", "limit", "D", "views", "dtype", "px", "colour", "complete", "skipped",
                "size"):
        table.add_column(col, justify="right" if col in ("N", "limit", "D", "views", "px", "skipped", "size")
                         else "left")
    for bb_name, bb in info["backbones"].items():
        for sp_name, sp in bb["splits"].items():
            done = "yes" if sp["complete"] else f"no ({sp['units_done']}/{sp['units_total']} units)"
            colour = {True: "grey", False: "colour"}.get(sp.get("greyscale"), "?")
            table.add_row(bb_name, sp_name, str(sp["n"]), str(sp.get("limit_per_class") or "-"), str(sp["dim"]),
                          str(sp["views"]), sp["dtype"], str(bb["image_size"]), colour, done, str(sp["num_skipped"]),
                          _human_bytes(sp["size_bytes"]))
    if not info["backbones"]:
        console.print("no backbones built yet")
    else:
        console.print(table)
    for bb_name, bb in info["backbones"].items():
        for sp_name, sp in bb["splits"].items():
            for item in sp["skipped"]:
                console.print(f"skipped {bb_name}/{sp_name}: {item['sample_id']}: {item['reason']}", markup=False)
            if sp["empty_classes"]:
                console.print(f"empty classes in {bb_name}/{sp_name}: {', '.join(sp['empty_classes'])}",
                              markup=False)


VERIFY_DAMAGED = 1  # `fs verify` exit code: damage found, or a split incomplete (2: the store cannot be read)


@app.command("verify")
@user_errors
def verify_command(
    store: Annotated[str, typer.Option("--store", "-s", help="feature store folder or fsspec URL")],
    backbone: Annotated[str | None, typer.Option("--backbone", "-b", help="check only this backbone")] = None,
) -> None:
    """Read every chunk of the store and check it: completion markers, checksums, finite features, labels
    and skipped lists, partial and class statistics. One line per damaged unit, then a summary.

    Exit code 0: every split complete and intact; 1: damage found (repair with the `fs build ... --repair`
    command printed) or a split incomplete (rerun its build); 2: not a readable store."""
    from featurestore.info import verify_store

    checks = verify_store(store, backbone)
    damaged = incomplete = 0
    for check in checks:
        where = f"{check.backbone}/{check.split}"
        for damage in check.damages:
            typer.echo(f"damaged: {damage.line()}")
        if check.damages:
            damaged += 1
            if all(d.repairable for d in check.damages):
                typer.echo(f"{where}: {len(check.damages)} damaged part(s); repair with: {check.repair}")
        elif not check.complete:
            incomplete += 1
            typer.echo(f"{where}: incomplete ({check.units_done}/{check.units_total} units; the finished ones "
                       f"are intact): rerun its `fs build` to finish it")
        else:
            note = "" if check.checksums else " (no chunk checksums: built before they existed)"
            typer.echo(f"{where}: ok, {check.units_total} units checked{note}")
    units = sum(1 for c in checks for d in c.damages if d.unit is not None)
    if damaged or incomplete:
        typer.echo(f"store {store}: {damaged} damaged split(s) ({units} damaged unit(s)), {incomplete} incomplete "
                   f"split(s), {len(checks) - damaged - incomplete} intact")
        raise typer.Exit(VERIFY_DAMAGED)
    typer.echo(f"store {store}: all {len(checks)} split(s) intact")


@app.command("backbones")
@user_errors
def backbones_command(
    all_: Annotated[bool, typer.Option("--all", help="include the random-weight test backbones")] = False,
) -> None:
    """Registered backbones: embedding size, resolution, normalization, weights source and presence."""
    from featurestore.backbones import list_backbones, weights_status

    table = Table()
    for col in ("name", "dim", "resolution", "normalization", "weights source", "present", "where"):
        table.add_column(col)
    for spec in list_backbones(include_test=all_):
        present, where = weights_status(spec)
        name = spec.name + (f" ({', '.join(spec.aliases)})" if spec.aliases else "")
        table.add_row(name, str(spec.dim), f"{spec.resize_size} -> {spec.image_size}", spec.normalization,
                      spec.weights, "yes" if present else "no", where)
    _console().print(table)


@app.command("datasets")
@user_errors
def datasets_command() -> None:
    """Datasets `fs build` can read."""
    from featurestore.datasets import list_datasets

    table = Table()
    table.add_column("name")
    table.add_column("what")
    for name, description in list_datasets():
        table.add_row(name, description)
    _console().print(table)

