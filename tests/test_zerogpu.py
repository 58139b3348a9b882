"""Hugging Face ZeroGPU, the way the platform runs the app: the real `spaces` package, its forked GPU worker and
pickling, against a loopback stand-in for the ZeroGPU device API. Only attaching the GPU is stubbed
(tests/zerogpu_app.py says how), as this machine has none."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import gradio as gr
import httpx
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
from cogvideox import CogVideoXPipeline
from cogvideox.pipeline import GenerationCancelled
from cogvideox.testing import free_port, write_tiny_lora
from cogvideox.video import read_mp4
from webapp import jobs, validation

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tests" / "zerogpu_app.py"
TINY = dict(negative_prompt="", seed=7, steps=1, guidance_scale=6.0, num_frames=9)


def launcher(command: str, *options: str) -> list[str]:
    return [sys.executable, str(LAUNCHER), command, "--model", "tiny-random", *options]


class DeviceAPI(ThreadingHTTPServer):
    """The calls spaces/zero/api.py makes: startup-report, schedule (plain JSON, no queue), allow, release."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    def called(self, path: str) -> list[dict]:
        return [params for p, params in self.calls if p == path]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        url = urlparse(self.path)
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.calls.append((url.path, params))
        body = b""
        if url.path == "/schedule":  # a GPU at once; idle: the last job's worker process may be reused
            token = f"token-{len(self.server.calls)}"
            gpu = {"idle": True, "nvidiaIndex": 0, "nvidiaUUID": "GPU-stand-in", "allowToken": token}
            body = json.dumps(gpu).encode()
        self.send_response(200 if url.path in ("/startup-report", "/schedule", "/allow", "/release") else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


@pytest.fixture(scope="module")
def device_api():
    api = DeviceAPI()
    threading.Thread(target=api.serve_forever, daemon=True).start()
    yield api
    api.shutdown()


def zero_gpu_env(tmp: Path, api: DeviceAPI) -> dict:
    return {
        **os.environ,
        "SPACES_ZERO_GPU": "true",
        "SPACES_ZERO_DEVICE_API_URL": f"http://127.0.0.1:{api.server_address[1]}",
        "ZEROGPU_OFFLOAD_DIR": str(tmp / "zerogpu-tensors"),  # where spaces packs the recorded weights
        "TMPDIR": str(tmp),  # tiny-random's checkpoint
        "PYTHONPATH": str(ROOT),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
    }


@pytest.fixture(scope="module")
def space(device_api, tmp_path_factory, tiny_chat_model):
    """app.py served as on a ZeroGPU Space (with --device cpu: the worker gets no GPU here), with a local prompt
    model."""
    tmp = tmp_path_factory.mktemp("zerogpu")
    port, log = free_port(), tmp / "server.log"
    env = {
        **zero_gpu_env(tmp, device_api),
        "ZEROGPU_PROGRESS_LOG": str(tmp / "progress.jsonl"),
        "PROMPT_ENHANCER_LOCAL_MODEL": str(tiny_chat_model),
    }
    argv = launcher("serve", "--device", "cpu", "--port", str(port), "--output-dir", str(tmp / "out"))
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, which its forked GPU workers join
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"the app exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"the app did not come up:\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(url + "config", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield url, proc, tmp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the app and its GPU workers: the process group it leads
        proc.wait(15)


def test_a_generation_runs_in_the_forked_gpu_worker_end_to_end(space, device_api):
    url, proc, tmp = space
    client = Client(url, verbose=False)
    video, seed, settings = client.predict(
        prompt="a red fox trots through snow", **TINY, api_name="/generate"
    )
    assert read_mp4(video).shape[0] == 9 and seed == 7 and settings["num_inference_steps"] == 1
    # The platform's side of it: one start-up report, then schedule -> allow (from a forked process) -> release.
    assert len(device_api.called("/startup-report")) == 1
    schedule, allow, release = (device_api.called(p)[0] for p in ("/schedule", "/allow", "/release"))
    duration = jobs.gpu_seconds(None, {"num_inference_steps": 1, "num_frames": 9})
    assert int(schedule["durationSeconds"]) == duration == 60
    assert allow["allowToken"] == release["allowToken"] and int(allow["pid"]) != proc.pid
    assert release["fail"] == "false"
    # The worker's progress reached the page: the main process never reports denoising itself on ZeroGPU.
    progress = [json.loads(line) for line in (tmp / "progress.jsonl").read_text().splitlines()]
    assert any(p["desc"] and p["desc"].startswith("Denoising") for p in progress)
    assert {p["pid"] for p in progress} == {proc.pid}


@pytest.mark.parametrize(
    "prompt, title, message",
    [
        ("REFUSE this one", "Error", "the prompt is refused by the pipeline"),  # the library's ValueError
        ("OOM", "Out of GPU memory", jobs.ZERO_GPU_OOM_ADVICE),
        ("BUG", "Generation failed", "KeyError: 'transformer_blocks.0'"),
    ],
)
def test_errors_in_the_worker_reach_the_user_in_our_words(space, device_api, prompt, title, message):
    client = Client(space[0], verbose=False)
    with pytest.raises(AppError) as raised:
        client.predict(prompt=prompt, **TINY, api_name="/generate")
    assert (raised.value.title, raised.value.message) == (title, message)
    assert device_api.called("/release")[-1]["fail"] == "true"
    # and the next job still runs
    assert client.predict(prompt="a calm lake", **TINY, api_name="/generate")[1] == 7


def test_the_page_says_that_cancel_cannot_stop_a_started_job(space):
    config = httpx.get(space[0] + "config").json()
    values = {c["props"].get("elem_id"): c["props"].get("value") for c in config["components"]}
    assert values["cancel-note"] == app.ZERO_GPU_CANCEL_NOTE
    assert "· ready" in values["model-status"]  # at start-up, not in a job


def test_a_local_prompt_model_enhances_where_zero_gpu_allows(space):
    # spaces makes torch.cuda.is_available() true in the main process, whose handler threads cannot use CUDA (the
    # real CUDA init is refused there): the local model runs on the CPU.
    client = Client(space[0], verbose=False)
    rewrite = client.predict("a fox in the snow", api_name="/enhance")  # an AppError if the model failed
    assert isinstance(rewrite, str) and rewrite.strip() and "\n" not in rewrite  # random weights: gibberish


def test_start_up_loads_the_weights_to_emulated_cuda_in_the_main_thread(device_api, tmp_path):
    """Default device: ZeroGPU's emulated CUDA, which records `.to("cuda")` in the main thread only. With 8-bit
    weights (COGVIDEOX_QUANTIZE=fp8), whose tensor subclass spaces cannot record: they move as their plain inner
    tensors, and the fp8 matmul is decided in the worker, at the first matmul (the driver is not asked here)."""
    env = {**zero_gpu_env(tmp_path, device_api), "COGVIDEOX_QUANTIZE": "fp8"}
    argv = launcher("load", "--memory-mode", "model", "--compile")
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["device"] == "cuda" and report["param_device"].startswith("cuda") and report["loaded"]
    assert report["memory_mode"] == "resident" and not report["compile"]  # asked for model mode and compile
    assert (
        report["quantize"] == "fp8" and report["quantized_linears"] > 0 and report["capability_queries"] == 0
    )
    # spaces will move these into the worker: every weight, the 8-bit ones as stored (data and scales)
    assert report["recorded"] > 0 and report["packed_bytes"] == report["weight_bytes"]


# -- in this process (no SPACES_ZERO_GPU: spaces.GPU is not applied) ------------------------------------------


def test_duration_grows_with_the_work_and_stays_within_the_platform_cap(monkeypatch):
    small = jobs.gpu_seconds(None, {"num_inference_steps": 1, "num_frames": 9})
    big = jobs.gpu_seconds(None, {"num_inference_steps": 100, "num_frames": 49})
    assert 60 <= small < big == jobs.ZERO_GPU_MAX_S  # clamped: unclamped, 100 x 49 asks for 354 s
    monkeypatch.setattr(jobs, "ZERO_GPU_MAX_S", 1000)
    assert jobs.gpu_seconds(None, {"num_inference_steps": 100, "num_frames": 49}) == 354
    assert jobs.gpu_seconds(None, {"num_inference_steps": 1, "num_frames": 9}) == small == 60


@pytest.fixture(scope="module")
def gpu_pipe(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    pipe.load()
    return pipe


def test_the_gpu_function_takes_and_returns_only_what_pickles(gpu_pipe, monkeypatch):
    monkeypatch.setattr(jobs, "PIPELINE", gpu_pipe)
    kwargs, errors = validation.check_inputs(gpu_pipe, "a red fox", "", 7, 1, 6.0, 9)
    assert not errors
    pickle.dumps((kwargs, gr.Progress()))  # what spaces sends to the worker
    result = pickle.loads(pickle.dumps(jobs.render_on_gpu(kwargs)))  # and what comes back
    assert result.frames.shape[0] == 9 and result.frames.dtype.name == "uint8" and result.seed == 7
    assert result.settings["num_inference_steps"] == 1 and "denoise" in result.timings


def test_the_gpu_function_sets_the_jobs_loras_in_the_worker(gpu_pipe, tiny_2b, tmp_path, monkeypatch):
    """Issue 24: the job's LoRA scales go to the worker with its kwargs and are set there, beside the weights."""
    monkeypatch.setattr(jobs, "PIPELINE", gpu_pipe)
    gpu_pipe.load_lora(write_tiny_lora(tmp_path / "style.safetensors", tiny_2b), 0.0)
    try:
        kwargs, _ = validation.check_inputs(gpu_pipe, "a red fox", "", 7, 1, 6.0, 9)
        pickle.dumps((kwargs, {"style": 0.8}, gr.Progress()))
        result = jobs.render_on_gpu(kwargs, {"style": 0.8})
        assert [(x["name"], x["scale"]) for x in result.settings["loras"]] == [("style", 0.8)]
    finally:
        gpu_pipe.unload_lora()


class Failing:
    def __init__(self, error):
        self.error, self.released = error, 0

    def __call__(self, **_):
        raise self.error

    def release(self):
        self.released += 1

    def set_loras(self, scales):
        pass


@pytest.mark.parametrize(
    "error, title, message",
    [
        (ValueError("num_frames must be 8N+1"), "Error", "num_frames must be 8N+1"),
        (GenerationCancelled("stop"), "Error", "Cancelled."),
        (torch.OutOfMemoryError("CUDA out of memory"), "Out of GPU memory", jobs.OOM_ADVICE),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"), "Out of GPU memory", jobs.OOM_ADVICE),
        (TypeError("x" * 1000), "Generation failed", "TypeError: " + "x" * 100),
        (gr.Error("No GPU was available", print_exception=False), "Error", "No GPU was available"),
    ],
)
def test_every_error_in_the_gpu_function_becomes_a_gr_error_that_pickles(monkeypatch, error, title, message):
    pipe = Failing(error)
    monkeypatch.setattr(jobs, "PIPELINE", pipe)
    with pytest.raises(gr.Error) as raised:
        jobs.render_on_gpu({"num_inference_steps": 1})
    sent = pickle.loads(pickle.dumps(raised.value))  # spaces pickles it to the main process
    assert sent.title == title and sent.message.startswith(message) and len(sent.message) < 400
    assert pipe.released == (title == "Out of GPU memory")
    assert sent.print_exception == (title == "Generation failed")  # a bug's traceback goes to the log


def test_the_cancel_note_is_only_on_zero_gpu(tmp_path):
    demo = app.create_demo(None, output_dir=tmp_path)
    assert "cancel-note" not in {block.elem_id for block in demo.blocks.values()}
