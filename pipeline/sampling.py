"""Sampling that depends only on (row seed, step, logits): the same row gets the same tokens
whatever batch it runs in and however often a job is resumed, with no host sync and no
per-row generator objects (so a decode step can live in a CUDA graph).

Each row draws one uniform per step from a counter-based hash of (seed, step) and inverts
the CDF of its softmax; temperature 0 is greedy.
"""

from __future__ import annotations

import hashlib
import struct

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def row_seed(job_seed: int, question: int, instruction: int, sample: int) -> int:
    """A 31-bit seed for one response, stable across processes and Python versions."""
    packed = struct.pack("<qqqq", job_seed, question, instruction, sample)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") & 0x7FFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit values (products wrap; the mask keeps the
    low 32 bits, which is all the hash needs)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row for this step; ``step`` is a 0-d int64 tensor so a CUDA
    graph can advance it in place."""
    x = _hash32((seeds & _MASK32) ^ _hash32((step * _GOLDEN + 0x632BE5AB) & _MASK32))
    # 24 bits, centred: exact in float32 and never 0 or 1.
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample_next(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    step: torch.Tensor,
    temperature: float,
    top_p: float,
) -> torch.Tensor:
    """Next token per row from ``logits`` [B, V]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    u = row_uniforms(seeds, step)
    if top_p >= 1.0:
        cdf = probs.cumsum(dim=-1)
        target = (u * cdf[:, -1]).unsqueeze(1)
        return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=logits.shape[-1] - 1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cdf = sorted_probs.cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (cdf - sorted_probs) < top_p
    kept = sorted_probs * keep
    kept_cdf = kept.cumsum(dim=-1)
    target = (u * kept_cdf[:, -1]).unsqueeze(1)
    index = torch.searchsorted(kept_cdf, target).clamp_(max=logits.shape[-1] - 1)
    return order.gather(1, index).squeeze(1)
