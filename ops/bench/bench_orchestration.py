"""Orchestration efficiency: the real scheduling path with simulated model work.

The plan of a real job (parallel scheme, demo-model window) runs through `orchestrator.run.execute` on a real
local cluster of worker processes, but each task sleeps for the time a cost model gives it instead of running
the model: generation time is proportional to the frames in the task's window, decode time to the latent
frames it decodes (context included), and the mux takes a fixed time. Sleeping tasks let 16 workers share 2
cores without disturbing the measurement.

For each (job, workers) it reports:
  work_s       sum of all task costs
  bound_cp_s   the critical path: longest dependency chain (generation -> decode -> mux) weighted by cost
  bound_s      max(bound_cp_s, work_s / workers): no schedule can finish sooner
  wall_s       measured, from the first submission to the last result
  efficiency   bound_s / wall_s (1.0 would need a perfect schedule of a perfectly divisible job)
  list_schedule_s        makespan of a zero-overhead greedy schedule of this plan with the same priorities:
                         the level barriers of the plan make it longer than bound_s when levels do not
                         divide evenly over the workers
  efficiency_vs_list_schedule   list_schedule_s / wall_s: what the orchestration itself loses
  overhead_ms_per_task   mean time a worker sat idle before a task although the task was ready and the worker
                         free (scheduler round trips, serialisation, dispatch)
  idle_ms_per_task       (wall_s * workers - work_s) / tasks: all idle time, including what the DAG's shape forces

Run:  python ops/bench/bench_orchestration.py [--workers 1 4 16] [--seconds 60 600] [--out results.json]
  or: longshot bench orchestration ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from orchestrator.plan import make_plan
from orchestrator.run import Skip, TaskFunctions, execute, segment_latents_for


def _sleep_result(kind: str, ident: str, seconds: float) -> dict:
    import os

    started = time.time()
    time.sleep(seconds)
    finished = time.time()
    return {"kind": kind, "id": ident, "started": started, "finished": finished, "seconds": finished - started,
            "pid": os.getpid()}


def sim_condition(inputs, job):
    return _sleep_result("condition", "given", job["cost"]["fixed_s"])


def sim_generate(task, job, *dependencies):
    cost = job["cost"]["frame_s"] * (len(task["observed"]) + len(task["latent"]))
    return _sleep_result("generate", task["task_id"], cost)


def sim_decode(segment, job, *dependencies):
    cost = job["cost"]["decode_frame_s"] * (segment["latent_stop"] - segment["context_start"])
    return _sleep_result("decode", segment["segment_id"], cost)


def sim_mux(segment_ids, job, *dependencies):
    return _sleep_result("mux", "output", job["cost"]["fixed_s"])


SIMULATED = TaskFunctions(condition=sim_condition, generate=sim_generate, decode=sim_decode, mux=sim_mux)


def task_costs(plan, cost: dict) -> dict:
    costs = {t.task_id: cost["frame_s"] * t.window for t in plan.tasks}
    costs.update({s.segment_id: cost["decode_frame_s"] * (s.latent_stop - s.context_start) for s in plan.segments})
    costs["output"] = cost["fixed_s"]
    return costs


def critical_path_seconds(plan, costs: dict) -> float:
    finish: dict[str, float] = {}
    for task in plan.tasks:  # topological order
        finish[task.task_id] = costs[task.task_id] + max((finish[d] for d in task.depends_on), default=0.0)
    decode_end = 0.0
    for segment in plan.segments:
        end = costs[segment.segment_id] + max((finish[d] for d in segment.depends_on), default=0.0)
        decode_end = max(decode_end, end)
    return decode_end + costs["output"]


def list_schedule_seconds(plan, costs: dict, workers: int) -> float:
    """Makespan of a zero-overhead greedy schedule with the orchestrator's priorities: whenever a worker is
    free it starts the highest-priority ready step. What this plan could take with instant dispatch."""
    import heapq

    from orchestrator.run import Skip, TaskFunctions, plan_steps

    steps = plan_steps(plan, {"run_id": "simulated"}, TaskFunctions(), Skip())
    waiting = {ident: set(step.waits_for) for ident, step in steps.items()}
    children: dict[str, list[str]] = {}
    for ident, deps in waiting.items():
        for dep in deps:
            children.setdefault(dep, []).append(ident)
    ready = [(-steps[i].priority, i) for i, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    running: list[tuple[float, str]] = []
    now, free = 0.0, workers
    mux_running = []  # the mux needs no model worker
    while ready or running:
        while ready and (free > 0 or steps[ready[0][1]].resources is None):
            _, ident = heapq.heappop(ready)
            if steps[ident].resources is not None:
                free -= 1
            heapq.heappush(running, (now + costs[ident], ident))
        now, ident = heapq.heappop(running)
        if steps[ident].resources is not None:
            free += 1
        for child in children.get(ident, ()):
            waiting[child].discard(ident)
            if not waiting[child]:
                heapq.heappush(ready, (-steps[child].priority, child))
    return now


def dispatch_gaps(plan, results: list[dict]) -> list[float]:
    """Per task: how long its worker idled although the task's inputs were done and the worker was free."""
    by_id = {r["id"]: r for r in results}
    deps = {t.task_id: t.depends_on for t in plan.tasks}
    deps.update({s.segment_id: s.depends_on for s in plan.segments})
    deps["output"] = tuple(s.segment_id for s in plan.segments)
    gaps = []
    by_worker: dict[int, list[dict]] = {}
    for r in results:
        by_worker.setdefault(r["pid"], []).append(r)
    for runs in by_worker.values():
        runs.sort(key=lambda r: r["started"])
        previous_end = None
        for r in runs:
            ready = max((by_id[d]["finished"] for d in deps.get(r["id"], ()) if d in by_id), default=None)
            candidates = [t for t in (ready, previous_end) if t is not None]
            if candidates:
                gaps.append(max(0.0, r["started"] - max(candidates)))
            previous_end = r["finished"]
    return gaps


def run_case(client, seconds: int, fps: int, window: int, decode_context: int, workers: int, cost: dict,
             lookahead: int | None = None) -> dict:
    num_frames = seconds * fps
    num_latent = 1 + -(-(num_frames - 1) // 4)
    plan = make_plan("parallel", num_latent, window, num_frames=num_frames, decode_context=decode_context,
                     segment_latents=segment_latents_for(fps))
    job = {"run_id": uuid.uuid4().hex, "num_frames": num_frames, "cost": cost}
    costs = task_costs(plan, cost)
    work = sum(costs.values())
    bound_cp = critical_path_seconds(plan, costs)
    bound = max(bound_cp, work / workers)
    scheduled = list_schedule_seconds(plan, costs, workers)
    started = time.perf_counter()
    execution = execute(client, plan, job, functions=SIMULATED, skip=Skip(), lookahead=lookahead)
    wall = time.perf_counter() - started
    gaps = dispatch_gaps(plan, execution.results)
    tasks = len(execution.results)
    gaps_sorted = sorted(gaps)
    return {
        "video_seconds": seconds, "fps": fps, "workers": workers, "latent_frames": num_latent,
        "generation_tasks": len(plan.tasks), "decode_segments": len(plan.segments), "tasks": tasks,
        "levels": 1 + max(t.level for t in plan.tasks), "critical_path_tasks": len(plan.critical_path()),
        "work_s": round(work, 3), "bound_cp_s": round(bound_cp, 3), "bound_s": round(bound, 3),
        "list_schedule_s": round(scheduled, 3),
        "wall_s": round(wall, 3), "efficiency": round(bound / wall, 4),
        "efficiency_vs_list_schedule": round(scheduled / wall, 4),
        "overhead_ms_per_task": round(1000 * sum(gaps) / max(1, len(gaps)), 3),
        "overhead_ms_p95": round(1000 * gaps_sorted[int(0.95 * (len(gaps_sorted) - 1))], 3) if gaps else 0.0,
        "idle_ms_per_task": round(1000 * (wall * workers - work) / tasks, 3),
    }


def main(argv: list[str] | None = None) -> int:
    import cloudpickle

    from cluster.backends import connect

    parser = argparse.ArgumentParser(prog="longshot bench orchestration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=int, nargs="+", default=[60, 600], help="video lengths to plan")
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--window", type=int, default=16, help="K (the demo model's max_window)")
    parser.add_argument("--decode-context", type=int, default=4, help="the demo model's decode context")
    parser.add_argument("--frame-ms", type=float, default=20.0, help="generation cost per window frame")
    parser.add_argument("--decode-frame-ms", type=float, default=10.0, help="decode cost per latent frame")
    parser.add_argument("--fixed-ms", type=float, default=50.0, help="mux / conditioning cost")
    parser.add_argument("--lookahead", type=int, default=None,
                        help="model steps handed to Dask beyond the GPU slots (default: half the slots; see "
                             "orchestrator.run.execute)")
    parser.add_argument("--out", help="write the JSON results here as well as to stdout")
    args = parser.parse_args(argv)
    # Worker processes cannot import this script by name; ship its task functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cost = {"frame_s": args.frame_ms / 1000, "decode_frame_s": args.decode_frame_ms / 1000,
            "fixed_s": args.fixed_ms / 1000}
    results = []
    for workers in args.workers:
        with connect(workers=workers) as session:
            # Warm-up: the first tasks pay for imports and connections in every worker.
            run_case(session.client, 2, args.fps, args.window, args.decode_context, workers,
                     {"frame_s": 0.001, "decode_frame_s": 0.001, "fixed_s": 0.001})
            for seconds in args.seconds:
                result = run_case(session.client, seconds, args.fps, args.window, args.decode_context, workers,
                                  cost, args.lookahead)
                result["lookahead"] = args.lookahead
                result["cost_model_ms"] = {"frame": args.frame_ms, "decode_frame": args.decode_frame_ms,
                                           "fixed": args.fixed_ms}
                results.append(result)
                print(f"{seconds:5d} s video, {workers:2d} workers: {result['tasks']:4d} tasks, "
                      f"wall {result['wall_s']:7.2f} s, bound {result['bound_s']:7.2f} s "
                      f"(critical path {result['bound_cp_s']:.2f} s, work/workers {result['work_s'] / workers:.2f} s), "
                      f"efficiency {100 * result['efficiency']:5.1f}% "
                      f"(vs a zero-overhead schedule of {result['list_schedule_s']:.2f} s: "
                      f"{100 * result['efficiency_vs_list_schedule']:5.1f}%), "
                      f"overhead {result['overhead_ms_per_task']:.2f} ms/task", file=sys.stderr)
    text = json.dumps({"benchmark": "orchestration", "results": results}, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
