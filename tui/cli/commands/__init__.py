"""One module per command group; each has ``register(subparsers)`` that adds its
subcommands, their options and handlers. The order here is the order of ``persona --help``."""

from tui.cli.commands import (
    dashboard,
    finetuning,
    generation,
    jobs,
    maintenance,
    monitoring,
    run,
    traits,
    vectors,
)

COMMAND_MODULES = (
    dashboard,
    traits,
    generation,
    vectors,
    run,
    monitoring,
    finetuning,
    jobs,
    maintenance,
)
