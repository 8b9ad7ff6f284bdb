"""The ``persona`` command line. Headless commands call the same pipeline functions as the
dashboard; Textual is imported only when the dashboard opens."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from db import PersonaError, Store
from db.traits import empty_template, read_trait_file, write_trait_files

DEFAULT_DB = "persona.db"

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _db_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "db", None) or os.environ.get("PERSONA_DB") or DEFAULT_DB)


def _open_store(args: argparse.Namespace) -> Store:
    return Store(_db_path(args))


# ---- commands -----------------------------------------------------------------------------
def cmd_tui(args: argparse.Namespace) -> int:
    from tui.app import PersonaApp  # Textual loads here and only here

    # Open (and create or migrate) the store before the screen takes the terminal, so a bad
    # --db is a one-line error rather than a crash inside the app.
    _open_store(args).close()
    PersonaApp(db_path=_db_path(args)).run()
    return 0


def cmd_traits_list(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        traits = store.list_traits()
    table = Table(title=f"{len(traits)} traits in {_db_path(args)}")
    table.add_column("name", no_wrap=True)
    table.add_column("source", no_wrap=True)
    for column in ("Q", "responses", "judged", "vectors"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("description", ratio=1, min_width=16, overflow="fold")
    for t in traits:
        # Text, not str: a name or description may hold "[" that markup would eat.
        cells = (t.name, t.source, t.n_questions, t.n_responses, t.n_judged, t.n_vectors)
        table.add_row(*(Text(str(c)) for c in cells), Text(t.description))
    out.print(table)
    return 0


def cmd_traits_show(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        trait = store.get_trait(args.name)
    if args.json:
        out.print_json(json.dumps(trait.to_dict(), ensure_ascii=False))
        return 0
    out.print(Text.assemble((trait.name, "bold"), f" ({trait.assistant_label} assistant)"))
    out.print(trait.description, markup=False)
    for i, pair in enumerate(trait.instructions, 1):
        out.print(f"\n[bold]pair {i}[/bold]")
        out.print(Text.assemble("  ", ("pos ", "green"), pair.pos))
        out.print(Text.assemble("  ", ("neg ", "red"), pair.neg))
    for split in ("extract", "eval"):
        out.print(f"\n[bold]{split} questions[/bold]")
        for i, q in enumerate(trait.questions_for(split), 1):
            out.print(f"  {i:2d}. ", q, markup=False)
    out.print("\n[bold]judge prompt[/bold]")
    out.print(trait.eval_prompt, markup=False)
    return 0


def cmd_traits_import(args: argparse.Namespace) -> int:
    trait = read_trait_file(
        args.path,
        name=args.name,
        description=args.description or "",
        assistant_name=args.assistant_name or "",
    ).validate()
    with _open_store(args) as store:
        store.save_trait(trait, source=f"imported:{Path(args.path).name}", replace=args.force)
    out.print(f"imported trait {trait.name} (5 pairs, 40 questions)")
    return 0


def cmd_traits_export(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        trait = store.get_trait(args.name)
    for path in write_trait_files(trait, args.out, args.format):
        out.print(f"wrote {path}")
    return 0


def cmd_traits_validate(args: argparse.Namespace) -> int:
    """Validate files when paths are given, else every trait in the database."""
    failures = 0
    if args.paths:
        checked = []
        for path in args.paths:
            try:
                checked.append((str(path), read_trait_file(path, name=args.name).problems()))
            except PersonaError as exc:
                checked.append((str(path), [str(exc)]))
    else:
        with _open_store(args) as store:
            checked = [(t.name, store.get_trait(t.name).problems()) for t in store.list_traits()]
    for label, problems in checked:
        if problems:
            failures += 1
            for problem in problems:
                err.print(Text.assemble(("FAIL ", "red"), f"{label}: {problem}"))
        else:
            out.print(Text.assemble(("ok   ", "green"), label))
    if failures:
        err.print(f"{failures} of {len(checked)} trait definitions are invalid")
        return 1
    return 0


def cmd_traits_new(args: argparse.Namespace) -> int:
    from pipeline.author import AuthorParams, create_author_job
    from pipeline.jobs import run_job

    params = AuthorParams(
        name=args.name,
        description=args.description,
        author=args.author,
        base_url=args.base_url,
        thinking=args.thinking,
        assistant_name=args.assistant_name,
    )
    with _open_store(args) as store:
        job_id = create_author_job(store, params, force=args.force)
    with err.status(f"asking {args.author} to write trait {args.name}"):
        run_job(_db_path(args), job_id)
    out.print(f"wrote trait {args.name}; review it with `persona traits show {args.name}`")
    return 0


def cmd_traits_template(args: argparse.Namespace) -> int:
    payload = json.dumps(empty_template(args.name, args.description or ""), indent=2)
    if args.out:
        Path(args.out).write_text(payload + "\n", encoding="utf-8")
        out.print(f"wrote {args.out}; fill it in, then `persona traits import {args.out}`")
    else:
        print(payload)
    return 0


def cmd_traits_delete(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        store.delete_trait(args.name)
    out.print(f"deleted trait {args.name} and everything stored for it")
    return 0


def cmd_db_info(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
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


def _progress_bar():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


def _run_jobs_with_progress(db_path: Path, jobs: list[tuple[int, str]]) -> None:
    from pipeline.jobs import ProgressUpdate, run_job

    with _progress_bar() as bar:
        for job_id, label in jobs:
            task = bar.add_task(label, total=None, rate="")

            def show(update: ProgressUpdate, task=task) -> None:
                per_s = update.stats.get("new_tokens_per_s")
                rate = f"{per_s:,.0f} tok/s" if per_s else update.message
                bar.update(task, completed=update.done, total=update.total, rate=rate)

            run_job(db_path, job_id, on_progress=show)


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.generate import GenerateParams, find_or_create_job

    sides = ["pos", "neg"] if args.side == "both" else [args.side]
    jobs = []
    with _open_store(args) as store:
        for side in sides:
            params = GenerateParams(
                side=side,
                split=args.split,
                model=args.model,
                n_per_question=args.n_per_question,
                all_instructions=args.all_instructions,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
                batch_size=args.batch_size,
                assistant_name=args.assistant_name,
                capture=not args.no_capture,
                backend=args.backend,
                base_url=args.base_url,
                tokenizer=args.tokenizer,
                max_concurrent=args.max_concurrent,
                device=args.device,
            ).validate()
            job_id = find_or_create_job(store, args.trait, params)
            jobs.append((job_id, f"job {job_id} {args.trait} {side}/{args.split}"))
    _run_jobs_with_progress(_db_path(args), jobs)
    with _open_store(args) as store:
        for job_id, label in jobs:
            job = store.get_job(job_id)
            out.print(f"{label}: {job.status}, {job.done}/{job.total} responses")
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from pipeline.judging import JudgeParams, find_or_create_judge_job

    params = JudgeParams(
        judge=args.judge,
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        job=args.job,
        max_concurrent=args.max_concurrent,
        base_url=args.base_url,
        samples=args.samples,
        prices=args.prices,
        device=args.device,
    ).validate()
    with _open_store(args) as store:
        job_id = find_or_create_judge_job(store, args.trait, params)
    _run_jobs_with_progress(_db_path(args), [(job_id, f"job {job_id} judge {args.trait}")])
    with _open_store(args) as store:
        job = store.get_job(job_id)
    out.print(f"job {job_id}: {job.status}, {job.done}/{job.total} judgments")
    for metric, counts in job.stats.get("counts", {}).items():
        out.print(
            f"  {metric:<10} scored {counts['scored']}, refused {counts['refused']}, "
            f"failed {counts['failed']}"
        )
    cost = job.stats.get("cost")
    if cost:
        out.print(f"  cost ${cost:.4f}, {int(job.stats.get('tokens', 0)):,} tokens")
    if job.message:
        out.print(job.message, markup=False)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one job to its end, headless; the dashboard starts this detached."""
    from pipeline.jobs import run_job

    run_job(_db_path(args), args.job_id)
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        jobs = store.list_jobs(trait=args.trait)
    table = Table(title=f"{len(jobs)} jobs")
    for column in ("id", "kind", "trait", "status", "done", "message"):
        table.add_column(column, no_wrap=column != "message")
    for job in jobs:
        table.add_row(
            *(Text(str(c)) for c in (job.id, job.kind, job.trait or "", job.status)),
            Text(f"{job.done}/{job.total}"),
            Text(job.message),
        )
    out.print(table)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        job = store.get_job(args.job_id)
        if job.status in ("done", "failed", "cancelled"):
            raise PersonaError(f"job {job.id} is already {job.status}; nothing to cancel")
        store.update_job(job.id, status="cancelled", message="cancel requested")
    out.print(f"job {args.job_id} will stop after its current batch")
    return 0


# ---- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    # --db is accepted before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"SQLite database (default: $PERSONA_DB or ./{DEFAULT_DB})",
    )
    parser = argparse.ArgumentParser(
        prog="persona",
        description="Turn a trait description into a persona vector; review and monitor it.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(
        group: argparse._SubParsersAction, name: str, handler: Callable, help_: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_, description=help_, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    add(commands, "tui", cmd_tui, "open the dashboard (the default command)")

    traits = commands.add_parser("traits", help="list, show, import, export, validate traits")
    traits_cmds = traits.add_subparsers(dest="traits_command", metavar="ACTION", required=True)
    add(traits_cmds, "list", cmd_traits_list, "list the traits in the database with counts")
    show = add(traits_cmds, "show", cmd_traits_show, "print one trait definition")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print the studio JSON format")
    imp = add(
        traits_cmds,
        "import",
        cmd_traits_import,
        "import a trait: a studio JSON file, an original trait_data_{extract,eval}/NAME.json "
        "file, or an original root folder with --name",
    )
    imp.add_argument("path")
    imp.add_argument(
        "--name", help="picks NAME.json in an original root folder; renames a file's trait"
    )
    imp.add_argument("--description", help="description, for original-format files")
    imp.add_argument("--assistant-name", help='adjective for "You are a/an ... assistant."')
    imp.add_argument("--force", action="store_true", help="replace a trait of the same name")
    exp = add(traits_cmds, "export", cmd_traits_export, "write a trait to files")
    exp.add_argument("name")
    exp.add_argument("--out", default=".", help="folder to write into (default: .)")
    exp.add_argument(
        "--format",
        choices=("original", "studio"),
        default="original",
        help="original: trait_data_extract/ and trait_data_eval/; studio: one NAME.json",
    )
    val = add(
        traits_cmds,
        "validate",
        cmd_traits_validate,
        "check trait files (or, with no path, every trait in the database)",
    )
    val.add_argument("paths", nargs="*", type=Path)
    val.add_argument("--name", help="trait name when a path is an original root folder")
    from pipeline.author import DEFAULT_AUTHOR

    new = add(traits_cmds, "new", cmd_traits_new, "have an LLM write a trait from a description")
    new.add_argument("name")
    new.add_argument("--description", required=True)
    new.add_argument(
        "--author",
        default=DEFAULT_AUTHOR,
        help=f"KIND:MODEL, anthropic, openai or local "
        f"(default {DEFAULT_AUTHOR}; keys from ANTHROPIC_API_KEY / OPENAI_API_KEY)",
    )
    new.add_argument("--base-url", help="an Anthropic- or OpenAI-compatible server")
    new.add_argument("--thinking", type=int, default=0, help="Anthropic thinking budget, tokens")
    new.add_argument("--assistant-name", help='adjective for "You are a/an ... assistant."')
    new.add_argument("--force", action="store_true", help="replace a trait of the same name")
    tpl = add(traits_cmds, "template", cmd_traits_template, "print an empty trait to fill in")
    tpl.add_argument("name")
    tpl.add_argument("--description")
    tpl.add_argument("--out", help="write to this file instead of stdout")
    dele = add(traits_cmds, "delete", cmd_traits_delete, "delete a trait and all its data")
    dele.add_argument("name")

    gen = add(
        commands,
        "generate",
        cmd_generate,
        "generate pos/neg answers for a trait's questions (resumable: rerun to continue)",
    )
    gen.add_argument("trait")
    gen.add_argument("--side", choices=("pos", "neg", "both"), required=True)
    gen.add_argument("--split", choices=("extract", "eval"), default="extract")
    gen.add_argument("--model", default="smollm2", help="smollm2, a model folder or cached id")
    gen.add_argument(
        "--n-per-question",
        type=int,
        default=10,
        help="answers per question, instructions rotated (default 10)",
    )
    gen.add_argument(
        "--all-instructions",
        action="store_true",
        help="n answers for every (question, instruction) pair instead",
    )
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-new-tokens", type=int, default=1000)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per batch (default 64 on CUDA, 8 on CPU)",
    )
    gen.add_argument("--assistant-name", help='adjective in "You are a/an ... assistant."')
    gen.add_argument(
        "--no-capture", action="store_true", help="do not capture activations during generation"
    )
    gen.add_argument("--backend", choices=("local", "openai"), default="local")
    gen.add_argument("--base-url", help="OpenAI-compatible server for --backend openai")
    gen.add_argument("--tokenizer", help="local tokenizer for token ids with --backend openai")
    gen.add_argument("--max-concurrent", type=int, default=16)
    gen.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")

    from pipeline.judging import DEFAULT_JUDGE

    jud = add(
        commands,
        "judge",
        cmd_judge,
        "score a trait's responses for the trait and coherence (resumable: rerun to continue)",
    )
    jud.add_argument("trait")
    jud.add_argument("--job", type=int, help="only this generation job's responses")
    jud.add_argument(
        "--judge",
        default=DEFAULT_JUDGE,
        help=f"KIND:MODEL with KIND openai, anthropic or local (default {DEFAULT_JUDGE}); "
        "local:smollm2 is a smoke-test judge only: a 135M model has no real signal",
    )
    jud.add_argument("--metrics", default="trait,coherence")
    jud.add_argument("--max-concurrent", type=int, default=50)
    jud.add_argument("--base-url", help="an OpenAI- or Anthropic-compatible server")
    jud.add_argument("--samples", type=int, default=1, help="anthropic: average k answers")
    jud.add_argument("--prices", help="JSON file of model: [input, output] $ per 1M tokens")
    jud.add_argument("--device", help="local judge: cpu, cuda or cuda:N")

    worker = add(commands, "worker", cmd_worker, "run one job by id (used by the dashboard)")
    worker.add_argument("job_id", type=int)

    jobs = commands.add_parser("jobs", help="list and cancel jobs")
    job_cmds = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    jl = add(job_cmds, "list", cmd_jobs_list, "list jobs with status and progress")
    jl.add_argument("--trait")
    jc = add(job_cmds, "cancel", cmd_jobs_cancel, "ask a running job to stop")
    jc.add_argument("job_id", type=int)

    dbp = commands.add_parser("db", help="database maintenance")
    db_cmds = dbp.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    add(db_cmds, "info", cmd_db_info, "show the database path, schema version and row counts")

    models = commands.add_parser("models", help="check and prepare models")
    model_cmds = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    for name, help_ in (
        ("info", "load a model and print what persona-studio sees"),
        ("prepare", "convert/load a model once so later runs start fast (smollm2 by default)"),
    ):
        sub = add(model_cmds, name, cmd_models_info, help_)
        sub.add_argument("model", nargs="?", default="smollm2")
        sub.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None) or cmd_tui
    try:
        return int(handler(args) or 0)
    except PersonaError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
