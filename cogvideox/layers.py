"""Small building blocks of the CogVideoX transformer: embeddings, adaptive norms, attention, feed-forward.

Submodule and parameter names follow the released checkpoints (`norm1.linear`, `attn1.to_out.0`,
`ff.net.0.proj`, ...), so `state_dict()` keys are the checkpoint's keys.

Text and video tokens travel as one joint sequence `[text ‖ video]` of shape (B, L + N, D); the two
"experts" differ only in their adaLN modulation, applied to the two slices of that sequence in place.

Precision: `F.layer_norm` computes statistics and affine in float32 for 16-bit inputs and rounds once, so
the norms need no explicit upcast (and no extra copy) of the (B, S, D) activations; the embeddings are
computed in float32 (float64 for the sin-cos table) and cast once. RoPE upcasts, as diffusers does.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.nn.attention import SDPBackend

from .quantize import cat_rows

# ---------------------------------------------------------------------------------------------------------
# Timestep embedding


def timestep_embedding(
    timesteps: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> Tensor:
    """DDPM sinusoid of width `dim` (B,) -> (B, dim) float32, `[cos | sin]` when `flip_sin_to_cos`."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the timestep sinusoid."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ---------------------------------------------------------------------------------------------------------
# Positional embeddings. Per-axis tables are tiny, so they are built on the CPU (in float64, which MPS
# lacks); only their broadcast over the (frames, height, width) grid happens on the target device.


def _grid_cat(parts: list[tuple[str, Tensor]], frames: int, height: int, width: int) -> Tensor:
    """Per-axis tables `(axis, (n, d))`, axis in t/h/w, broadcast over the grid and concatenated along d."""
    sizes = dict(t=frames, h=height, w=width)
    out = torch.cat([repeat(table, f"{axis} d -> t h w d", **sizes) for axis, table in parts], dim=-1)
    return rearrange(out, "t h w d -> (t h w) d")


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(M,) float32 positions -> (M, dim) float64 `[sin | cos]`, as diffusers computes it."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(positions.double(), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_3d(
    dim: int,
    frames: int,
    height: int,
    width: int,
    spatial_scale: float,
    temporal_scale: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed 3D sin-cos embedding of a (frames, height, width) token grid -> (frames·height·width, dim).

    Each token's vector is `[time (dim/4) | width (3dim/8) | height (3dim/8)]`; positions are divided by the
    interpolation scales (CogVideoX-2B: spatial 1.875, temporal 1.0). Values are computed in float64 and
    rounded once to `dtype`.
    """
    if dim % 16:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 16, got {dim}")

    def table(axis: str, n: int, width: int, scale: float) -> tuple[str, Tensor]:
        positions = torch.arange(n, dtype=torch.float32) / scale
        return axis, _sincos_1d(width, positions).to(device, dtype)

    parts = [
        table("t", frames, dim // 4, temporal_scale),
        table("w", width, 3 * dim // 8, spatial_scale),
        table("h", height, 3 * dim // 8, spatial_scale),
    ]
    return _grid_cat(parts, frames, height, width)


def resize_crop_region_for_grid(
    src: tuple[int, int], tgt_width: int, tgt_height: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a (height, width) grid lands when fitted into the base grid: ((top, left), (bottom, right))."""
    h, w = src
    if h / w > tgt_height / tgt_width:
        resize_height, resize_width = tgt_height, round(tgt_height / h * w)
    else:
        resize_width, resize_height = tgt_width, round(tgt_width / w * h)
    top = round((tgt_height - resize_height) / 2.0)
    left = round((tgt_width - resize_width) / 2.0)
    return (top, left), (top + resize_height, left + resize_width)


def _rope_1d(dim: int, positions: Tensor, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(M,) positions -> cos, sin of shape (M, dim), each frequency repeated for its (real, imag) pair."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(positions, freqs)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def rotary_pos_embed_3d(
    head_dim: int,
    frames: int,
    height: int,
    width: int,
    base_height: int,
    base_width: int,
    *,
    sliced: bool = False,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """3D RoPE of a (frames, height, width) token grid -> cos, sin, each (frames·height·width, head_dim) fp32.

    The head is split `[time dim/4 | height 3dim/8 | width 3dim/8]`. CogVideoX 1.0: spatial positions span the
    region the grid occupies when resized and centre-cropped into the base (training) grid, so other aspect
    ratios reuse the trained position range (diffusers' `CogVideoXPipeline._prepare_rotary_positional_embeddings`).
    `sliced` (CogVideoX 1.5, diffusers' `grid_type="slice"`): positions 0, 1, 2, ... per axis, the first rows
    of the base grid's table, so the grid may not exceed the base grid (ValueError).
    """
    if head_dim % 16:
        raise ValueError(f"3D RoPE needs a head dim divisible by 16, got {head_dim}")
    if sliced:
        if height > base_height or width > base_width:
            raise ValueError(
                f"a {height}x{width} token grid exceeds this model's rotary table ({base_height}x{base_width})"
            )
        pos_t, pos_h, pos_w = (torch.arange(n, dtype=torch.float32) for n in (frames, height, width))
    else:
        (top, left), (bottom, right) = resize_crop_region_for_grid((height, width), base_width, base_height)
        # diffusers' end points: stop·(n-1)/n even when the start is not 0 (a quirk the 5B model was run with).
        pos_t = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
        pos_h = torch.linspace(top, bottom * (height - 1) / height, height, dtype=torch.float32)
        pos_w = torch.linspace(left, right * (width - 1) / width, width, dtype=torch.float32)
    tables = {
        "t": _rope_1d(head_dim // 4, pos_t),
        "h": _rope_1d(head_dim // 8 * 3, pos_h),
        "w": _rope_1d(head_dim // 8 * 3, pos_w),
    }
    cos, sin = (
        _grid_cat([(axis, pair[i].to(device)) for axis, pair in tables.items()], frames, height, width)
        for i in (0, 1)
    )
    return cos, sin


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved (real, imag) pairs of x (B, H, S, d) by angles given as cos, sin (S, d), in fp32."""
    xf = x.float()
    real, imag = rearrange(xf, "... (d two) -> ... d two", two=2).unbind(-1)
    rotated = rearrange(torch.stack([-imag, real], dim=-1), "... d two -> ... (d two)")
    return (xf * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Adaptive norms


class AdaLayerNormZero(nn.Module):
    """LayerNorm whose shift and scale come from the time embedding, separately for text and video.

    One Linear yields `[shift, scale, gate, enc_shift, enc_scale, enc_gate]` (`enc_` = text tokens); the
    gates are returned for the residual update (`gated_residual_`).
    """

    def __init__(self, cond_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, text_len: int, emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mod = rearrange(self.linear(F.silu(emb)), "b (n d) -> n b 1 d", n=6)
        shift, scale, gate, enc_shift, enc_scale, enc_gate = mod.unbind(0)
        h = self.norm(x)  # (B, L + N, D), a fresh tensor: modulated in place
        text, video = h[:, :text_len], h[:, text_len:]
        text.mul_(1 + enc_scale).add_(enc_shift)
        video.mul_(1 + scale).add_(shift)
        return h, gate, enc_gate


def gated_residual_(x: Tensor, text_len: int, y: Tensor, gate: Tensor, enc_gate: Tensor) -> Tensor:
    """x += gate·y, with the text gate on the first `text_len` tokens; updates x in place."""
    x[:, :text_len].addcmul_(y[:, :text_len], enc_gate)
    x[:, text_len:].addcmul_(y[:, text_len:], gate)
    return x


class AdaLayerNorm(nn.Module):
    """Final LayerNorm modulated by the time embedding; the Linear yields `[shift, scale]` (shift first)."""

    def __init__(self, cond_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift, scale = rearrange(self.linear(F.silu(emb)), "b (n d) -> n b 1 d", n=2).unbind(0)
        return torch.addcmul(shift, self.norm(x), 1 + scale)


# ---------------------------------------------------------------------------------------------------------
# Attention and feed-forward

_QKV = ("to_q", "to_k", "to_v")


def _fuse_qkv(module, state_dict, prefix, local_metadata, strict, missing_keys, *_) -> None:
    """Load hook: checkpoint `to_q/to_k/to_v` -> one `to_qkv` (a single GEMM instead of three)."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in _QKV]
        present = [k in state_dict for k in keys]
        if all(present):
            state_dict[f"{prefix}to_qkv.{kind}"] = cat_rows([state_dict.pop(k) for k in keys])
        elif any(present):  # name the checkpoint key that is absent, not only the fused one
            missing_keys.extend(k for k, found in zip(keys, present) if not found)


def _split_qkv(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: `to_qkv` -> `to_q/to_k/to_v`, in the checkpoint's key order.

    The splits are copies: safetensors refuses to save tensors that share storage.
    """
    fused = {kind: state_dict.get(f"{prefix}to_qkv.{kind}") for kind in ("weight", "bias")}
    # Re-insert this module's entries so the split keys sit where the checkpoint has them.
    own = [k for k in state_dict if k.startswith(prefix)]
    entries = {k: state_dict.pop(k) for k in own}
    for key, value in entries.items():
        if key == f"{prefix}to_qkv.weight":
            parts = {kind: t.chunk(3) for kind, t in fused.items() if t is not None}
            for i, name in enumerate(_QKV):
                for kind, chunks in parts.items():
                    state_dict[f"{prefix}{name}.{kind}"] = chunks[i].clone()
        elif key != f"{prefix}to_qkv.bias":
            state_dict[key] = value


# Each SDPA kernel called by name, as F.scaled_dot_product_attention calls it once it has chosen (no mask, no
# dropout, no log-sum-exp: inference). `torch.nn.attention.sdpa_kernel` would choose by setting flags that are
# global to the process, and restores on exit what it saw on entry: with pipelines on several GPUs in threads
# (pool.py), one job's exit would leave another's kernel, or its own, switched on for everyone.


def _flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
    # The CUDA kernel takes head dims in multiples of 8: pad them, as F.scaled_dot_product_attention does.
    d = q.shape[-1]
    if d % 8:
        q, k, v = (F.pad(t, (0, -d % 8)) for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=d**-0.5)[0][..., :d]


def _cudnn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]


def _efficient(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]


def _math(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v)[0]


def attention(q: Tensor, k: Tensor, v: Tensor, kernel: SDPBackend | None = None) -> Tensor:
    """softmax(q kᵀ/√d) v on (B, heads, S, head_dim) by `kernel`, or by the kernel PyTorch picks (None).

    An if-chain, not a table: torch.compile traces it (it cannot guard on a dict keyed by an enum)."""
    if kernel is None:
        return F.scaled_dot_product_attention(q, k, v)
    if kernel == SDPBackend.FLASH_ATTENTION:
        return _flash(q, k, v)
    if kernel == SDPBackend.CUDNN_ATTENTION:
        return _cudnn(q, k, v)
    if kernel == SDPBackend.EFFICIENT_ATTENTION:
        return _efficient(q, k, v)
    if kernel == SDPBackend.MATH:
        return _math(q, k, v)
    raise ValueError(f"no SDPA kernel {kernel!r} here")


# Fused kernels only: the math backend materialises the (S, S) score matrix (38 GB for the full 2B job).
SDPA_CANDIDATES = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def fastest_sdpa_backend(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    candidates=SDPA_CANDIDATES,
    runs: int = 5,
    timer: Callable[[], float] = time.perf_counter,
) -> SDPBackend | None:
    """The fastest backend that runs on q/k/v of `shape` (B, heads, S, head_dim) and computes attention right.

    Which kernel wins depends on the GPU, the head size and the PyTorch build (cuDNN or FlashAttention-2 on
    Hopper, memory-efficient on older cards), so it is measured where it runs: the median of `runs` calls after
    a warm-up, once per shape, on q/k/v laid out as `Attention.forward` passes them, through `attention` as the
    model calls it (each kernel by name: no global flag that a job on another thread could change mid-timing).
    Each kernel's output is checked against attention written out in float32 on a few query rows (a reference
    from no SDPA kernel, so the memory-efficient kernel can be checked too); a kernel off by more than 2 % of the
    largest output is not picked (bf16 rounding costs about 0.3 %, a wrong layout 100 %). None if none runs and
    agrees.
    """
    q, k, v = _attention_inputs(shape, dtype, device)
    rows = torch.linspace(0, shape[2] - 1, min(shape[2], 8), device=device).long()
    want = _attention_rows(q, k, v, rows)
    timings = {}
    for backend in candidates:
        try:
            # Warm-up (and: does it run here at all? is it right?); only the checked rows are kept.
            got = attention(q, k, v, backend)[:, :, rows].float()
            if (got - want).abs().max() > 2e-2 * want.abs().max():
                continue
            timings[backend] = _median_time(partial(attention, q, k, v, backend), device, runs, timer)
        # No kernel for this device, dtype or shape (OOM is a RuntimeError too); NotImplementedError: none built
        # for this device at all (a CUDA kernel asked on the CPU).
        except (RuntimeError, NotImplementedError):
            continue
    return min(timings, key=timings.get, default=None)


def _attention_inputs(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
    """q, k, v as `Attention.forward` makes them: split from one fused projection, q and k contiguous (the
    LayerNorm's output), v a strided view into the projection."""
    b, heads, s, d = shape
    qkv = torch.randn(b, s, 3 * heads * d, dtype=dtype, device=device)
    q, k, v = rearrange(qkv, "b s (three h d) -> three b h s d", three=3, h=heads).unbind(0)
    return q.contiguous(), k.contiguous(), v


def _attention_rows(q: Tensor, k: Tensor, v: Tensor, rows: Tensor) -> Tensor:
    """softmax(q kᵀ/√d) v for the query `rows` only (rows are independent), (B, H, R, D) in float32; one head at
    a time, so the float32 copies of k and v stay small."""
    out = []
    for h in range(q.shape[1]):
        qh, kh, vh = q[:, h, rows].float(), k[:, h].float(), v[:, h].float()
        out.append(torch.softmax(qh @ kh.transpose(-2, -1) * qh.shape[-1] ** -0.5, dim=-1) @ vh)
    return torch.stack(out, dim=1)


def _median_time(
    fn: Callable[[], object], device: torch.device, runs: int, timer: Callable[[], float]
) -> float:
    times = []
    for _ in range(runs):
        start = timer()
        fn()
        _sync(device)  # kernels run asynchronously: wait for this one before reading the clock
        times.append(timer() - start)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    """Waits for the kernels queued on `device` (not on the current device, which may be another GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Attention(nn.Module):
    """Joint self-attention over `[text ‖ video]` with per-head q/k LayerNorm and optional RoPE.

    The checkpoint's separate `to_q/to_k/to_v` are held fused as `to_qkv`; hooks convert on load and save.
    `kernel`: the SDPA kernel `attention` calls by name (None: PyTorch's pick), set on this model for the duration
    of a call (`CogVideoXTransformer.attention_kernel`), never process-wide.
    `attend`, when set, replaces the SDPA call: `attend(q, k, v, kernel) -> out`, each (B, heads, S, head_dim)
    with q and k normalised and rotated. Sequence parallelism (cogvideox/parallel.py) sets it for the duration of
    a call, to attend over the tokens of every process.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.kernel: SDPBackend | None = None
        self.attend: Callable[[Tensor, Tensor, Tensor, SDPBackend | None], Tensor] | None = None
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])  # `to_out.0` in the checkpoint
        self.register_load_state_dict_pre_hook(_fuse_qkv)
        self.register_state_dict_post_hook(_split_qkv)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        qkv = rearrange(self.to_qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.heads)
        q, k, v = qkv.unbind(0)
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q, k = apply_rotary_emb(q, *rope), apply_rotary_emb(k, *rope)
        out = (self.attend or attention)(q, k, v, self.kernel)
        return self.to_out[0](rearrange(out, "b h s d -> b s (h d)"))


class _GELUProj(nn.Module):
    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear; `net.1` is the checkpoint's (parameterless) dropout slot."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.Sequential(_GELUProj(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
