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
from cogvideox.testing import write_tiny_lora

PROMPT = "a wooden toy ship glides over a blue carpet"
CALL = dict(num_inference_steps=2, num_frames=9, seed=3)
# Beyond attention: the 2B's patch embedding is a Conv2d (its LoRA a convolution pair), and the adaptive norms.
MOTION_LAYERS = (
    "attn1.to_k",
    "attn1.to_out.0",
    "ff.net.0.proj",
    "norm1.linear",
    "proj_out",
    "patch_embed.proj",
)


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


def _assert_weights_equal(got: dict, want: dict) -> None:
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.fixture(scope="module")
def lora_video(tiny_2b, loras):
    """The resident pipeline's video with style at 0.7 and motion at 1.3."""
    pipe = _pipe(tiny_2b)
    pipe.load_lora(loras["style"], 0.7)
    pipe.load_lora(loras["motion"], 1.3)
    return pipe(PROMPT, **CALL)


@pytest.fixture
def pipe(tiny_2b, loaded):
    """The module's loaded pipeline with no LoRA, left so after the test."""
    yield loaded
    loaded.unload_lora()


@pytest.fixture(scope="module")
def loaded(tiny_2b):
    pipe = _pipe(tiny_2b)
    pipe.load()
    return pipe


@pytest.fixture(scope="module")
def base(loaded):
    """The tiny 2B without LoRAs: its transformer weights and its video."""
    return _weights(loaded), loaded(PROMPT, **CALL).frames


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
def test_two_loras_give_diffusers_video(tiny_2b, loras, base, lora_video):
    """lora_alpha != rank and an alpha_pattern read from diffusers' metadata, a LoRA without metadata, a
    convolution's LoRA, scales other than 1: diffusers' load_lora_weights + set_adapters video within 2/255."""
    adapters = {"style": (loras["style"], 0.7), "motion": (loras["motion"], 1.3)}
    ours = lora_video
    want = _reference(tiny_2b, adapters, **CALL)
    _close(ours.frames, want)
    assert np.abs(base[1].astype(int) - want.astype(int)).mean() > 5  # the LoRAs change the video a lot
    digest = hashlib.sha256(loras["style"].read_bytes()).hexdigest()
    assert ours.settings["loras"][0] == {"name": "style", "sha256": digest, "scale": 0.7}
    assert [x["name"] for x in ours.settings["loras"]] == ["style", "motion"]


def test_cogvideox_15_lora_folds_as_diffusers_fuses(tmp_path):
    """CogVideoX 1.5 (its patch embedding a Linear over temporal patches): the folded weights are diffusers'
    after load_lora_adapter + set_adapters + fuse_lora (the transformer alone: no video needed)."""
    from diffusers import CogVideoXPipeline as Reference
    from diffusers import CogVideoXTransformer3DModel

    from cogvideox.lora import LoraSet
    from cogvideox.offload import Offloader
    from cogvideox.testing import _config_json, _write_module, tiny_configs
    from cogvideox.transformer import CogVideoXTransformer

    config = tiny_configs("1.5")[0]
    folder = tmp_path / "transformer"
    torch.manual_seed(0)
    _write_module(folder, CogVideoXTransformer(config), _config_json(config, "x"), torch.float32)
    layers = ("attn1.to_q", "attn1.to_out.0", "patch_embed.proj", "norm_out.linear")
    lora = write_tiny_lora(tmp_path / "l15.safetensors", tmp_path, 4, 2.0, 5, layers)
    ours = CogVideoXTransformer(config)
    ours.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"))
    LoraSet(config, lambda: (ours, Offloader("cpu", "resident"), folder)).load(lora, 0.9, None)
    theirs = CogVideoXTransformer3DModel.from_pretrained(folder)
    # As load_lora_weights does: the file's metadata read by the pipeline's loader (the model's alone skips it)
    state, metadata = Reference.lora_state_dict(str(lora), return_lora_metadata=True)
    theirs.load_lora_adapter(state, adapter_name="l15", prefix="transformer", metadata=metadata)
    theirs.set_adapters(["l15"], [0.9])
    theirs.fuse_lora()
    want = {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    got = ours.state_dict()
    assert set(got) == set(want)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
    base = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert [k for k in got if not torch.equal(got[k], base[k])] == [
        "patch_embed.proj.weight",
        "transformer_blocks.0.attn1.to_q.weight",
        "transformer_blocks.0.attn1.to_out.0.weight",
        "transformer_blocks.1.attn1.to_q.weight",
        "transformer_blocks.1.attn1.to_out.0.weight",
        "norm_out.linear.weight",
    ]


# -- layouts --------------------------------------------------------------------------------------------------


def _layouts(tmp_path, loras) -> dict[str, tuple]:
    """The same updates in each layout people publish, each with the scale that makes it fold like `motion` at 1:
    kohya's (alpha 1 of rank 2: half the factor, so scale 2), SAT's names (style's attention layers, alpha = rank,
    like diffusers' file of the same tensors without metadata), ComfyUI's and PEFT's own key forms."""
    motion, style = load_file(loras["motion"]), load_file(loras["style"])
    pairs = {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): (
            v,
            motion[k.replace("lora_A", "lora_B")],
        )
        for k, v in motion.items()
        if "lora_A" in k
    }
    kohya = {}
    for name, (a, b) in pairs.items():
        flat = "lora_unet_" + name.replace(".", "_")
        kohya |= {
            f"{flat}.lora_down.weight": a,
            f"{flat}.lora_up.weight": b,
            f"{flat}.alpha": torch.tensor(1.0),
        }
    sat, plain = {}, {}
    for i in range(2):
        for j, qkv in enumerate(("to_q", "to_k", "to_v", "to_out.0")):
            kind, index = ("dense", 0) if qkv == "to_out.0" else ("query_key_value", j)
            for part, ab in (("A", "lora_A"), ("B", "lora_B")):
                key = f"transformer.transformer_blocks.{i}.attn1.{qkv}.{ab}.weight"
                sat[
                    f"model.diffusion_model.transformer.layers.{i}.attention.{kind}.matrix_{part}.{index}"
                ] = style[key]
                plain[key] = style[key]
    files = {
        "kohya": ({**kohya}, 2.0),
        "comfy": ({k.replace("transformer.", "diffusion_model.", 1): v for k, v in motion.items()}, 1.0),
        "peft": (
            {
                k.replace("transformer.", "base_model.model.", 1).replace(".weight", ".default.weight"): v
                for k, v in motion.items()
            },
            1.0,
        ),
        "sat": (sat, 1.0),
        "sat-exported": (plain, 1.0),
    }
    for name, (tensors, _) in files.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
    return {name: (tmp_path / f"{name}.safetensors", scale) for name, (_, scale) in files.items()}


def test_every_layout_folds_the_same_weights(pipe, loras, tmp_path):
    files = _layouts(tmp_path, loras)
    folded = {}
    for name, (file, scale) in [("motion", (loras["motion"], 1.0)), *files.items()]:
        assert pipe.load_lora(file, scale) == name
        folded[name] = _weights(pipe)
        pipe.unload_lora(name)
    for name in ("kohya", "comfy", "peft"):
        _assert_weights_equal(folded[name], folded["motion"])
    _assert_weights_equal(folded["sat"], folded["sat-exported"])
    assert any(not torch.equal(folded["sat"][k], folded["motion"][k]) for k in folded["sat"])


# -- folding: scales, restore, memory modes, compile ----------------------------------------------------------


def test_a_weight_depends_on_the_scales_wanted_only_and_unload_restores_it_bit_for_bit(
    pipe, tiny_2b, loras, base, monkeypatch
):
    from cogvideox import lora

    pipe.load_lora(loras["style"], 0.3)
    pipe.load_lora(loras["motion"], -1.0)
    pipe.set_lora_scale("style", 1.5)
    pipe.set_loras({"motion": 0.5, "style": 1.5})
    direct = _pipe(tiny_2b)
    direct.load_lora(loras["style"], 1.5)  # before the weights load: folded as they load
    direct.load_lora(loras["motion"], 0.5)
    direct.load()
    _assert_weights_equal(_weights(pipe), _weights(direct))
    # The same scales again: nothing read, nothing written. One scale changed: only its layers.
    reads, real = [], lora.read_tensors
    monkeypatch.setattr(lora, "read_tensors", lambda *a, **k: reads.append(a[1]) or real(*a, **k))
    pipe.set_loras({"style": 1.5, "motion": 0.5})
    assert reads == []
    pipe.set_loras({"style": 1.5})  # motion to 0: loaded, not applied
    # motion's layers: per block to_qkv, to_out.0 (style's too), ff.net.0.proj, norm1.linear; proj_out, patch_embed
    assert len(reads) == pipe.loras.last_fold["layers"] == 2 * 4 + 2
    pipe.unload_lora()
    _assert_weights_equal(_weights(pipe), base[0])
    assert pipe.loras.folded == {} and pipe.loras.scales == {}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_every_memory_mode_gives_the_resident_video(tiny_2b, loras, lora_video, mode):
    """Off-device modes keep the weights in host packs: folding writes there (sequential: each block's pack,
    streamed). Model mode folds as the weights load; sequential after, then rescales."""
    pipe = _pipe(tiny_2b, memory_mode=mode)
    if mode == "sequential":
        pipe.load()
    pipe.load_lora(loras["style"], -0.4 if mode == "sequential" else 0.7)
    pipe.load_lora(loras["motion"], 1.3)
    pipe.set_lora_scale("style", 0.7)
    np.testing.assert_array_equal(pipe(PROMPT, **CALL).frames, lora_video.frames)
    assert all(p.numel() == 0 for p in pipe.transformer.parameters())  # still off the device between runs


@pytest.mark.slow
def test_a_new_scale_under_compile_recompiles_nothing(pipe, loras):
    """Weights change in place: the compiled blocks' graph (dynamo's, counted as tests/test_compile.py does) takes
    the new values as inputs, and its output is the eager model's with the same weights."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(2, 3, 4, 8, 12, generator=g),
        torch.randn(2, 226, 32, generator=g),
        torch.tensor([500, 500]),
    )
    torch._dynamo.reset()
    blocks = pipe.transformer.transformer_blocks
    pipe.load_lora(loras["style"], 0.5)
    pipe.transformer.compile_blocks(backend=counting_backend)
    try:
        with torch.inference_mode():
            before = pipe.transformer(*args)
            pipe.set_lora_scale("style", 1.0)
            after = pipe.transformer(*args)
            for block in blocks:
                del block.forward  # the class's eager forward
            eager = pipe.transformer(*args)
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    assert len(graphs) == 1  # batch 2, both blocks, both scales
    torch.testing.assert_close(after, eager)
    assert (after - before).abs().max() > 1e-2


# -- bad input: one clear error, nothing changed ------------------------------------------------------------------


def _bad_files(tmp_path, loras) -> list[tuple]:
    """(source, scale, name, what the error says) for each way a LoRA can be wrong."""
    style = load_file(loras["style"])
    key = "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"
    files = {
        "damaged": loras["style"].read_bytes()[:200],
        "text": b"not a safetensors file",
        "empty": None,
        "unknown": {"blocks.0.q.down": style[key]},
        "elsewhere": {
            **style,
            "transformer.transformer_blocks.7.attn1.to_q.lora_A.weight": style[key].clone(),
        },
        "encoder": {"text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": style[key]},
        "wide": {
            key: torch.zeros(4, 64),
            key.replace("lora_A", "lora_B"): torch.zeros(32, 4),
        },  # a wider model's
        "alone": {key: style[key]},
        "nan": {**style, key: style[key] * float("nan")},
    }
    for name, content in files.items():
        path = tmp_path / f"{name}.safetensors"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            save_file(content or {}, path)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a", "b"):
        shutil.copy(loras["motion"], two / f"{name}.safetensors")
    return [
        (tmp_path / "missing.safetensors", 1.0, None, "missing.safetensors': no such file"),
        (
            tmp_path / "damaged.safetensors",
            1.0,
            None,
            "damaged.safetensors is damaged or not a safetensors file",
        ),
        (tmp_path / "text.safetensors", 1.0, None, "text.safetensors is damaged or not a safetensors file"),
        (tmp_path / "empty.safetensors", 1.0, None, "empty.safetensors holds no tensors"),
        (
            tmp_path / "unknown.safetensors",
            1.0,
            None,
            "unknown.safetensors: unknown layout: 'blocks.0.q.down'",
        ),
        (
            tmp_path / "elsewhere.safetensors",
            1.0,
            None,
            "'transformer.transformer_blocks.7.attn1.to_q.lora_A.weight' matches no layer",
        ),
        (
            tmp_path / "encoder.safetensors",
            1.0,
            None,
            "'text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight' matches no layer",
        ),
        (
            tmp_path / "wide.safetensors",
            1.0,
            None,
            f"{key}' updates a 32x64 weight .* this model's transformer_blocks.0.attn1.to_q is 32x32",
        ),
        (tmp_path / "alone.safetensors", 1.0, None, f"{key}' has no up \\(B\\) matrix"),
        (tmp_path / "nan.safetensors", 1.0, None, "NaN or infinite"),
        (two, 1.0, None, "must hold one .safetensors file .* it holds a.safetensors, b.safetensors"),
        (loras["motion"], 4.5, None, r"LoRA scale must be a number in \[-4, 4\], got 4.5"),
        (loras["motion"], float("nan"), None, "LoRA scale must be"),
        (loras["motion"], True, None, "LoRA scale must be"),
        (loras["motion"], 1.0, "style", "a LoRA named 'style' is loaded already"),
        (loras["motion"], 1.0, " ", "LoRA name must be a non-empty string"),
        ("someone/missing-lora", 1.0, None, "could not get it from the Hugging Face Hub"),
        ("../nowhere", 1.0, None, "no such file or folder"),
    ]


def test_a_bad_lora_is_one_clear_error_and_changes_nothing(pipe, loras, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.load_lora(loras["style"], 0.8)
    weights, scales, folded = _weights(pipe), dict(pipe.loras.scales), dict(pipe.loras.folded)
    for source, scale, name, message in _bad_files(tmp_path, loras):
        with pytest.raises(ValueError, match=message):
            pipe.load_lora(source, scale, name)
        _assert_weights_equal(_weights(pipe), weights)
        assert (pipe.loras.scales, pipe.loras.folded) == (scales, folded)
    for call, message in [
        (lambda: pipe.set_lora_scale("nope", 1.0), r"no LoRA named 'nope' is loaded; loaded: \['style'\]"),
        (lambda: pipe.set_loras({"style": 9}), "LoRA scale must be"),
        (lambda: pipe.unload_lora("nope"), "no LoRA named 'nope'"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
        assert pipe.loras.scales == scales
    _assert_weights_equal(_weights(pipe), weights)


def test_a_fold_that_fails_puts_the_old_loras_back(tiny_2b, loras, tmp_path):
    """The checkpoint's file gone after loading: the new LoRA is not kept, the error names the folder."""
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_2b, copy)
    pipe = _pipe(copy)
    pipe.load()
    (copy / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights in .*ckpt/transformer"):
        pipe.load_lora(loras["style"])
    assert pipe.loras.scales == {} and pipe.loras.folded == {}


def test_a_folder_or_a_diffusers_folder_is_a_source(pipe, loras, tmp_path):
    folder = tmp_path / "my-style"
    folder.mkdir()
    shutil.copy(loras["style"], folder / "pytorch_lora_weights.safetensors")
    shutil.copy(loras["motion"], folder / "other.safetensors")
    assert pipe.load_lora(folder) == "my-style"  # diffusers' file name picked, the folder's name given
    assert pipe.load_lora(loras["motion"].parent / "motion.safetensors", name="m2") == "m2"
    assert pipe.loras.scales == {"my-style": 1.0, "m2": 1.0}


# -- the command line ---------------------------------------------------------------------------------------------


def test_lora_flag_takes_the_scale_after_the_last_colon_only_when_it_is_a_number():
    assert cli.lora_flag("style.safetensors") == ("style.safetensors", 1.0)
    assert cli.lora_flag("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert cli.lora_flag("a:b/style.safetensors:-1.5") == ("a:b/style.safetensors", -1.5)
    assert cli.lora_flag("owner/name:4") == ("owner/name", 4.0)
    assert cli.lora_flag("odd:name.safetensors") == ("odd:name.safetensors", 1.0)
    for text in ("style:4.01", "style:-5", "style:nan", "style:inf", ":0.5"):
        with pytest.raises(Exception, match=r"scale must be in|needs a file"):
            cli.lora_flag(text)


@pytest.mark.slow
def test_cli_lora_flags_and_sidecar(tmp_path, capsys):
    style = write_tiny_lora(tmp_path / "style.safetensors", "tiny-random", 4, 8.0, 1)
    motion = write_tiny_lora(tmp_path / "motion.safetensors", "tiny-random", 2, None, 2)
    out = tmp_path / "fox.mp4"
    argv = ["--model", "tiny-random", "--prompt", "a fox", "--frames", "9", "--steps", "1", "--device", "cpu"]
    argv += ["--seed", "7", "--lora", f"{style}:0.8", "--lora", str(motion), "--output", str(out)]
    assert cli.main(argv) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (style, motion)]
    assert sidecar["loras"] == [
        {"name": "style", "sha256": digests[0], "scale": 0.8},
        {"name": "motion", "sha256": digests[1], "scale": 1.0},
    ]
    # A bad one: one line, exit 2, before any weights load, no file written.
    capsys.readouterr()
    bad = [*argv[:-1], str(tmp_path / "x.mp4"), "--lora", str(tmp_path / "nope.safetensors")]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: LoRA ") and "nope.safetensors" in err
    assert "loading" not in err and not (tmp_path / "x.mp4").exists()
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--lora", "style.safetensors:7"])
    assert exit_.value.code == 2
