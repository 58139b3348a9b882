"""The app's start-up: its pipelines (one, one per device, or one per torchrun process), the prompt enhancer, the
server's launch and the lines the log shows once the page is up. app.py's `main` puts these together."""

from __future__ import annotations

import argparse
import sys
import time
from urllib.parse import urlsplit

import gradio as gr
from gradio.tunneling import CURRENT_TUNNELS

from cogvideox.enhance import PromptEnhancer
from cogvideox.pipeline import CogVideoXPipeline
from webapp import ZERO_GPU, loras
from webapp.events import pipelines
from webapp.jobs import display_name
from webapp.launch import guard_origins, launch_options

TINY_NOTICE = (
    "🎲 **tiny-random**: a tiny model with **random weights**. Its videos are noise; "
    "it is here to try the whole flow offline."
)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def open_pipeline(args: argparse.Namespace, device=None) -> tuple[CogVideoXPipeline, str]:
    """As `load_pipeline`, but raising whatever stops the model from opening."""
    model, notice = args.model, ""
    memory_mode, compile = args.memory_mode, args.compile
    if ZERO_GPU:
        if (memory_mode or "resident") != "resident" or compile:
            print("ZeroGPU: --memory-mode resident, without --compile")
        memory_mode, compile = "resident", False
    if (
        model == "tiny-random"
    ):  # from_pretrained writes it once (atomically) in the temp dir, outside the outputs
        notice = TINY_NOTICE
    pipe = CogVideoXPipeline.from_pretrained(
        model,
        device=device or args.device,
        dtype=args.dtype,
        memory_mode=memory_mode,
        compile=compile,
        quantize=getattr(args, "quantize", None),
    )
    # The operator's LoRAs, on every pipeline (and every torchrun process) alike; a bad file stops the start-up.
    loras.load_offered(pipe, getattr(args, "lora_files", []))
    if ZERO_GPU:
        pipe.load()
    return pipe, notice


def load_pipeline(args: argparse.Namespace, device=None) -> tuple[CogVideoXPipeline | None, str]:
    """The pipeline (configs and tokenizer only) on `device` (default: --device) and a notice for the page; (None,
    why) when unavailable.

    On ZeroGPU the weights load now, in the main thread: there spaces records `.to("cuda")` (torch's CUDA is
    emulated in that thread alone) and moves the weights into its GPU worker at each job. All of them stay on
    the device (no streams or pinned memory, which need a real GPU in this process), and nothing is compiled.
    """
    try:
        return open_pipeline(args, device)
    except Exception as e:  # offline, no such repo, a broken folder: the page must still come up and say so
        # The why and what to do, for the operator; the page names the model only (no path, no setup).
        print(
            f"error: the model {args.model} is unavailable: {e}\n  check the path or your Hub access, or run "
            "`python app.py --model tiny-random` to try the app offline",
            file=sys.stderr,
            flush=True,
        )
        return None, (
            f"⚠️ **The model {display_name(str(args.model))} is unavailable on this server**: the page works but "
            "cannot make videos."
        )


def load_pipelines(args: argparse.Namespace, devices: list) -> tuple[list[CogVideoXPipeline], str]:
    """A pipeline per device, all alike (model, dtype, memory mode, compile), and the page's notice; ([], why) when
    unavailable. A memory mode left to pick is picked per device, from its own free memory, as each loads."""
    if args.compile and len(devices) > 1:  # the blocks' code object: a graph per batch size and device
        import torch

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(devices))
    pipes = []
    for device in devices:
        pipe, notice = load_pipeline(args, device)
        if pipe is None:
            return [], notice
        pipes.append(pipe)
    return pipes, notice


def prompt_enhancer(pipe: CogVideoXPipeline | None) -> PromptEnhancer | None:
    """The enhancer the environment configures (none without a model to count its tokens)."""
    if pipe is None:
        return None
    try:
        # On ZeroGPU, CUDA exists only inside a spaces.GPU function, yet torch.cuda.is_available() is true in every
        # thread of the main process: a local model there would reach CUDA's init from an enhance request.
        device = "cpu" if ZERO_GPU else None
        return PromptEnhancer.from_env(lambda text: pipe.count_tokens(text).n_tokens, local_device=device)
    except ValueError as e:
        print(f"prompt enhancer disabled: {e}")
        return None


def start_server(demo: gr.Blocks, args: argparse.Namespace, theme) -> None:
    """Start the server without blocking; a port it cannot have is one line and exit 1."""
    # Gradio's own banner is off (quiet): it recommends `share=True` in code and GRADIO_SERVER_PORT, where this
    # app has --share --auth-file and --port. Our lines follow once the server is up.
    options = launch_options(args, theme)
    try:
        demo.launch(**options, quiet=True, prevent_thread_lock=True)
    except OSError:  # Gradio's "Cannot find empty port" (a busy port, or an address this machine lacks)
        raise SystemExit(
            f"error: cannot listen on {args.host}:{args.port}: the port is in use (or the address is not this "
            f"machine's); choose another with --port, e.g. --port {args.port + 1}"
        ) from None
    if demo.share_url:  # the link's pages post to this app with their own origin
        guard_origins(options).append(urlsplit(demo.share_url).netloc.lower())


def serve_until_stopped(demo: gr.Blocks) -> None:
    """Serve until Ctrl-C, then close. As Gradio's block_thread, but closing as demo.close() does: the open tabs'
    heartbeat streams end first, so the server stops at once rather than after waiting 5 s for them."""
    try:
        while demo.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("Ctrl-C: closing the server", flush=True)
    finally:
        demo.close(verbose=False)
        for tunnel in CURRENT_TUNNELS:  # a --share link
            tunnel.kill()


def startup_lines(args: argparse.Namespace, pipe, demo: gr.Blocks, parallel=None) -> list[str]:
    """What the server log says once the page is up: where, which model, and how to share it safely. `pipe`: one
    pipeline, a list of them (one per device) or None; `parallel`: the ranks.Session of --parallel."""
    lines, pipes = [f"CogVideoX demo: {demo.local_url}"], pipelines(pipe)
    if not pipes:
        lines.append(f"  model {args.model}: unavailable (the page says why); it cannot render")
    else:
        pipe = pipes[0]
        mode = pipe.offloader.mode
        mode = "picked from free memory at the first generation" if mode == "auto" else mode
        dtype = str(pipe.dtype).removeprefix("torch.")
        where = (
            f"{pipe.device.type}, {dtype}"
            if len(pipes) == 1
            else (f"{', '.join(str(p.device) for p in pipes)}: a job on each at once; {dtype}")
        )
        if parallel is not None:
            where = f"{parallel.describe(pipe.device)}, {dtype}"
        lines.append(f"  model: {args.model} ({where}); memory mode: {mode}")
        if offered := loras.names(pipe):
            lines.append(f"  LoRAs offered on the page ({len(offered)}): {', '.join(offered)}")
    users = len(args.auth or [])
    login = (
        f"login required ({users} user{'s' * (users > 1)})"
        if users
        else "no login: anyone who reaches it can use it"
    )
    if demo.share_url:
        lines.append(f"  public link: {demo.share_url}, {login}")
    elif args.host in LOCAL_HOSTS:
        lines.append(
            "  only this machine can open it. To share it: --share --auth-file users.txt "
            "(one user:password per line)"
        )
    else:
        lines.append(f"  open to the network on {args.host}:{args.port}, {login}")
    if not users and (demo.share_url or args.host not in LOCAL_HOSTS):
        lines.append("  to require a login: --auth-file users.txt (one user:password per line)")
    return lines
