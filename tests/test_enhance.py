"""Prompt enhancer: a fake OpenAI-compatible server on loopback drives the endpoint backend, a tiny random
chat model drives the local one, and a tiny sentencepiece T5 tokenizer counts tokens."""

from __future__ import annotations

import html
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, T5Tokenizer

from cogvideox import enhance
from cogvideox.enhance import (
    EXAMPLES,
    EndpointBackend,
    EnhanceError,
    LocalBackend,
    PromptEnhancer,
    clean_rewrite,
    trim_to_budget,
)
from webapp import serve

RELEASE_PROMPTS = [
    example["prompt"]
    for example in json.loads((Path(__file__).parents[1] / "examples" / "prompts.json").read_text())
    if not example.get("short")
]
GOOD = RELEASE_PROMPTS[3]  # the butterfly prompt: within budget
LONG = " ".join(RELEASE_PROMPTS[:3])  # three release prompts: well over 226 tokens


@pytest.fixture(scope="module")
def count_tokens(tmp_path_factory):
    """A real (tiny) T5 sentencepiece tokenizer: counts include the closing </s>, like text.count_tokens.

    Its 400 pieces split English ~1.8 tokens a word where T5's 32k split ~1.3, so budgets bind sooner here.
    """
    folder = tmp_path_factory.mktemp("t5")
    corpus = RELEASE_PROMPTS + [rewrite for _, rewrite in EXAMPLES]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 3),
        model_prefix=str(folder / "spiece"),
        vocab_size=400,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    tokenizer = T5Tokenizer.from_pretrained(folder, extra_ids=0)
    return lambda text: len(tokenizer(text).input_ids)


def test_counter_and_fixtures_are_meaningful(count_tokens):
    assert count_tokens(GOOD) < enhance.MAX_TOKENS < count_tokens(LONG)
    assert count_tokens("a cat") < count_tokens("a cat on a roof")


# --- a fake OpenAI-compatible server ---------------------------------------------------------------------


class FakeServer:
    """Records every request; answers each with the next queued reply, or with `default` once none is queued.

    A reply is (status, payload, delay_s), or a function of the handler and the request body that writes the
    whole answer itself (see `trickling` and `endless`).
    """

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.requests: list[dict] = []
        self.replies: list = []
        self.default = (599, {}, 0.0)
        self.stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": self.headers, "body": body})
                with suppress(OSError):  # the client gave up and hung up
                    fake.answer(self, body, fake.replies.pop(0) if fake.replies else fake.default)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def answer(self, handler: BaseHTTPRequestHandler, body: dict, answer) -> None:
        if callable(answer):
            return answer(handler, body)
        status, payload, delay = answer
        self.stop.wait(delay)
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(text: str, delay: float = 0.0) -> tuple[int, dict, float]:
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}, delay


def error(status: int, message: str) -> tuple[int, dict, float]:
    return status, {"error": {"message": message, "type": "server_error"}}, 0.0


def trickling(server: FakeServer, text: str, every_s: float, sent: list[float] | None = None):
    """An answer whose headers come at once and whose body comes one byte every `every_s` seconds.

    `sent` gets the time of each byte: a per-read socket timeout longer than the gaps never fires.
    """
    data = json.dumps(reply(text)[1]).encode()

    def answer(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        for i in range(len(data)):
            handler.wfile.write(data[i : i + 1])  # raises once the client has hung up
            if sent is not None:
                sent.append(time.monotonic())
            if server.stop.wait(every_s):
                return

    return answer


def endless(server: FakeServer, offered: int, declared: bool):
    """An answer of `offered` bytes of junk, its length declared in the headers or not."""

    def answer(handler, body):
        handler.send_response(200)
        if declared:
            handler.send_header("Content-Length", str(offered))
        handler.end_headers()
        chunk = b"x" * 2**16
        for _ in range(offered // len(chunk)):
            if server.stop.is_set():
                return
            handler.wfile.write(chunk)

    return answer


def by_idea(server: FakeServer, slow, fast):
    """Answers an idea that mentions "slow" with `slow`, any other with `fast`."""

    def answer(handler, body):
        slow_idea = "slow" in body["messages"][-1]["content"]
        server.answer(handler, body, slow if slow_idea else fast)

    return answer


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


def endpoint_enhancer(server, count_tokens, **env) -> PromptEnhancer:
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": server.url,
        "PROMPT_ENHANCER_MODEL": "glm-4-test",
        "PROMPT_ENHANCER_TIMEOUT": "0.5",
        **env,
    }
    enhancer = PromptEnhancer.from_env(count_tokens, env=env)
    enhancer.backend.retry_delay_s = 0.0
    return enhancer


def test_endpoint_request_and_cleaned_answer(server, count_tokens):
    server.replies = [
        reply(f'Sure! Here is the enhanced prompt:\n\n"**{GOOD}**"\n\nLet me know if you want changes.')
    ]
    enhancer = endpoint_enhancer(server, count_tokens)
    assert enhancer.available and enhancer.unavailable_reason == ""
    assert enhancer.backend_name == f"glm-4-test via 127.0.0.1:{server.httpd.server_address[1]}"

    result = enhancer.enhance("  a fox in the snow ")

    assert (result.original, result.text, result.backend) == (
        "  a fox in the snow ",
        GOOD,
        enhancer.backend_name,
    )
    assert result.tokens == count_tokens(GOOD) and not result.trimmed and 0 < result.elapsed_s < 0.5
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "glm-4-test"
    messages = body["messages"]
    assert messages[0]["role"] == "system" and "present tense" in messages[0]["content"]
    assert messages[-1]["role"] == "user" and "Video idea: a fox in the snow" in messages[-1]["content"]
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * len(EXAMPLES)


def test_non_english_idea_is_sent_with_the_instruction_to_answer_in_english(server, count_tokens):
    idea = "一只橘猫在雨后的屋顶上散步"
    server.replies = [reply(GOOD)]
    endpoint_enhancer(server, count_tokens).enhance(idea)
    messages = server.requests[0]["body"]["messages"]
    assert idea in messages[-1]["content"] and "English" in messages[-1]["content"]
    assert "in English, whatever language" in messages[0]["content"]


def test_keyless_local_server_gets_no_authorization_header(server, count_tokens):
    server.replies = [reply(GOOD)]
    enhancer = PromptEnhancer.from_env(count_tokens, env={"OPENAI_BASE_URL": server.url})
    assert enhancer.backend.model == enhance.DEFAULT_ENDPOINT_MODEL
    assert enhancer.enhance("a fox").text == GOOD
    assert "Authorization" not in server.requests[0]["headers"]


def test_server_error_then_success_is_retried(server, count_tokens):
    server.replies = [error(500, "overloaded"), reply(GOOD)]
    assert endpoint_enhancer(server, count_tokens).enhance("a fox").text == GOOD
    assert len(server.requests) == 2


def test_reasoning_model_refusing_sampling_parameters_is_adapted_to(server, count_tokens):
    # OpenAI's o-series / gpt-5 answers, verbatim in form: 400 naming the parameter in `param` and the message.
    def refused(param: str, message: str) -> tuple[int, dict, float]:
        body = {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": "unsupported_parameter",
        }
        return 400, {"error": body}, 0.0

    server.replies = [
        refused(
            "max_tokens",
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
        ),
        refused(
            "temperature",
            "Unsupported value: 'temperature' does not support 0.7 with this model. "
            "Only the default (1) value is supported.",
        ),
        reply(GOOD),
        reply(GOOD),
    ]
    enhancer = endpoint_enhancer(server, count_tokens, PROMPT_ENHANCER_MODEL="gpt-5-test")
    assert enhancer.enhance("a fox").text == GOOD
    bodies = [r["body"] for r in server.requests]
    assert [sorted(set(b) - {"model", "messages"}) for b in bodies] == [
        ["max_tokens", "temperature"],
        ["max_completion_tokens", "temperature"],
        ["max_completion_tokens"],
    ]
    assert bodies[-1]["max_completion_tokens"] == enhance.REASONING_TOKENS
    assert enhancer.enhance("an owl").text == GOOD  # remembered: one request
    assert len(server.requests) == 4 and set(server.requests[-1]["body"]) == {
        "model",
        "messages",
        "max_completion_tokens",
    }


def test_other_bad_requests_fail_at_once(server, count_tokens):
    server.replies = [error(400, "Invalid 'messages': too long"), reply(GOOD)]
    with pytest.raises(EnhanceError, match=r"HTTP 400: Invalid 'messages': too long"):
        endpoint_enhancer(server, count_tokens).enhance("a fox")
    assert len(server.requests) == 1


def test_two_errors_raise_and_leave_the_prompt(server, count_tokens):
    server.replies = [error(503, "overloaded"), error(500, "still overloaded")]
    prompt = "a fox"
    with pytest.raises(EnhanceError, match=r"HTTP 500: still overloaded \(tried twice\)"):
        prompt = endpoint_enhancer(server, count_tokens).enhance(prompt).text
    assert prompt == "a fox" and len(server.requests) == 2


def test_bad_key_is_not_retried(server, count_tokens):
    server.replies = [error(401, "Incorrect API key provided")]
    with pytest.raises(EnhanceError, match="HTTP 401: Incorrect API key provided; check OPENAI_API_KEY"):
        endpoint_enhancer(server, count_tokens).enhance("a fox")
    assert len(server.requests) == 1


def test_silent_server_times_out_once_for_the_whole_call(server, count_tokens):
    server.replies = [reply(GOOD, delay=3.0), reply(GOOD, delay=3.0)]
    start = time.monotonic()
    with pytest.raises(EnhanceError, match=r"did not finish answering within 0.5 s$") as raised:
        endpoint_enhancer(server, count_tokens).enhance("a fox")
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 1.5 and raised.value.elapsed_s == pytest.approx(elapsed, abs=0.1)
    assert len(server.requests) == 1  # no time left for a second try


def test_trickling_answer_is_cut_at_the_deadline(server, count_tokens):
    sent = []
    server.replies = [trickling(server, GOOD, every_s=0.2, sent=sent)]  # ~2 minutes for the whole answer
    enhancer = endpoint_enhancer(server, count_tokens, PROMPT_ENHANCER_TIMEOUT="1.5")
    start = time.monotonic()
    late = r"^127\.0\.0\.1:\d+ did not finish answering within 1\.5 s$"
    with pytest.raises(EnhanceError, match=late) as raised:
        enhancer.enhance("a fox")
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed < 3.0 and raised.value.elapsed_s == pytest.approx(elapsed, abs=0.1)
    # A timeout per read never fires here: the bytes kept coming, far less than 1.5 s apart.
    gaps = [b - a for a, b in pairwise(sent)]
    assert len(sent) >= 5 and max(gaps) < 1.0
    assert len(server.requests) == 1


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """The fake server behind TLS, with a self-signed certificate for 127.0.0.1 that clients trust."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=127.0.0.1"
    subprocess.run(
        ["openssl", *command.split(), "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True,
        capture_output=True,
        timeout=30,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # what ssl.create_default_context() trusts
    fake = FakeServer(tls=context)
    yield fake
    fake.close()


def test_tls_endpoint_answers_and_is_cut_at_the_deadline(tls_server, count_tokens):
    tls_server.replies = [reply(GOOD), trickling(tls_server, GOOD, every_s=0.2)]
    enhancer = endpoint_enhancer(tls_server, count_tokens, PROMPT_ENHANCER_TIMEOUT="1")
    assert tls_server.url.startswith("https://") and enhancer.enhance("a fox").text == GOOD
    start = time.monotonic()
    with pytest.raises(EnhanceError, match=r"did not finish answering within 1 s$"):
        enhancer.enhance("a fox")
    assert time.monotonic() - start < 2.0 and len(tls_server.requests) == 2


def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


@pytest.mark.parametrize("limit", [1, 2])
def test_a_stuck_call_holds_only_its_own_slot(server, count_tokens, limit):
    server.default = by_idea(server, trickling(server, GOOD, every_s=0.2), reply(GOOD))
    enhancer = endpoint_enhancer(
        server, count_tokens, PROMPT_ENHANCER_TIMEOUT="1.5", PROMPT_ENHANCER_CONCURRENCY=str(limit)
    )
    enhancer.backend.busy_wait_s = 0.3  # well before the stuck call gives up
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(enhancer.enhance, "a slow fox")
        wait_for(lambda: len(server.requests) == 1)  # it holds a slot from before it sends
        start = time.monotonic()
        if limit == 1:
            with pytest.raises(EnhanceError, match=r"^the prompt enhancer is busy .*try again in a moment$"):
                enhancer.enhance("a quick owl")
        else:
            assert enhancer.enhance("a quick owl").text == GOOD
        assert time.monotonic() - start < 1.0 and not stuck.done()
        with pytest.raises(EnhanceError, match=r"did not finish answering within 1\.5 s"):
            stuck.result(timeout=5)
    assert len(server.requests) == limit  # a busy call sends nothing
    assert enhancer.enhance("a quick owl").text == GOOD  # the slot was given back


def test_a_call_waits_briefly_for_a_free_slot(server, count_tokens):
    server.default = by_idea(server, reply(GOOD, delay=0.3), reply(GOOD))
    enhancer = endpoint_enhancer(
        server, count_tokens, PROMPT_ENHANCER_TIMEOUT="2", PROMPT_ENHANCER_CONCURRENCY="1"
    )
    assert enhancer.backend.busy_wait_s == enhance.BUSY_WAIT_S > 0.3
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(enhancer.enhance, "a slow fox")
        wait_for(lambda: len(server.requests) == 1)
        assert enhancer.enhance("a quick owl").text == GOOD
        assert first.result(timeout=5).text == GOOD


def test_retries_only_within_the_deadline(server, count_tokens):
    server.default = error(503, "overloaded")
    enhancer = endpoint_enhancer(server, count_tokens, PROMPT_ENHANCER_TIMEOUT="1")
    enhancer.backend.retry_delay_s = 5.0  # longer than the whole budget: not worth waiting for
    start = time.monotonic()
    with pytest.raises(EnhanceError, match=r"HTTP 503: overloaded \(no time left to try again\)$"):
        enhancer.enhance("a fox")
    assert time.monotonic() - start < 0.5 and len(server.requests) == 1

    # Time for a second try, which gets what remains of the budget, not a budget of its own.
    server.replies = [error(503, "overloaded"), reply(GOOD, delay=3.0)]
    enhancer.backend.retry_delay_s = 0.5
    start = time.monotonic()
    with pytest.raises(EnhanceError, match=r"did not finish answering within 1 s$"):
        enhancer.enhance("a fox")
    assert time.monotonic() - start < 1.4 and len(server.requests) == 3  # a budget of its own: 1.5 s


def test_follow_up_cut_by_the_deadline_trims_the_first_answer(server, count_tokens):
    server.replies = [reply(LONG, delay=0.5), reply(GOOD, delay=3.0)]
    start = time.monotonic()
    result = endpoint_enhancer(server, count_tokens, PROMPT_ENHANCER_TIMEOUT="1").enhance("a toy ship")
    assert result.trimmed and LONG.startswith(result.text) and len(server.requests) == 2
    assert 1.0 <= result.elapsed_s <= time.monotonic() - start < 1.4  # a budget of its own: 1.5 s


@pytest.mark.parametrize("declared", [True, False])
def test_endless_answer_is_cut_at_the_cap(server, count_tokens, declared):
    offered = 16 * enhance.MAX_RESPONSE_BYTES
    server.default = endless(server, offered, declared)
    enhancer = endpoint_enhancer(server, count_tokens, PROMPT_ENHANCER_TIMEOUT="5")
    tracemalloc.start()
    try:
        with pytest.raises(EnhanceError, match=r"sent an answer over 1 MiB$"):
            enhancer.enhance("a fox")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * enhance.MAX_RESPONSE_BYTES  # read up to the cap, not the 16 MiB on offer
    assert len(server.requests) == 1  # not retried


def test_unreachable_server(count_tokens):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = EndpointBackend(f"http://127.0.0.1:{port}/v1", "m", None, timeout=0.5, retry_delay_s=0.0)
    with pytest.raises(EnhanceError, match="could not connect to"):
        PromptEnhancer(backend, count_tokens).enhance("a fox")


def test_malformed_answer(server, count_tokens):
    server.replies = [(200, {"unexpected": True}, 0.0)]
    with pytest.raises(EnhanceError, match="unexpected answer"):
        endpoint_enhancer(server, count_tokens).enhance("a fox")


def test_over_long_answer_asks_for_a_shorter_one(server, count_tokens):
    server.replies = [reply(LONG), reply(GOOD)]
    result = endpoint_enhancer(server, count_tokens).enhance("a toy ship")
    assert (result.text, result.trimmed, result.tokens) == (GOOD, False, count_tokens(GOOD))
    first, second = (r["body"]["messages"] for r in server.requests)
    assert second[: len(first)] == first
    assert second[-2] == {"role": "assistant", "content": LONG}
    assert f"{count_tokens(LONG)} tokens long" in second[-1]["content"]
    assert "at most 226" in second[-1]["content"]


def test_still_too_long_is_trimmed_at_a_sentence_boundary(server, count_tokens):
    shorter = " ".join(RELEASE_PROMPTS[1:3])  # over budget, but fewer tokens than LONG
    server.replies = [reply(LONG), reply(shorter)]
    result = endpoint_enhancer(server, count_tokens).enhance("a toy ship")
    assert result.trimmed and result.tokens == count_tokens(result.text) <= 226
    assert shorter.startswith(result.text) and result.text.endswith(".")
    next_sentence = shorter[len(result.text) :].split(". ")[0] + "."
    assert count_tokens(f"{result.text} {next_sentence}") > 226


def test_failed_follow_up_trims_the_first_answer(server, count_tokens):
    server.replies = [reply(LONG), error(500, "a"), error(500, "b")]
    result = endpoint_enhancer(server, count_tokens).enhance("a toy ship")
    assert result.trimmed and LONG.startswith(result.text) and result.tokens <= 226


@pytest.fixture
def counted(count_tokens):
    """`count_tokens` that records what it counted."""
    texts = []

    def count(text):
        texts.append(text)
        return count_tokens(text)

    count.texts = texts
    return count


INVISIBLE = ["", "   ", "\t\n\r", "\u200b", "\u200c\u200d\u2060\ufeff"]  # blanks, zero-width joiners, BOM
INVISIBLE += ["\xa0\u3000\u2028", "\u3164\u2800", "\x00\u202e"]  # wide spaces, blank letters, controls


@pytest.mark.parametrize("prompt", INVISIBLE)
def test_invisible_prompt_is_refused_before_any_work(server, counted, prompt):
    with pytest.raises(ValueError, match="the prompt is empty"):
        endpoint_enhancer(server, counted).enhance(prompt)
    assert server.requests == [] and counted.texts == []


def test_prompt_length_limit(server, counted):
    limit = enhance.MAX_IDEA_CHARS
    enhancer = endpoint_enhancer(server, counted)
    with pytest.raises(ValueError, match=f"is {limit + 1} characters long; enhance takes {limit} at most"):
        enhancer.enhance("a" * (limit + 1))
    assert server.requests == [] and counted.texts == []

    server.replies = [reply(GOOD)]
    idea = "f" * (limit - 2)
    result = enhancer.enhance(f"\u200b{idea} ")  # exactly the limit; invisible ends are not sent
    assert result.text == GOOD and len(server.requests) == 1
    assert f"Video idea: {idea}\n" in server.requests[0]["body"]["messages"][-1]["content"]


# --- cleanup and trimming ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "A cat walks on a roof. Rain falls.",
        '"A cat walks on a roof. Rain falls."',
        "“A cat walks on a roof. Rain falls.”",
        "Here's an enhanced version of your prompt:\nA cat walks on a roof.\nRain falls.",
        "Enhanced prompt: A cat walks on a roof. Rain falls.",
        "Certainly! Here is the rewritten description: A cat walks on a roof. Rain falls.",
        "```\nA cat walks on a roof. Rain falls.\n```",
        "- A cat walks on a roof.\n- Rain falls.",
        "1. A cat walks on a roof.\n2) Rain falls.",
        "## **A cat** walks on a *roof*.\n\nRain falls.\n\nI hope this helps!",
        "<think>The user wants a cat.\nOk.</think>\nA cat walks on a roof. Rain falls. Let me know if you need more.",
        "The user wants a cat.</think>A cat walks on a roof.\tRain falls.\x08",
    ],
)
def test_clean_rewrite(raw):
    assert clean_rewrite(raw) == "A cat walks on a roof. Rain falls."


def test_clean_rewrite_keeps_content_that_looks_like_a_lead_in():
    text = "Great white sharks circle a diver's cage; here the water is dark: a storm gathers."
    assert clean_rewrite(text) == text


def test_trim_to_budget_by_sentences_then_words():
    words = lambda text: len(text.split())  # noqa: E731
    text = "One two three. Four five six seven. Eight nine."
    assert trim_to_budget(text, words, 9) == text
    assert trim_to_budget(text, words, 8) == "One two three. Four five six seven."
    assert trim_to_budget(text, words, 6) == "One two three."
    assert trim_to_budget("One, two, three, four five.", words, 2) == "One, two"


def test_examples_follow_our_own_rules():
    for _, rewrite in EXAMPLES:
        assert clean_rewrite(rewrite) == rewrite
        min_words, max_words = enhance.word_budget(226)
        assert min_words <= len(rewrite.split()) <= max_words


# --- backend selection -------------------------------------------------------------------------------------


def write_cached_model(cache: Path, repo_id: str, files: dict[str, str]) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)


def test_from_env_selection(tmp_path, count_tokens):
    cache = tmp_path / "hub"
    cache.mkdir()
    off = PromptEnhancer.from_env(count_tokens, env={"HF_HUB_CACHE": str(cache)})
    assert not off.available and off.backend_name == "none"
    reason = off.unavailable_reason
    assert "OPENAI_API_KEY" in reason and f"hf download {enhance.DEFAULT_LOCAL_MODEL}" in reason
    assert reason.endswith(".") and reason.count(". ") == 0
    with pytest.raises(EnhanceError) as raised:
        off.enhance("a fox")
    assert str(raised.value) == reason

    # OpenAI's own API without a key is not configured.
    env = {"HF_HUB_CACHE": str(cache), "OPENAI_BASE_URL": "https://api.openai.com/v1"}
    assert not PromptEnhancer.from_env(count_tokens, env=env).available

    keyed = PromptEnhancer.from_env(count_tokens, env={"OPENAI_API_KEY": "sk-x", "HF_HUB_CACHE": str(cache)})
    assert isinstance(keyed.backend, EndpointBackend) and not keyed.needs_gpu_lock
    assert keyed.backend.url == "https://api.openai.com/v1/chat/completions"
    assert keyed.backend.timeout == enhance.DEFAULT_TIMEOUT_S
    assert keyed.backend.concurrency == enhance.DEFAULT_CONCURRENCY

    ollama = PromptEnhancer.from_env(
        count_tokens,
        env={"OPENAI_BASE_URL": "http://localhost:11434/v1/", "PROMPT_ENHANCER_MODEL": "qwen2.5"},
    )
    assert ollama.backend_name == "qwen2.5 via localhost:11434" and ollama.backend.api_key is None

    # A Hub id counts only once its config and every weight shard are in the cache.
    index = json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}})
    files = {"config.json": "{}", "model.safetensors.index.json": index, "model-1.safetensors": ""}
    write_cached_model(cache, "acme/tiny-chat", files)
    env = {"HF_HUB_CACHE": str(cache), "PROMPT_ENHANCER_LOCAL_MODEL": "acme/tiny-chat"}
    missing_shard = PromptEnhancer.from_env(count_tokens, env=env)
    assert not missing_shard.available and "hf download acme/tiny-chat" in missing_shard.unavailable_reason
    (cache / "models--acme--tiny-chat" / "snapshots" / "abc123" / "model-2.safetensors").write_text("")
    local = PromptEnhancer.from_env(count_tokens, env=env)
    assert isinstance(local.backend, LocalBackend) and local.backend_name == "acme/tiny-chat (local)"
    assert local.needs_gpu_lock and not off.needs_gpu_lock
    assert local.backend.model is None  # nothing loads before the first click

    empty_dir = tmp_path / "not-a-model"
    empty_dir.mkdir()
    nothing = PromptEnhancer.from_env(count_tokens, env={"PROMPT_ENHANCER_LOCAL_MODEL": str(empty_dir)})
    assert not nothing.available and str(empty_dir) in nothing.unavailable_reason

    for name, value in [
        ("PROMPT_ENHANCER_TIMEOUT", "soon"),
        ("PROMPT_ENHANCER_TIMEOUT", "0"),
        ("PROMPT_ENHANCER_TIMEOUT", "inf"),
        ("PROMPT_ENHANCER_CONCURRENCY", "0"),
        ("PROMPT_ENHANCER_CONCURRENCY", "2.5"),
    ]:
        with pytest.raises(ValueError, match=f"{name} must be a positive"):
            PromptEnhancer.from_env(count_tokens, env={"OPENAI_API_KEY": "k", name: value})
    env = {"OPENAI_API_KEY": "k", "PROMPT_ENHANCER_TIMEOUT": "12.5", "PROMPT_ENHANCER_CONCURRENCY": "2"}
    tuned = PromptEnhancer.from_env(count_tokens, env=env).backend
    assert (tuned.timeout, tuned.concurrency) == (12.5, 2)
    with pytest.raises(ValueError, match="http:// or https://"):
        PromptEnhancer.from_env(count_tokens, env={"OPENAI_BASE_URL": "localhost:11434/v1"})


# --- the local transformers backend ------------------------------------------------------------------------


def test_local_backend_end_to_end(tiny_chat_model, count_tokens, monkeypatch):
    loads = []

    class CountingAutoModel:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            loads.append(args[0])
            return AutoModelForCausalLM.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(enhance, "auto_classes", lambda: (AutoTokenizer, CountingAutoModel))
    enhancer = PromptEnhancer.from_env(
        count_tokens, env={"PROMPT_ENHANCER_LOCAL_MODEL": str(tiny_chat_model)}
    )
    assert enhancer.available and enhancer.backend_name == f"{tiny_chat_model} (local)"
    backend = enhancer.backend
    backend.max_new_tokens = 160  # keeps the test quick; gibberish either way
    assert backend.model is None and loads == []

    result = enhancer.enhance("一只猫在屋顶上")
    assert result.text and "\n" not in result.text and result.text == clean_rewrite(result.text)
    assert result.tokens == count_tokens(result.text) <= 226
    assert result.backend == backend.name and loads == [str(tiny_chat_model)]
    model = backend.model
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == expected

    enhancer.release()
    assert all(p.device.type == "cpu" for p in model.parameters())

    again = enhancer.enhance("a cat on a roof")  # after release: moved back, not loaded again
    assert again.text and backend.model is model and loads == [str(tiny_chat_model)]


# --- what the page shows of an endpoint's failure ------------------------------------------------------------

HOSTILE = 'quota <a href="https://evil.example/">renew here</a> <img src=x onerror="alert(1)">'


def enhance_in_the_page(enhancer: PromptEnhancer, tmp_path: Path) -> str:
    """What the ✨ button's handler says beside the button (never a toast), as Gradio calls it; the prompt and
    the rewrite are left as they are."""
    from webapp.events import PageEvents

    prompt, result, note = PageEvents([], None, enhancer, tmp_path, "", 50).enhance_in_page("a fox")
    assert prompt == gr.skip()
    assert (
        result is None and note.visible and note.value.startswith('<span class="refused">⚠️ Enhance failed: ')
    )
    return note.value.removeprefix('<span class="refused">⚠️ Enhance failed: ').removesuffix("</span>")


def test_an_endpoints_error_text_is_shown_as_text_not_html(server, count_tokens, tmp_path):
    # The note is HTML (as a gr.Error's message is): the endpoint's words must not become a link or an image.
    server.replies = [error(400, HOSTILE)]
    shown = enhance_in_the_page(endpoint_enhancer(server, count_tokens), tmp_path)
    assert "<" not in shown and ">" not in shown
    host = server.url.removeprefix("http://").removesuffix("/v1")
    assert html.unescape(shown) == f"{host} answered HTTP 400: {HOSTILE} (waited 0 s)"


@pytest.mark.parametrize(
    "parts", [[{"type": "text", "text": 42}], [{"type": "text", "text": "A fox."}, {"text": None}]]
)
def test_content_parts_that_are_not_text_are_our_error(server, count_tokens, tmp_path, parts):
    server.replies = [(200, {"choices": [{"message": {"role": "assistant", "content": parts}}]}, 0.0)]
    with pytest.raises(EnhanceError, match="sent an unexpected answer"):
        endpoint_enhancer(server, count_tokens).enhance("a fox")
    server.replies = [(200, {"choices": [{"message": {"role": "assistant", "content": parts}}]}, 0.0)]
    assert "sent an unexpected answer" in enhance_in_the_page(
        endpoint_enhancer(server, count_tokens), tmp_path
    )


def test_any_other_enhancer_failure_is_our_message(count_tokens, tmp_path):
    class Broken:
        name = "broken"

        def chat(self, messages):
            raise RuntimeError("Low-level CUDA init (`torch._C._cuda_init`) reached. <b>Check</b>")

    shown = enhance_in_the_page(PromptEnhancer(Broken(), count_tokens), tmp_path)
    assert shown.startswith("The prompt enhancer failed (") and "&lt;b&gt;Check&lt;/b&gt;" in shown
    from webapp.events import PageEvents

    with pytest.raises(gr.Error, match="The prompt enhancer failed") as raised:  # the /enhance API: its error
        PageEvents([], None, PromptEnhancer(Broken(), count_tokens), tmp_path, "", 50).enhance("a fox")
    assert raised.value.title == "Enhance failed"


def test_on_zero_gpu_the_local_model_runs_on_the_cpu(tiny_chat_model, count_tokens, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as spaces makes it in the main process
    env = {"PROMPT_ENHANCER_LOCAL_MODEL": str(tiny_chat_model)}
    assert PromptEnhancer.from_env(count_tokens, env=env).backend.device.type == "cuda"
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PROMPT_ENHANCER_LOCAL_MODEL", str(tiny_chat_model))
    pipe = SimpleNamespace(count_tokens=lambda text: SimpleNamespace(n_tokens=count_tokens(text)))
    assert serve.prompt_enhancer(pipe).backend.device.type == "cuda"
    monkeypatch.setattr(serve, "ZERO_GPU", True)  # the app asks for the CPU there
    assert serve.prompt_enhancer(pipe).backend.device.type == "cpu"


def test_any_failure_of_the_local_model_is_an_enhance_error(tiny_chat_model, count_tokens, monkeypatch):
    enhancer = PromptEnhancer(LocalBackend(str(tiny_chat_model), device="cpu"), count_tokens)

    def refused(*args, **kwargs):
        raise RuntimeError("Low-level CUDA init (`torch._C._cuda_init`) reached.\nCheck this stacktrace")

    monkeypatch.setattr(LlamaForCausalLM, "generate", refused)
    with pytest.raises(
        EnhanceError, match=r"tiny-chat\d* failed \(RuntimeError: Low-level CUDA init .* Check"
    ):
        enhancer.enhance("a fox")
    monkeypatch.setattr(
        LlamaForCausalLM, "generate", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError())
    )
    with pytest.raises(EnhanceError, match="not enough GPU memory"):
        enhancer.enhance("a fox")
