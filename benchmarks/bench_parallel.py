"""Parallel denoising (cogvideox/parallel.py): per-step time and bytes exchanged per step vs one process.

Measured part (CPU, gloo, loopback): each layout `CFGxSP` runs in its own group of spawned processes on a random
checkpoint (`--size tiny`: cogvideox.testing's model with 6 heads, so 2 and 3 divide them; `small`: the CPU
benchmark model of benchmarks/random_checkpoint.py, 8 heads); rank 0's video is compared with one process's.
The bytes are counted by the exchanges themselves (what each rank sends to the others) and checked against the
formula below, which then gives the released models' traffic. On a 2-core machine the processes share the
cores, so the CPU timings say nothing about GPUs; they only show the runs work and what gloo adds.

Computed part (no run): bytes per step per rank for CogVideoX-2B / -5B at 49 x 480 x 720 (17,550 video + 226 text
tokens) and what they take at nominal link bandwidths, against an assumed compute time per step.

    python -m benchmarks.bench_parallel --size small --layouts 1x1,2x1,1x2,2x2 --steps 4 --out parallel.json

With --device cuda each process takes a GPU: the default layouts shrink to those the GPUs hold (a note says which
were left out), a layout named in --layouts that needs more GPUs is an error before any process starts. --out is
written after each layout, so one that crashes keeps the figures before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, markdown_table, source_digest, write_report
from cogvideox.config import PRESETS, TransformerConfig, VAEConfig
from cogvideox.parallel import split_sizes, video_tokens
from cogvideox.quantize import is_quantized

PROMPT = "A detailed wooden toy ship with carved masts glides over a plush blue carpet that mimics the sea"
SIZES = {
    "tiny": (17, 80, 112),
    "small": (9, 128, 192),
    "full": (49, 480, 720),  # the released 2B's shapes with random weights, for --device cuda
}  # frames, height, width; tiny: 175 tokens, 2 and 3 uneven
# Nominal per-direction bandwidth of one GPU's link (real all-to-alls reach less: these are lower bounds on time).
LINKS = {"NVLink 4 (H100 SXM)": 450e9, "PCIe 5.0 x16": 64e9, "PCIe 4.0 x16": 32e9}
PEAK_FLOPS, UTILISATION = 989e12, 0.4  # H100 SXM dense FP16/BF16, and an assumed fraction of it reached
RELEASED = {  # model -> (bytes per element, layouts whose sp divides the heads: 30 for 2B, 48 for 5B)
    "2b": (2, [(2, 1), (1, 2), (2, 2), (1, 3), (2, 3), (2, 5)]),
    "5b": (2, [(2, 1), (1, 2), (2, 2), (2, 4), (1, 8), (2, 8)]),
}


def bytes_per_step(
    config: TransformerConfig,
    vae: VAEConfig,
    layout: tuple[int, int],
    size: tuple[int, int, int],
    element: int,
    rank: int = 0,
    cfg_on: bool = True,
) -> dict[str, int]:
    """Bytes `rank` sends per step, by exchange, as cogvideox/parallel.py sends them (a step the step cache skips
    sends the head's all-gather and CFG's, not the all-to-alls).

    Per layer (sp = P > 1, b rows per rank, D = heads·head_dim, n_r own video tokens of N, L text tokens): the q/k/v
    all-to-all sends 3·b·n_r·D·(P-1)/P, the output all-to-all b·(D/P)·((P-1)·L + N - n_r); per step the head's
    all-gather sends (P-1)·b·max(n)·D, and CFG parallel the prediction (F·C·h·w) once."""
    cfg, sp = layout
    frames, height, width = size
    n = video_tokens(config, vae, frames, height, width)
    sizes, text, dim = split_sizes(n, sp), config.max_text_seq_length, config.inner_dim
    b = (2 if cfg_on else 1) // cfg
    own = sizes[rank % sp]
    out = {"all_to_all": 0, "gather": 0, "cfg": 0}
    if sp > 1:
        per_layer = 3 * b * own * (dim // sp) * (sp - 1) + b * (dim // sp) * ((sp - 1) * text + n - own)
        out["all_to_all"] = config.num_layers * per_layer * element
        out["gather"] = (sp - 1) * b * max(sizes) * dim * element
    if cfg > 1:
        s = vae.spatial_compression
        latent_frames = (frames - 1) // int(vae.temporal_compression_ratio) + 1
        latent_frames += -latent_frames % config.temporal_patch  # CogVideoX 1.5: the padding travels too
        out["cfg"] = latent_frames * config.out_channels * (height // s) * (width // s) * element
    out["total"] = sum(out.values())
    return out


def released_table() -> tuple[str, list[dict]]:
    """The computed figures for the released models at 49 x 480 x 720 (no run)."""
    from benchmarks.bench_pipeline import transformer_flops

    size, rows, records = (49, 480, 720), [], []
    for name, (element, layouts) in RELEASED.items():
        config, vae = PRESETS[name]["transformer"], PRESETS[name]["vae"]
        flops, _ = transformer_flops(config, *size, batch=2)
        for cfg, sp in layouts:
            sent = bytes_per_step(config, vae, (cfg, sp), size, element)
            compute = flops / (cfg * sp) / (PEAK_FLOPS * UTILISATION)
            link_s = {link: sent["total"] / bw for link, bw in LINKS.items()}
            records.append(
                {"model": name, "cfg": cfg, "sp": sp, "bytes": sent, "compute_s": compute, "link_s": link_s}
            )
            rows.append(
                [
                    name.upper(),
                    f"{cfg}x{sp}",
                    cfg * sp,
                    f"{sent['total'] / 1e9:.2f}",
                    f"{sent['cfg'] / 1e6:.1f}",
                    f"{compute:.3f}",
                    *(f"{1e3 * t:.1f} ({t / compute:.0%})" for t in link_s.values()),
                ]
            )
    headers = [
        "model",
        "cfg x sp",
        "GPUs",
        "GB sent/step/rank",
        "of it CFG MB",
        "compute s/step (assumed)",
        *(f"{link} ms (share)" for link in LINKS),
    ]
    return markdown_table(headers, rows), records


# -- the measured part: spawned processes ---------------------------------------------------------------------


def write_checkpoint(path: str | Path, size: str = "tiny", style: str = "2b", heads: int = 6) -> Path:
    """A random checkpoint: `tiny` is cogvideox.testing's model (2B or 5B style) with `heads` heads of 16; `small`
    the CPU benchmark model (benchmarks/random_checkpoint.py, 8 heads, 2B style)."""
    from safetensors.torch import save_file

    from benchmarks.random_checkpoint import write_random_checkpoint
    from cogvideox.testing import tiny_configs, write_tiny_checkpoint
    from cogvideox.transformer import CogVideoXTransformer

    if size in ("small", "full"):  # full: a small T5 (the text encoder is not what is measured)
        return write_random_checkpoint(path, size, small_t5=size == "full")
    scheduler = "CogVideoXDPMScheduler" if style in ("5b", "1.5") else "CogVideoXDDIMScheduler"
    path = write_tiny_checkpoint(path, style=style, scheduler=scheduler)
    config = dataclasses.replace(tiny_configs(style)[0], num_attention_heads=heads)
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in CogVideoXTransformer(config).state_dict().items()}
    if "patch_embed.pos_embedding" in state:  # i2v: a learned table that is not zeros, so its rows matter
        state["patch_embed.pos_embedding"] = torch.randn_like(state["patch_embed.pos_embedding"])
    folder = path / "transformer"
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "num_attention_heads": heads}, indent=2))
    return path


def worker(
    rank: int, world: int, port: int, jobs: list[dict], out: str, threads: int, device: str = "cpu"
) -> None:
    """One rank: torchrun's environment on loopback, gloo, then each job: a `pipe(...)` call with `parallel`, or
    (`"forward": True`) one transformer call through the parallel wrappers against the plain transformer.

    Writes `{out}/{name}.{rank}.json` per job (step times and bytes sent, the forward's difference, or the
    ValueError) and rank 0 the frames."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    import torch.distributed as dist

    from cogvideox import CogVideoXPipeline
    from cogvideox.parallel import Parallel, init_from_torchrun, load_on_every_rank

    device = init_from_torchrun(device)  # cuda: NCCL, this rank on cuda:rank
    pipes = {}
    try:
        for job in jobs:
            try:
                parallel = Parallel(job["cfg"], job["sp"])
                key = (job["ckpt"], job.get("quantize"))  # quantize: 8-bit weights (None: as stored)
                if key not in pipes:
                    pipes[key] = CogVideoXPipeline.from_pretrained(key[0], device=device, quantize=key[1])
                    load_on_every_rank(pipes[key])  # as the CLI and the app load under torchrun
                use_loras(pipes[key], job.get("loras", []))
                run = forward_check if job.get("forward") else generate
                record = run(pipes[key], parallel, job["call"], Path(out) / f"{job['name']}.npy")
            except ValueError as e:
                record = {"error": str(e)}
            (Path(out) / f"{job['name']}.{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def use_loras(pipe, loras: list) -> None:
    """A job's LoRAs, [file, scale] pairs, each loaded on this rank as every rank does; earlier jobs' go to 0."""
    scales = {}
    for file, scale in loras:
        name = Path(file).stem
        if name not in pipe.loras.loras:
            pipe.load_lora(file, 0.0)
        scales[name] = scale
    if scales or pipe.loras.loras:
        pipe.set_loras(scales)


def generate(pipe, parallel, call: dict, frames_path: Path) -> dict:
    marks = [time.perf_counter()]
    result = pipe(PROMPT, parallel=parallel, callback=lambda *_: marks.append(time.perf_counter()), **call)
    if result.frames is not None:
        np.save(frames_path, result.frames)
    steps = len(marks) - 1
    modules = [*pipe.transformer.modules(), *pipe.text_encoder.modules()]
    linears = [m for m in modules if isinstance(m, torch.nn.Linear)]
    return {
        "step_s": np.diff(marks).tolist(),
        "bytes_sent": parallel.bytes_sent,
        "steps": steps,
        "steps_computed": result.timings.get("steps_computed", steps),
        "bytes_per_step": parallel.bytes_sent / steps,
        "frames": result.frames is not None,
        "seed": result.seed,
        "quantize": result.settings["quantize"],
        "linears_8bit": sum(map(is_quantized, linears)),
        "linears": len(linears),
    }


def forward_check(pipe, parallel, call: dict, frames_path: Path) -> dict:
    """The model call as `denoise` composes it with `parallel`, against the plain transformer, on a CFG batch of
    two different rows (so a swapped row shows) at the call's size: max |difference| and max |output|."""
    pipe.load()
    c, v = pipe.transformer_config, pipe.vae_config
    s, g = v.spatial_compression, torch.Generator().manual_seed(0)
    frames = pipe.latent_shape(call["num_frames"], call["height"], call["width"])[1]  # 1.5: padded
    latents = torch.randn(2, frames, c.in_channels, call["height"] // s, call["width"] // s, generator=g)
    embeds = torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g)
    # Drawn on the CPU (the same numbers anywhere), then where and as the model runs: cuda:rank, FP16 for 2B.
    latents, embeds = (x.to(pipe.device, pipe.dtype) for x in (latents, embeds))
    timestep = torch.tensor([500, 500], device=pipe.device)
    with torch.inference_mode():
        want = pipe.transformer(latents, embeds, timestep).float()
        got = parallel.split_cfg(parallel.shard(pipe.transformer))(latents, embeds, timestep).float()
    return {"max_abs_diff": (got - want).abs().max().item(), "max_abs": want.abs().max().item()}


def launch(
    world: int, jobs: list[dict], out: str | Path, threads: int = 1, device: str = "cpu"
) -> dict[str, list[dict]]:
    """Runs `jobs` on `world` spawned processes (each job's cfg × sp = world); per job, each rank's record.

    The processes fork from a server that has imported the package once (forkserver, preloaded)."""
    import multiprocessing

    import torch.multiprocessing as mp

    from cogvideox.testing import free_port

    # Not this module: when it runs as __main__, each process re-runs it as __mp_main__ and warns if preloaded.
    multiprocessing.set_forkserver_preload(["cogvideox.pipeline", "cogvideox.parallel"])
    mp.start_processes(
        worker,
        args=(world, free_port(), jobs, str(out), threads, device),
        nprocs=world,
        start_method="forkserver",
    )
    return {
        j["name"]: [json.loads((Path(out) / f"{j['name']}.{r}.json").read_text()) for r in range(world)]
        for j in jobs
    }


DEFAULT_LAYOUTS = "1x1,2x1,1x2,2x2"


def layout_list(text: str) -> list[tuple[int, int]]:
    """CFG x SP per run: "1x1,2x1" is [(1, 1), (2, 1)]."""
    try:
        layouts = [tuple(int(x) for x in layout.split("x")) for layout in text.split(",")]
    except ValueError:
        layouts = []
    if not layouts or any(len(pair) != 2 or min(pair) < 1 for pair in layouts):
        raise argparse.ArgumentTypeError(
            f"layouts are CFGxSP, comma-separated (like {DEFAULT_LAYOUTS}), got {text!r}"
        )
    return layouts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="small")
    p.add_argument(
        "--layouts",
        type=layout_list,
        default=None,
        help=f"CFGxSP per run, comma-separated (default {DEFAULT_LAYOUTS}: on CUDA, those the GPUs hold)",
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--ckpt", default=None, help="checkpoint folder: written if missing, reused if present")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: one GPU per process (NCCL), the model's dtype (FP16 for 2B); with --size full",
    )
    p.add_argument("--computed-only", action="store_true", help="print the released models' figures only")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def measure(args, tmp: Path, save: Callable[[list[dict]], None]) -> tuple[str, list[dict]]:
    """Each layout in its own group of processes; `save(records)` after each, so a later layout's crash (or a
    Ctrl-C) keeps what the earlier ones measured."""
    frames, height, width = SIZES[args.size]
    ckpt = Path(args.ckpt) if args.ckpt else tmp / "ckpt"
    if not (ckpt / "model_index.json").is_file():
        write_checkpoint(ckpt, args.size)
    config = TransformerConfig.from_json(ckpt / "transformer" / "config.json")
    vae = VAEConfig.from_json(ckpt / "vae" / "config.json")
    call = dict(num_frames=frames, height=height, width=width, num_inference_steps=args.steps, seed=42)
    element = 4 if args.device == "cpu" else 2  # bytes per exchanged value: fp32 on CPU, FP16 (2B) on CUDA
    rows, records, reference = [], [], None
    # The importable module's launch, not __main__'s: the processes unpickle `worker` by its module's name.
    from benchmarks.bench_parallel import launch

    for cfg, sp in args.layouts:
        name = f"{cfg}x{sp}"
        job = {"name": name, "ckpt": str(ckpt), "cfg": cfg, "sp": sp, "call": call}
        try:
            ranks = launch(cfg * sp, [job], tmp, args.threads, args.device)[name]
        except Exception as e:  # a rank died (out of memory, a lost GPU): recorded, and the next layout runs
            ranks = [{"error": " ".join(f"{type(e).__name__}: {e}".split())[:500], "crashed": True}]
        if "error" in ranks[0]:
            print(f"{name}: {ranks[0]['error']}", flush=True)
            records.append({"layout": name, **ranks[0]})
            save(records)
            continue
        video = np.load(tmp / f"{name}.npy")
        reference = video if reference is None else reference
        diff = int(np.abs(video.astype(int) - reference.astype(int)).max())
        counted = [r["bytes_per_step"] for r in ranks]
        formula = [
            bytes_per_step(config, vae, (cfg, sp), (frames, height, width), element, r)["total"]
            for r in range(cfg * sp)
        ]
        step = statistics.median(ranks[0]["step_s"])
        records.append(
            {
                "layout": name,
                "step_s": ranks[0]["step_s"],
                "bytes_per_step": counted,
                "formula_bytes_per_step": formula,
                "max_pixel_diff": diff,
            }
        )
        save(records)
        rows.append([name, cfg * sp, step, f"{max(counted) / 1e6:.3f}", f"{max(formula) / 1e6:.3f}", diff])
        print(
            f"{name}: {step:.3f} s/step, {max(counted) / 1e6:.3f} MB/step, max pixel diff {diff}", flush=True
        )
        if counted != formula:
            print(
                f"BYTES DIFFER from the formula: {name} counted {counted}, formula {formula}", file=sys.stderr
            )
    headers = ["cfg x sp", "processes", "s/step (rank 0, median)", "MB sent/step (most of any rank, counted)"]
    headers += ["MB (formula)", "max pixel diff vs first layout"]
    return markdown_table(headers, rows), records


def fit_to_gpus(args) -> str | None:
    """On CUDA, one GPU per process: the default layouts shrink to those this machine holds (said on stderr); a
    layout asked for that needs more GPUs is an error (returned), before any process starts."""
    if args.device != "cuda":
        return None
    gpus = torch.cuda.device_count()
    if args.layouts is not None:
        if too_big := [f"{c}x{s} needs {c * s}" for c, s in args.layouts if c * s > gpus]:
            return f"--layouts {', '.join(too_big)} GPUs; this machine has {gpus}"
        return None
    args.layouts = [(c, s) for c, s in layout_list(DEFAULT_LAYOUTS) if c * s <= gpus]
    if left := [f"{c}x{s}" for c, s in layout_list(DEFAULT_LAYOUTS) if c * s > gpus]:
        print(
            f"note: {gpus} GPU(s) here: layouts {', '.join(left)} need more and are not run", file=sys.stderr
        )
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    digest = source_digest()  # before anything runs: another process may edit the package meanwhile
    print(f"machine: {machine()}; cogvideox/*.py sha256 {digest}; load {os.getloadavg()[0]:.2f}")
    results = {}
    failed = False
    if args.device == "cuda" and torch.cuda.device_count() == 0:
        print("error: --device cuda: this machine has no CUDA device", file=sys.stderr)
        return 2
    if problem := fit_to_gpus(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.layouts = args.layouts or layout_list(DEFAULT_LAYOUTS)

    def save(measured: list[dict] | None = None) -> None:
        if measured is not None:
            results["measured"] = measured
        if args.out:
            write_report(args.out, args, results, digest)

    if not args.computed_only:
        with tempfile.TemporaryDirectory(prefix="cogvideox-bench-parallel-") as tmp:
            table, results["measured"] = measure(args, Path(tmp), save)
        how = "CPU, gloo, fp32" if args.device == "cpu" else "CUDA, NCCL, the model's dtype"
        print(f"\nMEASURED ({how}, {args.size}, {args.steps} steps):\n{table}")
        failed = any(
            "error" in r or r["bytes_per_step"] != r["formula_bytes_per_step"] or r["max_pixel_diff"] > 2
            for r in results["measured"]
        )
    table, results["computed"] = released_table()
    print(
        f"\nCOMPUTED, not measured: released models, 49x480x720, CFG on, 16-bit activations; compute assumes "
        f"{UTILISATION:.0%} of {PEAK_FLOPS / 1e12:.0f} TFLOP/s per GPU; links at nominal bandwidth:\n{table}"
    )
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
