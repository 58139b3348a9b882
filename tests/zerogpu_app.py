"""app.py as on a Hugging Face ZeroGPU Space, on a machine without a GPU: tests/test_zerogpu.py runs it.

    python tests/zerogpu_app.py serve [app options]   # app.main(), as the Space runs it
    python tests/zerogpu_app.py load [app options]    # load_pipeline() at start-up; prints what spaces recorded

The environment (SPACES_ZERO_GPU=true, SPACES_ZERO_DEVICE_API_URL) points spaces at a stand-in for the ZeroGPU
device API. All of spaces runs for real: its torch emulation in the main thread, the start-up report, schedule,
allow and release, the forked worker, the pickling of arguments and results, the forwarding of progress and
errors. Only attaching the GPU inside the worker is stubbed, since it needs one: `init` (CUDA_VISIBLE_DEVICES and
a first CUDA tensor) and `move` (the weights recorded at start-up copied onto the device). Without them the
worker has no CUDA, so `serve` runs with --device cpu. A CPU-only torch wheel also lacks three things spaces
reads from torch as it is imported; they get harmless stand-ins.

Test hooks, inside the worker: a prompt with REFUSE makes the pipeline raise ValueError, OOM a cuDNN-style
out-of-memory RuntimeError, BUG a KeyError. ZEROGPU_PROGRESS_LOG names a file that gets one JSON line per
progress update the main process's queue receives.
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

if torch.version.cuda is None:  # a CPU-only wheel lacks what spaces reads from torch as it is imported
    torch.version.cuda = "12.8"
    torch._C._cuda_init = lambda: None
    torch.cuda._is_in_bad_fork = bool  # bool() is False; spaces calls it in a process pool, which pickles it

import spaces  # before app, as in app.py: it patches torch as it is imported
from gradio.queueing import Queue
from spaces.zero import torch as zero_torch
from spaces.zero.torch import patching

import app
from cogvideox.offload import module_bytes
from cogvideox.pipeline import CogVideoXPipeline
from cogvideox.quantize import is_quantized
from webapp import launch, serve

FAILURES = {
    "REFUSE": lambda: ValueError("the prompt is refused by the pipeline"),
    "OOM": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    "BUG": lambda: KeyError("transformer_blocks.0"),
}


def stub_gpu_attach() -> None:
    zero_torch.init = lambda nvidia_uuid: None
    zero_torch.move = lambda callback=None: None


def fail_on_cue() -> None:
    encode = CogVideoXPipeline.encode_prompts

    def encode_prompts(self, prompts):
        for cue, error in FAILURES.items():
            if any(cue in p for p in prompts):
                raise error()
        return encode(self, prompts)

    CogVideoXPipeline.encode_prompts = encode_prompts


def log_progress(path: str) -> None:
    set_progress = Queue.set_progress

    def logged(self, event_id, iterables):
        with open(path, "a") as f:
            for it in iterables or []:
                f.write(json.dumps({"pid": os.getpid(), "desc": it.desc, "index": it.index}) + "\n")
        return set_progress(self, event_id, iterables)

    Queue.set_progress = logged


def report_load(argv: list[str]) -> None:
    # Our code must not ask the driver anything in the main process (spaces answers with a stand-in here). Only
    # calls from cogvideox/ count: torchao, imported by transformers as T5 loads, probes the GPU at import itself.
    queries = []
    capability = torch.cuda.get_device_capability

    def spy(*a, **k):
        if "cogvideox" in Path(sys._getframe(1).f_code.co_filename).parts:
            queries.append(a)
        return capability(*a, **k)

    torch.cuda.get_device_capability = spy
    pipe, notice = serve.load_pipeline(launch.parse_args(argv))
    if pipe is None:
        raise SystemExit(notice)
    param = next(pipe.transformer.parameters())
    components = (pipe.text_encoder, pipe.transformer, pipe.vae)
    print(
        json.dumps(
            {
                "device": str(pipe.device),
                "memory_mode": pipe.offloader.mode,
                "compile": pipe.compile,
                "loaded": pipe.loaded,
                "quantize": pipe.quantize,
                "quantized_linears": sum(
                    is_quantized(m) for c in components for m in c.modules() if isinstance(m, nn.Linear)
                ),
                "capability_queries": len(queries),
                "weight_bytes": sum(module_bytes(c) for c in components),
                "param_device": str(param.device),
                "recorded": len(patching.cuda_aliases),
                "packed_bytes": zero_torch.pack(),  # what spaces does at launch: the recorded weights go to disk
            }
        )
    )


if __name__ == "__main__":
    assert spaces.zero.Config.zero_gpu, "run with SPACES_ZERO_GPU=true"
    command, argv = sys.argv[1], sys.argv[2:]
    if command == "load":
        report_load(argv)
    else:
        stub_gpu_attach()
        fail_on_cue()
        if log := os.environ.get("ZEROGPU_PROGRESS_LOG"):
            log_progress(log)
        app.main(argv)
