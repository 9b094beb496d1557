"""Thin entry point: ``python cli.py ...`` is the same as the ``gator-hw`` command."""

from gator_hw.cli import main

if __name__ == "__main__":
    main()
