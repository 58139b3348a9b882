"""The page's parts (issue 12) below the browser: seeds, the gallery a browser keeps (and what a tampered copy of it
gets), the token meter's words, the GIF off the critical path, Cancel's report, and the server's start-up log.
The page's event handlers are called as Gradio calls them; tests/test_browser.py drives the same page in Chromium."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import app
from cogvideox import CogVideoXPipeline
from cogvideox.pipeline import MAX_SEED, GenerationCancelled
from cogvideox.video import read_mp4
from webapp import clips, jobs, launch, serve
from webapp.validation import MAX_PROMPT_CHARS, PROMPT_BOX_CHARS, TokenMeter

ROOT = Path(__file__).resolve().parents[1]
GOOD = dict(
    prompt="a red fox trots through fresh snow",
    negative_prompt="",
    seed=7,
    steps=2,
    guidance_scale=6.0,
    num_frames=9,
)
SKIP = gr.skip()


@pytest.fixture(scope="module")
def pipe(tiny_2b):
    return CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "outputs"


@pytest.fixture
def demo(pipe, out):
    return app.create_demo(pipe, output_dir=out)


def event(demo, name: str):
    """The page's handler called `name`, as Gradio calls it."""
    return next(f.fn for f in demo.fns.values() if f.name == name)


def asked(update) -> dict:
    """What an update returned by a handler (a component, as Gradio 6 has them) sets."""
    return update._constructor_args[0]


def a_clip(folder: Path, prompt: str = "a fox in the snow", seed: int = 5, steps: int = 2, **options) -> dict:
    """A clip as a job saves it: MP4 and sidecar. options: smooth, strength (a video-to-video clip's), step_cache."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "prompt": prompt,
        "negative_prompt": "",
        "seed": seed,
        "num_inference_steps": steps,
        "guidance_scale": 6.0,
        "num_frames": 9,
        "fps": 8,
        "strength": options.get("strength"),
        "step_cache": options.get("step_cache"),
    }
    frames = np.random.default_rng(seed).integers(0, 256, (9, 64, 96, 3), dtype=np.uint8)
    result = SimpleNamespace(frames=frames, fps=8, settings=settings, timings={"total": 1.0})
    return clips.save_clip(result, folder, time.perf_counter(), smooth=options.get("smooth", False))


# -- seeds -------------------------------------------------------------------------------------------------------


def test_randomize_gives_every_run_a_new_seed_and_a_fixed_seed_stays(demo):
    start = event(demo, "start_run")
    values = [*GOOD.values()]
    seeds = {start(True, *values)[0] for _ in range(5)}
    assert len(seeds) == 5 and all(isinstance(s, int) and 0 <= s < MAX_SEED for s in seeds)
    assert 7 not in seeds  # the seed box's value is not what a randomized run uses
    locked = start(False, *values)
    assert locked[0] == SKIP  # unticked: the seed box's own seed is used, as it is
    run, draft, final, cancel = (asked(b)["interactive"] for b in locked[1:5])
    assert (run, draft, final, cancel) == (False, False, False, True) and locked[5] == ""
    rows, _ = app._load_presets(None)  # a preset is shown with its own seed: Randomize goes off
    assert rows and all(row[-1] is False for row in rows)
    # Inputs the job would refuse lock nothing (no event would unlock): what is wrong is said under the buttons.
    refused = start(True, *{**GOOD, "prompt": "  "}.values())
    assert refused[:5] == (SKIP,) * 5 and "Not started. The prompt is empty" in refused[5]
    refused = start("yes", *{**GOOD, "num_frames": 10}.values())
    assert refused[:5] == (SKIP,) * 5 and "Not started. Length (frames) must be one of 9, 17" in refused[5]


def test_a_gallery_clip_or_a_final_render_fixes_the_seed_and_seed_used_is_empty_until_a_clip(demo, out):
    clip = a_clip(out, seed=1234)
    shown = event(demo, "show_clip")([clip], gr.EventData(None, {"index": 0}))
    (
        *views,
        _prompt,
        _negative,
        seed,
        _steps,
        _guidance,
        _frames,
        randomize,
        current,
        note,
        smooth,
        strength,
        loras,  # {name: strength}: none here (no --lora-dir, so no sliders before it)
        speed,
    ) = shown
    assert views[1] == "1234" and (seed, randomize, current) == (1234, False, clip)
    assert note == f"▶️ Your clip: {clips.caption(clip)}. Its settings are restored."  # a status line stays
    assert (smooth, strength, loras) == (False, SKIP, {})  # a text-to-video clip: Strength stays as it is
    assert speed == "Full"  # made without the step cache: Generate makes it again
    assert event(demo, "final_inputs")(clip)[2:] == (1234, 50, 6.0, 9, False, False, SKIP, {})
    # A smooth draft made from a video: shown again or rendered in full, it keeps Smooth and its Strength.
    smoothed = a_clip(out, seed=99, smooth=True, strength=0.6)
    assert event(demo, "final_inputs")(smoothed)[2:] == (99, 50, 6.0, 9, False, True, 0.6, {})
    assert event(demo, "show_clip")([clip, smoothed], gr.EventData(None, {"index": 1}))[-4:] == (
        True,
        0.6,
        {},
        "Full",
    )
    # A clip made at Faster or Fastest restores that Speed; an API threshold that is no choice leaves Speed alone.
    for cache, speed in (("quality", "Faster"), ("fast", "Fastest"), (0.3, SKIP)):
        cached = a_clip(out, seed=7, step_cache=cache)
        assert event(demo, "show_clip")([cached], gr.EventData(None, {"index": 0}))[-1] == speed
    assert event(demo, "show_clip")([clip], gr.EventData(None, {"index": 5})) == SKIP
    assert event(demo, "final_inputs")(None) == (SKIP,) * 10
    seed_used = next(c for c in demo.config["components"] if c["props"].get("elem_id") == "seed-used")
    assert seed_used["props"].get("value") in ("", None)
    assert clips.views(None, 50)[1] == ""  # cleared by Cancel: empty, not 0


# -- the gallery a browser keeps ---------------------------------------------------------------------------------


def test_a_tampered_gallery_from_the_browser_keeps_only_our_clips(pipe, out, tmp_path):
    ours = a_clip(out, prompt="a fox in the snow")
    (out / "notes.html").write_text("<script>alert(1)</script>")
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"not ours")
    expired = {
        "name": "20200101-000000-0123456789abcdef.mp4",
        "prompt": "a kite",
        "negative_prompt": "",
        "seed": 5,
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "num_frames": 9,
    }
    saved = [
        {**clips.browser_copy([ours])[0], "prompt": "tampered", "mp4": "/etc/passwd"},  # the sidecar wins
        {"name": "../secret.mp4"},
        {"name": str(secret)},
        {"name": "/etc/passwd"},
        {"name": "notes.html"},
        {**expired, "name": "20200101-000000-0123456789abcdef.json"},  # not a video
        expired,  # files gone: kept with its settings, checked as a request's
        {**expired, "name": "20200101-000000-0123456789abcdee.mp4", "seed": -1},  # no seed to restore
        {**expired, "name": "20200101-000000-0123456789abcded.mp4", "seed": 2**40},
        {**expired, "name": "20200101-000000-0123456789abcdec.mp4", "prompt": "x" * (MAX_PROMPT_CHARS + 1)},
        {**expired, "name": "20200101-000000-0123456789abcdeb.mp4", "num_frames": 10},
        {**expired, "name": "20200101-000000-0123456789abcdea.mp4", "num_inference_steps": "2"},
        clips.browser_copy([ours])[0],  # a repeat
        "x",
        None,
        5,
        [ours["name"]],
    ]
    restored = clips.restore(saved, out, pipe)
    assert [c["name"] for c in restored] == [ours["name"], expired["name"]]
    assert all(Path(c["mp4"]).parent == out and Path(c["gif"]).parent == out for c in restored)
    assert restored[0]["settings"]["prompt"] == "a fox in the snow" and restored[0]["mp4"] == ours["mp4"]
    assert clips.expired(restored[1]) and restored[1]["settings"]["prompt"] == "a kite"
    assert clips.caption(restored[1]).startswith("⌛ expired · a kite · 9 frames · 2 steps · seed 5")
    assert clips.restore({"name": ours["name"]}, out, pipe) == []  # not a list
    # The browser's copy is keyed by the output folder: it outlives a restart of the app, as the clips do.
    assert app._storage(out, "clips") == app._storage(out, "clips") != app._storage(tmp_path, "clips")
    assert (
        len(clips.restore([clips.browser_copy([ours])[0]] * 1000 + [expired], out, pipe)) == 1
    )  # first 24 only


def test_the_page_restores_a_checked_gallery_and_prompt_at_each_visit(demo, out):
    ours = a_clip(out)
    saved = [
        {"name": "20200101-000000-0123456789abcdef.mp4", **{k: ours["settings"][k] for k in clips.SETTINGS}},
        {"name": "../../etc/passwd.mp4"},
        clips.browser_copy([ours])[0],
    ]
    _, seed, gallery, kept, copy, prompt, note = event(demo, "restore")(saved, {"prompt": "a calm lake"})
    assert [c["name"] for c in kept] == ["20200101-000000-0123456789abcdef.mp4", ours["name"]]
    assert [e["name"] for e in copy] == [
        c["name"] for c in kept
    ]  # what the browser keeps: checked entries only
    assert prompt == "a calm lake" and 0 <= seed < MAX_SEED
    assert note.startswith("⌛ 1 of your 2 clips expired")
    captions = [item["caption"] for item in gallery.value]
    assert captions[0].startswith("⌛ expired") and not captions[1].startswith("⌛")
    # Nothing kept yet, or a prompt that is not one: nothing changes.
    *_, prompt, note = event(demo, "restore")(None, "x" * 300_000)
    assert (prompt, note) == (SKIP, SKIP)
    assert event(demo, "restore")([], {"prompt": "x" * (MAX_PROMPT_CHARS + 1)})[5] == SKIP


def test_the_browser_keeps_the_newest_clips_within_its_byte_budget(out):
    clip = a_clip(out)
    long = {
        **clip,
        "settings": {
            **clip["settings"],
            "prompt": "雪" * MAX_PROMPT_CHARS,
            "negative_prompt": "霧" * MAX_PROMPT_CHARS,
        },
    }
    many = [{**long, "name": f"20240101-000000-{i:016x}.mp4"} for i in range(clips.MAX_GALLERY)]
    copy = clips.browser_copy(many)
    assert 0 < len(copy) < len(many) and copy[0]["name"] == many[0]["name"]
    assert len(json.dumps(copy, ensure_ascii=False).encode()) <= clips.SAVED_BYTES


def test_a_full_gallery_shows_the_newest_clip_first_and_drops_the_oldest(demo, pipe, out):
    older = a_clip(out)
    full = [{**older, "name": f"20240101-0000{i:02d}-{i:016x}.mp4"} for i in range(clips.MAX_GALLERY)][::-1]
    new = a_clip(out, seed=9)  # the gallery is newest first: full[0] is the newest, full[-1] the oldest
    gallery, kept, saved, shown = event(demo, "add_clip")(new, full)[:4]
    assert [c["name"] for c in kept] == [new["name"], *(c["name"] for c in full[:-1])]
    assert [e["name"] for e in saved] == [c["name"] for c in kept] and shown is new
    pictures = asked(gallery)["value"]  # (video, caption), as shown: the new clip first
    assert len(pictures) == clips.MAX_GALLERY and pictures[0] == (new["mp4"], clips.caption(new))
    # The browser's copy of a gallery longer than the page keeps (an old or edited one): its newest entries.
    entries = [{"name": c["name"], **{k: c["settings"][k] for k in clips.SETTINGS}} for c in [new, *full]]
    assert [c["name"] for c in clips.restore(entries, out, pipe)] == [c["name"] for c in kept]


def test_a_smooth_clip_says_so_and_the_browser_keeps_it_smooth(pipe, out):
    clip = a_clip(out, smooth=True)
    s = clip["settings"]
    assert (s["smooth"], s["fps"], s["frames_written"], s["num_frames"]) == (True, 16, 17, 9)
    assert read_mp4(clip["mp4"]).shape[0] == 17
    assert clips.done_text(clip).endswith(", smoothed to 17 frames at 16 fps.")
    video = {**clip, "settings": {**s, "strength": 0.6, "start_video": {"file": "a.mp4", "frames": 9}}}
    assert "2 steps, from 9 frames of your video (strength 0.6), smoothed" in clips.done_text(video)
    copy = clips.browser_copy([clip])
    assert copy[0]["smooth"] is True and "smooth" not in clips.browser_copy([a_clip(out, seed=6)])[0]
    for path in out.glob(f"{Path(clip['mp4']).stem}.*"):
        path.unlink()
    (restored,) = clips.restore(copy, out, pipe)  # expired: its settings from the browser, smooth included
    assert clips.expired(restored) and restored["settings"]["smooth"] is True
    assert clips.restore([{**copy[0], "smooth": "yes"}], out, pipe) == []  # checked as a request's


def test_captions_tell_clips_apart():
    clip = {
        "mp4": "/nowhere/x.mp4",
        "settings": {
            "prompt": "  A  red fox trots through fresh snow at dawn, slowly",
            "num_frames": 49,
            "num_inference_steps": 50,
            "seed": 42,
        },
    }
    text = clips.caption(clip)
    assert text == "⌛ expired · A red fox trots through… · 49 frames · 50 steps · seed 42"


# -- the token meter ---------------------------------------------------------------------------------------------


def test_the_meter_names_the_tokenizer_counts_nothing_as_zero_and_says_a_paste_was_cut(pipe, demo):
    meter = TokenMeter(pipe)
    # In plain words, about how many words fit; the exact count as the line's title.
    empty = '<div class="tokens" title="0 / 226 T5 tokens">about <b>169</b> words left</div>'
    assert meter("") == meter(" \n\t") == empty  # 226 tokens x 0.75 words
    assert re.fullmatch(
        r'<div class="tokens" title="(\d+) / 226 T5 tokens">about <b>\d+</b> words left</div>', meter("a cat")
    )
    assert 'title="0 /' not in meter("a cat") and "<b>169</b>" not in meter("a cat")
    over = meter("x" * (MAX_PROMPT_CHARS + 10))
    assert f"{MAX_PROMPT_CHARS + 10} characters: over {MAX_PROMPT_CHARS} characters by 10" in over
    assert "cut" not in over
    cut = meter("x" * PROMPT_BOX_CHARS)  # what the browser leaves of a longer paste
    assert f"Your paste was cut to {PROMPT_BOX_CHARS} characters" in cut
    box = next(c for c in demo.config["components"] if c["props"].get("elem_id") == "prompt")
    assert box["props"]["max_length"] == PROMPT_BOX_CHARS > MAX_PROMPT_CHARS

    class LlamaTokenizerFast:  # another model's tokenizer: the meter says whose tokens it counts
        pass

    other = SimpleNamespace(tokenizer=LlamaTokenizerFast(), count_tokens=pipe.count_tokens)
    assert "/ 226 Llama tokens" in TokenMeter(other)("a cat")


# -- the GIF, made only when asked for -----------------------------------------------------------------------------


def test_the_gif_is_not_made_with_the_clip_but_on_its_first_request(demo, out, monkeypatch):
    made = []
    write_gif = clips.write_gif
    monkeypatch.setattr(clips, "write_gif", lambda *a, **k: made.append(1) or write_gif(*a, **k))
    clip = a_clip(out)
    assert made == [] and not Path(clip["gif"]).exists()  # the MP4 is playable before any GIF work
    gif_btn, make_btn = event(demo, "make_gif")(clip)
    assert asked(gif_btn) == {"value": clip["gif"], "visible": True} and asked(make_btn) == {"visible": False}
    with Image.open(clip["gif"]) as gif:
        assert gif.n_frames == 9 and gif.size == (96, 64)
    event(demo, "make_gif")(clip)
    assert made == [1]  # the second request downloads the same file
    shown_later = clips.views(clip, 50)  # shown again later: the download, not "make"
    assert asked(shown_later[4])["visible"] and not asked(shown_later[5])["visible"]
    assert event(demo, "make_gif")(None) == (SKIP, SKIP)
    Path(clip["mp4"]).unlink()
    Path(clip["gif"]).unlink()
    with pytest.raises(gr.Error, match="expired"):
        event(demo, "make_gif")(clip)


def test_bench_video_prints_both_times():
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_video",
        "--frames",
        "9",
        "--height",
        "64",
        "--width",
        "96",
        "--repeats",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"frames -> playable MP4 \(96x64x9.*\): median \d+\.\d+ s", proc.stdout)
    assert re.search(r"frames -> GIF .*\(96x64x9.*\): median \d+\.\d+ s", proc.stdout)


# -- Cancel --------------------------------------------------------------------------------------------------------


def test_cancelled_text_says_where_the_job_stopped():
    done = threading.Event()
    done.set()
    stopped = jobs.Run(done=done, error=GenerationCancelled("cancelled after step 3 of 50"))
    assert jobs.cancelled_text(stopped) == "⏹ Cancelled at step 3 of 50."
    waiting = jobs.Run(done=done, error=GenerationCancelled("cancelled while waiting for the GPU"))
    assert jobs.cancelled_text(waiting) == "⏹ Cancelled while waiting for the GPU."
    assert jobs.cancelled_text(None) == "⏹ Cancelled before it started."
    assert "stops after the step" in jobs.cancelled_text(
        jobs.Run()
    )  # still on its step when the wait ran out


def test_cancel_stops_the_sessions_job_and_reports_its_step_and_the_job_ends_without_an_error(pipe, out):
    pipe.load()
    steps = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: steps.append(1) or time.sleep(0.05))
    renderer = jobs.Renderer(pipe, out)
    run = renderer.generate(
        *{**GOOD, "steps": 100}.values(), SimpleNamespace(session_hash="mine"), progress=lambda *a, **k: None
    )
    outputs = []
    thread = threading.Thread(target=lambda: outputs.extend(run))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(steps) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert renderer.cancel("someone else") == "⏹ Cancelled before it started."  # not theirs to stop
        report = renderer.cancel("mine", wait_s=20)  # returns once the job has stopped
        thread.join(20)
    finally:
        hook.remove()
    at = re.fullmatch(r"⏹ Cancelled at step (\d+) of 100\.", report)
    assert at and 1 <= int(at[1]) < 20, report
    assert outputs[-1][3] is None  # no clip, and no error: the page's Cancel has said what happened
    assert not thread.is_alive() and not list(out.glob("*.mp4")) and "mine" not in renderer.running


# -- the server's log ----------------------------------------------------------------------------------------------


def test_start_up_lines_name_the_url_the_model_and_how_to_share_safely(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)  # not loaded yet
    page = SimpleNamespace(local_url="http://127.0.0.1:7860/", share_url=None)
    lines = serve.startup_lines(launch.parse_args([]), pipe, page)
    assert lines[0] == "CogVideoX demo: http://127.0.0.1:7860/"
    assert "(cpu, float32); memory mode: picked from free memory" in lines[1]
    assert "--share --auth-file" in lines[2] and "share=True" not in "\n".join(lines)
    shared = SimpleNamespace(local_url=page.local_url, share_url="https://abc.gradio.live")
    lines = serve.startup_lines(launch.parse_args(["--share", "--auth", "me:pw"]), pipe, shared)
    assert lines[2] == "  public link: https://abc.gradio.live, login required (1 user)" and len(lines) == 3
    lines = serve.startup_lines(launch.parse_args(["--host", "0.0.0.0"]), None, page)
    assert "unavailable" in lines[1] and "no login" in lines[2] and "--auth-file" in lines[3]


def test_the_log_has_our_start_up_lines_and_a_busy_port_is_one_line(tiny_2b, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "app.py",
        "--model",
        str(tiny_2b),
        "--port",
        str(port),
        "--output-dir",
        str(tmp_path),
    ]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert first.poll() is None and time.monotonic() < deadline, "the app did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        busy = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        first.terminate()
        stdout, stderr = first.communicate(timeout=20)
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: the port is in use (or the address is not this machine's); "
        f"choose another with --port, e.g. --port {port + 1}"
    ]
    assert stdout.splitlines()[:3] == [
        f"CogVideoX demo: http://127.0.0.1:{port}/",
        f"  model: {tiny_2b} (cpu, float32); memory mode: picked from free memory at the first generation",
        "  only this machine can open it. To share it: --share --auth-file users.txt (one user:password per line)",
    ]
    for log in (stdout, stderr, busy.stdout):  # Gradio's banner, which contradicts our options, is off
        assert "share=True" not in log and "GRADIO_SERVER_PORT" not in log and "Traceback" not in log


def test_captions_tell_apart_every_setting_that_changes_a_clip(out):
    """Issue 22: a Full, Faster, Fastest, smooth or video-started clip of one prompt and seed each read differently."""
    made = [
        a_clip(out / "c", seed=3),
        a_clip(out / "c", seed=3, step_cache="quality"),
        a_clip(out / "c", seed=3, step_cache="fast"),
        a_clip(out / "c", seed=3, smooth=True),
        a_clip(out / "c", seed=3, strength=0.6),
        a_clip(out / "c", seed=3, strength=0.8),
    ]
    texts = [clips.caption(c) for c in made]
    assert texts[0] == "a fox in the snow · 9 frames · 2 steps · seed 3"  # the defaults add nothing
    assert texts[1:] == [
        f"{texts[0]} · {extra}"
        for extra in ("Faster", "Fastest", "smooth", "from a video (0.6)", "from a video (0.8)")
    ]
    guided = {
        **made[0],
        "settings": {**made[0]["settings"], "guidance_scale": 7.5, "negative_prompt": "blur"},
    }
    assert clips.caption(guided) == f"{texts[0]} · guidance 7.5 · not: blur"
