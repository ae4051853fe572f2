"""A procedural world of coloured shapes: the training data and the evaluation ground truth of the demo model.

A world is a background (a named colour, optionally a low-contrast stripe or checker pattern that a slow camera
pan scrolls) and one to three objects, each a shape of a named colour that bounces off the frame edges, drifts
in a straight line and wraps around (leaving the frame for a while before it comes back on the other side),
orbits a centre, or rests. Every quantity is expressed in fractions of the frame and seconds, so one world looks
the same at any resolution, aspect ratio and frame rate.

Motion is analytic (a triangle wave for bouncing, a modulo for wrap-around, sin/cos for orbits), so any frame of
an arbitrarily long video renders directly: training samples frames minutes apart without simulating the
minutes in between. Edges are anti-aliased with analytic coverage from signed distances, which costs one
small patch of arithmetic per object and frame instead of supersampling the whole frame.

Geometry conventions: positions are fractions of the frame width (x) and height (y); an object's size is its
half-extent as a fraction of the frame's shorter side, so a circle stays round at every aspect ratio; every
shape fills the square of side ``2 * half_extent`` around its centre (a circle touches its sides, a triangle
has its base on the bottom side and its apex at the middle of the top side, a diamond touches the middles of
all four sides). Pixel ``(row i, column j)`` has its centre at ``(j + 0.5, i + 0.5)``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

# Named colours, chosen so that any two are at least ~85 apart in RGB: a low-contrast pattern (±~25) or the
# blur of a learned decoder keeps every pixel nearest to the colour it was drawn with.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 50),
    "green": (40, 160, 60),
    "cyan": (50, 200, 220),
    "blue": (40, 70, 200),
    "purple": (130, 50, 170),
    "pink": (245, 140, 200),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
MOTIONS: tuple[str, ...] = ("bounce", "wrap", "orbit", "rest")
PATTERNS: tuple[str, ...] = ("none", "stripes", "checker")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
MAX_OBJECTS = 3

# Seeds at or above this value are reserved for evaluation (prompt sets, held-out VAE clips); training draws
# its worlds below it so that evaluation never scores a world the model was trained on.
EVAL_SEED_BASE = 1_000_000_000

# Pattern geometry: cell size in short-side units and the brightness step of the second pattern colour.
PATTERN_PERIOD = 0.125
PATTERN_CONTRAST = 26.0
# Wrap-around objects travel this far (frame fractions) fully outside the frame before they re-enter.
WRAP_GAP = 0.3

_SIZE_RANGE = (0.09, 0.17)
_BOUNCE_SPEED = (0.1, 0.3)
_WRAP_SPEED = (0.25, 0.45)
_ORBIT_RADIUS = (0.12, 0.24)
_ORBIT_SPEED = (0.5, 1.5)
_PAN_SPEED = (0.02, 0.06)
_MAX_SPEED = 5.0  # frame fractions (or radians) per second: anything faster is a mistake, not a world


def _check(condition: bool, field_name: str, value: Any, limit: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}={value!r} is invalid: must be {limit}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a world.

    ``x, y``: starting centre (bounce, wrap, rest) or orbit centre, in frame fractions.
    ``vx, vy``: velocity in frame fractions per second (bounce, wrap; wrap moves along one axis).
    ``orbit_radius``: in short-side fractions; ``angular_speed`` in radians per second; ``phase`` in radians.
    """

    shape: str
    colour: str
    size: float
    motion: str
    x: float = 0.5
    y: float = 0.5
    vx: float = 0.0
    vy: float = 0.0
    orbit_radius: float = 0.0
    angular_speed: float = 0.0
    phase: float = 0.0

    def __post_init__(self) -> None:
        _check(self.shape in SHAPES, "shape", self.shape, f"one of {list(SHAPES)}")
        _check(self.colour in PALETTE, "colour", self.colour, f"one of {list(COLOURS)}")
        _check(self.motion in MOTIONS, "motion", self.motion, f"one of {list(MOTIONS)}")
        _check(_finite(self.size) and 0.01 <= self.size <= 0.4, "size", self.size, "in [0.01, 0.4]")
        for name in ("x", "y"):
            value = getattr(self, name)
            _check(_finite(value) and -1.0 <= value <= 2.0, name, value, "a finite frame fraction in [-1, 2]")
        for name in ("vx", "vy", "angular_speed"):
            value = getattr(self, name)
            _check(_finite(value) and abs(value) <= _MAX_SPEED, name, value, f"finite with |value| <= {_MAX_SPEED}")
        _check(_finite(self.orbit_radius) and 0.0 <= self.orbit_radius <= 0.5, "orbit_radius",
               self.orbit_radius, "in [0, 0.5]")
        _check(_finite(self.phase), "phase", self.phase, "finite")
        if self.motion == "wrap":
            _check(self.vx == 0.0 or self.vy == 0.0, "vx/vy", (self.vx, self.vy),
                   "zero on one axis for wrap motion (wrap-around moves along one axis)")

    @property
    def direction(self) -> str | None:
        """The compass word of a wrap-around drift ("left", "right", "up", "down"), else None."""
        if self.motion != "wrap" or (self.vx == 0.0 and self.vy == 0.0):
            return None
        if self.vx != 0.0:
            return "right" if self.vx > 0 else "left"
        return "down" if self.vy > 0 else "up"


@dataclass(frozen=True)
class WorldSpec:
    """A world: background colour and pattern, camera pan, 1 to 3 objects drawn in order (later on top).

    ``pan``: camera velocity in frame fractions per second; the backdrop pattern scrolls the opposite way while
    the camera keeps the objects' stage in view (a pan over a plain background is invisible).
    """

    background: str
    objects: tuple[ObjectSpec, ...]
    pattern: str = "none"
    pan: tuple[float, float] = (0.0, 0.0)
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(self.background in PALETTE, "background", self.background, f"one of {list(COLOURS)}")
        _check(self.pattern in PATTERNS, "pattern", self.pattern, f"one of {list(PATTERNS)}")
        objects = tuple(o if isinstance(o, ObjectSpec) else ObjectSpec(**o) for o in self.objects)
        object.__setattr__(self, "objects", objects)
        _check(1 <= len(objects) <= MAX_OBJECTS, "objects", len(objects), f"between 1 and {MAX_OBJECTS} objects")
        colours = [o.colour for o in objects]
        _check(self.background not in colours, "objects.colour", colours,
               f"different from the background colour {self.background!r}")
        _check(len(set(colours)) == len(colours), "objects.colour", colours, "pairwise distinct")
        pan = tuple(float(v) for v in self.pan)
        _check(len(pan) == 2 and all(_finite(v) and abs(v) <= 1.0 for v in pan), "pan", self.pan,
               "two finite frame fractions per second with |value| <= 1")
        object.__setattr__(self, "pan", pan)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["objects"] = [dataclasses.asdict(o) for o in self.objects]
        d["pan"] = list(self.pan)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorldSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _check(not unknown, "world spec keys", sorted(unknown), f"among {sorted(known)}")
        d = dict(d)
        d["objects"] = tuple(ObjectSpec(**o) for o in d.get("objects", ()))
        if "pan" in d:
            d["pan"] = tuple(d["pan"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "WorldSpec":
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------------------------------- sampling


def sample_world(
    seed: int,
    *,
    num_objects: int | None = None,
    motion: str | None = None,
    background: str | None = None,
    pattern: str | None = None,
    pan: bool | None = None,
) -> WorldSpec:
    """Draw a world deterministically from ``seed``; keyword arguments pin one aspect of it.

    ``motion`` gives every object the same motion; ``pan`` forces a camera pan on (True) or off (False); a pan is
    only drawn when there is a pattern to show it.
    """
    _check(isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0, "seed", seed,
           "a non-negative integer")
    if num_objects is not None:
        _check(isinstance(num_objects, int) and 1 <= num_objects <= MAX_OBJECTS, "num_objects", num_objects,
               f"an integer between 1 and {MAX_OBJECTS}")
    if motion is not None:
        _check(motion in MOTIONS, "motion", motion, f"one of {list(MOTIONS)}")
    if background is not None:
        _check(background in PALETTE, "background", background, f"one of {list(COLOURS)}")
    if pattern is not None:
        _check(pattern in PATTERNS, "pattern", pattern, f"one of {list(PATTERNS)}")
    rng = np.random.default_rng(int(seed))

    n = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    bg = COLOURS[rng.integers(len(COLOURS))] if background is None else background
    pat = PATTERNS[rng.choice(len(PATTERNS), p=[0.5, 0.25, 0.25])] if pattern is None else pattern
    want_pan = (pat != "none" and rng.random() < 0.5) if pan is None else pan
    pan_v = (0.0, 0.0)
    if want_pan:
        dx, dy = DIRECTIONS[list(DIRECTIONS)[rng.integers(4)]]
        speed = rng.uniform(*_PAN_SPEED)
        pan_v = (dx * speed, dy * speed)

    free = [c for c in COLOURS if c != bg]
    colours = [free[i] for i in rng.permutation(len(free))[:n]]
    drawn = [{"shape": SHAPES[rng.integers(len(SHAPES))], "colour": colour,
              "size": round(float(rng.uniform(*_SIZE_RANGE)), 4),
              "motion": MOTIONS[rng.choice(len(MOTIONS), p=[0.35, 0.25, 0.25, 0.15])] if motion is None else motion}
             for colour in colours]
    # Orbiting objects ride one carousel (shared centre, radius and angular speed, evenly spaced phases) and
    # resting objects keep apart, so that neither hides another for long: a persistent overlap would teach the
    # model, and tell the evaluation, that an object vanished.
    orbiters = [o for o in drawn if o["motion"] == "orbit"]
    if orbiters:
        largest = max(o["size"] for o in orbiters)
        radius = rng.uniform(*_ORBIT_RADIUS)
        if len(orbiters) > 1:
            pairs = max(a["size"] + b["size"] for a in orbiters for b in orbiters if a is not b)
            # Neighbours on the carousel are a chord 2 R sin(pi / k) apart; sqrt(2) covers square corners.
            radius = max(radius, (math.sqrt(2) * pairs + 0.02) / (2 * math.sin(math.pi / len(orbiters))))
        radius = min(radius, 0.47 - largest)
        centre = (0.5, 0.5) if len(orbiters) > 1 else (rng.uniform(0.45, 0.55), rng.uniform(0.45, 0.55))
        spin = (1.0 if rng.random() < 0.5 else -1.0) * rng.uniform(*_ORBIT_SPEED)
        start = rng.uniform(0, 2 * math.pi)
        for k, o in enumerate(orbiters):
            o.update(x=centre[0], y=centre[1], orbit_radius=radius, angular_speed=spin,
                     phase=start + 2 * math.pi * k / len(orbiters))
    resting: list[dict] = []
    for o in drawn:
        if o["motion"] == "bounce":
            speed, angle = rng.uniform(*_BOUNCE_SPEED), rng.uniform(0, 2 * math.pi)
            o.update(x=rng.uniform(0.25, 0.75), y=rng.uniform(0.25, 0.75),
                     vx=speed * math.cos(angle), vy=speed * math.sin(angle))
        elif o["motion"] == "wrap":
            speed = rng.uniform(*_WRAP_SPEED)
            dx, dy = DIRECTIONS[list(DIRECTIONS)[rng.integers(4)]]
            o.update(x=rng.uniform(0.25, 0.75), y=rng.uniform(0.25, 0.75), vx=dx * speed, vy=dy * speed)
        elif o["motion"] == "rest":
            for _ in range(64):  # distances in short-side units are smallest in a square frame: check there
                x, y = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
                if all(max(abs(x - r["x"]), abs(y - r["y"])) > o["size"] + r["size"] + 0.02 for r in resting):
                    break
            o.update(x=x, y=y)
            resting.append(o)
    objects = tuple(ObjectSpec(**{k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in o.items()})
                    for o in drawn)
    return WorldSpec(background=bg, objects=objects, pattern=pat,
                     pan=(round(pan_v[0], 4), round(pan_v[1], 4)), seed=int(seed))


# ---------------------------------------------------------------------------------------------------- captions

_MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "bounce": ("bouncing", "bouncing around"),
    "wrap": ("drifting {direction}", "gliding {direction}"),
    "orbit": ("orbiting", "circling"),
    "rest": ("resting", "standing still"),
}
_PATTERN_WORDS = {"stripes": "striped", "checker": "checkered"}
_PATTERN_SYNONYMS = {"striped": "stripes", "stripy": "stripes", "checkered": "checker", "checked": "checker",
                     "chequered": "checker"}
_MOTION_SYNONYMS = {
    "bouncing": "bounce", "bounces": "bounce", "bounce": "bounce",
    "drifting": "wrap", "gliding": "wrap", "sliding": "wrap", "wrapping": "wrap",
    "orbiting": "orbit", "circling": "orbit", "orbits": "orbit",
    "resting": "rest", "still": "rest", "standing": "rest", "sitting": "rest",
}
_COLOUR_SYNONYMS = {"gray": "grey"}


def _motion_phrase(obj: ObjectSpec, variant: int) -> str:
    phrases = _MOTION_PHRASES[obj.motion]
    return phrases[variant % len(phrases)].format(direction=obj.direction or "along")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption(spec: WorldSpec) -> str:
    """A natural caption made from the world's parameters, e.g.
    "a red circle and a blue square bouncing on a grey background".

    The wording (template and motion synonyms) is chosen deterministically from the world's seed; every variant
    names each object's colour, shape and motion, the background colour and pattern, and the camera pan, in words
    that :func:`parse_caption` reads back.
    """
    variant = int(np.random.default_rng([spec.seed or 0, 7]).integers(1 << 16))
    template, words = variant % 3, variant // 3
    pattern = _PATTERN_WORDS.get(spec.pattern)
    background = f"{spec.background} {pattern} background" if pattern else f"{spec.background} background"
    motions = [_motion_phrase(o, words) for o in spec.objects]
    nouns = [f"{_article(o.colour)} {o.colour} {o.shape}" for o in spec.objects]
    if len(set(motions)) == 1:
        subject = f"{_join(nouns)} {motions[0]}"
    else:
        subject = _join([f"{n} {m}" for n, m in zip(nouns, motions)])
    if template == 0:
        text = f"{subject} on a {background}"
    elif template == 1:
        text = f"a {background} with {subject}"
    else:
        text = f"{subject} in front of a {background}"
    if spec.pan != (0.0, 0.0):
        vx, vy = spec.pan
        direction = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
        text += f", the camera panning slowly {direction}"
    return text


def parse_caption(text: str) -> dict:
    """Read the world vocabulary back from a caption or a user prompt.

    Returns ``{"background": colour | None, "pattern": "none" | "stripes" | "checker", "pan": direction | None,
    "objects": [{"colour", "shape", "motion" (None if not said), "direction" (None unless said)}]}``; an object is
    a palette colour directly followed by a shape word. Words outside the vocabulary are ignored, so a prompt
    that names no object yields an empty object list.
    """
    words = re.findall(r"[a-z]+", text.lower())
    words = [_COLOUR_SYNONYMS.get(w, w) for w in words]
    shape_of = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}
    result: dict[str, Any] = {"background": None, "pattern": "none", "pan": None, "objects": []}
    mentions: list[tuple[int, dict]] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in PALETTE:
            j = i + 1
            pattern = None
            if j < len(words) and words[j] in _PATTERN_SYNONYMS:
                pattern = _PATTERN_SYNONYMS[words[j]]
                j += 1
            if j < len(words) and words[j] in ("background", "backdrop"):
                result["background"] = w
                result["pattern"] = pattern or "none"
                mentions.append((i, {"boundary": True}))
                i = j + 1
                continue
            if i + 1 < len(words) and words[i + 1] in shape_of:
                obj = {"colour": w, "shape": shape_of[words[i + 1]], "motion": None, "direction": None}
                result["objects"].append(obj)
                mentions.append((i, obj))
                i += 2
                continue
        if w == "camera":
            mentions.append((i, {"boundary": True}))
            for later in words[i + 1:i + 5]:
                if later in DIRECTIONS:
                    result["pan"] = later
                    break
        i += 1
    # A motion word belongs to the nearest object mentioned before it; objects listed together before one motion
    # ("a red circle and a blue square bouncing") share it.
    pending: list[dict] = []
    for k, (start, obj) in enumerate(mentions):
        if obj.get("boundary"):
            pending = []
            continue
        pending.append(obj)
        stop = mentions[k + 1][0] if k + 1 < len(mentions) else len(words)
        span = words[start + 2:stop]
        motion = next((_MOTION_SYNONYMS[w] for w in span if w in _MOTION_SYNONYMS), None)
        if motion is not None:
            direction = next((w for w in span if w in DIRECTIONS), None) if motion == "wrap" else None
            for o in pending:
                o["motion"], o["direction"] = motion, direction
            pending = []
    return result


# ---------------------------------------------------------------------------------------------------- geometry


def _frame_geometry(width: int, height: int, fps: float) -> None:
    _check(isinstance(width, (int, np.integer)) and 8 <= width <= 8192, "width", width, "an integer in [8, 8192]")
    _check(isinstance(height, (int, np.integer)) and 8 <= height <= 8192, "height", height,
           "an integer in [8, 8192]")
    _check(_finite(fps) and 0 < fps <= 1000, "fps", fps, "a frame rate in (0, 1000]")


def _frame_times(frame_indices: Iterable[int] | np.ndarray, fps: float) -> np.ndarray:
    idx = np.asarray(frame_indices)
    if idx.ndim == 0:
        idx = idx[None]
    _check(idx.ndim == 1, "frame_indices", f"shape {idx.shape}", "a 1-D sequence of frame indices")
    if idx.size:
        _check(np.issubdtype(idx.dtype, np.integer), "frame_indices", idx.dtype, "integers")
        _check(int(idx.min()) >= 0, "frame_indices", int(idx.min()), "non-negative")
    return idx.astype(np.float64) / float(fps)


def _triangle_wave(u: np.ndarray, length: float) -> np.ndarray:
    """Position in [0, length] of a point moving at unit speed along u and reflecting at both ends."""
    if length <= 0:
        return np.zeros_like(u)
    p = np.mod(u, 2 * length)
    return np.where(p <= length, p, 2 * length - p)


def object_centres(obj: ObjectSpec, times: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres (x, y) of ``obj`` at ``times`` (seconds), each of shape (T,)."""
    short = min(width, height)
    half = obj.size * short  # pixels
    mx, my = half / width, half / height  # half-extent in frame fractions per axis
    t = np.asarray(times, dtype=np.float64)
    if obj.motion == "bounce":
        span_x, span_y = max(1.0 - 2 * mx, 0.0), max(1.0 - 2 * my, 0.0)
        ux = np.clip(obj.x - mx, 0.0, span_x) + obj.vx * t
        uy = np.clip(obj.y - my, 0.0, span_y) + obj.vy * t
        fx, fy = mx + _triangle_wave(ux, span_x), my + _triangle_wave(uy, span_y)
    elif obj.motion == "wrap":
        # The centre runs over [-m - gap/2, 1 + m + gap/2): the object leaves fully, stays out for WRAP_GAP of a
        # frame, and re-enters from the opposite side.
        lo_x, lo_y = -mx - WRAP_GAP / 2, -my - WRAP_GAP / 2
        span_x, span_y = 1 + 2 * mx + WRAP_GAP, 1 + 2 * my + WRAP_GAP
        fx = np.full_like(t, obj.x) if obj.vx == 0 else lo_x + np.mod(obj.x - lo_x + obj.vx * t, span_x)
        fy = np.full_like(t, obj.y) if obj.vy == 0 else lo_y + np.mod(obj.y - lo_y + obj.vy * t, span_y)
    elif obj.motion == "orbit":
        angle = obj.phase + obj.angular_speed * t
        r = obj.orbit_radius * short
        return obj.x * width + r * np.cos(angle), obj.y * height + r * np.sin(angle)
    else:
        fx, fy = np.full_like(t, obj.x), np.full_like(t, obj.y)
    return fx * width, fy * height


def wrap_period(obj: ObjectSpec, width: int, height: int) -> float | None:
    """Seconds between two entries of a wrap-around object into the frame (None for other motions)."""
    if obj.motion != "wrap":
        return None
    half = obj.size * min(width, height)
    if obj.vx != 0:
        return (1 + 2 * half / width + WRAP_GAP) / abs(obj.vx)
    if obj.vy != 0:
        return (1 + 2 * half / height + WRAP_GAP) / abs(obj.vy)
    return None


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) to a shape of half-extent ``half`` centred at the origin;
    exact near the edges, which is all the anti-aliasing needs."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - half
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - half
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - half) * np.float32(1 / math.sqrt(2))
    # triangle: apex at (0, -half), base corners at (±half, +half)
    slant = (2 * np.abs(dx) - dy - half) * np.float32(1 / math.sqrt(5))
    return np.maximum(dy - half, slant)


def object_mask(spec: WorldSpec, frame_indices: Iterable[int], *, fps: float, width: int,
                height: int) -> np.ndarray:
    """Pixels covered by any object (at least half of the pixel) in the given frames, bool (T, height, width).

    The same geometry as :func:`render_frames`, without the colours: training uses it to find the few latent
    pixels that hold objects among the many that hold the backdrop.
    """
    _frame_geometry(width, height, fps)
    times = _frame_times(frame_indices, fps)
    mask = np.zeros((len(times), height, width), dtype=bool)
    for _, sdf in _object_distances(spec, times, width, height):
        mask |= sdf <= 0.0
    return mask


def _object_distances(spec: WorldSpec, times: np.ndarray, width: int, height: int):
    """Each object, in drawing order, with its signed distance (T, height, width) at every pixel centre."""
    if not len(times):
        return
    xs = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
    ys = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
    for obj in spec.objects:
        cx, cy = object_centres(obj, times, width, height)
        half = np.float32(obj.size * min(width, height))
        yield obj, _signed_distance(obj.shape, xs - cx.astype(np.float32)[:, None, None],
                                    ys - cy.astype(np.float32)[:, None, None], half)


def shape_coverage(spec: WorldSpec, frame_indices: Iterable[int], *, fps: float, width: int,
                   height: int) -> np.ndarray:
    """How much of each pixel each shape covers, float32 (T, len(SHAPES), height, width), channels in ``SHAPES``
    order.

    The renderer's own coverage and compositing: each object's anti-aliased coverage is laid over the ones drawn
    before it, so a frame is exactly its background blended with each shape channel times its object's colour,
    and the channels of a pixel sum to at most 1. A map of what shape is where, for models that should be told
    the shape outright rather than find it in a few edge pixels.
    """
    _frame_geometry(width, height, fps)
    times = _frame_times(frame_indices, fps)
    cover = np.zeros((len(times), len(SHAPES), height, width), dtype=np.float32)
    for obj, sdf in _object_distances(spec, times, width, height):  # a later object covers the earlier ones
        alpha = np.clip(np.float32(0.5) - sdf, 0.0, 1.0)[:, None]  # (T, 1, H, W), as _draw_object blends
        cover *= 1.0 - alpha
        cover[:, SHAPES.index(obj.shape)] += alpha[:, 0]
    return cover


def _background(spec: WorldSpec, times: np.ndarray, width: int, height: int, pad: int) -> np.ndarray:
    """Float32 canvas (T, H + 2 pad, W + 2 pad, 3) holding the backdrop in its central H x W region."""
    t_count = len(times)
    base = np.asarray(PALETTE[spec.background], dtype=np.float32)
    canvas = np.empty((t_count, height + 2 * pad, width + 2 * pad, 3), dtype=np.float32)
    canvas[:] = base
    if spec.pattern == "none":
        return canvas
    # The second pattern colour steps towards mid-grey so that it stays nearest to the background colour.
    luminance = float(base @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    alt = np.clip(base + (PATTERN_CONTRAST if luminance < 128 else -PATTERN_CONTRAST), 0, 255)
    short = min(width, height)
    # Pattern coordinates in short-side units; the camera moving by +pan scrolls the pattern by -pan.
    off_x = (times * spec.pan[0] * width / short).astype(np.float32)[:, None, None]
    off_y = (times * spec.pan[1] * height / short).astype(np.float32)[:, None, None]
    cols = ((np.arange(width, dtype=np.float32) + 0.5) / short)[None, None, :] + off_x  # (T, 1, W)
    rows = ((np.arange(height, dtype=np.float32) + 0.5) / short)[None, :, None] + off_y  # (T, H, 1)
    if spec.pattern == "stripes":
        cell = np.floor((cols + rows) / PATTERN_PERIOD).astype(np.int64)  # diagonal stripes show any pan
    else:
        cell = np.floor(cols / PATTERN_PERIOD).astype(np.int64) + np.floor(rows / PATTERN_PERIOD).astype(np.int64)
    odd = (cell & 1).astype(bool)  # (T, H, W)
    view = canvas[:, pad:pad + height, pad:pad + width]
    view[odd] = alt
    return canvas


def _draw_object(canvas: np.ndarray, obj: ObjectSpec, cx: np.ndarray, cy: np.ndarray, width: int, height: int,
                 pad: int) -> None:
    """Blend ``obj`` into the padded canvas at pixel centres (cx, cy), one patch per frame, all frames at once."""
    half = obj.size * min(width, height)
    size = int(math.ceil(2 * half)) + 3
    t_count = len(cx)
    # Patch origins in view pixels, clamped into the padding so that far-away objects land (invisibly) there.
    x0 = np.clip(np.floor(cx - half).astype(np.int64) - 1, -pad, width + pad - size)
    y0 = np.clip(np.floor(cy - half).astype(np.int64) - 1, -pad, height + pad - size)
    steps = np.arange(size)
    dx = (x0[:, None] + steps[None, :] + 0.5 - cx[:, None]).astype(np.float32)  # (T, P)
    dy = (y0[:, None] + steps[None, :] + 0.5 - cy[:, None]).astype(np.float32)  # (T, P)
    sdf = _signed_distance(obj.shape, dx[:, None, :], dy[:, :, None], np.float32(half))  # (T, P, P)
    alpha = np.clip(np.float32(0.5) - sdf, 0.0, 1.0)[..., None]  # coverage of each pixel, (T, P, P, 1)
    frames = np.arange(t_count)[:, None, None]
    rows = (y0 + pad)[:, None, None] + steps[None, :, None]
    cols = (x0 + pad)[:, None, None] + steps[None, None, :]
    region = canvas[frames, rows, cols]  # (T, P, P, 3)
    colour = np.asarray(PALETTE[obj.colour], dtype=np.float32)
    canvas[frames, rows, cols] = region + alpha * (colour - region)


_CHUNK_PIXELS = 1 << 22  # frames are rendered in chunks of about this many pixels to bound memory


def render_frames(spec: WorldSpec, frame_indices: Iterable[int], *, fps: float, width: int,
                  height: int) -> np.ndarray:
    """Render the given frames of ``spec`` directly (no simulation) as uint8 (T, height, width, 3)."""
    _frame_geometry(width, height, fps)
    times = _frame_times(frame_indices, fps)
    out = np.empty((len(times), height, width, 3), dtype=np.uint8)
    if not len(times):
        return out
    short = min(width, height)
    pad = max(int(math.ceil(2 * o.size * short)) + 3 for o in spec.objects)
    chunk = max(1, _CHUNK_PIXELS // (width * height))
    for start in range(0, len(times), chunk):
        t = times[start:start + chunk]
        canvas = _background(spec, t, width, height, pad)
        for obj in spec.objects:
            cx, cy = object_centres(obj, t, width, height)
            _draw_object(canvas, obj, cx, cy, width, height, pad)
        view = canvas[:, pad:pad + height, pad:pad + width]
        np.add(view, 0.5, out=view)
        out[start:start + len(t)] = view  # float -> uint8 truncation of x + 0.5 rounds to nearest
    return out


def ground_truth(spec: WorldSpec, frame_indices: Iterable[int], *, fps: float, width: int,
                 height: int) -> list[dict]:
    """Per-frame records of where every object is.

    Each record: ``{"frame": i, "time": seconds, "objects": [{"index", "colour", "shape", "motion",
    "centre": (x, y) pixels, "bbox": (x0, y0, x1, y1) pixels (unclipped), "visibility": "full" | "partial" |
    "none", "occluded": bool}]}``; ``occluded`` means the bounding box of an object drawn later (on top)
    overlaps this one's while both are in the frame.
    """
    _frame_geometry(width, height, fps)
    idx = np.asarray(list(frame_indices) if not isinstance(frame_indices, np.ndarray) else frame_indices)
    times = _frame_times(idx, fps)
    half = [o.size * min(width, height) for o in spec.objects]
    centres = [object_centres(o, times, width, height) for o in spec.objects]
    records = []
    for k, frame in enumerate(idx.tolist()):
        objs = []
        boxes = []
        for n, obj in enumerate(spec.objects):
            x, y = float(centres[n][0][k]), float(centres[n][1][k])
            box = (x - half[n], y - half[n], x + half[n], y + half[n])
            if box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height:
                visibility = "full"
            elif box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
                visibility = "none"
            else:
                visibility = "partial"
            boxes.append(box)
            objs.append({"index": n, "colour": obj.colour, "shape": obj.shape, "motion": obj.motion,
                         "centre": (x, y), "bbox": box, "visibility": visibility, "occluded": False})
        for n, rec in enumerate(objs):
            if rec["visibility"] == "none":
                continue
            for m in range(n + 1, len(objs)):
                other = boxes[m]
                if objs[m]["visibility"] != "none" and (
                        boxes[n][0] < other[2] and other[0] < boxes[n][2]
                        and boxes[n][1] < other[3] and other[1] < boxes[n][3]):
                    rec["occluded"] = True
                    break
        records.append({"frame": int(frame), "time": float(times[k]), "objects": objs})
    return records


def render_clip(seed: int, num_frames: int, fps: float, width: int, height: int,
                start_frame: int = 0) -> tuple[np.ndarray, WorldSpec, str]:
    """Frames ``start_frame .. start_frame + num_frames - 1`` of the world drawn from ``seed``.

    Returns ``(frames uint8 (T, H, W, 3), spec, caption)``.
    """
    _check(isinstance(num_frames, int) and num_frames >= 1, "num_frames", num_frames, "a positive integer")
    _check(isinstance(start_frame, int) and start_frame >= 0, "start_frame", start_frame, "a non-negative integer")
    spec = sample_world(seed)
    frames = render_frames(spec, range(start_frame, start_frame + num_frames), fps=fps, width=width, height=height)
    return frames, spec, caption(spec)
