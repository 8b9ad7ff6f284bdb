"""``persona extract``, ``persona vectors ...`` and ``persona import-csv``: vectors from the
effective pairs, their report, and files in the original project's formats."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table
from rich.text import Text

from tui.cli.arguments import VECTOR_KINDS, add_gpus, add_pair_filter, output_folder
from tui.cli.context import open_store
from tui.cli.output import err, out, print_pair_counts, print_report
from tui.cli.parser import add_command


def cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.extract import extract

    with open_store(args) as store, err.status("extracting"):
        result = extract(
            store,
            args.trait,
            threshold=args.threshold,
            coherence=args.coherence,
            source=args.source,
            model=args.model,
            device=args.device,
            pos_job=args.pos_job,
            neg_job=args.neg_job,
            judge=args.judge,
            gpus=args.gpus,
        )
    print_pair_counts(result.pairs)
    out.print(f"vectors from {result.source} activations of {result.model}:")
    for kind, path in result.paths.items():
        shape = list(result.vectors[kind].shape)
        out.print(f"  {kind:<18} {shape} {path}")
    for warning in result.warnings:
        if warning != result.pairs.advice():
            err.print(Text("warning: " + warning, style="yellow"))
    return 0


def cmd_vectors_show(args: argparse.Namespace) -> int:
    from pipeline.analyze import analyze

    with open_store(args) as store:
        report = analyze(store, args.trait, model=args.model, device=args.device)
    print_report(report)
    return 0


def cmd_vectors_list(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        records = store.vectors(trait=args.trait)
    table = Table(title=f"{len(records)} vectors")
    for column in ("id", "trait", "kind", "model", "pairs", "T/C", "path"):
        table.add_column(column, overflow="fold")
    for r in records:
        cells = (
            r.id,
            r.trait,
            r.kind,
            r.model,
            r.n_pairs,
            f"{r.threshold:g}/{r.coherence:g}",
            r.path,
        )
        table.add_row(*(Text(str(c)) for c in cells))
    out.print(table)
    return 0


def cmd_vectors_export(args: argparse.Namespace) -> int:
    from pipeline.trait_vectors import export_vectors

    with open_store(args) as store:
        written = export_vectors(
            store, args.trait, Path(args.out), model=args.model, device=args.device
        )
    for path, shape in written:
        out.print(f"wrote {path} {shape} (row L: hidden_states[L], final norm applied)")
    return 0


def cmd_vectors_import(args: argparse.Namespace) -> int:
    from pipeline.trait_vectors import import_vector

    with open_store(args) as store, err.status(f"loading {args.model} to check the shape"):
        shape = import_vector(store, args.trait, Path(args.path), model=args.model, kind=args.kind)
    out.print(f"imported {args.path} as {args.trait} {args.kind} {shape}")
    return 0


def cmd_import_csv(args: argparse.Namespace) -> int:
    from pipeline.import_csv import import_csv

    with open_store(args) as store, err.status("importing"):
        result = import_csv(
            store, args.trait, args.pos, args.neg, model=args.model, judge=args.judge
        )
    out.print(
        f"imported {result.pos_rows} pos rows (job {result.pos_job}) and {result.neg_rows} neg "
        f"rows (job {result.neg_job}); {result.unscored} scores were empty"
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    ext = add_command(
        commands, "extract", cmd_extract, "extract response/prompt vectors from the effective pairs"
    )
    add_pair_filter(ext)
    ext.add_argument("--source", choices=("auto", "captured", "forward"), default="auto")
    ext.add_argument("--model", help="model for the forward path (default: the generator)")
    ext.add_argument("--device")
    add_gpus(ext)

    vec = commands.add_parser("vectors", help="show, list, export and import vectors")
    vec_cmds = vec.add_subparsers(dest="vectors_command", metavar="ACTION", required=True)
    show_v = add_command(
        vec_cmds,
        "show",
        cmd_vectors_show,
        "per-layer norms, eval AUROC and Cohen's d, recommended layer, similarity",
    )
    show_v.add_argument("trait")
    show_v.add_argument("--model")
    show_v.add_argument("--device")
    list_v = add_command(vec_cmds, "list", cmd_vectors_list, "list stored vectors")
    list_v.add_argument("--trait")
    exp_v = add_command(
        vec_cmds,
        "export",
        cmd_vectors_export,
        "write {trait}_{kind}.pt float32 tensors (the original format)",
    )
    exp_v.add_argument("trait")
    exp_v.add_argument("--format", choices=("pt",), default="pt")
    exp_v.add_argument("--out", type=output_folder, default=".")
    exp_v.add_argument("--model")
    exp_v.add_argument("--device", help="for the forward pass that computes row L")
    imp_v = add_command(
        vec_cmds,
        "import",
        cmd_vectors_import,
        "read a .pt vector (weights_only) and check its shape against a model",
    )
    imp_v.add_argument("trait")
    imp_v.add_argument("path")
    imp_v.add_argument("--model", default="smollm2")
    imp_v.add_argument("--kind", default="response_avg_diff", choices=VECTOR_KINDS)

    imp_csv = add_command(
        commands,
        "import-csv",
        cmd_import_csv,
        "import the original project's pos/neg CSVs (re-tokenised with --model)",
    )
    imp_csv.add_argument("trait")
    imp_csv.add_argument("--pos", required=True, help="the pos side's CSV")
    imp_csv.add_argument("--neg", required=True, help="the neg side's CSV")
    imp_csv.add_argument("--model", required=True, help="the model that generated them")
    imp_csv.add_argument("--judge", default="imported", help="name for the CSV's scores")
