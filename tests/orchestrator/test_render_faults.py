"""Fault tests with real kills: SIGKILL of the whole render process tree, and of one worker mid-task."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from orchestrator import media
from orchestrator.plan import Plan
from orchestrator.run import render
from orchestrator.store import JobStore, StoreIncomplete
from render_helpers import FAULT

pytestmark = pytest.mark.timeout(420)


def cli_args(spec: dict) -> list[str]:
    args = [spec["prompt"]]
    for field in ("seconds", "fps", "width", "height", "steps", "seed", "model"):
        args += [f"--{field}", str(spec[field])]
    return args


def markers(store_dir) -> list[str]:
    return sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(store_dir, "tasks", "*", "zarr.json")))


def assert_same_video(store_dir, output, reference_spec):
    reference_latents = np.asarray(JobStore.open(reference_spec.store_path).latents[:])
    np.testing.assert_array_equal(np.asarray(JobStore.open(str(store_dir)).latents[:]), reference_latents)
    frames = media.read_frames(output, reference_spec.width, reference_spec.height)
    reference = media.read_frames(reference_spec.output, reference_spec.width, reference_spec.height)
    assert frames.shape == reference.shape == (reference_spec.num_frames, 48, 64, 3)
    np.testing.assert_array_equal(frames, reference)


def test_sigkill_of_the_whole_render_then_resume_gives_the_same_video(fault_reference, tmp_path):
    reference_spec, _ = fault_reference
    output, store_dir = tmp_path / "killed.mp4", tmp_path / "killed.zarr"
    command = [sys.executable, "-m", "orchestrator.cli", "render", *cli_args(FAULT), "-o", str(output),
               "--workers", "2", "--engine", "eager", "--json"]
    render_proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path,
                                   start_new_session=True)  # its own process group: the whole tree dies together
    try:
        deadline = time.monotonic() + 300
        total = None
        while time.monotonic() < deadline:
            assert render_proc.poll() is None, "the render ended before it could be killed"
            if total is None and os.path.exists(store_dir / "zarr.json"):
                try:
                    total = len(JobStore.open(str(store_dir)).plan["tasks"])
                except StoreIncomplete:
                    pass  # the render is still creating its store

            done = markers(store_dir)
            if total and 2 <= len(done) < total:
                break
            time.sleep(0.02)
        else:
            pytest.fail("no generation markers appeared in time")
        tree = [psutil.Process(render_proc.pid), *psutil.Process(render_proc.pid).children(recursive=True)]
        assert len(tree) >= 3  # the CLI process and its worker processes
        os.killpg(render_proc.pid, signal.SIGKILL)
    finally:
        if render_proc.poll() is None:
            os.killpg(render_proc.pid, signal.SIGKILL)
        render_proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"processes survived the kill: {alive}"
    assert not output.exists()

    store = JobStore.open(str(store_dir))
    plan_tasks = {t["task_id"]: t for t in store.plan["tasks"]}
    plan = Plan.from_dict(store.plan)
    verified = store.done_tasks(plan.tasks)  # refinement pass 0 is checked on the frames pass 1 left it
    assert verified and len(verified) < len(plan_tasks)
    before = {task_id: store.task_marker(task_id) for task_id in verified}

    # Tear one finished task's chunk: its marker no longer verifies, so resume must compute it again.
    torn = sorted(verified, key=lambda t: (plan_tasks[t]["level"], t))[-1]
    chunk = store_dir / "latents" / "c" / str(plan_tasks[torn]["latent"][0]) / "0" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    assert not store.task_done(torn, plan_tasks[torn]["latent"])

    resumed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", str(store_dir), "--workers", "2",
                              "--engine", "eager", "--json"], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[0]["tasks_skipped"] == len(verified) - 1
    assert events[-1]["event"] == "done"

    store = JobStore.open(str(store_dir))
    for task_id in verified - {torn}:
        assert store.task_marker(task_id) == before[task_id], f"{task_id} was recomputed"
    after = store.task_marker(torn)
    assert after["run_id"] != before[torn]["run_id"] and store.task_done(torn, plan_tasks[torn]["latent"])
    assert store.done_tasks(plan.tasks) == set(plan_tasks)
    assert [r["state"] for r in store.runs()] == ["running", "completed"]  # the killed run never finished
    assert_same_video(store_dir, output, reference_spec)


def _executing(dask_worker):
    return [str(ts.key) for ts in dask_worker.state.executing]


def test_killing_one_worker_mid_task_reruns_it_elsewhere(fault_reference, tmp_path):
    from cluster.backends import start
    from orchestrator.spec import JobSpec

    reference_spec, _ = fault_reference
    spec = JobSpec.parse(dict(FAULT, output=str(tmp_path / "worker-kill.mp4")))
    session = start(workers=2)
    try:
        client = session.client
        outcome = {}

        def run():
            try:
                outcome["result"] = render(spec, scheduler=session.scheduler_address, engine="eager")
            except BaseException as err:  # reported by the assertions below
                outcome["error"] = err

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        victim = None
        deadline = time.monotonic() + 240
        while victim is None and time.monotonic() < deadline and thread.is_alive():
            for address, keys in client.run(_executing).items():
                running = [k for k in keys if k.startswith("generate-")]
                if running:
                    pid = client.run(os.getpid, workers=[address])[address]
                    victim = (address, pid, running[0])
                    os.kill(pid, signal.SIGKILL)
                    break
            time.sleep(0.02)
        assert victim is not None, "no generation task was seen running"
        thread.join(timeout=300)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert not psutil.pid_exists(victim[1]) or psutil.Process(victim[1]).status() == psutil.STATUS_ZOMBIE

        task_id = victim[2].split("-")[1] + "-" + victim[2].split("-")[2]
        marker = JobStore.open(spec.store_path).task_marker(task_id)
        assert marker is not None and marker["pid"] != victim[1]  # finished by another worker process
        assert_same_video(spec.store_path, spec.output, reference_spec)
    finally:
        session.close()
