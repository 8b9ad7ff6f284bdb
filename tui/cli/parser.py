"""The parser's pieces every command module uses: one-line argparse errors, the --db option
accepted before or after a subcommand, and ``add_command`` that ties a subcommand to its
handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import cache
from typing import Any, NoReturn

from tui.cli.arguments import StepDefaultsFormatter
from tui.cli.context import DEFAULT_DB
from tui.cli.output import err

Handler = Callable[[argparse.Namespace], int]


class CommandParser(argparse.ArgumentParser):
    """argparse's own errors as one ``error:`` line, like every other bad input, instead of
    a usage block: the line names the option and ``--help`` shows the rest. Its help names
    the defaults of options left to a step's dataclass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", StepDefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        err.print(
            f"error: {message}; see `{self.prog} --help`",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        self.exit(2)


@cache
def common_options() -> CommandParser:
    """--db, a parent of the top-level parser and of every subcommand (before or after it)."""
    common = CommandParser(add_help=False)
    common.add_argument(
        "--db",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"SQLite database (default: $PERSONA_DB or ./{DEFAULT_DB})",
    )
    return common


def add_command(
    group: argparse._SubParsersAction, name: str, handler: Handler, help_: str
) -> argparse.ArgumentParser:
    sub = group.add_parser(name, help=help_, description=help_, parents=[common_options()])
    sub.set_defaults(handler=handler)
    return sub
