"""Progress of a render, as events: shown with rich in a terminal or printed as JSON lines for scripts.

An event is a flat JSON-able dict with an "event" key:

- ``start``     run_id, store, output, tasks_total, tasks_skipped, segments_total, segments_skipped, levels,
                latent_frames, frames, workers
- ``task``      kind (condition | generate | decode | mux), id, level, done, total (steps of this run, all
                kinds), latent_frames_done, latent_frames_total (latent frames sampled; a refinement pass
                samples each frame again), frames_done, frames_total, elapsed, eta (seconds or null)
- ``done``      output, frames, wall_seconds, timings
- ``error``     message
- ``cancelled`` message
"""

from __future__ import annotations

import json
import sys
from typing import Callable, TextIO


class ProgressReporter:
    """Receives progress events; does nothing by default."""

    def __call__(self, event: dict) -> None:
        pass

    def close(self) -> None:
        pass


class CallbackProgress(ProgressReporter):
    def __init__(self, callback: Callable[[dict], None]):
        self.callback = callback

    def __call__(self, event: dict) -> None:
        self.callback(event)


class JsonProgress(ProgressReporter):
    """One JSON object per line, flushed at once so a reading script sees each event as it happens."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def __call__(self, event: dict) -> None:
        self.stream.write(json.dumps(event, sort_keys=True, default=str) + "\n")
        self.stream.flush()


class RichProgress(ProgressReporter):
    """A live progress bar on stderr: level, tasks done/total, frames, ETA."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress = None
        self.bar = None

    def _start(self, event: dict) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tasks"),
            TextColumn("{task.fields[frames]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        total = event["tasks_total"]
        self.bar = self.progress.add_task("starting", total=total, frames="", eta="-")
        skipped = event.get("tasks_skipped", 0)
        if skipped:
            self.console.print(f"resuming: {skipped} of {total} tasks already in the store {event['store']}")

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self._start(event)
        elif kind == "task" and self.progress is not None:
            level = event.get("level")
            label = {"condition": "inputs", "decode": "decode", "mux": "mux"}.get(event["kind"], f"level {level}")
            frames = (f"latents {event['latent_frames_done']}/{event['latent_frames_total']}  "
                      f"frames {event['frames_done']}/{event['frames_total']}")
            eta = event.get("eta")
            self.progress.update(self.bar, completed=event["done"], total=event["total"], description=label,
                                 frames=frames,
                                 eta=_clock(eta) if eta is not None else "-")
        elif kind in ("done", "error", "cancelled"):
            self.close()
            if kind == "done":
                self.console.print(f"wrote {event['output']} ({event['frames']} frames) in "
                                   f"{_clock(event['wall_seconds'])}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def reporter(progress) -> ProgressReporter:
    """None -> silent; "rich" / "json" -> those displays; a callable -> called with each event."""
    if progress is None or progress is False:
        return ProgressReporter()
    if isinstance(progress, ProgressReporter):
        return progress
    if progress == "rich":
        return RichProgress()
    if progress == "json":
        return JsonProgress()
    if callable(progress):
        return CallbackProgress(progress)
    raise ValueError(f"progress={progress!r}: use None, 'rich', 'json' or a callable taking an event dict")
