"""A fair share of the queue and of the server's memory for each visitor (issue 19): an ASGI middleware in front of
Gradio's routes, beside guard.py's.

What Gradio leaves open on a public Space:
- its queue holds jobs from anyone, as many as they send: one visitor's joins (fresh session ids, never listened to)
  fill it and every other visitor is told "Queue is full". Here each browser session may have one job of each kind
  waiting or running (one clip, one GIF, one read upload, one enhanced prompt), and each client address a few
  (QUEUE_PER_ADDRESS); more is refused at once with a plain message. A job whose session opens no stream to hear
  it within QUEUE_LISTEN_S is dropped (a running one stops at its next step).
- it keeps every session's state (~100 kB of component configs each, made for deep links) until 10,000 sessions:
  a client calling cheap events with fresh session ids grows the server by gigabytes. Here each address keeps at
  most SESSIONS_PER_ADDRESS sessions that no open page holds (API calls, closed tabs); older ones are forgotten.
  An open page (its heartbeat stream) is never forgotten. MAX_SESSIONS caps all of them together (Gradio's
  `state_session_capacity`).

Gradio's own queue stays the record of what waits or runs: a job counts here while Gradio holds it, so a job that
ends, fails, is cancelled or loses its page frees its place with no bookkeeping of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from webapp.guard import client_address

# Each may be overridden by an environment variable of the same name, read when the server starts.
QUEUE_PER_ADDRESS = 2  # jobs of one kind waiting or running per client address
QUEUE_LISTEN_S = 5.0  # a job must be listened to within this long of joining the queue
SESSIONS_PER_ADDRESS = 16  # sessions kept per address that no open page holds
MAX_SESSIONS = 2000  # sessions kept in all (Gradio's default: 10,000, ~1 GB here)
MAX_ADDRESSES = 10_000  # addresses whose sessions are remembered (bounded under a spray of addresses)
# What a visitor is told they already have waiting, by the queue's concurrency group (app.py names them).
KINDS = {
    "gpu": "clip",
    "gif": "GIF being made",
    "read": "file being read",
    "enhance": "prompt being enhanced",
}


def settings(env=None) -> dict:
    """The limits from the environment (defaults above): `Fairness`'s keyword arguments and `max_sessions`;
    ValueError naming the variable when one is not a positive number."""
    env = os.environ if env is None else env
    out = {}
    for name, default, kind in (
        ("QUEUE_PER_ADDRESS", QUEUE_PER_ADDRESS, int),
        ("QUEUE_LISTEN_S", QUEUE_LISTEN_S, float),
        ("SESSIONS_PER_ADDRESS", SESSIONS_PER_ADDRESS, int),
        ("MAX_SESSIONS", MAX_SESSIONS, int),
    ):
        text = env.get(name, "").strip()
        try:
            value = kind(text) if text else default
        except ValueError:
            value = 0
        if not value > 0:
            raise ValueError(
                f"{name} must be a positive {'integer' if kind is int else 'number'}, not {text!r}"
            )
        out[name.lower()] = value
    return out


@dataclass(eq=False)
class Job:
    """A join of Gradio's queue: `event_id` once Gradio has answered; `heard` once a stream listens for it."""

    address: str
    session: str | None
    group: str
    event_id: str | None = None
    heard: bool = False
    joined: float = field(default_factory=time.monotonic)


class Fairness:
    """ASGI middleware; `launch.launch_options` puts it after the Guard (which caps bodies first)."""

    def __init__(
        self,
        app,
        queue_per_address: int = QUEUE_PER_ADDRESS,
        queue_listen_s: float = QUEUE_LISTEN_S,
        sessions_per_address: int = SESSIONS_PER_ADDRESS,
    ):
        self.app, self.per_address, self.listen_s = app, queue_per_address, queue_listen_s
        self.sessions_per_address = sessions_per_address
        self.jobs: list[Job] = []
        self.timers: set[asyncio.Task] = set()  # each unheard job's QUEUE_LISTEN_S
        self.streams: dict[str, int] = {}  # session (or a /call/ event id) -> open queue streams
        self.pages: dict[str, int] = {}  # session -> open heartbeat streams (an open page)
        self.sessions: OrderedDict[str, OrderedDict[str, None]] = (
            OrderedDict()
        )  # address -> its sessions, LRU
        self.owner: dict[str, str] = {}  # session -> the address that used it last

    async def __call__(self, scope, receive, send):
        gradio = scope.get("app")
        if scope["type"] != "http" or not hasattr(gradio, "get_blocks"):
            return await self.app(scope, receive, send)
        path, method = scope.get("path", "").rstrip("/"), scope.get("method", "GET")
        if method == "GET":
            return await self._stream(scope, receive, send, path)
        headers = dict(scope.get("headers") or [])
        if method != "POST" or not headers.get(b"content-type", b"").startswith(b"application/json"):
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        if body is None:  # the client left, or the guard cut the body off (it answers)
            return
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        request = request if isinstance(request, dict) else {}
        session = request.get("session_hash") if isinstance(request.get("session_hash"), str) else None
        replay = _replay(body, receive)
        address = client_address(scope, headers)
        job = None
        if (group := self._queued_group(gradio, path, request)) is not None:
            if problem := self._problem(gradio, address, session, group):
                return await _refuse(send, problem)
            job = Job(address, session, group)
            self.jobs.append(job)  # its place is held while Gradio answers
            send = self._watch_join(job, send)
        try:
            await self.app(scope, replay, send)
        finally:
            if job is not None and job.event_id is None:  # refused by Gradio (full, invalid) or failed
                self.jobs.remove(job)
        if job is not None and job.event_id is not None:
            job.session = job.session or job.event_id  # a /call/ without a session: the event is its own
            job.heard = self.streams.get(job.session, 0) > 0 or self.streams.get(job.event_id, 0) > 0
            if not job.heard:
                timer = asyncio.create_task(self._drop_if_unheard(gradio, job))
                self.timers.add(timer)
                timer.add_done_callback(self.timers.discard)
        if session is not None:
            self._keep(gradio, address, session)

    # -- the queue -------------------------------------------------------------------------------------------

    @staticmethod
    def _queued_group(gradio, path: str, request: dict) -> str | None:
        """The concurrency group of a join of Gradio's queue (its page's route or its API's); None otherwise."""
        blocks = gradio.get_blocks()
        parts = path.split("/")
        if path.endswith("/queue/join"):
            fn = blocks.fns.get(request.get("fn_index")) if isinstance(request.get("fn_index"), int) else None
        elif len(parts) >= 3 and "call" in parts[-3:-1]:  # /call/{api_name} and /call/v2/{api_name}
            fn = next((f for f in blocks.fns.values() if f.api_name == parts[-1]), None)
        else:
            return None
        return str(fn.concurrency_id) if fn is not None and fn.queue else None

    def _problem(self, gradio, address: str, session: str | None, group: str) -> str | None:
        """Why this join is refused, or None."""
        live = _live_events(gradio.get_blocks()._queue)
        self.jobs = [j for j in self.jobs if j.event_id is None or j.event_id in live]
        kind = KINDS.get(group, "request")
        mine = [j for j in self.jobs if j.group == group and j.address == address]
        if session is not None and any(j.session == session for j in mine):
            finish = "wait for it to finish, or cancel it" if group == "gpu" else "wait for it to finish"
            return f"You already have a {kind} in the queue: {finish}."
        if len(mine) >= self.per_address:
            return (
                f"You already have {len(mine)} {kind}s in the queue (from your address): wait for one to "
                "finish."
            )
        return None

    def _watch_join(self, job: Job, send):
        """`send`, noting the event id Gradio gives the job."""
        status, chunks = [0], []

        async def watching(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and status[0] == 200:
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        job.event_id = str(json.loads(b"".join(chunks))["event_id"])
            await send(message)

        return watching

    async def _drop_if_unheard(self, gradio, job: Job) -> None:
        """QUEUE_LISTEN_S after a join: a job nobody listens to gives its place back. Gradio takes it out of its
        queue, or marks it gone if it has started (the job then stops, as for a closed tab)."""
        await asyncio.sleep(self.listen_s)
        if job.heard or job not in self.jobs:
            return
        queue = gradio.get_blocks()._queue
        await queue.clean_events(event_id=job.event_id)
        ids = queue.pending_event_ids_session.get(job.session)
        if ids is not None:  # what Gradio keeps for a stream that never came
            ids.discard(job.event_id)
            if not ids:
                queue.pending_event_ids_session.pop(job.session, None)
                if not self.streams.get(job.session):
                    queue.pending_messages_per_session.pop(job.session, None)

    # -- streams and sessions --------------------------------------------------------------------------------

    async def _stream(self, scope, receive, send, path: str):
        """A GET: the queue's streams (which hear jobs) and heartbeats (an open page) are counted while open."""
        parts, key, counts = path.split("/"), None, None
        if path.endswith("/queue/data"):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            key, counts = (query.get("session_hash") or [None])[0], self.streams
        elif len(parts) >= 4 and "call" in parts[-4:-2]:  # /call/{api_name}/{event_id}: the job's own stream
            key, counts = parts[-1], self.streams
        elif len(parts) >= 2 and parts[-2] == "heartbeat":
            key, counts = parts[-1], self.pages
        if not key:
            return await self.app(scope, receive, send)
        counts[key] = counts.get(key, 0) + 1
        for job in self.jobs:
            if counts is self.streams and key in (job.session, job.event_id):
                job.heard = True
        try:
            await self.app(scope, receive, send)
        finally:
            counts[key] -= 1
            if not counts[key]:
                del counts[key]

    def _keep(self, gradio, address: str, session: str) -> None:
        """Remember `session` as this address's newest; forget its oldest ones past SESSIONS_PER_ADDRESS."""
        holder = gradio.state_holder
        if session not in holder.session_data:
            return
        if (before := self.owner.get(session)) is not None and before != address:
            self.sessions.get(before, {}).pop(session, None)
        self.owner[session] = address
        mine = self.sessions.pop(address, None) or OrderedDict()
        self.sessions[address] = mine  # the newest address
        mine[session] = None
        mine.move_to_end(session)
        if len(self.sessions) > MAX_ADDRESSES:
            for old in self.sessions.popitem(last=False)[1]:
                self.owner.pop(old, None)
        if len(mine) <= self.sessions_per_address:
            return
        busy = {j.session for j in self.jobs} | self.pages.keys() | self.streams.keys()
        spare = [s for s in mine if s not in busy]
        for old in spare[: max(0, len(spare) - self.sessions_per_address)]:
            del mine[old]
            self.owner.pop(old, None)
            with holder.lock:
                holder.session_data.pop(old, None)
                holder.time_last_used.pop(old, None)


def _live_events(queue) -> set[str]:
    """The ids of the events Gradio's queue holds: waiting, or running."""
    waiting = {e._id for q in queue.event_queue_per_concurrency_id.values() for e in q.queue}
    running = {e._id for events in queue.active_jobs if events for e in events}
    return waiting | running


async def _read_body(receive) -> bytes | None:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that gives the app the body already read, then waits on the client as before."""
    sent = [False]

    async def replay():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send, message: str) -> None:
    """429 with the message as `detail`: the page shows it by the button; gradio_client's error carries it."""
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
