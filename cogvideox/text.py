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
from .loading import load_state_dict_from_dir
from .quantize import converter

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


def load_text_encoder(folder: str | Path, dtype: torch.dtype, quantize: str | None = None) -> T5EncoderModel:
    """T5 from the checkpoint's `text_encoder/`, by transformers; with `quantize`, tensor by tensor instead, each
    Linear weight going to 8 bits as it loads (`_load_8bit`)."""
    # transformers keeps T5's `wo` in fp32 and clamps fp16 activations, so FP16 does not overflow.
    from transformers import T5EncoderModel  # ~2 s of imports, paid when the weights load

    with _as_checkpoint_error(f"could not load the text encoder from {folder}"):
        if quantize:
            return _load_8bit(Path(folder), dtype, quantize).eval().requires_grad_(False)
        return T5EncoderModel.from_pretrained(Path(folder), dtype=dtype).eval().requires_grad_(False)


def _load_8bit(folder: Path, dtype: torch.dtype, quantize: str) -> T5EncoderModel:
    """What transformers' load then `quantize.quantize_linears` give, bit for bit, without the 16-bit encoder
    whole in memory (9.5 GB for T5-XXL): the peak is the 8-bit encoder plus one 16-bit tensor. As transformers
    loads it: `wo` in FP32 under FP16 (its `_keep_in_fp32_modules`), and one embedding under the two names
    `shared` and `encoder.embed_tokens` (the file holds one of them)."""
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config.from_pretrained(folder))
    fp32 = set(model._keep_in_fp32_modules or ()) if dtype == torch.float16 else set()
    to_8bit = converter(model, quantize)

    def convert(key: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():  # cast here, not in the loader: an FP32 file's `wo` stays exact
            t = t.to(torch.float32 if fp32 & set(key.split(".")) else dtype)
        return to_8bit(key, t)

    state = load_state_dict_from_dir(folder, None, convert)
    tied = ("shared.weight", "encoder.embed_tokens.weight")
    if any(name in state for name in tied):
        embedding = state.get(tied[0], state.get(tied[1]))
        state.update(dict.fromkeys(tied, embedding))
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # one tensor again, as transformers ties it
    return model


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
