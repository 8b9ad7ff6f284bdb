"""``persona db info`` and ``persona models info|prepare``: the database and the models as
persona-studio sees them."""

from __future__ import annotations

import argparse

from tui.cli.context import open_store
from tui.cli.output import err, out
from tui.cli.parser import add_command


def cmd_db_info(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        info = store.info()
    out.print(f"database  {info['path']}")
    out.print(f"schema    {info['schema_version']} (journal {info['journal_mode']})")
    for table, count in info["tables"].items():
        out.print(f"  {table:<13}{count:>8}")
    return 0


def cmd_models_info(args: argparse.Namespace) -> int:
    from pipeline.chat import stop_token_ids, supports_system_role
    from pipeline.models import load_model

    with err.status(f"loading {args.model} (a first use of smollm2 converts it once)"):
        loaded = load_model(args.model, device=args.device)
    config = loaded.model.config
    n_params = sum(p.numel() for p in loaded.model.parameters())
    out.print(f"model       {loaded.model_id}")
    out.print(f"folder      {loaded.path}")
    shape = f"{loaded.num_layers} layers, hidden {config.hidden_size}"
    out.print(f"parameters  {n_params / 1e6:.1f}M, {shape}")
    out.print(f"vectors     [{loaded.num_layers + 1}, {config.hidden_size}] (index 0 = embeddings)")
    out.print(f"device      {loaded.device}, dtype {next(loaded.model.parameters()).dtype}")
    system_role = "yes" if supports_system_role(loaded.tokenizer) else "folded into user turn"
    out.print(f"system role {system_role}")
    out.print(f"stop ids    {stop_token_ids(loaded.tokenizer, config)}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    dbp = commands.add_parser("db", help="database maintenance")
    db_cmds = dbp.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    add_command(
        db_cmds, "info", cmd_db_info, "show the database path, schema version and row counts"
    )

    models = commands.add_parser("models", help="check and prepare models")
    model_cmds = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    for name, help_ in (
        ("info", "load a model and print what persona-studio sees"),
        ("prepare", "convert/load a model once so later runs start fast (smollm2 by default)"),
    ):
        sub = add_command(model_cmds, name, cmd_models_info, help_)
        sub.add_argument("model", nargs="?", default="smollm2")
        sub.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
