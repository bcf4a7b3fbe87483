"""`engine`: distill synthetic images from a feature store, evaluate image sets, build baselines.

The entry point (`engine` console script, `python -m cli.engine`): signal handling comes first
(cli/signals.py), then the commands, torch among their imports (cli/engine_commands.py)."""

from __future__ import annotations

from typing import Any

from cli.signals import on_start


def main() -> None:
    on_start()  # before typer and torch load: Ctrl-C in the first seconds is one line, exit 130
    from cli.engine_commands import app

    app()


def __getattr__(name: str) -> Any:  # `from cli.engine import app` (tests, in-process use)
    if name == "app":
        from cli.engine_commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
