"""Triton kernels for the static runner's small per-layer work on CUDA: an RMSNorm in one
kernel (about four: the float32 cast, ``F.rms_norm``, the cast back, the weight), the
rotary embedding of a layer's queries and keys in one kernel (ten: a negation, a ``cat``,
two products and a sum each for q and k), a decode step's new key and value written into
the cache in one (two generic index kernels of about 4 us each at batch 16 on an H200),
and the MLP's ``silu(gate) * up`` in one (two strided elementwise kernels). Under a CUDA
graph a small kernel still costs its few microseconds of GPU time, and an 8B decode step
ran about a thousand of them.

Each kernel computes transformers' formula with its roundings: the products and the sum
of the rotary embedding rounded to the model's dtype where transformers' tensors are in
that dtype, no fused multiply-add (``enable_fp_fusion=False``). The rotary kernel gives
bit for bit transformers' result (``tests/gpu``), and so does the gated SiLU (torch's
``x / (1 + exp(-x))`` in float32 with the same ``expf`` and an IEEE division, rounded to
the model's dtype before the product); the norm's mean of squares is a reduction in
another order (as ``F.rms_norm``'s already was).

Used only on CUDA tensors with Triton importable, outside torch.compile's tracing (a
compiled layer fuses the same work itself); elsewhere the callers run their torch code.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

try:  # CUDA builds of torch bring Triton; a CPU machine has none and needs none
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# RMSNorm formulas (``runners.fused_norm_forward``), as the kernel's MODE.
NORM_ROUND_THEN_SCALE = 0  # weight * norm(x).to(dtype)
NORM_SCALE_THEN_ROUND = 1  # (weight * norm(x)).to(dtype)
NORM_ONE_PLUS_WEIGHT = 2  # (norm(x) * (1 + weight.float())).to(dtype)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# Off: the callers run their torch code. ``PERSONA_TRITON_KERNELS=0`` turns them off for a
# process; benchmarks switch this to measure their worth; a kernel Triton cannot build or
# launch here turns them off for the rest of the process (``launch``).
ENABLED = os.environ.get("PERSONA_TRITON_KERNELS", "1") != "0"
log = logging.getLogger("persona.engine")


def available(tensor: torch.Tensor) -> bool:
    """The kernels can run on this tensor here: CUDA, Triton importable, not inside
    torch.compile's tracing."""
    # Tracing first: a compiled layer then never guards on ENABLED (a flip would recompile).
    return (
        not torch.compiler.is_compiling()
        and ENABLED
        and triton is not None
        and tensor.is_cuda
        and tensor.dtype in _FLOATS
    )


def usable_on(device: torch.device) -> bool:
    """The kernels can run on this device's tensors here (``available`` without a
    tensor)."""
    return ENABLED and triton is not None and torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        inner_rows,
        x_outer_stride,
        x_inner_stride,
        n_cols,
        eps,
        MODE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
        x_row = x_ptr + (row // inner_rows) * x_outer_stride + (row % inner_rows) * x_inner_stride
        cols = tl.arange(0, BLOCK)
        keep = cols < n_cols
        x = tl.load(x_row + cols, mask=keep, other=0.0).to(tl.float32)
        normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        if MODE == 0:
            y = w * normed.to(dtype).to(tl.float32)
        elif MODE == 1:
            y = w * normed
        else:
            y = normed * (1.0 + w)
        tl.store(out_ptr + row * n_cols + cols, y.to(dtype), mask=keep)

    @triton.jit
    def _rotary_kernel(
        q_ptr,
        k_ptr,
        q_out_ptr,
        k_out_ptr,
        cos_ptr,
        sin_ptr,
        q_heads,
        seq,
        q_stride_b,
        q_stride_h,
        q_stride_s,
        k_stride_b,
        k_stride_h,
        k_stride_s,
        cs_stride_b,
        cs_stride_s,
        head_dim,
        half,
        ROUND: tl.constexpr,
        BLOCK: tl.constexpr,
        PASS_BLOCK: tl.constexpr,
    ):
        # One program a (token, head): heads 0..q_heads-1 are the queries', the rest the
        # keys'. The results are contiguous [B, heads, S, D].
        token = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
        head = tl.program_id(1)
        b = token // seq
        s = token % seq
        if head < q_heads:
            src = q_ptr + b * q_stride_b + head * q_stride_h + s * q_stride_s
            dst = q_out_ptr + ((b * q_heads + head) * seq + s) * head_dim
        else:
            k_heads = tl.num_programs(1) - q_heads
            kh = head - q_heads
            src = k_ptr + b * k_stride_b + kh * k_stride_h + s * k_stride_s
            dst = k_out_ptr + ((b * k_heads + kh) * seq + s) * head_dim
        cs = b * cs_stride_b + s * cs_stride_s
        cols = tl.arange(0, BLOCK)
        keep = cols < half
        dtype = q_out_ptr.dtype.element_ty
        x1 = tl.load(src + cols, mask=keep, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + cols, mask=keep, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + cs + cols, mask=keep, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cs + half + cols, mask=keep, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + cs + cols, mask=keep, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + cs + half + cols, mask=keep, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
        a1 = x1 * c1
        b1 = -x2 * s1
        a2 = x2 * c2
        b2 = x1 * s2
        if ROUND:  # transformers' products and sum, each in the model's dtype
            a1 = a1.to(dtype).to(tl.float32)
            b1 = b1.to(dtype).to(tl.float32)
            a2 = a2.to(dtype).to(tl.float32)
            b2 = b2.to(dtype).to(tl.float32)
        tl.store(dst + cols, (a1 + b1).to(dtype), mask=keep)
        tl.store(dst + half + cols, (a2 + b2).to(dtype), mask=keep)
        # Phi-3's partial rotary: the columns past the rotated ones pass through.
        rest = tl.arange(0, PASS_BLOCK)
        passing = 2 * half + rest < head_dim
        tail = tl.load(src + 2 * half + rest, mask=passing, other=0.0)
        tl.store(dst + 2 * half + rest, tail.to(dtype), mask=passing)

    @triton.jit
    def _cache_write_kernel(
        key_ptr,
        value_ptr,
        keys_ptr,
        values_ptr,
        column_ptr,
        key_stride_b,
        key_stride_h,
        value_stride_b,
        value_stride_h,
        cache_stride_b,
        cache_stride_h,
        cache_stride_s,
        head_dim,
        BLOCK: tl.constexpr,
    ):
        # One program a (row, key/value head): its new key and value at the row's column.
        b = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
        head = tl.program_id(1)
        column = tl.load(column_ptr + b).to(tl.int64)
        d = tl.arange(0, BLOCK)
        keep = d < head_dim
        at = b * cache_stride_b + head * cache_stride_h + column * cache_stride_s + d
        key = tl.load(key_ptr + b * key_stride_b + head * key_stride_h + d, mask=keep)
        value = tl.load(value_ptr + b * value_stride_b + head * value_stride_h + d, mask=keep)
        tl.store(keys_ptr + at, key, mask=keep)
        tl.store(values_ptr + at, value, mask=keep)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, x_row_stride, width, BLOCK: tl.constexpr):
        # x's row: gate (``width`` columns), then up; out's row: silu(gate) * up.
        row = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < width
        gate = tl.load(x_ptr + row * x_row_stride + cols, mask=keep, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_row_stride + width + cols, mask=keep, other=0.0)
        dtype = out_ptr.dtype.element_ty
        # torch's silu: x / (1 + expf(-x)) in float32, then rounded to the tensor's dtype;
        # the product of two tensors of that dtype in float32, rounded again.
        act = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate)).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (act * up.to(tl.float32)).to(dtype), mask=keep)


def _rows(x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(rows, inner rows, outer stride, inner stride) addressing x's last-dim rows in at
    most two strided levels, or None (x's last dim not contiguous, or a layout of more)."""
    if x.dim() < 2 or x.stride(-1) != 1:
        return None
    shape, strides = list(x.shape[:-1]), list(x.stride()[:-1])
    # Merge leading dims where one steps over the next exactly.
    merged: list[list[int]] = []  # [size, stride]
    for size, stride in zip(shape, strides, strict=True):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if not merged:
        return 1, 1, 0, 0
    if len(merged) == 1:
        return merged[0][0], merged[0][0], 0, merged[0][1]
    if len(merged) == 2:
        (outer, outer_stride), (inner, inner_stride) = merged
        return outer * inner, inner, outer_stride, inner_stride
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: int) -> torch.Tensor | None:
    """RMSNorm over x's last dim by the formula ``mode`` names, in x's dtype, as one kernel;
    None where the kernel does not apply (the caller runs its torch code)."""
    layout = _rows(x)
    n = x.shape[-1]
    if (
        triton is None
        or layout is None
        or weight.dim() != 1
        or weight.shape[0] != n
        or not weight.is_contiguous()
        or weight.device != x.device
        or (mode == NORM_ROUND_THEN_SCALE and weight.dtype != x.dtype)
        or n > 16384
    ):
        return None
    rows, inner, outer_stride, inner_stride = layout
    block = triton.next_power_of_2(n)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launched = True
    if rows:
        launched = launch(
            _rms_norm_kernel,
            (rows,),
            x,
            weight,
            out,
            inner,
            outer_stride,
            inner_stride,
            n,
            eps,
            MODE=mode,
            BLOCK=block,
            num_warps=4 if block < 2048 else 8 if block < 8192 else 16,
            enable_fp_fusion=False,
        )
    return out if launched else None


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """transformers' ``apply_rotary_pos_emb`` (``unsqueeze_dim=1``) for q [B, Hq, S, D] and
    k [B, Hk, S, D] with cos and sin [B or 1, S, R] (R <= D, the first R columns rotated),
    results in ``dtype``, one kernel for both; None where it does not apply."""
    if triton is None or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return None
    b, q_heads, seq, dim = q.shape
    rotated = cos.shape[-1]
    if (
        k.shape[0] != b
        or k.shape[2:] != (seq, dim)
        or cos.shape != sin.shape
        or cos.shape[1] != seq
        or cos.shape[0] not in (1, b)
        or cos.stride() != sin.stride()
        or rotated % 2
        or rotated > dim
        or q.dtype != k.dtype
        or cos.dtype != sin.dtype
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or cos.stride(-1) != 1
        or k.device != q.device
        or cos.device != q.device
        or sin.device != q.device
    ):
        return None
    # Products rounded to the model's dtype where transformers multiplies two tensors of it;
    # otherwise (OLMo-2's float32 cos and sin) float32 throughout, cast at the end.
    round_each = q.dtype == cos.dtype and q.dtype != torch.float32
    if not round_each and torch.promote_types(q.dtype, cos.dtype) != torch.float32:
        return None
    k_heads = k.shape[1]
    q_out = torch.empty((b, q_heads, seq, dim), dtype=dtype, device=q.device)
    k_out = torch.empty((b, k_heads, seq, dim), dtype=dtype, device=q.device)
    launched = True
    if q_out.numel() and k_out.numel():
        launched = launch(
            _rotary_kernel,
            (b * seq, q_heads + k_heads),
            q,
            k,
            q_out,
            k_out,
            cos,
            sin,
            q_heads,
            seq,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            0 if cos.shape[0] == 1 else cos.stride(0),
            cos.stride(1),
            dim,
            rotated // 2,
            ROUND=round_each,
            BLOCK=triton.next_power_of_2(max(rotated // 2, 1)),
            PASS_BLOCK=triton.next_power_of_2(max(dim - rotated, 1)),
            num_warps=1,
            enable_fp_fusion=False,
        )
    return (q_out, k_out) if launched else None


def cache_write(
    keys: torch.Tensor,
    values: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    column: torch.Tensor,
) -> bool:
    """A decode step's new ``key`` and ``value`` [B, KV, 1, D] into the cache's ``keys`` and
    ``values`` [B, KV, L, D] at each row's column (``column`` [B], integers), one kernel
    for both; False where it does not apply (the caller writes them with torch)."""
    if (
        triton is None
        or not available(key)
        or keys.dim() != 4
        or key.dim() != 4
        or keys.shape != values.shape
        or keys.stride() != values.stride()
        or key.shape != value.shape
        or key.shape[2] != 1
        or key.shape[:2] != keys.shape[:2]
        or key.shape[3] != keys.shape[3]
        or len({t.dtype for t in (keys, values, key, value)}) != 1
        or len({t.device for t in (keys, values, key, value, column)}) != 1
        or any(t.stride(-1) != 1 for t in (keys, values, key, value))
        or column.shape != (keys.shape[0],)
        or column.dtype not in (torch.int32, torch.int64)
        or not column.is_contiguous()
    ):
        return False
    b, heads, _, dim = key.shape
    if not b * heads:
        return True
    return launch(
        _cache_write_kernel,
        (b, heads),
        key,
        value,
        keys,
        values,
        column,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        dim,
        BLOCK=triton.next_power_of_2(dim),
        num_warps=1,
    )


# Columns of the gated SiLU a program computes.
SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` for ``gate_up`` [..., 2I] (gate its first I columns, up the rest:
    the fused gate/up product), [..., I] in its dtype, as torch computes it; None where
    the kernel does not apply (the caller runs its torch code)."""
    layout = _rows(gate_up)
    if triton is None or layout is None or gate_up.shape[-1] % 2:
        return None
    rows, inner, outer_stride, inner_stride = layout
    if rows > 1 and rows != inner:  # rows at one stride only
        return None
    width = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], width), dtype=gate_up.dtype, device=gate_up.device)
    if not out.numel():
        return out
    launched = launch(
        _silu_mul_kernel,
        (rows, triton.cdiv(width, SILU_BLOCK)),
        gate_up,
        out,
        inner_stride,
        width,
        BLOCK=SILU_BLOCK,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out if launched else None


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> bool:
    """Launch ``kernel`` on its tensors' device (the first tensor argument's); False, with
    the kernels off for the rest of the process and one warning, where Triton cannot build
    or launch it here (a GPU or driver it does not support): the callers then run their
    torch code, the same formulas."""
    global ENABLED
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    try:
        # One launch at a time: engines on several GPUs step in threads, and two threads
        # building one kernel at once is a failure of Triton's own. (Held only by eager
        # calls: a replayed CUDA graph runs no Python.)
        with _LAUNCH_LOCK, _on_device(device):
            kernel[grid](*args, **meta)
    except Exception as exc:  # noqa: BLE001 - any failure of Triton's: the torch code runs
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise  # the capture is broken already: the engine's own error path reports it
        ENABLED = False
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("Triton kernels off for this process (%s); the torch code runs", reason)
        return False
    return True


_LAUNCH_LOCK = threading.Lock()


@contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """Triton launches on the current device's current stream: the tensors' device."""
    if device.index is None or device.index == torch.cuda.current_device():
        yield
        return
    with torch.cuda.device(device):
        yield


# ---- transformers' rotary function, swapped in its modeling modules while runners work ----
# module -> (runners inside, the module's own function)
_SWAPPED: dict[Any, tuple[int, Callable]] = {}
_SWAP_LOCK = threading.Lock()
# One wrapper a (module, function it wraps): a compiled layer's guard on the global sees the
# same object swap after swap, and a function replaced meanwhile (another library's) is the
# one wrapped the next time, never a stale one.
_WRAPPERS: dict[tuple[Any, Callable], Callable] = {}


def _wrapper(module: Any, original: Callable) -> Callable:
    """``apply_rotary_pos_emb`` through the kernel where it applies, else ``original``.
    OLMo-2's rotary is in float32 and casts its results back to q's and k's dtype; every
    other family's cos and sin come in the model's dtype and its results stay in it."""
    casts_back = "olmo2" in module.__name__

    def apply_rotary_pos_emb(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        # The call every tested family's attention makes: (q, k, cos, sin), by position.
        if len(args) == 4 and not kwargs and available(args[0]):
            q, k, cos, sin = args
            dtype = q.dtype if casts_back else torch.promote_types(q.dtype, cos.dtype)
            if dtype == q.dtype:
                result = rotary(q, k, cos, sin, dtype)
                if result is not None:
                    return result
        return original(*args, **kwargs)

    apply_rotary_pos_emb.persona_wraps = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def rotary_modules(layers: list[Any]) -> list[Any]:
    """The modeling modules of these layers' attention classes that define transformers'
    ``apply_rotary_pos_emb`` (the function their forward calls by its global name). It
    does not look at the formula: the runner calls it for its tested families only, whose
    formula the kernel computes (others rotate interleaved pairs, as Cohere and GLM, or
    hand a half-width cos, as GPT-OSS)."""
    import inspect

    found = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        module = inspect.getmodule(type(attn)) if attn is not None else None
        swappable = callable(getattr(module, "apply_rotary_pos_emb", None))
        if module is not None and swappable and module not in found:
            found.append(module)
    return found


@contextmanager
def rotary_swapped(modules: list[Any]) -> Iterator[None]:
    """Each module's ``apply_rotary_pos_emb`` is the kernel's wrapper meanwhile (process
    wide, counted: runners may overlap on one family; the wrapper gives transformers'
    result, so another model of the family running meanwhile computes the same)."""
    with _SWAP_LOCK:
        for module in modules:
            inside, original = _SWAPPED.get(module, (0, None))
            if not inside:
                original = module.apply_rotary_pos_emb
                # One of ours put back by someone who kept it: wrap what it wraps.
                original = getattr(original, "persona_wraps", original)
                if (module, original) not in _WRAPPERS:
                    _WRAPPERS[module, original] = _wrapper(module, original)
                module.apply_rotary_pos_emb = _WRAPPERS[module, original]
            _SWAPPED[module] = (inside + 1, original)
    try:
        yield
    finally:
        with _SWAP_LOCK:
            for module in modules:
                inside, original = _SWAPPED.pop(module)
                if inside > 1:
                    _SWAPPED[module] = (inside - 1, original)
                elif module.apply_rotary_pos_emb is _WRAPPERS.get((module, original)):
                    # Ours still: transformers' back. (Replaced meanwhile: left as it is.)
                    module.apply_rotary_pos_emb = original
