"""What every command reads from its arguments besides its own options: the database path
(--db, else $PERSONA_DB, else ./persona.db) and the store opened on it; and the check that a
terminal is there before the dashboard takes it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from db import PersonaError, Store

DEFAULT_DB = "persona.db"


def db_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "db", None) or os.environ.get("PERSONA_DB") or DEFAULT_DB)


def open_store(args: argparse.Namespace) -> Store:
    return Store(db_path(args))


def require_terminal() -> None:
    """The dashboard draws on a terminal; piped, it would write escape codes forever."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise PersonaError(
            "the dashboard needs a terminal (stdin and stdout are not one here); run it in "
            "a terminal, or use a subcommand (`persona --help` lists them)"
        )
