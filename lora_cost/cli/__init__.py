"""The `lora-cost` command: a thin click layer over the Python API, one file per subcommand.

Bad input is one line on stderr and exit code 2, never a traceback (set LORA_COST_DEBUG=1 to see
one for an unexpected internal error).
"""

from __future__ import annotations

import os
import sys

import click

from ..errors import LoraCostError


# the modules whose commands make up `lora-cost` (each file adds its commands to `main` when imported)
COMMAND_MODULES = ("estimate", "models", "plan", "report", "profile")


class _Group(click.Group):
    """`main`: imports a subcommand's module only when that command is asked for (`lora-cost estimate`
    imports estimate.py, not plan's or the profiler's), every module when listing them (--help)."""

    def get_command(self, ctx: click.Context, cmd_name: str):
        if cmd_name not in self.commands:
            _register(cmd_name)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context):
        _register()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoraCostError as exc:
            click.echo(f"lora-cost: error: {exc}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("lora-cost: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # an internal error: still one line unless debugging
            if os.environ.get("LORA_COST_DEBUG"):
                raise
            click.echo(f"lora-cost: internal error: {type(exc).__name__}: {exc} (LORA_COST_DEBUG=1 shows the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-cost")
def main() -> None:
    """What fine-tuning a transformer will cost: memory and FLOPs of one training step."""


def _register(command: str | None = None) -> None:
    """Import the module named like `command` (a command of another name, e.g. `gpus` in models.py, or
    None: every module of COMMAND_MODULES)."""
    import importlib

    modules = (command,) if command in COMMAND_MODULES else COMMAND_MODULES
    for module in modules:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ImportError:  # a subcommand whose module is not there yet
            if module in ("estimate", "models"):
                raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
