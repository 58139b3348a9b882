"""Issue 19, items 1, 4 and 5: only the routes the page uses, no requests from other sites where a password protects
the app, and proxy headers believed only from a trusted proxy. Unit checks on the guard, then a real server."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import gradio as gr
import httpx
import imageio_ffmpeg
import pytest
from test_security import start_app, stop

from webapp import guard, launch
from webapp.guard import Guard, allowed_route, client_address, other_site, parse_networks

# What a visit really requests (recorded from Chromium and gradio_client: the page, a generation, an upload, Cancel,
# the API page's curl): each must pass. Written out here, apart from guard.ROUTES, so a rule that is too narrow fails.
USED = [
    ("GET", "/"),
    ("HEAD", "/"),
    ("GET", "/config"),
    ("GET", "/theme.css"),
    ("GET", "/favicon.ico"),
    ("GET", "/assets/index-DphvyggB.js"),
    ("GET", "/static/fonts/ui-sans-serif.woff2"),
    ("GET", "/gradio_api/info"),
    ("GET", "/gradio_api/heartbeat/abc123"),
    ("GET", "/gradio_api/queue/data"),
    ("GET", "/gradio_api/startup-events"),
    ("GET", "/gradio_api/upload_progress"),
    ("GET", "/gradio_api/file=/tmp/outputs/clip.mp4"),
    ("GET", "/gradio_api/call/generate/5f3a9c"),
    ("POST", "/login"),
    ("POST", "/gradio_api/queue/join"),
    ("POST", "/gradio_api/cancel"),
    ("POST", "/gradio_api/reset"),
    ("POST", "/gradio_api/run/predict"),
    ("POST", "/gradio_api/upload"),
    ("POST", "/gradio_api/call/v2/generate"),
    ("POST", "/gradio_api/call/generate"),
]


# Gradio's route table with its placeholders filled in: the ones left open (the rest of its ~85 are closed).
OPEN = {
    ("GET", "/"),
    ("HEAD", "/"),
    ("GET", "/assets/x"),
    ("GET", "/static/x"),
    ("GET", "/config"),
    ("GET", "/config/"),
    ("GET", "/favicon.ico"),
    ("GET", "/robots.txt"),
    ("GET", "/logout"),
    ("GET", "/theme.css"),
    ("GET", "/gradio_api/theme.css"),
    ("GET", "/gradio_api/info"),
    ("GET", "/gradio_api/info/"),
    ("GET", "/gradio_api/queue/data"),
    ("GET", "/gradio_api/startup-events"),
    ("GET", "/gradio_api/upload_progress"),
    ("GET", "/gradio_api/heartbeat/session_hash"),
    ("GET", "/gradio_api/file=/tmp/x.mp4"),
    ("HEAD", "/gradio_api/file=/tmp/x.mp4"),
    ("GET", "/gradio_api/call/api_name/event_id"),
    ("POST", "/gradio_api/call/api_name"),
    ("POST", "/gradio_api/call/api_name/"),
    ("POST", "/gradio_api/call/v2/api_name"),
    ("POST", "/gradio_api/call/v2/api_name/"),
    ("POST", "/gradio_api/cancel"),
    ("POST", "/gradio_api/queue/join"),
    ("POST", "/gradio_api/reset"),
    ("POST", "/gradio_api/reset/"),
    ("POST", "/gradio_api/upload"),
    ("POST", "/login"),
    ("POST", "/login/"),
}


def test_every_route_gradio_opens_that_the_page_does_not_use_is_closed():
    """An allow-list: enumerate what this Gradio version registers and check each route outside OPEN is refused,
    so a route a later Gradio adds is closed without anyone listing it."""
    with gr.Blocks() as demo:
        gr.Textbox()
    app = gr.routes.App.create_app(demo)
    routes = []
    for route in app.router.routes:
        inner = getattr(route, "original_router", None)
        routes += inner.routes if inner is not None else [route]
    opened = set()
    for route in routes:
        path = getattr(route, "path", "")
        path = path.replace("{path_or_url:path}", "/tmp/x.mp4").replace(
            "{url_path:path}", "https://example.org/"
        )
        path = path.replace("{path:path}", "x").replace("{", "").replace("}", "").replace(":path", "")
        opened |= {(method, path) for method in getattr(route, "methods", None) or ("GET",)}
    assert ("POST", "/gradio_api/process_recording") in opened and len(opened) > 60
    assert {route for route in opened if allowed_route(*route)} == OPEN
    for method, path in USED:
        assert allowed_route(method, path), (method, path)


def test_closed_routes_are_refused_by_method_and_path_not_by_prefix():
    for method, path in [
        ("POST", "/gradio_api/process_recording"),
        ("POST", "/gradio_api/vibe-edit"),
        ("GET", "/gradio_api/proxy=https://example.org/"),
        ("POST", "/gradio_api/component_server"),
        ("GET", "/monitoring"),
        ("GET", "/openapi.json"),
        ("GET", "/gradio_api/openapi.json"),
        ("GET", "/gradio_api/file/app.py"),
        ("POST", "/gradio_api/run/generate"),
        ("POST", "/gradio_api/api/generate"),
        ("GET", "/gradio_api/queue/join"),
        ("POST", "/config"),
        ("DELETE", "/"),
        ("OPTIONS", "/gradio_api/queue/join"),
        ("POST", "/upload"),
        ("POST", "/gradio_api/upload/"),
        ("GET", "/gradio_api/file="),
        ("GET", "/gradio_api/heartbeat/a/b"),
        ("GET", "/manifest.json"),
        ("GET", "/svelte/x.js"),
        ("POST", "/gradio_api/queue/join/x"),
        ("GET", "/assets/"),
    ]:
        assert not allowed_route(method, path), (method, path)


def through(guard_app: Guard, method: str, path: str, headers: dict, client=("127.0.0.1", 5000)) -> int:
    """One request through the guard in front of an app that answers 200: the status the client gets."""
    statuses = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    raw = [(k.lower().encode(), v.encode()) for k, v in {"content-length": "0", **headers}.items()]
    scope = {"type": "http", "method": method, "path": path, "headers": raw, "client": client}
    asyncio.run(Guard(app, **guard_app)(scope, receive, send))
    return statuses[0]


def test_with_a_password_other_sites_are_refused_and_the_app_and_its_space_are_not():
    auth = dict(auth=True, origins=["me-demo.hf.space"])
    own = {"host": "127.0.0.1:7860"}
    join = ("POST", "/gradio_api/queue/join")
    assert through(auth, *join, {**own, "origin": "http://127.0.0.1:7860"}) == 200  # the page itself
    assert through(auth, *join, {**own, "origin": "https://me-demo.hf.space"}) == 200  # the Space's frame
    assert through(auth, *join, own) == 200  # no browser: gradio_client, curl
    assert through(auth, *join, {**own, "sec-fetch-site": "same-origin"}) == 200
    for bad in (
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"origin": "http://127.0.0.1:7861"},
        {"origin": "https://me-demo.hf.space.evil.example"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ):
        for method, path in (join, ("POST", "/login"), ("POST", "/gradio_api/upload")):
            assert through(auth, method, path, {**own, **bad}) == 403, (path, bad)
    # a credentialed read from another site's script: refused; a link followed from a mail (no Origin) is not
    assert through(auth, "GET", "/config", {**own, "origin": "https://evil.example"}) == 403
    assert through(auth, "GET", "/", {**own, "sec-fetch-site": "cross-site"}) == 200
    # the host the visitor typed, as a trusted proxy forwards it; a client's own X-Forwarded-Host is not believed
    tunnel = {
        "host": "127.0.0.1:7860",
        "x-forwarded-host": "abc.gradio.live",
        "origin": "https://abc.gradio.live",
    }
    assert through(auth, *join, tunnel) == 200
    assert through(auth, *join, tunnel, client=("203.0.113.5", 4000)) == 403
    # no password: nothing of the visitor's to borrow, the app is open to any page
    assert through(dict(auth=False), *join, {**own, "origin": "https://evil.example"}) == 200
    assert other_site("POST", {b"origin": b"HTTPS://ME-DEMO.HF.SPACE"}, {"me-demo.hf.space"}) is False


def test_space_host_and_allowed_origins_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPACE_HOST", "me-demo.hf.space")
    monkeypatch.setenv("COGVIDEOX_ALLOWED_ORIGINS", "https://example.org/, http://intra:8080")
    assert launch.page_origins() == ["example.org", "intra:8080", "me-demo.hf.space"]
    options = launch.launch_options(launch.parse_args(["--auth", "me:pw"]))
    assert launch.guard_origins(options) == ["example.org", "intra:8080", "me-demo.hf.space"]
    guard_kwargs = options["app_kwargs"]["middleware"][0].kwargs
    assert guard_kwargs["auth"] is True
    assert launch.launch_options(launch.parse_args([]))["app_kwargs"]["middleware"][0].kwargs["auth"] is False


def _address(peer: str, forwarded: str | None, proxies: str) -> str:
    headers = {b"x-forwarded-for": forwarded.encode()} if forwarded is not None else {}
    return client_address({"client": (peer, 1234)}, headers, parse_networks(proxies))


def test_forwarded_for_is_read_only_from_a_trusted_proxy_and_only_its_own_hop():
    local, space = guard.LOCAL_PROXIES, guard.SPACE_PROXIES
    assert _address("203.0.113.7", "198.51.100.1", space) == "203.0.113.7"  # a visitor's own header: ignored
    assert (
        _address("127.0.0.1", "198.51.100.1, 203.0.113.9", local) == "203.0.113.9"
    )  # the hop the tunnel added
    assert _address("::ffff:127.0.0.1", "203.0.113.9", local) == "203.0.113.9"
    assert _address("127.0.0.1", None, local) == "127.0.0.1"
    # 172.16.0.0/12 is private, 172.32.x and 172.15.x are public addresses anyone may hold
    assert _address("172.31.255.254", "203.0.113.9", space) == "203.0.113.9"
    assert _address("172.16.0.1", "203.0.113.9", space) == "203.0.113.9"
    assert _address("172.32.0.1", "203.0.113.9", space) == "172.32.0.1"
    assert _address("172.15.255.255", "203.0.113.9", space) == "172.15.255.255"
    assert _address("10.1.2.3", "203.0.113.9", local) == "10.1.2.3"  # a LAN peer is not a proxy off a Space
    # a chain of trusted proxies is walked back to the first address none of them is: the visitor
    assert _address("10.0.0.1", "6.6.6.6, 203.0.113.9, 10.0.0.2", space) == "203.0.113.9"
    assert _address("10.0.0.1", "10.0.0.9", space) == "10.0.0.9"  # all trusted: the earliest known
    assert _address("127.0.0.1", "6.6.6.6, not-an-ip", local) == "127.0.0.1"  # garbled: stop at the proxy
    assert _address("127.0.0.1", "203.0.113.9", "none") == "127.0.0.1"
    assert _address("198.51.100.4", "203.0.113.9", "198.51.100.0/24") == "203.0.113.9"


def test_the_trusted_proxies_follow_the_environment(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("COGVIDEOX_TRUSTED_PROXIES", raising=False)
    peer = {"client": ("10.0.0.1", 1)}, {b"x-forwarded-for": b"203.0.113.9"}
    assert client_address(*peer) == "10.0.0.1"
    monkeypatch.setenv("SPACE_ID", "me/demo")
    assert client_address(*peer) == "203.0.113.9"
    monkeypatch.setenv("COGVIDEOX_TRUSTED_PROXIES", "none")
    assert client_address(*peer) == "10.0.0.1"
    monkeypatch.setenv("COGVIDEOX_TRUSTED_PROXIES", "10.0.0.0/33")
    with pytest.raises(SystemExit):  # the operator's typo: one line at start, not a silent default
        launch.parse_args([])


@pytest.fixture(scope="module")
def ffmpeg_app(tmp_path_factory):
    """The app with a password, on a PATH holding an `ffmpeg` (as on Spaces' images) that leaves a mark when run."""
    tmp = tmp_path_factory.mktemp("routes")
    bin_dir, mark = tmp / "bin", tmp / "ffmpeg-ran"
    bin_dir.mkdir()
    wrapper = bin_dir / "ffmpeg"
    wrapper.write_text(f'#!/bin/sh\ntouch "{mark}"\nexec "{imageio_ffmpeg.get_ffmpeg_exe()}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SPACE_HOST": "me-demo.hf.space"}
    proc, url, _ = start_app(tmp, "--auth", "ann:pw-4-ann", env=env)
    try:
        yield url, mark, tmp
    finally:
        stop(proc)


def _tiny_mp4(path: Path) -> bytes:
    # two frames 600 s apart: what made Gradio's recorder helper start an 18,000-frame encode
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "color=red:s=64x64:r=1",
            "-frames:v",
            "2",
            "-vf",
            "setpts=N*600/TB",
            "-c:v",
            "libx264",
            "-y",
            str(path),
        ],
        check=True,
    )
    return path.read_bytes()


def test_the_recorder_helper_never_starts_ffmpeg_and_the_page_still_works(ffmpeg_app):
    url, mark, tmp = ffmpeg_app
    video = _tiny_mp4(tmp / "two.mp4")
    assert len(video) < 8000
    with httpx.Client(base_url=url, timeout=30) as http:
        login = http.post(
            "login", data={"username": "ann", "password": "pw-4-ann"}, headers={"origin": url[:-1]}
        )
        assert login.status_code == 200 and http.cookies
        form = {"remove_segment_start": "100000", "remove_segment_end": "100001"}
        r = http.post(
            "gradio_api/process_recording", files={"video": ("r.mp4", video, "video/mp4")}, data=form
        )
        assert r.status_code == 404
        assert not mark.exists()  # refused before Gradio: no encoder ever ran
        for path in ("gradio_api/vibe-code", "gradio_api/openapi.json", "monitoring", "gradio_api/user"):
            assert http.get(path).status_code == 404, path
        assert http.get("config").status_code == 200 and http.get("gradio_api/info").status_code == 200
        # the visitor's cookie, sent by another site's page: refused; the same upload from the app's page is taken
        upload = {"files": ("a.mp4", video, "video/mp4")}
        assert (
            http.post(
                "gradio_api/upload", files=upload, headers={"origin": "https://evil.example"}
            ).status_code
            == 403
        )
        assert http.post("gradio_api/upload", files=upload, headers={"origin": url[:-1]}).status_code == 200
        assert (
            http.post(
                "gradio_api/upload", files=upload, headers={"origin": "https://me-demo.hf.space"}
            ).status_code
            == 200
        )
    with httpx.Client(base_url=url, timeout=30) as http:  # a login posted by another site: no cookie set
        evil = http.post(
            "login",
            data={"username": "ann", "password": "pw-4-ann"},
            headers={"origin": "https://evil.example"},
        )
        assert evil.status_code == 403 and not http.cookies
