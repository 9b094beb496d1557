"""The ``gator-hw`` command: thin Typer commands that call the library and print results.

``GatorError`` becomes one line on stderr and exit code 1, here and nowhere else.
"""

from __future__ import annotations

import sys

import typer

from gator_hw.commands import convert, costmodel, edges, plot, profile, prune, quickstart
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

for _module in (quickstart, edges, profile, costmodel, plot, prune, convert):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors print one line to stderr and exit with code 1.

    Usage errors (unknown option, missing argument) are Click's: usage text, exit code 2.
    """
    try:
        app(args=argv)
    except GatorError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
