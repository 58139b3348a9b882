"""What a request may ask for, checked before any work: the app's limits, field checks and the token meter.

Every event of the page can be called directly (gradio_client, curl), the UI-only ones included, so each bounds
its input here first: lengths before tokenizing, numbers by comparison (never converted: `10**400` is valid
JSON), frame counts against the exact 8N+1 set.
"""

from __future__ import annotations

import html
import os
import textwrap
import threading

import numpy as np

from cogvideox.config import RELEASE_DEFAULTS
from cogvideox.pipeline import MAX_SEED
from cogvideox.sampling import DEFAULT_STRENGTH, steps_to_run
from cogvideox.text import is_blank

# Limits; each may be overridden by an environment variable of the same name.
MAX_PROMPT_CHARS = int(os.environ.get("MAX_PROMPT_CHARS", 2000))  # T5 reads 226 tokens, ~1000 characters
# The prompt box holds a little more than a prompt may have: a paste over the limit shows by how much, rather
# than being cut silently by the browser. One that fills the box was cut there, and the meter says so.
PROMPT_BOX_CHARS = MAX_PROMPT_CHARS + 1000
MAX_STEPS = int(os.environ.get("MAX_STEPS", 100))
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, float(os.environ.get("MAX_GUIDANCE", 20))
MIN_FRAMES, FRAME_STEP = 9, 8  # CogVideoX 1.0 (and a video to start from): 8N+1 frames; 1.5: 16N+1
SMOOTH_FPS = (
    16  # Smooth doubles a model's rate up to this; a model already there is not offered it (docs/app.md)
)
MIN_STRENGTH = 0.05  # of a video to start from: lower keeps more of it
FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "num_frames")
# Speed: the pipeline's step cache (TeaCache), which skips transformer steps whose input barely changed. The page
# says it in plain words; the cache's threshold is in a clip's settings (Details).
SPEEDS = {"Full": None, "Faster": "quality", "Fastest": "fast"}
SPEED_CHOICES = [(k, k) for k in SPEEDS]
WORDS_PER_TOKEN = 0.75  # English, for T5: the meter's estimate until the prompt itself says
FULL = "Full"
METER_SLOTS = 2  # token meters computing at once; a flood of prompt edits gets skipped, not queued


def whole(value) -> int | None:
    """An integer from JSON, which may send 42.0; None when it is not a whole number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, float) and value.is_integer() else None


def frame_counts(pipe) -> range:
    """The frame counts a request may ask for: period·N+1 from one period to the model's most (8N+1 up to 49 for
    CogVideoX 1.0, 16N+1 up to 161 for 1.5); no model: the release's."""
    if pipe is None:
        period, most = FRAME_STEP, RELEASE_DEFAULTS.num_frames
    else:
        period, most = pipe.transformer_config.frame_period, pipe.max_frames
    return range(period + 1, most + 1, period)


def seconds(frames: int, fps: int) -> str:
    """How long `frames` last, as the page says it: N frames span (N-1)/fps s (49 at 8 fps: 6 s)."""
    return f"{(frames - 1) / fps:.3g} s"


def smooth_offered(pipe) -> bool:
    """Smooth (a frame between each two, twice the fps) where the model's rate is below SMOOTH_FPS: 8 -> 16 fps.
    At 16 fps (CogVideoX 1.5) motion is already fluid, and 32 fps would cost a minute or more of the server's CPU
    per clip at 1360x768 (docs/app.md)."""
    return pipe is None or pipe.fps < SMOOTH_FPS


def preview_every(steps: int) -> int:
    """How often a job shows its preview: about ten times in all."""
    return max(1, steps // 10)


def check_inputs(
    pipe,
    prompt,
    negative_prompt,
    seed,
    steps,
    guidance_scale,
    num_frames,
    speed=FULL,
    video=None,
    strength=None,
    smooth=False,
    image=None,
):
    """Raw request values -> (pipeline kwargs, {field: problem}). `speed` (None: not given) is one of SPEEDS.

    Cheap: it runs before a job is queued, and again inside the job. The values only: `video` and `image` (uploads)
    pass through as they are, for uploads.prepare to check and read, with `strength` (None without a video);
    `smooth` is checked here, and is not the pipeline's (the clip's file: clips.save_clip).
    """
    negative_prompt = "" if negative_prompt is None else negative_prompt
    errors = _text_problems(prompt, negative_prompt)
    seed_value = -1 if seed is None else whole(seed)
    if seed_value is None or not -1 <= seed_value < MAX_SEED:
        errors["seed"] = f"must be a whole number from 0 to {MAX_SEED - 1} (or -1 for a random one)"
    steps_value = whole(steps)
    if steps_value is None or not 1 <= steps_value <= MAX_STEPS:
        errors["steps"] = f"must be a whole number from 1 to {MAX_STEPS}"
    number = isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool)
    if not number or not MIN_GUIDANCE <= guidance_scale <= MAX_GUIDANCE:  # NaN fails the comparison too
        errors["guidance_scale"] = f"must be a number from {MIN_GUIDANCE:g} to {MAX_GUIDANCE:g}"
    allowed = frame_counts(pipe)
    if whole(num_frames) not in allowed:
        errors["num_frames"] = f"must be one of {', '.join(map(str, allowed))}"
    speed = FULL if speed is None else speed
    if not isinstance(speed, str) or speed not in SPEEDS:
        errors["speed"] = f"must be one of {', '.join(SPEEDS)}"
    strength = DEFAULT_STRENGTH if strength is None else strength
    number = isinstance(strength, (int, float)) and not isinstance(strength, bool)
    if not number or not MIN_STRENGTH <= strength <= 1:
        errors["strength"] = f"must be a number from {MIN_STRENGTH:g} to 1"
    elif video is not None and steps_value is not None and steps_to_run(steps_value, strength) < 1:
        errors["strength"] = f"{strength:g} of {steps_value} steps runs no step: raise Strength or Steps"
    smooth = False if smooth is None else smooth
    if not isinstance(smooth, bool):
        errors["smooth"] = "must be true or false"
    elif smooth and not smooth_offered(pipe):
        errors["smooth"] = f"is not offered for this model: it makes {pipe.fps} fps already (send false)"
    if pipe is None:
        errors.setdefault("prompt", "cannot be rendered: no model is loaded (see the notice at the top)")
    if errors:
        return None, errors
    kwargs = dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=None if seed_value == -1 else seed_value,
        num_inference_steps=steps_value,
        guidance_scale=float(guidance_scale),
        num_frames=whole(num_frames),
        step_cache=SPEEDS[speed],
    )
    if errors := _model_problem(pipe, kwargs):
        return None, errors
    media = dict(video=video, image=image, strength=float(strength) if video is not None else None)
    return {**kwargs, **media}, {}


def _text_problems(prompt, negative_prompt) -> dict:
    errors = {}
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            errors[name] = "must be text"
        elif len(text) > MAX_PROMPT_CHARS:
            errors[name] = f"is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}"
    if "prompt" not in errors and is_blank(prompt):
        errors["prompt"] = "is empty: describe the video you want"
    return errors


def _model_problem(pipe, kwargs: dict) -> dict:
    """A model-specific limit the field checks do not know (the pipeline's own check), by field."""
    height, width = pipe.defaults["height"], pipe.defaults["width"]
    # An image-to-video model's image is checked with the upload (uploads.prepare): here, a stand-in of its size.
    stand_in = {"image": np.zeros((height, width, 3), np.uint8)} if pipe.needs_image else {}
    try:
        pipe.validate(height=height, width=width, **kwargs, **stand_in)
    except ValueError as e:
        names = {"num_inference_steps": "steps", "step_cache": "speed", **{f: f for f in FIELDS}}
        return {next((v for k, v in names.items() if k in str(e)), "prompt"): str(e)}
    return {}


def tokenizer_name(pipe) -> str:
    """The model's tokenizer as people call it: T5Tokenizer / T5TokenizerFast -> "T5"."""
    name = type(getattr(pipe, "tokenizer", None)).__name__.removesuffix("Fast").removesuffix("Tokenizer")
    return name if name not in ("", "NoneType") else "text"


def words_left(prompt: str, used: int, max_tokens: int) -> int:
    """About how many more words fit, at the prompt's own words per token (the closing </s> is not a word's)."""
    words = len(prompt.split())
    ratio = words / (used - 1) if words and used > 1 else WORDS_PER_TOKEN
    return max(0, int((max_tokens - used) * ratio))


class TokenMeter:
    """The "about n words left" line under the prompt (its exact "n / 226 T5 tokens" as the line's title). Tokenizes only text within the prompt limit, and at most
    METER_SLOTS at once: a call that finds no free slot returns None (the page keeps its last line)."""

    def __init__(self, pipe, slots: int = METER_SLOTS):
        self.pipe, self._slots = pipe, threading.BoundedSemaphore(slots)
        self.name = tokenizer_name(pipe)

    def __call__(self, prompt) -> str | None:
        if self.pipe is None or not isinstance(prompt, str):
            return ""
        if len(prompt) > MAX_PROMPT_CHARS:  # before tokenizing: a few MB of text would cost seconds
            over = f"over {MAX_PROMPT_CHARS} characters by {len(prompt) - MAX_PROMPT_CHARS}: shorten it"
            if len(prompt) == PROMPT_BOX_CHARS:  # the box's own limit: the browser cut the paste there
                return f'<div class="tokens over">⚠️ Your paste was cut to {len(prompt)} characters, {over}.</div>'
            return f'<div class="tokens over">⚠️ {len(prompt)} characters: {over}.</div>'
        if not self._slots.acquire(blocking=False):
            return None
        try:
            count = self.pipe.count_tokens(prompt)
        finally:
            self._slots.release()
        used = 0 if is_blank(prompt) else count.n_tokens  # the tokenizer's closing </s> alone is no prompt
        exact = f'title="{used} / {count.max_tokens} {html.escape(self.name)} tokens"'
        if not count.dropped_tokens:
            left = words_left(prompt, used, count.max_tokens)
            return f'<div class="tokens" {exact}>about <b>{left}</b> word{"s" * (left != 1)} left</div>'
        dropped = html.escape(textwrap.shorten(count.dropped_text, 400, placeholder=" …"))
        return (
            f'<div class="tokens over" {exact}>⚠️ Too long: the model does not read the end '
            f"({count.dropped_tokens} tokens), struck out here: <s>{dropped}</s></div>"
        )
