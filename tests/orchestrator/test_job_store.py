"""The Zarr job store: layout, markers that prove completion, refusal of foreign stores, write failures."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid

import numpy as np
import pytest
import xarray as xr
import zarr

from orchestrator.store import (
    FORMAT_VERSION,
    JobStore,
    PathNotWritable,
    StoreError,
    StoreIncomplete,
    StoreMismatch,
    StoreWriteError,
    check_writable,
    frame_checksum,
)

SHAPE = (6, 4, 6, 8)  # T_lat, C, h, w
SPEC = {"prompt": "a red circle", "seconds": 2.0, "output": "out.mp4", "store": None}
CONTENT = {"prompt": "a red circle", "seconds": 2.0}
PLAN = {"format": 1, "scheme": "parallel", "tasks": []}
MODEL = {"preset": "tiny", "checkpoint_hash": "sha256:00"}


def make_store(url) -> JobStore:
    return JobStore.open_for(str(url), spec=SPEC, content=CONTENT, plan=PLAN, model=MODEL, latent_shape=SHAPE)


def frames(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *SHAPE[1:])).astype(np.float32)


def chunk_file(store_dir, index):
    return os.path.join(store_dir, "latents", "c", str(index), "0", "0", "0")


def test_layout_matches_the_design(tmp_path):
    store = make_store(tmp_path / "job.zarr")
    latents = zarr.open_array(str(tmp_path / "job.zarr" / "latents"), mode="r")
    assert latents.dtype == np.float16
    assert latents.shape == SHAPE
    assert latents.chunks == (1, *SHAPE[1:])  # one chunk per latent frame
    assert latents.metadata.dimension_names == ("latent_frame", "channel", "y", "x")
    codecs = json.loads((tmp_path / "job.zarr" / "latents" / "zarr.json").read_text())["codecs"]
    blosc = [c for c in codecs if c["name"] == "blosc"]
    assert blosc and blosc[0]["configuration"]["cname"] == "zstd"
    assert blosc[0]["configuration"]["shuffle"] == "bitshuffle"
    assert blosc[0]["configuration"]["typesize"] == 2
    attrs = zarr.open_group(str(tmp_path / "job.zarr"), mode="r").attrs.asdict()
    assert attrs["longshot_format"] == FORMAT_VERSION
    assert attrs["spec"] == SPEC and attrs["plan"] == PLAN and attrs["model"] == MODEL
    assert store.spec == SPEC


def test_xarray_opens_the_latents_with_their_dimension_names(tmp_path):
    store = make_store(tmp_path / "job.zarr")
    values = frames(2)
    store.write_latents([1, 4], values)
    ds = xr.open_zarr(str(tmp_path / "job.zarr"), consolidated=False)
    assert ds["latents"].dims == ("latent_frame", "channel", "y", "x")
    np.testing.assert_array_equal(ds["latents"].isel(latent_frame=4).values, values[1].astype(np.float16))
    assert np.isnan(ds["latents"].isel(latent_frame=0).values).all()  # never written


def test_marker_verifies_only_intact_frames(tmp_path):
    root = tmp_path / "job.zarr"
    store = make_store(root)
    checksums = store.write_latents([2, 3], frames(2))
    assert checksums["2"] == frame_checksum(store.read_latents([2])[0])
    assert not store.task_done("L1-T000", [2, 3])  # data without a marker is not done
    store.write_task_marker("L1-T000", checksums, run_id="r1")
    assert store.task_done("L1-T000", [2, 3])
    assert not store.task_done("L1-T000", [2, 3, 4])  # the marker must cover every frame of the task
    reopened = JobStore.open(str(root))
    assert reopened.task_done("L1-T000", [2, 3])

    # A torn chunk (truncated file) either fails to decode or decodes to other values: not done any more.
    path = chunk_file(root, 3)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    assert not reopened.task_done("L1-T000", [2, 3])

    # Rewriting the frames brings the same checksums back.
    assert reopened.write_latents([2, 3], frames(2)) == checksums
    assert reopened.task_done("L1-T000", [2, 3])

    # A chunk that vanished reads as NaN fill: not done either.
    os.unlink(chunk_file(root, 2))
    assert not reopened.task_done("L1-T000", [2, 3])
    with pytest.raises(StoreError, match="have not been written"):
        reopened.read_latents([2])


def test_torn_or_changed_data_under_a_marker_is_not_done(tmp_path):
    root = tmp_path / "job.zarr"
    store = make_store(root)
    store.write_task_marker("L0-T000", store.write_latents([0, 5], frames(2)))
    # Different data under an intact marker (a frame rewritten by something else): checksum mismatch.
    store.write_latents([5], frames(1, seed=7))
    assert not store.task_done("L0-T000", [0, 5])

    store.write_task_marker("L0-T001", store.write_latents([1], frames(1)))
    marker = root / "tasks" / "L0-T001" / "zarr.json"
    marker.write_text(marker.read_text()[:40])  # torn marker
    assert store.task_marker("L0-T001") is None
    assert not store.task_done("L0-T001", [1])


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, scheme):
    url = f"memory://longshot-{uuid.uuid4().hex}/job.zarr" if scheme == "memory" else (tmp_path / "j.zarr").as_uri()
    store = make_store(url)
    store.write_task_marker("L0-T000", store.write_latents([0, 1], frames(2)))
    reopened = JobStore.open(url)
    assert reopened.task_done("L0-T000", [0, 1])
    assert reopened.model == MODEL
    with store.segment_writer("S0000") as local:
        with open(local, "wb") as handle:
            handle.write(b"not really a video")
    store.write_segment_marker("S0000", frames=9)
    assert reopened.segment_done("S0000")
    with reopened.local_segments(["S0000"]) as paths:
        assert open(paths[0], "rb").read() == b"not really a video"
    if scheme == "file":
        assert (tmp_path / "j.zarr" / "tasks" / "L0-T000" / "zarr.json").exists()


def test_segment_marker_checks_the_file(tmp_path):
    store = make_store(tmp_path / "job.zarr")
    assert not store.segment_done("S0001")
    with store.segment_writer("S0001") as local:
        with open(local, "wb") as handle:
            handle.write(b"x" * 100)
    assert not store.segment_done("S0001")  # the file alone is not enough
    store.write_segment_marker("S0001", frames=12)
    assert store.segment_done("S0001")
    with open(tmp_path / "job.zarr" / "segments" / "S0001.mp4", "ab") as handle:
        handle.write(b"y")
    assert not store.segment_done("S0001")


def test_output_record(tmp_path):
    store = make_store(tmp_path / "job.zarr")
    out = tmp_path / "out.mp4"
    assert not store.output_done(str(out))
    out.write_bytes(b"video")
    store.write_output_record(str(out), frames=16)
    assert store.output_done(str(out))
    assert not store.output_done(str(tmp_path / "other.mp4"))
    out.write_bytes(b"changed")
    assert not store.output_done(str(out))


def test_a_store_of_another_job_is_refused_unless_forced(tmp_path):
    url = str(tmp_path / "job.zarr")
    store = make_store(url)
    store.write_task_marker("L0-T000", store.write_latents([0], frames(1)))
    assert make_store(url).task_done("L0-T000", [0])  # same job: reopened, work kept

    other = dict(CONTENT, prompt="a blue square")
    with pytest.raises(StoreMismatch) as info:
        JobStore.open_for(url, spec=SPEC, content=other, plan=PLAN, model=MODEL, latent_shape=SHAPE)
    assert "prompt" in str(info.value) and "--force" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(StoreMismatch, match="model identity"):
        JobStore.open_for(url, spec=SPEC, content=CONTENT, plan=PLAN,
                          model={"preset": "tiny", "checkpoint_hash": "sha256:ff"}, latent_shape=SHAPE)

    replaced = JobStore.open_for(url, spec=dict(SPEC, prompt="a blue square"), content=other, plan=PLAN,
                                 model=MODEL, latent_shape=SHAPE, force=True)
    assert replaced.differences(content=other) == {}
    assert not replaced.task_done("L0-T000", [0])  # the old job's work is gone


def test_a_field_added_since_the_store_was_made_matches_while_left_at_its_default(tmp_path):
    url = str(tmp_path / "job.zarr")
    make_store(url)
    newer = dict(CONTENT, infill_guidance=None)
    assert JobStore.open(url).differences(content=newer) == {}
    chosen = dict(CONTENT, infill_guidance=2.0)
    assert JobStore.open(url).differences(content=chosen) == {"infill_guidance": (None, 2.0)}


def test_a_store_whose_creation_was_cut_short_is_named_so_and_recreated_only_with_force(tmp_path):
    url = str(tmp_path / "job.zarr")
    make_store(url)
    # What a render killed between writing the group's attributes and its arrays leaves behind.
    for path in sorted((tmp_path / "job.zarr").iterdir()):
        if path.is_dir():
            shutil.rmtree(path)
    with pytest.raises(StoreIncomplete, match=r"job.zarr is an incomplete job store .*--force"):
        JobStore.open(url)
    with pytest.raises(StoreIncomplete):
        JobStore.open_for(url, spec=SPEC, content=CONTENT, plan=PLAN, model=MODEL, latent_shape=SHAPE)
    recreated = JobStore.open_for(url, spec=SPEC, content=CONTENT, plan=PLAN, model=MODEL, latent_shape=SHAPE,
                                  force=True)
    assert tuple(recreated.latents.shape) == SHAPE


def test_a_directory_that_is_not_a_store_is_never_replaced(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"jpeg")
    for force in (False, True):
        with pytest.raises(PathNotWritable, match="not a Longshot job store"):
            JobStore.open_for(str(target), spec=SPEC, content=CONTENT, plan=PLAN, model=MODEL,
                              latent_shape=SHAPE, force=force)
    assert (target / "holiday.jpg").read_bytes() == b"jpeg"
    with pytest.raises(StoreError, match="no job store"):
        JobStore.open(str(tmp_path / "missing.zarr"))


def test_unwritable_locations_are_found_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(PathNotWritable) as info:
        check_writable("output", str(blocker / "out.mp4"), directory=False)
    assert info.value.field == "output" and "a-file" in str(info.value)
    with pytest.raises(PathNotWritable, match="a file is in the way"):
        check_writable("store", str(blocker), directory=True)
    with pytest.raises(PathNotWritable, match="is a directory"):
        check_writable("output", str(tmp_path), directory=False)
    check_writable("store", str(tmp_path / "new" / "job.zarr"), directory=True)
    check_writable("output", str(tmp_path / "deeper" / "out.mp4"), directory=False)
    assert (tmp_path / "deeper").is_dir()
    assert not any(p.name.startswith(".longshot-probe") for p in tmp_path.rglob("*"))


def test_a_failed_write_raises_a_clear_error_and_records_nothing(tmp_path, monkeypatch):
    store = make_store(tmp_path / "job.zarr")
    store.write_task_marker("L0-T000", store.write_latents([0], frames(1)))

    def disk_full(self, selection, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(store.latents), "__setitem__", disk_full)
    with pytest.raises(StoreWriteError) as info:
        store.write_latents([1, 2], frames(2))
    assert "No space left on device" in str(info.value) and "1-2" in str(info.value)
    assert isinstance(info.value, OSError)
    monkeypatch.undo()
    assert store.task_marker("L0-T001") is None
    assert store.task_done("L0-T000", [0])  # finished work untouched


def test_run_records(tmp_path):
    store = make_store(tmp_path / "job.zarr")
    store.write_run_record("20260101T000000-aaaaaa", {"state": "running", "started": "2026-01-01T00:00:00"})
    store.write_run_record("20260101T000100-bbbbbb", {"state": "completed", "started": "2026-01-01T00:01:00"})
    store.write_run_record("20260101T000000-aaaaaa", {"state": "failed", "started": "2026-01-01T00:00:00"})
    runs = store.runs()
    assert [r["state"] for r in runs] == ["failed", "completed"]


REFINING_PLAN = {"format": 1, "scheme": "parallel",
                 "tasks": [{"task_id": "L0-T000", "latent": [1, 2, 3, 4, 5]},
                           {"task_id": "R0-T000", "latent": [1, 2, 3, 4, 5], "refine": True}]}


def test_a_refining_plan_gets_a_refined_array_beside_the_drafts(tmp_path):
    plain = make_store(tmp_path / "plain.zarr")
    assert not os.path.exists(tmp_path / "plain.zarr" / "refined")
    with pytest.raises(StoreError, match="no 'refined' array"):
        plain.read_latents([0], array="refined")
    with pytest.raises(ValueError, match="array='drafts'"):
        plain.read_latents([0], array="drafts")

    store = JobStore.open_for(str(tmp_path / "job.zarr"), spec=SPEC, content=CONTENT, plan=REFINING_PLAN,
                              model=MODEL, latent_shape=SHAPE)
    refined = zarr.open_array(str(tmp_path / "job.zarr" / "refined"), mode="r")
    assert refined.shape == SHAPE and refined.dtype == np.float16 and refined.chunks == (1, *SHAPE[1:])
    drafts, better = frames(6, seed=1), frames(6, seed=2)
    store.write_latents(range(6), drafts)
    with pytest.raises(StoreError, match="refined frames 1-5 have not been written"):
        store.read_latents(range(1, 6), array="refined")
    checksums = store.write_latents(range(1, 6), better[1:], array="refined")
    store.write_task_marker("R0-T000", checksums, array="refined")
    # the drafts stay as they were, so a refinement that runs again starts from the same frames
    np.testing.assert_array_equal(store.read_latents(range(6)), drafts.astype(np.float16))
    assert store.task_done("R0-T000", range(1, 6), "refined")
    assert not store.task_done("R0-T000", range(1, 6), "latents")  # a marker for the other array proves nothing
    # a marker whose checksums were taken of the drafts does not verify against the refined frames
    store.write_task_marker("R0-T001", {str(i): frame_checksum(store.read_latents([i])[0]) for i in range(1, 6)},
                            array="refined")
    assert not store.task_done("R0-T001", range(1, 6))
    # the video decodes the refined frames, and the given frame 0 (never refined) from the drafts
    video = store.read_video_latents(range(6), given=[0], refined=True)
    np.testing.assert_array_equal(video[0], drafts[0].astype(np.float16))
    np.testing.assert_array_equal(video[1:], better[1:].astype(np.float16))
    np.testing.assert_array_equal(store.read_video_latents(range(6)), drafts.astype(np.float16))


def test_a_task_whose_frames_a_later_task_takes_over_is_checked_on_the_frames_it_kept(tmp_path):
    """Refinement pass 1 rewrites the ends of pass-0 blocks: the pass-0 task stays done on the frames it keeps,
    and only those."""
    from orchestrator.plan import GenerationTask

    store = JobStore.open_for(str(tmp_path / "job.zarr"), spec=SPEC, content=CONTENT, plan=REFINING_PLAN,
                              model=MODEL, latent_shape=SHAPE)
    checksums = store.write_latents(range(1, 6), frames(5, seed=3)[:5], array="refined")
    store.write_task_marker("R0-T000", checksums, array="refined")
    store.write_latents([4, 5], frames(2, seed=4), array="refined")  # what pass 1 did to frames 4 and 5
    pass0 = GenerationTask("R0-T000", 1, (), (1, 2, 3, 4, 5), (), refine=True, handed_over=(4, 5))
    assert pass0.kept == (1, 2, 3)
    assert not store.task_done("R0-T000", range(1, 6), "refined")
    assert store.task_done("R0-T000", range(1, 6), "refined", kept=pass0.kept)
    assert store.done_tasks([pass0]) == {"R0-T000"}
    # the marker must still cover the whole task, and a kept frame that changed is not done
    assert not store.task_done("R0-T000", range(1, 7), "refined", kept=pass0.kept)
    assert not store.task_done("R0-T000", range(1, 6), "refined", kept=(1, 2, 3, 6))
    store.write_latents([3], frames(1, seed=5), array="refined")
    assert store.done_tasks([pass0]) == set()
