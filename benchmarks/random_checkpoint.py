"""Random-weight CogVideoX checkpoints in the released layout, at the sizes the pipeline benchmark runs.

Nothing is downloaded: the tokenizer, scheduler and model index come from `cogvideox.testing`, the
transformer, VAE and T5 encoder are freshly initialised modules of the requested widths, saved as FP16
safetensors like the release (the T5 encoder sharded with an index). Timings and memory depend on the shapes,
not on the values, so random weights measure what the real ones would.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from cogvideox.config import TransformerConfig, VAEConfig
from cogvideox.testing import write_tiny_checkpoint

SIZES = ("tiny", "small", "widths", "widths-12", "full")

# google/t5-v1_1-xxl, the released text encoder (4.76e9 parameters, 9.5 GB in FP16).
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
# --small-t5: the XXL output width (the transformer's text_embed_dim), two narrow layers.
T5_SMALL_4096 = {**T5_XXL, "d_ff": 1024, "num_heads": 8, "num_layers": 2}
# The CPU benchmark's model: every layer kind of the release, at a quarter (VAE, transformer) or an eighth
# (T5) of its widths.
SMALL = (
    TransformerConfig(
        num_attention_heads=8,
        attention_head_dim=64,
        text_embed_dim=512,
        num_layers=4,
        sample_frames=9,
        sample_height=16,
        sample_width=24,
    ),
    VAEConfig(block_out_channels=(32, 64, 64, 128), sample_height=128, sample_width=192),
    {**T5_XXL, "d_model": 512, "d_ff": 1024, "num_heads": 8, "num_layers": 4},
)


# The 8-bit benchmark's model: the released 2B transformer's and T5-XXL's layer widths (what a kernel's speed and
# a layer's 8-bit error depend on), 4 blocks of each instead of 30 and 24; the small VAE (it stays 16-bit).
WIDTHS = (TransformerConfig(num_layers=4), SMALL[1], {**T5_XXL, "num_layers": 4})
# The same at 12 blocks of each: the 16-bit parts that do not grow with depth (T5's embedding, the transformer's
# patch and time embeddings) weigh in closer to the released 30 and 24 blocks (6.2 GB in FP16, where the released
# 2B transformer + T5 are 13.9 GiB).
WIDTHS_12 = (TransformerConfig(num_layers=12), SMALL[1], {**T5_XXL, "num_layers": 12})


def size_configs(size: str, small_t5: bool = False) -> tuple[TransformerConfig, VAEConfig, dict] | None:
    """(transformer, VAE, T5 kwargs) for `size`; None for "tiny" (cogvideox.testing's model as it is)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if size == "tiny":
        return None
    if size == "small":
        return SMALL
    if size == "widths":
        return WIDTHS
    if size == "widths-12":
        return WIDTHS_12
    return TransformerConfig(), VAEConfig(), T5_SMALL_4096 if small_t5 else T5_XXL


def _save_module(folder: Path, module: torch.nn.Module, config, class_name: str) -> None:
    folder.mkdir(parents=True)
    data = {"_class_name": class_name, "_diffusers_version": "0.30.0.dev0", **dataclasses.asdict(config)}
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors")


def _save_t5(folder: Path, kwargs: dict, device: torch.device) -> None:
    from transformers import T5Config, T5EncoderModel

    with torch.device(device):  # initialising 4.7e9 parameters is quick on a GPU, slow on a CPU
        # made in FP16, as the release stores it (FP32 would need twice the memory: 19 GB for T5-XXL)
        model = T5EncoderModel._from_config(T5Config(**kwargs), dtype=torch.float16)
    # transformers upcasts `wo` to FP32 again when loading in FP16.
    model.to(torch.float16).save_pretrained(folder, max_shard_size="5GB")


def write_random_checkpoint(
    path: str | Path, size: str, small_t5: bool = False, device: str | torch.device = "cpu", seed: int = 0
) -> Path:
    """Write (or reuse, when the folder already holds this exact spec) a random checkpoint at `path`."""
    from cogvideox.transformer import CogVideoXTransformer
    from cogvideox.vae import CogVideoXVAE

    path = Path(path)
    spec = {"size": size, "small_t5": small_t5 and size == "full", "seed": seed}
    marker = path / "benchmark_checkpoint.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return path
    configs = size_configs(size, small_t5)
    marker.unlink(missing_ok=True)
    for component in ("transformer", "vae", "text_encoder"):
        shutil.rmtree(path / component, ignore_errors=True)
    write_tiny_checkpoint(path, seed=seed)  # model_index.json, scheduler/, tokenizer/ (and tiny weights)
    if configs is not None:
        t_cfg, v_cfg, t5 = configs
        torch.manual_seed(seed)
        device = torch.device(device)
        for component in ("transformer", "vae", "text_encoder"):
            shutil.rmtree(path / component)
        with torch.device(device):
            transformer = CogVideoXTransformer(t_cfg)
        _save_module(path / "transformer", transformer, t_cfg, "CogVideoXTransformer3DModel")
        del transformer
        with torch.device(device):
            vae = CogVideoXVAE(v_cfg)
        _save_module(path / "vae", vae, v_cfg, "AutoencoderKLCogVideoX")
        del vae
        _save_t5(path / "text_encoder", t5, device)
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    marker.write_text(json.dumps(spec))
    return path
