"""The ``persona`` command line, in harlequin's shape: ``main`` (entry point and error
handling), ``arguments`` (argument types), ``output`` (printing), and ``commands/`` with one
module per command group, each registering its own subcommands beside their handlers.
Headless commands call the same pipeline functions as the dashboard; Textual is imported
only when the dashboard opens."""

from tui.cli.memory import prefer_huge_pages

prefer_huge_pages()  # before any import of torch, which reads it once

from tui.cli.main import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]
