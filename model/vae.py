"""Causal 3-D video VAE: ×4 or ×8 in space (``VAEConfig.spatial_factor``), ×4 in time, the first frame encoded alone.

A video of ``1 + 4k`` frames maps to ``1 + k`` latent frames: latent 0 holds frame 0 only (so a still image is
a one-frame video), latent ``i >= 1`` holds frames ``4i-3 .. 4i``. Frames are grouped four at a time into
channels (space-to-time packing) after padding the front with three copies of frame 0; all temporal mixing
happens through causal convolutions, at the latent frame rate (and, in a decoder with ``frame_blocks``, at the
video frame rate after unpacking), and every other layer is per frame. Decoding latent ``i`` therefore depends
only on latents ``i - decode_context .. i``, which is what lets the orchestrator decode segments independently
and seamlessly.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import FRAME_MULTIPLE, VAEConfig


# Shape channels hold this many times each latent pixel's per-shape coverage (VAEConfig.shape_channels): a
# covered pixel then stands about as far from an empty one as the normalised appearance latents spread.
SHAPE_SCALE = 3.0
# The shape channels' "posterior" log-variance: they are a prediction, not a sample (the clamp's floor).
SHAPE_LOGVAR = -30.0


class PixelNorm(nn.Module):
    """Layer norm over channels at every pixel of every frame (causal, and keeps flat colour)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None, None] + self.bias[:, None, None, None]


class FrameNorm(nn.GroupNorm):
    """GroupNorm over each frame alone (statistics across time would break causality).

    Used only inside residual branches: it normalises a uniform colour to zero, so colour must travel along
    the skip paths; the layers that produce the latents and the pixels take the residual stream unnormalised
    (or, with ``VAEConfig.output_norm``, through :class:`PixelNorm`).
    """

    def __init__(self, channels: int):
        super().__init__(max(1, channels // 8), channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class FrameConv(nn.Conv2d):
    """A 2-D convolution applied to every frame independently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """3-D convolution that sees only the current and earlier frames (front padding by edge replication)."""

    def __init__(self, cin: int, cout: int, kernel_t: int = 3, kernel_s: int = 3):
        super().__init__(cin, cout, (kernel_t, kernel_s, kernel_s), padding=(0, kernel_s // 2, kernel_s // 2))
        self.time_pad = kernel_t - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return super().forward(x)


class FrameResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(cin), FrameConv(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = FrameNorm(cout), FrameConv(cout, cout, 3, padding=1)
        self.skip = FrameConv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class CausalResBlock(nn.Module):
    """Residual block mixing latent frames causally; receptive field 2 * (kernel_t - 1) latent frames."""

    def __init__(self, channels: int, kernel_t: int):
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(channels), CausalConv3d(channels, channels, kernel_t)
        self.norm2, self.conv2 = FrameNorm(channels), CausalConv3d(channels, channels, kernel_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def space_to_channel(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Parameter-free ×2 downsampling to ``channels``: every 2x2 block's pixels become channels, then groups of
    neighbouring channels are averaged (the residual shortcut of deep-compression autoencoders)."""
    b, c, t, h, w = x.shape
    y = F.pixel_unshuffle(x.transpose(1, 2).reshape(b * t, c, h, w), 2)  # (b*t, 4c, h/2, w/2)
    y = y.reshape(b * t, channels, 4 * c // channels, h // 2, w // 2).mean(dim=2)
    return y.reshape(b, t, channels, h // 2, w // 2).transpose(1, 2)


def channel_to_space(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The inverse shortcut: channels repeated to 4 * ``channels``, then rearranged into 2x2 pixel blocks."""
    b, c, t, h, w = x.shape
    y = x.transpose(1, 2).reshape(b * t, c, h, w).repeat_interleave(4 * channels // c, dim=1)
    y = F.pixel_shuffle(y, 2)
    return y.reshape(b, t, channels, 2 * h, 2 * w).transpose(1, 2)


def channel_mean(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Groups of neighbouring channels averaged down to ``channels`` (B, C, T, H, W)."""
    b, c, t, h, w = x.shape
    return x.reshape(b, channels, c // channels, t, h, w).mean(dim=2)


class Downsample(nn.Module):
    """Stride-2 convolution from ``cin`` to ``cout`` channels, optionally plus the space-to-channel shortcut."""

    def __init__(self, cin: int, cout: int | None = None, shortcut: bool = False):
        super().__init__()
        self.cout = cout or cin
        self.conv = FrameConv(cin, self.cout, 3, stride=2, padding=1)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + space_to_channel(x, self.cout) if self.shortcut else y


class Upsample(nn.Module):
    """Nearest ×2 then a convolution from ``cin`` to ``cout``, optionally plus the channel-to-space shortcut."""

    def __init__(self, cin: int, cout: int | None = None, shortcut: bool = False):
        super().__init__()
        self.cout = cout or cin
        self.conv = FrameConv(cin, self.cout, 3, padding=1)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = F.interpolate(x.transpose(1, 2).reshape(b * t, c, h, w), scale_factor=2, mode="nearest")
        y = self.conv(y.reshape(b, t, c, 2 * h, 2 * w).transpose(1, 2))
        return y + channel_to_space(x, self.cout) if self.shortcut else y


class ShapeHead(nn.Module):
    """A latent frame's packed pixels (B, 3*tf, T_lat, H, W) to its shape channels (B, S, T_lat, h, w): a small
    convolutional network of its own, downsampling by the VAE's spatial factor.

    Why not a head on the encoder's features: those are made to reconstruct, and the shape is not there to read
    off. On the shipped encoder's features a two-layer head reached a squared error of 0.078 (0.101 for "no object
    anywhere") and named the right shape for 37% of covered latent pixels after 800 steps; this network, on the
    same clips and steps, 0.023 and 92% (ops/train/EXPERIMENTS.md, "The shape head reads the pixels"). Its output
    layer starts at zero (no object anywhere).
    """

    def __init__(self, cfg: VAEConfig, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = [FrameConv(3 * cfg.temporal_factor, width // 2, 3, padding=1), nn.SiLU()]
        channels = width // 2
        for _ in range(int(math.log2(cfg.spatial_factor))):
            layers += [FrameConv(channels, width, 4, stride=2, padding=1), nn.SiLU()]
            channels = width
        layers += [FrameConv(width, width, 3, padding=1), nn.SiLU(), FrameConv(width, width, 3, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = FrameConv(width, cfg.shape_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(pixels))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, tf = cfg.channels, cfg.temporal_factor
        self.conv_in = FrameConv(3 * tf, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for level, c in enumerate(ch):
            # With shortcuts the channel count changes in the downsampling layer, so that its shortcut carries
            # all of the pixels into the new channels; without, in the next level's first residual block.
            cin = c if cfg.shortcuts else ch[max(level - 1, 0)]
            for i in range(cfg.res_blocks):
                layers.append(FrameResBlock(cin if i == 0 else c, c))
            if level < len(ch) - 1:
                layers.append(Downsample(c, ch[level + 1], shortcut=True) if cfg.shortcuts else Downsample(c))
        self.down = nn.Sequential(*layers)
        self.latent_channels = cfg.latent_channels
        self.shortcut = cfg.shortcuts
        self.temporal = nn.Sequential(*[CausalResBlock(ch[-1], cfg.kernel_t) for _ in range(cfg.encoder_temporal_blocks)])
        self.norm_out = PixelNorm(ch[-1]) if cfg.output_norm else nn.Identity()
        appearance = cfg.appearance_channels
        self.conv_out = FrameConv(ch[-1], 2 * appearance, 3, padding=1)
        # Start with a small posterior variance: with the tiny KL weight the noise would otherwise drown the
        # latents early in training and the encoder would spend thousands of steps outgrowing it.
        nn.init.constant_(self.conv_out.bias[appearance:], -6.0)
        # The shape channels (VAEConfig.shape_channels): a deterministic head of its own, so that one trained
        # beside a frozen encoder leaves its appearance latents, and a DiT trained on them, as they were.
        self.shape_head = ShapeHead(cfg) if cfg.shape_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3*tf, T_lat, H, W) -> (B, 2C, T_lat, h, w)
        """The posterior's moments, means then log-variances; a shape channel's log-variance is SHAPE_LOGVAR."""
        pixels = x
        x = self.down(self.conv_in(x))
        x = self.temporal(x)
        moments = self.conv_out(F.silu(self.norm_out(x)))
        if self.shortcut:  # the mean also gets the features averaged down to the latent channels
            mean, logvar = moments.chunk(2, dim=1)
            moments = torch.cat([mean + channel_mean(x, self.latent_channels), logvar], dim=1)
        if self.shape_head is not None:
            mean, logvar = moments.chunk(2, dim=1)
            shapes = self.shape_head(pixels)
            moments = torch.cat([mean, shapes, logvar, torch.full_like(shapes, SHAPE_LOGVAR)], dim=1)
        return moments


class TimeUnpack(nn.Module):
    """Latent-rate features to frame-rate features: each of a latent's ``tf`` frames gets the latent's features
    plus an offset of its own. The offsets start at zero, so a decoder warm-started from a latent-rate one
    begins by holding each latent still and learns the motion within it."""

    def __init__(self, channels: int, temporal_factor: int):
        super().__init__()
        self.tf = temporal_factor
        self.conv = FrameConv(channels, temporal_factor * channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T_lat, h, w) -> (B, C, tf*T_lat, h, w)
        b, c, t, h, w = x.shape
        frames = x.unsqueeze(1) + self.conv(x).reshape(b, self.tf, c, t, h, w)
        return frames.permute(0, 2, 3, 1, 4, 5).reshape(b, c, t * self.tf, h, w)


class CaptionAttention(nn.Module):
    """Each latent pixel's features attend to the prompt's tokens: the decoder learns what to draw for a
    region of a colour from the words about that colour.

    The tokens first pass one self-attention layer of their own, which can bind each shape word to the colour
    word before it (the text encoder was trained contrastively and barely tells shapes apart in its pooled
    embedding). The output projection starts at zero, so a decoder warm-started from one without captions
    begins exactly as it was.
    """

    def __init__(self, channels: int, text_width: int, heads: int):
        super().__init__()
        self.project = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, channels))
        self.bind = nn.TransformerEncoderLayer(channels, heads, 2 * channels, dropout=0.0, batch_first=True,
                                               norm_first=True)
        self.norm = nn.LayerNorm(channels)
        self.attend = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, h, w); tokens (B, L, D) and mask (B, L), True where a token is real."""
        b, c, t, h, w = x.shape
        padding = ~mask.bool()
        words = self.bind(self.project(tokens.to(x.dtype)), src_key_padding_mask=padding)
        queries = self.norm(x.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c))
        seen, _ = self.attend(queries, words, words, key_padding_mask=padding, need_weights=False)
        return x + self.out(seen).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Decoder(nn.Module):
    """Latents (B, C, T_lat, h, w) to frames (B, 3, tf*T_lat, H, W).

    With ``VAEConfig.frame_blocks`` the time axis is unpacked to frames at the lowest resolution, before the
    spatial upsampling; otherwise the output layer emits a latent's ``tf`` frames as channels.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, tf = cfg.channels, cfg.temporal_factor
        self.tf = tf
        self.appearance = cfg.appearance_channels
        self.conv_in = FrameConv(cfg.appearance_channels, ch[-1], 3, padding=1)
        # The shape channels (VAEConfig.shape_channels) enter through a layer of their own, starting at zero: a
        # decoder warm-started from one without them begins by drawing what it drew, and the layer can learn
        # at a rate of its own (model.train.SHAPE_LR_SCALE).
        self.shape_in = FrameConv(cfg.shape_channels, ch[-1], 3, padding=1) if cfg.shape_channels else None
        if self.shape_in is not None:
            nn.init.zeros_(self.shape_in.weight)
            nn.init.zeros_(self.shape_in.bias)
        self.temporal = nn.Sequential(*[CausalResBlock(ch[-1], cfg.kernel_t) for _ in range(cfg.temporal_blocks)])
        self.caption = CaptionAttention(ch[-1], cfg.caption_width, cfg.caption_heads) if cfg.caption_width else None
        self.frame_rate = cfg.frame_blocks > 0
        if self.frame_rate:
            self.unpack = TimeUnpack(ch[-1], tf)
            self.frame_temporal = nn.Sequential(*[CausalResBlock(ch[-1], cfg.kernel_t)
                                                  for _ in range(cfg.frame_blocks)])
            for block in self.frame_temporal:  # start as the identity (see TimeUnpack)
                nn.init.zeros_(block.conv2.weight)
                nn.init.zeros_(block.conv2.bias)
        layers: list[nn.Module] = []
        for level in reversed(range(len(ch))):
            c = ch[level]
            cin = c if cfg.shortcuts else ch[min(level + 1, len(ch) - 1)]
            for i in range(cfg.res_blocks):
                layers.append(FrameResBlock(cin if i == 0 else c, c))
            if level > 0:
                layers.append(Upsample(c, ch[level - 1], shortcut=True) if cfg.shortcuts else Upsample(c))
        self.up = nn.Sequential(*layers)
        self.features = ch[-1]
        self.shortcut = cfg.shortcuts
        self.norm_out = PixelNorm(ch[0]) if cfg.output_norm else nn.Identity()
        self.conv_out = FrameConv(ch[0], 3 if self.frame_rate else 3 * tf, 3, padding=1)

    def forward(self, z: torch.Tensor, caption: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``caption``: the prompt's (tokens, mask) for a decoder that reads it (``VAEConfig.caption_width``),
        one per video; a decoder that does not ignores it."""
        x = self.conv_in(z[:, :self.appearance])
        if self.shape_in is not None:
            x = x + self.shape_in(z[:, self.appearance:])
        if self.shortcut:  # the latents repeated up to the feature channels
            x = x + z.repeat_interleave(self.features // z.shape[1], dim=1)
        x = self.temporal(x)
        if self.frame_rate:
            x = self.frame_temporal(self.unpack(x))
        if self.caption is not None:
            # After the layers that mix time: from here on all is per frame, so the caption's gradient stops
            # here and the frozen temporal blocks' features can be computed once and reused.
            if caption is None:
                raise ValueError("caption: this decoder reads the prompt; pass its tokens (the empty prompt's "
                                 "for none)")
            x = self.caption(x, *caption)
        out = self.conv_out(F.silu(self.norm_out(self.up(x))))
        if self.frame_rate:
            return out
        b, _, t, h, w = out.shape  # (B, 3*tf, T_lat, H, W): channel group k is each latent's frame k
        return out.reshape(b, self.tf, 3, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, 3, t * self.tf, h, w)

    def before_frame_stack(self) -> list[nn.Module]:
        """The layers before the per-frame upsampling stack: all that mix latent frames or frames, and the
        caption block after them."""
        layers: list[nn.Module] = [self.conv_in, *([self.shape_in] if self.shape_in is not None else []),
                                   self.temporal]
        if self.frame_rate:
            layers += [self.unpack, self.frame_temporal]
        if self.caption is not None:
            layers.append(self.caption)
        return layers

    @staticmethod
    def frame_rate_state(state: dict[str, torch.Tensor], temporal_factor: int,
                         prefix: str = "") -> dict[str, torch.Tensor]:
        """A latent-rate decoder's weights (keys under ``prefix``) adapted to the frame-rate decoder: the output
        layer's per-frame channel groups averaged into one (every other tensor keeps its name and shape)."""
        state = dict(state)
        for key in (f"{prefix}conv_out.weight", f"{prefix}conv_out.bias"):
            if key in state and state[key].shape[0] == 3 * temporal_factor:
                value = state[key]
                state[key] = value.reshape(temporal_factor, 3, *value.shape[1:]).mean(dim=0)
        return state


class CausalVAE(nn.Module):
    """Pixels are floats in [-1, 1] shaped (B, 3, T, H, W); latents are (B, C, T_lat, h, w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def decode_context(self) -> int:
        return self.cfg.decode_context

    def num_latent_frames(self, num_frames: int) -> int:
        tf = self.cfg.temporal_factor
        return 1 + -(-(num_frames - 1) // tf)

    def _pack_time(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) with T = 1 + tf*k -> (B, 3*tf, 1+k, H, W): frame 0 alone, then groups of tf."""
        tf = self.cfg.temporal_factor
        b, c, t, h, w = video.shape
        if (t - 1) % tf:
            raise ValueError(f"frames: a video must have 1 + {tf}k frames to encode, got {t}")
        video = torch.cat([video[:, :, :1].expand(-1, -1, tf - 1, -1, -1), video], dim=2)
        return video.reshape(b, c, -1, tf, h, w).permute(0, 3, 1, 2, 4, 5).reshape(b, tf * c, -1, h, w)

    def check_size(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if value % FRAME_MULTIPLE or value <= 0:
                raise ValueError(f"{name}: frame size must be a positive multiple of {FRAME_MULTIPLE}, got {value}")

    def encode_dist(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each (B, C, T_lat, h, w)."""
        self.check_size(video.shape[-2], video.shape[-1])
        moments = self.encoder(self._pack_time(video))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @property
    def reads_caption(self) -> bool:
        return self.decoder.caption is not None

    def decode_frames(self, z: torch.Tensor, *, from_start: bool,
                      caption: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Decode latents to frames in [-1, 1]. From the start of a video, latent 0 yields one frame.
        ``caption``: (tokens, mask) of each video's prompt, for a decoder that reads it."""
        frames = self.decoder(z, caption)
        if from_start:
            frames = frames[:, :, self.cfg.temporal_factor - 1 :]
        return frames

    def forward(self, video: torch.Tensor, sample: bool = True,
                caption: tuple[torch.Tensor, torch.Tensor] | None = None):
        mean, logvar = self.encode_dist(video)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.decode_frames(z, from_start=True, caption=caption), mean, logvar
