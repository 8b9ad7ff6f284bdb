"""The ``persona`` entry point: the parser built from each command module's ``register``, and
the one place that turns a user's mistake (a bad value, file or database) into a single
``error:`` line and a non-zero exit, while our own bugs keep their traceback."""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import USER_ERRORS
from tui.cli.commands import COMMAND_MODULES
from tui.cli.commands.dashboard import cmd_tui
from tui.cli.context import db_path
from tui.cli.output import err, printable
from tui.cli.parser import CommandParser, common_options


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="persona",
        description="Turn a trait description into a persona vector; review and monitor it.",
        parents=[common_options()],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def _database_problem(path: Path, exc: sqlite3.DatabaseError) -> str | None:
    """One line for SQLite failing on a database that opened fine: a page damaged past the
    header, a full disk, a lock held too long. None for anything else (our own bug, such as
    a wrong column name, keeps its traceback)."""
    text = str(exc)
    if "malformed" in text or "not a database" in text:
        return (
            f"the database {path} is damaged ({text}); restore a backup, or move it aside and "
            "pass another --db (`sqlite3 FILE .recover` may save its rows)"
        )
    if "locked" in text or "busy" in text:
        return (
            f"the database {path} stayed locked by another process ({text}); wait for it to "
            "finish or stop it, then rerun"
        )
    if any(word in text for word in ("disk", "full", "readonly", "unable to open")):
        return f"cannot use the database {path} ({text}); check free disk space and permissions"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument already reported in one line
        return exc.code if isinstance(exc.code, int) else 2
    handler = getattr(args, "handler", None) or cmd_tui
    try:
        return int(handler(args) or 0)
    except USER_ERRORS as exc:
        err.print(f"error: {printable(exc)}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except sqlite3.DatabaseError as exc:
        # Integrity and programming errors are our bugs; only the file's state is the user's.
        message = _database_problem(db_path(args), exc)
        if message is None or type(exc) not in (sqlite3.DatabaseError, sqlite3.OperationalError):
            raise
        err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
