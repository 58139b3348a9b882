"""How the app is started: command line and environment, passwords, and the hardened `launch()` options."""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path

from starlette.middleware import Middleware

from webapp import fairness, loras, uploads
from webapp.guard import Guard, parse_networks

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MAX_REQUEST_BYTES = int(os.environ.get("MAX_REQUEST_BYTES", 256 * 1024))  # a job's JSON is ~5 kB at most


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_auth(text: str, source: str) -> list[tuple[str, str]]:
    """`user:password[,user:password...]` (or one pair per line) -> pairs; ValueError saying what is wrong.

    Blank or malformed credentials never mean "no password": the caller asked for one."""
    items = [item.strip() for line in text.splitlines() for item in line.split(",")]
    items = [item for item in items if item and not item.startswith("#")]
    if not items:
        raise ValueError(f"{source} is empty: give user:password, or leave it unset for no password")
    pairs = []
    for item in items:
        name, colon, password = item.partition(":")
        if not colon or not name.strip() or not password.strip():
            raise ValueError(f"{source} must hold user:password pairs (several separated by commas)")
        # Gradio trims the name typed at login. Both halves are trimmed ("bob : pw", a file's "\r"), so a
        # password cannot begin or end with a space; inside it, any character counts.
        pairs.append((name.strip(), password.strip()))
    if len({name for name, _ in pairs}) != len(pairs):
        raise ValueError(f"{source} names a user twice")
    return pairs


def _parser() -> argparse.ArgumentParser:
    """The app's options, each defaulting to its environment variable."""
    env = os.environ.get
    p = argparse.ArgumentParser(description="CogVideoX text-to-video demo. Each option has an env variable.")
    p.add_argument(
        "--model",
        default=env("COGVIDEOX_MODEL", "THUDM/CogVideoX-2b"),
        help="checkpoint folder or Hub repo id; tiny-random: random weights, offline",
    )
    p.add_argument("--host", default=env("COGVIDEOX_HOST", "0.0.0.0" if env("SPACE_ID") else "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("COGVIDEOX_PORT", 7860)))
    p.add_argument("--share", action="store_true", default=_flag("COGVIDEOX_SHARE"), help="public link")
    p.add_argument(
        "--auth",
        default=env("COGVIDEOX_AUTH"),
        help="user:password[,user:password...]; visible to other local users in `ps`: prefer "
        "COGVIDEOX_AUTH or --auth-file",
    )
    p.add_argument(
        "--auth-file",
        type=Path,
        default=env("COGVIDEOX_AUTH_FILE"),
        help="a file of user:password lines (# comments allowed)",
    )
    p.add_argument(
        "--insecure-share",
        action="store_true",
        default=_flag("COGVIDEOX_INSECURE_SHARE"),
        help="allow --share without --auth: anyone with the link can use your GPU",
    )
    p.add_argument(
        "--memory-mode", default=env("COGVIDEOX_MEMORY_MODE"), help="resident, model or sequential"
    )
    p.add_argument(
        "--dtype", default=env("COGVIDEOX_DTYPE"), help="fp16, bf16 or fp32 (default: the model's)"
    )
    p.add_argument("--device", default=env("COGVIDEOX_DEVICE"), help="default: cuda if available")
    p.add_argument(
        "--devices",
        default=env("COGVIDEOX_DEVICES"),
        help="cuda:0,cuda:1,... or all: a pipeline per GPU, a job on each at once",
    )
    p.add_argument(
        "--parallel",
        default=env("COGVIDEOX_PARALLEL"),
        help="cfg, sp or cfg,sp, under torchrun (torchrun --nproc-per-node N app.py --parallel cfg,sp): "
        "each clip denoised by all N processes, one GPU each; rank 0 serves the page",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=_flag("COGVIDEOX_COMPILE"),
        help="torch.compile the transformer blocks: a slower first video, faster after",
    )
    p.add_argument(
        "--quantize",
        default=env("COGVIDEOX_QUANTIZE"),
        help="int8 or fp8: the transformer's and T5's Linear weights in 8 bits (int8 needs torchao)",
    )
    p.add_argument(
        "--lora-dir",
        type=Path,
        default=env("COGVIDEOX_LORA_DIR"),
        help="a folder of LoRA .safetensors files, each offered on the page by its file name (loaded at start-up)",
    )
    p.add_argument("--output-dir", type=Path, default=Path(env("COGVIDEOX_OUTPUT_DIR", "outputs")))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked: a wrong value, a bad password list or limit is one line and exit 2."""
    p = _parser()
    args = p.parse_args(argv)
    for name, choices in (
        ("memory_mode", ("resident", "model", "sequential")),
        ("dtype", ("fp16", "bf16", "fp32")),
        ("quantize", ("int8", "fp8")),
        ("parallel", ("cfg", "sp", "cfg,sp")),
    ):
        if getattr(args, name) not in (None, *choices):
            p.error(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}")
    try:
        args.auth = _credentials(args)
        # A typo in these is the operator's: said now, in one line.
        parse_networks(os.environ.get("COGVIDEOX_TRUSTED_PROXIES", ""))
        fairness.settings()
        args.lora_files = [] if args.lora_dir is None else loras.offered_files(args.lora_dir)
    except ValueError as e:
        p.error(str(e))
    if args.share and not args.auth and not args.insecure_share:
        p.error(
            "--share makes the app public: give --auth-file (or --auth) user:password, or --insecure-share"
        )
    return args


def _credentials(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    if args.auth is not None and args.auth_file is not None:
        raise ValueError("give --auth or --auth-file, not both")
    if args.auth_file is not None:
        try:
            text = Path(args.auth_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --auth-file {args.auth_file}: {e}") from None
        return parse_auth(text, f"--auth-file {args.auth_file}")
    if args.auth is not None:  # set, even to "" (a blank COGVIDEOX_AUTH): a password was asked for
        return parse_auth(args.auth, "--auth / COGVIDEOX_AUTH")
    return None


def gradio_cache_dir(output_dir: Path) -> Path:
    """Where Gradio keeps its copies (GRADIO_TEMP_DIR): outside the served output folder, so nothing stored
    there is ever served as a file of ours (inline, with its own content type)."""
    digest = hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"cogvideox-gradio-{digest}"


def page_origins() -> list[str]:
    """Hosts besides the request's own whose pages may post to a password-protected app: the Space's own host
    (SPACE_HOST, set by Hugging Face) and COGVIDEOX_ALLOWED_ORIGINS (`https://example.org,...`). A --share link's
    host is added once the link exists (serve.start_server)."""
    extra = [*os.environ.get("COGVIDEOX_ALLOWED_ORIGINS", "").split(","), os.environ.get("SPACE_HOST", "")]
    return [item.strip().split("://")[-1].rstrip("/").lower() for item in extra if item.strip()]


def guard_origins(options: dict) -> list[str]:
    """The live list of other hosts the guard in `options` (launch_options' result) accepts."""
    return next(m.kwargs["origins"] for m in options["app_kwargs"]["middleware"] if m.cls is Guard)


def launch_options(args: argparse.Namespace, theme=None) -> dict:
    """demo.launch() keyword arguments: the hardened defaults plus what the command line asked for."""
    cap = uploads.MAX_UPLOAD_BYTES
    upload_body = cap and cap + (64 << 10)  # a file and its multipart headers
    caps = dict(max_body_bytes=MAX_REQUEST_BYTES, max_upload_bytes=upload_body)
    caps.update(auth=bool(args.auth), origins=page_origins())
    fair = fairness.settings()  # a fair share of the queue and of memory per visitor (issue 19)
    sessions = fair.pop("max_sessions")
    return dict(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=args.auth,
        auth_message="This CogVideoX demo is private: log in to use it.",
        allowed_paths=[str(args.output_dir.resolve())],  # our clips only; Gradio's uploads live elsewhere
        # A video or an image to start from (guard.py lets only those through, within the cap; uploads.py deletes
        # them after UPLOAD_TTL_S); 0 closes the upload route. Gradio's own cap is the file's, the guard's the body's.
        max_file_size=max(1, cap),
        app_kwargs={
            "middleware": [Middleware(Guard, **caps), Middleware(fairness.Fairness, **fair)],
            "lifespan": uploads.cleaner,
        },
        state_session_capacity=sessions,
        enable_monitoring=False,
        ssr_mode=False,
        run_history=False,  # prompts stay out of the browser's saved history
        footer_links=["api", "gradio", "settings"],
        theme=theme,
        css_paths=[ASSETS / "style.css"],
        favicon_path=ASSETS / "logo.svg",
    )
