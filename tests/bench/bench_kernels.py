"""The Triton kernels of ``pipeline.fused_kernels`` against the torch code they replace, per
call, each timed inside a CUDA graph (as the decode step runs them), on a family's 8B-class
decode shapes: one RMSNorm of a [B, 1, hidden] state (the runner's torch formula: a float32
cast, ``F.rms_norm``, a cast back, the weight) and one layer's rotary embedding of q and k,
views of one fused q/k/v product (transformers' ``apply_rotary_pos_emb``). Prints the
speedup and whether the rotary results are equal bit for bit.

    python tests/bench/bench_kernels.py [--batches 16,64,256] [--hidden 4096] [--heads 32]
        [--kv-heads 8] [--head-dim 128]

Session 13's figures (docs/benchmarks.md, "Session 13") came from a scratch script
that timed the same calls the same way; this file is that script, committed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import card, print_table, save_json  # noqa: E402

from pipeline import fused_kernels  # noqa: E402


def graph_us(call: Callable[[], object], inner: int = 20, replays: int = 20) -> float:
    """Microseconds a call: ``inner`` calls captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm: Triton builds, cuBLAS and the allocator set up
        call()
        call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            call()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / (replays * inner)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available() or fused_kernels.triton is None:
        raise SystemExit("bench_kernels needs a CUDA device and Triton")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    dtype, device = torch.bfloat16, "cuda"
    heads, kv, dim = args.heads, args.kv_heads, args.head_dim
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 1, args.hidden, device=device, dtype=dtype)
        weight = torch.randn(args.hidden, device=device, dtype=dtype)

        def norm_torch(x=x, weight=weight) -> torch.Tensor:
            return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=1e-5).to(x.dtype)

        def norm_kernel(x=x, weight=weight) -> torch.Tensor | None:
            return fused_kernels.rms_norm(x, weight, 1e-5, fused_kernels.NORM_ROUND_THEN_SCALE)

        fused = torch.randn(batch, 1, (heads + 2 * kv) * dim, device=device, dtype=dtype)
        q, k, _v = fused.split([heads * dim, kv * dim, kv * dim], dim=-1)
        q = q.view(batch, 1, heads, dim).transpose(1, 2)
        k = k.view(batch, 1, kv, dim).transpose(1, 2)
        cos = torch.randn(batch, 1, dim, device=device, dtype=dtype)
        sin = torch.randn(batch, 1, dim, device=device, dtype=dtype)

        def rotary_torch(q=q, k=k, cos=cos, sin=sin) -> tuple[torch.Tensor, torch.Tensor]:
            return apply_rotary_pos_emb(q, k, cos, sin)

        def rotary_kernel(q=q, k=k, cos=cos, sin=sin):  # noqa: ANN202
            return fused_kernels.rotary(q, k, cos, sin, dtype)

        ours, theirs = rotary_kernel(), rotary_torch()
        if ours is None or norm_kernel() is None:
            raise SystemExit("a kernel declined the bench's shapes")
        equal = all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        norm = (graph_us(norm_torch), graph_us(norm_kernel))
        rotary = (graph_us(rotary_torch), graph_us(rotary_kernel))
        rows.append(
            {
                "batch": batch,
                "norm torch us": norm[0],
                "norm kernel us": norm[1],
                "norm speedup": norm[0] / norm[1],
                "rotary torch us": rotary[0],
                "rotary kernel us": rotary[1],
                "rotary speedup": rotary[0] / rotary[1],
                "rotary bit-equal": equal,
            }
        )
        print(rows[-1], flush=True)
    print_table("bench_kernels: a call, inside a CUDA graph", rows, list(rows[0]))
    save_json("bench_kernels.json", {"card": card(), "rows": rows})


if __name__ == "__main__":
    main()
