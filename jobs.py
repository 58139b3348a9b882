"""One render job: the progress it reports, its errors in words a user can act on, and ZeroGPU's GPU function.

Hugging Face ZeroGPU (SPACES_ZERO_GPU=true) runs a `spaces.GPU` function in a forked worker process: it pickles
the function's arguments and result, forwards its `gr.Progress` updates and `gr.Error`s, and turns any other
exception into a bare "ZeroGPU worker error". So `render_on_gpu` takes the validated settings and returns the
frames, reaches the pipeline through PIPELINE (set at start-up; the fork inherits it), and turns every failure
into the user's own `gr.Error` inside the worker. Elsewhere app.py runs the same job in a thread of its own.
"""

from __future__ import annotations

import os
import time

if os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true"):  # as spaces reads it
    import spaces  # it patches torch as it is imported, so it comes before torch
else:
    spaces = None

import gradio as gr

from cogvideox.offload import is_out_of_memory
from cogvideox.pipeline import CogVideoXPipeline, GenerationCancelled, GenerationResult

ZERO_GPU = spaces is not None
# The scheduler refuses a longer request ("ZeroGPU illegal duration"). spaces does not hold the cap (the server
# checks it) and the docs do not give it; 300 s is the per-call maximum Hugging Face staff gave
# (huggingface.co/spaces/zero-gpu-explorers/README/discussions/7). Override it if it moves.
ZERO_GPU_MAX_S = int(os.environ.get("ZERO_GPU_MAX_S", 300))
GPU_S_PER_STEP_FRAME = 0.06  # at 720x480: ~2x an A100's 2B speed, plus a minute to start and decode
OOM_ADVICE = (
    "The GPU ran out of memory. Try fewer frames or steps, close other programs using the GPU, or restart "
    "with `--memory-mode sequential` (slower, far less memory). Memory has been freed: you can try again."
)
ZERO_GPU_OOM_ADVICE = (  # the Space's owner chose the memory mode; a visitor can only ask for less
    "The GPU ran out of memory. Try fewer frames or steps. Memory has been freed: you can try again."
)
# Progress-bar text and position for each stage the pipeline reports.
STAGES = {"loading model": ("Loading the model", 0.0), "encoding text": ("Encoding the prompt", 0.0),
          "decoding": ("Decoding the frames", 1.0)}  # fmt: skip

PIPELINE: CogVideoXPipeline | None = None  # ZeroGPU: the app's pipeline, loaded before the worker forks
# Any gr.Progress reports to the current request's bar (its context says which); in ZeroGPU's worker, spaces
# sends the updates to the main process's queue.
_progress = gr.Progress()


def user_error(message: str, title: str = "Error") -> gr.Error:
    """An error the user caused or can act on: shown in the page, no traceback in the server log."""
    return gr.Error(message, title=title, print_exception=False)


def out_of_memory_error() -> gr.Error:
    return user_error(ZERO_GPU_OOM_ADVICE if ZERO_GPU else OOM_ADVICE, title="Out of GPU memory")


def known_error(error: Exception) -> gr.Error | None:
    """The message for a failure the user can act on; None for anything else (a bug)."""
    if isinstance(error, gr.Error):  # a ValueError too (gradio_client's AppError): keep its title and text
        return error
    if isinstance(error, GenerationCancelled):
        return user_error("Cancelled.")
    if isinstance(error, ValueError):  # the library's validation
        return user_error(str(error))
    return None


def progress_reporters(steps: int, progress, wanted=lambda: True):
    """The pipeline's (on_stage, on_step) callbacks, reporting to `progress`; a step stops the run unless wanted()."""
    denoise_start = [0.0]

    def on_stage(name):
        denoise_start[0] = time.perf_counter()
        if name == "denoising":
            progress((0, steps), desc="Denoising", unit="steps")
        else:
            desc, fraction = STAGES.get(name, (name, 0.0))
            progress(fraction, desc=desc)

    def on_step(step, total):
        if not wanted():
            return False
        eta = int((time.perf_counter() - denoise_start[0]) / step * (total - step))
        progress((step, total), desc=f"Denoising, about {eta // 60}:{eta % 60:02d} left", unit="steps")
        return True

    return on_stage, on_step


def gpu_seconds(pipe: CogVideoXPipeline | None, settings: dict) -> int:
    """How long to hold a ZeroGPU for one job: scales with steps x frames x pixels, within the platform's cap."""
    pixels = pipe.defaults["height"] * pipe.defaults["width"] if pipe else 720 * 480
    work = settings["num_inference_steps"] * settings["num_frames"] * pixels / (720 * 480)
    return min(ZERO_GPU_MAX_S, int(60 + GPU_S_PER_STEP_FRAME * work))


def render_on_gpu(settings: dict, progress=_progress) -> GenerationResult:
    """ZeroGPU's GPU function: validated pipeline kwargs in; frames, seed, settings and timings out.

    Nothing can cancel it: the forked worker sees neither the Cancel button nor a closed tab.
    """
    try:
        on_stage, on_step = progress_reporters(settings["num_inference_steps"], progress)
        return PIPELINE(**settings, callback=on_step, on_stage=on_stage)
    except gr.Error:
        raise
    except Exception as e:
        if not is_out_of_memory(e):  # spaces prints the traceback in the server log; the user reads one line
            message = " ".join(f"{type(e).__name__}: {e}".split())  # CUDA errors run over several lines
            message = message if len(message) <= 300 else message[:299] + "…"
            raise known_error(e) or gr.Error(message, title="Generation failed") from e
    # Out of memory: freed outside the except block, whose traceback still holds the step's tensors.
    PIPELINE.release()
    raise out_of_memory_error()


if ZERO_GPU:
    render_on_gpu = spaces.GPU(duration=lambda settings, *_: gpu_seconds(PIPELINE, settings))(render_on_gpu)
