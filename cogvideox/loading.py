"""Checkpoints in the released diffusers layout: a local folder or a Hub repo -> safetensors -> strict load."""

from __future__ import annotations

import contextlib
import ctypes
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import CheckpointError

__all__ = ["CheckpointError", "load_module", "load_state_dict_from_dir", "read_tensors", "resolve_model"]

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# Small files: enough to build every config, count tokens and validate a request without any weights.
CONFIG_PATTERNS = ("model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*")
WEIGHT_PATTERNS = tuple(
    f"{c}/{p}"
    for c in ("transformer", "vae", "text_encoder")
    for p in ("*.safetensors", "*.safetensors.index.json")
)
ALL_PATTERNS = CONFIG_PATTERNS + WEIGHT_PATTERNS


def resolve_model(model: str | Path, patterns: Iterable[str] = CONFIG_PATTERNS) -> Path:
    """A local folder as it is; a Hub repo id -> the local snapshot holding just the files matching `patterns`."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is not a CogVideoX checkpoint: model_index.json is missing")
        return path
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise CheckpointError(
            f"model {str(model)!r} is neither a checkpoint folder nor a Hub repo id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), allow_patterns=list(patterns)))
    except Exception as e:  # network errors, missing repo, gated repo: all end the same way for the user
        raise CheckpointError(
            f"could not get {model!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Check the network, or pass a local checkpoint folder."
        ) from e


def _safetensors_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"corrupt shard index {indexes[0]}: no 'weight_map' of file names ({e})"
            ) from None
        if not all(isinstance(n, str) and n and "/" not in n and "\\" not in n for n in names):
            raise CheckpointError(
                f"corrupt shard index {indexes[0]}: 'weight_map' must name files in {folder}"
            )
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}")
    if len(files) > 1:
        raise CheckpointError(
            f"several *.safetensors files and no index in {folder}: {[f.name for f in files]}"
        )
    return files


Convert = Callable[[str, torch.Tensor], torch.Tensor]


def load_state_dict_from_dir(
    folder: str | Path, dtype: torch.dtype | None = None, convert: Convert | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a component folder (single file or shards + index), cast to `dtype` if given, then passed
    through `convert(key, tensor)` (8-bit weights), one tensor at a time: the peak is what is kept plus one
    tensor as the file stores it."""
    state = {}
    for file in _safetensors_files(Path(folder)):
        if not file.is_file():
            raise CheckpointError(f"missing weights file {file}")
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    state[key] = t if convert is None else convert(key, t)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"corrupt weights file {file}: {e}") from None
    return state


def read_tensors(
    folder: str | Path, keys: Iterable[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Some tensors of a component folder, cast as `load_state_dict_from_dir` casts them (so bit for bit what was
    loaded), read through a memory map: the rest of the files is not read."""
    wanted, state = set(keys), {}
    for file in _safetensors_files(Path(folder)):
        try:
            with safe_open(file, "pt") as f:
                for key in wanted.intersection(f.keys()):
                    state[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"corrupt or missing weights file {file}: {e}") from None
    if missing := sorted(wanted - set(state)):
        raise CheckpointError(f"weights in {folder} lack {missing[0]!r}")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def _check_dtypes(module: nn.Module, state: dict[str, torch.Tensor], folder: str | Path) -> None:
    expected = module.state_dict()
    for key, value in state.items():
        if expected[key].is_floating_point() != value.is_floating_point():
            kind = "floating-point" if expected[key].is_floating_point() else "integer"
            raise CheckpointError(f"weights in {folder}: {key!r} is {value.dtype}, {kind} was expected")


def load_module(
    module: nn.Module, folder: str | Path, dtype: torch.dtype, convert: Convert | None = None
) -> nn.Module:
    """Load a (meta-device) module from a component folder, strictly; tensors stay on the CPU. `convert(key,
    tensor)` sees each tensor as it loads (`quantize.converter`: Linear weights to 8 bits)."""
    state = load_state_dict_from_dir(folder, dtype, convert)
    missing = sorted(set(module.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(module.state_dict()))
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {folder} do not match {type(module).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    _check_dtypes(module, state, folder)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"weights in {folder} do not fit {type(module).__name__}: {e}") from None
    return module.eval().requires_grad_(False)


def release_freed_memory() -> None:
    """Hand heap memory freed while loading back to the OS: glibc keeps freed small blocks for reuse, so without
    this the process holds on to 0.2 to 0.5 GiB of 8-bit conversion temporaries at the 2B widths (measured:
    docs/benchmarks.md, section 6). Nothing where the C library has no malloc_trim."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
