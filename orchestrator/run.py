"""Execution: a Plan becomes Dask futures whose only shared state is the job store.

One future per conditioning step (if any), per generation task, per decode segment, and one for the mux,
submitted by the client as the steps they wait for finish (see `execute`). Futures carry small metadata
dicts; latents go through the store. Whatever the store says is done (a task marker that verifies, a segment
whose file matches its checksum, an output that matches its record) is not submitted again, which is all
that resume needs.

The functions that run on workers are pluggable (`TaskFunctions`) so the orchestration benchmark can run the
same scheduling path with simulated model work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import enum
import hashlib
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

from orchestrator.plan import fills_gap
from orchestrator.progress import ProgressReporter, reporter
from orchestrator.spec import JobSpec, SpecError
from orchestrator.store import (JobStore, StoreError, StoreMismatch, check_writable, is_store, store_write_lock,
                                task_array)

log = logging.getLogger(__name__)

GPU = {"GPU": 1}
RETRIES = 2
# Priority bands (higher runs first): inputs, then generation by level and time, then decoding, then mux.
_BAND = 10**7


class RenderError(RuntimeError):
    """A render failed after starting; the store keeps every finished task for `longshot resume`."""

    def __init__(self, message: str, *, store: str | None = None, task: str | None = None):
        self.store, self.task = store, task
        hint = f"; finished work is kept in {store}: fix the cause and run `longshot resume {store}`" if store else ""
        super().__init__(message + hint)


class RenderCancelled(RenderError):
    """The render was interrupted (Ctrl-C); finished work is kept."""


class RunState(str, enum.Enum):
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


# ---------------------------------------------------------------------------------------------- determinism


def task_seed(job_seed: int, task_id: str) -> int:
    """Seed of one task: a stable hash of (job seed, task id), the same in every process and every run."""
    digest = hashlib.sha256(f"{int(job_seed)}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def latent_index_of_frame(frame: int) -> int:
    """Latent frame holding video frame `frame`: latent 0 <-> frame 0, latent i >= 1 <-> frames 4i-3..4i."""
    return 0 if frame <= 0 else (frame + 3) // 4


def segment_latents_for(fps: int) -> int:
    """Latent frames per decode segment: about 1.5 seconds of video, at least 2 latents."""
    return max(2, round(1.5 * fps / 4))


# ---------------------------------------------------------------------------------------------- conditioning


@dataclasses.dataclass(frozen=True)
class ConditioningInput:
    """One input placed into the latents before level 0.

    kind "image": `path` is encoded alone (one latent frame) and written at the single index in `latents`.
    kind "clip": frames [frame_start, frame_start + 4 * len(latents) (+1 at the video start)) of the clip,
    resampled to the job's fps, fill the latent frames `latents` (consecutive).
    kind "loop": `latents` = (0, T) — a keyframe sampled for latent 0 (unless an image is already there) is
    written at 0 and, as the frame that follows the last one, at T.
    """

    kind: str
    path: str | None
    latents: tuple[int, ...]
    frame_start: int = 0
    pad_end: int = 0  # repeat the clip's last frame this often so it lands on the video's last frame

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def conditioning_layout(spec: JobSpec, num_latent_frames: int, clip_frames: dict[str, int]
                        ) -> tuple[tuple[ConditioningInput, ...], tuple[int, ...], int]:
    """Where each conditioning input goes: (inputs, given latent indices, latent frames to allocate).

    `clip_frames` maps each clip path to its frame count at the job's fps. A loop allocates one latent frame
    beyond the video, holding a copy of frame 0, so the last frames are generated leading into the first.
    Raises SpecError when inputs overlap or a clip leaves nothing to generate.
    """
    n = spec.num_frames
    t_lat = num_latent_frames
    inputs: list[ConditioningInput] = []
    owner: dict[int, str] = {}

    def claim(indices, what):
        for i in indices:
            if i in owner:
                raise SpecError([(what, what, f"overlaps {owner[i]} at latent frame {i}")])
            owner[i] = what

    clips: list[tuple[str, str, str]] = []  # (field, path, where)
    if spec.extend is not None:
        clips.append(("extend", spec.extend.clip, "start" if spec.extend.direction == "forward" else "end"))
    if spec.bridge is not None:
        clips.append(("bridge[0]", spec.bridge[0], "start"))
        clips.append(("bridge[1]", spec.bridge[1], "end"))
    room = t_lat - 1  # at least one latent frame must be left to generate
    for field, path, where in clips:
        count = clip_frames[path]
        if where == "start":
            k = min(1 + (count - 1) // 4, room)
            if k < 1:
                raise SpecError([(field, path, "the clip has no frames")])
            indices = tuple(range(0, k))
            inputs.append(ConditioningInput("clip", path, indices, frame_start=0))
        else:
            surplus = 4 * (t_lat - 1) - (n - 1)  # frames decoded past the video's end (trimmed)
            k = min((count + surplus) // 4, room)
            if k < 1:
                raise SpecError([(field, path, "the clip is shorter than 4 frames at this fps")])
            indices = tuple(range(t_lat - k, t_lat))
            inputs.append(ConditioningInput("clip", path, indices, frame_start=count + surplus - 4 * k,
                                            pad_end=surplus))
        claim(indices, field)
        room -= len(indices)
    if sum(len(i.latents) for i in inputs) >= t_lat:
        raise SpecError([("seconds", spec.seconds, "leaves no frame to generate between the input clips")])

    for number, image in enumerate(spec.images):
        frame = 0 if image.at == "start" else n - 1 if image.at == "end" else min(round(image.at * spec.fps), n - 1)
        index = latent_index_of_frame(frame)
        field = f"images[{number}]"
        claim([index], field)
        inputs.append(ConditioningInput("image", image.path, (index,)))

    allocated = t_lat
    if spec.loop:
        inputs.append(ConditioningInput("loop", None, (0, t_lat)))
        owner.setdefault(0, "loop")
        owner[t_lat] = "loop"
        allocated = t_lat + 1
    given = tuple(sorted(owner))
    if len(given) >= allocated:
        raise SpecError([("images", len(spec.images), "the inputs fill every latent frame; nothing to generate")])
    return tuple(inputs), given, allocated


# ---------------------------------------------------------------------------------------------- worker tasks

_stores: dict[tuple[str, str], JobStore] = {}
_stores_lock = threading.Lock()


def _worker_store(job: dict) -> JobStore:
    """This process's handle on the job store (the creation time tells a replaced store from the old one)."""
    key = (job["store"], job["store_created"])
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = JobStore.open(job["store"])
        return store


def _to_torch(array):
    import torch

    return torch.from_numpy(array.astype("float32"))


def _stamp(kind: str, ident: str, started: float, **info) -> dict:
    finished = time.time()
    return {"kind": kind, "id": ident, "started": started, "finished": finished, "seconds": finished - started,
            "pid": os.getpid(), **info}


def model_facts(num_frames: int, height: int, width: int, model: str, engine: str) -> dict:
    """What the planner and the store need from the model, asked of a worker that holds it."""
    from cluster.worker import get_generator, worker_info

    gen = get_generator(model, engine)
    h, w = gen.latent_size(height, width)
    return {
        "identity": gen.identity,
        "latent_channels": int(gen.latent_channels),
        "max_window": int(gen.max_window),
        "decode_context": int(gen.decode_context),
        "num_latent_frames": int(gen.num_latent_frames(num_frames)),
        "latent_height": int(h),
        "latent_width": int(w),
        "sampling": dict(gen.sampling),
        "worker": worker_info(),
    }


def write_conditioning(inputs: list[dict], job: dict) -> dict:
    """Encode the conditioning inputs and write them into the latents, then mark them given."""
    import numpy as np
    import torch

    from cluster.worker import get_generator
    from model import Window
    from orchestrator import media

    started = time.time()
    gen, store = get_generator(job["model"], job["engine"]), _worker_store(job)
    checksums: dict[str, str] = {}
    width, height, fps = job["width"], job["height"], job["fps"]
    placed: dict[int, Any] = {}
    for item in inputs:
        latents = tuple(item["latents"])
        if item["kind"] == "image":
            frames = media.read_frames(item["path"], width, height, max_frames=1)
            values = gen.encode(frames[:1])
        elif item["kind"] == "clip":
            frames = media.read_frames(item["path"], width, height, fps)
            if item["pad_end"]:
                frames = np.concatenate([frames, np.repeat(frames[-1:], item["pad_end"], axis=0)])
            frames = frames[item["frame_start"]:]
            if latents[0] == 0:
                values = gen.encode(frames[: 1 + 4 * (len(latents) - 1)])
            else:
                # A latent after the first stands for a group of 4 frames; the causal VAE encodes a clip's
                # first frame alone, so a copy of it goes first and its latent is dropped.
                group = frames[: 4 * len(latents)]
                values = gen.encode(np.concatenate([group[:1], group]))[1:]
        else:  # loop
            if 0 in placed:
                first = placed[0]
            else:
                window = Window(observed_times=(), latent_times=(0,), height=job["latent_height"],
                                width=job["latent_width"])
                first = gen.sample(window, None, job["prompt"], seed=task_seed(job["seed"], "loop-keyframe"),
                                   video_seed=job["seed"], **sampling_settings(job))[:1]
            values = torch.cat([torch.as_tensor(first), torch.as_tensor(first)])
        values = torch.as_tensor(values)
        if values.shape[0] != len(latents):
            raise RuntimeError(f"encoding {item['path']} gave {values.shape[0]} latent frames, "
                               f"expected {len(latents)}")
        for index, value in zip(latents, values):
            placed[index] = value[None]
        checksums.update(store.write_latents(latents, values))
    store.write_given_marker(checksums, run_id=job["run_id"], seconds=time.time() - started)
    return _stamp("condition", "given", started, frames=len(checksums))


# Decode segments are stored losslessly (x264 at CRF 0) and the output is encoded from them once, as one stream:
# segments encoded at the output's quality each start on a keyframe, whose fresh coding of the whole picture
# made every segment start a visible seam (media.concat_segments).
LOSSLESS_SEGMENT = {"codec": "h264", "quality": 0}


def sampling_settings(job: dict, infill: bool = False, refine: bool = False, extension: bool = False) -> dict:
    """The job's sampler settings as ``Generator.sample`` takes them, for an infill task (see
    ``plan.fills_gap``), a refinement task, an extension task (observed frames on one side only) or another
    (jobs stored before a setting existed get its default, so they resume as they started). A refinement task
    starts from its drafts at ``refine_level`` with ``refine_steps`` steps and samples at the infill guidance: its
    frames are already there, on both sides. An extension task is guided only above its guidance floor."""
    guidance = job.get("infill_guidance", job["guidance"]) if infill or refine else job["guidance"]
    settings = {"steps": job["steps"], "guidance": guidance, "sampler": job["sampler"],
                "guidance_rescale": job.get("guidance_rescale", 0.0)}
    if extension and not (infill or refine):
        settings["guidance_floor"] = job.get("extension_guidance_floor", 0.0)
    if refine:
        settings.update(steps=job["refine_steps"], start_level=job["refine_level"])
    return settings


def generate_latents(task: dict, job: dict, *dependencies) -> dict:
    """Run one generation task: read its observed frames from the store, sample, write, mark done."""
    from cluster.worker import get_generator
    from model import Window

    started = time.time()
    gen, store = get_generator(job["model"], job["engine"]), _worker_store(job)
    refine = bool(task.get("refine"))
    array = task_array(refine)
    if store.task_done(task["task_id"], task["latent"], array, task.get("kept")):
        # Dask reruns finished tasks whose results died with a worker; the store already holds this one.
        return _stamp("generate", task["task_id"], started, level=task["level"], frames=len(task["latent"]),
                      reused=True)
    window = Window(observed_times=tuple(task["observed"]), latent_times=tuple(task["latent"]),
                    height=job["latent_height"], width=job["latent_width"])
    settings = sampling_settings(job, infill=fills_gap(task["observed"], task["latent"]), refine=refine,
                                 extension=bool(task["observed"]))
    extra = {}
    if refine:  # observe refined frames (given ones are never refined) and start from this task's drafts
        observed = store.read_video_latents(task["observed"], given=job["given"], refined=True)
        extra["start"] = _to_torch(_refinement_start(store, task))
    else:
        observed = store.read_latents(task["observed"])
    latents = gen.sample(window, _to_torch(observed) if len(observed) else None, job["prompt"],
                         seed=task_seed(job["seed"], task["task_id"]), video_seed=job["seed"],
                         causal=bool(task.get("causal")), **settings, **extra)
    computed = time.time()
    checksums = store.write_latents(task["latent"], latents, array=array)
    store.write_task_marker(task["task_id"], checksums, level=task["level"], run_id=job["run_id"],
                            guidance=settings["guidance"], array=array,
                            **{k: settings[k] for k in ("guidance_floor",) if k in settings},
                            **({"start_level": settings["start_level"]} if refine else {}),
                            pid=os.getpid(), sample_seconds=computed - started,
                            seconds=time.time() - started)
    return _stamp("generate", task["task_id"], started, level=task["level"], frames=len(task["latent"]),
                  sample_seconds=computed - started)


def _refinement_start(store, task: dict):
    """What a refinement task re-noises: its drafts, except the frames it takes over from an earlier pass,
    which start from that pass's refined frames. (A task killed while writing them starts, when it runs again,
    from what it had written: still refined frames, though not exactly what the first run started from.)"""
    start = store.read_latents(task["latent"])
    taken = set(task.get("takes_over", ()))
    if taken:
        rows = [i for i, t in enumerate(task["latent"]) if t in taken]
        start[rows] = store.read_latents([task["latent"][i] for i in rows], array="refined")
    return start


def decode_segment(segment: dict, job: dict, *dependencies) -> dict:
    """Decode latents [latent_start, latent_stop) with their causal context, trim, encode one segment file."""
    from cluster.worker import get_generator
    from orchestrator import media

    started = time.time()
    gen, store = get_generator(job["model"], job["engine"]), _worker_store(job)
    expected = segment["frame_stop"] - segment["frame_start"]
    if store.segment_done(segment["segment_id"]):
        return _stamp("decode", segment["segment_id"], started, frames=expected, reused=True)
    start, stop, context_start = segment["latent_start"], segment["latent_stop"], segment["context_start"]
    values = _to_torch(store.read_video_latents(range(context_start, stop), given=job.get("given", ()),
                                                refined=job.get("refined", False)))
    # A decoder that reads the prompt (vae.caption_width) gets the job's; others ignore it.
    if start == 0:
        frames, first = gen.decode(values, prompt=job["prompt"]), 0
    else:
        frames, first = gen.decode(values[start - context_start:], context=values[: start - context_start],
                                   prompt=job["prompt"]), 4 * start - 3
    frames = frames[segment["frame_start"] - first: segment["frame_stop"] - first]
    frames = frames.numpy() if hasattr(frames, "numpy") else frames
    if len(frames) != expected:
        raise RuntimeError(f"segment {segment['segment_id']}: decoded {len(frames)} frames, expected {expected}")
    decoded = time.time()
    lossless = job.get("lossless_segments", False)
    settings = LOSSLESS_SEGMENT if lossless else {"codec": job["codec"], "quality": job["quality"]}
    with store.segment_writer(segment["segment_id"]) as path:
        media.encode_segment(frames, path, fps=job["fps"], **settings)
    store.write_segment_marker(segment["segment_id"], frames=expected, run_id=job["run_id"], pid=os.getpid(),
                               lossless=lossless, decode_seconds=decoded - started,
                               encode_seconds=time.time() - decoded)
    return _stamp("decode", segment["segment_id"], started, frames=expected, decode_seconds=decoded - started,
                  encode_seconds=time.time() - decoded)


def mux_output(segment_ids: list[str], job: dict, *dependencies) -> dict:
    """Join the segments into the output, with prompt, seed and model as metadata: lossless segments are
    encoded once, at the job's codec and quality, as one stream; segments of a store made before that are
    joined by stream copy, as they were encoded at the job's codec already."""
    import fsspec

    from orchestrator import media

    started = time.time()
    store = _worker_store(job)
    metadata = media.job_metadata(job["prompt"], job["seed"], job["model_identity"], longshot_store=job["store"])
    fs, path = fsspec.core.url_to_fs(job["output"])
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    with store.local_segments(segment_ids) as paths:
        encode = {"codec": job["codec"], "quality": job["quality"]} if job.get("lossless_segments") else None
        if local:
            info = media.concat_segments(paths, path, metadata=metadata, encode=encode)
        else:
            with tempfile.TemporaryDirectory(prefix="longshot-") as tmp:
                staged = os.path.join(tmp, os.path.basename(path))
                info = media.concat_segments(paths, staged, metadata=metadata, encode=encode)
                fs.put_file(staged, path)
    store.write_output_record(job["output"], frames=info["frames"], fps=job["fps"], run_id=job["run_id"],
                              seconds=time.time() - started)
    return _stamp("mux", "output", started, frames=info["frames"])


@dataclasses.dataclass(frozen=True)
class TaskFunctions:
    """The functions workers run. Signatures: condition(inputs, job); generate(task, job, *deps);
    decode(segment, job, *deps); mux(segment_ids, job, *deps). Each returns a small dict with at least
    kind, id, started, finished, seconds."""

    condition: Callable = write_conditioning
    generate: Callable = generate_latents
    decode: Callable = decode_segment
    mux: Callable = mux_output


# ---------------------------------------------------------------------------------------------- submission


@dataclasses.dataclass
class Skip:
    """What the store already holds: these are not submitted."""

    tasks: frozenset = frozenset()
    segments: frozenset = frozenset()
    given: bool = True
    output: bool = False


@dataclasses.dataclass
class Execution:
    """What one execution did: task results (worker-side timings) and the wall time of the wait."""

    results: list[dict]
    wall_seconds: float
    submitted: int
    skipped_tasks: int
    skipped_segments: int


@dataclasses.dataclass
class _Step:
    """One unit of work to submit: a function call, its priority and the steps it waits for."""

    kind: str
    ident: str
    call: tuple
    priority: int
    waits_for: set
    resources: dict | None
    level: int | None = None
    latent_frames: int = 0
    frames: int = 0
    weight: int = 1


def plan_steps(plan, job: dict, functions: TaskFunctions, skip: Skip, conditioning: tuple = ()) -> dict[str, _Step]:
    """The steps still to run, by id, each with the ids it waits for (only steps that will run)."""
    t_lat = plan.num_latent_frames
    max_level = max((t.level for t in plan.tasks), default=0)
    steps: dict[str, _Step] = {}
    given = set(plan.given)
    if conditioning and not skip.given:
        steps["given"] = _Step("condition", "given", (functions.condition, [c.to_dict() for c in conditioning], job),
                               (max_level + 4) * _BAND, set(), GPU, level=-1)
    for task in plan.tasks:
        if task.task_id in skip.tasks:
            continue
        waits = {d for d in task.depends_on if d in steps}
        if "given" in steps and given.intersection(task.observed):
            waits.add("given")
        steps[task.task_id] = _Step(
            "generate", task.task_id, (functions.generate, _task_dict(task), job),
            (max_level - task.level + 3) * _BAND + (t_lat - min(task.latent, default=0)), waits, GPU,
            level=task.level, latent_frames=len(task.latent), weight=task.window)
    decoding = []
    for segment in plan.segments:
        if segment.segment_id in skip.segments:
            continue
        waits = {d for d in segment.depends_on if d in steps}
        if "given" in steps and given.intersection(range(segment.context_start, segment.latent_stop)):
            waits.add("given")
        steps[segment.segment_id] = _Step(
            "decode", segment.segment_id, (functions.decode, dataclasses.asdict(segment), job),
            2 * _BAND + (t_lat - segment.latent_start), waits, GPU,
            frames=segment.frame_stop - segment.frame_start,
            weight=max(1, (segment.latent_stop - segment.context_start) // 2))
        decoding.append(segment.segment_id)
    if decoding or not skip.output:
        steps["output"] = _Step("mux", "output", (functions.mux, [s.segment_id for s in plan.segments], job), 0,
                                set(decoding), None)
    return steps


class _ModelSlots:
    """How many model tasks the cluster runs at once (its GPU resource units), re-read every few seconds so
    that workers joining, leaving or dying are noticed."""

    def __init__(self, client, refresh_seconds: float = 2.0):
        self.client, self.refresh_seconds = client, refresh_seconds
        self.checked, self.count = -math.inf, 1

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self.checked > self.refresh_seconds:
            workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
            self.count = max(1, int(sum(w.get("resources", {}).get("GPU", 0) for w in workers)))
            self.checked = now
        return self.count


def execute(client, plan, job: dict, *, functions: TaskFunctions | None = None, skip: Skip | None = None,
            conditioning: tuple = (), progress: ProgressReporter | None = None,
            cancel_event: threading.Event | None = None, lookahead: int | None = None) -> Execution:
    """Run what is not done and wait for it.

    The client schedules: a step becomes ready when the steps it waits for have finished, and ready model
    steps are handed to Dask in priority order while fewer than (GPU slots + `lookahead`) are in flight.
    The default lookahead (half the slots, at least one) keeps the next steps queued on workers, so they
    start without a round trip through the client (ops/bench/bench_orchestration.py measured half the
    slots as the best setting from 1 to 16 workers). Handing Dask every ready step at once would let its
    scheduler queue them on whichever workers looked idle at that moment, where they wait behind each other
    while other workers fall idle. No task holds a
    Dask dependency, so nothing is shipped between workers (the data is in the store) and a worker that dies
    loses only the task it was running.
    Raises RenderError on a failed step (after cancelling the rest) and RenderCancelled on KeyboardInterrupt
    or when `cancel_event` is set.
    """
    import heapq

    from distributed import as_completed

    functions = functions or TaskFunctions()
    skip = skip or Skip()
    progress = progress or ProgressReporter()
    steps = plan_steps(plan, job, functions, skip, conditioning)
    waiting_on: dict[str, list[str]] = {}
    for ident, step in steps.items():
        for before in step.waits_for:
            waiting_on.setdefault(before, []).append(ident)
    run = hashlib.sha256(job["run_id"].encode()).hexdigest()[:8]  # unique per run, short in dashboards
    futures: dict[Any, str] = {}
    pending = as_completed(with_results=False)
    slots = _ModelSlots(client)
    ready: list[tuple[int, str]] = []  # heap of (-priority, id) of model steps waiting for a slot
    in_flight = 0

    def submit(step: _Step) -> None:
        fn, *args = step.call
        future = client.submit(fn, *args, key=f"{step.kind}-{step.ident}-{run}", priority=step.priority,
                               resources=step.resources, retries=RETRIES, pure=False)
        futures[future] = step.ident
        pending.add(future)

    def make_ready(step: _Step) -> None:
        if step.resources is None:
            submit(step)
        else:
            heapq.heappush(ready, (-step.priority, step.ident))

    def dispatch() -> None:
        nonlocal in_flight
        while ready and in_flight < slots() + (max(1, slots() // 2) if lookahead is None else lookahead):
            _, ident = heapq.heappop(ready)
            submit(steps[ident])
            in_flight += 1

    total = len(steps)
    # latent frames sampled: every frame but the given ones, and each once more in a refinement pass
    latent_total = sum(len(task.latent) for task in plan.tasks)
    latent_done = sum(len(t.latent) for t in plan.tasks if t.task_id in skip.tasks)
    frames_done = sum(s.frame_stop - s.frame_start for s in plan.segments if s.segment_id in skip.segments)
    weight_total = sum(step.weight for step in steps.values()) or 1
    weight_done = 0
    started = time.monotonic()
    try:
        for step in steps.values():
            if not step.waits_for:
                make_ready(step)
        dispatch()
        for done_count, future in enumerate(pending, start=1):
            if cancel_event is not None and cancel_event.is_set():
                raise KeyboardInterrupt
            step = steps[futures[future]]
            if future.status != "finished":
                error = future.exception() if future.status == "error" else None
                raise RenderError(f"{step.kind} task {step.ident} failed: {_describe_error(error)}",
                                  store=job.get("store"), task=step.ident)
            if step.resources is not None:
                in_flight -= 1
            for after in waiting_on.get(step.ident, ()):
                steps[after].waits_for.discard(step.ident)
                if not steps[after].waits_for:
                    make_ready(steps[after])
            dispatch()
            latent_done += step.latent_frames
            frames_done += step.frames
            weight_done += step.weight
            elapsed = time.monotonic() - started
            eta = elapsed * (weight_total - weight_done) / weight_done if weight_done else None
            progress({"event": "task", "kind": step.kind, "id": step.ident, "level": step.level,
                      "done": done_count, "total": total, "latent_frames_done": latent_done,
                      "latent_frames_total": latent_total, "frames_done": frames_done,
                      "frames_total": job["num_frames"], "elapsed": round(elapsed, 3),
                      "eta": round(eta, 3) if eta is not None else None})
        # One batched gather at the end: fetching each result as it lands would put a round trip to a
        # worker into the loop for every task.
        results = client.gather(list(futures))
    except KeyboardInterrupt:
        _cancel(client, list(futures))
        raise RenderCancelled("the render was cancelled", store=job.get("store")) from None
    except BaseException:
        _cancel(client, list(futures))
        raise
    return Execution(results=results, wall_seconds=time.monotonic() - started, submitted=total,
                     skipped_tasks=len(skip.tasks), skipped_segments=len(skip.segments))


def _cancel(client, futures) -> None:
    with contextlib.suppress(Exception):
        client.cancel(futures, force=True)


def _describe_error(error: BaseException | None) -> str:
    if error is None:
        return "it was cancelled or its worker was lost too often"
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if not isinstance(error, (StoreError, OSError)) else text


def _task_dict(task) -> dict:
    return {"task_id": task.task_id, "level": task.level, "observed": list(task.observed),
            "latent": list(task.latent), "causal": bool(task.causal), "refine": bool(task.refine),
            "takes_over": list(task.takes_over), "kept": list(task.kept)}


# ---------------------------------------------------------------------------------------------- render


@dataclasses.dataclass
class RenderResult:
    output: str
    store: str
    frames: int
    fps: int
    run_id: str
    wall_seconds: float
    tasks_run: int
    tasks_skipped: int
    segments_run: int
    segments_skipped: int
    timings: dict
    engine: str
    workers: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _clip_frame_counts(spec: JobSpec) -> dict[str, int]:
    from orchestrator import media

    paths = []
    if spec.extend is not None:
        paths.append(spec.extend.clip)
    if spec.bridge is not None:
        paths.extend(spec.bridge)
    # Counting at a tiny size is cheap and gives exactly the frames the worker will read at full size.
    return {p: len(media.read_frames(p, 16, 16, spec.fps)) for p in paths}


def plan_job(spec: JobSpec, num_latent_frames: int, window: int, given: tuple[int, ...], decode_context: int,
             refine: bool | None = None, refine_layout: str | None = None):
    """The job's plan. A loop plans one extra latent frame (the copy of frame 0 that follows the last
    frame); its frames are never decoded, so the segments stop at the video's last latent frame.
    ``refine`` (default: whether the spec has a refinement level) appends the refinement pass, laid out as
    ``refine_layout`` says (default: as new plans are, see ``orchestrator.plan``)."""
    from orchestrator.plan import REFINE_LAYOUTS, make_plan

    video_latents = 1 + math.ceil((spec.num_frames - 1) / 4)
    extra = num_latent_frames - video_latents
    refine = spec.refine_level > 0 if refine is None else refine
    plan = make_plan(spec.schedule, num_latent_frames, window, given=given, num_frames=spec.num_frames + 4 * extra,
                     decode_context=decode_context, segment_latents=segment_latents_for(spec.fps), refine=refine,
                     refine_layout=refine_layout or REFINE_LAYOUTS[0])
    if not extra:
        return plan
    segments = tuple(
        dataclasses.replace(s, latent_stop=min(s.latent_stop, video_latents),
                            frame_stop=min(s.frame_stop, spec.num_frames))
        for s in plan.segments if s.latent_start < video_latents
    )
    return dataclasses.replace(plan, segments=segments)


def _plan_as_stored(store_url: str, plan, *make_args):
    """``plan``, or the same job planned with the refinement layout of its store, where the store at
    ``store_url`` holds that one: a job stored before pass 1 took frames over resumes as it was planned."""
    from orchestrator.plan import REFINE_LAYOUTS

    if not plan.refines or not is_store(store_url):
        return plan
    try:
        stored = JobStore.open(store_url, read_only=True).plan
    except (StoreError, KeyError):
        return plan
    if stored == plan.to_dict():
        return plan
    for layout in REFINE_LAYOUTS[1:]:
        earlier = plan_job(*make_args, refine=True, refine_layout=layout)
        if stored == earlier.to_dict():
            return earlier
    return plan  # a different job: opening the store reports how it differs


def _predates_refinement(store_url: str) -> bool:
    """Whether the store at ``store_url`` holds a job recorded before the spec had a ``refine`` field: it was
    planned without refinement and resumes that way, under the plan it holds."""
    if not is_store(store_url):
        return False
    try:
        return "refine" not in JobStore.open(store_url, read_only=True).spec
    except (StoreError, KeyError):
        return False


def _lossless_segments(store: JobStore, plan) -> bool:
    """Whether the job's segments are stored losslessly and encoded once by the mux: yes, unless the store
    already holds a segment encoded at the output's codec (made before segments were lossless), since the mux
    can only join segments encoded alike; those jobs finish as they started."""
    for segment in plan.segments:
        marker = store.segment_marker(segment.segment_id)
        if marker is not None and not marker.get("lossless", False):
            return False
    return True


def preflight(spec: JobSpec, *, force: bool = False) -> str:
    """Checks that need no cluster: inputs exist, output and store can be written, an existing store
    belongs to this job. Returns the resolved model reference. Raises ValueError subclasses (bad input)."""
    from cluster.worker import resolve_model
    from orchestrator import media

    problems = []
    suffix = os.path.splitext(spec.output)[1].lower()
    if suffix not in media.OUTPUT_SUFFIXES:
        problems.append(("output", spec.output, f"must end in {', '.join(media.OUTPUT_SUFFIXES)}"))
    for number, image in enumerate(spec.images):
        if not os.path.isfile(image.path):
            problems.append((f"images[{number}].path", image.path, "no such file"))
    clips = ([("extend.clip", spec.extend.clip)] if spec.extend else []) + (
        [("bridge[0]", spec.bridge[0]), ("bridge[1]", spec.bridge[1])] if spec.bridge else [])
    for field, path in clips:
        if not os.path.isfile(path):
            problems.append((field, path, "no such file"))
    if problems:
        raise SpecError(problems)
    try:
        model_ref = resolve_model(spec.model)
    except ValueError as err:
        raise SpecError([("model", spec.model, str(err).split(": ", 1)[-1])]) from None
    if spec.model is None and model_ref == "tiny":
        log.warning("the demo checkpoint is not installed: rendering with the 'tiny' preset's random weights")
    check_writable("output", spec.output, directory=False)
    store_url = spec.store_path
    if is_store(store_url):
        existing = JobStore.open(store_url, read_only=True)
        differences = existing.differences(content=spec.content_fields())
        if differences and not force:
            raise StoreMismatch(store_url, differences)
    check_writable("store", store_url, directory=True)
    return model_ref


def render(spec: JobSpec | dict, *, scheduler: str | None = None, workers: int | None = None,
           engine: str = "deepspeed", force: bool = False, progress=None, backend: str = "local",
           adapt: tuple[int, int] | None = None, functions: TaskFunctions | None = None) -> RenderResult:
    """Render `spec` to its output file on a Dask cluster; resumes from the store when it already holds
    part of this job. Bad input raises ValueError subclasses before any work, StoreLocked among them when
    another render or resume is writing the store; failures after the start raise RenderError
    (RenderCancelled on Ctrl-C) with every finished task left in the store."""
    from cluster.worker import ENGINES

    if isinstance(spec, dict):
        spec = JobSpec.parse(spec)
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers}: need at least 1 worker")
    show = reporter(progress)
    model_ref = preflight(spec, force=force)
    # Taken before the cluster starts, so that a second writer of this store fails at once, and held until
    # this client's last write (the run record) whatever the outcome.
    with store_write_lock(spec.store_path):
        return _render_locked(spec, model_ref, show, scheduler=scheduler, workers=workers, engine=engine,
                              force=force, backend=backend, adapt=adapt, functions=functions)


def _render_locked(spec: JobSpec, model_ref: str, show: ProgressReporter, *, scheduler: str | None,
                   workers: int | None, engine: str, force: bool, backend: str, adapt: tuple[int, int] | None,
                   functions: TaskFunctions | None) -> RenderResult:
    """`render` once preflight has passed, run while this process holds the store's write lock."""
    from cluster.backends import start
    from cluster.worker import GeneratorPlugin
    from orchestrator.plan import Plan

    clip_frames = _clip_frame_counts(spec)
    wall_start = time.monotonic()
    timings: dict[str, float] = {}
    session = start(scheduler=scheduler, backend=backend, workers=workers, adapt=adapt)
    store = None
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    try:
        client = session.client
        client.register_plugin(GeneratorPlugin(model_ref, engine=engine))
        facts = client.submit(model_facts, spec.num_frames, spec.height, spec.width, model_ref, engine,
                              resources=GPU, pure=False).result()
        timings["startup_seconds"] = time.monotonic() - wall_start
        window = spec.window or facts["max_window"]
        if window > facts["max_window"]:
            raise SpecError([("window", spec.window,
                              f"the model takes at most {facts['max_window']} frames per window")])
        conditioning, given, allocated = conditioning_layout(spec, facts["num_latent_frames"], clip_frames)
        # The settings the job leaves unset come from the model; the store records the spec as given.
        sampled = spec.with_model_defaults(facts["sampling"])
        refine = sampled.refine_level > 0 and not (not force and _predates_refinement(spec.store_path))
        plan_args = (sampled, allocated, window, given, facts["decode_context"])
        plan = plan_job(*plan_args, refine=refine)
        if not force:
            plan = _plan_as_stored(spec.store_path, plan, *plan_args)
        plan_dict = plan.to_dict()
        spec_dict = spec.model_dump(mode="json")
        spec_dict["store"] = spec.store_path
        store = JobStore.open_for(
            spec.store_path, spec=spec_dict, content=spec.content_fields(), plan=plan_dict,
            model=facts["identity"],
            latent_shape=(allocated, facts["latent_channels"], facts["latent_height"], facts["latent_width"]),
            force=force)
        plan = Plan.from_dict(store.plan)
        skip = Skip(
            tasks=frozenset(store.done_tasks(plan.tasks)),
            segments=frozenset(s.segment_id for s in plan.segments if store.segment_done(s.segment_id)),
            given=store.given_done(plan.given) if conditioning else True,
            output=store.output_done(spec.output),
        )
        engines = {info.get("engine") for info in client.run(_engine_in_use).values()}
        job = {
            "run_id": run_id, "store": store.url, "store_created": store.attrs["created"],
            "prompt": spec.prompt, "seed": spec.seed, "steps": spec.steps, "guidance": spec.guidance,
            "guidance_rescale": spec.guidance_rescale, "infill_guidance": sampled.guidance_for_infill,
            "extension_guidance_floor": sampled.guidance_floor_for_extension,
            "refine_level": sampled.refine_level, "refine_steps": sampled.steps_for_refine, "refined": plan.refines,
            "given": list(plan.given), "lossless_segments": _lossless_segments(store, plan),
            "sampler": spec.sampler, "fps": spec.fps, "width": spec.width, "height": spec.height,
            "num_frames": spec.num_frames, "codec": spec.codec, "quality": spec.quality, "output": spec.output,
            "latent_height": facts["latent_height"], "latent_width": facts["latent_width"],
            "model": model_ref, "engine": engine, "model_identity": facts["identity"],
        }
        n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
        store.write_run_record(run_id, {"state": RunState.running.value, "started": _now(), "workers": n_workers,
                                        "engine": sorted(e for e in engines if e), "scheduler": session.scheduler_address,
                                        "skipped_tasks": len(skip.tasks), "skipped_segments": len(skip.segments)})
        show({"event": "start", "run_id": run_id, "store": store.url, "output": spec.output,
              "tasks_total": len(plan.tasks), "tasks_skipped": len(skip.tasks), "segments_total": len(plan.segments),
              "segments_skipped": len(skip.segments), "levels": 1 + max((t.level for t in plan.tasks), default=0),
              "latent_frames": plan.num_latent_frames, "frames": spec.num_frames, "workers": n_workers})
        try:
            execution = execute(client, plan, job, functions=functions, skip=skip, conditioning=conditioning,
                                progress=show)
        except RenderCancelled as err:
            _finish_run(store, run_id, RunState.cancelled, str(err))
            show({"event": "cancelled", "message": str(err)})
            raise
        except RenderError as err:
            _finish_run(store, run_id, RunState.failed, str(err))
            show({"event": "error", "message": str(err)})
            raise
        wall = time.monotonic() - wall_start
        timings = _timing_summary(execution.results, n_workers, wall, timings["startup_seconds"])
        record = store.output_record() or {}
        result = RenderResult(
            output=spec.output, store=store.url, frames=int(record.get("frames", spec.num_frames)), fps=spec.fps,
            run_id=run_id, wall_seconds=wall,
            tasks_run=sum(1 for r in execution.results if r["kind"] == "generate" and not r.get("reused")),
            tasks_skipped=len(skip.tasks),
            segments_run=sum(1 for r in execution.results if r["kind"] == "decode" and not r.get("reused")),
            segments_skipped=len(skip.segments), timings=timings,
            engine=",".join(sorted(e for e in engines if e)), workers=n_workers)
        _finish_run(store, run_id, RunState.completed, None, timings=timings)
        show({"event": "done", "output": spec.output, "frames": result.frames, "wall_seconds": round(wall, 3),
              "timings": {k: round(v, 4) for k, v in timings.items()}})
        return result
    except OSError as err:
        # Writing the store from this process (run records, layout) failed: a clear message, nothing lost.
        if store is not None:
            with contextlib.suppress(Exception):
                _finish_run(store, run_id, RunState.failed, str(err))
        show({"event": "error", "message": str(err)})
        raise RenderError(str(err), store=spec.store_path) from err
    except KeyboardInterrupt:
        if store is not None:
            with contextlib.suppress(Exception):
                _finish_run(store, run_id, RunState.cancelled, "interrupted")
        show({"event": "cancelled", "message": "interrupted"})
        raise RenderCancelled("the render was cancelled", store=spec.store_path) from None
    finally:
        show.close()
        session.close()


def _engine_in_use() -> dict:
    from cluster.worker import worker_info

    return worker_info()


def _finish_run(store: JobStore, run_id: str, state: RunState, error: str | None, **extra) -> None:
    runs = {r["run_id"]: r for r in store.runs()}
    record = dict(runs.get(run_id, {}))
    record.pop("run_id", None)
    record.update(state=state.value, finished=_now(), error=error, **extra)
    store.write_run_record(run_id, record)


def _timing_summary(results: list[dict], workers: int, wall: float, startup: float) -> dict:
    """Where the wall time went.

    ``<kind>_busy_seconds``: worker time per kind, summed over workers (decode split into decode and encode).
    ``<kind>_span_seconds``: wall-clock interval from the first start to the last finish of that kind (the
    spans of generation and decoding overlap: segments decode while later frames are generated).
    ``overhead_seconds``: wall time after start-up during which no task was running anywhere (planning,
    store checks, dispatch); ``startup_seconds``: cluster start and model load.
    """
    busy = {"condition": 0.0, "generate": 0.0, "decode": 0.0, "encode": 0.0, "mux": 0.0}
    spans: dict[str, list[float]] = {}
    for r in results:
        if r["kind"] == "decode":
            busy["decode"] += r.get("decode_seconds", r["seconds"])
            busy["encode"] += r.get("encode_seconds", 0.0)
        else:
            busy[r["kind"]] += r["seconds"]
        span = spans.setdefault(r["kind"], [r["started"], r["finished"]])
        span[0], span[1] = min(span[0], r["started"]), max(span[1], r["finished"])
    summary = {f"{k}_busy_seconds": v for k, v in busy.items()}
    summary.update({f"{k}_span_seconds": b - a for k, (a, b) in spans.items()})
    covered, end = 0.0, None
    for a, b in sorted((r["started"], r["finished"]) for r in results):
        if end is None or a > end:
            covered += b - a
            end = b
        elif b > end:
            covered += b - end
            end = b
    summary["startup_seconds"] = startup
    summary["overhead_seconds"] = max(0.0, wall - startup - covered)
    summary["wall_seconds"] = wall
    summary["workers"] = workers
    return summary


def resume(store_path: str, *, scheduler: str | None = None, workers: int | None = None,
           engine: str = "deepspeed", progress=None, backend: str = "local",
           adapt: tuple[int, int] | None = None, functions: TaskFunctions | None = None) -> RenderResult:
    """Finish the job recorded in `store_path`: same spec, same plan; only what is not done runs."""
    try:
        store = JobStore.open(store_path, read_only=True)
    except StoreError as err:
        raise SpecError([("store", store_path, str(err).split(": ")[-1] if ": " in str(err) else str(err))]) from None
    spec_data = dict(store.spec)
    spec_data["store"] = store_path
    spec = JobSpec.parse(spec_data)
    return render(spec, scheduler=scheduler, workers=workers, engine=engine, progress=progress,
                  backend=backend, adapt=adapt, functions=functions)


def job_status(store_path: str) -> dict:
    """Progress recorded in a job store: tasks done per level, segments, output, and the run history."""
    from orchestrator.plan import Plan

    store = JobStore.open(store_path, read_only=True)
    plan = Plan.from_dict(store.plan)
    done = store.done_tasks(plan.tasks)
    levels: dict[int, dict] = {}
    for task in plan.tasks:
        entry = levels.setdefault(task.level, {"level": task.level, "tasks": 0, "done": 0})
        entry["tasks"] += 1
        entry["done"] += task.task_id in done
    segments_done = sum(store.segment_done(s.segment_id) for s in plan.segments)
    output_done = store.output_done()
    runs = store.runs()
    if output_done:
        state = "completed"
    elif runs and runs[-1].get("state") == RunState.running.value:
        state = "running or interrupted"
    elif done or segments_done:
        state = "incomplete"
    else:
        state = "not started"
    spec = store.spec
    return {
        "store": store_path,
        "state": state,
        "prompt": spec.get("prompt"),
        "output": spec.get("output"),
        "seconds": spec.get("seconds"),
        "fps": spec.get("fps"),
        "model": store.model,
        "schedule": plan.scheme,
        "latent_frames": plan.num_latent_frames,
        "tasks": len(plan.tasks),
        "tasks_done": len(done),
        "levels": [levels[k] for k in sorted(levels)],
        "segments": len(plan.segments),
        "segments_done": segments_done,
        "output_done": output_done,
        "output_record": store.output_record(),
        "runs": runs,
    }
