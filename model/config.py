"""Typed model configurations and the preset registry.

Every checkpoint directory holds a ``config.json`` written from :class:`ModelConfig`; loading one rebuilds
exactly the same modules. Unknown keys are an error so that a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the configs load without torch (the orchestrator reads them)
    import torch


# Frame width and height are multiples of this (see ModelConfig's check).
FRAME_MULTIPLE = 16


@dataclass(frozen=True)
class VAEConfig:
    latent_channels: int = 8
    # Feature channels at full, 1/2, 1/4 ... resolution: each level after the first halves height and width,
    # so len(channels) - 1 stages of ×2 make ``spatial_factor`` (four levels ×8, three levels ×4).
    channels: tuple[int, ...] = (16, 32, 64, 96)
    res_blocks: int = 1  # 2-D residual blocks per resolution level
    # Causal temporal residual blocks at the latent frame rate; each adds 2 * (kernel_t - 1) latent frames to
    # the decoder's receptive field.
    temporal_blocks: int = 1
    # Causal temporal residual blocks at the video frame rate (0: none). With any, the decoder unpacks each
    # latent into its frames right after the latent-rate blocks and runs every later layer per frame, so each
    # frame has a feature map of its own and neighbouring frames mix across latent boundaries; without, the
    # last layer emits all of a latent's frames from one feature map, and the video holds still for a latent's
    # frames, then jumps (what the evaluation measured as seams). Costs about temporal_factor times the
    # decoder's compute; adds ceil(2 * (kernel_t - 1) / temporal_factor) latent frames of context per block.
    frame_blocks: int = 0
    # The encoder mixes no latent frames by default: each latent then depends only on its own four frames,
    # so training can encode frames sampled minutes apart without encoding everything in between.
    encoder_temporal_blocks: int = 0
    kernel_t: int = 3
    # A per-pixel channel norm before the layers that produce the latents and the pixels. Off by default: with
    # it, training from scratch stalled near 14 dB (the network could not even overfit one batch), without it
    # the same batch passes 21 dB in 100 steps. Kept for checkpoints trained with it.
    output_norm: bool = False
    spatial_factor: int = 8
    temporal_factor: int = 4
    # Parameter-free residual shortcuts around every change of resolution (space-to-channel in the encoder,
    # channel-to-space in the decoder) and between the features and the latents, as in deep-compression
    # autoencoders, so the convolutions learn only what the rearranged pixels miss. Off in every preset: on the
    # x4 demo VAE they held training near 12 dB for 400 steps where the plain VAE reached 15 dB.
    shortcuts: bool = False
    # A decoder that reads the prompt: the width of the text encoder's per-token embeddings it attends to, and its
    # attention heads (0: a decoder of the latents alone, as in every preset and the shipped model). The DiT of the
    # demo model places a blob of the prompted colour where an object goes but draws no corners
    # (ops/train/EXPERIMENTS.md, "Every shape comes out round"); a decoder given the caption could draw the shape
    # it names for that colour (trained with `longshot train vae --decoder-only --circled`; not yet long enough to
    # ship, ops/train/EXPERIMENTS.md, "A decoder that reads the prompt"). Attention is per pixel of each frame at
    # the lowest resolution, after the layers that mix time, so decoding stays causal and chunked decodes equal
    # one-shot ones.
    caption_width: int = 0
    caption_heads: int = 4
    # Shape channels: the last ``shape_channels`` of the ``latent_channels`` hold, for each of the world's shapes
    # (``world.SHAPES`` order), SHAPE_SCALE times the share of each latent pixel an object of that shape covers;
    # the others are the usual appearance latents (0: none, as in the shipped model). The encoder predicts them
    # with a head of their own (supervised by ``world.shape_coverage``, no posterior noise, no KL); the decoder
    # reads them beside the appearance latents. Why: a DiT of the demo's size places a blob of the prompted colour
    # but draws no corners from the appearance latents (ops/train/EXPERIMENTS.md, "Every shape comes out round");
    # naming the shape in channels of its own per latent pixel is a choice it can make, and a decoder trained on
    # circles' latents beside the true shape channels draws the shape the channels name ("Shape channels beside
    # the latents").
    shape_channels: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.shape_channels < self.latent_channels:
            raise ValueError(f"vae.shape_channels: {self.shape_channels} must be at least 0 and below "
                             f"vae.latent_channels ({self.latent_channels})")
        if self.shape_channels and self.shortcuts:
            raise ValueError("vae.shape_channels: shape channels do not combine with vae.shortcuts")
        if self.caption_width and (self.caption_heads <= 0 or self.channels[-1] % self.caption_heads):
            raise ValueError(f"vae.caption_heads: {self.caption_heads} must be positive and divide the decoder's "
                             f"last channels ({self.channels[-1]})")
        stages = 2 ** (len(self.channels) - 1)
        if self.spatial_factor != stages:
            raise ValueError(f"vae.spatial_factor: {self.spatial_factor} does not match vae.channels "
                             f"{tuple(self.channels)}: {len(self.channels)} levels downsample by {stages}")
        if self.shortcuts:
            pairs = list(zip(self.channels, self.channels[1:]))
            if any((4 * a) % b or (4 * b) % a for a, b in pairs) or self.channels[-1] % self.latent_channels:
                raise ValueError(f"vae.channels: {tuple(self.channels)} with shortcuts needs each level's channels "
                                 f"to divide four times its neighbour's and the last to be a multiple of "
                                 f"vae.latent_channels ({self.latent_channels})")

    @property
    def appearance_channels(self) -> int:
        """The latent channels the encoder's posterior makes (all but the shape channels)."""
        return self.latent_channels - self.shape_channels

    @property
    def decode_context(self) -> int:
        """Earlier latent frames that a decoded range depends on (the decoder's causal receptive field)."""
        frames = self.frame_blocks * 2 * (self.kernel_t - 1)
        return self.temporal_blocks * 2 * (self.kernel_t - 1) + -(-frames // self.temporal_factor)


@dataclass(frozen=True)
class TextConfig:
    # An open_clip model name: one of ours (model/configs/<name>.json) or a standard one such as ViT-B-32.
    model_name: str = "longshot-text-demo"
    # A local open_clip checkpoint file for standard names; never a hub tag.
    pretrained: str | None = None


@dataclass(frozen=True)
class DiTConfig:
    hidden: int = 192
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    patch: int = 2
    max_window: int = 16  # observed + latent frames in one window
    # Feature channels of a 3x3 convolutional head on each output frame (0: none; see dit.RefineHead). Every
    # token predicts its patch through one linear layer, so with 4x4 patches small objects lose their corners;
    # the head works per latent pixel and across patch borders. Starts as the identity. Off in the presets:
    # 8,000 head-only steps on the shipped demo DiT left adherence and seams where they were (MODEL_CARD.md).
    refine: int = 0
    # Channels of convolutional stages around the transformer (empty: none; see dit.ConvStages): the first at
    # the latent resolution, each next one at half the last one's. They replace the linear patch embedding and
    # output layer by a small U-Net whose skip connections carry every latent pixel of the input to the output,
    # as U-ViT and HDiT do: on single frames a convolutional U-Net drew twice the prompted shapes the DiT drew
    # on the same data (ops/train/EXPERIMENTS.md). The tokens are still `patch` latent pixels wide, so the
    # transformer's cost is unchanged; 2 ** (len(conv) - 1) must divide `patch`.
    conv: tuple[int, ...] = ()
    conv_blocks: int = 1  # residual blocks per stage, on the way down and again on the way up
    rope_theta_space: float = 100.0
    rope_theta_time: float = 10000.0

    def __post_init__(self) -> None:
        if self.conv:
            if self.patch % 2 ** (len(self.conv) - 1):
                raise ValueError(f"dit.conv: {len(self.conv)} stages halve the resolution {len(self.conv) - 1} "
                                 f"times, which must divide dit.patch {self.patch}")
            if self.refine:
                raise ValueError("dit.refine: the refine head and convolutional stages (dit.conv) exclude each "
                                 "other; the stages already end in convolutions at the latent resolution")
            if any(c < 8 or c % 8 for c in self.conv):
                raise ValueError(f"dit.conv: {list(self.conv)}: every stage needs a multiple of 8 channels "
                                 f"(its group normalisation has 8 groups)")
        if self.conv_blocks < 1:
            raise ValueError(f"dit.conv_blocks: {self.conv_blocks} must be at least 1")


@dataclass(frozen=True)
class FlowConfig:
    # Time shift of the sampling schedule (SD3-style); >1 spends more steps at high noise.
    shift: float = 3.0
    # Probability of replacing the prompt by "" during training, so classifier-free guidance has an
    # unconditional model to contrast with.
    text_dropout: float = 0.1
    # Share of the initial noise's variance common to every latent frame of a video (0: independent frames).
    # The mixed noise prior of PYoCo (Ge et al. 2023, "Preserve your own correlation"): frames of a video are
    # alike, so noise that is alike across frames leaves the model less to undo, and frames sampled apart (in
    # different windows of a long video) start from the same common field. Training draws the same prior.
    noise_correlation: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise_correlation < 1.0:
            raise ValueError(f"flow.noise_correlation: must be in [0, 1), got {self.noise_correlation}")


def _join_channels(appearance: "torch.Tensor", shapes: "torch.Tensor") -> "torch.Tensor":
    import torch
    return torch.cat([appearance, shapes.to(appearance.dtype)], dim=1)


@dataclass(frozen=True)
class ModelConfig:
    preset: str
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    # Latents are stored normalised: z = (vae_mean - latent_shift) * latent_scale (set after VAE training).
    latent_shift: float = 0.0
    latent_scale: float = 1.0

    def __post_init__(self) -> None:
        # Frames are sized in multiples of FRAME_MULTIPLE everywhere (job specs, the planner, the store); the
        # VAE's downsampling times the DiT's patch must divide it so every such size maps to whole patches.
        multiple = self.vae.spatial_factor * self.dit.patch
        if FRAME_MULTIPLE % multiple:
            raise ValueError(f"dit.patch: {self.dit.patch} x vae.spatial_factor {self.vae.spatial_factor} = "
                             f"{multiple} must divide the frame-size multiple {FRAME_MULTIPLE}")

    def normalise_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """The encoder's raw latents, channels on dim 1, to the normalised ones the DiT and the store hold: the
        appearance channels shifted and scaled; the shape channels are unit-sized by construction and kept."""
        a = self.vae.appearance_channels
        z = (raw[:, :a] - self.latent_shift) * self.latent_scale
        return z if not self.vae.shape_channels else _join_channels(z, raw[:, a:])

    def raw_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalise_latents`: what the decoder reads."""
        a = self.vae.appearance_channels
        raw = z[:, :a] / self.latent_scale + self.latent_shift
        return raw if not self.vae.shape_channels else _join_channels(raw, z[:, a:])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        parts = {"vae": VAEConfig, "text": TextConfig, "dit": DiTConfig, "flow": FlowConfig}
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name in parts:
                kwargs[name] = _build(parts[name], value, f"config.{name}")
            elif name in {f.name for f in dataclasses.fields(cls)}:
                kwargs[name] = value
            else:
                raise ValueError(f"config: unknown key {name!r}; allowed: {sorted(f.name for f in dataclasses.fields(cls))}")
        if "preset" not in kwargs:
            raise ValueError("config: missing key 'preset'")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _build(kind: type, value: dict[str, Any], where: str):
    allowed = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(value) - set(allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return kind(**fixed)


PRESETS: dict[str, ModelConfig] = {
    # Tests: seconds to build, random weights are fine.
    "tiny": ModelConfig(
        preset="tiny",
        vae=VAEConfig(latent_channels=4, channels=(8, 8, 16, 16), res_blocks=1, temporal_blocks=1),
        text=TextConfig(model_name="longshot-text-tiny"),
        dit=DiTConfig(hidden=16, depth=2, heads=2, max_window=8),
    ),
    # The shipped model: sized for a 60-second render on a 2-core CPU in minutes.
    "demo": ModelConfig(
        preset="demo",
        # ×4 in space, 4 latent channels, DiT patches of 4: the DiT sees as many tokens as with a ×8 VAE and
        # 2×2 patches, but each latent covers 4×4 pixels, so the few-pixel shapes of the world survive the round
        # trip (a ×8 VAE with 8 or 16 latent channels blurred them into blobs: a shape detector found only a
        # quarter of the prompted objects in its reconstructions), and the small VAE trains several times faster.
        # The decoder works at the frame rate after its latent-rate block (frame_blocks=1): a latent's four
        # frames move instead of holding still and jumping at the next latent. The mixed noise prior (0.8 of
        # the variance shared by a video's frames) cut the frame-to-frame jumps of the generated latents.
        vae=VAEConfig(latent_channels=4, channels=(32, 64, 128), spatial_factor=4, res_blocks=1, temporal_blocks=1,
                      frame_blocks=1),
        text=TextConfig(model_name="longshot-text-demo"),
        dit=DiTConfig(hidden=160, depth=5, heads=5, patch=4, max_window=16),
        flow=FlowConfig(noise_correlation=0.8),
    ),
    # A GPU-sized configuration for throughput work (~239M DiT parameters: each block holds ~29.4M, of
    # which 9.4M are its adaLN modulation, so depth 12 at this width would exceed 350M).
    "base": ModelConfig(
        preset="base",
        vae=VAEConfig(latent_channels=16, channels=(64, 128, 256, 256), res_blocks=2, temporal_blocks=2),
        text=TextConfig(model_name="ViT-B-32"),
        dit=DiTConfig(hidden=1024, depth=8, heads=16, max_window=32),
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]
