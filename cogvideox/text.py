"""T5 text encoding: tokenize to a fixed 226 tokens, encode without a mask, count what a prompt uses."""

from __future__ import annotations

import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import T5EncoderModel, T5Tokenizer

from .config import CheckpointError

MAX_TOKENS = 226


@dataclass(frozen=True)
class TokenCount:
    n_tokens: int  # including the closing </s>
    max_tokens: int
    kept_text: str
    dropped_text: str

    @property
    def dropped_tokens(self) -> int:
        return max(0, self.n_tokens - self.max_tokens)


# What shows nothing: controls, format characters (zero-width space and joiners, word joiner, BOM, bidi marks),
# spaces and line separators, and the letters that render blank (Hangul fillers, the empty Braille cell).
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_invisible(char: str) -> bool:
    return unicodedata.category(char) in INVISIBLE_CATEGORIES or char in BLANK_LETTERS


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: empty, or only spaces, controls and zero-width characters."""
    return all(is_invisible(c) for c in text)


def load_tokenizer(folder: str | Path) -> T5Tokenizer:
    """The checkpoint's `tokenizer/` folder (`spiece.model`), converted by transformers on load."""
    folder = Path(folder)
    if not (folder / "spiece.model").is_file() and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"tokenizer folder {folder} has neither spiece.model nor tokenizer.json")
    from transformers import T5Tokenizer  # here, not at the top: the app's page and CLI errors come first

    with _as_checkpoint_error(f"could not load the tokenizer from {folder}"):
        tokenizer = T5Tokenizer.from_pretrained(folder)
        tokenizer("a probe", add_special_tokens=True)  # a broken vocabulary can load and fail on first use
    return tokenizer


def load_text_encoder(folder: str | Path, dtype: torch.dtype) -> T5EncoderModel:
    # transformers keeps T5's `wo` in fp32 and clamps fp16 activations, so FP16 does not overflow.
    from transformers import T5EncoderModel  # ~2 s of imports, paid when the weights load

    with _as_checkpoint_error(f"could not load the text encoder from {folder}"):
        return T5EncoderModel.from_pretrained(Path(folder), dtype=dtype).eval().requires_grad_(False)


@contextmanager
def _as_checkpoint_error(what: str):
    """transformers reports a broken file in many ways (OSError, ValueError, TypeError, SafetensorError, ...):
    all are one CheckpointError that says which folder, and how it failed."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as e:
        raise CheckpointError(f"{what}: {type(e).__name__}: {e}") from None


def count_tokens(tokenizer: T5Tokenizer, prompt: str, max_tokens: int = MAX_TOKENS) -> TokenCount:
    # verbose=False: a prompt longer than the model's 226 tokens is what we are measuring, not a mistake to
    # warn about ("Token indices sequence length is longer than ...").
    ids = tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids
    if len(ids) <= max_tokens:
        return TokenCount(len(ids), max_tokens, prompt, "")
    # The last kept slot holds </s>, so max_tokens - 1 prompt tokens survive, as in the reference.
    kept = tokenizer.decode(ids[: max_tokens - 1], skip_special_tokens=True)
    dropped = tokenizer.decode(ids[max_tokens - 1 : -1], skip_special_tokens=True)
    return TokenCount(len(ids), max_tokens, kept, dropped)


def tokenize(tokenizer: T5Tokenizer, prompts: list[str], max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """(B, max_tokens) int64: padded with <pad>=0 and truncated, `</s>` appended."""
    return tokenizer(
        prompts, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt"
    ).input_ids


def encode(text_encoder: T5EncoderModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B, L, D). No attention mask: the model was trained with all 226 positions, pads included."""
    device = next(text_encoder.parameters()).device
    return text_encoder(input_ids.to(device))[0]
