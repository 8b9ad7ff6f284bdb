"""``persona extract``, ``persona vectors ...`` and ``persona import-csv``: vectors from the
effective pairs, their report, files in the original project's formats and llama.cpp's
control-vector format, and models with a vector baked into their weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table
from rich.text import Text

from db import PersonaError
from tui.cli.arguments import (
    VECTOR_KINDS,
    add_gpus,
    add_pair_filter,
    add_step_option,
    given,
    layer_list,
    output_folder,
    real_number,
    whole_number,
)
from tui.cli.context import open_store
from tui.cli.output import err, out, print_pair_counts, print_report
from tui.cli.parser import add_command

GGUF_OPTIONS = ("layers", "coef", "vector")  # GgufExportParams fields the command line sets


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
    if args.format == "gguf":
        return _export_gguf(args)
    gguf_only = [f"--{name}" for name in given(args, *GGUF_OPTIONS)]
    if gguf_only:
        raise PersonaError(
            f"{', '.join(gguf_only)} only apply to --format gguf; the pt files hold every "
            "layer of every kind unscaled (drop them, or add --format gguf)"
        )
    from pipeline.trait_vectors import export_vectors

    with open_store(args) as store:
        written = export_vectors(
            store, args.trait, Path(args.out), model=args.model, device=args.device
        )
    for path, shape in written:
        out.print(f"wrote {path} {shape} (row L: hidden_states[L], final norm applied)")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from pipeline.gguf_export import GgufExportParams, export_control_vector

    if args.device:
        raise PersonaError(
            "--device only applies to --format pt (its forward pass computes row L); a gguf "
            "control vector needs no model run, drop --device"
        )
    params = GgufExportParams(**given(args, *GGUF_OPTIONS), model=args.model)
    with open_store(args) as store:
        path = export_control_vector(store, args.trait, Path(args.out), params)
    out.print(f"wrote {path} (llama.cpp control vector: --control-vector {path.name})")
    return 0


def cmd_vectors_bake(args: argparse.Namespace) -> int:
    from pipeline.bake import BakeParams, bake

    params = BakeParams(
        layer=args.layer,
        coef=args.coef,
        model=args.model,
        verify=not args.no_verify,
        **given(args, "vector"),
    )
    with open_store(args) as store, err.status(f"baking {args.trait} into a copy of the model"):
        result = bake(store, args.trait, args.out, params)
    out.print(
        f"baked {args.trait} {params.vector} x {params.coef:g} at layer {params.layer} into "
        f"{result.out} ({result.family} written as {result.written_as}; the vector is "
        f"{result.where})"
    )
    if result.probe_error is None:
        out.print("not checked against steering (--no-verify)")
    else:
        out.print(
            f"checked: its logits on a probe prompt equal steering (positions=all) within "
            f"{result.probe_error:.2g} (relative)"
        )
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

    vec = commands.add_parser("vectors", help="show, list, export, import and bake vectors")
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
        "write {trait}_{kind}.pt float32 tensors (the original format) or, with --format "
        "gguf, a llama.cpp control vector",
    )
    exp_v.add_argument("trait")
    exp_v.add_argument("--format", choices=("pt", "gguf"), default="pt")
    exp_v.add_argument("--out", type=output_folder, default=".")
    exp_v.add_argument("--model", help="whose vector, when the trait has several models'")
    exp_v.add_argument("--device", help="pt: for the forward pass that computes row L")
    gguf = "pipeline.gguf_export:GgufExportParams"
    add_step_option(
        exp_v,
        "--layers",
        gguf,
        type=layer_list,
        metavar="LAYERS",
        help="gguf: our layers (2..L), e.g. 20, 16-24 or 12,20, each written as llama.cpp's "
        "direction.(l-1) (default: the recommended layer)",
    )
    add_step_option(exp_v, "--coef", gguf, type=real_number, help="gguf: scale written in")
    add_step_option(
        exp_v, "--vector", gguf, metavar="KIND", help=f"gguf: one of {', '.join(VECTOR_KINDS)}"
    )

    bake_v = add_command(
        vec_cmds,
        "bake",
        cmd_vectors_bake,
        "write a model folder whose weights add coef * v after block layer-1 at every "
        "position (servable by transformers, vLLM, llama.cpp after conversion)",
    )
    bake_v.add_argument("trait")
    bake_v.add_argument(
        "--layer", type=whole_number, required=True, help="L: added to block L-1's output"
    )
    bake_v.add_argument("--coef", type=real_number, required=True, help="C in C * v")
    bake_v.add_argument(
        "--out", type=Path, required=True, help="a new (or empty) folder for the baked model"
    )
    add_step_option(
        bake_v,
        "--vector",
        "pipeline.bake:BakeParams",
        metavar="KIND",
        help=f"one of {', '.join(VECTOR_KINDS)}",
    )
    bake_v.add_argument("--model", help="the model to bake into (default: the vector's own)")
    bake_v.add_argument(
        "--no-verify",
        action="store_true",
        help="skip loading the folder back to compare its logits with steering",
    )
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
