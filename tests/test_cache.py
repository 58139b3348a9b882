"""The step cache (TeaCache): the decision, the residual it reuses, and the pipeline with it on."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvideox import CogVideoXPipeline
from cogvideox.cache import COEFFICIENTS, StepCache, resolve_step_cache
from cogvideox.testing import tiny_configs
from cogvideox.transformer import CogVideoXTransformer

PROMPT = "a lighthouse on a cliff at dusk"
RUN = {"num_inference_steps": 6, "num_frames": 9, "seed": 5}
# On the tiny 2B-style checkpoint, 6 steps: computes steps 1, 2 and 6 (the indicator, not the residual, is random).
MIXED = 0.5


@pytest.fixture(scope="module")
def pipe_2b(tiny_2b):
    return CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")


def trace(pipe, **kwargs):
    """Run the pipeline; returns the result and its events: "B" for each pass through the blocks, then the step."""
    pipe.load()
    events = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: events.append("B"))
    try:
        result = pipe(PROMPT, callback=lambda step, total: events.append(step), **kwargs)
    finally:
        hook.remove()
    return result, events


@pytest.mark.parametrize("guidance", [6.0, 1.0])
def test_threshold_zero_is_the_uncached_video(pipe_2b, guidance):
    plain = pipe_2b(PROMPT, guidance_scale=guidance, **RUN)
    zero, events = trace(pipe_2b, guidance_scale=guidance, step_cache=0.0, **RUN)
    np.testing.assert_array_equal(zero.frames, plain.frames)
    assert events == ["B", 1, "B", 2, "B", 3, "B", 4, "B", 5, "B", 6]
    assert zero.timings["steps_computed"] == 6
    assert (zero.settings["step_cache"], plain.settings["step_cache"]) == (0.0, None)
    assert "steps_computed" not in plain.timings


@pytest.mark.parametrize(("style", "guidance"), [("2b", 6.0), ("2b", 1.0), ("5b", 6.0)])
def test_a_huge_threshold_computes_the_first_and_last_step_only(style, guidance, request):
    pipe = CogVideoXPipeline.from_pretrained(request.getfixturevalue(f"tiny_{style}"), device="cpu")
    plain = pipe(PROMPT, guidance_scale=guidance, **RUN)
    cached, events = trace(pipe, guidance_scale=guidance, step_cache=1e9, **RUN)
    assert events == ["B", 1, 2, 3, 4, 5, "B", 6]  # one decision for the CFG batch: one pass per step
    assert cached.timings["steps_computed"] == 2
    assert not np.array_equal(cached.frames, plain.frames)  # the skipped steps really were skipped


@pytest.mark.parametrize("style", ["2b", "5b"])
def test_a_skipped_step_adds_the_last_residual_of_the_blocks(style):
    # Reimplemented with hooks on the plain module: step a as usual, keeping (blocks' output - their input);
    # at step b the blocks' output is replaced by b's input + that residual. The cache must match bit for bit.
    torch.manual_seed(0)
    model = CogVideoXTransformer(tiny_configs(style)[0]).eval()
    c = model.config
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 7, c.text_embed_dim, generator=g)
    la, lb = (torch.randn(2, 3, c.in_channels, 8, 12, generator=g) for _ in range(2))
    ta, tb = torch.tensor([999, 999]), torch.tensor([979, 979])
    cache = StepCache(1e9, COEFFICIENTS[style], num_steps=3)
    forward = cache.wrap(model)
    first, last = model.transformer_blocks[0], model.transformer_blocks[-1]
    seen = {}
    with torch.inference_mode():
        got_a, got_b = forward(la, text, ta), forward(lb, text, tb)
        assert cache.computed == 1
        hooks = [first.register_forward_pre_hook(lambda m, args: seen.update(input=args[0].clone()))]
        hooks.append(last.register_forward_hook(lambda m, args, out: seen.update(output=out.clone())))
        want_a = model(la, text, ta)
        residual = seen["output"] - seen["input"]
        hooks.pop().remove()
        hooks.append(last.register_forward_hook(lambda m, args, out: seen["input"] + residual))
        want_b = model(lb, text, tb)
        for hook in hooks:
            hook.remove()
        plain_b = model(lb, text, tb)
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)
    assert not torch.allclose(got_b, plain_b, atol=1e-3)  # a skipped step is not the computed one


# Identity-like polynomials make the accumulated change readable: each step below changes emb by 10 %.
@pytest.mark.parametrize(
    ("threshold", "coefficients", "pattern"),
    [
        (0.25, (0, 0, 0, 1, 0), "X..X..XX"),  # 0.1 + 0.1 + 0.1 crosses 0.25: compute, start over
        (0.25, (0, 0, 0, 2, 0), "X.X.X.XX"),  # the polynomial rescales the change before it is added
        (0.0, (0, 0, 0, 0, -1), "XXXXXXXX"),  # threshold 0 never skips, even when the polynomial dips below 0
        (0.5, (0, 0, 0, 0, -1), "X......X"),  # the first and the last step are always computed
    ],
)
def test_the_decision_accumulates_the_rescaled_change_and_resets_when_computed(
    threshold, coefficients, pattern
):
    cache = StepCache(threshold, coefficients, num_steps=8)
    embs = [torch.ones(2, 16) * 1.1**k for k in range(8)]  # (CFG batch, width): one decision for both
    assert "".join("X" if cache.should_compute(e) else "." for e in embs) == pattern


def test_the_change_is_relative_to_the_previous_steps_embedding():
    # emb halves each step: |emb - prev| is 0.5 of the previous one's size but 1.0 of the current one's. TeaCache
    # divides by the previous: 0.5 stays under 0.75 once, then the sum crosses it. By the current, every step would
    # cross it alone ("XXXXXXXX").
    cache = StepCache(0.75, (0, 0, 0, 1, 0), num_steps=8)
    embs = [torch.ones(2, 16) * 0.5**k for k in range(8)]
    assert "".join("X" if cache.should_compute(e) else "." for e in embs) == "X.X.X.XX"


def test_the_polynomial_follows_the_model_family():
    two, five = (StepCache.for_model(0.1, tiny_configs(s)[0], 50) for s in ("2b", "5b"))
    assert two.coefficients == COEFFICIENTS["2b"] and five.coefficients == COEFFICIENTS["5b"]
    assert COEFFICIENTS["2b"][0] == pytest.approx(-3.10658903e01)
    assert COEFFICIENTS["5b"][-1] == pytest.approx(-5.23162339e-02)
    # CogVideoX 1.5 has its own fits (TeaCache4CogVideoX1.5), T2V and I2V apart; the 1.0 I2V shares 5B's
    t2v, i2v, i2v_10 = (StepCache.for_model(0.1, tiny_configs(s)[0], 50) for s in ("1.5", "1.5-i2v", "i2v"))
    assert t2v.coefficients == COEFFICIENTS["1.5"] and i2v.coefficients == COEFFICIENTS["1.5-i2v"]
    assert i2v_10.coefficients == COEFFICIENTS["5b"]
    # Every value as TeaCache publishes them (TeaCache4CogVideoX1.5/teacache_sample_video.py, `coefficients_dict`)
    assert COEFFICIENTS["1.5"] == (
        2.50210439e02,
        -1.65061612e02,
        3.57804877e01,
        -7.81551492e-01,
        3.58559703e-02,
    )
    assert COEFFICIENTS["1.5-i2v"] == (
        1.22842302e02,
        -1.04088754e02,
        2.62981677e01,
        -3.06009921e-01,
        3.71213220e-02,
    )


def test_presets_and_numbers_resolve_to_thresholds():
    assert resolve_step_cache(None) is None
    assert (resolve_step_cache("quality"), resolve_step_cache("fast")) == (0.1, 0.2)
    assert resolve_step_cache(0) == 0.0 and resolve_step_cache(np.float32(0.5)) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step_cache": "turbo"}, "step_cache must be None, 'quality' or 'fast'"),
        ({"step_cache": "0.1"}, "step_cache must be"),
        ({"step_cache": True}, "step_cache must be"),
        ({"step_cache": [0.1]}, "step_cache must be"),
        ({"step_cache": -0.1}, "finite number >= 0"),
        ({"step_cache": float("nan")}, "finite number >= 0"),
        ({"step_cache": float("inf")}, "finite number >= 0"),
        ({"step_cache": 10**400}, "finite number >= 0"),
        ({"preview_every": 0}, "preview_every"),
        ({"preview_every": 1.5}, "preview_every"),
        ({"preview": "yes"}, "preview must be a function"),
    ],
)
def test_bad_settings_are_refused_before_loading(tiny_2b, kwargs, message):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, **kwargs)
    assert not pipe.loaded


@pytest.fixture(scope="module")
def resident_cached(pipe_2b):
    return trace(pipe_2b, step_cache=MIXED, **RUN)


@pytest.mark.parametrize(("mode", "compiled"), [("model", False), ("sequential", False), ("resident", True)])
def test_the_cache_in_every_memory_mode_and_compiled(tiny_2b, resident_cached, mode, compiled):
    want, want_events = resident_cached
    assert want_events == ["B", 1, "B", 2, 3, 4, 5, "B", 6]  # a mix of computed and skipped steps
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", memory_mode=mode)
    pipe.load()
    if compiled:
        torch._dynamo.reset()
        pipe.transformer.compile_blocks(
            backend="eager"
        )  # dynamo's capture and guards, without inductor's minutes
    got, events = trace(pipe, step_cache=MIXED, **RUN)
    assert events == want_events
    assert got.timings["steps_computed"] == 3
    assert np.abs(got.frames.astype(int) - want.frames).max() <= (1 if compiled else 0)
    if mode == "sequential":
        # Only computed steps stream blocks: T5 (1 + 1 + 2), the transformer's own weights and block 0 (1 + 1),
        # each block's successor in each of the 3 passes (2 x 3), the VAE (1). A skipped step copies nothing.
        assert pipe.offloader.copies == 4 + 2 + 2 * 3 + 1


def test_the_benchmark_runs_end_to_end(tmp_path):
    # A smoke test (nothing is timed): the CPU benchmark at the tiny size prints its tables and writes its JSON.
    cmd = [
        sys.executable,
        *[
            "-m",
            "benchmarks.bench_cache",
            "--size",
            "tiny",
            "--steps",
            "4",
            "--calls",
            "3",
            "--threads",
            "1",
            "--ckpt",
        ],
        str(tmp_path / "ckpt"),
        "--out",
        str(tmp_path / "cache.json"),
    ]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| cache decision |" in proc.stdout and "| off+preview | off | 4 |" in proc.stdout
    runs = json.loads((tmp_path / "cache.json").read_text())["runs"]
    assert runs["0"][0]["pattern"] == "XXXX" and runs["off"][0]["steps_computed"] == 4
