"""``persona generate``, ``persona judge`` and ``persona pairs ...``: answers under the pos
and neg prompts, their scores, and the effective pairs they make (with hand overrides)."""

from __future__ import annotations

import argparse
from pathlib import Path

from db import PersonaError
from tui.cli.arguments import (
    add_compile,
    add_deterministic,
    add_gpus,
    add_pair_filter,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
    probability,
    seed_int,
)
from tui.cli.context import db_path, open_store
from tui.cli.output import (
    out,
    print_pair_counts,
    run_generation_with_progress,
    run_jobs_with_progress,
)
from tui.cli.parser import add_command


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.generate import GenerateParams, find_or_create_job

    sides = ["pos", "neg"] if args.side == "both" else [args.side]
    jobs = []
    with open_store(args) as store:
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
                gpus=args.gpus,
                compile=args.compile,
                deterministic=args.deterministic,
            ).validate()
            job_id = find_or_create_job(store, args.trait, params)
            jobs.append((job_id, f"job {job_id} {args.trait} {side}/{args.split}"))
    run_generation_with_progress(db_path(args), jobs, gpus=args.gpus, device=args.device)
    with open_store(args) as store:
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
        gpus=args.gpus,
    ).validate()
    if args.prices:
        from pipeline.judge_backends import load_prices

        load_prices(args.prices)  # a bad file fails here, before a job row exists
    with open_store(args) as store:
        job_id = find_or_create_judge_job(store, args.trait, params)
    run_jobs_with_progress(db_path(args), [(job_id, f"job {job_id} judge {args.trait}")])
    with open_store(args) as store:
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


def cmd_pairs(args: argparse.Namespace) -> int:
    from pipeline.filter import find_pairs

    with open_store(args) as store:
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
    print_pair_counts(pairs)
    return 0


def cmd_pairs_export(args: argparse.Namespace) -> int:
    from pipeline.pair_export import export_pairs

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    with open_store(args) as store:
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
    with open_store(args) as store:
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


def register(commands: argparse._SubParsersAction) -> None:
    from pipeline.judging import DEFAULT_JUDGE

    gen = add_command(
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
        help="rows decoded at once (default: as many as free memory holds, at most 256 "
        "on a GPU and 64 on a CPU)",
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
    add_gpus(gen)
    add_compile(gen)
    add_deterministic(gen)

    jud = add_command(
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
        "local:smollm2 is a smoke-test judge only: a 135M model has no real signal; "
        "local:MODEL@bfloat16 (or @float32) sets a local judge's precision",
    )
    jud.add_argument("--metrics", default="trait,coherence")
    jud.add_argument("--max-concurrent", type=positive_int, default=50)
    jud.add_argument("--base-url", help="an OpenAI- or Anthropic-compatible server")
    jud.add_argument("--samples", type=positive_int, default=1, help="anthropic: average k answers")
    jud.add_argument("--prices", help="JSON file of model: [input, output] $ per 1M tokens")
    jud.add_argument("--device", help="local judge: cpu, cuda or cuda:N")
    add_gpus(jud)
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

    pairs = add_command(
        commands,
        "pairs",
        cmd_pairs,
        "count effective pairs: pos trait >= T, neg trait < 100-T, coherence >= C",
    )
    add_pair_filter(pairs)
    pair_cmds = pairs.add_subparsers(dest="pairs_command", metavar="ACTION")
    for action in ("include", "exclude", "clear"):
        sub = add_command(pair_cmds, action, cmd_pairs_set, f"{action} one pair by hand")
        sub.add_argument("question", type=non_negative_int)
        sub.add_argument("instruction", type=non_negative_int)
        sub.add_argument("sample", type=non_negative_int)
        sub.add_argument("--note")
    exp_p = add_command(
        pair_cmds,
        "export",
        cmd_pairs_export,
        "write the effective pairs (--all: every pair) as the original CSVs and JSONL",
    )
    exp_p.add_argument("--out", type=output_folder, default=".")
    exp_p.add_argument("--all", action="store_true", help="every pair, not only effective ones")
    exp_p.add_argument("--format", default="csv,jsonl", help="csv, jsonl or both (default)")
