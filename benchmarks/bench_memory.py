"""Predicted peak GPU memory per memory mode, computed on the CPU: a PREDICTION, not a measurement.

The real modules (ours, diffusers', transformers' T5) run on meta tensors, which carry shapes and dtypes but no
data, so nothing is computed and the full 720x480x49 job takes seconds. A dispatch mode counts the bytes of every
storage the ops allocate (views share a storage and are counted once; sizes rounded to the CUDA caching allocator's
512-byte blocks), frees them when their last tensor dies, and keeps the peak. Composite ops are expanded into the
ops that CUDA runs, so their temporaries are seen, and the copies that cuDNN convolutions and the layer-norm kernel
make of non-contiguous inputs are added while those ops run. `F.scaled_dot_product_attention` is routed to the
kernel CUDA runs (FlashAttention, or memory-efficient attention when a mask is passed); on the meta device it
would take the math path, which holds the S x S score matrix (38 GB at full size).

Why meta and not fake CUDA tensors: on a CPU-only PyTorch build, indexing, `Tensor.copy_` and some of
FakeTensorMode's own decompositions take a CUDA device guard and fail. The modules branch on the device in no
place that matters here (ours only picks its CPU Winograd path for `cpu`).

Per stage we get the working memory above the weights; per memory mode (offload.py) the weights on the device
during each stage are added: resident: all; model: the stage's component; sequential: the component's weights
outside the streamed block lists, plus three streamed blocks in flight (finishing, running, arriving). A fixed allowance for what
no tensor shows (CUDA context, library workspaces, fragmentation) is printed and added separately.

    python -m benchmarks.bench_memory --out memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import sys
import time
import weakref

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from diffusers.utils import logging as diffusers_logging
from torch import Tensor, nn
from torch._C import DispatchKey
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import T5Config, T5EncoderModel

from benchmarks.common import GiB, machine, markdown_table, source_digest, write_report
from benchmarks.random_checkpoint import T5_XXL
from cogvideox.config import PRESETS, TransformerConfig, VAEConfig
from cogvideox.offload import GiB as OFFLOAD_GIB
from cogvideox.offload import Offloader, _block_lists, _tensors, default_working_bytes, pick_memory_mode
from cogvideox.testing import tiny_configs
from cogvideox.transformer import CogVideoXTransformer
from cogvideox.vae import CogVideoXVAE

DEVICE = torch.device("meta")
DTYPE = torch.float16  # the 2B model's
GUIDANCE = 6.0
# frames, height, width: the released 2B's, CogVideoX1.5-5B's (5 s at 16 fps; 161 for 10 s), a smoke size
SHAPES = {"full": (49, 480, 720), "1.5": (81, 768, 1360), "tiny": (9, 64, 96)}
MODES = ("resident", "model", "sequential")
TARGETS_GIB = {"resident": 24, "model": 16, "sequential": 6}  # issue 4, its "GB" read as GiB
CARD_GIB = 24.0
# What counting tensors cannot see, added as one fixed amount (estimates, not measured).
ALLOWANCE_GIB = {
    "CUDA context (outside PyTorch's allocator)": 0.5,
    "cuBLAS / cuDNN workspaces": 0.25,
    "caching-allocator fragmentation": 0.75,
}
STAGE_COMPONENT = {"text": "text_encoder", "denoise": "transformer"}  # the rest, decode*, use the VAE
aten = torch.ops.aten
MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)
# CUDA kernels that copy a non-contiguous input (and weight) before running; the copy lives during the op only.
CONTIGUOUS_COPY_OPS = {aten.convolution.default: 2, aten.native_layer_norm.default: 1}


def _rounded(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


@functools.cache
def _composite(func) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def _flat(values: list) -> list[Tensor]:
    """The tensors among aten arguments or results: tensors, and lists or tuples of them."""
    out = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(t for t in v if isinstance(t, Tensor))
    return out


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The kernel CUDA picks for `F.scaled_dot_product_attention`: FlashAttention for 16-bit inputs without a
    mask, the memory-efficient kernel otherwise. Both keep O(S) extra memory (the log-sum-exp)."""
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    return aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, False, dropout_p, is_causal, scale=scale
    )[0]


class _AsOnCuda(TorchDispatchMode):
    """Runs ops as CUDA would (attention on a fused kernel, composite ops in their C++ decomposition, so that
    their temporaries pass through here too) and shows each op that runs to `seen`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.scaled_dot_product_attention.default:
            self.attention(args[0], args[1])
            with self:
                return _fused_attention(*args, **kwargs)
        if _composite(func):
            with self:
                return func._op_dk(DispatchKey.CompositeImplicitAutograd, *args, **kwargs)
        out = func(*args, **kwargs)
        self.seen(func, args, kwargs, out)
        return out

    def attention(self, q: Tensor, k: Tensor) -> None:
        pass

    def seen(self, func, args: tuple, kwargs: dict, out) -> None:
        pass


class DeviceMemory(_AsOnCuda):
    """Bytes of the device storages that ops allocate while the mode is active: `live` now, `peak` so far.

    Storages that existed before (the weights) are never counted, whatever views of them the ops make.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes, for the storages allocated in here

    def seen(self, func, args: tuple, kwargs: dict, out) -> None:
        inputs = {id(t.untyped_storage()) for t in _flat([*args, *kwargs.values()])}
        for t in _flat([out]):
            storage = t.untyped_storage()
            key = id(storage)
            if t.device != DEVICE or key in inputs or key in self._sizes:
                continue
            self._sizes[key] = _rounded(storage.nbytes())
            self.live += self._sizes[key]
            weakref.finalize(storage, self._free, key)
        copies = args[: CONTIGUOUS_COPY_OPS.get(func, 0)]
        hidden = sum(_rounded(t.numel() * t.element_size()) for t in copies if not t.is_contiguous())
        self.peak = max(self.peak, self.live + hidden)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


class StepWork(_AsOnCuda):
    """What one call asks of the GPU: matmul FLOPs, attention FLOPs, and the bytes the other (memory-bound) ops
    read and write, with their count (about one kernel each). Views and in-kernel copies are free here."""

    def __init__(self):
        super().__init__()
        self.gemm_flops = self.attention_flops = self.other_bytes = self.other_ops = 0

    def attention(self, q: Tensor, k: Tensor) -> None:
        # (B, H, S, d): QK^T and PV, 2 FLOPs per multiply-add
        self.attention_flops += 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]

    def seen(self, func, args: tuple, kwargs: dict, out) -> None:
        if func in MATMULS:
            a, b = [t for t in args if isinstance(t, Tensor)][-2:]
            self.gemm_flops += 2 * a.numel() * b.shape[-1]
        elif not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            tensors = _flat([*args, *kwargs.values(), out])
            if func not in (aten._unsafe_view.default, aten.empty.memory_format) and tensors:
                self.other_bytes += sum(t.numel() * t.element_size() for t in tensors)
                self.other_ops += 1


def step_work(impl: str, transformer: nn.Module, t_cfg: TransformerConfig, latent_shape: tuple) -> dict:
    """StepWork of one CFG denoising step (the transformer on a batch of 2 and the FP32 combine)."""
    work = StepWork()
    with work, torch.inference_mode():
        denoise_stage(
            _forward(impl, transformer), latent_shape, t_cfg.max_text_seq_length, t_cfg.text_embed_dim
        )
    return {
        "gemm_tflop": work.gemm_flops / 1e12,
        "attention_tflop": work.attention_flops / 1e12,
        "other_gb": work.other_bytes / 1e9,
        "other_ops": work.other_ops,
    }


def measure(fn) -> dict[str, float]:
    """Peak GiB that `fn` allocates (its inputs, activations, outputs), and what stays alive after it returned
    (caches held by the modules)."""
    tracker = DeviceMemory()
    with tracker, torch.inference_mode():
        fn()
    gc.collect()
    return {"peak": tracker.peak / GiB, "kept": tracker.live / GiB}


# -- models ----------------------------------------------------------------------------------------------


def model_configs(size: str) -> tuple[TransformerConfig, VAEConfig, dict]:
    if size == "full":
        return TransformerConfig(), VAEConfig(), T5_XXL
    if size == "1.5":  # BF16 in use; FP16 stands in for it here: the same bytes
        return PRESETS["1.5"]["transformer"], PRESETS["1.5"]["vae"], T5_XXL
    transformer, vae, _ = tiny_configs("2b")
    # Four blocks, not two: with fewer than four, the three blocks in flight are the whole list.
    transformer = dataclasses.replace(transformer, num_layers=4)
    t5 = {
        **T5_XXL,
        "vocab_size": 260,
        "d_model": transformer.text_embed_dim,
        "d_kv": 8,
        "d_ff": 64,
        "num_heads": 4,
        "num_layers": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
    }
    return transformer, vae, t5


def latent_shape(t_cfg: TransformerConfig, v_cfg: VAEConfig, frames: int, height: int, width: int) -> tuple:
    """(1, F, C, h, w) as the pipeline denoises them: CogVideoX 1.5 pads F to a whole number of temporal patches."""
    s, latent_frames = v_cfg.spatial_compression, (frames - 1) // int(v_cfg.temporal_compression_ratio) + 1
    latent_frames += -latent_frames % t_cfg.temporal_patch
    return (1, latent_frames, t_cfg.in_channels, height // s, width // s)


def t5_encoder(kwargs: dict) -> T5EncoderModel:
    """T5 as transformers loads it in FP16: the `wo` projections stay in FP32 (`_keep_in_fp32_modules`)."""
    model = T5EncoderModel(T5Config(**kwargs)).to(DTYPE)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in model._keep_in_fp32_modules:
            module.float()
    return model


def build_models(t_cfg: TransformerConfig, v_cfg: VAEConfig, t5: dict, impls: list[str]) -> dict:
    """{impl: {component: module}} in FP16 on the meta device; both pipelines use transformers' T5."""

    def half(module: nn.Module) -> nn.Module:
        return module.to(DTYPE).eval()

    with torch.device(DEVICE):
        text_encoder = t5_encoder(t5).eval()
        models = {
            "ours": {"transformer": half(CogVideoXTransformer(t_cfg)), "vae": half(CogVideoXVAE(v_cfg))},
            "diffusers": {
                "transformer": half(CogVideoXTransformer3DModel(**dataclasses.asdict(t_cfg))),
                "vae": half(AutoencoderKLCogVideoX(**dataclasses.asdict(v_cfg))),
            },
        }
    return {impl: {"text_encoder": text_encoder, **models[impl]} for impl in impls}


def weight_bytes(module: nn.Module, streamed: bool) -> dict[str, float]:
    """GiB of parameters and buffers: all of them, those outside the block lists that sequential mode streams
    (offload.py's rule: the outermost lists of the `Offloader.STREAMED` components), and the most streamed weight on
    the device at once there (three consecutive blocks: one finishing, one running, the next arriving)."""

    def size(m: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for _, _, t in _tensors(m))

    lists = _block_lists(module) if streamed else []
    windows = [
        sum(size(b[(i + k) % len(b)]) for k in range(min(3, len(b)))) for b in lists for i in range(len(b))
    ]
    return {
        "all": size(module) / GiB,
        "not_streamed": (size(module) - sum(size(b) for b in lists)) / GiB,
        "streamed_in_flight": max(windows, default=0) / GiB,
    }


def stored_bytes(module: nn.Module, quantized: bool) -> int:
    """Bytes of the weights as held: with 8-bit weights (cogvideox/quantize.py) each nn.Linear weight is 1 byte a
    value plus a 4-byte scale per output channel."""
    total = 0
    for owner, name, t in _tensors(module):
        if quantized and isinstance(owner, nn.Linear) and name == "weight":
            total += t.numel() + 4 * t.shape[0]
        else:
            total += t.numel() * t.element_size()
    return total


RESIDENT_MODELS = {"2B": "2b", "5B": "5b", "1.5-5B": "1.5"}
CARDS_GIB = (24, 16, 12)


def resident_fits() -> list[list]:
    """Which released models `pick_memory_mode` keeps resident on a 24/16/12 GiB card (its free memory taken as the
    card's, less the 1.5 GiB allowance), in 16 bits and with 8-bit weights: a PREDICTION from the weights' sizes
    (meta modules) and the pick's own working-memory rule, nothing ran."""
    with torch.device(DEVICE):
        text_encoder = t5_encoder(T5_XXL)
        vae = CogVideoXVAE(VAEConfig()).to(DTYPE)
        transformers_ = {
            n: CogVideoXTransformer(PRESETS[k]["transformer"]).to(DTYPE) for n, k in RESIDENT_MODELS.items()
        }
    working = {
        n: default_working_bytes(PRESETS[k]["transformer"], PRESETS[k]["vae"])
        for n, k in RESIDENT_MODELS.items()
    }
    rows = []
    for name, transformer in transformers_.items():
        for quantized in (False, True):
            sizes = {
                "text_encoder": stored_bytes(text_encoder, quantized),
                "transformer": stored_bytes(transformer, quantized),
                "vae": stored_bytes(vae, False),
            }
            free = [int((card - sum(ALLOWANCE_GIB.values())) * OFFLOAD_GIB) for card in CARDS_GIB]
            modes = [pick_memory_mode(f, sizes, working[name]) for f in free]
            rows.append([name, "8-bit" if quantized else "16-bit", sum(sizes.values()) / GiB, *modes])
    return rows


# -- stages ----------------------------------------------------------------------------------------------


def text_stage(t5: nn.Module, batches: list[int], tokens: int):
    """T5 on batches of ids in turn, outputs kept: ours encodes [negative, prompt] as one batch of 2,
    diffusers' pipeline each prompt alone."""
    outs = []
    for batch in batches:
        outs.append(t5(torch.zeros(batch, tokens, dtype=torch.long, device=DEVICE))[0])
    return outs


def denoise_stage(forward, latent_shape: tuple, tokens: int, text_dim: int) -> Tensor:
    """One CFG step as both pipelines run it: the transformer on [latents, latents], then the FP32 combine."""
    latents = torch.empty(latent_shape, dtype=DTYPE, device=DEVICE)  # (1, F, C, h, w)
    embeds = torch.empty(2, tokens, text_dim, dtype=DTYPE, device=DEVICE)
    timestep = torch.full((2,), 999, dtype=torch.long, device=DEVICE)
    uncond, cond = forward(torch.cat([latents, latents]), embeds, timestep).float().chunk(2)
    return uncond + GUIDANCE * (cond - uncond)


def _forward(impl: str, transformer: nn.Module):
    """transformer(latents, text_embeds, timestep) -> prediction, for either implementation."""
    if impl == "ours":
        return transformer

    def forward(x, embeds, timestep):
        return transformer(x, encoder_hidden_states=embeds, timestep=timestep, return_dict=False)[0]

    return forward


def run_stages(
    impl: str, modules: dict, t_cfg: TransformerConfig, latent_shape: tuple, skip: tuple[str, ...] = ()
) -> dict:
    """{stage: {"peak", "kept"}} GiB; latent_shape is (1, F, C, h, w); the stages named in `skip` are left out
    (on meta tensors a tiled decode costs a minute or more at 1360x768: its ops are counted one by one)."""
    tokens = t_cfg.max_text_seq_length
    t5, transformer, vae = modules["text_encoder"], modules["transformer"], modules["vae"]
    z_shape = (1, latent_shape[2], latent_shape[1], *latent_shape[3:])  # (1, C, F, h, w)

    def z() -> Tensor:
        return torch.empty(z_shape, dtype=DTYPE, device=DEVICE)

    if impl == "ours":
        tile = vae.default_tile[1]
        half_tile = (tile[0] // 2, tile[1] // 2)  # the last rung of offload.decode_with_retry
        decodes = {
            "decode untiled": lambda: vae.decode(z()),
            "decode tiled": lambda: vae.decode(z(), tiled=True),
            "decode tiled half": lambda: vae.decode(z(), tiled=True, tile_latent_size=half_tile),
        }
    else:

        def decode(tiled: bool) -> Tensor:
            vae.enable_tiling() if tiled else vae.disable_tiling()
            return vae.decode(z()).sample

        decodes = {"decode untiled": lambda: decode(False), "decode tiled": lambda: decode(True)}
    batches = [2] if impl == "ours" else [1, 1]
    stages = {
        "text": lambda: text_stage(t5, batches, tokens),
        "denoise": lambda: denoise_stage(
            _forward(impl, transformer), latent_shape, tokens, t_cfg.text_embed_dim
        ),
        **decodes,
    }
    results = {}
    for name, fn in ((n, f) for n, f in stages.items() if n not in skip):
        t0 = time.perf_counter()
        results[name] = measure(fn)
        print(
            f"{impl} {name}: peak {results[name]['peak']:.3g} GiB ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return results


# -- memory modes --------------------------------------------------------------------------------------------


def predict(weights: dict, stages: dict, mode: str, decode: str) -> dict[str, float]:
    """Peak GiB of each stage (text, denoise, decode) in a memory mode: the weights on the device during the stage,
    its working memory, and what the other stages leave behind (module caches; a second video finds them there)."""
    names = ["text", "denoise", decode]
    kept = sum(stages[s]["kept"] for s in names)
    peaks = {}
    for stage in names:
        w = weights[STAGE_COMPONENT.get(stage, "vae")]
        if mode == "resident":
            on_device = sum(c["all"] for c in weights.values())
        elif mode == "model":
            on_device = w["all"]
        else:
            on_device = w["not_streamed"] + w["streamed_in_flight"]
        peaks[stage] = on_device + stages[stage]["peak"] + kept - stages[stage]["kept"]
    return peaks


def mode_rows(impl: str, weights: dict, stages: dict) -> list[dict]:
    allowance = sum(ALLOWANCE_GIB.values())
    modes = MODES if impl == "ours" else ("resident", "model")  # diffusers: pipe.to(device), model offload
    rows = []
    for mode in modes:
        for decode in (s for s in stages if s.startswith("decode")):
            peaks = predict(weights, stages, mode, decode)
            peak = max(peaks.values())
            target = TARGETS_GIB[mode] if impl == "ours" else None
            rows.append(
                {
                    "impl": impl,
                    "mode": mode,
                    "decode": decode.removeprefix("decode "),
                    "text": peaks["text"],
                    "denoise": peaks["denoise"],
                    "decode_peak": peaks[decode],
                    "peak": peak,
                    "peak_with_allowance": peak + allowance,
                    "target": target,
                    "meets_target": None if target is None else [peak <= target, peak + allowance <= target],
                    "fits_card": peak + allowance <= CARD_GIB,
                }
            )
    return rows


# -- report ------------------------------------------------------------------------------------------------


def _cells(values: dict | None, keys: tuple[str, ...]) -> list:
    return [None if values is None else values[k] for k in keys]


def report(stages: dict, weights: dict, rows: list[dict], impls: list[str]) -> None:
    print("\nWorking memory per stage, GiB: the peak of what the stage allocates above the weights, and")
    print("what it leaves allocated after it returns (module caches)\n")
    names = list(dict.fromkeys(s for impl in impls for s in stages[impl]))
    headers = ["stage"] + [f"{impl} {col}" for impl in impls for col in ("peak", "kept")]
    table = [[n] + [v for i in impls for v in _cells(stages[i].get(n), ("peak", "kept"))] for n in names]
    print(markdown_table(headers, table) + "\n")

    print("Weights on the device, GiB (sequential mode holds `not streamed` + `3 in flight`)\n")
    keys = ("all", "not_streamed", "streamed_in_flight")
    headers = ["component"] + [f"{i} {col}" for i in impls for col in ("all", "not streamed", "3 in flight")]
    table = [[c] + [v for i in impls for v in _cells(weights[i][c], keys)] for c in weights[impls[0]]]
    print(markdown_table(headers, table) + "\n")

    allowance = sum(ALLOWANCE_GIB.values())
    parts = ", ".join(f"{k} {v:g}" for k, v in ALLOWANCE_GIB.items())
    print(f"Allowance for what tensors do not show: {allowance:g} GiB ({parts}); a fixed estimate\n")

    print("Predicted peak GiB per memory mode and stage (weights on the device + working memory + caches);")
    print("diffusers 'model' = enable_model_cpu_offload\n")

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    headers = [
        "impl",
        "mode",
        "decode",
        "text",
        "denoise",
        "decode",
        "peak",
        "+ allowance",
        "target",
        "target met (peak / + allowance)",
        f"fits {CARD_GIB:g} GiB card",
    ]
    table = []
    for r in rows:
        met = "-" if r["meets_target"] is None else " / ".join(map(yes, r["meets_target"]))
        table.append(
            [
                r["impl"],
                r["mode"],
                r["decode"],
                r["text"],
                r["denoise"],
                r["decode_peak"],
                r["peak"],
                r["peak_with_allowance"],
                r["target"] or "-",
                met,
                yes(r["fits_card"]),
            ]
        )
    print(markdown_table(headers, table) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size",
        choices=tuple(SHAPES),
        default="full",
        help="full: the released 2B; 1.5: CogVideoX1.5-5B; tiny: smoke",
    )
    p.add_argument("--frames", type=int, default=None, help="video frames (default: 49 full, 81 1.5, 9 tiny)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: 480 full, 768 1.5, 64 tiny)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: 720 full, 1360 1.5, 96 tiny)")
    p.add_argument("--impls", default="ours,diffusers", help="comma list of ours,diffusers")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    frames, height, width = SHAPES[args.size]
    args.frames, args.height, args.width = args.frames or frames, args.height or height, args.width or width
    args.impls = args.impls.split(",")
    if not set(args.impls) <= {"ours", "diffusers"}:
        p.error("impls must be among ours, diffusers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # casting to FP16 on purpose: no warnings about it
    digest = source_digest()
    print(f"machine: {machine()}; cogvideox/*.py sha256 {digest}", flush=True)
    t0 = time.perf_counter()
    t_cfg, v_cfg, t5 = model_configs(args.size)
    shape = latent_shape(t_cfg, v_cfg, args.frames, args.height, args.width)
    models = build_models(t_cfg, v_cfg, t5, args.impls)
    weights = {
        impl: {c: weight_bytes(m, c in Offloader.STREAMED) for c, m in models[impl].items()}
        for impl in args.impls
    }
    stages = {impl: run_stages(impl, models[impl], t_cfg, shape) for impl in args.impls}
    rows = [row for impl in args.impls for row in mode_rows(impl, weights[impl], stages[impl])]
    elapsed = time.perf_counter() - t0
    print(
        f"\nPREDICTION (meta tensors on the CPU, no GPU ran), {elapsed:.0f} s: {args.size} model, {args.frames} "
        f"frames {args.width}x{args.height}, FP16, CFG batch 2, {t_cfg.max_text_seq_length} text tokens, "
        f"latents {shape}; attention as CUDA's FlashAttention / memory-efficient kernels"
    )
    report(stages, weights, rows, args.impls)
    print(
        "PREDICTION: the memory mode picked per card (weights from meta modules, the pick's own rule), 16-bit"
    )
    print("against 8-bit weights (--quantize int8 or fp8: the transformer's and T5's Linear weights)\n")
    fits = resident_fits()
    headers = ["model", "weights", "weights GiB", *(f"{card} GB card" for card in CARDS_GIB)]
    print(markdown_table(headers, fits) + "\n")
    work = {impl: step_work(impl, models[impl]["transformer"], t_cfg, shape) for impl in args.impls}
    print("Work per denoising step: matmul and attention TFLOP, and what the other ops (memory-bound: norms,")
    print("modulation, activations, residuals, copies) read and write, in GB and kernels\n")
    keys = ("gemm_tflop", "attention_tflop", "other_gb", "other_ops")
    print(
        markdown_table(
            ["impl", "matmul TFLOP", "attention TFLOP", "other ops GB", "other ops"],
            [[impl, *(work[impl][k] for k in keys)] for impl in args.impls],
        )
        + "\n"
    )
    if args.out:
        data = {
            "prediction": True,
            "latent_shape": shape,
            "allowance_gib": ALLOWANCE_GIB,
            "card_gib": CARD_GIB,
            "stages_gib": stages,
            "weights_gib": weights,
            "modes": rows,
            "step_work": work,
            "memory_mode_by_card": fits,
        }
        write_report(args.out, args, data, digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
