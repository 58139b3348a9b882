"""Starting from a video or an image, and Smooth (16 fps) (issue 14), through the real server on loopback: what
/generate does with each kind of file, what the upload route lets in, what comes back from it, and the guard's
reading of an upload as it streams past."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import ValidationError
from PIL import Image

import app
from cogvideox import CogVideoXPipeline, media
from cogvideox.testing import free_port, write_tiny_checkpoint
from cogvideox.video import read_mp4, write_gif, write_mp4
from tools import attack
from webapp import launch, uploads, validation
from webapp.guard import Guard

TEXT = dict(
    prompt="a red fox trots through fresh snow",
    negative_prompt="",
    seed=7,
    steps=2,
    guidance_scale=6.0,
    num_frames=17,
)
CAP = 512 << 10  # the upload cap of this file's server: small, so the oversized upload is cheap


def moving_frames(count: int, height: int = 120, width: int = 160) -> np.ndarray:
    """A bright square crossing a dark gradient: compresses small, and each frame differs."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.repeat(((x + y) * 80 // (height + width))[None, ..., None], count, 0).repeat(3, -1)
    for i, frame in enumerate(frames):
        left = i * (width - 30) // max(1, count - 1)
        frame[40:70, left : left + 30] = (230, 200, 40)
    return frames.astype(np.uint8)


def served(demo, out: Path, *, cap: int = CAP):
    mp = pytest.MonkeyPatch()
    mp.setenv(
        "GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(out))
    )  # as main() does: outside the served folder
    mp.setattr(uploads, "MAX_UPLOAD_BYTES", cap)
    args = launch.parse_args(["--port", str(free_port()), "--output-dir", str(out)])
    demo.launch(**launch.launch_options(args), prevent_thread_lock=True, quiet=True)
    return mp


@pytest.fixture(scope="module")
def server(tiny_2b, tmp_path_factory):
    out = tmp_path_factory.mktemp("uploads") / "outputs"
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(out)))  # before the Blocks: its cache folder
    demo = app.create_demo(pipe, output_dir=out)
    env = served(demo, out)
    try:
        yield demo, pipe, out
    finally:
        demo.close()
        env.undo()
        mp.undo()


@pytest.fixture
def client(server):
    return Client(server[0].local_url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("files")
    mp4 = write_mp4(moving_frames(24), folder / "fox.mp4", fps=12)  # 2 s: 17 frames at 8 fps
    gif = write_gif(moving_frames(10), folder / "kite.gif", fps=5)  # 2 s too
    png = folder / "still.png"
    Image.fromarray(moving_frames(1)[0]).save(png)
    broken = folder / "broken.mp4"
    broken.write_bytes(mp4.read_bytes()[:400])  # the start of a real MP4, cut off
    html = folder / "page.mp4"  # a page named as a video: stored, and served as what its name says
    html.write_text("<html><script>document.title = 'pwned'</script></html>")
    return {"mp4": mp4, "gif": gif, "png": png, "broken": broken, "html": html}


def upload(url: str, name: str, content: bytes, kind: str = "application/octet-stream") -> httpx.Response:
    return httpx.post(url + "gradio_api/upload", files={"files": (name, content, kind)}, timeout=30)


def fps_of(path) -> float:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    return meta["fps"]


# -- starting from a video ---------------------------------------------------------------------------------------


def test_a_video_starts_the_clip_its_length_sets_the_frames_and_text_only_calls_are_as_before(client, files):
    plain, _, plain_settings = client.predict(**TEXT, api_name="/generate")  # only the old parameters
    assert read_mp4(plain).shape == (17, 64, 96, 3) and fps_of(plain) == 8
    assert "start_video" not in plain_settings and "smooth" not in plain_settings
    assert plain_settings["strength"] is None

    video, _, settings = client.predict(**TEXT, video=handle_file(str(files["mp4"])), api_name="/generate")
    frames = read_mp4(video)
    assert frames.shape == (17, 64, 96, 3)  # 2 s of video at 8 fps, at the model's size
    assert settings["start_video"] == {"file": "fox.mp4", "size": "96x64", "frames": 17, "seconds": 2.12}
    assert settings["strength"] == 0.8 and settings["mode"] == "video-to-video"
    assert np.abs(frames.astype(int) - read_mp4(plain).astype(int)).mean() > 5  # the video changed the clip

    # Strength 1 runs both steps from the video's latents noised all the way; 0.8 runs the last one only.
    stronger, _, _ = client.predict(
        **TEXT, video=handle_file(str(files["mp4"])), strength=1.0, api_name="/generate"
    )
    assert np.abs(read_mp4(stronger).astype(int) - frames.astype(int)).mean() > 1
    short, _, settings = client.predict(
        **{**TEXT, "num_frames": 9}, video=handle_file(str(files["mp4"])), api_name="/generate"
    )
    assert read_mp4(short).shape[0] == 9 and settings["start_video"]["frames"] == 9  # fewer asked: its start


def test_a_gif_is_a_video_too(client, files):
    video, _, settings = client.predict(**TEXT, video=handle_file(str(files["gif"])), api_name="/generate")
    assert read_mp4(video).shape == (17, 64, 96, 3) and settings["start_video"]["file"] == "kite.gif"


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("broken", r"video: broken\.mp4 (is|has) "),
        ("html", r"video: page\.mp4 is not a"),
    ],
)
def test_a_file_that_is_not_a_video_is_refused_before_the_queue_and_the_server_goes_on(
    server, files, name, error
):
    client = Client(server[0].local_url, verbose=False)
    with pytest.raises(ValidationError, match=error) as refused:
        client.predict(**TEXT, video=handle_file(str(files[name])), api_name="/generate")
    assert str(launch.gradio_cache_dir(server[2])) not in str(
        refused.value
    )  # the visitor's file name, not our path
    assert read_mp4(client.predict(**TEXT, api_name="/generate")[0]).shape[0] == 17


def test_a_video_whose_metadata_says_it_is_small_is_refused_by_its_real_size(
    server, files, tmp_path, monkeypatch
):
    spoofed = (
        tmp_path / "small.mp4"
    )  # fox.mp4, 160x120, titled as the line where ffmpeg prints a stream's size
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-v",
            "error",
            "-i",
            files["mp4"],
            "-c",
            "copy",
            "-metadata",
            "title=Stream #0:0: Video: h264, 64x48",
            spoofed,
        ],
        check=True,
    )
    monkeypatch.setattr(media, "MAX_INPUT_PIXELS", 160 * 120 - 1)
    client = Client(server[0].local_url, verbose=False)
    with pytest.raises(
        ValidationError, match=r"video: small\.mp4 is 160x120, more than 19199 pixels per frame"
    ):
        client.predict(**TEXT, video=handle_file(str(spoofed)), api_name="/generate")


def test_the_attack_tools_lying_videos_are_all_refused(server):
    attacker = attack.Attacker(server[0].local_url)  # 6000x6000 and 70 s files, each saying 64x64 or 1 s
    attacker.spoofed_media()
    ((_, tried, handled, first_failure),) = attacker.rows
    assert tried == handled == 5, first_failure


def test_strength_and_smooth_are_checked_like_the_other_fields(server, client, files):
    pipe, values = server[1], {**TEXT, "steps": 20}.values()
    for strength in (0.05, 1.0):  # the bounds are in; just past them, NaN and the wrong types are out
        assert not validation.check_inputs(pipe, *values, video={"path": "x"}, strength=strength)[1]
    assert "strength" in validation.check_inputs(pipe, *values, video={"path": "x"}, strength=float("nan"))[1]
    for strength in (0.04, 1.01, True, "0.5"):
        with pytest.raises(ValidationError, match=r"strength: must be a number from 0\.05 to 1"):
            client.predict(
                **TEXT, video=handle_file(str(files["mp4"])), strength=strength, api_name="/generate"
            )
    with pytest.raises(ValidationError, match=r"strength: 0\.3 of 2 steps runs no step"):
        client.predict(**TEXT, video=handle_file(str(files["mp4"])), strength=0.3, api_name="/generate")
    with pytest.raises(ValidationError, match="smooth: must be true or false"):
        client.predict(**TEXT, smooth="yes", api_name="/generate")


# -- Smooth (16 fps) -------------------------------------------------------------------------------------------


def test_smooth_writes_2t_minus_1_frames_at_16_fps_keeping_the_generated_ones(client):
    plain, _, _ = client.predict(**TEXT, api_name="/generate")
    smooth, _, settings = client.predict(**TEXT, smooth=True, api_name="/generate")
    frames, generated = read_mp4(smooth), read_mp4(plain)
    assert frames.shape == (33, 64, 96, 3) and fps_of(smooth) == 16  # 33 / 16 s: as long as 17 / 8 s
    assert settings["smooth"] is True and settings["fps"] == 16 and settings["frames_written"] == 33
    assert settings["num_frames"] == 17  # what was generated, as a request asks for it
    # Every other frame is a generated one (within the MP4's compression); each between is new: no copy of the
    # frame before or after it, and nearer to each than they are to each other.
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()  # noqa: E731
    kept = diff(frames[::2], generated)
    before, after, apart = (
        diff(frames[1::2], generated[:-1]),
        diff(frames[1::2], generated[1:]),
        diff(generated[:-1], generated[1:]),
    )
    assert kept < 4.5 and kept + 1 < min(before, after) and max(before, after) < apart, (
        kept,
        before,
        after,
        apart,
    )


# -- image to video ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def i2v_server(tmp_path_factory):
    root = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-i2v"), style="i2v")
    out = tmp_path_factory.mktemp("i2v") / "outputs"
    pipe = CogVideoXPipeline.from_pretrained(root, device="cpu", dtype=torch.float32)
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(out)))
    demo = app.create_demo(pipe, output_dir=out)
    env = served(demo, out)
    try:
        yield demo
    finally:
        demo.close()
        env.undo()
        mp.undo()


def test_an_image_to_video_model_needs_its_image_and_takes_a_png(i2v_server, files):
    client = Client(i2v_server.local_url, verbose=False)
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"][
        "parameters"
    ]
    assert [p["parameter_name"] for p in params][-2:] == ["image", "loras"]  # then the LoRAs (issue 24)
    assert "Image to video" in httpx.get(i2v_server.local_url).text  # the masthead says what this model does
    with pytest.raises(ValidationError, match="image: is required: this model makes a video from an image"):
        client.predict(**TEXT, api_name="/generate")
    with pytest.raises(ValidationError, match="video: is not used by this model"):
        client.predict(
            **TEXT,
            video=handle_file(str(files["mp4"])),
            image=handle_file(str(files["png"])),
            api_name="/generate",
        )
    video, _, settings = client.predict(**TEXT, image=handle_file(str(files["png"])), api_name="/generate")
    assert read_mp4(video).shape == (17, 64, 96, 3)
    assert (
        settings["start_image"] == {"file": "still.png", "size": "96x64"}
        and settings["mode"] == "image-to-video"
    )


# -- the upload route ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("page.html", "text/html"),
        ("image.svg", "image/svg+xml"),
        ("x.js", "text/javascript"),
        ("page.html.", "video/mp4"),
        ("noext", "video/mp4"),
        ("dir/../page.htm", "video/mp4"),
    ],
)
def test_only_videos_and_images_are_let_in(server, name, kind):
    demo = server[0]
    before = set(demo.upload_file_set)
    r = upload(demo.local_url, name, b"<script>alert(document.cookie)</script>", kind)
    assert r.status_code == 403 and "Only videos and images can be uploaded" in r.json()["detail"]
    assert set(demo.upload_file_set) == before


def test_an_upload_comes_back_as_media_or_a_download_never_a_page(server, files):
    demo, _, _ = server
    r = upload(demo.local_url, "page.mp4", files["html"].read_bytes(), "text/html")  # its name says video
    assert r.status_code == 200
    (path,) = r.json()
    assert Path(path).resolve().is_relative_to(Path(launch.gradio_cache_dir(server[2])).resolve())
    back = httpx.get(f"{demo.local_url}gradio_api/file={path}")
    assert back.status_code == 200 and back.headers["x-content-type-options"] == "nosniff"
    assert back.headers["content-type"] == "video/mp4"  # not text/html: with nosniff, never run as a page
    r = upload(demo.local_url, "notes.mkv", b"<html><script>alert(1)</script></html>", "text/html")
    back = httpx.get(f"{demo.local_url}gradio_api/file={r.json()[0]}")
    assert (
        back.headers["content-type"] == "application/octet-stream"
    )  # a type no page shows inline: a download
    assert back.headers["content-disposition"] == "attachment"


def test_an_upload_over_the_cap_is_refused_at_the_guard_and_other_bodies_keep_theirs(server):
    demo, _, _ = server
    before = set(demo.upload_file_set)
    big = np.random.default_rng(0).bytes(CAP + (100 << 10))
    r = upload(demo.local_url, "big.mp4", big)
    assert r.status_code == 413 and r.json()["detail"] == f"Request body over {CAP + (64 << 10)} bytes."

    def chunks():  # no Content-Length: counted as it streams
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.mp4"\r\n\r\n'
        for i in range(0, len(big), 64 << 10):
            yield big[i : i + (64 << 10)]

    headers = {"content-type": "multipart/form-data; boundary=b"}
    r = httpx.post(demo.local_url + "gradio_api/upload", content=chunks(), headers=headers, timeout=30)
    assert r.status_code == 413
    assert upload(demo.local_url, "small.mp4", big[: 300 << 10]).status_code == 200  # within the cap: in
    assert [Path(p).name for p in set(demo.upload_file_set) - before] == ["small.mp4"]
    json_body = httpx.post(
        demo.local_url + "gradio_api/run/predict",
        content=b"x" * (300 << 10),
        headers={"content-type": "application/json"},
    )
    assert json_body.status_code == 413  # the upload cap is the upload route's only
    raw = httpx.post(
        demo.local_url + "gradio_api/upload", content=b"x" * 100, headers={"content-type": "video/mp4"}
    )
    assert raw.status_code == 415  # and only as multipart


def test_uploads_are_swept_after_their_time_and_cut_off_parts_too(server):
    demo, _, out = server
    (path,) = upload(demo.local_url, "old.mp4", b"\x00" * 1000).json()
    folder = launch.gradio_cache_dir(out)
    partial = folder / "tmpcutoff"
    partial.write_bytes(b"\x00" * 10)
    now = time.time()
    assert uploads.sweep(demo, folder, max_age_s=60, now=now) == 0 and Path(path).exists()
    os.utime(path, (now - 59, now - 59))  # just within their times: both kept
    os.utime(partial, (now - uploads.PARTIAL_AGE_S + 1,) * 2)
    assert (
        uploads.sweep(demo, folder, max_age_s=60, now=now) == 0 and Path(path).exists() and partial.exists()
    )
    os.utime(path, (now - 61, now - 61))
    os.utime(partial, (now - uploads.PARTIAL_AGE_S - 1,) * 2)
    assert uploads.sweep(demo, folder, max_age_s=60, now=now) == 2
    assert not Path(path).exists() and not Path(path).parent.exists() and not partial.exists()
    assert path not in demo.upload_file_set


# -- the guard's reading of an upload, piece by piece ------------------------------------------------------------


def body(*parts: tuple[str, bytes]) -> bytes:
    out = b""
    for disposition, content in parts:
        out += b"--XyZ\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + content + b"\r\n"
    return out + b"--XyZ--\r\n"


async def through_guard(
    data: bytes, chunk: int, cap: int = 1 << 20, declared: bool = False
) -> tuple[int, bytes]:
    """POST `data` to the upload route through a Guard capped at `cap`, `chunk` bytes a message, with its
    Content-Length if `declared` (else streamed, as a chunked body); (status, what the app read)."""
    seen, status = [], []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client gone")
            seen.append(message["body"])
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[]"})

    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    messages = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)
    ]

    async def receive():
        return messages.pop(0)

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    headers = [(b"content-type", b"multipart/form-data; boundary=XyZ")]
    headers += [(b"content-length", str(len(data)).encode())] if declared else []
    scope = {"type": "http", "method": "POST", "path": "/gradio_api/upload", "headers": headers}
    await Guard(app, max_upload_bytes=cap)(scope, receive, send)
    return status[0], b"".join(seen)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_the_guard_reads_every_part_however_the_body_is_cut(chunk):
    video = ('form-data; name="files"; filename="a.mp4"', b"\x00\x01video")
    page = ('form-data; name="files"; filename="b.html"', b"<script>alert(1)</script>")
    ok = body(video, ('form-data; name="note"', b"a field, no file"), video)
    assert asyncio.run(through_guard(ok, chunk)) == (200, ok)
    status, read = asyncio.run(through_guard(body(video, page), chunk))
    assert status == 403 and b"<script>" not in read  # the page's bytes never reached the app
    quoted = body(('form-data; name="files"; filename="x.mp4.html"', b"<script>"))
    assert asyncio.run(through_guard(quoted, chunk))[0] == 403


@pytest.mark.parametrize("declared", [True, False])
def test_the_upload_cap_is_exact_whether_declared_or_streamed_in_pieces(declared):
    cap, part = 1000, 'form-data; name="files"; filename="a.mp4"'
    sized = {n: body((part, b"\x00" * (n - len(body((part, b"")))))) for n in (cap, cap + 1)}
    for chunk in (cap + 1, 100):  # one message, or pieces each well within the cap: their sum counts
        assert asyncio.run(through_guard(sized[cap], chunk, cap, declared)) == (200, sized[cap])
        status, read = asyncio.run(through_guard(sized[cap + 1], chunk, cap, declared))
        assert status == 413 and len(read) <= cap  # the app never read past the cap


# -- names as cameras write them, the shortest video, and uploads closed ---------------------------------------------


def test_camera_names_in_upper_case_are_let_in_by_the_guard():
    for name in ("IMG_0042.MOV", "DSC01.JPG", "clip.Mp4"):
        ok = body((f'form-data; name="files"; filename="{name}"', b"\x00\x01media"))
        assert asyncio.run(through_guard(ok, 1 << 20)) == (200, ok), name
    page = body(('form-data; name="files"; filename="PAGE.HTML"', b"<script>"))
    assert asyncio.run(through_guard(page, 1 << 20))[0] == 403  # upper case is no way around the list


def test_camera_names_in_upper_case_are_uploaded_and_read_end_to_end(server, files, tmp_path, monkeypatch):
    """IMG_0042.MOV and DSC01.JPG, as phones and cameras name them: through the guard, then read as the page's
    checks read them (the note shown on upload runs the same load as the job)."""
    demo, pipe, out = server
    monkeypatch.setenv(
        "GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(out))
    )  # this server's (another may be up)
    jpeg = tmp_path / "still.jpg"
    Image.open(files["png"]).save(jpeg, quality=95)
    notes = {}
    for name, source, field in (("IMG_0042.MOV", files["mp4"], "video"), ("DSC01.JPG", jpeg, "image")):
        r = upload(demo.local_url, name, source.read_bytes())
        assert r.status_code == 200, r.text
        (path,) = r.json()
        assert Path(path).name == name
        notes[field] = uploads.describe(pipe, {"path": path, "orig_name": name}, field)
    assert notes["video"] == ("Using 17 frames (2.1 s) of your video, cropped to 96×64.", 17)
    assert notes["image"] == ("Using your image as the first frame, cropped to 96×64.", None)


def test_a_video_of_exactly_the_minimum_length_is_accepted_and_one_frame_less_is_not(tmp_path, monkeypatch):
    # 8 frames at 8 fps last 1 s: ticks 0..8 (the last at the clip's end), MIN_FRAMES = 9. 7 frames: 8 ticks, cut to 1.
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # load() reads only files in Gradio's upload folder
    pipe = SimpleNamespace(defaults={"height": 64, "width": 96}, max_frames=49, fps=8)
    exact = write_mp4(moving_frames(8), tmp_path / "exact.mp4", fps=8)
    short = write_mp4(moving_frames(7), tmp_path / "short.mp4", fps=8)
    assert uploads.MIN_FRAMES == 9 and len(uploads.load(pipe, {"path": str(exact)}, "video").pixels) == 9
    with pytest.raises(uploads.UploadError, match=r"short\.mp4 is too short: at least 9 frames \(1 s\)"):
        uploads.load(pipe, {"path": str(short)}, "video")


async def refusal(guard: Guard) -> tuple[int, str, bytes]:
    """POST a small video upload through `guard`: (status, detail, what the app behind it read)."""
    data, sent, seen = body(('form-data; name="files"; filename="a.mp4"', b"\x00" * 100)), [], []

    async def behind(scope, receive, send):
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"detail": "stored"}'})

    async def receive():
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message):
        sent.append(message)

    headers = [
        (b"content-type", b"multipart/form-data; boundary=XyZ"),
        (b"content-length", b"%d" % len(data)),
    ]
    guard.app = behind
    scope = {"type": "http", "method": "POST", "path": "/gradio_api/upload", "headers": headers}
    await guard(scope, receive, send)
    detail = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))[
        "detail"
    ]
    return sent[0]["status"], detail, b"".join(seen)


@pytest.mark.parametrize(("cap", "body_cap"), [(0, 0), (1, 1 + (64 << 10))])
def test_max_upload_bytes_0_closes_the_upload_routes_at_the_guard(monkeypatch, cap, body_cap):
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", cap)  # what MAX_UPLOAD_BYTES=0 in the environment sets
    middleware, _fairness = launch.launch_options(launch.parse_args([]))["app_kwargs"]["middleware"]
    assert middleware.cls is Guard and middleware.kwargs["max_upload_bytes"] == body_cap
    status, detail, read = asyncio.run(refusal(Guard(None, **middleware.kwargs)))
    if cap == 0:  # closed: refused before anything is read, and not as a body over a cap of 0 (413)
        assert (status, detail, read) == (403, "This app takes no uploads.", b"")
    else:  # a 1-byte cap: this 100-byte file's body fits in the 64 KiB its multipart headers get
        assert (status, detail) == (200, "stored") and read
