"""The batched decode engine: left-padded prompts, a static KV cache, sampling on the device,
no per-step host sync, a CUDA-graph decode step on GPUs, and activation capture in the same
pass (per layer: mean over prompt tokens, last prompt token, mean over response tokens).

Layer convention: hidden state 0 is the embedding output and hidden state l the raw output
of decoder block l-1, for every l. (HF's ``output_hidden_states`` applies the final norm to
its last entry; we keep the raw block output there too, so the vector read at layer L is the
quantity steering at layer L adds to.)

Two runners do the forward passes:
- ``LlamaRunner``: our own forward over the HF modules of Llama-shaped models (Llama,
  Mistral without sliding window, Qwen2), with a static cache, so the decode step can be
  captured in a CUDA graph;
- ``HFRunner``: the model's own forward with a dynamic cache, for every other architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.chat import stop_token_ids
from pipeline.models import LoadedModel, cache_kwarg
from pipeline.sampling import sample_next
from vectors.steering import SteeringSpec, apply_steering, steered

CAPTURE_KINDS = ("response_avg", "prompt_avg", "prompt_last")
LLAMA_SHAPED = {"llama", "mistral", "qwen2"}
# Decode steps between host checks for "every row finished" (the only syncs in the loop).
FINISH_CHECK_EVERY = 16
# Cache lengths are rounded up to this, so similar batches reuse one CUDA graph.
CACHE_ROUND = 64

# Called with (hidden-state index, state) after the embedding and after every block; returns
# the state to carry on with (steering changes it, capture only reads it).
HiddenHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = False  # benchmarks force the full length


@dataclass(frozen=True)
class DecodeRequest:
    prompt_ids: Sequence[int]
    seed: int


@dataclass
class DecodeResult:
    answer_ids: list[int]  # without the stop token
    finish_reason: str  # "eos" or "length"
    # kind -> [L+1, d] float32 on the CPU; None when capture is off.
    activations: dict[str, torch.Tensor] | None
    # [answer tokens, watched directions]: each answer token's projection, when watched.
    projections: torch.Tensor | None = None


@dataclass(frozen=True)
class Watch:
    """A direction to project every generated token on, live: h_t . v / |v| at ``layer``."""

    name: str
    layer: int
    vector: torch.Tensor  # [d]


# on_tokens(first step, tokens [B, k], projections [B, k, W]) at each host check.
TokenCallback = Callable[[int, torch.Tensor, torch.Tensor | None], None]


# ---- runners --------------------------------------------------------------------------------
class LlamaRunner:
    """Forward passes over a Llama-shaped HF model's own modules, with a static KV cache."""

    def __init__(self, model: Any) -> None:
        self.model = model
        config = model.config
        self.core = model.model
        self.layers = list(self.core.layers)
        self.num_layers = len(self.layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        attn = self.layers[0].self_attn
        self.head_dim = int(getattr(attn, "head_dim", config.hidden_size // self.num_heads))
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    @staticmethod
    def supports(model: Any) -> bool:
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in LLAMA_SHAPED:
            return False
        # Sliding-window attention is not implemented here; those models take the HF path.
        if model_type == "mistral" and getattr(config, "sliding_window", None):
            return False
        if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
            return False
        return hasattr(model, "model") and hasattr(model.model, "rotary_emb")

    def allocate(self, batch: int, length: int) -> None:
        weight = self.core.embed_tokens.weight
        shape = (batch, self.num_kv, length, self.head_dim)
        if self.k_cache and self.k_cache[0].shape == shape:
            return
        self.k_cache = self.v_cache = []  # free the old cache before taking the new one
        self.k_cache = [
            torch.zeros(shape, dtype=weight.dtype, device=weight.device)
            for _ in range(self.num_layers)
        ]
        self.v_cache = [
            torch.zeros(shape, dtype=weight.dtype, device=weight.device)
            for _ in range(self.num_layers)
        ]

    def release(self) -> None:
        self.k_cache = []
        self.v_cache = []

    def select(self, keep: torch.Tensor) -> None:
        """Keep only these batch rows (the engine drops finished ones)."""
        self.k_cache = [k.index_select(0, keep) for k in self.k_cache]
        self.v_cache = [v.index_select(0, keep) for v in self.v_cache]

    def _qkv(self, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        b, s, _ = x.shape
        q = attn.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, s, self.num_kv, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, self.num_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def prefill(
        self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, hook: HiddenHook
    ) -> torch.Tensor:
        """Run the padded prompts [B, S]; fill cache columns 0..S-1; return last logits."""
        b, s = ids.shape
        h = hook(0, self.core.embed_tokens(ids))
        cos, sin = self.core.rotary_emb(h, positions)
        causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
        # A pad query sees only itself: never an all-masked row (NaN), never seen by real rows.
        eye = torch.eye(s, dtype=torch.bool, device=ids.device)
        mask = ((causal & valid[:, None, :]) | eye)[:, None]
        groups = self.num_heads // self.num_kv
        for index, layer in enumerate(self.layers):
            residual = h
            q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            self.k_cache[index][:, :, :s] = k
            self.v_cache[index][:, :, :s] = v
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
            h = residual + layer.self_attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            h = hook(index + 1, h)
        return self.model.lm_head(self.core.norm(h[:, -1]))

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        column: torch.Tensor,
        key_valid: torch.Tensor,
        hook: HiddenHook,
    ) -> torch.Tensor:
        """One token per row [B] at cache column ``column`` (a 1-element tensor)."""
        b = tokens.shape[0]
        groups = self.num_heads // self.num_kv
        h = hook(0, self.core.embed_tokens(tokens[:, None]))
        cos, sin = self.core.rotary_emb(h, positions[:, None])
        blocked = ~key_valid[:, None, None, :]
        for index, layer in enumerate(self.layers):
            residual = h
            q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            k_cache.index_copy_(2, column, k)
            v_cache.index_copy_(2, column, v)
            q = q.view(b, self.num_kv, groups, self.head_dim)
            scores = torch.matmul(q, k_cache.transpose(-1, -2)) * self.scaling
            scores = scores.float().masked_fill(blocked, float("-inf"))
            weights = torch.softmax(scores, dim=-1).to(v_cache.dtype)
            out = torch.matmul(weights, v_cache).reshape(b, 1, self.num_heads * self.head_dim)
            h = residual + layer.self_attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            h = hook(index + 1, h)
        return self.model.lm_head(self.core.norm(h[:, 0]))


class HFRunner:
    """The model's own forward with a dynamic cache: any architecture, no CUDA graph."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.num_layers = int(model.config.num_hidden_layers)
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self._last_raw: torch.Tensor | None = None
        self._last_layer = _decoder_layers(model)[-1]
        self._cache_arg = cache_kwarg(model)

    def _keep_last_raw(self, _module: Any, _inputs: Any, output: Any) -> None:
        self._last_raw = output[0] if isinstance(output, tuple) else output

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
        # Hooked only for this forward: the model may be shared with other engines.
        handle = self._last_layer.register_forward_hook(self._keep_last_raw)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=self.mask.long(),
                position_ids=positions,
                use_cache=True,
                output_hidden_states=True,
                **{self._cache_arg: self.cache},
            )
        finally:
            handle.remove()
        states = list(out.hidden_states)
        states[-1] = self._last_raw  # HF normalises its last entry; we keep the block output
        for index, state in enumerate(states):
            hook(index, state)  # read-only here: steering runs inside the forward (hooks)
        return out.logits[:, -1]

    def prefill(self, ids, valid, positions, hook):
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


# ---- the engine -----------------------------------------------------------------------------
class DecodeEngine:
    """Generates one batch at a time; callers choose batches (length-sorted is best)."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        capture: bool = True,
        backend: str = "auto",
        cuda_graphs: bool | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.capture = capture
        if backend == "auto":
            backend = "llama" if LlamaRunner.supports(self.model) else "hf"
        if backend == "llama" and not LlamaRunner.supports(self.model):
            raise ValueError(f"backend 'llama' does not support {self.model.config.model_type}")
        self.backend = backend
        self.runner: LlamaRunner | HFRunner = (
            LlamaRunner(self.model) if backend == "llama" else HFRunner(self.model)
        )
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = (on_cuda and backend == "llama") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not (on_cuda and backend == "llama"):
            raise ValueError("CUDA graphs need a CUDA device and the llama backend")
        tokenizer = loaded.tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        self.stop_ids = torch.tensor(
            stop_token_ids(tokenizer, self.model.config), dtype=torch.long, device=self.device
        )
        self.num_states = self.runner.num_layers + 1
        self.hidden_size = int(self.model.config.hidden_size)
        self._graph: Any = None
        self.steering: list[SteeringSpec] = []
        self.watch: list[Watch] = []
        self._steer_context: Any = None

    @torch.inference_mode()
    def run(
        self,
        requests: Sequence[DecodeRequest],
        sampling: SamplingConfig,
        on_step: Callable[[int], None] | None = None,
        *,
        steering: Sequence[SteeringSpec] = (),
        watch: Sequence[Watch] = (),
        on_tokens: TokenCallback | None = None,
        check_every: int = FINISH_CHECK_EVERY,
    ) -> list[DecodeResult]:
        """Generate for one batch. ``on_step(steps_done)`` is called at the loop's periodic
        host checks (every ``check_every`` steps), e.g. to write a heartbeat; ``on_tokens``
        gets the tokens (and watched projections) produced since the last check.
        ``steering`` adds vectors to block outputs (see ``vectors.steering``)."""
        if not requests:
            return []
        self.steering = list(steering)
        self.watch = list(watch)
        if self.steering and self.backend == "hf":
            with steered(self.model, self.steering) as context:
                self._steer_context = context
                try:
                    return self._run(requests, sampling, on_step, on_tokens, check_every)
                finally:
                    self._steer_context = None
        return self._run(requests, sampling, on_step, on_tokens, check_every)

    def _run(
        self,
        requests: Sequence[DecodeRequest],
        sampling: SamplingConfig,
        on_step: Callable[[int], None] | None,
        on_tokens: TokenCallback | None,
        check_every: int,
    ) -> list[DecodeResult]:
        device = self.device
        batch = len(requests)
        prompt_len = max(len(r.prompt_ids) for r in requests)
        new = sampling.max_new_tokens
        length = -(-(prompt_len + new) // CACHE_ROUND) * CACHE_ROUND
        ids = torch.full((batch, prompt_len), self.pad_id, dtype=torch.long)
        valid = torch.zeros((batch, prompt_len), dtype=torch.bool)
        for row, request in enumerate(requests):
            n = len(request.prompt_ids)
            ids[row, prompt_len - n :] = torch.tensor(list(request.prompt_ids), dtype=torch.long)
            valid[row, prompt_len - n :] = True
        ids, valid = ids.to(device), valid.to(device)
        positions = (valid.long().cumsum(1) - 1).clamp_(min=0)
        act_shape = (self.num_states, self.hidden_size) if self.capture else (1, 1)
        state = _State.create(batch, length, new, act_shape, device, len(self.watch))
        out = _Outputs.create(
            batch, new, self.num_states, self.hidden_size, device, self.capture, len(self.watch)
        )
        state.seeds.copy_(torch.tensor([r.seed for r in requests], dtype=torch.long))
        state.key_valid[:, :prompt_len] = valid
        state.positions.copy_(valid.sum(1))
        state.column.fill_(prompt_len)
        self.runner.allocate(batch, length)

        # Prefill: prompt captures, then token 0.
        prompt_count = valid.sum(1, keepdim=True).float()

        llama_steering = self.steering if self.backend == "llama" else []

        def prompt_hook(index: int, h: torch.Tensor) -> torch.Tensor:
            if llama_steering:
                h = apply_steering(h, llama_steering, index, "prefill", valid)
            if self.capture:
                hf = h.float()
                out.prompt_avg[:, index] = (hf * valid[..., None]).sum(1) / prompt_count
                out.prompt_last[:, index] = hf[:, -1]
            return h

        if self._steer_context is not None:
            self._steer_context.set("prefill", valid)
        logits = self.runner.prefill(ids, valid, positions, prompt_hook)
        first = sample_next(
            logits, state.seeds, state.step * 0, sampling.temperature, sampling.top_p
        )
        state.tokens[:, 0] = first
        state.current.copy_(first)
        if not sampling.ignore_eos:
            state.finished |= (first[:, None] == self.stop_ids[None, :]).any(1)

        step_fn = self._make_step(state, sampling)
        streamed = 0
        for steps_done in range(1, new + 1):
            step_fn()
            if steps_done % check_every == 0:
                if on_step is not None:
                    on_step(steps_done)
                if on_tokens is not None:
                    streamed = self._stream(state, out, streamed, steps_done, on_tokens)
                alive = int((~state.finished).sum())
                if alive == 0:
                    break
                # Drop finished rows once enough have finished: the rest decode faster. A
                # graphed step must be captured again for the new shape, so it waits longer.
                if alive <= state.rows.numel() * (0.5 if self.cuda_graphs else 0.75):
                    self._compact(state, out)
                    step_fn = self._make_step(state, sampling)
        self._graph = None
        out.save(state)
        if on_tokens is not None:
            self._stream(state, out, streamed, new, on_tokens)
        return self._results(out, new, sampling)

    def _stream(
        self, state: _State, out: _Outputs, streamed: int, upto: int, on_tokens: TokenCallback
    ) -> int:
        """Hand the caller the tokens (and projections) of steps since the last call."""
        out.save(state)
        upto = min(upto, out.tokens.shape[1] - 1)
        if upto <= streamed:
            return streamed
        tokens = out.tokens[:, streamed:upto].cpu()
        proj = out.projections[:, streamed:upto].cpu() if self.watch else None
        on_tokens(streamed, tokens, proj)
        return upto

    def _make_step(self, state: _State, sampling: SamplingConfig) -> Callable[[], None]:
        self._graph = None
        step_fn = self._step_fn(state, sampling)
        if self.cuda_graphs:
            step_fn = self._graphed(step_fn, min(2, sampling.max_new_tokens))
        return step_fn

    def _compact(self, state: _State, out: _Outputs) -> None:
        out.save(state)
        keep = (~state.finished).nonzero().squeeze(1)
        state.select(keep)
        self.runner.select(keep)

    def _step_fn(self, state: _State, sampling: SamplingConfig) -> Callable[[], None]:
        """One decode step, all on the device, state updated in place (graph-capturable):
        feed token k-1, capture its hidden states if it is an answer token, sample token k."""
        runner = self.runner
        capture = self.capture
        stop_ids = self.stop_ids
        pad = self.pad_id

        llama_steering = self.steering if self.backend == "llama" else []
        watched: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for slot, w in enumerate(self.watch):
            unit = w.vector.to(self.device, torch.float32)
            watched.setdefault(w.layer, []).append((slot, unit / unit.norm().clamp(min=1e-12)))
        context = self._steer_context

        def hook(index: int, h: torch.Tensor) -> torch.Tensor:
            if llama_steering:
                alive = ~state.finished[:, None]
                h = apply_steering(h, llama_steering, index, "decode", alive)
            if capture:
                state.response_sum[:, index] += h[:, 0].float() * state.alive_f[:, None]
            for slot, unit in watched.get(index, ()):
                # The fed token is answer token step-1: its projection goes in that column.
                value = (h[:, 0].float() @ unit)[:, None]
                state.projections[:, :, slot].index_copy_(1, state.step - 1, value)
            return h

        def step() -> None:
            state.alive_f.copy_((~state.finished).float())
            state.key_valid.index_fill_(1, state.column, True)
            if context is not None:
                context.set("decode", ~state.finished[:, None])
            logits = runner.decode(
                state.current, state.positions, state.column, state.key_valid, hook
            )
            state.response_count.add_(state.alive_f)
            token = sample_next(
                logits, state.seeds, state.step, sampling.temperature, sampling.top_p
            )
            token = torch.where(state.finished, torch.full_like(token, pad), token)
            state.tokens.index_copy_(1, state.step, token[:, None])
            if not sampling.ignore_eos:
                state.finished |= (token[:, None] == stop_ids[None, :]).any(1)
            state.current.copy_(token)
            state.positions.add_(1)
            state.column.add_(1)
            state.step.add_(1)

        return step

    def _graphed(self, step_fn: Callable[[], None], warmup: int) -> Callable[[], None]:
        """The step as a CUDA graph: the first ``warmup`` calls run eagerly on a side stream
        (real steps, which also warm the allocator), the next captures, and every call after
        that replays. Capture records without running, so the capturing call replays too."""
        calls = 0
        stream = torch.cuda.Stream()

        def graphed() -> None:
            nonlocal calls
            calls += 1
            if calls <= warmup:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    step_fn()
                torch.cuda.current_stream().wait_stream(stream)
                return
            if self._graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step_fn()
                self._graph = graph  # keeps the graph and its memory pool alive this batch
            self._graph.replay()

        return graphed

    def _results(self, out: _Outputs, new: int, sampling: SamplingConfig) -> list[DecodeResult]:
        tokens = out.tokens[:, :new].cpu()
        stops = set(self.stop_ids.tolist())
        acts: dict[str, torch.Tensor] = {}
        if self.capture:
            count = out.response_count.clamp(min=1)[:, None, None]
            acts = {
                "response_avg": (out.response_sum / count).cpu(),
                "prompt_avg": out.prompt_avg.cpu(),
                "prompt_last": out.prompt_last.cpu(),
            }
        projections = out.projections.cpu() if self.watch else None
        results = []
        for row in range(tokens.shape[0]):
            seq = tokens[row].tolist()
            end = len(seq)
            if not sampling.ignore_eos:
                end = next((i for i, t in enumerate(seq) if t in stops), len(seq))
            reason = "eos" if end < len(seq) else "length"
            results.append(
                DecodeResult(
                    answer_ids=seq[:end],
                    finish_reason=reason,
                    activations={k: v[row] for k, v in acts.items()} if self.capture else None,
                    projections=projections[row, :end] if projections is not None else None,
                )
            )
        return results


@dataclass
class _State:
    """Every tensor a decode step reads or writes, one row per unfinished batch row."""

    rows: torch.Tensor  # the batch row each state row belongs to
    seeds: torch.Tensor
    tokens: torch.Tensor
    current: torch.Tensor
    finished: torch.Tensor
    alive_f: torch.Tensor
    positions: torch.Tensor
    column: torch.Tensor
    step: torch.Tensor
    key_valid: torch.Tensor
    response_sum: torch.Tensor
    response_count: torch.Tensor
    projections: torch.Tensor  # [B, new + 1, W] watched projections per answer token

    _BATCHED = (
        "rows",
        "seeds",
        "tokens",
        "current",
        "finished",
        "alive_f",
        "positions",
        "key_valid",
        "response_sum",
        "response_count",
        "projections",
    )

    @classmethod
    def create(
        cls,
        batch: int,
        length: int,
        new: int,
        act_shape: tuple[int, int],
        device: Any,
        watched: int = 0,
    ) -> _State:
        def zeros(*shape: int, dtype=torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            rows=torch.arange(batch, device=device),
            seeds=zeros(batch, dtype=torch.long),
            tokens=zeros(batch, new + 1, dtype=torch.long),
            current=zeros(batch, dtype=torch.long),
            finished=zeros(batch, dtype=torch.bool),
            alive_f=zeros(batch),
            positions=zeros(batch, dtype=torch.long),
            column=zeros(1, dtype=torch.long),
            step=torch.ones(1, dtype=torch.long, device=device),
            key_valid=zeros(batch, length, dtype=torch.bool),
            response_sum=zeros(batch, *act_shape),
            response_count=zeros(batch),
            projections=zeros(batch, new + 1, max(watched, 1)),
        )

    def select(self, keep: torch.Tensor) -> None:
        for name in self._BATCHED:
            setattr(self, name, getattr(self, name).index_select(0, keep))


@dataclass
class _Outputs:
    """Per batch row, what the caller gets back; state rows are saved here when dropped."""

    tokens: torch.Tensor
    response_sum: torch.Tensor
    response_count: torch.Tensor
    prompt_avg: torch.Tensor
    prompt_last: torch.Tensor
    projections: torch.Tensor

    @classmethod
    def create(
        cls,
        batch: int,
        new: int,
        states: int,
        hidden: int,
        device: Any,
        capture: bool,
        watched: int = 0,
    ) -> _Outputs:
        shape = (batch, states, hidden) if capture else (batch, 1, 1)
        return cls(
            tokens=torch.zeros(batch, new + 1, dtype=torch.long, device=device),
            response_sum=torch.zeros(shape, device=device),
            response_count=torch.zeros(batch, device=device),
            prompt_avg=torch.zeros(shape, device=device),
            prompt_last=torch.zeros(shape, device=device),
            projections=torch.zeros(batch, new + 1, max(watched, 1), device=device),
        )

    def save(self, state: _State) -> None:
        self.tokens[state.rows] = state.tokens
        self.response_count[state.rows] = state.response_count
        self.response_sum[state.rows] = state.response_sum
        self.projections[state.rows] = state.projections
