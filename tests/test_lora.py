"""LoRA (cogvideox/lora.py): diffusers' video with the same LoRAs, the layouts people publish, folding that restores
exactly, every memory mode, compiled blocks, the command line, and bad input refused with nothing changed."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvideox import CogVideoXPipeline
from cogvideox import __main__ as cli
from cogvideox.loading import CheckpointError
from cogvideox.testing import write_tiny_checkpoint, write_tiny_lora

PROMPT = "a wooden toy ship glides over a blue carpet"
CALL = dict(num_inference_steps=2, num_frames=9, seed=3)
# Beyond attention: the 2B's patch embedding is a Conv2d (its LoRA a convolution pair), and the adaptive norms.
MOTION_LAYERS = ("attn1.to_k", "attn1.to_out.0", "ff.net.0.proj", "norm1.linear", "proj_out", "patch_embed.proj")


@pytest.fixture(scope="module")
def loras(tiny_2b, tmp_path_factory):
    """Two LoRAs for tiny_2b in diffusers' layout: `style` with lora_alpha 8 != rank 4 (and one layer's alpha 2 by
    alpha_pattern) in diffusers' metadata; `motion` of rank 2 without metadata (alpha = rank)."""
    folder = tmp_path_factory.mktemp("loras")
    pattern = {"transformer_blocks.1.attn1.to_v": 2.0}
    return {
        "style": write_tiny_lora(folder / "style.safetensors", tiny_2b, 4, 8.0, 1, alpha_pattern=pattern),
        "motion": write_tiny_lora(folder / "motion.safetensors", tiny_2b, 2, None, 2, MOTION_LAYERS),
    }


def _pipe(path, **kwargs) -> CogVideoXPipeline:
    return CogVideoXPipeline.from_pretrained(path, device="cpu", dtype=torch.float32, **kwargs)


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def _assert_weights(pipe, want: dict[str, torch.Tensor]) -> None:
    got = pipe.transformer.state_dict()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.fixture(scope="module")
def base(tiny_2b):
    """The tiny 2B loaded without LoRAs: its transformer weights and its video."""
    pipe = _pipe(tiny_2b)
    frames = pipe(PROMPT, **CALL).frames
    return _weights(pipe), frames


def _frames(out) -> np.ndarray:
    return (out[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()  # (T, H, W, 3)


def _reference(path, adapters: dict, seed: int, **call) -> np.ndarray:
    """diffusers' video with `adapters` ({name: (file, scale)}) through load_lora_weights + set_adapters."""
    import diffusers

    ref = diffusers.CogVideoXPipeline.from_pretrained(path, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    for name, (file, _) in adapters.items():
        ref.load_lora_weights(file, adapter_name=name)
    ref.set_adapters(list(adapters), [scale for _, scale in adapters.values()])
    generator = torch.Generator("cpu").manual_seed(seed)
    return _frames(ref(prompt=PROMPT, generator=generator, output_type="pt", **call).frames)


def _close(ours: np.ndarray, want: np.ndarray) -> None:
    assert ours.shape == want.shape
    assert np.abs(ours.astype(int) - want.astype(int)).max() <= 2


# -- diffusers' videos ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_loras_give_diffusers_video(tiny_2b, loras, base):
    """lora_alpha != rank and an alpha_pattern read from diffusers' metadata, a LoRA without metadata, a
    convolution's LoRA, scales other than 1: diffusers' load_lora_weights + set_adapters video within 2/255."""
    adapters = {"style": (loras["style"], 0.7), "motion": (loras["motion"], 1.3)}
    pipe = _pipe(tiny_2b)
    assert [pipe.load_lora(file, scale) for file, scale in adapters.values()] == ["style", "motion"]
    ours = pipe(PROMPT, **CALL)
    want = _reference(tiny_2b, adapters, **CALL)
    _close(ours.frames, want)
    assert np.abs(base[1].astype(int) - want.astype(int)).mean() > 5  # the LoRAs change the video a lot
    digest = hashlib.sha256(loras["style"].read_bytes()).hexdigest()
    assert ours.settings["loras"][0] == {"name": "style", "sha256": digest, "scale": 0.7}
    assert [x["name"] for x in ours.settings["loras"]] == ["style", "motion"]


@pytest.mark.slow
def test_cogvideox_15_lora_gives_diffusers_video(tmp_path):
    """CogVideoX 1.5: its patch embedding is a Linear over temporal patches, its prompt 224 tokens."""
    path = write_tiny_checkpoint(tmp_path / "tiny-15", style="1.5")
    layers = ("attn1.to_q", "attn1.to_out.0", "patch_embed.proj", "norm_out.linear")
    lora = write_tiny_lora(tmp_path / "l15.safetensors", path, 4, 2.0, 5, layers)
    pipe = _pipe(path)
    pipe.load_lora(lora, 0.9)
    call = dict(num_inference_steps=2, num_frames=17, seed=4)
    ours = pipe(PROMPT, **call).frames
    _close(ours, _reference(path, {"l15": (lora, 0.9)}, max_sequence_length=224, **call))
