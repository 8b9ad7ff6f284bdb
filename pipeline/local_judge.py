"""The local judge (``--judge local:MODEL``): the exact probability of every complete answer
"0".."100" and "REFUSAL", scored in one pass over the prompt's KV cache, so multi-token
numbers are right for any tokenizer. Judgments in flight together are scored together: one
forward for a batch of prompts, their shared prefix (the judge template's text) computed
once. A small model such as smollm2 is a smoke-test judge only."""

from __future__ import annotations

import asyncio
import inspect
import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from pipeline.judge_scores import Judge, JudgeResult

if TYPE_CHECKING:
    from pipeline.models import LoadedModel

# Tokens (prompt tails and candidate nodes, padding counted) in one batched forward of a
# local judge: a GPU takes many judgments at once; on a CPU larger batches stop paying.
LOCAL_BATCH_TOKENS_GPU = 65536
LOCAL_BATCH_TOKENS_CPU = 4096


class LocalJudge(Judge):
    """Exact candidate probabilities from a local chat model (see the module docstring)."""

    CANDIDATES = [str(n) for n in range(101)] + ["REFUSAL"]

    def __init__(
        self, model: str, *, device: str | None = None, loaded: LoadedModel | None = None
    ) -> None:
        """``model`` may name a precision, ``MODEL@bfloat16`` (default: bf16 on CUDA, fp32
        on a CPU): a CPU with bf16 instructions judges about 2.4x faster in bf16.
        ``loaded``: that model, loaded already (a copy a device, ``load_on_devices``)."""
        from pipeline.models import load_model, split_precision
        from pipeline.runners import attention_windows, fused_forward_runner

        self.spec = f"local:{model}"
        name, dtype = split_precision(model)
        self.loaded = loaded or load_model(name, device=device, dtype=dtype)
        _warn_if_emulated(self.loaded, dtype)
        tok = self.loaded.tokenizer
        end = tok.eos_token_id
        self.candidate_ids = [
            list(tok(c, add_special_tokens=False)["input_ids"]) + [end] for c in self.CANDIDATES
        ]
        self._trie = _CandidateTrie(self.candidate_ids)
        on_gpu = self.loaded.device.type == "cuda"
        # Tokens one batched forward may hold (prompt tails and candidate nodes).
        self.batch_tokens = LOCAL_BATCH_TOKENS_GPU if on_gpu else LOCAL_BATCH_TOKENS_CPU
        self._waiting: list[tuple[list[int], asyncio.Future]] = []
        self._scorer: asyncio.Task | None = None
        self._prefix: tuple[list[int], Any] | None = None
        forward = inspect.signature(self.loaded.model.forward).parameters
        self._keeps_logits = "logits_to_keep" in forward
        self._windows = attention_windows(self.loaded.model)
        self._runner = fused_forward_runner(self.loaded.model)

    async def score_prompt(self, prompt: str) -> JudgeResult:
        """Queued; the prompts waiting when the device frees up are scored in batches of
        similar length (``_next_batch``)."""
        from pipeline.chat import prompt_ids

        future = asyncio.get_running_loop().create_future()
        self._waiting.append((prompt_ids(self.loaded.tokenizer, None, prompt), future))
        if self._scorer is None or self._scorer.done():
            self._scorer = asyncio.ensure_future(self._score_waiting())
        return self.result_from_logprobs(await future)

    async def _score_waiting(self) -> None:
        while self._waiting:
            await asyncio.sleep(0)  # let every coroutine ready to ask join this batch
            batch = self._next_batch()
            try:
                all_ids = [ids for ids, _ in batch]
                results = await asyncio.to_thread(self._logprobs_of_ids, all_ids)
            except Exception as exc:  # every judgment of the batch fails with it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), logprobs in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(logprobs)

    def _next_batch(self) -> list[tuple[list[int], asyncio.Future]]:
        """The oldest waiting prompt and those nearest it in length, while the batch's
        tokens (tails padded to the longest, plus the trie) fit the budget. When the oldest
        begins with the prefix kept from the last batch (the template's text, or more),
        prompts that begin with it too come first. When not all fit, the ones left are those
        that would pad this batch most or shorten its shared prefix. The oldest always
        goes, so every prompt is scored in turn. (Closing a GPU batch early, at 16k tokens,
        to pad less measured 0.92x: one batch of all waiting is faster.)"""
        waiting = [ids for ids, _ in self._waiting]
        oldest = waiting[0]
        kept = self._prefix[0] if self._prefix is not None else []
        template = len(kept) if kept and oldest[: len(kept)] == kept else 0
        common = [_common_length(ids, oldest) for ids in waiting]
        nearest = sorted(
            range(len(waiting)),
            key=lambda i: (common[i] < template, abs(len(waiting[i]) - len(oldest)), i),
        )
        nodes = len(self._trie.order)
        chosen: list[int] = []
        shared = len(oldest) - 1
        for index in nearest:
            ids = waiting[index]
            with_it = min(shared, common[index], len(ids) - 1)
            tails = [len(waiting[i]) - with_it for i in (*chosen, index)]
            padded = len(tails) * (max(tails) + nodes)
            if chosen and padded > self.batch_tokens:
                break
            chosen.append(index)
            shared = with_it
        chosen.sort()
        batch = [self._waiting[i] for i in chosen]
        for i in reversed(chosen):
            del self._waiting[i]
        return batch

    def result_from_logprobs(self, logprobs: list[float]) -> JudgeResult:
        peak = max(logprobs)
        weights = [math.exp(lp - peak) for lp in logprobs]
        total = sum(weights)
        probs = [w / total for w in weights]
        mass = math.exp(peak) * total
        number_probs = probs[:101]
        refusal = probs[101]
        number_mass = sum(number_probs)
        score = None
        if refusal < max(number_probs) and number_mass > 0:
            score = sum(p * n for n, p in enumerate(number_probs)) / number_mass
        top = sorted(range(102), key=lambda i: -probs[i])[:10]
        return JudgeResult(
            score,
            evidence={
                "mass": mass,
                "refusal": refusal,
                "top": [[self.CANDIDATES[i], round(probs[i], 6)] for i in top],
            },
        )

    def candidate_logprobs(self, prompt: str) -> list[float]:
        """log P(candidate + end of turn | prompt) for every candidate."""
        return self.candidate_logprobs_batch([prompt])[0]

    def candidate_logprobs_batch(self, prompts: list[str]) -> list[list[float]]:
        """``candidate_logprobs`` for several prompts in one forward pass.

        The candidates form a trie ("1" is a prefix of "10" and "100"): every prefix is fed
        once, after each prompt, under a tree attention mask (a node sees its prompt and its
        own ancestors). The prompts' common prefix (the template's text before the question)
        is computed once and kept for the next batch; each row then holds its prompt's tail,
        left-padded, and the trie."""
        from pipeline.chat import prompt_ids

        return self._logprobs_of_ids([prompt_ids(self.loaded.tokenizer, None, p) for p in prompts])

    def _logprobs_of_ids(self, all_ids: list[list[int]]) -> list[list[float]]:
        import torch

        from pipeline.runners import additive_masks

        model = self.loaded.model
        device = self.loaded.device
        with torch.inference_mode():
            shared, cache = self._shared_prefix(all_ids)
            tails = [ids[shared:] for ids in all_ids]
            trie = self._trie
            b, width, n = len(tails), max(len(t) for t in tails), len(trie.order)
            q = width + n
            tokens = torch.full((b, q), int(self.loaded.tokenizer.pad_token_id), dtype=torch.long)
            positions = torch.zeros((b, q), dtype=torch.long)
            real = torch.zeros((b, width), dtype=torch.bool)
            for row, tail in enumerate(tails):
                start = width - len(tail)
                tokens[row, start:width] = torch.tensor(tail)
                positions[row, start:width] = torch.arange(shared, shared + len(tail))
                real[row, start:] = True
                positions[row, width:] = shared + len(tail) + trie.depths - 1
            tokens[:, width:] = trie.tokens
            # [b, 1, q, shared + q]: the common prefix for all; causal over real tail tokens;
            # each trie node its tail and its ancestors; a pad query only itself.
            allow = torch.zeros((b, 1, q, shared + q), dtype=torch.bool)
            allow[..., :shared] = True
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            allow[:, 0, :width, shared : shared + width] = causal & real[:, None, :]
            allow[:, 0, width:, shared : shared + width] = real[:, None, :]
            allow[:, 0, width:, shared + width :] = trie.ancestors
            index = torch.arange(q)
            allow[:, 0, index, shared + index] = True
            # Each query's keys by position: the common prefix's, then the queries' own.
            positions = positions.to(device)
            prefix = torch.arange(shared, device=device).expand(b, shared)
            mask = additive_masks(
                allow.to(device),
                positions,
                torch.cat([prefix, positions], 1),
                self._windows,
                model.dtype,
            )
            if cache is not None:
                cache.batch_repeat_interleave(b)
            kwargs = {self._cache_kw: cache} if cache is not None else {}
            if self._keeps_logits:
                # Logits for the last tail token and the trie only: the tail's other
                # positions were most of the vocabulary projection and its log-softmax.
                kwargs["logits_to_keep"] = n + 1
            # The static runner's fused norms, projections and rotary kernel and its
            # attention (grouped heads read in place) where the family is one it runs: on an
            # H200 the 8B judge's batch ran 1.24x faster (docs/benchmarks.md, "Session 17").
            fused = self._runner.attention() if self._runner is not None else nullcontext()
            with fused:
                out = model(
                    tokens.to(device),
                    position_ids=positions,
                    attention_mask=mask,
                    **kwargs,
                )
            totals = _candidate_totals(out.logits[:, -(n + 1) :], trie)
        return totals.cpu().tolist()

    def _shared_prefix(self, all_ids: list[list[int]]) -> tuple[int, Any]:
        """(length, a copy of its KV cache) of the prompts' common prefix, leaving at least
        one token of each prompt to run; the cache is kept for the next batch."""
        import copy

        import torch
        from transformers import DynamicCache

        from pipeline.models import cache_kwarg

        self._cache_kw = cache_kwarg(self.loaded.model)
        shared = min(len(ids) for ids in all_ids) - 1
        first = all_ids[0]
        for ids in all_ids[1:]:
            shared = min(shared, _common_length(ids, first))
        if shared <= 0:
            return 0, None
        prefix = first[:shared]
        if self._prefix is None or self._prefix[0] != prefix:
            cache = DynamicCache()
            ids = torch.tensor([prefix], device=self.loaded.device)
            positions = torch.arange(shared, device=self.loaded.device)[None]
            keep = {"logits_to_keep": 1} if self._keeps_logits else {}  # only its cache counts
            self.loaded.model(
                ids,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kw: cache},
                **keep,
            )
            self._prefix = (prefix, cache)
        return shared, copy.deepcopy(self._prefix[1])

    def candidate_logprob_alone(self, prompt: str, index: int) -> float:
        """The same quantity for one candidate by a plain full forward (for checking)."""
        import torch

        from pipeline.chat import prompt_ids

        base = prompt_ids(self.loaded.tokenizer, None, prompt)
        cand = self.candidate_ids[index]
        ids = torch.tensor([base + cand], device=self.loaded.device)
        with torch.inference_mode():
            logits = self.loaded.model(ids).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        return float(sum(lp[len(base) - 1 + k, t] for k, t in enumerate(cand)))


def _warn_if_emulated(loaded: Any, dtype: str | None) -> None:
    """bf16 on a CPU without bf16 instructions is emulated: slower than float32, not faster."""
    import torch

    cpu = loaded.device.type == "cpu"
    if dtype == "bfloat16" and cpu and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        from pipeline.runners import notice_once

        notice_once(
            "this CPU has no bfloat16 instructions: a local judge @bfloat16 runs slower "
            "here than without the suffix (float32)"
        )


# Elements of float32 logits read at once for the candidates: their float32 copy and its
# log-softmax, about 512 MB.
_LOGPROB_CHUNK = 1 << 26


def _candidate_totals(logits: Any, trie: _CandidateTrie) -> Any:
    """[b, 102] log P(candidate + end | prompt) from ``logits`` [b, 1 + nodes, V]: position 0
    is the last real tail token's next-token distribution, then the trie's nodes. A few rows
    at a time: only ~100 of each position's V log-probabilities are read, and the whole
    float32 log-softmax would be GBs at a GPU batch over a 128k vocabulary (the judge's
    largest tensor by far)."""
    import torch

    on = logits.device
    first, parents, nexts, used = (
        t.to(on) for t in (trie.first, trie.parents, trie.nexts, trie.used)
    )
    rows = max(1, _LOGPROB_CHUNK // (logits.shape[1] * logits.shape[2]))
    totals = []
    for part in logits.split(rows):
        logp = torch.log_softmax(part.float(), -1)
        picked = logp[:, 1:][:, parents, nexts]
        totals.append(logp[:, 0, first] + (picked * used).sum(-1))
    return torch.cat(totals)


def _common_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


class _CandidateTrie:
    """The candidates' token prefixes as trie nodes, in an order with ancestors first, and
    the index arrays that sum each candidate's log-probability from a batched forward."""

    def __init__(self, candidates: list[list[int]]) -> None:
        import torch

        nodes: dict[tuple[int, ...], int] = {}
        for cand in candidates:
            for i in range(1, len(cand)):
                nodes.setdefault(tuple(cand[:i]), len(nodes))
        self.order = sorted(nodes, key=len)  # ancestors before descendants
        index = {prefix: i for i, prefix in enumerate(self.order)}
        n = len(self.order)
        self.tokens = torch.tensor([prefix[-1] for prefix in self.order], dtype=torch.long)
        self.depths = torch.tensor([len(prefix) for prefix in self.order], dtype=torch.long)
        self.ancestors = torch.zeros((n, n), dtype=torch.bool)
        for prefix, i in index.items():
            for k in range(1, len(prefix) + 1):
                self.ancestors[i, index[prefix[:k]]] = True
        longest = max(len(c) for c in candidates) - 1
        self.first = torch.tensor([c[0] for c in candidates], dtype=torch.long)
        # Candidate c's token i+1 is read at node c[:i+1]; unused slots are masked out.
        self.parents = torch.zeros((len(candidates), longest), dtype=torch.long)
        self.nexts = torch.zeros((len(candidates), longest), dtype=torch.long)
        self.used = torch.zeros((len(candidates), longest))
        for row, cand in enumerate(candidates):
            for i in range(1, len(cand)):
                self.parents[row, i - 1] = index[tuple(cand[:i])]
                self.nexts[row, i - 1] = cand[i]
                self.used[row, i - 1] = 1.0
