"""The device pool: `--devices cpu,cpu` (two CPU "devices") serves two jobs at once, on loopback, via gradio_client.

Each transformer call of each pipeline is recorded and made to take >= 50 ms (a forward pre-hook on the real
pipelines), so that jobs last long enough to overlap, be cancelled or wait behind one another.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

import app
from cogvideox.pipeline import GenerationCancelled
from cogvideox.testing import free_port
from cogvideox.video import read_mp4
from webapp import events, launch, serve
from webapp.pool import DevicePool, parse_devices, pick_devices

GOOD = dict(
    prompt="a red fox trots through fresh snow",
    negative_prompt="",
    seed=7,
    steps=8,
    guidance_scale=6.0,
    num_frames=9,
)
OTHER = "a paper boat drifts down a rainy gutter"
STEP_S = 0.05


@pytest.fixture(scope="module")
def server(tiny_2b, tmp_path_factory):
    out = tmp_path_factory.mktemp("pool") / "outputs"
    env = pytest.MonkeyPatch()
    env.setenv("GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(out)))
    env.setenv("QUEUE_PER_ADDRESS", "8")  # several visitors at once, all from 127.0.0.1
    args = launch.parse_args(
        [
            "--model",
            str(tiny_2b),
            "--devices",
            "cpu,cpu",
            "--port",
            str(free_port()),
            "--output-dir",
            str(out),
        ]
    )
    pipes, notice = serve.load_pipelines(args, pick_devices(args.device, args.devices))  # as main() does
    demo = app.create_demo(pipes, output_dir=out, notice=notice, queue_size=4)
    demo.launch(**launch.launch_options(args), prevent_thread_lock=True, quiet=True)
    try:
        yield demo, pipes, out
    finally:
        demo.close()
        env.undo()


class Steps:
    """Each pipeline's transformer calls (start time, batch: 2 with guidance, 1 without), how many ran at once on
    each, and how often both pipelines did."""

    def __init__(self, pipes):
        self.calls: list[list[tuple[float, int]]] = [[] for _ in pipes]
        self.active, self.most = [0] * len(pipes), [0] * len(pipes)
        self.both = 0  # calls that began while the other pipeline was inside one
        self.lock = threading.Lock()
        self.hooks = []
        for i, pipe in enumerate(pipes):
            pipe.load()
            self.hooks += [
                pipe.transformer.register_forward_pre_hook(partial(self.enter, i), with_kwargs=True),
                pipe.transformer.register_forward_hook(lambda *_, i=i: self.leave(i)),
            ]

    def enter(self, i, _, args, kwargs):
        latents = args[0] if args else kwargs["latents"]
        with self.lock:
            self.calls[i].append((time.monotonic(), latents.shape[0]))
            self.active[i] += 1
            self.most[i] = max(self.most[i], self.active[i])
            self.both += all(self.active)
        time.sleep(STEP_S)  # returns None: a pre-hook's return value would replace the inputs

    def leave(self, i):
        with self.lock:
            self.active[i] -= 1

    def count(self, i, batch=None) -> int:
        return sum(batch in (None, b) for _, b in self.calls[i])

    def idle(self, i) -> float:
        """Seconds since pipeline i's last call."""
        return time.monotonic() - self.calls[i][-1][0] if self.calls[i] else float("inf")

    def remove(self):
        for h in self.hooks:
            h.remove()


@pytest.fixture
def steps(server):
    recorder = Steps(server[1])
    yield recorder
    recorder.remove()


def wait_until(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def names(job) -> set[str]:
    """The file names in everything a job sent its client: previews and the clip."""
    return {Path(o[0]).name for o in job.outputs() if isinstance(o, (list, tuple)) and isinstance(o[0], str)}


def test_two_sessions_render_at_once_each_on_a_device_and_see_only_their_own_clip(server, steps):
    url = server[0].local_url
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    jobs = [
        c.submit(**{**GOOD, "prompt": p}, api_name="/generate") for c, p in ((a, GOOD["prompt"]), (b, OTHER))
    ]
    (video_a, seed_a, settings_a), (video_b, seed_b, settings_b) = [j.result(timeout=60) for j in jobs]
    assert steps.both > 0, "the two jobs never ran at once"
    assert steps.most == [1, 1], "two jobs shared one pipeline"
    assert min(steps.count(0), steps.count(1)) >= GOOD["steps"]  # each device ran a whole job
    assert (settings_a["prompt"], settings_b["prompt"]) == (GOOD["prompt"], OTHER) and seed_a == seed_b == 7
    assert Path(video_a).name != Path(video_b).name
    assert not np.array_equal(read_mp4(video_a), read_mp4(video_b))  # same seed, the prompt differs
    seen_a, seen_b = names(jobs[0]), names(jobs[1])
    assert Path(video_a).name in seen_a and Path(video_b).name in seen_b
    assert not seen_a & seen_b
    assert Path(video_b).stem not in str(jobs[0].outputs())
    assert Path(video_a).stem not in str(jobs[1].outputs())


def test_a_cancel_stops_only_its_sessions_job_and_a_waiting_job_takes_the_freed_device(server, steps):
    url = server[0].local_url
    a, b, c = (Client(url, verbose=False) for _ in range(3))
    long = {**GOOD, "steps": 100}
    job_a = a.submit(**long, api_name="/generate")
    wait_until(lambda: steps.count(0) + steps.count(1) > 0)
    on_a, on_b = (0, 1) if steps.count(0) else (1, 0)
    job_b = b.submit(**{**long, "prompt": OTHER}, api_name="/generate")
    wait_until(lambda: steps.count(on_b) > 0)  # B on the other device: both run
    # C (without guidance: its transformer calls have a batch of 1) waits in the queue for a free device.
    job_c = c.submit(**{**GOOD, "steps": 4, "seed": 9, "guidance_scale": 1.0}, api_name="/generate")
    wait_until(lambda: job_c.status().code == Status.IN_QUEUE)
    time.sleep(0.3)
    assert steps.count(0, batch=1) + steps.count(1, batch=1) == 0 and not job_c.done()
    job_a.cancel()
    assert job_c.result(timeout=30)[1] == 9
    # C ran on the device A left, after A's last step; B, not cancelled, kept going meanwhile.
    assert steps.count(on_a, batch=1) == 4 and steps.count(on_b, batch=1) == 0
    a_calls = [t for t, batch in steps.calls[on_a] if batch == 2]
    c_calls = [t for t, batch in steps.calls[on_a] if batch == 1]
    assert len(a_calls) < long["steps"] and max(a_calls) < min(c_calls), "A kept denoising after its cancel"
    assert steps.idle(on_b) < 0.5 and not job_b.done()
    job_b.cancel()
    wait_until(lambda: steps.idle(on_b) > 0.5, timeout=15)
    assert steps.count(on_b) < long["steps"] and steps.most == [1, 1]


def test_out_of_memory_on_one_device_releases_only_that_pipeline(server, steps, monkeypatch):
    url, pipes = server[0].local_url, server[1]
    released = []
    for i, pipe in enumerate(pipes):
        monkeypatch.setattr(pipe, "release", lambda i=i: released.append(i))
    busy = Client(url, verbose=False).submit(**{**GOOD, "prompt": OTHER, "steps": 20}, api_name="/generate")
    wait_until(lambda: steps.count(0) + steps.count(1) > 0)
    free = 1 if steps.count(0) else 0  # the only device left for the next job

    def oom_once(*_):
        handle.remove()
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = pipes[free].transformer.register_forward_pre_hook(oom_once)
    with pytest.raises(AppError, match="ran out of memory"):
        Client(url, verbose=False).predict(**GOOD, api_name="/generate")
    assert released == [free]
    assert busy.result(timeout=30)[2]["prompt"] == OTHER  # the other device's job never noticed
    assert Client(url, verbose=False).predict(**GOOD, api_name="/generate")[1] == 7  # the device is back


def test_the_page_says_how_many_devices_serve_it(server):
    demo, pipes, _ = server
    assert "2 clips at a time" in httpx.get(demo.local_url + "config").text
    assert "2 clips at a time" not in events.model_status(pipes[0], "")  # one pipeline: one at a time
    generate = next(fn for fn in demo.fns.values() if fn.api_name == "generate")
    assert generate.concurrency_limit == 2


def test_the_pool_serves_waiters_in_order_and_a_cancelled_waiter_leaves(server):
    pool, order = DevicePool(server[1]), []
    first, second = pool.take(), pool.take()
    held = [first.__enter__(), second.__enter__()]
    assert held[0] is not held[1]
    stop_early = threading.Event()

    def wait(name, wanted=lambda: True):
        try:
            with pool.take(wanted, poll_s=0.02) as pipe:
                order.append((name, pipe))
                time.sleep(0.05)
        except GenerationCancelled:
            order.append((name, "cancelled"))

    threads = []
    for name, wanted in (("early", lambda: not stop_early.is_set()), ("x", None), ("y", None)):
        threads.append(threading.Thread(target=wait, args=(name, wanted or (lambda: True))))
        threads[-1].start()
        waiting = len(threads)
        wait_until(lambda: len(pool._waiting) == waiting)  # noqa: B023 (waited for here, in this iteration)
    stop_early.set()
    wait_until(lambda: order == [("early", "cancelled")])
    first.__exit__(None, None, None)  # x has waited longest: it gets the first device freed
    wait_until(lambda: len(order) == 2)
    assert order[1] == ("x", held[0])
    second.__exit__(None, None, None)
    for t in threads:
        t.join(5)
    assert [n for n, _ in order] == ["early", "x", "y"] and pool.busy == 0
    with pool.take(device=torch.device("cuda", 3)) as none:  # no pipeline there: nothing to wait for
        assert none is None


def test_device_lists_are_checked_before_anything_loads(monkeypatch, tmp_path):
    assert pick_devices(None, "cpu,cpu") == [torch.device("cpu")] * 2
    assert pick_devices(None, None) == [None] and pick_devices("cpu", None) == ["cpu"]  # --device as before
    for spec, said in [
        ("cuda:7", "CUDA is not available"),
        ("", "empty"),
        (" , ", "empty"),
        ("cpu,,cpu", "empty item"),
        ("all", "CUDA is not available"),
        ("tpu", "must be"),
    ]:
        with pytest.raises(ValueError, match=said):
            pick_devices(None, spec)
    with pytest.raises(ValueError, match="not both"):
        pick_devices("cpu", "cpu,cpu")
    with pytest.raises(ValueError, match="ZeroGPU"):
        pick_devices(None, "cpu,cpu", zero_gpu=True)
    # As main() starts: one line, exit non-zero, before any model loads (the model does not even exist).
    base = ["--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")]
    for argv in (["--devices", "cuda:7"], ["--devices", ""], ["--devices", "cpu,cpu", "--device", "cpu"]):
        with pytest.raises(SystemExit, match=r"^error: [^\n]+$"):
            app.main([*base, *argv])
    monkeypatch.setenv("COGVIDEOX_DEVICES", "cpu,cpu")
    assert launch.parse_args([]).devices == "cpu,cpu"
    monkeypatch.setenv("COGVIDEOX_DEVICE", "cpu")
    with pytest.raises(SystemExit, match="not both"):
        app.main(base)
    assert not (tmp_path / "out").exists()


def test_cuda_device_lists_on_a_machine_with_two_gpus(monkeypatch):
    # Counted by the driver, as check_device asks it; no CUDA context is made, so two "GPUs" can be pretended.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    both = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert parse_devices("all") == parse_devices("cuda:0, cuda:1") == both
    for spec, said in [
        ("cuda:2", "no cuda:2"),
        ("cuda:1,cuda:1", "cuda:1 twice"),
        ("cuda,cuda:0", "cuda:0 twice"),
    ]:
        with pytest.raises(ValueError, match=said):
            parse_devices(spec)
