"""A decoder that reads the prompt (``VAEConfig.caption_width``): it draws from the caption as well as the
latents, stays causal, decodes in chunks as in one go, and trains on circled worlds."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.config import get_preset
from model.generator import Generator, VideoModel
from model.train import all_circles, main
from model.world import caption, render_frames, sample_world
from model_test_helpers import latents, randomize_

PROMPT = "a red square bouncing on a blue background"
OTHER = "a green triangle orbiting on a grey background"


def caption_config(frame_blocks: int = 0):
    tiny = get_preset("tiny")
    return tiny.replace(vae=dataclasses.replace(tiny.vae, caption_width=32, caption_heads=2,
                                                frame_blocks=frame_blocks))


@pytest.fixture(scope="module", params=[0, 1], ids=["latent-rate", "frame-rate"])
def caption_gen(request):
    torch.manual_seed(0)
    gen = Generator(VideoModel(caption_config(request.param)), device="cpu")
    randomize_(gen.model.vae.decoder, seed=7, std=0.1)
    randomize_(gen.model.vae.decoder.caption, seed=8, std=0.4)  # its output projection opens too
    return gen


def test_the_decoder_draws_from_the_prompt(caption_gen):
    z = latents(3, caption_gen.latent_channels, 4, 4, seed=1)
    assert caption_gen.reads_prompt
    red, green = caption_gen.decode_float(z, prompt=PROMPT), caption_gen.decode_float(z, prompt=OTHER)
    assert red.shape == (9, 32, 32, 3)
    assert (red - green).abs().amax() > 1.0
    torch.testing.assert_close(caption_gen.decode_float(z, prompt=PROMPT), red, rtol=0, atol=0)
    # No prompt decodes as the empty prompt, which training shows the decoder 10% of the time.
    torch.testing.assert_close(caption_gen.decode_float(z), caption_gen.decode_float(z, prompt=""), rtol=0, atol=0)


def test_reading_the_prompt_keeps_decoding_causal_and_chunked_decodes_exact(caption_gen):
    z = latents(8, caption_gen.latent_channels, 4, 4, seed=2)
    changed = z.clone()
    changed[5:] += 2.0
    before, after = (caption_gen.decode_float(x, prompt=PROMPT) for x in (z, changed))
    torch.testing.assert_close(before[:17], after[:17], rtol=0, atol=1e-4)  # latent 5 starts at frame 17
    ctx = caption_gen.decode_context
    part = caption_gen.decode_float(z[6:8], context=z[6 - ctx:6], prompt=PROMPT)
    torch.testing.assert_close(part, before[21:29], rtol=0, atol=1e-3)


def test_a_fresh_caption_attention_decodes_as_the_decoder_without_it():
    """Its output projection starts at zero: a decoder warm-started from one without captions is unchanged."""
    torch.manual_seed(0)
    plain = Generator(VideoModel(get_preset("tiny")), device="cpu")
    randomize_(plain.model.vae, seed=3, std=0.1)
    reading = Generator(VideoModel(caption_config()), device="cpu")
    missing, unexpected = reading.model.vae.load_state_dict(plain.model.vae.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.caption.") for k in missing)
    z = latents(3, plain.latent_channels, 4, 4, seed=4)
    torch.testing.assert_close(reading.decode_float(z, prompt=PROMPT), plain.decode_float(z), rtol=0, atol=1e-5)
    assert not plain.reads_prompt
    torch.testing.assert_close(plain.decode_float(z, prompt=PROMPT), plain.decode_float(z), rtol=0, atol=0)


def test_the_caption_width_must_be_the_text_encoders():
    tiny = get_preset("tiny")
    with pytest.raises(ValueError, match=r"vae.caption_width: 48 must equal the text encoder's token width \(32\)"):
        VideoModel(tiny.replace(vae=dataclasses.replace(tiny.vae, caption_width=48, caption_heads=2)))
    with pytest.raises(ValueError, match=r"vae.caption_heads: 3 must be positive and divide"):
        dataclasses.replace(tiny.vae, caption_width=32, caption_heads=3)


def test_a_circled_world_differs_only_in_its_shapes():
    spec = sample_world(next(s for s in range(100) if any(o.shape != "circle" for o in sample_world(s).objects)))
    circled = all_circles(spec)
    assert {o.shape for o in circled.objects} == {"circle"}
    assert [dataclasses.replace(o, shape="circle") for o in spec.objects] == list(circled.objects)
    assert circled.background == spec.background and caption(circled) != caption(spec)
    a, b = (render_frames(s, range(1), fps=24, width=64, height=64) for s in (spec, circled))
    assert (a != b).any()


@pytest.mark.timeout(300)
def test_decoder_training_on_circled_worlds_changes_the_decoder_alone(tmp_path):
    """`--circled 1`: every batch decodes the latents of its clips drawn with circles, to the clips themselves;
    only the decoder (its caption attention included) changes, and the run records the share."""
    source, run = tmp_path / "source", tmp_path / "reading"
    common = ["--preset", "tiny", "--seed", "0", "--save-every", "1", "--warmup", "1", "--batch", "1"]
    assert main(["vae", *common, "--run", str(source), "--steps", "1"]) == 0
    assert main(["text", *common, "--run", str(source), "--steps", "1", "--batch", "4"]) == 0
    with pytest.raises(ValueError, match="--circled: needs --decoder-only and a decoder that reads the prompt"):
        main(["vae", *common, "--run", str(source), "--steps", "2", "--decoder-only", "--circled", "1"])
    run.mkdir()
    recorded = json.loads((source / "model.json").read_text())
    recorded["vae"].update(caption_width=32, caption_heads=2)
    (run / "model.json").write_text(json.dumps(recorded))
    (run / "text").mkdir()
    for name in ("text.safetensors", "text.json"):
        (run / "text" / name).write_bytes((source / "text" / name).read_bytes())
    with pytest.raises(ValueError, match=r"--circled: 1.5 must be a share"):
        main(["vae", *common, "--run", str(run), "--steps", "2", "--decoder-only", "--init-from", str(source),
              "--circled", "1.5"])
    assert main(["vae", *common, "--run", str(run), "--steps", "2", "--decoder-only", "--init-from", str(source),
                 "--circled", "1", "--lr", "1e-2", "--object-weight", "2"]) == 0
    before, after = (load_file(str(r / "vae" / "vae.safetensors")) for r in (source, run))
    for key in before:
        if key.startswith("encoder."):
            assert torch.equal(after[key], before[key]), key
    assert any(k.startswith("decoder.caption.out") and after[k].abs().max() > 0 for k in after)
    meta = json.loads((run / "vae" / "vae.json").read_text())
    assert meta["circled"] == 1.0 and meta["latent_scale"] == json.loads(
        (source / "vae" / "vae.json").read_text())["latent_scale"]
    logged = json.loads((run / "vae" / "log.jsonl").read_text().splitlines()[-1])
    assert logged["objects_circled"] >= 0 and np.isfinite(logged["objects_circled"])
