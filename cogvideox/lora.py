"""LoRA: low-rank updates of the transformer's weights, read from the layouts people publish and folded in.

A LoRA holds, per layer, A (r, in) and B (out, r); at `scale` the layer's weight becomes W + scale·(alpha/r)·B@A.
That sum is folded into the weight itself (computed in float32, cast to the weight's dtype), never added by a hook
or a wrapper: the model's forward stays the plain one, compiled graphs keep their inputs, and every memory mode
streams the folded weights. A and B stay here (they are small), so a new scale or an unload folds again from the
base weight, read once more from the checkpoint's safetensors through a memory map: restoring is exact, bit for
bit, and a layer's weight depends only on the scales wanted now, never on the ones before.

The layouts, told apart and converted in one place (`convert`):
- diffusers / PEFT: `transformer.transformer_blocks.0.attn1.to_q.lora_A.weight` and `lora_B` (what
  `save_lora_weights`, finetrainers, cogvideox-factory and the official SAT export, `export_sat_lora_weight.py`,
  write); alpha from the file's `lora_adapter_metadata` as diffusers reads it (`lora_alpha`, `alpha_pattern`,
  `use_rslora`), else alpha = rank.
- kohya: `lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight`, `lora_up.weight` and `alpha`.
- SAT's own names (its training checkpoint): `model.diffusion_model.transformer.layers.0.attention.
  query_key_value.matrix_A.0` (.0 .1 .2: q, k, v) and `attention.dense.matrix_A.0`; alpha = rank, as its export.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .config import LORA_MAX_SCALE, CheckpointError, TransformerConfig
from .loading import read_tensors
from .quantize import stored_like

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: the one taken from a folder holding several
METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON of the PEFT config, its keys prefixed "transformer."
_QKV = ("to_q", "to_k", "to_v")  # diffusers' layers; ours is one fused to_qkv (layers.py)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_PEFT = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)(\.[\w-]+)?\.weight$"
)
_KOHYA = re.compile(
    r"^lora_(?:unet|transformer)_(?P<module>\w+?)\.(?P<part>lora_down|lora_up|alpha)(\.weight)?$"
)
_SAT = re.compile(
    r"^(?:model\.diffusion_model\.)?transformer\.layers\.(?P<layer>\d+)\.attention\."
    r"(?P<kind>query_key_value|dense)\.matrix_(?P<part>[AB])\.(?P<index>[0-2])$"
)
_PART = {"lora_A": "down", "lora_down": "down", "lora.down": "down", "A": "down"}
_PART |= {"lora_B": "up", "lora_up": "up", "lora.up": "up", "B": "up", "alpha": "alpha"}


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not abs(scale) <= LORA_MAX_SCALE:
        raise ValueError(
            f"LoRA scale must be a number in [-{LORA_MAX_SCALE:g}, {LORA_MAX_SCALE:g}], got {scale!r}"
        )
    return float(scale)


@dataclass(frozen=True)
class Target:
    """A layer a LoRA may update, by diffusers' name: our module, and the rows of its weight that are that layer
    (diffusers' to_q, to_k and to_v are the thirds of our fused to_qkv)."""

    module: str
    rows: slice
    shape: tuple[int, int]  # (out, in) of the update; a convolution's kernel flattened, as B@A gives it


@functools.cache
def targets(config: TransformerConfig) -> dict[str, Target]:
    """Every Linear and Conv2d of this model's transformer, by diffusers' name (built on the meta device: no weights)."""
    from .transformer import CogVideoXTransformer

    with torch.device("meta"):
        model = CogVideoXTransformer(config)
    found = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            rows, fan_in = layer.weight.shape[0], math.prod(layer.weight.shape[1:])
            if name.endswith(".to_qkv"):
                third = rows // 3
                for i, part in enumerate(_QKV):
                    found[name.removesuffix("to_qkv") + part] = Target(
                        name, slice(i * third, (i + 1) * third), (third, fan_in)
                    )
            else:
                found[name] = Target(name, slice(0, rows), (rows, fan_in))
    return found


@dataclass(frozen=True)
class Update:
    down: Tensor  # A (r, in), as stored in the file
    up: Tensor  # B (out, r)
    factor: float  # alpha / r (alpha / sqrt(r) for rsLoRA)


@dataclass(frozen=True)
class Lora:
    name: str
    file: Path
    sha256: str
    updates: dict[str, Update]  # by target (diffusers' layer name)


# -- reading -------------------------------------------------------------------------------------------------------


def resolve(source: str | Path) -> Path:
    """A file as it is; a folder -> its LoRA file; a Hub repo id `owner/name` -> its snapshot's LoRA file, or
    `owner/name/path/in/repo.safetensors` -> that file, downloaded as weights are (huggingface_hub's cache)."""
    path, text = Path(source).expanduser(), str(source)
    if path.is_file():
        return path
    if path.is_dir():
        return _file_in(path)
    parts = text.split("/")
    hub = all(parts) and (len(parts) == 2 or (len(parts) > 2 and text.endswith(".safetensors")))
    if path.exists() or text.startswith((".", "~")) or not hub:
        raise CheckpointError(f"LoRA {text!r}: no such file or folder (nor a Hub repo id, owner/name)")
    import huggingface_hub

    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if file:
            return Path(huggingface_hub.hf_hub_download(repo, file))
        folder = Path(huggingface_hub.snapshot_download(repo, allow_patterns=["*.safetensors"]))
    except Exception as e:  # network, a missing or gated repo: all end the same way for the user
        raise CheckpointError(
            f"LoRA {text!r}: no such file, and could not get it from the Hugging Face Hub "
            f"({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        ) from None
    return _file_in(folder)


def _file_in(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if (folder / LORA_FILE).is_file() or len(files) == 1:
        return folder / LORA_FILE if (folder / LORA_FILE).is_file() else files[0]
    names = ", ".join(f.name for f in files) or "none"
    raise CheckpointError(
        f"LoRA folder {folder} must hold one .safetensors file (or {LORA_FILE}); it holds {names}"
    )


def read(source: str | Path, model: TransformerConfig, name: str | None = None) -> Lora:
    """The LoRA at `source` for this model, checked: CheckpointError (a ValueError) naming the file and the first
    bad key for a missing, damaged or unknown file, a key that matches no layer, a shape that does not fit."""
    file = resolve(source)
    try:
        with safe_open(file, "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safe_open has no iteration)
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"LoRA {file} is damaged or not a safetensors file: {e}") from None
    if not tensors:
        raise CheckpointError(f"LoRA {file} holds no tensors")
    updates = convert(tensors, _peft_config(metadata, file), file, targets(model))
    if name is None:
        name = file.parent.name if file.name == LORA_FILE else file.stem
    return Lora(name, file, _sha256(file), updates)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _peft_config(metadata: dict, file: Path) -> dict | None:
    """The transformer's PEFT config from diffusers' metadata (lora_alpha, alpha_pattern, use_rslora), or None."""
    if METADATA_KEY not in metadata:
        return None
    try:
        config = json.loads(metadata[METADATA_KEY])
        return {
            k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")
        } or None
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"LoRA {file}: its {METADATA_KEY} is not a JSON object ({e})") from None


def _parse(key: str, flat: dict[str, str]) -> tuple[str, str] | None:
    """A file's key -> (diffusers' layer name, "down" | "up" | "alpha"), whatever the layout; None if none fits."""
    if m := _SAT.match(key):
        layer = "attn1." + (_QKV[int(m["index"])] if m["kind"] == "query_key_value" else "to_out.0")
        return f"transformer_blocks.{m['layer']}.{layer}", _PART[m["part"]]
    if m := _KOHYA.match(key):
        return flat.get(m["module"], key), _PART[m["part"]]
    module = next((key.removeprefix(p) for p in _PREFIXES if key.startswith(p)), key)
    if m := _PEFT.match(module):
        return m["module"], _PART[m["part"]]
    if module.endswith(".alpha"):
        return module.removesuffix(".alpha"), "alpha"
    return None


def convert(
    tensors: dict[str, Tensor], config: dict | None, file: Path, layers: dict[str, Target]
) -> dict[str, Update]:
    """Any layout's tensors -> an Update per layer, checked against this model's `layers`."""
    flat = {name.replace(".", "_"): name for name in layers}
    parts: dict[str, dict[str, Tensor]] = {}
    first: dict[str, str] = {}  # layer -> its first key in the file, for errors
    for key, tensor in tensors.items():
        parsed = _parse(key, flat)
        if parsed is None:
            raise CheckpointError(
                f"LoRA {file}: unknown layout: {key!r} is none of diffusers/PEFT (...lora_A/lora_B.weight), kohya "
                "(lora_unet_...lora_down/lora_up/alpha) or SAT (...matrix_A/matrix_B)"
            )
        layer, part = parsed
        if layer not in layers:
            raise CheckpointError(
                f"LoRA {file}: {key!r} matches no layer of this model (a LoRA for another model?)"
            )
        parts.setdefault(layer, {})[part] = tensor
        first.setdefault(layer, key)
    return {layer: _update(p, layers[layer], config, file, first[layer], layer) for layer, p in parts.items()}


def _update(
    parts: dict[str, Tensor], target: Target, config: dict | None, file: Path, key: str, layer: str
) -> Update:
    if "down" not in parts or "up" not in parts:
        raise CheckpointError(
            f"LoRA {file}: {key!r} has no {'up (B)' if 'down' in parts else 'down (A)'} matrix beside it"
        )
    down, up = parts["down"], parts["up"]
    if min(down.ndim, up.ndim) < 2 or not (down.is_floating_point() and up.is_floating_point()):
        raise CheckpointError(f"LoRA {file}: {key!r} is not a floating-point matrix pair")
    down, up = down.flatten(1), up.flatten(1)  # a convolution's kernel: (r, C·kh·kw), (out, r)
    rank = down.shape[0]
    if up.shape[1] != rank or (up.shape[0], down.shape[1]) != target.shape:
        raise CheckpointError(
            f"LoRA {file}: {key!r} updates a {up.shape[0]}x{down.shape[1]} weight (rank {rank}, B {tuple(up.shape)}), "
            f"but this model's {layer} is {target.shape[0]}x{target.shape[1]} (a LoRA for another model size?)"
        )
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise CheckpointError(f"LoRA {file}: {key!r} holds NaN or infinite values")
    if "alpha" in parts:  # kohya's, per layer
        alpha = float(parts["alpha"].float().reshape(-1)[0])
    elif config is None:  # diffusers' rule without metadata: alpha = rank, a factor of 1
        alpha = rank
    else:  # peft's LoraConfig: an alpha_pattern entry matching the layer's name, else lora_alpha (its default 8)
        pattern = next(
            (p for p in config.get("alpha_pattern") or {} if re.match(rf"(.*\.)?({p})$", layer)), None
        )
        alpha = float(config["alpha_pattern"][pattern] if pattern else config.get("lora_alpha", 8))
    return Update(down, up, alpha / (math.sqrt(rank) if config and config.get("use_rslora") else rank))


# -- folding ------------------------------------------------------------------------------------------------------


def _write_weight(layer: nn.Module, weight: Tensor, offloader) -> None:
    """The one place a folded (or restored) weight enters a layer: float32 in, stored in place in the layer's dtype
    wherever its weight lives (`Offloader.write_`). An 8-bit layer gets its base plus the updates quantized anew
    (`quantize.stored_like`): the error of 8 bits never builds up over rescales, and an unload stores exactly
    what loading did."""
    offloader.write_(layer.weight, stored_like(layer.weight, weight))


def _base_weight(folder: Path, module: str, dtype: torch.dtype) -> Tensor:
    """Our module's weight as the checkpoint gave it (to_qkv: its to_q, to_k and to_v), bit for bit as loaded."""
    names = [module.removesuffix("to_qkv") + p for p in _QKV] if module.endswith(".to_qkv") else [module]
    state = read_tensors(folder, [f"{n}.weight" for n in names], dtype)
    return torch.cat([state[f"{n}.weight"] for n in names])


class LoraSet:
    """A pipeline's LoRAs (in the order loaded), their scales, and what is folded into its weights now.

    `where()` gives (transformer, offloader, checkpoint folder) once the weights are loaded, else None (then
    nothing is folded until `reload`)."""

    def __init__(self, config: TransformerConfig, where: Callable[[], tuple | None]):
        self.config, self.where = config, where
        self.loras: dict[str, Lora] = {}
        self.scales: dict[str, float] = {}
        self.folded: dict[str, tuple] = {}  # our module -> the (LoRA, sha256, scale, layer)s folded into it
        self.last_fold = {"layers": 0, "seconds": 0.0}  # of the last fold that wrote anything

    def describe(self) -> list[dict]:
        """The LoRAs in effect (scale not 0), as the sidecar records them."""
        return [
            {"name": n, "sha256": x.sha256, "scale": self.scales[n]}
            for n, x in self.loras.items()
            if self.scales[n]
        ]

    def load(self, source: str | Path, scale: float, name: str | None) -> str:
        scale = check_scale(scale)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"LoRA name must be a non-empty string, got {name!r}")
        lora = read(source, self.config, name)
        if lora.name in self.loras:
            raise ValueError(f"a LoRA named {lora.name!r} is loaded already: unload it or pass another name")
        self.change({**self.loras, lora.name: lora}, {**self.scales, lora.name: scale})
        return lora.name

    def set(self, scales: Mapping[str, float]) -> None:
        """Every loaded LoRA's scale at once: those named get theirs, the others 0 (loaded, not applied)."""
        if unknown := [n for n in scales if n not in self.loras]:
            raise ValueError(f"no LoRA named {unknown[0]!r} is loaded; loaded: {sorted(self.loras)}")
        self.change(self.loras, {n: check_scale(scales.get(n, 0.0)) for n in self.loras})

    def unload(self, name: str | None) -> None:
        if name is not None and name not in self.loras:
            raise ValueError(f"no LoRA named {name!r} is loaded; loaded: {sorted(self.loras)}")
        keep = {n: x for n, x in self.loras.items() if name is not None and n != name}
        self.change(keep, {n: self.scales[n] for n in keep})

    def change(self, loras: dict[str, Lora], scales: dict[str, float]) -> None:
        """Makes these the LoRAs and scales, folded in if the weights are loaded; should folding fail (the
        checkpoint's files gone), the old ones are put back, folded back where possible, and the error raised."""
        old = self.loras, self.scales
        self.loras, self.scales = loras, scales
        try:
            self.fold()
        except BaseException:
            self.loras, self.scales = old
            with contextlib.suppress(Exception):
                self.fold()
            raise

    def reload(self) -> None:
        """The weights were (re)loaded from the checkpoint: nothing is folded in them; fold what is wanted."""
        self.folded.clear()
        self.fold()

    def _wanted(self) -> dict[str, tuple]:
        layers, wanted = targets(self.config), {}
        for name, lora in self.loras.items():
            if self.scales[name]:
                for layer in lora.updates:
                    wanted.setdefault(layers[layer].module, []).append(
                        (name, lora.sha256, self.scales[name], layer)
                    )
        return {module: tuple(v) for module, v in wanted.items()}

    @torch.inference_mode()
    def fold(self) -> None:
        """Writes, into each layer whose wanted sum changed, its base weight plus that sum (a layer no LoRA wants any
        more: its base weight). Nothing is read or written for the layers that did not change."""
        if (place := self.where()) is None:
            return
        transformer, offloader, folder = place
        start, wanted, layers = time.perf_counter(), self._wanted(), targets(self.config)
        changed = [m for m in dict.fromkeys([*self.folded, *wanted]) if self.folded.get(m) != wanted.get(m)]
        for module in changed:
            layer = transformer.get_submodule(module)
            weight = _base_weight(folder, module, layer.weight.dtype).to(offloader.device, torch.float32)
            for name, _, scale, target in wanted.get(module, ()):
                update, rows = self.loras[name].updates[target], layers[target].rows
                delta = update.up.to(weight.device, torch.float32) @ update.down.to(
                    weight.device, torch.float32
                )
                weight[rows] += (scale * update.factor) * delta.view(weight[rows].shape)
            _write_weight(layer, weight, offloader)
            self.folded.pop(module, None)
            if module in wanted:
                self.folded[module] = wanted[module]
        if changed:
            self.last_fold = {"layers": len(changed), "seconds": time.perf_counter() - start}
