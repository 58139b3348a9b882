"""`torchrun --nproc-per-node 2 app.py --parallel cfg` (issue 15) on CPU: gloo on loopback, a tiny random checkpoint.

Rank 0 serves the page, rank 1 only its jobs: a clip from both is one process's clip, jobs keep coming after one
was refused, and stopping rank 0 stops both. tests/parallel_ranks.py drives ranks.Session without the page, for the
failures a page cannot cause: the library refusing a job on every rank, a rank that cannot load, one that fails
mid-run. The flags --parallel cannot run with are refused in one line, before any process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import ValidationError

import app
import webapp
from cogvideox import CogVideoXPipeline
from cogvideox.testing import free_port, write_tiny_lora
from cogvideox.video import read_mp4, write_mp4

ROOT = Path(__file__).resolve().parents[1]
GOOD = dict(
    prompt="a red fox trots through fresh snow",
    negative_prompt="",
    seed=7,
    steps=2,
    guidance_scale=6.0,
    num_frames=9,
)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def environment() -> dict:
    """Ours, without what would change the app (an enhancer, Gradio's settings); one thread per process."""
    keep = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PROMPT_ENHANCER", "GRADIO_"))
    }
    return {**keep, "OMP_NUM_THREADS": "1"}


def ranks_of(torchrun: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    found = {}
    for task in Path(f"/proc/{torchrun.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
            found[rank] = int(pid)
    return found


@pytest.fixture(scope="module")
def served(tiny_2b, tmp_path_factory):
    """(torchrun, url, log folder) of the app on 2 CPU processes."""
    tmp, port = tmp_path_factory.mktemp("parallel-app"), free_port()
    (tmp / "loras").mkdir()
    write_tiny_lora(tmp / "loras" / "style.safetensors", tiny_2b, seed=1)  # offered: every rank loads it
    cmd = [
        *TORCHRUN,
        "app.py",
        "--parallel",
        "cfg",
        "--model",
        str(tiny_2b),
        "--device",
        "cpu",
        "--port",
        str(port),
        "--output-dir",
        str(tmp / "outputs"),
        "--lora-dir",
        str(tmp / "loras"),
    ]
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=environment(), stdout=out, stderr=err, start_new_session=True
        )
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, (tmp / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "the app did not come up in 120 s"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield proc, url, tmp
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_page_says_how_each_clip_is_rendered(served, tiny_2b):
    proc, url, tmp = served
    said = "1 clip on 2 cpu processes: CFG parallel"
    page = httpx.get(f"{url}config").text
    # Where it runs is the operator's (the terminal's); the visitor's model line names the model and what it makes
    assert said not in page and "cpu processes" not in page
    assert f"**{tiny_2b.name}** · up to" in page
    lines = (tmp / "stdout").read_text().splitlines()
    assert (
        f"  model: {tiny_2b} ({said}, float32); memory mode: picked from free memory at the first generation"
        in lines
    )
    assert (
        sorted(ranks_of(proc)) == [0, 1] and lines.count(f"CogVideoX demo: {url}") == 1
    )  # rank 1 serves nothing


def test_a_clip_from_two_processes_is_one_process_clip(served, tiny_2b, tmp_path):
    _proc, url, _tmp = served
    client = Client(url, verbose=False)
    video, seed, settings = client.predict(**GOOD, api_name="/generate")
    assert seed == 7 and settings["parallel"] == {"cfg": 2, "sp": 1}
    one = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    frames = one(GOOD["prompt"], seed=7, num_frames=9, num_inference_steps=2, guidance_scale=6.0).frames
    got = read_mp4(video)
    assert got.shape == frames.shape == (9, 64, 96, 3)
    # H.264 turns a 1/255 difference in its input into up to ~20 here and there: the clip's distance from one
    # process's frames is compared with what the encoder alone costs them (a wrong clip is tens of levels off).
    codec = np.abs(read_mp4(write_mp4(frames, tmp_path / "one.mp4", fps=8)).astype(int) - frames).mean()
    assert np.abs(got.astype(int) - frames).mean() <= codec + 0.5
    # A refused input is said, in the field's words, and sends nothing to rank 1: the next job (a seed drawn by
    # rank 0) runs on both processes as the first did.
    with pytest.raises(
        ValidationError, match=r"guidance_scale: must be above 1 on this server: .*--parallel cfg"
    ):
        client.predict(**{**GOOD, "guidance_scale": 1.0}, api_name="/generate")
    video, seed, settings = client.predict(**{**GOOD, "seed": -1}, api_name="/generate")
    assert settings["seed"] == seed != 7 and settings["parallel"] == {"cfg": 2, "sp": 1}
    assert read_mp4(video).shape == (9, 64, 96, 3)
    # A visitor's LoRA (issue 24): set on both processes for this job, so the clip is one process's with it.
    video, _, settings = client.predict(**GOOD, loras={"style": 0.8}, api_name="/generate")
    assert [(x["name"], x["scale"]) for x in settings["loras"]] == [("style", 0.8)]
    one.load_lora(_tmp / "loras" / "style.safetensors", 0.8)
    styled = one(GOOD["prompt"], seed=7, num_frames=9, num_inference_steps=2, guidance_scale=6.0).frames
    # The LoRA moves this tiny model's frames by ~1 level, under the codec's noise: compared through the same
    # encoder, the clip is one process's with the LoRA, far closer than to one process's without (which a rank
    # without the LoRA, half the CFG batch, would drift towards).
    got = read_mp4(video).astype(int)
    with_it = np.abs(got - read_mp4(write_mp4(styled, tmp_path / "styled.mp4", fps=8))).mean()
    without = np.abs(got - read_mp4(write_mp4(frames, tmp_path / "plain.mp4", fps=8))).mean()
    print(f"LoRA clip: {with_it:.3f} from one process's with it, {without:.3f} without")
    assert with_it < without / 3
    client.close()  # its heartbeat stream would hold the server's close for seconds


def test_ctrl_c_on_rank_0_stops_every_process(served):
    proc, _url, tmp = served
    pids = ranks_of(proc)
    os.kill(pids[0], signal.SIGINT)  # the server closes and tells rank 1 to stop; torchrun then ends
    assert proc.wait(timeout=15) == 0, (tmp / "stderr").read_text()[-3000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids.values())


def test_failures_on_one_rank_reach_every_rank_or_stop_them_all(tiny_2b, tmp_path):
    cmd = [*TORCHRUN, str(ROOT / "tests" / "parallel_ranks.py"), str(tiny_2b), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=120)
    records = json.loads((tmp_path / "rank0.json").read_text())
    # Refused by the library on both ranks, before any collective; then rank 1 cannot load, and both hear it.
    said = "num_frames must be 8N+1 (1, 9, 17, ...) and at most 17, got 10"
    assert records["bad_frames"] == {"error": "ValueError", "message": said}
    assert records["load_fails"]["error"] == "LoadFailed"
    assert records["load_fails"]["message"].startswith(
        f"process 1 of 2 could not load {tiny_2b}: OSError: no such"
    )
    # Both go on: rank 0's cancel stops rank 1 at the same step, and jobs after each failure render on both.
    assert records["cancelled"] == {"error": "GenerationCancelled", "message": "cancelled after step 1 of 2"}
    for name in ("first", "drawn_seed"):
        assert records[name]["parallel"] == {"cfg": 2, "sp": 1}
        assert np.load(tmp_path / f"{name}.npy").shape == (9, 64, 96, 3)
    assert records["first"]["seed"] == 7 and records["drawn_seed"]["seed"] != 7
    assert records["no_guidance"]["message"].startswith("guidance_scale must be above 1 on this server")
    # Out of memory on rank 1 mid-run: it says so and exits, and torchrun stops rank 0 (which waited for it).
    assert "mid_run" not in records and proc.returncode != 0
    assert (
        "error: process 1 of 2 failed mid-run (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB); "
        "every process stops (torchrun --max-restarts restarts the app)\n"
    ) in proc.stderr


# -- what --parallel cannot run with: one line, exit 1, before any process group ----------------------------------


def torchrun_env(monkeypatch, world: int | None) -> None:
    for name, value in dict(
        RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"
    ).items():
        if world is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("argv", "world", "zero_gpu", "message"),
    [
        (
            ["--parallel", "cfg", "--devices", "cpu,cpu"],
            2,
            False,
            "error: give --devices (a job on each GPU at once) or --parallel (each clip on all of torchrun's processes), "
            "not both",
        ),
        (
            ["--parallel", "cfg"],
            2,
            True,
            "error: --parallel is not for a ZeroGPU Space, which lends one GPU per job; leave it unset",
        ),
        (
            ["--parallel", "cfg,sp"],
            None,
            False,
            "error: --parallel runs under torchrun: torchrun --nproc-per-node N app.py --parallel cfg,sp ... (RANK is not "
            "set)",
        ),
        (
            ["--parallel", "cfg"],
            3,
            False,
            "error: parallel cfg runs on exactly 2 processes, got 3; use cfg,sp for more",
        ),
        (
            ["--parallel", "sp"],
            4,
            False,
            "error: --parallel sp: sequence parallel degree 4 does not divide the model's 2 attention heads; degrees that "
            "work: 1, 2",
        ),
        (
            ["--parallel", "sp", "--device", "cuda:1"],
            2,
            False,
            "error: --parallel: with parallel each process uses cuda:LOCAL_RANK; pass device cuda without an index",
        ),
    ],
)
def test_what_parallel_cannot_run_with_is_one_line(
    tiny_2b, tmp_path, monkeypatch, argv, world, zero_gpu, message
):
    torchrun_env(monkeypatch, world)
    monkeypatch.setattr(webapp, "ZERO_GPU", zero_gpu)
    with pytest.raises(SystemExit) as stop:
        app.main(["--model", str(tiny_2b), "--output-dir", str(tmp_path / "out"), "--device", "cpu", *argv])
    assert stop.value.code == message
    assert not torch.distributed.is_initialized() and not (tmp_path / "out").exists()
