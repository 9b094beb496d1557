"""Typer commands, one module per command group; each has ``register(app)``."""
