"""Causal video VAE through the Generator facade: shapes, sizes, causality, chunked decoding."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model_test_helpers import latents


def clip(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def frame_slice(start: int, stop: int) -> slice:
    """Video frames of latent frames [start, stop): latent 0 <-> frame 0, latent i >= 1 <-> 4i-3 .. 4i."""
    return slice(max(0, 4 * start - 3), 4 * stop - 3)


@pytest.mark.parametrize(("frames", "latent_frames"), [(1, 1), (5, 2), (9, 3), (13, 4)])
def test_first_frame_alone_then_groups_of_four(tiny_gen, frames, latent_frames):
    z = tiny_gen.encode(clip(frames, 32, 32, seed=frames))
    assert z.shape == (latent_frames, tiny_gen.latent_channels, 4, 4)
    assert z.dtype == torch.float32
    assert tiny_gen.num_latent_frames(frames) == latent_frames
    video = tiny_gen.decode(z)
    assert video.shape == (1 + 4 * (latent_frames - 1), 32, 32, 3)
    assert video.dtype == torch.uint8


def test_length_not_one_plus_4k_rounds_up(tiny_gen):
    assert [tiny_gen.num_latent_frames(n) for n in (2, 5, 6, 10)] == [2, 2, 3, 4]
    assert tiny_gen.encode(clip(6, 16, 16, seed=0)).shape[0] == 3


def test_still_image_is_the_first_latent_of_a_video(tiny_gen):
    video = clip(9, 32, 48, seed=1)
    still = tiny_gen.encode(video[:1])
    moving = tiny_gen.encode(video)
    assert still.shape == (1, tiny_gen.latent_channels, 4, 6)
    torch.testing.assert_close(still[0], moving[0], rtol=0, atol=1e-5)
    # The image is still an image: decoding its latent gives one frame.
    assert tiny_gen.decode(still).shape == (1, 32, 48, 3)


@pytest.mark.parametrize(("height", "width"), [(32, 48), (48, 16), (16, 64), (16, 16)])
def test_any_aspect_ratio_in_multiples_of_16(tiny_gen, height, width):
    assert tiny_gen.latent_size(height, width) == (height // 8, width // 8)
    z = tiny_gen.encode(clip(5, height, width, seed=height + width))
    assert z.shape == (2, tiny_gen.latent_channels, height // 8, width // 8)
    assert tiny_gen.decode(z).shape == (5, height, width, 3)


@pytest.mark.parametrize(("height", "width", "field", "value"),
                         [(40, 48, "height", 40), (32, 20, "width", 20), (8, 32, "height", 8), (24, 24, "height", 24)])
def test_sizes_not_multiple_of_16_are_rejected(tiny_gen, height, width, field, value):
    pattern = rf"{field}: .*multiple of 16, got {value}\b"
    with pytest.raises(ValueError, match=pattern):
        tiny_gen.latent_size(height, width)
    with pytest.raises(ValueError, match=pattern):
        tiny_gen.encode(clip(1, height, width, seed=0))


def test_encoder_is_causal(tiny_gen):
    video = clip(13, 32, 32, seed=2)
    changed = video.copy()
    changed[5:] = 255 - changed[5:]  # frames of latents 2 and 3
    before, after = tiny_gen.encode(video), tiny_gen.encode(changed)
    torch.testing.assert_close(before[:2], after[:2], rtol=0, atol=1e-5)
    assert (before[2:] - after[2:]).abs().amax() > 1e-2


@pytest.fixture(scope="module")
def frame_rate_gen():
    """The tiny preset with a decoder that unpacks time before upsampling (``frame_blocks``), every decoder
    weight randomised: its frame-rate layers start as the identity, which would hide their receptive field."""
    from model.config import get_preset
    from model.generator import Generator, VideoModel
    from model_test_helpers import randomize_

    tiny = get_preset("tiny")
    torch.manual_seed(0)
    gen = Generator(VideoModel(tiny.replace(vae=dataclasses.replace(tiny.vae, frame_blocks=1))), device="cpu")
    randomize_(gen.model.vae.decoder, seed=5, std=0.1)
    return gen


@pytest.fixture(params=["latent-rate", "frame-rate"])
def decoder_gen(request, tiny_gen, frame_rate_gen):
    return tiny_gen if request.param == "latent-rate" else frame_rate_gen


def test_decoder_is_causal(decoder_gen):
    z = latents(5, decoder_gen.latent_channels, 4, 4, seed=3)
    changed = z.clone()
    changed[3:] += 2.0  # latent 3 is video frames 9..12
    before, after = decoder_gen.decode_float(z), decoder_gen.decode_float(changed)
    assert before.shape == (17, 32, 32, 3)
    torch.testing.assert_close(before[:9], after[:9], rtol=0, atol=1e-4)
    assert (before[9:] - after[9:]).abs().amax() > 1.0


def test_decode_context_is_a_number_the_orchestrator_can_read(tiny_gen, frame_rate_gen):
    ctx = tiny_gen.decode_context
    assert isinstance(ctx, int) and not isinstance(ctx, bool)
    # tiny: one causal residual block of two kernel-3 convolutions in time.
    assert ctx == tiny_gen.config.vae.decode_context == 4
    # The same at the frame rate reaches back 4 frames: one more latent.
    assert frame_rate_gen.decode_context == 5


def test_frame_rate_decoder_moves_within_a_latent(tiny_gen, frame_rate_gen):
    """Both designs give every frame its own picture; the frame-rate one from a feature map of its own."""
    z = latents(3, tiny_gen.latent_channels, 4, 4, seed=6)
    for gen in (tiny_gen, frame_rate_gen):
        frames = gen.decode_float(z)
        assert frames.shape == (9, 32, 32, 3)
        assert (frames[1:4] - frames[2:5]).abs().amax() > 1.0
    assert isinstance(frame_rate_gen.model.vae.decoder.unpack, torch.nn.Module)
    assert not hasattr(tiny_gen.model.vae.decoder, "unpack")


def test_frame_rate_decoder_warm_starts_holding_each_latent():
    """Adapted from a latent-rate decoder, the frame-rate decoder starts by showing each latent's mean frame."""
    from model.config import get_preset
    from model.vae import CausalVAE, Decoder

    tiny = get_preset("tiny").vae
    torch.manual_seed(0)
    latent_rate = CausalVAE(tiny)
    frame_rate = CausalVAE(dataclasses.replace(tiny, frame_blocks=1))
    state = Decoder.frame_rate_state(latent_rate.decoder.state_dict(), tiny.temporal_factor)
    frame_rate.decoder.load_state_dict({**frame_rate.decoder.state_dict(), **state})
    z = latents(3, tiny.latent_channels, 4, 4, seed=7)[None].transpose(1, 2)
    with torch.no_grad():
        held = latent_rate.decode_frames(z, from_start=False).reshape(1, 3, 3, 4, 32, 32).mean(dim=3)
        started = frame_rate.decode_frames(z, from_start=False).reshape(1, 3, 3, 4, 32, 32)
    for k in range(4):
        torch.testing.assert_close(started[:, :, :, k], held, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def long_latents(tiny_gen):
    return latents(12, tiny_gen.latent_channels, 4, 6, seed=4)


@pytest.fixture(scope="module")
def one_shots(tiny_gen, frame_rate_gen, long_latents):
    shots = {}
    for gen in (tiny_gen, frame_rate_gen):
        frames = gen.decode_float(long_latents)
        assert frames.shape == (1 + 4 * 11, 32, 48, 3)
        # Random decoder weights must produce a varied picture, or equality below would prove little.
        assert frames.std() > 5.0
        shots[id(gen)] = frames
    return shots


@pytest.mark.parametrize(("start", "stop"), [
    (0, 3), (0, 12),            # from the start of the video: no context
    (1, 4), (2, 5), (3, 12),    # near the start: fewer than decode_context earlier latents exist
    (4, 8), (5, 9), (7, 10),    # in the middle with full context
    (8, 12), (11, 12),          # up to the end, a single latent
])
def test_chunked_decode_equals_one_shot(decoder_gen, long_latents, one_shots, start, stop):
    gen, one_shot = decoder_gen, one_shots[id(decoder_gen)]
    context = long_latents[max(0, start - gen.decode_context):start] if start else None
    part = gen.decode_float(long_latents[start:stop], context=context)
    expected = one_shot[frame_slice(start, stop)]
    assert part.shape == expected.shape
    assert part.shape[0] == (4 * (stop - start) if start else 1 + 4 * (stop - start - 1))
    assert (part - expected).abs().amax() <= 1e-4
    # decode() is the same frames rounded to uint8.
    assert torch.equal(gen.decode(long_latents[start:stop], context=context), part.round().to(torch.uint8))


def test_longer_context_than_needed_changes_nothing(decoder_gen, long_latents, one_shots):
    part = decoder_gen.decode_float(long_latents[8:10], context=long_latents[:8])
    assert (part - one_shots[id(decoder_gen)][frame_slice(8, 10)]).abs().amax() <= 1e-4


def test_decode_context_is_the_true_receptive_field(decoder_gen, long_latents, one_shots):
    """One context latent fewer than decode_context is not enough: the number is not an overestimate."""
    start, ctx = 8, decoder_gen.decode_context
    short = decoder_gen.decode_float(long_latents[start:start + 2], context=long_latents[start - ctx + 1:start])
    assert (short - one_shots[id(decoder_gen)][frame_slice(start, start + 2)]).abs().amax() > 1e-2


def test_decode_rejects_mismatched_latents(tiny_gen, long_latents):
    with pytest.raises(ValueError, match=r"latents: expected \(n, 4, h, w\)"):
        tiny_gen.decode(torch.zeros(2, 3, 4, 6))
    with pytest.raises(ValueError, match="context: latent size"):
        tiny_gen.decode(long_latents[4:6], context=torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="frames: expected uint8"):
        tiny_gen.encode(np.zeros((1, 16, 16, 3), dtype=np.float32))


@pytest.mark.parametrize("shortcuts", [False, True])
def test_a_x4_vae_with_patch_4_keeps_every_frame_size_whole(shortcuts):
    """Three VAE levels downsample by 4; with DiT patches of 4 the latent grid still covers any 16-multiple.
    The space-to-channel shortcuts work per frame, so the latents stay causal."""
    from model.config import get_preset
    from model.generator import Generator, VideoModel

    tiny = get_preset("tiny")
    cfg = tiny.replace(vae=dataclasses.replace(tiny.vae, channels=(8, 16, 16), spatial_factor=4, shortcuts=shortcuts),
                       dit=dataclasses.replace(tiny.dit, patch=4))
    torch.manual_seed(0)
    gen = Generator(VideoModel(cfg), device="cpu")
    assert gen.latent_size(48, 80) == (12, 20)
    z = gen.encode(clip(5, 48, 80, seed=1))
    assert z.shape == (2, cfg.vae.latent_channels, 12, 20)
    assert gen.decode(z).shape == (5, 48, 80, 3)
    changed = clip(9, 48, 80, seed=1)
    changed[5:] = 0
    torch.testing.assert_close(gen.encode(changed)[:2], z, rtol=0, atol=1e-5)


def test_spatial_factor_must_match_the_levels_and_the_patch():
    from model.config import DiTConfig, ModelConfig, VAEConfig

    with pytest.raises(ValueError, match=r"vae.spatial_factor: 8 does not match vae.channels \(8, 8, 16\)"):
        VAEConfig(channels=(8, 8, 16), spatial_factor=8)
    with pytest.raises(ValueError, match=r"dit.patch: 4 x vae.spatial_factor 8 = 32 must divide .* 16"):
        ModelConfig(preset="tiny", dit=DiTConfig(patch=4))
    with pytest.raises(ValueError, match=r"vae.channels: \(8, 48\) with shortcuts"):
        VAEConfig(channels=(8, 48), spatial_factor=2, shortcuts=True)


def test_shape_channels_are_the_encoders_head_and_a_widened_decoder_starts_as_its_source():
    """`vae.shape_channels`: the last channels of the latents are the encoder's shape head (starting at zero,
    kept as they are by the latent normalisation, never sampled); a decoder widened from one without them draws
    the same frames whatever the shape channels hold until it is trained."""
    from model.config import ModelConfig, VAEConfig, get_preset
    from model.vae import SHAPE_LOGVAR, CausalVAE

    tiny = get_preset("tiny").vae
    with pytest.raises(ValueError, match=r"vae.shape_channels: 4 must be at least 0 and below vae.latent_channels"):
        dataclasses.replace(tiny, shape_channels=4)
    wide_cfg = dataclasses.replace(tiny, latent_channels=tiny.latent_channels + 4, shape_channels=4)
    assert wide_cfg.appearance_channels == tiny.latent_channels
    torch.manual_seed(0)
    plain, wide = CausalVAE(tiny).eval(), CausalVAE(wide_cfg).eval()
    wide.encoder.load_state_dict({**wide.encoder.state_dict(), **plain.encoder.state_dict()})
    video = torch.from_numpy(clip(5, 32, 32, seed=3)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        mean, logvar = plain.encode_dist(video)
        wide_mean, wide_logvar = wide.encode_dist(video)
    torch.testing.assert_close(wide_mean[:, :tiny.latent_channels], mean)
    assert torch.count_nonzero(wide_mean[:, tiny.latent_channels:]) == 0  # the head starts at zero
    assert torch.all(wide_logvar[:, tiny.latent_channels:] == SHAPE_LOGVAR)

    config = ModelConfig(preset="tiny", vae=wide_cfg, latent_shift=0.5, latent_scale=2.0)
    raw = torch.randn(2, wide_cfg.latent_channels, 3, 4, 4)
    z = config.normalise_latents(raw)
    torch.testing.assert_close(z[:, :4], (raw[:, :4] - 0.5) * 2.0)
    assert torch.equal(z[:, 4:], raw[:, 4:])
    torch.testing.assert_close(config.raw_latents(z), raw)

    missing, unexpected = wide.decoder.load_state_dict(plain.decoder.state_dict(), strict=False)
    assert sorted(missing) == ["shape_in.bias", "shape_in.weight"] and not unexpected
    shapes = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        before = plain.decode_frames(mean, from_start=True)
        after = wide.decode_frames(torch.cat([mean, shapes], dim=1), from_start=True)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
