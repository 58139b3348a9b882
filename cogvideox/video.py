"""Frames to browser-playable H.264 MP4 or looping GIF, plus a JSON sidecar with the generation settings; motion-
compensated frame interpolation for smoother playback."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import imageio_ffmpeg
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .pipeline import GenerationResult

# Visually lossless for generated 480p clips at a few MB; x264's default preset.
CRF = 18
# Convert with the BT.709 matrix and tag it: untagged H.264 leaves browsers guessing 601 vs 709.
BT709 = (
    "scale=out_color_matrix=bt709:out_range=tv,"
    "setparams=range=tv:color_primaries=bt709:color_trc=bt709:colorspace=bt709"
)


# Frame interpolation: in-between frames per generated pair at most (2 doubles 8 fps to 16), and how long ffmpeg
# may take (a 49-frame 480x720 clip takes ~5 s on two CPU cores).
MAX_FACTOR = 4
MIN_INTERPOLATE_SIZE = 32  # minterpolate refuses smaller frames
INTERPOLATE_TIMEOUT_S = float(os.environ.get("INTERPOLATE_TIMEOUT_S", 300))


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (T, H, W, 3) with T > 0, got {frames.dtype} {frames.shape}")
    return frames


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` (same suffix, so encoders pick the format) renamed to `path` on success and
    removed on any failure, Ctrl-C included: `path` is either the whole new file or untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames as H.264 / yuv420p (BT.709) MP4 with the index up front.

    yuv420p needs even width and height: an odd size is padded by one replicated row/column, so the video
    is then one pixel larger than the frames.
    """
    frames = _check_frames(frames)
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    path = Path(path)
    with _atomic(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            size=(frames.shape[2], frames.shape[1]),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,  # we padded to even sizes; don't let imageio rescale to multiples of 16
            output_params=["-vf", BT709, "-crf", str(CRF), "-movflags", "+faststart"],
        )
        writer.send(None)
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        except BaseException:
            with suppress(Exception):  # ffmpeg may be gone already (Ctrl-C reaches it too)
                writer.close()
            raise
        writer.close()
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode a video to (T, H, W, 3) uint8 RGB frames."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    width, height = next(reader)["size"]
    frames = [np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3) for frame in reader]
    return np.stack(frames)


def write_gif(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Save frames as a GIF that loops forever; each frame shows for 1/fps s (GIF stores 10 ms units)."""
    frames = _check_frames(frames)
    path = Path(path)
    images = [Image.fromarray(frame) for frame in frames]
    with _atomic(path) as tmp:
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def write_sidecar(path: str | Path, settings: dict[str, Any]) -> Path:
    """Write `settings` as JSON next to the video at `path` (same stem, `.json`)."""
    out = Path(path).with_suffix(".json")
    # default=str keeps values such as dtypes or paths readable instead of failing the whole save.
    text = json.dumps(settings, indent=2, default=str) + "\n"
    with _atomic(out) as tmp:
        tmp.write_text(text)
    return out


@dataclass(frozen=True)
class SavedClip:
    """What `save_result` wrote."""

    mp4: Path
    sidecar: Path
    settings: dict[str, Any]  # the sidecar's contents less its "timings"
    timings: dict[str, Any]
    frames: int  # in the MP4: 2T-1 when smoothed
    fps: int  # the MP4's

    @property
    def smoothed(self) -> bool:
        return self.settings["smooth"]


def save_result(
    result: GenerationResult,
    mp4_path: str | Path,
    *,
    smooth: bool = False,
    extra: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    started: float | None = None,
    on_smooth_error: Callable[[RuntimeError], None] | None = None,
) -> SavedClip:
    """A generation's frames as an H.264 MP4 at `mp4_path` and its JSON sidecar beside it (same stem, .json). Each
    file is written beside its final name and renamed: an interrupted write leaves no partial file.

    smooth: motion-interpolated frames between the generated ones (`smooth_clip`: 2T-1 frames at twice the fps,
    the same duration). When ffmpeg fails at it, `on_smooth_error(error)` is told and the clip is written
    unsmoothed; without on_smooth_error the RuntimeError propagates and nothing is written.
    The sidecar: {**result.settings, **extra, "fps": the file's, "smooth": whether it is smoothed,
    "frames_written": its frame count (smoothed only; num_frames stays the generated count), "steps_computed" (when
    the step cache ran), "time_taken_s" (with `started`, a time.perf_counter() reading: seconds since, once the
    MP4 is written), "timings": {**result.timings, **timings, "smooth": seconds (smoothed only)}}.
    """
    if result.frames is None:
        raise ValueError("the result has no frames (a parallel run's rank other than 0)")
    frames, fps, timings = result.frames, result.fps, {**result.timings, **(timings or {})}
    if smooth:
        t = time.perf_counter()
        try:
            frames, fps = smooth_clip(frames, fps)
            timings["smooth"] = time.perf_counter() - t
        except RuntimeError as e:  # ffmpeg failed: the generated clip may still be worth keeping
            if on_smooth_error is None:
                raise
            on_smooth_error(e)
    mp4 = write_mp4(frames, mp4_path, fps=fps)
    settings = {**result.settings, **(extra or {}), "fps": fps, "smooth": fps != result.fps}
    if settings["smooth"]:
        settings["frames_written"] = len(frames)
    if "steps_computed" in result.timings:  # the step cache was on: how many steps ran the transformer
        settings["steps_computed"] = result.timings["steps_computed"]
    if started is not None:
        settings["time_taken_s"] = round(time.perf_counter() - started, 2)
    sidecar = write_sidecar(mp4, {**settings, "timings": timings})
    return SavedClip(mp4, sidecar, settings, timings, len(frames), fps)


def interpolate(frames: np.ndarray, factor: int = 2, timeout: float | None = None) -> np.ndarray:
    """(T, H, W, 3) uint8 -> factor·(T-1)+1 frames: the inputs at every factor-th index, motion-compensated
    frames between them (ffmpeg's minterpolate, mi_mode=mci, run by imageio-ffmpeg's binary).

    Play the result at fps·factor to keep the clip's duration (see `smooth_clip`). minterpolate emits frames up
    to, not including, the last input's timestamp, so the last frame is cloned once past the end; the outputs
    at the input timestamps are the inputs after an RGB->YUV->RGB round trip, so the exact inputs are put back.
    The first in-between frame or two are less precise than later ones (ffmpeg's motion search has no history
    yet); across a scene cut ffmpeg blends instead of warping.
    """
    frames = _check_frames(frames)
    if isinstance(factor, bool) or not isinstance(factor, int | np.integer) or not 2 <= factor <= MAX_FACTOR:
        raise ValueError(f"factor must be an integer in [2, {MAX_FACTOR}], got {factor!r}")
    count, height, width, _ = frames.shape
    if count < 2:
        raise ValueError(f"interpolation needs at least 2 frames, got {count}")
    if min(height, width) < MIN_INTERPOLATE_SIZE:
        raise ValueError(
            f"interpolation needs frames of at least {MIN_INTERPOLATE_SIZE} pixels a side, got {width}x{height}"
        )
    expected = factor * (count - 1) + 1
    timeout = INTERPOLATE_TIMEOUT_S if timeout is None else timeout
    raw = ["-f", "rawvideo", "-pix_fmt", "rgb24"]
    # Input at 1 fps: minterpolate then runs at `factor` fps; only the ratio matters.
    quiet = ["-hide_banner", "-nostdin", "-loglevel", "error"]
    source = [*raw, "-s", f"{width}x{height}", "-r", "1", "-i", "pipe:0"]
    vf = f"tpad=stop_mode=clone:stop=1,format=yuv444p,minterpolate=fps={factor}:mi_mode=mci"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), *quiet, *source, "-vf", vf, *raw, "pipe:1"]
    try:
        proc = subprocess.run(command, input=frames.tobytes(), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(
            f"frame interpolation took longer than {timeout:g} s{_ffmpeg_says(e.stderr)}"
        ) from None
    frame_bytes = height * width * 3
    got = len(proc.stdout) // frame_bytes
    if proc.returncode or got < expected:
        raise RuntimeError(
            f"frame interpolation failed (ffmpeg exit code {proc.returncode}, {got} of {expected} frames)"
            f"{_ffmpeg_says(proc.stderr)}"
        )
    out = np.frombuffer(proc.stdout, np.uint8, count=expected * frame_bytes)
    out = out.reshape(expected, height, width, 3).copy()  # writable, not a view of ffmpeg's output
    out[::factor] = frames
    return out


def smooth_clip(frames: np.ndarray, fps: int = 8, factor: int = 2) -> tuple[np.ndarray, int]:
    """Interpolated frames and the rate that keeps the clip's duration: 49 frames at 8 fps -> 97 at 16 fps.

    (CogVideoX's reference demo writes its doubled frames at 17 fps, so they play ~6% fast.)
    """
    return interpolate(frames, factor), fps * factor


def _ffmpeg_says(stderr: bytes | None) -> str:
    """ffmpeg's first error line (the cause; later lines are its consequences), as ': ...'."""
    lines = (stderr or b"").decode(errors="replace").strip().splitlines()
    return f": {lines[0].strip()}" if lines else ""
