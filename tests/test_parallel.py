"""One clip denoised on several processes (cogvideox/parallel.py): gloo on loopback, tiny random checkpoints.

Each world size is launched once (benchmarks/bench_parallel.py's worker: processes forked from a server that
imported the package once) and runs several jobs; the tests read their records. A parallel run must give one
process's video within 2/255, and its model call the plain transformer's output to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bench_parallel import PROMPT, bytes_per_step, launch, write_checkpoint
from cogvideox import CogVideoXPipeline
from cogvideox import __main__ as cli
from cogvideox.config import PRESETS, TransformerConfig, VAEConfig
from cogvideox.parallel import Parallel, check_degrees, degrees, group_ranks, split_sizes, video_tokens
from cogvideox.testing import free_port, tiny_random_checkpoint, write_tiny_lora
from cogvideox.video import read_mp4, write_mp4

ROOT = Path(__file__).resolve().parents[1]
# 9 frames at 48x80: 3 x 3 x 5 = 45 video tokens (2 ranks: 23 + 22). 17 frames at 32x64: 5 x 2 x 4 = 40 (3 ranks:
# 14 + 13 + 13). Both uneven where they are used, with a real spatial grid for RoPE.
ODD = dict(num_frames=9, height=48, width=80, num_inference_steps=2, seed=3)
FORTY = dict(num_frames=17, height=32, width=64, num_inference_steps=2, seed=5)
CACHED = dict(ODD, num_inference_steps=5, step_cache=0.3)
# CogVideoX 1.5 (6 heads, split as the released 48 are: 2 and 3 divide both). A video of one frame: one latent
# frame padded to a temporal patch of two, 1 x 3 x 5 = 15 tokens (8 + 7). Model calls on padded latents: 17 frames
# at 48x80, 3 x 3 x 5 = 45 tokens (23 + 22); 33 at 32x64, 5 x 2 x 4 = 40 (14 + 13 + 13).
V15 = dict(num_frames=1, height=48, width=80, num_inference_steps=2, seed=3)
CACHED15 = dict(V15, num_inference_steps=6, step_cache=30)  # the tiny model's embedding moves far per step
F15_2, F15_3 = dict(V15, num_frames=17), dict(V15, num_frames=33, height=32, width=64)
SAMPLE = dict(
    num_frames=17, height=64, width=96, num_inference_steps=2, seed=5
)  # i2v: its learned table's grid


# -- the layout, without processes ----------------------------------------------------------------------------


def test_degrees_follow_the_world_size_and_guidance():
    assert degrees("cfg,sp", 6, cfg_on=True) == (2, 3)
    assert degrees("cfg,sp", 6, cfg_on=False) == (1, 6)  # no CFG pass to split: all of it is sp
    assert degrees("sp", 4, cfg_on=True) == (1, 4)
    assert degrees("cfg", 2, cfg_on=True) == (2, 1)
    for modes, world, cfg_on, message in [
        ("cfg", 4, True, "parallel cfg runs on exactly 2 processes, got 4; use cfg,sp for more"),
        ("cfg", 2, False, "parallel cfg needs guidance"),
        ("cfg,sp", 3, True, "even number of processes (2 for CFG × sp), got 3; use sp"),
        ("tp", 2, True, "parallel must be cfg, sp or cfg,sp, got 'tp'"),
        ("sp,sp", 2, True, "parallel must be cfg, sp or cfg,sp"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            degrees(modes, world, cfg_on)


def test_degrees_must_divide_the_heads_and_the_error_names_those_that_do():
    two_b, five_b = PRESETS["2b"]["transformer"], PRESETS["5b"]["transformer"]
    for config, sp in [(two_b, 2), (two_b, 3), (two_b, 6), (five_b, 4), (five_b, 8)]:
        check_degrees(config, 2, sp, cfg_on=True, video_tokens=17_550)
    with pytest.raises(
        ValueError,
        match=r"degree 4 does not divide the model's 30 attention heads; degrees that "
        r"work: 1, 2, 3, 5, 6, 10, 15, 30$",
    ):
        check_degrees(two_b, 1, 4, cfg_on=True, video_tokens=17_550)
    with pytest.raises(
        ValueError, match=r"degree 5 does not divide the model's 48 .* 1, 2, 3, 4, 6, 8, 12, 16, 24, 48$"
    ):
        check_degrees(five_b, 2, 5, cfg_on=True, video_tokens=17_550)
    with pytest.raises(ValueError, match="needs guidance_scale > 1"):
        check_degrees(two_b, 2, 1, cfg_on=False, video_tokens=17_550)
    with pytest.raises(ValueError, match="must be 1 or 2"):
        check_degrees(two_b, 3, 1, cfg_on=True, video_tokens=17_550)
    check_degrees(two_b, 1, 30, cfg_on=True, video_tokens=30)
    check_degrees(
        two_b, 2, 1, cfg_on=True, video_tokens=30, compiled=True
    )  # CFG parallel leaves the blocks alone
    with pytest.raises(ValueError, match="sequence parallel does not run compiled blocks"):
        check_degrees(two_b, 1, 2, cfg_on=True, video_tokens=30, compiled=True)
    with pytest.raises(ValueError, match="exceeds the 29 video tokens"):
        check_degrees(two_b, 1, 30, cfg_on=True, video_tokens=29)


def test_group_layout_keeps_sequence_groups_on_consecutive_ranks():
    cfg_groups, sp_groups = group_ranks(2, 3)
    assert sp_groups == [[0, 1, 2], [3, 4, 5]]  # one node's GPUs: they exchange every layer
    assert cfg_groups == [[0, 3], [1, 4], [2, 5]]  # once a step
    for cfg, sp in [(1, 4), (2, 1), (2, 2), (2, 5)]:
        cfg_groups, sp_groups = group_ranks(cfg, sp)
        for groups, size in ((cfg_groups, cfg), (sp_groups, sp)):
            assert sorted(r for g in groups for r in g) == list(range(cfg * sp))  # each rank once
            assert all(len(g) == size for g in groups)
        # a rank's sequence-parallel position is the same in both of its groups' orders
        assert all(
            sp_groups[r // sp].index(r) == r % sp and cfg_groups[r % sp].index(r) == r // sp
            for r in range(cfg * sp)
        )


def test_uneven_split_sizes_and_token_count():
    assert split_sizes(175, 3) == [59, 58, 58]
    assert split_sizes(40, 3) == [t.numel() for t in torch.arange(40).tensor_split(3)]
    assert split_sizes(4, 4) == [1, 1, 1, 1]
    assert video_tokens(PRESETS["2b"]["transformer"], PRESETS["2b"]["vae"], 49, 480, 720) == 17_550
    assert video_tokens(TransformerConfig(), VAEConfig(), 9, 48, 80) == 45


def test_a_parallel_layout_needs_a_process_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="init_process_group first"):
        Parallel(cfg=2)


def test_released_traffic_is_computed_from_the_same_formula(capsys):
    from benchmarks import bench_parallel

    two_b, vae = PRESETS["2b"]["transformer"], PRESETS["2b"]["vae"]
    cfg_only = bytes_per_step(two_b, vae, (2, 1), (49, 480, 720), element=2)
    assert cfg_only == {
        "all_to_all": 0,
        "gather": 0,
        "cfg": 13 * 16 * 60 * 90 * 2,
        "total": 13 * 16 * 60 * 90 * 2,
    }
    sp2 = bytes_per_step(two_b, vae, (1, 2), (49, 480, 720), element=2)
    # per layer: q/k/v of 8,775 own tokens for the other rank's 15 heads, and the other rank's outputs back
    per_layer = 3 * 2 * 8775 * 960 + 2 * 960 * (226 + 8775)
    assert sp2["all_to_all"] == 30 * per_layer * 2 and sp2["gather"] == 2 * 8775 * 1920 * 2
    assert bench_parallel.main(["--computed-only"]) == 0
    out = capsys.readouterr().out
    assert "COMPUTED, not measured" in out and "MEASURED" not in out
    assert f"| 2B | 1x2 | 2 | {sp2['total'] / 1e9:.2f} | 0.0 |" in out
    assert "| 5B | 2x4 | 8 |" in out and "| 2B | 1x4 |" not in out  # 30 heads: no sp 4


# -- runs on 2, 3 and 4 processes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_2b):
    """6-head tiny models (2 and 3 divide the heads): 2B style (sin-cos, DDIM) and 5B style (RoPE, DPM)."""
    root = tmp_path_factory.mktemp("parallel")
    return {
        "2b": write_checkpoint(root / "2b", style="2b"),
        "5b": write_checkpoint(root / "5b", style="5b"),
        "i2v": write_checkpoint(root / "i2v", style="i2v"),
        "1.5": write_checkpoint(root / "15", style="1.5"),
        "2heads": tiny_2b,
    }


def job(name, ckpt, cfg, sp, call, forward=False, loras=(), quantize=None):
    return {
        "name": name,
        "ckpt": str(ckpt),
        "cfg": cfg,
        "sp": sp,
        "call": call,
        "forward": forward,
        "loras": [[str(file), scale] for file, scale in loras],
        "quantize": quantize,
    }


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    """Every launch's records by job name; rank 0's frames as `{out}/{name}.npy`. Videos at ODD (45 tokens: 23 + 22
    on 2 ranks); model calls also at FORTY (40 tokens: 14 + 13 + 13 on 3 ranks)."""
    out = tmp_path_factory.mktemp("runs")
    two, five, c15 = checkpoints["2b"], checkpoints["5b"], checkpoints["1.5"]
    records = {}
    drawn = {k: v for k, v in ODD.items() if k != "seed"}  # no seed: each rank draws one, rank 0's is used
    lora = write_tiny_lora(out / "style.safetensors", two, rank=4, alpha=16.0)
    records |= launch(
        2,
        [
            job("cfg2_2b", two, 2, 1, ODD),
            job("cfg2_2b_lora", two, 2, 1, ODD, loras=[(lora, 1.5)]),
            job("cfg2_2b_fp8", two, 2, 1, ODD, quantize="fp8"),  # every rank loads 8-bit weights
            job("sp2_5b", five, 1, 2, ODD),
            job("cfg2_2b_drawn", two, 2, 1, drawn),
            job("fwd_cfg2_2b", two, 2, 1, ODD, True),
            job("fwd_sp2_5b", five, 1, 2, ODD, True),
            job("fwd_sp2_i2v", checkpoints["i2v"], 1, 2, SAMPLE, True),
            job("sp2_15", c15, 1, 2, V15),
            job("fwd_sp2_15", c15, 1, 2, F15_2, True),
            job("fwd_cfg2_15", c15, 2, 1, F15_2, True),
        ],
        out,
    )
    records |= launch(
        3,
        [
            job("sp3_2b", two, 1, 3, ODD),
            job("sp3_5b", five, 1, 3, ODD),
            job("fwd_sp3_2b", two, 1, 3, FORTY, True),
            job("fwd_sp3_5b", five, 1, 3, FORTY, True),
            job("heads", checkpoints["2heads"], 1, 3, ODD),
            job("fwd_sp3_15", c15, 1, 3, F15_3, True),
        ],
        out,
    )
    records |= launch(
        4,
        [
            job("2x2_5b", five, 2, 2, ODD),
            job("2x2_2b_cached", two, 2, 2, CACHED),
            job("fwd_2x2_5b", five, 2, 2, FORTY, True),
            job("2x2_15_cached", c15, 2, 2, CACHED15),
        ],
        out,
    )
    return {"records": records, "out": out, "lora": lora}


@pytest.fixture(scope="module")
def single(checkpoints):
    """One process's result for (checkpoint style, call, quantize): (frames, steps computed), each computed once."""
    pipes, results = {}, {}

    def result(style: str, call: dict, quantize: str | None = None):
        key = (style, json.dumps(call, sort_keys=True), quantize)
        if key not in results:
            if (style, quantize) not in pipes:
                pipes[style, quantize] = CogVideoXPipeline.from_pretrained(
                    checkpoints[style], device="cpu", quantize=quantize
                )
            out = pipes[style, quantize](PROMPT, **call)
            results[key] = (out.frames, out.timings.get("steps_computed", call["num_inference_steps"]))
        return results[key]

    return result


VIDEOS = {  # job: cfg, sp, checkpoint style, call, quantize
    "cfg2_2b": (2, 1, "2b", ODD, None),
    "cfg2_2b_fp8": (2, 1, "2b", ODD, "fp8"),
    "sp2_5b": (1, 2, "5b", ODD, None),
    "sp3_2b": (1, 3, "2b", ODD, None),
    "sp3_5b": (1, 3, "5b", ODD, None),
    "2x2_5b": (2, 2, "5b", ODD, None),
    "2x2_2b_cached": (2, 2, "2b", CACHED, None),
    "sp2_15": (1, 2, "1.5", V15, None),
    "2x2_15_cached": (2, 2, "1.5", CACHED15, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", VIDEOS)
def test_parallel_run_gives_the_single_process_video(runs, single, checkpoints, name):
    cfg, sp, style, call, quantize = VIDEOS[name]
    ranks = runs["records"][name]
    assert all("error" not in r for r in ranks), ranks
    assert [r["frames"] for r in ranks] == [True] + [False] * (len(ranks) - 1)  # only rank 0 decodes
    # every rank holds the weights as asked: all T5 and transformer Linear weights 8-bit, or none
    assert all(r["quantize"] == quantize for r in ranks)
    assert all(r["linears"] > 0 and r["linears_8bit"] == (r["linears"] if quantize else 0) for r in ranks)
    got = np.load(runs["out"] / f"{name}.npy")
    want, computed = single(style, call, quantize)
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    # Every rank computed the steps one process computed (the step cache decides alike everywhere) and sent what
    # the formula says (which then gives the released models' traffic): all-to-alls on computed steps only.
    steps = call["num_inference_steps"]
    assert all(r["steps_computed"] == computed and r["steps"] == steps for r in ranks)
    assert computed < steps if "step_cache" in call else computed == steps
    config = TransformerConfig.from_json(checkpoints[style] / "transformer" / "config.json")
    vae = VAEConfig.from_json(checkpoints[style] / "vae" / "config.json")
    size = (call["num_frames"], call["height"], call["width"])
    for rank, record in enumerate(ranks):
        sent = bytes_per_step(config, vae, (cfg, sp), size, 4, rank)
        assert (
            record["bytes_sent"] == computed * sent["all_to_all"] + steps * (sent["gather"] + sent["cfg"]) > 0
        )


@pytest.mark.slow
def test_a_parallel_run_without_a_seed_uses_rank_0s_on_every_rank(runs, single):
    ranks = runs["records"]["cfg2_2b_drawn"]
    assert all("error" not in r for r in ranks), ranks
    seed = ranks[0]["seed"]
    assert [r["seed"] for r in ranks] == [seed, seed]  # every rank sampled with rank 0's seed, and says so
    got = np.load(runs["out"] / "cfg2_2b_drawn.npy")
    want, _ = single("2b", {**ODD, "seed": seed})  # one process's video for that seed
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


@pytest.mark.slow
def test_a_parallel_run_with_a_lora_gives_the_single_process_video(runs, single, checkpoints):
    """Every rank loads the same LoRA (cogvideox/lora.py): CFG's two halves, each on its own rank, both with it."""
    ranks = runs["records"]["cfg2_2b_lora"]
    assert all("error" not in r for r in ranks), ranks
    got = np.load(runs["out"] / "cfg2_2b_lora.npy")
    pipe = CogVideoXPipeline.from_pretrained(checkpoints["2b"], device="cpu")
    pipe.load_lora(runs["lora"], 1.5)
    want = pipe(PROMPT, **ODD).frames
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    assert np.abs(want.astype(int) - single("2b", ODD)[0].astype(int)).mean() > 5  # the LoRA counts


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        *("fwd_cfg2_2b", "fwd_sp2_5b", "fwd_sp3_2b", "fwd_sp3_5b", "fwd_2x2_5b", "fwd_sp2_i2v"),
        *("fwd_sp2_15", "fwd_cfg2_15", "fwd_sp3_15"),
    ],
)
def test_parallel_model_call_equals_the_transformer(runs, name):
    for rank in runs["records"][name]:  # every rank ends with the whole prediction
        assert rank["max_abs"] > 0.1
        assert rank["max_abs_diff"] <= 1e-5 * rank["max_abs"], rank


@pytest.mark.slow
def test_a_degree_that_does_not_divide_the_heads_fails_on_every_rank(runs):
    for rank in runs["records"]["heads"]:
        assert rank == {
            "error": "sequence parallel degree 3 does not divide the model's 2 attention heads; degrees that work: 1, 2"
        }


# -- the command line ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_under_torchrun_writes_one_video_from_rank_0(tmp_path):
    model = tiny_random_checkpoint()
    output = tmp_path / "fox.mp4"
    cmd = [
        sys.executable,
        *[
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "cogvideox",
            "--model",
            "tiny-random",
            "--prompt",
        ],
        "a red fox trots through fresh snow",
        *["--seed", "7", "--frames", "9", "--steps", "2", "--parallel", "cfg,sp", "--output"],
        str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("wrote ") == 1 and proc.stderr.count("loading model") == 1  # rank 1 is silent
    sidecar = json.loads(output.with_suffix(".json").read_text())
    assert sidecar["parallel"] == {"cfg": 2, "sp": 1} and sidecar["seed"] == 7
    got = read_mp4(output)
    # The same clip from one process, through the same encoder.
    pipe = CogVideoXPipeline.from_pretrained(model, device="cpu")
    frames = pipe("a red fox trots through fresh snow", seed=7, num_frames=9, num_inference_steps=2).frames
    write_mp4(frames, tmp_path / "one.mp4", fps=8)
    want = read_mp4(tmp_path / "one.mp4")
    assert got.shape == want.shape == (9, 64, 96, 3)
    # H.264 turns a 1/255 input difference into up to ~20 here and there: compare the parallel MP4's distance from
    # one process's frames with what the encoder alone costs them (a wrong video is tens of levels off on average).
    codec = np.abs(want.astype(int) - frames.astype(int)).mean()
    assert np.abs(got.astype(int) - frames.astype(int)).mean() <= codec + 0.5


@pytest.mark.parametrize(
    ("flag", "world", "message"),
    [
        (
            "sp",
            "4",
            "error: sequence parallel degree 4 does not divide the model's 2 attention heads; degrees that "
            "work: 1, 2\n",
        ),
        ("cfg", "3", "error: parallel cfg runs on exactly 2 processes, got 3; use cfg,sp for more\n"),
        (
            "sp",
            None,
            "error: parallel runs under torchrun (torchrun --nproc-per-node N -m cogvideox ...): RANK is not "
            "set\n",
        ),
    ],
)
def test_cli_bad_degree_is_one_line_before_any_process_group(
    tmp_path, monkeypatch, capsys, flag, world, message
):
    if world is None:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name, raising=False)
    else:
        env = dict(RANK="0", WORLD_SIZE=world, LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    argv = [
        *["--model", "tiny-random", "--prompt"],
        "a fox",
        *["--frames", "9", "--steps", "2", "--device", "cpu", "--parallel"],
        flag,
        "--output",
        str(tmp_path / "x.mp4"),
    ]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] + "\n" == message
    assert not torch.distributed.is_initialized() and not (tmp_path / "x.mp4").exists()


def test_cli_loads_on_every_rank_before_the_first_collective_of_the_default_group(tmp_path, monkeypatch):
    """Under torchrun the default group is NCCL on GPUs, whose watchdog ends a collective some rank reaches over 10
    minutes late: a rank that loads slowly must do so before that group's first collective (here: gloo, one rank)."""
    import torch.distributed as dist

    from cogvideox import parallel as parallel_module

    env = dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    events = []
    load = CogVideoXPipeline.load
    monkeypatch.setattr(
        CogVideoXPipeline, "load", lambda self, *a, **k: events.append("load") or load(self, *a, **k)
    )
    for name in ("broadcast", "all_reduce", "all_gather", "all_gather_object", "all_to_all", "barrier"):
        real = getattr(dist, name)

        def recorded(*args, _name=name, _real=real, **kwargs):
            group = kwargs.get("group")
            events.append(f"{_name} on {'default' if group in (None, dist.group.WORLD) else 'own'} group")
            return _real(*args, **kwargs)

        monkeypatch.setattr(dist, name, recorded)
    monkeypatch.setattr(parallel_module.atexit, "register", lambda fn: None)  # destroyed here instead
    argv = [
        *["--model", "tiny-random", "--prompt"],
        "a fox",
        *["--frames", "9", "--steps", "2", "--device", "cpu", "--parallel", "sp", "--output"],
        str(tmp_path / "fox.mp4"),
    ]
    try:
        assert cli.main(argv) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    first_default = next(i for i, e in enumerate(events) if e.endswith("on default group"))
    assert events.count("load") == 1 and events.index("load") < first_default, events
    assert (
        "all_gather_object on own group" in events[events.index("load") : first_default]
    )  # all agree they loaded
    sidecar = json.loads((tmp_path / "fox.json").read_text())
    assert sidecar["parallel"] == {"cfg": 1, "sp": 1} and sidecar["timings"]["load"] > 0
