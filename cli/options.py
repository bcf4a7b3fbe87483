"""Typer commands whose options are derived from dataclass fields (`featurestore.options.option`), so a
default or a help text is written once, on the field."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Callable, Iterable, List, Optional

import typer

from cli.common import user_errors


def _cli_type(hint: Any) -> Any:
    """The type typer parses a field as: unions of int/str (e.g. 'auto' or a number) arrive as str and
    are parsed by the config's own validation; `X | None` is Optional[X]; lists are List[X]."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        inner = args[0] if len(args) == 1 else str
        inner = _cli_type(inner)
        return Optional[inner] if optional else inner
    if origin in (list, tuple, typing.List):
        return List[typing.get_args(hint)[0]]
    return hint


def config_params(cls: type, *, exclude: Iterable[str] = (), all_optional: bool = False,
                  help_prefix: str = "") -> list[inspect.Parameter]:
    """One keyword parameter per CLI field of dataclass `cls`. `all_optional`: default None for every
    option (the command then tells "given" from "not given"), the field's default shown in the help."""
    hints = typing.get_type_hints(cls)
    params = []
    excluded = set(exclude)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in excluded or not meta.get("cli", True):
            continue
        annotation = _cli_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = ...
        help_text = help_prefix + meta.get("help", "")
        show_default: bool | str = True
        if all_optional:
            if default is not ... and default is not None and annotation is not bool:
                help_text += f" [default: {default}]"
            default = None if annotation is not bool else default
            if annotation is not bool:
                annotation = Optional[annotation]
            show_default = False
        if meta.get("argument"):
            info = typer.Argument(default, help=help_text, metavar=meta.get("metavar"), show_default=show_default)
        else:
            decls = meta.get("flag") or "--" + f.name.replace("_", "-")
            info = typer.Option(default, *decls.split(","), help=help_text, metavar=meta.get("metavar"),
                                show_default=show_default)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=annotation))
    return params


def command(fn: Callable[..., Any], params: list[inspect.Parameter], doc: str | None = None) -> Callable[..., Any]:
    """A typer command calling `fn(**options)` whose options are `params` (from `config_params`);
    user errors become one line (`cli.common.user_errors`)."""

    def wrapper(**kwargs: Any) -> Any:
        return fn(**kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    wrapper.__doc__ = doc if doc is not None else fn.__doc__
    wrapper.__name__ = fn.__name__
    return user_errors(wrapper)

