"""The procedural world: deterministic specs, captions that read back, analytic rendering of any frame."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from model import world
from model.world import ObjectSpec, WorldSpec


def _single(motion: str, **fields) -> WorldSpec:
    obj = ObjectSpec(**({"shape": "square", "colour": "red", "size": 0.12, "motion": motion} | fields))
    return WorldSpec(background="grey", objects=(obj,), seed=5)


def test_sample_world_is_deterministic_and_varied():
    specs = [world.sample_world(s) for s in range(200)]
    assert specs[:20] == [world.sample_world(s) for s in range(20)]
    assert len({s.to_json() for s in specs}) == 200
    assert {len(s.objects) for s in specs} == {1, 2, 3}
    assert {o.motion for s in specs for o in s.objects} == set(world.MOTIONS)
    assert {o.shape for s in specs for o in s.objects} == set(world.SHAPES)
    assert {s.pattern for s in specs} == set(world.PATTERNS)
    assert any(s.pan != (0.0, 0.0) for s in specs)
    for spec in specs:
        colours = [o.colour for o in spec.objects]
        assert len(set(colours)) == len(colours) and spec.background not in colours
        if spec.pattern == "none":
            assert spec.pan == (0.0, 0.0)  # a pan over a plain backdrop would be invisible


def test_sample_world_overrides_and_bad_input():
    spec = world.sample_world(3, num_objects=3, motion="wrap", background="black", pattern="checker", pan=True)
    assert len(spec.objects) == 3 and {o.motion for o in spec.objects} == {"wrap"}
    assert spec.background == "black" and spec.pattern == "checker" and spec.pan != (0.0, 0.0)
    with pytest.raises(ValueError, match="num_objects"):
        world.sample_world(1, num_objects=4)
    with pytest.raises(ValueError, match="seed"):
        world.sample_world(-1)
    with pytest.raises(ValueError, match="motion"):
        world.sample_world(1, motion="teleport")


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="colour='mauve'"):
        ObjectSpec(shape="circle", colour="mauve", size=0.1, motion="rest")
    with pytest.raises(ValueError, match="shape"):
        ObjectSpec(shape="hexagon", colour="red", size=0.1, motion="rest")
    with pytest.raises(ValueError, match="size"):
        ObjectSpec(shape="circle", colour="red", size=0.9, motion="rest")
    red = ObjectSpec(shape="circle", colour="red", size=0.1, motion="rest")
    with pytest.raises(ValueError, match="background"):
        WorldSpec(background="red", objects=(red,))
    with pytest.raises(ValueError, match="pairwise distinct"):
        WorldSpec(background="grey", objects=(red, dataclasses.replace(red, shape="square")))
    with pytest.raises(ValueError, match="between 1 and 3"):
        WorldSpec(background="grey", objects=())


def test_spec_json_round_trip():
    for seed in range(30):
        spec = world.sample_world(seed)
        text = spec.to_json()
        assert WorldSpec.from_json(text) == spec
        assert json.loads(text)["objects"][0]["colour"] == spec.objects[0].colour
    with pytest.raises(ValueError, match="speed"):
        WorldSpec.from_dict(world.sample_world(0).to_dict() | {"speed": 3})


def test_caption_reads_back_for_every_world():
    wordings = set()
    for seed in range(300):
        spec = world.sample_world(seed)
        text = world.caption(spec)
        wordings.add(text.split(" ")[1] if text.startswith("a ") else "")
        parsed = world.parse_caption(text)
        assert parsed["background"] == spec.background, text
        assert parsed["pattern"] == spec.pattern, text
        assert [(o["colour"], o["shape"], o["motion"]) for o in parsed["objects"]] == \
            [(o.colour, o.shape, o.motion) for o in spec.objects], text
        for got, obj in zip(parsed["objects"], spec.objects):
            assert got["direction"] == obj.direction, text
        assert (parsed["pan"] is not None) == (spec.pan != (0.0, 0.0)), text
    assert len(wordings) > 3  # several templates are in use


def test_caption_phrasing():
    red = ObjectSpec(shape="circle", colour="red", size=0.1, motion="bounce", vx=0.1, vy=0.2)
    blue = ObjectSpec(shape="square", colour="blue", size=0.1, motion="bounce", vx=-0.1, vy=0.1)
    captions = {world.caption(WorldSpec(background="grey", objects=(red, blue), seed=s)) for s in range(40)}
    assert "a red circle and a blue square bouncing on a grey background" in captions
    orange = ObjectSpec(shape="triangle", colour="orange", size=0.1, motion="wrap", vx=-0.3)
    text = world.caption(WorldSpec(background="white", objects=(orange,), pattern="stripes", pan=(0.03, 0), seed=1))
    assert "an orange triangle" in text and "left" in text and "white striped background" in text
    assert "camera panning slowly right" in text


def test_parse_caption_of_free_text():
    parsed = world.parse_caption("A Gray checkered backdrop; two things: a yellow diamond circling and a pink "
                                 "square resting, the camera panning slowly up")
    assert parsed["background"] == "grey" and parsed["pattern"] == "checker" and parsed["pan"] == "up"
    assert parsed["objects"] == [
        {"colour": "yellow", "shape": "diamond", "motion": "orbit", "direction": None},
        {"colour": "pink", "shape": "square", "motion": "rest", "direction": None},
    ]
    assert world.parse_caption("a sunset over the sea")["objects"] == []


def test_render_any_frame_directly_and_deterministically():
    spec = world.sample_world(11, num_objects=3, pattern="stripes", pan=True)
    clip = world.render_frames(spec, range(30), fps=24, width=96, height=54)
    assert clip.shape == (30, 54, 96, 3) and clip.dtype == np.uint8
    picked = world.render_frames(spec, [29, 3, 17], fps=24, width=96, height=54)
    np.testing.assert_array_equal(picked, clip[[29, 3, 17]])
    np.testing.assert_array_equal(world.render_frames(spec, range(30), fps=24, width=96, height=54), clip)
    far = world.render_frames(spec, [24 * 60 * 10], fps=24, width=96, height=54)  # ten minutes in
    assert far.shape == (1, 54, 96, 3)
    assert world.render_frames(spec, [], fps=24, width=96, height=54).shape == (0, 54, 96, 3)
    with pytest.raises(ValueError, match="frame_indices"):
        world.render_frames(spec, [-1], fps=24, width=96, height=54)
    with pytest.raises(ValueError, match="fps"):
        world.render_frames(spec, [0], fps=0, width=96, height=54)
    with pytest.raises(ValueError, match="width"):
        world.render_frames(spec, [0], fps=24, width=4, height=54)


def test_time_is_in_seconds_and_space_in_frame_fractions():
    spec = world.sample_world(2, num_objects=2, motion="bounce")
    # The same instant at two frame rates is the same picture.
    np.testing.assert_array_equal(world.render_frames(spec, [10], fps=10, width=64, height=64),
                                  world.render_frames(spec, [25], fps=25, width=64, height=64))
    # The same frame at two resolutions is the same picture at two sizes.
    large = world.render_frames(spec, [7], fps=10, width=128, height=128)[0].astype(np.float32)
    small = world.render_frames(spec, [7], fps=10, width=64, height=64)[0].astype(np.float32)
    pooled = large.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(pooled - small).mean() < 4.0


def test_object_pixels_and_bounding_boxes_match_ground_truth():
    for seed in range(6):
        spec = world.sample_world(seed, pattern="none")
        frames = world.render_frames(spec, range(0, 240, 40), fps=24, width=160, height=90)
        truth = world.ground_truth(spec, range(0, 240, 40), fps=24, width=160, height=90)
        assert frames[0, 0, 0].tolist() in (list(world.PALETTE[spec.background]),
                                             *[list(world.PALETTE[o.colour]) for o in spec.objects])
        for frame, record in zip(frames, truth):
            for obj in record["objects"]:
                if obj["visibility"] != "full" or obj["occluded"]:
                    continue
                x, y = obj["centre"]
                assert frame[int(y), int(x)].tolist() == list(world.PALETTE[obj["colour"]])
                rows, cols = np.nonzero((frame == world.PALETTE[obj["colour"]]).all(axis=-1))
                x0, y0, x1, y1 = obj["bbox"]
                # Pixels fully inside the shape lie inside its box and reach its bottom (squares: every side).
                assert cols.min() >= x0 - 0.5 and cols.max() + 1 <= x1 + 0.5
                assert rows.min() >= y0 - 0.5 and rows.max() + 1 <= y1 + 0.5
                assert abs(rows.max() + 1 - y1) < 1.5  # every shape touches the bottom of its box
                if obj["shape"] == "square":
                    assert abs(cols.min() - x0) < 1.5 and abs(rows.min() - y0) < 1.5


def test_object_mask_covers_exactly_the_object_pixels():
    for seed in range(4):
        spec = world.sample_world(seed, pattern="none")
        indices = range(0, 200, 50)
        frames = world.render_frames(spec, indices, fps=24, width=128, height=80)
        mask = world.object_mask(spec, indices, fps=24, width=128, height=80)
        assert mask.shape == (4, 80, 128) and mask.dtype == bool
        background = np.asarray(world.PALETTE[spec.background])
        # A pixel more than half covered is nearer an object colour than the backdrop; edge pixels blend.
        off_backdrop = np.abs(frames.astype(int) - background).sum(-1) > 0
        assert (mask <= off_backdrop).all()
        assert mask.sum() >= 0.7 * off_backdrop.sum() > 0
    resting = _single("rest", x=0.5, y=0.5, size=0.1)  # a 16-pixel square around (64, 40)
    mask = world.object_mask(resting, [0], fps=24, width=128, height=80)[0]
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (32, 47, 56, 71)


def test_shape_coverage_is_the_renderers_compositing():
    for seed in range(6):
        spec = world.sample_world(seed, pattern="none", num_objects=3)
        indices = [0, 37, 90]
        frames = world.render_frames(spec, indices, fps=24, width=128, height=80).astype(np.float32)
        cover = world.shape_coverage(spec, indices, fps=24, width=128, height=80)
        assert cover.shape == (3, len(world.SHAPES), 80, 128) and cover.dtype == np.float32
        assert cover.min() >= 0.0 and cover.sum(1).max() <= 1.0 + 1e-5 and cover.max() == 1.0
        # Composite the objects one at a time from their own coverage, as the renderer draws them: the frame
        # comes out (so the coverage is the renderer's), and so does every shape channel of the whole world.
        expected = np.broadcast_to(np.asarray(world.PALETTE[spec.background], np.float32), frames.shape).copy()
        channels = np.zeros_like(cover)
        for obj in spec.objects:
            k = world.SHAPES.index(obj.shape)
            alone = world.shape_coverage(dataclasses.replace(spec, objects=(obj,)), indices, fps=24, width=128,
                                         height=80)
            assert np.delete(alone, k, axis=1).max() == 0.0
            a = alone[:, k]
            colour = np.asarray(world.PALETTE[obj.colour], np.float32)
            expected = expected * (1.0 - a[..., None]) + colour * a[..., None]
            channels *= 1.0 - a[:, None]
            channels[:, k] += a
        assert np.abs(frames - expected).max() <= 0.51  # the renderer rounds to the nearest level
        assert np.allclose(channels, cover, atol=1e-6)
    square = _single("rest", x=0.5, y=0.5, size=0.1)  # a 16-pixel red square around (64, 40)
    cover = world.shape_coverage(square, [0], fps=24, width=128, height=80)[0]
    assert cover[world.SHAPES.index("square"), 32:48, 56:72].min() == 1.0
    assert cover[world.SHAPES.index("square")].sum() == pytest.approx(256.0, abs=1.0)
    others = [i for i, s in enumerate(world.SHAPES) if s != "square"]
    assert cover[others].max() == 0.0
    # the rendered pixels agree with the coverage: full red inside, backdrop outside
    frame = world.render_frames(square, [0], fps=24, width=128, height=80)[0].astype(np.float32)
    red, grey = np.asarray(world.PALETTE["red"], np.float32), np.asarray(world.PALETTE["grey"], np.float32)
    c = cover[world.SHAPES.index("square")][..., None]
    assert np.abs(frame - (grey * (1 - c) + red * c)).max() <= 0.51


def test_a_later_object_covers_an_earlier_one_in_shape_coverage():
    below = ObjectSpec(shape="circle", colour="red", size=0.15, motion="rest", x=0.5, y=0.5)
    above = ObjectSpec(shape="triangle", colour="blue", size=0.1, motion="rest", x=0.5, y=0.5)
    spec = WorldSpec(background="grey", objects=(below, above), seed=1)
    cover = world.shape_coverage(spec, [0], fps=24, width=128, height=80)[0]
    circle, triangle = world.SHAPES.index("circle"), world.SHAPES.index("triangle")
    assert cover[triangle, 40, 64] == 1.0 and cover[circle, 40, 64] == 0.0  # the centre shows the triangle
    assert cover[circle, 40, 64 - 11] == 1.0  # outside the triangle, inside the circle: the circle shows
    assert cover.sum(0).max() <= 1.0 + 1e-6


def test_edges_are_anti_aliased():
    spec = _single("rest", shape="circle", colour="white", x=0.5, y=0.5, size=0.2)
    spec = dataclasses.replace(spec, background="black")
    frame = world.render_frames(spec, [0], fps=24, width=64, height=64)[0]
    levels = set(np.unique(frame[..., 0]).tolist())
    assert {20, 240} <= levels and len(levels) > 5  # intermediate coverage on the rim


def test_bouncing_stays_inside_the_frame():
    spec = _single("bounce", x=0.3, y=0.6, vx=0.9, vy=-0.7, size=0.15)
    frames = list(range(0, 24 * 600, 97))  # ten minutes, never simulated step by step
    for width, height in ((64, 64), (256, 144), (90, 160)):
        truth = world.ground_truth(spec, frames, fps=24, width=width, height=height)
        assert {r["objects"][0]["visibility"] for r in truth} == {"full"}
        xs = [r["objects"][0]["centre"][0] for r in truth]
        assert max(xs) - min(xs) > 0.5 * width  # and it does travel
    # It reverses at the edge: the triangle wave.
    truth = world.ground_truth(spec, range(0, 48), fps=24, width=64, height=64)
    dx = np.diff([r["objects"][0]["centre"][0] for r in truth])
    assert (dx > 0).any() and (dx < 0).any()


def test_wrap_around_leaves_and_comes_back():
    spec = _single("wrap", x=0.5, y=0.5, vx=0.4, size=0.1)
    period = world.wrap_period(spec.objects[0], 64, 64)
    assert period == pytest.approx((1 + 2 * 0.1 + world.WRAP_GAP) / 0.4)
    fps = 24
    truth = world.ground_truth(spec, range(int(3 * period * fps)), fps=fps, width=64, height=64)
    seen = [r["objects"][0]["visibility"] for r in truth]
    assert {"full", "partial", "none"} <= set(seen)
    # Re-entry on the left after leaving on the right: x jumps back once per period.
    xs = np.array([r["objects"][0]["centre"][0] for r in truth])
    assert (np.diff(xs) < -32).sum() in (2, 3)
    one = world.ground_truth(spec, [10], fps=fps, width=64, height=64)[0]["objects"][0]["centre"]
    later = world.ground_truth(spec, [10 + round(period * fps * 10)], fps=fps, width=64, height=64)
    assert later[0]["objects"][0]["centre"][0] == pytest.approx(one[0], abs=64 * 0.4 / fps)


def test_orbit_and_rest():
    spec = _single("orbit", x=0.5, y=0.5, orbit_radius=0.25, angular_speed=1.0, phase=0.3)
    truth = world.ground_truth(spec, range(0, 200, 7), fps=24, width=100, height=100)
    radii = [math.dist(r["objects"][0]["centre"], (50, 50)) for r in truth]
    assert np.allclose(radii, 25.0)
    angle = math.atan2(truth[1]["objects"][0]["centre"][1] - 50, truth[1]["objects"][0]["centre"][0] - 50)
    assert angle == pytest.approx(0.3 + 7 / 24)
    still = _single("rest", x=0.3, y=0.7)
    truth = world.ground_truth(still, [0, 1000, 100000], fps=24, width=100, height=50)
    assert [r["objects"][0]["centre"] for r in truth] == [(30.0, 35.0)] * 3


def test_orbiters_share_a_carousel_and_never_overlap():
    for seed in range(60):
        spec = world.sample_world(seed, num_objects=3, motion="orbit")
        truth = world.ground_truth(spec, range(0, 24 * 20, 5), fps=24, width=128, height=128)
        assert not any(o["occluded"] for r in truth for o in r["objects"]), seed


def test_camera_pan_scrolls_the_pattern_only():
    spec = _single("rest", x=0.5, y=0.5)
    panned = dataclasses.replace(spec, pattern="checker", pan=(0.05, 0.0))
    still = dataclasses.replace(spec, pattern="checker")
    a = world.render_frames(panned, [0, 48], fps=24, width=64, height=64)
    b = world.render_frames(still, [0, 48], fps=24, width=64, height=64)
    np.testing.assert_array_equal(b[0], b[1])
    assert (a[0] != a[1]).any()
    red = np.array(world.PALETTE["red"])
    np.testing.assert_array_equal((a[0] == red).all(-1), (a[1] == red).all(-1))  # the object stays put
    # The pattern's second colour stays nearest to the background colour in the palette.
    alt = {tuple(p) for p in a.reshape(-1, 3).tolist()} - {tuple(world.PALETTE["grey"]), tuple(red)}
    palette = np.array(list(world.PALETTE.values()))
    for colour in alt:
        if np.abs(np.array(colour) - np.array(world.PALETTE["grey"])).max() > 30:
            continue  # rim pixels of the object
        nearest = list(world.PALETTE)[int(np.linalg.norm(palette - colour, axis=1).argmin())]
        assert nearest == "grey"


def test_render_clip_matches_render_frames():
    frames, spec, text = world.render_clip(42, 12, 12, 48, 32, start_frame=100)
    assert spec == world.sample_world(42) and text == world.caption(spec)
    np.testing.assert_array_equal(frames, world.render_frames(spec, range(100, 112), fps=12, width=48, height=32))
    with pytest.raises(ValueError, match="num_frames"):
        world.render_clip(42, 0, 12, 48, 32)
