"""A user's file as model input: a video (MP4, WebM, GIF, ...) or an image, center-cropped and resized to the
generation size; a video is also resampled to the model's 8 fps and cut to 8N+1 frames.

Decoding runs imageio-ffmpeg's binary with a demuxer allowlist (no playlists that open other files or URLs)
and every size, length and time bounded before or while it reads; each problem with a file is a `ValueError`
that names it (its file name only: in the app, paths are the server's). The limits are read from what ffmpeg
itself writes about the stream it decodes (its framecrc header and packet times, each decoded frame's PPM header,
showinfo's own lines), never from the banner it logs, where the file's metadata (a title, a comment, a track's
language) can print any text, "Stream #0:0: Video: h264, 64x64" and "Duration: 00:00:01.00" included.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import warnings
from collections.abc import Iterator
from contextlib import closing
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Limits; each may be overridden by an environment variable of the same name.
MAX_INPUT_BYTES = int(os.environ.get("MAX_INPUT_BYTES", 50 * 2**20))
MAX_INPUT_SECONDS = float(os.environ.get("MAX_INPUT_SECONDS", 60))  # the source's duration
MAX_INPUT_PIXELS = int(os.environ.get("MAX_INPUT_PIXELS", 4096 * 4096))  # per source frame or image
MAX_DECODED_FRAMES = int(os.environ.get("MAX_DECODED_FRAMES", 2000))  # source frames read (240 fps: 8 s)
DECODE_TIMEOUT_S = float(os.environ.get("DECODE_TIMEOUT_S", 120))

# ffmpeg's -format_whitelist: containers and single images; not hls/concat (they open other files) nor tty.
DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,png_pipe,jpeg_pipe,webp_pipe"
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "GIF"]  # Pillow's names
KINDS = "a video (MP4, MOV, WebM, MKV, AVI, GIF) or an image (PNG, JPEG, WebP)"

PROBE_TIMEOUT_S = 30
LOG_KEPT = 64 << 10  # bytes of the probe's log kept for messages (a file can make it long)

# framecrc's header and packet lines ("stream, dts, pts, duration, size, crc"), on stdout: ffmpeg's own words.
_TB = re.compile(rb"#tb 0: (\d+)/(\d+)\n")
_DIMENSIONS = re.compile(rb"#dimensions 0: (\d+)x(\d+)\n")
_PACKET = re.compile(rb"0, *(-?\d+), *(-?\d+), *(-?\d+),")
_NOPTS = -(2**63)
# Log lines only ffmpeg starts: metadata it prints is indented (and a line break in it indents the rest), so no
# file can begin a line with a "[component @ 0x...]" prefix.
_SHOWINFO = re.compile(
    r"\[Parsed_showinfo_0 @ 0x[0-9a-f]+\] n:\s*\d+\s+pts:\s*(-?\d+|NOPTS)\b.*?\bduration:\s*(-?\d+)\b"
    r".*?\bs:(\d+)x(\d+)\b"
)
_TIME_BASE = re.compile(r"\[Parsed_showinfo_0 @ 0x[0-9a-f]+\] config in time_base: (\d+)/(\d+)")
_OVER_MAX_PIXELS = re.compile(  # a decoder refusing a frame over -max_pixels
    r"^(?:\[[^]\n]*\] )*\[IMGUTILS @ 0x[0-9a-f]+\] Picture size (\d+)x(\d+) exceeds", re.M
)
_LOG_PREFIX = re.compile(r"^(\[[^]]*\] )+")


def center_crop_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) or (T, H, W, 3) uint8 -> the same at height x width: the largest centered region of the target's
    aspect ratio (to the nearest pixel, so nothing outside it bleeds in), resized with Lanczos."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"expected uint8 (H, W, 3) or (T, H, W, 3), got {frames.dtype} {frames.shape}")
    _check_size(height, width)
    if frames.ndim == 4:
        return np.stack([center_crop_resize(frame, height, width) for frame in frames])
    src_h, src_w = frames.shape[:2]
    if (src_h, src_w) == (height, width):
        return frames.copy()
    scale = max(height / src_h, width / src_w)
    crop_w, crop_h = max(1, round(width / scale)), max(1, round(height / scale))
    left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
    image = Image.fromarray(frames).crop((left, top, left + crop_w, top + crop_h))
    return np.array(image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8)  # writable


def load_video(
    path: str | os.PathLike, height: int, width: int, max_frames: int = 49, fps: int = 8
) -> np.ndarray:
    """A video or animated GIF (a still image gives one frame) -> (T, height, width, 3) uint8 at `fps`.

    Output frame k shows the source frame on screen at time k/fps, for every k/fps up to the clip's end
    (inclusive), so N frames span (N-1)/fps s as CogVideoX's own 49 frames span 6 s: a 2 s clip gives 17. At
    most `max_frames` are kept (decoding stops there), then the largest 8N+1 count (1, 9, 17, ...).
    """
    _check_size(height, width)
    for name, value in (("max_frames", max_frames), ("fps", fps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    path = _check_file(path)
    _probe(path)
    tick, ticks = Fraction(1, fps), []
    held: tuple[int, np.ndarray] | None = None  # the source frame on screen, by index
    resized: tuple[int, np.ndarray] | None = None  # one resize per source frame, however many ticks show it

    def show_held(until: Fraction, inclusive: bool) -> None:
        nonlocal resized
        while len(ticks) < max_frames and (
            len(ticks) * tick < until or (inclusive and len(ticks) * tick == until)
        ):
            if resized is None or resized[0] != held[0]:
                resized = (held[0], center_crop_resize(held[1], height, width))
            ticks.append(resized[1])

    with closing(_decode(path)) as frames:
        for index, (frame, start, duration) in enumerate(frames):
            if held is not None:  # the previous frame is on screen until this one starts
                show_held(until=start, inclusive=False)
            if len(ticks) >= max_frames or index >= MAX_DECODED_FRAMES:
                break
            held, end = (index, frame), start + duration
        else:
            if held is not None:
                show_held(until=end, inclusive=True)  # the last frame, up to the clip's end
    if not ticks:
        raise ValueError(f"{path.name}: no frames were read (MAX_DECODED_FRAMES is {MAX_DECODED_FRAMES})")
    return np.stack(ticks[: (len(ticks) - 1) // 8 * 8 + 1])


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) of an image file as shown (EXIF orientation applied), from its header; None for a file
    Pillow cannot open (load_image says why)."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            width, height = im.size
            turned = im.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
    except (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError):
        return None
    return (width, height) if turned else (height, width)


def load_image(image: str | os.PathLike | np.ndarray, height: int, width: int) -> np.ndarray:
    """A PNG/JPEG/WebP/GIF file (the first frame; EXIF orientation applied; transparency over white), a video
    file (its first frame) or a uint8 array ((H, W), (H, W, 3) or (H, W, 4)) -> (height, width, 3) uint8,
    center-cropped and resized."""
    _check_size(height, width)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))
        ):
            raise ValueError(
                f"expected a uint8 (H, W), (H, W, 3) or (H, W, 4) image, got {image.dtype} {image.shape}"
            )
        if 0 in image.shape:
            raise ValueError(f"the image is empty: {image.shape}")
        return center_crop_resize(_to_rgb(Image.fromarray(image)), height, width)
    path = _check_file(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                _check_pixels(path, *im.size)
                im.seek(0)
                return center_crop_resize(_to_rgb(ImageOps.exif_transpose(im)), height, width)
    except UnidentifiedImageError:
        pass  # not an image Pillow reads: a video, or neither (load_video says which)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{path.name} has too many pixels (more than {MAX_INPUT_PIXELS})") from None
    except (OSError, SyntaxError, EOFError) as e:  # Pillow's errors for truncated or malformed data
        raise ValueError(f"{path.name} is damaged and cannot be read as an image ({e})") from None
    return load_video(path, height, width, max_frames=1)[0]


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path.name} does not exist")
    if not path.is_file():
        raise ValueError(f"{path.name} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path.name} is empty")
    if size > MAX_INPUT_BYTES:
        raise ValueError(f"{path.name} is {size / 2**20:.1f} MB; the limit is {MAX_INPUT_BYTES / 2**20:g} MB")
    return path


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(f"{path.name} is {width}x{height}, more than {MAX_INPUT_PIXELS} pixels per frame")


def _ffmpeg_input(path: Path) -> list[str]:
    # "file:" so that a name such as "http:x" or "pipe:1" is still a local file. -max_pixels: every decoder (the
    # probe's trial decode too) refuses a larger frame before allocating it. They count rows padded to 64 pixels
    # (measured: H.264, VP9, GIF, PNG), hence twice the limit; the exact limit is checked on each decoded frame.
    quiet = ["-hide_banner", "-nostdin", "-nostats"]
    limits = [
        "-max_pixels",
        str(2 * MAX_INPUT_PIXELS),
        "-format_whitelist",
        DEMUXERS,
        "-protocol_whitelist",
        "file",
    ]
    return [imageio_ffmpeg.get_ffmpeg_exe(), *quiet, *limits, "-i", f"file:{path}"]


def _probe(path: Path) -> None:
    """Refuse, before decoding, a file ffmpeg cannot open, without a video stream, or whose stream (the one
    load_video decodes) has frames too large or packets spanning too long."""
    size, seconds, log = _stream_facts(path)
    if size is None:
        if "Input #0" not in log:
            raise ValueError(f"{path.name} is not {KINDS} that can be read{_reason(log)}")
        if "matches no streams" in log:
            raise ValueError(f"{path.name} has no video stream")
    if size is None or 0 in size:  # the trial decode failed: too large for it (-max_pixels), or damaged
        if over := _OVER_MAX_PIXELS.search(log):
            raise ValueError(
                f"{path.name} is {over[1]}x{over[2]}, more than {MAX_INPUT_PIXELS} pixels per frame"
            )
        raise ValueError(f"{path.name} is damaged: its frames cannot be read{_reason(log)}")
    _check_pixels(path, *size)
    if seconds > MAX_INPUT_SECONDS:
        raise ValueError(f"{path.name} is {seconds:.1f} s long; the limit is {MAX_INPUT_SECONDS:g} s")


def _stream_facts(path: Path) -> tuple[tuple[int, int] | None, float, str]:
    """The stream's size, the time its packets span and the head of ffmpeg's log, from copying the stream (no
    decoding) to ffmpeg's framecrc muxer: its header and one line per packet, all written by ffmpeg itself."""
    command = [*_ffmpeg_input(path), "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "pipe:1"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timed_out = threading.Event()
    timer = threading.Timer(PROBE_TIMEOUT_S, lambda: (timed_out.set(), proc.kill()))
    timer.start()
    head: list[bytes] = []
    reader = threading.Thread(target=_keep_head, args=(proc.stderr, head), daemon=True)
    reader.start()
    size, base, first, end = None, Fraction(1), None, None
    try:
        for line in proc.stdout:  # O(1) memory whatever the packet count; the timer bounds the time
            if packet := _PACKET.match(line):
                dts, pts, duration = (int(v) for v in packet.groups())
                if (start := pts if pts != _NOPTS else dts) != _NOPTS:
                    first = start if first is None else min(first, start)
                    end = max(end if end is not None else start, start + max(duration, 0))
            elif match := _DIMENSIONS.fullmatch(line):
                size = (int(match[1]), int(match[2]))
            elif match := _TB.fullmatch(line):
                base = Fraction(int(match[1]), int(match[2]) or 1)
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        reader.join(timeout=5)
    if timed_out.is_set():
        raise ValueError(f"{path.name} took too long to open")
    seconds = float((end - first) * base) if first is not None else 0.0
    return size, seconds, b"".join(head).decode(errors="replace")


def _keep_head(stream, head: list[bytes]) -> None:
    """Reads a pipe to its end (so ffmpeg never blocks on it), keeping its first LOG_KEPT bytes."""
    kept = 0
    while chunk := stream.read1(65536):
        if kept < LOG_KEPT:
            head.append(chunk[: LOG_KEPT - kept])
            kept += len(head[-1])
    stream.close()


def _reason(log: str) -> str:
    """ffmpeg's complaint, without its component prefix: ' (moov atom not found)'."""
    lines = [_LOG_PREFIX.sub("", line).strip() for line in log.splitlines() if line.startswith("[")]
    lines = [line for line in lines if "misdetection possible" not in line]
    specific = [line for line in lines if not line.startswith("Error opening input")]
    reason = (specific or lines or [""])[0].removeprefix("Error opening input: ")
    return f" ({reason[:200]})" if reason else ""


class _Log(threading.Thread):
    """Reads ffmpeg's stderr as it comes: showinfo's timestamp and size of each frame, a decoder's refusal of a
    frame over -max_pixels, and the last other line."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.times, self.time_base, self.last, self.done = stream, [], None, "", False
        self.over: tuple[int, int] | None = None
        self.changed = threading.Condition()
        self.start()

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode(errors="replace").rstrip()
            with self.changed:
                if match := _SHOWINFO.match(line):  # at the line's start: never the file's metadata
                    self.times.append((match[1], int(match[2]), int(match[3]), int(match[4])))
                elif match := _OVER_MAX_PIXELS.match(line):
                    self.over = (int(match[1]), int(match[2]))
                elif match := _TIME_BASE.match(line):
                    self.time_base = Fraction(int(match[1]), int(match[2]) or 1)
                elif line.strip():
                    self.last = _LOG_PREFIX.sub("", line.strip())
                self.changed.notify_all()
        with self.changed:
            self.done = True
            self.changed.notify_all()

    def frame(self, index: int) -> tuple[str, int, int, int]:
        """pts, duration, width and height of decoded frame `index`, as showinfo saw it (before any scaling)."""
        with self.changed:
            # Bounded: the decode timeout kills ffmpeg, which closes stderr.
            self.changed.wait_for(lambda: len(self.times) > index or self.done, timeout=DECODE_TIMEOUT_S + 5)
            return self.times[index] if len(self.times) > index else ("NOPTS", 0, 0, 0)


def _decode(path: Path) -> Iterator[tuple[np.ndarray, Fraction, Fraction]]:
    """(frame, start, duration) of each video frame in order, times in seconds from the first frame. Frames come
    as PPM (each carries its size, so rotated video needs no guessing); showinfo logs each frame's timestamp
    before passing it on. Each frame's size as decoded is checked: the PPM's before its pixels are read, and
    showinfo's, as ffmpeg would scale a later frame of another size to the first's."""
    select = ["-map", "0:v:0", "-vf", "showinfo=checksum=0", "-fps_mode", "passthrough"]
    output = [
        "-frames:v",
        str(MAX_DECODED_FRAMES + 1),
        "-f",
        "image2pipe",
        "-c:v",
        "ppm",
        "-pix_fmt",
        "rgb24",
    ]
    command = [*_ffmpeg_input(path), "-loglevel", "info", *select, *output, "pipe:1"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timed_out = threading.Event()
    timer = threading.Timer(DECODE_TIMEOUT_S, lambda: (timed_out.set(), proc.kill()))
    timer.start()
    log = _Log(proc.stderr)
    first = last = None
    index = 0
    try:
        while (magic := proc.stdout.readline()) == b"P6\n":
            width, height = map(int, proc.stdout.readline().split())
            _check_pixels(path, width, height)  # before allocating it, whatever the stream's header said
            proc.stdout.readline()  # maxval: 255
            data = proc.stdout.read(width * height * 3)
            if len(data) < width * height * 3:
                break
            pts, duration, *decoded = log.frame(index)
            _check_pixels(path, *decoded)
            if log.over:  # a frame the decoder refused: larger still
                _check_pixels(path, *log.over)
            base = log.time_base or Fraction(1)
            # A frame without a timestamp follows the last one; timestamps never step back.
            start = int(pts) * base if pts != "NOPTS" else (last or Fraction(0))
            first = start if first is None else first
            last = start if last is None else max(start, last)
            frame = np.frombuffer(data, np.uint8).reshape(height, width, 3)
            yield frame, last - first, max(duration, 0) * base
            index += 1
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        log.join(timeout=5)
    if timed_out.is_set():
        raise ValueError(f"{path.name} took longer than {DECODE_TIMEOUT_S:g} s to decode")
    if log.over:
        _check_pixels(path, *log.over)
    if index == 0:
        reason = f" ({log.last[:200]})" if log.last and not magic else ""
        raise ValueError(f"{path.name} has no video frames that could be decoded{reason}")
