"""A visitor's video or image to start from: the page's inputs for it, the checks before it is read, its
conversion to the model's size, and its deletion.

Gradio stores an upload in its own folder (GRADIO_TEMP_DIR: `launch.gradio_cache_dir`, outside the served output
folder) after guard.py has let through only videos and images within MAX_UPLOAD_BYTES. An event then receives the
upload's path, which Gradio has checked is in that folder; it is checked again here before it is read. Reading it
(cogvideox.media: center crop, resize, 8 fps, at most the model's frames) is remembered for the last few files, so
the checks before the queue, the note shown on upload and the job read each file once. Uploads are deleted
UPLOAD_TTL_S after they arrive (`cleaner`, run beside the server), converted frames are never written to disk.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import anyio
import gradio as gr
import numpy as np
from gradio.utils import get_upload_folder

from cogvideox import media
from cogvideox.arguments import image_video_size, size_follows_image, takes_video
from cogvideox.sampling import DEFAULT_STRENGTH
from webapp.validation import MIN_FRAMES, MIN_STRENGTH

# Limits; each may be overridden by an environment variable of the same name (0 closes the upload route).
MAX_UPLOAD_BYTES = int(os.environ.get("MAX_UPLOAD_BYTES", media.MAX_INPUT_BYTES))
UPLOAD_TTL_S = int(os.environ.get("UPLOAD_TTL_S", 3600))
PARTIAL_AGE_S = 600  # a file an upload cut off (over the cap, or refused) left in Gradio's folder
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
CONVERT_SLOTS, CONVERT_WAIT_S, REMEMBERED = 2, 60.0, 3  # a 720x480 video: 51 MB
_slots = threading.BoundedSemaphore(CONVERT_SLOTS)
_lock = threading.Lock()
_remembered: OrderedDict[tuple, Source | str] = (
    OrderedDict()
)  # the last files read (or why they could not be)


class UploadError(ValueError):
    """A problem with an uploaded file; `field` names the input ("video" or "image")."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Source:
    """A file as the model reads it: `pixels` uint8 (T, H, W, 3) for a video, (H, W, 3) for an image."""

    kind: str
    pixels: np.ndarray
    name: str  # the visitor's own name for the file (never a path of this server)

    def first(self, frames: int) -> Source:
        return Source(self.kind, self.pixels[:frames], self.name)

    def note(self, fps: int) -> str:
        """What the page shows of the file it will use."""
        height, width = self.pixels.shape[-3:-1]
        if self.kind == "image":
            return f"Using your image as the first frame, cropped to {width}×{height}."
        n = len(self.pixels)
        return f"Using {n} frames ({n / fps:.1f} s) of your video, cropped to {width}×{height}."

    def settings(self, fps: int) -> dict:
        """What a clip's settings say of the file it started from."""
        height, width = self.pixels.shape[-3:-1]
        used = {"file": self.name, "size": f"{width}x{height}"}
        if self.kind == "video":
            used.update(frames=len(self.pixels), seconds=round(len(self.pixels) / fps, 2))
        return {f"start_{self.kind}": used}


def upload_path(value, field: str) -> Path | None:
    """The file of an upload input's value (Gradio's FileData as a dict); None when there is none."""
    if value is None:
        return None
    path = value.get("path") if isinstance(value, dict) else None
    folder = Path(get_upload_folder()).resolve()
    if not isinstance(path, str) or not Path(path).resolve().is_relative_to(folder):
        raise UploadError(field, f"must be a file uploaded to this app (got {type(value).__name__})")
    path = Path(path).resolve()
    suffixes = VIDEO_SUFFIXES if field == "video" else IMAGE_SUFFIXES
    if path.suffix.lower() not in suffixes:
        raise UploadError(
            field,
            f"{_name(value, path)} is not {'a video' if field == 'video' else 'an image'} "
            f"({', '.join(suffixes)})",
        )
    if not path.is_file():
        raise UploadError(
            field,
            f"{_name(value, path)} is gone (uploads are kept {UPLOAD_TTL_S / 60:g} min): upload it again",
        )
    return path


def _name(value, path: Path) -> str:
    name = value.get("orig_name") if isinstance(value, dict) else None
    name = Path(name).name if isinstance(name, str) and name.strip() else path.name
    return name if len(name) <= 80 else name[:79] + "…"


def load(pipe, value, field: str) -> Source | None:
    """The upload in `value` at the model's size: a video's first `pipe.max_frames` frames at its fps, or an
    image. UploadError saying what is wrong (not a video, damaged, too long: cogvideox.media's words)."""
    path = upload_path(value, field)
    if path is None:
        return None
    height, width, stat = *generation_size(pipe, path, field), path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, field, height, width, pipe.max_frames)
    with _lock:
        if key in _remembered:
            _remembered.move_to_end(key)
            return _raise_or(field, _remembered[key])
    if not _slots.acquire(timeout=CONVERT_WAIT_S):
        raise UploadError(field, "the server is busy reading other files: try again shortly")
    try:
        if field == "video":
            pixels = media.load_video(path, height, width, max_frames=pipe.max_frames, fps=pipe.fps)
        else:
            pixels = media.load_image(path, height, width)
        found = Source(field, pixels, _name(value, path))
        if field == "video" and len(pixels) < MIN_FRAMES:
            found = (
                f"{found.name} is too short: at least {MIN_FRAMES} frames ({(MIN_FRAMES - 1) / pipe.fps:g} s)"
            )
    except ValueError as e:  # media names the file, never its folder
        found = str(e)
    finally:
        _slots.release()
    with _lock:
        _remembered[key] = found
        while len(_remembered) > REMEMBERED:
            _remembered.popitem(last=False)
    return _raise_or(field, found)


def generation_size(pipe, path: Path, field: str) -> tuple[int, int]:
    """The (height, width) a file is read at: the model's, or for CogVideoX 1.5 image to video the image's shape
    within the model's grid (cogvideox.arguments.image_video_size)."""
    d = pipe.defaults
    shown = (
        media.image_size(path) if field == "image" and size_follows_image(pipe.transformer_config) else None
    )
    if shown is None or 0 in shown:
        return d["height"], d["width"]
    return image_video_size(pipe.transformer_config, pipe.vae_config, *shown)


def _raise_or(field: str, found: Source | str) -> Source:
    if isinstance(found, str):
        raise UploadError(field, found)
    return found


def prepare(pipe, kwargs: dict, smooth: bool = False) -> tuple[dict, dict]:
    """check_inputs' kwargs -> the pipeline's (the upload read: `video=` frames with their count as num_frames,
    or `image=`) and what the clip's file needs (`smooth`, `source`). UploadError for a file that cannot be used."""
    video, image, strength = (kwargs.get(k) for k in ("video", "image", "strength"))
    kwargs = {k: v for k, v in kwargs.items() if k not in ("video", "image", "strength")}
    extras = {"smooth": smooth is True, "source": None}
    if pipe.needs_image and image is None:
        raise UploadError(
            "image", "is required: this model makes a video from an image (Start from an image)"
        )
    if image is not None and not pipe.needs_image:
        raise UploadError("image", "is not used by this model: it starts from text or a video")
    if video is not None and pipe.needs_image:
        raise UploadError("video", "is not used by this model: it starts from an image")
    if video is not None and not takes_video(pipe.transformer_config):
        raise UploadError("video", "is not used by this model: CogVideoX 1.5 starts from text or an image")
    if video is not None:
        source = load(pipe, video, "video")
        # As many frames as asked for, at most the video's: both 8N+1, so the first ones are 8N+1 too.
        source = source.first(min(len(source.pixels), kwargs["num_frames"]))
        kwargs.update(video=source.pixels, num_frames=len(source.pixels), strength=strength)
        extras["source"] = source
    elif image is not None:
        extras["source"] = load(pipe, image, "image")
        pixels = kwargs["image"] = extras["source"].pixels
        kwargs.update(height=pixels.shape[0], width=pixels.shape[1])  # the image's, where the size follows it
    return kwargs, extras


def sweep(blocks, folder: Path, max_age_s: float, now: float | None = None) -> int:
    """Delete what visitors uploaded more than `max_age_s` ago (the files Gradio's upload route stored, which it
    lists in `blocks.upload_file_set`) and what a cut-off upload left at the top of Gradio's folder; how many."""
    now, removed = time.time() if now is None else now, 0
    for name in list(blocks.upload_file_set):
        path = Path(name)
        try:
            if now - path.stat().st_mtime <= max_age_s:
                continue
            path.unlink()
            removed += 1
            with suppress(OSError):
                path.parent.rmdir()  # its content-hash folder, once empty
        except FileNotFoundError:
            pass
        blocks.upload_file_set.discard(name)
    for path in folder.glob("tmp*"):  # Gradio's parser writes each part to a NamedTemporaryFile there
        with suppress(OSError):
            if path.is_file() and now - path.stat().st_mtime > PARTIAL_AGE_S:
                path.unlink()
                removed += 1
    return removed


@asynccontextmanager
async def cleaner(app):
    """A lifespan for Gradio's app (launch's app_kwargs): sweeps uploads every few minutes while it serves."""

    async def every():
        while True:
            await asyncio.sleep(max(1.0, min(300.0, UPLOAD_TTL_S / 4)))
            folder = Path(get_upload_folder())
            await anyio.to_thread.run_sync(sweep, app.get_blocks(), folder, UPLOAD_TTL_S)

    task = asyncio.create_task(every())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def source_inputs(pipe) -> tuple:
    """The page's inputs for a file to start from, in the Blocks being built: (video, strength, image, note).

    A text-to-video model offers "Start from a video" (the image input is None); an image-to-video model asks
    for its image first (the video inputs exist, hidden, so /generate has the same parameters for every model)."""
    needs_image = bool(pipe and pipe.needs_image)
    limits = (
        f"Up to {MAX_UPLOAD_BYTES / 2**20:g} MB and {media.MAX_INPUT_SECONDS:g} s; "
        f"its first {(pipe.max_frames - 1) / pipe.fps if pipe else 6:g} s are used"
    )
    image = None
    if needs_image:
        with gr.Group(elem_id="from-image"):
            image = gr.Image(
                label="Start from an image (this model needs one)"
                + (": the video takes its shape" if size_follows_image(pipe.transformer_config) else ""),
                type="filepath",
                sources=["upload", "clipboard"],
                height=220,
                elem_id="source-image",
            )
    # 0 bytes: the upload route is closed; CogVideoX 1.5 does not start from a video (prepare says so to the API)
    shown = (pipe is None or takes_video(pipe.transformer_config)) and MAX_UPLOAD_BYTES > 0
    with gr.Accordion("🎞️ Start from a video", open=False, visible=shown, elem_id="from-video"):
        video = gr.Video(
            label="Your video (MP4, WebM, MOV, GIF…)", sources=["upload"], height=220, elem_id="source-video"
        )
        strength = gr.Slider(
            MIN_STRENGTH,
            1.0,
            DEFAULT_STRENGTH,
            step=0.05,
            label="Strength",
            elem_id="strength",
            info="How much to change it: lower keeps more of your video",
        )
        gr.Markdown(
            f"{limits}, center-cropped to the model's size at {pipe.fps if pipe else 8} fps.",
            elem_classes="hint",
        )
    note = gr.Markdown("", elem_classes="hint", elem_id="source-note")
    return video, strength, image, note


def describe(pipe, value, field: str) -> tuple[str, int | None]:
    """The note under the inputs once a file is uploaded (what will be used of it, or why it cannot be), and for
    a video its frame count (the Frames to ask for: all of it)."""
    if value is None or pipe is None:
        return "", None
    try:
        source = load(pipe, value, field)
    except UploadError as e:
        return f"⚠️ {e}", None
    return source.note(pipe.fps), len(source.pixels) if field == "video" else None
