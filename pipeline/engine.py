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

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import fused_kernels
from pipeline.chat import stop_token_ids
from pipeline.models import LoadedModel, spread_over_devices
from pipeline.runners import HFRunner, StaticRunner, choose_runner, notice_once
from pipeline.sampling import sample_next
from vectors.steering import SteeringSpec, apply_steering, decode_masks, prefill_masks

CAPTURE_KINDS = ("response_avg", "prompt_avg", "prompt_last")
# Decode steps between host checks for "every row finished" (the only syncs in the loop).
FINISH_CHECK_EVERY = 16
# Cache lengths are rounded up to this, so similar batches reuse one CUDA graph.
CACHE_ROUND = 64
# A decode step attends over the cache columns in use, rounded up to this (one CUDA graph a
# rounded length), not over the whole cache: for the seed plan's 1,000-token answers a step
# reads half the keys and values on average. Where the decode-attention kernel runs (CUDA),
# a step takes the whole cache instead and the kernel reads each row's own keys alone
# (``StaticRunner.reads_valid_keys_only``).
ATTENTION_ROUND = 128
# Prompt tokens (padding counted) in one prefill forward: the prompts taken into free slots
# are prefilled in groups of similar length within this (``prefill_groups``), so little of a
# prefill is padding and its activations stay bounded however many slots are filled at once.
PREFILL_TOKENS = 16384
# A prefill forward's fixed cost in padded prompt tokens: prompts are split into one more
# group where that saves more padding than this. (An 8B forward on an H200 launches for a few
# milliseconds whatever its size, the time of about 150-250 prompt tokens; 64 prompts of
# 100-200 tokens padded to one width were a quarter padding.)
PREFILL_GROUP_COST = 256
# One CUDA graph capture at a time in the process: engines on several GPUs run in threads
# (``pipeline.engine_threads``), and a capture's setup (synchronise, empty the cache) must not
# meet another thread's capture.
_CAPTURE_LOCK = threading.Lock()


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
    # Which of the run's steering specs steer this row, by index (a sweep's setting; ()
    # none); None: every spec. Rows steered differently share a batch.
    steer: tuple[int, ...] | None = None


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


class RequestQueue:
    """Indices of the requests still waiting for a slot, in the order they are taken. One
    engine makes its own; engines on several devices, each in its own thread, share one
    (``pipeline.engine_threads``): every request is taken by exactly one of them."""

    def __init__(self, indices: Sequence[int]) -> None:
        self._waiting = deque(indices)
        self._lock = threading.Lock()

    def take(self, count: int) -> list[int]:
        """Up to ``count`` of the next waiting requests, now taken."""
        with self._lock:
            return [self._waiting.popleft() for _ in range(min(count, len(self._waiting)))]

    def waiting(self) -> list[int]:
        """The requests waiting now (another thread may take some at once)."""
        with self._lock:
            return list(self._waiting)

    def __len__(self) -> int:
        return len(self._waiting)


# ---- the engine -----------------------------------------------------------------------------
class DecodeEngine:
    """Generates for a queue of requests with continuous batching: a fixed number of slots;
    when rows finish, their results are handed out and their slots refilled from the queue
    at once (on the static runner; the HF runner takes the queue in fixed chunks). A row's
    tokens depend only on its prompt, seed and the model, never on its neighbours."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        capture: bool = True,
        backend: str = "auto",
        cuda_graphs: bool | None = None,
        compiled: bool = False,
        deterministic: bool = False,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.capture = capture
        backend, self.notice = choose_runner(self.model, backend)
        notice_once(self.notice)
        self.backend = backend
        # Opt-in (``--deterministic``): the GPU decode step's attention on a kernel whose
        # results repeat run to run, so the same command gives the same tokens again (SDPA's
        # faster pick does not from batch 64; docs/benchmarks.md, "Repeatable runs").
        self.runner: StaticRunner | HFRunner = (
            StaticRunner(self.model, deterministic=deterministic)
            if backend == "static"
            else HFRunner(self.model)
        )
        if deterministic and backend != "static" and self.device.type == "cuda":
            family = self.model.config.model_type
            notice_once(
                f"--deterministic: {family} runs on the HF runner, with torch's attention: "
                "its runs may not repeat"
            )
        # A graph replays on one device: a model sharded over several GPUs runs eagerly.
        graphable = (
            self.device.type == "cuda"
            and backend == "static"
            and not spread_over_devices(self.model)
        )
        self.cuda_graphs = graphable if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not graphable:
            raise ValueError("CUDA graphs need one CUDA device and the static backend")
        # Whole-cache decode steps (``StaticRunner.reads_valid_keys_only``) pay off under a
        # CUDA graph: one graph a session, and the kernel's launch, about 100 us more host
        # time a layer than SDPA's (H200, tests/bench/bench_decode_attention.py), paid once
        # at capture. An eager step (a model sharded over GPUs) is bound by its launches: it
        # keeps the rounded SDPA step. (A runner told otherwise keeps what it was told.)
        if (
            isinstance(self.runner, StaticRunner)
            and not self.cuda_graphs
            and self.runner.valid_keys_only is None
        ):
            self.runner.valid_keys_only = False
        # Opt-in (``--compile``): each decoder layer of the decode step through torch.compile
        # (norms, rotary, residual and elementwise work fused: fewer kernels a step), one
        # compiled layer for all, under our own CUDA graph. About 8 s of compiling for an 8B
        # shape on an H200 (docs/benchmarks.md, "Compiled step"); the HF runner has no step
        # to compile.
        self.compiled = compiled and backend == "static"
        if compiled and not self.compiled:
            family = self.model.config.model_type
            notice_once(f"--compile: {family} runs on the HF runner, uncompiled")
        if self.compiled:
            self.runner.compile_layers()
        tokenizer = loaded.tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        self.stop_ids = torch.tensor(
            stop_token_ids(tokenizer, self.model.config), dtype=torch.long, device=self.device
        )
        self.num_states = self.runner.num_layers + 1
        self.hidden_size = int(self.model.config.hidden_size)
        self.steering: list[SteeringSpec] = []
        self._row_steering = False  # requests choose their specs (``DecodeRequest.steer``)
        self.watch: list[Watch] = []
        self._host = _HostStaging()
        self._warmed_kinds: set[tuple] = set()  # ``_step_kind``s run eagerly already
        self._graph_stream: Any = None  # ``_graphed``'s side stream, made on first use

    def run(
        self,
        requests: Sequence[DecodeRequest],
        sampling: SamplingConfig,
        on_step: Callable[[int], None] | None = None,
        *,
        slots: int | None = None,
        steering: Sequence[SteeringSpec] = (),
        watch: Sequence[Watch] = (),
        on_tokens: TokenCallback | None = None,
        check_every: int = FINISH_CHECK_EVERY,
    ) -> list[DecodeResult]:
        """Every request's result, in order (see ``stream``; default: one slot a request)."""
        results: list[DecodeResult | None] = [None] * len(requests)
        for index, result in self.stream(
            requests,
            sampling,
            on_step,
            slots=slots,
            steering=steering,
            watch=watch,
            on_tokens=on_tokens,
            check_every=check_every,
        ):
            results[index] = result
        return results  # type: ignore[return-value]

    def stream(
        self,
        requests: Sequence[DecodeRequest],
        sampling: SamplingConfig,
        on_step: Callable[[int], None] | None = None,
        *,
        slots: int | None = None,
        steering: Sequence[SteeringSpec] = (),
        watch: Sequence[Watch] = (),
        on_tokens: TokenCallback | None = None,
        check_every: int = FINISH_CHECK_EVERY,
        queue: RequestQueue | None = None,
    ) -> Iterator[tuple[int, DecodeResult]]:
        """Yield (request index, result) as rows finish, at the loop's host checks (every
        ``check_every`` steps), ``slots`` rows at a time (default: all). ``on_step(steps)``
        is called at each check (e.g. to write a heartbeat); ``on_tokens`` gets the tokens
        (and watched projections) produced since the last check, and needs every request
        in one batch. ``steering`` adds vectors to block outputs (``vectors.steering``).
        ``queue``: the requests to take, shared with engines on other devices (default: all
        of them, in order, for this engine alone)."""
        if not requests:
            return
        for spec in steering:
            if spec.layer > self.runner.num_layers:
                raise ValueError(
                    f"layer {spec.layer} is past the model's {self.runner.num_layers} blocks"
                )
        chosen = [r.steer for r in requests if r.steer is not None]
        for k in {k for steer in chosen for k in steer}:
            if not 0 <= k < len(steering):
                raise ValueError(
                    f"a request steers by spec index {k}; the run has {len(steering)} specs"
                )
        # Per-row steering only where a request chooses its specs: other runs keep the step
        # (and its CUDA graph) they had.
        self._row_steering = bool(steering) and bool(chosen)
        slots = min(slots or len(requests), len(requests))
        if on_tokens is not None and (queue is not None or slots < len(requests)):
            raise ValueError("on_tokens needs every request in one batch (slots >= requests)")
        # On the device once, before any graph capture (a host-to-device copy cannot be
        # captured); a sharded model's later layers copy to their own device as they run.
        self.steering = [spec.on(self.device) for spec in steering]
        self.watch = list(watch)
        if queue is None:
            queue = RequestQueue(range(len(requests)))
        while queue:
            yield from self._session(
                requests, queue, sampling, slots, on_step, on_tokens, check_every
            )

    def _session(
        self,
        requests: Sequence[DecodeRequest],
        queue: RequestQueue,
        sampling: SamplingConfig,
        slots: int,
        on_step: Callable[[int], None] | None,
        on_tokens: TokenCallback | None,
        check_every: int,
    ) -> Iterator[tuple[int, DecodeResult]]:
        """One cache allocation: the first ``slots`` requests of the queue, refilled from it
        as rows finish where the runner can (the static one), until no slot is busy."""
        refills = isinstance(self.runner, StaticRunner)
        waiting = queue.waiting()
        if not waiting:  # another device's engine took the last of them
            return
        # Every prompt this session can take is waiting now.
        longest = max(len(requests[i].prompt_ids) for i in waiting)
        new = sampling.max_new_tokens
        # +1: a finished row idles at one column past its last until it is harvested.
        length = -(-(longest + new + 1) // CACHE_ROUND) * CACHE_ROUND
        act_shape = (self.num_states, self.hidden_size) if self.capture else (1, 1)
        # Taken before the state and cache are sized: another device's engine may have taken
        # some of what was waiting (the HF runner's cache holds exactly the rows it starts).
        first = queue.take(min(slots, len(waiting)))
        if not first:
            return
        slots = len(first)
        # Inference mode around each piece of work, never across a yield (the caller's code
        # between results must not run in it).
        with torch.inference_mode():
            state = _State.create(
                slots, length, new, act_shape, self.device, len(self.watch), len(self.steering)
            )
            self.runner.allocate(slots, length)
        busy: list[int | None] = [None] * slots  # the request each slot holds
        # Per slot: its first decode column less the steps run before it was filled, so a
        # busy row writes column start + steps at the next step (or less, once finished).
        starts = [0] * slots
        streamed = steps = 0
        self._fill(state, busy, list(range(slots)), requests, first, sampling, starts, steps)
        step_fn = self._make_step(state, sampling)
        whole_cache = self._whole_cache_steps()
        while True:
            if whole_cache:
                used = length
            else:  # every busy row's columns so far, rounded up (one graph a rounded length)
                reach = max(starts[slot] for slot, held in enumerate(busy) if held is not None)
                used = min(length, -(-(reach + steps + 1) // ATTENTION_ROUND) * ATTENTION_ROUND)
            with torch.inference_mode():
                step_fn(used)
            steps += 1
            if steps % check_every:
                continue
            if on_step is not None:
                on_step(steps)
            if on_tokens is not None:
                with torch.inference_mode():
                    streamed = self._stream(state, streamed, min(steps, new), on_tokens)
            # Rows that finished since the last check: handed out, their slots freed.
            yield from self._collect(state, busy, new, sampling)
            free = [slot for slot, held in enumerate(busy) if held is None]
            taken = queue.take(len(free)) if refills and free else []
            if taken:
                self._fill(state, busy, free, requests, taken, sampling, starts, steps)
            if all(held is None for held in busy):
                break
            # Without a queue, drop finished rows once enough have finished: the rest decode
            # faster. A graphed step must be captured again for the new shape: it waits longer.
            alive = sum(held is not None for held in busy)  # after the refill
            # A compiled step never drops below two rows: a batch of one is a shape of its own
            # to the compiled layer (a recompile of seconds), and costs the same on a GPU.
            floor = 2 if self.compiled else 1
            if (
                not queue
                and on_tokens is None
                and len(busy) > floor
                and alive <= len(busy) * (0.5 if self.cuda_graphs else 0.75)
            ):
                keep = [slot for slot, held in enumerate(busy) if held is not None]
                idle = [slot for slot, held in enumerate(busy) if held is None]
                keep = sorted(keep + idle[: max(0, floor - len(keep))])
                self._compact(state, keep)
                busy = [busy[slot] for slot in keep]
                starts = [starts[slot] for slot in keep]
                step_fn = self._make_step(state, sampling)
        if on_tokens is not None:
            with torch.inference_mode():
                self._stream(state, streamed, new, on_tokens)
        if not refills:
            self.runner.release()

    @torch.inference_mode()
    def _compact(self, state: _State, keep: list[int]) -> None:
        """Keep only these slots (their rows, caches and state)."""
        index = torch.tensor(keep, device=self.device)
        state.select(index)
        self.runner.select(index)

    @torch.inference_mode()
    def _fill(
        self,
        state: _State,
        busy: list[int | None],
        free: list[int],
        requests: Sequence[DecodeRequest],
        take: list[int],
        sampling: SamplingConfig,
        starts: list[int],
        steps: int,
    ) -> None:
        """Prefill the requests just taken from the queue (no more than the free slots)
        into the free slots (``prefill_groups`` of similar length): prompt captures and each
        row's first token; the slots' step, column and caches start afresh (``starts``
        records where their columns start, ``steps`` being the steps run so far)."""
        free = free[: len(take)]
        lengths = [len(requests[index].prompt_ids) for index in take]
        # The HF runner's cache takes every row at once, in slot order.
        static = isinstance(self.runner, StaticRunner)
        groups = prefill_groups(lengths, PREFILL_TOKENS) if static else [list(range(len(take)))]
        for group in groups:
            self._prefill(
                state,
                busy,
                [free[i] for i in group],
                [take[i] for i in group],
                requests,
                sampling,
                starts,
                steps,
            )

    def _prefill(
        self,
        state: _State,
        busy: list[int | None],
        where: list[int],
        take: list[int],
        requests: Sequence[DecodeRequest],
        sampling: SamplingConfig,
        starts: list[int],
        steps: int,
    ) -> None:
        """One prefill forward: requests ``take`` into slots ``where``, left-padded to the
        longest of them."""
        device = self.device
        width = max(len(requests[i].prompt_ids) for i in take)
        ids = torch.full((len(take), width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(take), width), dtype=torch.bool)
        for row, index in enumerate(take):
            prompt = requests[index].prompt_ids
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            valid[row, width - len(prompt) :] = True
        ids, valid = ids.to(device), valid.to(device)
        slot = torch.tensor(where, dtype=torch.long, device=device)
        seeds = torch.tensor([requests[i].seed for i in take], dtype=torch.long, device=device)
        positions = (valid.long().cumsum(1) - 1).clamp_(min=0)
        steered = self._steered_rows([requests[i] for i in take])
        state.reset(slot, seeds, valid, steered)
        prompt_count = valid.sum(1, keepdim=True).float()
        steering = self.steering
        rows = steered if self._row_steering else None
        masks = prefill_masks(valid)
        capture = self.capture

        def prompt_hook(index: int, h: torch.Tensor) -> torch.Tensor:
            if steering:
                h = apply_steering(h, steering, index, masks, rows)
            if capture:
                # A layer of a device_map model may sit on another GPU than the state.
                hf = h.to(device).float()
                state.prompt_avg[slot, index] = (hf * valid[..., None]).sum(1) / prompt_count
                state.prompt_last[slot, index] = hf[:, -1]
            return h

        logits = self.runner.prefill(ids, valid, positions, prompt_hook, slot)
        first = sample_next(
            logits, seeds, torch.zeros_like(seeds), sampling.temperature, sampling.top_p
        )
        state.tokens[slot, 0] = first
        state.current[slot] = first
        state.positions[slot] = valid.sum(1)
        state.column[slot] = width
        finished = torch.zeros_like(first, dtype=torch.bool)
        if not sampling.ignore_eos:
            finished = (first[:, None] == self.stop_ids[None, :]).any(1)
        state.finished[slot] = finished
        for row, index in zip(where, take, strict=True):
            busy[row] = index
            starts[row] = width - steps

    def _steered_rows(self, requests: Sequence[DecodeRequest]) -> torch.Tensor:
        """[len(requests), K] on the device: which of the K steering specs steer each row."""
        steered = torch.ones((len(requests), max(len(self.steering), 1)), dtype=torch.bool)
        for row, request in enumerate(requests):
            if request.steer is not None:
                steered[row] = False
                steered[row, list(request.steer)] = True
        return steered.to(self.device)

    @torch.inference_mode()
    def _collect(
        self, state: _State, busy: list[int | None], new: int, sampling: SamplingConfig
    ) -> list[tuple[int, DecodeResult]]:
        finished = state.finished.tolist()
        done = [slot for slot, held in enumerate(busy) if held is not None and finished[slot]]
        if not done:
            return []
        index = torch.tensor(done, device=self.device)
        tokens = state.tokens[index, :new].cpu()
        acts: dict[str, torch.Tensor] = {}
        if self.capture:
            count = state.response_count[index].clamp(min=1)[:, None, None]
            acts = {
                "response_avg": self._host.copy(state.response_sum[index] / count),
                "prompt_avg": self._host.copy(state.prompt_avg[index]),
                "prompt_last": self._host.copy(state.prompt_last[index]),
            }
        projections = state.projections[index].cpu() if self.watch else None
        stops = set(self.stop_ids.tolist())
        out = []
        for row, slot in enumerate(done):
            seq = tokens[row].tolist()
            end = len(seq)
            if not sampling.ignore_eos:
                end = next((i for i, t in enumerate(seq) if t in stops), len(seq))
            request = busy[slot]
            busy[slot] = None
            result = DecodeResult(
                answer_ids=seq[:end],
                finish_reason="eos" if end < len(seq) else "length",
                activations={k: v[row] for k, v in acts.items()} if self.capture else None,
                projections=projections[row, :end] if projections is not None else None,
            )
            out.append((request, result))
        # A freed slot idles at column 0 with only that column valid: the step's attention
        # reads only the columns busy rows use, and an idle row must still see one key.
        state.column[index] = 0
        state.key_valid[index] = False
        return out

    def _stream(self, state: _State, streamed: int, upto: int, on_tokens: TokenCallback) -> int:
        """Hand the caller the tokens (and projections) of steps since the last call (every
        row started together: no refills, no dropped rows)."""
        if upto <= streamed:
            return streamed
        tokens = state.tokens[:, streamed:upto].cpu()
        proj = state.projections[:, streamed:upto].cpu() if self.watch else None
        on_tokens(streamed, tokens, proj)
        return upto

    def _make_step(self, state: _State, sampling: SamplingConfig) -> Callable[[int], None]:
        step_fn = self._step_fn(state, sampling)
        if self.cuda_graphs:
            # One eager step before the first capture: it compiles a compiled step's layer and
            # sets up the kernels' libraries. A second, as before, changed nothing but cost
            # another eager step (about 30 ms a run on the 8B shape, H200). None where this
            # engine has run a step of this kind eagerly already (the same shapes, sampling,
            # steering and watch: the same kernels, set up then) on its side stream: a run
            # repeated on this engine (a benchmark's timed runs; jobs sharing an engine)
            # captures at once. A compiled step always warms up (a new session may
            # recompile). The kind is kept once its warm-up step has run: one that raised (an
            # out-of-memory) set up nothing.
            kind = self._step_kind(state, sampling)
            warm = not self.compiled and kind in self._warmed_kinds
            record = None if warm else (lambda: self._warmed_kinds.add(kind))
            step_fn = self._graphed(step_fn, 0 if warm else 1, on_warmed=record)
        return step_fn

    def _step_kind(self, state: _State, sampling: SamplingConfig) -> tuple:
        """What decides which kernels a step launches, and their shapes (Triton's kernels
        turned off since, the torch code's are new to the process)."""
        steering = tuple(
            (spec.layer, spec.positions, spec.ablate, spec.cap is None, tuple(spec.vector.shape))
            for spec in self.steering
        )
        return (
            tuple(state.key_valid.shape),
            tuple(state.tokens.shape),
            tuple(state.response_sum.shape),
            self.capture,
            steering,
            self._row_steering,
            tuple(w.layer for w in self.watch),
            sampling.temperature > 0,
            sampling.top_p < 1.0,
            sampling.ignore_eos,
            tuple(self.stop_ids.shape),
            fused_kernels.ENABLED,
            self._whole_cache_steps(),
        )

    def _whole_cache_steps(self) -> bool:
        """Steps whose attention reads only the keys a row may look at take the whole cache:
        one CUDA graph for the session (``StaticRunner.reads_valid_keys_only``)."""
        return isinstance(self.runner, StaticRunner) and self.runner.reads_valid_keys_only(
            torch.device(self.device)
        )

    def _step_fn(self, state: _State, sampling: SamplingConfig) -> Callable[[int], None]:
        """One decode step, all on the device, state updated in place (graph-capturable):
        each row feeds its token step-1, captures its hidden states if it is an answer
        token, and samples its token ``step``; rows keep their own step and cache column.
        ``step(used)`` attends over cache columns 0..used-1 (every busy row's are there)."""
        runner = self.runner
        capture = self.capture
        stop_ids = self.stop_ids
        pad = self.pad_id
        new = sampling.max_new_tokens
        rows = torch.arange(state.current.shape[0], device=self.device)
        # Device tensors for the constants the step writes: a Python scalar written by index
        # would be copied from the host, which a CUDA graph cannot capture.
        every = torch.ones_like(rows, dtype=torch.bool)
        scratch = torch.full_like(rows, new)

        steering = self.steering
        rows_steered = state.steered if self._row_steering else None
        watched: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for slot, w in enumerate(self.watch):
            unit = w.vector.to(self.device, torch.float32)
            watched.setdefault(w.layer, []).append((slot, unit / unit.norm().clamp(min=1e-12)))

        # Each state the step passes (a view, no copy), summed into ``response_sum`` in one
        # operation after the last layer: an add per layer was three small kernels a layer,
        # about a tenth of a batch-256 step on an H200.
        passed: list[torch.Tensor | None] = [None] * self.num_states

        def hook(index: int, h: torch.Tensor) -> torch.Tensor:
            if steering:
                live = decode_masks(~state.finished[:, None])
                h = apply_steering(h, steering, index, live, rows_steered)
            if capture:
                passed[index] = h[:, 0]
            for slot, unit in watched.get(index, ()):
                # The fed token is answer token step-1: its projection goes in that column
                # (an idle row's goes to the scratch column ``new``).
                column = torch.where(state.finished, scratch, state.step - 1)
                state.projections[rows, column, slot] = h[:, 0].to(unit.device).float() @ unit
            return h

        def forward(used: int) -> torch.Tensor:
            key_valid = state.key_valid[:, :used]
            return runner.decode(state.current, state.positions, state.column, key_valid, hook)

        def step(used: int) -> None:
            alive = ~state.finished
            state.alive_f.copy_(alive.float())
            state.key_valid.index_put_((rows, state.column), every)
            logits = forward(used)
            if capture:
                # Layers may sit on several GPUs (a device_map): each state comes to the
                # state's device (a no-op for those already there).
                if any(h is None for h in passed):  # a runner that skipped a layer's hook
                    raise RuntimeError("a decode step passed no state for some layer")
                states = torch.stack([h.to(self.device) for h in passed], 1)  # type: ignore[union-attr]
                # alive_f is 0 or 1: the product is exact, as the per-layer add was.
                state.response_sum.addcmul_(states, state.alive_f[:, None, None])
                passed[:] = [None] * len(passed)
            state.response_count.add_(state.alive_f)
            token = sample_next(
                logits, state.seeds, state.step, sampling.temperature, sampling.top_p
            )
            token = torch.where(alive, token, torch.full_like(token, pad))
            # An idle row writes to the scratch column ``new``, never over its last token.
            state.tokens[rows, torch.where(alive, state.step, scratch)] = token
            # Token ``new`` is one past the answer: sampled only so that answer token new-1
            # is fed (and captured); the row ends there.
            ended = state.step >= new
            if not sampling.ignore_eos:
                ended = ended | (token[:, None] == stop_ids[None, :]).any(1)
            state.finished |= ended
            state.current.copy_(token)
            moving = (~state.finished).long()
            state.positions.add_(moving)
            state.column.add_(moving)
            state.step.add_(moving)

        return step

    def _graphed(
        self,
        step_fn: Callable[[int], None],
        warmup: int,
        on_warmed: Callable[[], None] | None = None,
    ) -> Callable[[int], None]:
        """The step as CUDA graphs, one per attended length: the first ``warmup`` calls run
        eagerly on a side stream (real steps, which also warm the allocator and compile a
        compiled step's layer; ``on_warmed`` is called once the last has returned), then
        each new length is captured once and replayed after.
        Capture records without running, so the capturing call replays too. The graphs share
        one memory pool: only their scratch lives there (every result goes to the state), and
        they never run at once."""
        calls = 0
        device = self.device
        # One side stream for the engine's graphs: the libraries' per-stream set-up (cuBLAS's
        # workspace) made by the first warm-up serves every later capture.
        if self._graph_stream is None:
            self._graph_stream = torch.cuda.Stream(device=device)
        stream = self._graph_stream
        graphs: dict[int, Any] = {}  # kept alive with this step function, freed with it
        pool = torch.cuda.graph_pool_handle()
        # A compiled step refuses to recompile inside a capture (``runners._compiled_calls``).
        needs_compile: tuple[type[Exception], ...] = ()
        if self.compiled:
            from torch._dynamo.exc import RecompileError

            needs_compile = (RecompileError,)

        def eagerly(used: int) -> None:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step_fn(used)
            torch.cuda.current_stream().wait_stream(stream)

        def graphed(used: int) -> None:
            nonlocal calls
            calls += 1
            # Capture records the current device's stream: the model's device must be current
            # (a worker whose model sits on cuda:1 still starts with cuda:0 current).
            with torch.cuda.device(device):
                if calls <= warmup:
                    eagerly(used)
                    if calls == warmup and on_warmed is not None:
                        on_warmed()
                    return
                if used not in graphs:
                    graph = torch.cuda.CUDAGraph()
                    try:
                        # The step's own side stream, on its device: torch.cuda.graph's
                        # default is one stream for the whole process, made on whichever GPU
                        # captured first. thread_local: an engine on another GPU, in another
                        # thread, may sync or allocate while this one captures.
                        with (
                            _CAPTURE_LOCK,
                            torch.cuda.graph(
                                graph, pool=pool, stream=stream, capture_error_mode="thread_local"
                            ),
                        ):
                            step_fn(used)
                    except needs_compile:
                        # This length needs a compile of its own. The capture only recorded:
                        # the step runs now, eagerly (compiling), and its next call captures.
                        # Before, every new length's first call ran eagerly, about 30 ms each
                        # for an 8B step on an H200, where one compile serves every length.
                        eagerly(used)
                        return
                    graphs[used] = graph
                graphs[used].replay()

        return graphed


class _HostStaging:
    """Device tensors to host memory through one page-locked buffer, kept and grown as
    needed. On an H200 a batch-256 collection's activations (3 x 138 MB) took 290 ms to
    pageable memory, as long through a fresh pinned block each (torch's pinned-memory cache
    did not hand them back between collections), and 35-39 ms through this buffer: a tenth
    of that batch's run, where the decode steps' own capture costs 0-5%
    (tests/bench/profile_capture.py). The results own pageable copies: rows a caller keeps
    hold no page-locked memory."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cuda":
            return tensor.cpu()
        size = tensor.numel()
        buffer = self.buffer
        if buffer is None or buffer.numel() < size or buffer.dtype != tensor.dtype:
            buffer = self.buffer = torch.empty(size, dtype=tensor.dtype, pin_memory=True)
        staged = buffer[:size].view(tensor.shape)
        staged.copy_(tensor)
        return staged.clone()


def prefill_groups(
    lengths: Sequence[int], budget: int, group_cost: int = PREFILL_GROUP_COST
) -> list[list[int]]:
    """Indices into ``lengths`` in groups to prefill together: sorted by length, cut where
    the padded tokens plus ``group_cost`` a group add up to the fewest, each group within
    ``budget`` padded tokens (at least one prompt a group). Ties go to fewer groups."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sizes = [lengths[i] for i in order]
    # cost[end]: the cheapest grouping of order[:end]; start[end]: where its last group starts
    cost = [0] + [float("inf")] * len(order)
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        width = sizes[end - 1]  # the group's longest: it is sorted
        first = end - 1
        while first >= 0 and (first == end - 1 or (end - first) * width <= budget):
            total = cost[first] + (end - first) * width + group_cost
            if total <= cost[end]:
                cost[end], start[end] = total, first
            first -= 1
    groups: list[list[int]] = []
    end = len(order)
    while end:
        groups.append(order[start[end] : end])
        end = start[end]
    return groups[::-1]


@dataclass
class _State:
    """Every tensor a decode step reads or writes, one row per slot."""

    seeds: torch.Tensor
    tokens: torch.Tensor  # [B, new + 1]: the row's tokens, by its own step
    current: torch.Tensor
    finished: torch.Tensor
    alive_f: torch.Tensor
    positions: torch.Tensor
    column: torch.Tensor  # [B]: the cache column each row writes next
    step: torch.Tensor  # [B]: the index of the token each row samples next
    key_valid: torch.Tensor
    response_sum: torch.Tensor
    response_count: torch.Tensor
    prompt_avg: torch.Tensor
    prompt_last: torch.Tensor
    projections: torch.Tensor  # [B, new + 1, W] watched projections per answer token
    steered: torch.Tensor  # [B, K] bool: which of the run's steering specs steer each row

    @classmethod
    def create(
        cls,
        batch: int,
        length: int,
        new: int,
        act_shape: tuple[int, int],
        device: Any,
        watched: int = 0,
        specs: int = 0,
    ) -> _State:
        def zeros(*shape: int, dtype=torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            seeds=zeros(batch, dtype=torch.long),
            tokens=zeros(batch, new + 1, dtype=torch.long),
            current=zeros(batch, dtype=torch.long),
            finished=torch.ones(batch, dtype=torch.bool, device=device),  # empty slots idle
            alive_f=zeros(batch),
            positions=zeros(batch, dtype=torch.long),
            column=zeros(batch, dtype=torch.long),
            step=torch.ones(batch, dtype=torch.long, device=device),
            key_valid=zeros(batch, length, dtype=torch.bool),
            response_sum=zeros(batch, *act_shape),
            response_count=zeros(batch),
            prompt_avg=zeros(batch, *act_shape),
            prompt_last=zeros(batch, *act_shape),
            projections=zeros(batch, new + 1, max(watched, 1)),
            steered=zeros(batch, max(specs, 1), dtype=torch.bool),
        )

    def reset(
        self, slot: torch.Tensor, seeds: torch.Tensor, valid: torch.Tensor, steered: torch.Tensor
    ) -> None:
        """Start these slots afresh for new rows whose real prompt columns are ``valid``,
        steered by the specs ``steered`` marks."""
        self.seeds[slot] = seeds
        self.steered[slot] = steered
        self.tokens[slot] = 0
        self.step[slot] = 1
        self.key_valid[slot] = False
        self.key_valid[slot, : valid.shape[1]] = valid
        self.response_sum[slot] = 0
        self.response_count[slot] = 0
        self.prompt_avg[slot] = 0
        self.prompt_last[slot] = 0
        self.projections[slot] = 0

    def select(self, keep: torch.Tensor) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name).index_select(0, keep))
