"""A stub OpenAI-compatible HTTP server on 127.0.0.1 for tests: the real ``openai`` SDK talks
to it through ``base_url``. A handler function turns each request body into a reply body."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# status (0: reset the connection), body (bytes are sent as they are), headers
Reply = tuple[int, dict[str, Any] | bytes, dict[str, str]]


def chat_completion(content: str, *, finish_reason: str = "stop", model: str = "stub") -> dict:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # many clients connect at once; the default backlog is 5
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-request (the crash tests do it on purpose) is not a stub error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class StubServer:
    def __init__(self, handler: Callable[[str, dict[str, Any]], Reply], latency_s: float = 0.0):
        self.handler = handler
        self.latency_s = latency_s
        self.requests: list[dict[str, Any]] = []
        self.api_keys: list[str] = []  # what the client sent as its key, request by request
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real API servers do

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if len(raw) < length:  # the client died mid-request: nothing was asked
                    self.close_connection = True
                    return
                body = json.loads(raw or b"{}")
                key = self.headers.get("x-api-key") or self.headers.get("Authorization", "")
                with stub._lock:
                    stub.requests.append(body)
                    stub.api_keys.append(key.removeprefix("Bearer "))
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    if stub.latency_s:
                        time.sleep(stub.latency_s)
                    status, reply, headers = stub.handler(self.path, body)
                finally:
                    with stub._lock:
                        stub.in_flight -= 1
                if status == 0:  # drop the connection without a reply
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                payload = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def root_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def logprob_completion(top: list[tuple[str, float]], *, model: str = "stub") -> dict:
    """A one-token chat completion carrying ``top`` as its top logprobs, as OpenAI sends."""
    entries = [
        {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []} for t, lp in top
    ]
    body = chat_completion(top[0][0] if top else "", finish_reason="length", model=model)
    body["choices"][0]["logprobs"] = {
        "content": [{**entries[0], "top_logprobs": entries}] if entries else [],
        "refusal": None,
    }
    return body


def anthropic_message(text: str, *, model: str = "claude-stub") -> dict:
    return {
        "id": "msg_stub",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1},
    }
