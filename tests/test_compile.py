"""Compiled transformer blocks: every video shape the app and CLI allow, within dynamo's recompile limit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from cogvideox.testing import tiny_configs
from cogvideox.transformer import CogVideoXTransformer

# (batch, latent frames, latent height, latent width): five frame counts with CFG off and on, then other sizes.
# More shapes than `torch._dynamo.config.recompile_limit` (8): a graph per shape fails on the 9th.
SHAPES = [(batch, frames, 8, 12) for frames in (2, 3, 5, 7, 13) for batch in (1, 2)]
SHAPES += [(2, 3, 6, 8), (1, 3, 10, 6), (2, 2, 16, 16)]
# CogVideoX 1.5: padded latent frames (two a token: 1 to 9 token frames), grids within its sliced RoPE table (8x12).
# With CFG only (batch 2, one graph: the batch-1 graph is the 1.0 styles' case), still more than the limit.
SHAPES_15 = [(2, frames, 8, 12) for frames in (2, 4, 6, 10, 18)]
SHAPES_15 += [(2, 4, 6, 8), (2, 4, 8, 6), (2, 2, 4, 4), (2, 6, 2, 12)]


def _models(style: str) -> tuple[CogVideoXTransformer, CogVideoXTransformer]:
    torch.manual_seed(0)
    eager = CogVideoXTransformer(tiny_configs(style)[0]).eval()
    return eager, copy.deepcopy(eager)


def _inputs(config, batch: int, frames: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(frames * height * width + batch)
    latents = torch.randn(batch, frames, config.in_channels, height, width, generator=g)
    text = torch.randn(batch, 7, config.text_embed_dim, generator=g)
    return latents, text, torch.randint(0, 1000, (batch,), generator=g)


@pytest.mark.parametrize("style", ["2b", "5b", "1.5"])
def test_one_graph_per_batch_size_serves_every_shape(style):
    # Dynamo (guards, recompiles, the limit) with a backend that runs the captured graph as is and counts it:
    # seconds, where inductor would take minutes for the old one-graph-per-shape code.
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager, compiled = _models(style)
    torch._dynamo.reset()
    compiled.compile_blocks(backend=counting_backend)
    shapes = SHAPES_15 if style == "1.5" else SHAPES
    assert len(shapes) > torch._dynamo.config.recompile_limit
    with torch.inference_mode():
        for shape in shapes:
            args = _inputs(eager.config, *shape)
            torch.testing.assert_close(compiled(*args), eager(*args))
    # batch 2 (CFG) and batch 1, shared by both blocks and every video size
    assert len(graphs) == len({shape[0] for shape in shapes}) == (1 if style == "1.5" else 2)


def test_inductor_compiles_once_across_sizes():
    # Inductor may add guards of its own (divisibility, ranges): one graph for four sequence lengths of both
    # parities, with RoPE tables (5B) marked dynamic alongside the tokens; outputs equal eager's within fp32.
    eager, compiled = _models("5b")
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_blocks()
    with torch.inference_mode():
        for shape in [(2, 2, 8, 12), (2, 3, 8, 12), (2, 5, 6, 8), (2, 2, 16, 16)]:
            args = _inputs(eager.config, *shape)
            torch.testing.assert_close(compiled(*args), eager(*args))
    assert counters["stats"]["unique_graphs"] == 1
