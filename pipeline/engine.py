"""The batched decode engine: left-padded prompts, a static KV cache, sampling on the device,
no per-step host sync, a CUDA-graph decode step on GPUs, and activation capture in the same
pass (per layer: mean over prompt tokens, last prompt token, mean over response tokens).

Layer convention: hidden state 0 is the embedding output and hidden state l the raw output
of decoder block l-1, for every l. (HF's ``output_hidden_states`` applies the final norm to
its last entry; we keep the raw block output there too, so the vector read at layer L is the
quantity steering at layer L adds to.)

The forward passes are a runner's (``pipeline.runners``): the static-cache runner around the
model's own layers for every tested family (graphed on CUDA), transformers' own forward for
the rest. Steering, capture and watching happen in one hook after each block, on both, so
capture and watch at a steered layer read the steered state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.chat import stop_token_ids
from pipeline.models import LoadedModel
from pipeline.runners import HFRunner, StaticRunner, choose_runner, notice_once
from pipeline.sampling import sample_next
from vectors.steering import SteeringSpec, apply_steering, decode_masks, prefill_masks

CAPTURE_KINDS = ("response_avg", "prompt_avg", "prompt_last")
# Decode steps between host checks for "every row finished" (the only syncs in the loop).
FINISH_CHECK_EVERY = 16
# Cache lengths are rounded up to this, so similar batches reuse one CUDA graph.
CACHE_ROUND = 64


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
        backend, self.notice = choose_runner(self.model, backend)
        notice_once(self.notice)
        self.backend = backend
        self.runner: StaticRunner | HFRunner = (
            StaticRunner(self.model) if backend == "static" else HFRunner(self.model)
        )
        # A graph replays on one device: a model sharded over several GPUs runs eagerly.
        graphable = self.device.type == "cuda" and backend == "static" and not _sharded(self.model)
        self.cuda_graphs = graphable if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not graphable:
            raise ValueError("CUDA graphs need one CUDA device and the static backend")
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
        for spec in steering:
            if spec.layer > self.runner.num_layers:
                raise ValueError(
                    f"layer {spec.layer} is past the model's {self.runner.num_layers} blocks"
                )
        # On the device once, before any graph capture (a host-to-device copy cannot be
        # captured); a sharded model's later layers copy to their own device as they run.
        self.steering = [spec.on(self.device) for spec in steering]
        self.watch = list(watch)
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

        steering = self.steering
        masks = prefill_masks(valid)

        def prompt_hook(index: int, h: torch.Tensor) -> torch.Tensor:
            if steering:
                h = apply_steering(h, steering, index, masks)
            if self.capture:
                hf = h.float()
                out.prompt_avg[:, index] = (hf * valid[..., None]).sum(1) / prompt_count
                out.prompt_last[:, index] = hf[:, -1]
            return h

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

        steering = self.steering
        watched: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for slot, w in enumerate(self.watch):
            unit = w.vector.to(self.device, torch.float32)
            watched.setdefault(w.layer, []).append((slot, unit / unit.norm().clamp(min=1e-12)))

        def hook(index: int, h: torch.Tensor) -> torch.Tensor:
            if steering:
                h = apply_steering(h, steering, index, decode_masks(~state.finished[:, None]))
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


def _sharded(model: Any) -> bool:
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    return len(devices) > 1


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
