"""Timing, memory and reporting helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

GiB = 2**30


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock reading covers the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call for each function. Calls alternate A B, B A, ... so drift in a shared machine's load
    (other processes on the same cores) hits every function alike instead of biasing the one timed last."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


class PeakMemory:
    """Peak memory since the last `reset()`.

    CUDA: the caching allocator's `max_memory_allocated` (absolute, weights included).
    CPU: peak resident set size above the RSS at `reset()` (Linux only; elsewhere `peak()` is None).
    `reset()` first returns freed heap memory to the OS (glibc keeps freed blocks up to ~32 MB mapped and
    reuses them, so a stage would otherwise hide its working memory in what an earlier one left), then
    writes 5 to /proc/self/clear_refs, which resets the kernel's high-water mark (VmHWM) to the current RSS.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        try:
            self._malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._malloc_trim = None

    @property
    def label(self) -> str:
        return "peak VRAM GiB" if self.device.type == "cuda" else "peak RSS delta GiB"

    @staticmethod
    def _status_kib(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.base = None
            return
        rss = self._status_kib("VmRSS")
        self.base = None if rss is None else rss * 1024

    def peak_reserved(self) -> int | None:
        """CUDA: the most the caching allocator held since `reset()` (what the card must have, context aside)."""
        return torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else None

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        hwm = self._status_kib("VmHWM")
        if hwm is None or self.base is None:
            return None
        return hwm * 1024 - self.base


def source_digest() -> str:
    """Which version of cogvideox/ was measured (the working tree may hold uncommitted changes)."""
    files = sorted((Path(__file__).resolve().parents[1] / "cogvideox").glob("*.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def machine() -> str:
    cpu = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}); {cpu}"
    return f"{cpu} (torch {torch.__version__})"


def write_report(
    path: str | Path, args: argparse.Namespace, results: dict, source: str | None = None
) -> Path:
    """A benchmark's JSON: when, on which machine, which cogvideox/ (`source`: the digest taken before the run,
    as another process may edit the package meanwhile) and with which arguments it ran, then its results."""
    data = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "source": source or source_digest(),
        "args": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()},
        **results,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
