"""Distillation objectives, one module each, one registry entry each (`_SPECS`).

To add an objective: a module with a config dataclass (its options: `featurestore.options.option`
fields and `validate()`), a class with `loss(...)` and `config()` (`base.Objective`), and
`SPEC = ObjectiveSpec(...)`; then the module in the import below and its `SPEC` in `_SPECS`.
`engine distill --method NAME`, its options and its line in `--method`'s help follow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.objectives import clp, lgm
from engine.objectives.base import Objective, ObjectiveError, ObjectiveSpec
from engine.objectives.clp import CLPObjective
from engine.objectives.lgm import LGMObjective

_SPECS: tuple[ObjectiveSpec, ...] = (
    lgm.SPEC,
    clp.SPEC,
)
OBJECTIVES: dict[str, ObjectiveSpec] = {spec.name: spec for spec in _SPECS}
OBJECTIVE_NAMES: tuple[str, ...] = tuple(OBJECTIVES)


def objective_spec(name: str) -> ObjectiveSpec:
    """The registered objective `name` (chosen on the command line by `--method`)."""
    if name not in OBJECTIVES:
        raise ObjectiveError(f"unknown method {name!r}: --method must be one of {', '.join(OBJECTIVE_NAMES)}")
    return OBJECTIVES[name]


def objective_config(name: str, options: dict[str, Any] | None = None) -> Any:
    """The validated config of objective `name` from the options given (absent or None: the default). An
    option of another objective is refused, naming the objective it belongs to."""
    spec = objective_spec(name)
    names = {f.name for f in dataclasses.fields(spec.config)}
    given = {k: v for k, v in (options or {}).items() if v is not None}
    for key in given:
        if key not in names:
            owners = [s.name for s in _SPECS if key in {f.name for f in dataclasses.fields(s.config)}]
            where = f"--{key.replace('_', '-')} is an option of --method {' / '.join(owners)}" if owners \
                else "no method has that option"
            raise ObjectiveError(f"method {name} does not take {key} ({where})")
    config = spec.config(**given)
    config.validate()
    return config


def get_objective(name: str, num_classes: int, **options: Any) -> Objective:
    """The objective `name` for `num_classes` classes with the given options (see `objective_config`)."""
    return objective_spec(name).build(num_classes, objective_config(name, options))


def option_fields() -> dict[str, dataclasses.Field]:
    """Every objective option by name (the union over objectives), for the CLI. Options that two objectives
    share must agree on their type."""
    fields: dict[str, dataclasses.Field] = {}
    for spec in _SPECS:
        for f in dataclasses.fields(spec.config):
            if f.name in fields and fields[f.name].type != f.type:
                raise TypeError(f"objective option {f.name} has two types: {fields[f.name].type} and {f.type}")
            fields.setdefault(f.name, f)
    return fields


__all__ = ["OBJECTIVES", "OBJECTIVE_NAMES", "LGMObjective", "CLPObjective", "Objective", "ObjectiveError", "ObjectiveSpec",
           "objective_spec", "objective_config", "get_objective", "option_fields"]
