"""Using a vector: ``persona monitor`` (per-token projections), ``persona steer`` (steered
answers side by side), ``persona sweep`` (a judged layer x coefficient grid) and ``persona
screen`` (a fine-tuning dataset ranked by projection)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table
from rich.text import Text

from tui.cli.arguments import (
    VECTOR_KINDS,
    add_compile,
    add_deterministic,
    add_gpus,
    input_file,
    non_negative_float,
    number_list,
    output_file,
    positive_int,
    row_id,
    seed_int,
)
from tui.cli.context import db_path, open_store
from tui.cli.output import err, out, printable, run_jobs_with_progress
from tui.cli.parser import add_command

DEFAULT_COEF = 2.0  # steer's coefficient when neither --coef nor --cap is given


def cmd_monitor(args: argparse.Namespace) -> int:
    from pipeline.monitor import monitor_answer
    from tui.widgets.heatmap import heatmap, legend

    with open_store(args) as store:
        shown = monitor_answer(
            store,
            args.trait,
            kind=args.vector,
            response_id=args.response,
            prompt=args.prompt,
            layer=args.layer,
            model=args.model,
            device=args.device,
            zscored=args.zscore,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    proj = shown.projections
    values = proj.values[:, 0, 0].tolist()
    start = 0 if args.show_prompt else proj.prompt_len
    scale = max((abs(v) for v in values[start:]), default=1.0) or 1.0
    unit = "z-score" if proj.zscored else "h.v/|v|"
    out.print(Text(f"{args.trait} {args.vector} at layer {shown.layer} ({unit})", style="bold"))
    out.print(heatmap(proj.tokens, values, scale=scale, start=start))
    out.print(legend(scale, unit))
    mean = proj.response_average()[0, 0].item()
    out.print(f"response average {mean:+.3f} over {len(proj.tokens) - proj.prompt_len} tokens")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from rich.columns import Columns
    from rich.panel import Panel

    from pipeline.steer import steer_side_by_side

    # A cap alone compares capped with unsteered; without one, steering adds DEFAULT_COEF.
    coefs = args.coef if args.coef is not None else [] if args.cap is not None else [DEFAULT_COEF]
    with open_store(args) as store:
        result = steer_side_by_side(
            store,
            args.trait,
            kind=args.vector,
            model=args.model,
            layer=args.layer,
            coefs=coefs,
            prompt=args.prompt,
            positions=args.positions,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            device=args.device,
            ablate=args.ablate,
            cap=args.cap,
        )
    panels = [
        Panel(Text(printable(text)), title=Text(label), expand=True)
        for label, text in result.items()
    ]
    out.print(Columns(panels, equal=True, expand=True))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep import (
        DEFAULT_COEFS,
        SweepParams,
        create_sweep_job,
        parse_coefs,
        parse_layers,
    )

    params = SweepParams(
        layers=parse_layers(args.layers),
        coefs=DEFAULT_COEFS if args.coefs is None else parse_coefs(args.coefs),
        n=args.n,
        judge=args.judge,
        judge_base_url=args.judge_base_url,
        model=args.model,
        positions=args.positions,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        prune_top=args.prune_top,
        device=args.device,
        gpus=args.gpus,
        batch_size=args.batch_size,
        compile=args.compile,
        deterministic=args.deterministic,
    )
    with open_store(args) as store:
        job_id = create_sweep_job(store, args.trait, params)
    run_jobs_with_progress(db_path(args), [(job_id, f"job {job_id} sweep {args.trait}")])
    with open_store(args) as store:
        stats = store.get_job(job_id).stats
    table = Table(title=f"sweep of {args.trait}: mean judged scores (layer 0 = unsteered)")
    for column in ("layer", "coef", "n", "trait", "coherence"):
        table.add_column(column, justify="right")
    best = stats.get("best", {})
    marked = {(r["layer"], r["coef"]) for r in (best.get("up"), best.get("down")) if r}
    for row in stats.get("table", []):
        cells = [
            str(row["layer"]),
            f"{row['coef']:+g}",
            str(row["n"]),
            "-" if row["trait"] is None else f"{row['trait']:.1f}",
            "-" if row["coherence"] is None else f"{row['coherence']:.1f}",
        ]
        style = "bold green" if (row["layer"], row["coef"]) in marked else None
        table.add_row(*(Text(c) for c in cells), style=style)
    out.print(table)
    for direction in ("up", "down"):
        row = best.get(direction)
        if row:
            out.print(
                f"best {direction}: layer {row['layer']} coef {row['coef']:+g} "
                f"(trait {row['trait']:.1f}, coherence {row['coherence']:.1f})"
            )
        else:
            out.print(f"best {direction}: none keeps mean coherence >= 50")
    if stats.get("pruned"):
        out.print(f"layers kept after AUROC pre-ranking: {stats['pruned']['kept']}")
    return 0


def cmd_screen(args: argparse.Namespace) -> int:
    from pipeline.screening import screen, write_ranking

    with open_store(args) as store, err.status("screening"):
        layer, rows = screen(
            store,
            args.trait,
            Path(args.data),
            layer=args.layer,
            compare_base=args.compare_base,
            model=args.model,
            device=args.device,
            gpus=args.gpus,
        )
    measure = "projection difference (data - base)" if args.compare_base else "projection"
    table = Table(title=f"{len(rows)} samples ranked by {measure} at layer {layer}")
    numbers = ["rank", "sample", "projection"] + (
        ["base", "difference"] if args.compare_base else []
    )
    # Numbers whole at any width (80 columns included): the answer, the one column that may
    # wrap, gives way first (Rich narrows wrapping columns before the others).
    for column in numbers:
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    table.add_column("response", overflow="fold")
    for rank, row in enumerate(rows[: args.top], 1):
        cells = [str(rank), str(row.index), f"{row.projection:+.3f}"]
        if args.compare_base:
            cells += [f"{row.base_projection:+.3f}", f"{row.difference:+.3f}"]
        cells.append(row.response.replace("\n", " ")[:120])
        table.add_row(*(Text(printable(c)) for c in cells))
    out.print(table)
    if args.out:
        out.print(f"wrote {write_ranking(rows, Path(args.out))}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    from pipeline.judging import DEFAULT_JUDGE
    from pipeline.sweep import DEFAULT_COEFS, format_coefs

    mon = add_command(
        commands,
        "monitor",
        cmd_monitor,
        "token-by-token projection heatmap of a stored response or a new answer",
    )
    mon.add_argument("trait")
    which = mon.add_mutually_exclusive_group(required=True)
    which.add_argument("--response", type=row_id, help="a stored response id")
    which.add_argument("--prompt", help="a new user message; the model answers it")
    mon.add_argument("--layer", type=int, help="default: the recommended layer")
    mon.add_argument("--vector", default="response_avg_diff", choices=VECTOR_KINDS)
    mon.add_argument(
        "--zscore",
        action="store_true",
        help="z-scores against the model's own answers with no system prompt",
    )
    mon.add_argument("--show-prompt", action="store_true")
    mon.add_argument("--model")
    mon.add_argument("--device")
    mon.add_argument("--max-new-tokens", type=positive_int, default=120)
    mon.add_argument("--temperature", type=non_negative_float, default=0.0)
    mon.add_argument("--seed", type=seed_int, default=0)

    st = add_command(commands, "steer", cmd_steer, "steered vs unsteered answers side by side")
    st.add_argument("trait")
    st.add_argument("--layer", type=int, required=True)
    st.add_argument(
        "--coef",
        type=number_list,
        help=f"one or more, comma-separated; start a negative with = (--coef=-2,2) (default "
        f"{DEFAULT_COEF:g}, none with --cap)",
    )
    st.add_argument("--prompt", required=True)
    st.add_argument("--positions", choices=("response", "prompt", "all"), default="response")
    st.add_argument("--ablate", action="store_true", help="project the direction out instead")
    st.add_argument(
        "--cap",
        type=float,
        metavar="TAU",
        help="also cap the projection h . v / |v| at TAU (the monitor's unit): "
        "h - max(0, h . u - TAU) u",
    )
    st.add_argument("--vector", default="response_avg_diff", choices=VECTOR_KINDS)
    st.add_argument("--model")
    st.add_argument("--device")
    st.add_argument("--max-new-tokens", type=positive_int, default=120)
    st.add_argument("--temperature", type=non_negative_float, default=0.0)
    st.add_argument("--seed", type=seed_int, default=0)

    sw = add_command(
        commands,
        "sweep",
        cmd_sweep,
        "steer the eval questions over a (layer, coef) grid and judge the answers",
    )
    sw.add_argument("trait")
    sw.add_argument("--layers", required=True, help="8-24, 8-24:4 or 8,12,16")
    sw.add_argument(
        "--coefs",
        help=f"default {format_coefs(DEFAULT_COEFS)}; a negative first needs = (--coefs=-2,2)",
    )
    sw.add_argument("--n", type=positive_int, default=5, help="eval questions (default 5)")
    sw.add_argument("--judge", default=DEFAULT_JUDGE)
    sw.add_argument("--judge-base-url")
    sw.add_argument("--model")
    sw.add_argument("--positions", choices=("response", "prompt", "all"), default="response")
    sw.add_argument("--max-new-tokens", type=positive_int, default=120)
    sw.add_argument("--seed", type=seed_int, default=0)
    sw.add_argument(
        "--prune-top", type=positive_int, help="keep the K layers with the best eval AUROC"
    )
    sw.add_argument("--device")
    sw.add_argument(
        "--batch-size",
        type=positive_int,
        help="steered answers decoded at once, every setting's in one queue (default: as "
        "many as free memory holds, at most 256 on a GPU and 64 on a CPU)",
    )
    add_gpus(sw)
    add_compile(sw)
    add_deterministic(sw)

    scr = add_command(
        commands,
        "screen",
        cmd_screen,
        "rank a fine-tuning dataset's samples by their projection on the trait",
    )
    scr.add_argument("trait")
    scr.add_argument(
        "--data", type=input_file, required=True, help="JSONL: prompt/response or chat messages"
    )
    scr.add_argument("--layer", type=int, help="default: the recommended layer")
    scr.add_argument(
        "--compare-base",
        action="store_true",
        help="also generate the model's own answers and rank by the difference",
    )
    scr.add_argument("--out", type=output_file, help="write the full ranking (.csv or .jsonl)")
    scr.add_argument("--top", type=positive_int, default=20, help="rows to print")
    scr.add_argument("--model")
    scr.add_argument("--device")
    add_gpus(scr)
