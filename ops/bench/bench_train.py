"""DiT training throughput: steps and windows a second of `longshot train dit`, and where a step's time goes.

Trains the shipped checkpoint's DiT (or --init-from's) on clips drawn on the fly, as `ops/train/gpu-dit.sh`
does, or with --pool-clips N on windows of an N-clip latent pool built first (its build time reported too, the
worlds drawn by the --loader-workers), in a temporary run: the first --warmup steps (data loader start, kernel
choice, caches) are left out, the next --steps timed from the run's own log. With --profile, the torch
profiler's table of the costliest operators follows (by GPU time on a GPU, else CPU time), to tell a step
waiting for its data from a step waiting for its kernels. --pool PATH trains on an existing latent pool instead (one built by the same VAE
encoder, e.g. a run's `latents.zarr`).

With --dispatches, a few more steps run under a mode that counts every operator the step dispatches (forward,
backward, optimiser, EMA; the run's set-up left out) and reports them per step: on a GPU most of them are
kernel launches, so a step that dispatches per window is bound by Python, not the GPU, and the count shows it
on any machine. The counting slows those steps; they are not in the timing.

Run:  python ops/bench/bench_train.py [--batch 64] [--loader-workers 14] [--steps 30] [--device auto] [--profile]
                                      [--pool-clips 2000 | --pool runs/demo/latents.zarr] [--dispatches]
  or: longshot bench train ...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    from model import Generator
    from model import train

    parser = argparse.ArgumentParser(prog="longshot bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--init-from", help="checkpoint directory (default: the shipped demo checkpoint)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=0)
    parser.add_argument("--object-weight", type=float, default=1.0)
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--pool-clips", type=int, default=0,
                        help="build a latent pool of this many clips first and train on its windows")
    parser.add_argument("--pool", help="train on windows of this existing latent pool")
    parser.add_argument("--dispatches", action="store_true",
                        help="count the operators a step dispatches, over --dispatch-steps further steps")
    parser.add_argument("--dispatch-steps", type=int, default=3, help="steps counted, plus one")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--steps", type=int, default=20, help="steps timed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the training process")
    parser.add_argument("--profile", action="store_true", help="print the torch profiler's operator table")
    parser.add_argument("--out", help="write the JSON report here as well as to stdout")
    args = parser.parse_args(argv)

    source = args.init_from or Generator.default_checkpoint()
    if source is None:
        print("longshot bench train: the demo checkpoint is not installed; pass --init-from a checkpoint directory",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="longshot-bench-train-") as tmp:
        run = Path(tmp) / "run"
        train.main(["unpack", "--run", str(run), "--init-from", str(source)])
        command = ["dit", "--run", str(run), "--init-from", str(source), "--batch", str(args.batch),
                   "--images", str(args.images), "--object-weight", str(args.object_weight), "--device", args.device,
                   "--log-every", "1", "--save-every", str(10 ** 9)]
        threads = ["--threads", str(args.threads)] if args.threads else []
        pool_seconds = None
        if args.pool_clips and args.pool:
            parser.error("--pool-clips builds a pool and --pool names one: give one of them")
        if args.pool:
            command += ["--latents", args.pool]
        elif args.pool_clips:
            started = time.perf_counter()
            train.main(["latents", "--run", str(run), "--clips", str(args.pool_clips), "--loader-workers",
                        str(args.loader_workers), "--device", args.device, *threads])
            pool_seconds = time.perf_counter() - started
            command += ["--latents"]  # windows are read from the pool: no loader workers
        else:
            command += ["--loader-workers", str(args.loader_workers)]
        command += threads
        profiler = None
        if args.profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available() and args.device != "cpu":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
            profiler.start()
        train.main([*command, "--steps", str(args.warmup + args.steps)])
        if profiler is not None:
            profiler.stop()
        log = [json.loads(line) for line in (run / "dit" / "log.jsonl").read_text().splitlines()]
        device = json.loads((run / "dit" / "dit.json").read_text())["compute"][-1]["device"]
        dispatches = None
        if args.dispatches:
            # The run resumes from its saved state; its first step also holds the set-up, so it is not counted.
            total = args.warmup + args.steps + args.dispatch_steps
            at_step = count_dispatches(lambda: train.main([*command, "--steps", str(total)]))
            first, last = min(at_step), max(at_step)
            dispatches = round((at_step[last] - at_step[first]) / (last - first)) if last > first else None
    timed = [r for r in log if r["step"] > args.warmup]
    seconds = timed[-1]["time"] - log[args.warmup - 1]["time"] if args.warmup else timed[-1]["time"]
    report = {
        "device": device,
        "batch": args.batch,
        "images": args.images,
        "loader_workers": args.loader_workers,
        "pool_clips": args.pool_clips,
        "pool_build_s": None if pool_seconds is None else round(pool_seconds, 1),
        "steps_timed": len(timed),
        "seconds": round(seconds, 2),
        "steps_per_s": round(len(timed) / seconds, 3),
        "windows_per_s": round(len(timed) * (args.batch + args.images) / seconds, 1),
        **({"dispatches_per_step": dispatches} if args.dispatches else {}),
    }
    if profiler is not None:
        on_gpu = any(a == torch.profiler.ProfilerActivity.CUDA for a in profiler.activities)
        print(profiler.key_averages().table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total",
                                            row_limit=25))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def count_dispatches(train_call) -> dict[int, int]:
    """Run ``train_call`` counting the operators dispatched; returns the running count at each logged step."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from model import train

    count, at_step = [0], {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            count[0] += 1
            return func(*args, **(kwargs or {}))

    logger_call = train.Logger.__call__

    def logged(self, step, **values):
        at_step[step] = count[0]
        return logger_call(self, step, **values)

    train.Logger.__call__ = logged
    try:
        with Count():
            train_call()
    finally:
        train.Logger.__call__ = logger_call
    return at_step


if __name__ == "__main__":
    sys.exit(main())
