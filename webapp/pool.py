"""The app's devices: which ones the command line asked for, and a pool that lends each one's pipeline to one job.

`--devices cuda:0,cuda:1` loads a pipeline per device; a job borrows a free one for its whole run and gives it back
at its end, whatever the end (a clip, an error, a cancel, out of memory). Jobs waiting for a device are served in
the order they asked, so the first device freed goes to the job that has waited longest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from cogvideox.pipeline import CogVideoXPipeline, GenerationCancelled, check_device


def _key(device: torch.device) -> str:
    """One name per physical device: `cuda` is the current CUDA device, cuda:0 unless a program changes it."""
    return f"cuda:{device.index or 0}" if device.type == "cuda" else str(device)


def parse_devices(spec: str) -> list[torch.device]:
    """`cuda:0,cuda:1` (or `all`: every visible CUDA device) -> the devices; ValueError saying what is wrong.

    Each must exist here, and none twice: two pipelines on one GPU would only share its memory. `cpu` may repeat
    (two CPU "devices" share the cores: tests run the pool that way)."""
    items = [item.strip() for item in spec.split(",")]
    if not any(items):
        raise ValueError("--devices is empty: give devices like cuda:0,cuda:1, or all, or leave it unset")
    if items == ["all"]:
        if not torch.cuda.is_available():
            raise ValueError("--devices all: CUDA is not available on this machine")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if "" in items:
        raise ValueError(f"--devices has an empty item in {spec!r}: separate devices by single commas")
    devices = []
    for item in items:
        try:
            devices.append(check_device(item))
        except ValueError as e:
            raise ValueError(f"--devices {item}: {e}") from None
    seen = [_key(d) for d in devices if d.type != "cpu"]
    if twice := sorted({k for k in seen if seen.count(k) > 1}):
        raise ValueError(f"--devices names {', '.join(twice)} twice: one pipeline per device")
    return devices


def pick_devices(
    device: str | None, devices: str | None, zero_gpu: bool = False
) -> list[str | torch.device | None]:
    """The devices to load a pipeline on: [`device`] as `--device` always meant (None: CUDA if there is one)
    unless `--devices` is given. ValueError, in one line, for a device this machine lacks or both options."""
    if devices is None:
        check_device(device)
        return [device]
    if device is not None:
        raise ValueError("give --device (COGVIDEOX_DEVICE) or --devices (COGVIDEOX_DEVICES), not both")
    if zero_gpu:
        raise ValueError("--devices is not for a ZeroGPU Space: it lends one GPU per job; leave it unset")
    return parse_devices(devices)


class DevicePool:
    """Pipelines, one per device, each lent to one job at a time, first come first served.

    A pipeline loads its weights on its first job (Renderer): as only the job holding it can use it, no two jobs
    ever load the same one."""

    def __init__(self, pipes: Sequence[CogVideoXPipeline]):
        self.pipes = list(pipes)
        self._free = list(self.pipes)
        # Jobs waiting, in order: (ticket, the device asked for or None).
        self._waiting: list[tuple[object, torch.device | None]] = []
        self._changed = threading.Condition()

    @property
    def busy(self) -> int:
        """How many pipelines are lent out now."""
        with self._changed:
            return len(self.pipes) - len(self._free)

    @contextmanager
    def take(
        self,
        wanted: Callable[[], bool] = lambda: True,
        device: torch.device | None = None,
        poll_s: float = 0.5,
    ) -> Iterator[CogVideoXPipeline | None]:
        """Wait for a free pipeline (on `device` if given), lend it for the `with` block, then give it back.
        None at once if none is on `device`: a local prompt model there needs no pipeline out of the way.

        Raises GenerationCancelled once `wanted()` is false while still waiting (checked every `poll_s`)."""
        if device is not None and not any(_key(p.device) == _key(device) for p in self.pipes):
            yield None  # no pipeline of ours shares that device
            return
        ticket = object()
        with self._changed:
            self._waiting.append((ticket, device))
            try:
                while (pipe := self._assigned(ticket)) is None:
                    if not wanted():
                        raise GenerationCancelled("cancelled while waiting for the GPU")
                    self._changed.wait(poll_s)
                self._free.remove(pipe)
            finally:
                self._waiting = [w for w in self._waiting if w[0] is not ticket]
                self._changed.notify_all()  # a later waiter may now be first for a free device
        try:
            yield pipe
        finally:
            with self._changed:
                self._free.append(pipe)
                self._changed.notify_all()

    def _assigned(self, ticket: object) -> CogVideoXPipeline | None:
        """The free pipeline `ticket` gets once every earlier waiter has had its pick (None: none left for it)."""
        free = list(self._free)
        for waiter, device in self._waiting:
            pipe = next((p for p in free if device is None or _key(p.device) == _key(device)), None)
            if waiter is ticket:
                return pipe
            if pipe is not None:
                free.remove(pipe)
        return None
