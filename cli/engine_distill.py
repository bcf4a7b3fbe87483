"""`engine distill`: parse options (derived from DistillConfig and every objective's config), call
engine.distill.distill, say where the outputs are."""

from __future__ import annotations

import dataclasses
import sys

import typer

from cli.options import command, config_params
from cli.signals import INTERRUPTED, outputs_complete
from engine.distill import DistillConfig, DistillInterrupted, distill
from engine.objectives import OBJECTIVES, option_fields


def _objective_params():
    """Every objective's options, on one command line: None when not given (the objective's default
    applies, shown in the help)."""
    params = []
    for spec in OBJECTIVES.values():
        seen = {p.name for p in params}
        params += [p for p in config_params(spec.config, all_optional=True) if p.name not in seen]
    return params


def _distill(**options) -> None:
    objective = {name: options.pop(name) for name in option_fields()}
    config = DistillConfig(**options, objective={k: v for k, v in objective.items() if v is not None})
    try:
        result = distill(config)
    except DistillInterrupted as exc:
        print(exc.message(), file=sys.stderr)
        raise typer.Exit(INTERRUPTED) from None
    outputs_complete()  # every output is written: a signal from here on cannot fail the run (exit 0)
    if result.rank != 0:  # under torchrun only rank 0 reports (and writes) anything
        return
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(f"distilled {len(result.labels)} images ({result.steps_done} steps, final loss {final}) -> {result.out}")
    print("  images/ (ImageFolder), distilled.safetensors, grid.png, loss.png, metrics.jsonl, config.json, "
          "checkpoint.pt")


distill_command = command(
    _distill, config_params(DistillConfig) + _objective_params(),
    doc="Distill synthetic images from a feature store (linear gradient matching by default).")

assert {f.name for f in dataclasses.fields(DistillConfig)}.isdisjoint(option_fields()), \
    "an objective option has the name of a distill option"
