"""The `lora-cost` command: a thin click layer over the Python API, one file per subcommand.

Bad input is one line on stderr and exit code 2, never a traceback (set LORA_COST_DEBUG=1 to see
one for an unexpected internal error).
"""

from __future__ import annotations

import os
import sys

import click

from ..errors import LoraCostError


class _Group(click.Group):
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


def _register() -> None:
    from . import estimate, models  # noqa: F401  (each file adds its command to `main`)
    for optional in ("plan", "report", "profile"):
        try:
            __import__(f"{__name__}.{optional}")
        except ImportError:  # a subcommand whose module is not there yet
            pass


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
