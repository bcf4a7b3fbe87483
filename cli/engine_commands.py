"""The `engine` commands: distill synthetic images from a feature store, evaluate image sets, build
baselines. The entry point (signals first, then this module) is cli/engine.py."""

from __future__ import annotations

import typer

from cli.engine_distill import distill_command
from cli.engine_eval import baseline_command, eval_command

app = typer.Typer(help="Distill, evaluate and compare synthetic image sets on frozen backbones.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("distill")(distill_command)
app.command("eval")(eval_command)
app.command("baseline")(baseline_command)
