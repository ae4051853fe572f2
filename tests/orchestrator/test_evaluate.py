"""Quality metrics on videos whose truth is known: clips rendered by the procedural world itself."""
from __future__ import annotations

import dataclasses
import json
import math
import types

import numpy as np
import pytest

from model import world
from orchestrator import evaluate as ev

EVAL_SEEDS = [world.EVAL_SEED_BASE + k for k in range(6)]


def _clip(seed: int, seconds: float, fps: int = 8, width: int = 96, height: int = 64, **overrides):
    spec = world.sample_world(seed, **overrides)
    frames = range(int(seconds * fps))
    return (spec, world.render_frames(spec, frames, fps=fps, width=width, height=height),
            world.ground_truth(spec, frames, fps=fps, width=width, height=height))


# ------------------------------------------------------------------------------------------------- detector


@pytest.mark.parametrize("size", [(256, 144), (64, 64)])
def test_detector_finds_every_visible_object(size):
    width, height = size
    detector = ev.Detector()
    checked = 0
    for seed in range(12):
        spec = world.sample_world(seed)
        indices = list(range(0, 24 * 40, 97))
        frames = world.render_frames(spec, indices, fps=24, width=width, height=height)
        truth = world.ground_truth(spec, indices, fps=24, width=width, height=height)
        for frame, record in zip(frames, truth):
            found = detector.detect(frame)
            assert found.background == spec.background
            colours = {o["colour"] for o in record["objects"]}
            assert {d.colour for d in found.objects} <= colours  # no phantom objects from anti-aliased rims
            for obj in record["objects"]:
                if obj["visibility"] == "full" and not obj["occluded"]:
                    checked += 1
                    match = [d for d in found.objects if d.colour == obj["colour"]]
                    assert [d.shape for d in match] == [obj["shape"]], (seed, record["frame"], match)
                    assert math.dist(match[0].centre, obj["centre"]) < 1.5
    assert checked > 150


def test_classify_shape_from_masks():
    yy, xx = np.mgrid[0:21, 0:21] - 10.0
    assert ev.classify_shape(np.hypot(xx, yy) <= 10.5) == "circle"
    assert ev.classify_shape(np.ones((15, 14), bool)) == "square"
    assert ev.classify_shape(np.abs(xx) + np.abs(yy) <= 10.5) == "diamond"
    assert ev.classify_shape(2 * np.abs(xx) <= yy + 10.5) == "triangle"  # apex up, base at the bottom
    assert ev.classify_shape(np.ones((4, 20), bool)) == "unknown"  # no world shape is a long bar
    assert ev.classify_shape(np.ones((4, 20), bool), partial=True) == "square"  # ... unless cut by the border


def test_detector_survives_blur_and_noise():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    spec, frames, truth = _clip(EVAL_SEEDS[0], 3, fps=4, width=128, height=128, num_objects=3, motion="bounce")
    soft = ndimage.gaussian_filter(frames.astype(np.float32), (0, 0.7, 0.7, 0))
    soft = np.clip(soft + rng.normal(0, 3, soft.shape), 0, 255).astype(np.uint8)
    hits = total = 0
    for frame, record in zip(soft, truth):
        found = ev.detect_objects(frame)
        for obj in record["objects"]:
            if obj["visibility"] == "full" and not obj["occluded"]:
                total += 1
                hits += any(d.colour == obj["colour"] and d.shape == obj["shape"] for d in found)
    assert total and hits / total > 0.9


# -------------------------------------------------------------------------------------- adherence, persistence


def test_world_clips_adhere_and_persist():
    for seed in EVAL_SEEDS:
        spec, frames, truth = _clip(seed, 60, fps=4)
        prompt = world.caption(spec)
        with_truth = ev.evaluate_video(frames, prompt, 4, ground_truth=truth)
        assert with_truth["adherence"] == 1.0, prompt
        assert set(with_truth["persistence"]) == {"20", "40", "60"}
        assert all(v in (1.0, None) for v in with_truth["persistence"].values()), with_truth["objects"]
        assert with_truth["persistence_final"] == 1.0
        assert with_truth["background"] == {"expected": spec.background, "detected": spec.background,
                                            "correct": True}
        # Without ground truth (the rule used for generated videos) the world scores full marks too.
        blind = ev.evaluate_video(frames, prompt, 4)
        assert blind["adherence"] == 1.0, (prompt, blind["objects"])
        assert blind["motion_adherence"] in (1.0, None), (prompt, [o["motion_judged"] for o in blind["objects"]])


def test_an_object_that_left_and_came_back_counts_as_present():
    spec, frames, truth = _clip(EVAL_SEEDS[1], 30, fps=6, num_objects=1, motion="wrap")
    visibility = [r["objects"][0]["visibility"] for r in truth]
    assert "none" in visibility  # it really leaves the frame, more than once in 30 s
    result = ev.evaluate_video(frames, world.caption(spec), 6, ground_truth=truth)
    assert result["adherence"] == 1.0 and result["persistence_final"] == 1.0
    assert ev.evaluate_video(frames, world.caption(spec), 6)["persistence"] == {"10": 1.0, "20": 1.0, "30": 1.0}


def test_vanished_and_wrong_objects_are_caught():
    spec, frames, truth = _clip(EVAL_SEEDS[2], 12, fps=6, num_objects=2, motion="bounce", pattern="none")
    prompt = world.caption(spec)
    # The second object disappears half way through the video.
    gone = dataclasses.replace(spec, objects=spec.objects[:1])
    tail = world.render_frames(gone, range(len(frames) // 2, len(frames)), fps=6, width=96, height=64)
    spliced = np.concatenate([frames[:len(frames) // 2], tail])
    result = ev.evaluate_video(spliced, prompt, 6)
    assert result["adherence"] == 1.0
    assert result["persistence"]["4"] == 1.0 and result["persistence_final"] == 0.5
    assert [o["present_at"]["12"] for o in result["objects"]] == [True, False]
    # A prompt whose objects are not in the video.
    other = next(s for s in range(100) if not {(o.colour, o.shape) for o in world.sample_world(s).objects}
                 & {(o.colour, o.shape) for o in spec.objects})
    result = ev.evaluate_video(frames, world.caption(world.sample_world(other)), 6)
    assert result["adherence"] == 0.0 and result["persistence_final"] is None
    # Right colour, wrong shape is not the prompted object.
    swapped = dataclasses.replace(spec.objects[0], shape="circle" if spec.objects[0].shape != "circle" else "square")
    prompt = world.caption(dataclasses.replace(spec, objects=(swapped, spec.objects[1])))
    assert ev.evaluate_video(frames, prompt, 6)["adherence"] == 0.5



# --------------------------------------------------------------------------------------------------- motion


def _track(position, seconds: float = 6.0, fps: int = 24) -> dict[int, tuple[float, float]]:
    return {i: position(i / fps) for i in range(int(seconds * fps))}


def test_judge_motion_reads_each_world_motion_from_a_track():
    def judged(track, motion, direction=None):
        return ev.judge_motion(track, 24, motion, direction)["correct"]

    still = _track(lambda t: (0.5 + 0.004 * math.sin(7 * t), 0.5 + 0.004 * math.cos(5 * t)))  # a pixel's wobble
    drifting_right = _track(lambda t: ((0.2 + 0.3 * t) % 1.0, 0.4))  # leaves on the right and comes back
    orbiting = _track(lambda t: (0.5 + 0.15 * math.cos(0.8 * t), 0.5 + 0.15 * math.sin(0.8 * t)))
    straight = _track(lambda t: (0.1 + 0.1 * t, 0.2 + 0.05 * t))
    assert judged(still, "rest") and not judged(still, "bounce") and not judged(still, "orbit")
    assert judged(drifting_right, "wrap", "right") and not judged(drifting_right, "wrap", "left")
    assert not judged(drifting_right, "wrap", "up") and not judged(drifting_right, "rest")
    assert judged(orbiting, "orbit") and judged(orbiting, "bounce") and not judged(orbiting, "rest")
    assert judged(straight, "bounce") and not judged(straight, "orbit")
    assert ev.judge_motion(still, 24, None, None)["correct"] is None  # motion not prompted
    assert ev.judge_motion({0: (0.5, 0.5), 24: (0.6, 0.5)}, 24, "bounce", None)["correct"] is None  # one span


def test_a_moving_object_prompted_as_resting_fails_motion_but_not_adherence():
    spec, frames, _ = _clip(EVAL_SEEDS[3], 6, fps=8, num_objects=1, motion="bounce")
    right = ev.evaluate_video(frames, world.caption(spec), 8)
    assert right["adherence"] == 1.0 and right["motion_adherence"] == 1.0
    resting = dataclasses.replace(spec, objects=(dataclasses.replace(spec.objects[0], motion="rest", vx=0.0,
                                                                     vy=0.0),))
    wrong = ev.evaluate_video(frames, world.caption(resting), 8)
    assert wrong["adherence"] == 1.0 and wrong["motion_adherence"] == 0.0
    assert wrong["objects"][0]["motion_judged"]["speed"] > ev.REST_SPEED


def test_prompts_outside_the_vocabulary_and_bad_input():
    _, frames, truth = _clip(EVAL_SEEDS[0], 2)
    result = ev.evaluate_video(frames, "a sunset over the sea", 8)
    assert result["adherence"] is None and result["objects"] == []
    assert result["background"]["correct"] is None
    with pytest.raises(ValueError, match="expected uint8"):
        ev.evaluate_video(frames.astype(np.float32), "x", 8)
    with pytest.raises(ValueError, match="fps"):
        ev.evaluate_video(frames, "x", 0)
    with pytest.raises(ValueError, match="ground_truth"):
        ev.evaluate_video(frames, "x", 8, ground_truth=truth[:-1])


# --------------------------------------------------------------------------------------------- seams, drift


def test_seam_ratio_is_one_for_a_smooth_clip_and_large_for_a_splice():
    spec, frames, _ = _clip(EVAL_SEEDS[3], 12, fps=12, num_objects=3, motion="bounce", pattern="none")
    boundaries = list(range(9, len(frames), 9))
    assert 0.8 < ev.seam_ratio(frames, boundaries) < 1.25
    # Splice: the same world, but the second half jumps 50 seconds ahead.
    cut = len(frames) // 2
    later = world.render_frames(spec, range(cut + 600, len(frames) + 600), fps=12, width=96, height=64)
    spliced = np.concatenate([frames[:cut], later])
    assert ev.seam_ratio(spliced, [cut]) > 3.0
    result = ev.evaluate_video(spliced, world.caption(spec), 12, {"task": [cut], "segment": boundaries})
    assert result["seam_ratio_task"] > 3.0 and 0.8 < result["seam_ratio_segment"] < 1.5
    assert result["seam_ratio"] == pytest.approx(
        ev.seam_ratio(spliced, sorted({cut, *boundaries})), rel=1e-3)
    assert ev.seam_ratio(frames, []) is None and ev.seam_ratio(frames, [0, 10_000]) is None
    still = np.repeat(frames[:1], 10, axis=0)
    assert ev.seam_ratio(still, [5]) == 1.0


def test_colour_drift_is_zero_for_the_world_and_large_when_the_background_changes():
    spec, frames, _ = _clip(EVAL_SEEDS[5], 6, fps=8, pattern="stripes", pan=True)
    drift = ev.colour_drift(frames, 8)
    assert drift["delta_e"] < 1.0 and drift["first_name"] == drift["last_name"] == spec.background
    new_background = next(c for c in world.COLOURS
                          if c != spec.background and c not in {o.colour for o in spec.objects})
    changed = world.render_frames(dataclasses.replace(spec, background=new_background), range(8 * 3, 8 * 6),
                                  fps=8, width=96, height=64)
    drifted = np.concatenate([frames[:8 * 3], changed])
    drift = ev.colour_drift(drifted, 8)
    assert drift["delta_e"] > 20 and drift["last_name"] == new_background
    # A slight tint is measured, not rounded away.
    tinted = np.concatenate([frames[:24], np.clip(frames[24:].astype(int) + [6, 0, 0], 0, 255).astype(np.uint8)])
    assert 0.5 < ev.colour_drift(tinted, 8)["delta_e"] < 10
    assert ev.delta_e((255, 255, 255), (0, 0, 0)) == pytest.approx(100.0, abs=0.01)


def test_psnr():
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    assert ev.psnr(clean, clean) == math.inf
    noisy = [np.clip(clean + rng.normal(0, s, clean.shape), 0, 255) for s in (2, 8, 32)]
    values = [ev.psnr(clean, n) for n in noisy]
    assert values[0] > values[1] > values[2] > 10 and 40 < values[0] < 45
    assert ev.psnr(np.zeros(10), np.full(10, 255.0)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        ev.psnr(clean, clean[:2])


# ------------------------------------------------------------------------------------------ plans, targets


def test_plan_boundaries_follow_tasks_and_segments():
    from orchestrator.plan import make_plan

    num_frames = 8 * 20
    num_latent = 1 + math.ceil((num_frames - 1) / 4)
    plan = make_plan("autoregressive", num_latent, 8, num_frames=num_frames, decode_context=2, segment_latents=3)
    bounds = ev.plan_boundaries(plan, num_frames)
    assert bounds["segment"] == [s.frame_start for s in plan.segments if s.frame_start > 0]
    owner = {i: t.task_id for t in plan.tasks for i in t.latent}
    expected = [4 * i - 3 for i in range(1, num_latent) if owner[i] != owner[i - 1]]
    assert bounds["task"] == expected and expected
    assert ev.plan_boundaries(plan.to_dict(), num_frames) == bounds
    assert "refine" not in bounds

    refined = make_plan("autoregressive", num_latent, 8, num_frames=num_frames, decode_context=2,
                        segment_latents=3, refine=True)
    with_refinement = ev.plan_boundaries(refined, num_frames)
    # pass-0 blocks of 8 latent frames at 0, 12, 24, 36, pass-1 blocks of 8 - 4 * 1 at 8, 20, 32, each taking
    # over 1 frame either side: the video's latents come from pass 1 over [7, 13), [19, 25), [31, 37)
    assert with_refinement["task"] == expected
    assert with_refinement["refine"] == [4 * i - 3 for i in (7, 13, 19, 25, 31, 37)]


def test_targets_are_checked_per_schedule():
    good = {"adherence": 0.95, "persistence_final": 0.9, "seam_ratio": 1.1, "drift_delta_e": 1.0}
    summary = {"hierarchy-2": good, "autoregressive": good | {"persistence_final": 0.95, "seam_ratio": 1.5}}
    checks = ev.check_targets(summary, {"psnr": 31.0})
    verdict = {(c["target"], c["schedule"]): c["passed"] for c in checks}
    assert verdict[("vae_psnr", None)] is True
    assert verdict[("seam_ratio", "autoregressive")] is False and verdict[("seam_ratio", "hierarchy-2")] is True
    assert verdict[("persistence_vs_autoregressive", "hierarchy-2")] is False
    assert ("persistence_vs_autoregressive", "autoregressive") not in verdict
    assert {c["passed"] for c in ev.check_targets({"parallel": good | {"adherence": None}}, None)
            if c["target"] == "adherence"} == {None}


def test_eval_prompts_are_fixed_held_out_captions():
    prompts = ev.eval_prompts(3)
    assert prompts == ev.eval_prompts(3)
    assert all(seed >= world.EVAL_SEED_BASE for seed, _ in prompts)
    assert all(world.parse_caption(text)["objects"] for _, text in prompts)


class _LosslessCodec:
    """A VAE that reconstructs perfectly (latents are the frames) or, with ``flat``, paints the mean colour."""

    def __init__(self, flat: bool = False):
        self.flat = flat

    def encode(self, frames):
        return np.asarray(frames)

    def decode(self, latents, prompt=None):
        if self.flat:
            return np.broadcast_to(latents.mean(axis=(0, 1, 2), keepdims=True).astype(np.uint8), latents.shape)
        return latents


def test_reconstruction_ceiling_is_full_for_a_lossless_vae_and_empty_for_a_flat_one():
    prompts = ev.eval_prompts(2)
    lossless = ev.reconstruction_ceiling(_LosslessCodec(), prompts, width=64, height=64, fps=8)
    assert lossless["adherence"] == 1.0 and lossless["prompts"] == 2
    assert lossless["seam_ratio"] < 2.0  # the world moves smoothly across latent boundaries
    flat = ev.reconstruction_ceiling(_LosslessCodec(flat=True), prompts, width=64, height=64, fps=8)
    assert flat["adherence"] == 0.0


def test_denoising_error_splits_objects_from_backdrop():
    from model.generator import Generator
    from model.latent_pool import latent_object_mask

    generator = Generator.from_preset("tiny")
    prompts = ev.eval_prompts(2)
    size = dict(width=64, height=64, fps=8)
    plain = ev.denoising_error(generator, prompts, latent_frames=3, **size)
    assert plain["levels"] == list(ev.DENOISE_LEVELS) and plain["prompts"] == 2 and plain["latent_frames"] == 3
    assert all(v > 0 and math.isfinite(v) for v in plain["objects"] + plain["backdrop"])

    # An estimate off by exactly 1 on the object pixels and right elsewhere scores 1 and 0.
    truth = {}
    for seed, prompt in prompts:
        spec = world.sample_world(seed)
        clean = generator.encode(world.render_frames(spec, range(9), **size))
        truth[prompt] = clean + latent_object_mask(spec, [0, 1, 2], 8, 64, 64, generator.config.vae.spatial_factor)[:, None]
    generator.predict_clean = lambda noisy, times, level, prompt: truth[prompt]
    split = ev.denoising_error(generator, prompts, latent_frames=3, **size)
    assert split["objects"] == [1.0, 1.0, 1.0] and split["backdrop"] == [0.0, 0.0, 0.0]


def test_denoising_adherence_scores_the_decoded_estimates():
    """Estimates that decode to the prompt's world keep every object; estimates that decode to flat frames
    keep none, while the decoded clean latents keep them all."""
    import torch

    from model.generator import Generator

    generator = Generator.from_preset("tiny")
    prompts = ev.eval_prompts(2)
    size = dict(width=64, height=64, fps=8)
    frames = {prompt: world.render_frames(world.sample_world(seed), range(9), **size) for seed, prompt in prompts}
    marks = {}

    def predict_clean(noisy, times, level, prompt):
        marks[prompt] = torch.full_like(noisy, 7.0)  # stands for "the prompt's world"
        return marks[prompt]

    def decode(latents, prompt=None):
        for prompt, mark in marks.items():
            if latents is mark:
                return torch.from_numpy(frames[prompt])
        return torch.full((9, 64, 64, 3), 128, dtype=torch.uint8)  # flat grey: no object

    generator.predict_clean, generator.decode = predict_clean, decode
    faithful = ev.denoising_error(generator, prompts, latent_frames=3, **size)
    assert faithful["adherence"] == [1.0, 1.0, 1.0] and faithful["adherence_clean"] == 0.0

    generator.predict_clean = lambda noisy, times, level, prompt: noisy.clone()
    lost = ev.denoising_error(generator, prompts, latent_frames=3, **size)
    assert lost["adherence"] == [0.0, 0.0, 0.0]


def test_prompt_sensitivity_tells_a_dit_deaf_to_shape_words_from_one_that_hears_them():
    """The estimate is compared with itself under a caption renaming the first object's shape and under one
    renaming its colour; a DiT that reads colour words alone moves for the colour and not at all for the shape."""
    from model.generator import Generator

    generator = Generator.from_preset("tiny")
    prompts = ev.eval_prompts(2)
    size = dict(width=64, height=64, fps=8)
    asked = []

    def hears(*words):
        vocabulary = {"shape": world.SHAPES, "colour": world.COLOURS}

        def predict_clean(noisy, times, level, prompt):
            asked.append(prompt)
            named = world.parse_caption(prompt)["objects"][0]
            return noisy + sum(vocabulary[w].index(named[w]) for w in words)  # each word shifts every pixel
        return predict_clean

    generator.predict_clean = hears("colour")
    deaf = ev.prompt_sensitivity(generator, prompts, latent_frames=2, **size)
    assert deaf["levels"] == list(ev.DENOISE_LEVELS) and deaf["prompts"] == 2
    assert deaf["shape"] == [0.0, 0.0, 0.0] and min(deaf["colour"]) > 0
    for seed, prompt in prompts:
        spec = world.sample_world(seed)
        first = world.parse_caption(prompt)["objects"][0]
        named = [world.parse_caption(p)["objects"][0] for p in asked if p != prompt
                 and world.parse_caption(p)["background"] == spec.background]
        # One renaming changes the shape alone, the other the colour alone, to one nobody else in the world wears.
        assert any(n["shape"] != first["shape"] and n["colour"] == first["colour"] for n in named)
        taken = {spec.background, *(o.colour for o in spec.objects)}
        assert any(n["colour"] not in taken and n["shape"] == first["shape"] for n in named)
    generator.predict_clean = hears("colour", "shape")
    both = ev.prompt_sensitivity(generator, prompts, latent_frames=2, **size)
    assert min(both["shape"]) > 0


class _WorldPainter:
    """A generator whose windows are the prompt's own world video (or, with ``flat``, its mean colour; with
    ``circles``, the same world with every object a circle). Its "latents" are the frames themselves."""

    def __init__(self, prompts, flat: bool = False, jumpy: bool = False, circles: bool = False):
        from model.train import all_circles

        self.worlds = {prompt: world.sample_world(seed) for seed, prompt in prompts}
        if circles:
            self.worlds = {prompt: all_circles(spec) for prompt, spec in self.worlds.items()}
        self.flat, self.jumpy, self.seeds = flat, jumpy, []

    def latent_size(self, height, width):
        return height, width

    def encode(self, frames):
        import torch

        return torch.from_numpy(np.ascontiguousarray(frames))

    def sample(self, window, observed, prompt, *, seed, steps, guidance, guidance_rescale):
        import torch

        self.seeds.append(seed)
        n = len(window.latent_times)
        # A window after an observed first frame continues the video: four frames per latent frame.
        frames_wanted = range(1, 1 + 4 * n) if observed is not None else range(1 + 4 * (n - 1))
        frames = world.render_frames(self.worlds[prompt], frames_wanted, fps=8, width=window.width,
                                     height=window.height)
        if self.jumpy:  # every latent frame's four video frames a little brighter or darker than the last's
            for i in range(1, len(window.latent_times)):
                group = slice(ev.first_frame_of_latent(i), ev.first_frame_of_latent(i) + 4)
                frames[group] = np.clip(frames[group].astype(np.int16) + (12 if i % 2 else -12), 0, 255)
        return torch.from_numpy(np.ascontiguousarray(frames))

    def decode(self, latents, prompt=None):
        if self.flat:
            return latents.float().mean(dim=(0, 1, 2), keepdim=True).expand(latents.shape).to(latents.dtype)
        return latents


def test_window_adherence_finds_the_prompt_in_a_faithful_window_and_nothing_in_a_flat_one():
    prompts = ev.eval_prompts(3)
    size = dict(width=64, height=64, fps=8, steps=1, guidance=1.0, latent_frames=4)
    painter = _WorldPainter(prompts)
    faithful = ev.window_adherence(painter, prompts, seed=5, **size)
    seams = faithful.pop("seam_ratio")
    by_shape = faithful.pop("by_shape")
    by_motion = faithful.pop("by_motion")
    assert faithful == {"adherence": 1.0, "background_correct": 1.0, "prompts": 3, "latent_frames": 4,
                        "motion_adherence": 1.0}
    prompted_motions = {o["motion"] for _, p in prompts for o in world.parse_caption(p)["objects"]}
    assert set(by_motion) <= prompted_motions and set(by_motion.values()) == {1.0}
    prompted = {o["shape"] for _, p in prompts for o in world.parse_caption(p)["objects"]}
    assert set(by_shape) == prompted and set(by_shape.values()) == {1.0}
    assert painter.seeds == [5, 6, 7], "every prompt samples its own noise"
    assert seams < 1.6, "the world's own frames join smoothly at latent-frame boundaries"
    flat = ev.window_adherence(_WorldPainter(prompts, flat=True), prompts, **size)
    assert flat["adherence"] == 0.0 and set(flat["by_shape"].values()) == {0.0}
    assert flat["motion_adherence"] is None, "nothing to follow where no object is drawn"
    jumpy = ev.window_adherence(_WorldPainter(prompts, jumpy=True), prompts, **size)
    assert jumpy["adherence"] == 1.0 and jumpy["seam_ratio"] > 3 * seams


def test_image_adherence_scores_one_still_per_prompt():
    prompts = ev.eval_prompts(3)
    size = dict(width=64, height=64, fps=8, steps=1, guidance=1.0)
    painter = _WorldPainter(prompts)
    faithful = ev.image_adherence(painter, prompts, seed=2, **size)
    prompted = {o["shape"] for _, p in prompts for o in world.parse_caption(p)["objects"]}
    assert faithful == {"adherence": 1.0, "background_correct": 1.0, "prompts": 3,
                        "by_shape": {shape: 1.0 for shape in world.SHAPES if shape in prompted}}
    assert painter.seeds == [2, 3, 4]
    flat = ev.image_adherence(_WorldPainter(prompts, flat=True), prompts, **size)
    assert flat["adherence"] == 0.0 and set(flat["by_shape"].values()) == {0.0}
    rounding = ev.image_adherence(_WorldPainter(prompts, circles=True), prompts, **size)
    assert all(rounding["by_shape"][shape] == 0.0 for shape in prompted - {"circle"})


def test_shape_channel_mass_reads_the_prompted_shapes_channels():
    import torch

    from model.config import VAEConfig

    class Channels:  # what shape_channel_mass reads of a generator: its config
        def __init__(self, shape_channels):
            self.config = types.SimpleNamespace(vae=VAEConfig(latent_channels=4 + shape_channels,
                                                              shape_channels=shape_channels))

    prompt = "a red square and a blue triangle bouncing on a grey background"
    latents = torch.randn(3, 8, 5, 6)  # (T, C, h, w): appearance noise that must not count
    shapes = latents[:, 4:]
    shapes.zero_()
    shapes[:, world.SHAPES.index("square"), 1:3, 1:3] = 2.0
    shapes[:, world.SHAPES.index("triangle"), 3:, 3:] = 1.0
    assert ev.shape_channel_mass(Channels(4), latents, prompt) == 1.0
    shapes[:, world.SHAPES.index("circle")] = -1.0  # negative values are no mass
    assert ev.shape_channel_mass(Channels(4), latents, prompt) == 1.0
    # As much mass in an unprompted shape as in both prompted ones (2 x 4 + 1 x 6 = 14 latent-pixel units)
    shapes[:, world.SHAPES.index("diamond"), 0, :] = 14 / 6
    assert ev.shape_channel_mass(Channels(4), latents, prompt) == pytest.approx(0.5)
    assert ev.shape_channel_mass(Channels(0), latents[:, :4], prompt) is None, "no shape channels, no reading"
    assert ev.shape_channel_mass(Channels(4), torch.zeros(3, 8, 5, 6), prompt) is None, "no mass to share"


def test_continuation_adherence_tells_a_dit_that_cannot_carry_shapes_from_one_that_can():
    prompts = ev.eval_prompts(3)
    size = dict(width=64, height=64, fps=8, steps=1, guidance=1.0, latent_frames=4)
    prompted = {o["shape"] for _, p in prompts for o in world.parse_caption(p)["objects"]}
    assert prompted - {"circle"}, "the prompts name shapes with corners"
    faithful = ev.continuation_adherence(_WorldPainter(prompts), prompts, seed=3, **size)
    assert faithful["adherence"] == 1.0 and set(faithful["by_shape"]) == prompted
    assert faithful["ceiling"]["adherence"] == 1.0 and faithful["scored_from_frame"] == 5
    # Given the world's first frame, a DiT that draws every object round keeps the circles alone, while the
    # ceiling (the same frames' reconstruction) still holds every shape.
    rounding = ev.continuation_adherence(_WorldPainter(prompts, circles=True), prompts, **size)
    assert rounding["by_shape"].get("circle", 1.0) == 1.0
    assert all(rounding["by_shape"][shape] == 0.0 for shape in prompted - {"circle"})
    assert rounding["ceiling"] == faithful["ceiling"]


def test_predict_clean_inverts_the_noising_for_the_true_velocity():
    import torch

    from model.generator import Generator

    generator = Generator.from_preset("tiny")
    clean, noise = torch.randn(2, generator.latent_channels, 4, 4), torch.randn(2, generator.latent_channels, 4, 4)
    generator._dit_call = lambda windows, *text, **kw: [noise - clean]  # the exact velocity
    estimate = generator.predict_clean(0.4 * clean + 0.6 * noise, [0, 1], 0.6, "a red circle resting")
    torch.testing.assert_close(estimate, clean)
    with pytest.raises(ValueError, match="level"):
        generator.predict_clean(clean, [0, 1], 1.5, "a red circle resting")


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.timeout(600)
def test_longshot_eval_end_to_end(tmp_path, capsys):
    """`longshot eval --json` at CI size: a real local Dask cluster renders with the tiny preset."""
    code = ev.main(["--json", "--seconds", "2", "--prompts", "1", "--schedules", "parallel",
                 "--model", "tiny", "--width", "64", "--height", "64", "--fps", "8", "--steps", "1",
                 "--guidance", "2.5", "--guidance-rescale", "0.5", "--infill-guidance", "1.5",
                 "--workers", "1", "--engine", "eager",
                 "--vae-clips", "1", "--denoise-frames", "2", "--window-prompts", "2", "--image-prompts", "3",
                 "--out", str(tmp_path)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["guidance"] == 2.5 and report["settings"]["guidance_rescale"] == 0.5
    assert report["settings"]["infill_guidance"] == 1.5
    assert list(report["schedules"]) == ["parallel"]
    result = report["schedules"]["parallel"]["per_prompt"][0]
    assert result["num_frames"] == 16 and result["prompt"] == ev.eval_prompts(1)[0][1]
    assert (tmp_path / f"parallel-{ev.eval_prompts(1)[0][0]}.mp4").stat().st_size > 0
    assert result["boundaries"]["segment"], "a 2-second render has more than one decode segment"
    assert 0.0 <= result["adherence"] <= 1.0
    assert result["drift"]["delta_e"] >= 0.0
    # The world's own rendering of the prompt is the reference: full marks for what it shows.
    assert report["world"]["summary"]["adherence"] == 1.0
    assert report["world"]["summary"]["motion_adherence"] in (1.0, None)
    assert "motion_adherence" in report["schedules"]["parallel"]["summary"]
    assert report["vae"]["clips"] == 1 and report["vae"]["psnr"] > 0
    assert 0.0 <= report["vae"]["reconstruction"]["adherence"] <= 1.0
    assert report["denoising"]["latent_frames"] == 2 and len(report["denoising"]["objects"]) == 3
    sensitivity = report["prompt_sensitivity"]
    assert sensitivity["prompts"] == 2 and all(v >= 0 for v in sensitivity["shape"] + sensitivity["colour"])
    assert report["window"]["prompts"] == 2 and 0.0 <= report["window"]["adherence"] <= 1.0
    assert set(report["window"]["by_shape"]) <= set(world.SHAPES)
    continuation = report["continuation"]
    assert continuation["prompts"] == 2 and 0.0 <= continuation["adherence"] <= 1.0
    assert 0.0 <= continuation["ceiling"]["adherence"] <= 1.0
    targets = {(c["target"], c["schedule"]) for c in report["checks"]}
    assert {("vae_psnr", None), ("adherence", "parallel"), ("seam_ratio", "parallel")} <= targets
    assert report["image"]["prompts"] == 3 and 0.0 <= report["image"]["adherence"] <= 1.0


def test_longshot_eval_of_the_model_alone_renders_nothing(tmp_path, capsys):
    """`--prompts 0`: no cluster and no render; the stills and the VAE are measured, and printed."""
    code = ev.main(["--prompts", "0", "--model", "tiny", "--width", "64", "--height", "64", "--fps", "8",
                    "--steps", "1", "--vae-clips", "1", "--denoise-frames", "0", "--window-prompts", "0",
                    "--image-prompts", "2", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "One generated still per prompt, 2 prompts: adherence" in printed
    assert "VAE reconstruction PSNR on 1 held-out world clips" in printed
    assert "prompt adherence" not in printed, "no schedule table without renders"
    assert "1 of 1 target checks pass" in printed or "0 of 1 target checks pass" in printed, "the VAE's PSNR"
    assert not list(tmp_path.glob("*.mp4"))
    assert ev.main(["--json", "--prompts", "0", "--model", "tiny", "--width", "64", "--height", "64", "--fps", "8",
                    "--steps", "1", "--vae-clips", "0", "--denoise-frames", "2", "--window-prompts", "0",
                    "--image-prompts", "1", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schedules"] == {} and report["world"] is None and report["prompts"] == []
    assert report["image"]["prompts"] == 1 and report["window"] is None and report["denoising"] is None
    assert report["prompt_sensitivity"] is None, "no rendered or window prompts to rename words in"
    assert report["checks"] == [] and report["settings"]["image_prompts"] == 1
    with pytest.raises(SystemExit):
        ev.main(["--prompts", "0", "--vae-clips", "0", "--denoise-frames", "0", "--window-prompts", "0",
                 "--image-prompts", "0"])
    assert "--prompts=0: with nothing rendered" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--image-prompts", "1001"])
    assert "--image-prompts=1001: must be in 0..1000" in capsys.readouterr().err
