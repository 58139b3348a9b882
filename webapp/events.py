"""The page's event handlers (app.py wires them to its components): checks before a job is queued, the buttons'
states, the gallery, Cancel, the GIF, the prompt enhancer, and each visit's restore.

The UI-only events read this session's State, which only the server writes; each can still be called directly
(before there is anything to read), so each checks first and otherwise changes nothing. The one input a browser
keeps (its gallery and prompt, gr.BrowserState) is checked entry by entry (clips.py).
"""

from __future__ import annotations

import contextlib
import html
import logging
import secrets
from pathlib import Path

import gradio as gr

from cogvideox.arguments import max_size, size_follows_image
from cogvideox.enhance import EnhanceError, EnhanceResult, PromptEnhancer
from cogvideox.pipeline import MAX_SEED, CogVideoXPipeline
from webapp import clips as gallery_store
from webapp import loras, uploads
from webapp.clips import MAX_GALLERY, OUTPUT_TTL_S
from webapp.jobs import Renderer, display_name, user_error
from webapp.request import RequestError, named
from webapp.validation import FIELDS, MAX_PROMPT_CHARS, SPEEDS, seconds

CANCEL = "⏹ Cancel"
# A refused click is said under its button, in the words of the page's labels (each problem: validation.py).
FIELD_NAMES = {
    "prompt": "The prompt",
    "negative_prompt": "The negative prompt",
    "seed": "The seed",
    "steps": "Steps",
    "guidance_scale": "Guidance",
    "num_frames": "Length (frames)",
    "speed": "Speed",
    "strength": "Strength",
    "smooth": "Smooth",
    "video": "Your video",
    "image": "Your image",
    "loras": loras.LABEL,
}


def refusal(problems: dict) -> str:
    """The line under the buttons when a click starts nothing: what to change."""
    said = "; ".join(f"{FIELD_NAMES.get(name, name.capitalize())} {text}" for name, text in problems.items())
    return f'<span class="refused">⚠️ Not started. {html.escape(said)}.</span>'


def pipelines(pipeline) -> list[CogVideoXPipeline]:
    """A pipeline, or a list of them (one per device), or None -> the list."""
    return list(pipeline) if isinstance(pipeline, (list, tuple)) else [] if pipeline is None else [pipeline]


def model_status(pipe, notice: str) -> str:
    """The model line: which model (its Hub id or folder name), what it makes, whether it is loaded; `pipe` may be a
    list, one per device (that many clips at a time). Where it runs (devices, dtype) is the
    operator's: the terminal says it (serve.startup_lines), as for torchrun's processes."""
    pipes = pipelines(pipe)
    if not pipes:
        return notice
    line = f"**{display_name(pipes[0].model_id)}** · {makes(pipes[0])}"
    if len(pipes) > 1:
        line += f" · {len(pipes)} clips at a time"
    if all(p.loaded for p in pipes):
        state = f"✅ {line} · ready"
    else:
        state = f"⏳ {line} · it loads at the first video, which takes a while"
    return f"{notice}\n\n{state}" if notice else state


def makes(pipe) -> str:
    """What a model makes, for a visitor: "up to 6 s at 8 fps, 720×480"; for CogVideoX 1.5 image to video, the
    size follows the image ("up to 10 s at 16 fps, your image's shape up to 1360×768")."""
    d = pipe.defaults
    most_h, most_w = max_size(pipe.transformer_config, pipe.vae_config)
    size = f"{d['width']}×{d['height']}"
    if size_follows_image(pipe.transformer_config):
        size = f"your image's shape up to {most_w}×{most_h}"
    return f"up to {seconds(pipe.max_frames, pipe.fps)} at {pipe.fps} fps, {size}"


class PageEvents:
    """The handlers of one page, around its pipelines (none, one, or one per device), job runner and enhancer.
    Gradio names each event after its method (tests look them up by it)."""

    def __init__(
        self,
        pipes: list[CogVideoXPipeline],
        renderer: Renderer,
        enhancer: PromptEnhancer | None,
        output_dir: Path,
        notice: str,
        full_steps: int,
    ):
        self.pipes, self.pipe = pipes, (pipes[0] if pipes else None)
        self.renderer, self.enhancer, self.output_dir = renderer, enhancer, output_dir
        self.notice, self.full_steps = notice, full_steps
        # A local prompt model shares the GPU with the video model; a remote endpoint holds only its own caller.
        self.local_enhancer = bool(enhancer and enhancer.needs_gpu_lock)

    def status(self) -> str:
        return model_status(self.pipes, self.notice)

    # -- before a job ----------------------------------------------------------------------------------------

    def problems(self, values: dict) -> dict:
        """{field: problem} of a request's values; none, and the job takes the Request this checked (its upload
        read) as it is."""
        try:
            self.renderer.checked(values)
        except RequestError as e:
            return e.problems
        return {}

    def validate(self, *inputs):
        values = named(inputs)
        errors = self.problems(values)
        return [gr.validate(name not in errors, errors.get(name, "")) for name in values]

    @staticmethod
    def generate_label(has_model: bool, running: bool) -> dict:
        """Generate's label and state: off, it says why."""
        if not has_model:
            return dict(value="🎬 Generate (no model)", interactive=False)
        return dict(value="⏳ Running…" if running else "🎬 Generate", interactive=not running)

    @staticmethod
    def draft_label(has_model: bool, running: bool) -> dict:
        """Draft: a quick look at fewer steps (the status line says how many); off, it says why."""
        if not has_model:
            return dict(value="⚡ Draft (no model)", interactive=False)
        return dict(value="⚡ Busy" if running else "⚡ Draft", interactive=not running)

    def buttons(self, running: bool) -> tuple:
        """Generate, Draft and Render final are off while the session's own job runs or waits; Cancel only then."""
        has_model = self.pipe is not None
        return (
            gr.Button(**self.generate_label(has_model, running)),
            gr.Button(**self.draft_label(has_model, running)),
            gr.Button(interactive=not running),
            gr.Button(CANCEL, interactive=running),
        )

    def start_run(self, randomize, *inputs):
        # Before the job is queued: a new seed if asked for, and the buttons locked. Inputs the job will refuse
        # lock nothing (no event would unlock them): what is wrong is said under the buttons, and by the fields.
        values = named(inputs)
        if randomize is True:
            values["seed"] = secrets.randbelow(MAX_SEED)
        if problems := self.problems(values):
            return *(gr.skip(),) * 5, refusal(problems)
        return values["seed"] if randomize is True else gr.skip(), *self.buttons(running=True), ""

    def final_inputs(self, clip):
        if not isinstance(clip, dict):
            return (gr.skip(),) * (len(FIELDS) + 4 + len(loras.names(self.pipe)))
        inputs = {**clip["settings"], "num_inference_steps": self.full_steps}
        return *(inputs[k] for k in gallery_store.SETTINGS), False, *self.kept(clip)

    @staticmethod
    def kept_outputs(c) -> list:
        """The inputs a clip's own options go back to (`kept`): Smooth, Strength, each LoRA's slider, the LoRAs."""
        return [c.smooth, c.strength, *c.lora_sliders, c.loras]

    def kept(self, clip) -> tuple:
        return *kept_options(clip), *loras.restored(clip["settings"], loras.names(self.pipe))

    def show_source(self, value, field):
        note, count = uploads.describe(self.pipe, value, field)
        return note, gr.skip() if count is None else count  # Frames: all of the video, as it will be used

    # -- after a job -----------------------------------------------------------------------------------------

    def add_clip(self, clip, clips):
        if not isinstance(clip, dict):
            return (gr.skip(),) * 13
        clips = [clip, *clips][:MAX_GALLERY]
        gallery_view = gr.Gallery(gallery_store.gallery(clips), selected_index=None)  # the new clip is shown
        done = gallery_store.done_text(clip)
        view = gallery_store.views(clip, self.full_steps)
        return (
            gallery_view,
            clips,
            gallery_store.browser_copy(clips),
            clip,
            view[1],
            *view[3:],
            self.status(),
            done,
        )

    def show_clip(self, clips, evt: gr.EventData):
        # The select event's data comes from the client, as anything or nothing: read as gr.EventData (whose
        # SelectData subclass fails inside Gradio on a missing index) and checked here.
        data = getattr(evt, "_data", None)
        index = data.get("index") if isinstance(data, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(clips):
            return gr.skip()
        clip = clips[index]
        inputs = [clip["settings"][k] for k in gallery_store.SETTINGS]
        # Said by the buttons (an unqueued event cannot show a toast): why there is no video, and what to do.
        note = (
            f"⌛ This clip's files have expired (clips are kept {OUTPUT_TTL_S / 3600:g} h). Its settings are "
            "restored: Generate renders it again."
            if gallery_store.expired(clip)
            else f"▶️ Your clip: {html.escape(gallery_store.caption(clip))}. Its settings are restored."
        )
        return (
            *gallery_store.views(clip, self.full_steps),
            *inputs,
            False,
            clip,
            note,
            *self.kept(clip),
            speed_of(clip),
        )

    def cancel(self, request: gr.Request):
        # Where the job stopped, once it has; the result shown is cleared (it is not what was asked for, and it
        # stays in the gallery), and with it the offer to render it in full.
        text = (
            f'<span class="cancelled">{self.renderer.cancel(request.session_hash)}</span>'  # style.css: why
        )
        return text, *gallery_store.views(None, self.full_steps), None

    def make_gif(self, clip):
        if not isinstance(clip, dict):
            return gr.skip(), gr.skip()
        gif = gallery_store.make_gif(clip)
        if gif is None:
            raise user_error(f"This clip's files have expired (clips are kept {OUTPUT_TTL_S / 3600:g} h).")
        return gr.DownloadButton(value=str(gif), visible=True), gr.Button(visible=False)

    def restore(self, saved, saved_prompt):
        # Each visit: the model's state, a fresh seed, and what this browser kept (checked: clips.restore).
        fresh = (self.status(), secrets.randbelow(MAX_SEED))
        if (
            self.pipe is None
        ):  # nothing can be checked against a model, nor rendered: leave the browser's copy be
            return *fresh, *(gr.skip(),) * 5
        clips = gallery_store.restore(saved, self.output_dir, self.pipe)
        text = saved_prompt.get("prompt") if isinstance(saved_prompt, dict) else None
        text = text if isinstance(text, str) and 0 < len(text) <= MAX_PROMPT_CHARS else gr.skip()
        gone = sum(map(gallery_store.expired, clips))
        note = (
            f"⌛ {gone} of your {len(clips)} clips expired (clips are kept {OUTPUT_TTL_S / 3600:g} h): their "
            "settings are still in the gallery."
            if gone
            else gr.skip()
        )
        view = gr.Gallery(gallery_store.gallery(clips), selected_index=None)
        return *fresh, view, clips, gallery_store.browser_copy(clips), text, note

    # -- the prompt enhancer ---------------------------------------------------------------------------------

    def enhance_lock(self):
        """A local model waits for (and holds) the video pipeline on its device, if any."""
        if not self.local_enhancer:
            return contextlib.nullcontext()
        return self.renderer.pool.take(device=self.enhancer.backend.device)

    def enhance(self, prompt: str) -> str:
        """Rewrite a short idea into the detailed English prompt CogVideoX was trained on (the /enhance API: a
        failure is its error)."""
        return self.enhanced(prompt).text

    def enhance_in_page(self, prompt):
        """The ✨ button: the rewrite, or why not said beside the button (not as a toast in a corner)."""
        try:
            result = self.enhanced(prompt)
        except gr.Error as e:
            said = f'<span class="refused">⚠️ {e.title}: {e.message}</span>'
            return gr.skip(), None, gr.Markdown(said, visible=True)
        return result.text, result, gr.Markdown("", visible=False)

    def enhanced(self, prompt) -> EnhanceResult:
        enhancer = self.enhancer
        if enhancer is None or not enhancer.available:
            raise user_error("The prompt enhancer is off on this server.")  # why: in the operator's terminal
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise user_error(f"prompt must be text of at most {MAX_PROMPT_CHARS} characters")
        # Gradio renders a gr.Error's message as HTML (links and images survive its sanitiser), and so does the
        # page's note, and these messages carry what an endpoint sent: escaped, they show as the text they are.
        try:
            with self.enhance_lock():
                return enhancer.enhance(prompt)
        except EnhanceError as e:
            raise user_error(html.escape(f"{e} (waited {e.elapsed_s:.0f} s)"), title="Enhance failed") from e
        except ValueError as e:
            raise user_error(html.escape(str(e)), title="Enhance failed") from e
        except Exception as e:  # a bug, or a backend failing its own way: our words, its traceback in the log
            logging.getLogger(__name__).exception("the prompt enhancer failed")
            said = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise user_error(
                html.escape(f"The prompt enhancer failed ({said})"), title="Enhance failed"
            ) from e

    def show_enhanced(self, result):
        if not isinstance(result, EnhanceResult):
            return gr.skip(), gr.skip(), gr.skip()
        trimmed = ", trimmed to fit" if result.trimmed else ""
        note = (
            f"✨ Enhanced by {result.backend} in {result.elapsed_s:.1f} s ({result.tokens} tokens{trimmed})."
        )
        return gr.Group(visible=True), f"{note} Your original:", result.original

    def undo_enhance(self, result):
        if not isinstance(result, EnhanceResult):
            return gr.skip(), gr.skip()
        return result.original, gr.Group(visible=False)


def kept_options(clip) -> tuple:
    """Smooth and Strength as the clip had them (a clip made before these options had neither)."""
    s = clip["settings"]
    strength = s.get("strength")
    return s.get("smooth") is True, strength if isinstance(strength, float) else gr.skip()


def speed_of(clip):
    """The Speed a clip was made at (so Generate makes it again), where its step cache is one of the choices."""
    cache = clip["settings"].get("step_cache")
    return next((speed for speed, preset in SPEEDS.items() if preset == cache), gr.skip())
