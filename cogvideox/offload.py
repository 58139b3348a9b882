"""Where weights live while each stage runs: one mechanism for the three memory modes.

- resident:   every weight on the device all the time.
- model:      each component (T5, transformer, VAE) on the device only inside its stage.
- sequential: weights stay in (pinned) CPU memory; repeated blocks stream to the device one at a time, the next
              block copied on a side stream while the current one computes.

Off-device parameters hold an empty tensor, so a stage that forgot `use()` fails loudly instead of running slowly
on the CPU; their home copies live in `Offloader._home`.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .quantize import to_device

GiB = 2**30


# How cuDNN, cuBLAS and the CUDA runtime word a failed allocation when it surfaces as a plain RuntimeError
# (a workspace that could not be allocated is exactly where an untiled decode runs short).
_OOM_MESSAGES = (
    "out of memory",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "Unable to find a valid cuDNN algorithm",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
)


def is_out_of_memory(error: BaseException) -> bool:
    """True for every form a device out-of-memory takes: torch's OOM type and cuDNN/cuBLAS allocation failures."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MESSAGES)


def module_bytes(module: nn.Module) -> int:
    """Bytes of the module's weights as stored, each tensor once (T5's tied embedding is one tensor under two
    names; an 8-bit weight counts its 8-bit data and scales, not the 16-bit it reads as)."""
    return sum(leaf.numel() * leaf.element_size() for _, _, t in _tensors(module) for leaf in _leaves(t))


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free for this process's tensors on `device`: free on the device plus what the allocator holds cached
    but unused (it is not handed back after each stage when pipelines share the process: `Offloader`)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


# Bytes a denoising step holds above the weights per (token x model width), CFG batch 2 in 16 bits, predicted by
# benchmarks/bench_memory.py: 2B (sin-cos) 1.47 GiB at 17,776 tokens x 1920; rotary models (5B, 1.5) more, the
# rotated q/k in FP32: 1.5-5B 9.35 GiB at 45,106 x 3072 (1360x768x81) and 17.8 GiB at 85,906 (x161).
DENOISE_BYTES = {"sincos": 48, "rotary": 73}


def denoise_working_bytes(rotary: bool, tokens: int, width: int) -> int:
    """The denoising step's working memory (see DENOISE_BYTES) for `tokens` text and video tokens."""
    return DENOISE_BYTES["rotary" if rotary else "sincos"] * tokens * width


def default_working_bytes(transformer, vae) -> int:
    """The denoising step's working memory at the model's default size (CFG on, 16-bit), from its configs
    (`config.TransformerConfig`, `VAEConfig`): what the memory mode is picked for."""
    from .config import GenerationDefaults, latent_frames

    d, s = GenerationDefaults.for_model(transformer, vae), vae.spatial_compression
    frames = sum(latent_frames(d.num_frames, transformer, vae))  # CogVideoX 1.5's padding included
    tokens = frames // transformer.temporal_patch * (d.height // s // transformer.patch_size)
    tokens *= d.width // s // transformer.patch_size
    rotary = transformer.use_rotary_positional_embeddings
    return denoise_working_bytes(rotary, transformer.max_text_seq_length + tokens, transformer.inner_dim)


def pick_memory_mode(free: int | None, sizes: dict[str, int], working: int = 0) -> str:
    """The fastest mode whose weights plus working memory fit in `free` bytes; `working`: the denoising step's
    (`denoise_working_bytes` at the model's default size).

    Working memory at 720x480x49 in FP16 (benchmarks/bench_memory.py, predicted): denoise 1.5 GiB, decode 7.8 GiB
    untiled or 2.0 GiB tiled (untiled is only tried when it fits), plus ~1.5 GiB the allocator cannot see (CUDA
    context, workspaces, fragmentation). Resident keeps room for a tiled decode with a wide margin, or for the
    denoising step where that is larger (CogVideoX 1.5 at 1360x768: 9.35 GiB); model mode's peak is the largest
    component (T5) with the text stage's small working memory, or the transformer with the step's.
    """
    if free is None:
        return "resident"
    if free >= sum(sizes.values()) + max(8 * GiB, working + int(3.5 * GiB)):
        return "resident"
    if free >= max(max(sizes.values()) + 4 * GiB, sizes.get("transformer", 0) + working + int(1.5 * GiB)):
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


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's data: itself, or an 8-bit weight's (a tensor subclass) inner data
    and scales. These are what host buffers pack and what moves to the device."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names for leaf in _leaves(getattr(t, name))]


def _rewrap(owner: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """An 8-bit weight whose inner tensors just became placeholders on the device, rebuilt around them so that its
    own device says where its data is when it is used; returns what `owner` now holds (a Parameter's inner
    tensors are aliases of those it was made from: fetches must swap theirs)."""
    if not is_traceable_wrapper_subclass(t):
        return t
    names, context = t.__tensor_flatten__()
    new = type(t).__tensor_unflatten__({n: getattr(t, n) for n in names}, context, t.shape, t.stride())
    if name in owner._parameters:
        new = owner._parameters[name] = nn.Parameter(new, requires_grad=False)
    else:
        owner._buffers[name] = new
    return new


def _block_lists(module: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks worth streaming: transformer_blocks, T5's encoder.block (not the lists inside a block)."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    nested = {id(m) for blocks in lists for m in blocks.modules() if m is not blocks}
    return [blocks for blocks in lists if id(blocks) not in nested]


class HostPack:
    """A group of tensors' CPU home: one flat byte buffer, each tensor a view at an aligned offset.

    One buffer per streamed block (or per component) means one page-locked allocation of exactly its size, pinned
    with cudaHostRegister (PyTorch's pinned allocator would round every tensor up to a power of two: ~1.4x the
    weights), and one host-to-device copy per fetch.
    """

    ALIGN = 256  # bytes: what cudaMalloc gives, so each device view starts aligned too

    def __init__(self, tensors: list[torch.Tensor], device: torch.device):
        """Moves `tensors` home: their values go into the buffer, each tensor keeps an empty placeholder on
        `device` (copied one at a time, so packing needs no more than one tensor's worth of extra memory)."""
        self.tensors, self.specs, self.offsets, size = tensors, [], [], 0
        for t in tensors:
            self.specs.append((t.shape, t.dtype))
            self.offsets.append(size)
            size += -(-t.numel() * t.element_size() // self.ALIGN) * self.ALIGN
        self.buffer = torch.empty(size, dtype=torch.uint8)
        self.pinned = self.on_device = False
        for t, view in zip(tensors, self.views(self.buffer)):
            view.copy_(t.detach())
            t.data = torch.empty(0, dtype=t.dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's shape and dtype, viewed into `buffer` (the home, or its copy on the device)."""
        return [
            buffer[o : o + shape.numel() * dtype.itemsize].view(dtype).view(shape)
            for (shape, dtype), o in zip(self.specs, self.offsets)
        ]

    def pin(self, runtime) -> int:
        """Page-locks the buffer: 0, or the CUDA error code, the runtime's last error then cleared."""
        if not self.nbytes or self.pinned:
            return 0
        code = int(runtime.cudaHostRegister(self.buffer.data_ptr(), self.nbytes, 0))
        if code:
            runtime.cudaGetLastError()
        self.pinned = not code
        return code

    def unpin(self, runtime) -> int:
        """0, or the CUDA error code, the runtime's last error then cleared (the buffer counts as unlocked:
        there is nothing else to try)."""
        if not self.pinned:
            return 0
        code = int(runtime.cudaHostUnregister(self.buffer.data_ptr()))
        if code:
            runtime.cudaGetLastError()
        self.pinned = False
        return code


@functools.cache
def _cuda_get_last_error():
    """cudaGetLastError of the libcudart torch loaded (the error state is per library copy and thread), from the
    process's memory map, else from its global symbols; None where neither has it (then nothing clears it)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    loaded = sorted({line.split()[-1] for line in maps.splitlines() if "/libcudart.so" in line})
    for library in [*loaded, None]:
        try:
            function = ctypes.CDLL(library).cudaGetLastError
        except (OSError, AttributeError):
            continue
        function.restype = ctypes.c_int
        return function
    return None


class _Runtime:
    """torch's CUDA runtime bindings plus cudaGetLastError, which they lack. A failed runtime call leaves its error
    as the thread's last error, and torch's next kernel-launch check (which reads it) would raise it at an
    unrelated op: whoever sees a failure clears it."""

    def __init__(self, bindings):
        self._bindings = bindings

    def __getattr__(self, name: str):
        return getattr(self._bindings, name)

    def cudaGetLastError(self) -> int:
        function = _cuda_get_last_error()
        return 0 if function is None else int(function())


def cuda_runtime():
    """The CUDA runtime calls page-locking makes: cudaHostRegister, cudaHostUnregister, cudaGetLastError."""
    bindings = torch.cuda.cudart()
    return bindings if hasattr(bindings, "cudaGetLastError") else _Runtime(bindings)


def _error_text(runtime, code: int) -> str:
    try:
        return f"{runtime.cudaGetErrorString(runtime.cudaError(code))} (error {code})"
    except (AttributeError, TypeError, ValueError):  # a code the bindings' enum refuses
        return f"error {code}"


def pin_all(packs: list[HostPack], runtime) -> None:
    """Page-locks every pack, or none: after a failure the packs locked so far are unlocked again and one
    RuntimeError line says what failed (CUDA's error state cleared)."""
    try:
        for pack in packs:
            if code := pack.pin(runtime):
                break
        else:
            return
    except BaseException:  # an interrupt: nothing stays locked either
        unpin_all(packs, runtime)
        raise
    problems = unpin_all(packs, runtime)
    i = packs.index(pack)
    done = sum(p.nbytes for p in packs[:i]) / GiB
    raise RuntimeError(
        f"page-locking the weights' host memory failed: cudaHostRegister of buffer {i + 1} of {len(packs)} "
        f"({pack.nbytes / GiB:.2f} GiB) gave {_error_text(runtime, code)}; the {done:.2f} GiB locked before it "
        f"{'were unlocked again' if not problems else 'were unlocked, but ' + problems}"
    )


def unpin_all(packs: list[HostPack], runtime) -> str:
    """Unlocks the page-locked packs: '' or one phrase naming the failures (each CUDA error cleared)."""
    codes = [code for pack in packs if (code := pack.unpin(runtime))]
    if not codes:
        return ""
    return f"cudaHostUnregister failed for {len(codes)} buffer(s): {_error_text(runtime, codes[0])}"


def _unpin_at_exit(packs: list[HostPack]) -> None:
    """The finalizer of a placed Offloader: nothing to raise to, so a failure is one line on stderr."""
    if any(pack.pinned for pack in packs) and (problems := unpin_all(packs, cuda_runtime())):
        print(f"[cogvideox] {problems}", file=sys.stderr, flush=True)


# Offloaders of CUDA devices alive in this process (pipelines of a device pool share one process).
_CUDA_OFFLOADERS: weakref.WeakSet[Offloader] = weakref.WeakSet()


def empty_cuda_cache(owner: Offloader | None = None) -> None:
    """torch.cuda.empty_cache() takes no device: it empties every GPU's cache, so with pipelines of other GPUs in
    this process (a device pool; a video pipeline beside the local prompt enhancer) it would flush theirs mid-job. It
    is skipped then: an allocation that does not fit makes the allocator free that device's cache by itself before it
    reports out of memory. `owner`: the caller's own Offloader, which does not count as another."""
    if not set(_CUDA_OFFLOADERS) - {owner}:
        torch.cuda.empty_cache()


class Offloader:
    MODES = ("resident", "model", "sequential")
    # Sequential mode streams these components' blocks. The VAE (0.4 GB) moves whole: it runs once per frame
    # chunk and tile, and streaming would copy it 7 to 63 times per video.
    STREAMED = ("text_encoder", "transformer")

    def __init__(self, device: torch.device, mode: str = "auto"):
        if mode not in (*self.MODES, "auto"):
            raise ValueError(f"memory mode must be one of {self.MODES} or 'auto', got {mode!r}")
        self.device, self.mode = torch.device(device), mode
        # Page-lock the host buffers: copies to a GPU are then fast and asynchronous.
        self.page_lock = self.device.type == "cuda"
        if self.device.type == "cuda":
            _CUDA_OFFLOADERS.add(self)
        # id(module) -> the home of the weights it owns (not those of its streamed blocks)
        self._packs: dict[int, HostPack] = {}
        self._streams: list = []  # hook handles of sequential mode
        self.copy_stream = None  # sequential mode on CUDA; made in place(), never before CUDA is needed
        self.copies = 0  # host-to-device copies made (one per fetched pack)
        self.decode_attempts: list[dict] = []  # the last decode: each attempt's options and error, if any

    @property
    def home_bytes(self) -> int:
        return sum(pack.nbytes for pack in self._packs.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(pack.nbytes for pack in self._packs.values() if pack.pinned)

    # -- placement ---------------------------------------------------------------------------------------

    def place(self, modules: dict[str, nn.Module], working: int = 0) -> str:
        """Put freshly loaded (CPU) modules where the mode wants them; resolves mode 'auto' (`working`: the
        denoising step's working memory, see `pick_memory_mode`).

        All or nothing: if anything fails (page-locking, say), no host buffer stays locked, hooked or held here, so
        a retried load starts clean; the modules are left without their weights (load them again).
        """
        if self.mode == "auto":
            sizes = {name: module_bytes(m) for name, m in modules.items()}
            self.mode = pick_memory_mode(free_device_memory(self.device), sizes, working)
        try:
            for name, module in modules.items():
                self._place_one(name, module)
            if self.page_lock and self._packs:
                packs = list(self._packs.values())
                pin_all(packs, cuda_runtime())
                weakref.finalize(self, _unpin_at_exit, packs)
            if self.device.type == "cuda" and self._packs and self.mode == "sequential":
                self.copy_stream = torch.cuda.Stream(self.device)
        except BaseException:
            self._forget()
            raise
        return self.mode

    def _place_one(self, name: str, module: nn.Module) -> None:
        if self.mode == "resident":
            to_device(module, self.device)
            return
        lists = _block_lists(module) if self.mode == "sequential" and name in self.STREAMED else []
        blocks = [block for blocks in lists for block in blocks]
        streamed = {id(t) for block in blocks for _, _, t in _tensors(block)}
        self._pack(module, [entry for entry in _tensors(module) if id(entry[2]) not in streamed])
        for block in blocks:
            self._pack(block, list(_tensors(block)))
        for block_list in lists:
            self._stream_blocks(block_list)

    def _forget(self) -> None:
        """Drops every home and hook (a stale home would also be found by a new module at a reused id())."""
        packs = list(self._packs.values())
        if any(pack.pinned for pack in packs):
            unpin_all(packs, cuda_runtime())
        for handle in self._streams:
            handle.remove()
        self._packs.clear()
        self._streams.clear()
        self.copy_stream = None

    def describe(self) -> str:
        """One line for the load log: the mode and the host memory holding the off-device weights."""
        if not self._packs:
            return f"{self.mode} mode: all weights on {self.device}"
        pinned = f", {self.pinned_bytes / GiB:.2f} GiB of it page-locked" if self.pinned_bytes else ""
        return (
            f"{self.mode} mode: weights at home in {len(self._packs)} host buffers of "
            f"{self.home_bytes / GiB:.2f} GiB{pinned}"
        )

    def _pack(self, owner: nn.Module, entries: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
        """`entries`: (holder, name, tensor) as `_tensors` gives them; 8-bit weights pack their inner tensors."""
        if entries:
            pack = HostPack([leaf for _, _, t in entries for leaf in _leaves(t)], self.device)
            pack.tensors = [leaf for holder, name, t in entries for leaf in _leaves(_rewrap(holder, name, t))]
            self._packs[id(owner)] = pack

    def _fetch(self, owner: nn.Module, stream=None) -> None:
        """One copy of the owner's pack to the device; its tensors become views into that copy."""
        pack = self._packs.get(id(owner))
        if pack is None or pack.on_device:
            return
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            copy = pack.buffer.to(self.device, non_blocking=True, copy=True)
        if stream is not None:  # allocated on the copy stream, used and freed on the compute stream
            copy.record_stream(torch.cuda.current_stream(self.device))
        for t, view in zip(pack.tensors, pack.views(copy)):
            t.data = view
        pack.on_device = True
        self.copies += 1

    def _evict(self, owner: nn.Module) -> None:
        pack = self._packs.get(id(owner))
        if pack is not None and pack.on_device:
            for t in pack.tensors:
                t.data = torch.empty(0, dtype=t.dtype, device=self.device)
            pack.on_device = False

    def _stream_blocks(self, blocks: nn.ModuleList) -> None:
        """Hooks: before block i runs it must be on the device and block i+1 starts copying; after, i leaves.

        The CPU only queues work, so left alone it would run ahead of the GPU and queue every block's copy at once
        (all of T5 on the device). Before block i+1's copy is queued, block i-2 must have finished on the GPU: at
        most three blocks' weights are allocated (i-1 finishing, i running, i+1 arriving), and the GPU always
        has the next block's kernels queued. The last block prefetches block 0 for the next pass.
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

    def write_(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """New values for a weight wherever they live: the tensor itself (resident mode), else its view in its host
        pack (what every fetch copies), and the device copy too while that pack is fetched. In place, cast to the
        weight's dtype: compiled graphs and the packs' layout stay as they are.

        An 8-bit weight (a tensor subclass) takes a `value` of its own kind (`quantize.stored_like`): each of its
        inner tensors (8-bit data, scales) is written so, into those the packs and fetches know by identity."""
        if is_traceable_wrapper_subclass(tensor):
            if type(value) is not type(tensor):  # a plain copy_ would land in a dequantized temporary: lost
                raise TypeError(
                    f"{type(tensor).__name__} weight: write a value of its kind, not {type(value).__name__}"
                )
            for leaf, new in zip(_leaves(tensor), _leaves(value), strict=True):
                self.write_(leaf, new)
            return
        for pack in self._packs.values():
            for t, view in zip(pack.tensors, pack.views(pack.buffer)):
                if t is tensor:
                    view.copy_(value)
                    if pack.on_device:
                        tensor.copy_(value)
                    return
        tensor.copy_(value)

    # -- stages --------------------------------------------------------------------------------------------

    @contextmanager
    def use(self, module: nn.Module):
        """The module's weights are usable on the device inside the block (streamed ones: block by block)."""
        if self.mode in ("resident", "auto"):
            yield module
            return
        self._fetch(module)
        try:
            yield module
        finally:
            for owner in module.modules():
                self._evict(owner)
            self._empty_cache()  # hand the stage's memory to the next one (not gc: ~0.2 s a stage)

    def release(self) -> None:
        """Frees what nothing refers to any more (an out-of-memory error's tensors, say) into this device's cache,
        and that cache to the driver unless other pipelines share the process (`_empty_cache`)."""
        gc.collect()
        self._empty_cache()

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            empty_cuda_cache(self)

    def decode_with_retry(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """VAE decode that never loses the latents to an out-of-memory error: free, then retry smaller.

        Every form of out-of-memory counts (torch's type, cuDNN/cuBLAS workspace failures); memory is released
        after the `except` block is left, when the failed attempt's traceback (and its tensors) are gone.
        """
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
        self.decode_attempts = log = []
        for kwargs in attempts[:-1]:
            try:
                video = vae.decode(z, **kwargs)
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                log.append({"kwargs": kwargs, "error": f"{type(e).__name__}: {e}"})
                if not is_out_of_memory(e):
                    raise
            else:
                log.append({"kwargs": kwargs, "error": None})
                return video
            self.release()
        log.append({"kwargs": attempts[-1], "error": None})
        try:
            return vae.decode(z, **attempts[-1])  # nothing smaller to try: an error here propagates
        except RuntimeError as e:
            log[-1]["error"] = f"{type(e).__name__}: {e}"
            raise
