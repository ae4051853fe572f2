"""Generator facade: checkpoints, identity, presets and parameter counts, bad input."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch

from model import CheckpointError, Generator, Window, get_preset, preset_names
from model.dit import VideoDiT
from model.flow import time_schedule
from model.generator import CONFIG_FILE, WEIGHTS_FILE
from model.text import register_configs
from model_test_helpers import latents, tiny_generator

WINDOW = Window(observed_times=(0, 4), latent_times=(2, 6), height=8, width=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    gen = tiny_generator(seed=3)
    path = gen.save(tmp_path_factory.mktemp("ckpt") / "tiny")
    return gen, path


def test_save_load_round_trip(saved):
    gen, path = saved
    loaded = Generator.load(path, device="cpu")
    assert loaded.identity == gen.identity
    assert loaded.config == gen.config
    observed = latents(2, gen.latent_channels, 8, 8, seed=1)
    kw = dict(seed=7, steps=2, guidance=4.0)
    assert torch.equal(loaded.sample(WINDOW, observed, "a harbour", **kw), gen.sample(WINDOW, observed, "a harbour", **kw))
    z = latents(3, gen.latent_channels, 4, 4, seed=2)
    assert torch.equal(loaded.decode(z), gen.decode(z))
    assert torch.equal(loaded.encode_text(["a harbour"]).tokens, gen.encode_text(["a harbour"]).tokens)


def test_identity_is_json_and_names_preset_and_content_hash(saved, tmp_path):
    gen, path = saved
    identity = gen.identity
    assert json.loads(json.dumps(identity)) == identity
    assert identity["preset"] == "tiny"
    assert identity["checkpoint_hash"].startswith("sha256:") and len(identity["checkpoint_hash"]) == 7 + 64
    # Same weights saved again, same hash; other weights, another hash.
    assert Generator.load(gen.save(tmp_path / "again")).identity == identity
    other = tiny_generator(seed=4).save(tmp_path / "other")
    assert Generator.load(other).identity["checkpoint_hash"] != identity["checkpoint_hash"]
    # Same weights with a configuration that samples differently: another model, another hash.
    prior = Path(shutil.copytree(path, tmp_path / "prior"))
    config = json.loads((prior / "config.json").read_text())
    config["model"]["flow"]["noise_correlation"] = 0.5
    (prior / "config.json").write_text(json.dumps(config))
    assert Generator.load(prior).identity["checkpoint_hash"] != identity["checkpoint_hash"]


def test_render_defaults_travel_with_the_checkpoint_and_into_its_identity(saved, tmp_path):
    from model.generator import checkpoint_sampling

    gen, path = saved
    assert gen.sampling == {} and checkpoint_sampling(path) == {} and checkpoint_sampling("tiny") == {}
    tuned = Path(shutil.copytree(path, tmp_path / "tuned"))
    config = json.loads((tuned / CONFIG_FILE).read_text())
    config["sampling"] = {"refine": 0.9}
    (tuned / CONFIG_FILE).write_text(json.dumps(config))
    loaded = Generator.load(tuned)
    assert loaded.sampling == {"refine": 0.9} and checkpoint_sampling(str(tuned)) == {"refine": 0.9}
    # Same weights rendering with another default: another model to a job store.
    assert loaded.identity["checkpoint_hash"] != gen.identity["checkpoint_hash"]
    again = loaded.save(tmp_path / "again")
    assert json.loads((again / CONFIG_FILE).read_text())["sampling"] == {"refine": 0.9}
    assert Generator.load(again).identity == loaded.identity

    for bad, message in (({"refine": "high"}, r"sampling\.refine: must be a number, got 'high'"),
                         ([0.9], r"sampling: must map setting names to numbers, got list")):
        config["sampling"] = bad
        (tuned / CONFIG_FILE).write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            Generator.load(tuned)
        with pytest.raises(CheckpointError, match=message):
            checkpoint_sampling(tuned)


def test_presets_build_deterministically_from_the_seed():
    a, b, c = (Generator.from_preset("tiny", seed=s).identity for s in (0, 0, 1))
    assert a == b and a != c


def test_facts_the_orchestrator_reads(tiny_gen):
    assert tiny_gen.latent_channels == 4
    assert tiny_gen.max_window == 8
    assert tiny_gen.engine == "eager"
    assert tiny_gen.device == torch.device("cpu") and tiny_gen.dtype == torch.float32
    assert tiny_gen.num_latent_frames(1) == 1 and tiny_gen.num_latent_frames(61) == 16
    with pytest.raises(ValueError, match="num_frames: must be at least 1, got 0"):
        tiny_gen.num_latent_frames(0)


def test_unknown_preset_names_are_rejected():
    assert preset_names() == ["tiny", "demo", "base"]
    with pytest.raises(ValueError, match=r"preset: unknown preset 'huge'; allowed: tiny, demo, base"):
        Generator.from_preset("huge")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_missing_directory_and_files(saved, tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        Generator.load(tmp_path / "nowhere")
    _, path = saved
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        partial = tmp_path / f"without-{name}"
        partial.mkdir()
        keep = WEIGHTS_FILE if name == CONFIG_FILE else CONFIG_FILE
        (partial / keep).write_bytes((path / keep).read_bytes())
        with pytest.raises(CheckpointError, match=rf"missing file '{name}'") as info:
            Generator.load(partial)
        assert isinstance(info.value, ValueError) and str(partial) in str(info.value)


def copy_checkpoint(src, dst):
    dst.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_truncated_weights_are_reported_as_corrupt(saved, tmp_path):
    _, path = saved
    bad = copy_checkpoint(path, tmp_path / "truncated")
    data = (bad / WEIGHTS_FILE).read_bytes()
    (bad / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt or truncated"):
        Generator.load(bad)


def test_invalid_config_is_reported(saved, tmp_path):
    _, path = saved
    bad = copy_checkpoint(path, tmp_path / "garbled")
    (bad / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not a valid model config"):
        Generator.load(bad)
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["model"]["dit"]["depht"] = 3
    (bad / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"not a valid model config \(config.dit: unknown key\(s\) \['depht'\]"):
        Generator.load(bad)


def test_weights_of_another_shape_are_rejected(saved, tmp_path):
    _, path = saved
    bad = copy_checkpoint(path, tmp_path / "wider")
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["model"]["dit"]["hidden"] = 32
    (bad / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor 'dit\.[\w.]+' has shape \(\d+(, \d+)*,?\), expected"):
        Generator.load(bad)
    meta["model"]["dit"]["hidden"] = 16
    meta["model"]["dit"]["depth"] = 3
    (bad / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"weights do not match preset 'tiny': missing \['dit.ada.2"):
        Generator.load(bad)


def test_bad_windows_and_observed_shapes_are_rejected(tiny_gen):
    observed = latents(2, 4, 8, 8, seed=0)
    kw = dict(seed=0, steps=1, guidance=1.0)
    with pytest.raises(ValueError, match=r"observed: expected latents of shape \(2, 4, 8, 8\) for this window, "
                                         r"got \(2, 4, 8, 6\)"):
        tiny_gen.sample(WINDOW, observed[..., :6], "x", **kw)
    with pytest.raises(ValueError, match=r"observed: expected .* got \(1, 4, 8, 8\)"):
        tiny_gen.sample(WINDOW, observed[:1], "x", **kw)
    with pytest.raises(ValueError, match=r"observed: expected .* got None"):
        tiny_gen.sample(WINDOW, None, "x", **kw)
    big = Window(tuple(range(5)), tuple(range(5, 9)), 8, 8)
    with pytest.raises(ValueError, match=r"window: 9 frames \(5 observed \+ 4 latent\) exceed the maximum "
                                         r"window of 8 for preset 'tiny'"):
        tiny_gen.sample(big, latents(5, 4, 8, 8, seed=0), "x", **kw)
    with pytest.raises(ValueError, match=r"latent size 7x8 must be even"):
        tiny_gen.sample(Window((), (0,), 7, 8), None, "x", **kw)
    with pytest.raises(ValueError, match=r"frames \[2\] are both observed and latent"):
        Window((0, 2), (2, 3), 8, 8)
    with pytest.raises(ValueError, match="steps: must be at least 1, got 0"):
        tiny_gen.sample(Window((), (0,), 8, 8), None, "x", seed=0, steps=0, guidance=1.0)
    with pytest.raises(ValueError, match="sampler: unknown sampler 'rk4'"):
        tiny_gen.sample(Window((), (0,), 8, 8), None, "x", seed=0, steps=1, guidance=1.0, sampler="rk4")


def test_sampling_from_a_start_keeps_it_at_a_low_level_and_checks_it(tiny_gen):
    window = Window(observed_times=(0,), latent_times=(3, 1, 2), height=8, width=8)
    observed, start = latents(1, 4, 8, 8, seed=1), latents(3, 4, 8, 8, seed=2) * 3
    kw = dict(seed=5, steps=4, guidance=1.0)
    near = tiny_gen.sample(window, observed, "x", start=start, start_level=0.01, **kw)
    far = tiny_gen.sample(window, observed, "x", start=start, start_level=0.9, **kw)
    fresh = tiny_gen.sample(window, observed, "x", **kw)
    # returned in the caller's order of latent_times, like the start: a low level barely moves it
    distance = lambda a: float((a - start).pow(2).mean())  # noqa: E731
    assert distance(near) < 0.01 * distance(fresh) and distance(near) < distance(far)
    again = tiny_gen.sample(window, observed, "x", start=start, start_level=0.9, **kw)
    assert torch.equal(far, again)
    with pytest.raises(ValueError, match=r"start: expected \(3, 4, 8, 8\), got \(2, 4, 8, 8\)"):
        tiny_gen.sample(window, observed, "x", start=start[:2], start_level=0.5, **kw)
    with pytest.raises(ValueError, match="start_level: 0 must be in"):
        tiny_gen.sample(window, observed, "x", start=start, start_level=0, **kw)


@pytest.mark.parametrize("video_seed", [None, 11])
def test_a_windows_starting_noise_has_unit_variance_and_a_common_field(tiny_gen, video_seed, monkeypatch):
    """The noise a window starts from, read by a sampler that takes no step: unit variance per element (as in
    training) and the flow's share of it common to every frame, with or without a video seed."""
    import model.generator as generator_module

    monkeypatch.setattr(generator_module, "get_sampler", lambda name: lambda fn, x, times, callback=None: x)
    config = dataclasses.replace(tiny_gen.config, flow=dataclasses.replace(tiny_gen.config.flow,
                                                                           noise_correlation=0.8))
    monkeypatch.setattr(tiny_gen, "config", config)
    window = Window(observed_times=(), latent_times=tuple(range(8)), height=32, width=32)
    noise = tiny_gen.sample(window, None, "x", seed=5, steps=1, guidance=1.0, video_seed=video_seed)
    per_frame = noise.flatten(1).std(dim=1)
    assert (per_frame - 1.0).abs().max() < 0.05, f"every frame as large as the training noise: {per_frame}"
    frames = noise.flatten(1)
    shared = float(torch.corrcoef(frames).triu(1).sum() / (8 * 7 / 2))
    assert abs(shared - 0.8) < 0.08, "the frames share the common field"
    assert torch.equal(noise, tiny_gen.sample(window, None, "x", seed=5, steps=1, guidance=1.0,
                                              video_seed=video_seed))
    other = tiny_gen.sample(window, None, "x", seed=6, steps=1, guidance=1.0, video_seed=video_seed)
    across = float(torch.corrcoef(torch.stack([noise.flatten(), other.flatten()]))[0, 1])
    # Two windows of one video (one video seed) share the field; two unrelated windows do not.
    assert abs(across - (0.8 if video_seed is not None else 0.0)) < 0.05


@pytest.mark.parametrize("use_cache", [True, False])
def test_guidance_floor_guides_only_the_steps_above_it(tiny_gen, use_cache, monkeypatch):
    window = Window(observed_times=(0, 1), latent_times=(2, 3), height=8, width=8)
    observed = latents(2, 4, 8, 8, seed=1)
    kw = dict(seed=7, steps=4, use_cache=use_cache)
    guided = tiny_gen.sample(window, observed, "a red circle", guidance=4.0, **kw)
    unguided = tiny_gen.sample(window, observed, "a red circle", guidance=1.0, **kw)
    assert torch.equal(tiny_gen.sample(window, observed, "a red circle", guidance=4.0, guidance_floor=0.0, **kw),
                       guided)
    # a floor above every level leaves the conditional prediction alone: sampling at guidance 1
    above = tiny_gen.sample(window, observed, "a red circle", guidance=4.0, guidance_floor=1.01, **kw)
    torch.testing.assert_close(above, unguided, rtol=1e-4, atol=1e-4)

    # between: the steps from the levels above the floor take both branches, the others one
    batches = []
    dit_call = tiny_gen._dit_call

    def counting(windows, *args, **kwargs):
        batches.append(len(windows))
        return dit_call(windows, *args, **kwargs)

    monkeypatch.setattr(tiny_gen, "_dit_call", counting)
    times = time_schedule(4, tiny_gen.config.flow.shift)[:-1]
    floor = float(times[1] + times[2]) / 2
    between = tiny_gen.sample(window, observed, "a red circle", guidance=4.0, guidance_floor=floor, **kw)
    assert batches == [2, 2, 1, 1]
    assert not torch.allclose(between, guided, atol=1e-4) and not torch.allclose(between, unguided, atol=1e-4)


def dit_parameters(name: str) -> int:
    """DiT parameters of a preset, counted on the meta device (no memory, no init)."""
    cfg = get_preset(name)
    register_configs()
    clip = open_clip.get_model_config(cfg.text.model_name)
    with torch.device("meta"):
        dit = VideoDiT(cfg.dit, cfg.vae.latent_channels, clip["text_cfg"]["width"], clip["embed_dim"])
    return dit.num_parameters()


def test_parameter_counts():
    counts = tiny_generator().parameter_counts()
    assert set(counts) == {"vae", "text", "dit"} and all(v > 0 for v in counts.values())
    tiny, demo, base = (dit_parameters(n) for n in ("tiny", "demo", "base"))
    assert tiny == counts["dit"]
    assert tiny < 100_000 < demo < 20_000_000
    # base is the GPU-sized throughput configuration.
    assert 100_000_000 <= base <= 300_000_000
