"""The `longshot` command: render/status/cluster on a running cluster, exit codes for bad input."""

from __future__ import annotations

import json

import pytest

from orchestrator import media
from orchestrator.cli import main
from render_helpers import TINY

pytestmark = pytest.mark.timeout(300)


def render_args(output, **fields):
    spec = dict(TINY, **fields)
    args = ["render", spec["prompt"], "-o", str(output)]
    for field in ("seconds", "fps", "width", "height", "steps", "seed", "model"):
        args += [f"--{field}", str(spec[field])]
    return args


def test_render_json_events_then_status(render_cluster, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    code = main(render_args(out) + ["--scheduler", render_cluster.scheduler_address, "--engine", "eager", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert events[-1]["output"] == str(out) and events[-1]["frames"] == 16
    assert all(e["event"] == "task" for e in events[1:-1])
    assert media.probe(out)["frames"] == 16
    assert (tmp_path / "cli.zarr").is_dir()  # default store: next to the output, named after it

    assert main(["status", str(tmp_path / "cli.zarr"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "completed" and status["tasks_done"] == status["tasks"]
    assert status["levels"][0]["level"] == 0

    assert main(["status", str(tmp_path / "cli.zarr")]) == 0
    assert "completed" in capsys.readouterr().out

    # The same output with a different prompt: the existing store belongs to another job -> exit 2.
    code = main(render_args(out, prompt="a green triangle") + ["--scheduler", render_cluster.scheduler_address])
    err = capsys.readouterr().err
    assert code == 2 and "different job" in err and "--force" in err and len(err.strip().splitlines()) == 1


def test_bad_paths_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(render_args(tmp_path / "file" / "out.mp4")) == 2
    assert "output=" in capsys.readouterr().err
    assert main(render_args(tmp_path / "out.avi")) == 2
    assert ".mp4" in capsys.readouterr().err
    assert main(render_args(tmp_path / "o.mp4") + ["--image", str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "nothing.zarr")]) == 2
    assert "no job store" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "nothing.zarr")]) == 2
    assert main(["render", "x", "-o", str(tmp_path / "o.mp4"), "--model", "no-such-model"]) == 2
    assert "model='no-such-model'" in capsys.readouterr().err
    assert main(["render", "x", "-o", str(tmp_path / "o.mp4"), "--refine", "1"]) == 2
    assert "refine=1.0: input should be less than 1" in capsys.readouterr().err


def test_cluster_describes_an_existing_scheduler(render_cluster, capsys):
    assert main(["cluster", "--scheduler", render_cluster.scheduler_address, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scheduler"] == render_cluster.scheduler_address
    assert [w["resources"] for w in info["workers"]] == [{"GPU": 1}, {"GPU": 1}]


def test_delegating_subcommands(capsys):
    assert main(["bench", "nope"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["bench", "orchestration", "--help"])
    assert info.value.code == 0
    assert "--workers" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_training_benchmark_times_real_steps_of_the_shipped_dit(tmp_path, capsys):
    """`longshot bench train` trains the shipped DiT for a few steps and reports the rate its log shows."""
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--batch", "1", "--warmup", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["steps_timed"] == 2 and report["device"].startswith("cpu")
    assert report["steps_per_s"] > 0
    assert report["windows_per_s"] == pytest.approx(report["steps_per_s"], abs=0.06), "one window a step"


@pytest.mark.timeout(300)
def test_training_benchmark_builds_a_latent_pool_and_trains_on_its_windows(tmp_path, capsys):
    out = tmp_path / "pool.json"
    assert main(["bench", "train", "--batch", "2", "--warmup", "1", "--steps", "1", "--device", "cpu",
                 "--pool-clips", "1", "--loader-workers", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["pool_clips"] == 1 and report["pool_build_s"] > 0 and report["steps_timed"] == 1
    assert "windows from 1 pool clips" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_training_benchmark_counts_the_operators_a_step_dispatches(tmp_path):
    out = tmp_path / "dispatches.json"
    assert main(["bench", "train", "--batch", "1", "--warmup", "1", "--steps", "1", "--device", "cpu",
                 "--dispatches", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    # forward, backward, optimiser and EMA of the demo DiT: thousands, counted over the steps after the first
    # step of the resumed run (that one holds the loading of the model too)
    assert 1000 < report["dispatches_per_step"] < 20000 and report["steps_timed"] == 1
    with pytest.raises(SystemExit):
        main(["bench", "train", "--pool", str(tmp_path), "--pool-clips", "1"])
