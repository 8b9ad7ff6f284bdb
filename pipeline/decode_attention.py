"""A decode step's attention as a Triton kernel on CUDA that reads only the keys a row may
see: one query token a row against the whole static cache under a boolean mask (true
where the row may look), each row reading only the columns from its first allowed one to
its last.

Why: SDPA reads every column it is handed, so the engine handed it the columns in use
rounded up to ``engine.ATTENTION_ROUND`` (the longest row's reach, with every shorter row's
left padding and unused tail) and captured one CUDA graph per rounded length. This
kernel's work follows each row's own keys, so the engine hands it the whole cache and
captures one graph a session (``StaticRunner.reads_valid_keys_only``).

How (flash-decoding): a program per (row, key/value head, split of the row's columns)
finds the row's first and last allowed column in its mask (a byte a column), then
computes the head's whole group of query heads against its share of them (one read of the
keys and values serves the group) with an online softmax in float32, masking the columns
in between that the row may not see; a second kernel joins the splits' partial results by
their log-sum-exp. Splits are made only where rows and heads alone leave the GPU's
multiprocessors idle (small batches); at a large batch each program covers a row's whole
range and writes the output itself. Gemma-2's score soft-capping is applied to the scores
in float32 (the matmul path rounded them to the model's dtype first).

The sums run in another order than SDPA's kernels: the results agree to the model's
dtype's rounding, not bit for bit (``tests/gpu/test_decode_attention_gpu.py``). Used only
where ``fused_kernels.available`` says the kernels can run.
"""

from __future__ import annotations

import functools
import math

import torch

from pipeline import fused_kernels
from pipeline.fused_kernels import triton

# Cache columns a program reads at a time.
BLOCK_KEYS = 64
# The largest head the kernel takes (Gemma's 256); the runner attends over the rounded
# columns with SDPA for larger ones.
MAX_HEAD_DIM = 256
# Mask columns a program scans at a time for its row's first and last allowed column.
SCAN_COLUMNS = 1024
# Warps a program, and pipeline stages of its loop at most (``tile_plan``). On an H200 at
# Llama-8B's shape, 64 columns, 4 warps and 2 stages were within 3% of the fastest of seven
# configurations at batches 64 and 256 (tests/bench/bench_decode_attention.py --configs).
NUM_WARPS = 4
NUM_STAGES = 2
# Programs to aim for per multiprocessor when splitting the columns (flash-decoding). On an
# H200 at Llama-8B's shape, 2 against 4: batch 64 left unsplit, 13-32 us a layer against
# 18-38 (the join kernel and the splits' partial results cost more than the idle
# multiprocessors). At batch 16 (128 programs, 132 multiprocessors), 1 splits in two:
# 8.0 / 9.8 / 11.8 us a layer at answer steps 1 / 128 / 255, against 9.7 / 10.4 / 12.3 for
# three splits (2) and 8.7 / 12.0 / 15.2 unsplit (tests/bench/bench_decode_attention.py
# --configs). 0: never split.
PROGRAMS_PER_SM = 1

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        allowed_ptr,
        out_ptr,
        part_acc_ptr,
        part_ml_ptr,
        kv_heads,
        n_keys,
        splits,
        q_stride_b,
        q_stride_h,
        k_stride_b,
        k_stride_h,
        k_stride_s,
        v_stride_b,
        v_stride_h,
        v_stride_s,
        allowed_stride_b,
        out_stride_b,
        out_stride_h,
        scale,
        softcap,
        GROUPS: tl.constexpr,
        GROUPS_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
        SCAN: tl.constexpr,
        SOFTCAP: tl.constexpr,
        SPLIT: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
        split = tl.program_id(1)
        b = pid // kv_heads
        kv_head = pid % kv_heads
        g = tl.arange(0, GROUPS_PAD)
        d = tl.arange(0, DIM_PAD)
        g_ok = g < GROUPS
        heads = kv_head * GROUPS + g
        if DIM_PAD == HEAD_DIM:  # noqa: SIM108 - a constexpr branch of the kernel
            q_mask = g_ok[:, None]
        else:
            q_mask = g_ok[:, None] & (d < HEAD_DIM)[None, :]
        q = tl.load(
            q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
            mask=q_mask,
            other=0.0,
        )
        allowed_row = allowed_ptr + b * allowed_stride_b
        # The row's allowed columns lie in [lo, hi): found from its mask (a byte a column,
        # read once), so the loop below reads no key outside them, and the splits share
        # the row's own columns evenly.
        lo = n_keys
        hi = 0
        for first in range(0, n_keys, SCAN):
            cols = first + tl.arange(0, SCAN)
            ok = tl.load(allowed_row + cols, mask=cols < n_keys, other=0) != 0
            lo = tl.minimum(lo, tl.min(tl.where(ok, cols, n_keys), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(ok, cols + 1, 0), axis=0))
        per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), splits), BLOCK) * BLOCK
        start = lo + split * per_split
        stop = tl.minimum(start + per_split, hi)
        k_base = k_ptr + b * k_stride_b + kv_head * k_stride_h
        v_base = v_ptr + b * v_stride_b + kv_head * v_stride_h
        m = tl.full([GROUPS_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUPS_PAD], tl.float32)
        acc = tl.zeros([GROUPS_PAD, DIM_PAD], tl.float32)
        for first in range(start, stop, BLOCK):
            cols = first + tl.arange(0, BLOCK)
            inside = cols < stop
            ok = tl.load(allowed_row + cols, mask=inside, other=0) != 0
            cols64 = cols.to(tl.int64)
            if DIM_PAD == HEAD_DIM:
                kv_mask = inside[:, None]
            else:
                kv_mask = inside[:, None] & (d < HEAD_DIM)[None, :]
            keys = tl.load(
                k_base + cols64[:, None] * k_stride_s + d[None, :], mask=kv_mask, other=0.0
            )
            values = tl.load(
                v_base + cols64[:, None] * v_stride_s + d[None, :], mask=kv_mask, other=0.0
            )
            if IEEE:
                scores = tl.dot(q, tl.trans(keys), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(keys))
            scores = scores * scale
            if SOFTCAP:  # tanh(s / cap) * cap, tanh through exp (finite for any s)
                e = tl.exp(-2.0 * tl.abs(scores / softcap))
                t = (1.0 - e) / (1.0 + e)
                scores = tl.where(scores < 0, -t, t) * softcap
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            # Still -inf where no key was allowed yet (a hole): nothing to scale or add.
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, values.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(values.dtype), values)
            acc = acc * alpha[:, None] + pv
            m = m_new
        if SPLIT:
            # Partial results, joined by ``_join_kernel``: [B * H, splits, DIM_PAD] and
            # [B * H, splits, 2] (max score, sum of exponentials).
            part = (b * kv_heads * GROUPS + heads) * splits + split
            tl.store(part_acc_ptr + part[:, None] * DIM_PAD + d[None, :], acc, mask=g_ok[:, None])
            tl.store(part_ml_ptr + part * 2, m, mask=g_ok)
            tl.store(part_ml_ptr + part * 2 + 1, total, mask=g_ok)
        else:
            out = acc / tl.where(total > 0, total, 1.0)[:, None]
            tl.store(
                out_ptr + b * out_stride_b + heads[:, None] * out_stride_h + d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=q_mask,
            )

    @triton.jit
    def _join_kernel(
        part_acc_ptr,
        part_ml_ptr,
        out_ptr,
        heads,
        splits,
        out_stride_b,
        out_stride_h,
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # b * heads + head
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, DIM_PAD)
        s_ok = s < splits
        part = row * splits + s
        m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
        total = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
        top = tl.max(m, axis=0)  # finite: a row always sees its own newest key
        weight = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        acc = tl.load(
            part_acc_ptr + part[:, None] * DIM_PAD + d[None, :], mask=s_ok[:, None], other=0.0
        )
        denominator = tl.sum(weight * total, axis=0)
        out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(denominator > 0, denominator, 1.0)
        b = row // heads
        head = row % heads
        tl.store(
            out_ptr + b * out_stride_b + head * out_stride_h + d,
            out.to(out_ptr.dtype.element_ty),
            mask=d < HEAD_DIM,
        )


@functools.cache
def _multiprocessors(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


@functools.cache
def _shared_memory(index: int) -> int:
    """Bytes of shared memory a program may use on this GPU (its opt-in limit; 99 KiB, the
    smallest of recent GPUs', where torch does not say)."""
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def tile_plan(dim_pad: int, element_size: int, shared_memory: int) -> tuple[int, int]:
    """(columns a block, pipeline stages) for keys and values of ``dim_pad`` elements of
    ``element_size`` bytes: ``BLOCK_KEYS`` and ``NUM_STAGES`` where a stage's key and value
    tiles fit (each stage buffers both) within two thirds of the GPU's shared memory, else
    fewer stages, then smaller blocks (an H200 refused fp32 heads of 256 at 64 columns and
    three stages: 282 KB asked, 232 KB there)."""
    budget = shared_memory * 2 // 3
    # Heads over 128: half the columns a block (Gemma-2's 256 on an H200: 32 columns, four
    # warps, was the fastest of four configurations at batches 16 to 256).
    block = max(16, BLOCK_KEYS * 128 // max(dim_pad, 128))
    while block > 16 and 2 * block * dim_pad * element_size > budget:
        block //= 2
    stage = 2 * block * dim_pad * element_size
    return block, max(1, min(NUM_STAGES, budget // stage))


def split_count(programs: int, n_keys: int, multiprocessors: int) -> int:
    """Splits of each row's columns for ``programs`` (row, key/value head) programs over a
    cache of ``n_keys`` columns: one where the programs alone fill the GPU, else as many as
    bring them to ``PROGRAMS_PER_SM`` a multiprocessor, no more than the cache has blocks."""
    blocks = max(1, math.ceil(n_keys / BLOCK_KEYS))
    wanted = max(1, math.ceil(PROGRAMS_PER_SM * multiprocessors / max(programs, 1)))
    return min(blocks, wanted)


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor | None:
    """Attention of one query token a row: ``query`` [B, H, 1, D], ``key``/``value``
    [B, KV, S, D] (H a multiple of KV; any strides with the last dim contiguous),
    ``allowed`` [B, 1, 1, S] bool, true where the row may look (at least one key a row).
    Returns [B, 1, H, D] in the query's dtype, as transformers' attention functions do;
    None where the kernel does not apply here (the caller runs its torch code)."""
    if triton is None or query.dim() != 4 or key.dim() != 4 or allowed.dim() != 4:
        return None
    b, heads, q_len, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    if (
        q_len != 1
        or not fused_kernels.available(query)
        or key.shape != value.shape
        or key.shape[0] != b
        or key.shape[3] != dim
        or heads % kv_heads
        or allowed.dtype != torch.bool
        or allowed.shape != (b, 1, 1, n_keys)
        or key.dtype != query.dtype
        or value.dtype != query.dtype
        or query.stride(-1) != 1
        or key.stride(-1) != 1
        or value.stride(-1) != 1
        or (n_keys > 1 and allowed.stride(-1) != 1)
        or not (key.device == value.device == allowed.device == query.device)
        or dim > MAX_HEAD_DIM
        or n_keys == 0
    ):
        return None
    groups = heads // kv_heads
    index = query.device.index or 0
    out = torch.empty((b, 1, heads, dim), dtype=query.dtype, device=query.device)
    splits = split_count(b * kv_heads, n_keys, _multiprocessors(index))
    dim_pad = max(16, triton.next_power_of_2(dim))
    block, stages = tile_plan(dim_pad, query.element_size(), _shared_memory(index))
    if splits > 1:
        part_acc = torch.empty((b * heads, splits, dim_pad), dtype=torch.float32, device=out.device)
        part_ml = torch.empty((b * heads, splits, 2), dtype=torch.float32, device=out.device)
    else:  # unused: the programs write the output themselves
        part_acc = part_ml = out
    launched = fused_kernels.launch(
        _split_kernel,
        (b * kv_heads, splits),
        query,
        key,
        value,
        allowed,
        out,
        part_acc,
        part_ml,
        kv_heads,
        n_keys,
        splits,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        allowed.stride(0),
        out.stride(0),
        out.stride(2),
        float(scale),
        float(softcap or 1.0),
        GROUPS=groups,
        GROUPS_PAD=max(16, triton.next_power_of_2(groups)),
        HEAD_DIM=dim,
        DIM_PAD=dim_pad,
        BLOCK=block,
        SCAN=SCAN_COLUMNS,
        SOFTCAP=bool(softcap),
        SPLIT=splits > 1,
        IEEE=query.dtype == torch.float32,
        num_warps=NUM_WARPS,
        num_stages=stages,
    )
    if launched and splits > 1:
        launched = fused_kernels.launch(
            _join_kernel,
            (b * heads,),
            part_acc,
            part_ml,
            out,
            heads,
            splits,
            out.stride(0),
            out.stride(2),
            HEAD_DIM=dim,
            DIM_PAD=dim_pad,
            SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
            num_warps=4,
        )
    return out if launched else None
