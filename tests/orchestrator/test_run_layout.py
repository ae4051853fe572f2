"""Pure parts of execution: task seeds, frame -> latent mapping, conditioning layout, the job's plan."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.run import (
    conditioning_layout,
    latent_index_of_frame,
    plan_job,
    segment_latents_for,
    task_seed,
)
from orchestrator.spec import JobSpec, SpecError

BASE = {"prompt": "a red circle", "output": "out.mp4", "seconds": 2, "fps": 8}  # 16 frames, 5 latent frames


def spec(**fields):
    return JobSpec.parse(dict(BASE, **fields))


def test_task_seed_is_stable_across_processes_and_distinct_per_task():
    here = task_seed(42, "L1-T003")
    there = subprocess.run([sys.executable, "-c", "from orchestrator.run import task_seed; "
                            "print(task_seed(42, 'L1-T003'))"], capture_output=True, text=True, timeout=60)
    assert int(there.stdout) == here
    assert here != task_seed(42, "L1-T004") and here != task_seed(43, "L1-T003")
    assert 0 <= here < 2**63


def test_latent_index_of_frame():
    # latent 0 <-> frame 0; latent i >= 1 <-> frames 4i-3 .. 4i
    assert [latent_index_of_frame(f) for f in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_segments_are_about_one_and_a_half_seconds():
    assert segment_latents_for(24) == 9  # 36 frames
    assert segment_latents_for(8) == 3
    assert segment_latents_for(1) == 2


def test_images_land_on_the_latent_of_their_frame():
    inputs, given, allocated = conditioning_layout(
        spec(images=[{"path": "a.png", "at": "start"}, {"path": "b.png", "at": 1.0}, {"path": "c.png", "at": "end"}]),
        5, {})
    assert given == (0, 2, 4) and allocated == 5
    assert [(i.kind, i.path, i.latents) for i in inputs] == [
        ("image", "a.png", (0,)), ("image", "b.png", (2,)), ("image", "c.png", (4,))]


def test_two_inputs_on_one_latent_frame_are_refused():
    with pytest.raises(SpecError, match=r"images\[1\].*overlaps images\[0\] at latent frame 2"):
        conditioning_layout(spec(images=[{"path": "a.png", "at": 0.9}, {"path": "b.png", "at": 1.0}]), 5, {})


def test_extend_forward_takes_the_clip_from_the_start():
    inputs, given, _ = conditioning_layout(spec(extend={"clip": "c.mp4"}), 5, {"c.mp4": 9})
    assert given == (0, 1, 2)  # 9 frames = 1 + 4 * 2
    assert inputs[0].frame_start == 0
    # A long clip leaves at least one latent frame to generate.
    _, given, _ = conditioning_layout(spec(extend={"clip": "c.mp4"}), 5, {"c.mp4": 100})
    assert given == (0, 1, 2, 3)


def test_extend_backward_ends_on_the_clips_last_frame():
    inputs, given, _ = conditioning_layout(spec(extend={"clip": "c.mp4", "direction": "backward"}), 5,
                                           {"c.mp4": 8})
    assert given == (3, 4)  # video frames 9..16; frame 16 lies past the 16-frame video and is trimmed
    clip = inputs[0]
    # clip frames 1..7 plus one repeat of its last frame fill video frames 9..16, so clip frame 7 is frame 15
    assert (clip.frame_start, clip.pad_end) == (1, 1)
    first_video_frame = 4 * given[0] - 3
    assert first_video_frame + (8 - 1 - clip.frame_start) == 15


def test_bridge_places_one_clip_at_each_end():
    inputs, given, _ = conditioning_layout(spec(seconds=4, bridge=["a.mp4", "b.mp4"]), 9,
                                           {"a.mp4": 5, "b.mp4": 8})
    assert given == (0, 1, 7, 8)
    assert [i.path for i in inputs] == ["a.mp4", "b.mp4"]
    with pytest.raises(SpecError):
        conditioning_layout(spec(bridge=["a.mp4", "b.mp4"]), 5, {"a.mp4": 40, "b.mp4": 40})


def test_loop_allocates_the_frame_after_the_last():
    inputs, given, allocated = conditioning_layout(spec(loop=True), 5, {})
    assert allocated == 6 and given == (0, 5)
    assert inputs[-1].kind == "loop" and inputs[-1].latents == (0, 5)
    inputs, given, _ = conditioning_layout(spec(loop=True, images=[{"path": "a.png"}]), 5, {})
    assert given == (0, 5) and [i.kind for i in inputs] == ["image", "loop"]


def test_loop_plan_decodes_only_the_video():
    job = spec(seconds=4, loop=True)  # 32 frames, 9 latent frames
    _, given, allocated = conditioning_layout(job, 9, {})
    plan = plan_job(job, allocated, 8, given, decode_context=4)
    assert plan.num_latent_frames == 10 and plan.given == (0, 9)
    generated = sorted(t for task in plan.tasks for t in task.latent if not task.refine)
    refined = sorted({t for task in plan.tasks for t in task.latent if task.refine})
    assert generated == refined == list(range(1, 9))
    covered = [f for s in plan.segments for f in range(s.frame_start, s.frame_stop)]
    assert covered == list(range(32))
    assert max(s.latent_stop for s in plan.segments) == 9
    # the frames next to the loop point see both ends of the video
    last = next(task for task in plan.tasks if 8 in task.latent)
    assert 9 in last.observed or 0 in last.observed
    last_refined = [task for task in plan.tasks if task.refine and 8 in task.latent][-1]
    assert 9 in last_refined.observed


def test_a_store_planned_with_abutting_refinement_blocks_resumes_under_that_plan(tmp_path):
    """Stores made before refinement pass 1 took frames over hold plans of the older layout: resuming one
    must plan it the same way, not refuse it as another job's."""
    from orchestrator.run import _plan_as_stored
    from orchestrator.store import JobStore

    job = spec(seconds=8, store=str(tmp_path / "job.zarr"))  # 64 frames, 17 latent frames
    args = (job, 17, 8, (), 4)
    current, earlier = plan_job(*args), plan_job(*args, refine_layout="abutting")
    assert current.refines and current.to_dict() != earlier.to_dict()
    assert any(t.takes_over for t in current.tasks) and not any(t.takes_over for t in earlier.tasks)
    assert _plan_as_stored(job.store_path, current, *args) is current  # no store yet

    JobStore.create(job.store_path, spec={}, plan=earlier.to_dict(), model={}, latent_shape=(17, 4, 6, 8))
    assert _plan_as_stored(job.store_path, current, *args).to_dict() == earlier.to_dict()
    narrower = (job, 17, 6, (), 4)  # a store of another job is left for opening to refuse
    other = plan_job(*narrower)
    assert _plan_as_stored(job.store_path, other, *narrower) is other
