"""Prompt enhancer: a fake OpenAI-compatible server on loopback drives the endpoint backend, a tiny random
chat model drives the local one, and a tiny sentencepiece T5 tokenizer counts tokens."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Tokenizer,
)

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
    """Records every request; answers each with the next queued (status, payload, delay_s)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.replies: list[tuple[int, dict, float]] = []
        self.stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": self.headers, "body": body})
                status, payload, delay = fake.replies.pop(0) if fake.replies else (599, {}, 0.0)
                fake.stop.wait(delay)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client timed out and hung up

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(text: str, delay: float = 0.0) -> tuple[int, dict, float]:
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}, delay


def error(status: int, message: str) -> tuple[int, dict, float]:
    return status, {"error": {"message": message, "type": "server_error"}}, 0.0


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
    assert result.tokens == count_tokens(GOOD) and not result.trimmed
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
        refused("max_tokens", "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead."),
        refused("temperature", "Unsupported value: 'temperature' does not support 0.7 with this model. "
                "Only the default (1) value is supported."),
        reply(GOOD),
        reply(GOOD),
    ]  # fmt: skip
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


def test_slow_answer_times_out(server, count_tokens):
    server.replies = [reply(GOOD, delay=3.0), reply(GOOD, delay=3.0)]
    start = time.monotonic()
    with pytest.raises(EnhanceError, match=r"did not answer within 0.5 s \(tried twice\)"):
        endpoint_enhancer(server, count_tokens).enhance("a fox")
    assert time.monotonic() - start < 2.5
    assert len(server.requests) == 2


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


def test_empty_prompt_is_a_value_error(server, count_tokens):
    with pytest.raises(ValueError, match="empty"):
        endpoint_enhancer(server, count_tokens).enhance("   ")
    assert server.requests == []


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
    assert isinstance(keyed.backend, EndpointBackend)
    assert keyed.backend.url == "https://api.openai.com/v1/chat/completions"
    assert keyed.backend.timeout == enhance.DEFAULT_TIMEOUT_S

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
    assert local.backend.model is None  # nothing loads before the first click

    empty_dir = tmp_path / "not-a-model"
    empty_dir.mkdir()
    nothing = PromptEnhancer.from_env(count_tokens, env={"PROMPT_ENHANCER_LOCAL_MODEL": str(empty_dir)})
    assert not nothing.available and str(empty_dir) in nothing.unavailable_reason

    with pytest.raises(ValueError, match="PROMPT_ENHANCER_TIMEOUT"):
        PromptEnhancer.from_env(count_tokens, env={"OPENAI_API_KEY": "k", "PROMPT_ENHANCER_TIMEOUT": "soon"})


# --- the local transformers backend ------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A ~15k-parameter random Llama with a byte-level BPE tokenizer trained here, saved like a Hub model."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    specials = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*RELEASE_PROMPTS, enhance.SYSTEM_PROMPT], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|eos|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Zero logits for special and blank tokens: random positive ones win greedy decoding, so text comes out.
    blank = [
        i
        for i in range(len(tokenizer))
        if not tokenizer.decode([i]).strip() or i in tokenizer.all_special_ids
    ]
    with torch.no_grad():
        model.lm_head.weight[blank] = 0
    model.save_pretrained(folder)
    return folder


def test_local_backend_end_to_end(tiny_chat_model, count_tokens, monkeypatch):
    loads = []

    class CountingAutoModel:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            loads.append(args[0])
            return AutoModelForCausalLM.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(enhance, "AutoModelForCausalLM", CountingAutoModel)
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
