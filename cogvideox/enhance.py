"""Prompt enhancer: rewrite a short idea into the dense English paragraph CogVideoX was trained on.

Two backends share one method, `chat(messages) -> str`:
- `EndpointBackend` (in `endpoint.py`): any OpenAI-compatible `/chat/completions` (OpenAI, GLM, vLLM, Ollama,
  llama.cpp server).
- `LocalBackend`: an instruct model through transformers, loaded on first use; `release()` moves it to CPU
  so the GPU is free for video generation.
`PromptEnhancer` adds the instructions, cleans the answer and keeps it within the T5 token budget. Against an
endpoint one call has a deadline for everything it sends and holds one of a few slots, so a slow server holds only
its own caller.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import try_to_load_from_cache

# The endpoint's names are re-exported: callers and tests import them from here.
from .endpoint import BUSY_WAIT_S as BUSY_WAIT_S
from .endpoint import (
    DEFAULT_BASE_URL,
    DEFAULT_CONCURRENCY,
    DEFAULT_ENDPOINT_MODEL,
    DEFAULT_TIMEOUT_S,
    MAX_NEW_TOKENS,
    EndpointBackend,
    EnhanceError,
    Message,
)
from .endpoint import MAX_RESPONSE_BYTES as MAX_RESPONSE_BYTES
from .endpoint import REASONING_TOKENS as REASONING_TOKENS
from .offload import empty_cuda_cache, is_out_of_memory
from .text import is_invisible

logger = logging.getLogger(__name__)

MAX_TOKENS = 226  # T5 tokens the transformer sees, </s> included
# Small enough to sit beside the video model for a moment, multilingual, and good at following format rules.
DEFAULT_LOCAL_MODEL = "Qwen/Qwen2.5-3B-Instruct"
MAX_IDEA_CHARS = 2000  # what the app's prompt box holds

SYSTEM_PROMPT = """\
You write prompts for a text-to-video model. The user gives a short idea for a video, in any language. \
Expand it into one dense paragraph in English that describes what the camera sees during a single shot \
a few seconds long.

Rules:
- Always write in English, whatever language the idea is written in. Keep the user's subject, names, \
numbers and intent; add detail, never change the idea.
- Cover, in this order: the main subject and its look (colors, materials, size, clothing); what it does, \
as continuous visible motion; the setting and background; the camera (shot size, angle, and movement \
such as a slow dolly-in, a tracking shot or a static wide shot); the light and mood (time of day, light \
source, color palette); then, if it helps, the visual style.
- Use the present tense and concrete details a viewer can see. Leave out sounds, smells, thoughts, \
dialogue, and written text.
- One scene, one continuous shot: no cuts, no story that spans time.
- Length: {min_words} to {max_words} words.
- Reply with the paragraph only: no title, no preamble, no quotation marks, no lists, no line breaks, \
no notes."""

USER_TEMPLATE = "Video idea: {idea}\n\nAnswer with one English paragraph only."

SHORTER_TEMPLATE = (
    "That description is {tokens} tokens long and the video model reads at most {max_tokens}. "
    "Rewrite it in at most {max_words} words as one English paragraph, keeping the subject, action, "
    "setting, camera and light. Reply with the paragraph only."
)

# (idea, rewrite) pairs shown to the model before the user's idea; one per input language we expect most.
EXAMPLES = (
    (
        "a fox in the snow",
        "A red fox with a thick winter coat and a white-tipped tail trots across a snow-covered meadow, "
        "pauses to tilt its head toward a sound under the surface, then leaps and dives nose-first into "
        "the powder, throwing up a spray of fine snow that drifts slowly back down. Behind it, a row of "
        "frosted birch trees stands against pale blue hills. The camera stays low at snow level and "
        "tracks the fox from the side, then holds still as it dives. Soft early-morning sun comes from "
        "the left, casting long blue shadows and lighting the edges of the fox's fur in orange. Crisp "
        "natural colors, shallow depth of field, realistic wildlife documentary style.",
    ),
    (
        "老人在雨夜的街头拉小提琴",
        "An elderly man in a worn grey overcoat and a flat cap plays a violin on a narrow city street at "
        "night, drawing the bow in long, slow strokes with his eyes closed. Light rain falls steadily, "
        "beading on his shoulders and on the varnished wood of the violin. The wet cobblestones mirror "
        "the red and yellow glow of shop windows and a single streetlamp above him, while blurred "
        "pedestrians with umbrellas pass in the background. The camera dollies in slowly from a medium "
        "shot to a close-up of his hands and face. Warm amber lamplight contrasts with the cool blue of "
        "the rainy street; cinematic and moody, with soft bokeh.",
    ),
    (
        "un phare au coucher du soleil, vu d'un drone",
        "A white lighthouse with a red lantern room stands at the tip of a rocky headland as waves roll "
        "in and burst into white foam against the dark rocks below. Seabirds glide past the tower and "
        "the grass on the cliff top bends in the wind. An aerial drone shot circles the lighthouse slowly "
        "at mid-height, revealing the long coastline and the open sea behind it. The sun sits low on the "
        "horizon and bathes the scene in golden-orange light, with pink clouds streaked across the sky "
        "and long shadows stretching over the rocks. Vivid, highly detailed, cinematic landscape footage.",
    ),
)


@dataclass(frozen=True)
class EnhanceResult:
    original: str
    text: str
    backend: str
    tokens: int  # count_tokens(text), within the budget
    trimmed: bool  # cut at a sentence (or word) boundary to fit
    elapsed_s: float  # how long the user waited


def check_idea(prompt: str, max_chars: int = MAX_IDEA_CHARS) -> str:
    """The idea without invisible characters at either end; ValueError if it is too long or shows nothing."""
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
    if len(prompt) > max_chars:  # first, so a huge paste costs nothing more
        raise ValueError(f"the prompt is {len(prompt)} characters long; enhance takes {max_chars} at most")
    start, end = 0, len(prompt)
    while start < end and is_invisible(prompt[start]):
        start += 1
    while end > start and is_invisible(prompt[end - 1]):
        end -= 1
    if start == end:
        raise ValueError("the prompt is empty: type a short idea to enhance")
    return prompt[start:end]


def word_budget(max_tokens: int) -> tuple[int, int]:
    """Words to ask for: English averages ~1.4 T5 tokens a word, and models overshoot what they are told."""
    max_words = max_tokens * 3 // 5
    return max_words // 2, max_words


def build_messages(idea: str, max_tokens: int = MAX_TOKENS) -> list[Message]:
    min_words, max_words = word_budget(max_tokens)
    messages = [{"role": "system", "content": SYSTEM_PROMPT.format(min_words=min_words, max_words=max_words)}]
    for example_idea, rewrite in EXAMPLES:
        messages.append({"role": "user", "content": USER_TEMPLATE.format(idea=example_idea)})
        messages.append({"role": "assistant", "content": rewrite})
    messages.append({"role": "user", "content": USER_TEMPLATE.format(idea=idea)})
    return messages


_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)  # reasoning models (Qwen3, R1) via Ollama
_FENCE = re.compile(r"```[\w-]*")
_LEAD_IN = re.compile(
    r"^(?:(?:sure|certainly|okay|ok|of course|absolutely)\s*[,!.]+\s*"
    r"|here(?:['’]s| is)\b[^:\n]{0,80}:\s*"
    r"|(?:enhanced|rewritten|improved|expanded|final|new)?\s*(?:video\s+)?(?:prompt|description|caption)\s*:\s*)",
    re.I,
)
_SIGN_OFF = re.compile(r"^(?:let me know|i hope|hope this|feel free|note:|would you like)", re.I)
_BULLET = re.compile(r"^\s*(?:[-*•–]|\d+[.)]|#+)\s+")
_QUOTES = {'"': '"', "“": "”", "'": "'", "‘": "’", "«": "»", "「": "」", "`": "`"}
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_rewrite(text: str) -> str:
    """One plain paragraph: no reasoning, preamble, markdown, bullets, sign-off or surrounding quotes."""
    text = text.rsplit("</think>", 1)[-1]  # chat templates may open the reasoning block themselves
    text = (
        _CONTROL.sub("", _FENCE.sub("", _THINK.sub("", text)))
        .replace("**", "")
        .replace("__", "")
        .replace("*", "")
    )
    lines = [_BULLET.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    # A short first line ending in a colon introduces the answer ("Here is a richer version:").
    if len(lines) > 1 and lines[0].endswith(":") and len(lines[0].split()) <= 15:
        lines = lines[1:]
    lines = [line for line in lines if not _SIGN_OFF.match(line)]
    text = " ".join(" ".join(lines).split())
    while True:
        stripped = _LEAD_IN.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    sentences = _SENTENCE_BREAK.split(text)
    while len(sentences) > 1 and _SIGN_OFF.match(sentences[-1]):
        sentences.pop()
    text = " ".join(sentences).strip()
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    if text[:1] in _QUOTES and text.count(text[0]) == 1:  # an opening quote whose closing one was cut off
        text = text[1:].strip()
    return text


def trim_to_budget(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> str:
    """The longest run of whole sentences that fits; words of the first sentence if even that is too long."""
    if count_tokens(text) <= max_tokens:
        return text
    kept = ""
    for sentence in _SENTENCE_BREAK.split(text):
        candidate = f"{kept} {sentence}".strip()
        if count_tokens(candidate) > max_tokens:
            break
        kept = candidate
    if kept:
        return kept
    words = text.split()
    lo, hi = 0, len(words)  # binary search for the longest word prefix that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(" ".join(words[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]).rstrip(",;:-–—")


def auto_classes() -> tuple[type, type]:
    """transformers' AutoTokenizer and AutoModelForCausalLM, imported at the first local load: seconds of imports
    that the app's start-up does not wait for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer, AutoModelForCausalLM


class LocalBackend:
    """An instruct model run in-process, loaded on the first request from local files only."""

    def __init__(
        self,
        model_id: str,
        cache_dir: str | None = None,
        device: str | torch.device | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ):
        self.model_id, self.cache_dir, self.max_new_tokens = model_id, cache_dir, max_new_tokens
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = None
        self.tokenizer = None
        self._lock = threading.Lock()  # Gradio may send two clicks at once

    @property
    def name(self) -> str:
        return f"{self.model_id} (local)"

    def _load(self) -> None:
        AutoTokenizer, AutoModelForCausalLM = auto_classes()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        kwargs = {"cache_dir": self.cache_dir, "local_files_only": True}
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_id, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(self.model_id, dtype=dtype, **kwargs)
        except Exception as e:  # a missing or damaged file, an unknown architecture
            said = " ".join(str(e).split())[:300]
            raise EnhanceError(f"could not load the local prompt model {self.model_id}: {said}") from e
        if not tokenizer.chat_template:
            raise EnhanceError(f"{self.model_id} has no chat template; use an instruct (chat) model")
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)

    @torch.inference_mode()
    def chat(self, messages: list[Message]) -> str:
        with self._lock:
            if self.model is None:
                self._load()
            out_of_memory = False
            try:
                self.model.to(self.device)
                inputs = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                ).to(self.device)
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                )
            except Exception as e:
                # A CUDA error or a broken model is one line for the user; the log gets the traceback.
                if not is_out_of_memory(e):
                    logger.exception("the local prompt model %s failed", self.model_id)
                    said = " ".join(f"{type(e).__name__}: {e}".split())[:200]
                    raise EnhanceError(f"the local prompt model {self.model_id} failed ({said})") from e
                out_of_memory = True
            if out_of_memory:  # freed outside the except block, whose traceback holds the step's tensors
                self.model.to("cpu")
                raise EnhanceError(f"not enough GPU memory to run {self.model_id}")
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)

    def release(self) -> None:
        with self._lock:
            if self.model is not None:
                self.model.to("cpu")
        if self.device.type == "cuda":
            empty_cuda_cache()  # not while a video pipeline is mid-job on some GPU of this process


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def local_weights_available(model_id: str, cache_dir: str | None = None) -> bool:
    """True if `model_id` (a folder, or a Hub id already in the cache) has a config and all its weights."""
    folder = Path(model_id).expanduser()

    def find(filename: str) -> Path | None:
        if folder.is_dir():
            path = folder / filename
            return path if path.is_file() else None
        try:
            cached = try_to_load_from_cache(model_id, filename, cache_dir=cache_dir)
        except ValueError:  # not a valid repo id (e.g. a missing folder)
            return None
        return Path(cached) if isinstance(cached, str) else None

    if find("config.json") is None:
        return False
    for filename in _WEIGHT_FILES:
        path = find(filename)
        if path is not None and filename.endswith(".index.json"):
            shards = set(json.loads(path.read_text())["weight_map"].values())
            return all(find(shard) is not None for shard in shards)
        if path is not None:
            return True
    return False


def _env_positive(env: Mapping[str, str], name: str, default: float, kind: type) -> float:
    raw = env.get(name, "").strip() or str(default)
    try:
        value = kind(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        number = "whole number" if kind is int else "number"
        raise ValueError(f"{name} must be a positive {number}, got {raw!r}")
    return value


def _hub_cache(env: Mapping[str, str]) -> str | None:
    if env.get("HF_HUB_CACHE"):
        return env["HF_HUB_CACHE"]
    return str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else None


def _unavailable_reason(local_model: str, explicit: bool) -> str:
    if explicit and Path(local_model).expanduser().exists():
        local = f"point PROMPT_ENHANCER_LOCAL_MODEL at a folder with model weights ({local_model} has none)"
    else:
        local = f"download a local model with `hf download {local_model}`"
    return (
        "To enable the prompt enhancer, set OPENAI_API_KEY (or OPENAI_BASE_URL for an Ollama, vLLM or "
        f"llama.cpp server) or {local}."
    )


class PromptEnhancer:
    """Rewrites short prompts with the configured backend and keeps the result within `max_tokens`."""

    def __init__(
        self,
        backend: EndpointBackend | LocalBackend | None,
        count_tokens: Callable[[str], int],
        max_tokens: int = MAX_TOKENS,
        unavailable_reason: str = "",
    ):
        if backend is None and not unavailable_reason:
            raise ValueError("an enhancer without a backend needs an unavailable_reason")
        self.backend, self.count_tokens, self.max_tokens = backend, count_tokens, max_tokens
        self.unavailable_reason = "" if backend is not None else unavailable_reason

    @classmethod
    def from_env(
        cls,
        count_tokens: Callable[[str], int],
        max_tokens: int = MAX_TOKENS,
        env: Mapping[str, str] = os.environ,
        local_device: str | None = None,
    ) -> PromptEnhancer:
        """The endpoint if configured, else a local model whose weights are on disk, else none (with why).

        `count_tokens` must count as the T5 encoder sees the text, `</s>` included.
        """
        timeout = _env_positive(env, "PROMPT_ENHANCER_TIMEOUT", DEFAULT_TIMEOUT_S, float)  # seconds
        concurrency = _env_positive(env, "PROMPT_ENHANCER_CONCURRENCY", DEFAULT_CONCURRENCY, int)
        api_key = env.get("OPENAI_API_KEY", "").strip()
        base_url = env.get("OPENAI_BASE_URL", "").strip()
        # Ollama, llama.cpp and most vLLM servers need no key; only OpenAI's own API does.
        if api_key or (base_url and urlparse(base_url).hostname != urlparse(DEFAULT_BASE_URL).hostname):
            model = env.get("PROMPT_ENHANCER_MODEL", "").strip() or DEFAULT_ENDPOINT_MODEL
            backend = EndpointBackend(
                base_url or DEFAULT_BASE_URL, model, api_key or None, timeout, concurrency=concurrency
            )
            return cls(backend, count_tokens, max_tokens)
        local_model = env.get("PROMPT_ENHANCER_LOCAL_MODEL", "").strip()
        cache_dir = _hub_cache(env)
        if local_weights_available(local_model or DEFAULT_LOCAL_MODEL, cache_dir):
            backend = LocalBackend(local_model or DEFAULT_LOCAL_MODEL, cache_dir, device=local_device)
            return cls(backend, count_tokens, max_tokens)
        reason = _unavailable_reason(local_model or DEFAULT_LOCAL_MODEL, explicit=bool(local_model))
        return cls(None, count_tokens, max_tokens, unavailable_reason=reason)

    @property
    def available(self) -> bool:
        return self.backend is not None

    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend is not None else "none"

    @property
    def needs_gpu_lock(self) -> bool:
        """A local model shares the GPU with video generation; an endpoint needs no lock (it has its slots)."""
        return isinstance(self.backend, LocalBackend)

    def enhance(self, prompt: str) -> EnhanceResult:
        """Rewrite `prompt`; ValueError, before any work, for an empty or over-long prompt.

        Against an endpoint the whole call, retries and the follow-up included, ends within the backend's
        `timeout` and holds one of its slots. Failures raise EnhanceError (user-facing, with `elapsed_s`).
        """
        idea = check_idea(prompt)
        if self.backend is None:
            raise EnhanceError(self.unavailable_reason)
        started = time.monotonic()
        try:
            if isinstance(self.backend, EndpointBackend):
                deadline = started + self.backend.timeout
                with self.backend.slot(deadline):
                    text, trimmed = self._rewrite(idea, partial(self.backend.chat, deadline=deadline))
            else:
                text, trimmed = self._rewrite(idea, self.backend.chat)
        except EnhanceError as e:
            e.elapsed_s = time.monotonic() - started
            raise
        tokens = self.count_tokens(text)
        return EnhanceResult(prompt, text, self.backend.name, tokens, trimmed, time.monotonic() - started)

    def _rewrite(self, idea: str, chat: Callable[[list[Message]], str]) -> tuple[str, bool]:
        """The rewrite within the token budget, and whether it had to be trimmed."""
        messages = build_messages(idea, self.max_tokens)
        first = self._ask(chat, messages)
        tokens = self.count_tokens(first)
        if tokens <= self.max_tokens:
            return first, False
        # Aim 10 % under the budget, scaled from the words the first answer spent per token.
        max_words = min(
            word_budget(self.max_tokens)[1], int(len(first.split()) * self.max_tokens / tokens * 0.9)
        )
        follow_up = SHORTER_TEMPLATE.format(tokens=tokens, max_tokens=self.max_tokens, max_words=max_words)
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": follow_up}]
        try:
            candidates = [self._ask(chat, messages), first]
        except EnhanceError:  # the first answer is still worth trimming (also when the deadline cut this one)
            candidates = [first]
        best = min(candidates, key=self.count_tokens)
        if self.count_tokens(best) <= self.max_tokens:
            return best, False
        text = trim_to_budget(best, self.count_tokens, self.max_tokens)
        if not text:
            raise EnhanceError(f"{self.backend.name} gave no rewrite that fits in {self.max_tokens} tokens")
        return text, True

    def _ask(self, chat: Callable[[list[Message]], str], messages: list[Message]) -> str:
        text = clean_rewrite(chat(messages))
        if not text:
            raise EnhanceError(f"{self.backend.name} returned an empty rewrite")
        return text

    def release(self) -> None:
        """Move a local model off the GPU; call before video generation starts."""
        if self.backend is not None:
            self.backend.release()
