"""GPU defects found by reading the source (issue 20), checked on the CPU by emulation: two jobs in threads as the
device pool runs them, calls to CUDA recorded, a fake CUDA runtime that fails where the real one can."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends
from torch.utils._python_dispatch import TorchDispatchMode

from cogvideox import CogVideoXPipeline, offload
from cogvideox.offload import Offloader, module_bytes
from webapp.pool import DevicePool

FLASH, MATH = SDPBackend.FLASH_ATTENTION, SDPBackend.MATH
WAIT_S = 30
NAMED_KERNELS = {
    "aten._scaled_dot_product_flash_attention_for_cpu.default": FLASH,
    "aten._scaled_dot_product_attention_math.default": MATH,
}
GiB = 2**30


class AttentionCalls(TorchDispatchMode):
    """The attention kernels one thread ran (dispatch modes are per thread): the kernel called by name, or, for
    PyTorch's own pick, the kernels the process-wide flags allowed at that moment."""

    def __init__(self):
        super().__init__()
        self.kernels: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in NAMED_KERNELS:
            self.kernels.append((NAMED_KERNELS[str(func)],))
        elif "scaled_dot_product" in str(func):
            self.kernels.append(tuple(_cur_sdpa_kernel_backends()))
        return func(*args, **(kwargs or {}))


def test_two_jobs_in_threads_each_run_their_own_kernel_and_leave_the_process_flags_alone(tiny_2b):
    # The device pool's order of events: job A enters its kernel, B enters its own, A ends, then B. A job's kernel
    # holds for all its steps, and afterwards PyTorch may still pick any kernel (a call only the math kernel can
    # serve, as a local prompt model's might be, still runs).
    pipes = [CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu") for _ in range(2)]
    pool = DevicePool(pipes)
    before = _cur_sdpa_kernel_backends()
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    ran, errors = {}, []

    def job(name, kernel, entered, wait_for):
        def step(i, total):
            if i == 1:
                entered.set()
                assert wait_for.wait(WAIT_S), f"job {name} waited in vain"

        try:
            with pool.take() as pipe:
                pipe.attention_kernel = lambda *shape: kernel  # the pick, as timed on a GPU
                calls, denoise = AttentionCalls(), pipe.denoise

                def recorded(
                    *args, **kwargs
                ):  # the transformer's attention only (T5's and the VAE's: PyTorch's)
                    with calls:
                        return denoise(*args, **kwargs)

                pipe.denoise = recorded
                pipe("a red kite over a beach", num_inference_steps=3, num_frames=9, seed=1, callback=step)
                ran[name] = calls.kernels
        except BaseException as e:
            errors.append(e)
            a_in.set(), b_in.set(), a_done.set()  # let the other job end too
        finally:
            if name == "A":
                a_done.set()

    a = threading.Thread(target=job, args=("A", FLASH, a_in, b_in))
    b = threading.Thread(target=job, args=("B", MATH, b_in, a_done))
    a.start()
    assert a_in.wait(WAIT_S)
    b.start()
    a.join(WAIT_S), b.join(WAIT_S)
    assert not errors, errors
    assert set(ran["A"]) == {(FLASH,)} and set(ran["B"]) == {(MATH,)}
    assert _cur_sdpa_kernel_backends() == before
    q = torch.randn(1, 2, 8, 16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q[..., :8])  # v narrower than q: math only


# -- the allocator's cache with pipelines of several GPUs in one process --------------------------------------


def test_a_stage_end_or_out_of_memory_empties_every_gpus_cache_only_with_no_other_pipeline_in_the_process(
    tiny_2b, monkeypatch
):
    # torch.cuda.empty_cache() takes no device: called by cuda:0's pipeline it would flush cuda:1's cache mid-job.
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    gc.collect()
    pipes = [
        CogVideoXPipeline(Path(tiny_2b), "tiny", torch.device("cuda", i), torch.float32, "model")
        for i in (0, 1)
    ]  # as a device pool's, on two GPUs (constructed directly: this machine has none)
    pool = DevicePool(pipes)
    stage = nn.Linear(2, 2)  # placed nowhere: a stage with no weights to move, only its end to see
    with pool.take() as pipe:
        with pipe.offloader.use(stage):
            pass
        pipe.release()  # as a job does after out of memory
    assert emptied == []
    del pool, pipes[1], pipe
    gc.collect()
    assert set(offload._CUDA_OFFLOADERS) == {pipes[0].offloader}
    with pipes[0].offloader.use(stage):
        pass
    pipes[0].release()
    assert len(emptied) == 2  # alone in the process, each stage end and each release still hands memory back


def test_free_memory_counts_what_the_allocator_holds_cached(monkeypatch):
    # Not emptied per stage, the cache is still this process's to use: the decode's untiled try must see it.
    asked = []
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device: asked.append(device) or (1 * GiB, 80 * GiB)
    )
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * GiB)
    assert offload.free_device_memory(torch.device("cuda", 1)) == 4 * GiB
    assert asked == [torch.device("cuda", 1)]
    assert offload.free_device_memory(torch.device("cpu")) is None


# -- page-locking -------------------------------------------------------------------------------------------


class FakeCudart:
    """The CUDA runtime as page-locking meets it. cudaHostRegister fails on its `fail_at`-th call (error 2, out of
    memory); cudaHostUnregister fails (712, not registered) for a buffer not registered or one in `stuck`. A failed
    call sets the last error, which cudaGetLastError returns and clears, as the runtime does per thread."""

    def __init__(self, fail_at: int | None = None, stuck=()):
        self.fail_at, self.stuck = fail_at, set(stuck)
        self.calls, self.registered, self.last_error, self.registers = [], {}, 0, 0

    def _fail(self, code: int) -> int:
        self.last_error = code
        return code

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr))
        self.registers += 1
        if self.registers == self.fail_at:
            return self._fail(2)
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        if ptr not in self.registered or ptr in self.stuck:
            return self._fail(712)
        del self.registered[ptr]
        return 0

    def cudaGetLastError(self):
        self.calls.append(("last error",))
        error, self.last_error = self.last_error, 0
        return error

    def cudaError(self, code):
        return code

    def cudaGetErrorString(self, code):
        return {2: "out of memory", 712: "part or all of the requested memory range is not mapped"}[code]


def _components():
    """Three components as a pipeline loads them; in sequential mode, 5 host buffers (the 3 blocks streamed)."""
    return {
        "text_encoder": nn.Linear(64, 64),
        "transformer": nn.ModuleList([nn.Linear(64, 64) for _ in range(3)]),
        "vae": nn.Linear(64, 32),
    }


def _page_locking(monkeypatch, fake: FakeCudart, mode: str = "sequential") -> Offloader:
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    offloader = Offloader(torch.device("cpu"), mode)
    offloader.page_lock = True  # as on a GPU: the host buffers are the same on the CPU
    return offloader


@pytest.mark.parametrize("fail_at", [1, 4])
def test_page_locking_fails_whole_clears_the_cuda_error_and_a_retry_keeps_no_old_buffer(monkeypatch, fail_at):
    fake = FakeCudart(fail_at=fail_at)
    offloader = _page_locking(monkeypatch, fake)
    with pytest.raises(RuntimeError) as failed:
        offloader.place(_components())
    message = str(failed.value)
    assert "\n" not in message and f"cudaHostRegister of buffer {fail_at} of 5" in message
    assert "out of memory (error 2)" in message and "unlocked again" in message
    registered = [c[1] for c in fake.calls if c[0] == "register"]
    assert len(registered) == fail_at  # none tried after the failure
    assert fake.registered == {} and fake.last_error == 0  # all unlocked; the error read and cleared
    assert sorted(c[1] for c in fake.calls if c[0] == "unregister") == sorted(registered[:-1])
    assert offloader.home_bytes == 0 and offloader._streams == []  # no multi-GB home kept, no hook left

    fake.fail_at = None  # a retried load: fresh weights, every buffer locked, only its own
    components = _components()
    want = sum(module_bytes(m) for m in components.values())
    assert offloader.place(components) == "sequential"
    assert (
        want <= offloader.pinned_bytes == offloader.home_bytes < want + 5 * 256
    )  # buffers rounded up to 256 B
    assert len(fake.registered) == 5 and sum(fake.registered.values()) == offloader.home_bytes
    del (
        offloader,
        components,
        failed,
    )  # the pipeline goes (its modules' hooks and a traceback hold the offloader)
    gc.collect()
    assert fake.registered == {}  # unlocked then


def test_a_failed_unlock_is_reported_and_its_error_cleared(monkeypatch, capsys):
    fake = FakeCudart(fail_at=3)
    offloader = _page_locking(monkeypatch, fake)
    fake.stuck = {None}  # filled below: the first buffer will not unlock
    real_register = fake.cudaHostRegister

    def register(ptr, size, flags):
        if not fake.registered:
            fake.stuck = {ptr}
        return real_register(ptr, size, flags)

    fake.cudaHostRegister = register
    with pytest.raises(
        RuntimeError, match=r"unlocked, but cudaHostUnregister failed for 1 buffer\(s\): part or "
    ):
        offloader.place(_components())
    assert fake.last_error == 0 and offloader.home_bytes == 0

    fake = FakeCudart()  # a placed offloader's finalizer: nothing to raise to, one line on stderr
    offloader = _page_locking(monkeypatch, fake)
    offloader.place(_components())
    fake.stuck = set(fake.registered)
    del offloader  # its modules were a temporary: nothing else holds it
    gc.collect()
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "cudaHostUnregister failed for 5 buffer(s)" in err and fake.last_error == 0
    )


def test_the_local_enhancer_leaves_a_video_pipelines_gpu_cache_alone(tiny_2b, monkeypatch):
    from cogvideox.enhance import LocalBackend

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    gc.collect()
    enhancer = LocalBackend("some/instruct-model", device="cuda:0")  # nothing loaded: release only hands back
    pipe = CogVideoXPipeline(Path(tiny_2b), "tiny", torch.device("cuda", 1), torch.float32, "model")
    enhancer.release()
    assert emptied == []  # the video pipeline on cuda:1 may be mid-job
    del pipe
    gc.collect()
    enhancer.release()
    assert emptied == [1]
