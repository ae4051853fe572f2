"""Tests of the generation planner: FDM reference sequences, plan invariants for every scheme, JSON, errors."""
import json
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from orchestrator.plan import (
    FDM_SCHEMES, SCHEMES, DecodeSegment, GenerationTask, Plan, PlanError, fdm_stages, make_plan,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def latents_for(num_frames: int) -> int:
    return 1 + math.ceil((num_frames - 1) / 4)


def plan_for(scheme, num_frames, window, given=(), decode_context=2, segment_latents=8, **options):
    return make_plan(scheme, latents_for(num_frames), window, given=given, num_frames=num_frames,
                     decode_context=decode_context, segment_latents=segment_latents, **options)


def check_plan(plan: Plan, num_frames: int, decode_context: int, segment_latents: int) -> None:
    """Every invariant a plan promises, checked from first principles."""
    num_latent, window, given = plan.num_latent_frames, plan.max_window, set(plan.given)
    ids = [t.task_id for t in plan.tasks]
    assert len(ids) == len(set(ids)), "task ids are unique"

    producer: dict[int, str] = {}
    position: dict[str, int] = {}
    level_of: dict[str, int] = {}
    for i, task in enumerate(plan.tasks):
        assert task.latent, f"{task.task_id} generates something"
        assert list(task.latent) == sorted(set(task.latent)) and list(task.observed) == sorted(set(task.observed))
        assert not set(task.latent) & set(task.observed)
        assert len(task.observed) + len(task.latent) <= window, f"{task.task_id} window exceeds K={window}"
        for t in task.observed:  # observed frames exist before the task runs ...
            assert t in given or t in producer, f"{task.task_id} observes frame {t} before it is generated"
        # ... and the task depends on exactly the tasks that generated them, all earlier in the plan (acyclic)
        assert set(task.depends_on) == {producer[t] for t in task.observed if t not in given}
        assert len(task.depends_on) == len(set(task.depends_on))
        assert all(d in position for d in task.depends_on), "tasks are in topological order"
        for t in task.latent:
            assert 0 <= t < num_latent and t not in given, f"{task.task_id} regenerates frame {t}"
            assert t not in producer, f"frame {t} generated twice"
            producer[t] = task.task_id
        if plan.scheme == "parallel":
            # tasks of one level never observe frames of that level, so a level runs concurrently
            assert all(level_of[d] < task.level for d in task.depends_on)
        assert all(level_of[d] <= task.level for d in task.depends_on)
        position[task.task_id], level_of[task.task_id] = i, task.level
    assert set(producer) | given == set(range(num_latent)), "every latent frame is given or generated"

    stops = [0]
    for i, seg in enumerate(plan.segments):
        assert seg.segment_id == f"S{i:04d}"
        assert seg.latent_start == stops[-1] and seg.latent_start < seg.latent_stop <= num_latent
        assert seg.latent_stop - seg.latent_start <= segment_latents
        assert seg.latent_stop - seg.latent_start == segment_latents or seg.latent_stop == num_latent
        assert seg.context_start == max(0, seg.latent_start - decode_context)
        frames = [f for t in range(seg.latent_start, seg.latent_stop)
                  for f in ([0] if t == 0 else range(4 * t - 3, 4 * t + 1)) if f < num_frames]
        assert (seg.frame_start, seg.frame_stop) == (frames[0], frames[-1] + 1)
        needed = {producer[t] for t in range(seg.context_start, seg.latent_stop) if t in producer}
        assert set(seg.depends_on) == needed and len(seg.depends_on) == len(needed)
        stops.append(seg.latent_stop)
    assert stops[-1] == num_latent and plan.segments[-1].frame_stop == num_frames

    path = plan.critical_path()
    for earlier, later in zip(path, path[1:]):
        assert earlier in plan.task(later).depends_on
    longest: dict[str, int] = {}
    for task in plan.tasks:
        longest[task.task_id] = 1 + max((longest[d] for d in task.depends_on), default=0)
    assert len(path) == max(longest.values(), default=0)


# ---------------------------------------------------------------------------------------------------------
# FDM reference sequences. Each expectation was worked out by hand by stepping through the published
# sampling_schemes.py of plai-group/flexible-video-diffusion-modeling (reasoning noted per case), and
# agrees with running that file.


def test_infill_is_closed_on_both_sides():
    from orchestrator.plan import fills_gap

    assert fills_gap([0, 6, 40], [1, 2, 3])
    assert not fills_gap([0, 1, 2], [3, 4]), "an extension forwards"
    assert not fills_gap([5, 9], [0, 1]), "an extension backwards"
    assert not fills_gap([], [0, 8]), "keyframes"
    parallel = plan_for("parallel", 157, 8)
    assert {fills_gap(t.observed, t.latent) for t in parallel.tasks if t.level > 0} == {True}
    assert not any(fills_gap(t.observed, t.latent) for t in plan_for("autoregressive", 157, 8).tasks)


def test_autoregressive_observes_the_latest_frames():
    # observe sorted(done)[-(max_frames - step_size):] = the latest 2, then generate the next 3 (cut at the end)
    assert fdm_stages("autoregressive", 10, 2, 5, 3) == [
        ([0, 1], [2, 3, 4]), ([3, 4], [5, 6, 7]), ([6, 7], [8, 9])]


def test_autoregressive_without_observed_frames_starts_with_a_full_window():
    # num_obs == 0: the first stage generates range(max_frames) with nothing observed
    assert fdm_stages("autoregressive", 7, 0, 4, 2) == [([], [0, 1, 2, 3]), ([2, 3], [4, 5]), ([4, 5], [6])]


def test_long_range_mixes_latest_and_first_frames():
    # 4 observed: the latest 4 // 2 = 2 frames, then first frames (1, then 0) until 4 are chosen
    assert fdm_stages("long-range", 12, 2, 6, 2) == [
        ([0, 1], [2, 3]), ([0, 1, 2, 3], [4, 5]), ([0, 1, 4, 5], [6, 7]), ([0, 1, 6, 7], [8, 9]),
        ([0, 1, 8, 9], [10, 11])]
    # with more first frames than slots, the latest first frames win: 3 and 2 join the recent 2 frames
    assert fdm_stages("long-range", 10, 4, 6, 2) == [
        ([0, 1, 2, 3], [4, 5]), ([2, 3, 4, 5], [6, 7]), ([2, 3, 6, 7], [8, 9])]
    # unconditional: the first window range(5) plays the part of the first frames; 3 observed = 1 recent + 2
    assert fdm_stages("long-range", 12, 0, 5, 2) == [
        ([], [0, 1, 2, 3, 4]), ([2, 3, 4], [5, 6]), ([3, 4, 6], [7, 8]), ([3, 4, 8], [9, 10]), ([3, 4, 10], [11])]


def test_hierarchy_2_keyframes_then_sweep():
    # level 1: spacing (20 - 2) / (3 - 1) = 9; latents int(linspace(2, 19.999, 3)) = [2, 10, 19]; observed
    # int(linspace(0, 1.999, 3)) = [0, 0, 1] (the repeat is the reference's). The cursor 19 + 9 is past the end,
    # so level 2 (spacing 9 ** 0 = 1) sweeps from the first missing frame 3: three latents, the nearest known
    # frame after them (half the 3 slots, rounded down), then the nearest before; frames between latents come
    # first ([10] in the fourth stage).
    assert fdm_stages("hierarchy-2", 20, 2, 6, 3) == [
        ([0, 0, 1], [2, 10, 19]), ([10, 2, 1], [3, 4, 5]), ([10, 5, 4], [6, 7, 8]), ([10, 19, 8], [9, 11, 12]),
        ([19, 12, 11], [13, 14, 15]), ([19, 15, 14], [16, 17, 18])]


def test_hierarchy_3_middle_level_and_step_reduction():
    # Same first stage. Level 2 spacing int(9 ** 0.5) = 3 from 3 - 1 + 3 = 5: [5, 8, 11] with 10 between them,
    # then [14, 17]. Level 3 (spacing 1): [3, 4, 6] (5 is known, observed between). Next [7, 9, 12] would leave
    # 8, 10, 11 between them and fewer than 2 slots for frames around, so the reference retries with
    # step_size 2: [7, 9], observing 8, then 10 after and 6, 5 before.
    assert fdm_stages("hierarchy-3", 20, 2, 6, 3) == [
        ([0, 0, 1], [2, 10, 19]), ([10, 19, 2], [5, 8, 11]), ([19, 11, 10], [14, 17]), ([5, 8, 2], [3, 4, 6]),
        ([8, 10, 6, 5], [7, 9]), ([14, 17, 11], [12, 13, 15]), ([17, 19, 15], [16, 18])]


def test_hierarchy_without_observed_frames():
    # first stage: int(linspace(0, 9, 4)) = [0, 3, 6, 9]; level 1 spacing (10 - 4) / 1 = 6 puts the cursor past
    # the end, so level 2 fills each gap observing one frame after and one before
    assert fdm_stages("hierarchy-2", 10, 0, 4, 2) == [
        ([], [0, 3, 6, 9]), ([3, 0], [1, 2]), ([6, 3], [4, 5]), ([9, 6], [7, 8])]


@pytest.mark.parametrize("scheme, args, field", [
    ("zigzag", (10, 1, 4, 2), "scheme"),
    ("autoregressive", (0, 0, 4, 2), "video_length"),
    ("autoregressive", (10, 11, 4, 2), "num_obs"),
    ("autoregressive", (10, 1, 1, 1), "max_frames"),
    ("autoregressive", (10, 1, 4, 4), "step_size"),
    ("autoregressive", (3, 0, 4, 2), "max_frames"),  # the first unconditional window does not fit the video
    ("long-range", (10, 1, 4, 3), "step_size"),  # one observed frame: the reference's slicing breaks down
    ("hierarchy-2", (10, 1, 4, 1), "step_size"),  # keyframe spacing divides by step_size - 1
    ("hierarchy-3", (6, 0, 4, 3), "step_size"),  # the reference itself fails on this one
])
def test_fdm_stages_rejects_arguments_outside_the_reference_range(scheme, args, field):
    with pytest.raises(ValueError, match=field):
        fdm_stages(scheme, *args)


@FAST
@given(scheme=st.sampled_from(FDM_SCHEMES), video_length=st.integers(1, 120), max_frames=st.integers(3, 20),
       data=st.data())
def test_fdm_stages_are_consistent(scheme, video_length, max_frames, data):
    low = 2 if scheme.startswith("hierarchy") else 1
    step = data.draw(st.integers(low, max_frames - (2 if scheme == "long-range" else 1)))
    num_obs = data.draw(st.integers(0 if max_frames <= video_length else 1, video_length))
    try:
        stages = fdm_stages(scheme, video_length, num_obs, max_frames, step)
    except PlanError as error:
        assume(scheme.startswith("hierarchy") and "FDM hierarchy" in str(error))
        return
    done = set(range(num_obs))
    for observed, latent in stages:
        assert set(observed) <= done and not set(latent) & done
        assert len(observed) + len(latent) <= max_frames
        done |= set(latent)
    assert done == set(range(video_length))


# ---------------------------------------------------------------------------------------------------------
# Plans for every scheme


conditioning = st.sampled_from(["none", "first", "last", "both", "clip", "random"])


def given_frames(kind, num_latent, data):
    if kind == "first":
        return (0,)
    if kind == "last":
        return (num_latent - 1,)
    if kind == "both":
        return (0, num_latent - 1)
    if kind == "clip":  # extending a clip forward
        return tuple(range(data.draw(st.integers(1, num_latent))))
    if kind == "random":
        return tuple(data.draw(st.sets(st.integers(0, num_latent - 1), max_size=12)))
    return ()


@FAST
@given(num_frames=st.integers(1, 1300), window=st.integers(3, 24), kind=conditioning,
       decode_context=st.integers(0, 6), segment_latents=st.integers(1, 40), data=st.data())
def test_parallel_plan_invariants(num_frames, window, kind, decode_context, segment_latents, data):
    num_latent = latents_for(num_frames)
    frames = given_frames(kind, num_latent, data)
    options = data.draw(st.fixed_dictionaries({}, optional={
        "context_frames": st.integers(0, window - 3), "keyframe_conditioning": st.integers(0, window - 2)}))
    plan = make_plan("parallel", num_latent, window, given=frames, num_frames=num_frames,
                     decode_context=decode_context, segment_latents=segment_latents, **options)
    check_plan(plan, num_frames, decode_context, segment_latents)
    if plan.tasks:
        assert [t.level for t in plan.tasks] == sorted(t.level for t in plan.tasks)
        # the level-0 keyframe task observes only given frames, and the video's ends are known after it
        keyframes = plan.tasks[0]
        assert keyframes.level == 0 and set(keyframes.observed) <= set(frames)
        options = plan.scheme_options
        assert len(keyframes.observed) == min(len(frames), options["keyframe_conditioning"])
        if len(frames) <= options["context_frames"]:  # few given frames: every infill task sees all of them
            assert all(set(frames) <= set(t.observed) for t in plan.tasks[1:])
        assert {0, num_latent - 1} <= set(keyframes.latent) | set(frames)
        # each gap of a level is split from a gap of the level before, so the chain runs through every level;
        # only gaps between two given frames can skip depending on the keyframe task
        levels = len(plan.levels())
        assert len(plan.critical_path()) in ((levels,) if not frames else (levels - 1, levels))


@FAST
@given(scheme=st.sampled_from(FDM_SCHEMES), num_frames=st.integers(1, 700), window=st.integers(3, 20),
       decode_context=st.integers(0, 4), segment_latents=st.integers(1, 24), data=st.data())
def test_fdm_plan_invariants(scheme, num_frames, window, decode_context, segment_latents, data):
    num_latent = latents_for(num_frames)
    prefix = tuple(range(data.draw(st.integers(0, min(num_latent, 2 * window)))))
    try:
        plan = make_plan(scheme, num_latent, window, given=prefix, num_frames=num_frames,
                         decode_context=decode_context, segment_latents=segment_latents)
    except PlanError as error:  # small windows the published hierarchy cannot sample (see fdm_stages)
        assume(scheme.startswith("hierarchy") and "FDM hierarchy" in str(error))
        return
    check_plan(plan, num_frames, decode_context, segment_latents)
    # one task per stage of the published scheme (a video that fits one window is one unconditional stage)
    if prefix or num_latent > window:
        stages = fdm_stages(scheme, num_latent, len(prefix), window, plan.scheme_options["step_size"])
        assert [(list(t.observed), list(t.latent)) for t in plan.tasks] == [
            (sorted(set(o)), sorted(set(lat))) for o, lat in stages]


@pytest.mark.parametrize("scheme", FDM_SCHEMES)
def test_fdm_schemes_plan_realistic_windows(scheme):
    for window in (8, 12, 16, 24):
        for num_frames in (9, 97, 241, 1440):
            for prefix in (0, 1, 2, 5):
                plan = plan_for(scheme, num_frames, window, given=range(min(prefix, latents_for(num_frames))))
                check_plan(plan, num_frames, 2, 8)


def test_sixty_seconds_parallel_is_a_few_levels_autoregressive_is_dozens():
    num_frames = 60 * 24
    assert latents_for(num_frames) == 361
    parallel = plan_for("parallel", num_frames, 16, given=(0,), segment_latents=16)
    autoregressive = plan_for("autoregressive", num_frames, 16, given=(0,), segment_latents=16)
    check_plan(parallel, num_frames, 2, 16)
    check_plan(autoregressive, num_frames, 2, 16)
    assert len(parallel.critical_path()) <= 4
    assert len(autoregressive.critical_path()) >= 20
    assert len(parallel.levels()[1]) >= 10, "infill of one level runs as many concurrent tasks"


def test_ten_minutes_parallel_stays_shallow():
    plan = plan_for("parallel", 600 * 24, 16, segment_latents=16)
    check_plan(plan, 600 * 24, 2, 16)
    assert len(plan.critical_path()) <= 5
    assert "critical path: 4 tasks" in plan.summary()


def test_keyframe_task_spreads_over_the_video_and_observes_the_given_image():
    plan = plan_for("parallel", 1440, 16, given=(0,))
    keyframes = plan.tasks[0]
    assert keyframes.observed == (0,) and len(keyframes.latent) == 15
    assert keyframes.latent[-1] == 360 and max(b - a for a, b in zip((0,) + keyframes.latent, keyframes.latent)) == 24


def test_infill_tasks_observe_gap_bounds_and_the_given_frames():
    # a seamless loop: the first and last frames are the same given image; every infill task sees both
    plan = plan_for("parallel", 1440, 16, given=(0, 360))
    known = {0, 360}
    for level, tasks in plan.levels().items():
        for task in tasks[level == 0:]:
            assert {0, 360} <= set(task.observed)
            # a task fills part of one gap between frames known before its level, and observes both its bounds
            assert not any(task.latent[0] < t < task.latent[-1] for t in known)
            assert max(t for t in known if t < task.latent[0]) in task.observed
            assert min(t for t in known if t > task.latent[-1]) in task.observed
        known |= {t for task in tasks for t in task.latent}


def test_extension_keyframe_task_observes_a_bounded_spread_of_the_clip():
    plan = plan_for("parallel", 1440, 16, given=range(40), keyframe_conditioning=4)
    assert plan.tasks[0].observed == (0, 13, 26, 39)
    assert min(plan.tasks[0].latent) > 39 and max(plan.tasks[0].latent) == 360


def test_all_frames_given_needs_no_generation():
    plan = plan_for("parallel", 9, 4, given=range(3))
    assert plan.tasks == () and plan.critical_path() == [] and all(s.depends_on == () for s in plan.segments)


def test_autoregressive_causal_option_reaches_the_tasks():
    plan = plan_for("autoregressive", 97, 8, given=(0,), causal=True, step_size=3)
    assert plan.scheme_options == {"step_size": 3, "causal": True}
    assert all(t.causal for t in plan.tasks) and all(len(t.latent) <= 3 for t in plan.tasks)


def test_plan_json_round_trip():
    for scheme in SCHEMES:
        plan = plan_for(scheme, 241, 12, given=(0,), decode_context=3, segment_latents=7)
        restored = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
        assert restored == plan
        assert isinstance(restored.tasks[0], GenerationTask) and isinstance(restored.segments[0], DecodeSegment)
        assert isinstance(restored.tasks[-1].observed, tuple)
    with pytest.raises(ValueError, match="format"):
        Plan.from_dict({**plan.to_dict(), "format": 99})
    broken = plan.to_dict()
    del broken["tasks"][0]["latent"]
    with pytest.raises(ValueError, match="latent"):
        Plan.from_dict(broken)


def test_summary_lists_levels_and_critical_path():
    text = plan_for("parallel", 1440, 16, given=(0,)).summary()
    assert "level 0: 1 task," in text and "level 1: 15 tasks" in text and "critical path: 3 tasks" in text


@pytest.mark.parametrize("changes, field", [
    ({"scheme": "spiral"}, "scheme"),
    ({"num_latent_frames": 0, "num_frames": 1}, "num_latent_frames"),
    ({"num_latent_frames": 5}, "num_latent_frames"),  # 41 video frames have 11 latent frames
    ({"max_window": 2}, "max_window"),
    ({"max_window": 16.0}, "max_window"),
    ({"num_frames": 0}, "num_frames"),
    ({"given": (0, 11)}, "given"),
    ({"given": (-1,)}, "given"),
    ({"decode_context": -1}, "decode_context"),
    ({"segment_latents": 0}, "segment_latents"),
    ({"context_frames": 14}, "context_frames"),
    ({"keyframe_conditioning": 15}, "keyframe_conditioning"),
    ({"step_size": 4}, "step_size"),  # not an option of the parallel scheme
    ({"scheme": "autoregressive", "given": (0, 10)}, "given"),  # FDM conditions on a prefix only
    ({"scheme": "autoregressive", "step_size": 16}, "step_size"),
    ({"scheme": "hierarchy-2", "step_size": 1}, "step_size"),
    ({"scheme": "long-range", "causal": "yes"}, "causal"),
    ({"scheme": "hierarchy-3", "causal": True}, "causal"),
])
def test_bad_inputs_name_the_field(changes, field):
    arguments = {"scheme": "parallel", "num_latent_frames": 11, "max_window": 16, "given": (0,),
                 "num_frames": 41, "decode_context": 2, "segment_latents": 4, **changes}
    scheme, num_latent, window = (arguments.pop(k) for k in ("scheme", "num_latent_frames", "max_window"))
    with pytest.raises(ValueError, match=field) as error:
        make_plan(scheme, num_latent, window, **arguments)
    assert isinstance(error.value, PlanError) and error.value.field == field


# ---------------------------------------------------------------------------------------------------------
# Refinement


@FAST
@given(scheme=st.sampled_from(SCHEMES), num_frames=st.integers(1, 700), window=st.integers(3, 20),
       decode_context=st.integers(0, 6), segment_latents=st.integers(1, 40), data=st.data())
def test_refinement_pass_invariants(scheme, num_frames, window, decode_context, segment_latents, data):
    num_latent = latents_for(num_frames)
    frames = given_frames(data.draw(st.sampled_from(["none", "first", "both", "random"] if scheme == "parallel"
                                                   else ["none", "clip"])), num_latent, data)
    args = dict(given=frames, num_frames=num_frames, decode_context=decode_context, segment_latents=segment_latents)
    try:
        plain = make_plan(scheme, num_latent, window, **args)
    except PlanError:  # a window too small for the scheme; test_bad_inputs_name_the_field covers those
        assume(False)
    plan = make_plan(scheme, num_latent, window, refine=True, **args)
    drafts = [t for t in plan.tasks if not t.refine]
    refinement = [t for t in plan.tasks if t.refine]
    assert tuple(drafts) == plain.tasks and plan.refines == bool(refinement) and not plain.refines
    assert "refine" not in json.dumps(plain.to_dict())  # unrefined plans read as they did before refinement
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan

    drafted = {t: task.task_id for task in drafts for t in task.latent}
    refined: dict[int, str] = {}  # frame -> the last refinement task to write it
    first_level = 1 + max((t.level for t in drafts), default=-1)
    for task in refinement:
        assert task.task_id.startswith(f"R{task.level - first_level}-") and task.level in (first_level, first_level + 1)
        assert len(task.observed) + len(task.latent) <= window and not set(task.observed) & set(task.latent)
        for t in task.observed:  # given, or refined by the pass before
            assert t in plan.given or (t in refined and plan.task(refined[t]).level < task.level)
        if task.level == first_level:
            assert set(task.observed) <= set(plan.given) and not task.takes_over
        assert set(task.takes_over) <= set(task.latent) and set(task.handed_over) <= set(task.latent)
        assert set(task.depends_on) == ({drafted[t] for t in task.latent}
                                        | {refined[t] for t in (*task.takes_over, *task.observed) if t not in plan.given})
        for t in task.latent:
            assert t not in plan.given, f"given frame {t} refined"
            if t in task.takes_over:  # taken over from pass 0, once
                assert plan.task(refined[t]).level == first_level and t in plan.task(refined[t]).handed_over
            else:
                assert t not in refined, f"frame {t} refined twice"
            refined[t] = task.task_id
    assert refined.keys() == drafted.keys(), "every generated frame is refined"
    for task in refinement:
        taken = {t for other in refinement for t in other.takes_over if t in task.latent and other is not task}
        assert set(task.handed_over) == taken and (task.kept or not task.latent)
        assert all(refined[t] == task.task_id for t in task.kept)
        for other in refinement:  # tasks of one pass run at once: none writes what another reads or writes
            if other.level == task.level and other is not task:
                assert not set(task.latent) & (set(other.latent) | set(other.observed) | set(other.takes_over))
    for seg in plan.segments:  # a segment decodes refined frames, so waits for their refinement only
        assert set(seg.depends_on) == {refined[t] for t in range(seg.context_start, seg.latent_stop) if t in refined}
    if refinement:
        assert len(plan.critical_path()) in (len(plain.critical_path()) + 1, len(plain.critical_path()) + 2)
        abutting = make_plan(scheme, num_latent, window, refine=True, refine_layout="abutting", **args)
        assert not any(t.takes_over or t.handed_over for t in abutting.tasks)
        assert {t for task in abutting.tasks if task.refine for t in task.latent} == drafted.keys()


def test_refinement_blocks_straddle_the_generation_tasks_borders():
    plan = plan_for("parallel", 385, 16, refine=True)  # 16 s at 24 fps: 97 latent frames
    drafts = {t: task.task_id for task in plan.tasks if not task.refine for t in task.latent}
    refinement = [t for t in plan.tasks if t.refine]
    # pass 0: blocks of 16 frames alone; pass 1: the 8 frames between and the 2 at either end of its pass-0
    # neighbours, observing the 2 beyond those (the last pass-0 block, 1 frame, went to the pass-1 window before)
    assert [(t.latent[0], t.latent[-1]) for t in refinement] == [
        (0, 15), (24, 39), (48, 63), (72, 87), (14, 25), (38, 49), (62, 73), (86, 96)]
    assert refinement[4].observed == (12, 13, 26, 27) and refinement[4].takes_over == (14, 15, 24, 25)
    assert refinement[1].handed_over == (24, 25, 38, 39) and refinement[1].kept == tuple(range(26, 38))
    assert refinement[7].observed == (84, 85) and refinement[7].takes_over == (86, 87)
    borders = [t for t in range(1, 97) if drafts[t] != drafts[t - 1]]
    inside = [t for t in borders if any(t - 1 in r.latent and t in r.latent for r in refinement)]
    assert len(inside) == len(borders)  # every generation border lies inside one refinement window
    assert "level 2 (refinement): 4 tasks" in plan.summary()
    # stored plans made before pass 1 took frames over are remade exactly
    abutting = plan_for("parallel", 385, 16, refine=True, refine_layout="abutting")
    earlier = [t for t in abutting.tasks if t.refine]
    assert [t.latent[0] for t in earlier] == [0, 24, 48, 72, 96, 12, 36, 60, 84]
    assert earlier[5].observed == (10, 11, 24, 25) and earlier[5].latent == tuple(range(12, 24))
    assert "level 2 (refinement): 5 tasks" in abutting.summary()
    with pytest.raises(PlanError, match="refine_layout"):
        plan_for("parallel", 385, 16, refine=True, refine_layout="tiled")


