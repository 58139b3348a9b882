"""8-bit Linear weights: the transformer's and T5's `nn.Linear` weights stored in 8 bits with one scale per output
channel; norms, embeddings and the VAE stay as they are.

Quantizing changes the weight a layer holds, not the layer's forward: the weight becomes a tensor subclass that
`F.linear` dispatches on, so `nn.Linear.forward`, the sampler and `torch.compile` see ordinary modules.

- "int8": torchao's `Int8Tensor` (its weight-only path: int8 upcast to the activations' dtype, one matmul, the
  per-channel scale on the output). Needs the optional `torchao` package (README, "8-bit weights").
- "fp8": `Float8Weight` below, pure torch: float8_e4m3fn + a float32 scale per output channel. Upcast layer by
  layer on any device that stores float8 (every CUDA GPU, the CPU); on GPUs with fp8 tensor cores (compute
  capability 8.9+) the matmul runs in fp8 (`torch._scaled_mm`, the activations scaled per tensor). That is
  decided at the first matmul on each CUDA device, never at load: a ZeroGPU Space's main process loads the weights
  to an emulated "cuda" and must not ask the driver anything.

The contract other code builds on (LoRA folding): `quantize_weight`, `dequantize`, `is_quantized`, `replace_weight`,
`stored_like`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass, transform_subclass

MODES = ("int8", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest float8_e4m3fn
SCALED_MM_CAPABILITY = (8, 9)  # Ada and later have fp8 tensor cores
aten = torch.ops.aten


def check_quantize(mode: str | None, device: torch.device) -> str | None:
    """The mode, checked before any weights load: ValueError for an unknown mode, int8 without torchao, fp8 on a
    device that cannot hold float8 tensors."""
    if mode is None:
        return None
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {list(MODES)} or None, got {mode!r}")
    if mode == "int8":
        _torchao_int8()
    elif not can_store_fp8(torch.device(device)):
        raise ValueError(f"quantize must be 'int8' or None on {device}: it cannot hold fp8 (float8) tensors")
    return mode


def can_store_fp8(device: torch.device) -> bool:
    """A float8 tensor can be made on `device` and upcast there (MPS cannot). CUDA is trusted without a probe:
    every CUDA GPU converts float8 in software, and the app's main process must not create a CUDA context."""
    if device.type == "cuda":
        return True
    try:
        torch.ones(2, device=device).to(FP8).to(torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _torchao_int8():
    """torchao's Int8Tensor and PerRow, or a ValueError saying how to get them."""
    try:
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow
    except ImportError as e:
        raise ValueError(
            f"quantize must be 'fp8' or None here: 'int8' needs the torchao package ({e}); "
            "install it with: pip install -e '.[quantize]'"
        ) from None
    return Int8Tensor, PerRow


def fp8_compute(capability: tuple[int, int] | None) -> bool:
    """Whether fp8 weights multiply in fp8 (torch._scaled_mm) on a device of this CUDA compute capability (None:
    not a CUDA device), rather than being upcast to the activations' dtype first."""
    return capability is not None and tuple(capability) >= SCALED_MM_CAPABILITY


def fp8_matmul(device: torch.device) -> bool:
    """Whether fp8 weights multiply in fp8 on `device`: asked at the first matmul there, then cached."""
    if device.type != "cuda":
        return False
    return _fp8_matmul_on(device.index if device.index is not None else torch.cuda.current_device())


_FP8_MATMUL: dict[int, bool] = {}  # CUDA device index -> fp8_compute of its capability


@torch.compiler.assume_constant_result  # a compiled graph bakes the answer in instead of tracing the query
def _fp8_matmul_on(index: int) -> bool:
    if index not in _FP8_MATMUL:
        _FP8_MATMUL[index] = fp8_compute(torch.cuda.get_device_capability(index))
    return _FP8_MATMUL[index]


class Float8Weight(torch.Tensor):
    """A (out, in) Linear weight held as float8_e4m3fn `qdata` and a float32 `scale` (out, 1); it reads as
    `qdata * scale` in `dtype`."""

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, dtype):
        self.qdata, self.scale = qdata, scale

    def __repr__(self) -> str:
        return f"Float8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __tensor_flatten__(self):
        return ["qdata", "scale"], (self.dtype,)

    @staticmethod
    def __tensor_unflatten__(inner, context, outer_size, outer_stride):
        return Float8Weight(inner["qdata"], inner["scale"], *context)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Float8Weight:
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # (out, 1)
        qdata = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return cls(qdata, scale, weight.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        return self.qdata.to(dtype) * self.scale.to(dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and isinstance(args[1], Float8Weight):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return _fp8_linear(args[0], args[1], bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0]
        if func in (aten.detach.default, aten.alias.default, aten.clone.default):
            return Float8Weight(func(self.qdata), func(self.scale), self.dtype)
        if func is aten._to_copy.default and kwargs.get("dtype", self.dtype) == self.dtype:
            # a move (module.to(device), pin_memory): the 8-bit data moves as it is
            moved = {k: v for k, v in kwargs.items() if k != "dtype"}
            qdata, scale = func(self.qdata, **moved), func(self.scale, **moved)
            return Float8Weight(qdata, scale, self.dtype)
        # Anything else (printing, .float(), arithmetic) sees the 16-bit weight.
        unwrap = [a.dequantize() if isinstance(a, Float8Weight) else a for a in args]
        return func(*unwrap, **kwargs)


def _fp8_linear(x: torch.Tensor, w: Float8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + bias: in fp8 on the GPUs that can (x scaled per tensor, w per output channel), else with the
    weight upcast to x's dtype for this layer only."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and fp8_matmul(x.device):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        x_scale = (x2.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
        xq = (x2 / x_scale.to(x2.dtype)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        one = torch.ones((), device=x.device)
        y = torch._scaled_mm(xq, w.qdata.t(), scale_a=x_scale, scale_b=one, out_dtype=x.dtype)
        y = y * w.scale.view(1, -1).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return F.linear(x, w.dequantize(x.dtype), bias)


# -- the contract: one Linear weight ------------------------------------------------------------------------


def quantize_weight(w16: torch.Tensor, mode: str) -> torch.Tensor:
    """A (out, in) weight -> its 8-bit form (a tensor subclass that reads as the original dtype)."""
    w16 = dequantize(w16)  # an 8-bit weight is requantized from what it reads as
    if mode == "fp8":
        return Float8Weight.from_float(w16)
    if mode == "int8":
        int8_tensor, per_row = _torchao_int8()
        return int8_tensor.from_hp(w16.detach(), granularity=per_row())
    raise ValueError(f"quantize must be one of {list(MODES)}, got {mode!r}")


def dequantize(stored: torch.Tensor) -> torch.Tensor:
    """The weight in its original dtype (a plain tensor as it is)."""
    return stored.dequantize() if _mode_of(stored) else stored


def _mode_of(t: torch.Tensor) -> str | None:
    if isinstance(t, Float8Weight):
        return "fp8"
    if type(t).__name__ == "Int8Tensor" and hasattr(t, "qdata"):
        return "int8"
    return None


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts) along the output channels, kept in 8 bits when the parts are (fused to_q/to_k/to_v: with
    a scale per output channel, the fused weight's 8-bit data and scales are the parts' stacked)."""
    if not all(_mode_of(p) for p in parts):
        return torch.cat([dequantize(p) for p in parts])
    names, context = parts[0].__tensor_flatten__()
    inner = {n: torch.cat([getattr(p, n) for p in parts]) for n in names}
    shape = torch.Size([sum(p.shape[0] for p in parts), *parts[0].shape[1:]])
    return type(parts[0]).__tensor_unflatten__(inner, context, shape, None)


def is_quantized(linear: nn.Linear) -> bool:
    return _mode_of(linear.weight) is not None


def replace_weight(linear: nn.Linear, new16: torch.Tensor) -> None:
    """Give `linear` a new 16-bit weight (a LoRA folded in, say), stored as the old one was: requantized when the
    layer is 8-bit, in the old weight's dtype and device otherwise."""
    old = linear.weight
    if tuple(new16.shape) != tuple(old.shape):
        raise ValueError(f"new weight {tuple(new16.shape)} does not fit {linear} ({tuple(old.shape)})")
    linear.weight = nn.Parameter(stored_like(old, new16.to(old.device)), requires_grad=False)


def stored_like(old: torch.Tensor, new16: torch.Tensor) -> torch.Tensor:
    """`new16` stored as `old` is, on new16's device: cast to old's dtype, then quantized as old was when old is
    8-bit. That cast-then-quantize is what loading does to a checkpoint's weight, so the checkpoint's own weight
    comes back bit for bit as loading stored it (LoRA's unload)."""
    mode = _mode_of(old)
    new = new16.to(old.dtype)
    return new if mode is None else quantize_weight(new, mode)


# -- whole modules ------------------------------------------------------------------------------------------


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """module.to(device), each 8-bit weight moved as its inner tensors (8-bit data, scales) rather than as one
    tensor subclass: ZeroGPU's CUDA emulation records plain tensors only, to pack them and move them into its GPU
    worker later (a subclass it cannot swap)."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if is_traceable_wrapper_subclass(t):
            return transform_subclass(t, lambda _, inner: move(inner))
        return t.to(device)

    return module._apply(move)


def linear_weight_names(module: nn.Module) -> set[str]:
    """State-dict keys of the weights that 8 bits store: every nn.Linear's (norms, embeddings, convs stay)."""
    return {
        f"{name}.weight" if name else "weight"
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
    }


def quantize_linears(module: nn.Module, mode: str) -> nn.Module:
    """Every nn.Linear weight of a loaded module -> 8 bits, one layer at a time (each 16-bit weight is freed as its
    8-bit one takes its place, so the peak is the 16-bit module, not it plus the 8-bit one)."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and not is_quantized(m):
            m.weight = nn.Parameter(quantize_weight(m.weight, mode), requires_grad=False)
    return module


def converter(module: nn.Module, mode: str):
    """For `loading.load_module`: each Linear weight of `module` goes to 8 bits as it loads, so the 16-bit module
    is never whole in memory (the peak is the 8-bit module plus one 16-bit tensor)."""
    names = linear_weight_names(module)

    def convert(key: str, tensor: torch.Tensor) -> torch.Tensor:
        return quantize_weight(tensor, mode) if key in names else tensor

    return convert
