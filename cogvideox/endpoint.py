"""The prompt enhancer's endpoint backend: any OpenAI-compatible `/chat/completions` (OpenAI, GLM, vLLM,
Ollama, llama.cpp server).

One enhance call has a deadline for everything it sends (a socket still reading when it passes is hung up) and
holds one of a few slots, so a slow server holds only its own caller. `EnhanceError`, the user-facing failure
both backends raise, lives here so that `enhance.py` imports this module and not the other way round.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_ENDPOINT_MODEL = "gpt-4o-mini"
DEFAULT_TIMEOUT_S = 30.0  # one whole enhance call against an endpoint: retries and the follow-up included
DEFAULT_CONCURRENCY = 4  # endpoint calls in flight at once
BUSY_WAIT_S = 2.0  # how long a call waits for a free slot before the user is told to try again
MAX_RESPONSE_BYTES = 2**20  # a rewrite is a few kB; a server sending more is broken
MAX_NEW_TOKENS = 320  # ~240 English words: room for a full paragraph, bounded when a model rambles
# `max_completion_tokens` for reasoning models: their hidden reasoning counts against it.
REASONING_TOKENS = 4096

Message = dict[str, str]


class EnhanceError(RuntimeError):
    """The rewrite failed; the message is meant for the user, whose prompt stays as it was."""

    elapsed_s: float = 0.0  # set by `PromptEnhancer.enhance`: how long the user waited for this


class _Transient(EnhanceError):
    """A failure worth one more try if time remains: no connection, a dropped one, HTTP 408/409/429/5xx."""


class _Unsupported(EnhanceError):
    """HTTP 400 naming a sampling parameter the model refuses (OpenAI's reasoning models refuse `max_tokens` and
    any `temperature` but 1)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class _HangUp:
    """Shuts a socket down when `seconds` have passed, which ends a read blocked on it at once.

    A socket timeout bounds each read, not the answer: a server that sends a byte a second would hold a
    caller for minutes.
    """

    def __init__(self, seconds: float):
        self.fired = False  # the deadline passed before `cancel`: what was read may be cut short
        self._sock: socket.socket | None = None
        self._done = False
        # Once `cancel` returns the socket is never shut down: its file descriptor may be reused by then.
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shutdown()

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._done, self._sock = True, None

    def _fire(self) -> None:
        with self._lock:
            if not self._done:
                self.fired = True
                self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is None:
            return
        # The plain socket's shutdown: TLS's own would drop its state under the reading thread.
        with suppress(OSError):  # already closed by the other side
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)


class EndpointBackend:
    """An OpenAI-compatible chat endpoint: one POST per request, one retry on transient failures if time allows.

    `timeout` bounds one whole `PromptEnhancer.enhance` call, which holds one of `concurrency` slots; a call
    that finds them all taken for `busy_wait_s` is told to try again.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        model: str = DEFAULT_ENDPOINT_MODEL,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry_delay_s: float = 1.0,
        concurrency: int = DEFAULT_CONCURRENCY,
        busy_wait_s: float = BUSY_WAIT_S,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        target = urlparse(self.url)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise ValueError(f"OPENAI_BASE_URL must be an http:// or https:// URL, got {base_url!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.host = target.netloc
        self._address = (target.hostname, target.port or (443 if target.scheme == "https" else 80))
        self._path = target.path + (f"?{target.query}" if target.query else "")
        self._tls = ssl.create_default_context() if target.scheme == "https" else None
        self.model, self.api_key, self.timeout, self.retry_delay_s = model, api_key, timeout, retry_delay_s
        self.concurrency, self.busy_wait_s = concurrency, busy_wait_s
        self._slots = threading.BoundedSemaphore(concurrency)
        # Adapted to what the model accepts (see `_post`).
        self.sampling = {"temperature": 0.7, "max_tokens": MAX_NEW_TOKENS}

    @property
    def name(self) -> str:
        return f"{self.model} via {self.host}"

    @contextmanager
    def slot(self, deadline: float) -> Iterator[None]:
        """Hold one of the `concurrency` slots; EnhanceError if none frees up soon (or before `deadline`)."""
        if not self._slots.acquire(timeout=max(0.0, min(self.busy_wait_s, deadline - time.monotonic()))):
            raise EnhanceError("the prompt enhancer is busy with other requests; try again in a moment")
        try:
            yield
        finally:
            self._slots.release()

    def chat(self, messages: list[Message], deadline: float | None = None) -> str:
        """The model's answer by `deadline`, a `time.monotonic()` time (default: `timeout` from now)."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        try:
            return self._post(messages, deadline)
        except _Transient as e:
            if deadline - time.monotonic() <= self.retry_delay_s:
                raise EnhanceError(f"{e} (no time left to try again)") from e
            time.sleep(self.retry_delay_s)
        try:
            return self._post(messages, deadline)
        except _Transient as e:
            raise EnhanceError(f"{e} (tried twice)") from e

    def release(self) -> None:
        pass  # nothing held locally

    def _post(self, messages: list[Message], deadline: float) -> str:
        while True:  # ends: each refused parameter is dropped or renamed once, and only these two are refused
            try:
                return self._send(messages, deadline)
            except _Unsupported as e:
                self.sampling.pop(e.param, None)  # another call may have dropped it already
                if e.param == "max_tokens":  # reasoning models spend this budget on hidden reasoning too
                    self.sampling["max_completion_tokens"] = REASONING_TOKENS

    def _send(self, messages: list[Message], deadline: float) -> str:
        sampling = dict(self.sampling)
        body = json.dumps({"model": self.model, "messages": messages, **sampling}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        status, reason, raw = self._exchange(body, headers, deadline)
        if not 200 <= status < 300:
            raise self._http_error(status, reason, raw, sampling)
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise EnhanceError(f"{self.host} sent an unexpected answer: {raw[:200]!r}") from e
        # Some servers send content parts; one whose text is not a string (a number) is a broken answer.
        if isinstance(content, list):
            texts = [part.get("text", "") for part in content if isinstance(part, dict)]
            if not all(isinstance(text, str) for text in texts):
                raise EnhanceError(f"{self.host} sent an unexpected answer: {raw[:200]!r}")
            content = "".join(texts)
        if not isinstance(content, str):
            raise EnhanceError(f"{self.host} sent no text (the model may have refused)")
        return content

    def _exchange(self, body: bytes, headers: dict[str, str], deadline: float) -> tuple[int, str, bytes]:
        """POST `body`: the answer's status, reason and body, its connection hung up at `deadline`."""
        late = EnhanceError(f"{self.host} did not finish answering within {self.timeout:g} s")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise late
        hang_up = _HangUp(remaining)
        if self._tls is None:
            conn = http.client.HTTPConnection(*self._address)
        else:
            conn = http.client.HTTPSConnection(*self._address, context=self._tls)
        connected, response = False, None
        try:
            # Our own socket, so the hang-up covers the TLS handshake too (name lookup has the resolver's limits).
            sock = socket.create_connection(self._address, timeout=remaining)
            if self._tls is not None:
                host = self._address[0]
                sock = self._tls.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
            conn.sock = sock
            hang_up.watch(sock)
            if self._tls is not None:
                sock.do_handshake()
            connected = True
            conn.request("POST", self._path, body, headers)
            response = conn.getresponse()
            raw = response.read(MAX_RESPONSE_BYTES + 1)  # never more than the cap in memory
        except (OSError, http.client.HTTPException) as e:
            # Each operation's own timeout is at least what remained, so it too means the deadline passed.
            if hang_up.fired or isinstance(e, TimeoutError):
                raise late from e
            if not connected:
                raise _Transient(f"could not connect to {self.url} ({e})") from e
            raise _Transient(f"the connection to {self.host} failed ({e})") from e
        finally:
            hang_up.cancel()
            if response is not None:
                response.close()
            conn.close()
        if hang_up.fired:  # a hung-up socket reads as the end of the answer
            raise late
        if len(raw) > MAX_RESPONSE_BYTES:
            raise EnhanceError(f"{self.host} sent an answer over {MAX_RESPONSE_BYTES // 2**20} MiB")
        return response.status, response.reason, raw

    def _http_error(self, status: int, reason: str, raw: bytes, sent: Mapping[str, object]) -> EnhanceError:
        detail, param = raw[:1000].decode("utf-8", "replace"), None
        try:
            error = json.loads(detail)["error"]
            if isinstance(error, dict):
                param = error.get("param")
            detail = error["message"] if isinstance(error, dict) else str(error)
        except (ValueError, KeyError, TypeError):
            pass
        message = f"{self.host} answered HTTP {status}: {detail.strip() or reason}"
        if status == 400:
            refused = [
                p for p in ("max_tokens", "temperature") if p in sent and (p == param or f"'{p}'" in detail)
            ]
            if refused:
                return _Unsupported(message, refused[0])
        if status in (401, 403):
            return EnhanceError(f"{message}; check OPENAI_API_KEY")
        if status == 404:
            return EnhanceError(f"{message}; check OPENAI_BASE_URL and PROMPT_ENHANCER_MODEL")
        if status in (408, 409, 429) or status >= 500:
            return _Transient(message)
        return EnhanceError(message)
