"""Issue 19: one visitor cannot fill the queue, and memory per visitor is bounded (fairness.py). A real server on
loopback, started as main() starts it; a second visitor sends from another loopback address (127.0.0.2)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import torch

import app
from cogvideox import CogVideoXPipeline
from cogvideox.testing import free_port
from tools import attack
from webapp import fairness, launch

STEP_S = 0.05  # each transformer call: a 100-step job lasts >= 5 s
LISTEN_S = 1.5
SETTINGS = {"QUEUE_PER_ADDRESS": "3", "QUEUE_LISTEN_S": str(LISTEN_S), "SESSIONS_PER_ADDRESS": "4"}


@pytest.fixture(scope="module")
def server(tiny_2b, tmp_path_factory):
    out = tmp_path_factory.mktemp("fair") / "outputs"
    env = pytest.MonkeyPatch()
    env.setenv("GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(out)))
    for name, value in SETTINGS.items():  # read at launch, as from the command line's environment
        env.setenv(name, value)
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    pipe.load()
    slow = pipe.transformer.register_forward_pre_hook(lambda *_: time.sleep(STEP_S))
    demo = app.create_demo(pipe, output_dir=out)  # the app's queue: 8 jobs
    args = launch.parse_args(["--port", str(free_port()), "--output-dir", str(out)])
    demo.launch(**launch.launch_options(args), prevent_thread_lock=True, quiet=True)
    try:
        yield demo
    finally:
        demo.close()
        slow.remove()
        env.undo()


def fresh() -> str:
    return uuid.uuid4().hex[:10]


def job(visitor: attack.Attacker, steps: int) -> tuple[int, list]:
    """/generate's event and inputs, as the page sends them."""
    fn = visitor.generate_index()
    data = ["a red kite", "", 7, steps, 6.0, 9, "Full"]
    return fn, data + [None] * (len(visitor.config["dependencies"][fn]["inputs"]) - len(data))


def test_a_flood_from_one_address_leaves_the_queue_to_another_visitor(server):
    flooder, visitor = (
        attack.Attacker(server.local_url),
        attack.Attacker(server.local_url, local_address="127.0.0.2"),
    )
    fn, long = job(flooder, steps=100)
    start = time.monotonic()
    flood = [flooder.join(fn, long, fresh()) for _ in range(9)]  # never listened to; 9 > the queue's 8
    assert [r.status_code for r in flood] == [200] * 3 + [429] * 6  # QUEUE_PER_ADDRESS=3 (the default is 2)
    assert all(r.json()["detail"].startswith("You already have 3 clips in the queue") for r in flood[3:])
    ok, why = visitor.run_event(*job(visitor, steps=1), queued=True)
    assert ok, why  # served, not "Queue is full"
    # Unheard, the flood's jobs give their places back within seconds (the running one stops at a step), not
    # after running 3 x 5 s.
    session = fresh()
    while (again := flooder.join(*job(flooder, steps=1), session)).status_code != 200:
        assert again.status_code == 429 and time.monotonic() - start < 8, again.text
        time.sleep(0.2)
    assert flooder.listen(session)[0]


def test_one_session_has_one_clip_in_the_queue_and_is_told_so_at_once(server):
    visitor, session = attack.Attacker(server.local_url), fresh()
    fn, data = job(visitor, steps=10)
    assert visitor.join(fn, data, session).status_code == 200
    again = visitor.join(fn, data, session)
    assert again.status_code == 429
    assert again.json() == {
        "detail": "You already have a clip in the queue: wait for it to finish, or cancel it."
    }
    assert visitor.listen(session)[0]  # the first is served...
    assert visitor.join(fn, data, session).status_code == 200  # ...and then the next may come
    assert visitor.listen(session)[0]


def test_sessions_nobody_uses_are_kept_a_few_per_address(server):
    holder, url = server.server_app.state_holder, server.local_url
    here, there = attack.Attacker(url), attack.Attacker(url, local_address="127.0.0.2")
    deps = here.config["dependencies"]
    cheap = next(
        i for i, d in enumerate(deps) if d.get("backend_fn") and not d["inputs"] and d.get("queue") is False
    )

    def call(who: attack.Attacker, session: str) -> None:
        body = {"data": [], "fn_index": cheap, "session_hash": session}
        assert who.http.post(url + "gradio_api/run/predict", json=body).status_code == 200

    # A session in use (its clip rendering, heard by its stream) and another address's session are kept...
    working, elsewhere = fresh(), fresh()
    assert here.join(*job(here, steps=40), working).status_code == 200
    heard = threading.Thread(target=here.listen, args=(working,), daemon=True)
    heard.start()
    call(there, elsewhere)
    flood = [fresh() for _ in range(30)]  # ...while cheap calls with fresh session ids come from this address
    for session in flood:
        call(here, session)
    deadline = time.monotonic() + 5  # the server forgets old sessions once a call's answer is sent: let it
    while len([s for s in flood if s in holder.session_data]) > 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [s for s in flood if s in holder.session_data] == flood[-4:]  # SESSIONS_PER_ADDRESS=4: the newest
    assert working in holder.session_data and elsewhere in holder.session_data
    heard.join(30)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, dict(queue_per_address=2, queue_listen_s=5.0, sessions_per_address=16, max_sessions=2000)),
        ({"QUEUE_PER_ADDRESS": "1", "QUEUE_LISTEN_S": "0.5"}, dict(queue_per_address=1, queue_listen_s=0.5)),
    ],
)
def test_the_limits_come_from_the_environment(env, expected):
    assert fairness.settings(env).items() >= expected.items()


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "nan"])
def test_a_limit_that_is_not_a_positive_number_is_one_line_at_start(monkeypatch, capsys, value):
    monkeypatch.setenv("QUEUE_PER_ADDRESS", value)
    with pytest.raises(SystemExit):
        launch.parse_args([])
    assert f"QUEUE_PER_ADDRESS must be a positive integer, not {value!r}" in capsys.readouterr().err
