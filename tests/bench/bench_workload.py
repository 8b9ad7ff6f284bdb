"""The seed's plan end to end on the 8B shape (bf16, random weights, a small real BPE
vocabulary so answers end at an end-of-turn token after a few hundred tokens): generate pos
and neg answers to the 20 extract questions (``--n`` each) and the 20 eval questions
(``--n-eval`` each) with capture, judge the extract answers for trait and coherence (as
``persona run`` does: a judge job a side, default flags) through
a local stub OpenAI server with 200 ms latency, and extract the vectors.

    python tests/bench/bench_workload.py [--n 10] [--n-eval 5] [--new 1000] [--layers 32]

Printed in the same run: the old generation path (length-sorted static batches of 64, the
engine's previous default) and the real pipeline jobs of today (continuous batching, slots
from free GPU memory, the four jobs as one queue, default judge processes), per step and in
total. The old path is
timed on the engine alone (no database writes): a conservative baseline.
Targets (issue 13): <= 60 s on one H200 for the whole plan, <= 35 s on two.
``--gpus 0 --gpus 0,1`` measures the new path on one GPU and on two in the same run (a
value ending in ``+compile``, e.g. ``0,1+compile``, runs that variant with ``--compile``, and
one ending in ``+nokernels`` without the Triton kernels of ``pipeline.fused_kernels``), each
variant in a fresh process (as ``persona run`` would start), so none finds another's model
loaded, CUDA set up or kernels warm; ``x first`` is each variant's generation speedup over
the first variant's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_judge import _serve  # noqa: E402
from common import card, llama8b_config, print_table, save_json  # noqa: E402


def build_model_dir(folder: Path, layers: int) -> Path:
    from tiny_model import build_tiny_tokenizer
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(vocab_size=1000)
    config = llama8b_config(layers)
    config.vocab_size = len(tokenizer)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # CPU: a smoke run
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def old_generation(model_dir: Path, n: int, n_eval: int, new: int) -> tuple[float, int]:
    """The previous default: each side and split in length-sorted static batches of 64."""
    from db.traits import bundled_traits
    from pipeline.chat import prompt_ids
    from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig
    from pipeline.generate import plan_rows
    from pipeline.models import load_model
    from pipeline.sampling import row_seed

    loaded = load_model(str(model_dir))
    engine = DecodeEngine(loaded, capture=True)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    trait = next(t for t in bundled_traits() if t.name == "paternalism")
    sampling = SamplingConfig(max_new_tokens=new)
    tokens = 0
    sync()
    start = time.perf_counter()
    for split, count in (("extract", n), ("eval", n_eval)):
        for side in ("pos", "neg"):
            keys = plan_rows(split, count, False)
            prompts = {
                k: prompt_ids(
                    loaded.tokenizer, trait.system_prompt(side, k[1]), trait.questions[k[0]]
                )
                for k in keys
            }
            ordered = sorted(keys, key=lambda k: (len(prompts[k]), k))
            for first in range(0, len(ordered), 64):
                chunk = ordered[first : first + 64]
                requests = [DecodeRequest(prompts[k], row_seed(0, *k)) for k in chunk]
                results = engine.run(requests, sampling)
                tokens += sum(len(r.answer_ids) for r in results)
    sync()
    return time.perf_counter() - start, tokens


def new_plan(
    db: Path,
    model_dir: Path,
    n: int,
    n_eval: int,
    new: int,
    base_url: str,
    gpus: str | None,
    batch_size: int | None = None,
    compile_layers: bool = False,
    kernels: bool = True,
) -> dict:
    from db import Store
    from pipeline import fused_kernels
    from pipeline.extract import extract
    from pipeline.generate import GenerateParams, find_or_create_job
    from pipeline.job_devices import run_generation_jobs
    from pipeline.jobs import run_job
    from pipeline.judging import JudgeParams, find_or_create_judge_job

    fused_kernels.ENABLED = kernels  # this process's: each variant runs in its own
    times: dict[str, float] = {}
    tokens = 0
    slots = set()
    phases: dict[str, float] = {}  # the slowest job's model load and decode (job stats)
    start = time.perf_counter()
    with Store(db) as store:
        jobs = []
        for split, count in (("extract", n), ("eval", n_eval)):
            for side in ("pos", "neg"):
                params = GenerateParams(
                    side=side, split=split, model=str(model_dir), n_per_question=count,
                    max_new_tokens=new, gpus=gpus, batch_size=batch_size,
                    compile=compile_layers,
                )  # fmt: skip
                jobs.append(find_or_create_job(store, "paternalism", params))
        # As `persona run` does: on one GPU one queue for the four jobs; with several, the
        # jobs dealt to the GPUs, each GPU's share one queue.
        run_generation_jobs(db, jobs, gpus=gpus)
        for job_id in jobs:
            job = store.get_job(job_id)
            slots.add(str(job.stats.get("slots")))
            for phase in ("load_s", "generate_s"):
                phases[phase] = max(phases.get(phase, 0.0), float(job.stats.get(phase, 0.0)))
            tokens += sum(len(r.answer_ids) for r in store.responses(job=job_id))
        times["generate"] = time.perf_counter() - start
        mark = time.perf_counter()
        # As `persona run` does: the extract answers only (the filter's input), a job a side,
        # default flags (50 in flight). Before session 7 the bench judged all 600 answers.
        for extract_job in jobs[:2]:
            judge = JudgeParams(judge="openai:stub", base_url=base_url, job=extract_job)
            run_job(db, find_or_create_judge_job(store, "paternalism", judge))
        times["judge"] = time.perf_counter() - mark
        mark = time.perf_counter()
        extract(store, "paternalism", threshold=0, coherence=0, judge="openai:stub")
        times["extract"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    return {"times": times, "tokens": tokens, "slots": sorted(map(str, slots)), **phases}


def _plan_child(plan: tuple, results: multiprocessing.Queue) -> None:
    try:
        results.put(("ok", new_plan(*plan)))
    except BaseException as exc:  # reported by the parent, which has the terminal
        results.put(("error", repr(exc)))


def _in_fresh_process(ctx: Any, plan: tuple) -> dict:
    """``new_plan(*plan)`` in a new spawned process, its result handed back."""
    results = ctx.Queue()
    child = ctx.Process(target=_plan_child, args=(plan, results))
    child.start()
    while True:  # a child killed outright (out of memory, a CUDA abort) sends nothing
        try:
            kind, value = results.get(timeout=5)
            break
        except queue.Empty:
            if not child.is_alive():
                raise SystemExit(f"the plan's process died (exit code {child.exitcode})") from None
    child.join()
    if kind == "error":
        raise SystemExit(f"the plan failed in its process: {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--n-eval", type=int, default=5)
    parser.add_argument("--new", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--skip-old", action="store_true")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="slots a GPU for the new path (default: chosen from free memory, at most 256)",
    )
    parser.add_argument(
        "--gpus",
        action="append",
        help="a --gpus value for the new path, once per variant (default: all visible GPUs); "
        "with +compile at its end, that variant compiles the decode step's layers; with "
        "+nokernels, it runs without the Triton kernels (pipeline.fused_kernels)",
    )
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    stub = ctx.Process(target=_serve, args=(0.2, ports), daemon=True)
    stub.start()
    base_url = f"http://127.0.0.1:{ports.get(timeout=30)}/v1"
    folder = Path(tempfile.mkdtemp(prefix="bench-workload-"))
    model_dir = build_model_dir(folder / "model", args.layers)
    print(f"card: {card()}; 8B shape, {args.layers} layers; plan n={args.n} n_eval={args.n_eval}")
    rows = []
    for variant in args.gpus or [None]:
        db = folder / f"new-{len(rows)}.db"
        gpus, *flags = (variant or "").split("+")
        gpus = gpus or None
        if set(flags) - {"compile", "nokernels"}:
            raise SystemExit(f"--gpus {variant}: a variant ends in +compile or +nokernels")
        compile_layers, kernels = "compile" in flags, "nokernels" not in flags
        plan = (db, model_dir, args.n, args.n_eval, args.new, base_url, gpus, args.batch_size)
        plan += (compile_layers, kernels)
        new = _in_fresh_process(ctx, plan)
        rows.append(
            {
                "path": f"new: continuous batching, --gpus {gpus or 'all'}, "
                + ("--compile, " if compile_layers else "")
                + ("Triton kernels off, " if not kernels else "")
                + (f"--batch-size {args.batch_size}" if args.batch_size else "auto slots"),
                "generate s": new["times"]["generate"],
                "of which load s": new.get("load_s"),
                "decode s": new.get("generate_s"),
                "answer tokens": new["tokens"],
                "tok/s": new["tokens"] / new["times"]["generate"],
                "judge s": new["times"]["judge"],
                "extract s": new["times"]["extract"],
                "total s": new["times"]["total"],
                "slots": " ".join(new["slots"]),
            }
        )
        rows[-1]["x first"] = rows[0]["generate s"] / rows[-1]["generate s"]
        print(rows[-1], flush=True)
    if not args.skip_old:
        seconds, tokens = old_generation(model_dir, args.n, args.n_eval, args.new)
        rows.append(
            {
                "path": "old: static batches of 64",
                "generate s": seconds,
                "answer tokens": tokens,
                "tok/s": tokens / seconds,
            }
        )
        print(rows[-1], flush=True)
        for row in rows[:-1]:
            row["generation speedup"] = seconds / row["generate s"]
    columns = ["path", "generate s", "of which load s", "decode s", "answer tokens", "tok/s"]
    columns += ["judge s", "extract s"]
    columns += ["total s", "x first", "generation speedup", "slots"]
    print_table("bench_workload: the seed's plan, 8B shape", rows, columns)
    save_json("bench_workload.json", {"card": card(), "rows": rows})
    stub.terminate()


if __name__ == "__main__":
    main()
