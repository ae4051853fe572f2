"""End-to-end renders on an embedded cluster of real worker processes (tiny preset, short videos)."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import numpy as np
import pytest
import xarray as xr

from render_helpers import tiny_spec
from orchestrator import media
from orchestrator.plan import Plan, fills_gap
from orchestrator.run import RenderError, job_status, render, resume
from orchestrator.store import JobStore, StoreMismatch

pytestmark = pytest.mark.timeout(300)


def latents_of(store_path):
    return np.asarray(JobStore.open(store_path, read_only=True).latents[:])


def floor_of(spec, task):
    """The guidance floor a task's marker records: extension tasks' (observed frames on one side only)."""
    extension = task["observed"] and not task.get("refine") and not fills_gap(task["observed"], task["latent"])
    return spec.guidance_floor_for_extension if extension else None


def test_render_end_to_end_then_nothing_to_redo(render_cluster, tmp_path):
    spec = tiny_spec(tmp_path)
    events = []
    result = render(spec, scheduler=render_cluster.scheduler_address, engine="eager", progress=events.append)

    info = media.probe(spec.output)
    assert info["frames"] == spec.num_frames == 16 and info["fps"] == pytest.approx(8)
    assert (info["width"], info["height"]) == (64, 48)
    assert info["metadata"].get("title") == spec.prompt
    comment = json.loads(info["metadata"]["comment"])
    assert comment["seed"] == spec.seed and comment["model"]["preset"] == "tiny"
    frames = media.read_frames(spec.output, 64, 48)
    assert frames.shape == (16, 48, 64, 3)

    assert result.frames == 16 and result.store == str(tmp_path / "out.zarr") and result.tasks_skipped == 0
    assert result.tasks_run >= 1 and result.segments_run >= 2
    assert {"generate_busy_seconds", "decode_busy_seconds", "mux_busy_seconds", "overhead_seconds",
            "startup_seconds"} <= set(result.timings)

    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("task") == events[0]["tasks_total"] + \
        len(JobStore.open(result.store).plan["segments"]) + 1
    task_events = [e for e in events if e["event"] == "task"]
    assert [e["done"] for e in task_events] == list(range(1, len(task_events) + 1))
    assert {e["kind"] for e in task_events} == {"generate", "decode", "mux"}
    plan = JobStore.open(result.store).plan
    assert any(task.get("refine") for task in plan["tasks"])  # the default spec refines
    # 5 latent frames drafted, then each sampled once more by the refinement pass
    assert task_events[-1]["frames_done"] == 16 and task_events[-1]["latent_frames_done"] == 10
    json.dumps(events)  # every event is JSON-able, as `--json` prints them

    status = job_status(result.store)
    assert status["state"] == "completed" and status["tasks_done"] == status["tasks"]
    assert status["segments_done"] == status["segments"] and status["runs"][-1]["state"] == "completed"
    ds = xr.open_zarr(result.store, consolidated=False)
    assert ds["latents"].shape == (5, 4, 6, 8) and not np.isnan(ds["latents"].values).any()
    store = JobStore.open(result.store)
    for task in store.plan["tasks"]:
        infill = task.get("refine") or fills_gap(task["observed"], task["latent"])
        expected = spec.guidance_for_infill if infill else spec.guidance
        assert store.task_marker(task["task_id"])["guidance"] == expected, task["task_id"]

        assert store.task_marker(task["task_id"]).get("guidance_floor") == floor_of(spec, task), task["task_id"]

    # Rendering the same spec again finds everything done in the store and submits nothing.
    digest = JobStore.open(result.store).output_record()["sha256"]
    again = render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    assert (again.tasks_run, again.segments_run) == (0, 0)
    assert again.tasks_skipped == result.tasks_run
    assert JobStore.open(result.store).output_record()["sha256"] == digest


def test_a_store_of_another_job_is_refused_unless_forced(render_cluster, tmp_path):
    spec = tiny_spec(tmp_path, seconds=1)
    render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    changed = tiny_spec(tmp_path, seconds=1, prompt="a blue square")
    with pytest.raises(StoreMismatch, match="prompt"):
        render(changed, scheduler=render_cluster.scheduler_address, engine="eager")
    result = render(changed, scheduler=render_cluster.scheduler_address, engine="eager", force=True)
    assert result.tasks_skipped == 0
    assert JobStore.open(result.store).spec["prompt"] == "a blue square"


def test_deepspeed_engine_or_loud_fallback(render_cluster, tmp_path):
    result = render(tiny_spec(tmp_path, seconds=1), scheduler=render_cluster.scheduler_address)
    expected = "deepspeed" if importlib.util.find_spec("deepspeed") else "eager"
    assert result.engine == expected
    run = JobStore.open(result.store).runs()[-1]
    assert run["engine"] == [expected]


def write_image(path, colour):
    from PIL import Image

    Image.fromarray(np.full((48, 64, 3), colour, np.uint8)).save(path)


def write_clip(path, frames):
    media.encode_segment(frames, path, fps=8, codec="h264", quality=10)


def encoded(frames):
    """What the workers' Generator writes for these frames (same preset, same fixed init seed)."""
    from model import Generator

    return Generator.from_preset("tiny", device="cpu").encode(frames).numpy().astype(np.float16)


def assert_same_latents(actual, expected):
    """Equal up to float16 rounding: the worker encodes with one torch thread, the test with several, and
    fp32 sums in another order can round to the neighbouring float16."""
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_image_at_start_and_end_and_a_loop(render_cluster, tmp_path):
    start_png, end_png = tmp_path / "start.png", tmp_path / "end.png"
    write_image(start_png, (200, 30, 30))
    write_image(end_png, (30, 30, 200))
    spec = tiny_spec(tmp_path, images=[{"path": str(start_png), "at": "start"}, {"path": str(end_png), "at": "end"}])
    result = render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    store = JobStore.open(result.store)
    assert store.plan["given"] == [0, 4]
    assert store.given_done([0, 4])
    latents = latents_of(result.store)
    assert_same_latents(latents[0], encoded(media.read_frames(start_png, 64, 48))[0])
    assert_same_latents(latents[4], encoded(media.read_frames(end_png, 64, 48))[0])
    generated = sorted(t for task in store.plan["tasks"] for t in task["latent"] if not task.get("refine"))
    refined = sorted(t for task in store.plan["tasks"] for t in task["latent"] if task.get("refine"))
    assert generated == refined == [1, 2, 3]  # given frames are neither generated nor refined
    np.testing.assert_array_equal(store.read_video_latents([0, 4], given=[0, 4], refined=True), latents[[0, 4]])
    # Every task fills the gap between the given frames or refines, so each sampled at the infill guidance,
    # which its marker records.
    assert all(fills_gap(task["observed"], task["latent"]) for task in store.plan["tasks"] if not task.get("refine"))
    assert {store.task_marker(task["task_id"])["guidance"] for task in store.plan["tasks"]} == \
        {spec.guidance_for_infill} != {spec.guidance}
    assert media.probe(spec.output)["frames"] == 16

    loop = tiny_spec(tmp_path, name="loop", loop=True)
    result = render(loop, scheduler=render_cluster.scheduler_address, engine="eager")
    latents = latents_of(result.store)
    assert latents.shape[0] == 6  # the video's 5 latent frames and the copy of frame 0 that follows them
    np.testing.assert_array_equal(latents[5], latents[0])
    assert media.probe(loop.output)["frames"] == 16


def test_extend_backward_and_bridge(render_cluster, tmp_path):
    rng = np.random.default_rng(0)
    clip_a = tmp_path / "a.mp4"
    clip_b = tmp_path / "b.mp4"
    write_clip(clip_a, rng.integers(0, 255, (5, 48, 64, 3), dtype=np.uint8))
    write_clip(clip_b, rng.integers(0, 255, (8, 48, 64, 3), dtype=np.uint8))

    backward = tiny_spec(tmp_path, name="backward", extend={"clip": str(clip_b), "direction": "backward"})
    result = render(backward, scheduler=render_cluster.scheduler_address, engine="eager")
    store = JobStore.open(result.store)
    assert store.plan["given"] == [3, 4]
    clip = media.read_frames(clip_b, 64, 48, 8)
    padded = np.concatenate([clip, clip[-1:]])[1:]  # frames 1..7 and a repeat of the last: video frames 9..16
    expected = encoded(np.concatenate([padded[:1], padded]))[1:]
    assert_same_latents(latents_of(result.store)[3:5], expected)
    assert media.probe(backward.output)["frames"] == 16

    bridge = tiny_spec(tmp_path, name="bridge", seconds=4, bridge=[str(clip_a), str(clip_b)])
    result = render(bridge, scheduler=render_cluster.scheduler_address, engine="eager")
    store = JobStore.open(result.store)
    assert store.plan["given"] == [0, 1, 7, 8]
    assert_same_latents(latents_of(result.store)[0:2], encoded(media.read_frames(clip_a, 64, 48, 8)))
    assert media.probe(bridge.output)["frames"] == 32


def test_a_write_error_fails_clearly_and_resume_finishes(render_cluster, tmp_path):
    spec = tiny_spec(tmp_path, seconds=4)
    blocked = {}

    def block_a_level_one_chunk(event):
        # At "start" the store exists and nothing has run: put a file where a level-1 chunk directory must go,
        # so writing that latent frame fails with a real OSError on the worker.
        if event["event"] == "start":
            plan = JobStore.open(event["store"]).plan
            task = next(t for t in plan["tasks"] if t["level"] == 1)
            blocked["task"], blocked["latent"] = task["task_id"], task["latent"][0]
            path = os.path.join(event["store"], "latents", "c", str(blocked["latent"]))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                handle.write("in the way")
            blocked["path"] = path

    with pytest.raises(RenderError) as info:
        render(spec, scheduler=render_cluster.scheduler_address, engine="eager", progress=block_a_level_one_chunk)
    message = str(info.value)
    assert blocked["task"] in message and f"latent frames {blocked['latent']}" in message
    assert "longshot resume" in message and spec.store_path in message
    status = job_status(spec.store_path)
    assert status["runs"][-1]["state"] == "failed" and status["runs"][-1]["error"]
    level0 = [t for t in JobStore.open(spec.store_path).plan["tasks"] if t["level"] == 0]
    assert all(JobStore.open(spec.store_path).task_done(t["task_id"], t["latent"]) for t in level0)
    assert not os.path.exists(spec.output)
    # the keyframes, and any refinement whose drafts did not wait on the blocked task, are done and kept
    plan = Plan.from_dict(JobStore.open(spec.store_path).plan)
    done = JobStore.open(spec.store_path).done_tasks(plan.tasks)
    assert {t["task_id"] for t in level0} <= done and blocked["task"] not in done

    os.unlink(blocked["path"])
    result = resume(spec.store_path, scheduler=render_cluster.scheduler_address, engine="eager")
    assert result.tasks_skipped == len(done) and result.tasks_run == len(plan.tasks) - len(done)
    assert media.probe(spec.output)["frames"] == 32
    assert job_status(spec.store_path)["state"] == "completed"


def test_unwritable_output_is_found_before_rendering(render_cluster, tmp_path):
    (tmp_path / "file").write_text("x")
    spec = tiny_spec(tmp_path, output=str(tmp_path / "file" / "out.mp4"), store=str(tmp_path / "s.zarr"))
    from orchestrator.store import PathNotWritable

    with pytest.raises(PathNotWritable, match="output="):
        render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    assert not (tmp_path / "s.zarr").exists()


def test_interrupt_cancels_cleanly_and_resume_finishes(render_cluster, tmp_path):
    from orchestrator.run import RenderCancelled

    spec = tiny_spec(tmp_path, seconds=4)

    def interrupt_after_the_first_task(event):
        # What Ctrl-C does: a KeyboardInterrupt in the client's main thread while the render waits.
        if event["event"] == "task":
            raise KeyboardInterrupt

    with pytest.raises(RenderCancelled, match="longshot resume"):
        render(spec, scheduler=render_cluster.scheduler_address, engine="eager",
               progress=interrupt_after_the_first_task)
    assert job_status(spec.store_path)["runs"][-1]["state"] == "cancelled"
    assert not os.path.exists(spec.output)
    # The cluster is left with nothing of this render queued (a task already running may finish first).
    deadline = time.monotonic() + 30
    while any(render_cluster.client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(render_cluster.client.processing().values())

    result = resume(spec.store_path, scheduler=render_cluster.scheduler_address, engine="eager")
    assert result.tasks_skipped >= 1
    assert media.probe(spec.output)["frames"] == 32


def test_store_given_as_a_file_url(render_cluster, tmp_path):
    url = (tmp_path / "jobs" / "url.zarr").as_uri()
    spec = tiny_spec(tmp_path, seconds=1, store=url)
    result = render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    assert result.store == url
    assert (tmp_path / "jobs" / "url.zarr" / "latents" / "zarr.json").exists()
    assert job_status(url)["state"] == "completed"
    assert media.probe(spec.output)["frames"] == 8


def test_a_store_made_before_refinement_resumes_as_it_was_planned(render_cluster, tmp_path):
    """A store whose spec has no `refine` field was planned without refinement: resuming it must neither
    refuse it as another job's nor plan refinement tasks into it."""
    import zarr

    spec = tiny_spec(tmp_path, refine=0)
    render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    group = zarr.open_group(spec.store_path, mode="r+")
    older = {k: v for k, v in group.attrs["spec"].items() if k != "refine"}
    group.attrs["spec"] = older
    os.unlink(spec.output)
    result = resume(spec.store_path, scheduler=render_cluster.scheduler_address, engine="eager")
    store = JobStore.open(spec.store_path)
    assert not any(task.get("refine") for task in store.plan["tasks"])
    assert result.tasks_run == 0 and result.tasks_skipped == len(store.plan["tasks"])
    assert media.probe(spec.output)["frames"] == spec.num_frames


def test_segments_are_lossless_and_a_store_with_older_segments_finishes_by_stream_copy(render_cluster, tmp_path):
    spec = tiny_spec(tmp_path)
    result = render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    store = JobStore.open(result.store)
    segments = [s["segment_id"] for s in store.plan["segments"]]
    assert len(segments) >= 2 and all(store.segment_marker(s)["lossless"] for s in segments)
    assert media.probe(spec.output)["frames"] == 16

    # A store from before lossless segments: its segments were encoded at the output's quality. Make S0000 such
    # a segment, drop the others and the output; resuming encodes the rest alike and joins them by stream copy.
    first = store.segment_url(segments[0])
    frames = media.read_frames(first, spec.width, spec.height)
    os.unlink(first)
    media.encode_segment(frames, first, fps=spec.fps, codec=spec.codec, quality=spec.quality)
    store.write_segment_marker(segments[0], frames=len(frames))  # as markers were written then: no "lossless"
    for segment in segments[1:]:
        os.unlink(store.segment_url(segment))
    os.unlink(spec.output)
    resumed = resume(spec.store_path, scheduler=render_cluster.scheduler_address, engine="eager")
    assert resumed.segments_skipped == 1 and resumed.segments_run == len(segments) - 1
    assert not any(store.segment_marker(s)["lossless"] for s in segments[1:])
    assert media.probe(spec.output)["frames"] == 16


def test_autoregressive_extension_tasks_are_guided_only_above_their_floor(render_cluster, tmp_path):
    spec = tiny_spec(tmp_path, name="ar", seconds=4, schedule="autoregressive", extension_guidance_floor=0.5)
    result = render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    store = JobStore.open(result.store)
    tasks = store.plan["tasks"]
    floors = {task["task_id"]: store.task_marker(task["task_id"]).get("guidance_floor") for task in tasks}
    assert floors == {task["task_id"]: floor_of(spec, task) for task in tasks}
    assert 0.5 in floors.values() and None in floors.values()  # the first window has nothing observed
    assert media.probe(spec.output)["frames"] == spec.num_frames


def test_refinement_pass_one_takes_over_the_ends_of_pass_zero_blocks(render_cluster, tmp_path):
    spec = tiny_spec(tmp_path, seconds=8)  # 17 latent frames, window 8: pass-0 blocks of 8, pass-1 blocks of 4
    render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    store = JobStore.open(spec.store_path)
    plan = Plan.from_dict(store.plan)
    taking = [t for t in plan.tasks if t.takes_over]
    assert taking and all(t.task_id.startswith("R1-") for t in taking)
    for task in (t for t in plan.tasks if t.handed_over):
        checksums = store.task_marker(task.task_id)["checksums"]
        assert set(checksums) == {str(i) for i in task.latent}
        now = {str(i): store._frame_checksum_or_none(i, "refined") for i in task.latent}
        # pass 1 wrote the frames it took over; the rest are still what pass 0 wrote, so the task stays done
        assert all(now[str(i)] != checksums[str(i)] for i in task.handed_over)
        assert all(now[str(i)] == checksums[str(i)] for i in task.kept)
    assert store.done_tasks(plan.tasks) == {t.task_id for t in plan.tasks}
    again = render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    assert (again.tasks_run, again.segments_run) == (0, 0)
    assert media.probe(spec.output)["frames"] == spec.num_frames


def test_a_checkpoints_render_defaults_apply_where_the_job_leaves_them_unset(render_cluster, tmp_path):
    """A checkpoint whose `sampling` turns refinement off renders a job that leaves `refine` unset without a
    refinement pass; the store keeps the spec as given, so a resume takes the default from the model again."""
    from model.generator import Generator

    gen = Generator.from_preset("tiny", device="cpu", seed=0)
    gen.sampling = {"refine": 0}
    checkpoint = gen.save(tmp_path / "unrefined")
    spec = tiny_spec(tmp_path, model=str(checkpoint))
    assert spec.refine is None and spec.refine_level > 0
    result = render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    store = JobStore.open(result.store)
    assert store.plan["tasks"] and not any(task.get("refine") for task in store.plan["tasks"])
    assert store.attrs["spec"]["refine"] is None
    again = render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    assert again.tasks_run == 0 and again.tasks_skipped == len(store.plan["tasks"])


def test_a_decoder_that_reads_the_prompt_gets_the_jobs(render_cluster, tmp_path):
    """Decode tasks hand the job's prompt to a decoder that reads it (vae.caption_width): the segments are
    that decode of the stored latents, not the empty prompt's."""
    import dataclasses

    import torch

    from model.config import get_preset
    from model.generator import Generator, VideoModel

    tiny = get_preset("tiny")
    torch.manual_seed(0)
    gen = Generator(VideoModel(tiny.replace(vae=dataclasses.replace(tiny.vae, caption_width=32, caption_heads=2))),
                    device="cpu")
    with torch.no_grad():  # open the caption attention wide, so the prompt changes the pixels a lot
        for param in gen.model.vae.decoder.caption.parameters():
            param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(param.numel()))
    checkpoint = gen.save(tmp_path / "reads-prompt")
    spec = tiny_spec(tmp_path, model=str(checkpoint))
    result = render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    store = JobStore.open(result.store)
    loaded = Generator.load(checkpoint)
    values = torch.from_numpy(np.asarray(store.read_video_latents(range(5), refined=True), dtype=np.float32))
    with_prompt = loaded.decode(values, prompt=spec.prompt).numpy().astype(np.int16)[:16]
    without = loaded.decode(values).numpy().astype(np.int16)[:16]
    segments = np.concatenate([media.read_frames(store.segment_url(s["segment_id"]), spec.width, spec.height)
                               for s in store.plan["segments"]]).astype(np.int16)
    assert segments.shape == with_prompt.shape
    # Random tiny weights draw pixel noise, which the segments' lossless H.264 keeps only up to its 4:2:0
    # chroma; the segments are still far nearer the decode under the job's prompt than under the empty one.
    near, far = np.abs(segments - with_prompt).mean(), np.abs(segments - without).mean()
    assert np.abs(with_prompt - without).mean() > 4.0 and near < far / 2
