"""Extraction throughput on the GPU: the one-sample-at-a-time method of the original code
(``output_hidden_states``, every state copied to the host, means taken there) against our
batched forward with in-batch reducing hooks, and against a plain forward (no hidden states)
over the same tokens, all in the same run, on a random-init Llama-3.1-8B-shaped model.

    python tests/bench/bench_extract.py [--n 500] [--layers 32] [--baseline-n 500]

2 x n responses, prompts of 80-200 tokens, answers of 100-600. Targets: >= 6x the
one-at-a-time method, >= 85% of the plain forward's token throughput, and peak host memory
that does not grow with n.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_model, card, print_table, random_prompts, save_json, timed  # noqa: E402

from pipeline.response_means import TOKENS_PER_BATCH, ForwardMeans  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_rows(n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    prompts = random_prompts(n, 80, 200, vocab, seed=seed)
    answers = random_prompts(n, 100, 600, vocab, seed=seed + 1)
    return list(zip(prompts, answers, strict=True))


def ours(forward: ForwardMeans, rows) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    for _chunk, means in forward.iter_means(rows, TOKENS_PER_BATCH):
        for kind, value in means.items():
            part = value.sum(0)
            sums[kind] = part if kind not in sums else sums[kind] + part
    return sums


def plain(forward: ForwardMeans, rows) -> None:
    """The same batches through the same module with no hooks: the ceiling."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    device = forward.loaded.device
    start = 0
    while start < len(order):
        end, width = start, 0
        while end < len(order):
            longest = max(width, len(rows[order[end]][0]) + len(rows[order[end]][1]))
            if end > start and longest * (end - start + 1) > TOKENS_PER_BATCH:
                break
            width, end = longest, end + 1
        ids = torch.full((end - start, width), forward.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(order[start:end]):
            seq = rows[i][0] + rows[i][1]
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
        with torch.inference_mode():
            forward.base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        start = end


def one_at_a_time(loaded, rows) -> dict[str, torch.Tensor]:
    """As the original: one sample per forward with autograd on, all hidden states copied
    to the host, means taken there."""
    sums: dict[str, torch.Tensor] = {}
    for prompt, answer in rows:
        ids = torch.tensor([prompt + answer], device="cuda")
        out = loaded.model(ids, output_hidden_states=True)
        states = torch.stack([h[0].detach().float().cpu() for h in out.hidden_states])
        n = len(prompt)
        means = {
            "response_avg": states[:, n:].mean(1),
            "prompt_avg": states[:, :n].mean(1),
            "prompt_last": states[:, n - 1],
        }
        for kind, value in means.items():
            sums[kind] = value if kind not in sums else sums[kind] + value
        del out, states
    return sums


def diagnose(loaded, forward: ForwardMeans, rows) -> None:
    """Per-layer relative difference of each kind of mean: batched vs one row at a time
    through the same path, and one row at a time vs HF's output_hidden_states."""
    kinds = ("response_avg", "prompt_avg", "prompt_last")
    batched: dict[str, dict[int, torch.Tensor]] = {k: {} for k in kinds}
    for chunk, means in forward.iter_means(rows, TOKENS_PER_BATCH):
        for j, i in enumerate(chunk):
            for k in kinds:
                batched[k][i] = means[k][j].float().cpu()
    single: dict[str, dict[int, torch.Tensor]] = {k: {} for k in kinds}
    hf: dict[str, dict[int, torch.Tensor]] = {k: {} for k in kinds}
    for i, (prompt, answer) in enumerate(rows):
        means = forward.batch_means([(prompt, answer)])
        for k in kinds:
            single[k][i] = means[k][0].float().cpu()
        with torch.inference_mode():
            out = loaded.model(
                torch.tensor([prompt + answer], device="cuda"), output_hidden_states=True
            )
        states = torch.stack([h[0] for h in out.hidden_states]).float().cpu()
        n = len(prompt)
        hf["response_avg"][i] = states[:, n:].mean(1)
        hf["prompt_avg"][i] = states[:, :n].mean(1)
        hf["prompt_last"][i] = states[:, n - 1]

    def rel(a: dict, b: dict) -> list[float]:
        x = torch.stack(list(a.values()))
        y = torch.stack([b[key] for key in a])
        return ((x - y).norm(dim=(0, 2)) / y.norm(dim=(0, 2))).tolist()

    for k in kinds:
        batch_vs_single, single_vs_hf = rel(batched[k], single[k]), rel(single[k], hf[k])
        worst = max(range(len(batch_vs_single) - 1), key=lambda layer: batch_vs_single[layer])
        print(
            f"{k}: batched vs single worst {batch_vs_single[worst]:.4f} (layer {worst}); "
            f"single vs HF worst below L {max(single_vs_hf[:-1]):.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--diagnose", type=int, default=0, help="only compare numerics per layer on this many rows"
    )
    parser.add_argument("--n", type=int, default=500, help="responses per side")
    parser.add_argument("--baseline-n", type=int, default=500, help="per side, one at a time")
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    loaded = build_model(args.layers)
    vocab = loaded.model.config.vocab_size
    forward = ForwardMeans(loaded)
    if args.diagnose:
        diagnose(loaded, forward, make_rows(args.diagnose, vocab, seed=0))
        return
    rows = make_rows(2 * args.n, vocab, seed=0)
    tokens = sum(len(p) + len(a) for p, a in rows)
    small = rows[: max(2, len(rows) // 10)]
    ours(forward, small[:4])  # warm-up
    plain(forward, small[:4])
    torch.cuda.synchronize()
    rss_before = peak_rss_gib()
    t_small, _ = timed(lambda: ours(forward, small))
    rss_small = peak_rss_gib()
    t_ours, sums = timed(lambda: ours(forward, rows))
    rss_ours = peak_rss_gib()
    t_plain, _ = timed(lambda: plain(forward, rows))
    base_rows = rows[: 2 * args.baseline_n]
    base_tokens = sum(len(p) + len(a) for p, a in base_rows)
    t_base, base_sums = timed(lambda: one_at_a_time(loaded, base_rows))
    rss_base = peak_rss_gib()
    # Same numbers both ways (bf16 forward, so loose tolerance) on the rows both saw. HF's
    # last hidden state is after the final norm, our row L before it: compare HF's with our
    # final-norm means (``final_norm``), the rows below L as they are.
    check = ours(ForwardMeans(loaded, final_norm=True), base_rows)
    rel = 0.0
    for kind, expected in base_sums.items():
        got = torch.cat([check[kind][:-1], check[kind + "_final"][None]]).float().cpu()
        rel = max(rel, ((got - expected).norm() / expected.norm()).item())
    row = {
        "responses": len(rows),
        "tokens": tokens,
        "one-at-a-time tok/s": base_tokens / t_base,
        "ours tok/s": tokens / t_ours,
        "plain forward tok/s": tokens / t_plain,
        "speedup": (tokens / t_ours) / (base_tokens / t_base),
        "of plain": (tokens / t_ours) / (tokens / t_plain),
        "rel. diff": rel,
    }
    print_table("bench_extract (2 x n responses, wall time)", [row], list(row))
    print(
        f"peak host RSS: start {rss_before:.2f} GiB, after 10% of rows {rss_small:.2f} GiB, "
        f"after all rows {rss_ours:.2f} GiB, after the one-at-a-time baseline {rss_base:.2f} GiB"
    )
    print(f"10% of rows took {t_small:.2f}s, all {t_ours:.2f}s; card {card()}")
    save_json(
        "bench_extract.json",
        {"card": card(), "row": row, "rss": [rss_before, rss_small, rss_ours, rss_base]},
    )
    del sums


if __name__ == "__main__":
    main()
