"""The `ovtasks` command."""

from ovtasks.cli.main import main

__all__ = ["main"]
