"""Options written once. Every command's options are the fields of a dataclass (`BuildConfig`,
`DistillConfig`, each objective's config, ...): type, default and help text live on the field, the Python
API takes the dataclass, and the CLI derives its options from the fields (`cli.options`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,  # noqa: A002
           argument: bool = False, cli: bool = True, factory: Callable[[], Any] | None = None,
           metavar: str | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    `flag`: the option's declaration when it is not `--field-name` (e.g. "--augment/--no-augment", or
    "--backbone/-b"); `argument`: a positional argument; `cli=False`: not on the command line;
    `factory`: default factory for mutable defaults (lists); `metavar`: how the help names the value.
    """
    metadata = {"help": help, "flag": flag, "argument": argument, "cli": cli, "metavar": metavar}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
