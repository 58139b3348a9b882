"""Attack a running app as an outsider would, on loopback, and count what it handled (issue 11).

    python app.py --model tiny-random --port 7861 &
    python -m tools.attack --url http://127.0.0.1:7861/ [--quick] [--auth user:password]

Each class of attack sends a bounded number of requests and counts one as handled when the app refuses it the
way it should (a 4xx, or our own error message), in bounded time, with the server still serving after it.
Prints a markdown table (the one in docs/security.md) and exits 1 if anything was not handled.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import imageio_ffmpeg

SAFE_INLINE = ("video/mp4", "image/gif", "image/png", "image/jpeg", "image/webp")
JSON = {"content-type": "application/json"}
# Gradio's own events (the Examples loader, the Cancel helper) answer garbage with a bare HTTP 500: cheap,
# nothing of ours runs, the server goes on. Counted as handled, and listed as such in docs/security.md.
GRADIO_INTERNAL = ("load_example", "unnamed")
GOOD = {"prompt": "a red kite", "negative_prompt": "", "seed": 7, "steps": 1, "guidance_scale": 6.0}


def _json(body) -> bytes:
    """JSON as a hostile client may send it: NaN, Infinity and 400-digit integers included."""
    return json.dumps(body, allow_nan=True).encode()


class Attacker:
    """`local_address`: send from this address (another loopback address, 127.0.0.2: another visitor)."""

    def __init__(self, url: str, timeout_s: float = 30.0, local_address: str | None = None):
        self.url = url.rstrip("/") + "/"
        transport = httpx.HTTPTransport(local_address=local_address) if local_address else None
        self.http = httpx.Client(timeout=timeout_s, transport=transport)
        self.rows: list[tuple[str, int, int, str]] = []
        self._config = None

    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = self.http.get(self.url + "config").json()
        return self._config

    # -- talking to Gradio ---------------------------------------------------------------------------------

    def run_event(self, fn_index: int, data: list, queued: bool, event_data=None) -> tuple[bool, str]:
        """Run one event directly (as the page would, UI-only ones too): (succeeded, error text or status)."""
        session = uuid.uuid4().hex[:10]
        body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": event_data}
        if not queued:
            r = self.http.post(self.url + "gradio_api/run/predict", content=_json(body), headers=JSON)
            if r.status_code != 200:
                return False, f"HTTP {r.status_code}: {r.text[:200]}"
            return "error" not in r.json() or not r.json()["error"], json.dumps(r.json())[:300]
        r = self.join(fn_index, data, session, event_data)
        if r.status_code != 200:
            return False, f"HTTP {r.status_code}: {r.text[:200]}"
        return self.listen(session)

    def join(self, fn_index: int, data: list, session: str, event_data=None) -> httpx.Response:
        """Put an event in Gradio's queue for `session` (without listening for it)."""
        body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": event_data}
        return self.http.post(self.url + "gradio_api/queue/join", content=_json(body), headers=JSON)

    def listen(self, session: str) -> tuple[bool, str]:
        """Hear `session`'s queued events to the end of the first: (succeeded, its output or error)."""
        with self.http.stream(
            "GET", self.url + "gradio_api/queue/data", params={"session_hash": session}
        ) as s:
            for line in s.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") in ("process_completed", "unexpected_error"):
                    return bool(message.get("success")), json.dumps(message.get("output", message))[:300]
        return False, "stream ended"

    def generate_index(self) -> int:
        return next(i for i, d in enumerate(self.config["dependencies"]) if d.get("api_name") == "generate")

    def alive(self) -> bool:
        try:
            return self.http.get(self.url, timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def record(self, name: str, results: list[tuple[bool, str]]) -> None:
        failures = [why for ok, why in results if not ok]
        self.rows.append((name, len(results), len(results) - len(failures), failures[0] if failures else ""))

    # -- the classes of attack -----------------------------------------------------------------------------

    def uploads(self, n: int) -> None:
        """Active content through every upload route: refused, so nothing is stored or served back."""
        files = [
            ("page.html", b"<script>alert(document.cookie)</script>", "text/html"),
            ("image.svg", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>', "image/svg+xml"),
            ("x.js", b"alert(1)", "application/javascript"),
        ]
        paths = [
            "gradio_api/upload",
            "upload",
            "gradio_api/upload/",
            "gradio_api/upload?upload_id=x",
            "//upload",
        ]
        results = []
        for i in range(n):
            name, content, kind = files[i % len(files)]
            r = self.http.post(self.url + paths[i % len(paths)], files={"files": (name, content, kind)})
            results.append(
                (r.status_code in (403, 404, 405), f"{paths[i % len(paths)]}: HTTP {r.status_code}")
            )
        self.record("uploads of HTML/SVG/JS", results)

    def traversal(self) -> None:
        """Files outside the output folder, in every encoding: never served."""
        targets = [
            "/etc/passwd",
            "../../../../etc/passwd",
            "..%2F..%2F..%2Fetc%2Fpasswd",
            "%2e%2e/%2e%2e/etc/passwd",
            "....//....//etc/passwd",
            "/proc/self/environ",
            "app.py",
            "./app.py",
            "%2Fetc%2Fpasswd",
            "..\\..\\etc\\passwd",
            "/etc/passwd%00.mp4",
            "file:///etc/passwd",
            "http://127.0.0.1:1/x",
        ]
        results = []
        for target in targets:
            for route in ("gradio_api/file=", "file=", "gradio_api/file/"):
                r = self.http.get(self.url + route + target)
                leaked = r.status_code == 200 and (
                    "root:" in r.text or "import" in r.text or "PATH=" in r.text
                )
                results.append(
                    (
                        r.status_code in (400, 403, 404, 405) and not leaked,
                        f"{route}{target}: {r.status_code}",
                    )
                )
        self.record("path traversal (13 paths x 3 routes)", results)

    def closed_routes(self) -> None:
        """Routes Gradio opens that the page does not use (its screen-recorder helper runs ffmpeg on what it is
        sent): refused before Gradio sees them, whatever the method or a trailing slash."""
        routes = [
            ("POST", "gradio_api/process_recording"),
            ("POST", "gradio_api/vibe-edit"),
            ("POST", "gradio_api/vibe-code"),
            ("GET", "gradio_api/vibe-code"),
            ("POST", "gradio_api/vibe-starter-queries"),
            ("POST", "gradio_api/component_server"),
            ("GET", "gradio_api/proxy=https://example.org/"),
            ("POST", "gradio_api/stream/x"),
            ("GET", "gradio_api/stream/s/0/c/playlist.m3u8"),
            ("GET", "gradio_api/custom_component/1/a/b/c"),
            ("GET", "gradio_api/dev/reload"),
            ("GET", "gradio_api/runs"),
            ("GET", "gradio_api/token"),
            ("GET", "gradio_api/user"),
            ("GET", "gradio_api/app_id"),
            ("GET", "gradio_api/deep_link"),
            ("GET", "gradio_api/openapi.json"),
            ("GET", "openapi.json"),
            ("GET", "monitoring"),
            ("GET", "monitoring/summary"),
            ("GET", "pwa_icon"),
            ("GET", "manifest.json"),
            ("GET", "svelte/x.js"),
            ("POST", "gradio_api/api/generate"),
            ("POST", "gradio_api/run/generate"),
            ("GET", "gradio_api/queue/status"),
            ("GET", "gradio_api/file/app.py"),
            ("POST", "gradio_api/process_recording/"),
            ("PUT", ""),
            ("DELETE", "config"),
            ("OPTIONS", "gradio_api/queue/join"),
        ]
        results = []
        for method, path in routes:
            files = {"video": ("r.mp4", b"\x00" * 64, "video/mp4")} if "recording" in path else None
            start = time.monotonic()
            r = self.http.request(method, self.url + path, files=files)
            ok = r.status_code == 404 and time.monotonic() - start < 5
            results.append((ok, f"{method} /{path}: {r.status_code}"))
        self.record(f"routes the page does not use ({len(routes)})", results)

    def other_sites(self, user: str, password: str) -> None:
        """With a password: another site's page using the visitor's cookie (a login, an upload, a job, a read) is
        refused; the app's own page is not."""
        own = {"origin": self.url.rstrip("/")}
        login = {"username": user, "password": password}
        results = []
        for name, headers in (
            ("evil origin", {"origin": "https://evil.example"}),
            ("null origin", {"origin": "null"}),
            ("cross-site fetch", {"sec-fetch-site": "cross-site"}),
        ):
            with httpx.Client(timeout=30) as http:  # a fresh browser: no cookie unless the login is taken
                r = http.post(self.url + "login", data=login, headers=headers)
                results.append((r.status_code == 403 and not http.cookies, f"login, {name}: {r.status_code}"))
            upload = {"files": {"files": ("a.mp4", b"\x00" * 64, "video/mp4")}, "headers": headers}
            r = self.http.post(self.url + "gradio_api/upload", **upload)
            results.append((r.status_code == 403, f"upload, {name}: {r.status_code}"))
            join = _json({"data": [], "fn_index": self.generate_index(), "session_hash": "s"})
            r = self.http.post(self.url + "gradio_api/queue/join", content=join, headers={**JSON, **headers})
            results.append((r.status_code == 403, f"queue join, {name}: {r.status_code}"))
        r = self.http.get(self.url + "config", headers={"origin": "https://evil.example"})
        results.append(
            (r.status_code == 403, f"credentialed read of /config from another site: {r.status_code}")
        )
        r = self.http.get(self.url + "config", headers=own)
        results.append((r.status_code == 200, f"/config from the app's own page: {r.status_code}"))
        self.record("requests from other sites (with a password)", results)

    def served_headers(self, clip_url: str | None) -> None:
        """What we do serve: nosniff everywhere; only clips and images inline."""
        results = []
        for path in ("", "config", "gradio_api/info"):
            r = self.http.get(self.url + path)
            results.append((r.headers.get("x-content-type-options") == "nosniff", f"/{path}: no nosniff"))
        if clip_url:
            r = self.http.get(clip_url)
            inline = r.headers.get("content-type", "").split(";")[0] in SAFE_INLINE
            results.append(
                (r.status_code == 200 and inline, f"clip: {r.status_code} {r.headers.get('content-type')}")
            )
        self.record("response headers", results)

    def big_bodies(self) -> None:
        """Bodies over the cap, declared or chunked: refused before the app reads them."""
        results = []
        big = b'{"data": ["' + b"x" * (5 << 20) + b'"], "fn_index": 0, "session_hash": "s"}'
        for path in ("gradio_api/queue/join", "gradio_api/run/predict", "gradio_api/call/generate", "login"):
            r = self.http.post(self.url + path, content=big, headers={"content-type": "application/json"})
            results.append((r.status_code == 413, f"{path} declared: {r.status_code}"))

            def chunks():
                for _ in range(40):
                    yield b"x" * (128 << 10)

            try:
                r = self.http.post(
                    self.url + path, content=chunks(), headers={"content-type": "application/json"}
                )
                # Refused either way: 413 before the app reads, or a 4xx once it finds the body cut off.
                results.append((400 <= r.status_code < 500, f"{path} chunked: {r.status_code}"))
            except httpx.HTTPError as e:  # the server stopped reading: refused as well
                results.append((True, str(e)))
        self.record("request bodies over the cap", results)

    def event_flood(self, per_event: int, text_chars: int) -> None:
        """Every event of the page (UI-only ones too), called directly with huge text in every input, in parallel:
        each answers in bounded time without a server error."""
        deps = self.config["dependencies"]
        jobs = []
        for i, dep in enumerate(deps):
            if dep.get("js") and not dep.get("backend_fn", True):
                continue
            data = ["x" * text_chars] * len(dep.get("inputs", []))
            jobs += [(i, data, dep.get("queue") is not False)] * per_event
        results = []
        with futures.ThreadPoolExecutor(8) as pool:
            start = time.monotonic()
            outcomes = pool.map(lambda job: (job[0], self._timed(*job)), jobs)
            for i, (elapsed, status) in outcomes:
                ours = deps[i].get("api_name") not in GRADIO_INTERNAL
                ok = elapsed < 10 and not (ours and "HTTP 5" in status)
                results.append((ok, f"fn {i} ({deps[i].get('api_name')}): {elapsed:.1f} s {status[:120]}"))
        took = time.monotonic() - start
        results.append((self.alive(), "server not answering after the flood"))
        self.record(f"flood: {len(jobs)} calls of {text_chars // 1000} kB text ({took:.0f} s)", results)

    def _timed(self, fn_index: int, data: list, queued: bool) -> tuple[float, str]:
        start = time.monotonic()
        try:
            _, why = self.run_event(fn_index, data, queued)
        except httpx.HTTPError as e:
            why = f"{type(e).__name__}"
        return time.monotonic() - start, why

    def bad_values(self) -> None:
        """Per field of /generate, values just outside each bound and of the wrong kind: our own message."""
        cases = {
            "prompt": ["", "   ", "\u200b\u200b", "\ufeff\u2060", None, 5, ["a"], "x" * 2001],
            "negative_prompt": [7, ["x"], "x" * 2001],
            "seed": [-2, 2**32, 1.5, "7", True, 10**400, float("nan")],
            "steps": [0, 101, 2.5, "10", None, 10**400],
            "guidance_scale": [0.99, 20.01, float("inf"), "6", None, True, 10**400],
            "num_frames": [8, 10, 5, 13, 25, 50, "9", 9.5, None],
        }
        fn = self.generate_index()
        results = []
        for field, values in cases.items():
            for value in values:
                data = {**GOOD, "num_frames": 9, field: value}
                payload = [
                    data[k]
                    for k in ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "num_frames")
                ]
                ok, why = self.run_event(fn, payload, queued=True)
                refused = not ok and ("HTTP 4" in why or field.split("_")[0] in why or "prompt" in why)
                results.append((refused, f"{field}={str(value)[:20]}: {why[:160]}"))
        # LoRAs (issue 24): only the operator's --lora-dir files, by name; never a path, a URL or a Hub id.
        for value in (
            {"../x": 1.0},
            {"/etc/passwd": 1.0},
            {"https://example.org/x.safetensors": 1.0},
            "../x",
            {"nosuch": 1},
        ):
            data = self._generate_data()
            data[-1] = value  # /generate's last input: loras
            ok, why = self.run_event(fn, data, queued=True)
            refused = not ok and ("HTTP 4" in why or "LoRA" in why)
            results.append((refused, f"loras={str(value)[:30]}: {why[:160]}"))
        self.record("bad values per /generate field", results)

    def spoofed_media(self) -> None:
        """Videos over the app's default limits (4096x4096 pixels, 60 s) whose metadata says they are small and
        short, in the lines ffmpeg prints where a careless reader takes the size and length from (a title, a
        comment, a track's language inside the stream's own line, the container's duration): each one uploaded,
        then sent to /generate, must be refused by what its stream holds, before the job is queued (issue 19)."""
        results = []
        with tempfile.TemporaryDirectory() as folder:
            for path in _spoofed_videos(Path(folder)):
                r = self.http.post(
                    self.url + "gradio_api/upload", files={"files": (path.name, path.read_bytes())}
                )
                if r.status_code != 200:
                    results.append((False, f"{path.name}: upload answered {r.status_code}"))
                    continue
                video = {"path": r.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
                body = {
                    "data": self._generate_data(video=video, steps=10),
                    "fn_index": self.generate_index(),
                    "session_hash": uuid.uuid4().hex[:10],
                }
                r = self.http.post(self.url + "gradio_api/queue/join", content=_json(body), headers=JSON)
                # Refused before the queue: 422, with the validator's message per parameter.
                said = (
                    [d.get("message") or "" for d in r.json().get("detail", [])]
                    if r.status_code == 422
                    else []
                )
                why = "; ".join(m for m in said if m) or f"HTTP {r.status_code}: {r.text[:160]}"
                refused = any("pixels per frame" in m or " s long" in m for m in said)
                results.append((refused, f"{path.name}: {why[:160]}"))
        results.append((self.alive(), "server not answering after the spoofed videos"))
        self.record("videos whose metadata lies about their size or length", results)

    def _generate_data(self, **values) -> list:
        """/generate's inputs: each component's default, GOOD's values and `values` in their places by name."""
        dep = self.config["dependencies"][self.generate_index()]
        defaults = {c["id"]: c.get("props", {}).get("value") for c in self.config["components"]}
        data = [defaults.get(i) for i in dep["inputs"]]
        given = {**GOOD, "num_frames": 9, **values}
        for place, name in enumerate(
            ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "num_frames", "speed", "video")
        ):
            if name in given:
                data[place] = given[name]
        return data

    def queue_flood(self, n: int, other: Attacker | None = None, wait_s: float = 30.0) -> None:
        """Issue 19: one visitor cannot fill the queue. One session joining twice is refused at once; `n` joins
        with fresh session ids, never listened to, are refused past a few with a plain message (never "Queue is
        full"); another visitor (`other`: another address) is still served; the unheard joins give their places
        back within seconds."""
        fn, results = self.generate_index(), []
        fields = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale")
        job = [*(GOOD[k] for k in fields), 9, "Full"]
        job += [None] * (len(self.config["dependencies"][fn]["inputs"]) - len(job))  # no video, strength, ...
        session = uuid.uuid4().hex[:10]
        twice = [self.join(fn, job, session).status_code, self.join(fn, job, session)]
        results.append((twice[0] == 200, f"a first join: HTTP {twice[0]}"))
        results.append((_plain_refusal(twice[1]), f"the same session again: {twice[1].text[:160]}"))
        flood = [self.join(fn, job, uuid.uuid4().hex[:10]) for _ in range(n)]
        refused = [r for r in flood if r.status_code != 200]
        results.append((bool(refused), f"all {n} joins from one address were taken"))
        results += [(_plain_refusal(r), f"flood: {r.text[:160]}") for r in refused]
        if other is not None:
            ok, why = other.run_event(fn, job, queued=True)
            results.append((ok, f"another visitor during the flood: {why[:160]}"))
        start, back = time.monotonic(), None
        while back is None and time.monotonic() - start < wait_s:
            session = uuid.uuid4().hex[:10]
            if self.join(fn, job, session).status_code == 200:
                back = self.listen(session)
            else:
                time.sleep(0.5)
        took = time.monotonic() - start
        results.append((back is not None and back[0], f"the flood's places, {took:.0f} s later: {back}"))
        self.record(f"queue flood: 1 session twice, {n} unheard joins from one address", results)

    def session_flood(self, n: int, pid: int | None = None) -> float | None:
        """Issue 19: `n` cheap events, each with a fresh session id (8 at a time): all answered, and with `pid` (a
        server on this machine) its memory grows by at most 300 MiB. Returns that growth (MiB)."""
        deps = self.config["dependencies"]
        fn = next(
            i
            for i, d in enumerate(deps)
            if d.get("backend_fn") and not d.get("js") and not d["inputs"] and d.get("queue") is False
        )
        before, start = _rss_mib(pid), time.monotonic()
        with futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: self.run_event(fn, [], queued=False), range(n)))
        took, grown = time.monotonic() - start, None
        results = [(ok, why[:160]) for ok, why in answers]
        if pid is not None:
            grown = _rss_mib(pid) - before
            results.append((grown <= 300, f"the server grew by {grown:.0f} MiB"))
        results.append((self.alive(), "server not answering after the flood"))
        memory = f", RSS +{grown:.0f} MiB" if grown is not None else ""
        self.record(f"{n} cheap events with fresh session ids ({took:.0f} s{memory})", results)
        return grown

    def logins(self, user: str, password: str) -> None:
        """Password guessing from one address is slowed; the right password from another still works."""
        results = []
        statuses = [
            self.http.post(self.url + "login", data={"username": user, "password": f"guess{i}"}).status_code
            for i in range(6)
        ]
        results.append((statuses[:3] == [400] * 3, f"first failures: {statuses[:3]}"))
        results.append((all(s == 429 for s in statuses[3:]), f"later guesses: {statuses[3:]}"))
        other = {"x-forwarded-for": "203.0.113.9"}
        r = self.http.post(self.url + "login", data={"username": user, "password": password}, headers=other)
        results.append(
            (r.status_code == 200, f"another visitor's login: {r.status_code}")
        )  # keeps its cookie
        self.record("password guessing", results)

    def table(self) -> str:
        lines = ["| attack | tried | handled | first failure |", "|---|---|---|---|"]
        lines += [f"| {name} | {tried} | {handled} | {why} |" for name, tried, handled, why in self.rows]
        return "\n".join(lines)


def _spoofed_videos(folder: Path) -> list[Path]:
    """6000x6000 (36 Mpx) titled as a 64x64 stream, then with a Matroska track language that writes "64x64" into
    the stream's own line; 70 s with a comment "Duration: 00:00:01.00", then with the container's duration set
    to 1 s (the Segment's Duration, a float of milliseconds)."""

    def ffmpeg(source: str, *args) -> None:
        subprocess.run(
            [
                imageio_ffmpeg.get_ffmpeg_exe(),
                *["-v", "error", "-f", "lavfi", "-i"],
                source,
                *["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
                *args,
            ],
            check=True,
        )

    big, long = "color=gray:size=6000x6000:rate=8:duration=0.125", "color=gray:size=64x48:rate=1:duration=70"
    ffmpeg(big, "-metadata", "title=Stream #0:0: Video: h264, 64x64", folder / "title.mp4")
    ffmpeg(big, "-metadata:s:v:0", "language=und): Video: h264, 64x64", folder / "language.mkv")
    ffmpeg(long, "-metadata", "comment=Duration: 00:00:01.00", folder / "comment.mp4")
    ffmpeg(long, folder / "length.mkv")
    data = bytearray((folder / "length.mkv").read_bytes())
    at = data.index(b"\x44\x89\x88") + 3
    data[at : at + 8] = struct.pack(">d", 1000.0)
    (folder / "length.mkv").write_bytes(data)
    return [folder / name for name in ("title.mp4", "language.mkv", "comment.mp4", "length.mkv")]


def _plain_refusal(r: httpx.Response) -> bool:
    """Refused at once with a message a visitor can read (not Gradio's "Queue is full")."""
    return r.status_code == 429 and "You already have" in r.json().get("detail", "")


def _rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--quick", action="store_true", help="fewer requests (the test suite's run)")
    p.add_argument("--auth", default=None, help="user:password of the app, to attack its login")
    p.add_argument("--clip-url", default=None, help="a served clip, to check its headers")
    p.add_argument(
        "--other-address",
        default=None,
        help="a second local address to send from as another visitor (on loopback: 127.0.0.2)",
    )
    p.add_argument(
        "--sessions", type=int, default=None, help="cheap events with fresh session ids (default 2000)"
    )
    p.add_argument("--pid", type=int, default=None, help="the server's process id, to read its memory")
    args = p.parse_args(argv)
    attacker = Attacker(args.url)
    if args.auth:  # first: the right password then logs this client in for the rest
        attacker.logins(*args.auth.split(":", 1))
        attacker.other_sites(*args.auth.split(":", 1))
    attacker.closed_routes()
    attacker.uploads(10 if args.quick else 60)
    attacker.traversal()
    attacker.served_headers(args.clip_url)
    attacker.big_bodies()
    attacker.event_flood(1 if args.quick else 4, 200_000)
    attacker.bad_values()
    if not args.quick:  # stores its uploads (valid names): the suite's run checks that nothing is stored
        attacker.spoofed_media()
    other = Attacker(args.url, local_address=args.other_address) if args.other_address else None
    attacker.queue_flood(10 if args.quick else 30, other)
    attacker.session_flood(args.sessions or (200 if args.quick else 2000), args.pid)
    print(attacker.table())
    tried = sum(r[1] for r in attacker.rows)
    handled = sum(r[2] for r in attacker.rows)
    print(f"\n{handled} of {tried} handled; server {'still serving' if attacker.alive() else 'DOWN'}")
    return 0 if handled == tried and attacker.alive() else 1


if __name__ == "__main__":
    sys.exit(main())
