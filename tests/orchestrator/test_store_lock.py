"""The job store's write lock: one writer at a time, a clear refusal for the second, and no lock outliving a
killed render. Holders are real separate processes, killed by their own pid."""

from __future__ import annotations

import json
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import zarr

from orchestrator.cli import EXIT_BAD_INPUT, EXIT_OK, main
from orchestrator.store import JobStore, StoreLocked, is_store, lock_path, store_write_lock
from render_helpers import TINY, tiny_spec
from test_job_store import CONTENT, MODEL, PLAN, SHAPE, SPEC, make_store

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork are POSIX"),
]

PROCESS_TIMEOUT = 60

# Takes the store's write lock, optionally forks a child that outlives it (as a cluster process might), reports
# "locked <child pid or 0>" and holds the lock until killed.
HOLDER = """
import os, sys, time
from orchestrator.store import store_write_lock

with store_write_lock(sys.argv[1]):
    child = 0
    if sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:
            time.sleep(600)
            os._exit(0)
    print("locked", child, flush=True)
    time.sleep(600)
"""

# Tries the store's write lock once: exit 0 and "acquired" if it got it, exit 3 and the refusal if not.
CONTENDER = """
import sys
from orchestrator.store import StoreLocked, store_write_lock

try:
    with store_write_lock(sys.argv[1]):
        print("acquired", flush=True)
except StoreLocked as err:
    print(err, flush=True)
    sys.exit(3)
"""


@contextmanager
def lock_holder(store: str, *, fork_child: bool = False):
    """A separate process holding the write lock of `store`; yields (process, pid of its forked child or 0)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, store, "fork" if fork_child else "plain"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], PROCESS_TIMEOUT)
        line = process.stdout.readline() if ready else ""
        if not line.startswith("locked"):
            process.kill()
            pytest.fail(f"the lock holder did not start: {line!r} {process.communicate(timeout=10)[1]}")
        yield process, int(line.split()[1])
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=PROCESS_TIMEOUT)
        process.stdout.close()
        process.stderr.close()


def contend(store: str) -> subprocess.CompletedProcess:
    """Try the write lock of `store` once from a separate process."""
    return subprocess.run([sys.executable, "-c", CONTENDER, store], capture_output=True, text=True,
                          timeout=PROCESS_TIMEOUT)


def holder_record(store: str) -> dict:
    return json.loads(Path(lock_path(store)).read_text())


def kill_by_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_second_writer_is_refused_at_once_naming_the_store_and_the_holder(tmp_path):
    store = str(tmp_path / "job.zarr")
    with lock_holder(store) as (holder, _):
        started = time.monotonic()
        with pytest.raises(StoreLocked) as refused:
            with store_write_lock(store):
                pytest.fail("took a lock that another process holds")
        assert time.monotonic() - started < 5  # no waiting for the holder to finish
        message = str(refused.value)
        assert store in message and "longshot resume" in message
        assert f"pid {holder.pid} on {socket.gethostname()}" in message
        assert refused.value.holder["pid"] == holder.pid and refused.value.url == store
        # The refusal left the holder's record in the lock file alone.
        assert holder_record(store)["pid"] == holder.pid


@pytest.mark.parametrize("fork_child", [False, True], ids=["holder-alone", "holder-with-forked-child"])
def test_a_holder_killed_with_sigkill_leaves_no_lock_behind(tmp_path, fork_child):
    store = str(tmp_path / "job.zarr")
    with lock_holder(store, fork_child=fork_child) as (holder, child):
        try:
            assert contend(store).returncode == 3  # held while the holder lives
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=PROCESS_TIMEOUT)
            assert holder.returncode == -signal.SIGKILL
            if child:
                os.kill(child, 0)  # the forked child still runs, yet must not keep the lock
            # The killed holder's lock file and record are still there: only the kernel-held lock went with it.
            assert holder_record(store)["pid"] == holder.pid
            with store_write_lock(store):
                record = holder_record(store)
                assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        finally:
            if child:
                kill_by_pid(child)


def test_the_lock_is_released_when_the_writer_ends_or_fails(tmp_path):
    store = str(tmp_path / "job.zarr")
    with store_write_lock(store):
        refused = contend(store)
        assert refused.returncode == 3 and f"pid {os.getpid()}" in refused.stdout
    assert Path(lock_path(store)).read_text() == ""  # the record went with the lock; the empty file may stay
    assert contend(store).returncode == 0

    with pytest.raises(RuntimeError, match="a task failed"):
        with store_write_lock(store):
            raise RuntimeError("a task failed")
    assert contend(store).returncode == 0


def test_creating_and_replacing_a_store_under_the_lock_keeps_it_locked(tmp_path):
    url = str(tmp_path / "job.zarr")
    with store_write_lock(url):
        make_store(url)
        assert is_store(url)
        other = dict(CONTENT, prompt="a blue square")
        replaced = JobStore.open_for(url, spec=dict(SPEC, prompt="a blue square"), content=other, plan=PLAN,
                                     model=MODEL, latent_shape=SHAPE, force=True)
        assert replaced.spec["prompt"] == "a blue square"
        # --force replaced the job, not the lock: another writer is still refused.
        refused = contend(url)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert holder_record(url)["pid"] == os.getpid()


def test_the_lock_lives_beside_the_store_so_zarr_opens_it_without_warnings(tmp_path):
    url = str(tmp_path / "renders" / "job.zarr")  # the parent directory does not exist yet
    assert lock_path(url) == lock_path(url + "/") == str(tmp_path / "renders" / "job.zarr.lock")
    with store_write_lock(url):
        make_store(url)
        assert sorted(os.listdir(tmp_path / "renders")) == ["job.zarr", "job.zarr.lock"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group = zarr.open_group(url, mode="r")
        # Listing the members is what warns about a foreign file (xarray.open_zarr lists them too).
        members = dict(group.members(max_depth=None))
        assert "longshot_format" in group.attrs and "latents" in members
    assert not [w for w in caught if issubclass(w.category, zarr.errors.ZarrUserWarning)], \
        [str(w.message) for w in caught]
    assert not [name for name in os.listdir(url) if "lock" in name]


def test_a_remote_store_is_written_without_a_lock_and_says_so(caplog):
    url = "memory://longshot-test/job.zarr"
    with caplog.at_level(logging.WARNING, logger="orchestrator.store"):
        with store_write_lock(url):
            with store_write_lock(url):  # nothing to contend on: both writers go ahead
                pass
    warnings = [r.getMessage() for r in caplog.records if r.name == "orchestrator.store"]
    assert len(warnings) == 2 and all(url in w and "\n" not in w for w in warnings)
    assert "not a local filesystem" in warnings[0]


def test_the_cli_refuses_a_locked_store_and_status_still_reads_it(tmp_path, capsys):
    from orchestrator.run import plan_job

    spec = tiny_spec(tmp_path)
    latent_frames = 1 + math.ceil((spec.num_frames - 1) / 4)
    spec_dict = dict(spec.model_dump(mode="json"), store=spec.store_path)
    JobStore.open_for(spec.store_path, spec=spec_dict, content=spec.content_fields(),
                      plan=plan_job(spec, latent_frames, 4, (), 1).to_dict(), model=MODEL,
                      latent_shape=(latent_frames, *SHAPE[1:]))
    with lock_holder(spec.store_path) as (holder, _):
        # Refused before any cluster starts: one line, exit 2, the store and the holder named.
        for argv in (["resume", spec.store_path],
                     ["render", TINY["prompt"], "-o", spec.output, "--seconds", str(TINY["seconds"]),
                      "--fps", str(TINY["fps"]), "--width", str(TINY["width"]), "--height", str(TINY["height"]),
                      "--steps", str(TINY["steps"]), "--seed", str(TINY["seed"]), "--model", TINY["model"]]):
            assert main(argv) == EXIT_BAD_INPUT, argv[0]
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert spec.store_path in err and f"pid {holder.pid}" in err and "being written" in err

        # Inspection never takes the lock.
        assert main(["status", spec.store_path, "--json"]) == EXIT_OK
        status = json.loads(capsys.readouterr().out)
        assert status["store"] == spec.store_path and status["tasks"] > 0 and status["state"] == "not started"

