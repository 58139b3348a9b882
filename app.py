"""Gradio demo: `python app.py --model THUDM/CogVideoX-2b` (or `--model tiny-random` to try it offline).

`create_demo(pipeline)` builds the UI around a pipeline it is handed (tests hand it a tiny one). Weights load
on the first generation, so the page is up in seconds; a missing model still gives a page that says why. On a
Hugging Face ZeroGPU Space they load at start-up instead, and each job runs in ZeroGPU's GPU worker (jobs.py).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

if os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true"):
    # Hugging Face ZeroGPU: spaces patches torch as it is imported, so it must come before torch does.
    import spaces  # noqa: F401

import gradio as gr

import jobs
from cogvideox.enhance import EnhanceError, EnhanceResult, PromptEnhancer
from cogvideox.offload import is_out_of_memory
from cogvideox.pipeline import MAX_SEED, CogVideoXPipeline, GenerationCancelled, check_device
from cogvideox.video import write_gif, write_mp4, write_sidecar
from jobs import ZERO_GPU, gpu_seconds, known_error, out_of_memory_error, user_error  # noqa: F401 (gpu_seconds)
from launch import gradio_cache_dir, launch_options, parse_args
from validation import (
    FIELDS,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    MIN_GUIDANCE,
    TokenMeter,
    check_inputs,
    frame_counts,
)

ASSETS = Path(__file__).resolve().parent / "assets"
EXAMPLES = Path(__file__).resolve().parent / "examples" / "prompts.json"

# Limits; each may be overridden by an environment variable of the same name (the request limits: validation.py).
DRAFT_STEPS = int(os.environ.get("DRAFT_STEPS", 10))
QUEUE_SIZE = int(os.environ.get("QUEUE_SIZE", 8))  # waiting jobs; past it, "busy, try again shortly"
OUTPUT_TTL_S = int(os.environ.get("OUTPUT_TTL_S", 6 * 3600))  # our clips and Gradio's copies
MAX_GALLERY = int(os.environ.get("MAX_GALLERY", 24))
# The Cancel button stops its session's job at the next step. A cancel from elsewhere (gradio_client) or a
# closed tab is seen another way: a running job yields every HEARTBEAT_S and Gradio resumes it right after
# each yield until the request is cancelled or its client goes. Gradio does not reliably close the
# generator, so a job not resumed for ABANDONED_S stops. ZeroGPU runs the job in a forked process that
# cannot see these signals: there a job runs to its end, and the page says so.
HEARTBEAT_S = 0.5
ABANDONED_S = 4 * HEARTBEAT_S
ZERO_GPU_CANCEL_NOTE = (
    "On this ZeroGPU Space a job runs in a GPU process of its own: **Cancel cannot stop a job that has started**; "
    "it frees the page and the job runs to its end."
)

RELEASE_DEFAULTS = dict(
    num_frames=49, height=480, width=720, num_inference_steps=50, guidance_scale=6.0, fps=8
)
CLIP_NAME = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{16}\.(mp4|gif|json)$")
# System fonts: the page makes no request to a font CDN.
THEME = gr.themes.Soft(primary_hue="violet", secondary_hue="indigo", font=["ui-sans-serif", "system-ui",
                       "sans-serif"], font_mono=["ui-monospace", "monospace"])  # fmt: skip
TINY_NOTICE = (
    "🎲 **tiny-random**: a tiny model with **random weights**. Its videos are noise; "
    "it is here to try the whole flow offline."
)


def clean_outputs(folder: Path, max_age_s: float) -> int:
    """Delete our clips older than `max_age_s` (Gradio drops its own copies: `delete_cache`); how many went."""
    cutoff, removed = time.time() - max_age_s, 0
    for path in folder.glob("*"):
        try:
            if CLIP_NAME.match(path.name) and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # another request's cleanup got there first
            continue
    return removed


def _token_html(pipe, prompt) -> str:
    """The token meter's line for `prompt` (tests and the first paint; the page's meter is a TokenMeter)."""
    return TokenMeter(pipe)(prompt) or ""


def integer_api(component, info: dict):
    """Make `component`'s API schema say integer (gr.Radio and gr.Slider say string and number whatever their
    values): set on the instance, since Gradio writes a .pyi stub beside any module that subclasses a component."""
    component.api_info = lambda: {"type": "integer", **info}
    return component


def _model_status(pipe, notice: str) -> str:
    if pipe is None:
        return notice
    where = f"{pipe.device.type}, {str(pipe.dtype).removeprefix('torch.')}"
    state = f"✅ **{pipe.model_id}** is loaded ({where})." if pipe.loaded else (
        f"⏳ **{pipe.model_id}** ({where}): the weights load on the first generation, which takes a while."
    )  # fmt: skip
    return f"{notice}\n\n{state}" if notice else state


def _clip_views(clip: dict, full_steps: int):
    """Outputs that show one clip: video, seed, settings, the two downloads and the Render-final button."""
    files = Path(clip["mp4"]).is_file()  # False once the clip's files have been cleaned up
    draft = clip["settings"]["num_inference_steps"] < full_steps
    return (
        clip["mp4"] if files else None,
        clip["seed"],
        clip["settings"],
        gr.DownloadButton(value=clip["mp4"] if files else None, interactive=files),
        gr.DownloadButton(value=clip["gif"] if files else None, interactive=files),
        gr.Button(visible=draft, value=f"🎬 Render final ({full_steps} steps)"),
    )


def _gallery(clips: list[dict]) -> list[tuple[str, str]]:
    return [(c["mp4"], f"seed {c['seed']} · {c['settings']['num_inference_steps']} steps") for c in clips]


def _load_presets(max_frames: int) -> tuple[list[list], list[str]]:
    presets = json.loads(EXAMPLES.read_text()) if EXAMPLES.is_file() else []
    keys = ("prompt", "seed", "num_inference_steps", "guidance_scale")
    rows = [[*(p[k] for k in keys), min(p["num_frames"], max_frames)] for p in presets]
    return rows, [p["title"] for p in presets]


def create_demo(
    pipeline: CogVideoXPipeline | None,
    enhancer: PromptEnhancer | None = None,
    *,
    output_dir: str | Path = "outputs",
    notice: str = "",
    queue_size: int = QUEUE_SIZE,
) -> gr.Blocks:
    """The Blocks UI around `pipeline` (None: the page says `notice` and cannot generate)."""
    pipe, output_dir = pipeline, Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    gpu_lock = threading.Lock()  # one job on the GPU, even while a cancelled one finishes its last step
    cancel_flags: dict[str, threading.Event] = {}  # session -> its running job's flag, set by Cancel
    d = pipe.defaults if pipe else RELEASE_DEFAULTS
    full_steps, max_frames, fps = d["num_inference_steps"], pipe.max_frames if pipe else 49, d["fps"]
    # A local prompt model shares the GPU with the video model; a remote endpoint holds only its own caller.
    local_enhancer = bool(enhancer and enhancer.needs_gpu_lock)
    enhance_lock = gpu_lock if local_enhancer else contextlib.nullcontext()
    meter = TokenMeter(pipe)
    if ZERO_GPU:  # what ZeroGPU's GPU function renders with: its worker, forked later, inherits it
        jobs.PIPELINE = pipe

    def validate(prompt, negative_prompt, seed, steps, guidance_scale, num_frames):
        _, errors = check_inputs(pipe, prompt, negative_prompt, seed, steps, guidance_scale, num_frames)
        return [gr.validate(f not in errors, errors.get(f, "")) for f in FIELDS]

    # Gradio gives a parameter whose default is a Progress the request's progress tracker.
    progress_tracker = gr.Progress()

    def generate(
        prompt, negative_prompt, seed, steps, guidance_scale, num_frames, request: gr.Request,
        progress=progress_tracker,
    ):  # fmt: skip
        """Render a video. seed -1 picks a random one. Returns the MP4, the seed used and the settings."""
        kwargs, errors = check_inputs(pipe, prompt, negative_prompt, seed, steps, guidance_scale, num_frames)
        if errors:
            raise user_error("; ".join(f"{k}: {v}" for k, v in errors.items()))
        clean_outputs(output_dir, OUTPUT_TTL_S)
        # The worker stops at its next step, leaving the GPU to the next job, once the request is gone.
        session, pulled, latest, box = request.session_hash, [time.monotonic()], [], {}
        cancel = cancel_flags[session] = threading.Event()

        def wanted():
            return not cancel.is_set() and (ZERO_GPU or time.monotonic() - pulled[0] < ABANDONED_S)

        def report(*args, **kw):
            latest[:] = args, kw
            progress(*args, **kw)

        worker = threading.Thread(
            target=contextvars.copy_context().run,  # gr.Progress (and ZeroGPU) read the request's context
            args=(_job, kwargs, wanted, report, box),
            daemon=True,
        )
        worker.start()
        try:
            while worker.is_alive():
                # On ZeroGPU nothing reaches the forked job, and a yield would hide the progress it sends.
                worker.join(None if ZERO_GPU else HEARTBEAT_S)
                if ZERO_GPU:
                    break
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
                pulled[0] = time.monotonic()
                if latest:  # a yield hides the progress bar until its next update: send it again
                    progress(*latest[0], **latest[1])
        finally:
            cancel.set()  # when Gradio does close the generator
            if cancel_flags.get(session) is cancel:
                del cancel_flags[session]
        if "error" in box:
            raise box["error"]
        clip = box["clip"]
        yield clip["mp4"], clip["seed"], clip["settings"], clip

    def _job(kwargs, wanted, progress, box):
        oom = False
        try:
            box["clip"] = _run_job(kwargs, wanted, progress)
        except Exception as e:
            oom = is_out_of_memory(e)
            box["error"] = known_error(e) or e  # a bug is re-raised in the request, where Gradio reports it
        if oom:  # outside the except block, whose traceback still holds the step's tensors
            pipe.release()
            box["error"] = out_of_memory_error()

    def _run_job(kwargs, wanted, progress):
        started = time.perf_counter()
        progress(0.0, desc="Waiting for the GPU")
        with gpu_lock:
            if not wanted():
                raise GenerationCancelled("cancelled while waiting for the GPU")
            if enhancer is not None:
                enhancer.release()  # a local prompt model makes room for the video model
            if ZERO_GPU:  # in ZeroGPU's forked worker, which reports its own progress and errors
                result = jobs.render_on_gpu(kwargs)
                if not wanted():
                    raise GenerationCancelled("cancelled while the GPU worker ran")
            else:
                if not pipe.loaded:
                    try:
                        pipe.load(progress=lambda stage, f: progress(f, desc=f"Loading the model: {stage}"))
                    except (OSError, ValueError) as e:
                        message = f"Could not load {pipe.model_id}: {e}"
                        raise user_error(message, title="Model unavailable") from e
                on_stage, on_step = jobs.progress_reporters(kwargs["num_inference_steps"], progress, wanted)
                result = pipe(**kwargs, callback=on_step, on_stage=on_stage)
        progress(1.0, desc="Writing the MP4 and GIF")
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(8)}"  # unique and unguessable
        mp4 = write_mp4(result.frames, output_dir / f"{stem}.mp4", fps=result.fps)
        gif = write_gif(result.frames, output_dir / f"{stem}.gif", fps=result.fps)
        settings = {**result.settings, "time_taken_s": round(time.perf_counter() - started, 2)}
        write_sidecar(mp4, {**settings, "timings": result.timings})
        return {"mp4": str(mp4), "gif": str(gif), "seed": result.seed, "settings": settings}

    def enhance(prompt):
        """Rewrite a short idea into the detailed English prompt CogVideoX was trained on."""
        if enhancer is None or not enhancer.available:
            raise user_error(enhancer.unavailable_reason if enhancer else "No prompt enhancer is configured.")
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise user_error(f"prompt must be text of at most {MAX_PROMPT_CHARS} characters")
        try:
            with enhance_lock:
                result = enhancer.enhance(prompt)
        except EnhanceError as e:
            raise user_error(f"{e} (waited {e.elapsed_s:.0f} s)", title="Enhance failed") from e
        except ValueError as e:
            raise user_error(str(e), title="Enhance failed") from e
        return result.text, result

    # The UI-only events below read this session's State, which only the server writes; each can still be called
    # directly (before there is anything to read), so each checks first and otherwise changes nothing.
    def show_enhanced(result):
        if not isinstance(result, EnhanceResult):
            return gr.skip(), gr.skip(), gr.skip()
        trimmed = ", trimmed to fit" if result.trimmed else ""
        note = (
            f"✨ Enhanced by {result.backend} in {result.elapsed_s:.1f} s ({result.tokens} tokens{trimmed})."
        )
        return gr.Group(visible=True), f"{note} Your original:", result.original

    def undo_enhance(result):
        if not isinstance(result, EnhanceResult):
            return gr.skip(), gr.skip()
        return result.original, gr.Group(visible=False)

    def add_clip(clip, clips):
        if not isinstance(clip, dict):
            return (gr.skip(),) * 7
        clips = [clip, *clips][:MAX_GALLERY]
        gallery_view = gr.Gallery(_gallery(clips), selected_index=None)  # the new clip is the one shown
        return gallery_view, clips, clip, *_clip_views(clip, full_steps)[3:], _model_status(pipe, notice)

    def show_clip(clips, evt: gr.EventData):
        # The select event's data comes from the client, as anything or nothing: read as gr.EventData (whose
        # SelectData subclass fails inside Gradio on a missing index) and checked here.
        data = getattr(evt, "_data", None)
        index = data.get("index") if isinstance(data, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(clips):
            return gr.skip()
        clip = clips[index]
        s = clip["settings"]
        if not Path(clip["mp4"]).is_file():
            gr.Warning("This clip's files were cleaned up; its settings are restored.")
        inputs = (s["prompt"], s["negative_prompt"], s["seed"], s["num_inference_steps"])
        return *_clip_views(clip, full_steps), *inputs, s["guidance_scale"], s["num_frames"], clip

    def cancel(request: gr.Request):
        if flag := cancel_flags.get(request.session_hash):
            flag.set()

    def final_inputs(clip):
        if not isinstance(clip, dict):
            return (gr.skip(),) * len(FIELDS)
        s = clip["settings"]
        return s["prompt"], s["negative_prompt"], s["seed"], full_steps, s["guidance_scale"], s["num_frames"]

    with gr.Blocks(
        title="CogVideoX", analytics_enabled=False, delete_cache=(max(60, OUTPUT_TTL_S // 4), OUTPUT_TTL_S)
    ) as demo:
        logo = (ASSETS / "logo.svg").read_text() if (ASSETS / "logo.svg").is_file() else ""
        gr.HTML(
            f'<div id="masthead">{logo}<div><h1>CogVideoX</h1>'
            f"<p>Text to video: {d['num_frames'] / fps:.0f}-second clips, {d['width']}×{d['height']} "
            f"at {fps} fps.</p></div></div>",
            elem_id="masthead-wrap",
        )
        status = gr.Markdown(_model_status(pipe, notice), elem_id="model-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                hint = "One shot in detail: subject, motion, setting, camera, light…"
                prompt = gr.Textbox(label="Prompt", lines=5, max_length=MAX_PROMPT_CHARS, placeholder=hint,
                                    elem_id="prompt")  # fmt: skip
                tokens = gr.HTML(_token_html(pipe, ""), elem_id="token-count")
                with gr.Row():
                    can_enhance = bool(enhancer and enhancer.available)
                    enhance_btn = gr.Button("✨ Enhance prompt", size="sm", interactive=can_enhance)
                    dice = gr.Button("🎲 Random seed", size="sm", elem_id="dice")
                if enhancer is not None and not enhancer.available:
                    gr.Markdown(f"Enhance is off. {enhancer.unavailable_reason}", elem_classes="hint")
                with gr.Group(visible=False) as enhanced_box:
                    enhanced_note = gr.Markdown()
                    original = gr.Textbox(show_label=False, interactive=False, lines=2)
                    undo_btn = gr.Button("↩️ Undo: restore the original", size="sm")
                seed = gr.Number(-1, label="Seed (-1: random)", precision=0, minimum=-1, maximum=MAX_SEED - 1,
                                 elem_id="seed")  # fmt: skip
                with gr.Accordion("Advanced", open=False):
                    steps = gr.Slider(
                        1, MAX_STEPS, d["num_inference_steps"], step=1, label="Steps", elem_id="steps"
                    )
                    integer_api(steps, {"minimum": 1, "maximum": MAX_STEPS})
                    guidance = gr.Slider(
                        MIN_GUIDANCE, MAX_GUIDANCE, d["guidance_scale"], step=0.5, label="Guidance"
                    )
                    choices = [(f"{n} ({n / fps:.1f} s)", n) for n in frame_counts(max_frames)]
                    frames = gr.Radio(choices, value=d["num_frames"], label="Frames")
                    counts = frame_counts(
                        max_frames
                    )  # not as an enum: gradio_client shows an enum as strings
                    integer_api(frames, {"minimum": counts[0], "maximum": counts[-1],
                                         "description": f"8N+1: one of {', '.join(map(str, counts))}"})  # fmt: skip
                    negative = gr.Textbox(label="Negative prompt", lines=2, max_length=MAX_PROMPT_CHARS)
                with gr.Row():
                    run_btn = gr.Button(
                        "🎬 Generate", variant="primary", scale=2, interactive=pipe is not None
                    )
                    draft_btn = gr.Button(
                        f"⚡ Draft ({DRAFT_STEPS} steps)", scale=2, interactive=pipe is not None
                    )
                    cancel_btn = gr.Button("⏹ Cancel", variant="stop", scale=1)
                if ZERO_GPU:
                    gr.Markdown(ZERO_GPU_CANCEL_NOTE, elem_classes="hint", elem_id="cancel-note")
                rows, labels = _load_presets(max_frames)
                if rows:
                    gr.Examples(
                        rows, [prompt, seed, steps, guidance, frames], label="Presets", example_labels=labels
                    )
            with gr.Column(scale=6):
                video = gr.Video(
                    label="Result", autoplay=True, loop=True, interactive=False, elem_id="result-video"
                )
                with gr.Row():
                    seed_used = gr.Number(label="Seed used", interactive=False, precision=0)
                    mp4_btn = gr.DownloadButton("⬇️ MP4", interactive=False, elem_id="download-mp4")
                    gif_btn = gr.DownloadButton("⬇️ GIF", interactive=False, elem_id="download-gif")
                final_btn = gr.Button("🎬 Render final", variant="primary", visible=False, elem_id="final")
                settings = gr.JSON(label="Settings used", open=True)
                gallery = gr.Gallery(label="This session's clips, newest first (only you can see them)",
                                     columns=4, fit_columns=False, object_fit="cover", height=330,
                                     allow_preview=False, interactive=False, elem_id="gallery")  # fmt: skip
        clips, current, last_clip, enhanced = gr.State([]), gr.State(None), gr.State(None), gr.State(None)

        fields = [prompt, negative, seed, steps, guidance, frames]
        ui = dict(queue=False, api_visibility="private")  # instant UI updates: not queued, not in the API
        job = dict(
            fn=generate, inputs=fields, outputs=[video, seed_used, settings, last_clip], validator=validate,
            preprocess=False, concurrency_limit=1, concurrency_id="gpu", show_progress_on=[video],
        )  # fmt: skip
        draft_steps = gr.Number(DRAFT_STEPS, visible=False)  # a draft leaves the Steps slider as it is
        runs = [
            run_btn.click(**job, api_name="generate"),
            draft_btn.click(
                **{**job, "inputs": [prompt, negative, seed, draft_steps, guidance, frames]},
                api_visibility="private",
            ),
            final_btn.click(final_inputs, current, fields, **ui).then(**job, api_visibility="private"),
        ]
        shown = [current, mp4_btn, gif_btn, final_btn, status]
        for run in runs:
            run.success(add_clip, [last_clip, clips], [gallery, clips, *shown], api_visibility="private")
        cancel_btn.click(cancel, cancels=runs, **ui)
        views = [video, seed_used, settings, mp4_btn, gif_btn, final_btn]
        gallery.select(show_clip, clips, [*views, *fields, current], **ui)
        dice.click(None, None, seed, js="() => Math.floor(Math.random() * 4294967296)")
        prompt.change(lambda p: gr.skip() if (line := meter(p)) is None else line, prompt, tokens,
                      show_progress="hidden", trigger_mode="always_last", **ui)  # fmt: skip
        enhance_btn.click(
            enhance, prompt, [prompt, enhanced], api_name="enhance", preprocess=False,
            concurrency_limit=1 if local_enhancer else None, concurrency_id="enhance",
        ).success(show_enhanced, enhanced, [enhanced_box, enhanced_note, original], **ui)  # fmt: skip
        undo_btn.click(undo_enhance, enhanced, [prompt, enhanced_box], **ui)
        # Each visit: the model's current state, and a fresh seed.
        demo.load(
            lambda: (_model_status(pipe, notice), secrets.randbelow(MAX_SEED)), None, [status, seed], **ui
        )
    return demo.queue(max_size=queue_size, default_concurrency_limit=1)


def load_pipeline(args: argparse.Namespace) -> tuple[CogVideoXPipeline | None, str]:
    """The pipeline (configs and tokenizer only) and a notice for the page; (None, why) when unavailable.

    On ZeroGPU the weights load now, in the main thread: there spaces records `.to("cuda")` (torch's CUDA is
    emulated in that thread alone) and moves the weights into its GPU worker at each job. All of them stay on
    the device (no streams or pinned memory, which need a real GPU in this process), and nothing is compiled.
    """
    model, notice = args.model, ""
    memory_mode, compile = args.memory_mode, args.compile
    if ZERO_GPU:
        if (memory_mode or "resident") != "resident" or compile:
            print("ZeroGPU: --memory-mode resident, without --compile")
        memory_mode, compile = "resident", False
    if model == "tiny-random":
        from cogvideox.testing import write_tiny_checkpoint

        # Outside the output folder, which is served.
        model, notice = (
            write_tiny_checkpoint(Path(tempfile.gettempdir()) / "cogvideox-tiny-random"),
            TINY_NOTICE,
        )
    try:
        pipe = CogVideoXPipeline.from_pretrained(
            model, device=args.device, dtype=args.dtype, memory_mode=memory_mode, compile=compile
        )
        if ZERO_GPU:
            pipe.load()
    except Exception as e:  # offline, no such repo, a broken folder: the page must still come up and say so
        return None, (
            f"⚠️ **The model {args.model} is unavailable**: {e}\n\nThe page works but cannot render. Check "
            "the path or your Hub access, or run `python app.py --model tiny-random` to try the app offline."
        )
    return pipe, notice


def main(argv=None) -> None:
    args = parse_args(argv)
    try:  # a device this machine lacks is the operator's mistake: one line, not a page that cannot render
        check_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(gradio_cache_dir(args.output_dir)))
    pipe, notice = load_pipeline(args)
    enhancer = None
    if pipe is not None:
        try:
            enhancer = PromptEnhancer.from_env(lambda text: pipe.count_tokens(text).n_tokens)
        except ValueError as e:
            print(f"prompt enhancer disabled: {e}")
    demo = create_demo(pipe, enhancer, output_dir=args.output_dir, notice=notice)
    demo.launch(**launch_options(args, THEME))


if __name__ == "__main__":
    main()
