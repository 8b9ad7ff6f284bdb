"""The ``persona`` command line. Headless commands call the same pipeline functions as the
dashboard; Textual is imported only when the dashboard opens."""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table
from rich.text import Text

from db import PersonaError, Store
from db.traits import empty_template, read_trait_file, write_trait_files

DEFAULT_DB = "persona.db"
# The vectors package's own bad-input errors (it does not depend on db's PersonaError).
_FILE_ERRORS = {"VectorFileError", "ActivationFileError"}

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# ---- output ---------------------------------------------------------------------------------
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0, 9), *range(11, 32), 127, *range(128, 160))}


def printable(text: object) -> str:
    """Text from files, models or the command line as the terminal should show it: control
    characters (an ESC starting a clear-screen or window-title sequence) as visible escapes;
    newlines and tabs kept."""
    return str(text).translate(_CONTROL)


# ---- argument types -----------------------------------------------------------------------
# One checker per kind of value, shared by every option of that kind: a bad value stops at
# parse time with one line naming the option, before any database or model is opened.
MAX_SEED = 2**63 - 1  # seeds are packed as signed 64-bit integers (pipeline.sampling.row_seed)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None


def _real_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def row_id(text: str) -> int:
    """A database id (job, response): SQLite's integers stop at 2**63 - 1."""
    value = _whole_number(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an id from 0 to {MAX_SEED} (got {value})")
    return value


def positive_int(text: str) -> int:
    """A count that must be at least 1 (answers, tokens, batch rows, concurrent requests)."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def non_negative_int(text: str) -> int:
    """An index or budget that may be 0 but not negative (nor past SQLite's integers)."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEED} (got {value})")
    return value


def seed_int(text: str) -> int:
    value = _whole_number(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED} (got {value})")
    return value


def percent(text: str) -> float:
    """A 0-100 score threshold, the judges' scale."""
    value = _real_number(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100 (got {value:g})")
    return value


def non_negative_float(text: str) -> float:
    value = _real_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value:g})")
    return value


def positive_float(text: str) -> float:
    """A duration or size that must be above 0."""
    value = _real_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0 (got {value:g})")
    return value


def probability(text: str) -> float:
    """A nucleus mass in (0, 1]: 0 would keep no token at all."""
    value = _real_number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {value:g})")
    return value


def number_list(text: str) -> list[float]:
    """Comma-separated steering coefficients (finite, |c| <= MAX_COEF, at most MAX_COEFS)."""
    from pipeline.sweep import parse_coefs

    if not any(part.strip() for part in text.split(",")):
        raise argparse.ArgumentTypeError("is empty; give numbers such as 2 or -2,2")
    try:
        return list(parse_coefs(text))
    except PersonaError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--coefs ")) from None


def output_folder(text: str) -> Path:
    """A folder to write into; created when missing, so only an existing file (or a folder
    that cannot be made) is wrong."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file; pass a folder (made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise argparse.ArgumentTypeError(f"cannot make folder {path} ({reason})") from None
    return path


def output_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; pass a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"folder {path.parent} does not exist; create it first or write elsewhere"
        )
    return path


class _Parser(argparse.ArgumentParser):
    """argparse's own errors as one ``error:`` line, like every other bad input, instead of
    a usage block: the line names the option and ``--help`` shows the rest."""

    def error(self, message: str) -> NoReturn:
        err.print(
            f"error: {message}; see `{self.prog} --help`",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        self.exit(2)


def _db_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "db", None) or os.environ.get("PERSONA_DB") or DEFAULT_DB)


def _open_store(args: argparse.Namespace) -> Store:
    return Store(_db_path(args))


# ---- commands -----------------------------------------------------------------------------
def _require_terminal() -> None:
    """The dashboard draws on a terminal; piped, it would write escape codes forever."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise PersonaError(
            "the dashboard needs a terminal (stdin and stdout are not one here); run it in "
            "a terminal, or use a subcommand (`persona --help` lists them)"
        )


def cmd_tui(args: argparse.Namespace) -> int:
    from tui.app import PersonaApp  # Textual loads here and only here

    _require_terminal()
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
        table.add_row(*(Text(printable(c)) for c in cells), Text(printable(t.description)))
    out.print(table)
    return 0


def cmd_traits_show(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        trait = store.get_trait(args.name)
    if args.json:
        out.print_json(json.dumps(trait.to_dict(), ensure_ascii=False))
        return 0
    label = printable(f" ({trait.assistant_label} assistant)")
    out.print(Text.assemble((printable(trait.name), "bold"), label))
    out.print(printable(trait.description), markup=False)
    for i, pair in enumerate(trait.instructions, 1):
        out.print(f"\n[bold]pair {i}[/bold]")
        out.print(Text.assemble("  ", ("pos ", "green"), printable(pair.pos)))
        out.print(Text.assemble("  ", ("neg ", "red"), printable(pair.neg)))
    for split in ("extract", "eval"):
        out.print(f"\n[bold]{split} questions[/bold]")
        for i, q in enumerate(trait.questions_for(split), 1):
            out.print(f"  {i:2d}. ", printable(q), markup=False)
    out.print("\n[bold]judge prompt[/bold]")
    out.print(printable(trait.eval_prompt), markup=False)
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
        if Path(args.out).exists() and not args.force:
            raise PersonaError(f"{args.out} exists; pass --force to overwrite it or pick a path")
        Path(args.out).write_text(payload + "\n", encoding="utf-8")
        out.print(f"wrote {args.out}; fill it in, then `persona traits import {args.out}`")
    else:
        print(payload)
    return 0


def cmd_traits_delete(args: argparse.Namespace) -> int:
    from pipeline.deletion import delete_trait, trait_contents

    with _open_store(args) as store:
        contents = trait_contents(store, args.name)
        if not args.yes:
            if not sys.stdin.isatty():
                raise PersonaError(
                    f"deleting trait '{args.name}' removes {contents.summary()}; "
                    "pass --yes to confirm"
                )
            answer = input(f"delete trait '{args.name}': {contents.summary()}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                out.print("nothing deleted")
                return 1
        deleted = delete_trait(store, args.name)
    out.print(f"deleted trait {args.name}: {deleted.summary()}")
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


@contextmanager
def _progress_bar() -> Iterator[Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    )
    progress.start()
    try:
        yield progress
    except BaseException:
        # A failed step leaves no bar behind, nor the blank line Progress.stop adds off a
        # terminal: the error line printed next is then the only thing on stderr.
        progress.live.transient = True
        progress.live.stop()
        raise
    progress.stop()


def _bar_updater(bar, task):
    """A job progress callback that moves one bar: tokens/s for generation, else units/s."""
    from pipeline.jobs import ProgressUpdate

    def show(update: ProgressUpdate) -> None:
        per_s = update.stats.get("new_tokens_per_s")
        unit = update.stats.get("unit", "")
        if per_s:
            rate = f"{per_s:,.0f} tok/s"
        elif update.stats.get(f"{unit}_per_s"):
            rate = f"{update.stats[f'{unit}_per_s']:.1f} {unit}/s"
        else:
            rate = update.message
        bar.update(task, completed=update.done, total=update.total, rate=rate)

    return show


def _run_jobs_with_progress(db_path: Path, jobs: list[tuple[int, str]]) -> None:
    from pipeline.jobs import run_job

    with _progress_bar() as bar:
        for job_id, label in jobs:
            task = bar.add_task(label, total=None, rate="")

            run_job(db_path, job_id, on_progress=_bar_updater(bar, task))


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
        timeout_s=args.timeout,
        processes=args.processes,
    ).validate()
    if args.prices:
        from pipeline.judge import load_prices

        load_prices(args.prices)  # a bad file fails here, before a job row exists
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


def _print_pair_counts(pairs) -> None:
    counts = pairs.counts()
    out.print(
        f"{len(pairs.effective)} effective pairs of {len(pairs.pairs)} (pos job {pairs.pos_job}, "
        f"neg job {pairs.neg_job}, judge {pairs.judge}, threshold {pairs.threshold:g}, "
        f"coherence {pairs.coherence:g})"
    )
    for reason, n in counts.items():
        if n:
            out.print(f"  {reason:<18}{n:>6}")
    advice = pairs.advice()
    if advice:
        err.print(Text("warning: " + advice, style="yellow"))


def cmd_pairs(args: argparse.Namespace) -> int:
    from pipeline.filter import find_pairs

    with _open_store(args) as store:
        pairs = find_pairs(
            store,
            args.trait,
            threshold=args.threshold,
            coherence=args.coherence,
            pos_job=args.pos_job,
            neg_job=args.neg_job,
            judge=args.judge,
            record=True,
        )
    _print_pair_counts(pairs)
    return 0


def cmd_pairs_export(args: argparse.Namespace) -> int:
    from pipeline.pair_export import export_pairs

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    with _open_store(args) as store:
        done = export_pairs(
            store,
            args.trait,
            Path(args.out),
            threshold=args.threshold,
            coherence=args.coherence,
            every_pair=args.all,
            formats=formats,
        )
    for path in done.files:
        out.print(f"wrote {path}")
    out.print(f"{done.pairs} pairs (scores by {done.judge})")
    return 0


def cmd_pairs_set(args: argparse.Namespace) -> int:
    key = (args.question, args.instruction, args.sample)
    include = {"include": True, "exclude": False, "clear": None}[args.pairs_command]
    with _open_store(args) as store:
        store.get_trait(args.trait)
        if include is not None and key not in store.response_keys_of_trait(args.trait):
            raise PersonaError(
                f"trait '{args.trait}' has no pair {key} (question, instruction, sample); "
                f"`persona pairs {args.trait}` and the Review screen list them"
            )
        store.set_override(args.trait, key, include, note=args.note or "")
    done = {"include": "included", "exclude": "excluded", "clear": "override cleared"}
    out.print(f"pair {key} of {args.trait}: {done[args.pairs_command]}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.extract import extract

    with _open_store(args) as store, err.status("extracting"):
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
        )
    _print_pair_counts(result.pairs)
    out.print(f"vectors from {result.source} activations of {result.model}:")
    for kind, path in result.paths.items():
        shape = list(result.vectors[kind].shape)
        out.print(f"  {kind:<18} {shape} {path}")
    for warning in result.warnings:
        if warning != result.pairs.advice():
            err.print(Text("warning: " + warning, style="yellow"))
    return 0


def print_report(report) -> None:
    from pipeline.analyze import report_rows

    table = Table(title=f"{report.trait} on {report.model}: per-layer norms and eval separation")
    table.add_column("layer", justify="right")
    for kind in report.norms:
        table.add_column(f"|{kind.split('_diff')[0]}|", justify="right")
    if report.separation is not None:
        table.add_column("AUROC", justify="right")
        table.add_column("d", justify="right")
    for row in report_rows(report):
        cells = [str(row["layer"])] + [f"{row[k]:.3f}" for k in report.norms]
        if report.separation is not None:
            cells += [f"{row['auroc']:.3f}", f"{row['cohens_d']:.2f}"]
        style = "bold green" if row["recommended"] else None
        table.add_row(*(Text(c) for c in cells), style=style)
    out.print(table)
    if report.recommended_layer is not None:
        best = report.separation[report.recommended_layer]
        pos_n, neg_n = report.eval_counts
        how = report.choice.text() if report.choice else f"eval AUROC {best.auroc:.3f}"
        out.print(
            f"recommended layer {report.recommended_layer}: {how}, "
            f"Cohen's d {best.cohens_d:.2f} ({pos_n} pos / {neg_n} neg eval answers)"
        )
    if report.steering is not None:
        from pipeline.analyze import steering_text

        out.print(steering_text(report.steering))
    for name, cos in sorted(report.similarity.items()):
        layer = report.recommended_layer if report.recommended_layer is not None else len(cos) // 2
        out.print(f"cosine with {name} at layer {layer}: {cos[layer]:+.3f}")
    for note in report.notes:
        err.print(Text("note: " + note, style="yellow"))


def cmd_vectors_show(args: argparse.Namespace) -> int:
    from pipeline.analyze import analyze

    with _open_store(args) as store:
        report = analyze(store, args.trait, model=args.model, device=args.device)
    print_report(report)
    return 0


def cmd_vectors_list(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
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
    from pipeline.extract import original_format_vectors
    from vectors.files import export_pt

    with _open_store(args) as store:
        vectors = original_format_vectors(store, args.trait, model=args.model, device=args.device)
    for kind, vector in vectors.items():
        path = export_pt(vector, Path(args.out) / f"{args.trait}_{kind}.pt")
        out.print(
            f"wrote {path} {list(vector.shape)} (row L: hidden_states[L], final norm applied)"
        )
    return 0


def cmd_vectors_import(args: argparse.Namespace) -> int:
    from pipeline.models import load_model
    from vectors.files import check_fits, import_pt, save_vector

    with _open_store(args) as store:
        store.get_trait(args.trait)
    # The file is read before the model loads: a missing or unsafe file fails at once.
    vector = import_pt(Path(args.path))
    with err.status(f"loading {args.model} to check the shape"):
        loaded = load_model(args.model, device="cpu")
    check_fits(vector, loaded.num_layers, loaded.hidden_size, what=args.path)
    with _open_store(args) as store:
        meta = {
            "trait": args.trait,
            "model": loaded.model_id,
            "kind": args.kind,
            "source": f"imported:{Path(args.path).name}",
            "n_pairs": 0,
            # The original format's row L is HF's hidden_states[L] (final norm applied); a
            # native file keeps the raw block output there. Kept as it came.
            "row_L": "hidden_states[L], final norm applied (original format)",
        }
        folder = store.data_dir / "vectors" / args.trait / "imported"
        path = save_vector(folder / f"{args.kind}.safetensors", vector, meta)
        store.add_vector(
            trait=args.trait,
            model=loaded.model_id,
            kind=args.kind,
            path=str(path),
            n_pairs=0,
            threshold=None,
            coherence=None,
            metadata=meta,
        )
    out.print(f"imported {args.path} as {args.trait} {args.kind} {list(vector.shape)}")
    return 0


def cmd_import_csv(args: argparse.Namespace) -> int:
    from pipeline.import_csv import import_csv

    with _open_store(args) as store, err.status("importing"):
        result = import_csv(
            store, args.trait, args.pos, args.neg, model=args.model, judge=args.judge
        )
    out.print(
        f"imported {result.pos_rows} pos rows (job {result.pos_job}) and {result.neg_rows} neg "
        f"rows (job {result.neg_job}); {result.unscored} scores were empty"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run import RunParams, run_trait

    if args.tui:
        _require_terminal()  # before the whole run, not after it

    params = RunParams(
        trait=args.trait,
        description=args.description,
        author=args.author,
        model=args.model,
        judge=args.judge,
        judge_base_url=args.judge_base_url,
        n_per_question=args.n_per_question,
        n_eval=args.n_eval,
        all_instructions=args.all_instructions,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        threshold=args.threshold,
        coherence=args.coherence,
        device=args.device,
    )
    with _progress_bar() as bar:

        def on_step(label: str, job_id: int):
            task = bar.add_task(f"job {job_id} {label}", total=None, rate="")
            return _bar_updater(bar, task)

        result = run_trait(_db_path(args), params, on_step=on_step)
    _print_pair_counts(result.extraction.pairs)
    print_report(result.report)
    if args.tui:
        from tui.app import PersonaApp

        _require_terminal()
        app = PersonaApp(db_path=_db_path(args), trait=args.trait)
        app.thresholds = (args.threshold, args.coherence)  # Review opens with the run's rule
        app.run()
    return 0


def _trait_vectors(store: Store, trait: str, kinds: list[str]):
    from pipeline.analyze import latest_vectors
    from vectors.files import load_vector

    records = latest_vectors(store, trait)
    missing = [k for k in kinds if k not in records]
    if missing:
        raise PersonaError(
            f"trait '{trait}' has no {', '.join(missing)} vector; run `persona extract {trait}`"
        )
    return records, {k: load_vector(records[k].path)[0] for k in kinds}


def cmd_monitor(args: argparse.Namespace) -> int:
    from pipeline.analyze import default_layer
    from pipeline.models import load_model
    from pipeline.monitor import baseline_stats, project_tokens, zscore
    from tui.widgets.heatmap import heatmap, legend
    from vectors.files import check_fits

    with _open_store(args) as store:
        records, vectors = _trait_vectors(store, args.trait, [args.vector])
        model = args.model or records[args.vector].model
        loaded = load_model(model, device=args.device)
        made_with = records[args.vector].model
        what = f"the {args.vector} vector of {args.trait} (made with {made_with})"
        check_fits(vectors[args.vector], loaded.num_layers, loaded.hidden_size, what=what)
        layer = (
            args.layer
            if args.layer is not None
            else default_layer(store, args.trait, loaded.num_layers)
        )
        if args.response is not None:
            response = store.get_response(args.response)
            prompt, answer = response.prompt_ids, response.answer_ids
        else:
            from pipeline.chat import prompt_ids
            from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig

            prompt = prompt_ids(loaded.tokenizer, None, args.prompt)
            answer = (
                DecodeEngine(loaded, capture=False)
                .run(
                    [DecodeRequest(prompt, args.seed)],
                    SamplingConfig(
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature
                    ),
                )[0]
                .answer_ids
            )
        proj = project_tokens(loaded, prompt, answer, vectors, [layer])
        if args.zscore:
            proj = zscore(proj, baseline_stats(store, loaded, args.trait, vectors, [layer]))
    values = proj.values[:, 0, 0].tolist()
    start = 0 if args.show_prompt else proj.prompt_len
    scale = max((abs(v) for v in values[start:]), default=1.0) or 1.0
    unit = "z-score" if proj.zscored else "h.v/|v|"
    out.print(Text(f"{args.trait} {args.vector} at layer {layer} ({unit})", style="bold"))
    out.print(heatmap(proj.tokens, values, scale=scale, start=start))
    out.print(legend(scale, unit))
    mean = proj.response_average()[0, 0].item()
    out.print(f"response average {mean:+.3f} over {len(proj.tokens) - proj.prompt_len} tokens")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from rich.columns import Columns
    from rich.panel import Panel

    from pipeline.steer import steer_side_by_side

    with _open_store(args) as store:
        records, vectors = _trait_vectors(store, args.trait, [args.vector])
        result = steer_side_by_side(
            model=args.model or records[args.vector].model,
            vector=vectors[args.vector],
            layer=args.layer,
            coefs=args.coef,
            prompt=args.prompt,
            positions=args.positions,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            device=args.device,
            ablate=args.ablate,
        )
    panels = [Panel(Text(text), title=Text(label), expand=True) for label, text in result.items()]
    out.print(Columns(panels, equal=True, expand=True))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep import SweepParams, create_sweep_job, parse_coefs, parse_layers

    params = SweepParams(
        layers=parse_layers(args.layers),
        coefs=parse_coefs(args.coefs),
        n=args.n,
        judge=args.judge,
        judge_base_url=args.judge_base_url,
        model=args.model,
        positions=args.positions,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        prune_top=args.prune_top,
        device=args.device,
    )
    with _open_store(args) as store:
        job_id = create_sweep_job(store, args.trait, params)
    _run_jobs_with_progress(_db_path(args), [(job_id, f"job {job_id} sweep {args.trait}")])
    with _open_store(args) as store:
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
    from pipeline.screen import screen, write_ranking

    with _open_store(args) as store, err.status("screening"):
        layer, rows = screen(
            store,
            args.trait,
            Path(args.data),
            layer=args.layer,
            compare_base=args.compare_base,
            model=args.model,
            device=args.device,
        )
    measure = "projection difference (data - base)" if args.compare_base else "projection"
    table = Table(title=f"{len(rows)} samples ranked by {measure} at layer {layer}")
    for column in ("rank", "sample", "projection", "base", "difference", "response"):
        table.add_column(column, overflow="ellipsis", no_wrap=column == "response")
    for rank, row in enumerate(rows[: args.top], 1):
        cells = [
            str(rank),
            str(row.index),
            f"{row.projection:+.3f}",
            "" if row.base_projection is None else f"{row.base_projection:+.3f}",
            "" if row.difference is None else f"{row.difference:+.3f}",
            row.response.replace("\n", " ")[:80],
        ]
        table.add_row(*(Text(c) for c in cells))
    out.print(table)
    if args.out:
        out.print(f"wrote {write_ranking(rows, Path(args.out))}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one job to its end, headless; the dashboard starts this detached, its output in
    the job's log file: a progress line every 10 seconds, and the ending."""
    import time

    from pipeline.jobs import ProgressUpdate, run_job

    last = [0.0]

    def log_line(update: ProgressUpdate) -> None:
        now = time.monotonic()
        if now - last[0] < WORKER_LOG_EVERY_S:
            return
        last[0] = now
        unit = update.stats.get("unit", "")
        rate = update.stats.get("new_tokens_per_s") or update.stats.get(f"{unit}_per_s")
        rate_text = f", {rate:,.1f}/s" if rate else ""
        stamp = time.strftime("%H:%M:%S")
        print(
            f"{stamp} job {args.job_id}: {update.done}/{update.total} {unit}{rate_text}"
            f"{' · ' + update.message if update.message else ''}",
            flush=True,
        )

    print(
        f"{time.strftime('%H:%M:%S')} job {args.job_id}: worker {os.getpid()} started", flush=True
    )
    run_job(_db_path(args), args.job_id, on_progress=log_line)
    with _open_store(args) as store:
        job = store.get_job(args.job_id)
    print(f"{time.strftime('%H:%M:%S')} job {args.job_id}: {job.status} {job.message}", flush=True)
    return 0


WORKER_LOG_EVERY_S = 10.0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from pipeline.workers import current_jobs

    with _open_store(args) as store:
        jobs = current_jobs(store, trait=args.trait)
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
    from pipeline.workers import cancel

    with _open_store(args) as store:
        cancel(store, args.job_id)
    out.print(f"job {args.job_id} will stop after its current batch")
    return 0


# ---- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    # --db is accepted before or after the subcommand.
    common = _Parser(add_help=False)
    common.add_argument(
        "--db",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"SQLite database (default: $PERSONA_DB or ./{DEFAULT_DB})",
    )
    parser = _Parser(
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
    exp.add_argument(
        "--out", type=output_folder, default=".", help="folder to write into (default: .)"
    )
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
    new.add_argument(
        "--thinking", type=non_negative_int, default=0, help="Anthropic thinking budget, tokens"
    )
    new.add_argument("--assistant-name", help='adjective for "You are a/an ... assistant."')
    new.add_argument("--force", action="store_true", help="replace a trait of the same name")
    tpl = add(traits_cmds, "template", cmd_traits_template, "print an empty trait to fill in")
    tpl.add_argument("name")
    tpl.add_argument("--description")
    tpl.add_argument("--out", type=output_file, help="write to this file instead of stdout")
    tpl.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    dele = add(traits_cmds, "delete", cmd_traits_delete, "delete a trait and all its data")
    dele.add_argument("name")
    dele.add_argument("--yes", action="store_true", help="do not ask (needed without a TTY)")

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
        type=positive_int,
        default=10,
        help="answers per question, instructions rotated (default 10)",
    )
    gen.add_argument(
        "--all-instructions",
        action="store_true",
        help="n answers for every (question, instruction) pair instead",
    )
    gen.add_argument("--temperature", type=non_negative_float, default=1.0)
    gen.add_argument("--top-p", type=probability, default=1.0)
    gen.add_argument("--max-new-tokens", type=positive_int, default=1000)
    gen.add_argument("--seed", type=seed_int, default=0)
    gen.add_argument(
        "--batch-size",
        type=positive_int,
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
    gen.add_argument("--max-concurrent", type=positive_int, default=16)
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
    jud.add_argument("--max-concurrent", type=positive_int, default=50)
    jud.add_argument("--base-url", help="an OpenAI- or Anthropic-compatible server")
    jud.add_argument("--samples", type=positive_int, default=1, help="anthropic: average k answers")
    jud.add_argument("--prices", help="JSON file of model: [input, output] $ per 1M tokens")
    jud.add_argument("--device", help="local judge: cpu, cuda or cuda:N")
    jud.add_argument(
        "--timeout",
        type=positive_float,
        default=60.0,
        help="seconds a request may take (default 60)",
    )
    jud.add_argument(
        "--processes",
        type=positive_int,
        help="API judges: client processes sharing --max-concurrent (default: one per 8 in "
        "flight, at most one per core; one tops out near 500 requests/s)",
    )

    def filter_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("trait")
        sub.add_argument("--threshold", type=percent, default=50.0, help="T (default 50)")
        sub.add_argument("--coherence", type=percent, default=50.0, help="C (default 50)")
        sub.add_argument("--pos-job", type=row_id, help="default: the latest pos extract job")
        sub.add_argument("--neg-job", type=row_id, help="default: the latest neg extract job")
        sub.add_argument("--judge", help="whose scores (default: the judge with most scores)")

    pairs = add(
        commands,
        "pairs",
        cmd_pairs,
        "count effective pairs: pos trait >= T, neg trait < 100-T, coherence >= C",
    )
    filter_args(pairs)
    pair_cmds = pairs.add_subparsers(dest="pairs_command", metavar="ACTION")
    for action in ("include", "exclude", "clear"):
        sub = add(pair_cmds, action, cmd_pairs_set, f"{action} one pair by hand")
        sub.add_argument("question", type=non_negative_int)
        sub.add_argument("instruction", type=non_negative_int)
        sub.add_argument("sample", type=non_negative_int)
        sub.add_argument("--note")
    exp_p = add(
        pair_cmds,
        "export",
        cmd_pairs_export,
        "write the effective pairs (--all: every pair) as the original CSVs and JSONL",
    )
    exp_p.add_argument("--out", type=output_folder, default=".")
    exp_p.add_argument("--all", action="store_true", help="every pair, not only effective ones")
    exp_p.add_argument("--format", default="csv,jsonl", help="csv, jsonl or both (default)")

    ext = add(
        commands, "extract", cmd_extract, "extract response/prompt vectors from the effective pairs"
    )
    filter_args(ext)
    ext.add_argument("--source", choices=("auto", "captured", "forward"), default="auto")
    ext.add_argument("--model", help="model for the forward path (default: the generator)")
    ext.add_argument("--device")

    vec = commands.add_parser("vectors", help="show, list, export and import vectors")
    vec_cmds = vec.add_subparsers(dest="vectors_command", metavar="ACTION", required=True)
    show_v = add(
        vec_cmds,
        "show",
        cmd_vectors_show,
        "per-layer norms, eval AUROC and Cohen's d, recommended layer, similarity",
    )
    show_v.add_argument("trait")
    show_v.add_argument("--model")
    show_v.add_argument("--device")
    list_v = add(vec_cmds, "list", cmd_vectors_list, "list stored vectors")
    list_v.add_argument("--trait")
    exp_v = add(
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
    imp_v = add(
        vec_cmds,
        "import",
        cmd_vectors_import,
        "read a .pt vector (weights_only) and check its shape against a model",
    )
    imp_v.add_argument("trait")
    imp_v.add_argument("path")
    imp_v.add_argument("--model", default="smollm2")
    imp_v.add_argument(
        "--kind",
        default="response_avg_diff",
        choices=("response_avg_diff", "prompt_avg_diff", "prompt_last_diff"),
    )

    imp_csv = add(
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

    run = add(
        commands,
        "run",
        cmd_run,
        "the whole method: author if new, generate, judge, filter, extract, report",
    )
    run.add_argument("trait")
    run.add_argument("--description", help="needed when the trait is new")
    run.add_argument("--author", help="KIND:MODEL that writes a new trait")
    run.add_argument("--model", default="smollm2")
    run.add_argument(
        "--judge",
        default=DEFAULT_JUDGE,
        help="KIND:MODEL; local:smollm2 runs offline but is a smoke test only",
    )
    run.add_argument("--judge-base-url")
    run.add_argument("--n-per-question", type=positive_int, default=10, help="extract split")
    run.add_argument("--n-eval", type=positive_int, default=5, help="answers per eval question")
    run.add_argument("--all-instructions", action="store_true")
    run.add_argument("--max-new-tokens", type=positive_int, default=1000)
    run.add_argument("--seed", type=seed_int, default=0)
    run.add_argument("--batch-size", type=positive_int)
    # Checked here: the run would otherwise generate and judge for hours before extract
    # found a threshold outside 0-100.
    run.add_argument("--threshold", type=percent, default=50.0)
    run.add_argument("--coherence", type=percent, default=50.0)
    run.add_argument("--device")
    run.add_argument("--tui", action="store_true", help="open the dashboard at the end")

    vector_kinds = ("response_avg_diff", "prompt_avg_diff", "prompt_last_diff")
    mon = add(
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
    mon.add_argument("--vector", default="response_avg_diff", choices=vector_kinds)
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

    st = add(commands, "steer", cmd_steer, "steered vs unsteered answers side by side")
    st.add_argument("trait")
    st.add_argument("--layer", type=int, required=True)
    st.add_argument(
        "--coef",
        type=number_list,
        default="2.0",
        help="one or more, comma-separated; start a negative with = (--coef=-2,2)",
    )
    st.add_argument("--prompt", required=True)
    st.add_argument("--positions", choices=("response", "prompt", "all"), default="response")
    st.add_argument("--ablate", action="store_true", help="project the direction out instead")
    st.add_argument("--vector", default="response_avg_diff", choices=vector_kinds)
    st.add_argument("--model")
    st.add_argument("--device")
    st.add_argument("--max-new-tokens", type=positive_int, default=120)
    st.add_argument("--temperature", type=non_negative_float, default=0.0)
    st.add_argument("--seed", type=seed_int, default=0)

    sw = add(
        commands,
        "sweep",
        cmd_sweep,
        "steer the eval questions over a (layer, coef) grid and judge the answers",
    )
    sw.add_argument("trait")
    sw.add_argument("--layers", required=True, help="8-24, 8-24:4 or 8,12,16")
    sw.add_argument("--coefs", default="-2,-1,1,2", help="write --coefs=-2,-1,1,2 (with =)")
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

    scr = add(
        commands,
        "screen",
        cmd_screen,
        "rank a fine-tuning dataset's samples by their projection on the trait",
    )
    scr.add_argument("trait")
    scr.add_argument("--data", required=True, help="JSONL: prompt/response or chat messages")
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

    worker = add(commands, "worker", cmd_worker, "run one job by id (used by the dashboard)")
    worker.add_argument("job_id", type=row_id)

    jobs = commands.add_parser("jobs", help="list and cancel jobs")
    job_cmds = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    jl = add(job_cmds, "list", cmd_jobs_list, "list jobs with status and progress")
    jl.add_argument("--trait")
    jc = add(job_cmds, "cancel", cmd_jobs_cancel, "ask a running job to stop")
    jc.add_argument("job_id", type=row_id)

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
    except (PersonaError, ValueError) as exc:
        if not isinstance(exc, PersonaError) and type(exc).__name__ not in _FILE_ERRORS:
            raise
        err.print(f"error: {printable(exc)}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except sqlite3.DatabaseError as exc:
        # Integrity and programming errors are our bugs; only the file's state is the user's.
        message = _database_problem(_db_path(args), exc)
        if message is None or type(exc) not in (sqlite3.DatabaseError, sqlite3.OperationalError):
            raise
        err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
