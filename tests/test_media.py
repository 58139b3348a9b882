"""A user's file as model input: real files written with ffmpeg / Pillow, decoded and checked pixel by pixel."""

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from cogvideox import media
from cogvideox.media import center_crop_resize, load_image, load_video
from cogvideox.video import write_gif, write_mp4

RED, BLUE, WHITE, GRAY = (255, 0, 0), (0, 0, 255), (255, 255, 255), (128, 128, 128)
ROOT = Path(__file__).resolve().parent.parent
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
# What a file's metadata can make ffmpeg print in its banner, where the old probe read a file's limits from.
FAKE_SIZE, FAKE_LENGTH = "Stream #0:0: Video: h264, 64x48", "Duration: 00:00:01.00"
FAKE_FRAME = "n:   0 pts:  99999 pts_time:99 duration:      1 s:64x48"  # showinfo's words for a frame
FAKE_LANGUAGE = "und): Video: h264, 64x48"  # a Matroska track's language: inside the stream's own line


def indexed_frames(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame i shows i in base 8 as three gray stripes (32·digit + 16): readable after H.264 or a GIF palette."""
    frames = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        for s, digit in enumerate((i // 64, i // 8 % 8, i % 8)):
            frames[i, :, s * width // 3 : (s + 1) * width // 3] = 32 * digit + 16
    return frames


def frame_index(frame: np.ndarray) -> int:
    third = frame.shape[1] // 3
    digits = [round((frame[:, s * third + 3 : (s + 1) * third - 3].mean() - 16) / 32) for s in range(3)]
    return digits[0] * 64 + digits[1] * 8 + digits[2]


def on_screen(ticks: int, source_fps: int, count: int) -> list[int]:
    """The source frame on screen at k/8 s (the last one at the clip's very end)."""
    return [min(k * source_fps // 8, count - 1) for k in range(ticks)]


def test_a_30fps_mp4_is_center_cropped_resized_and_resampled_by_timestamps(tmp_path):
    # 3 s at 30 fps, 320x180 (16:9) into 96x64 (3:2): 25 px a side are cut. Red and blue bars fill them, a
    # white band lies just inside each edge, and the middle shows the frame's index.
    frames = np.empty((90, 180, 320, 3), np.uint8)
    frames[:, :, 40:280] = indexed_frames(90, 180, 240)
    frames[:, :, :25], frames[:, :, 25:40] = RED, WHITE
    frames[:, :, 295:], frames[:, :, 280:295] = BLUE, WHITE
    path = write_mp4(frames, tmp_path / "bars.mp4", fps=30)

    video = load_video(path, 64, 96)
    assert video.shape == (25, 64, 96, 3) and video.dtype == np.uint8  # 3 s: ticks 0..24 (k/8 up to 3.0)
    rgb = video.astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() < 40  # no trace of the red or blue bars
    assert rgb[:, :, :4].min() > 200 and rgb[:, :, -4:].min() > 200  # both white bands kept: centered
    indices = [frame_index(frame[:, 5:91]) for frame in video]  # the stripes: source columns 40..280
    assert indices == on_screen(25, 30, 90)  # 0, 3, 7, 11, 15, 18, ...: every 3.75th frame, on screen at k/8


@pytest.mark.parametrize(
    ("seconds", "max_frames", "expected"), [(2, 49, 17), (10, 49, 49), (2, 16, 9), (0.1, 49, 1)]
)
def test_lengths_are_cut_to_8n_plus_1(tmp_path, seconds, max_frames, expected):
    count = round(30 * seconds)
    path = write_mp4(indexed_frames(count), tmp_path / "clip.mp4", fps=30)
    video = load_video(path, 48, 64, max_frames=max_frames)
    assert len(video) == expected
    assert [frame_index(f) for f in video] == on_screen(expected, 30, count)


def test_a_generated_8fps_clip_comes_back_frame_for_frame(tmp_path):
    frames = indexed_frames(17)
    video = load_video(write_mp4(frames, tmp_path / "clip.mp4", fps=8), 48, 64)
    assert [frame_index(f) for f in video] == list(range(17))  # no frame dropped, repeated or shifted


def test_an_animated_gif_and_a_still_image(tmp_path):
    gif = write_gif(indexed_frames(10), tmp_path / "anim.gif", fps=10)  # 1 s: 10 frames of 100 ms
    video = load_video(gif, 48, 64)
    assert [frame_index(f) for f in video] == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # k/8 s, the last at 1.0 s
    held = tmp_path / "held.gif"  # variable frame times: 0, 0.5, 0.6, 0.7, 0.8 s, the clip ends at 1.0 s
    images = [Image.fromarray(frame) for frame in indexed_frames(5)]
    images[0].save(held, save_all=True, append_images=images[1:], duration=[500, 100, 100, 100, 200], loop=0)
    assert [frame_index(f) for f in load_video(held, 48, 64)] == [0, 0, 0, 0, 1, 2, 3, 4, 4]
    png = tmp_path / "still.png"
    Image.fromarray(indexed_frames(6)[5]).save(png)
    still = load_video(png, 48, 64)
    assert still.shape == (1, 48, 64, 3) and frame_index(still[0]) == 5


def test_a_rotated_phone_video_is_upright(tmp_path):
    frames = np.zeros((9, 48, 64, 3), np.uint8)
    frames[:, :, :32] = RED  # left half red, as stored
    stored = write_mp4(frames, tmp_path / "stored.mp4", fps=8)
    rotated = tmp_path / "rotated.mp4"  # a display matrix, as phones write: 90 degrees counter-clockwise
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            *["-v", "error", "-display_rotation", "90", "-i"],
            stored,
            "-c",
            "copy",
            rotated,
        ],
        check=True,
    )
    video = load_video(rotated, 64, 48).astype(int)  # portrait now: no crop
    assert video.shape == (9, 64, 48, 3)
    assert video[:, -28:, :, 0].mean() > 200 and video[:, :28, :, 0].mean() < 30  # left went to the bottom


def test_images_rgba_gray_palette_and_exif_rotation(tmp_path):
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[:, :30] = (*RED, 255)
    rgba[:, 30:] = (0, 255, 0, 0)  # transparent: its colour must not show
    Image.fromarray(rgba).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png", 40, 60).astype(int)
    assert image.shape == (40, 60, 3)
    assert np.abs(image[:, :28] - RED).max() <= 2 and np.abs(image[:, 32:] - WHITE).max() <= 2

    Image.fromarray(np.full((40, 60), 77, np.uint8)).save(tmp_path / "gray.png")
    assert (load_image(tmp_path / "gray.png", 40, 60) == 77).all()
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "palette.gif")
    assert np.abs(load_image(tmp_path / "palette.gif", 40, 60)[:, :28].astype(int) - RED).max() <= 2

    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = RED  # stored landscape, left half red; EXIF 6: turn 90 degrees clockwise to view
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    upright = load_image(tmp_path / "phone.jpg", 60, 40).astype(int)  # portrait, as shown
    assert upright[:26, :, 0].mean() > 200 and upright[34:, :, 0].mean() < 40  # left became the top


def test_image_arrays_and_a_video_files_first_frame(tmp_path):
    wide = np.zeros((50, 200, 3), np.uint8)
    wide[:, 75:125] = WHITE  # only the middle 50x50 survives a square crop
    assert load_image(wide, 50, 50).min() > 250
    assert load_image(np.full((8, 8), 9, np.uint8), 16, 16).shape == (16, 16, 3)
    first = load_image(write_mp4(indexed_frames(9), tmp_path / "v.mp4", fps=8), 48, 64)
    assert first.shape == (48, 64, 3) and frame_index(first) == 0
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((8, 8, 3), np.float32), 16, 16)


def test_center_crop_resize_crops_the_middle_then_resizes():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 100, 200, 3), dtype=np.uint8)
    out = center_crop_resize(frames, 50, 50)
    for frame, got in zip(frames, out, strict=True):
        want = Image.fromarray(frame[:, 50:150]).resize((50, 50), Image.Resampling.LANCZOS)
        assert np.array_equal(got, np.asarray(want))
    assert np.array_equal(center_crop_resize(frames[0], 100, 200), frames[0])  # the size already: untouched
    tall = center_crop_resize(frames[0], 100, 25)  # 1:4 from 2:1: 25 of 200 columns, from (200 - 25) // 2
    assert np.array_equal(
        tall, np.asarray(Image.fromarray(frames[0][:, 87:112]).resize((25, 100), Image.Resampling.LANCZOS))
    )
    with pytest.raises(ValueError, match="height"):
        center_crop_resize(frames, 0, 50)


def bad_files(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "random.mp4").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "notes.txt").write_text("a red fox trots through fresh snow\n" * 20)
    (tmp_path / "empty.mp4").write_bytes(b"")
    Image.fromarray(indexed_frames(1)[0]).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            *["-v", "error", "-f", "lavfi", "-i", "sine=duration=0.5"],
            tmp_path / "sound.m4a",
        ],
        check=True,
    )
    (tmp_path / "folder.mp4").mkdir()
    return {
        "random.mp4": "is not a video .* or an image .* that can be read",
        "notes.txt": "is not a video .* that can be read",
        "empty.mp4": "empty.mp4 is empty",
        "truncated.png": "truncated.png is damaged",
        "missing.mp4": "missing.mp4 does not exist",
        "folder.mp4": "folder.mp4 is not a file",
        "sound.m4a": "sound.m4a has no video stream",
    }


@pytest.mark.parametrize("load", [load_video, load_image])
def test_bad_files_are_one_clear_value_error(tmp_path, load):
    for name, message in bad_files(tmp_path).items():
        with pytest.raises(ValueError, match=message) as caught:
            load(tmp_path / name, 48, 64)
        assert "\n" not in str(caught.value) and str(tmp_path) not in str(caught.value), caught.value


def test_a_playlist_that_would_open_another_file_is_refused(tmp_path):
    clip = write_mp4(indexed_frames(9), tmp_path / "clip.mp4", fps=8)
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.1,\n{clip}\n#EXT-X-ENDLIST\n")
    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", playlist], capture_output=True
    )
    assert b"Input #0, hls" in probe.stderr  # plain ffmpeg would follow it to clip.mp4
    with pytest.raises(ValueError, match="not on whitelist"):
        load_video(playlist, 48, 64)


def test_limits_on_bytes_duration_pixels_frames_and_time(tmp_path, monkeypatch):
    path = write_mp4(indexed_frames(60), tmp_path / "clip.mp4", fps=30)  # 2 s of 64x48
    size = path.stat().st_size
    monkeypatch.setattr(media, "MAX_INPUT_BYTES", size)
    assert len(load_video(path, 48, 64)) == 17  # at the limit: fine
    monkeypatch.setattr(media, "MAX_INPUT_BYTES", size - 1)
    with pytest.raises(ValueError, match="the limit is"):
        load_video(path, 48, 64)
    monkeypatch.undo()

    monkeypatch.setattr(media, "MAX_INPUT_SECONDS", 2.0)
    assert len(load_video(path, 48, 64)) == 17
    monkeypatch.setattr(media, "MAX_INPUT_SECONDS", 1.9)
    with pytest.raises(ValueError, match=r"clip.mp4 is 2.0 s long; the limit is 1.9 s"):
        load_video(path, 48, 64)
    monkeypatch.undo()

    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(png)
    monkeypatch.setattr(media, "MAX_INPUT_PIXELS", 64 * 48)
    assert len(load_video(path, 48, 64)) == 17 and load_image(png, 48, 64).shape == (48, 64, 3)
    monkeypatch.setattr(media, "MAX_INPUT_PIXELS", 64 * 48 - 1)
    for load in (load_video, load_image):
        with pytest.raises(ValueError, match="is 64x48, more than 3071 pixels"):
            load(path if load is load_video else png, 48, 64)
    monkeypatch.undo()

    monkeypatch.setattr(media, "MAX_DECODED_FRAMES", 40)  # source frames: 40 at 30 fps cover ticks 0..10
    video = load_video(path, 48, 64)
    assert [frame_index(f) for f in video] == on_screen(9, 30, 60)
    monkeypatch.setattr(media, "DECODE_TIMEOUT_S", 0.001)
    with pytest.raises(ValueError, match=r"took longer than 0\.001 s to decode"):
        load_video(path, 48, 64)


def ffmpeg(*args) -> None:
    subprocess.run([FFMPEG, "-v", "error", *map(str, args)], check=True)


def spoofed_files(tmp_path) -> list[Path]:
    """3 s of 128x96 whose banner says 64x48 and 1 s: in a title and a comment, in the stream's own line, and in
    the container's own duration (the Matroska Segment's, rewritten)."""
    clip = write_mp4(indexed_frames(24, 96, 128), tmp_path / "clip.mp4", fps=8)
    tags, language, header = tmp_path / "tags.mp4", tmp_path / "language.mkv", tmp_path / "header.mkv"
    ffmpeg(
        "-i",
        clip,
        *["-c", "copy", "-metadata"],
        f"title={FAKE_SIZE}",
        "-metadata",
        f"comment={FAKE_LENGTH}",
        "-metadata",
        f"artist={FAKE_FRAME}",
        tags,
    )
    ffmpeg("-i", clip, "-c", "copy", "-metadata:s:v:0", f"language={FAKE_LANGUAGE}", language)
    data = bytearray(language.read_bytes())
    at = data.index(b"\x44\x89\x88") + 3  # Duration: 8 bytes, a float of milliseconds
    data[at : at + 8] = struct.pack(">d", 1000.0)
    header.write_bytes(data)
    return [tags, language, header]


def test_limits_hold_on_the_stream_not_on_text_the_file_controls(tmp_path, monkeypatch):
    files = spoofed_files(tmp_path)
    for (
        path
    ) in files:  # the lies work on a reader of the banner: its first size is 64x48, the first length 1 s
        banner = subprocess.run([FFMPEG, "-hide_banner", "-i", path], capture_output=True, text=True).stderr
        assert re.search(r"Video: .*?, (\d+x\d+)", banner)[1] == "64x48" or path.name == "tags.mp4"
        assert FAKE_SIZE in banner or path.name != "tags.mp4"
        assert re.search(r"Duration: ([\d:.]+)", banner)[1] == "00:00:01.00" or path.name == "language.mkv"

    monkeypatch.setattr(media, "MAX_INPUT_PIXELS", 128 * 96 - 1)
    for path in files:
        for load in (load_video, load_image):
            with pytest.raises(ValueError, match=rf"{path.name} is 128x96, more than 12287 pixels per frame"):
                load(path, 48, 64)
    monkeypatch.setattr(media, "MAX_INPUT_PIXELS", 128 * 96)
    monkeypatch.setattr(media, "MAX_INPUT_SECONDS", 2.9)
    for path in files:
        with pytest.raises(ValueError, match=rf"{path.name} is 3\.0 s long; the limit is 2\.9 s"):
            load_video(path, 48, 64)
    monkeypatch.setattr(media, "MAX_INPUT_SECONDS", 3.0)
    for (
        path
    ) in files:  # at both limits: every frame, each at its own time (the fake showinfo line moved none)
        assert [frame_index(f) for f in load_video(path, 96, 128)] == on_screen(25, 8, 24), path.name


def test_a_later_frame_larger_than_the_stream_header_is_refused_as_decoded(tmp_path, monkeypatch):
    """One H.264 stream whose size changes after 1 s: the MP4's header and the first frames say 64x48. ffmpeg
    would scale the later frames down to 64x48; the limit holds on them as decoded."""

    def h264(size: str, seconds: float) -> bytes:
        ffmpeg(
            *["-y", "-f", "lavfi", "-i"],
            f"testsrc=size={size}:rate=8:duration={seconds}",
            *["-c:v", "libx264", "-pix_fmt", "yuv420p"],
            tmp_path / "part.h264",
        )
        return (tmp_path / "part.h264").read_bytes()

    first = h264("64x48", 1)
    for size in ("80x48", "128x96"):  # 80x48: decoded, then refused; 128x96: over the decoder's own cap too
        (tmp_path / "joined.h264").write_bytes(first + h264(size, 1.5))
        path = tmp_path / f"{size}.mp4"
        ffmpeg("-r", 8, "-i", tmp_path / "joined.h264", "-c", "copy", path)
        width, height = map(int, size.split("x"))
        monkeypatch.setattr(media, "MAX_INPUT_PIXELS", width * height - 1)
        with pytest.raises(
            ValueError, match=rf"{path.name} is {size}, more than {width * height - 1} pixels"
        ):
            load_video(path, 48, 64)
        monkeypatch.setattr(media, "MAX_INPUT_PIXELS", width * height)
        assert len(load_video(path, 48, 64)) == 17  # 2.4 s (a frame is lost at the switch): all of it


PEAK_RSS = """
import resource, sys
from cogvideox import media

def peaks():  # MiB: this process's, and the largest of its finished children's (ffmpeg)
    return [resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]

media.load_video(sys.argv[1], 48, 64)  # a small file first: both peaks as they are anyway
before = peaks()
for path in sys.argv[2:]:
    try:
        print("accepted", media.load_video(path, 48, 64).shape)
    except ValueError as e:
        print(e)
print(*(after - was for after, was in zip(peaks(), before)))
"""


def test_an_oversized_file_is_refused_before_a_frame_of_its_size_is_allocated(tmp_path):
    honest = tmp_path / "honest.mp4"  # 4000x4000: 48 MB a frame as RGB, 24 MB in the decoder; 49 kB on disk
    ffmpeg(
        *[
            "-f",
            "lavfi",
            "-i",
            "color=gray:size=4000x4000:rate=8:duration=0.25",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
        ],
        honest,
    )
    spoofed = tmp_path / "spoofed.mkv"
    ffmpeg(
        "-i",
        honest,
        *["-c", "copy", "-metadata"],
        f"title={FAKE_SIZE}",
        "-metadata:s:v:0",
        f"language={FAKE_LANGUAGE}",
        spoofed,
    )
    small = write_mp4(indexed_frames(9), tmp_path / "small.mp4", fps=8)
    env = {**os.environ, "MAX_INPUT_PIXELS": str(1920 * 1080), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, small, honest, spoofed],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    *messages, rises = run.stdout.splitlines()
    assert messages == [
        f"{name} is 4000x4000, more than 2073600 pixels per frame" for name in ("honest.mp4", "spoofed.mkv")
    ]
    rise_self, rise_ffmpeg = map(float, rises.split())
    assert rise_self < 8 and rise_ffmpeg < 8, rises  # MiB


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 0}, "height"),
        ({"width": 2.5}, "width"),
        ({"max_frames": 0}, "max_frames"),
        ({"fps": 0}, "fps"),
    ],
)
def test_load_video_refuses_bad_arguments_before_reading(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_video(tmp_path / "missing.mp4", **{"height": 48, "width": 64, **kwargs})


def test_frame_limits_are_exact_where_one_more_frame_would_reach_the_next_8n_plus_1(tmp_path, monkeypatch):
    path = write_mp4(indexed_frames(90), tmp_path / "clip.mp4", fps=30)
    for decoded, expected in ((60, 9), (61, 17)):  # frames 0..59 end at 2.0 s: ticks 0..15; one more: 0..16
        monkeypatch.setattr(media, "MAX_DECODED_FRAMES", decoded)
        assert [frame_index(f) for f in load_video(path, 48, 64)] == on_screen(expected, 30, 90)
    held = tmp_path / "held.gif"  # frame 0 is on screen for 4 ticks at once, then one tick each
    images = [Image.fromarray(frame) for frame in indexed_frames(5)]
    images[0].save(held, save_all=True, append_images=images[1:], duration=[500, 100, 100, 100, 200], loop=0)
    assert len(load_video(held, 48, 64, max_frames=9)) == 9
    assert len(load_video(held, 48, 64, max_frames=8)) == 1  # 8 ticks, never a 9th: cut to 8N+1


def test_one_second_is_the_shortest_video_that_gives_the_minimum_9_frames(tmp_path):
    # 8 frames at 8 fps end at 1.0 s: ticks 0..8, the last at the clip's very end showing frame 7. One frame
    # less ends at 0.875 s: 8 ticks, cut to 8N+1 = 1 (the app then says the video is too short).
    exact = load_video(write_mp4(indexed_frames(8), tmp_path / "IMG_0001.MOV", fps=8), 48, 64)
    assert [frame_index(f) for f in exact] == [0, 1, 2, 3, 4, 5, 6, 7, 7]
    assert len(load_video(write_mp4(indexed_frames(7), tmp_path / "short.mp4", fps=8), 48, 64)) == 1
