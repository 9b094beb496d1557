"""The ``gator-hw`` command: thin Typer commands that call the library and print results.

``GatorError`` becomes one line on stderr and exit code 1, here and nowhere else.
"""

from __future__ import annotations

import sys

import typer

from gator_hw.commands import convert, costmodel, edges, plot
from gator_hw.commands.common import err_console
from gator_hw.errors import GatorError

__all__ = ["app", "main"]

app = typer.Typer(
    name="gator-hw",
    help="Hardware-aware channel pruning of PyTorch CNNs with learned gates (GATOR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (edges, costmodel, plot, convert):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors print one line to stderr and exit with code 1."""
    try:
        app(args=argv, standalone_mode=False)
    except GatorError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Abort:
        err_console.print("Aborted.")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
