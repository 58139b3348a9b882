"""Step cache: skip the transformer blocks on steps whose input barely changed (TeaCache, Liu et al. 2024).

TeaCache's CogVideoX variant (ali-vilab/TeaCache, `TeaCache4CogVideoX1.5/teacache_sample_video.py`): the
indicator is the relative L1 change of the timestep embedding `emb` since the previous step (for CogVideoX
it tracks the output better than the modulated input, TeaCache issue #4), mapped through a polynomial fitted
on the released models and accumulated over steps. While the sum stays under the threshold the blocks are
skipped and their last residual (output minus input, text and video tokens) is added to the new input; a
computed step resets the sum. The first and the last step are always computed.

The cache wraps the transformer's forward (`StepCache.wrap`), so the sampler does not change: skipping a step
means the blocks are not called at all, which is also what the offload hooks and compiled blocks need.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .config import TransformerConfig

# Named thresholds: TeaCache's "slow" (≈1.5x on CogVideoX) and "fast" (≈2x) settings.
PRESETS = {"quality": 0.1, "fast": 0.2}
# TeaCache's rescaling polynomials (highest power first), fitted per released model: CogVideoX-2B, -5B (its
# -5B-I2V too) and, from `TeaCache4CogVideoX1.5/teacache_sample_video.py`, CogVideoX1.5-5B and 1.5-5B-I2V.
COEFFICIENTS = {
    "2b": (-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03),
    "5b": (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02),
    "1.5": (2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02),
    "1.5-i2v": (1.22842302e02, -1.04088754e02, 2.62981677e01, -3.06009921e-01, 3.71213220e-02),
}


def resolve_step_cache(value) -> float | None:
    """The threshold a `step_cache` setting means: None (off), a preset name, or a finite number >= 0.

    Raises ValueError, saying what is allowed, for anything else. No heavy work.
    """
    if value is None:
        return None
    names = " or ".join(repr(n) for n in PRESETS)
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"step_cache must be None, {names} or a number >= 0, got {value!r}")
        return PRESETS[value]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"step_cache must be None, {names} or a number >= 0, got {value!r}")
    value = value.item() if isinstance(value, (np.integer, np.floating)) else value
    # Compared, not converted: float(10**400) would raise OverflowError.
    if not 0 <= value <= sys.float_info.max:  # NaN and infinity fail too
        shown = value if abs(value) < 1e12 else "a number out of range"
        raise ValueError(f"step_cache threshold must be a finite number >= 0, got {shown}")
    return float(value)


class StepCache:
    """One generation's cache: the decision state and the last residual. Make a new one per run."""

    def __init__(self, threshold: float, coefficients: tuple[float, ...], num_steps: int):
        self.threshold, self.coefficients, self.num_steps = threshold, coefficients, num_steps
        self.step = 0  # calls so far
        self.computed = 0  # calls that ran the blocks
        self.accumulated = 0.0
        self.previous_emb: Tensor | None = None
        self.residual: Tensor | None = None  # (B, L + N, D)

    @classmethod
    def for_model(cls, threshold: float, config: TransformerConfig, num_steps: int) -> StepCache:
        """With the polynomial of the model family: CogVideoX 1.5 (`patch_size_t`; T2V or I2V), else 5B-style
        (rotary) or 2B-style."""
        if config.patch_size_t is not None:
            style = "1.5-i2v" if config.image_to_video else "1.5"
        else:
            style = "5b" if config.use_rotary_positional_embeddings else "2b"
        return cls(threshold, COEFFICIENTS[style], num_steps)

    def should_compute(self, emb: Tensor) -> bool:
        """The decision for this call, from the timestep embedding (B, D): one for the whole (CFG) batch."""
        edge = self.step == 0 or self.step >= self.num_steps - 1
        if edge or self.previous_emb is None:
            compute = True
        else:
            prev, emb32 = self.previous_emb, emb.float()
            change = ((emb32 - prev).abs().mean() / prev.abs().mean()).item()
            self.accumulated += float(np.polyval(self.coefficients, change))
            # The polynomial goes below 0 outside the range it was fitted on: threshold 0 must say "never skip".
            compute = not (self.threshold > 0 and self.accumulated < self.threshold)
        if compute:
            self.accumulated = 0.0
        self.previous_emb = emb.float()
        self.step += 1
        return compute

    def wrap(self, transformer) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """`transformer`'s forward (latents, text_embeds, timestep) -> prediction, with the blocks cached."""

        def forward(latents: Tensor, text_embeds: Tensor, timestep: Tensor) -> Tensor:
            tokens = transformer.embed(latents, text_embeds, timestep)
            if self.should_compute(tokens.emb):
                before = tokens.x.clone()  # the blocks update x in place
                x = transformer.run_blocks(tokens)
                self.residual = torch.sub(x, before, out=before)
                self.computed += 1
            else:
                x = tokens.x.add_(self.residual)
            return transformer.head(x, tokens)

        return forward
