"""Calls to the model APIs (OpenAI, Anthropic and compatible servers), shared by the judge
backends, trait authoring and API generation: keys from the environment only, retries with
backoff, a breaker for a server nobody answers at, and error text with the keys redacted
(it is stored in job rows and logs)."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

from db import PersonaError

RETRY_ATTEMPTS = 6
# Requests in a row that could not connect before a judging job takes the server for down.
CONNECT_FAILURES_LIMIT = 20
RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0


class JudgeFatalError(PersonaError):
    """The judge refused the request itself (bad key, unknown model...): stop the job."""


class RetryableReply(Exception):
    """A reply we could not use but another try might (malformed body, no logprobs)."""


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
