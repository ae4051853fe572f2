"""Training entry points on the tiny preset: every part trains, resumes and exports a loadable checkpoint."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model.train
from model.config import VAEConfig
from model.dit import VideoDiT
from model.generator import Generator, VideoModel, Window
from model.text import TextEncoder
from model.latent_pool import encode_pixel_groups
from model.train import (draw_world_windows, gradient_loss, latent_shape_targets, lr_at, main, object_loss_weight,
                         object_pixel_weight, run_config, sample_window, seam_loss, shape_variants, weighted_mean)
from model.vae import SHAPE_SCALE
from model.world import SHAPES, ObjectSpec, WorldSpec, caption, parse_caption, render_frames, sample_world


def test_a_time_budget_anneals_the_learning_rate_when_the_clock_is_ahead_of_the_steps():
    base, warmup, total = 1e-3, 10, 10_000
    assert lr_at(5, base, warmup, total, spent=0.9) == pytest.approx(base * 6 / 10), "warmup stays in steps"
    by_steps = lr_at(1000, base, warmup, total)
    assert by_steps > 0.9 * base
    assert lr_at(1000, base, warmup, total, spent=0.01) == by_steps, "the step schedule leads while it is ahead"
    assert lr_at(1000, base, warmup, total, spent=0.5) == pytest.approx(0.55 * base)
    assert lr_at(1000, base, warmup, total, spent=1.0) == pytest.approx(0.1 * base), "annealed when time is up"


def test_anneal_in_time_needs_a_time_budget(tmp_path):
    with pytest.raises(ValueError, match="--anneal-in-time.*--minutes"):
        main(["dit", "--run", str(tmp_path / "run"), "--preset", "tiny", "--anneal-in-time"])


def test_training_windows_fit_the_model_and_practise_neighbouring_latents():
    rng = random.Random(0)
    windows = 4000
    latents = adjacent = unobserved = 0
    for _ in range(windows):
        num_latents = rng.choice((2, 3, 10, 61, 181, 361))
        observed, latent = sample_window(rng, num_latents, 16)
        assert latent, "every window has something to denoise"
        assert len(observed) + len(latent) <= 16
        assert not set(observed) & set(latent)
        assert all(0 <= f < num_latents for f in observed + latent)
        assert observed == sorted(set(observed)) and latent == sorted(set(latent))
        latents += len(latent)
        # A seam in a render sits between a latent and its next frame, generated or observed.
        adjacent += sum(1 for f in latent if f + 1 in latent or f + 1 in observed)
        unobserved += not observed
    assert adjacent / latents > 0.4
    assert 0.1 < unobserved / windows < 0.5  # keyframe windows, and not only those


def test_object_loss_weight_marks_the_latent_pixels_an_object_crosses():
    obj = ObjectSpec(shape="square", colour="red", size=0.1, motion="wrap", x=0.5, y=0.5, vx=0.2)
    spec = WorldSpec(background="grey", objects=(obj,))
    weight = object_loss_weight(spec, [0, 6], 24, 128, 80, 4, 3.0)
    assert weight.shape == (2, 20, 32) and set(weight.unique().tolist()) == {1.0, 4.0}
    rows, cols = torch.nonzero(weight[0] > 1, as_tuple=True)
    # The 16-pixel square at (56..71, 32..47) spans latent columns 14..17 and rows 8..11.
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 11, 14, 17)
    # Latent frame 6 holds video frames 21..24, over which the square moves right: it covers more columns.
    later = torch.nonzero(weight[1] > 1, as_tuple=True)[1]
    assert later.min() > 14 and later.max() - later.min() > 3


def test_gradient_loss_sees_a_moved_object_that_colour_alone_would_forgive():
    video = -torch.ones(1, 3, 5, 16, 16)
    video[:, :, :, 4:8, 4:8] = 1.0
    assert gradient_loss(video, video).item() == 0.0
    moved = torch.roll(video, shifts=1, dims=-1)
    moved[:, :, 3:] = torch.roll(video[:, :, 3:], shifts=3, dims=-1)  # a jump between frames 2 and 3
    assert gradient_loss(moved, video).item() > 0.0
    smooth = torch.roll(video, shifts=1, dims=-1)
    assert gradient_loss(moved, video).item() > gradient_loss(smooth, video).item()


def test_seam_loss_sees_errors_that_change_where_latent_frames_meet():
    torch.manual_seed(0)
    video = torch.rand(2, 3, 9, 8, 8) * 2 - 1  # frame 0, then latent frames 1-4 and 5-8
    assert seam_loss(video, video, 4).item() == 0.0
    steady = video + 0.1 * torch.randn(2, 3, 1, 8, 8)  # one error pattern held by every frame
    assert seam_loss(steady, video, 4).item() == pytest.approx(0.0, abs=1e-6)
    flicker = video.clone()  # each latent frame's four frames share an error pattern of their own
    for first in (0, 1, 5):
        span = 1 if first == 0 else 4
        flicker[:, :, first:first + span] += 0.1 * torch.randn(2, 3, 1, 8, 8)
    assert seam_loss(flicker, video, 4).item() > 0.05
    # The same kind of error inside latent frames only (frames 2 and 3 of the first) is not a seam.
    inside = video.clone()
    inside[:, :, 2:4] += 0.1 * torch.randn(2, 3, 1, 8, 8)
    assert seam_loss(inside, video, 4).item() == 0.0


def run_with_dit(source, run, **dit):
    """A new run directory with ``source``'s VAE and text encoder and its DiT architecture changed by ``dit``."""
    run.mkdir()
    recorded = json.loads((source / "model.json").read_text())
    recorded["dit"].update(dit)
    (run / "model.json").write_text(json.dumps(recorded))
    for part in ("vae", "text"):
        shutil.copytree(source / part, run / part)
    return run


@pytest.mark.timeout(300)
def test_every_part_trains_resumes_and_exports(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--run", str(run), "--save-every", "1", "--log-every", "1", "--warmup", "1"]
    assert main(["vae", *common, "--steps", "2", "--batch", "1"]) == 0
    assert main(["vae", *common, "--steps", "3", "--batch", "1"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "vae" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    meta = json.loads((run / "vae" / "vae.json").read_text())
    assert meta["step"] == 3 and meta["latent_scale"] > 0
    # Where the steps ran: the resumed stretch on the same device extends the first record.
    [record] = meta["compute"]
    assert record["device"].startswith("cpu: ") and (record["from"], record["to"]) == (0, 3)

    assert main(["vae", *common, "--steps", "1", "--batch", "1", "--decoder-only", "--seam", "4",
                 "--object-weight", "4"]) == 0
    assert json.loads((run / "vae" / "vae.json").read_text())["object_weight"] == 4
    assert main(["text", *common, "--steps", "2", "--batch", "4"]) == 0
    assert main(["dit", *common, "--steps", "2", "--batch", "2", "--object-weight", "4"]) == 0
    out = tmp_path / "checkpoint"
    assert main(["export", "--preset", "tiny", "--run", str(run), "--out", str(out)]) == 0

    generator = Generator.load(out)
    assert generator.config.latent_scale == pytest.approx(meta["latent_scale"], rel=1e-6)
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["dit"]["step"] == 2
    assert [(r["from"], r["to"]) for r in training["dit"]["compute"]] == [(0, 2)]
    assert training["vae"]["encoder_steps"] == 3 and training["vae"]["decoder_steps"] == 1
    window = Window(observed_times=(), latent_times=(0, 1), height=4, width=4)
    latents = generator.sample(window, None, "a red circle bouncing on a blue background", seed=0, steps=2,
                               guidance=2.0)
    assert torch.isfinite(latents).all()
    frames = generator.decode(latents)
    assert tuple(frames.shape) == (5, 32, 32, 3)

    # A new architecture (patch 1 instead of 2) warm-starts its DiT from the checkpoint: the blocks are
    # copied, the patch embedding and output layer (new shapes) start fresh.
    # It also draws its training noise levels at --time-shift instead of the model's sampling shift.
    run2 = run_with_dit(run, tmp_path / "run2", patch=1)
    capsys.readouterr()
    shifts = []
    drawn = model.train.sample_training_times
    monkeypatch.setattr(model.train, "sample_training_times",
                        lambda n, shift=1.0, generator=None: shifts.append(shift) or drawn(n, shift, generator))
    assert main(["dit", "--preset", "tiny", "--run", str(run2), "--init-from", str(out), "--steps", "1",
                 "--batch", "1", "--lr", "1e-12", "--ema", "0", "--warmup", "1", "--time-shift", "0.25"]) == 0
    assert shifts == [0.25]
    assert json.loads((run2 / "dit" / "dit.json").read_text())["time_shift"] == 0.25
    assert re.search(r"warm start from .*: \d+ tensors copied, [1-9]\d* kept fresh \(.*patch_embed",
                     capsys.readouterr().out)
    warm = load_file(str(run2 / "dit" / "dit.safetensors"))
    shipped = {k[4:]: v.float() for k, v in load_file(str(out / "model.safetensors")).items() if k.startswith("dit.")}
    block = next(k for k in warm if k.startswith("blocks.0.") and k.endswith("weight") and warm[k].ndim == 2)
    torch.testing.assert_close(warm[block], shipped[block], rtol=0, atol=1e-3)
    assert warm["patch_embed.weight"].shape != shipped["patch_embed.weight"].shape


def test_shape_variants_change_shapes_and_nothing_else():
    rng = random.Random(0)
    for seed in range(40):
        spec = sample_world(seed)
        variants = shape_variants(spec, rng, 3)
        assert 1 <= len(variants) <= 3
        captions = [caption(spec)] + [caption(v) for v in variants]
        assert len(set(captions)) == len(captions), "every variant is a negative with a caption of its own"
        for variant in variants:
            assert variant.background == spec.background and variant.pattern == spec.pattern
            assert len(variant.objects) == len(spec.objects)
            for a, b in zip(spec.objects, variant.objects):
                assert (a.colour, a.size, a.motion, a.x, a.y) == (b.colour, b.size, b.motion, b.x, b.y)
            parsed, original = parse_caption(caption(variant)), parse_caption(caption(spec))
            assert [o["colour"] for o in parsed["objects"]] == [o["colour"] for o in original["objects"]]
            assert [o["shape"] for o in parsed["objects"]] != [o["shape"] for o in original["objects"]]


def test_text_batches_hold_worlds_with_their_shape_variants(tmp_path, monkeypatch):
    """`--shape-variants G` trains the text encoder on groups of G captions of one world that only shape words
    tell apart, the run records G, and a count below 1 is refused before any work, naming the option."""
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--run", str(run), "--seed", "0", "--warmup", "1"]
    with pytest.raises(ValueError, match="--shape-variants: 0 must be at least 1"):
        main(["text", *common, "--steps", "1", "--batch", "8", "--shape-variants", "0"])
    batches = []
    tokenize = TextEncoder.tokenize

    def recording(self, prompts):
        batches.append(list(prompts))
        return tokenize(self, prompts)

    monkeypatch.setattr(TextEncoder, "tokenize", recording)
    assert main(["text", *common, "--steps", "2", "--batch", "8", "--shape-variants", "4"]) == 0
    assert [len(b) for b in batches] == [8, 8]
    for batch in batches:
        parsed = [parse_caption(c) for c in batch]
        # Each world leads its group: the captions after it name the same colours on the same background.
        leaders = [i for i, p in enumerate(parsed)
                   if i == 0 or [o["colour"] for o in p["objects"]] != [o["colour"] for o in parsed[i - 1]["objects"]]
                   or p["background"] != parsed[i - 1]["background"]]
        assert len(leaders) < len(batch), "some captions are shape variants of the world before them"
        assert len(set(batch)) == len(batch)
    assert json.loads((run / "text" / "text.json").read_text())["shape_variants"] == 4


def test_images_add_single_frames_of_fresh_worlds_to_every_batch(tmp_path, monkeypatch):
    """`--images N` puts N one-frame windows, each noised and learnt, beside the batch's video windows, and the
    run records it; a negative count is refused before any work, naming the option."""
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--run", str(run), "--seed", "0", "--warmup", "1"]
    assert main(["vae", *common, "--steps", "1", "--batch", "1"]) == 0
    assert main(["text", *common, "--steps", "1", "--batch", "4"]) == 0
    with pytest.raises(ValueError, match="--images: -1 must be 0 or more"):
        main(["dit", *common, "--steps", "1", "--batch", "1", "--images", "-1"])
    seen = []
    forward = VideoDiT.forward

    def recording(self, windows, *args, **kwargs):
        seen.append([(len(w.frames), bool(w.observed.any()), float(w.noise.max())) for w in windows])
        return forward(self, windows, *args, **kwargs)

    monkeypatch.setattr(VideoDiT, "forward", recording)
    assert main(["dit", *common, "--steps", "2", "--batch", "1", "--images", "3"]) == 0
    assert [len(batch) for batch in seen] == [4, 4]
    for batch in seen:
        assert all(frames == 1 and not observed and noise > 0 for frames, observed, noise in batch[1:])
    assert json.loads((run / "dit" / "dit.json").read_text())["images"] == 3


@pytest.mark.timeout(300)
def test_loader_workers_draw_the_clips_in_other_processes(tmp_path, monkeypatch):
    """`--loader-workers N` draws each step's worlds in N worker processes: the steps train on full batches of
    distinct worlds, and the frames drawn there encode in one batched call to what each window's own call gives.
    With a latent pool, whose windows are read rather than drawn, the option is refused before any work."""
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--run", str(run), "--seed", "0", "--warmup", "1"]
    assert main(["vae", *common, "--steps", "1", "--batch", "1"]) == 0
    assert main(["text", *common, "--steps", "1", "--batch", "4"]) == 0
    with pytest.raises(ValueError, match="--loader-workers: -1 must be 0 or more"):
        main(["dit", *common, "--steps", "1", "--loader-workers", "-1"])
    with pytest.raises(ValueError, match="--loader-workers: windows from a latent pool"):
        main(["dit", *common, "--steps", "1", "--loader-workers", "2", "--latents"])
    prompts = []
    forward = VideoDiT.forward

    def recording(self, windows, tokens, *args, **kwargs):
        prompts.append(len(windows))
        return forward(self, windows, tokens, *args, **kwargs)

    monkeypatch.setattr(VideoDiT, "forward", recording)
    monkeypatch.setattr(model.train, "TEXT_CACHE_LIMIT", 5)  # a step's 4 new captions overflow it every step
    assert main(["dit", *common, "--steps", "3", "--batch", "3", "--images", "1", "--loader-workers", "2"]) == 0
    assert prompts == [4, 4, 4]
    weights = load_file(str(run / "dit" / "dit.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())

    video_model = VideoModel(run_config("tiny", run)).eval()
    batch = draw_world_windows(random.Random(1), windows=3, images=2, max_window=4,
                               spatial_factor=video_model.cfg.vae.spatial_factor, object_weight=0.0)
    assert len({d.caption for d in batch.windows}) > 1, "every window shows a world of its own"
    assert sum(len(g) for g in batch.pixels.values()) == sum(len(d.times) for d in batch.windows)
    size, groups = next(iter(batch.pixels.items()))
    together = encode_pixel_groups(video_model.vae, groups)
    alone = torch.cat([encode_pixel_groups(video_model.vae, groups[d.rows:d.rows + len(d.times)])
                       for d in batch.windows if d.size == size])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_head_only_trains_the_refine_head_on_the_frozen_dit(tmp_path, capsys):
    """`--head-only` adds a refine head to a trained DiT and trains it alone: every block keeps the
    warm-started weights exactly, the head moves away from the identity, and the run records where it began."""
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--run", str(run), "--seed", "0", "--save-every", "1"]
    assert main(["vae", *common, "--steps", "1", "--batch", "1"]) == 0
    assert main(["text", *common, "--steps", "1", "--batch", "4"]) == 0
    assert main(["dit", *common, "--steps", "1", "--batch", "1"]) == 0
    with pytest.raises(ValueError, match="--head-only: .*no refine head"):
        main(["dit", *common, "--steps", "2", "--batch", "1", "--head-only"])

    headed = run_with_dit(run, tmp_path / "headed", refine=8)
    assert main(["dit", "--preset", "tiny", "--run", str(headed), "--init-from", str(run), "--steps", "3",
                 "--batch", "2", "--lr", "1e-2", "--ema", "0", "--warmup", "1", "--head-only"]) == 0
    before = load_file(str(run / "dit" / "dit.safetensors"))
    after = load_file(str(headed / "dit" / "dit.safetensors"))
    assert set(after) - set(before) and all(k.startswith("refine.") for k in set(after) - set(before))
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)
    assert after["refine.conv3.weight"].abs().amax() > 0, "the head left the identity"
    meta = json.loads((headed / "dit" / "dit.json").read_text())
    assert meta["head_only"] and meta["init_from"] == str(run) and meta["step"] == 3


def test_a_dit_with_convolutional_stages_warm_starts_trains_exports_and_samples(tmp_path, capsys):
    """`dit.conv` in a run's model.json: the DiT's blocks come from a plain DiT, the stages start fresh, every
    part of the new DiT moves in training, and the exported checkpoint samples the same with and without the
    observed frames' cache."""
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--run", str(run), "--seed", "0", "--save-every", "1"]
    assert main(["vae", *common, "--steps", "1", "--batch", "1"]) == 0
    assert main(["text", *common, "--steps", "1", "--batch", "4"]) == 0
    assert main(["dit", *common, "--steps", "1", "--batch", "1"]) == 0

    staged = run_with_dit(run, tmp_path / "staged", conv=[8, 16])
    capsys.readouterr()
    assert main(["dit", "--preset", "tiny", "--run", str(staged), "--init-from", str(run), "--steps", "3",
                 "--batch", "2", "--lr", "1e-2", "--ema", "0", "--warmup", "1"]) == 0
    assert re.search(r"warm start from .*: \d+ tensors copied, \d+ kept fresh \(.*stages\.", capsys.readouterr().out)
    before = load_file(str(run / "dit" / "dit.safetensors"))
    after = load_file(str(staged / "dit" / "dit.safetensors"))
    assert "patch_embed.weight" in before and "patch_embed.weight" not in after
    assert after["stages.out.weight"].abs().amax() > 0, "the output convolution left zero"
    assert (after["blocks.0.spatial_attn.q.weight"] - before["blocks.0.spatial_attn.q.weight"]).abs().amax() > 0

    out = tmp_path / "checkpoint"
    assert main(["export", "--preset", "tiny", "--run", str(staged), "--out", str(out)]) == 0
    generator = Generator.load(out)
    assert generator.config.dit.conv == (8, 16)
    window = Window(observed_times=(0,), latent_times=(1, 2), height=4, width=8)
    observed = torch.randn(1, generator.latent_channels, 4, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(seed=3, steps=2, guidance=2.0)
    cached = generator.sample(window, observed, "a red circle", use_cache=True, **kw)
    uncached = generator.sample(window, observed, "a red circle", use_cache=False, **kw)
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_the_decoder_trains_on_the_runs_dit_estimates(tmp_path, monkeypatch):
    """`--decoder-only --generated 1` decodes what the run's DiT makes of each clip, prompted with its caption,
    instead of the encoder's latents: the decoder learns something else, the encoder stays as it was."""
    source = tmp_path / "source"
    common = ["--preset", "tiny", "--seed", "0", "--save-every", "1", "--warmup", "1"]
    assert main(["vae", *common, "--run", str(source), "--steps", "1", "--batch", "1"]) == 0
    with pytest.raises(ValueError, match="--generated: needs --decoder-only"):
        main(["vae", *common, "--run", str(source), "--steps", "2", "--batch", "1", "--generated", "1"])
    with pytest.raises(FileNotFoundError, match="text: no trained weights"):
        main(["vae", *common, "--run", str(source), "--steps", "2", "--batch", "1", "--decoder-only",
              "--generated", "1"])
    assert main(["text", *common, "--run", str(source), "--steps", "1", "--batch", "4"]) == 0
    assert main(["dit", *common, "--run", str(source), "--steps", "1", "--batch", "1"]) == 0

    prompts = []
    forward = VideoDiT.forward
    monkeypatch.setattr(VideoDiT, "forward", lambda self, windows, tokens, *a, **k:
                        prompts.append(len(tokens)) or forward(self, windows, tokens, *a, **k))
    decoders = {}
    for share in ("0", "1"):
        run = tmp_path / f"share{share}"
        shutil.copytree(source, run)
        assert main(["vae", *common, "--run", str(run), "--steps", "2", "--batch", "2", "--lr", "1e-2",
                     "--decoder-only", "--generated", share]) == 0
        decoders[share] = load_file(str(run / "vae" / "vae.safetensors"))
        assert json.loads((run / "vae" / "vae.json").read_text()).get("generated") == (1.0 if share == "1" else None)
        assert prompts == ([2, 2] if share == "1" else [])  # a DiT call per step, one window per clip
    original = load_file(str(source / "vae" / "vae.safetensors"))
    for name, tensor in original.items():
        if name.startswith("encoder."):
            for share in decoders:
                torch.testing.assert_close(decoders[share][name], tensor, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(decoders["0"][k], decoders["1"][k]) for k in original if k.startswith("decoder."))


@pytest.mark.timeout(300)
def test_frame_stack_only_trains_the_per_frame_stack_and_keeps_the_layers_that_mix_time(tmp_path):
    """`--decoder-only --frame-stack-only`: the decoder's upsampling stack and output layer learn; its layers
    before them (which mix latent frames and frames, and so set motion and seams) keep their weights exactly."""
    source, run = tmp_path / "source", tmp_path / "stack"
    common = ["--preset", "tiny", "--batch", "1", "--warmup", "1", "--seed", "0"]
    assert main(["vae", *common, "--run", str(source), "--steps", "1"]) == 0
    with pytest.raises(ValueError, match="--frame-stack-only: needs --decoder-only"):
        main(["vae", *common, "--run", str(source), "--steps", "2", "--frame-stack-only"])
    shutil.copytree(source, run)
    assert main(["vae", *common, "--run", str(run), "--steps", "3", "--lr", "1e-2", "--decoder-only",
                 "--frame-stack-only", "--object-weight", "4"]) == 0
    before, after = (load_file(str(r / "vae" / "vae.safetensors")) for r in (source, run))
    stack = ("decoder.up.", "decoder.norm_out.", "decoder.conv_out.")
    kept = [k for k in before if not k.startswith(stack)]
    assert any(k.startswith("decoder.temporal.") for k in kept) and any(k.startswith("encoder.") for k in kept)
    for key in kept:
        assert torch.equal(after[key], before[key]), key
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith(stack))
    assert json.loads((run / "vae" / "vae.json").read_text())["frame_stack_only"] is True


@pytest.mark.timeout(300)
def test_a_frame_rate_decoder_trains_on_another_runs_frozen_encoder(tmp_path, capsys):
    """`--decoder-only --init-from` a run with a latent-rate decoder: the encoder and its latent statistics
    are the source's (so its DiT and latent pool stay valid), the decoder starts from the source's decoder."""
    source, run = tmp_path / "source", tmp_path / "frame-rate"
    common = ["--preset", "tiny", "--batch", "1", "--log-every", "1", "--warmup", "1"]
    assert main(["vae", *common, "--run", str(source), "--steps", "2"]) == 0
    recorded = json.loads((source / "model.json").read_text())
    recorded["vae"]["frame_blocks"] = 1
    recorded["flow"]["noise_correlation"] = 0.5
    run.mkdir()
    (run / "model.json").write_text(json.dumps(recorded))
    with pytest.raises(FileNotFoundError, match="--decoder-only needs trained weights"):
        main(["vae", *common, "--run", str(run), "--steps", "1", "--decoder-only"])
    capsys.readouterr()
    assert main(["vae", *common, "--run", str(run), "--steps", "1", "--decoder-only", "--init-from", str(source),
                 "--lr", "1e-12"]) == 0
    assert re.search(r"warm start from .*: \d+ tensors copied, [1-9]\d* kept fresh \(decoder.frame_temporal",
                     capsys.readouterr().out)
    before, after = (load_file(str(r / "vae" / "vae.safetensors")) for r in (source, run))
    for key in (k for k in before if k.startswith("encoder.")):
        assert torch.equal(after[key], before[key]), key
    # The output layer's per-frame channel groups, averaged: the decoder starts by holding each latent.
    out_layer = after["decoder.conv_out.weight"]
    held = before["decoder.conv_out.weight"].reshape(4, 3, *out_layer.shape[1:]).mean(dim=0)
    torch.testing.assert_close(out_layer, held, rtol=0, atol=1e-5)
    source_meta, meta = (json.loads((r / "vae" / "vae.json").read_text()) for r in (source, run))
    assert meta["latent_scale"] == source_meta["latent_scale"] and meta["encoder_steps"] == 2
    # The DiT trains under the recorded noise prior.
    assert main(["text", *common, "--run", str(run), "--steps", "1", "--batch", "4"]) == 0
    assert main(["dit", *common, "--run", str(run), "--steps", "1"]) == 0
    assert json.loads((run / "dit" / "dit.json").read_text())["step"] == 1


def test_a_run_keeps_the_architecture_it_started_with(tmp_path):
    run = tmp_path / "run"
    common = ["--run", str(run), "--steps", "1", "--batch", "1", "--log-every", "1"]
    assert main(["vae", "--preset", "tiny", *common]) == 0
    recorded = json.loads((run / "model.json").read_text())
    assert recorded["preset"] == "tiny"
    # A run trained with an older architecture resumes with it, not with today's preset.
    recorded["vae"]["output_norm"] = not recorded["vae"]["output_norm"]
    (run / "model.json").write_text(json.dumps(recorded))
    with pytest.raises(RuntimeError, match="norm_out"):
        main(["vae", "--preset", "tiny", *common[:2], "--steps", "2", "--batch", "1"])
    with pytest.raises(ValueError, match="preset: run .* trains preset 'tiny'"):
        main(["vae", "--preset", "demo", *common])


def test_the_training_device_is_checked_before_any_work(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--device: 'mps' is neither cpu nor cuda"):
        main(["text", "--preset", "tiny", "--run", str(run), "--steps", "1", "--device", "mps"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device: 'cuda' asked for, but torch sees no CUDA device"):
            main(["text", "--preset", "tiny", "--run", str(run), "--steps", "1", "--device", "cuda"])
    assert not (run / "text").exists()


def test_a_checkpoint_unpacks_into_a_run_that_trains_on(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    shipped = Generator.from_preset("tiny", seed=0)
    shipped.sampling = {"refine": 0.9}  # its render defaults go on with the run into every new export
    shipped.save(checkpoint, dtype=torch.float16, extra={"training": {"dit": {"step": 7, "ema": True}}})
    run = tmp_path / "run"
    assert main(["unpack", "--preset", "tiny", "--run", str(run), "--init-from", str(checkpoint)]) == 0
    assert json.loads((run / "dit" / "dit.json").read_text())["step"] == 7
    assert json.loads((run / "sampling.json").read_text()) == {"refine": 0.9}
    with pytest.raises(FileExistsError, match=r"--run: .* already holds a run"):
        main(["unpack", "--preset", "tiny", "--run", str(run), "--init-from", str(checkpoint)])

    # The DiT trains on from the checkpoint; the VAE and text encoder come out of the new export as shipped.
    assert main(["dit", "--preset", "tiny", "--run", str(run), "--init-from", str(checkpoint), "--steps", "2",
                 "--batch", "2", "--warmup", "1", "--device", "cpu"]) == 0
    assert re.search(r"warm start from .*: \d+ tensors copied, 0 kept fresh", capsys.readouterr().out)
    out = tmp_path / "again"
    assert main(["export", "--preset", "tiny", "--run", str(run), "--out", str(out)]) == 0
    before, after = load_file(str(checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("dit."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("dit."))
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == json.loads((checkpoint / "config.json").read_text())["model"]
    assert config["training"]["dit"]["step"] == 2 and config["training"]["vae"]["unpacked_from"] == str(checkpoint)
    assert config["sampling"] == {"refine": 0.9}
    # --sampling adds to the run's defaults and keeps them for the next export.
    assert main(["export", "--preset", "tiny", "--run", str(run), "--out", str(out), "--sampling", "refine_steps=3",
                 "--sampling", "refine=0.8"]) == 0
    assert json.loads((out / "config.json").read_text())["sampling"] == {"refine": 0.8, "refine_steps": 3}
    assert json.loads((run / "sampling.json").read_text()) == {"refine": 0.8, "refine_steps": 3}
    with pytest.raises(ValueError, match=r"--sampling='refine': must be SETTING=NUMBER, e\.g\. refine=0\.9"):
        main(["export", "--preset", "tiny", "--run", str(run), "--out", str(out), "--sampling", "refine"])


def test_the_vae_object_weight_counts_errors_on_and_beside_objects_more():
    objects = torch.zeros(1, 1, 1, 16, 16, dtype=torch.bool)
    objects[..., 6:9, 6:9] = True  # a 3x3 object
    weight = object_pixel_weight(objects, 4.0)

    def loss_of_error_at(y: int, x: int) -> float:
        error = torch.zeros(1, 3, 1, 16, 16)
        error[..., y, x] = 1.0
        return float(weighted_mean(error, weight))

    on, ring, outside = loss_of_error_at(7, 7), loss_of_error_at(7, 10), loss_of_error_at(7, 11)
    assert on == pytest.approx(ring) and on == pytest.approx(5 * outside)
    # Normalised to mean 1: an error everywhere costs what it costs under the plain mean.
    everywhere = torch.full((1, 3, 1, 16, 16), 0.5)
    assert float(weighted_mean(everywhere, weight)) == pytest.approx(float(weighted_mean(everywhere, None)))


def test_ema_blends_float_tensors_and_copies_the_rest():
    net = torch.nn.BatchNorm1d(3)  # float weights and running stats, and an integer batch counter
    trainer = types.SimpleNamespace(module=lambda: net, ema=None)
    model.train.Trainer.update_ema(trainer, 0.9)  # the first call copies the weights
    first = {k: v.clone() for k, v in trainer.ema.items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    net.num_batches_tracked.add_(5)
    model.train.Trainer.update_ema(trainer, 0.9)
    torch.testing.assert_close(trainer.ema["weight"], first["weight"] + 0.1)
    torch.testing.assert_close(trainer.ema["bias"], first["bias"])
    assert trainer.ema["num_batches_tracked"].item() == 5
    assert trainer.ema["weight"].data_ptr() != net.weight.data_ptr()


def test_the_caption_cache_encodes_again_what_clearing_it_dropped(monkeypatch):
    """A step whose new captions overflow the DiT trainer's caption cache clears it; captions of that step that
    were cached before are encoded again with the new ones, not looked up in the emptied cache."""
    encoded = []

    def encode(prompts):
        encoded.append(list(prompts))
        rows = torch.tensor([[float(ord(p[0]))] for p in prompts])
        return types.SimpleNamespace(tokens=rows, mask=rows > 0, pooled=rows * 2)

    text = types.SimpleNamespace(encode=encode)
    trainer = types.SimpleNamespace(text_cache={}, model=types.SimpleNamespace(text=text))
    monkeypatch.setattr(model.train, "TEXT_CACHE_LIMIT", 3)
    model.train.DiTTrainer.text(trainer, ["a", "b"])
    tokens, mask, pooled = model.train.DiTTrainer.text(trainer, ["b", "c", "d"])  # 2 cached + 2 new > 3
    assert encoded == [["a", "b"], ["b", "c", "d"]]
    assert tokens[:, 0].tolist() == [ord("b"), ord("c"), ord("d")]
    assert pooled[:, 0].tolist() == [2 * ord("b"), 2 * ord("c"), 2 * ord("d")]
    assert set(trainer.text_cache) == {"b", "c", "d"}


@pytest.mark.timeout(300)
def test_a_vae_with_shape_channels_trains_its_head_and_decoder_on_a_frozen_encoder(tmp_path, capsys):
    """A run whose VAE adds shape channels to a trained one's latents (`vae.shape_channels`): decoder-only
    training from the source keeps its encoder and latent statistics, starts the decoder from the source's (the
    layer for the shape channels at zero), trains the encoder's shape head towards the world's shape coverage, and decodes
    circles' latents beside the true channels (`--circled`) and degraded latents (`--degrade`). The DiT and a
    checkpoint then work in the wider latent space."""
    source, run = tmp_path / "source", tmp_path / "shapes"
    common = ["--preset", "tiny", "--batch", "2", "--log-every", "1", "--warmup", "1"]
    assert main(["vae", *common, "--run", str(source), "--steps", "2"]) == 0
    recorded = json.loads((source / "model.json").read_text())
    appearance = recorded["vae"]["latent_channels"]
    recorded["vae"].update(latent_channels=appearance + len(SHAPES), shape_channels=len(SHAPES))
    run.mkdir()
    (run / "model.json").write_text(json.dumps(recorded))
    capsys.readouterr()
    assert main(["vae", *common, "--run", str(run), "--steps", "3", "--decoder-only", "--init-from", str(source),
                 "--lr", "1e-12", "--circled", "0.5", "--degrade", "1"]) == 0
    assert "encoder.shape_head" in capsys.readouterr().out  # warm start: the head is new
    before, after = (load_file(str(r / "vae" / "vae.safetensors")) for r in (source, run))
    for key in (k for k in before if k.startswith("encoder.")):
        assert torch.equal(after[key], before[key]), key
    torch.testing.assert_close(after["decoder.conv_in.weight"], before["decoder.conv_in.weight"], rtol=0, atol=1e-6)
    assert after["decoder.shape_in.weight"].abs().max() < 1e-6
    logged = [json.loads(line) for line in (run / "vae" / "log.jsonl").read_text().splitlines()]
    assert all("shape_head" in row for row in logged)  # every batch trains the head, circled ones too
    meta = json.loads((run / "vae" / "vae.json").read_text())
    assert meta["latent_scale"] == json.loads((source / "vae" / "vae.json").read_text())["latent_scale"]

    # Going on at a real learning rate, the head moves and the encoder's other weights do not.
    assert main(["vae", *common, "--run", str(run), "--steps", "6", "--decoder-only", "--lr", "1e-3"]) == 0
    trained = load_file(str(run / "vae" / "vae.safetensors"))
    for key in ("encoder.shape_head.out.weight", "decoder.shape_in.weight"):
        assert not torch.equal(trained[key], after[key]), key
    for key in (k for k in before if k.startswith("encoder.")):
        assert torch.equal(trained[key], before[key]), key

    assert main(["text", *common, "--run", str(run), "--steps", "1", "--batch", "4"]) == 0
    assert main(["dit", *common, "--run", str(run), "--steps", "1"]) == 0
    out = tmp_path / "checkpoint"
    assert main(["export", "--preset", "tiny", "--run", str(run), "--out", str(out)]) == 0
    generator = Generator.load(out)
    assert generator.latent_channels == appearance + len(SHAPES)
    spec = WorldSpec(background="grey", objects=[ObjectSpec(shape="square", colour="red", size=0.3, motion="rest",
                                                            x=0.5, y=0.5)])
    frames = render_frames(spec, range(5), fps=24, width=32, height=32)
    z = generator.encode(frames)
    assert tuple(z.shape) == (2, appearance + len(SHAPES), 4, 4)  # tiny: x8 in space
    # The shape channels are the head's output as it is (no latent normalisation), and the decoder reads them.
    with torch.no_grad():
        pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        raw, _ = generator.model.vae.float().encode_dist(pixels)
    torch.testing.assert_close(z[:, appearance:], raw[0, appearance:].transpose(0, 1), rtol=1e-4, atol=1e-4)
    moved = z.clone()
    moved[:, appearance:] = torch.roll(moved[:, appearance:], 1, dims=1)
    assert not torch.equal(generator.decode(z), generator.decode(moved))


def test_the_shape_head_trains_alone_on_the_frozen_vae(tmp_path, capsys):
    """`vae --head-only`: only the encoder's shape head moves, towards the world's shape coverage; the encoder,
    the decoder and the decoder's training record stay as they were, and its state is kept apart from the
    decoder's, so either can go on afterwards. Decoder options and VAEs without shape channels are refused."""
    source, run = tmp_path / "source", tmp_path / "shapes"
    common = ["--preset", "tiny", "--batch", "2", "--log-every", "1", "--warmup", "1"]
    assert main(["vae", *common, "--run", str(source), "--steps", "1"]) == 0
    with pytest.raises(ValueError, match="--head-only: this run's VAE has no shape head"):
        main(["vae", *common, "--run", str(source), "--steps", "1", "--head-only"])
    recorded = json.loads((source / "model.json").read_text())
    recorded["vae"].update(latent_channels=recorded["vae"]["latent_channels"] + len(SHAPES),
                           shape_channels=len(SHAPES))
    run.mkdir()
    (run / "model.json").write_text(json.dumps(recorded))
    assert main(["vae", *common, "--run", str(run), "--steps", "2", "--decoder-only", "--init-from",
                 str(source)]) == 0
    decoded = load_file(str(run / "vae" / "vae.safetensors"))
    with pytest.raises(ValueError, match="--head-only: trains the shape head alone; --circled"):
        main(["vae", *common, "--run", str(run), "--steps", "3", "--head-only", "--circled", "0.5"])

    capsys.readouterr()
    assert main(["vae", *common, "--run", str(run), "--steps", "6", "--head-only", "--lr", "1e-3"]) == 0
    trained = load_file(str(run / "vae" / "vae.safetensors"))
    for key in decoded:
        moved = not torch.equal(trained[key], decoded[key])
        assert moved == key.startswith("encoder.shape_head."), key
    logged = [json.loads(line) for line in (run / "vae" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged][-6:] == [1, 2, 3, 4, 5, 6]
    assert all(set(row) >= {"loss", "shape_head"} and row["loss"] == row["shape_head"] for row in logged[-6:])
    meta = json.loads((run / "vae" / "vae.json").read_text())
    assert meta["shape_head_steps"] == 6 and meta["decoder_steps"] == 2
    assert (run / "vae" / "state-head.pt").is_file() and (run / "vae" / "state-decoder.pt").is_file()


def test_shape_targets_hold_each_latent_pixels_share_of_each_shape():
    """`latent_shape_targets`: SHAPE_SCALE x the share of each latent pixel an object of each shape covers, the
    first latent from the first frame alone, the others from their four frames; nothing for absent shapes."""
    cfg = VAEConfig(latent_channels=8, shape_channels=4, channels=(8, 8, 8), spatial_factor=4)
    spec = WorldSpec(background="grey", objects=[
        ObjectSpec(shape="square", colour="red", size=0.2, motion="rest", x=0.3, y=0.5),
        ObjectSpec(shape="triangle", colour="blue", size=0.15, motion="bounce", x=0.7, y=0.5, vx=0.5)])
    targets = latent_shape_targets(spec, range(0, 9), fps=24, width=64, height=64, cfg=cfg)
    assert tuple(targets.shape) == (4, 3, 16, 16)
    assert targets.min() >= 0 and targets.sum(0).max() <= SHAPE_SCALE + 1e-5
    assert targets[SHAPES.index("circle")].abs().max() == 0 and targets[SHAPES.index("diamond")].abs().max() == 0
    square, triangle = targets[SHAPES.index("square")], targets[SHAPES.index("triangle")]
    # A resting square covers (2 x 0.2 x 64)^2 pixels in every latent: its channel's sum over the latent pixels.
    expected = (2 * 0.2 * 64) ** 2 / 16 * SHAPE_SCALE
    for t in range(3):
        assert float(square[t].sum()) == pytest.approx(expected, rel=0.05)
    # The moving triangle's mass moves right from latent to latent.
    columns = torch.arange(16.0)
    centres = [float((triangle[t].sum(0) * columns).sum() / triangle[t].sum()) for t in range(3)]
    assert centres[0] < centres[1] < centres[2]


def test_the_gpu_training_script_gives_the_shipped_model_shape_channels(tmp_path):
    """`SHAPE_STEPS=N bash ops/train/gpu-dit.sh`, two steps a part on the CPU: the shipped VAE widens by one
    channel per shape, its decoder and then its head train, the DiT widens to the new latent space, and what
    comes back (model.json, the VAE and the DiT) makes a checkpoint that samples 8-channel latents."""
    repo = Path(__file__).resolve().parents[2]
    out, run = tmp_path / "out", tmp_path / "run"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DEVICE": "cpu",
           "SHAPE_STEPS": "2", "HEAD_STEPS": "2", "SHAPE_BATCH": "2", "STEPS": "2", "BATCH": "2", "PROMPTS": "0",
           "MINUTES": "2", "LOADER_WORKERS": "1", "OUT": str(out), "RUN": str(run)}
    done = subprocess.run(["bash", "ops/train/gpu-dit.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    config = json.loads((out / "model.json").read_text())
    assert config["vae"]["shape_channels"] == len(SHAPES) and config["vae"]["latent_channels"] == 4 + len(SHAPES)
    vae = json.loads((out / "vae.json").read_text())
    assert vae["decoder_steps"] == 2 and vae["shape_head_steps"] == 2 and vae["circled"] == 0.5
    assert "shape_head=" in (out / "train-head.txt").read_text()
    generator = Generator.load(run / "export")
    z = generator.sample(Window((), (0,), *generator.latent_size(32, 48)), None, "a red square", seed=0, steps=1,
                         guidance=4.0)
    assert z.shape[1] == 4 + len(SHAPES)
