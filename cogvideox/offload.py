"""Where weights live while each stage runs: one mechanism for the three memory modes.

- resident:   every weight on the device all the time.
- model:      each component (T5, transformer, VAE) on the device only inside its stage.
- sequential: weights stay in (pinned) CPU memory; repeated blocks stream to the device one at a time, the next
              block copied on a side stream while the current one computes.

Off-device parameters hold an empty tensor, so a stage that forgot `use()` fails loudly instead of running slowly
on the CPU; their home copies live in `Offloader._home`.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

GiB = 2**30


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def free_device_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free


def pick_memory_mode(free: int | None, sizes: dict[str, int]) -> str:
    """The fastest mode whose weights plus working memory fit in `free` bytes.

    Working memory at 720x480x49 in FP16 (benchmarks/bench_memory.py, predicted): denoise 1.5 GiB, decode 7.8 GiB
    untiled or 2.0 GiB tiled (untiled is only tried when it fits), plus ~1.5 GiB the allocator cannot see (CUDA
    context, workspaces, fragmentation). Resident keeps room for a tiled decode with a wide margin; model mode's
    peak is the largest component (T5) with the text stage's small working memory.
    """
    if free is None:
        return "resident"
    if free >= sum(sizes.values()) + 8 * GiB:
        return "resident"
    if free >= max(sizes.values()) + 4 * GiB:
        return "model"
    return "sequential"


def _tensors(module: nn.Module):
    """(owner, name, tensor) for every parameter and buffer, owners being the submodules that hold them."""
    seen = set()  # tied weights (T5's shared embedding) appear under two owners
    for owner in module.modules():
        for name, t in [*owner._parameters.items(), *owner._buffers.items()]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                yield owner, name, t


def _block_lists(module: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks worth streaming: transformer_blocks, T5's encoder.block (not the lists inside a block)."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    nested = {id(m) for blocks in lists for m in blocks.modules() if m is not blocks}
    return [blocks for blocks in lists if id(blocks) not in nested]


class Offloader:
    MODES = ("resident", "model", "sequential")
    # Sequential mode streams these components' blocks. The VAE (0.4 GB) moves whole: it runs once per frame
    # chunk and tile, and streaming would copy it 7 to 63 times per video.
    STREAMED = ("text_encoder", "transformer")

    def __init__(self, device: torch.device, mode: str = "auto"):
        if mode not in (*self.MODES, "auto"):
            raise ValueError(f"memory mode must be one of {self.MODES} or 'auto', got {mode!r}")
        self.device, self.mode = torch.device(device), mode
        self._home: dict[int, torch.Tensor] = {}  # id(param or buffer) -> its CPU copy
        self._streams: list = []  # hook handles of sequential mode
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # -- placement ---------------------------------------------------------------------------------------

    def place(self, modules: dict[str, nn.Module]) -> str:
        """Put freshly loaded (CPU) modules where the mode wants them; resolves mode 'auto'."""
        if self.mode == "auto":
            sizes = {name: module_bytes(m) for name, m in modules.items()}
            self.mode = pick_memory_mode(free_device_memory(self.device), sizes)
        for name, module in modules.items():
            if self.mode == "resident":
                module.to(self.device)
            else:
                self._make_home(module)
                if self.mode == "sequential" and name in self.STREAMED:
                    for blocks in _block_lists(module):
                        self._stream_blocks(blocks)
        return self.mode

    def _make_home(self, module: nn.Module) -> None:
        pin = self.device.type == "cuda"
        for _, _, t in _tensors(module):
            home = t.detach().cpu()
            self._home[id(t)] = home.pin_memory() if pin else home
            t.data = torch.empty(0, dtype=t.dtype, device=self.device)

    def _fetch(self, module: nn.Module, stream=None) -> None:
        for _, _, t in _tensors(module):
            home = self._home.get(id(t))
            if home is not None and t.numel() != home.numel():
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    t.data = home.to(self.device, non_blocking=True, copy=True)
                if stream is not None:
                    t.data.record_stream(torch.cuda.current_stream(self.device))

    def _evict(self, module: nn.Module) -> None:
        for _, _, t in _tensors(module):
            if id(t) in self._home:
                t.data = torch.empty(0, dtype=t.dtype, device=self.device)

    def _stream_blocks(self, blocks: nn.ModuleList) -> None:
        """Hooks: before block i runs it must be on the device and block i+1 starts copying; after, i leaves.

        The CPU only queues work, so left alone it would run ahead of the GPU and queue every block's copy at once
        (all of T5 on the device). Before block i+1's copy is queued, block i-2 must have finished on the GPU: at
        most three blocks' weights are allocated (i-1 finishing, i running, i+1 arriving), and the GPU always
        has the next block's kernels queued.
        """
        copied, done = {}, {}  # block -> CUDA event: its copy arrived / its compute finished

        def prefetch(j: int) -> None:
            if self.copy_stream is None:
                self._fetch(blocks[j])
                return
            self._fetch(blocks[j], self.copy_stream)
            copied[j] = torch.cuda.Event()
            copied[j].record(self.copy_stream)

        def before(i: int):
            def hook(module, args, kwargs=None):
                if i in copied:
                    torch.cuda.current_stream(self.device).wait_event(copied.pop(i))
                self._fetch(module)  # no-op when prefetched
                previous = done.pop((i - 2) % len(blocks), None)
                if previous is not None:
                    previous.synchronize()
                prefetch((i + 1) % len(blocks))

            return hook

        def after(i: int):
            def hook(module, args, output):
                self._evict(module)
                if self.copy_stream is not None:
                    done[i] = torch.cuda.Event()
                    done[i].record(torch.cuda.current_stream(self.device))

            return hook

        for i, block in enumerate(blocks):
            self._streams.append(block.register_forward_pre_hook(before(i)))
            self._streams.append(block.register_forward_hook(after(i)))
        blocks._streamed = True

    # -- stages --------------------------------------------------------------------------------------------

    @contextmanager
    def use(self, module: nn.Module):
        """The module's weights are usable on the device inside the block (streamed ones: block by block)."""
        if self.mode in ("resident", "auto"):
            yield module
            return
        streamed = {id(t) for blocks in _block_lists(module) if getattr(blocks, "_streamed", False)
                    for _, _, t in _tensors(blocks)}  # fmt: skip
        for _, _, t in _tensors(module):
            if id(t) not in streamed and id(t) in self._home:
                t.data = self._home[id(t)].to(self.device, non_blocking=True, copy=True)
        try:
            yield module
        finally:
            self._evict(module)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the stage's memory to the next one (not gc: ~0.2 s a stage)

    def release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def decode_with_retry(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """VAE decode that never loses the latents to an out-of-memory error: free, then retry smaller."""
        tile_h, tile_w = vae.default_tile[1]
        attempts = [
            {"tiled": False},
            {"tiled": True},
            {"tiled": True, "tile_latent_size": (tile_h // 2, tile_w // 2)},
        ]
        free = free_device_memory(self.device)
        # The untiled decode of 720x480 works in 7.8 GiB (FP16, benchmarks/bench_memory.py), budgeted at 10 with
        # what the allocator does not show. On a GPU, skip it when that cannot fit, and in sequential mode, which
        # promises a small peak (tiled: 2 GiB).
        untiled = 10 * GiB * z.shape[-1] * z.shape[-2] / (90 * 60) * z.element_size() / 2
        if free is not None and (self.mode == "sequential" or free < untiled):
            attempts = attempts[1:]
        for kwargs in attempts[:-1]:
            try:
                return vae.decode(z, **kwargs)
            except torch.OutOfMemoryError:
                self.release()
        return vae.decode(z, **attempts[-1])  # nothing smaller to try: an OOM here propagates
