"""The forward passes under the decode engine (``pipeline.engine``).

- ``StaticRunner``: our forward around the model's own decoder layers, with a static KV cache
  we own, so the decode step can be captured in a CUDA graph. The layers run as transformers
  wrote them (projections, fused qkv, q/k norms, rotary, attention soft-capping, extra and
  post norms); attention itself runs in ``grouped_attention``, registered with transformers'
  ``AttentionInterface`` and switched on only while our runner calls the layers. What we
  write ourselves is what sits around the layers: the embedding scale of older Gemma code,
  rotary embeddings per layer type (Gemma-3's local base), masks per layer (padding, causal,
  sliding windows), the final norm, ``lm_head`` and final-logit soft-capping. While it works,
  the layers' RMSNorms run as one fused kernel each (``fused_norm_forward``; on CUDA one
  Triton kernel), their rotary embeddings on CUDA as one Triton kernel a layer
  (``pipeline.fused_kernels``) and their q/k/v and gate/up projections as one matmul a group
  (``pipeline.fused_projections``): the same formulas, fewer kernels a step.
- ``HFRunner``: the model's own forward with a dynamic cache, for architectures whose model
  code does more than that. Steering, capture and watching run in forward hooks on the
  decoder layers, so they read and change the same states as on the static runner.

Both call ``hook(index, h)`` after the embedding (index 0) and after every block, and carry
on with what it returns.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from pipeline import fused_kernels
from pipeline.decode_attention import MAX_HEAD_DIM, decode_attention
from pipeline.fused_projections import fused_groups, gated_silu_forward
from pipeline.models import cache_kwarg

# Called with (hidden-state index, state) after the embedding and after every block; returns
# the state to carry on with (steering changes it, capture only reads it).
HiddenHook = Callable[[int, torch.Tensor], torch.Tensor]

# Families whose exactness against HF is tested (tests/test_architectures.py, tests/gpu/).
TESTED_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
)
ATTENTION_NAME = "persona_grouped"
# The same, its GPU decode steps on kernels that repeat run to run (``--deterministic``).
REPEATABLE_ATTENTION_NAME = "persona_grouped_repeatable"
# Older Gemma code scales the embeddings in the model's forward, not in the embedding module.
_SCALED_EMBEDDING_FAMILIES = ("gemma", "gemma2", "gemma3_text")

log = logging.getLogger("persona.engine")
# SDPA's ``enable_gqa`` (torch >= 2.5): grouped key/value heads without repeating them.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def grouped_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    *,
    repeatable: bool = False,
    **_kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for the static runner. ``query`` [B, H, q, D]; ``key``/``value``
    [B, KV, k, D] straight from our cache (no repeated heads); ``attention_mask``: a
    prefill's [B, 1, q, k] bool, true where a query may look, a decode step's additive
    [B, 1, 1, k], 0 or -inf, a decode step's bool [B, 1, 1, k] over the whole cache
    (``StaticRunner.reads_valid_keys_only``), or the additive [B, 1, q, k] of a model's own
    forward run inside ``attention()`` (``additive_masks``: a local judge's, extraction's).
    ``repeatable`` (registered as ``REPEATABLE_ATTENTION_NAME``,
    ``StaticRunner(deterministic=True)``): a GPU decode step on kernels whose results repeat
    run to run. Returns [B, q, H, D] as transformers expects."""
    b, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    additive = attention_mask.dtype != torch.bool
    if q_len == 1 and not additive and not repeatable:
        # A decode step over the whole cache (``StaticRunner.reads_valid_keys_only``): on
        # CUDA a kernel that reads only each row's allowed keys, soft-capping included.
        out = decode_attention(query, key, value, attention_mask, scale, softcap)
        if out is not None:
            return out, None
    if additive:  # the model's dtype: SDPA wants the query's (a no-op where they agree)
        attention_mask = attention_mask.to(query.dtype)
    # A deterministic decode step (its mask is the additive one) on a GPU: never SDPA's own
    # pick (below). A prefill keeps SDPA, whose prefill kernels repeat
    # (tests/bench/repeatability.py --where), and so does a forward of many queries under an
    # additive mask (a local judge's or extraction's, ``fused_forward_runner``), should a
    # deterministic engine's switch on the same model serve it: the kernel below takes one
    # query a row. (No flow of ours overlaps them: jobs run in processes of their own, and a
    # model's own forward without masks, such as the judge's prefix pass, gets none from
    # transformers under our attention.)
    repeatable_gpu = repeatable and additive and query.is_cuda and q_len == 1
    # The memory-efficient kernel below takes a head size and a bias row stride in multiples
    # of 8 (its alignment); otherwise the matmuls further down, which repeat too.
    efficient_fits = dim % 8 == 0 and k_len % 8 == 0
    if softcap is None and repeatable_gpu and efficient_fits:
        # Each key/value head's group of query heads as that head's queries (the cache read
        # once, nothing repeated), on the memory-efficient kernel, called by name. SDPA's own
        # pick for grouped heads with a mask (cuDNN; torch 2.11, H200) gives results that
        # differ run to run from batch 64, so a rerun gives other tokens; this kernel's
        # forward repeats bit for bit. Alone it is slower at long caches (570 against 284 us
        # at batch 256 over 1,152 keys); a whole 8B step at batch 256 ran 7-9% slower
        # (tests/bench/repeatability.py --attention, bench_generate.py --deterministic;
        # docs/benchmarks.md, "Repeatable runs"). A call by name depends on no process-wide backend
        # switch (engines on several GPUs step in threads).
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query.reshape(b, kv_heads, groups * q_len, dim),
            key,
            value,
            attention_mask.expand(b, kv_heads, groups * q_len, k_len),
            False,
            scale=scale,
        )[0]
        return out.reshape(b, heads, q_len, dim).transpose(1, 2), None
    if softcap is None and not repeatable_gpu:
        # SDPA's fused kernels, each key/value head serving its query heads in place: on an
        # H200 2-3x faster than the matmuls below at decode, and no [B, H, S, S] float
        # score matrix in the prefill (it can be GBs).
        if _SDPA_GQA:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=scale, enable_gqa=groups > 1
            )
        else:  # torch < 2.5: the heads repeated
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=scale
            )
        return out.transpose(1, 2), None
    # Soft-capped scores (Gemma-2), which SDPA cannot apply, and a deterministic GPU step the
    # kernel above does not fit: each key/value head serves its group of query heads in one
    # matmul, so the cache is read once per step and never copied.
    grouped = query.reshape(b, kv_heads, groups * q_len, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, kv_heads, groups, q_len, k_len)
    if additive:
        scores = scores + attention_mask[:, :, None]
    else:
        scores = scores.masked_fill(~attention_mask[:, :, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(value.dtype).view(b, kv_heads, groups * q_len, k_len)
    out = torch.matmul(weights, value).view(b, heads, q_len, dim)
    return out.transpose(1, 2), None


_registered = False


def _register_attention() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, grouped_attention)
        AttentionInterface.register(
            REPEATABLE_ATTENTION_NAME, functools.partial(grouped_attention, repeatable=True)
        )
        _registered = True


# RMSNorm classes by where their formula rounds to the model's dtype (transformers' code):
# ``weight * norm(x).to(dtype)``, ``(weight * norm(x)).to(dtype)``, ``(norm(x) * (1 +
# weight)).to(dtype)``, with norm(x) = x * rsqrt(mean(x^2) + eps) in float32.
_NORM_ROUND_THEN_SCALE = {
    f"{family}RMSNorm" for family in ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3")
}
_NORM_SCALE_THEN_ROUND = {"Olmo2RMSNorm"}
_NORM_ONE_PLUS_WEIGHT = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"}


def fused_norm_forward(module: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The RMSNorm's forward with its float32 normalisation as one ``F.rms_norm`` kernel,
    the same formula (a decode step ran about eight small kernels a norm, 65 to 290 norms a
    step), and on CUDA the whole formula as one Triton kernel; None for a class whose
    formula is not known here."""
    name = type(module).__name__
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if getattr(module, "weight", None) is None or eps is None:
        return None
    eps = float(eps)

    def normed(x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps)

    # The weight is read at each call: a parameter replaced later (a load) is the one used.
    if name in _NORM_ROUND_THEN_SCALE:
        mode, formula = (
            fused_kernels.NORM_ROUND_THEN_SCALE,
            (lambda x: module.weight * normed(x).to(x.dtype)),
        )
    elif name in _NORM_SCALE_THEN_ROUND:
        mode, formula = (
            fused_kernels.NORM_SCALE_THEN_ROUND,
            (lambda x: (module.weight * normed(x)).to(x.dtype)),
        )
    elif name in _NORM_ONE_PLUS_WEIGHT:
        mode, formula = (
            fused_kernels.NORM_ONE_PLUS_WEIGHT,
            (lambda x: (normed(x) * (1.0 + module.weight.float())).to(x.dtype)),
        )
    else:
        return None

    def forward(x: torch.Tensor) -> torch.Tensor:
        # On CUDA, one Triton kernel for the whole formula (``pipeline.fused_kernels``).
        if fused_kernels.available(x):
            out = fused_kernels.rms_norm(x, module.weight, eps, mode)
            if out is not None:
                return out
        return formula(x)

    return forward


@contextmanager
def _forwards_installed(forwards: list[tuple[Any, Callable]]) -> Iterator[None]:
    """Each module runs the given forward meanwhile (an instance attribute, which
    ``nn.Module.__call__`` finds before the class's). A module that already has an instance
    forward keeps it: accelerate's device hook on a sharded model, or another runner's swap
    on the same model (then that runner's, equal, forward runs). Only our own are removed."""
    installed = []
    for module, forward in forwards:
        if "forward" not in vars(module):
            module.forward = forward
            installed.append((module, forward))
    try:
        yield
    finally:
        for module, forward in installed:
            if vars(module).get("forward") is forward:
                del module.forward


# Per model config: (runners inside ``_attention_switched``, the implementation to restore).
# Two runners may overlap on one model (the dashboard's monitor starts a new decode while the
# one it replaces finishes its step): the switch ends when the last of them leaves. While
# they overlap the repeatable attention serves both if either asked for it: a deterministic
# runner never loses it, and a default one only runs slower meanwhile (the same formula).
_SWITCHED: dict[int, tuple[int, Any]] = {}
_SWITCH_LOCK = threading.Lock()


@contextmanager
def _attention_switched(config: Any, name: str) -> Iterator[None]:
    """The layers read ``config._attn_implementation`` when they run: ours (registered as
    ``name``), only meanwhile."""
    field = "_attn_implementation_internal"
    if not hasattr(config, field):
        field = "_attn_implementation"
    with _SWITCH_LOCK:
        inside, saved = _SWITCHED.get(id(config), (0, None))
        if not inside:
            saved = getattr(config, field)
        if not inside or name == REPEATABLE_ATTENTION_NAME:
            setattr(config, field, name)
        _SWITCHED[id(config)] = (inside + 1, saved)
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            inside, saved = _SWITCHED.pop(id(config))
            if inside > 1:
                _SWITCHED[id(config)] = (inside - 1, saved)
            else:
                setattr(config, field, saved)


class _StaticCache:
    """The KV cache, a key and a value tensor a layer. The prefill hands it to the layers
    whole: as transformers' ``Cache.update``, it stores columns 0..S-1 of the rows ``slots``
    and hands back the prompt's own keys. A decode step hands each layer its own slice
    (``_LayerCache``) at the columns in ``column``."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.column: torch.Tensor | None = None  # [B] per-row columns; None: a prefill
        self.slots: torch.Tensor | None = None  # the cache rows a prefill fills

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_args: Any, **_kw: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        s = key.shape[2]
        slots = self.slots.to(keys.device)
        keys[slots, :, :s] = key
        values[slots, :, :s] = value
        return key, value

    def get_seq_length(self, *_args: Any) -> int:
        return 0


class _LayerCache:
    """One layer's slice of ``_StaticCache`` for a decode step, handed to that layer alone:
    it stores one column a row (a device tensor, so a CUDA graph can advance it) and hands
    back the first ``used`` columns (those the step's rows use). It ignores the layer index
    the attention passes, so every layer's call is the same code over different tensors and
    one compiled layer serves them all (``compile_layers``)."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        column: torch.Tensor,
        mask: torch.Tensor,
        rows: torch.Tensor,
    ):
        """``rows``: arange over the batch on the keys' device, made once a step, not once a
        layer (a kernel each)."""
        self.keys, self.values, self.column, self.mask, self.rows = keys, values, column, mask, rows

    def update(
        self, key: torch.Tensor, value: torch.Tensor, *_args: Any, **_kw: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values, rows = self.keys, self.values, self.rows
        column = self.column.to(keys.device)  # layers may sit on several GPUs
        # On CUDA one kernel for both (``fused_kernels.cache_write``).
        if not fused_kernels.cache_write(keys, values, key, value, column):
            keys[rows, :, column] = key[:, :, 0]
            values[rows, :, column] = value[:, :, 0]
        # The attended columns, as many as the mask's: a size the compiler can keep symbolic
        # (``_mark_dynamic_step``), where a Python int would be a constant in its guards.
        used = self.mask.shape[-1]
        return keys[:, :, :used], values[:, :, :used]

    def get_seq_length(self, *_args: Any) -> int:
        return 0


def _call_layer(
    layer: Any,
    h: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    rope: Any,
    cache: Any,
    cache_arg: str,
) -> torch.Tensor:
    out = layer(
        h,
        attention_mask=mask,
        position_ids=positions,
        position_embeddings=rope,
        **{cache_arg: cache},
    )
    return out[0] if isinstance(out, tuple) else out


# Compiled layers are called by one thread at a time (engines on several GPUs step in
# threads; engines without CUDA graphs, e.g. ``--gpus cpu,cpu --compile``, therefore step one
# at a time): while one thread compiles a variant (another GPU, another shape), torch's FX
# tracing flag is set process-wide, and a compiled call in another thread raises "Detected
# that you are using FX to symbolically trace a dynamo-optimized function" (torch 2.11, two
# H200s). Only eager steps, graph captures and compiles take it: a replayed CUDA graph runs
# no Python.
_COMPILED_CALLS = threading.Lock()


def _capturing() -> bool:
    """This thread's current CUDA stream is being captured into a graph (current streams are
    per thread: another thread's capture does not count)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@contextmanager
def _compiled_calls() -> Iterator[None]:
    """``_COMPILED_CALLS`` held; inside a CUDA graph capture, also no recompiling: the
    compiler's autotuning synchronises, which invalidates the capture
    (cudaErrorStreamCaptureInvalidated, H200). A call that would recompile (a guard the
    dynamic marks do not cover) raises ``torch._dynamo.exc.RecompileError`` before anything
    runs, and the engine runs that step eagerly (``DecodeEngine._graphed``). The setting is
    process-wide: set only while this lock keeps every other compiled call out. (A first
    compile is never inside a capture: an engine's first step runs eagerly.)"""
    with _COMPILED_CALLS:
        if _capturing():
            from torch._dynamo import config as dynamo_config

            with dynamo_config.patch(error_on_recompile=True):
                yield
        else:
            yield


# Variants kept per compiled code object (layer classes, batch shapes, models): past this,
# torch.compile would silently fall back to the uncompiled code.
COMPILE_VARIANTS = 64


def _mark_dynamic_step(*tensors: Any, masks: Sequence[torch.Tensor] = ()) -> None:
    """Tell torch.compile that a decode step's batch (dim 0: compacted batches, other
    sessions' slots) and attended and cache lengths (a mask's last dim, a cache's dim 2: a
    new length every ``ATTENTION_ROUND`` columns, another session's cache) vary, before it
    first sees them: one compiled layer then serves every batch of two rows or more, every
    attended length and every session on a device. Left to itself, it compiled once a shape
    and a relation (seven compiles for one CPU run with a batch compacted four times; 3-8 s
    each for an 8B layer on an H200). A dim of size 1 still specialises: a batch of one
    compiles once more (a compiled engine never compacts below two rows), and each device
    compiles its own."""
    import torch._dynamo

    for mask in masks:  # [B, 1, 1, used], additive
        torch._dynamo.maybe_mark_dynamic(mask, 0)
        torch._dynamo.maybe_mark_dynamic(mask, 3)
    for tensor in tensors:
        if isinstance(tensor, tuple):  # rotary (cos, sin)
            _mark_dynamic_step(*tensor)
            continue
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
        if tensor.dim() == 4:  # a layer's keys or values [B, KV, length, D]
            torch._dynamo.maybe_mark_dynamic(tensor, 2)


def torch_compiled(function: Callable) -> Callable:
    """``function`` through torch.compile, with room for ``COMPILE_VARIANTS`` variants."""
    import torch._dynamo

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), COMPILE_VARIANTS))
    return torch.compile(function, dynamic=None, fullgraph=False)


class StaticRunner:
    """Forward passes around a decoder-only HF model's own layers, with a static KV cache."""

    def __init__(
        self,
        model: Any,
        *,
        fuse: bool = True,
        deterministic: bool = False,
        valid_keys_only: bool | None = None,
    ) -> None:
        """``fuse``: stack the layers' q/k/v and gate/up weights (``fused_groups``) for one
        matmul a group; a probe that may not run the model here leaves them alone.
        ``deterministic``: a GPU decode step's attention on a kernel whose results repeat
        run to run (``grouped_attention``), slower than SDPA's own pick.
        ``valid_keys_only``: decode steps attend over the whole cache under a boolean mask
        (``reads_valid_keys_only``); None: where the decode-attention kernel runs."""
        _register_attention()
        self.model = model
        self.deterministic = deterministic
        self.attention_name = REPEATABLE_ATTENTION_NAME if deterministic else ATTENTION_NAME
        config = model.config
        self.config = config
        self.core = model.model
        self.layers = list(self.core.layers)
        self.num_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.num_heads = int(config.num_attention_heads)
        self.num_kv = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(
            getattr(attn, "head_dim", None)
            or getattr(config, "head_dim", None)
            or config.hidden_size // self.num_heads
        )
        embed = self.core.embed_tokens
        self.dtype = embed.weight.dtype  # the model's: the cache's and the additive mask's
        self.embed_scale: float | None = None
        if config.model_type in _SCALED_EMBEDDING_FAMILIES and not hasattr(embed, "embed_scale"):
            self.embed_scale = float(torch.tensor(config.hidden_size**0.5, dtype=self.dtype))
        self.windows = _layer_windows(model, self.layers)
        self.layer_types = _layer_types(config, self.num_layers)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self._rope = _rope_function(self.core)
        self._cache_arg = _layer_cache_kwarg(self.layers[0])
        self.cache = _StaticCache()
        self._attention_on = False
        self._norms = [
            (module, forward)
            for module in model.modules()
            if (forward := fused_norm_forward(module)) is not None
        ]
        self._groups = fused_groups(model) if fuse else []
        # (MLP, its fused gate/up group or None, the forward with the gated SiLU kernel).
        by_parent = {id(group.parent): group for group in self._groups}
        self._gated_mlps = [
            (module, by_parent.get(id(module)), forward)
            for module in model.modules()
            if (forward := gated_silu_forward(module, by_parent.get(id(module)))) is not None
        ]
        # transformers' rotary function, per family module, through a Triton kernel on CUDA
        # while the runner works (``fused_kernels.rotary_swapped``).
        self._rotary_modules = (
            fused_kernels.rotary_modules(self.layers)
            if config.model_type in TESTED_FAMILIES
            else []
        )
        self._layer_call: Callable[..., torch.Tensor] = _call_layer  # the decode step's
        self.valid_keys_only = valid_keys_only

    def compile_layers(self) -> None:
        """Decode steps run each decoder layer through torch.compile (its norms, rotary,
        residual and elementwise work fused into a few kernels), one compiled layer for every
        layer of a kind: the layers differ only in their tensors, so the compiler traces one
        and reuses it, where compiling the whole step traced all of them (on the CPU, 8
        layers: 2.8 s against 12.8 s). The prefill runs uncompiled (its shapes vary)."""
        self._layer_call = torch_compiled(_call_layer)

    def reads_valid_keys_only(self, device: torch.device) -> bool:
        """Decode steps attend over the whole cache under a boolean mask, which on CUDA
        ``pipeline.decode_attention``'s kernel reads only where a row may look: the engine
        then hands every step the whole cache (one CUDA graph a session) instead of the
        columns in use rounded up (one graph a rounded length). Not for a compiled step
        (its layer traces the torch code, over the rounded columns), a deterministic one
        (its own kernel), even where ``valid_keys_only`` (a test's, a benchmark's or an
        eager engine's override) asks for them; by default not for heads the kernel does
        not take (over ``MAX_HEAD_DIM``: told to, SDPA reads the whole cache's mask)."""
        if self._layer_call is not _call_layer or self.deterministic:
            return False
        if self.valid_keys_only is not None:
            return self.valid_keys_only
        return self.head_dim <= MAX_HEAD_DIM and fused_kernels.usable_on(device)

    @contextmanager
    def attention(self) -> Iterator[None]:
        """Our attention, the fused norms (``fused_norm_forward``), the fused projections
        (``pipeline.fused_projections``) and the rotary kernel (``pipeline.fused_kernels``)
        for the model while this lasts. A compiled step runs
        inside it, so the switch (a config write, which the compiler would have to replay)
        stays outside."""
        if self._attention_on:
            yield
            return
        groups = [group for group in self._groups if group.intact()]
        projections = [pair for group in groups for pair in group.forwards()]
        # A split MLP's kernel reads its group's fused product: only while the group is intact.
        intact = {id(group) for group in groups}
        mlps = [
            (mlp, forward)
            for mlp, group, forward in self._gated_mlps
            if group is None or id(group) in intact
        ]
        switched = _attention_switched(self.config, self.attention_name)
        rotary = fused_kernels.rotary_swapped(self._rotary_modules)
        with switched, rotary, _forwards_installed(self._norms + projections + mlps):
            self._attention_on = True
            try:
                yield
            finally:
                self._attention_on = False
                for group in groups:
                    group.release()

    @staticmethod
    def fits(model: Any) -> bool:
        """The model has the layout this runner drives (decoder layers that take
        ``position_embeddings``, an embedding, a final norm, rotary embeddings), each
        layer's attention indexed by its place (the prefill finds a layer's cache by that
        index, a decode step by the place)."""
        core = getattr(model, "model", None)
        layers = getattr(core, "layers", None)
        needed = ("embed_tokens", "norm", "rotary_emb")
        if layers is None or not all(hasattr(core, name) for name in needed):
            return False
        if not hasattr(model, "lm_head") or not hasattr(layers[0], "self_attn"):
            return False
        params = inspect.signature(layers[0].forward).parameters
        if "position_embeddings" not in params:
            return False
        indices = [
            getattr(getattr(layer, "self_attn", None), "layer_idx", None) for layer in layers
        ]
        return indices == list(range(len(layers)))

    def allocate(self, batch: int, length: int) -> None:
        # One column more than a step attends over: the attended columns are always a strict
        # slice, so a compiled layer never holds "all of the cache" as a guard.
        shape = (batch, self.num_kv, length + 1, self.head_dim)
        if self.cache.keys and self.cache.keys[0].shape == shape:
            return
        self.release()  # free the old cache before taking the new one
        for layer in self.layers:
            device = next(layer.parameters()).device  # layers may sit on several GPUs
            self.cache.keys.append(torch.zeros(shape, dtype=self.dtype, device=device))
            self.cache.values.append(torch.zeros(shape, dtype=self.dtype, device=device))

    def release(self) -> None:
        self.cache.keys = []
        self.cache.values = []

    def select(self, keep: torch.Tensor) -> None:
        """Keep only these batch rows (the engine drops finished ones)."""
        cache = self.cache
        cache.keys = [k.index_select(0, keep.to(k.device)) for k in cache.keys]
        cache.values = [v.index_select(0, keep.to(v.device)) for v in cache.values]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.core.embed_tokens(ids)
        return h * self.embed_scale if self.embed_scale is not None else h

    def _layers(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        masks: dict[int | None, torch.Tensor],
        hook: HiddenHook,
    ) -> torch.Tensor:
        """The decoder blocks; called inside ``attention()`` (by ``prefill``, ``decode``)."""
        cache = self.cache
        decoding = cache.column is not None
        call = self._layer_call if decoding else _call_layer
        compiled = call is not _call_layer
        rope = {kind: self._rope(h, positions, kind) for kind in set(self.layer_types)}
        if compiled:
            _mark_dynamic_step(positions, cache.column, *rope.values(), masks=list(masks.values()))
        rows: dict[torch.device, torch.Tensor] = {}  # a decode step's batch rows, by device
        with _compiled_calls() if compiled else nullcontext():
            for index, layer in enumerate(self.layers):
                mask = masks[self.windows[index]]
                if decoding:
                    keys, values = cache.keys[index], cache.values[index]
                    if keys.device not in rows:
                        rows[keys.device] = torch.arange(keys.shape[0], device=keys.device)
                    layer_cache: Any = _LayerCache(
                        keys, values, cache.column, mask, rows[keys.device]
                    )
                    if compiled:
                        _mark_dynamic_step(h, keys, values, rows[keys.device])
                else:
                    layer_cache = cache
                rotary = rope[self.layer_types[index]]
                h = call(layer, h, mask, positions, rotary, layer_cache, self._cache_arg)
                h = hook(index + 1, h)
        return h

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        """Final norm and head; called inside ``attention()`` (by ``prefill``, ``decode``)."""
        logits = self.model.lm_head(self.core.norm(last))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def prefill(
        self,
        ids: torch.Tensor,
        valid: torch.Tensor,
        positions: torch.Tensor,
        hook: HiddenHook,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """Run the padded prompts [g, S] into cache rows ``slots`` [g], columns 0..S-1;
        return the last position's logits."""
        if not self._attention_on:  # entered once for the layers and the final norm
            with self.attention():
                return self.prefill(ids, valid, positions, hook, slots)
        index = torch.arange(ids.shape[1], device=ids.device)
        causal = padded_causal(valid)
        masks = {}
        for window in set(self.windows):
            # A row's tokens are contiguous, so columns differ as positions do.
            near = index[:, None] - index[None, :] < window if window is not None else None
            masks[window] = (causal if near is None else causal & near)[:, None]
        self.cache.column = None
        self.cache.slots = slots
        h = hook(0, self._embed(ids))
        h = self._layers(h, positions, masks, hook)
        return self._logits(h[:, -1])

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        column: torch.Tensor,
        key_valid: torch.Tensor,
        hook: HiddenHook,
    ) -> torch.Tensor:
        """One token per row [B], each at its own cache column (``column`` [B]), attending
        over the cache's first ``key_valid.shape[1]`` columns (every row's are there)."""
        if not self._attention_on:  # entered once for the layers and the final norm
            with self.attention():
                return self.decode(tokens, positions, column, key_valid, hook)
        masks = {}
        whole_cache = self.reads_valid_keys_only(key_valid.device)
        for window in set(self.windows):
            allowed = key_valid
            if window is not None:
                keys = torch.arange(key_valid.shape[1], device=key_valid.device)
                allowed = allowed & (column[:, None] - keys[None, :] < window)
            if whole_cache:  # the kernel's form (``grouped_attention``)
                masks[window] = allowed[:, None, None, :]
                continue
            # Additive (0 where a row may look, -inf elsewhere), built once a step for every
            # layer: a boolean mask SDPA turns into this in each layer (an H200 step at batch
            # 16 ran 2% faster compiled, 6% plain), and the form the deterministic kernel
            # takes (``grouped_attention``). A tensor of its own, with its own row stride: a
            # slice of the state's wider mask would make whether ``used`` is the state's
            # whole length a guard of a compiled layer (a recompile when it flips).
            bias = torch.full(
                (allowed.shape[0], 1, 1, allowed.shape[1]),
                float("-inf"),
                dtype=self.dtype,
                device=allowed.device,
            )
            masks[window] = bias.masked_fill_(allowed[:, None, None, :], 0.0)
        self.cache.column = column
        h = hook(0, self._embed(tokens[:, None]))
        h = self._layers(h, positions[:, None], masks, hook)
        return self._logits(h[:, 0])


def padded_causal(valid: torch.Tensor) -> torch.Tensor:
    """[b, s] true at a row's tokens -> [b, s, s] where a query may look: the row's tokens at
    or before it. A pad query sees only itself: never an all-masked row (NaN attention), and
    never seen by a token."""
    s = valid.shape[1]
    index = torch.arange(s, device=valid.device)
    causal = index[None, :] <= index[:, None]  # [q, k]
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, :]) | eye


def _config_window(config: Any) -> int | None:
    """The one sliding window a config gives every layer (Mistral, Phi-3), None if off."""
    window = getattr(config, "sliding_window", None)
    return int(window) if window and getattr(config, "use_sliding_window", True) else None


def _layer_windows(model: Any, layers: list[Any]) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as its attention module or the
    config says: per-layer types (Gemma-2/3, Qwen2/3) or one window for all (Mistral, Phi-3)."""
    config = model.config
    types = getattr(config, "layer_types", None)
    windows: list[int | None] = []
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        if "sliding_window" in vars(attn):
            window = attn.sliding_window
        elif types:
            window = config.sliding_window if types[index] == "sliding_attention" else None
        else:
            window = _config_window(config)
        windows.append(int(window) if window else None)
    return windows


def attention_windows(model: Any) -> dict[str, int | None]:
    """Attention type -> its sliding window (None: full attention) over the model's layers,
    for forwards that build their own masks (``additive_masks``). A layout this module does
    not know: the config's one window for every layer."""
    try:
        layers = list(_decoder_layers(model))
        types = _layer_types(model.config, len(layers))
        by_layer = list(zip(types, _layer_windows(model, layers), strict=True))
    except (AttributeError, ValueError):  # no decoder layers, or no ``self_attn`` in them
        return {"full_attention": _config_window(model.config)}
    windows: dict[str, int | None] = {}
    for kind, window in by_layer:
        if windows.setdefault(kind, window) != window:
            raise ValueError(f"layers of attention type {kind} differ in their sliding window")
    return windows


def additive_masks(
    allow: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    windows: dict[str, int | None],
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """``allow`` [b, 1, q, k] (true where a query may look; every query row must allow one
    key, or its attention is NaN) as additive masks for a model's own forward, each sliding
    window of ``windows`` (``attention_windows``) applied by position: a query at position p
    sees no key at p - window or before, as the model's own masks on an unpadded row. One mask
    when every layer attends alike, else one per attention type, a dict, which transformers'
    models with ``layer_types`` take in place of theirs.

    Additive, in ``dtype`` (the model's): an eager attention adds the mask to its scores (a
    bool one would add 0 and 1), and SDPA, given a bool mask, converts it on every layer."""
    by_window: dict[int | None, torch.Tensor] = {}
    for window in set(windows.values()):
        allowed = allow
        if window is not None:
            # k > q - window, as q - k < window: a bool [b, q, k] and no int64 one (at a
            # long row's q = k = 16k that difference alone was 2 GiB).
            near = key_positions[:, None, :] > (query_positions - window)[:, :, None]
            allowed = allow & near[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allow.device)
        by_window[window] = mask.masked_fill_(~allowed, float("-inf"))
    if len(by_window) == 1:
        return next(iter(by_window.values()))
    return {kind: by_window[window] for kind, window in windows.items()}


def fused_forward_runner(model: Any) -> StaticRunner | None:
    """A static runner over ``model`` whose ``attention()`` a forward of the model's own may
    run inside (with masks of its own, ``additive_masks``: transformers builds none for our
    attention) for the fused norms, projections, rotary kernel and grouped attention; None
    where the family is not one the runner is tested on or its layout does not fit."""
    if model.config.model_type in TESTED_FAMILIES and StaticRunner.fits(model):
        return StaticRunner(model)
    return None


def _layer_types(config: Any, num_layers: int) -> list[str]:
    types = getattr(config, "layer_types", None)
    return list(types[:num_layers]) if types else ["full_attention"] * num_layers


def _rope_function(core: Any) -> Callable[[torch.Tensor, torch.Tensor, str], Any]:
    """(cos, sin) for a layer type: Gemma-3 gives sliding layers their own rotary base, as
    a ``layer_type`` argument or a second module, depending on the transformers version."""
    rotary = core.rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return lambda h, positions, kind: rotary(h, positions, kind)
    local = getattr(core, "rotary_emb_local", None)
    if local is not None:
        return lambda h, positions, kind: (local if kind == "sliding_attention" else rotary)(
            h, positions
        )
    return lambda h, positions, _kind: rotary(h, positions)


def _layer_cache_kwarg(layer: Any) -> str:
    params = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    return "past_key_values"


class HFRunner:
    """The model's own forward with a dynamic cache: any architecture, no CUDA graph."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers = list(_decoder_layers(model))
        self.num_layers = len(self.layers)
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self._cache_arg = cache_kwarg(model)

    def allocate(self, batch: int, length: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    def release(self) -> None:
        self.cache = None
        self.mask = None

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask = self.mask.index_select(0, keep)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, hook: HiddenHook):
        def first_input(_module: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                return (hook(0, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hook(0, kwargs["hidden_states"])}

        def block_output(index: int) -> Callable[..., Any]:
            def after(_module: Any, _inputs: Any, output: Any) -> Any:
                if isinstance(output, tuple):
                    return (hook(index, output[0]), *output[1:])
                return hook(index, output)

            return after

        # Hooked only for this forward: the model may be shared with other engines.
        handles = [self.layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
        for index, layer in enumerate(self.layers):
            handles.append(layer.register_forward_hook(block_output(index + 1)))
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=self.mask.long(),
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: self.cache},
            )
        finally:
            for handle in handles:
                handle.remove()
        return out.logits[:, -1]

    def prefill(self, ids, valid, positions, hook, slots):
        """Every row of a fresh cache at once (``slots`` is all of them: no refills here)."""
        self.mask = valid.clone()
        return self._forward(ids, positions, hook)

    def decode(self, tokens, positions, column, key_valid, hook):
        ones = torch.ones_like(tokens, dtype=torch.bool)[:, None]
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self._forward(tokens[:, None], positions[:, None], hook)


def _decoder_layers(model: Any) -> Any:
    core = getattr(model, "model", None)
    layers = getattr(core, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def choose_runner(model: Any, backend: str = "auto") -> tuple[str, str | None]:
    """(backend, notice): ``static`` for every tested family; for another architecture the
    static runner if its layout fits and its logits equal the model's own forward on a short
    prompt, else ``hf``; the notice says which path runs and why (None for tested ones)."""
    model_type = getattr(model.config, "model_type", "?")
    if backend == "static":
        if not StaticRunner.fits(model):
            raise ValueError(f"backend 'static' does not support {model_type}")
        return backend, None
    if backend == "hf":
        return backend, None
    if backend != "auto":
        raise ValueError(f"backend must be auto, static or hf, not '{backend}'")
    if model_type in TESTED_FAMILIES and StaticRunner.fits(model):
        return "static", None
    if StaticRunner.fits(model) and _static_matches_hf(model):
        return "static", (
            f"{model_type} is not a tested family; the static-cache runner matched its own "
            "forward on a probe prompt, so it runs there"
        )
    return "hf", (
        f"{model_type} runs on transformers' own forward (dynamic cache, no CUDA graph): "
        "slower than the static-cache runner of the tested families"
    )


@torch.inference_mode()
def _static_matches_hf(model: Any) -> bool:
    """Our prefill's last logits against the model's own forward, on one short prompt."""
    device = model.get_input_embeddings().weight.device
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 12), generator=gen).to(device)
    valid = torch.ones_like(ids, dtype=torch.bool)
    positions = torch.arange(12, device=device)[None]
    runner = StaticRunner(model, fuse=False)  # the HF runner may be chosen: weights as loaded
    try:
        runner.allocate(1, 12)
        slots = torch.zeros(1, dtype=torch.long, device=device)
        ours = runner.prefill(ids, valid, positions, lambda _i, h: h, slots).float()
    except Exception:  # a layout we cannot drive: the general path
        return False
    finally:
        runner.release()
    theirs = model(input_ids=ids).logits[:, -1].float()
    tolerance = 1e-3 if model.dtype == torch.float32 else 5e-2
    scale = theirs.abs().max().clamp(min=1.0)
    return bool(((ours - theirs).abs().max() / scale) < tolerance)


def notice_once(notice: str | None, _seen: set[str] = set()) -> None:  # noqa: B006
    """Log which path runs for an untested architecture, once per process."""
    if notice and notice not in _seen:
        _seen.add(notice)
        log.warning(notice)
