"""Our clips: their files in the output folder, the page's gallery of them, and the copy a browser keeps.

A clip is an MP4 and a JSON sidecar named `<time>-<16 random hex digits>` (a GIF beside them once someone asks for
one): unguessable, so a clip's name is the key to it, as its download link already is. The gallery survives a
reload in the browser's localStorage (gr.BrowserState). Gradio encrypts that copy with a key it sends to the page,
so the browser can write anything there: each entry is checked here before use. Only names of our own clips are
opened, in our output folder; a clip's settings come from its sidecar, or once its files have expired from the
entry, bounded as a request's are. Anything else is dropped.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

import gradio as gr
import numpy as np

from cogvideox.video import read_mp4, save_result, write_gif, write_mp4
from webapp import loras
from webapp.validation import check_inputs

CLIP_NAME = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{16}\.(mp4|gif|json)$")
OUTPUT_TTL_S = int(os.environ.get("OUTPUT_TTL_S", 6 * 3600))  # our clips and Gradio's copies
MAX_GALLERY = int(os.environ.get("MAX_GALLERY", 24))
SAVED_BYTES = 96 * 1024  # the browser's copy, sent back at each visit: well inside the request cap
SIDECAR_BYTES = 64 * 1024
SETTINGS = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "num_frames")
GIF = "🎞️ GIF"  # the button that makes a clip's GIF
# Under Reuse, MP4 and GIF while they are off: why.
CLIP_NOTE = "♻️ Reuse seed, ⬇️ MP4 and 🎞️ GIF: once you have made a clip."
EXPIRED_NOTE = "⌛ This clip's files have expired: no MP4 or GIF (Generate renders it again)."
EXPIRED = np.full((90, 135, 3), 40, dtype=np.uint8)  # the thumbnail of a clip whose files are gone


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


def _clip(mp4: Path, settings: dict) -> dict:
    return {
        "name": mp4.name,
        "mp4": str(mp4),
        "gif": str(mp4.with_suffix(".gif")),
        "seed": settings["seed"],
        "settings": settings,
    }


def save_clip(result, folder: Path, started: float, smooth: bool = False, source=None) -> dict:
    """Write a generation's MP4 and sidecar as the CLI does (`cogvideox.video.save_result`; the GIF waits until
    someone asks: `make_gif`); the clip.

    smooth: a frame interpolated between each two (2T-1 frames) and twice the fps, so the clip lasts as long.
    source: the uploads.Source it started from, named in the settings."""
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(8)}"
    extra = source.settings(result.fps) if source is not None else None
    saved = save_result(result, folder / f"{stem}.mp4", smooth=smooth, extra=extra, started=started)
    # The page shows "smooth" only for a smoothed clip, as /generate always has.
    settings = {k: v for k, v in saved.settings.items() if (k, v) != ("smooth", False)}
    return _clip(saved.mp4, settings)


def write_preview(frames: np.ndarray, folder: Path, fps: int, scale: int = 4) -> Path:
    """A running job's preview (F, h, w, 3) as a small MP4, upscaled `scale`x (nearest). Named as a clip is:
    unguessable, so only the session it is sent to can fetch it, and `clean_outputs` removes any left behind."""
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    return write_mp4(frames, folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(8)}.mp4", fps=fps)


def done_text(clip: dict) -> str:
    """What the page says once a clip is made: its time, seed and steps (and those computed, with the cache)."""
    s = clip["settings"]
    steps = f"{s['num_inference_steps']} steps"
    if "steps_computed" in s:
        steps += f" ({speed_name(s)}: {s['steps_computed']} of them computed)"
    done = f"✅ Done in {s['time_taken_s']:.1f} s: seed {clip['seed']}, {steps}"
    if isinstance(used := s.get("start_video"), dict):
        done += f", from {used['frames']} frames of your video (strength {s.get('strength')})"
    if s.get("smooth") is True:
        done += f", smoothed to {s['frames_written']} frames at {s['fps']} fps"
    if used := loras.described(s):
        done += f", with {', '.join(used)}"
    return done + "."


def make_gif(clip: dict) -> Path | None:
    """The clip's GIF, made from its MP4 the first time it is asked for; None once the clip has expired."""
    mp4, gif = Path(clip["mp4"]), Path(clip["gif"])
    if not gif.is_file():
        try:
            frames = read_mp4(mp4)
        except (OSError, RuntimeError, StopIteration):  # imageio-ffmpeg's errors for a file that is gone
            return None
        write_gif(frames, gif, fps=clip["settings"].get("fps", 8))
    return gif


def _checked(values: dict, pipe) -> dict | None:
    """Settings checked as a request's are (`check_inputs`); None if any is out of bounds or not a fixed seed."""
    kwargs, errors = check_inputs(
        pipe, *(values.get(k) for k in SETTINGS), smooth=values.get("smooth", False)
    )
    if errors or kwargs["seed"] is None:
        return None
    settings = {**{k: kwargs[k] for k in SETTINGS}, "smooth": values.get("smooth") is True}
    # Its LoRAs, where this server still offers them all (else the clip is kept without: Generate would differ).
    used = values.get("loras")
    if isinstance(used, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in used):
        pairs, problem = loras.check(pipe, {e["name"]: e.get("scale") for e in used})
        if not problem and pairs:
            settings["loras"] = [{"name": n, "scale": v} for n, v in pairs]
    return settings


def _read_sidecar(path: Path, pipe) -> dict | None:
    """The settings our job wrote beside a clip; None when missing or not what we write."""
    try:
        with path.open("rb") as f:
            data = json.loads(f.read(SIDECAR_BYTES + 1))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or _checked(data, pipe) is None:
        return None
    return {k: v for k, v in data.items() if k != "timings"}


def from_browser(entry, folder: Path, pipe) -> dict | None:
    """A gallery entry the browser kept -> our clip, or None for anything that is not one (tampered, malformed)."""
    if not isinstance(entry, dict):
        return None
    name = entry.get("name")
    if not isinstance(name, str) or not CLIP_NAME.match(name) or not name.endswith(".mp4"):
        return None
    mp4 = folder / name  # the pattern allows no separator: always a file directly in our folder
    settings = _read_sidecar(mp4.with_suffix(".json"), pipe) if mp4.is_file() else None
    if settings is None:  # expired: what the browser remembers, checked as a request would be
        settings = _checked(entry, pipe)
        if settings is None:
            return None
    return _clip(mp4, settings)


def restore(saved, folder: Path, pipe) -> list[dict]:
    """The browser's copy of a gallery -> the clips in it that are ours, newest first, without repeats."""
    clips, seen = [], set()
    for entry in saved[:MAX_GALLERY] if isinstance(saved, list) else []:
        clip = from_browser(entry, folder, pipe)
        if clip is not None and clip["name"] not in seen:
            seen.add(clip["name"])
            clips.append(clip)
    return clips


def browser_copy(clips: list[dict]) -> list[dict]:
    """What the browser keeps of the gallery: each clip's name and settings, newest first, within SAVED_BYTES."""
    saved, size = [], 2
    for clip in clips:
        entry = {"name": clip["name"], **{k: clip["settings"][k] for k in SETTINGS}}
        if clip["settings"].get("smooth") is True:
            entry["smooth"] = True
        if used := [{"name": e["name"], "scale": e["scale"]} for e in clip["settings"].get("loras") or []]:
            entry["loras"] = used  # by name: what the page offers (a file's hash is the sidecar's)
        size += len(json.dumps(entry, ensure_ascii=False).encode()) + 1
        if size > SAVED_BYTES:
            break
        saved.append(entry)
    return saved


def expired(clip: dict) -> bool:
    return not Path(clip["mp4"]).is_file()


def speed_name(settings: dict) -> str:
    """The Speed a clip was made at, as the page names it (an API's own step-cache threshold: by its number)."""
    cache = settings.get("step_cache")
    named = {"quality": "Faster", "fast": "Fastest"}  # validation.SPEEDS, reversed
    return "Full" if cache is None else named.get(cache, f"step cache {cache}")


def _shorten(text: str, limit: int) -> str:
    words = " ".join(text.split())
    return words if len(words) <= limit else words[:limit].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


def caption(clip: dict) -> str:
    """The start of the prompt, then frames, steps and seed, then each setting that changed the clip and is not
    the default (speed, smoothing, a video or image it started from and its strength, guidance, a negative
    prompt, its LoRAs): what tells one clip from another."""
    s = clip["settings"]
    line = f"{_shorten(s['prompt'], 28)} · {s['num_frames']} frames · {s['num_inference_steps']} steps · seed {s['seed']}"
    extras = [] if s.get("step_cache") is None else [speed_name(s)]
    if s.get("smooth") is True:
        extras.append("smooth")
    if isinstance(s.get("start_video"), dict) or isinstance(s.get("strength"), float):
        extras.append(f"from a video ({s.get('strength')})")
    if s.get("start_image") is not None:
        extras.append("from an image")
    if s.get("guidance_scale") not in (None, 6.0):
        extras.append(f"guidance {s['guidance_scale']:g}")
    if s.get("negative_prompt"):
        extras.append(f"not: {_shorten(s['negative_prompt'], 16)}")
    extras.extend(loras.described(s))  # its LoRAs and their strengths
    line = " · ".join([line, *extras])
    return f"⌛ expired · {line}" if expired(clip) else line


def gallery(clips: list[dict]) -> list[tuple]:
    return [(EXPIRED if expired(c) else c["mp4"], caption(c)) for c in clips]


def views(clip: dict | None, full_steps: int) -> tuple:
    """What shows one clip (or none): video, seed used, settings, MP4 download, GIF download, Make-GIF, Reuse
    seed, Render final, and the line that says why Reuse, MP4 and GIF are off. Render final is offered for a draft
    only, and always renders the clip shown."""
    if clip is None:
        return (
            None,
            "",
            None,
            gr.DownloadButton(value=None, interactive=False),
            gr.DownloadButton(value=None, visible=False),
            gr.Button(GIF, visible=True, interactive=False),
            gr.Button(interactive=False),
            gr.Button(visible=False),
            gr.Markdown(CLIP_NOTE, visible=True),
        )
    files = not expired(clip)
    gif = files and Path(clip["gif"]).is_file()
    draft = clip["settings"]["num_inference_steps"] < full_steps
    return (
        clip["mp4"] if files else None,
        str(clip["seed"]),
        clip["settings"],
        gr.DownloadButton(value=clip["mp4"] if files else None, interactive=files),
        gr.DownloadButton(value=clip["gif"] if gif else None, visible=gif),
        gr.Button(GIF, visible=not gif, interactive=files),  # its label again after "Making…"
        gr.Button(interactive=True),
        gr.Button(visible=draft, value=f"🎬 Render final ({full_steps} steps)"),
        gr.Markdown(EXPIRED_NOTE, visible=not files),
    )
