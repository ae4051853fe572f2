"""The job spec: limits named with field, value and limit; YAML with CLI overrides; bad input exits 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from orchestrator.spec import ExtendInput, ImageInput, JobSpec, SpecError, default_store_path

BASE = {"prompt": "a red circle bouncing on a blue background", "output": "out.mp4"}


def test_defaults_and_derived_values():
    spec = JobSpec.parse(dict(BASE, seconds=60, fps=24))
    assert spec.num_frames == 1440
    assert spec.schedule == "parallel" and spec.codec == "h264" and spec.window is None and spec.model is None
    assert spec.store_path == "out.zarr"
    assert spec.crf == 23
    assert JobSpec.parse(dict(BASE, codec="av1")).crf == 35
    assert "output" not in spec.content_fields() and "store" not in spec.content_fields()
    assert spec.content_fields()["prompt"] == BASE["prompt"]


@pytest.mark.parametrize(
    "field, value, limit",
    [
        ("seconds", 0.5, "1"),
        ("seconds", 5000, "3600"),
        ("fps", 0, "1"),
        ("fps", 61, "60"),
        ("width", 100, "multiple of 16"),
        ("width", 4096, "2048"),
        ("height", 8, "16"),
        ("steps", 0, "1"),
        ("steps", 201, "200"),
        ("guidance", -1, "0"),
        ("guidance_rescale", 1.5, "1"),
        ("infill_guidance", -0.5, "0"),
        ("infill_guidance", 31, "30"),
        ("extension_guidance_floor", -0.1, "0"),
        ("extension_guidance_floor", 1.5, "1"),
        ("refine", -0.1, "0"),
        ("refine", 1.0, "less than 1"),
        ("refine_steps", 0, "1"),
        ("seed", -3, "0"),
        ("window", 1, "2"),
        ("codec", "vp9", "h264"),
        ("sampler", "ddim", "euler"),
        ("schedule", "random", "parallel"),
        ("quality", 60, "51"),
    ],
)
def test_limits_name_field_value_and_limit(field, value, limit):
    with pytest.raises(SpecError) as info:
        JobSpec.parse(dict(BASE, **{field: value}))
    message = str(info.value)
    assert info.value.field == field
    assert f"{field}=" in message and str(value) in message and limit in message
    assert isinstance(info.value, ValueError)


def test_infill_tasks_take_the_infill_guidance():
    from orchestrator.run import sampling_settings
    from orchestrator.spec import INFILL_GUIDANCE

    default = JobSpec.parse(BASE)
    assert default.infill_guidance is None and default.guidance_for_infill == INFILL_GUIDANCE < default.guidance
    assert JobSpec.parse(dict(BASE, guidance=0.5)).guidance_for_infill == 0.5  # never above --guidance
    assert JobSpec.parse(dict(BASE, infill_guidance=3)).guidance_for_infill == 3.0

    job = {"steps": 8, "guidance": 4.0, "infill_guidance": 1.5, "sampler": "euler"}
    assert sampling_settings(job)["guidance"] == 4.0
    assert sampling_settings(job, infill=True)["guidance"] == 1.5
    # A job stored before the setting existed resumes with one guidance for every task, as it started.
    older = {"steps": 8, "guidance": 4.0, "sampler": "euler"}
    assert sampling_settings(older, infill=True)["guidance"] == 4.0


def test_extension_tasks_are_guided_only_above_their_floor():
    from orchestrator.run import sampling_settings
    from orchestrator.spec import EXTENSION_GUIDANCE_FLOOR

    default = JobSpec.parse(BASE)
    assert default.extension_guidance_floor is None
    assert default.guidance_floor_for_extension == EXTENSION_GUIDANCE_FLOOR
    assert JobSpec.parse(dict(BASE, extension_guidance_floor=0)).guidance_floor_for_extension == 0.0

    job = {"steps": 8, "guidance": 4.0, "infill_guidance": 1.5, "sampler": "euler", "extension_guidance_floor": 0.9,
           "refine_level": 0.6, "refine_steps": 5}
    extending = sampling_settings(job, extension=True)
    assert (extending["guidance"], extending["guidance_floor"]) == (4.0, 0.9)
    # keyframes (nothing observed), infill and refinement tasks are guided at every step of theirs
    for kind in ({}, {"infill": True, "extension": True}, {"refine": True, "extension": True}):
        assert "guidance_floor" not in sampling_settings(job, **kind), kind
    # A job stored before the setting existed keeps guiding every step of its extension tasks.
    older = {"steps": 8, "guidance": 4.0, "sampler": "euler"}
    assert sampling_settings(older, extension=True)["guidance_floor"] == 0.0


def test_refinement_level_and_steps():
    from orchestrator.run import sampling_settings
    from orchestrator.spec import REFINE_LEVEL

    default = JobSpec.parse(dict(BASE, steps=8))
    assert default.refine is None and default.refine_level == REFINE_LEVEL
    assert default.steps_for_refine == 5  # 0.75 of 8 steps, rounded up, is 6: capped at 5
    off = JobSpec.parse(dict(BASE, refine=0))
    assert off.refine_level == 0 and off.steps_for_refine == 1
    assert JobSpec.parse(dict(BASE, steps=4, refine=0.25)).steps_for_refine == 1
    assert JobSpec.parse(dict(BASE, steps=20)).steps_for_refine == 5  # 12 by the share, capped
    assert JobSpec.parse(dict(BASE, steps=20, refine_steps=3)).steps_for_refine == 3

    job = {"steps": 8, "guidance": 4.0, "infill_guidance": 1.5, "sampler": "euler", "refine_level": 0.6,
           "refine_steps": 5}
    refining = sampling_settings(job, refine=True)
    assert (refining["guidance"], refining["steps"], refining["start_level"]) == (1.5, 5, 0.6)
    assert "start_level" not in sampling_settings(job, infill=True)


def test_a_model_default_fills_only_what_the_job_leaves_unset():
    from orchestrator.spec import REFINE_LEVEL

    default = JobSpec.parse(dict(BASE, steps=8))
    tuned = default.with_model_defaults({"refine": 0.9, "refine_steps": 3})
    assert (tuned.refine_level, tuned.steps_for_refine) == (0.9, 3)
    assert default.refine_level == REFINE_LEVEL and default.with_model_defaults({}) is default
    # What the job sets wins, 0 (no refinement) included.
    assert JobSpec.parse(dict(BASE, refine=0)).with_model_defaults({"refine": 0.9}).refine_level == 0
    assert JobSpec.parse(dict(BASE, refine=0.5)).with_model_defaults({"refine": 0.9}).refine_level == 0.5
    with pytest.raises(SpecError, match=r"sampling\.steps=3: a model may set only infill_guidance, "
                                        r"extension_guidance_floor, refine, refine_steps"):
        default.with_model_defaults({"steps": 3})
    with pytest.raises(SpecError, match=r"sampling\.refine=1\.5: not a valid default for this setting "
                                        r"\(input should be less than 1\)"):
        default.with_model_defaults({"refine": 1.5})


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpecError) as info:
        JobSpec.parse({"output": "o.mp4", "fps": 100, "secs": 3})
    fields = [problem[0] for problem in info.value.problems]
    assert set(fields) == {"prompt", "fps", "secs"}
    assert "prompt: is required" in str(info.value) and "secs: is not a known field" in str(info.value)


def test_quality_range_depends_on_codec():
    assert JobSpec.parse(dict(BASE, codec="av1", quality=60)).crf == 60
    with pytest.raises(SpecError, match=r"quality=64: CRF for av1 must be in 0\.\.63"):
        JobSpec.parse(dict(BASE, codec="av1", quality=64))


def test_conditioning_inputs():
    spec = JobSpec.parse(dict(BASE, seconds=4, images=[{"path": "a.png", "at": 2.5}, {"path": "b.png", "at": "end"}]))
    assert spec.images[0].at == 2.5 and spec.images[1].at == "end"
    with pytest.raises(SpecError, match=r"images\[0\]\.at=9\.0: must be within the video"):
        JobSpec.parse(dict(BASE, seconds=4, images=[{"path": "a.png", "at": 9}]))
    with pytest.raises(SpecError, match="cannot be combined with bridge"):
        JobSpec.parse(dict(BASE, extend={"clip": "a.mp4"}, bridge=["a.mp4", "b.mp4"]))
    with pytest.raises(SpecError, match="loop"):
        JobSpec.parse(dict(BASE, loop=True, extend={"clip": "a.mp4", "direction": "backward"}))
    assert JobSpec.parse(dict(BASE, extend={"clip": "a.mp4"})).extend == ExtendInput(clip="a.mp4")


@pytest.mark.parametrize(
    "text, path, at",
    [("cat.png", "cat.png", "start"), ("cat.png@end", "cat.png", "end"), ("cat.png@start", "cat.png", "start"),
     ("cat.png@2.5", "cat.png", 2.5), ("me@home.png", "me@home.png", "start"), ("me@home.png@3", "me@home.png", 3.0)],
)
def test_image_flag_syntax(text, path, at):
    image = ImageInput.parse(text)
    assert (image.path, image.at) == (path, at)


def test_yaml_with_cli_overrides(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("prompt: a slow sunrise\nseconds: 30\nfps: 12\nwidth: 320\nheight: 176\noutput: sunrise.mp4\n"
                   "images:\n  - {path: first.png, at: start}\n")
    spec = JobSpec.load(job, {"seconds": 10, "fps": None, "seed": 7})
    assert (spec.prompt, spec.seconds, spec.fps, spec.seed, spec.width) == ("a slow sunrise", 10, 12, 7, 320)
    assert spec.images[0].path == "first.png"

    job.write_text("prompt: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        JobSpec.load(job)
    job.write_text("- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        JobSpec.load(job)
    with pytest.raises(SpecError, match="cannot read"):
        JobSpec.load(tmp_path / "missing.yaml")


def test_default_store_path():
    assert default_store_path("out.mp4") == "out.zarr"
    assert default_store_path("/renders/day1/take.final.mp4") == "/renders/day1/take.final.zarr"
    assert default_store_path("s3://bucket/jobs/out.mp4") == "s3://bucket/jobs/out.zarr"


def test_cli_bad_input_exits_2_with_one_line_and_does_no_work(tmp_path):
    out = tmp_path / "out.mp4"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "render", "a red circle", "--seconds", "5000", "-o", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "seconds=5000" in lines[0] and "3600" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "out.zarr").exists()


def test_cli_usage_errors_exit_2():
    from orchestrator.cli import main

    assert main(["render", "x", "--seconds", "ten", "-o", "o.mp4"]) == 2
    assert main(["render", "x", "-o", "o.mp4", "--backward"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["render", "--width", "33", "-o", "o.mp4", "x"]) == 2
