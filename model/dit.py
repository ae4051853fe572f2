"""Video Diffusion Transformer over windows of latent frames.

A *window* is a set of latent frames of one video at one resolution, each with an absolute latent-frame index
(frames may be hundreds of indices apart), a noise level, and a flag: *observed* (clean, given) or *latent*
(being denoised). Windows of different resolutions are packed into one flat token sequence, NaViT style; every
attention is block-diagonal over that sequence:

* spatial attention — the tokens of one frame (2-D rotary positions: row, column);
* temporal attention — the frames of one window at one spatial position (1-D rotary positions: the absolute
  latent-frame index, so the model knows how far apart frames are). Observed frames attend only to observed
  frames; latent frames attend to observed frames and to the window's latent frames; in causal mode latent
  frames see only frames with a time index up to their own;
* cross-attention — the tokens of one frame to its window's text tokens.

Blocks with equal shape are batched into one ``scaled_dot_product_attention`` call, which is the block-diagonal
mask without materialising it (``block_diagonal_mask`` builds the dense mask for tests and debugging).

Because observed frames never depend on latent frames, their temporal keys/values can be computed once per
sampling call (:meth:`VideoDiT.observed_cache`) and reused at every denoising step: the long history costs one
forward pass, not one per step.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import DiTConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------- positions
def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (..., dim/2) of rotary embeddings for integer positions (...)."""
    freqs = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[..., None] * freqs
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (first half, second half) of the last dim of x by the given angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


def spatial_rope(h: int, w: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary tables (h*w, head_dim/2): half of each head encodes the row, half the column."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    cr, sr = rope_angles(rows, head_dim // 2, theta)
    cc, sc = rope_angles(cols, head_dim // 2, theta)
    # apply_rope pairs the first half of the features with the second half; interleave so that row and
    # column each get their own pairs.
    return torch.cat([cr, cc], dim=-1), torch.cat([sr, sc], dim=-1)


# ----------------------------------------------------------------------------------------------- layout
@dataclass
class TemporalGroup:
    index: torch.Tensor  # (S, F) token indices: S = windows * positions, F = frames per window
    cos: torch.Tensor  # (S, F, head_dim/2)
    sin: torch.Tensor
    mask: torch.Tensor | None  # (S, 1, F, F + F_cached) bool, None when every query may see every key
    num_windows: int
    positions: int
    cached_cos: torch.Tensor | None = None  # rope of the observed frames held in the cache
    cached_sin: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # (S, F) bool: which entries are real frames, in a group padded to F


@dataclass
class SpatialGroup:
    index: torch.Tensor  # (n_frames, N) token indices
    frames: torch.Tensor  # (n_frames,) frame numbers (for text and conditioning lookups)
    cos: torch.Tensor  # (N, head_dim/2)
    sin: torch.Tensor


@dataclass
class Layout:
    """Index tables that realise block-diagonal attention over a packed token sequence."""

    num_tokens: int
    frame_of_token: torch.Tensor  # (L,)
    window_of_frame: torch.Tensor  # (F_total,)
    spatial: list[SpatialGroup] = field(default_factory=list)
    temporal: list[TemporalGroup] = field(default_factory=list)


def temporal_mask(observed: torch.Tensor, times: torch.Tensor, causal: bool,
                  cached_times: torch.Tensor | None = None) -> torch.Tensor | None:
    """(F, F_cached + F) visibility of keys for the queries of one window; None when all keys are visible.

    Observed queries see observed keys; latent queries see every key (observed or latent), restricted in
    causal mode to keys whose time index is not after their own. Cached keys are observed frames.
    """
    key_observed = observed
    key_times = times
    if cached_times is not None:
        key_observed = torch.cat([torch.ones_like(cached_times, dtype=torch.bool), observed])
        key_times = torch.cat([cached_times, times])
    q_obs = observed[:, None]
    visible = torch.where(q_obs, key_observed[None, :].expand(len(observed), -1), torch.ones(
        len(observed), len(key_times), dtype=torch.bool, device=times.device))
    if causal:
        visible = visible & (q_obs | (key_times[None, :] <= times[:, None]))
    return None if bool(visible.all()) else visible


def build_layout(shapes: list[tuple[int, int, int]], observed: list[torch.Tensor], times: list[torch.Tensor],
                 causal: bool, head_dim: int, cfg: DiTConfig, device,
                 cached_times: torch.Tensor | None = None, pad_windows: bool = False) -> Layout:
    """Token order: window by window, frame by frame, row-major patches. shapes[i] = (frames, rows, cols).

    Temporal attention runs once per group of windows with the same frame count and visibility; with
    ``pad_windows`` (no cache) windows of the same frame size share one group instead, shorter ones padded with
    keys nobody sees, and single frames another. A training batch of varied windows then costs one or two
    attention calls per block and frame size rather than one per window pattern (about 60 calls of a few
    milliseconds each, at batch 64 on a GPU).
    """
    frame_tokens, window_of_frame = [], []  # tokens of each frame, window of each frame
    spatial: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (rows, cols) -> [(frame, first token)]
    temporal: dict[tuple, list[tuple[int, int, torch.Tensor, torch.Tensor | None]]] = {}
    token, frame = 0, 0
    for w, (f, h, wd) in enumerate(shapes):
        n = h * wd
        starts = []
        for _ in range(f):
            spatial.setdefault((h, wd), []).append((frame, token))
            frame_tokens.append(n)
            window_of_frame.append(w)
            starts.append(token)
            token += n
            frame += 1
        mask = temporal_mask(observed[w], times[w], causal, cached_times)
        key = (f, n, None if mask is None else tuple(mask.flatten().tolist()))
        temporal.setdefault(key, []).append((starts[0], w, times[w], mask))

    tokens_per_frame = torch.tensor(frame_tokens, dtype=torch.long)
    layout = Layout(token, torch.arange(len(frame_tokens)).repeat_interleave(tokens_per_frame).to(device),
                    torch.tensor(window_of_frame, dtype=torch.long, device=device))
    for (h, wd), items in spatial.items():
        n = h * wd
        first = torch.tensor([t for _, t in items], dtype=torch.long, device=device)
        index = first[:, None] + torch.arange(n, device=device)[None]
        cos, sin = spatial_rope(h, wd, head_dim, cfg.rope_theta_space, device)
        layout.spatial.append(SpatialGroup(index, torch.tensor([fr for fr, _ in items], device=device), cos, sin))
    if pad_windows and cached_times is None:
        # Single frames (images as one-frame videos) keep a group of their own: padded to a video window's
        # length, each would cost that window's temporal attention for a query that only sees itself.
        by_positions: dict[tuple[int, bool], list] = {}
        for (f, n, _), items in temporal.items():
            by_positions.setdefault((n, f == 1), []).extend((f, *item) for item in items)
        layout.temporal.extend(padded_temporal_group(items, n, head_dim, cfg, device)
                               for (n, _), items in by_positions.items())
        return layout
    for (f, n, _), items in temporal.items():
        # Frame k of a window starts at token first + k * n; position p adds p.
        first = torch.tensor([t for t, _, _, _ in items], dtype=torch.long, device=device)
        pos = torch.arange(n, device=device)
        fr = torch.arange(f, device=device) * n
        index = (first[:, None, None] + pos[None, :, None] + fr[None, None, :]).reshape(-1, f)  # (W*n, F)
        t = torch.stack([tm for _, _, tm, _ in items]).to(device)  # (W, F)
        cos, sin = rope_angles(t, head_dim, cfg.rope_theta_time)  # (W, F, hd/2)
        cos, sin = cos.repeat_interleave(n, 0), sin.repeat_interleave(n, 0)
        mask = items[0][3]
        if mask is not None:
            mask = mask.to(device)[None, None].expand(len(items) * n, 1, -1, -1)
        group = TemporalGroup(index, cos, sin, mask, len(items), n)
        if cached_times is not None:
            c, s = rope_angles(cached_times.to(device), head_dim, cfg.rope_theta_time)
            group.cached_cos, group.cached_sin = c, s
        layout.temporal.append(group)
    return layout


def padded_temporal_group(items: list, n: int, head_dim: int, cfg: DiTConfig, device) -> TemporalGroup:
    """One temporal group of windows of ``n`` positions per frame and any frame counts, padded to the longest.

    ``items``: (frames, first token, window, times, visibility or None) per window. A padded entry gathers the
    window's first token and is never a visible key; a padded query sees the first key alone (its output is
    dropped), so no attention row is empty.
    """
    fmax = max(item[0] for item in items)
    frames = torch.tensor([item[0] for item in items])
    k = torch.arange(fmax)
    valid = k[None] < frames[:, None]  # (W, F)
    first = torch.tensor([item[1] for item in items], dtype=torch.long)
    index = first[:, None, None] + torch.arange(n)[None, :, None] + (k * n)[None, None, :]  # (W, n, F)
    index = torch.where(valid[:, None, :], index, first[:, None, None])
    times = torch.zeros(len(items), fmax, dtype=items[0][3].dtype)
    visible = torch.zeros(len(items), fmax, fmax, dtype=torch.bool)
    for w, (f, _, _, tm, mask) in enumerate(items):
        times[w, :f] = tm
        visible[w, :f, :f] = True if mask is None else mask
        visible[w, f:, 0] = True
    cos, sin = rope_angles(times.to(device), head_dim, cfg.rope_theta_time)  # (W, F, hd/2)
    every = bool(valid.all()) and all(item[4] is None for item in items)
    return TemporalGroup(index.reshape(-1, fmax).to(device), cos.repeat_interleave(n, 0), sin.repeat_interleave(n, 0),
                         None if every else visible.repeat_interleave(n, 0)[:, None].to(device), len(items), n,
                         valid=None if every else valid.repeat_interleave(n, 0).to(device))


def block_diagonal_mask(layout: Layout, kind: str) -> torch.Tensor:
    """Dense (L, L) boolean mask equivalent to the grouped attention of ``kind`` ('spatial' or 'temporal')."""
    mask = torch.zeros(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
    if kind == "spatial":
        for g in layout.spatial:
            for row in g.index.cpu():
                mask[row[:, None], row[None, :]] = True
    else:
        for g in layout.temporal:
            for s, row in enumerate(g.index.cpu()):
                vis = torch.ones(len(row), len(row), dtype=torch.bool) if g.mask is None else g.mask[s, 0].cpu()
                if g.valid is not None:  # a padded group: only the real frames
                    real = g.valid[s].cpu()
                    row, vis = row[real], vis[real][:, real]
                mask[row[:, None], row[None, :]] = vis
    return mask


def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along the first dimension, without a copy for a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for a tensor of token indices, through ``index_select``: the same values, but its backward
    pass adds the gradients back with one ``index_add`` where advanced indexing sorts the indices first (on a
    GPU, many milliseconds a call over a training batch's tokens)."""
    return x.index_select(0, index.reshape(-1)).unflatten(0, index.shape)


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(F, C, h, w) -> (F * h/p * w/p, C * p * p): each p x p patch, channel-major, one row per token."""
    f, c, h, w = x.shape
    x = x.reshape(f, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(f * (h // p) * (w // p), c * p * p)


def frame_channel(values: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """One value per frame (F,) as a constant channel (F, 1, h, w) beside ``frames`` (F, C, h, w), in their dtype."""
    f, _, h, w = frames.shape
    return values.to(frames.dtype)[:, None, None, None].expand(f, 1, h, w)


def from_patches(x: torch.Tensor, f: int, c: int, h: int, w: int, p: int) -> torch.Tensor:
    """The inverse of :func:`to_patches`: (F * h/p * w/p, C * p * p) -> (F, C, h, w)."""
    x = x.reshape(f, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(f, c, h, w)


# ----------------------------------------------------------------------------------------------- modules
class TimestepEmbedder(nn.Module):
    """Noise level t in [0, 1] -> vector, through sinusoidal features and an MLP (as in DiT)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (F,) -> (F, D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (tensor-parallel friendly) and q/k RMS norm."""

    def __init__(self, hidden: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.head_dim = hidden // heads
        kv_in = context_dim or hidden
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(kv_in, hidden)
        self.v = nn.Linear(kv_in, hidden)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(hidden, hidden)

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:  # (..., S, D) -> (..., H, S, hd)
        return x.unflatten(-1, (-1, self.head_dim)).transpose(-3, -2)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_norm(self.heads_of(self.k(context))), self.heads_of(self.v(context))

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_norm(self.heads_of(self.q(x)))

    def out(self, o: torch.Tensor) -> torch.Tensor:  # (..., H, S, hd) -> (..., S, D)
        return self.proj(o.transpose(-3, -2).flatten(-2))


class Mlp(nn.Module):
    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        inner = int(hidden * ratio)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@dataclass
class BlockCache:
    """Temporal keys/values of observed frames for one block: (S, H, F_obs, hd) each.

    :meth:`with_window` appends a denoising step's window keys/values behind them. The joined tensors live in
    buffers kept across the steps of one sampling call: the history is copied in once, and each later step
    writes only its window's rows, so a step neither allocates nor copies the history again.
    """

    k: torch.Tensor
    v: torch.Tensor
    joined_k: torch.Tensor | None = field(default=None, repr=False)
    joined_v: torch.Tensor | None = field(default=None, repr=False)

    def with_window(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, H, F_obs + F, hd) keys and values: the cached history, then this step's window."""
        n = self.k.shape[2]
        shape = (*self.k.shape[:2], n + k.shape[2], self.k.shape[3])
        buf = self.joined_k
        if buf is None or buf.shape != shape or buf.dtype != k.dtype or buf.device != k.device:
            # First step (or a step in another dtype, e.g. under autocast): lay out history and window once.
            self.joined_k = torch.cat([self.k.to(k.dtype), k], dim=2)
            self.joined_v = torch.cat([self.v.to(v.dtype), v], dim=2)
        else:
            self.joined_k[:, :, n:].copy_(k)
            self.joined_v[:, :, n:].copy_(v)
        return self.joined_k, self.joined_v


class DiTBlock(nn.Module):
    """Spatial attention -> temporal attention -> cross-attention -> MLP, with adaLN-Zero modulation.

    The modulation vectors are computed outside the block (``VideoDiT.ada``) so that tensor-parallel
    injection may split every linear layer inside the block by heads or features.
    """

    def __init__(self, cfg: DiTConfig, text_dim: int):
        super().__init__()
        d = cfg.hidden
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.spatial_attn = Attention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.temporal_attn = Attention(d, cfg.heads)
        self.norm3 = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = Attention(d, cfg.heads, context_dim=text_dim)
        self.norm4 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, layout: Layout, text_kv, text_mask: torch.Tensor,
                cache: BlockCache | None = None, record: list | None = None) -> torch.Tensor:
        # x: (L, D) packed tokens; mod: (L, 9D) per-token modulation (from each token's frame).
        s1, c1, g1, s2, c2, g2, s3, c3, g3 = mod.chunk(9, dim=-1)
        x = x + g1 * self.spatial(modulate(self.norm1(x), s1, c1), layout)
        x = x + g2 * self.temporal(modulate(self.norm2(x), s2, c2), layout, cache, record)
        x = x + self.cross(self.norm3(x), layout, text_kv, text_mask)
        x = x + g3 * self.mlp(modulate(self.norm4(x), s3, c3))
        return x

    def spatial(self, h: torch.Tensor, layout: Layout) -> torch.Tensor:
        attn, out = self.spatial_attn, torch.empty_like(h)
        for g in layout.spatial:
            xs = gather_tokens(h, g.index)  # (n_frames, N, D)
            q = apply_rope(attn.project_q(xs), g.cos, g.sin)  # (n_frames, H, N, hd)
            k, v = attn.project_kv(xs)
            k = apply_rope(k, g.cos, g.sin)
            o = F.scaled_dot_product_attention(q, k, v)
            out[g.index] = attn.out(o).to(out.dtype)  # bf16 under autocast; the stream stays in its dtype
        return out

    def temporal(self, h: torch.Tensor, layout: Layout, cache: BlockCache | None, record: list | None):
        attn, out = self.temporal_attn, torch.empty_like(h)
        for gi, g in enumerate(layout.temporal):
            xs = gather_tokens(h, g.index)  # (S, F, D)
            cos, sin = g.cos[:, None], g.sin[:, None]  # broadcast over heads
            q = apply_rope(attn.project_q(xs), cos, sin)  # (S, H, F, hd)
            k, v = attn.project_kv(xs)
            k = apply_rope(k, cos, sin)
            if record is not None:
                record.append(BlockCache(k, v))
            if cache is not None:
                k, v = cache.with_window(k, v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask)
            o = attn.out(o).to(out.dtype)  # bf16 under autocast; the stream stays in its dtype
            if g.valid is None:
                out[g.index] = o
            else:
                out[g.index[g.valid]] = o[g.valid]
        return out

    def cross(self, h: torch.Tensor, layout: Layout, text_kv, text_mask: torch.Tensor) -> torch.Tensor:
        attn, out = self.cross_attn, torch.empty_like(h)
        k_all, v_all = text_kv  # (W, H, L, hd)
        for g in layout.spatial:
            win = layout.window_of_frame[g.frames]
            q = attn.project_q(gather_tokens(h, g.index))  # (n_frames, H, N, hd)
            mask = text_mask[win][:, None, None, :]  # (n_frames, 1, 1, L)
            o = F.scaled_dot_product_attention(q, k_all[win], v_all[win], attn_mask=mask)
            out[g.index] = attn.out(o).to(out.dtype)  # bf16 under autocast; the stream stays in its dtype
        return out


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int | None):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        # None with convolutional stages: they read the features themselves (ConvStages.decode).
        self.linear = nn.Linear(hidden, out_dim) if out_dim else None
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def features(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The modulated, normalised token features the output layer reads."""
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x, c))


@dataclass
class ObservedCache:
    """Per-block temporal keys/values of the observed frames of a batch of equally shaped windows."""

    blocks: list[BlockCache]
    times: torch.Tensor  # (F_obs,) shared by the windows
    text_kv: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FrameInputs:
    """One window: frames in time order with their flags, ready for the DiT."""

    frames: torch.Tensor  # (F, C, h, w) noisy latent frames or clean observed frames
    observed: torch.Tensor  # (F,) bool
    times: torch.Tensor  # (F,) long, absolute latent-frame indices
    noise: torch.Tensor  # (F,) float noise level t in [0, 1]; 0 for observed frames


class RefineHead(nn.Module):
    """Residual 3x3 convolutions over each output frame at the latent resolution.

    With 4x4 patches on x4 latents an object a dozen pixels across lies inside one or two tokens, and a token
    predicts its patch through one linear layer: the measured result is objects whose corners round off even
    from a nearly clean input (one clean-latent estimate at noise 0.2 kept the prompted shapes of 0.47 of the
    objects over 16 prompts; the decoded clean latents kept 0.73). The head works where the shapes are, per latent pixel and
    across patch borders (after U-ViT's final convolution): it reads the velocity, the noisy input latents, the
    noise level and ``features`` channels per pixel unpacked from the tokens' final features (what the DiT
    knows of the prompt and the scene), and adds a correction to the velocity. It starts as the identity, so a
    warm-started DiT keeps its predictions, and it can be trained alone on a frozen DiT
    (``longshot train dit --head-only``).
    """

    def __init__(self, channels: int, hidden: int, token_dim: int, patch: int, features: int = 8):
        super().__init__()
        self.patch, self.feature_channels = patch, features
        self.unpack = nn.Linear(token_dim, features * patch * patch)
        self.conv1 = nn.Conv2d(2 * channels + 1 + features, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, channels, 3, padding=1)

    def reset_parameters(self) -> None:
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_uniform_(conv.weight, a=5 ** 0.5)
            nn.init.zeros_(conv.bias)
        nn.init.xavier_uniform_(self.unpack.weight)
        nn.init.zeros_(self.unpack.bias)
        nn.init.zeros_(self.conv3.weight)  # the identity at first: a warm-started DiT keeps its predictions
        nn.init.zeros_(self.conv3.bias)

    def token_features(self, tokens: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        """(f * h/p * w/p, D) token features -> (f, features, h, w) per latent pixel."""
        return from_patches(self.unpack(tokens), f, self.feature_channels, h, w, self.patch)

    def forward(self, velocity: torch.Tensor, frames: torch.Tensor, noise: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
        f, _, h, w = velocity.shape
        x = torch.cat([velocity, frames.to(velocity.dtype), frame_channel(noise, velocity),
                       self.token_features(tokens, f, h, w)], dim=1)
        return velocity + self.conv3(F.silu(self.conv2(F.silu(self.conv1(x)))))


class ConvResBlock(nn.Module):
    """A residual block of two 3x3 convolutions, its features scaled and shifted per frame by the frame's
    conditioning (noise level and pooled prompt), the second convolution starting at zero (the block starts as
    the identity, as adaLN-Zero starts every transformer block closed)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, channels)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * channels))
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # (F, C, h, w), (F, D)
        h = self.conv1(F.silu(self.norm1(x)))
        shift, scale = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class ConvStages(nn.Module):
    """Convolutional stages around the transformer, U-Net fashion (``dit.conv``; U-ViT, HDiT).

    Down: a 3x3 stem over the input latents and the observed mask at the latent resolution, then per stage
    ``blocks`` residual blocks and a stride-2 convolution into the next stage; the last stage's features are cut
    into patches and projected to tokens. Up: the transformer's output tokens are projected back to the last
    stage's features, and each stage, from the lowest, joins its skip connection (the features it had on the
    way down), runs ``blocks`` residual blocks and is upsampled into the stage above; a last 3x3 convolution,
    starting at zero, gives the velocity. Each frame is convolved on its own, so frames of a window never mix
    here: time is the transformer's alone, and the observed frames' cache stays valid.

    Why: with 4x4 patches an object a dozen pixels across is one or two tokens, each token predicts its patch
    through one linear layer, and the corners that tell a square from a circle live inside one latent pixel's
    neighbourhood. The skip connections hand every latent pixel of the noisy input to the convolutions at the
    output, where those corners are drawn.
    """

    def __init__(self, in_channels: int, out_channels: int, widths: tuple[int, ...], patch: int, hidden: int,
                 blocks: int):
        super().__init__()
        self.widths = widths
        self.token_patch = patch // 2 ** (len(widths) - 1)  # what is left of the patch below the last stage
        q2 = self.token_patch ** 2
        self.stem = nn.Conv2d(in_channels + 1, widths[0], 3, padding=1)
        self.down = nn.ModuleList(nn.ModuleList(ConvResBlock(c, hidden) for _ in range(blocks)) for c in widths)
        self.downsample = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        self.to_tokens = nn.Linear(widths[-1] * q2, hidden)
        self.from_tokens = nn.Linear(hidden, widths[-1] * q2)
        self.join = nn.ModuleList(nn.Conv2d(2 * c, c, 1) for c in widths)
        self.up = nn.ModuleList(nn.ModuleList(ConvResBlock(c, hidden) for _ in range(blocks)) for c in widths)
        self.upsample = nn.ModuleList(nn.Conv2d(b, a, 3, padding=1) for a, b in zip(widths, widths[1:]))
        self.out_norm = nn.GroupNorm(8, widths[0])
        self.out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5)
                nn.init.zeros_(m.bias)
        for blocks in (*self.down, *self.up):
            for block in blocks:
                nn.init.zeros_(block.conv2.weight)  # every residual block starts as the identity
                nn.init.zeros_(block.film[-1].weight)
                nn.init.zeros_(block.film[-1].bias)
        nn.init.zeros_(self.out.weight)  # and the output at zero, like the plain DiT's output layer
        nn.init.zeros_(self.out.bias)

    def encode(self, frames: torch.Tensor, observed: torch.Tensor,
               cond: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(F, C, h, w) latents, (F,) flags, (F, D) conditioning -> the tokens and the skip features."""
        x = self.stem(torch.cat([frames, frame_channel(observed, frames)], dim=1))
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                x = block(x, cond)
            skips.append(x)
            if i < len(self.downsample):
                x = self.downsample[i](x)
        return self.to_tokens(to_patches(x, self.token_patch)), skips

    def decode(self, tokens: torch.Tensor, skips: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        """The transformer's output features per token -> the velocity (F, out_channels, h, w)."""
        low = skips[-1]
        x = from_patches(self.from_tokens(tokens), *low.shape, self.token_patch)
        for i in reversed(range(len(self.widths))):
            x = self.join[i](torch.cat([x, skips[i]], dim=1))
            for block in self.up[i]:
                x = block(x, cond)
            if i:
                x = self.upsample[i - 1](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(x)))


class VideoDiT(nn.Module):
    def __init__(self, cfg: DiTConfig, latent_channels: int, text_dim: int, text_pooled_dim: int):
        super().__init__()
        self.cfg = cfg
        self.latent_channels = latent_channels
        d, p = cfg.hidden, cfg.patch
        if d % cfg.heads or (d // cfg.heads) % 4:
            raise ValueError(f"dit.hidden: {d} must split into {cfg.heads} heads of a size divisible by 4")
        self.head_dim = d // cfg.heads
        # +1 input channel: the observed mask (FDM / VDT), so the model can tell given frames from noise.
        # With convolutional stages (dit.conv) those read the latents and make the tokens, and take the
        # transformer's output back to the latent resolution, in place of the patch embedding and output layer.
        self.stages = ConvStages(latent_channels, latent_channels, cfg.conv, p, d, cfg.conv_blocks) if cfg.conv else None
        if self.stages is None:
            self.patch_embed = nn.Linear((latent_channels + 1) * p * p, d)
        self.t_embed = TimestepEmbedder(d)
        self.text_pool = nn.Linear(text_pooled_dim, d)
        self.blocks = nn.ModuleList([DiTBlock(cfg, text_dim) for _ in range(cfg.depth)])
        self.ada = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(d, 9 * d)) for _ in range(cfg.depth)])
        self.final = FinalLayer(d, None if self.stages is not None else latent_channels * p * p)
        self.refine = RefineHead(latent_channels, cfg.refine, d, p) if cfg.refine else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(basic)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch starts closed and the output layer starts at zero.
        for ada in self.ada:
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        for block in self.blocks:  # cross-attention has no gate: close it through its output projection
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final.ada[-1].weight)
        nn.init.zeros_(self.final.ada[-1].bias)
        if self.final.linear is not None:
            nn.init.zeros_(self.final.linear.weight)
            nn.init.zeros_(self.final.linear.bias)
        if self.refine is not None:
            self.refine.reset_parameters()
        if self.stages is not None:
            self.stages.reset_parameters()

    # -- patches ------------------------------------------------------------------------------------------
    def patchify(self, frames: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """(F, C, h, w) -> (F * h/p * w/p, (C+1)*p*p) with the observed mask as an extra channel."""
        return to_patches(torch.cat([frames, frame_channel(observed, frames)], dim=1), self.cfg.patch)

    @staticmethod
    def widened_state(state: dict[str, torch.Tensor], latent_channels: int, patch: int) -> dict[str, torch.Tensor]:
        """A DiT's weights for fewer latent channels widened to ``latent_channels`` (a VAE given shape channels
        beside the same appearance latents): the patch embedding and the output layer get the added channels'
        weights at zero, so the widened DiT starts by predicting exactly what the source did and reading the
        added channels not at all. Inputs and outputs are channel-major per patch (see :meth:`patchify`)."""
        state = dict(state)
        pp = patch * patch
        if "final.linear.bias" not in state or state["final.linear.bias"].shape[0] >= latent_channels * pp:
            return state
        old = state["final.linear.bias"].shape[0] // pp
        embed = state["patch_embed.weight"]  # (D, (old + 1) * pp): latent channels, then the observed mask
        wide = embed.new_zeros(embed.shape[0], (latent_channels + 1) * pp)
        wide[:, :old * pp] = embed[:, :old * pp]
        wide[:, latent_channels * pp:] = embed[:, old * pp:]
        state["patch_embed.weight"] = wide
        for key in ("final.linear.weight", "final.linear.bias"):
            value = state[key]
            state[key] = torch.cat([value, value.new_zeros(latent_channels * pp - value.shape[0], *value.shape[1:])])
        return state

    def unpatchify(self, x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        return from_patches(x, f, self.latent_channels, h, w, self.cfg.patch)

    # -- forward ------------------------------------------------------------------------------------------
    def check_window(self, win: FrameInputs) -> None:
        f, c, h, w = win.frames.shape
        if c != self.latent_channels:
            raise ValueError(f"latents: expected {self.latent_channels} channels, got {c} (shape {tuple(win.frames.shape)})")
        if h % self.cfg.patch or w % self.cfg.patch:
            raise ValueError(f"latents: height and width must be multiples of {self.cfg.patch}, got {h}x{w}")
        if f > self.cfg.max_window:
            raise ValueError(f"window: {f} frames exceed this model's maximum window of {self.cfg.max_window}")
        for name, t in (("observed", win.observed), ("times", win.times), ("noise", win.noise)):
            if t.shape != (f,):
                raise ValueError(f"{name}: expected shape ({f},) for a window of {f} frames, got {tuple(t.shape)}")

    def _conditioning(self, windows: list[FrameInputs], text_pooled: torch.Tensor,
                      window_of_frame: torch.Tensor) -> torch.Tensor:
        noise = torch.cat([w.noise for w in windows])
        return self.t_embed(noise) + self.text_pool(text_pooled)[window_of_frame]  # (F_total, D)

    def text_context(self, text_tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [b.cross_attn.project_kv(text_tokens) for b in self.blocks]

    def forward(self, windows: list[FrameInputs], text_tokens: torch.Tensor, text_mask: torch.Tensor,
                text_pooled: torch.Tensor, causal: bool = False, cache: ObservedCache | None = None,
                record: list | None = None) -> list[torch.Tensor]:
        """Velocity predictions (F, C, h, w) for every window (observed frames' outputs are meaningless).

        text_tokens (W, L, Dt), text_mask (W, L), text_pooled (W, E): one row per window.
        With ``cache``, ``windows`` hold latent frames only, all equally shaped, and the observed frames'
        keys/values come from the cache.
        """
        for w in windows:
            self.check_window(w)
        p = self.cfg.patch
        shapes = [(w.frames.shape[0], w.frames.shape[2] // p, w.frames.shape[3] // p) for w in windows]
        device = windows[0].frames.device
        # The layout is planned on the CPU from every window's flags and frame indices, fetched in one copy each:
        # a copy per window waits for the GPU each time (hundreds of waits a step for a training batch).
        lengths = [len(w.observed) for w in windows]
        observed = joined([w.observed for w in windows]).cpu().split(lengths)
        times = joined([w.times for w in windows]).cpu().split(lengths)
        layout = build_layout(shapes, list(observed), list(times), causal, self.head_dim, self.cfg, device,
                              cached_times=None if cache is None else cache.times.cpu(),
                              pad_windows=self.training and cache is None and record is None)
        # Neighbouring windows of one frame size are patchified, and their outputs unpatchified, together: a few
        # kernels per run of equal sizes rather than per window (a training batch is sorted by size).
        runs = [list(run) for _, run in itertools.groupby(range(len(windows)), lambda i: windows[i].frames.shape[2:])]
        frames = [joined([windows[i].frames for i in run]).to(self.t_embed.mlp[0].weight.dtype) for run in runs]
        flags = [joined([windows[i].observed for i in run]) for run in runs]
        c = self._conditioning(windows, text_pooled, layout.window_of_frame)  # (F_total, D)
        # Each run's frames are a contiguous range of the frames' conditioning (windows keep their order).
        conds = c.split([len(f) for f in frames])
        if self.stages is None:
            x = self.patch_embed(joined([self.patchify(f, o) for f, o in zip(frames, flags)]))
            skips = [None] * len(runs)
        else:
            encoded = [self.stages.encode(f, o, cond) for f, o, cond in zip(frames, flags, conds)]
            x = joined([tokens for tokens, _ in encoded])
            skips = [run_skips for _, run_skips in encoded]
        text_kv = cache.text_kv if cache is not None else self.text_context(text_tokens)
        for i, block in enumerate(self.blocks):
            mod = gather_tokens(self.ada[i](c), layout.frame_of_token)  # (L, 9D)
            x = block(x, mod, layout, text_kv[i], text_mask,
                      cache=None if cache is None else cache.blocks[i], record=record)
        features = self.final.features(x, gather_tokens(c, layout.frame_of_token))
        x = features if self.final.linear is None else self.final.linear(features)
        outs, start = [], 0
        for run, run_frames, run_skips, cond in zip(runs, frames, skips, conds):
            f, _, h, w = run_frames.shape
            n = f * (h // p) * (w // p)
            if self.stages is not None:
                out = self.stages.decode(x[start:start + n], run_skips, cond)
            else:
                out = self.unpatchify(x[start:start + n], f, h, w)
            if self.refine is not None:
                noise = joined([windows[i].noise for i in run])
                out = self.refine(out, run_frames, noise, features[start:start + n])
            outs.extend(out.split([len(windows[i].frames) for i in run]))
            start += n
        return outs

    @torch.no_grad()
    def observed_cache(self, windows: list[FrameInputs], text_tokens: torch.Tensor, text_mask: torch.Tensor,
                       text_pooled: torch.Tensor) -> ObservedCache:
        """Run the observed frames alone (they attend only to each other) and keep their temporal K/V.

        ``windows`` hold only observed frames and must be equally shaped (the guidance branches of one
        sampling call); the cache then serves latent-only forwards of windows with the same shape.
        """
        shapes = {(tuple(w.frames.shape), tuple(w.times.tolist())) for w in windows}
        if len(shapes) != 1:
            raise ValueError("observed_cache: windows must share frame shape and times")
        record: list[BlockCache] = []
        self.forward(windows, text_tokens, text_mask, text_pooled, causal=False, record=record)
        return ObservedCache(record, windows[0].times.clone(), self.text_context(text_tokens))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
