"""``persona tui`` (and ``persona`` alone): open the dashboard. Textual loads here and only
here."""

from __future__ import annotations

import argparse

from tui.cli.context import db_path, open_store, require_terminal
from tui.cli.parser import add_command


def cmd_tui(args: argparse.Namespace) -> int:
    from tui.app import PersonaApp  # Textual loads here and only here

    require_terminal()
    # Open (and create or migrate) the store before the screen takes the terminal, so a bad
    # --db is a one-line error rather than a crash inside the app.
    open_store(args).close()
    PersonaApp(db_path=db_path(args)).run()
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "tui", cmd_tui, "open the dashboard (the default command)")
