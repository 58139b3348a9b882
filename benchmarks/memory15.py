"""CogVideoX1.5-5B at 1360x768, 81 and 161 frames (5 and 10 s at 16 fps): predicted peak GPU memory per memory mode
and which cards each fits: a PREDICTION (bench_memory's count of the bytes our modules allocate on meta tensors,
plus the weights each mode keeps on the device), not a measurement. Beside it: the work per denoising step, and the
published timings of other implementations (anchors), until a GPU measures ours (`benchmarks.gpu_check --sections
v15`).

    python -m benchmarks.memory15 --out memory15.json     # also memory15.md; ~5 min on a 2-core CPU
    python -m benchmarks.memory15 --tiny                  # the tiny 1.5 model at 1 and 17 frames: seconds

The decode counted is the tiled one: at 1360x768 the offloader budgets the untiled decode at 30 GiB (BF16) and
starts tiled on every card below that (offload.decode_with_retry); the untiled peak is listed too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from benchmarks import bench_memory as bm
from benchmarks.common import machine, markdown_table, source_digest, write_report
from cogvideox.offload import Offloader
from cogvideox.testing import tiny_configs

FRAMES, SIZE = (81, 161), (768, 1360)
TINY_FRAMES, TINY_SIZE = (1, 17), (32, 48)  # 32x48: one tile, so the tiled decode is quick
CARDS_GIB = (24, 16, 12)  # "24 GB" cards (RTX 4090, 3090), 16 GB (4080, 4060 Ti 16 GB), 12 GB (4070, 3060)
SKIP = ("decode tiled half",)  # the retry ladder's last rung: minutes more on meta tensors, never the peak
# Published figures for 81 frames at 1360x768, 50 steps (not run here; seconds for the whole video).
ANCHORS = [
    ["diffusers, every memory saving on", "H100", "~550 s", "THUDM/CogVideo README (CogVideoX1.5-5B)"],
    ["diffusers, every memory saving on", "A100", "~1000 s", "THUDM/CogVideo README (CogVideoX1.5-5B)"],
    [
        "TeaCache T2V, threshold 0 / 0.1 / 0.2 / 0.3",
        "H100",
        "465 / 322 / 260 / 204 s",
        "ali-vilab/TeaCache, TeaCache4CogVideoX1.5/README.md",
    ],
    [
        "TeaCache I2V, threshold 0 / 0.1 / 0.2 / 0.3",
        "H100",
        "475 / 316 / 239 / 204 s",
        "ali-vilab/TeaCache, TeaCache4CogVideoX1.5/README.md",
    ],
]
H100_DENSE_BF16 = 989e12  # FLOP/s: the compute floor below uses it at 100 %, which no run reaches


def model(tiny: bool):
    """(transformer, VAE, T5) configs: the released 1.5-5B with T5-XXL, or the tiny 1.5 with a small T5."""
    if not tiny:
        return bm.model_configs("1.5")
    transformer, vae, _ = tiny_configs("1.5")
    # Four blocks, as bench_memory's tiny model: with fewer, the three blocks in flight are the whole list
    return dataclasses.replace(transformer, num_layers=4), vae, bm.model_configs("tiny")[2]


def predict(tiny: bool) -> dict:
    """Per frame count: the stages' working memory, each mode's peaks (bench_memory.mode_rows) and the step's work."""
    t_cfg, v_cfg, t5 = model(tiny)
    models = bm.build_models(t_cfg, v_cfg, t5, ["ours"])["ours"]
    weights = {c: bm.weight_bytes(m, c in Offloader.STREAMED) for c, m in models.items()}
    height, width = TINY_SIZE if tiny else SIZE
    runs = {}
    for frames in TINY_FRAMES if tiny else FRAMES:
        shape = bm.latent_shape(t_cfg, v_cfg, frames, height, width)
        stages = bm.run_stages("ours", models, t_cfg, shape, skip=SKIP)
        work = bm.step_work("ours", models["transformer"], t_cfg, shape)
        runs[frames] = {
            "latent_shape": shape,
            "stages_gib": stages,
            "modes": bm.mode_rows("ours", weights, stages),
            "step_work": work,
        }
    return {"weights_gib": weights, "size": [height, width], "runs": runs}


def fits(gib: float) -> str:
    """The cards a peak (allowance included) fits, by their nominal size read as GiB."""
    cards = [f"{card}" for card in CARDS_GIB if gib <= card]
    return " / ".join(cards) + " GB" if cards else "none of 24 / 16 / 12 GB"


def cards_table(prediction: dict) -> str:
    rows = []
    for frames, run in prediction["runs"].items():
        rows_by = {(r["mode"], r["decode"]): r for r in run["modes"]}
        for mode in bm.MODES:
            tiled, untiled = rows_by[(mode, "tiled")], rows_by[(mode, "untiled")]
            rows.append(
                [
                    frames,
                    mode,
                    tiled["text"],
                    tiled["denoise"],
                    tiled["decode_peak"],
                    tiled["peak"],
                    tiled["peak_with_allowance"],
                    fits(tiled["peak_with_allowance"]),
                    untiled["peak_with_allowance"],
                ]
            )
    headers = ["frames", "mode", "text", "denoise", "decode (tiled)", "peak", "+ allowance", "fits"]
    return markdown_table([*headers, "peak + allowance, untiled decode"], rows)


def work_table(prediction: dict) -> str:
    rows = []
    for frames, run in prediction["runs"].items():
        w = run["step_work"]
        tflop = w["gemm_tflop"] + w["attention_tflop"]
        floor = tflop * 1e12 / H100_DENSE_BF16
        rows.append([frames, w["gemm_tflop"], w["attention_tflop"], floor, 50 * floor])
    headers = [
        "frames",
        "matmul TFLOP/step",
        "attention TFLOP/step",
        "H100 floor s/step",
        "floor s, 50 steps",
    ]
    return markdown_table(headers, rows)


def report(prediction: dict, tiny: bool, seconds: float) -> str:
    height, width = prediction["size"]
    allowance = sum(bm.ALLOWANCE_GIB.values())
    return "\n".join(
        [
            f"# CogVideoX1.5-5B{' (tiny stand-in)' if tiny else ''}: predicted peak GPU memory",
            "",
            f"PREDICTION, not a measurement (meta tensors on the CPU, no GPU ran; {seconds:.0f} s): "
            f"{width}x{height}, 16-bit weights and activations, CFG batch 2; GiB; allowance {allowance:g} GiB "
            "for what tensors do not show (CUDA context, workspaces, fragmentation: an estimate).",
            "",
            cards_table(prediction),
            "",
            "Work per denoising step (counted on the same run), and the time it would take at 100 % of an "
            "H100's dense BF16 peak: a floor no run reaches, not a prediction of our time.",
            "",
            work_table(prediction),
            "",
            "Published timings, 81 frames at 1360x768, 50 steps (other implementations; not run here):",
            "",
            markdown_table(["what", "GPU", "seconds", "source"], ANCHORS),
            "",
        ]
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny 1.5 model at 1 and 17 frames of 32x48")
    p.add_argument("--out", help="write the prediction as JSON here (and markdown beside it, .md)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    bm.diffusers_logging.set_verbosity_error()
    digest = source_digest()
    print(f"machine: {machine()}; cogvideox/*.py sha256 {digest}", flush=True)
    t0 = time.perf_counter()
    prediction = predict(args.tiny)
    text = report(prediction, args.tiny, time.perf_counter() - t0)
    print("\n" + text, flush=True)
    if args.out:
        data = {"prediction": True, **prediction, "anchors": ANCHORS, "cards_gib": CARDS_GIB}
        write_report(args.out, args, data, digest)
        Path(args.out).with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
