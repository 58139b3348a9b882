"""The CogVideoX expert transformer: a DiT over `[text ‖ video]` tokens with adaLN per modality.

Parameter names equal the keys of diffusers' `CogVideoXTransformer3DModel` checkpoints (see layers.py
for the fused q/k/v hooks). Positional embeddings are not parameters: they are computed for the actual
latent grid on first use and cached, so the model can be built on the meta device and loaded with
`load_state_dict(strict=True, assign=True)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend

from .config import TransformerConfig
from .layers import (
    AdaLayerNorm,
    AdaLayerNormZero,
    Attention,
    FeedForward,
    TimestepEmbedding,
    gated_residual_,
    rotary_pos_embed_3d,
    sincos_pos_embed_3d,
    timestep_embedding,
)


class Tokens(NamedTuple):
    """What the blocks see: the joint sequence and what conditions every block."""

    x: Tensor  # (B, L + N, D), `[text ‖ video]`
    text_len: int  # L
    emb: Tensor  # (B, time_embed_dim), the timestep embedding
    rope: tuple[Tensor, Tensor] | None  # cos, sin (L + N, head_dim) (5B); None for 2B (sin-cos added)
    grid: tuple[int, int, int]  # video tokens per axis (frames, height, width)


# What the CogVideoX 1.5 I2V pipeline feeds the `ofs` embedding (diffusers' CogVideoXImageToVideoPipeline, SAT).
I2V_OFS = 2.0


class PatchEmbed(nn.Module):
    """Text: Linear to the model width. Video: non-overlapping p×p patches (a stride-p Conv2d) to tokens;
    CogVideoX 1.5 (`patch_size_t`): p_t×p×p patches over frames too, through a Linear (bias always, as the
    released weights and diffusers have it, whatever `patch_bias` says).

    `learned_positions` (5B-I2V): a trained table over `[text ‖ video]` at the sample grid, the checkpoint's
    persistent `patch_embed.pos_embedding` (1, L + N, D).
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        text_dim: int,
        patch_size: int,
        bias: bool,
        learned_positions: int | None = None,
        patch_size_t: int | None = None,
    ):
        super().__init__()
        self.patch_size, self.patch_size_t = patch_size, patch_size_t
        if patch_size_t is None:
            self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        else:
            self.proj = nn.Linear(in_channels * patch_size_t * patch_size**2, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        if learned_positions is not None:
            self.register_buffer("pos_embedding", torch.zeros(1, learned_positions, dim))

    def forward(self, latents: Tensor, text_embeds: Tensor) -> tuple[Tensor, Tensor]:
        # A stride-p conv on p×p patches is one GEMM over flattened patches; tokens come out in (f h w) order.
        p, t = self.patch_size, self.patch_size_t or 1
        patches = rearrange(latents, "b (f t) c (h p) (w q) -> b (f h w) (c t p q)", t=t, p=p, q=p)
        video = F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
        return self.text_proj(text_embeds), video


class CogVideoXBlock(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        dim, eps = config.inner_dim, config.norm_eps
        self.norm1 = AdaLayerNormZero(config.time_embed_dim, dim, eps)
        self.attn1 = Attention(
            dim, config.num_attention_heads, config.attention_head_dim, bias=config.attention_bias
        )
        self.norm2 = AdaLayerNormZero(config.time_embed_dim, dim, eps)
        self.ff = FeedForward(dim, 4 * dim)

    def forward(self, x: Tensor, text_len: int, emb: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """x: (B, L + N, D) `[text ‖ video]`, updated in place and returned."""
        h, gate, enc_gate = self.norm1(x, text_len, emb)
        gated_residual_(x, text_len, self.attn1(h, rope), gate, enc_gate)
        h, gate, enc_gate = self.norm2(x, text_len, emb)
        return gated_residual_(x, text_len, self.ff(h), gate, enc_gate)


def _with_dynamic_sequence(forward: Callable) -> Callable:
    """Marks the token axis of a block's inputs dynamic (x (B, S, D), RoPE cos/sin (S, d)) before the call.

    Only S, rather than everything (`dynamic=True`): widths and `text_len` stay constants of the graph, and the
    batch (1 or 2) is dynamo's default, a second graph. Should S get specialised while tracing, `mark_dynamic`
    raises at the first compile instead of recompiling per shape up to the limit.
    """

    def dynamic_forward(x: Tensor, text_len: int, emb: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        torch._dynamo.mark_dynamic(x, 1)
        for table in rope or ():
            torch._dynamo.mark_dynamic(table, 0)
        return forward(x, text_len, emb, rope)

    return dynamic_forward


class CogVideoXTransformer(nn.Module):
    """Predicts the denoiser output (v for the released models) for video latents.

    2B style adds a fixed 3D sin-cos embedding to the video tokens; 5B style
    (`use_rotary_positional_embeddings`) rotates the video tokens' queries and keys instead.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        learned = None  # rows of the learned position table: the text, then the sample grid's video tokens
        if config.use_learned_positional_embeddings:
            f, h, w = config.latent_grid
            learned = config.max_text_seq_length + f * (h // config.patch_size) * (w // config.patch_size)
        self.patch_embed = PatchEmbed(
            config.in_channels,
            dim,
            config.text_embed_dim,
            config.patch_size,
            config.patch_bias,
            learned,
            config.patch_size_t,
        )
        self.time_embedding = TimestepEmbedding(dim, config.time_embed_dim)
        if config.ofs_embed_dim is not None:  # CogVideoX 1.5 I2V: added to the time embedding
            self.ofs_embedding = TimestepEmbedding(config.ofs_embed_dim, config.ofs_embed_dim)
        self.transformer_blocks = nn.ModuleList([CogVideoXBlock(config) for _ in range(config.num_layers)])
        self.norm_final = nn.LayerNorm(dim, eps=config.norm_eps)
        self.norm_out = AdaLayerNorm(config.time_embed_dim, dim, config.norm_eps)
        self.proj_out = nn.Linear(dim, config.temporal_patch * config.patch_size**2 * config.out_channels)
        # Position embedding of the last grid seen: (key, value). A plain attribute, not a buffer, so it
        # never enters the state dict and nothing is computed at construction (meta-device builds).
        self._pos_cache: tuple[tuple, object] | None = None

    def compile_blocks(self, backend: str | Callable = "inductor") -> None:
        """torch.compile each block's forward ("regional" compilation): all blocks share one graph, so it compiles
        once, in seconds rather than minutes; the position-embedding cache and the offload hooks stay eager.

        The sequence length (frames × size) is marked dynamic, so one graph per batch size (1 without CFG, 2
        with) serves every video size: a graph per shape would hit dynamo's recompile limit (8 for the code
        object all blocks share) by the 9th, and `fullgraph=True` makes that an error, not a slow fallback.
        """
        for block in self.transformer_blocks:
            block.forward = _with_dynamic_sequence(
                torch.compile(block.forward, fullgraph=True, backend=backend)
            )

    @contextmanager
    def attention_kernel(self, kernel: SDPBackend | None) -> Iterator[None]:
        """Every attention layer of this model calls `kernel` inside the block (None: PyTorch's pick).

        A setting of this model, not of the process (`torch.nn.attention.sdpa_kernel` switches kernels for every
        thread): pipelines on other GPUs, in other threads, keep their own, and code outside keeps PyTorch's.
        """
        attentions = [m for m in self.modules() if isinstance(m, Attention)]
        for attention in attentions:
            attention.kernel = kernel
        try:
            yield
        finally:
            for attention in attentions:
                attention.kernel = None

    def _cached(self, key: tuple, compute: Callable[[], object]):
        if self._pos_cache is None or self._pos_cache[0] != key:
            self._pos_cache = (key, compute())
        return self._pos_cache[1]

    def _sincos(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
        c = self.config
        return self._cached(
            ("sincos", grid, device, dtype),
            lambda: sincos_pos_embed_3d(
                c.inner_dim,
                *grid,
                c.spatial_interpolation_scale,
                c.temporal_interpolation_scale,
                device=device,
                dtype=dtype,
            ),
        )

    def _rope(self, grid: tuple[int, int, int], text_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        c = self.config
        p = c.patch_size

        def compute() -> tuple[Tensor, Tensor]:
            cos, sin = rotary_pos_embed_3d(
                c.attention_head_dim,
                *grid,
                c.sample_height // p,
                c.sample_width // p,
                sliced=c.patch_size_t is not None,
                device=device,
            )
            # Text tokens are not rotated: identity rows (cos 1, sin 0) let RoPE run on the whole sequence.
            text_cos = cos.new_ones(text_len, cos.shape[1])
            return torch.cat([text_cos, cos]), torch.cat([torch.zeros_like(text_cos), sin])

        return self._cached(("rope", grid, text_len, device), compute)

    def embed(self, latents: Tensor, text_embeds: Tensor, timestep: Tensor) -> Tokens:
        """latents (B, F, C, H, W), text_embeds (B, L, text_dim), timestep (B,) -> the blocks' input.

        Computes in the dtype of `latents`, which must match the weights' dtype.
        """
        c = self.config
        _, frames, _, height, width = latents.shape
        p, pt = c.patch_size, c.temporal_patch
        if height % p or width % p:
            raise ValueError(f"latent height and width must be divisible by {p}, got {height}x{width}")
        if frames % pt:
            raise ValueError(f"latent frames must be a multiple of {pt} (pad them first), got {frames}")
        grid = (frames // pt, height // p, width // p)
        text_len = text_embeds.shape[1]

        emb = self.time_embedding(
            timestep_embedding(timestep, c.inner_dim, c.flip_sin_to_cos, c.freq_shift).to(latents.dtype)
        )  # (B, time_embed_dim)
        if c.ofs_embed_dim is not None:
            ofs = torch.full((1,), I2V_OFS, device=latents.device)
            ofs = timestep_embedding(ofs, c.ofs_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            emb = emb + self.ofs_embedding(ofs.to(latents.dtype))

        text, video = self.patch_embed(latents, text_embeds)
        rope = self._rope(grid, text_len, latents.device) if c.use_rotary_positional_embeddings else None
        if c.use_learned_positional_embeddings:
            text, video = self._add_learned(text, video, (frames, height, width))
        elif not c.use_rotary_positional_embeddings:
            video = video + self._sincos(grid, latents.device, latents.dtype)
        x = torch.cat([text, video], dim=1)  # (B, L + N, D)
        return Tokens(x, text_len, emb, rope, grid)

    def _add_learned(self, text: Tensor, video: Tensor, size: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """The learned table on text and video tokens. It holds the sample grid only: another height or width is
        an error; another frame count gets the 3D sin-cos table instead (video tokens), as diffusers does."""
        c = self.config
        frames, height, width = size  # of the latents
        if (height, width) != c.latent_grid[1:]:
            raise ValueError(
                f"this checkpoint's learned positional embeddings cover {c.sample_height}x{c.sample_width} "
                f"latents only, got {height}x{width}"
            )
        if frames != c.latent_grid[0]:
            grid = (frames, height // c.patch_size, width // c.patch_size)
            return text, video + self._sincos(grid, video.device, video.dtype)
        if text.shape[1] != c.max_text_seq_length:
            raise ValueError(f"the learned positional embeddings need {c.max_text_seq_length} text tokens")
        table = self.patch_embed.pos_embedding.to(video.dtype)  # (1, L + N, D)
        return text + table[:, : text.shape[1]], video + table[:, text.shape[1] :]

    def run_blocks(self, tokens: Tokens) -> Tensor:
        """The transformer blocks on `tokens.x` (updated in place and returned), (B, L + N, D)."""
        x = tokens.x
        for block in self.transformer_blocks:
            x = block(x, tokens.text_len, tokens.emb, tokens.rope)
        return x

    def head(self, x: Tensor, tokens: Tokens) -> Tensor:
        """The blocks' output (B, L + N, D) -> prediction (B, F, C_out, H, W), from the video tokens."""
        p, t = self.config.patch_size, self.config.temporal_patch
        frames, height, width = tokens.grid
        video = self.norm_out(self.norm_final(x[:, tokens.text_len :]), tokens.emb)
        out = self.proj_out(video)  # (B, N, C_out·t·p·p)
        pattern = "b (f h w) (c t p q) -> b (f t) c (h p) (w q)"
        return rearrange(out, pattern, f=frames, h=height, w=width, t=t, p=p, q=p)

    def forward(self, latents: Tensor, text_embeds: Tensor, timestep: Tensor) -> Tensor:
        """latents (B, F, C, H, W), text_embeds (B, L, text_dim), timestep (B,) -> (B, F, C_out, H, W).

        `embed`, `run_blocks` and `head` in a row; a step cache (cogvideox/cache.py) calls them itself.
        """
        tokens = self.embed(latents, text_embeds, timestep)
        return self.head(self.run_blocks(tokens), tokens)
