"""A decode step's attention for one layer, per call inside a CUDA graph, on an 8B shape:
``pipeline.decode_attention``'s kernel over the whole cache under a boolean mask (what
the engine runs now) against SDPA over the columns in use rounded up to
``engine.ATTENTION_ROUND`` under the additive mask (what it ran before), both through
``runners.grouped_attention`` as the layers call it. The rows are as ``bench_generate``
makes them: prompts of 100-200 tokens left-padded to the longest, at answer step ``t`` of
a ``--new``-token run; the cache is as long as the engine makes it.

    python tests/bench/bench_decode_attention.py [--batches 16,64,256] [--new 256]
        [--steps 1,128,255] [--heads 32] [--kv-heads 8] [--head-dim 128] [--softcap 0]
        [--configs 64:4:3,32:4:2:0]   (the kernel's BLOCK_KEYS:NUM_WARPS:NUM_STAGES and
        optionally PROGRAMS_PER_SM, 0: never split; each timed)

"host us" is a call's time on the host, eager (what an eager step or a capture pays per
layer), the calls queued without a sync.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import graph_us  # noqa: E402
from common import card, print_table, save_json  # noqa: E402

from pipeline import decode_attention, fused_kernels  # noqa: E402
from pipeline.engine import ATTENTION_ROUND, CACHE_ROUND  # noqa: E402
from pipeline.runners import grouped_attention  # noqa: E402


def host_us(call, calls: int = 200) -> float:  # noqa: ANN001
    """Microseconds a call on the host, eager, calls queued without a sync between."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--steps", default="1,128,255")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--softcap", type=float, default=0.0)
    parser.add_argument("--configs", default="", help="block:warps:stages,... to compare")
    args = parser.parse_args()
    if not torch.cuda.is_available() or fused_kernels.triton is None:
        raise SystemExit("bench_decode_attention needs a CUDA device and Triton")
    dtype, device = torch.bfloat16, "cuda"
    heads, kv, dim = args.heads, args.kv_heads, args.head_dim
    softcap = args.softcap or None
    scale = dim**-0.5
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        lengths = torch.randint(100, 201, (batch,), generator=gen)
        width = int(lengths.max())
        length = -(-(width + args.new + 1) // CACHE_ROUND) * CACHE_ROUND
        keys = torch.randn(batch, kv, length + 1, dim, device=device, dtype=dtype)
        values = torch.randn(batch, kv, length + 1, dim, device=device, dtype=dtype)
        q = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype)
        for step in (int(s) for s in args.steps.split(",")):
            column = width + step - 1  # the fed token's column
            index = torch.arange(length)
            valid = (index[None, :] >= (width - lengths)[:, None]) & (index[None, :] <= column)
            valid = valid.to(device)
            used = min(length, -(-(column + 1) // ATTENTION_ROUND) * ATTENTION_ROUND)
            bias = torch.full((batch, 1, 1, used), float("-inf"), device=device, dtype=dtype)
            bias.masked_fill_(valid[:, None, None, :used], 0.0)
            allowed = valid[:, None, None, :]
            k_used, v_used = keys[:, :, :used], values[:, :, :used]
            k_all, v_all = keys[:, :, :length], values[:, :, :length]

            def rounded(q=q, k=k_used, v=v_used, bias=bias, scale=scale):  # noqa: ANN202
                return grouped_attention(None, q, k, v, bias, scale, softcap=softcap)[0]

            def kernel(q=q, k=k_all, v=v_all, allowed=allowed, scale=scale):  # noqa: ANN202
                return grouped_attention(None, q, k, v, allowed, scale, softcap=softcap)[0]

            difference = (kernel().float() - rounded().float()).abs().max().item()
            before, after = graph_us(rounded), graph_us(kernel)
            tried = {}
            names = ("BLOCK_KEYS", "NUM_WARPS", "NUM_STAGES", "PROGRAMS_PER_SM")
            for config in filter(None, args.configs.split(",")):
                saved = {name: getattr(decode_attention, name) for name in names}
                for name, value in zip(names, config.split(":"), strict=False):
                    setattr(decode_attention, name, int(value))
                tried[f"kernel {config} us"] = graph_us(kernel)
                for name, value in saved.items():
                    setattr(decode_attention, name, value)
            host = {"rounded SDPA host us": host_us(rounded), "kernel host us": host_us(kernel)}
            read = 2 * kv * dim * keys.element_size() * int(valid.sum())  # valid keys, values
            rows.append(
                {
                    "batch": batch,
                    "step": step,
                    "cache": length,
                    "rounded columns": used,
                    "valid keys a row": float(valid.sum()) / batch,
                    "rounded SDPA us": before,
                    "kernel us": after,
                    "speedup": before / after,
                    "kernel GB/s (valid keys)": read / after / 1e3,
                    "max abs difference": difference,
                    **tried,
                    **host,
                }
            )
            print(rows[-1], flush=True)
    title = (
        "bench_decode_attention: one layer's decode attention in a CUDA graph, "
        f"{heads}/{kv} heads of {dim}"
    )
    print_table(title, rows, list(rows[0]))
    save_json("bench_decode_attention.json", {"card": card(), "rows": rows})


if __name__ == "__main__":
    main()
