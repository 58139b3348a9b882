"""Gradio demo: `python app.py --model THUDM/CogVideoX-2b` (or `--model tiny-random` to try it offline).

`create_demo(pipeline)` builds the UI around a pipeline it is handed (tests hand it a tiny one); jobs.py runs the
render jobs, clips.py keeps the clips and each browser's gallery. Weights load on the first generation, so the
page is up in seconds; a missing model still gives a page that says why. On a Hugging Face ZeroGPU Space they load
at start-up instead, and each job runs in ZeroGPU's GPU worker (jobs.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path

if os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true"):
    # Hugging Face ZeroGPU: spaces patches torch as it is imported, so it must come before torch does.
    import spaces  # noqa: F401

import gradio as gr

import clips as gallery_store
import jobs
import uploads
from clips import CLIP_NAME, GIF, MAX_GALLERY, OUTPUT_TTL_S, clean_outputs  # noqa: F401 (the app's names)
from cogvideox.enhance import EnhanceError, EnhanceResult, PromptEnhancer
from cogvideox.pipeline import MAX_SEED, CogVideoXPipeline
from jobs import ABANDONED_S, HEARTBEAT_S, ZERO_GPU, gpu_seconds, user_error  # noqa: F401 (the app's names)
from launch import gradio_cache_dir, launch_options, parse_args
from pool import pick_devices
from validation import (
    FIELDS,
    FULL,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    MIN_GUIDANCE,
    PROMPT_BOX_CHARS,
    SPEED_CHOICES,
    TokenMeter,
    check_inputs,
    frame_counts,
)

OPTIONAL_FIELDS = ("speed", "video", "strength", "smooth", "image")  # /generate's inputs after FIELDS
ASSETS = Path(__file__).resolve().parent / "assets"
EXAMPLES = Path(__file__).resolve().parent / "examples" / "prompts.json"

# Limits; each may be overridden by an environment variable of the same name (the request limits: validation.py).
DRAFT_STEPS = int(os.environ.get("DRAFT_STEPS", 10))
QUEUE_SIZE = int(os.environ.get("QUEUE_SIZE", 8))  # waiting jobs; past it, "busy, try again shortly"
ZERO_GPU_CANCEL_NOTE = (
    "On this ZeroGPU Space a job runs in a GPU process of its own: **Cancel cannot stop a job that has started**; "
    "it frees the page and the job runs to its end."
)

RELEASE_DEFAULTS = dict(
    num_frames=49, height=480, width=720, num_inference_steps=50, guidance_scale=6.0, fps=8
)
# System fonts: the page makes no request to a font CDN.
THEME = gr.themes.Soft(primary_hue="violet", secondary_hue="indigo", font=["ui-sans-serif", "system-ui",
                       "sans-serif"], font_mono=["ui-monospace", "monospace"])  # fmt: skip
TINY_NOTICE = (
    "🎲 **tiny-random**: a tiny model with **random weights**. Its videos are noise; "
    "it is here to try the whole flow offline."
)
CANCEL = "⏹ Cancel"
IDLE = '<span class="idle">A job\'s progress and its place in the queue show here.</span>'
STOPPING_JS = "() => ({__type__: 'update', value: '⏹ Stopping…', interactive: false})"
MAKING_GIF_JS = "() => ({__type__: 'update', value: '🎞️ Making…', interactive: false})"
# As a job starts: its progress, beside the buttons, scrolled into view if it is not (on a phone, below the fold).
SHOW_STATUS_JS = """(...inputs) => { document.querySelector("#run-status")?.scrollIntoView({block: "nearest"});
  return inputs; }"""
# Starts the download of a file a DownloadButton was just given (the GIF, made on the first click).
DOWNLOAD_JS = """(file) => { if (file && file.url) { const a = document.createElement("a");
  a.href = file.url; a.download = file.orig_name || "clip.gif"; document.body.appendChild(a); a.click(); a.remove(); } }"""


def _token_html(pipe, prompt) -> str:
    """The token meter's line for `prompt` (tests and the first paint; the page's meter is a TokenMeter)."""
    return TokenMeter(pipe)(prompt) or ""


def integer_api(component, info: dict):
    """Make `component`'s API schema say integer (gr.Radio and gr.Slider say string and number whatever their
    values): set on the instance, since Gradio writes a .pyi stub beside any module that subclasses a component."""
    component.api_info = lambda: {"type": "integer", **info}
    return component


def _pipelines(pipeline) -> list[CogVideoXPipeline]:
    """A pipeline, or a list of them (one per device), or None -> the list."""
    return list(pipeline) if isinstance(pipeline, (list, tuple)) else [] if pipeline is None else [pipeline]


def _document_api(video, strength, smooth, image) -> None:
    """What /generate's optional parameters mean, in its API page (the schema's description, as integer_api)."""
    texts = {
        video: "optional: a video to start from (MP4, WebM, MOV, GIF…), center-cropped to the model's size at "
        "8 fps; as many frames as it has, up to num_frames",
        strength: "with a video: how much to change it, 0.05 to 1 (lower keeps more of it)",
        smooth: "a frame interpolated between each two: 2N-1 frames written at 16 fps (as long, smoother)",
        image: "the first frame, required by this image-to-video model",
    }
    for component, text in texts.items():
        if component is not None:
            info = component.api_info()
            component.api_info = lambda info=info, text=text: {**info, "description": text}


def _model_status(pipe, notice: str) -> str:
    """The model line: which model, where, whether loaded; `pipe` may be a list, one per device (N jobs at once)."""
    pipes = _pipelines(pipe)
    if not pipes:
        return notice
    pipe, dtype = pipes[0], str(pipes[0].dtype).removeprefix("torch.")
    where = f"{pipe.device.type}, {dtype}"
    if len(pipes) > 1:  # each serves one job at a time
        kind = "GPUs" if all(p.device.type == "cuda" for p in pipes) else "devices"
        where = f"{len(pipes)} {kind}: {', '.join(str(p.device) for p in pipes)}, {dtype}"
    state = f"✅ **{pipe.model_id}** is loaded ({where})." if all(p.loaded for p in pipes) else (
        f"⏳ **{pipe.model_id}** ({where}): the weights load on the first generation"
        f"{' on each device' if len(pipes) > 1 else ''}, which takes a while."
    )  # fmt: skip
    return f"{notice}\n\n{state}" if notice else state


def _load_presets(max_frames: int) -> tuple[list[list], list[str]]:
    """Rows for [prompt, seed, steps, guidance, frames, randomize]: a preset keeps its own seed."""
    presets = json.loads(EXAMPLES.read_text()) if EXAMPLES.is_file() else []
    keys = ("prompt", "seed", "num_inference_steps", "guidance_scale")
    rows = [[*(p[k] for k in keys), min(p["num_frames"], max_frames), False] for p in presets]
    return rows, [p["title"] for p in presets]


def _storage(output_dir: Path, name: str) -> dict:
    """BrowserState keys that stay the same across restarts of the app on one output folder, so a gallery
    outlives a restart as its clips do. Not a secret (Gradio sends it to the page): what comes back is checked."""
    digest = hashlib.sha256(f"cogvideox:{output_dir}".encode()).hexdigest()
    return {"storage_key": f"cogvideox-{name}-{digest[:8]}", "secret": digest[8:40]}


def create_demo(
    pipeline: CogVideoXPipeline | None,
    enhancer: PromptEnhancer | None = None,
    *,
    output_dir: str | Path = "outputs",
    notice: str = "",
    queue_size: int = QUEUE_SIZE,
) -> gr.Blocks:
    """The Blocks UI around `pipeline` (None: the page says `notice` and cannot generate). A list of pipelines, one
    per device, serves that many jobs at once."""
    pipes = _pipelines(pipeline)
    pipe, output_dir = (pipes[0] if pipes else None), Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    renderer = jobs.Renderer(pipes, output_dir, enhancer)
    d = pipe.defaults if pipe else RELEASE_DEFAULTS
    full_steps, max_frames, fps = d["num_inference_steps"], pipe.max_frames if pipe else 49, d["fps"]
    # A local prompt model shares the GPU with the video model; a remote endpoint holds only its own caller.
    local_enhancer = bool(enhancer and enhancer.needs_gpu_lock)

    def enhance_lock():  # a local model waits for (and holds) the video pipeline on its device, if any
        if not local_enhancer:
            return contextlib.nullcontext()
        return renderer.pool.take(device=enhancer.backend.device)

    meter = TokenMeter(pipe)
    if ZERO_GPU:  # what ZeroGPU's GPU function renders with: its worker, forked later, inherits it
        jobs.PIPELINE = pipe

    def problems(prompt, negative_prompt, seed, steps, guidance_scale, num_frames, speed=FULL, video=None,
                 strength=None, smooth=False, image=None) -> dict:  # fmt: skip
        """{field: problem} of a request, its upload read if the values pass (remembered for the job)."""
        kwargs, errors = check_inputs(pipe, prompt, negative_prompt, seed, steps, guidance_scale, num_frames,
                                      speed, video, strength, smooth, image)  # fmt: skip
        if errors:
            return errors
        try:
            uploads.prepare(pipe, kwargs)
        except uploads.UploadError as e:  # not a video, damaged, too long, gone: before the job is queued
            return {e.field: str(e)}
        return {}

    def validate(*values):
        errors, names = problems(*values), (*FIELDS, *OPTIONAL_FIELDS)[: len(values)]
        return [gr.validate(f not in errors, errors.get(f, "")) for f in names]

    def enhance(prompt):
        """Rewrite a short idea into the detailed English prompt CogVideoX was trained on."""
        if enhancer is None or not enhancer.available:
            raise user_error(enhancer.unavailable_reason if enhancer else "No prompt enhancer is configured.")
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise user_error(f"prompt must be text of at most {MAX_PROMPT_CHARS} characters")
        try:
            with enhance_lock():
                result = enhancer.enhance(prompt)
        except EnhanceError as e:
            raise user_error(f"{e} (waited {e.elapsed_s:.0f} s)", title="Enhance failed") from e
        except ValueError as e:
            raise user_error(str(e), title="Enhance failed") from e
        return result.text, result

    # The UI-only events below read this session's State, which only the server writes; each can still be called
    # directly (before there is anything to read), so each checks first and otherwise changes nothing. The one
    # input a browser keeps (its gallery and prompt, gr.BrowserState) is checked entry by entry (clips.py).
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

    def buttons(running: bool) -> tuple:
        """Generate, Draft and Render final are off while the session's own job runs or waits; Cancel only then."""
        can = pipe is not None and not running
        return gr.Button(interactive=can), gr.Button(interactive=can), gr.Button(interactive=not running), (
            gr.Button(CANCEL, interactive=running))  # fmt: skip

    def start_run(prompt, negative_prompt, seed, steps, guidance_scale, num_frames, randomize, *media):
        # Before the job is queued: a new seed if asked for, and the buttons locked. Inputs the job will refuse
        # lock nothing (its validator then says what is wrong, and no event would unlock them).
        if randomize is True:
            seed = secrets.randbelow(MAX_SEED)
        if problems(prompt, negative_prompt, seed, steps, guidance_scale, num_frames, *media):
            return (gr.skip(),) * 6
        return seed if randomize is True else gr.skip(), *buttons(running=True), ""

    def add_clip(clip, clips):
        if not isinstance(clip, dict):
            return (gr.skip(),) * 12
        clips = [clip, *clips][:MAX_GALLERY]
        gallery_view = gr.Gallery(gallery_store.gallery(clips), selected_index=None)  # the new clip is shown
        done = gallery_store.done_text(clip)
        view = gallery_store.views(clip, full_steps)
        return (gallery_view, clips, gallery_store.browser_copy(clips), clip, view[1], *view[3:],
                _model_status(pipes, notice), done)  # fmt: skip

    def show_clip(clips, evt: gr.EventData):
        # The select event's data comes from the client, as anything or nothing: read as gr.EventData (whose
        # SelectData subclass fails inside Gradio on a missing index) and checked here.
        data = getattr(evt, "_data", None)
        index = data.get("index") if isinstance(data, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(clips):
            return gr.skip()
        clip = clips[index]
        inputs = [clip["settings"][k] for k in gallery_store.SETTINGS]
        # Said by the buttons (an unqueued event cannot show a toast): why there is no video, and what to do.
        note = (f"⌛ This clip's files have expired (clips are kept {OUTPUT_TTL_S / 3600:g} h). Its settings are "
                "restored: Generate renders it again." if gallery_store.expired(clip) else "")  # fmt: skip
        return *gallery_store.views(clip, full_steps), *inputs, False, clip, note, *kept_options(clip)

    def kept_options(clip) -> tuple:
        """Smooth and Strength as the clip had them (a clip made before these options had neither)."""
        s = clip["settings"]
        strength = s.get("strength")
        return s.get("smooth") is True, strength if isinstance(strength, float) else gr.skip()

    def cancel(request: gr.Request):
        # Where the job stopped, once it has; the result shown is cleared (it is not what was asked for, and it
        # stays in the gallery), and with it the offer to render it in full.
        text = f'<span class="cancelled">{renderer.cancel(request.session_hash)}</span>'  # style.css: why
        return text, *gallery_store.views(None, full_steps), None

    def final_inputs(clip):
        if not isinstance(clip, dict):
            return (gr.skip(),) * (len(FIELDS) + 3)
        inputs = {**clip["settings"], "num_inference_steps": full_steps}
        return *(inputs[k] for k in gallery_store.SETTINGS), False, *kept_options(clip)

    def show_source(value, field):
        note, count = uploads.describe(pipe, value, field)
        return note, gr.skip() if count is None else count  # Frames: all of the video, as it will be used

    def make_gif(clip):
        if not isinstance(clip, dict):
            return gr.skip(), gr.skip()
        gif = gallery_store.make_gif(clip)
        if gif is None:
            raise user_error(f"This clip's files have expired (clips are kept {OUTPUT_TTL_S / 3600:g} h).")
        return gr.DownloadButton(value=str(gif), visible=True), gr.Button(visible=False)

    def restore(saved, saved_prompt):
        # Each visit: the model's state, a fresh seed, and what this browser kept (checked: clips.restore).
        fresh = (_model_status(pipes, notice), secrets.randbelow(MAX_SEED))
        if pipe is None:  # nothing can be checked against a model, nor rendered: leave the browser's copy be
            return *fresh, *(gr.skip(),) * 5
        clips = gallery_store.restore(saved, output_dir, pipe)
        text = saved_prompt.get("prompt") if isinstance(saved_prompt, dict) else None
        text = text if isinstance(text, str) and 0 < len(text) <= MAX_PROMPT_CHARS else gr.skip()
        gone = sum(map(gallery_store.expired, clips))
        note = (f"⌛ {gone} of your {len(clips)} clips expired (clips are kept {OUTPUT_TTL_S / 3600:g} h): their "
                "settings are still in the gallery." if gone else gr.skip())  # fmt: skip
        view = gr.Gallery(gallery_store.gallery(clips), selected_index=None)
        return *fresh, view, clips, gallery_store.browser_copy(clips), text, note

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
        status = gr.Markdown(_model_status(pipes, notice), elem_id="model-status")
        with gr.Row(equal_height=False, elem_id="main-row"):
            with gr.Column(scale=5, elem_id="inputs-col"):
                hint = "One shot in detail: subject, motion, setting, camera, light…"
                prompt = gr.Textbox(label="Prompt", lines=5, max_length=PROMPT_BOX_CHARS, placeholder=hint,
                                    elem_id="prompt")  # fmt: skip
                tokens = gr.HTML(_token_html(pipe, ""), elem_id="token-count")
                can_enhance = bool(enhancer and enhancer.available)
                enhance_btn = gr.Button("✨ Enhance prompt", size="sm", interactive=can_enhance)
                if enhancer is not None and not enhancer.available:
                    gr.Markdown(f"Enhance is off. {enhancer.unavailable_reason}", elem_classes="hint")
                with gr.Group(visible=False) as enhanced_box:
                    enhanced_note = gr.Markdown()
                    original = gr.Textbox(show_label=False, interactive=False, lines=2)
                    undo_btn = gr.Button("↩️ Undo: restore the original", size="sm")
                with gr.Row(equal_height=True, elem_id="seed-row"):
                    seed = gr.Number(None, label="Seed", precision=0, minimum=-1, maximum=MAX_SEED - 1, min_width=140,
                                     elem_id="seed")  # fmt: skip
                    randomize = gr.Checkbox(True, label="🎲 Randomize seed", info="a new one at every run",
                                            min_width=150, elem_id="randomize")  # fmt: skip
                source_video, strength, source_image, source_note = uploads.source_inputs(pipe)
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
                    counts = frame_counts(max_frames)  # not an enum: gradio_client shows one as strings
                    integer_api(frames, {"minimum": counts[0], "maximum": counts[-1],
                                         "description": f"8N+1: one of {', '.join(map(str, counts))}"})  # fmt: skip
                    negative = gr.Textbox(label="Negative prompt", lines=2, max_length=MAX_PROMPT_CHARS)
                speed = gr.Radio(SPEED_CHOICES, value=FULL, label="Speed", elem_id="speed",
                                 info="Faster and Fastest skip steps that change little (Render final: Full)")  # fmt: skip
                smooth = gr.Checkbox(False, label="Smooth (16 fps)", elem_id="smooth",
                                     info="a frame interpolated between each two: as long, smoother motion")  # fmt: skip
                with gr.Row(elem_id="run-buttons"):
                    can_run = pipe is not None
                    run_btn = gr.Button("🎬 Generate", variant="primary", scale=3, min_width=100,
                                        interactive=can_run, elem_id="generate")  # fmt: skip
                    draft_btn = gr.Button(f"⚡ Draft ({DRAFT_STEPS} steps)", scale=3, min_width=100,
                                          interactive=can_run, elem_id="draft")  # fmt: skip
                    cancel_btn = gr.Button(CANCEL, variant="stop", scale=2, min_width=90, interactive=False,
                                           elem_id="cancel")  # fmt: skip
                # Where the user looks after a click: the job's progress and queue place, then how it went.
                run_status = gr.Markdown(IDLE, elem_id="run-status")
                if ZERO_GPU:
                    gr.Markdown(ZERO_GPU_CANCEL_NOTE, elem_classes="hint", elem_id="cancel-note")
            with gr.Column(scale=6, elem_id="result-col"):
                video = gr.Video(
                    label="Result", autoplay=True, loop=True, interactive=False, elem_id="result-video"
                )
                with gr.Row(equal_height=True, elem_id="clip-row"):
                    # A Number shows 0 until it has a value: the seed used is shown as text, empty until a clip.
                    seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used")
                    button = dict(min_width=70, size="md")  # the widths: style.css
                    reuse_btn = gr.Button("♻️ Reuse seed", interactive=False, elem_id="reuse", **button)
                    mp4_btn = gr.DownloadButton("⬇️ MP4", interactive=False, elem_id="download-mp4", **button)
                    make_gif_btn = gr.Button(
                        GIF, interactive=False, elem_id="make-gif", **button
                    )  # made when asked
                    gif_btn = gr.DownloadButton("⬇️ GIF", visible=False, elem_id="download-gif", **button)
                final_btn = gr.Button("🎬 Render final", variant="primary", visible=False, elem_id="final")
                settings = gr.JSON(label="Settings used", open=True)
                gallery = gr.Gallery(label="Your clips, newest first (kept in this browser; only you can see them)",
                                     columns=3, fit_columns=False, object_fit="cover", height=330,
                                     allow_preview=False, interactive=False, elem_id="gallery")  # fmt: skip
            with gr.Column(scale=5, elem_id="presets"):  # below the result on a narrow screen (style.css)
                rows, labels = _load_presets(max_frames)
                if rows:
                    gr.Examples(rows, [prompt, seed, steps, guidance, frames, randomize], label="Presets",
                                example_labels=labels)  # fmt: skip
        clips, current, last_clip, enhanced = gr.State([]), gr.State(None), gr.State(None), gr.State(None)
        saved_clips = gr.BrowserState([], **_storage(output_dir, "clips"))
        saved_prompt = gr.BrowserState({"prompt": ""}, **_storage(output_dir, "prompt"))

        fields = [prompt, negative, seed, steps, guidance, frames]
        draft_steps = gr.Number(DRAFT_STEPS, visible=False)  # a draft leaves the Steps slider as it is
        seed_out = gr.Number(label="Seed used", precision=0, visible=False)  # /generate's seed, an integer
        draft_fields = [prompt, negative, seed, draft_steps, guidance, frames]
        full_speed = gr.Textbox(FULL, visible=False)  # Render final renders without the step cache
        # /generate's optional parameters after speed, the same for every model (the image: only its own need it).
        media = [source_video, strength, smooth, *([source_image] if source_image else [])]
        _document_api(source_video, strength, smooth, source_image)
        ui = dict(queue=False, api_visibility="private")  # instant UI updates: not queued, not in the API
        controls = [run_btn, draft_btn, final_btn, cancel_btn]
        lock = dict(
            fn=start_run, outputs=[seed, *controls, run_status], preprocess=False, js=SHOW_STATUS_JS, **ui
        )
        job = dict(
            fn=renderer.generate, inputs=[*fields, speed, *media], outputs=[video, seed_out, settings, last_clip], validator=validate,
            preprocess=False, concurrency_id="gpu", show_progress_on=[video, run_status],
            concurrency_limit=max(1, len(pipes)),  # a job per device at once
        )  # fmt: skip
        runs = [
            run_btn.click(**lock, inputs=[*fields, randomize, speed, *media]).success(
                **job, api_name="generate"
            ),
            draft_btn.click(**lock, inputs=[*draft_fields, randomize, speed, *media]).success(
                **{**job, "inputs": [*draft_fields, speed, *media]}, api_visibility="private"
            ),
            final_btn.click(final_inputs, current, [*fields, randomize, smooth, strength], **ui)
            .success(**lock, inputs=[*fields, randomize, full_speed, *media])
            .success(**{**job, "inputs": [*fields, full_speed, *media]}, api_visibility="private"),
        ]
        views = [video, seed_used, settings, mp4_btn, gif_btn, make_gif_btn, reuse_btn, final_btn]
        shown = [current, seed_used, *views[3:], status, run_status]
        for run in runs:
            run.success(add_clip, [last_clip, clips], [gallery, clips, saved_clips, *shown], **ui)
            # Unlocked after a clip, an error or a cancel (Gradio's page runs `then` after a cancel but not after
            # an error, `failure` after both).
            run.then(lambda: buttons(running=False), None, controls, **ui)
            run.failure(lambda: buttons(running=False), None, controls, **ui)
        # At once: the click is seen. Then our cancel, which returns once the job has stopped, then Gradio's,
        # which takes a job still waiting out of its queue (in this order: jobs.Renderer.cancel says why).
        cancel_btn.click(None, None, cancel_btn, js=STOPPING_JS)
        cancel_btn.click(
            cancel, None, [run_status, *views, current], cancels=runs, show_progress="hidden", **ui
        )
        gallery.select(
            show_clip, clips, [*views, *fields, randomize, current, run_status, smooth, strength], **ui
        )
        # A file to start from, once uploaded: what of it will be used (or why it cannot be), before any job. Queued
        # (reading a file is work; and Gradio refuses a malformed file value there as an error, not an HTTP 500).
        reading = dict(show_progress="minimal", api_visibility="private", concurrency_limit=2,
                       concurrency_id="read", preprocess=False)  # fmt: skip
        source_video.change(lambda v: show_source(v, "video"), source_video, [source_note, frames], **reading)
        if source_image is not None:
            source_image.change(lambda v: show_source(v, "image")[0], source_image, source_note, **reading)
        reuse = "(s) => (/^[0-9]+$/.test(s || '') ? [Number(s), false] : [undefined, undefined])"
        reuse_btn.click(None, seed_used, [seed, randomize], js=reuse)
        seed.input(None, None, randomize, js="() => false")  # a seed typed in is the one to use
        make_gif_btn.click(None, None, make_gif_btn, js=MAKING_GIF_JS)  # seconds of work: say so at once
        make_gif_btn.click(
            make_gif, current, [gif_btn, make_gif_btn], concurrency_limit=1, concurrency_id="gif",
            show_progress="hidden", api_visibility="private",
        ).success(None, gif_btn, None, js=DOWNLOAD_JS).failure(
            lambda: gr.Button(GIF, interactive=False), None, make_gif_btn, **ui
        )  # fmt: skip
        prompt.change(lambda p: gr.skip() if (line := meter(p)) is None else line, prompt, tokens,
                      show_progress="hidden", trigger_mode="always_last", **ui)  # fmt: skip
        prompt.change(None, prompt, saved_prompt, js="(p) => ({prompt: p})")  # kept in this browser
        enhance_btn.click(
            enhance, prompt, [prompt, enhanced], api_name="enhance", preprocess=False,
            concurrency_limit=1 if local_enhancer else None, concurrency_id="enhance",
        ).success(show_enhanced, enhanced, [enhanced_box, enhanced_note, original], **ui)  # fmt: skip
        undo_btn.click(undo_enhance, enhanced, [prompt, enhanced_box], **ui)
        demo.load(restore, [saved_clips, saved_prompt],
                  [status, seed, gallery, clips, saved_clips, prompt, run_status], **ui)  # fmt: skip
    return demo.queue(max_size=queue_size, default_concurrency_limit=1)


def load_pipeline(args: argparse.Namespace, device=None) -> tuple[CogVideoXPipeline | None, str]:
    """The pipeline (configs and tokenizer only) on `device` (default: --device) and a notice for the page; (None,
    why) when unavailable.

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
        from cogvideox.testing import tiny_random_checkpoint

        # The CLI's copy, written once (atomically) in the temp dir: outside the served output folder.
        model, notice = tiny_random_checkpoint(), TINY_NOTICE
    try:
        pipe = CogVideoXPipeline.from_pretrained(
            model, device=device or args.device, dtype=args.dtype, memory_mode=memory_mode, compile=compile
        )
        if ZERO_GPU:
            pipe.load()
    except Exception as e:  # offline, no such repo, a broken folder: the page must still come up and say so
        return None, (
            f"⚠️ **The model {args.model} is unavailable**: {e}\n\nThe page works but cannot render. Check "
            "the path or your Hub access, or run `python app.py --model tiny-random` to try the app offline."
        )
    return pipe, notice


def load_pipelines(args: argparse.Namespace, devices: list) -> tuple[list[CogVideoXPipeline], str]:
    """A pipeline per device, all alike (model, dtype, memory mode, compile), and the page's notice; ([], why) when
    unavailable. A memory mode left to pick is picked per device, from its own free memory, as each loads."""
    if args.compile and len(devices) > 1:  # the blocks' code object: a graph per batch size and device
        import torch

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(devices))
    pipes = []
    for device in devices:
        pipe, notice = load_pipeline(args, device)
        if pipe is None:
            return [], notice
        pipes.append(pipe)
    return pipes, notice


def startup_lines(args: argparse.Namespace, pipe, demo: gr.Blocks) -> list[str]:
    """What the server log says once the page is up: where, which model, and how to share it safely. `pipe`: one
    pipeline, a list of them (one per device) or None."""
    lines, pipes = [f"CogVideoX demo: {demo.local_url}"], _pipelines(pipe)
    if not pipes:
        lines.append(f"  model {args.model}: unavailable (the page says why); it cannot render")
    else:
        pipe = pipes[0]
        mode = pipe.offloader.mode
        mode = "picked from free memory at the first generation" if mode == "auto" else mode
        dtype = str(pipe.dtype).removeprefix("torch.")
        where = f"{pipe.device.type}, {dtype}" if len(pipes) == 1 else (
            f"{', '.join(str(p.device) for p in pipes)}: a job on each at once; {dtype}")  # fmt: skip
        lines.append(f"  model: {args.model} ({where}); memory mode: {mode}")
    users = len(args.auth or [])
    login = (
        f"login required ({users} user{'s' * (users > 1)})"
        if users
        else "no login: anyone who reaches it can use it"
    )
    if demo.share_url:
        lines.append(f"  public link: {demo.share_url}, {login}")
    elif args.host in ("127.0.0.1", "localhost", "::1"):
        lines.append(
            "  only this machine can open it. To share it: --share --auth-file users.txt "
            "(one user:password per line)"
        )
    else:
        lines.append(f"  open to the network on {args.host}:{args.port}, {login}")
    if not users and (demo.share_url or args.host not in ("127.0.0.1", "localhost", "::1")):
        lines.append("  to require a login: --auth-file users.txt (one user:password per line)")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    try:  # a device this machine lacks is the operator's mistake: one line, not a page that cannot render
        devices = pick_devices(args.device, args.devices, zero_gpu=ZERO_GPU)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(gradio_cache_dir(args.output_dir)))
    pipes, notice = load_pipelines(args, devices)
    pipe = pipes[0] if pipes else None
    enhancer = None
    if pipe is not None:
        try:
            enhancer = PromptEnhancer.from_env(lambda text: pipe.count_tokens(text).n_tokens)
        except ValueError as e:
            print(f"prompt enhancer disabled: {e}")
    demo = create_demo(pipes, enhancer, output_dir=args.output_dir, notice=notice)
    # Gradio's own banner is off (quiet): it recommends `share=True` in code and GRADIO_SERVER_PORT, where this
    # app has --share --auth-file and --port. Our lines follow once the server is up.
    try:
        demo.launch(**launch_options(args, THEME), quiet=True, prevent_thread_lock=True)
    except OSError:  # Gradio's "Cannot find empty port" (a busy port, or an address this machine lacks)
        raise SystemExit(
            f"error: cannot listen on {args.host}:{args.port}: the port is in use (or the address is not this "
            f"machine's); choose another with --port, e.g. --port {args.port + 1}"
        ) from None
    print("\n".join(startup_lines(args, pipes, demo)), flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
