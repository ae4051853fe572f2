"""Specs shared by the render and fault tests."""

from __future__ import annotations

# Tiny renders: the `tiny` preset with random weights, a few seconds at 8 fps, 64x48.
TINY = {"prompt": "a red circle bouncing on a blue background", "seconds": 2, "fps": 8, "width": 64,
        "height": 48, "steps": 2, "model": "tiny", "seed": 3}
# Long enough per task (many sampler steps) that a kill lands in the middle of generation.
FAULT = dict(TINY, seconds=8, steps=120, seed=11)


def tiny_spec(tmp_path, name="out", **fields):
    from orchestrator.spec import JobSpec

    data = dict(TINY, output=str(tmp_path / f"{name}.mp4"))
    data.update(fields)
    return JobSpec.parse(data)
