"""Gradio demo: `python app.py --model THUDM/CogVideoX-2b` (or `--model tiny-random` to try it offline).

`create_demo(pipeline)` builds the UI around a pipeline it is handed (tests hand it a tiny one): the layout here,
its event handlers in events.py; jobs.py runs the render jobs, clips.py keeps the clips and each browser's gallery.
serve.py starts it: weights load on the first generation, so the page is up in seconds; a missing model still
gives a page that says why. On a Hugging Face ZeroGPU Space they load at start-up instead, and each job runs in
ZeroGPU's GPU worker (jobs.py). Under torchrun with --parallel, each clip is denoised by all the processes and
rank 0 serves the page (ranks.py).
"""

from __future__ import annotations

import sys

try:  # started with an interpreter that lacks the requirements (the system's python3): say how to start it
    # webapp first (not in sorted order): on ZeroGPU it imports spaces, which must come before torch
    import webapp  # noqa: I001
    import gradio as gr
    import torch  # noqa: F401
except ModuleNotFoundError as e:
    if __name__ != "__main__":
        raise
    sys.exit(
        f"error: {e.name} is not installed for {sys.executable}: start the app with `make demo` "
        "(MODEL=tiny-random to try it offline) or `.venv/bin/python app.py`"
    )

# isort: split
import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

from cogvideox.config import RELEASE_DEFAULTS
from cogvideox.enhance import PromptEnhancer
from cogvideox.pipeline import MAX_SEED, CogVideoXPipeline
from webapp import jobs, loras, ranks, uploads
from webapp.clips import CLIP_NOTE, GIF, OUTPUT_TTL_S
from webapp.events import CANCEL, PageEvents, pipelines
from webapp.launch import gradio_cache_dir, parse_args
from webapp.pool import pick_devices
from webapp.serve import (
    load_pipelines,
    open_pipeline,
    prompt_enhancer,
    serve_until_stopped,
    start_server,
    startup_lines,
)
from webapp.validation import (
    FULL,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    MIN_GUIDANCE,
    PROMPT_BOX_CHARS,
    SMOOTH_FPS,
    SPEED_CHOICES,
    TokenMeter,
    frame_counts,
    seconds,
    smooth_offered,
)

ASSETS = Path(__file__).resolve().parent / "assets"
EXAMPLES = Path(__file__).resolve().parent / "examples" / "prompts.json"

# Limits; each may be overridden by an environment variable of the same name (the request limits: validation.py).
DRAFT_STEPS = int(os.environ.get("DRAFT_STEPS", 10))
QUEUE_SIZE = int(os.environ.get("QUEUE_SIZE", 8))  # waiting jobs; past it, "busy, try again shortly"
ZERO_GPU_CANCEL_NOTE = (
    "On this ZeroGPU Space a job runs in a GPU process of its own: **Cancel cannot stop a job that has started**; "
    "it frees the page and the job runs to its end."
)

# System fonts: the page makes no request to a font CDN.
THEME = gr.themes.Soft(
    primary_hue="violet",
    secondary_hue="indigo",
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)
IDLE = '<span class="idle">Progress, time left and your place in the queue show here.</span>'
STOPPING_JS = "() => ({__type__: 'update', value: '⏹ Stopping…', interactive: false})"
MAKING_GIF_JS = "() => ({__type__: 'update', value: '🎞️ Making…', interactive: false})"
# As a job starts: its progress and the result box (where the preview plays) in view, scrolled as little as can
# be and only if either is not (they sit together: beside each other on a desktop, one under the other on a
# phone); where both cannot fit, the result's top.
SHOW_STATUS_JS = """(...inputs) => { const v = document.querySelector("#result-video"),
  s = document.querySelector("#run-status");
  if (v && s) { const a = v.getBoundingClientRect(), b = s.getBoundingClientRect(), h = window.innerHeight;
    const top = Math.min(a.top, b.top), bottom = Math.max(a.bottom, b.bottom);
    const by = bottom - top > h ? a.top - 8 : top < 0 ? top - 8 : bottom > h ? bottom - h + 8 : 0;
    if (by) window.scrollBy({top: by}); }
  return inputs; }"""
# Starts the download of a file a DownloadButton was just given (the GIF, made on the first click).
DOWNLOAD_JS = """(file) => { if (file && file.url) { const a = document.createElement("a");
  a.href = file.url; a.download = file.orig_name || "clip.gif"; document.body.appendChild(a); a.click(); a.remove(); } }"""
UI = dict(queue=False, api_visibility="private")  # instant UI updates: not queued, not in the API


def _token_html(pipe, prompt) -> str:
    """The token meter's line for `prompt` (tests and the first paint; the page's meter is a TokenMeter)."""
    return TokenMeter(pipe)(prompt) or ""


def integer_api(component, info: dict):
    """Make `component`'s API schema say integer (gr.Radio and gr.Slider say string and number whatever their
    values): set on the instance, since Gradio writes a .pyi stub beside any module that subclasses a component."""
    component.api_info = lambda: {"type": "integer", **info}
    return component


def _document_api(video, strength, smooth, image, fps: int) -> None:
    """What /generate's optional parameters mean, in its API page (the schema's description, as integer_api)."""
    texts = {
        video: "optional: a video to start from (MP4, WebM, MOV, GIF…), center-cropped to the model's size at "
        f"{fps} fps; as many frames as it has, up to num_frames (CogVideoX 1.0 text-to-video models)",
        strength: "with a video: how much to change it, 0.05 to 1 (lower keeps more of it)",
        smooth: f"a frame interpolated between each two: 2N-1 frames written at {2 * fps} fps (as long, smoother); "
        f"for models below {SMOOTH_FPS} fps",
        image: "the first frame, required by this image-to-video model",
    }
    for component, text in texts.items():
        if component is not None:
            info = component.api_info()
            component.api_info = lambda info=info, text=text: {**info, "description": text}


def _load_presets(pipe) -> tuple[list[list], list[str]]:
    """Rows for [prompt, seed, steps, guidance, frames, randomize]: a preset keeps its own seed, and its length
    where the model makes it (49 frames: CogVideoX 1.0's), else the model's own (81 for 1.5)."""
    presets = json.loads(EXAMPLES.read_text()) if EXAMPLES.is_file() else []
    keys, counts = ("prompt", "seed", "num_inference_steps", "guidance_scale"), frame_counts(pipe)
    default = pipe.defaults["num_frames"] if pipe else RELEASE_DEFAULTS.num_frames
    rows = [
        [*(p[k] for k in keys), p["num_frames"] if p["num_frames"] in counts else default, False]
        for p in presets
    ]
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
    parallel: ranks.Session | None = None,
) -> gr.Blocks:
    """The Blocks UI around `pipeline` (None: the page says `notice` and cannot generate). A list of pipelines, one
    per device, serves that many jobs at once; with `parallel` (one pipeline), each job runs on all torchrun's
    processes."""
    pipes = pipelines(pipeline)
    pipe, output_dir = (pipes[0] if pipes else None), Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    renderer = jobs.Renderer(pipes, output_dir, enhancer, parallel)
    d = pipe.defaults if pipe else RELEASE_DEFAULTS.as_dict()  # no model: the page still shows the release's
    events = PageEvents(pipes, renderer, enhancer, output_dir, notice, d["num_inference_steps"])
    if webapp.ZERO_GPU:  # what ZeroGPU's GPU function renders with: its worker, forked later, inherits it
        jobs.PIPELINE = pipe
    with gr.Blocks(
        title="CogVideoX", analytics_enabled=False, delete_cache=(max(60, OUTPUT_TTL_S // 4), OUTPUT_TTL_S)
    ) as demo:
        _masthead(pipe)
        c = SimpleNamespace(status=gr.Markdown(events.status(), elem_id="model-status"))
        # The first screen, at any width: the prompt, the presets, the buttons and their progress, the result (the
        # preview plays there). Code order is not screen order: style.css places each column in main-row's grid
        # (desktop: these four on the left, the result on the right; a phone: one under the other).
        with gr.Row(equal_height=False, elem_id="main-row"):
            with gr.Column(scale=5, elem_id="inputs-col"):
                _prompt_inputs(c, pipe, enhancer)
            with gr.Column(scale=5, elem_id="settings-col"):
                _settings_inputs(c, pipe, d)
            with gr.Column(scale=5, elem_id="run-col"):
                _run_buttons(c, pipe)
            with gr.Column(scale=6, elem_id="result-col"):
                _result_views(c)
            with gr.Column(scale=5, elem_id="presets"):
                rows, labels = _load_presets(pipe)
                if rows:
                    gr.Examples(
                        rows,
                        [c.prompt, c.seed, c.steps, c.guidance, c.frames, c.randomize],
                        label="Try one",
                        example_labels=labels,
                    )
        c.clips, c.current, c.last_clip, c.enhanced = (
            gr.State([]),
            gr.State(None),
            gr.State(None),
            gr.State(None),
        )
        c.saved_clips = gr.BrowserState([], **_storage(output_dir, "clips"))
        c.saved_prompt = gr.BrowserState({"prompt": ""}, **_storage(output_dir, "prompt"))
        _connect_runs(c, events, renderer, concurrency=max(1, len(pipes)))  # a job per device at once
        _connect_views(c, events, TokenMeter(pipe))
        demo.load(
            events.restore,
            [c.saved_clips, c.saved_prompt],
            [c.status, c.seed, c.gallery, c.clips, c.saved_clips, c.prompt, c.run_status],
            **UI,
        )
    return demo.queue(max_size=queue_size, default_concurrency_limit=1)


def _masthead(pipe) -> None:
    """What the page does, in a line ("Text to video"); the model line under it says which model and what it
    makes."""
    logo = (ASSETS / "logo.svg").read_text() if (ASSETS / "logo.svg").is_file() else ""
    kind = "Image" if pipe is not None and pipe.needs_image else "Text"
    gr.HTML(
        f'<div id="masthead">{logo}<h1>CogVideoX</h1><p>{kind} to video</p></div>', elem_id="masthead-wrap"
    )


def _prompt_inputs(c: SimpleNamespace, pipe, enhancer) -> None:
    """The prompt, how much of it the model reads, and the enhancer (off on this server: its button says so; why,
    the operator reads in the terminal)."""
    hint = "One shot in detail: subject, motion, setting, camera, light…"
    c.prompt = gr.Textbox(
        label="Prompt", lines=3, max_lines=6, max_length=PROMPT_BOX_CHARS, placeholder=hint, elem_id="prompt"
    )
    with gr.Row(equal_height=True, elem_id="prompt-tools"):
        c.tokens = gr.HTML(_token_html(pipe, ""), elem_id="token-count")
        can_enhance = bool(enhancer and enhancer.available)
        c.enhance_btn = gr.Button(
            "✨ Enhance prompt" if can_enhance else "✨ Enhance (off here)",
            size="sm",
            interactive=can_enhance,
            elem_id="enhance",
            scale=0,
            min_width=150,
        )
    c.enhance_note = gr.Markdown(visible=False, elem_id="enhance-note")  # why it did not, beside the button
    with gr.Group(visible=False) as c.enhanced_box:
        c.enhanced_note = gr.Markdown()
        c.original = gr.Textbox(show_label=False, interactive=False, lines=2)
        c.undo_btn = gr.Button("↩️ Undo: restore the original", size="sm")


def _settings_inputs(c: SimpleNamespace, pipe, d: dict) -> None:
    """Speed, smoothing, the seed, a file to start from, and the technical settings (closed)."""
    fps, counts = d["fps"], frame_counts(pipe)
    c.speed = gr.Radio(
        SPEED_CHOICES,
        value=FULL,
        label="Speed",
        elem_id="speed",
        info="Faster and Fastest skip steps that change little",
    )
    c.smooth = gr.Checkbox(
        False,
        label="Smooth motion",
        elem_id="smooth",
        info="a frame added between each two: as long, smoother",
        visible=smooth_offered(pipe),  # at 16 fps already: docs/app.md
    )
    with gr.Row(equal_height=True, elem_id="seed-row"):
        # While Random is on, the box's number (the last run's) is hidden (style.css): it is not the next one.
        c.seed = gr.Number(
            None, label="Seed", precision=0, minimum=-1, maximum=MAX_SEED - 1, min_width=140, elem_id="seed"
        )
        c.randomize = gr.Checkbox(
            True, label="🎲 Random", info="a new seed at every run", min_width=150, elem_id="randomize"
        )
    c.source_video, c.strength, c.source_image, c.source_note = uploads.source_inputs(pipe)
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        c.steps = gr.Slider(1, MAX_STEPS, d["num_inference_steps"], step=1, label="Steps", elem_id="steps")
        integer_api(c.steps, {"minimum": 1, "maximum": MAX_STEPS})
        c.guidance = gr.Slider(MIN_GUIDANCE, MAX_GUIDANCE, d["guidance_scale"], step=0.5, label="Guidance")
        # Lengths in seconds at the model's rate; the value sent is the frame count.
        choices = [(f"{seconds(n, fps)} ({n} frames)", n) for n in counts]
        c.frames = gr.Radio(choices, value=d["num_frames"], label="Length", elem_id="frames")
        period = counts.step  # not an enum: gradio_client shows one as strings
        info = {"minimum": counts[0], "maximum": counts[-1]}
        integer_api(c.frames, {**info, "description": f"{period}N+1: one of {', '.join(map(str, counts))}"})
        c.negative = gr.Textbox(label="Negative prompt", lines=2, max_length=MAX_PROMPT_CHARS)
    c.lora_sliders, c.loras = loras.inputs(pipe)  # the operator's LoRAs, closed; none offered: nothing shows


def _run_buttons(c: SimpleNamespace, pipe) -> None:
    """Generate, Draft and Cancel (each says why when it is off: buttons()), and under them the job's status."""
    with gr.Row(elem_id="run-buttons"):
        c.run_btn = gr.Button(
            **PageEvents.generate_label(pipe is not None, False),
            variant="primary",
            scale=3,
            min_width=100,
            elem_id="generate",
        )
        c.draft_btn = gr.Button(
            **PageEvents.draft_label(pipe is not None, False), scale=2, min_width=90, elem_id="draft"
        )
        c.cancel_btn = gr.Button(
            CANCEL, variant="stop", scale=2, min_width=90, interactive=False, elem_id="cancel"
        )
    # Where the visitor looks after a click, beside the result: the job's progress and queue place (never over
    # the preview), a refusal's reason, then how it went.
    c.run_status = gr.Markdown(IDLE, elem_id="run-status")
    if webapp.ZERO_GPU:
        gr.Markdown(ZERO_GPU_CANCEL_NOTE, elem_classes="hint", elem_id="cancel-note")


def _result_views(c: SimpleNamespace) -> None:
    """The result, its seed and downloads, Render final, its settings, and the gallery."""
    c.video = gr.Video(label="Result", autoplay=True, loop=True, interactive=False, elem_id="result-video")
    with gr.Row(equal_height=True, elem_id="clip-row"):
        # A Number shows 0 until it has a value: the seed used is shown as text, empty until a clip.
        c.seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used")
        button = dict(min_width=70, size="md")  # the widths: style.css
        c.reuse_btn = gr.Button("♻️ Reuse seed", interactive=False, elem_id="reuse", **button)
        c.mp4_btn = gr.DownloadButton("⬇️ MP4", interactive=False, elem_id="download-mp4", **button)
        c.make_gif_btn = gr.Button(GIF, interactive=False, elem_id="make-gif", **button)  # made when asked
        c.gif_btn = gr.DownloadButton("⬇️ GIF", visible=False, elem_id="download-gif", **button)
    c.clip_note = gr.Markdown(CLIP_NOTE, elem_classes="hint", elem_id="clip-note")  # why they are off
    c.final_btn = gr.Button("🎬 Render final", variant="primary", visible=False, elem_id="final")
    with gr.Accordion("Details: the settings used", open=False, elem_id="details"):
        c.settings = gr.JSON(show_label=False, open=True)
    c.gallery = gr.Gallery(
        label="Your clips, newest first (kept in this browser; only you see them)",
        columns=3,
        fit_columns=False,
        object_fit="cover",
        height=330,
        allow_preview=False,
        interactive=False,
        elem_id="gallery",
    )


def _connect_runs(c: SimpleNamespace, ev: PageEvents, renderer: jobs.Renderer, concurrency: int) -> None:
    """Generate, Draft and Render final (each: lock the buttons, run the job, show the clip, unlock), and Cancel."""
    fields = [c.prompt, c.negative, c.seed, c.steps, c.guidance, c.frames]
    draft_steps = gr.Number(DRAFT_STEPS, visible=False)  # a draft leaves the Steps slider as it is
    seed_out = gr.Number(label="Seed used", precision=0, visible=False)  # /generate's seed, an integer
    draft_fields = [c.prompt, c.negative, c.seed, draft_steps, c.guidance, c.frames]
    full_speed = gr.Textbox(FULL, visible=False)  # Render final renders without the step cache
    # /generate's optional parameters after speed, the same for every model (the image: only its own need it, a
    # State, which the API leaves out, holds its place on the others), then the LoRAs.
    media = [c.source_video, c.strength, c.smooth, c.source_image or gr.State(None), c.loras]
    fps = ev.pipe.fps if ev.pipe else RELEASE_DEFAULTS.fps
    _document_api(c.source_video, c.strength, c.smooth, c.source_image, fps)
    controls = [c.run_btn, c.draft_btn, c.final_btn, c.cancel_btn]
    lock = dict(
        fn=ev.start_run, outputs=[c.seed, *controls, c.run_status], preprocess=False, js=SHOW_STATUS_JS, **UI
    )
    job = dict(
        fn=renderer.generate,
        inputs=[*fields, c.speed, *media],
        outputs=[c.video, seed_out, c.settings, c.last_clip],
        validator=ev.validate,
        preprocess=False,
        concurrency_id="gpu",
        show_progress_on=[c.run_status],
        concurrency_limit=concurrency,  # not over the preview
    )
    runs = [
        c.run_btn.click(**lock, inputs=[c.randomize, *fields, c.speed, *media]).success(
            **job, api_name="generate"
        ),
        c.draft_btn.click(**lock, inputs=[c.randomize, *draft_fields, c.speed, *media]).success(
            **{**job, "inputs": [*draft_fields, c.speed, *media]}, api_visibility="private"
        ),
        c.final_btn.click(ev.final_inputs, c.current, [*fields, c.randomize, *ev.kept_outputs(c)], **UI)
        .success(**lock, inputs=[c.randomize, *fields, full_speed, *media])
        .success(**{**job, "inputs": [*fields, full_speed, *media]}, api_visibility="private"),
    ]
    c.views = [
        c.video,
        c.seed_used,
        c.settings,
        c.mp4_btn,
        c.gif_btn,
        c.make_gif_btn,
        c.reuse_btn,
        c.final_btn,
        c.clip_note,
    ]
    shown = [c.current, c.seed_used, *c.views[3:], c.status, c.run_status]
    for run in runs:
        run.success(ev.add_clip, [c.last_clip, c.clips], [c.gallery, c.clips, c.saved_clips, *shown], **UI)
        # Unlocked after a clip, an error or a cancel (Gradio's page runs `then` after a cancel but not after
        # an error, `failure` after both).
        run.then(lambda: ev.buttons(running=False), None, controls, **UI)
        run.failure(lambda: ev.buttons(running=False), None, controls, **UI)
    # At once: the click is seen. Then our cancel, which returns once the job has stopped, then Gradio's,
    # which takes a job still waiting out of its queue (in this order: jobs.Renderer.cancel says why).
    c.cancel_btn.click(None, None, c.cancel_btn, js=STOPPING_JS)
    c.cancel_btn.click(
        ev.cancel, None, [c.run_status, *c.views, c.current], cancels=runs, show_progress="hidden", **UI
    )


def _connect_views(c: SimpleNamespace, ev: PageEvents, meter: TokenMeter) -> None:
    """The gallery, uploads, seeds, the GIF, the token meter, the enhancer and each visit's restore."""
    fields = [c.prompt, c.negative, c.seed, c.steps, c.guidance, c.frames]
    c.gallery.select(
        ev.show_clip,
        c.clips,
        [*c.views, *fields, c.randomize, c.current, c.run_status, *ev.kept_outputs(c), c.speed],
        **UI,
    )
    loras.connect(c.lora_sliders, c.loras, loras.names(ev.pipe))
    # A file to start from, once uploaded: what of it will be used (or why it cannot be), before any job. Queued
    # (reading a file is work; and Gradio refuses a malformed file value there as an error, not an HTTP 500).
    reading = dict(
        show_progress="minimal",
        api_visibility="private",
        concurrency_limit=2,
        concurrency_id="read",
        preprocess=False,
    )
    c.source_video.change(
        lambda v: ev.show_source(v, "video"), c.source_video, [c.source_note, c.frames], **reading
    )
    if c.source_image is not None:
        c.source_image.change(
            lambda v: ev.show_source(v, "image")[0], c.source_image, c.source_note, **reading
        )
    reuse = "(s) => (/^[0-9]+$/.test(s || '') ? [Number(s), false] : [undefined, undefined])"
    c.reuse_btn.click(None, c.seed_used, [c.seed, c.randomize], js=reuse)
    c.seed.input(None, None, c.randomize, js="() => false")  # a seed typed in is the one to use
    c.make_gif_btn.click(None, None, c.make_gif_btn, js=MAKING_GIF_JS)  # seconds of work: say so at once
    c.make_gif_btn.click(
        ev.make_gif,
        c.current,
        [c.gif_btn, c.make_gif_btn],
        concurrency_limit=1,
        concurrency_id="gif",
        show_progress="hidden",
        api_visibility="private",
    ).success(None, c.gif_btn, None, js=DOWNLOAD_JS).failure(
        lambda: gr.Button(GIF, interactive=False), None, c.make_gif_btn, **UI
    )
    c.prompt.change(
        lambda p: gr.skip() if (line := meter(p)) is None else line,
        c.prompt,
        c.tokens,
        show_progress="hidden",
        trigger_mode="always_last",
        **UI,
    )
    c.prompt.change(None, c.prompt, c.saved_prompt, js="(p) => ({prompt: p})")  # kept in this browser
    enhancing = dict(concurrency_limit=1 if ev.local_enhancer else None, concurrency_id="enhance")
    gr.api(ev.enhance, api_name="enhance", **enhancing)  # its failure: the API's error
    c.enhance_btn.click(  # the page's: a failure said beside the button
        ev.enhance_in_page,
        c.prompt,
        [c.prompt, c.enhanced, c.enhance_note],
        api_visibility="private",
        preprocess=False,
        **enhancing,
    ).success(ev.show_enhanced, c.enhanced, [c.enhanced_box, c.enhanced_note, c.original], **UI)
    c.undo_btn.click(ev.undo_enhance, c.enhanced, [c.prompt, c.enhanced_box], **UI)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.parallel:  # every rank of torchrun's: rank 0 serves the page, the others its jobs
        ranks.main(
            args,
            open_pipeline,
            lambda pipe, notice, session: serve(args, [pipe], notice, session),
            zero_gpu=webapp.ZERO_GPU,
        )
        return
    try:  # a device this machine lacks is the operator's mistake: one line, not a page that cannot render
        devices = pick_devices(args.device, args.devices, zero_gpu=webapp.ZERO_GPU)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    pipes, notice = load_pipelines(args, devices)
    serve(args, pipes, notice)


def serve(args, pipes: list[CogVideoXPipeline], notice: str, parallel: ranks.Session | None = None) -> None:
    """The page around `pipes`, served until Ctrl-C."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(gradio_cache_dir(args.output_dir)))
    enhancer = prompt_enhancer(pipes[0] if pipes else None)
    demo = create_demo(pipes, enhancer, output_dir=args.output_dir, notice=notice, parallel=parallel)
    start_server(demo, args, THEME)
    print("\n".join(startup_lines(args, pipes, demo, parallel)), flush=True)
    if enhancer is not None and not enhancer.available:  # the page's button only says it is off
        print(f"  prompt enhancer off: {enhancer.unavailable_reason}", flush=True)
    serve_until_stopped(demo)


if __name__ == "__main__":
    main()
