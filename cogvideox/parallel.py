"""One clip denoised by several processes (torch.distributed): classifier-free guidance and sequence parallelism.

- **CFG parallel** (`cfg=2`): the unconditional and the conditional pass of each step run on two ranks, one row
  of the CFG batch each; one all-gather of the prediction per step gives every rank both rows.
- **Sequence parallel** (Ulysses, Jacobs et al. 2023; `sp=P`): the video tokens are split into P contiguous
  runs, one per rank (uneven splits allowed); everything but attention is per token and runs on the rank's own
  tokens. Attention swaps the split: an all-to-all sends each rank the heads it owns (H/P) of every rank's video
  queries, keys and values; after attention a second all-to-all sends each token's outputs back to its rank.
  The heads must therefore divide by P. The 226 text tokens are replicated, not split: every rank holds them
  (the adaLN "experts" keep their `text_len` slices, no ragged second split) and already has every head of
  their q/k/v, so only their attention outputs travel (in the same all-to-all as the video's). The price is
  the text's per-token work repeated on every rank: for 2B's 17,550 + 226 tokens, 1.3 % more work per rank at
  P = 2 and 6 % at P = 6 (attention, over the whole sequence for H/P heads, is the same either way).
  Positions stay right because they are added (2B sin-cos) or sliced (5B RoPE) before the split.
- **Both**: world = cfg × sp, rank = cfg_rank · sp + sp_rank, so a sequence-parallel group is consecutive ranks
  (one node under torchrun: its all-to-alls run every layer) and a CFG pair spans nodes (once per step).

Every rank runs the same sampler on the full latents (same seed, same noise: the scheduler step is cheap);
only rank 0 decodes. The pieces are wrappers of the model call, composed in the pipeline's `denoise` with the
step cache (which wraps the sequence-parallel model unchanged: its residual is per rank, and its decision comes
from the timestep embedding, the same on every rank).
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
from collections.abc import Callable
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .config import TransformerConfig, VAEConfig
from .layers import Attention, attention

# How long a rank that has loaded the weights waits for the others to load theirs (a cold disk, a slow mount). The
# wait is a gloo collective with this timeout, not an NCCL one: NCCL's watchdog ends a collective that some rank
# reaches more than 10 minutes after the others.
LOAD_WAIT_S = float(os.environ.get("COGVIDEOX_LOAD_WAIT_S", 24 * 3600))


def degrees(modes: str, world_size: int, cfg_on: bool) -> tuple[int, int]:
    """(cfg, sp) for `world_size` processes: CFG parallel takes 2 when named and guidance is on, sp the rest.

    ValueError, saying what would work, for a mode list or a process count that does not fit."""
    names = [m.strip() for m in str(modes).split(",")]
    if not names or set(names) - {"cfg", "sp"} or len(set(names)) != len(names):
        raise ValueError(f"parallel must be cfg, sp or cfg,sp, got {modes!r}")
    if "sp" not in names:
        if not cfg_on:
            raise ValueError("parallel cfg needs guidance (guidance_scale > 1): one pass per step; use sp")
        if world_size != 2:
            raise ValueError(
                f"parallel cfg runs on exactly 2 processes, got {world_size}; use cfg,sp for more"
            )
        return 2, 1
    cfg = 2 if "cfg" in names and cfg_on else 1
    if world_size % cfg:
        raise ValueError(
            f"parallel cfg,sp runs on an even number of processes (2 for CFG × sp), got {world_size}; use sp"
        )
    return cfg, world_size // cfg


def check_degrees(
    config: TransformerConfig, cfg: int, sp: int, cfg_on: bool, video_tokens: int, compiled: bool = False
) -> None:
    """ValueError, naming what works, unless `cfg` × `sp` can run this model on `video_tokens` video tokens
    (`compiled`: with torch.compile'd blocks)."""
    if cfg not in (1, 2):
        raise ValueError(f"the CFG parallel degree must be 1 or 2 (two passes per step), got {cfg}")
    if cfg == 2 and not cfg_on:
        raise ValueError("CFG parallel (cfg=2) needs guidance_scale > 1: without guidance there is one pass")
    heads = config.num_attention_heads
    if sp < 1 or heads % sp:
        works = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        raise ValueError(
            f"sequence parallel degree {sp} does not divide the model's {heads} attention heads; "
            f"degrees that work: {works}"
        )
    if sp > video_tokens:
        raise ValueError(f"sequence parallel degree {sp} exceeds the {video_tokens} video tokens")
    if (
        sp > 1 and compiled
    ):  # the all-to-alls' split sizes would specialise the compiled dynamic sequence axis
        raise ValueError(
            "sequence parallel does not run compiled blocks yet: drop compile, or use CFG parallel"
        )


def video_tokens(config: TransformerConfig, vae: VAEConfig, num_frames: int, height: int, width: int) -> int:
    """How many video tokens the transformer sees at this size (17,550 for 2B at 49 x 480 x 720)."""
    frames = (num_frames - 1) // int(vae.temporal_compression_ratio) + 1
    frames = -(-frames // config.temporal_patch)  # CogVideoX 1.5: padded, two latent frames a token
    side = vae.spatial_compression * config.patch_size
    return frames * (height // side) * (width // side)


def group_ranks(cfg: int, sp: int) -> tuple[list[list[int]], list[list[int]]]:
    """The ranks of each CFG group and of each sequence-parallel group, for rank = cfg_rank · sp + sp_rank."""
    sp_groups = [list(range(c * sp, (c + 1) * sp)) for c in range(cfg)]
    cfg_groups = [list(range(s, cfg * sp, sp)) for s in range(sp)]
    return cfg_groups, sp_groups


def split_sizes(n: int, parts: int) -> list[int]:
    """`n` tokens in `parts` contiguous runs, the first `n % parts` one longer (as `torch.tensor_split`)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


class Exchange:
    """One process group of the layout, with the bytes this rank sends counted (what a link must carry)."""

    def __init__(self, ranks: list[int], group):
        self.ranks, self.group = ranks, group
        self.size, self.rank = len(ranks), ranks.index(dist.get_rank())
        self.bytes_sent = 0

    def all_gather(self, x: Tensor) -> list[Tensor]:
        """Every rank's `x` (same shape on all), in rank order."""
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(out, x, group=self.group)
        self.bytes_sent += (self.size - 1) * x.numel() * x.element_size()
        return out

    def all_to_all(self, chunks: list[Tensor], shapes: list[tuple[int, ...]]) -> list[Tensor]:
        """Sends `chunks[j]` to rank j; returns what each rank j sent here, shaped `shapes[j]`."""
        send = torch.cat([c.reshape(-1) for c in chunks])
        sizes_in, sizes_out = [c.numel() for c in chunks], [math.prod(s) for s in shapes]
        recv = send.new_empty(sum(sizes_out))
        dist.all_to_all_single(recv, send, sizes_out, sizes_in, group=self.group)
        self.bytes_sent += (send.numel() - sizes_in[self.rank]) * send.element_size()
        return [part.view(s) for part, s in zip(recv.split(sizes_out), shapes)]


class SequenceParallel:
    """`transformer` with the video tokens split over a sequence-parallel group.

    Has the transformer's `embed` / `run_blocks` / `head` (what a step cache calls) and its call signature.
    `embed` keeps this rank's tokens `[text ‖ own video run]` (and their RoPE rows), `run_blocks` sets the
    Ulysses attention as every `Attention.attend` for the call, `head` gathers the video tokens back.
    """

    def __init__(self, transformer, exchange: Exchange):
        self.transformer, self.exchange = transformer, exchange
        self.attentions = [m for m in transformer.modules() if isinstance(m, Attention)]

    def _sizes(self, tokens) -> list[int]:
        return split_sizes(math.prod(tokens.grid), self.exchange.size)

    def embed(self, latents: Tensor, text_embeds: Tensor, timestep: Tensor):
        tokens = self.transformer.embed(latents, text_embeds, timestep)
        sizes, r, text_len = self._sizes(tokens), self.exchange.rank, tokens.text_len
        begin = text_len + sum(sizes[:r])
        keep = slice(begin, begin + sizes[r])
        x = torch.cat([tokens.x[:, :text_len], tokens.x[:, keep]], dim=1)  # (B, L + n_r, D)
        rope = None
        if tokens.rope is not None:
            rope = tuple(torch.cat([table[:text_len], table[keep]]) for table in tokens.rope)
        return tokens._replace(x=x, rope=rope)

    def run_blocks(self, tokens) -> Tensor:
        attend = partial(self.attend, text_len=tokens.text_len, sizes=self._sizes(tokens))
        for layer in self.attentions:
            layer.attend = attend
        try:
            return self.transformer.run_blocks(tokens)
        finally:
            for layer in self.attentions:
                layer.attend = None

    def head(self, x: Tensor, tokens) -> Tensor:
        """This rank's (B, L + n_r, D) -> the prediction of the whole clip: the video tokens are gathered (padded
        to the longest run, as all-gather needs equal shapes) and the transformer's head runs on all of them."""
        sizes, text_len = self._sizes(tokens), tokens.text_len
        video = F.pad(x[:, text_len:], (0, 0, 0, max(sizes) - (x.shape[1] - text_len)))
        parts = self.exchange.all_gather(video)
        full = torch.cat([x[:, :text_len], *(part[:, :n] for part, n in zip(parts, sizes))], dim=1)
        return self.transformer.head(full, tokens)

    def __call__(self, latents: Tensor, text_embeds: Tensor, timestep: Tensor) -> Tensor:
        tokens = self.embed(latents, text_embeds, timestep)
        return self.head(self.run_blocks(tokens), tokens)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, kernel=None, *, text_len: int, sizes: list[int]
    ) -> Tensor:
        """q, k, v (B, H, L + n_r, d): every head of the text and of this rank's video tokens -> attention over
        every rank's tokens, the same layout. In between each rank holds H/P heads of the whole sequence."""
        ex = self.exchange
        p, r = ex.size, ex.rank
        b, heads, _, d = q.shape
        hp = heads // p
        qkv = torch.stack([q, k, v])  # (3, B, H, L + n_r, d)
        # Sequence split -> head split: rank j gets its heads of this rank's video tokens.
        send = rearrange(qkv[:, :, :, text_len:], "three b (p h) n d -> p three b h n d", p=p)
        video = ex.all_to_all(list(send.unbind(0)), [(3, b, hp, n, d) for n in sizes])
        text = qkv[:, :, r * hp : (r + 1) * hp, :text_len]  # replicated: this rank's heads are here already
        q, k, v = torch.cat([text, *video], dim=3).unbind(0)  # (B, H/P, L + N, d)
        out = attention(q, k, v, kernel)  # the model's kernel, picked for the whole sequence
        # Head split -> sequence split: rank j gets the text's and its own video tokens' outputs of these heads.
        text_out, *video_out = out.split([text_len, *sizes], dim=2)
        chunks = [torch.cat([text_out, part], dim=2) for part in video_out]
        back = ex.all_to_all(chunks, [(b, hp, text_len + sizes[r], d)] * p)
        return rearrange(torch.stack(back), "p b h s d -> b (p h) s d")


class Parallel:
    """How the processes of the default group share one generation: `cfg` (1 or 2) × `sp` = the world size.

    Build it on every rank, in the same order, after `torch.distributed.init_process_group` (it creates the
    subgroups). Pass it as `pipe(..., parallel=...)` on every rank with the same arguments; rank 0 returns the
    frames, the others a result whose `frames` is None.
    """

    def __init__(self, cfg: int = 1, sp: int = 1):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("parallel needs torch.distributed.init_process_group first (run under torchrun)")
        world = dist.get_world_size()
        for name, value in (("cfg", cfg), ("sp", sp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel {name} degree must be a positive integer, got {value!r}")
        if cfg * sp != world:
            raise ValueError(f"parallel cfg × sp must equal the {world} processes, got {cfg} × {sp}")
        self.cfg, self.sp, self.rank = cfg, sp, dist.get_rank()
        backend = str(dist.get_backend())
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        )
        cfg_groups, sp_groups = group_ranks(cfg, sp)
        self.cfg_exchange, self.sp_exchange = self._exchange(cfg_groups), self._exchange(sp_groups)

    @classmethod
    def from_env(cls, modes: str = "cfg,sp", cfg_on: bool = True) -> Parallel:
        """The degrees from the world size (see `degrees`): `Parallel.from_env("cfg,sp")` on 6 ranks is 2 × 3."""
        return cls(*degrees(modes, dist.get_world_size(), cfg_on))

    def _exchange(self, groups: list[list[int]]) -> Exchange | None:
        """This rank's group of `groups` (None for groups of one); every rank creates every group, in order."""
        mine = None
        for ranks in groups:
            if len(ranks) == 1:
                continue
            group = dist.group.WORLD if len(ranks) == dist.get_world_size() else dist.new_group(ranks)
            if self.rank in ranks:
                mine = Exchange(ranks, group)
        return mine

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that decodes and returns frames."""
        return self.rank == 0

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent to others in exchanges of activations (control messages not counted)."""
        return sum(ex.bytes_sent for ex in (self.cfg_exchange, self.sp_exchange) if ex is not None)

    def check(
        self,
        config: TransformerConfig,
        vae: VAEConfig,
        num_frames: int,
        height: int,
        width: int,
        cfg_on: bool,
        compiled: bool = False,
    ) -> None:
        """ValueError unless these degrees can run this model at this size (see `check_degrees`)."""
        tokens = video_tokens(config, vae, num_frames, height, width)
        check_degrees(config, self.cfg, self.sp, cfg_on, tokens, compiled)

    def agree(self, seed: int, settings) -> int:
        """Rank 0's seed (each rank may have drawn its own); ValueError on every rank if `settings` differ."""
        digest = int.from_bytes(hashlib.sha256(repr(settings).encode()).digest()[:7], "big")
        values = torch.tensor([seed], dtype=torch.int64, device=self.device)
        dist.broadcast(values, src=0)
        spread = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        if spread[0] != -spread[1]:
            raise ValueError(
                "parallel ranks were given different settings: every rank must get the same call"
            )
        return int(values[0])

    def shared_callback(self, callback: Callable | None) -> Callable[[int, int], bool]:
        """callback(step, total) on every rank; the run stops on all ranks if any rank's callback returns False."""

        def agreed(step: int, total: int) -> bool:
            stop = callback is not None and callback(step, total) is False
            flag = torch.tensor([int(stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return not bool(flag)

        return agreed

    def shard(self, transformer):
        """The transformer with its video tokens split over the sequence-parallel group (itself when sp = 1)."""
        return transformer if self.sp_exchange is None else SequenceParallel(transformer, self.sp_exchange)

    def split_cfg(self, forward: Callable) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """A wrapper of `forward(latents, text_embeds, timestep)`: each CFG rank runs its row of the batch of
        two, and the all-gather returns both rows on both ranks. Unchanged when cfg = 1."""
        ex = self.cfg_exchange
        if ex is None:
            return forward

        def split(latents: Tensor, text_embeds: Tensor, timestep: Tensor) -> Tensor:
            if latents.shape[0] != ex.size:
                raise ValueError(
                    f"CFG parallel needs a batch of {ex.size} (guidance on), got {latents.shape[0]}"
                )
            row = slice(ex.rank, ex.rank + 1)
            return torch.cat(ex.all_gather(forward(latents[row], text_embeds[row], timestep[row])))

        return split


def torchrun_device(device: str | torch.device | None = None) -> torch.device:
    """This rank's device under torchrun: cuda:LOCAL_RANK when `device` is CUDA (the default where there is one),
    else the CPU. ValueError outside torchrun, for a CUDA index (the rank picks it) or another device type."""
    missing = [
        n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if n not in os.environ
    ]
    if missing:
        raise ValueError(
            f"parallel runs under torchrun (torchrun --nproc-per-node N -m cogvideox ...): {missing[0]} is not set"
        )
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                "with parallel each process uses cuda:LOCAL_RANK; pass device cuda without an index"
            )
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type != "cpu":
        raise ValueError(f"parallel runs on cuda (NCCL) or cpu (gloo), got device {str(device)!r}")
    return device


def init_from_torchrun(device: str | torch.device | None = None) -> torch.device:
    """`init_process_group` from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL with this rank on
    cuda:LOCAL_RANK, or gloo on the CPU (see `torchrun_device`). Returns the device this rank runs on."""
    device = torchrun_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def start_from_torchrun(
    modes: str,
    pipe,
    num_frames: int,
    height: int,
    width: int,
    guidance_scale: float,
    on_load: Callable[[], None] | None = None,
) -> Parallel:
    """The command line's path: the degrees from torchrun's WORLD_SIZE, checked against `pipe`'s model at this size
    before anything starts (ValueError), then the process group (on `pipe.device`), the layout, and the weights
    on every rank (`load_on_every_rank`; `on_load()` first). The group is destroyed at exit."""
    torchrun_device(pipe.device.type)  # outside torchrun: say so first
    cfg_on = guidance_scale > 1
    cfg, sp = degrees(modes, int(os.environ["WORLD_SIZE"]), cfg_on)
    tokens = video_tokens(pipe.transformer_config, pipe.vae_config, num_frames, height, width)
    check_degrees(pipe.transformer_config, cfg, sp, cfg_on, tokens, pipe.compile)
    init_from_torchrun(pipe.device.type)
    atexit.register(dist.destroy_process_group)
    parallel = Parallel(cfg, sp)
    if on_load is not None:
        on_load()
    load_on_every_rank(pipe)
    return parallel


def load_on_every_rank(pipe) -> None:
    """Each rank loads `pipe`'s weights (if it has not), then all agree that they did, over a gloo group of their
    own that waits up to LOAD_WAIT_S: so the first collective of the default group (NCCL on GPUs, with its
    10-minute watchdog) finds every rank loaded and ready. A rank that could not load raises its own error; the
    others a RuntimeError naming it."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=LOAD_WAIT_S))
    error = None
    if not pipe.loaded:
        try:
            pipe.load()
        except Exception as e:  # no collective has started: every rank hears of it below
            error = e
    said = None if error is None else " ".join(f"{type(error).__name__}: {error}".split())
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, said, group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    if failed := next(((rank, e) for rank, e in enumerate(errors) if e is not None), None):
        raise RuntimeError(f"process {failed[0]} of {len(errors)} could not load the model: {failed[1]}")
