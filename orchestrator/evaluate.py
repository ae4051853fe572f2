"""Quality of long videos, measured from decoded frames and the procedural world's own vocabulary.

The demo model is trained on the world of :mod:`model.world`, so every prompt names objects by palette colour and
shape, and a detector that knows the palette can tell what a video shows:

* a pixel belongs to the nearest palette colour; the most frequent colour of a frame is its background;
* connected regions of any other colour are objects (a small opening first removes the one-pixel rims that
  anti-aliasing or a decoder's blur paints in blended colours);
* the shape is the world shape that, drawn into the region's bounding box, overlaps the region best (square
  fills its box, a circle 0.785 of it, triangle and diamond half, the triangle low and the diamond centred).

Metrics (:func:`evaluate_video`):

* **prompt adherence** - share of the prompted objects (colour + shape) present in the first seconds;
* **identity persistence** - share of the objects present at the start that are still present at 20, 40 and
  60 s (marks scaled to a shorter video's length); an object that left the frame and came back counts;
* **seams** - mean frame-to-frame difference at task and segment boundaries over the median difference
  elsewhere (1.0 = invisible);
* **colour drift** - CIE76 delta E between the background colour of the first and of the last second;
* **motion adherence** - share of the prompted objects whose track over the first ``MOTION_SECONDS`` shows the
  prompted motion (resting, bouncing, drifting in the named direction, orbiting; :func:`judge_motion`), taken
  from the prompted colour alone, so that a blob of the right colour but the wrong shape still shows its motion;
* VAE reconstruction PSNR on held-out world clips (:func:`vae_psnr`), and the VAE's ceiling: adherence and seams
  of its reconstruction of each prompt's own world video (:func:`reconstruction_ceiling`).

The presence rule. Objects move, leave the frame (wrap-around) and pass behind each other, so presence is decided
over a window of frames, never from one frame: the first ``ADHERENCE_SECONDS`` for adherence and
``WINDOW_SECONDS`` around each persistence mark (ending at the last frame for the final mark; both clipped to the
video, and at most a third of it for the marks). Within a window:

* with the world's ground truth (clips rendered by :mod:`model.world`): the object is present when it is
  detected with the right colour and shape in more than half of the window's frames in which the ground truth
  shows it fully inside the frame and not overlapped by an object drawn above it; a window without such a frame
  cannot judge the object, which then leaves that mark's denominator;
* for generated videos (no ground truth: a model keeps the prompt's objects and motions, not their exact
  timing): the object is present when it is detected in at least half of the share of the window's frames in
  which an object of its motion is expected to be fully visible: all of them for bouncing, orbiting and resting
  objects, ``WRAP_VISIBLE_SHARE`` for wrap-around objects, whose window is stretched to
  ``WRAP_WINDOW_SECONDS`` (longer than the longest wrap-around period of the world) so that it always holds
  a passage through the frame.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from model import world

# Targets of the demo model (issue: a trained demo model), checked per schedule by `longshot eval`.
TARGETS: dict[str, tuple[str, float]] = {
    "vae_psnr": (">=", 30.0),
    "adherence": (">=", 0.90),
    "persistence_final": (">=", 0.85),
    "seam_ratio": ("<=", 1.2),
    # CIE76 delta E ~2.3 is one just-noticeable difference side by side; a change spread over a minute is
    # invisible well above that, so "invisible drift" is read as at most ~2 JNDs between first and last second.
    "drift_delta_e": ("<=", 5.0),
}
DEFAULT_SCHEDULES = ("parallel", "hierarchy-2", "autoregressive")
# Schedules whose frames are planned hierarchically (keyframes first); each must persist at least as well as
# autoregressive generation.
HIERARCHICAL = ("parallel", "hierarchy-2", "hierarchy-3")
PERSISTENCE_MARKS = (20.0, 40.0, 60.0)
ADHERENCE_SECONDS = 3.0
WINDOW_SECONDS = 3.0
WRAP_WINDOW_SECONDS = 8.0
WRAP_VISIBLE_SHARE = 0.45
PRESENCE_QUORUM = 0.5
# Motion: judged over the first MOTION_SECONDS from the prompted colour's centre, sampled MOTION_RATE times a
# second, as velocities over spans of MOTION_SPAN seconds (see judge_motion).
MOTION_SECONDS = 6.0
MOTION_RATE = 6.0
MOTION_SPAN = 1.0
# The world's slowest moving object covers 0.06 frame fractions a second (an orbit of radius 0.12 at 0.5 rad/s);
# a still one drawn by a model wobbles by a pixel or two (~0.02 of a 128-pixel frame).
REST_SPEED = 0.04
# Wrap-around objects move at 0.25-0.45 frame fractions a second along their direction.
DRIFT_SPEED = 0.12
# Spans longer than this were a wrap-around re-entry or a jump between two blobs, not motion.
MOTION_JUMP = 0.5
# The evaluation prompts are the captions of these worlds, far above the training seeds.
PROMPT_SEED_BASE = world.EVAL_SEED_BASE
VAE_CLIP_SEED_BASE = world.EVAL_SEED_BASE + 500_000
LATENT_FRAME_STRIDE = 4  # video frames per latent frame after the first (the VAE's temporal factor)


# --------------------------------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class Detection:
    """One object found in a frame. ``centre`` is the bounding-box centre in pixels (x, y); ``bbox`` is
    (x0, y0, x1, y1) with exclusive ends; ``partial`` means the region touches the frame border (its shape may be
    cut off)."""

    colour: str
    shape: str
    centre: tuple[float, float]
    area: int
    bbox: tuple[int, int, int, int]
    fill: float
    partial: bool


@dataclass(frozen=True)
class FrameDetections:
    background: str | None
    objects: tuple[Detection, ...]

    def has(self, colour: str, shape: str) -> bool:
        return any(d.colour == colour and d.shape == shape for d in self.objects)


class Detector:
    """Finds the world's objects in RGB frames by palette colour, connected regions and fill ratio."""

    def __init__(self, palette: Mapping[str, tuple[int, int, int]] | None = None, *,
                 max_colour_distance: float = 100.0, min_area: int | None = None, min_area_share: float = 0.001):
        self.palette = dict(world.PALETTE if palette is None else palette)
        if len(self.palette) < 2:
            raise ValueError(f"palette has {len(self.palette)} colours: needs at least 2")
        if not max_colour_distance > 0:
            raise ValueError(f"max_colour_distance={max_colour_distance!r}: must be > 0")
        self.names = list(self.palette)
        self.min_area = min_area
        self.min_area_share = min_area_share
        # Nearest colour for every 8x8x8 cube of RGB space, so labelling a frame is one table lookup per pixel.
        centres = np.arange(4, 256, 8, dtype=np.float32)
        grid = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), axis=-1)  # (32, 32, 32, 3)
        colours = np.asarray([self.palette[n] for n in self.names], dtype=np.float32)
        dist = np.linalg.norm(grid[..., None, :] - colours, axis=-1)  # (32, 32, 32, P)
        nearest = dist.argmin(axis=-1).astype(np.int8)
        nearest[dist.min(axis=-1) > max_colour_distance] = -1
        self._lut = nearest
        # A cross-shaped opening removes one-pixel rims without eating the corners of small shapes; frames
        # smaller than this keep their rims, since opening would erase the objects themselves.
        self._structure = ndimage.generate_binary_structure(2, 1)
        self.min_side_for_opening = 48

    def labels(self, frame: np.ndarray) -> np.ndarray:
        """Palette index of every pixel (H, W) int8; -1 where no palette colour is near."""
        q = np.asarray(frame, dtype=np.uint8) >> 3
        return self._lut[q[..., 0], q[..., 1], q[..., 2]]

    def _min_area(self, height: int, width: int) -> int:
        return self.min_area if self.min_area is not None else max(12, int(self.min_area_share * height * width))

    def detect(self, frame: np.ndarray) -> FrameDetections:
        frame = _as_frames(frame[None] if np.asarray(frame).ndim == 3 else frame)[0]
        height, width = frame.shape[:2]
        labels = self.labels(frame)
        counts = np.bincount(labels.ravel().astype(np.int64) + 1, minlength=len(self.names) + 1)[1:]
        if counts.max() == 0:
            return FrameDetections(None, ())
        background = int(counts.argmax())
        min_area = self._min_area(height, width)
        found = []
        for index in np.flatnonzero(counts >= min_area):
            if index == background:
                continue
            mask = labels == index
            if min(height, width) >= self.min_side_for_opening:
                mask = ndimage.binary_opening(mask, structure=self._structure)
            regions, count = ndimage.label(mask)
            if not count:
                continue
            areas = np.bincount(regions.ravel(), minlength=count + 1)
            for region, box in enumerate(ndimage.find_objects(regions), start=1):
                if box is None or areas[region] < min_area:
                    continue
                found.append(self._describe(self.names[index], regions[box] == region, box, width, height))
        found.sort(key=lambda d: -d.area)
        return FrameDetections(self.names[background], tuple(found))

    @staticmethod
    def _describe(colour: str, mask: np.ndarray, box: tuple[slice, slice], width: int, height: int) -> Detection:
        rows, cols = box
        h, w = mask.shape
        area = int(mask.sum())
        fill = area / float(h * w)
        partial = rows.start == 0 or cols.start == 0 or rows.stop == height or cols.stop == width
        return Detection(colour=colour, shape=classify_shape(mask, partial=partial),
                         centre=((cols.start + cols.stop) / 2.0, (rows.start + rows.stop) / 2.0), area=area,
                         bbox=(cols.start, rows.start, cols.stop, rows.stop), fill=round(fill, 4), partial=partial)

    def detect_video(self, frames: np.ndarray, indices: Iterable[int] | None = None) -> dict[int, FrameDetections]:
        frames = _as_frames(frames)
        picked = range(len(frames)) if indices is None else indices
        return {int(i): self.detect(frames[int(i)]) for i in picked}


def _shape_templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Every world shape rasterised into an h x w bounding box (pixel centres inside the shape)."""
    v = ((np.arange(h) + 0.5) / h * 2 - 1)[:, None]  # -1 at the top edge, +1 at the bottom edge
    u = ((np.arange(w) + 0.5) / w * 2 - 1)[None, :]
    return {
        "circle": u * u + v * v <= 1.0,
        "square": np.ones((h, w), dtype=bool),
        "triangle": v >= 2 * np.abs(u) - 1,  # apex at the middle of the top, base along the bottom
        "diamond": np.abs(u) + np.abs(v) <= 1.0,
    }


def classify_shape(mask: np.ndarray, *, partial: bool = False) -> str:
    """Shape of a region cropped to its bounding box: "circle", "square", "triangle", "diamond" or "unknown".

    Every world shape fills its bounding box in its own way (square 1.0, circle 0.785, triangle and diamond 0.5,
    the triangle's mass low, the diamond's centred); the region is compared with each shape drawn into the same
    box and takes the best match by intersection over union, which stays right for shapes only a few pixels
    across whose corners the opening rounded. A region cut by the frame border keeps these proportions only
    roughly, so its aspect ratio is not checked.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if not partial and max(h, w) > 1.6 * min(h, w):
        return "unknown"  # every world shape has a square bounding box
    area = mask.sum()
    best, best_iou = "unknown", 0.0
    for shape, template in _shape_templates(h, w).items():
        overlap = np.logical_and(mask, template).sum()
        iou = overlap / float(area + template.sum() - overlap)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best if best_iou >= 0.6 else "unknown"


def detect_objects(frame: np.ndarray, detector: Detector | None = None) -> list[Detection]:
    """The objects of one RGB frame (uint8 (H, W, 3)), largest first."""
    return list((detector or _default_detector()).detect(frame).objects)


_DETECTOR: Detector | None = None


def _default_detector() -> Detector:
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = Detector()
    return _DETECTOR


# ---------------------------------------------------------------------------------------------------- metrics


def _as_frames(frames: Any) -> np.ndarray:
    if hasattr(frames, "detach"):  # a torch tensor
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames has shape {frames.shape}: expected (T, H, W, 3)")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames has dtype {frames.dtype}: expected uint8")
    return frames


def psnr(a: Any, b: Any, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two arrays of the same shape (inf when identical)."""
    a = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu().numpy() if hasattr(b, "detach") else b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    if not data_range > 0:
        raise ValueError(f"data_range={data_range!r}: must be > 0")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse)


def frame_differences(frames: Any) -> np.ndarray:
    """Mean absolute difference between consecutive frames, (T - 1,) float64 in 0..255."""
    frames = _as_frames(frames)
    out = np.empty(max(len(frames) - 1, 0), dtype=np.float64)
    step = 64
    for start in range(0, len(out), step):
        stop = min(start + step, len(out))
        a = frames[start:stop].astype(np.int16)
        b = frames[start + 1:stop + 1].astype(np.int16)
        out[start:stop] = np.abs(b - a).reshape(stop - start, -1).mean(axis=1)
    return out


def seam_ratio(frames: Any, boundaries: Iterable[int], *, differences: np.ndarray | None = None) -> float | None:
    """Mean frame-to-frame difference entering each boundary frame (the first frame of a task's or a segment's
    range) over the median difference at all other frames. None when no boundary lies inside the video."""
    diffs = frame_differences(frames) if differences is None else differences
    at = sorted({int(b) - 1 for b in boundaries if 0 < int(b) <= len(diffs)})
    if not at:
        return None
    elsewhere = np.delete(diffs, at)
    seam = float(diffs[at].mean())
    typical = float(np.median(elsewhere)) if elsewhere.size else 0.0
    if typical <= 1e-9:
        # A still video: any change at a boundary is a visible seam; none is a perfect join.
        return 1.0 if seam <= 1e-9 else math.inf
    return seam / typical


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (…, 3) in 0..255 to CIE Lab (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e(rgb_a: Sequence[float], rgb_b: Sequence[float]) -> float:
    """CIE76 colour difference between two sRGB colours."""
    return float(np.linalg.norm(_srgb_to_lab(np.asarray(rgb_a)) - _srgb_to_lab(np.asarray(rgb_b))))


def background_colour(frames: Any, detector: Detector | None = None) -> tuple[str | None, np.ndarray]:
    """The dominant palette colour of ``frames`` and the mean RGB of the pixels showing it."""
    frames = _as_frames(frames)
    detector = detector or _default_detector()
    labels = np.stack([detector.labels(f) for f in frames])
    counts = np.bincount(labels.ravel().astype(np.int64) + 1, minlength=len(detector.names) + 1)[1:]
    if counts.max() == 0:
        return None, frames.reshape(-1, 3).mean(axis=0)
    index = int(counts.argmax())
    return detector.names[index], frames[labels == index].mean(axis=0)


def colour_drift(frames: Any, fps: float, detector: Detector | None = None) -> dict:
    """Change of the background colour from the first to the last second."""
    frames = _as_frames(frames)
    n = max(1, min(len(frames), int(round(fps))))
    first_name, first = background_colour(frames[:n], detector)
    last_name, last = background_colour(frames[-n:], detector)
    return {"delta_e": round(delta_e(first, last), 3), "rgb_distance": round(float(np.linalg.norm(first - last)), 3),
            "first": [round(float(v), 1) for v in first], "last": [round(float(v), 1) for v in last],
            "first_name": first_name, "last_name": last_name}


def persistence_marks(seconds: float) -> tuple[float, ...]:
    """20, 40 and 60 s, scaled down proportionally for a video shorter than 60 s."""
    scale = min(1.0, seconds / PERSISTENCE_MARKS[-1])
    return tuple(m * scale for m in PERSISTENCE_MARKS)


def _window(centre: float, length: float, seconds: float, fps: float, num_frames: int) -> range:
    length = min(length, seconds)
    start = min(max(0.0, centre - length / 2), seconds - length)
    first = max(0, int(math.floor(start * fps + 1e-9)))
    stop = min(num_frames, max(first + 1, int(math.ceil((start + length) * fps - 1e-9))))
    return range(first, stop)


def _present(detections: Mapping[int, FrameDetections], window: range, colour: str, shape: str, *,
             visible: Sequence[int] | None, expected_share: float) -> bool | None:
    """The presence rule of the module docstring. ``visible``: ground-truth frames where the object can be seen
    whole (None without ground truth)."""
    if visible is not None:
        judged = [i for i in window if i in visible]
        if not judged:
            return None
        hits = sum(detections[i].has(colour, shape) for i in judged)
        return hits > PRESENCE_QUORUM * len(judged)
    hits = sum(detections[i].has(colour, shape) for i in window)
    return hits >= max(1.0, PRESENCE_QUORUM * expected_share * len(window))


def _match_ground_truth(prompted: list[dict], truth: Sequence[dict]) -> list[set[int] | None]:
    """For each prompted object, the frames where the ground truth shows it whole and unoccluded."""
    frames_of: list[set[int] | None] = []
    for obj in prompted:
        seen: set[int] | None = None
        for record in truth:
            for o in record["objects"]:
                if o["colour"] == obj["colour"] and o["shape"] == obj["shape"]:
                    seen = seen if seen is not None else set()
                    if o["visibility"] == "full" and not o["occluded"]:
                        seen.add(int(record["frame"]))
        frames_of.append(seen)
    return frames_of


def _colour_centres(detections: Mapping[int, FrameDetections], frames: Sequence[int], colour: str, width: int,
                    height: int) -> dict[int, tuple[float, float]]:
    """Frame -> area-weighted centre (frame fractions) of every region of ``colour`` wholly inside the frame. A
    model's blob may come in fragments, whose common centre moves with the object where the largest one jumps."""
    centres = {}
    for i in frames:
        found = [d for d in detections[i].objects if d.colour == colour and not d.partial]
        area = sum(d.area for d in found)
        if area:
            centres[i] = (sum(d.centre[0] * d.area for d in found) / area / width,
                          sum(d.centre[1] * d.area for d in found) / area / height)
    return centres


def judge_motion(centres: Mapping[int, tuple[float, float]], fps: float, motion: str | None,
                 direction: str | None) -> dict:
    """Whether an object's track shows its prompted motion.

    ``centres``: frame -> centre in frame fractions (frames where it was not seen left out). Velocities are taken
    over spans of ``MOTION_SPAN`` seconds, which average out a generated blob's wobble; spans that jump further
    than ``MOTION_JUMP`` (a wrap-around re-entry) are left out. The rules, from the world's own speeds:
    resting: median speed under ``REST_SPEED``; bouncing: over it; drifting in a direction: median velocity along
    it at least ``DRIFT_SPEED`` and larger than across it; orbiting: moving, with its heading turning at a median
    rate of at least 0.3 rad/s (the world's orbits turn at 0.5-1.5 rad/s, a bounce only where it meets a wall).
    Returns the measured speed and
    turning, and ``correct`` (None when the motion is not prompted or fewer than three spans were seen).
    """
    span = max(1, int(round(MOTION_SPAN * fps)))
    velocities, times = [], []
    for i, (x, y) in sorted(centres.items()):
        later = centres.get(i + span)
        if later is None:
            continue
        v = ((later[0] - x) * fps / span, (later[1] - y) * fps / span)
        if math.hypot(*v) * span / fps <= MOTION_JUMP:
            velocities.append(v)
            times.append(i)
    result: dict[str, Any] = {"expected": motion, "direction": direction, "spans": len(velocities),
                              "speed": None, "turning": None, "correct": None}
    if len(velocities) < 3:
        return result
    vel = np.asarray(velocities, dtype=np.float64)
    speed = float(np.median(np.hypot(vel[:, 0], vel[:, 1])))
    # The heading's rate of turn between neighbouring spans while the object moves: an orbit turns all the
    # time, a bounce only at the walls, so the median rate tells them apart where the total turn would not.
    moving = np.hypot(vel[:, 0], vel[:, 1]) >= REST_SPEED
    heading = np.arctan2(vel[moving, 1], vel[moving, 0])
    t = np.asarray(times, dtype=np.float64)[moving] / fps
    turning = 0.0
    if len(heading) >= 2:
        turn = (np.diff(heading) + math.pi) % (2 * math.pi) - math.pi
        turning = float(np.median(turn / np.maximum(np.diff(t), 1.0 / fps)))
    result.update(speed=round(speed, 4), turning=round(turning, 4))
    if motion == "rest":
        result["correct"] = speed < REST_SPEED
    elif motion == "bounce":
        result["correct"] = speed >= REST_SPEED
    elif motion == "orbit":
        result["correct"] = speed >= REST_SPEED and abs(turning) >= 0.3
    elif motion == "wrap" and direction in world.DIRECTIONS:
        dx, dy = world.DIRECTIONS[direction]
        along = float(np.median(vel[:, 0] * dx + vel[:, 1] * dy))
        across = float(np.median(np.abs(vel[:, 0] * dy - vel[:, 1] * dx)))
        result["correct"] = along >= DRIFT_SPEED and along > across
    elif motion == "wrap":
        result["correct"] = speed >= REST_SPEED
    return result


def _normalise_boundaries(boundaries: Any) -> dict[str, list[int]]:
    if boundaries is None:
        return {}
    if isinstance(boundaries, Mapping):
        return {str(k): sorted({int(b) for b in v}) for k, v in boundaries.items()}
    return {"all": sorted({int(b) for b in boundaries})}


def evaluate_video(frames: Any, prompt: str, fps: float, boundaries: Any = None, *,
                   ground_truth: Sequence[dict] | None = None, detector: Detector | None = None,
                   adherence_seconds: float = ADHERENCE_SECONDS) -> dict:
    """Quality metrics of one video for its prompt.

    ``boundaries``: frame indices where a task or a segment starts, either a list or a mapping such as
    ``{"task": [...], "segment": [...]}`` (see :func:`plan_boundaries`); each kind gets its own seam ratio and
    ``seam_ratio`` is taken over all of them. ``ground_truth``: the :func:`model.world.ground_truth` records of
    every frame, for clips rendered by the world itself (see the presence rule in the module docstring).
    """
    frames = _as_frames(frames)
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps={fps!r}: must be a positive frame rate")
    if ground_truth is not None and len(ground_truth) != len(frames):
        raise ValueError(f"ground_truth has {len(ground_truth)} records: expected one per frame ({len(frames)})")
    detector = detector or _default_detector()
    num_frames = len(frames)
    seconds = num_frames / float(fps)
    parsed = world.parse_caption(prompt)
    prompted = parsed["objects"]
    visible_frames = _match_ground_truth(prompted, ground_truth) if ground_truth is not None else None

    def window_for(obj: dict, centre: float, length: float) -> range:
        if obj.get("motion") == "wrap" and visible_frames is None:
            length = max(length, WRAP_WINDOW_SECONDS)
        return _window(centre, length, seconds, fps, num_frames)

    marks = persistence_marks(seconds)
    mark_window = min(WINDOW_SECONDS, seconds / len(marks))
    start_length = min(adherence_seconds, seconds)
    windows: list[tuple[range, list[range]]] = []
    needed: set[int] = set()
    for obj in prompted:
        start = window_for(obj, start_length / 2, start_length)
        at_marks = [window_for(obj, m, mark_window) for m in marks]
        windows.append((start, at_marks))
        for w in (start, *at_marks):
            needed.update(w)
    # Motion frames: MOTION_RATE samples a second over the first MOTION_SECONDS, each with its span's end.
    motion_span = max(1, int(round(MOTION_SPAN * fps)))
    motion_end = min(num_frames, int(round(MOTION_SECONDS * fps)))
    motion_frames = sorted({f for i in range(0, motion_end, max(1, int(round(fps / MOTION_RATE))))
                            for f in (i, i + motion_span) if f < motion_end})
    needed.update(motion_frames)
    detections = detector.detect_video(frames, sorted(needed))
    height, width = frames.shape[1:3]

    objects = []
    for k, obj in enumerate(prompted):
        start, at_marks = windows[k]
        if visible_frames is not None:
            visible = visible_frames[k] if visible_frames[k] is not None else set()
        else:
            visible = None
        share = WRAP_VISIBLE_SHARE if obj.get("motion") == "wrap" else 1.0
        present = [_present(detections, w, obj["colour"], obj["shape"], visible=visible, expected_share=share)
                   for w in (start, *at_marks)]
        track = _colour_centres(detections, motion_frames, obj["colour"], width, height)
        objects.append({"colour": obj["colour"], "shape": obj["shape"], "motion": obj.get("motion"),
                        "present_at_start": present[0],
                        "present_at": {_mark_key(m): p for m, p in zip(marks, present[1:])},
                        "motion_judged": judge_motion(track, fps, obj.get("motion"), obj.get("direction"))})

    judged_start = [o for o in objects if o["present_at_start"] is not None]
    adherence = (sum(bool(o["present_at_start"]) for o in judged_start) / len(judged_start)) if judged_start else None
    persistence: dict[str, float | None] = {}
    for m in marks:
        key = _mark_key(m)
        judged = [o for o in objects if o["present_at_start"] and o["present_at"][key] is not None]
        persistence[key] = (sum(bool(o["present_at"][key]) for o in judged) / len(judged)) if judged else None

    judged_motion = [o["motion_judged"]["correct"] for o in objects if o["motion_judged"]["correct"] is not None]
    motion_adherence = (sum(judged_motion) / len(judged_motion)) if judged_motion else None

    first_seconds = range(0, max(1, min(num_frames, int(round(adherence_seconds * fps)))))
    seen_background = [detections[i].background if i in detections else detector.detect(frames[i]).background
                       for i in first_seconds]
    detected_background = max(set(seen_background), key=seen_background.count) if seen_background else None

    diffs = frame_differences(frames)
    kinds = _normalise_boundaries(boundaries)
    seams = {f"seam_ratio_{kind}": _rounded(seam_ratio(frames, b, differences=diffs)) for kind, b in kinds.items()}
    union = sorted({b for values in kinds.values() for b in values})
    return {
        "prompt": prompt,
        "num_frames": num_frames,
        "seconds": round(seconds, 4),
        "objects": objects,
        "adherence": _rounded(adherence),
        "persistence": {k: _rounded(v) for k, v in persistence.items()},
        "persistence_final": _rounded(persistence[_mark_key(marks[-1])]),
        "motion_adherence": _rounded(motion_adherence),
        "background": {"expected": parsed["background"], "detected": detected_background,
                       "correct": (parsed["background"] == detected_background) if parsed["background"] else None},
        "seam_ratio": _rounded(seam_ratio(frames, union, differences=diffs)) if union else None,
        **seams,
        "drift": colour_drift(frames, fps, detector),
    }


def _mark_key(mark: float) -> str:
    return f"{mark:g}" if float(mark).is_integer() else f"{mark:.2f}"


def _rounded(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return round(float(value), digits)


def first_frame_of_latent(i: int) -> int:
    """The first video frame latent frame ``i >= 1`` covers (latent 0 holds frame 0 alone)."""
    return LATENT_FRAME_STRIDE * i - (LATENT_FRAME_STRIDE - 1)


def plan_boundaries(plan: Any, num_frames: int) -> dict[str, list[int]]:
    """First video frames of every generation task's run of latent frames and of every decode segment.

    A task boundary sits where two consecutive latent frames were generated by different tasks (or one was
    given as conditioning): latent frame i >= 1 starts at video frame 4i - 3. A plan with a refinement pass
    also gets ``refine``: the boundaries between its refinement tasks, where the decoded latents now join.
    """
    data = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
    given = {int(i): "given" for i in data.get("given", ())}

    def borders(tasks: Iterable[dict]) -> list[int]:
        owner = dict(given)
        for task in tasks:
            for i in task["latent"]:
                owner[int(i)] = task["task_id"]
        frames = []
        for i in sorted(owner):
            if i >= 1 and owner.get(i - 1) != owner[i]:
                frame = first_frame_of_latent(i)
                if 0 < frame < num_frames:
                    frames.append(frame)
        return frames

    tasks = list(data.get("tasks", ()))
    segment_frames = sorted({int(s["frame_start"]) for s in data.get("segments", ())
                             if 0 < int(s["frame_start"]) < num_frames})
    found = {"task": borders(t for t in tasks if not t.get("refine"))}
    refinement = [t for t in tasks if t.get("refine")]
    if refinement:
        found["refine"] = borders(refinement)
    found["segment"] = segment_frames
    return found


# ----------------------------------------------------------------------------------------------------- models


def reconstruct(generator: Any, frames: np.ndarray, prompt: str | None = None) -> np.ndarray:
    """``generator``'s VAE round trip of uint8 frames (T, H, W, 3), as uint8 frames of the same length; a
    decoder that reads the prompt is given ``prompt`` (a render's decode tasks give it the job's)."""
    import torch

    with torch.no_grad():
        decoded = generator.decode(generator.encode(frames), prompt=prompt)
    return np.asarray(decoded.cpu().numpy() if hasattr(decoded, "cpu") else decoded)[:len(frames)]


def vae_psnr(generator: Any, *, clips: int = 4, num_frames: int = 17, width: int = 64, height: int = 64,
             fps: float = 24.0, seed_base: int = VAE_CLIP_SEED_BASE) -> dict:
    """Mean reconstruction PSNR of ``generator.encode``/``decode`` on held-out world clips."""
    values = []
    for k in range(clips):
        frames, _, text = world.render_clip(seed_base + k, num_frames, fps, width, height)
        values.append(psnr(frames, reconstruct(generator, frames, text)))
    finite = [v for v in values if math.isfinite(v)]
    mean = float(np.mean(finite)) if len(finite) == len(values) else math.inf
    return {"psnr": round(mean, 3), "per_clip": [round(v, 3) for v in values], "clips": clips,
            "num_frames": num_frames, "width": width, "height": height}


def reconstruction_ceiling(generator: Any, prompts: Sequence[tuple[int, str]], *, width: int, height: int,
                           fps: float, seconds: float = ADHERENCE_SECONDS) -> dict:
    """Adherence and seam ratio of the VAE's reconstruction of each prompt's own world video (first seconds).

    Whatever the DiT generates reaches the screen through the decoder, so these are the best scores the model
    can get: when they are low, the VAE, not the DiT or the schedule, is what to improve. Seams are measured at
    every latent-frame boundary (frame 4i - 3), where one latent's frames meet the next's.
    """
    num_frames = 1 + LATENT_FRAME_STRIDE * max(1, round((seconds * fps - 1) / LATENT_FRAME_STRIDE))
    boundaries = [first_frame_of_latent(i) for i in range(1, 1 + (num_frames - 1) // LATENT_FRAME_STRIDE)]
    adherence, seams = [], []
    for seed, prompt in prompts:
        frames = world.render_frames(world.sample_world(seed), range(num_frames), fps=fps, width=width,
                                     height=height)
        result = evaluate_video(reconstruct(generator, frames, prompt), prompt, fps, boundaries, adherence_seconds=seconds)
        adherence.append(result["adherence"])
        seams.append(result["seam_ratio"])
    return {"adherence": _rounded(_mean(adherence)), "seam_ratio": _rounded(_mean(seams)),
            "prompts": len(prompts), "seconds": round(num_frames / fps, 3)}


DENOISE_LEVELS = (0.3, 0.6, 0.9)


def _noised(generator: Any, clean: Any, level: float, own_seed: int, shared_seed: int) -> Any:
    """``clean`` latents noised to ``level`` under the model's noise prior: each frame's own noise drawn from
    ``own_seed``, the field common to all frames from ``shared_seed``, so every measurement is reproducible."""
    import torch

    from model.flow import noisy, video_noise

    noise = video_noise(len(clean), tuple(clean.shape[1:]), generator.config.flow.noise_correlation,
                        own=torch.Generator().manual_seed(own_seed), shared=torch.Generator().manual_seed(shared_seed))
    return noisy(clean, noise, torch.full((len(clean),), level))


def denoising_error(generator: Any, prompts: Sequence[tuple[int, str]], *, width: int, height: int, fps: float,
                    latent_frames: int = 16, levels: Sequence[float] = DENOISE_LEVELS, seed: int = 0) -> dict:
    """The DiT's error on each prompt's own world video: mean squared error of its clean-latent estimate from
    ``latent_frames`` encoded latent frames noised to each level, on the latent pixels that objects touch and on
    the rest (the backdrop).

    Rendering turns a small change of the DiT into a whole object found or lost, so adherence on a few prompts
    moves in steps; this error moves smoothly, needs one DiT call per level and prompt, and tells objects from
    backdrop, which the plain training loss averages away.

    ``adherence`` scores each decoded estimate as a video of its own (every frame counts): whether the objects
    keep their colour and shape through one estimate. ``adherence_clean`` scores the decoded clean latents,
    the most any estimate can keep.
    """
    from model.latent_pool import latent_object_mask

    num_frames = 1 + LATENT_FRAME_STRIDE * (latent_frames - 1)
    times = list(range(latent_frames))
    sums = {level: [0.0, 0.0, 0.0, 0.0] for level in levels}  # object error, object pixels, backdrop error, pixels
    kept: dict[float, list[float | None]] = {level: [] for level in (0.0, *levels)}

    def adherence_of(latents: Any, prompt: str) -> float | None:
        frames = _as_frames(generator.decode(latents, prompt=prompt))
        return evaluate_video(frames, prompt, fps, adherence_seconds=len(frames) / fps)["adherence"]

    for k, (world_seed, prompt) in enumerate(prompts):
        spec = world.sample_world(world_seed)
        frames = world.render_frames(spec, range(num_frames), fps=fps, width=width, height=height)
        clean = generator.encode(frames)
        objects = latent_object_mask(spec, times, fps, width, height, generator.config.vae.spatial_factor).bool()
        kept[0.0].append(adherence_of(clean, prompt))
        for j, level in enumerate(levels):
            estimate = generator.predict_clean(_noised(generator, clean, level, seed + 1000 * k + j, seed + 1000 * k),
                                               times, level, prompt)
            error = (estimate - clean).pow(2).mean(1)  # (F, h, w)
            kept[level].append(adherence_of(estimate, prompt))
            total = sums[level]
            total[0] += float(error[objects].sum())
            total[1] += int(objects.sum())
            total[2] += float(error[~objects].sum())
            total[3] += int((~objects).sum())
    return {"levels": [float(v) for v in levels],
            "objects": [_rounded(t[0] / t[1]) if t[1] else None for t in sums.values()],
            "backdrop": [_rounded(t[2] / t[3]) if t[3] else None for t in sums.values()],
            "adherence": [_rounded(_mean(kept[level])) for level in levels],
            "adherence_clean": _rounded(_mean(kept[0.0])),
            "prompts": len(prompts), "latent_frames": latent_frames}


def prompt_sensitivity(generator: Any, prompts: Sequence[tuple[int, str]], *, width: int, height: int, fps: float,
                       latent_frames: int = 6, levels: Sequence[float] = DENOISE_LEVELS, seed: int = 0) -> dict:
    """How far the DiT's clean-latent estimate of an object moves when the prompt names another shape for it,
    and when it names another colour: the mean squared difference of the two estimates on the latent pixels
    the object touches, from the same noisy latents of the prompt's own world video, by noise level.

    The first prompted object of each world is the one renamed (another shape; another colour that is neither
    the background's nor another object's); only the caption changes, so whatever moves is what the DiT takes
    from that word. A DiT that hears colours and not shapes draws every shape as the same blob, whatever
    else it has learnt: this tells that apart from a drawing problem in one DiT call per word and level.
    """
    from model.latent_pool import latent_object_mask

    num_frames = 1 + LATENT_FRAME_STRIDE * (latent_frames - 1)
    times = list(range(latent_frames))
    moved: dict[str, dict[float, list[float]]] = {word: {level: [] for level in levels}
                                                  for word in ("shape", "colour")}
    for k, (world_seed, prompt) in enumerate(prompts):
        spec = world.sample_world(world_seed)
        first = spec.objects[0]
        taken = {spec.background, *(o.colour for o in spec.objects)}
        renamed = {
            "shape": dataclasses.replace(first, shape=next(s for s in world.SHAPES if s != first.shape)),
            "colour": dataclasses.replace(first, colour=next(c for c in world.COLOURS if c not in taken)),
        }
        captions = {word: world.caption(dataclasses.replace(spec, objects=(obj, *spec.objects[1:])))
                    for word, obj in renamed.items()}
        frames = world.render_frames(spec, range(num_frames), fps=fps, width=width, height=height)
        clean = generator.encode(frames)
        alone = dataclasses.replace(spec, objects=(first,))
        pixels = latent_object_mask(alone, times, fps, width, height, generator.config.vae.spatial_factor).bool()
        if not pixels.any():
            continue
        for j, level in enumerate(levels):
            noisy_latents = _noised(generator, clean, level, seed + 1000 * k + j, seed + 1000 * k)
            estimate = generator.predict_clean(noisy_latents, times, level, prompt)
            for word, other in captions.items():
                changed = generator.predict_clean(noisy_latents, times, level, other)
                moved[word][level].append(float((changed - estimate).pow(2).mean(1)[pixels].mean()))
    return {"levels": [float(v) for v in levels],
            **{word: [_rounded(_mean(by_level[level]), 5) for level in levels] for word, by_level in moved.items()},
            "prompts": len(prompts), "latent_frames": latent_frames}


def _count_by_shape(result: dict, by_shape: dict[str, list[float]]) -> None:
    """Add each judged object of an :func:`evaluate_video` result to its prompted shape's list (1.0 found at the
    start, 0.0 not)."""
    for obj in result["objects"]:
        if obj["present_at_start"] is not None:
            by_shape[obj["shape"]].append(float(obj["present_at_start"]))


def _shares(found: Mapping[str, list[float]]) -> dict[str, float | None]:
    """The mean of each non-empty list of 1.0/0.0 judgements: the share found, per prompted shape or motion."""
    return {key: _rounded(_mean(values)) for key, values in found.items() if values}


def window_adherence(generator: Any, prompts: Sequence[tuple[int, str]], *, width: int, height: int, fps: float,
                     steps: int, guidance: float, guidance_rescale: float = 0.0, latent_frames: int = 16,
                     seed: int = 0) -> dict:
    """Adherence of one generated window per prompt: ``latent_frames`` latent frames sampled with nothing
    observed (a keyframe task's shape), decoded, and scored over their whole length.

    A full render costs minutes per prompt, so the schedules' adherence rests on a few prompts and moves by whole
    objects; a window costs seconds, so this one can average dozens. It measures the DiT and the decoder alone,
    without a schedule: ``seam_ratio`` is taken at every latent-frame boundary inside the window, where a render's
    task and segment boundaries also lie, so it shows how much of a render's seams the DiT makes by itself.
    """
    from model.generator import Window

    h, w = generator.latent_size(height, width)
    window = Window((), tuple(range(latent_frames)), h, w)
    adherence, background, seams, motion = [], [], [], []
    by_shape: dict[str, list[float]] = {shape: [] for shape in world.SHAPES}
    by_motion: dict[str, list[float]] = {m: [] for m in world.MOTIONS}
    masses: list[float] = []
    boundaries = [first_frame_of_latent(i) for i in range(1, latent_frames)]
    for k, (_, prompt) in enumerate(prompts):
        latents = generator.sample(window, None, prompt, seed=seed + k, steps=steps, guidance=guidance,
                                   guidance_rescale=guidance_rescale)
        frames = generator.decode(latents, prompt=prompt).numpy()
        result = evaluate_video(frames, prompt, fps, boundaries, adherence_seconds=len(frames) / fps)
        adherence.append(result["adherence"])
        seams.append(result["seam_ratio"])
        if result["background"]["correct"] is not None:
            background.append(float(result["background"]["correct"]))
        motion.append(result["motion_adherence"])
        _count_by_shape(result, by_shape)
        for obj in result["objects"]:
            if obj["motion_judged"]["correct"] is not None:
                by_motion[obj["motion"]].append(float(obj["motion_judged"]["correct"]))
        mass = shape_channel_mass(generator, latents, prompt)
        if mass is not None:
            masses.append(mass)
    # By prompted shape: a model that ignores the shape word draws every object as the same blob, which the
    # detector reads as a circle, so the mean alone hides whether shapes are drawn at all.
    report = {"adherence": _rounded(_mean(adherence)), "background_correct": _rounded(_mean(background)),
              "seam_ratio": _rounded(_mean(seams)), "prompts": len(prompts), "latent_frames": latent_frames,
              "by_shape": _shares(by_shape),
              "motion_adherence": _rounded(_mean(motion)),
              "by_motion": _shares(by_motion)}
    if masses:
        report["shape_channel_mass"] = _rounded(_mean(masses))
    return report


def shape_channel_mass(generator: Any, latents: Any, prompt: str) -> float | None:
    """For a model whose latents carry shape channels (``vae.shape_channels``): the share of the generated
    shape channels' positive mass that lies in the shapes the prompt names (1: only prompted shapes; with four
    shapes and one named, about 0.25 for channels that ignore the prompt). ``None`` for a model without them.

    It reads what the DiT put where the decoder takes the shape from, so a model that names the right shape in
    its channels and still decodes a blob shows here and not in adherence."""
    cfg = getattr(getattr(generator, "config", None), "vae", None)
    if cfg is None or not cfg.shape_channels:
        return None
    named = {obj["shape"] for obj in world.parse_caption(prompt)["objects"]}
    # (T, C, h, w) latents: each shape channel's positive mass over every frame and latent pixel
    mass = latents[:, cfg.appearance_channels:].float().clamp(min=0).sum(dim=(0, 2, 3))
    total = float(mass.sum())
    if total <= 0 or not named:
        return None
    return sum(float(mass[world.SHAPES.index(shape)]) for shape in named) / total


def image_adherence(generator: Any, prompts: Sequence[tuple[int, str]], *, width: int, height: int, fps: float,
                    steps: int, guidance: float, guidance_rescale: float = 0.0, seed: int = 0) -> dict:
    """Adherence of one generated still per prompt: a window of a single latent frame (the video's first frame,
    encoded alone) sampled with nothing observed, decoded, and its one frame scored.

    The cheapest reading of whether the DiT draws what a prompt names: the layout (which shapes, colours and
    how many) without motion. A DiT trained on a pool of stills first (``longshot train latents --stills``) is
    judged here before it has seen a video window; the windows and continuations then say what video adds.
    """
    found = window_adherence(generator, prompts, width=width, height=height, fps=fps, steps=steps,
                             guidance=guidance, guidance_rescale=guidance_rescale, latent_frames=1, seed=seed)
    # One frame has no latent-frame boundaries and no motion to judge.
    return {key: value for key, value in found.items()
            if key not in ("seam_ratio", "latent_frames", "motion_adherence", "by_motion")}


def continuation_adherence(generator: Any, prompts: Sequence[tuple[int, str]], *, width: int, height: int,
                           fps: float, steps: int, guidance: float, guidance_rescale: float = 0.0,
                           latent_frames: int = 8, seed: int = 0) -> dict:
    """Adherence of windows that continue each prompt's own world: the world's first latent frame observed, the
    next ``latent_frames - 1`` generated, the second half of the window scored (and, as its ceiling, the same
    frames of the VAE's reconstruction of the world).

    The shapes are on screen in the observed frame, so the DiT has only to carry them on; where it cannot, what
    fails is its drawing, not its reading of the prompt. The shipped DiT keeps no square, triangle or diamond
    this way (MODEL_CARD.md), which is why more training on the words alone did not draw them.
    """
    import torch

    from model.generator import Window

    h, w = generator.latent_size(height, width)
    num_frames = 1 + LATENT_FRAME_STRIDE * (latent_frames - 1)
    scored_from = first_frame_of_latent(latent_frames // 2)
    window = Window((0,), tuple(range(1, latent_frames)), h, w)
    found: dict[str, dict] = {kind: {"adherence": [], "by_shape": {s: [] for s in world.SHAPES}}
                              for kind in ("generated", "ceiling")}
    for k, (world_seed, prompt) in enumerate(prompts):
        frames = world.render_frames(world.sample_world(world_seed), range(num_frames), fps=fps, width=width,
                                     height=height)
        with torch.no_grad():
            latents = generator.encode(frames)
            made = generator.sample(window, latents[:1], prompt, seed=seed + k, steps=steps, guidance=guidance,
                                    guidance_rescale=guidance_rescale)
            video = generator.decode(torch.cat([latents[:1], made]), prompt=prompt)
        for kind, frames_made in (("generated", video), ("ceiling", reconstruct(generator, frames, prompt))):
            part = frames_made[scored_from:num_frames]
            result = evaluate_video(part, prompt, fps, adherence_seconds=len(part) / fps)
            found[kind]["adherence"].append(result["adherence"])
            _count_by_shape(result, found[kind]["by_shape"])

    def summary(kind: str) -> dict:
        return {"adherence": _rounded(_mean(found[kind]["adherence"])),
                "by_shape": _shares(found[kind]["by_shape"])}

    return {**summary("generated"), "ceiling": summary("ceiling"), "prompts": len(prompts),
            "latent_frames": latent_frames, "scored_from_frame": scored_from}


def eval_prompts(count: int) -> list[tuple[int, str]]:
    """The fixed evaluation prompt set: (world seed, caption) of held-out worlds."""
    return [(PROMPT_SEED_BASE + k, world.caption(world.sample_world(PROMPT_SEED_BASE + k))) for k in range(count)]


# --------------------------------------------------------------------------------------------------------- CLI

# The reference column: the world's own rendering of each prompt, measured with the same rules as a generated
# video. It is the best a model can score and shows how much of a shortfall the measurement itself explains.
WORLD_COLUMN = "world"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from orchestrator.spec import SCHEDULES

    parser = argparse.ArgumentParser(
        prog="longshot eval",
        description="Render a fixed, seeded prompt set with each schedule and measure prompt adherence, identity "
                    "persistence, seams, colour drift and VAE reconstruction against the demo model's targets.")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of every rendered video (default 60)")
    parser.add_argument("--prompts", type=int, default=4,
                        help="number of evaluation prompts rendered with each schedule (default 4; 0 renders "
                             "nothing and measures the model alone: VAE, windows, stills)")
    parser.add_argument("--schedules", default=",".join(DEFAULT_SCHEDULES),
                        help=f"comma-separated schedules to compare (default {','.join(DEFAULT_SCHEDULES)}; "
                             f"choices {','.join(SCHEDULES)})")
    parser.add_argument("--model", default=None,
                        help="checkpoint directory or preset name (default: the shipped demo checkpoint)")
    parser.add_argument("--width", type=int, default=None, help="frame width (default: the job spec's)")
    parser.add_argument("--height", type=int, default=None, help="frame height (default: the job spec's)")
    parser.add_argument("--fps", type=int, default=None, help="frames per second (default: the job spec's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the job spec's)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the job spec's)")
    parser.add_argument("--guidance-rescale", type=float, default=None, dest="guidance_rescale",
                        help="guidance rescale 0..1 (default: the job spec's)")
    parser.add_argument("--infill-guidance", type=float, default=None, dest="infill_guidance",
                        help="guidance of infill tasks (default: the job spec's)")
    parser.add_argument("--extension-guidance-floor", type=float, default=None, dest="extension_guidance_floor",
                        help="noise level below which extension tasks sample without guidance (default: the job "
                             "spec's)")
    parser.add_argument("--refine", type=float, default=None,
                        help="noise level of the refinement pass, 0 turns it off (default: the job spec's)")
    parser.add_argument("--refine-steps", type=int, default=None, dest="refine_steps",
                        help="sampling steps of a refinement task (default: the job spec's)")
    parser.add_argument("--workers", type=int, default=None, help="local Dask worker processes")
    parser.add_argument("--scheduler", default=None, help="address of a running Dask scheduler to render on")
    parser.add_argument("--engine", choices=("deepspeed", "eager"), default="deepspeed",
                        help="how workers run the DiT (default deepspeed)")
    parser.add_argument("--seed", type=int, default=0, help="job seed of every render (default 0)")
    parser.add_argument("--vae-clips", type=int, default=4, help="held-out clips for VAE PSNR (0 skips it)")
    parser.add_argument("--denoise-frames", type=int, default=16,
                        help="latent frames of each prompt's world video for the DiT's denoising error and its "
                             "sensitivity to the prompt's shape and colour words (0 skips both)")
    parser.add_argument("--window-prompts", type=int, default=16,
                        help="prompts scored on one generated window each, no render (0 skips; default 16)")
    parser.add_argument("--image-prompts", type=int, default=64,
                        help="prompts scored on one generated still each (a one-latent-frame window), no render "
                             "(0 skips; default 64)")
    parser.add_argument("--out", default=None, help="keep videos and stores in this directory (default: temporary)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 3600:
        parser.error(f"--seconds={args.seconds:g}: must be in 1..3600")
    if not 0 <= args.prompts <= 1000:
        parser.error(f"--prompts={args.prompts}: must be in 0..1000")
    if not 0 <= args.vae_clips <= 1000:
        parser.error(f"--vae-clips={args.vae_clips}: must be in 0..1000")
    if not 0 <= args.denoise_frames <= 64:
        parser.error(f"--denoise-frames={args.denoise_frames}: must be in 0..64")
    if not 0 <= args.window_prompts <= 1000:
        parser.error(f"--window-prompts={args.window_prompts}: must be in 0..1000")
    if not 0 <= args.image_prompts <= 1000:
        parser.error(f"--image-prompts={args.image_prompts}: must be in 0..1000")
    if not (args.prompts or args.vae_clips or args.denoise_frames or args.window_prompts or args.image_prompts):
        parser.error("--prompts=0: with nothing rendered, at least one of --vae-clips, --denoise-frames, "
                     "--window-prompts or --image-prompts must be above 0")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers={args.workers}: must be at least 1")
    args.schedules = list(dict.fromkeys(s.strip() for s in args.schedules.split(",") if s.strip()))
    unknown = [s for s in args.schedules if s not in SCHEDULES]
    if not args.schedules or unknown:
        parser.error(f"--schedules={','.join(args.schedules)}: each must be one of {', '.join(SCHEDULES)}")
    return args


def _job_spec(args: argparse.Namespace, prompt: str, schedule: str, output: Path):
    from orchestrator.spec import JobSpec

    fields = {"prompt": prompt, "seconds": args.seconds, "fps": args.fps, "width": args.width,
              "height": args.height, "steps": args.steps, "guidance": args.guidance,
              "guidance_rescale": args.guidance_rescale, "infill_guidance": args.infill_guidance,
              "extension_guidance_floor": args.extension_guidance_floor, "refine": args.refine,
              "refine_steps": args.refine_steps, "seed": args.seed, "schedule": schedule,
              "model": args.model, "output": str(output)}
    return JobSpec.parse({k: v for k, v in fields.items() if v is not None})


def _render(job: Any, args: argparse.Namespace, scheduler: str) -> tuple[Path, dict[str, list[int]], float]:
    """Render one job through the orchestrator; return the video, its task/segment boundaries and the wall time."""
    from orchestrator import run
    from orchestrator.store import JobStore

    result = run.render(job, scheduler=scheduler, engine=args.engine, force=True)
    plan = JobStore.open(result.store, read_only=True).plan
    return Path(result.output), plan_boundaries(plan, job.num_frames), float(result.wall_seconds)


def load_generator(model: str | None):
    """The Generator a job with ``model`` renders with (same resolution rule as the workers)."""
    from cluster.worker import resolve_model
    from model import Generator

    return Generator.from_name(resolve_model(model), device="cpu")


def model_sampling(model: str | None) -> dict:
    """The render defaults of the checkpoint a job with ``model`` renders with (config.json's `sampling`)."""
    from cluster.worker import resolve_model
    from model.generator import checkpoint_sampling

    return checkpoint_sampling(resolve_model(model))


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None


def summarise(per_prompt: list[dict]) -> dict:
    """Means over prompts of every per-video metric (prompts where a metric is undefined are left out)."""
    marks = list(per_prompt[0]["persistence"])
    return {
        "adherence": _mean(r["adherence"] for r in per_prompt),
        "persistence": {k: _mean(r["persistence"].get(k) for r in per_prompt) for k in marks},
        "persistence_final": _mean(r["persistence_final"] for r in per_prompt),
        "motion_adherence": _mean(r.get("motion_adherence") for r in per_prompt),
        "seam_ratio": _mean(r["seam_ratio"] for r in per_prompt),
        "seam_ratio_task": _mean(r.get("seam_ratio_task") for r in per_prompt),
        "seam_ratio_segment": _mean(r.get("seam_ratio_segment") for r in per_prompt),
        "seam_ratio_refine": _mean(r.get("seam_ratio_refine") for r in per_prompt),
        "drift_delta_e": _mean(r["drift"]["delta_e"] for r in per_prompt),
        "background_correct": _mean(float(r["background"]["correct"]) for r in per_prompt
                                    if r["background"]["correct"] is not None),
    }


def check_targets(summary: Mapping[str, dict], vae: dict | None) -> list[dict]:
    """Every target against every schedule (VAE once), plus hierarchical >= autoregressive persistence."""
    checks = []

    def add(target: str, schedule: str | None, value: float | None, op: str, threshold: float) -> None:
        passed = None if value is None else bool(value >= threshold if op == ">=" else value <= threshold)
        checks.append({"target": target, "schedule": schedule, "value": value, "op": op, "threshold": threshold,
                       "passed": passed})

    if vae is not None:
        add("vae_psnr", None, vae["psnr"], *TARGETS["vae_psnr"])
    for schedule, metrics in summary.items():
        for target in ("adherence", "persistence_final", "seam_ratio", "drift_delta_e"):
            add(target, schedule, metrics[target], *TARGETS[target])
    baseline = summary.get("autoregressive", {}).get("persistence_final")
    for schedule in summary:
        if schedule in HIERARCHICAL and baseline is not None:
            add("persistence_vs_autoregressive", schedule, summary[schedule]["persistence_final"], ">=", baseline)
    return checks


def _target_text(key: str) -> str:
    if key not in TARGETS:
        return ""
    op, value = TARGETS[key]
    return f"{'>=' if op == '>=' else '<='} {value:g}"


def _by_level(levels: Sequence[float], first: Sequence[Any], second: Sequence[Any]) -> str:
    """"0.3: a / b, 0.6: a / b, ..." for two measurements taken at each noise level."""
    return ", ".join(f"{level:g}: {a} / {b}" for level, a, b in zip(levels, first, second))


def _cell(value: Any, passed: bool | None) -> str:
    """A table cell: the value, and pass or FAIL where it is checked against a target."""
    text = "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
    if passed is None:
        return text
    return f"{text} [green]pass[/]" if passed else f"{text} [red]FAIL[/]"


def _schedule_table(report: dict, verdict: Mapping[tuple[str, str | None], bool | None]):
    """The renders' metrics, one column per schedule and one for the world's own video."""
    from rich.table import Table

    columns = list(report["schedules"]) + ([WORLD_COLUMN] if report.get("world") else [])
    summaries = {s: v["summary"] for s, v in report["schedules"].items()}
    if report.get("world"):
        summaries[WORLD_COLUMN] = report["world"]["summary"]
    settings = report["settings"]
    table = Table(title=f"longshot eval: {settings['prompts']} prompts x {settings['seconds']:g} s, "
                        f"{settings['width']}x{settings['height']} @ {settings['fps']} fps")
    table.add_column("metric")
    for column in columns:
        table.add_column(column + (" (reference)" if column == WORLD_COLUMN else ""), justify="right")
    table.add_column("target", justify="right")

    def row(label: str, key: str, mark: str | None = None) -> None:
        values = [summaries[c]["persistence"].get(mark) if mark else summaries[c].get(key) for c in columns]
        table.add_row(label, *[_cell(v, None if mark else verdict.get((key, c))) for v, c in zip(values, columns)],
                      "" if mark else _target_text(key))

    row("prompt adherence", "adherence")
    for mark in summaries[columns[0]]["persistence"]:
        row(f"persistence @ {mark} s", "persistence", mark)
    row("persistence (end)", "persistence_final")
    row("motion adherence (first 6 s)", "motion_adherence")
    row("seam ratio", "seam_ratio")
    row("  at task boundaries", "seam_ratio_task")
    row("  at segment boundaries", "seam_ratio_segment")
    row("  at refinement boundaries", "seam_ratio_refine")
    row("colour drift (delta E)", "drift_delta_e")
    row("background correct", "background_correct")
    if any(c["target"] == "persistence_vs_autoregressive" for c in report["checks"]):
        table.add_row("persistence >= autoregressive",
                      *[_cell("", verdict.get(("persistence_vs_autoregressive", c))) if
                        ("persistence_vs_autoregressive", c) in verdict else "" for c in columns],
                      "hierarchical")
    return table


def _print_table(report: dict) -> None:
    from rich.console import Console

    console = Console()
    verdict = {(c["target"], c["schedule"]): c["passed"] for c in report["checks"]}
    if report["schedules"]:  # nothing rendered (--prompts 0): the model-only lines alone
        console.print(_schedule_table(report, verdict))
    if report.get("vae") is not None:
        vae = report["vae"]
        console.print(f"VAE reconstruction PSNR on {vae['clips']} held-out world clips of {vae['num_frames']} frames: "
                      f"{_cell(vae['psnr'], verdict.get(('vae_psnr', None)))} dB (target {_target_text('vae_psnr')})")
        ceiling = vae.get("reconstruction")
        if ceiling:
            console.print(f"The VAE's ceiling (its reconstruction of each prompt's world video, first "
                          f"{ceiling['seconds']:g} s): adherence {ceiling['adherence']}, seam ratio at every latent "
                          f"boundary {ceiling['seam_ratio']}")
    if report.get("denoising"):
        d = report["denoising"]
        console.print(f"DiT denoising error (clean-latent MSE, objects / backdrop, by noise level) on "
                      f"{d['latent_frames']} latent frames of each prompt's world video: "
                      f"{_by_level(d['levels'], d['objects'], d['backdrop'])}")
        if d.get("adherence"):
            kept = ", ".join(f"{level:g}: {a}" for level, a in zip(d["levels"], d["adherence"]))
            console.print(f"Adherence of the decoded clean-latent estimates, by noise level: {kept} "
                          f"(decoded clean latents: {d['adherence_clean']})")
    if report.get("prompt_sensitivity"):
        d = report["prompt_sensitivity"]
        console.print(f"How far the DiT's estimate of an object moves when the prompt renames its shape / its colour "
                      f"(MSE on its latent pixels, by noise level): {_by_level(d['levels'], d['shape'], d['colour'])}")
    if report.get("window"):
        win = report["window"]
        console.print(f"One generated window of {win['latent_frames']} latent frames per prompt, {win['prompts']} "
                      f"prompts: adherence {win['adherence']}, background correct {win['background_correct']}, "
                      f"seam ratio at latent-frame boundaries {win.get('seam_ratio')}")
        if win.get("by_shape"):
            console.print("  adherence by prompted shape: "
                          + ", ".join(f"{shape} {share}" for shape, share in win["by_shape"].items()))
        if win.get("by_motion"):
            console.print(f"  motion adherence {win['motion_adherence']}; by prompted motion: "
                          + ", ".join(f"{m} {share}" for m, share in win["by_motion"].items()))
    if report.get("continuation"):
        cont = report["continuation"]

        def shares(part: dict) -> str:
            return ", ".join(f"{shape} {share}" for shape, share in part["by_shape"].items())

        console.print(f"Windows that continue each prompt's world from its first latent frame, {cont['prompts']} "
                      f"prompts, scored from frame {cont['scored_from_frame']}: adherence {cont['adherence']} "
                      f"({shares(cont)}); the VAE's reconstruction of the same frames {cont['ceiling']['adherence']} "
                      f"({shares(cont['ceiling'])})")
    if report.get("image"):
        image = report["image"]
        mass = (f", shape channels' mass in the prompted shapes {image['shape_channel_mass']}"
                if image.get("shape_channel_mass") is not None else "")
        console.print(f"One generated still per prompt, {image['prompts']} prompts: adherence {image['adherence']} "
                      f"(" + ", ".join(f"{shape} {share}" for shape, share in image["by_shape"].items())
                      + f"), background correct {image['background_correct']}{mass}")
    failed = [c for c in report["checks"] if c["passed"] is False]
    if report["checks"]:
        console.print(f"{len(report['checks']) - len(failed)} of {len(report['checks'])} target checks pass.")
    else:
        console.print("No target checks: the targets are on renders and the VAE's PSNR, and neither was measured.")


def run_evaluation(args: argparse.Namespace) -> dict:
    """Render every prompt with every schedule, measure, and assemble the report. With ``--prompts 0`` nothing
    is rendered: the report holds the model-only measurements (VAE, windows, continuations, stills)."""
    from cluster.backends import start
    from orchestrator.media import read_frames

    prompts = eval_prompts(args.prompts)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="longshot-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    # The job spec's defaults decide the frame size, rate and sampling settings, rendered or not; the settings
    # a job leaves unset are the model's where its checkpoint has them, as in a render.
    first_job = _job_spec(args, (prompts or eval_prompts(1))[0][1], args.schedules[0], work / "settings.mp4")
    first_job = first_job.with_model_defaults(model_sampling(args.model))
    width, height, fps, seconds = first_job.width, first_job.height, first_job.fps, first_job.seconds
    num_frames = first_job.num_frames

    schedules: dict[str, dict] = {}
    # One cluster for every render: workers load the model once instead of once per video.
    session = None if args.scheduler or not prompts else start(backend="local", workers=args.workers)
    try:
        scheduler = args.scheduler or (session.scheduler_address if session is not None else None)
        for schedule in args.schedules if prompts else ():
            per_prompt = []
            for seed, prompt in prompts:
                job = _job_spec(args, prompt, schedule, work / f"{schedule}-{seed}.mp4")
                output, boundaries, wall = _render(job, args, scheduler)
                frames = read_frames(output, width, height)[:num_frames]
                result = evaluate_video(frames, prompt, fps, boundaries)
                result.update(world_seed=seed, render_seconds=round(wall, 2), output=str(output),
                              boundaries=boundaries)
                per_prompt.append(result)
            schedules[schedule] = {"summary": summarise(per_prompt), "per_prompt": per_prompt}
    finally:
        if session is not None:
            session.close()

    world_column = None
    if prompts:
        reference = []
        for k, (seed, prompt) in enumerate(prompts):
            frames = world.render_frames(world.sample_world(seed), range(num_frames), fps=fps, width=width,
                                         height=height)
            # The same boundaries as the first schedule's render: the seam ratio a seamless video shows there.
            boundaries = schedules[args.schedules[0]]["per_prompt"][k]["boundaries"]
            reference.append(evaluate_video(frames, prompt, fps, boundaries) | {"world_seed": seed})
        world_column = {"summary": summarise(reference), "per_prompt": reference}

    vae = denoising = sensitivity = windows = continuation = images = None
    generator = (load_generator(args.model)
                 if args.vae_clips or args.denoise_frames or args.window_prompts or args.image_prompts else None)
    # The measurements of the rendered prompts' own worlds (the VAE's ceiling, the denoising error) need
    # rendered prompts; the prompt sensitivity takes the window prompts where there are any.
    if args.vae_clips:
        vae = vae_psnr(generator, clips=args.vae_clips, width=width, height=height, fps=fps)
        if prompts:
            vae["reconstruction"] = reconstruction_ceiling(generator, prompts, width=width, height=height, fps=fps)
    if args.denoise_frames:
        latent_frames = min(args.denoise_frames, generator.max_window)
        if prompts:
            denoising = denoising_error(generator, prompts, width=width, height=height, fps=fps,
                                        latent_frames=latent_frames, seed=args.seed)
        # One DiT call per word and level: cheap enough for the window check's larger prompt set.
        heard = eval_prompts(args.window_prompts) if args.window_prompts else prompts
        if heard:
            sensitivity = prompt_sensitivity(generator, heard, width=width, height=height, fps=fps,
                                             latent_frames=latent_frames, seed=args.seed)
    if args.window_prompts:
        windows = window_adherence(generator, eval_prompts(args.window_prompts), width=width, height=height,
                                   fps=fps, steps=first_job.steps, guidance=first_job.guidance,
                                   guidance_rescale=first_job.guidance_rescale,
                                   latent_frames=generator.max_window, seed=args.seed)
        continuation = continuation_adherence(generator, eval_prompts(args.window_prompts), width=width,
                                              height=height, fps=fps, steps=first_job.steps,
                                              guidance=first_job.guidance,
                                              guidance_rescale=first_job.guidance_rescale,
                                              latent_frames=min(8, generator.max_window), seed=args.seed)
    if args.image_prompts:
        images = image_adherence(generator, eval_prompts(args.image_prompts), width=width, height=height, fps=fps,
                                 steps=first_job.steps, guidance=first_job.guidance,
                                 guidance_rescale=first_job.guidance_rescale, seed=args.seed)
    checks = check_targets({s: v["summary"] for s, v in schedules.items()}, vae)
    return {
        "settings": {"prompts": args.prompts, "seconds": seconds, "schedules": args.schedules,
                     "model": args.model, "width": width, "height": height, "fps": fps,
                     "steps": first_job.steps, "guidance": first_job.guidance,
                     "guidance_rescale": first_job.guidance_rescale,
                     "infill_guidance": first_job.guidance_for_infill,
                     "extension_guidance_floor": first_job.guidance_floor_for_extension,
                     "refine": first_job.refine_level,
                     "refine_steps": first_job.steps_for_refine,
                     "workers": args.workers,
                     "engine": args.engine, "seed": args.seed,
                     "window_prompts": args.window_prompts, "image_prompts": args.image_prompts,
                     "work_dir": str(work)},
        "prompts": [{"world_seed": s, "prompt": p} for s, p in prompts],
        "targets": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
        "schedules": schedules,
        WORLD_COLUMN: world_column,
        "vae": vae,
        "denoising": denoising,
        "prompt_sensitivity": sensitivity,
        "window": windows,
        "continuation": continuation,
        "image": images,
        "checks": checks,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``longshot eval``: render the evaluation prompts with each schedule and report the metrics."""
    args = _parse_args(argv)
    report = run_evaluation(args)
    if args.json:
        print(json.dumps(_jsonable(report), indent=2))
    else:
        _print_table(report)
    failed = [c for c in report["checks"] if c["passed"] is False]
    return 1 if (args.strict and failed) else 0


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "inf" / "-inf" / "nan"."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
