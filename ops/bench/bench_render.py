"""The embedded CPU render: wall time of a real render, split into start-up, generation, decode, mux and overhead.

Renders a video with the shipped demo checkpoint (or --model) on the embedded local cluster, exactly as
`longshot render` does, in a fresh temporary store, and reports the timings the render records:

  startup_s        cluster start and model load in every worker process
  generate_busy_s  worker time spent in generation tasks (summed over workers); *_span_s: first start to last
  decode_busy_s    finish of that kind (generation and decoding overlap)
  encode_busy_s    ffmpeg segment encoding inside the decode tasks
  mux_s            concatenation of the segments into the output
  overhead_s       wall time after start-up with no task running anywhere (planning, store checks, dispatch)
  per_level        generation tasks per plan level: count and mean seconds (from the store's task markers)

Run:  python ops/bench/bench_render.py [--seconds 60] [--model tiny] [--workers 2] [--out render.json]
  or: longshot bench render ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from model import Generator
    from orchestrator.run import render
    from orchestrator.spec import JobSpec
    from orchestrator.store import JobStore

    parser = argparse.ArgumentParser(prog="longshot bench render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="a red circle bouncing on a blue background")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=80)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", help="preset or checkpoint (default: the shipped demo checkpoint)")
    parser.add_argument("--workers", type=int, help="worker processes (default: one per CPU core)")
    parser.add_argument("--engine", default="deepspeed", choices=("deepspeed", "eager"))
    parser.add_argument("--keep", help="render into this directory and keep the video and store")
    parser.add_argument("--out", help="write the JSON report here as well as to stdout")
    args = parser.parse_args(argv)

    if args.model is None and Generator.default_checkpoint() is None:
        print("longshot bench render: the demo checkpoint is not installed; pass --model tiny (random weights) "
              "or a checkpoint directory", file=sys.stderr)
        return 2
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="longshot-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    spec = JobSpec.parse({"prompt": args.prompt, "seconds": args.seconds, "fps": args.fps, "width": args.width,
                          "height": args.height, "steps": args.steps, "model": args.model,
                          "output": str(directory / "bench.mp4"), "store": str(directory / "bench.zarr")})
    result = render(spec, workers=args.workers, engine=args.engine, force=True,
                    progress="rich" if sys.stderr.isatty() else None)

    store = JobStore.open(result.store, read_only=True)
    per_level: dict[int, list[float]] = {}
    for task in store.plan["tasks"]:
        marker = store.task_marker(task["task_id"]) or {}
        if "seconds" in marker:
            per_level.setdefault(task["level"], []).append(marker["seconds"])
    t = result.timings
    report = {
        "benchmark": "render",
        "model": store.model,
        "engine": result.engine,
        "workers": result.workers,
        "video": {"seconds": spec.seconds, "fps": spec.fps, "frames": result.frames, "width": spec.width,
                  "height": spec.height, "steps": spec.steps, "schedule": spec.schedule},
        "tasks": {"generation": len(store.plan["tasks"]), "segments": len(store.plan["segments"])},
        "wall_s": round(result.wall_seconds, 3),
        "startup_s": round(t["startup_seconds"], 3),
        "generate_busy_s": round(t["generate_busy_seconds"], 3),
        "generate_span_s": round(t.get("generate_span_seconds", 0.0), 3),
        "decode_busy_s": round(t["decode_busy_seconds"], 3),
        "encode_busy_s": round(t["encode_busy_seconds"], 3),
        "decode_span_s": round(t.get("decode_span_seconds", 0.0), 3),
        "mux_s": round(t["mux_busy_seconds"], 3),
        "overhead_s": round(t["overhead_seconds"], 3),
        "per_level": {str(level): {"tasks": len(times), "mean_s": round(statistics.mean(times), 3)}
                      for level, times in sorted(per_level.items())},
        "output": result.output if args.keep else None,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(f"{spec.seconds:g} s video ({result.frames} frames) in {result.wall_seconds:.1f} s on {result.workers} "
          f"workers: start-up {report['startup_s']:.1f} s, generation {report['generate_span_s']:.1f} s wall "
          f"({report['generate_busy_s']:.1f} s busy), decode+encode {report['decode_busy_s'] + report['encode_busy_s']:.1f} s "
          f"busy, mux {report['mux_s']:.1f} s, overhead {report['overhead_s']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
