"""The judges, chosen by ``--judge KIND:MODEL``, and what asking them costs.

- ``openai:MODEL``: one token with the top-20 logprobs; score = sum(p*n)/sum(p) over tokens
  that are integers 0..100, no score when that mass is under 0.25. ``--base-url`` points it
  at any OpenAI-compatible server.
- ``anthropic:MODEL``: no logprobs, so the number is read from a short text answer
  (REFUSAL gives no score); ``samples`` > 1 averages k answers at temperature 1.
- ``local:MODEL``: exact candidate probabilities from a local chat model
  (``pipeline.local_judge``).

API keys come only from the environment and are never stored.
"""

from __future__ import annotations

import inspect

from db import PersonaError
from pipeline.api_clients import (
    ConnectionBreaker,
    RetryableReply,
    api_key,
    call_with_retries,
)
from pipeline.judge_scores import Judge, JudgeResult, aggregate_logprobs, parse_score_text

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


def load_prices(path: str | None) -> dict[str, tuple[float, float]]:
    prices = dict(DEFAULT_PRICES)
    if path:
        import json
        from pathlib import Path

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            prices.update({k: (float(v[0]), float(v[1])) for k, v in data.items()})
        except (
            OSError,
            ValueError,
            TypeError,
            IndexError,
            KeyError,
            AttributeError,
            RecursionError,
        ) as exc:
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
    if kind == "local":
        from pipeline.models import split_precision

        split_precision(model)  # local:MODEL@DTYPE names a known precision


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
        from pipeline.local_judge import LocalJudge  # loads torch: only when asked for

        return LocalJudge(model, device=device)
    raise PersonaError(f"--judge kind '{kind}' is unknown; use openai, anthropic or local")
