"""`longshot`: render | resume | status | cluster | bench | train | eval.

Exit codes: 0 success, 1 the job failed after it started (the store keeps finished work), 2 bad input or a
store that another render or resume is writing (one line on stderr, no traceback, nothing started),
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors become one line and exit code 2 like every other bad input."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(ValueError):
    pass


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, help="worker processes of the embedded cluster (default: one per GPU, "
                                               "else one per CPU core)")
    p.add_argument("--scheduler", help="use an existing Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--backend", default="local", choices=("local", "cuda", "slurm", "kubernetes"),
                   help="how to start workers when no --scheduler is given (default: local)")
    p.add_argument("--adapt", nargs=2, type=int, metavar=("MIN", "MAX"),
                   help="scale a launched cluster's workers between MIN and MAX with the work queued")
    p.add_argument("--engine", default="deepspeed", choices=("deepspeed", "eager"),
                   help="run the DiT through DeepSpeed-inference (default) or plain PyTorch")
    p.add_argument("--json", action="store_true", help="print progress as JSON lines on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="longshot", description="Render long videos from text on a Dask cluster.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    r = sub.add_parser("render", help="render a video from a prompt (or a YAML job spec)")
    r.add_argument("prompt", nargs="?", help="what the video shows")
    r.add_argument("--spec", help="YAML job spec; flags given here override its fields")
    r.add_argument("-o", "--output", help="output video file (.mp4)")
    r.add_argument("--seconds", type=float)
    r.add_argument("--fps", type=int)
    r.add_argument("--width", type=int)
    r.add_argument("--height", type=int)
    r.add_argument("--seed", type=int)
    r.add_argument("--steps", type=int)
    r.add_argument("--guidance", type=float)
    r.add_argument("--guidance-rescale", type=float, dest="guidance_rescale",
                   help="0..1: scale the guided prediction back to the conditional one's spread (default 0)")
    r.add_argument("--infill-guidance", type=float, dest="infill_guidance",
                   help="guidance of infill tasks, whose frames lie between observed frames (default: the "
                        "model's, else 1, or --guidance if lower)")
    r.add_argument("--extension-guidance-floor", type=float, dest="extension_guidance_floor", metavar="LEVEL",
                   help="noise level below which extension tasks (observed frames on one side only) sample "
                        "without guidance, 0 to 1 (default: the model's, else 0.92; 0 guides every step)")
    r.add_argument("--refine", type=float, metavar="LEVEL",
                   help="noise level of the refinement pass over the drafted latents, 0 (off) to below 1 "
                        "(default: the model's, else 0.75)")
    r.add_argument("--refine-steps", type=int, dest="refine_steps",
                   help="sampling steps of a refinement task (default: the model's, else the share of --steps "
                        "the level spans, at most 5)")
    r.add_argument("--sampler", help="euler or heun")
    r.add_argument("--schedule", help="parallel (default), autoregressive, long-range, hierarchy-2, hierarchy-3")
    r.add_argument("--window", type=int, help="frames per model call (default: the model's maximum)")
    r.add_argument("--model", help="preset name or checkpoint directory (default: the shipped demo model)")
    r.add_argument("--codec", help="h264 (default), h265 or av1")
    r.add_argument("--quality", type=int, help="CRF (lower is better; default per codec)")
    r.add_argument("--store", help="job store path or URL (default: next to the output, out.mp4 -> out.zarr)")
    r.add_argument("--image", action="append", metavar="PATH[@SECONDS|@start|@end]",
                   help="condition on an image at a time (repeatable)")
    r.add_argument("--loop", action="store_true", default=None, help="make the video loop seamlessly")
    r.add_argument("--extend", metavar="CLIP", help="continue this clip (forwards; see --backward)")
    r.add_argument("--backward", action="store_true", help="with --extend: generate what leads into the clip")
    r.add_argument("--bridge", nargs=2, metavar=("CLIP1", "CLIP2"), help="generate the video between two clips")
    r.add_argument("--force", action="store_true", help="replace an existing store made for a different job")
    _add_cluster_flags(r)

    s = sub.add_parser("resume", help="finish an interrupted render from its store")
    s.add_argument("store")
    _add_cluster_flags(s)

    st = sub.add_parser("status", help="show what a job store holds")
    st.add_argument("store")
    st.add_argument("--json", action="store_true")

    c = sub.add_parser("cluster", help="start a local cluster (or describe one with --scheduler)")
    c.add_argument("--workers", type=int)
    c.add_argument("--scheduler")
    c.add_argument("--dashboard", action="store_true")
    c.add_argument("--json", action="store_true")

    for name, help_text in (("bench", "benchmarks: dit | orchestration | render | train"), ("train", "train models"),
                            ("eval", "evaluate renders")):
        d = sub.add_parser(name, help=help_text, add_help=False)
        d.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _spec_overrides(args) -> dict:
    overrides = {k: getattr(args, k) for k in (
        "prompt", "output", "seconds", "fps", "width", "height", "seed", "steps", "guidance", "guidance_rescale",
        "infill_guidance", "extension_guidance_floor", "refine", "refine_steps", "sampler", "schedule", "window",
        "model", "codec", "quality", "store", "loop")}
    if args.image:
        from orchestrator.spec import ImageInput

        overrides["images"] = [ImageInput.parse(text).model_dump() for text in args.image]
    if args.extend:
        overrides["extend"] = {"clip": args.extend, "direction": "backward" if args.backward else "forward"}
    elif args.backward:
        raise _UsageError("--backward needs --extend CLIP")
    if args.bridge:
        overrides["bridge"] = list(args.bridge)
    return overrides


def _adapt(args):
    return tuple(args.adapt) if args.adapt else None


def _progress(args):
    if args.json:
        return "json"
    return "rich" if sys.stderr.isatty() else None


def _cmd_render(args) -> int:
    from orchestrator.run import render
    from orchestrator.spec import JobSpec

    spec = JobSpec.load(args.spec, _spec_overrides(args))
    result = render(spec, scheduler=args.scheduler, workers=args.workers, engine=args.engine, force=args.force,
                    progress=_progress(args), backend=args.backend, adapt=_adapt(args))
    _report(args, result)
    return EXIT_OK


def _cmd_resume(args) -> int:
    from orchestrator.run import resume

    result = resume(args.store, scheduler=args.scheduler, workers=args.workers, engine=args.engine,
                    progress=_progress(args), backend=args.backend, adapt=_adapt(args))
    _report(args, result)
    return EXIT_OK


def _report(args, result) -> None:
    if not args.json:
        print(f"{result.output}: {result.frames} frames at {result.fps} fps in {result.wall_seconds:.1f} s "
              f"({result.tasks_run} tasks run, {result.tasks_skipped} already done; store {result.store})",
              file=sys.stderr)


def _cmd_status(args) -> int:
    from orchestrator.run import job_status
    from orchestrator.store import StoreError

    try:
        status = job_status(args.store)
    except StoreError as err:
        raise _UsageError(f"store={args.store!r}: {err}") from None
    if args.json:
        print(json.dumps(status, sort_keys=True, default=str))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{status['store']}[/]: {status['state']}")
    console.print(f"prompt: {status['prompt']!r}  {status['seconds']} s at {status['fps']} fps  "
                  f"model {status['model'].get('preset')}  schedule {status['schedule']}")
    table = Table("level", "tasks done")
    for level in status["levels"]:
        table.add_row(str(level["level"]), f"{level['done']}/{level['tasks']}")
    console.print(table)
    console.print(f"segments: {status['segments_done']}/{status['segments']}   "
                  f"output: {'written' if status['output_done'] else 'not yet'} ({status['output']})")
    if status["runs"]:
        last = status["runs"][-1]
        console.print(f"last run {last['run_id']}: {last.get('state')}"
                      + (f" — {last['error']}" if last.get("error") else ""))
    return EXIT_OK


def _cmd_cluster(args) -> int:
    import time

    from cluster.backends import describe, start

    session = start(scheduler=args.scheduler, workers=args.workers,
                    **({} if args.scheduler else {"dashboard": args.dashboard}))
    try:
        info = describe(session.client)
        if args.json:
            print(json.dumps(info, sort_keys=True))
        else:
            print(f"scheduler {info['scheduler']}" + (f"  dashboard {info['dashboard']}" if info["dashboard"] else ""))
            for w in info["workers"]:
                print(f"  worker {w['name']} {w['address']} pid {w['pid']} resources {w['resources']}")
        if args.scheduler:
            return EXIT_OK
        print(f"render on it with: longshot render ... --scheduler {info['scheduler']}   (Ctrl-C stops it)",
              file=sys.stderr)
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    finally:
        session.close()


def _delegate(module: str, function: str, argv: list[str], what: str) -> int:
    try:
        target = getattr(importlib.import_module(module), function)
    except ImportError as err:
        print(f"longshot: {what} is not available in this installation ({err})", file=sys.stderr)
        return EXIT_BAD_INPUT
    code = target(argv)
    return int(code or 0)


def _run_script(path: Path, argv: list[str], what: str) -> int:
    if not path.is_file():
        print(f"longshot: {what} needs the repository's {path.name} (not found at {path})", file=sys.stderr)
        return EXIT_BAD_INPUT
    spec = importlib.util.spec_from_file_location(f"longshot_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


def _cmd_bench(args) -> int:
    argv = list(args.args)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: longshot bench {dit,orchestration,render,train} [options]", file=sys.stderr)
        return EXIT_OK if argv else EXIT_BAD_INPUT
    which, rest = argv[0], argv[1:]
    if which == "dit":
        return _delegate("model.bench", "main", rest, "the DiT benchmark")
    if which in ("orchestration", "render", "train"):
        root = Path(__file__).resolve().parent.parent
        return _run_script(root / "ops" / "bench" / f"bench_{which}.py", rest, f"the {which} benchmark")
    raise _UsageError(f"longshot bench: unknown benchmark {which!r}; choose dit, orchestration, render or train")


def main(argv: list[str] | None = None) -> int:
    from orchestrator.run import RenderCancelled, RenderError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in ("bench", "train", "eval"):
            # Delegated commands own their arguments (including --help): pass them through untouched.
            args = argparse.Namespace(command=argv[0], args=argv[1:])
        else:
            args = build_parser().parse_args(argv)
        if args.command == "render":
            return _cmd_render(args)
        if args.command == "resume":
            return _cmd_resume(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "cluster":
            return _cmd_cluster(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "train":
            return _delegate("model.train", "main", list(args.args), "training")
        if args.command == "eval":
            return _delegate("orchestrator.evaluate", "main", list(args.args), "evaluation")
        raise _UsageError(f"unknown command {args.command!r}")
    except RenderCancelled as err:
        print(f"longshot: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RenderError as err:
        print(f"longshot: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("longshot: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as err:
        # SpecError, StoreMismatch, StoreLocked, PathNotWritable, PlanError...: bad input, one line.
        print(f"longshot: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ConnectionError, OSError) as err:
        print(f"longshot: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
