"""Helpers shared by the GPU check's runner (`gpu_check.py`) and its sections (`gpu_sections.py`): device
queries that read None on a CPU, byte counts, timing, and errors recorded as strings."""

from __future__ import annotations

import argparse
import gc
import math
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch

from benchmarks.common import GiB, sync


class SectionRun(Protocol):
    """What a section is handed (`gpu_check.Run`): the device, dtype and arguments, a log, a temporary folder.
    Declared here so the sections need nothing from the runner that imports them."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype

    def elapsed(self) -> float: ...
    def log(self, message: str) -> None: ...
    @property
    def tmp(self) -> Path: ...
    def scaffold(self) -> Path: ...


class SectionTimeout(Exception):
    """Raised by SIGALRM when a section outlives its share of the budget."""


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def needs_cuda(what: str) -> str:
    return f"skipped: needs CUDA ({what})"


def error_record(e: BaseException) -> dict:
    """Class, message and the end of the traceback: strings only, so no frame keeps tensors alive."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return {"error": type(e).__name__, "message": str(e)[:1500], "traceback": tb[-2500:]}


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def tensor_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers, each storage once (tied weights counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def state_dict_bytes(module: torch.nn.Module) -> int:
    """The state dict's bytes, each tensor once (T5's tied embedding appears under two keys)."""
    seen, total = set(), 0
    for t in module.state_dict().values():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj).removeprefix("SDPBackend.")


def free_memory(device: torch.device) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # pinned blocks cached by an earlier section


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if is_cuda(device) else None


def reset_peak(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if is_cuda(device) else None


def gib(n: int | None) -> float | None:
    return None if n is None else n / GiB


@contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def timed_calls(fn, n: int, device) -> tuple[list[float], object]:
    times = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times, out
