"""The Gradio app, served for real on loopback around a tiny random checkpoint, driven by gradio_client."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError, ValidationError
from gradio_client.utils import QueueError, Status

import app
from cogvideox import CogVideoXPipeline
from cogvideox.enhance import PromptEnhancer
from cogvideox.testing import EchoBackend, free_port
from cogvideox.text import TokenCount
from cogvideox.video import read_mp4
from webapp import clips, events, jobs, launch, serve, validation

GOOD = dict(
    prompt="a red fox trots through fresh snow",
    negative_prompt="",
    seed=7,
    steps=2,
    guidance_scale=6.0,
    num_frames=9,
)
REWRITE = "A red fox with a thick winter coat trots across a snowy meadow at dawn, filmed in a slow pan."


@pytest.fixture(scope="module")
def server(tiny_2b, tmp_path_factory):
    out = tmp_path_factory.mktemp("app") / "outputs"
    env = pytest.MonkeyPatch()
    env.setenv(
        "GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(out))
    )  # as main() does: outside the served folder
    env.setenv("QUEUE_PER_ADDRESS", "8")  # several visitors at once, all from 127.0.0.1
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    enhancer = PromptEnhancer(EchoBackend(REWRITE), lambda text: pipe.count_tokens(text).n_tokens)
    demo = app.create_demo(pipe, enhancer, output_dir=out, notice=serve.TINY_NOTICE, queue_size=3)
    args = launch.parse_args(["--port", str(free_port()), "--output-dir", str(out)])
    demo.launch(**launch.launch_options(args), prevent_thread_lock=True, quiet=True)
    try:
        yield demo, pipe, out
    finally:
        demo.close()
        env.undo()


@pytest.fixture
def client(server):
    return Client(server[0].local_url, verbose=False)


@pytest.fixture
def slow_steps(server):
    """Each transformer call takes >= 50 ms, so a job lasts long enough to be queued behind or cancelled."""
    pipe = server[1]
    pipe.load()
    calls = []

    def slow(*_):  # returns None: a pre-hook's return value would replace the inputs
        calls.append(1)
        time.sleep(0.05)

    handle = pipe.transformer.register_forward_pre_hook(slow)
    yield calls
    handle.remove()


def wait_until(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_generate_returns_a_decodable_mp4_with_the_settings(server, client):
    _, _, out = server
    video, seed, settings = client.predict(**GOOD, api_name="/generate")
    frames = read_mp4(video)
    assert frames.shape == (9, 64, 96, 3)  # the tiny checkpoint's 9 frames of 96x64
    assert seed == 7
    assert settings["seed"] == 7 and settings["num_inference_steps"] == 2 and settings["num_frames"] == 9
    assert settings["prompt"] == GOOD["prompt"] and settings["guidance_scale"] == 6.0
    assert settings["model"] and settings["time_taken_s"] > 0
    stem = Path(video).stem
    assert clips.CLIP_NAME.match(Path(video).name)
    assert (out / f"{stem}.mp4").is_file() and (out / f"{stem}.json").is_file()
    assert not (out / f"{stem}.gif").exists()  # made only when someone asks for it (test_ui.py)


def test_seed_minus_one_picks_a_random_32_bit_seed_and_reports_it(client):
    _, seed, settings = client.predict(**{**GOOD, "seed": -1}, api_name="/generate")
    assert 0 <= seed < 2**32 and settings["seed"] == seed


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "x" * (validation.MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"negative_prompt": ["a"]}, "negative_prompt"),
        ({"seed": 2**32}, "seed"),
        ({"seed": "abc"}, "seed"),
        ({"steps": 0}, "steps"),
        ({"steps": validation.MAX_STEPS + 1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": "2"}, "steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"num_frames": 10}, "num_frames"),
        ({"num_frames": 57}, "num_frames"),  # 8N+1, but past the model's limit
    ],
)
def test_bad_inputs_are_refused_before_the_queue(client, change, field):
    with pytest.raises(ValidationError, match=f"{field}: "):
        client.predict(**{**GOOD, **change}, api_name="/generate")


def test_the_server_keeps_serving_after_bad_inputs(client):
    for change in ({"prompt": ""}, {"steps": -3}, {"num_frames": None}):
        with pytest.raises(ValidationError):
            client.predict(**{**GOOD, **change}, api_name="/generate")
    assert client.predict(**GOOD, api_name="/generate")[1] == 7


def test_checks_inside_the_job_match_the_ones_before_it(server):
    pipe = server[1]
    kwargs, errors = validation.check_inputs(pipe, "a cat", None, 3.0, 4.0, 5, 9.0)  # JSON may send 3.0 for 3
    assert errors == {} and kwargs["seed"] == 3 and kwargs["num_inference_steps"] == 4
    assert kwargs["negative_prompt"] == "" and kwargs["guidance_scale"] == 5.0
    _, errors = validation.check_inputs(pipe, "a cat", "", 1, 2, math.nan, 9)
    assert set(errors) == {"guidance_scale"}
    _, errors = validation.check_inputs(None, "a cat", "", 1, 2, 6.0, 9)  # no model: refused, with the reason
    assert "no model" in errors["prompt"]


def test_three_clients_at_once_are_all_served_with_their_own_files(server, slow_steps):
    url = server[0].local_url
    clients = [Client(url, verbose=False) for _ in range(3)]
    jobs = [c.submit(**{**GOOD, "seed": 100 + i}, api_name="/generate") for i, c in enumerate(clients)]
    ranks = set()
    while not all(j.done() for j in jobs):
        ranks |= {
            s.rank for s in (j.status() for j in jobs) if s.code == Status.IN_QUEUE and s.rank is not None
        }
        time.sleep(0.05)
    results = [j.result() for j in jobs]
    assert [seed for _, seed, _ in results] == [100, 101, 102]
    assert len({Path(video).name for video, _, _ in results}) == 3
    assert ranks, "a waiting client was never told its queue position"


def test_a_full_queue_says_busy_and_the_server_recovers(server, slow_steps):
    url = server[0].local_url
    clients = [Client(url, verbose=False) for _ in range(5)]
    running = clients[0].submit(**{**GOOD, "steps": 100}, api_name="/generate")
    wait_until(lambda: slow_steps)  # the long job holds the GPU
    waiting = [c.submit(**GOOD, api_name="/generate") for c in clients[1:4]]  # the queue holds 3
    wait_until(lambda: all(j.status().code == Status.IN_QUEUE for j in waiting))
    with pytest.raises(QueueError, match="full"):
        clients[4].submit(**GOOD, api_name="/generate").result(timeout=30)
    for job in [running, *waiting]:
        job.cancel()
    assert clients[4].predict(**GOOD, api_name="/generate")[1] == 7


def test_cancel_stops_the_job_within_a_step_and_frees_the_gpu(server, slow_steps):
    _, _, out = server
    before = set(out.glob("*.mp4"))
    client = Client(server[0].local_url, verbose=False)
    job = client.submit(**{**GOOD, "steps": 100}, api_name="/generate")
    wait_until(lambda: len(slow_steps) >= 3)
    job.cancel()
    time.sleep(
        jobs.HEARTBEAT_S + 0.3
    )  # the job notices at its next step (Gradio drops its event), which finishes
    stopped_at = len(slow_steps)
    time.sleep(0.5)
    assert len(slow_steps) == stopped_at < 60, "the pipeline kept denoising after cancel"
    assert set(out.glob("*.mp4")) == before
    start = time.monotonic()
    assert client.predict(**GOOD, api_name="/generate")[1] == 7
    assert time.monotonic() - start < 20


@pytest.mark.slow
def test_a_job_gradio_is_slow_to_resume_is_not_cancelled(server, client, slow_steps, monkeypatch):
    """Issue 22's phantom cancel: on a busy machine Gradio took seconds to resume a job after a yield (it copies
    each preview, and the event loop waits its turn), and the job stopped as if its visitor had gone. A job
    stops when Gradio cancels it or loses its client, however long a resume takes."""
    write_preview, slow = jobs.write_preview, []

    def slow_preview(*args, **kw):  # one resume takes longer than the old 2 s limit
        if not slow:
            slow.append(1)
            time.sleep(2.8)
        return write_preview(*args, **kw)

    monkeypatch.setattr(jobs, "write_preview", slow_preview)
    video, seed, settings = client.predict(**{**GOOD, "steps": 80}, api_name="/generate")
    assert slow and seed == 7 and settings["num_inference_steps"] == 80 and read_mp4(video).shape[0] == 9


@pytest.mark.parametrize(
    "error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ],
    ids=["torch", "cudnn", "cublas"],
)
def test_out_of_memory_is_a_friendly_error_and_the_next_request_works(server, client, monkeypatch, error):
    pipe = server[1]
    pipe.load()
    released = []
    monkeypatch.setattr(pipe, "release", lambda: released.append(1))

    def oom_once(*_):
        handle.remove()
        raise error()

    handle = pipe.transformer.register_forward_pre_hook(oom_once)
    with pytest.raises(AppError, match=r"ran out of memory.*--memory-mode sequential"):
        client.predict(**GOOD, api_name="/generate")
    assert released == [1]
    assert client.predict(**GOOD, api_name="/generate")[1] == 7


def test_enhance_returns_the_rewritten_prompt(client):
    assert client.predict("a fox in the snow", api_name="/enhance") == REWRITE
    with pytest.raises(AppError, match="empty"):
        client.predict("  ", api_name="/enhance")


def test_only_the_output_folder_is_served(server, client, tmp_path):
    demo, _, out = server
    video, _, _ = client.predict(**GOOD, api_name="/generate")
    secret = out.parent / "secret.txt"
    secret.write_text("not for the web")
    base = demo.local_url + "gradio_api/file="
    assert httpx.get(base + str(out / Path(video).name)).status_code == 200
    for path in ("/etc/passwd", str(Path(app.__file__)), str(secret), f"{out}/../secret.txt", str(tmp_path)):
        assert httpx.get(base + path).status_code == 403, path


def test_launch_is_hardened(server):
    demo = server[0]
    assert demo.analytics_enabled is False
    assert httpx.get(demo.local_url + "monitoring").status_code == 404  # closed by the guard (test_guard.py)
    small = {
        "files": ("page.html", b"<script>alert(1)</script>")
    }  # a video or an image only (test_uploads.py)
    refused = httpx.post(demo.local_url + "gradio_api/upload", files=small)
    assert refused.status_code == 403 and refused.json()["detail"].startswith("Only videos and images")
    with pytest.raises(SystemExit):
        launch.parse_args(["--share"])  # a public link without a password is refused...
    assert launch.parse_args(["--share", "--auth", "me:pw"]).auth == [("me", "pw")]
    assert launch.parse_args(["--share", "--insecure-share"]).share  # ...unless asked for explicitly
    with pytest.raises(SystemExit):
        launch.parse_args(["--auth", "no-colon"])


def test_settings_come_from_the_environment_too(monkeypatch):
    monkeypatch.setenv("COGVIDEOX_MODEL", "some/model")
    monkeypatch.setenv("COGVIDEOX_PORT", "9999")
    monkeypatch.setenv("COGVIDEOX_MEMORY_MODE", "sequential")
    monkeypatch.setenv("COGVIDEOX_AUTH", "a:b,c:d")
    args = launch.parse_args([])
    assert (args.model, args.port, args.memory_mode, args.auth) == (
        "some/model",
        9999,
        "sequential",
        [("a", "b"), ("c", "d")],
    )
    monkeypatch.setenv("COGVIDEOX_DTYPE", "fp8")
    with pytest.raises(SystemExit):
        launch.parse_args([])


def test_compile_reaches_the_pipeline(monkeypatch, tmp_path):
    assert not launch.parse_args([]).compile
    monkeypatch.setenv("COGVIDEOX_COMPILE", "1")
    args = launch.parse_args(["--model", "tiny-random", "--output-dir", str(tmp_path)])
    pipe, notice = serve.load_pipeline(args)
    assert args.compile and pipe.compile and "random weights" in notice.lower()


def test_old_outputs_are_cleaned_up(server, client):
    demo, _, out = server
    old = [out / "20200101-000000-0123456789abcdef.mp4", out / "20200101-000000-0123456789abcdef.json"]
    keep = out / "notes.txt"  # not ours: never deleted
    for path in [*old, keep]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"old")
        os.utime(path, (time.time() - clips.OUTPUT_TTL_S - 60,) * 2)
    video, _, _ = client.predict(**GOOD, api_name="/generate")
    assert not any(p.exists() for p in old)
    assert keep.exists() and (out / Path(video).name).exists()
    assert demo.delete_cache[1] == clips.OUTPUT_TTL_S  # Gradio drops its own cached copies as old


def test_token_count_shows_what_is_cut(server, monkeypatch):
    pipe = server[1]
    short = app._token_html(pipe, "a cat")
    assert "/ 226 T5 tokens" in short and "cut" not in short
    prompt = "a fox in the snow " * 100
    count = pipe.count_tokens(prompt)
    long = app._token_html(pipe, prompt)
    assert count.dropped_tokens > 0 and f"does not read the end ({count.dropped_tokens} tokens)" in long
    assert f'title="{count.n_tokens} / 226' in long and "fox in the snow" in long
    count = TokenCount(230, 226, kept_text="a cat", dropped_text="<img src=x onerror=alert(1)>")
    monkeypatch.setattr(pipe, "count_tokens", lambda prompt: count)
    assert "&lt;img src=x" in app._token_html(pipe, "anything") and "<img" not in app._token_html(pipe, "x")


def test_without_a_model_the_page_still_builds_and_says_why(tmp_path, capsys):
    args = launch.parse_args(["--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path)])
    pipe, notice = serve.load_pipeline(args)
    assert pipe is None and "unavailable" in notice and "**The model missing" in notice
    assert str(tmp_path) not in notice and "tiny-random" not in notice  # no path, no setup for a visitor...
    err = capsys.readouterr().err  # ...the operator reads the why and what to do in the terminal
    assert str(tmp_path / "missing") in err and "--model tiny-random" in err
    demo = app.create_demo(None, output_dir=tmp_path, notice=notice)
    assert notice in events.model_status(None, notice)
    assert {"/generate", "/enhance"} <= {f"/{fn.api_name}" for fn in demo.fns.values() if fn.api_name}


def test_zero_gpu_duration_grows_with_the_work():
    short = jobs.gpu_seconds(None, {"num_inference_steps": 10, "num_frames": 9})
    full = jobs.gpu_seconds(None, {"num_inference_steps": 50, "num_frames": 49})
    assert 60 <= short < full


def test_concurrent_generations_never_overlap_on_the_gpu(server, slow_steps):
    # The GPU lock, not only Gradio's concurrency limit: a cancelled job's last step can still be running.
    pipe = server[1]
    active, overlaps = [0], []
    lock = threading.Lock()

    def enter(*_):
        with lock:
            active[0] += 1
            overlaps.append(active[0])

    def leave(*_):
        with lock:
            active[0] -= 1

    hooks = [pipe.transformer.register_forward_pre_hook(enter), pipe.transformer.register_forward_hook(leave)]
    try:
        url = server[0].local_url
        first = Client(url, verbose=False).submit(**{**GOOD, "steps": 100}, api_name="/generate")
        wait_until(lambda: len(slow_steps) >= 2)
        first.cancel()
        assert Client(url, verbose=False).predict(**GOOD, api_name="/generate")[1] == 7
    finally:
        for h in hooks:
            h.remove()
    assert max(overlaps) == 1


def test_asking_for_cuda_without_it_is_one_line_and_no_page(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "app.py",
            "--model",
            "tiny-random",
            "--device",
            "cuda",
            "--output-dir",
            str(tmp_path),
        ],
        cwd=Path(app.__file__).parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: CUDA is not available on this machine; use --device cpu"


def test_app_py_without_the_requirements_says_how_to_start_it():
    """`python3 app.py` with an interpreter that has no gradio (here: no site-packages at all) is one line."""
    root = Path(app.__file__).resolve().parent
    proc = subprocess.run(
        [sys.executable, "-S", "app.py"], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().count("\n") == 0
        and "is not installed" in proc.stderr
        and "make demo" in proc.stderr
    )
