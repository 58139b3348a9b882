"""HTTP guard for the public app: an ASGI middleware in front of every Gradio route.

What Gradio leaves open and a public Space or share link must not (issue 11):
- the upload route: only videos and images, by name as Gradio will store them, in multipart bodies up to their own
  cap (every part's headers are read as the body streams past, with Gradio's own parser); the files are then
  served as media or downloads, never as pages (below), and deleted after UPLOAD_TTL_S (uploads.py);
- request bodies of any size: capped (declared or streamed);
- content sniffing: every response says `nosniff`;
- password guessing: after a few failed logins from one address, that address must wait, longer each time.

And what issue 19 found open:
- routes the page does not use (Gradio's screen-recorder helper re-encodes whatever it is sent with ffmpeg, its
  editor and proxy routes, ...): only the routes in `ROUTES` reach Gradio, every other one is a 404 here;
- other sites: with a password on, a request another site's page sends with the visitor's cookie (a form post,
  a credentialed fetch) is refused: Gradio's CORS lets any origin read a public app's answers;
- forged proxy headers: X-Forwarded-For is read only from a trusted proxy, and only the hop it appended.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from gradio_client.utils import strip_invalid_filename_characters
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

UPLOAD_PATHS = ("/upload", "/gradio_api/upload")
# What a file route may show in the page (our clips, their previews, a visitor's own video or image); anything else
# downloads.
INLINE_TYPES = (b"video/mp4", b"video/webm", b"image/gif", b"image/png", b"image/jpeg", b"image/webp")
# The names an upload may have: videos and images, none of which a browser renders as a page.
UPLOAD_SUFFIXES = (
    ".mp4",
    ".m4v",
    ".mov",
    ".webm",
    ".mkv",
    ".avi",
    ".gif",
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
)
LOGIN_PATHS = ("/login", "/login/")

# The routes the page and the documented API use (recorded from Chromium and gradio_client through a whole visit:
# load, generate, upload, cancel, gallery, API page, login), as (methods, path pattern). Anything else Gradio
# serves (process_recording, vibe-*, component_server, proxy=, stream/*, custom_component, monitoring, openapi,
# file/, api/, run/<name>, token, user, deep_link, ...) is refused before Gradio sees it.
_READ, _WRITE = ("GET", "HEAD"), ("POST",)
ROUTES = [(methods, re.compile(pattern)) for methods, pattern in (
    (_READ, r"/|/config/?|/(gradio_api/)?theme\.css|/favicon\.ico|/robots\.txt|/logout"),
    (_READ, r"/(assets|static)/.+"),  # the page's own scripts, styles and fonts
    (_READ, r"/gradio_api/(info/?|queue/data|upload_progress|startup-events|heartbeat/[^/]+)"),
    (_READ, r"/gradio_api/file=.+"),  # our clips and a visitor's own uploads (Gradio checks the folder)
    (_READ, r"/gradio_api/call/[\w-]+/[\w-]+"),  # the API page's curl: the result of a call
    (_WRITE, r"/login/?|/gradio_api/(queue/join|cancel|reset/?|run/predict|upload)"),
    (_WRITE, r"/gradio_api/call/(v2/)?[\w-]+/?"),  # the API page's curl: a call
)]  # fmt: skip

# Peers whose X-Forwarded-For is believed: this machine (a share link's tunnel, a local reverse proxy), and on a
# Hugging Face Space its front end, which reaches the app from a private address. COGVIDEOX_TRUSTED_PROXIES (addresses
# or networks, comma-separated) replaces the list; "none" trusts no one.
LOCAL_PROXIES = "127.0.0.0/8,::1"
SPACE_PROXIES = LOCAL_PROXIES + ",10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"


def allowed_route(method: str, path: str) -> bool:
    return any(method in methods and pattern.fullmatch(path) for methods, pattern in ROUTES)


@functools.lru_cache(maxsize=8)
def parse_networks(text: str) -> tuple:
    """`10.0.0.0/8,127.0.0.1,...` -> networks; "none" or "" -> none; ValueError naming a bad entry."""
    items = [item.strip() for item in text.split(",") if item.strip() and item.strip().lower() != "none"]
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)
    except ValueError as e:
        raise ValueError(f"COGVIDEOX_TRUSTED_PROXIES: {e}") from None


def trusted_proxies() -> tuple:
    default = SPACE_PROXIES if os.environ.get("SPACE_ID") else LOCAL_PROXIES
    return parse_networks(os.environ.get("COGVIDEOX_TRUSTED_PROXIES", default))


class LoginThrottle:
    """Failed logins per client address: after `free` failures each further attempt waits 2^k seconds
    (capped at `max_wait_s`) from the last failure. A success clears the address."""

    def __init__(
        self, free: int = 3, max_wait_s: float = 60.0, clock=time.monotonic, max_clients: int = 10_000
    ):
        self.free, self.max_wait_s, self.clock, self.max_clients = free, max_wait_s, clock, max_clients
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (count, time of the last failure)

    def wait_s(self, address: str) -> float:
        """Seconds this address must still wait before its next attempt (0: go ahead)."""
        count, last = self._failures.get(address, (0, 0.0))
        if count < self.free:
            return 0.0
        return max(0.0, last + min(self.max_wait_s, 2.0 ** (count - self.free)) - self.clock())

    def record(self, address: str, success: bool) -> None:
        if success:
            self._failures.pop(address, None)
            return
        if len(self._failures) >= self.max_clients:  # bounded memory under a spray of addresses
            self._failures.pop(next(iter(self._failures)))
        count, _ = self._failures.pop(address, (0, 0.0))
        self._failures[address] = (count + 1, self.clock())


class UploadCheck:
    """Reads a multipart upload as it streams past, before Gradio does and with the parser Gradio uses
    (python-multipart, same header limits), so both see the same parts: each file must be named as a video or an
    image once Gradio has cleaned the name (the name it stores and serves it under). `problem` says why not."""

    def __init__(self, content_type: bytes):
        kind, params = parse_options_header(content_type)
        charset = params.get(b"charset", b"utf-8")
        self.charset = charset.decode("latin-1") if isinstance(charset, bytes) else charset
        self.problem, self._field, self._value, self._disposition = None, b"", b"", b""
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            self.problem = "Uploads must be multipart/form-data."
            return
        callbacks = {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        }
        self._parser = MultipartParser(params[b"boundary"], callbacks)

    def feed(self, chunk: bytes) -> str | None:
        """Parse the next piece of the body; the problem, once there is one."""
        if self.problem is None and chunk:
            try:
                self._parser.write(chunk)
            except MultipartParseError as e:  # Gradio's parser would refuse it too
                self.problem = f"Malformed upload: {e}"
        return self.problem

    def _begin(self):
        self._disposition = b""

    def _header_field(self, data, start, end):
        self._field += data[start:end]

    def _header_value(self, data, start, end):
        self._value += data[start:end]

    def _header_end(self):
        if self._field.lower() == b"content-disposition":
            self._disposition = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self):
        _, options = parse_options_header(self._disposition)
        if (
            b"filename" not in options
        ):  # a form field: Gradio keeps it in memory (within the cap), stores nothing
            return
        try:
            name = options[b"filename"].decode(self.charset)
        except (UnicodeDecodeError, LookupError):
            name = options[b"filename"].decode("latin-1")
        stored = strip_invalid_filename_characters(Path(name).name) if name else ""
        if Path(stored).suffix.lower() not in UPLOAD_SUFFIXES:
            self.problem = f"Only videos and images can be uploaded ({', '.join(UPLOAD_SUFFIXES)})."


class Guard:
    """ASGI middleware; pass as `app_kwargs={"middleware": [Middleware(Guard, ...)]}` to `launch()`.

    `max_upload_bytes`: the cap of an upload's body (0: the upload routes are closed); every other request's body
    is capped at `max_body_bytes`."""

    def __init__(
        self,
        app,
        max_body_bytes: int = 1 << 20,
        throttle: LoginThrottle | None = None,
        max_upload_bytes: int = 0,
        auth: bool = False,
        origins: list[str] | None = None,
    ):
        """`auth`: a password protects the app, so requests from other sites are refused; `origins`: the hosts
        (`host[:port]`) other than the request's own whose pages may use the app (a Space's, a share link's; the
        list may grow after start-up)."""
        self.app, self.max_body_bytes, self.max_upload_bytes = app, max_body_bytes, max_upload_bytes
        self.throttle = throttle or LoginThrottle()
        self.auth, self.origins = auth, origins if origins is not None else []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        root = scope.get("root_path", "")
        path = path[len(root) :] or "/" if root and path.startswith(root) else path
        headers = dict(scope.get("headers") or [])
        refusal, upload = self._before_reading(scope, path, method, headers)
        if refusal:
            return await _refuse(send, *refusal)
        cap = self.max_upload_bytes if upload else self.max_body_bytes
        login = method == "POST" and path.endswith(LOGIN_PATHS)
        address = client_address(scope, headers)
        if login and (wait := self.throttle.wait_s(address)) > 0:
            return await _refuse(send, 429, f"Too many failed logins: try again in {wait:.0f} s.", wait)

        received, too_big, refused, status = 0, False, None, 0
        file_route = "/file=" in path or "/file/" in path

        async def capped_receive():
            nonlocal received, too_big, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:  # a chunked body that never declared its length
                    too_big = True
                    return {"type": "http.disconnect"}
                # A part that is not a video or an image: the app never sees its bytes (nor any that follow).
                if upload and (refused := upload.feed(message.get("body", b""))):
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": _safe_headers(message.get("headers", []), file_route)}
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except Exception:
            if not (too_big or refused) or status:
                raise
        if too_big and not status:
            await _refuse(send, 413, f"Request body over {cap} bytes.")
        elif refused and not status:
            await _refuse(send, 403, refused)
        if login and status:
            self.throttle.record(address, success=status == 200)

    def _before_reading(
        self, scope, path: str, method: str, headers: dict
    ) -> tuple[tuple | None, UploadCheck | None]:
        """What can be refused from the request line and headers alone: (status, message) or None, and the upload
        check of an upload route."""
        if not allowed_route(method, path):
            return (404, "Not Found"), None
        if self.auth and other_site(method, headers, self._own_hosts(scope, headers)):
            return (403, "Requests from other sites are refused: open the app's own page."), None
        upload = None
        if method == "POST" and path.rstrip("/").endswith(UPLOAD_PATHS):
            if not self.max_upload_bytes:
                return (403, "This app takes no uploads."), None
            if path.endswith("/"):  # the app would redirect it, unread, to the route itself
                return (404, "Not Found"), None
            upload = UploadCheck(headers.get(b"content-type", b""))
            if upload.problem:
                return (415, upload.problem), None
        cap = self.max_upload_bytes if upload else self.max_body_bytes
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > cap:
            return (413, f"Request body over {cap} bytes."), None
        return None, upload

    def _own_hosts(self, scope, headers: dict[bytes, bytes]) -> set[str]:
        hosts = {headers.get(b"host", b"").decode("latin-1").lower(), *(o.lower() for o in self.origins)}
        if _trusted((scope.get("client") or ("",))[0], trusted_proxies()):  # the host the visitor typed
            hosts.update(
                h.strip().lower() for h in headers.get(b"x-forwarded-host", b"").decode("latin-1").split(",")
            )
        return hosts - {""}


def other_site(method: str, headers: dict[bytes, bytes], own_hosts: set[str]) -> bool:
    """A request another site's page made: its Origin (sent with every form post and every cross-origin fetch) is
    not one of ours, or, where a browser sent no Origin, Sec-Fetch-Site says so for a request that changes state.
    Navigation (a link followed from a mail) and media elements are GETs without an Origin: let through."""
    origin = headers.get(b"origin")
    if origin is not None:  # "null" (a sandboxed frame, a local file) has no host: refused
        return urlsplit(origin.decode("latin-1")).netloc.lower() not in own_hosts
    return method not in _READ and headers.get(b"sec-fetch-site", b"").lower() in (
        b"cross-site",
        b"same-site",
    )


def _safe_headers(headers: list, file_route: bool) -> list:
    """`nosniff` on everything; a served file that is not a clip or an image is a download, never a page."""
    headers = [(k, v) for k, v in headers if k.lower() != b"x-content-type-options"]
    headers.append((b"x-content-type-options", b"nosniff"))
    if not file_route:
        return headers
    content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"").split(b";")[0].strip()
    if content_type.lower() in INLINE_TYPES:
        return headers
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-disposition")]
    return [*kept, (b"content-type", b"application/octet-stream"), (b"content-disposition", b"attachment")]


def client_address(scope, headers: dict[bytes, bytes], proxies: tuple | None = None) -> str:
    """The visitor's address: the peer; or, where the peer is a trusted proxy, the X-Forwarded-For hop it appended
    (walking back through proxies that are trusted too). Entries before that are the client's to invent."""
    proxies = trusted_proxies() if proxies is None else proxies
    address = (scope.get("client") or ("unknown", 0))[0]
    hops = [hop.strip() for hop in headers.get(b"x-forwarded-for", b"").decode("latin-1").split(",")]
    while hops and _trusted(address, proxies):
        hop = hops.pop()
        if _ip(hop) is None:  # garbled: the proxy itself is the last address known
            break
        address = hop
    return address


def _ip(text: str):
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def _trusted(address: str, proxies: tuple) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip.version == net.version and ip in net for net in proxies)


async def _refuse(send, status: int, message: str, retry_after: float = 0) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"),
    ]
    if retry_after:
        headers.append((b"retry-after", str(int(retry_after + 0.999)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
