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
METHODS: tuple[str, ...] = tuple(OBJECTIVES)


def get_spec(method: str) -> ObjectiveSpec:
    if method not in OBJECTIVES:
        raise ObjectiveError(f"unknown method {method!r}: --method must be one of {', '.join(METHODS)}")
    return OBJECTIVES[method]


def objective_config(method: str, options: dict[str, Any] | None = None) -> Any:
    """The validated config of `method` from the options given (absent or None: the default). An option
    of another method is refused, naming the method it belongs to."""
    spec = get_spec(method)
    names = {f.name for f in dataclasses.fields(spec.config)}
    given = {k: v for k, v in (options or {}).items() if v is not None}
    for key in given:
        if key not in names:
            owners = [s.name for s in _SPECS if key in {f.name for f in dataclasses.fields(s.config)}]
            where = f"--{key.replace('_', '-')} is an option of --method {' / '.join(owners)}" if owners \
                else "no method has that option"
            raise ObjectiveError(f"method {method} does not take {key} ({where})")
    config = spec.config(**given)
    config.validate()
    return config


def get_objective(method: str, num_classes: int, **options: Any) -> Objective:
    """The objective `method` for `num_classes` classes with the given options (see `objective_config`)."""
    return get_spec(method).build(num_classes, objective_config(method, options))


def option_fields() -> dict[str, dataclasses.Field]:
    """Every objective option by name (the union over methods), for the CLI. Options that two methods
    share must agree on their type."""
    fields: dict[str, dataclasses.Field] = {}
    for spec in _SPECS:
        for f in dataclasses.fields(spec.config):
            if f.name in fields and fields[f.name].type != f.type:
                raise TypeError(f"objective option {f.name} has two types: {fields[f.name].type} and {f.type}")
            fields.setdefault(f.name, f)
    return fields


__all__ = ["OBJECTIVES", "METHODS", "LGMObjective", "CLPObjective", "Objective", "ObjectiveError", "ObjectiveSpec", "get_spec", "objective_config",
           "get_objective", "option_fields"]
