"""One render job: the progress it reports, its errors in words a user can act on, and ZeroGPU's GPU function.

Hugging Face ZeroGPU (SPACES_ZERO_GPU=true) runs a `spaces.GPU` function in a forked worker process: it pickles
the function's arguments and result, forwards its `gr.Progress` updates and `gr.Error`s, and turns any other
exception into a bare "ZeroGPU worker error". So `render_on_gpu` takes the validated settings and returns the
frames, reaches the pipeline through PIPELINE (set at start-up; the fork inherits it), and turns every failure
into the user's own `gr.Error` inside the worker. Elsewhere `Renderer` runs the same job in a thread of its own.

`Renderer` is the page's and the API's /generate: one job per device at a time (pool.py lends each job a device's
pipeline), each session's stoppable by its Cancel, which then says where the job stopped ("Cancelled at step 3 of
50").
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch

from cogvideox.offload import is_out_of_memory
from cogvideox.pipeline import CogVideoXPipeline, GenerationCancelled, GenerationResult
from webapp import ZERO_GPU
from webapp.clips import OUTPUT_TTL_S, clean_outputs, save_clip, write_preview
from webapp.pool import DevicePool
from webapp.ranks import LoadFailed
from webapp.request import Checked, Request, RequestError, endpoint
from webapp.validation import preview_every

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
STAGES = {
    "loading model": ("Loading the model", 0.0),
    "encoding text": ("Encoding the prompt", 0.0),
    "decoding": ("Decoding the frames", 1.0),
}
# The Cancel button stops its session's job at the next step. A cancel from elsewhere (gradio_client) or a
# closed tab is seen another way: Gradio's queue drops the job's event from its running jobs (a cancel) or
# marks it not alive (its client's stream closed), and the job stops at its next step (gradio_event). Only
# that: how long Gradio takes to resume the job after a yield is no sign (under load, or while it copies a
# preview, it took over 2 s, and a visitor lost a job no one cancelled). A job run outside Gradio's queue
# yields every HEARTBEAT_S and stops if not resumed for ABANDONED_S. ZeroGPU runs the job in a forked process
# that cannot see these signals: there a job runs to its end, and the page says so.
HEARTBEAT_S = 0.5
ABANDONED_S = float(os.environ.get("ABANDONED_S", 30))
CANCEL_WAIT_S = float(os.environ.get("CANCEL_WAIT_S", 60))  # Cancel's wait for the job's step to end
STOP_AFTER_S = 2.0  # --parallel, a process failed mid-run: the page gets the message, then the server stops

PIPELINE: CogVideoXPipeline | None = None  # ZeroGPU: the app's pipeline, loaded before the worker forks
# Any gr.Progress reports to the current request's bar (its context says which); in ZeroGPU's worker, spaces
# sends the updates to the main process's queue.
_progress = gr.Progress()


def display_name(model_id: str) -> str:
    """The model as a visitor may see it: a Hub id as it is, a folder of the server's by its name alone."""
    path = Path(model_id)
    return path.name if path.is_absolute() or path.exists() else model_id


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


def load_error(pipe: CogVideoXPipeline, error: Exception) -> gr.Error:
    """Weights that would not load: the whole message in the server's log, the page's without the server's folder
    (the model by its name, a file by its place in the model)."""
    print(f"error: could not load {pipe.model_id}: {error}", file=sys.stderr, flush=True)
    said = str(error).replace(f"{pipe.root}{os.sep}", "").replace(str(pipe.root), "the model's folder")
    return user_error(f"Could not load {display_name(pipe.model_id)}: {said}", title="Model unavailable")


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


def gradio_event():
    """For a job Gradio's queue runs (its event in this context): a function saying whether the queue still runs
    it, i.e. it was neither cancelled (which takes it out of the queue's active jobs) nor left by its client
    (which marks it not alive). None outside the queue (a direct call)."""
    from gradio.context import LocalContext

    queue = getattr(LocalContext.blocks.get(None), "_queue", None)
    event_id = LocalContext.event_id.get(None)
    if queue is None or event_id is None:
        return None

    def find():
        jobs = list(queue.active_jobs)  # read from the job's thread: a copy, as the queue's loop changes it
        return next((e for events in jobs if events for e in events if e._id == event_id), None)

    event = find()
    if event is None:
        return None
    return lambda: event.alive and find() is event


def gpu_seconds(pipe: CogVideoXPipeline | None, settings: dict) -> int:
    """How long to hold a ZeroGPU for one job: scales with steps x frames x pixels, within the platform's cap."""
    pixels = pipe.defaults["height"] * pipe.defaults["width"] if pipe else 720 * 480
    work = settings["num_inference_steps"] * settings["num_frames"] * pixels / (720 * 480)
    return min(ZERO_GPU_MAX_S, int(60 + GPU_S_PER_STEP_FRAME * work))


def render_on_gpu(settings: dict, loras: dict | None = None, progress=_progress) -> GenerationResult:
    """ZeroGPU's GPU function: validated pipeline kwargs and the job's LoRA scales in; frames, seed, settings and
    timings out. The scales are set here, in the worker, beside the weights they change.

    Nothing can cancel it: the forked worker sees neither the Cancel button nor a closed tab.
    """
    try:
        on_stage, on_step = progress_reporters(settings["num_inference_steps"], progress)
        PIPELINE.set_loras(loras or {})
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
    import spaces  # already imported, before torch, by webapp/__init__.py

    render_on_gpu = spaces.GPU(duration=lambda settings, *_: gpu_seconds(PIPELINE, settings))(render_on_gpu)


@dataclass
class Run:
    """One job of one session: set `cancel` to stop it at its next step. `done`: its thread has ended;
    `finished`: its request is ending too (after a Cancel)."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    clip: dict | None = None
    error: Exception | None = None
    by_cancel_button: bool = False  # the page's Cancel says what happened: the job ends without an error
    preview: object = None  # the latest preview frames (F, h, w, 3) the pipeline sent, and how many so far
    previews: int = 0

    def on_preview(self, step, total, frames):
        self.preview, self.previews = frames, self.previews + 1


def cancelled_text(run: Run | None) -> str:
    """What the page says once Cancel has stopped `run` (None: it had not started)."""
    if run is None:
        return "⏹ Cancelled before it started."
    if ZERO_GPU and not run.done.is_set():
        return "⏹ Cancelled. On this Space a started job runs to its end; its clip will not be shown."
    if not run.done.is_set():
        return "⏹ Cancelled: the job stops after the step it is on."
    if isinstance(run.error, GenerationCancelled):
        if m := re.search(r"after step (\d+) of (\d+)", str(run.error)):
            return f"⏹ Cancelled at step {m[1]} of {m[2]}."
        if "waiting" in str(run.error):
            return "⏹ Cancelled while waiting for the GPU."
    if run.clip is not None:
        return "⏹ Cancelled as it finished: its clip was not kept."
    return "⏹ Cancelled."


class Renderer:
    """Render jobs for the page and the API, one at a time per device (even while a cancelled one finishes its
    last step), each in a thread of its own so that its request can notice a cancel or a closed tab.

    `pipe`: one pipeline, or a list of them, one per device (all of one model and settings): up to that many jobs
    run at once, each on a device of its own. `parallel` (ranks.Session, with one pipeline): each job runs on all
    of torchrun's processes."""

    def __init__(
        self,
        pipe: CogVideoXPipeline | Sequence[CogVideoXPipeline] | None,
        output_dir: Path,
        enhancer=None,
        parallel=None,
    ):
        pipes = list(pipe) if isinstance(pipe, Sequence) else [pipe] if pipe is not None else []
        if parallel is not None and len(pipes) > 1:
            raise ValueError(
                "parallel runs each job on all processes: give it one pipeline, not one per device"
            )
        self.pool = DevicePool(pipes)
        self.pipe = pipes[0] if pipes else None  # limits and validation: every pipeline has the same
        self.output_dir, self.enhancer, self.parallel = output_dir, enhancer, parallel
        self.running: dict[str, Run] = {}  # session -> its job, while it runs
        self.checked = Checked(self.pipe, parallel)  # a click's Request, checked once (request.py)
        # What Gradio calls: /generate, its parameters those of a Request.
        self.generate = endpoint(self._generate, "generate", self._generate.__doc__)

    def _generate(self, values: dict, request: gr.Request, progress=_progress):
        """Render a video. seed -1 picks a random one; speed Full, Faster or Fastest (the step cache: Faster and
        Fastest skip steps that change little). Optional: video, a clip to start from (MP4, WebM, MOV, GIF…:
        center-cropped to the model's size at 8 fps; the video has as many frames as it has, up to num_frames),
        changed by strength (0.05 to 1, default 0.8: lower keeps more of it); smooth, a frame interpolated between
        each two, written at 16 fps (as long, smoother); image, the first frame, which image-to-video models
        need. Returns the MP4, the seed used and the settings."""
        try:  # checked when the click locked the buttons, or by the validator: taken as it was
            job = self.checked(values)
        except RequestError as e:
            raise user_error(str(e)) from None
        yield from self._run(job, request.session_hash, progress)

    def _run(self, job: Request, session: str, progress):
        clean_outputs(self.output_dir, OUTPUT_TTL_S)
        # The worker stops at its next step, leaving the GPU to the next job, once the request is gone.
        pulled, latest = [time.monotonic()], []
        run = self.running[session] = Run()
        served = gradio_event()

        def wanted():
            if run.cancel.is_set():
                return False
            if ZERO_GPU:
                return True
            return served() if served is not None else time.monotonic() - pulled[0] < ABANDONED_S

        def report(*args, **kw):
            latest[:] = args, kw
            progress(*args, **kw)

        worker = threading.Thread(
            target=contextvars.copy_context().run,  # gr.Progress (and ZeroGPU) read the request's context
            args=(self._job, run, job, wanted, report),
            daemon=True,
        )
        worker.start()
        shown = [0, None]  # the previews shown so far, and the file of the latest
        fps = max(
            1, self.pipe.defaults["fps"] // 4
        )  # a preview has a frame per latent frame: 4 of the video's
        try:
            while worker.is_alive():
                # On ZeroGPU nothing reaches the forked job, and a yield would hide the progress it sends.
                worker.join(None if ZERO_GPU else HEARTBEAT_S)
                if ZERO_GPU:
                    break
                # The preview, where the result will show (the MP4 written last was sent already: Gradio copies
                # an output before it resumes the job).
                preview = gr.skip()  # the same file again would restart the video: only a new one
                if worker.is_alive() and run.previews != shown[0] and run.preview is not None:
                    old, shown[:] = shown[1], [run.previews, write_preview(run.preview, self.output_dir, fps)]
                    preview = str(shown[1])
                    if old is not None:
                        old.unlink(missing_ok=True)
                yield preview, gr.skip(), gr.skip(), gr.skip()
                pulled[0] = time.monotonic()
                if latest:  # a yield hides the progress bar until its next update: send it again
                    progress(*latest[0], **latest[1])
        finally:
            run.cancel.set()  # when Gradio does close the generator
            if shown[1] is not None:
                shown[1].unlink(missing_ok=True)
            if self.running.get(session) is run:
                del self.running[session]
        if run.by_cancel_button:  # Cancel says what happened: this request ends with no output, and no error
            run.finished.set()
            yield gr.skip(), gr.skip(), gr.skip(), None
            return
        if run.error is not None:
            raise known_error(run.error) or run.error
        clip = run.clip
        yield clip["mp4"], clip["seed"], clip["settings"], clip

    def cancel(self, session: str, wait_s: float = CANCEL_WAIT_S) -> str:
        """Stop the session's job at its next step; once it has stopped (or after `wait_s`), say where.

        The job's request then ends by itself, with no output. So Gradio's own cancel, which the page sends next
        (for a job still waiting in its queue), never reaches a running one: it answers those with an empty
        output, which the page, racing it, can show as an "Error" beside our message."""
        run = self.running.get(session)
        if run is None:  # waiting in Gradio's queue (which the page's Cancel empties next), or nothing at all
            return cancelled_text(None)
        run.by_cancel_button = True
        run.cancel.set()
        if not ZERO_GPU and run.done.wait(wait_s):  # (ZeroGPU's started job runs to its end: no use waiting)
            run.finished.wait(5 * HEARTBEAT_S)  # the request's end, no later than its next heartbeat
            time.sleep(0.2)  # and its last message on its way to the page
        return cancelled_text(run)

    def _job(self, run: Run, job: Request, wanted, progress):
        started = time.perf_counter()
        try:
            result = self._on_a_device(run, job, wanted, progress)
            progress(1.0, desc="Writing the MP4")  # the device is free again: the next job starts meanwhile
            run.clip = save_clip(result, self.output_dir, started, **job.clip_options())
        except Exception as e:
            # A bug is re-raised in the request, where Gradio reports it; a cancel keeps its own words for Cancel.
            run.error = e if isinstance(e, GenerationCancelled) else known_error(e) or e
        run.done.set()

    def _on_a_device(self, run: Run, job: Request, wanted, progress) -> GenerationResult:
        """Render on the first device free, held until the render ends (whatever the end); out of memory frees that
        device's cache only."""
        kwargs, loras = job.pipeline_kwargs(), job.lora_scales()
        progress(0.0, desc="Waiting for the GPU")
        with self.pool.take(wanted, poll_s=HEARTBEAT_S) as pipe:
            try:
                return self._render(pipe, run, kwargs, loras, wanted, progress)
            except Exception as e:
                if self.parallel is not None and self.parallel.broken:
                    raise self._stop_all() from e
                if not is_out_of_memory(e):
                    raise
            pipe.release()  # outside the except block, whose traceback still holds the step's tensors
            raise out_of_memory_error()

    def _render(
        self, pipe: CogVideoXPipeline, run: Run, kwargs, loras: dict, wanted, progress
    ) -> GenerationResult:
        if not wanted():
            raise GenerationCancelled("cancelled while waiting for the GPU")
        if self.enhancer is not None:
            self.enhancer.release()  # a local prompt model makes room for the video model
        if ZERO_GPU:  # in ZeroGPU's forked worker, which reports its own progress and errors
            result = render_on_gpu(kwargs, loras)
            if not wanted():
                raise GenerationCancelled("cancelled while the GPU worker ran")
            return result
        # CUDA calls that name no device (compiled kernels, events) mean this job's GPU, in this thread.
        with torch.cuda.device(pipe.device) if pipe.device.type == "cuda" else contextlib.nullcontext():
            if self.parallel is not None:
                return self._render_parallel(pipe, run, kwargs, loras, wanted, progress)
            if not pipe.loaded:
                try:
                    pipe.load(progress=lambda stage, f: progress(f, desc=f"Loading the model: {stage}"))
                except (OSError, ValueError) as e:
                    raise load_error(pipe, e) from e
            # This job's LoRAs, whatever the last job on this pipeline had (only the layers that change are written).
            pipe.set_loras(loras)
            on_stage, on_step = progress_reporters(kwargs["num_inference_steps"], progress, wanted)
            # The preview: the predicted clean video about ten times in the run (ZeroGPU's forked worker cannot
            # stream it back, so there is none there).
            every = preview_every(kwargs["num_inference_steps"])
            return pipe(
                **kwargs, callback=on_step, on_stage=on_stage, preview=run.on_preview, preview_every=every
            )

    def _render_parallel(
        self, pipe: CogVideoXPipeline, run: Run, kwargs, loras: dict, wanted, progress
    ) -> GenerationResult:
        """The job on every process of --parallel (ranks.py): they load the weights together, then denoise."""
        on_stage, on_step = progress_reporters(kwargs["num_inference_steps"], progress, wanted)
        try:
            return self.parallel.run(
                pipe,
                kwargs,
                loras=loras,
                callback=on_step,
                on_stage=on_stage,
                preview=run.on_preview,
                preview_every=preview_every(kwargs["num_inference_steps"]),
                load_progress=lambda stage, f: progress(f, desc=f"Loading the model: {stage}"),
            )
        except LoadFailed as e:
            raise user_error(str(e), title="Model unavailable") from e

    def _stop_all(self) -> gr.Error:
        """A process failed while the processes exchanged activations: the others wait for it in vain, so every one
        stops (this one once the page has the message; torchrun then stops the rest)."""
        message = (
            f"{self.parallel.broken}. The processes cannot go on together, so the server stops; start it "
            "again (torchrun --max-restarts K does so by itself)."
        )
        print(f"error: {message}", file=sys.stderr, flush=True)
        threading.Timer(STOP_AFTER_S, os._exit, args=(1,)).start()
        return user_error(message, title="Server stopping")
