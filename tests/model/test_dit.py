"""Video DiT: adaLN-Zero init, NaViT packing, block-diagonal attention, observed/latent visibility, time."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model.config import get_preset
from model.dit import FrameInputs, VideoDiT, apply_rope, block_diagonal_mask, build_layout
from model_test_helpers import randomize_

CFG = get_preset("tiny").dit  # hidden 16, 2 heads of 8, depth 2, max_window 8
CHANNELS, TEXT_DIM, POOLED_DIM, TEXT_LEN = 4, 32, 24, 6


def make_dit(seed: int = 0, random: bool = True) -> VideoDiT:
    torch.manual_seed(seed)
    dit = VideoDiT(CFG, CHANNELS, TEXT_DIM, POOLED_DIM).eval()
    return randomize_(dit, seed + 1) if random else dit


@pytest.fixture(scope="module")
def dit() -> VideoDiT:
    return make_dit()


def text(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g)
    lengths = torch.randint(2, TEXT_LEN + 1, (n,), generator=g)
    mask = torch.arange(TEXT_LEN)[None] < lengths[:, None]
    return tokens, mask, torch.randn(n, POOLED_DIM, generator=g)


def window(times, observed, rows=8, cols=8, seed=0, noise=None) -> FrameInputs:
    f = len(times)
    g = torch.Generator().manual_seed(seed)
    obs = torch.tensor(observed, dtype=torch.bool)
    level = torch.rand(f, generator=g) if noise is None else torch.as_tensor(noise, dtype=torch.float32)
    level = torch.where(obs, torch.zeros(()), level)
    return FrameInputs(torch.randn(f, CHANNELS, rows, cols, generator=g), obs, torch.tensor(times), level)


def run(model, windows, seed=0, **kw):
    with torch.no_grad():
        return model(windows, *text(len(windows), seed), **kw)


def test_fresh_model_outputs_zeros():
    fresh = make_dit(random=False)
    outs = run(fresh, [window([0, 3, 7], [True, False, False]), window([2, 5], [False, False], rows=4, cols=12)])
    assert [o.shape for o in outs] == [(3, CHANNELS, 8, 8), (2, CHANNELS, 4, 12)]
    assert all(torch.count_nonzero(o) == 0 for o in outs)


def test_random_model_outputs_are_not_trivial(dit):
    (out,) = run(dit, [window([0, 3, 7], [True, False, False])])
    assert out.abs().amax() > 1e-2 and torch.isfinite(out).all()


# Windows of different resolutions, aspect ratios, frame counts and observed patterns; two share a shape but
# differ in their masks, two share shape and mask but not times.
PACKED = [
    dict(times=[0, 4, 9], observed=[True, False, False], rows=8, cols=8, seed=1),
    dict(times=[100, 101], observed=[False, False], rows=4, cols=12, seed=2),
    dict(times=[3, 1, 2], observed=[False, True, False], rows=8, cols=8, seed=3),
    dict(times=[7], observed=[False], rows=6, cols=4, seed=4),
    dict(times=[0, 40, 20, 60], observed=[True, True, False, False], rows=2, cols=2, seed=5),
    dict(times=[5, 9, 7, 11], observed=[True, True, False, False], rows=2, cols=2, seed=6),
    dict(times=[2, 6], observed=[False, False], rows=8, cols=8, seed=7),
    dict(times=[12], observed=[False], rows=8, cols=8, seed=8),  # an image beside videos of its frame size
]


@pytest.mark.parametrize("causal", [False, True])
def test_packed_forward_equals_separate_forwards(dit, causal):
    windows = [window(**w) for w in PACKED]
    tokens, mask, pooled = text(len(windows), seed=7)
    with torch.no_grad():
        packed = dit(windows, tokens, mask, pooled, causal=causal)
        for i, (w, out) in enumerate(zip(windows, packed)):
            alone = dit([w], tokens[i:i + 1], mask[i:i + 1], pooled[i:i + 1], causal=causal)[0]
            assert out.shape == w.frames.shape
            torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)


def per_token_rope(layout, kind: str, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = torch.zeros(layout.num_tokens, half), torch.zeros(layout.num_tokens, half)
    for g in getattr(layout, kind):
        if getattr(g, "valid", None) is None:
            cos[g.index], sin[g.index] = g.cos, g.sin
        else:  # a padded temporal group: the real frames only
            cos[g.index[g.valid]], sin[g.index[g.valid]] = g.cos[g.valid], g.sin[g.valid]
    return cos, sin


@pytest.mark.parametrize("kind,pad", [("spatial", False), ("temporal", False), ("temporal", True)])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_attention_equals_dense_block_diagonal_attention(dit, kind, pad, causal):
    """Each block's grouped attention is one dense attention over the packed sequence with the dense mask; so
    is the temporal attention of windows padded into one group (as in training)."""
    windows = [window(**w) for w in PACKED]
    shapes = [(len(w.times), w.frames.shape[2] // 2, w.frames.shape[3] // 2) for w in windows]
    observed, times = [w.observed for w in windows], [w.times for w in windows]
    layout = build_layout(shapes, observed, times, causal, dit.head_dim, CFG, "cpu", pad_windows=pad)
    if pad:
        unpadded = build_layout(shapes, observed, times, causal, dit.head_dim, CFG, "cpu")
        assert len(layout.temporal) < len(unpadded.temporal)
        # a single frame is never padded to a longer window's length
        assert all(g.index.shape[1] == 1 or g.valid is None or bool((g.valid.sum(1) > 1).all())
                   for g in layout.temporal)
    block = dit.blocks[0]
    h = torch.randn(layout.num_tokens, CFG.hidden, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        grouped = block.spatial(h, layout) if kind == "spatial" else block.temporal(h, layout, None, None)
        attn = block.spatial_attn if kind == "spatial" else block.temporal_attn
        cos, sin = per_token_rope(layout, kind, dit.head_dim // 2)
        q = apply_rope(attn.project_q(h), cos, sin)  # (H, L, hd)
        k, v = attn.project_kv(h)
        k = apply_rope(k, cos, sin)
        mask = block_diagonal_mask(layout, kind)
        dense = attn.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(grouped, dense, rtol=1e-5, atol=1e-5)


def test_block_diagonal_mask_structure(dit):
    windows = [window(**w) for w in PACKED]
    shapes = [(len(w.times), w.frames.shape[2] // 2, w.frames.shape[3] // 2) for w in windows]
    layout = build_layout(shapes, [w.observed for w in windows], [w.times for w in windows], True,
                          dit.head_dim, CFG, "cpu")
    frame = layout.frame_of_token
    win = layout.window_of_frame[frame]
    spatial = block_diagonal_mask(layout, "spatial")
    assert torch.equal(spatial, frame[:, None] == frame[None, :])
    temporal = block_diagonal_mask(layout, "temporal")
    assert not (temporal & (win[:, None] != win[None, :])).any()  # never across windows
    observed = torch.cat([w.observed for w in windows])[frame]
    times = torch.cat([w.times for w in windows])[frame]
    position = torch.cat([torch.arange(f * r * c) % (r * c) for f, r, c in shapes])
    same_column = (win[:, None] == win[None, :]) & (position[:, None] == position[None, :])
    expected = same_column & torch.where(observed[:, None], observed[None, :], times[None, :] <= times[:, None])
    assert torch.equal(temporal, expected)


def test_observed_outputs_ignore_latent_inputs(dit):
    base = window([0, 3, 1, 2, 5], [True, True, False, False, False], seed=9)
    changed = FrameInputs(base.frames.clone(), base.observed, base.times, base.noise.clone())
    latent = ~base.observed
    changed.frames[latent] = torch.randn(int(latent.sum()), CHANNELS, 8, 8)
    changed.noise[latent] = torch.tensor([0.9, 0.1, 0.5])
    (a,), (b,) = run(dit, [base]), run(dit, [changed])
    torch.testing.assert_close(a[base.observed], b[base.observed], rtol=0, atol=1e-6)
    assert (a[latent] - b[latent]).abs().amax() > 1e-3
    # ...while latent outputs do depend on the observed frames.
    moved = FrameInputs(base.frames.clone(), base.observed, base.times, base.noise)
    moved.frames[0] += 1.0
    (c,) = run(dit, [moved])
    assert (a[latent] - c[latent]).abs().amax() > 1e-3


def test_causal_mode_ignores_later_frames(dit):
    # Frames out of time order on purpose: causality follows time indices, not positions in the window.
    base = window([0, 6, 2, 4], [True, False, False, False], seed=10)
    later = FrameInputs(base.frames.clone(), base.observed, base.times, base.noise.clone())
    later.frames[1] = torch.randn(CHANNELS, 8, 8)  # the latent frame at time 6
    later.noise[1] = 0.95
    (a,), (b,) = run(dit, [base], causal=True), run(dit, [later], causal=True)
    earlier = torch.tensor([0, 2, 3])  # time indices 0, 2, 4
    torch.testing.assert_close(a[earlier], b[earlier], rtol=0, atol=1e-6)
    assert (a[1] - b[1]).abs().amax() > 1e-3
    # Without causal mode the earlier latent frames do see it.
    (c,), (d,) = run(dit, [base]), run(dit, [later])
    assert (c[2] - d[2]).abs().amax() > 1e-3


def test_causal_latent_frames_see_earlier_frames(dit):
    base = window([0, 2, 4], [True, False, False], seed=11)
    changed = FrameInputs(base.frames.clone(), base.observed, base.times, base.noise)
    changed.frames[1] += 1.0  # the latent frame at time 2
    (a,), (b,) = run(dit, [base], causal=True), run(dit, [changed], causal=True)
    assert (a[2] - b[2]).abs().amax() > 1e-3


def test_absolute_time_index_matters(dit):
    near = window([0, 1], [True, False], seed=12)
    far = FrameInputs(near.frames, near.observed, torch.tensor([0, 200]), near.noise)
    (a,), (b,) = run(dit, [near]), run(dit, [far])
    assert (a[1] - b[1]).abs().amax() > 1e-3


def test_window_larger_than_max_window_is_rejected(dit):
    too_big = window(list(range(CFG.max_window + 1)), [False] * (CFG.max_window + 1), rows=2, cols=2)
    with pytest.raises(ValueError, match=r"window: 9 frames exceed this model's maximum window of 8"):
        run(dit, [too_big])
    # The limit itself is fine.
    run(dit, [window(list(range(CFG.max_window)), [False] * CFG.max_window, rows=2, cols=2)])


def test_mismatched_latent_shapes_are_rejected(dit):
    good = window([0, 1], [True, False])
    wrong_channels = FrameInputs(torch.zeros(2, CHANNELS + 1, 8, 8), good.observed, good.times, good.noise)
    with pytest.raises(ValueError, match=r"latents: expected 4 channels, got 5 \(shape \(2, 5, 8, 8\)\)"):
        run(dit, [wrong_channels])
    odd = FrameInputs(torch.zeros(2, CHANNELS, 7, 8), good.observed, good.times, good.noise)
    with pytest.raises(ValueError, match=r"multiples of 2, got 7x8"):
        run(dit, [odd])
    short_times = FrameInputs(good.frames, good.observed, torch.tensor([0]), good.noise)
    with pytest.raises(ValueError, match=r"times: expected shape \(2,\)"):
        run(dit, [short_times])


def test_refine_head_starts_as_the_identity_then_sees_across_patch_borders():
    """A warm-started DiT with a new refine head predicts what it did; once trained, the head mixes
    neighbouring pixels of the output, across the borders between the patches that tokens predict alone."""
    base = make_dit(seed=3)
    torch.manual_seed(3)
    refined = VideoDiT(dataclasses.replace(CFG, refine=8), CHANNELS, TEXT_DIM, POOLED_DIM).eval()
    state = base.state_dict()
    refined.load_state_dict({**refined.state_dict(), **state})
    win = window([0, 3, 7], [True, False, False])
    (expected,) = run(base, [win])
    (same,) = run(refined, [win])
    torch.testing.assert_close(same, expected, rtol=0, atol=0)

    torch.nn.init.normal_(refined.refine.conv3.weight, std=0.1)
    (changed,) = run(refined, [win])
    delta = changed - expected
    assert delta.abs().amax() > 1e-3
    # Tokens predict 2x2 patches alone (tiny preset); the head lets a pixel on one side of a patch border
    # change the prediction on the other side.
    head = refined.refine
    velocity = torch.zeros(1, CHANNELS, 8, 8)
    bumped = velocity.clone()
    bumped[0, :, 3, 3] = 1.0  # last row/column of patch (1, 1)
    frames = torch.zeros(1, CHANNELS, 8, 8)
    noise = torch.full((1,), 0.5)
    tokens = torch.zeros(16, CFG.hidden)
    with torch.no_grad():
        difference = head(bumped, frames, noise, tokens) - head(velocity, frames, noise, tokens) - (bumped - velocity)
        # It reads the noise level and the tokens' features too.
        at_other_level = head(velocity, frames, torch.full((1,), 0.9), tokens) - head(velocity, frames, noise, tokens)
        from_features = head(velocity, frames, noise, torch.randn(16, CFG.hidden)) - head(velocity, frames, noise, tokens)
    assert at_other_level.abs().amax() > 1e-4
    assert from_features.abs().amax() > 1e-4
    assert difference[0, :, 4, 4].abs().amax() > 1e-4  # first row/column of patch (2, 2)


def test_a_widened_dit_predicts_what_its_source_did_and_nothing_for_the_added_channels(dit):
    """`VideoDiT.widened_state`: a DiT for 4 latent channels moved to 8 (shape channels beside the same
    appearance latents) predicts the same velocities for the first 4 whatever the added channels hold, and zero
    for the added ones, until training teaches it otherwise."""
    state = VideoDiT.widened_state(dit.state_dict(), CHANNELS + 4, CFG.patch)
    wide = VideoDiT(CFG, CHANNELS + 4, TEXT_DIM, POOLED_DIM).eval()
    wide.load_state_dict(state)
    narrow_window = window([0, 3, 7], [True, False, False], seed=3)
    extra = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    wide_window = FrameInputs(torch.cat([narrow_window.frames, extra], dim=1), narrow_window.observed,
                              narrow_window.times, narrow_window.noise)
    (before,), (after,) = run(dit, [narrow_window]), run(wide, [wide_window])
    torch.testing.assert_close(after[:, :CHANNELS], before, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(after[:, CHANNELS:]) == 0 and before.abs().amax() > 1e-2
    # A DiT that already has the channels is left as it is.
    assert VideoDiT.widened_state(state, CHANNELS + 4, CFG.patch) == state


# --------------------------------------------------------------------------- convolutional stages (dit.conv)
CONV_CFG = dataclasses.replace(CFG, conv=(8, 16))  # the latent resolution and half of it; tokens of 1x1 below


def make_conv_dit(seed: int = 0, random: bool = True) -> VideoDiT:
    torch.manual_seed(seed)
    dit = VideoDiT(CONV_CFG, CHANNELS, TEXT_DIM, POOLED_DIM).eval()
    return randomize_(dit, seed + 1, std=0.1) if random else dit


def test_convolutional_stages_replace_the_patch_layers_and_start_at_zero():
    fresh = make_conv_dit(random=False)
    assert not hasattr(fresh, "patch_embed") and fresh.final.linear is None
    outs = run(fresh, [window([0, 3, 7], [True, False, False]), window([2, 5], [False, False], rows=4, cols=12)])
    assert [o.shape for o in outs] == [(3, CHANNELS, 8, 8), (2, CHANNELS, 4, 12)]
    assert all(torch.count_nonzero(o) == 0 for o in outs)


@pytest.mark.parametrize("causal", [False, True])
def test_convolutional_stages_keep_packing_and_who_sees_whom(causal):
    """Packed windows of every size give what each gives alone, observed frames ignore latent ones, and in
    causal mode a latent frame ignores later frames: the stages convolve each frame on its own."""
    conv = make_conv_dit(seed=4)
    windows = [window(**w) for w in PACKED if w["rows"] % 2 == 0 and w["cols"] % 2 == 0]
    tokens, mask, pooled = text(len(windows), seed=7)
    with torch.no_grad():
        packed = conv(windows, tokens, mask, pooled, causal=causal)
        for i, (w, out) in enumerate(zip(windows, packed)):
            alone = conv([w], tokens[i:i + 1], mask[i:i + 1], pooled[i:i + 1], causal=causal)[0]
            torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    assert max(o.abs().amax() for o in packed) > 1e-2

    base = window([0, 3, 1, 2, 5], [True, True, False, False, False], seed=9)
    later = FrameInputs(base.frames.clone(), base.observed, base.times, base.noise)
    later.frames[4] = torch.randn(CHANNELS, 8, 8)  # latent frame at time 5, after every other
    (a,), (b,) = run(conv, [base], causal=causal), run(conv, [later], causal=causal)
    torch.testing.assert_close(a[:2], b[:2], rtol=0, atol=1e-6)  # observed frames
    if causal:
        torch.testing.assert_close(a[2:4], b[2:4], rtol=0, atol=1e-6)
    else:
        assert (a[2:4] - b[2:4]).abs().amax() > 1e-4


def test_convolutional_stages_draw_below_the_token_grid():
    """With the stages a latent pixel's own input reaches its output through the skip connections: moving one
    pixel of a frame changes the prediction there well over twice as much as at the opposite corner of the same
    token's 2x2 pixels. The plain DiT's token predicts its patch through one linear layer, so the change lands
    on its four pixels without regard to which one moved."""
    def change_at_moved_and_opposite(model: VideoDiT) -> tuple[float, float]:
        base = window([0], [False], rows=8, cols=8, seed=11, noise=[0.5])
        bumped = FrameInputs(base.frames.clone(), base.observed, base.times, base.noise)
        bumped.frames[0, :, 2, 2] += 3.0  # the top-left pixel of the token over rows and columns 2-3
        (a,), (b,) = run(model, [base]), run(model, [bumped])
        change = (b - a).abs().sum(dim=1)[0]
        return float(change[2, 2]), float(change[3, 3])

    moved, opposite = change_at_moved_and_opposite(make_conv_dit(seed=5))
    assert moved > 2 * opposite > 0
    moved, opposite = change_at_moved_and_opposite(make_dit(seed=5))
    assert moved < 2 * opposite


def test_convolutional_stages_are_checked_against_the_patch():
    with pytest.raises(ValueError, match=r"dit.conv: 3 stages halve the resolution 2 times.*dit.patch 2"):
        dataclasses.replace(CFG, conv=(8, 16, 32))
    with pytest.raises(ValueError, match=r"dit.refine: .*exclude each other"):
        dataclasses.replace(CFG, conv=(8,), refine=8)
    with pytest.raises(ValueError, match=r"dit.conv: \[12\]: every stage needs a multiple of 8"):
        dataclasses.replace(CFG, conv=(12,))
