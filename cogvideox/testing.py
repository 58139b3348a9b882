"""Tiny random checkpoints in the exact released layout, for tests and for trying the whole flow offline."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import SchedulerConfig, TransformerConfig, VAEConfig

# Sentences for the tokenizer: enough pieces that prompts tokenize into real sub-words.
_CORPUS = [
    "A detailed wooden toy ship with carved masts glides over a plush blue carpet that mimics the sea",
    "The camera follows a white vintage SUV with a black roof rack up a steep dirt road among pine trees",
    "A young girl stands in a war-torn city; her face is smudged with ash, her eyes full of sorrow",
    "A single butterfly with stained glass wings flutters through a field of flowers in bright light",
    "A snowy forest road runs between trees covered in snow while the sun shines on a serene landscape",
    "Extreme close-up of chicken and green pepper kebabs grilling on a barbecue with flames and smoke",
    "The quick brown fox jumps over the lazy dog at sunset, cinematic, vivid colours, shallow focus.",
]


STYLES = ("2b", "5b", "i2v", "1.5", "1.5-i2v")


def tiny_configs(style: str = "2b", scheduler: str = "CogVideoXDDIMScheduler"):
    """Configs of a tiny model shaped like the release: 17 frames of 64x96 pixels (5x8x12 latents).

    style: "2b", "5b" (rotary positions) or "i2v" (CogVideoX-5b-I2V: rotary and learned positions, the image's
    latents beside the noise on the channel axis); "1.5" and "1.5-i2v" (CogVideoX 1.5: two latent frames a
    token, sliced RoPE, 33 frames of 64x96 at most, a 224-token prompt; I2V adds the `ofs` embedding)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if style.startswith("1.5"):
        return _tiny_configs_15(style == "1.5-i2v", scheduler)
    five, i2v = style in ("5b", "i2v"), style == "i2v"
    transformer = TransformerConfig(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=8 if i2v else 4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_frames=17,
        sample_height=8,
        sample_width=12,
        use_rotary_positional_embeddings=five,
        use_learned_positional_embeddings=i2v,
    )
    vae = VAEConfig(
        block_out_channels=(8, 16, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_height=64,
        sample_width=96,
        scaling_factor=0.7 if five else 1.15258426,
    )
    sched = SchedulerConfig(class_name=scheduler, snr_shift_scale=1.0 if five else 3.0)
    return transformer, vae, sched


def _tiny_configs_15(i2v: bool, scheduler: str):
    """The released 1.5 layout (MODEL_NOTES 1.7) at the tiny size of `tiny_configs`: the tiny 5B's (rotary
    positions) with two latent frames a token, no patch bias, a 224-token prompt, `ofs` for I2V, inverted
    latent scaling."""
    transformer, vae, sched = tiny_configs("5b", scheduler)
    transformer = dataclasses.replace(
        transformer,
        in_channels=8 if i2v else 4,
        max_text_seq_length=224,
        patch_size_t=2,
        patch_bias=False,
        ofs_embed_dim=16 if i2v else None,
    )
    return transformer, dataclasses.replace(vae, invert_scale_latents=True), sched


def _config_json(cfg, class_name: str) -> dict:
    data = {"_class_name": class_name, "_diffusers_version": "0.30.0.dev0"}
    data.update({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()})
    return data


def _write_tokenizer(folder: Path) -> int:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_prefix=str(folder / "spiece"),
        vocab_size=160,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    extra = [f"<extra_id_{i}>" for i in range(100)]
    (folder / "special_tokens_map.json").write_text(
        json.dumps({**specials, "additional_special_tokens": extra})
    )
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 226, "extra_ids": 100, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return spm.SentencePieceProcessor(model_file=str(folder / "spiece.model")).get_piece_size() + 100


def _write_text_encoder(folder: Path, vocab_size: int, d_model: int, dtype: torch.dtype) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    model = T5EncoderModel(config).to(dtype)
    # Small shards, so the sharded-with-index path of the release's text encoder is exercised too.
    model.save_pretrained(folder, max_shard_size="40KB")


def _write_module(folder: Path, module: torch.nn.Module, config: dict, dtype: torch.dtype) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors")


def write_tiny_checkpoint(
    path: str | Path,
    style: str = "2b",
    scheduler: str = "CogVideoXDDIMScheduler",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random tiny CogVideoX in the released layout to `path` and return it (style: see `tiny_configs`).

    Built with our own modules; diffusers loads the same folder, so it serves as a parity fixture.
    Its videos are noise: the weights are random (the learned position table of "i2v" too).
    """
    from .transformer import CogVideoXTransformer
    from .vae import CogVideoXVAE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    t_cfg, v_cfg, s_cfg = tiny_configs(style, scheduler)
    torch.manual_seed(seed)
    index = {
        "_class_name": "CogVideoXImageToVideoPipeline" if t_cfg.image_to_video else "CogVideoXPipeline",
        "_diffusers_version": "0.30.0.dev0",
        "scheduler": ["diffusers", s_cfg.class_name],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    transformer = CogVideoXTransformer(t_cfg)
    if t_cfg.use_learned_positional_embeddings:
        transformer.patch_embed.pos_embedding.normal_(std=0.5)
    _write_module(path / "transformer", transformer, _config_json(t_cfg, index["transformer"][1]), dtype)
    _write_module(path / "vae", CogVideoXVAE(v_cfg), _config_json(v_cfg, index["vae"][1]), dtype)
    vocab = _write_tokenizer(path / "tokenizer")
    _write_text_encoder(path / "text_encoder", vocab, t_cfg.text_embed_dim, dtype)
    sched = {k: v for k, v in _config_json(s_cfg, s_cfg.class_name).items() if k != "class_name"}
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    return path


LORA_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")  # what CogVideoX LoRAs train


def write_tiny_lora(
    path: str | Path,
    model: str | Path = "tiny-random",
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    layers: tuple[str, ...] = LORA_LAYERS,
    alpha_pattern: dict[str, float] | None = None,
) -> Path:
    """A random LoRA for the transformer of `model` (a checkpoint folder, or "tiny-random") in diffusers' layout,
    as `save_lora_weights` writes it: `transformer.<layer>.lora_A.weight` and `lora_B` for `layers` of every block
    (a name with a dot before it, "proj_out" say, is taken as it is), and with `alpha` diffusers' adapter metadata
    (`lora_alpha`, `alpha_pattern`; without it, alpha = rank). Its updates are about half the weights' size, so a
    video visibly changes."""
    from .config import TransformerConfig
    from .lora import METADATA_KEY, targets
    from .transformer import CogVideoXTransformer

    root = tiny_random_checkpoint() if str(model) == "tiny-random" else Path(model)
    config = TransformerConfig.from_json(root / "transformer" / "config.json")
    with torch.device("meta"):
        meta = CogVideoXTransformer(config)
    found = targets(config)
    names = [n for n in found if any(n == layer or n.endswith(f".{layer}") for layer in layers)]
    g, state = torch.Generator().manual_seed(seed), {}
    for name in names:
        kernel = meta.get_submodule(found[name].module).weight.shape[
            1:
        ]  # (in,) or a convolution's (C, kh, kw)
        out, fan_in = found[name].shape
        a = torch.randn(rank, *kernel, generator=g) / fan_in**0.5
        b = torch.randn(out, rank, *[1] * (len(kernel) - 1), generator=g) * 0.3 / rank**0.5
        state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = a, b
    metadata = {"format": "pt"}
    if alpha is not None:
        config = {
            "r": rank,
            "lora_alpha": alpha,
            "alpha_pattern": alpha_pattern or {},
            "target_modules": names,
        }
        config = {f"transformer.{k}": v for k, v in config.items()}
        metadata[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    path = Path(path)
    save_file(state, path, metadata=metadata)
    return path


class EchoBackend:
    """A prompt-enhancer backend that stands in for an LLM offline: always answers with `text`."""

    name = "echo"

    def __init__(self, text: str):
        self.text = text

    def chat(self, messages) -> str:
        return self.text

    def release(self) -> None:
        pass


def tiny_random_checkpoint() -> Path:
    """The tiny random model in the temp dir, written once and reused.

    Written beside its final name and renamed into place, with a marker last: a folder with the marker is
    complete; one without (an interrupted write) is replaced."""
    path = Path(tempfile.gettempdir()) / "cogvideox-tiny-random"
    marker = path / ".complete"
    if marker.is_file():
        return path
    staging = Path(tempfile.mkdtemp(prefix=f"{path.name}.", dir=path.parent))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' "Writing model shards" bar
            write_tiny_checkpoint(staging)
        (staging / marker.name).write_text("written for --model tiny-random\n")
        for _ in range(3):
            try:
                return staging.rename(path)
            except OSError:
                if marker.is_file():  # another run got there first
                    return path
                aside = Path(tempfile.mkdtemp(prefix=f"{path.name}.", dir=path.parent))
                with contextlib.suppress(FileNotFoundError):  # another run may have moved it already
                    path.rename(aside)  # onto an empty folder: allowed
                shutil.rmtree(aside, ignore_errors=True)
        raise OSError(f"{path} keeps changing under us")
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed


def free_port() -> int:
    """A free TCP port on loopback, for a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
