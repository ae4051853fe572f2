"""The latent pool: world clips encoded once into Zarr, read back as the DiT trainer's windows."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
import zarr

from model.config import get_preset
from model.generator import VideoModel, _quiet_open_clip
from model.latent_pool import (OBJECTS, LatentPool, PoolMismatch, build_pool, clip_spec, encode_groups,
                                latent_object_mask)
from model.train import main
from model.world import sample_world

SIZES = ((32, 32), (48, 32))


def tiny_vae(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with _quiet_open_clip():
        return VideoModel(get_preset("tiny")).vae.eval()


@pytest.mark.timeout(120)
def test_pool_holds_each_clip_as_encoded_on_the_fly_and_resumes_after_a_cut(tmp_path):
    vae = tiny_vae(0)
    path = tmp_path / "pool.zarr"
    pool = build_pool(vae, path, 2, sizes=SIZES, seed=7, log=lambda line: None)
    assert len(pool) == 2 and pool.sizes == sorted(SIZES)

    rng = random.Random(0)
    for index in range(2):
        clip = clip_spec(index, 7, SIZES)
        attrs, latents = pool.draw(rng, (clip.width, clip.height))
        assert attrs["world_seed"] == clip.world_seed and latents.shape[0] == clip.num_latents
        assert latents.dtype == np.float16
        times = sorted(rng.sample(range(clip.num_latents), 5)) + [0]
        expected = encode_groups(vae, sample_world(clip.world_seed), sorted(set(times)), clip.fps, clip.width,
                                 clip.height)
        torch.testing.assert_close(torch.from_numpy(latents[sorted(set(times))]).float(), expected,
                                   rtol=1e-2, atol=1e-2)

    # A build cut short leaves its last clip incomplete: it is not drawn from, and the next build redoes it
    # (and only it) while extending the pool.
    zarr.open_array(str(path / "clip-00001"), mode="r+").attrs["complete"] = False
    assert len(LatentPool.open(path, vae)) == 1
    lines: list[str] = []
    pool = build_pool(vae, path, 3, sizes=SIZES, seed=7, log=lines.append)
    assert "1 of 3 clips already encoded, 2 to go" in lines[0]
    assert len(pool) == 3


@pytest.mark.timeout(120)
def test_pool_keeps_each_clips_object_masks_and_fills_them_in_for_an_older_pool(tmp_path):
    vae = tiny_vae(0)
    path = tmp_path / "pool.zarr"
    factor = vae.cfg.spatial_factor
    pool = build_pool(vae, path, 2, sizes=SIZES, seed=3, log=lambda line: None)
    rng = random.Random(1)
    for index in range(2):
        clip = clip_spec(index, 3, SIZES)
        attrs, latents = pool.draw(rng, (clip.width, clip.height))
        assert attrs["name"] in pool.object_names
        mask = pool.object_mask(attrs, factor)
        assert mask.dtype == np.uint8 and mask.shape == (len(latents), clip.height // factor, clip.width // factor)
        assert mask.any() and not mask.all()
        times = sorted(rng.sample(range(clip.num_latents), 6))
        expected = latent_object_mask(sample_world(clip.world_seed), times, clip.fps, clip.width, clip.height,
                                      factor)
        assert torch.equal(torch.from_numpy(mask[times]).float(), expected)

    # A pool built before masks were kept: the trainer draws them from the world, the next build writes them.
    stored = {name: zarr.open_array(str(path / OBJECTS / name), mode="r")[:] for name in pool.object_names}
    zarr.open_group(str(path), mode="r+").__delitem__(OBJECTS)
    older = LatentPool.open(path, vae)
    assert older.object_names == set()
    for name, attrs in (c for clips in older.clips.values() for c in clips):
        np.testing.assert_array_equal(older.object_mask(attrs, factor), stored[name])
    lines: list[str] = []
    filled = build_pool(vae, path, 2, sizes=SIZES, seed=3, log=lines.append)
    assert filled.object_names == set(stored) and any("object masks of 2/2 earlier clips" in line for line in lines)


@pytest.mark.timeout(180)
def test_worker_processes_build_the_same_pool_and_a_preloaded_pool_draws_tensors(tmp_path):
    vae = tiny_vae(0)
    serial = build_pool(vae, tmp_path / "serial.zarr", 3, sizes=SIZES, seed=5, log=lambda line: None)
    lines: list[str] = []
    parallel = build_pool(vae, tmp_path / "parallel.zarr", 3, sizes=SIZES, seed=5, workers=2, log=lines.append)
    assert sum("done;" in line for line in lines) == 3
    assert re.fullmatch(r"\[latents\] 3 clips in [\d.]+ s: waiting for frames [\d.]+ s, encoding [\d.]+ s, "
                        r"writing [\d.]+ s", lines[-1])
    names = sorted(name for clips in serial.clips.values() for name, _ in clips)
    assert names == sorted(name for clips in parallel.clips.values() for name, _ in clips)
    for name in names:
        np.testing.assert_array_equal(serial.latents(name), parallel.latents(name))
        assert serial.group[name].attrs.asdict() == parallel.group[name].attrs.asdict()
        np.testing.assert_array_equal(serial.group[f"{OBJECTS}/{name}"][:], parallel.group[f"{OBJECTS}/{name}"][:])

    held = parallel.preload("cpu")
    assert held == sum(serial.latents(n).nbytes + serial.group[f"{OBJECTS}/{n}"][:].nbytes for n in names)
    attrs, latents = parallel.draw(random.Random(0), SIZES[0])
    assert torch.is_tensor(latents) and latents.dtype == torch.float16
    assert torch.is_tensor(parallel.object_mask(attrs, vae.cfg.spatial_factor))
    # A batch's frames from several clips: one gather from the held tensors, the same frames as read clip by clip.
    clips = [attrs for _, attrs in parallel.clips[SIZES[0]]]
    picks = [(a, [len(serial.latents(a["name"])) - 1, 0]) for a in clips] + [(clips[0], [0])]
    held_latents, held_masks = parallel.gather(picks, vae.cfg.spatial_factor, objects=True)
    read_latents, read_masks = serial.gather(picks, vae.cfg.spatial_factor, objects=True)
    assert held_latents.shape[0] == held_masks.shape[0] == 2 * len(clips) + 1
    torch.testing.assert_close(held_latents, read_latents, rtol=0, atol=0)
    assert torch.equal(held_masks, read_masks) and not torch.equal(held_latents[0], held_latents[1])
    assert parallel.gather(picks, vae.cfg.spatial_factor)[1] is None


@pytest.mark.timeout(120)
def test_a_pool_from_another_encoder_is_refused_until_rebuilt(tmp_path):
    path = tmp_path / "pool.zarr"
    build_pool(tiny_vae(0), path, 1, sizes=SIZES, seed=0, log=lambda line: None)
    other = tiny_vae(1)
    with pytest.raises(PoolMismatch, match="was encoded by VAE encoder .* rebuild"):
        LatentPool.open(path, other)
    with pytest.raises(PoolMismatch, match="--rebuild"):
        build_pool(other, path, 1, sizes=SIZES, seed=0, log=lambda line: None)
    with pytest.raises(FileNotFoundError, match="no latent pool"):
        LatentPool.open(tmp_path / "missing.zarr")
    assert len(build_pool(other, path, 1, sizes=SIZES, seed=0, rebuild=True, log=lambda line: None)) == 1
    assert len(LatentPool.open(path, other)) == 1


@pytest.mark.timeout(300)
def test_the_dit_trains_on_pool_windows(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--run", str(run), "--log-every", "1", "--warmup", "1"]
    assert main(["vae", *common, "--steps", "1", "--batch", "1"]) == 0
    assert main(["text", *common, "--steps", "1", "--batch", "2"]) == 0
    assert main(["latents", *common, "--clips", "2"]) == 0
    assert (run / "latents.zarr" / "clip-00001").is_dir()
    capsys.readouterr()
    assert main(["dit", *common, "--steps", "2", "--batch", "2", "--object-weight", "4", "--latents"]) == 0
    out = capsys.readouterr().out
    assert "windows from 2 pool clips" in out and "step 2/2" in out
    # Held as tensors (as on a GPU), the pool feeds the same steps.
    opened = LatentPool.open.__func__

    def preloaded(cls, path, vae=None):
        pool = opened(cls, path, vae)
        pool.preload("cpu")
        return pool
    monkeypatch.setattr(LatentPool, "open", classmethod(preloaded))
    assert main(["dit", *common, "--steps", "3", "--batch", "2", "--object-weight", "4", "--latents"]) == 0
    assert "step 3/3" in capsys.readouterr().out
    # At batch 1 a step's one window is a fresh image half the time: such steps take no pool frames.
    assert main(["dit", *common, "--steps", "9", "--batch", "1", "--object-weight", "4", "--latents"]) == 0
    assert "step 9/9" in capsys.readouterr().out
    monkeypatch.undo()
    # A VAE trained further has another latent space: its DiT refuses the old pool.
    assert main(["vae", *common, "--steps", "2", "--batch", "1"]) == 0
    with pytest.raises(PoolMismatch):
        main(["dit", *common, "--steps", "3", "--batch", "2", "--latents"])


@pytest.mark.timeout(300)
def test_a_pool_of_stills_holds_each_worlds_first_frame_and_the_dit_trains_on_them_as_images(tmp_path, capsys,
                                                                                             monkeypatch):
    vae = tiny_vae(0)
    path = tmp_path / "stills.zarr"
    pool = build_pool(vae, path, 3, sizes=SIZES, seed=2, stills=True, log=lambda line: None)
    assert pool.stills and len(pool) == 3
    for index in range(3):
        clip = clip_spec(index, 2, SIZES, stills=True)
        assert clip.num_latents == 1 and clip.fps == 24
        name, attrs = next((n, a) for n, a in pool.clips[(clip.width, clip.height)] if a["world_seed"] == clip.world_seed)
        expected = encode_groups(vae, sample_world(clip.world_seed), [0], 24, clip.width, clip.height)
        torch.testing.assert_close(torch.from_numpy(pool.latents(name)).float(), expected, rtol=1e-2, atol=1e-2)
    # A pool is of one kind: building clips on a pool of stills (or the other way round) is refused.
    with pytest.raises(PoolMismatch, match="of stills .* of clips: pass --rebuild"):
        build_pool(vae, path, 3, sizes=SIZES, seed=2, log=lambda line: None)
    assert not build_pool(vae, tmp_path / "clips.zarr", 1, sizes=SIZES, seed=2, log=lambda line: None).stills

    run = tmp_path / "run"
    common = ["--preset", "tiny", "--run", str(run), "--log-every", "1", "--warmup", "1"]
    assert main(["vae", *common, "--steps", "1", "--batch", "1"]) == 0
    assert main(["text", *common, "--steps", "1", "--batch", "2"]) == 0
    assert main(["latents", *common, "--stills", "--clips", "4"]) == 0
    assert LatentPool.open(run / "stills.zarr").stills
    with pytest.raises(ValueError, match="--stills: builds a pool"):
        main(["dit", *common, "--stills"])
    # Every window of a step is one pooled still: no fresh world is drawn beside them, as it is beside clips.
    from model.train import DiTTrainer
    drawn = []
    original = DiTTrainer.draw

    def recording(self):
        batch = original(self)
        drawn.append(batch)
        return batch
    monkeypatch.setattr(DiTTrainer, "draw", recording)
    capsys.readouterr()
    assert main(["dit", *common, "--steps", "8", "--batch", "1", "--latents", str(run / "stills.zarr")]) == 0
    assert "windows from 4 pool stills" in capsys.readouterr().out
    assert len(drawn) == 8
    assert all(len(w.times) == 1 and not w.observed and w.latents is not None for b in drawn for w in b.windows)
    assert all(not b.pixels for b in drawn)
