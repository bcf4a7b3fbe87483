"""`fs`: build and inspect feature stores (stage 1).

The entry point (`fs` console script, `python -m cli.fs`): signal handling comes first
(cli/signals.py), then the commands, torch among their imports (cli/fs_commands.py)."""

from __future__ import annotations

from typing import Any

from cli.signals import on_start


def main() -> None:
    on_start()  # before typer, torch and zarr load: Ctrl-C in the first seconds is one line, exit 130
    from cli.fs_commands import app

    app()


def __getattr__(name: str) -> Any:  # `from cli.fs import app` (tests, in-process use)
    if name == "app":
        from cli.fs_commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
