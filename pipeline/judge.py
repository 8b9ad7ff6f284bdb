"""Step 3 of the method: an LLM scores every answer 0-100, for the trait and for coherence.

Judges, chosen by ``--judge KIND:MODEL``:
- ``openai:MODEL``: one token with the top-20 logprobs; score = sum(p*n)/sum(p) over tokens
  that are integers 0..100, no score when that mass is under 0.25. ``--base-url`` points it
  at any OpenAI-compatible server.
- ``anthropic:MODEL``: no logprobs, so the number is read from a short text answer
  (REFUSAL gives no score); ``samples`` > 1 averages k answers at temperature 1.
- ``local:MODEL``: the exact probability of every complete answer "0".."100" and "REFUSAL",
  scored in one pass over the prompt's KV cache, so multi-token numbers are right for any
  tokenizer. Judgments in flight together are scored together: one forward for a batch of
  prompts, their shared prefix (the judge template's text) computed once. A small model
  such as smollm2 is a smoke-test judge only.

API keys come only from the environment and are never stored.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from db import PersonaError
from db.traits import fill_judge_template

# Tokens (prompt tails and candidate nodes, summed over rows) in one batched forward of a
# local judge: a GPU takes many judgments at once; on a CPU larger batches stop paying.
LOCAL_BATCH_TOKENS_GPU = 65536
LOCAL_BATCH_TOKENS_CPU = 4096

MIN_LOGPROB_MASS = 0.25
RETRY_ATTEMPTS = 6
# Requests in a row that could not connect before a judging job takes the server for down.
CONNECT_FAILURES_LIMIT = 20
RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0

# The rules come before the question and answer, so every coherence judgment shares them as
# a cacheable prefix (a local judge reuses its KV cache; APIs cache prompt prefixes too).
COHERENCE_PROMPT = """You are rating how coherent an AI assistant's answer is. Judge coherence \
only: whether the answer is well-formed language that hangs together and addresses the \
question. Whether it is correct, kind, safe or agreeable does not matter here.

Score on this scale:
- 0: not valid language at all (gibberish, endless repetition, random symbols).
- 50: rambling or partly confused, but some of it makes sense.
- 100: clear, fluent and on topic.

Reply with a single integer from 0 to 100 and nothing else.

The question the assistant was given:
<<<QUESTION
{question}
QUESTION>>>

The assistant's answer:
<<<ANSWER
{answer}
ANSWER>>>

Your rating (an integer from 0 to 100):"""

# Dollars per million tokens (input, output); ``--prices FILE.json`` overrides or extends.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-mini-2025-04-14": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o-mini": (0.15, 0.60),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "claude-opus-4-1": (15.00, 75.00),
}


@dataclass
class JudgeResult:
    score: float | None
    evidence: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    cost: float = 0.0
    error: str | None = None  # set when the judgment failed (retried on a later run)


class JudgeFatalError(PersonaError):
    """The judge refused the request itself (bad key, unknown model...): stop the job."""


class RetryableReply(Exception):
    """A reply we could not use but another try might (malformed body, no logprobs)."""


# ---- aggregation ------------------------------------------------------------------------------
_INTEGER = re.compile(r"^\d{1,3}$")


def number_token(token: str) -> int | None:
    """The integer 0..100 a token stands for, or None."""
    text = token.strip()
    if _INTEGER.match(text) and int(text) <= 100:
        return int(text)
    return None


def aggregate_logprobs(top: list[tuple[str, float]]) -> tuple[float | None, float]:
    """(score, mass) from one token's top logprobs: the probability-weighted mean of the
    integer tokens 0..100, or None when they hold under 0.25 of the probability."""
    mass = 0.0
    weighted = 0.0
    for token, logprob in top:
        value = number_token(token)
        if value is None or not math.isfinite(logprob):
            continue
        # A logprob is at most 0; a server's rounding can put it just above, and anything
        # larger would overflow exp(). Either way the token's probability is at most 1.
        p = math.exp(min(logprob, 0.0))
        mass += p
        weighted += p * value
    if mass < MIN_LOGPROB_MASS:
        return None, mass
    # Rounding can put the mean a hair past 100 (all mass on "100" and " 100"), which the
    # judgments table's CHECK (score <= 100) would reject.
    return min(weighted / mass, 100.0), mass


_REFUSAL = re.compile(r"\bREFUSAL\b", re.IGNORECASE)
_FIRST_INT = re.compile(r"(?<![\d.])(\d{1,3})(?![\d.])")


def parse_score_text(text: str) -> float | None:
    """A number 0..100 from a short text answer; None for REFUSAL. Anything else raises
    ``RetryableReply``."""
    text = text or ""
    if _REFUSAL.search(text):
        return None
    # A number right after "-" is negative, so off the scale: "-5" must not read as 5.
    match = next(
        (m for m in _FIRST_INT.finditer(text) if text[m.start() - 1 : m.start()] != "-"), None
    )
    if match and int(match.group(1)) <= 100:
        return float(match.group(1))
    raise RetryableReply(f"no score in the judge's answer {text[:60]!r}")


# ---- judges -----------------------------------------------------------------------------------
class Judge(ABC):
    spec: str  # "kind:model", recorded on every judgment

    async def score(self, template: str, question: str, answer: str) -> JudgeResult:
        return await self.score_prompt(fill_judge_template(template, question, answer))

    @abstractmethod
    async def score_prompt(self, prompt: str) -> JudgeResult: ...

    async def aclose(self) -> None:
        return None


def load_prices(path: str | None) -> dict[str, tuple[float, float]]:
    prices = dict(DEFAULT_PRICES)
    if path:
        import json
        from pathlib import Path

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            prices.update({k: (float(v[0]), float(v[1])) for k, v in data.items()})
        except (OSError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            # KeyError: a nested object where a [input, output] list belongs.
            raise PersonaError(
                f"--prices {path} must be a JSON object of model: [input, output] dollars per "
                f"million tokens ({type(exc).__name__})"
            ) from None
    return prices


def _cost(prices: dict[str, tuple[float, float]], model: str, tokens_in: int, tokens_out: int):
    rate = prices.get(model)
    if rate is None:
        return 0.0
    return (tokens_in * rate[0] + tokens_out * rate[1]) / 1e6


# Shown before asking, never billed: a rough English average, and each judge's max_tokens.
CHARS_PER_TOKEN = 4
OUTPUT_TOKENS = {"openai": 1, "anthropic": 8}


def estimate_cost(
    spec: str, prompts: list[str], *, prices: dict[str, tuple[float, float]], samples: int = 1
) -> float | None:
    """Dollars that asking ``prompts`` of the judge ``spec`` would cost at most, from the
    price table; 0 for a local judge, None for a model with no price."""
    kind, _, model = spec.partition(":")
    if kind not in OUTPUT_TOKENS:
        return 0.0
    if model not in prices:
        return None
    repeats = samples if kind == "anthropic" else 1
    tokens_in = repeats * sum(len(p) // CHARS_PER_TOKEN + 1 for p in prompts)
    return _cost(prices, model, tokens_in, repeats * len(prompts) * OUTPUT_TOKENS[kind])


def api_key(variable: str, base_url: str | None) -> str:
    """An API key from the environment only; a local server (``base_url``) takes any."""
    key = os.environ.get(variable)
    if key:
        return key
    if base_url:
        return "not-needed"  # local OpenAI-compatible servers take any key
    raise PersonaError(
        f"{variable} is not set; export it (keys are read only from the environment)"
    )


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class ConnectionBreaker:
    """Counts requests in a row that could not connect at all (not timeouts: a slow server
    is alive). Past ``limit`` the server is taken for down and the job stops with one line,
    instead of retrying every judgment with backoff for minutes."""

    def __init__(self, where: str | None, limit: int = CONNECT_FAILURES_LIMIT) -> None:
        self.where = where or "the API"
        self.limit = limit
        self.in_a_row = 0

    def ok(self) -> None:
        self.in_a_row = 0

    def failed(self, exc: BaseException, what: str) -> None:
        if type(exc).__name__ not in _CONNECT_ERRORS:
            return
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise JudgeFatalError(
                f"the {what} at {self.where} cannot be reached ({self.in_a_row} requests in a "
                f"row failed to connect: {type(exc).__name__}); start it, or rerun with "
                "--base-url pointing at a live one (the job resumes where it stopped)"
            )


async def call_with_retries(call, *, what: str, breaker: ConnectionBreaker | None = None) -> Any:
    """Run ``call()`` with exponential backoff and jitter on rate limits, server errors,
    timeouts, dropped connections and unusable replies, honouring Retry-After. A client
    error other than 408/409/429 raises ``JudgeFatalError``, and so does ``breaker`` once
    too many requests in a row could not connect; retries used up return the last reason
    as ``RetryableReply``."""
    last = "no attempt"
    for attempt in range(RETRY_ATTEMPTS):
        try:
            result = await call()
            if breaker is not None:
                breaker.ok()
            return result
        except RetryableReply as exc:
            last = str(exc)
            delay = None
        except Exception as exc:  # the SDKs' error classes, sorted by what they say
            status = getattr(exc, "status_code", None)
            if status is not None and 400 <= status < 500 and status not in (408, 409, 429):
                raise JudgeFatalError(
                    f"the {what} answered {status}: {api_error_text(exc)}"
                ) from None
            if status is not None:
                last = f"HTTP {status}"
            elif _is_one_of(exc, _TRANSPORT_ERRORS):
                last = type(exc).__name__
                if breaker is not None:
                    breaker.failed(exc, what)
            elif _is_one_of(exc, _BAD_BODY_ERRORS):
                last = f"unusable reply ({type(exc).__name__})"
            else:
                raise  # a bug of ours, not the server's: never retried silently
            delay = _retry_after(exc)
        if attempt + 1 < RETRY_ATTEMPTS:
            backoff = min(RETRY_MAX_S, RETRY_BASE_S * 2**attempt)
            await asyncio.sleep(delay if delay is not None else backoff * random.uniform(0.5, 1.0))
    raise RetryableReply(f"gave up after {RETRY_ATTEMPTS} tries: {last}")


# The SDKs' and httpx's names for a request that never got a reply.
_TRANSPORT_ERRORS = {
    "APIConnectionError",
    "APITimeoutError",
    "TimeoutException",
    "ConnectError",
    "ReadError",
    "RemoteProtocolError",
}


# A request that found nobody listening (by exact class: the SDKs' timeouts subclass these).
_CONNECT_ERRORS = {"APIConnectionError", "ConnectError"}


# Replies that arrived but could not be read.
_BAD_BODY_ERRORS = {"APIResponseValidationError", "JSONDecodeError", "ValidationError"}


def _is_one_of(exc: BaseException, names: set[str]) -> bool:
    return bool({c.__name__ for c in type(exc).__mro__} & names)


API_KEY_VARIABLES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")


def redact_keys(text: str) -> str:
    """``text`` with any API key of ours replaced: a proxy or server may echo the key in its
    error message, and messages are stored in job rows and logs."""
    for variable in API_KEY_VARIABLES:
        key = os.environ.get(variable)
        if key and len(key) >= 8:
            text = text.replace(key, f"[{variable}]")
    return text


def api_error_text(exc: BaseException) -> str:
    """The server's own error message, first line, from the SDK exception, keys redacted."""
    body = getattr(exc, "body", None)
    message = None
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        message = inner.get("message")
    message = redact_keys(str(message or getattr(exc, "message", "") or exc)).strip()
    return message.splitlines()[0][:200] if message else "no message"


class OpenAIJudge(Judge):
    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        prices: dict | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        from openai import AsyncOpenAI

        self.model = model
        self.spec = f"openai:{model}"
        self.prices = prices or DEFAULT_PRICES
        self.client = AsyncOpenAI(
            api_key=api_key("OPENAI_API_KEY", base_url),
            base_url=base_url,
            max_retries=0,  # call_with_retries owns retrying, so it can count and report
            timeout=timeout_s,
        )
        self.breaker = ConnectionBreaker(base_url or "api.openai.com")

    async def score_prompt(self, prompt: str) -> JudgeResult:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "seed": 0,
            "logprobs": True,
            "top_logprobs": 20,
        }

        async def call():
            # The SDK's documented raw post (auth, errors and timeouts as create() has them):
            # the typed create() spends a third of a request's CPU converting the params and
            # building response models, which caps one process near 400 requests/s.
            reply = await self.client.post("/chat/completions", body=body, cast_to=dict)
            try:
                top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                pairs = [(str(t["token"]), float(t["logprob"])) for t in top]
            except (KeyError, IndexError, TypeError, ValueError):
                raise RetryableReply("the reply has no logprobs") from None
            if not pairs:
                raise RetryableReply("the reply has no logprobs")
            return reply, pairs

        try:
            reply, pairs = await call_with_retries(call, what="OpenAI judge", breaker=self.breaker)
        except RetryableReply as exc:
            return JudgeResult(None, error=str(exc))
        score, mass = aggregate_logprobs(pairs)
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        try:
            tokens_in = int(usage.get("prompt_tokens") or 0)
            tokens_out = int(usage.get("completion_tokens") or 0)
        except (TypeError, ValueError):  # odd usage numbers cost the count, not the score
            tokens_in = tokens_out = 0
        return JudgeResult(
            score,
            evidence={"top_logprobs": pairs, "mass": round(mass, 6)},
            tokens=tokens_in + tokens_out,
            cost=_cost(self.prices, self.model, tokens_in, tokens_out),
        )

    async def aclose(self) -> None:
        await self.client.close()


class AnthropicJudge(Judge):
    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        prices: dict | None = None,
        samples: int = 1,
        timeout_s: float = 60.0,
    ) -> None:
        from anthropic import AsyncAnthropic

        if samples < 1:
            raise PersonaError(f"--samples must be at least 1 (got {samples})")
        self.model = model
        self.spec = f"anthropic:{model}" + (f"@k{samples}" if samples > 1 else "")
        self.samples = samples
        self.prices = prices or DEFAULT_PRICES
        self.breaker = ConnectionBreaker(base_url or "api.anthropic.com")
        self.client = AsyncAnthropic(
            api_key=api_key("ANTHROPIC_API_KEY", base_url),
            base_url=base_url,
            max_retries=0,
            timeout=timeout_s,
        )
        # One answer is read at temperature 0, k answers sampled at 1 and averaged. SDKs that
        # no longer take a temperature (newer models fix it) get none.
        takes_temperature = (
            "temperature" in inspect.signature(self.client.messages.create).parameters
        )
        self._sampling = {"temperature": 0.0 if samples == 1 else 1.0} if takes_temperature else {}

    async def _one(self, prompt: str) -> tuple[float | None, str, int, int]:
        async def call():
            reply = await self.client.messages.create(
                model=self.model,
                max_tokens=8,
                messages=[{"role": "user", "content": prompt}],
                **self._sampling,
            )
            text = "".join(getattr(b, "text", "") for b in reply.content)
            return parse_score_text(text), text, reply.usage

        score, text, usage = await call_with_retries(
            call, what="Anthropic judge", breaker=self.breaker
        )
        return score, text, int(usage.input_tokens or 0), int(usage.output_tokens or 0)

    async def score_prompt(self, prompt: str) -> JudgeResult:
        try:
            answers = [await self._one(prompt) for _ in range(self.samples)]
        except RetryableReply as exc:
            return JudgeResult(None, error=str(exc))
        numbers = [a[0] for a in answers if a[0] is not None]
        tokens_in = sum(a[2] for a in answers)
        tokens_out = sum(a[3] for a in answers)
        # A refusal in the majority of samples means no score.
        score = sum(numbers) / len(numbers) if len(numbers) * 2 > len(answers) else None
        return JudgeResult(
            score,
            evidence={"answers": [a[1] for a in answers]},
            tokens=tokens_in + tokens_out,
            cost=_cost(self.prices, self.model, tokens_in, tokens_out),
        )

    async def aclose(self) -> None:
        await self.client.close()


class LocalJudge(Judge):
    """Exact candidate probabilities from a local chat model (see the module docstring)."""

    CANDIDATES = [str(n) for n in range(101)] + ["REFUSAL"]

    def __init__(self, model: str, *, device: str | None = None) -> None:
        from pipeline.models import load_model

        self.spec = f"local:{model}"
        self.loaded = load_model(model, device=device)
        tok = self.loaded.tokenizer
        end = tok.eos_token_id
        self.candidate_ids = [
            list(tok(c, add_special_tokens=False)["input_ids"]) + [end] for c in self.CANDIDATES
        ]
        self._trie = _CandidateTrie(self.candidate_ids)
        on_gpu = self.loaded.device.type == "cuda"
        # Tokens one batched forward may hold (prompt tails and candidate nodes).
        self.batch_tokens = LOCAL_BATCH_TOKENS_GPU if on_gpu else LOCAL_BATCH_TOKENS_CPU
        self._waiting: list[tuple[str, asyncio.Future]] = []
        self._scorer: asyncio.Task | None = None
        self._prefix: tuple[list[int], Any] | None = None

    async def score_prompt(self, prompt: str) -> JudgeResult:
        """Queued; the prompts waiting when the device frees up are scored in one batch."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((prompt, future))
        if self._scorer is None or self._scorer.done():
            self._scorer = asyncio.ensure_future(self._score_waiting())
        return self.result_from_logprobs(await future)

    async def _score_waiting(self) -> None:
        while self._waiting:
            await asyncio.sleep(0)  # let every coroutine ready to ask join this batch
            batch = self._next_batch()
            try:
                prompts = [prompt for prompt, _ in batch]
                results = await asyncio.to_thread(self.candidate_logprobs_batch, prompts)
            except Exception as exc:  # every judgment of the batch fails with it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), logprobs in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(logprobs)

    def _next_batch(self) -> list[tuple[str, asyncio.Future]]:
        """The oldest waiting prompts, up to the token budget (at least one)."""
        batch, tokens = [], 0
        while self._waiting:
            cost = len(self._waiting[0][0]) // 3 + len(self._trie.order)  # ~3 chars a token
            if batch and tokens + cost > self.batch_tokens:
                break
            batch.append(self._waiting.pop(0))
            tokens += cost
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
        import torch

        from pipeline.chat import prompt_ids

        model = self.loaded.model
        device = self.loaded.device
        all_ids = [prompt_ids(self.loaded.tokenizer, None, p) for p in prompts]
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
            if cache is not None:
                cache.batch_repeat_interleave(b)
            kwargs = {self._cache_kw: cache} if cache is not None else {}
            out = model(
                tokens.to(device),
                position_ids=positions.to(device),
                attention_mask=allow.to(device),
                **kwargs,
            )
            logp = torch.log_softmax(out.logits.float(), -1)
            head = logp[:, width - 1]  # the last real tail token's next-token distribution
            step = logp[:, width:]
            on = head.device
            used = trie.used.to(on)
            picked = step[:, trie.parents.to(on), trie.nexts.to(on)]
            totals = head[:, trie.first.to(on)] + (picked * used).sum(-1)
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
            shared = next((i for i in range(shared) if ids[i] != first[i]), shared)
        if shared <= 0:
            return 0, None
        prefix = first[:shared]
        if self._prefix is None or self._prefix[0] != prefix:
            cache = DynamicCache()
            ids = torch.tensor([prefix], device=self.loaded.device)
            positions = torch.arange(shared, device=self.loaded.device)[None]
            self.loaded.model(
                ids, position_ids=positions, use_cache=True, **{self._cache_kw: cache}
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


JUDGE_KINDS = ("openai", "anthropic", "local")


def check_judge_spec(spec: str, option: str = "--judge") -> None:
    """KIND:MODEL with a known kind and a model: checked before any job row is written."""
    kind, _, model = spec.partition(":")
    if not model.strip():
        raise PersonaError(
            f"{option} {spec!r} must be KIND:MODEL, e.g. openai:gpt-4.1-mini-2025-04-14, "
            "anthropic:claude-haiku-4-5 or local:smollm2"
        )
    if kind not in JUDGE_KINDS:
        raise PersonaError(f"{option} kind '{kind}' is unknown; use openai, anthropic or local")


def make_judge(
    spec: str,
    *,
    base_url: str | None = None,
    prices_path: str | None = None,
    samples: int = 1,
    device: str | None = None,
    timeout_s: float = 60.0,
) -> Judge:
    check_judge_spec(spec)
    kind, _, model = spec.partition(":")
    prices = load_prices(prices_path)
    if kind == "openai":
        return OpenAIJudge(model, base_url=base_url, prices=prices, timeout_s=timeout_s)
    if kind == "anthropic":
        return AnthropicJudge(
            model, base_url=base_url, prices=prices, samples=samples, timeout_s=timeout_s
        )
    if kind == "local":
        return LocalJudge(model, device=device)
    raise PersonaError(f"--judge kind '{kind}' is unknown; use openai, anthropic or local")
