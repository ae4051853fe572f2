"""The job spec: what to render, validated before any work starts.

A spec comes from CLI flags, a YAML file (CLI flags override it) or a REST body. Every limit violation
raises `SpecError` (a `ValueError`) whose message names the field, the value and the allowed range, so the
CLI can print one line and exit 2 and the service can answer 4xx with the same words.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEDULES = ("parallel", "autoregressive", "long-range", "hierarchy-2", "hierarchy-3")
CODECS = ("h264", "h265", "av1")
SAMPLERS = ("euler", "heun")
# CRF scales differ per encoder (x264/x265: 0..51, libaom/svt-av1: 0..63); the default is each encoder's own.
CRF_LIMITS = {"h264": (0, 51), "h265": (0, 51), "av1": (0, 63)}
CRF_DEFAULTS = {"h264": 23, "h265": 28, "av1": 35}

MAX_SECONDS = 3600
MAX_FPS = 60
MAX_SIDE = 2048
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_WINDOW = 1024
# Default guidance of infill tasks: those whose latent frames lie between observed frames (plan.fills_gap). Frames
# on both sides already carry the prompt's colours and objects, and classifier-free guidance amplifies the
# difference between the prompted and the unprompted prediction, which for the shipped model differs from one
# latent frame to the next: measured (ops/train/EXPERIMENTS.md, "Seams come from guidance"), guidance 4 on an
# infill task makes its latent frames jump 1.7x as far from one to the next as the world's own, guidance 1 as far
# as the world's. Extension tasks, open on one side, keep the full guidance: at 1 the background of a 60-s
# autoregressive render drifted past the target (ΔE 6.0 against 4.3).
INFILL_GUIDANCE = 1.0
# Default guidance floor of extension tasks (observed frames on one side only, the autoregressive schedule's
# windows after its first): steps starting below this noise level take the conditional prediction alone. Guidance
# decides the layout at high noise; below it, it only amplifies the prompted-minus-unprompted difference, which
# changes from one latent frame to the next. Measured (ops/train/EXPERIMENTS.md, "Guidance interval on extension
# tasks"): on the 60-s eval's autoregressive renders, seams 1.23 against 1.33 and drift 0.48 against 1.27,
# adherence and persistence unchanged; with 8 steps only the first two are guided. 0 guides every step.
EXTENSION_GUIDANCE_FLOOR = 0.92
# Default level of the refinement pass (orchestrator.plan, "Refinement"): every drafted latent frame is noised to
# this level and denoised again in windows that straddle the generation tasks' borders. Measured
# (ops/train/EXPERIMENTS.md, "Refinement"): on the 16-s check 0.6 took the seams of the shipped model from 1.8 to
# about 1.2 and kept adherence, lower levels left more of the seams. On the 60-s eval the seams fell as the level
# rose (parallel / hierarchy-2 / autoregressive: 1.14 / 1.17 / 1.43 at 0.6, 1.11 / 1.11 / 1.33 at 0.75, 1.06 / 1.02
# / 1.16 at 0.9) with the same adherence on its two prompts; but at 0.9 the README's prompt lost its object in a
# fifth of the frames (red found in 0.78 of them against 0.96, parallel; autoregressive 0.71 against 0.99):
# refinement samples at the infill guidance, and from 0.9 it re-draws nearly everything without the prompt's push.
# So 0.75; `--refine 0.9` trades some of the objects for the smoothest video.
REFINE_LEVEL = 0.75
# Default cap on a refinement task's steps: starting from a draft at a moderate level needs few. On the 16-s check
# at 20 steps, refining with 5 steps instead of 12 gave the same seams (0.99 both) and renders 8% faster.
REFINE_STEPS_MAX = 5
# Job settings a model may set its own default for (a checkpoint's `sampling`, model.generator): those whose
# best value depends on the model's weights, and whose job default is None so that "unset" can be told apart.
MODEL_DEFAULT_FIELDS = ("infill_guidance", "extension_guidance_floor", "refine", "refine_steps")


class SpecError(ValueError):
    """An invalid job spec. `problems` lists (field, value, message) for every violation found."""

    def __init__(self, problems: list[tuple[str, Any, str]]):
        self.problems = problems
        self.field, value, _ = problems[0]
        self.value = None if value is _MISSING else value
        super().__init__("invalid job spec: " + "; ".join(_describe(f, v, m) for f, v, m in problems))


def _describe(field: str, value: Any, message: str) -> str:
    if value is _MISSING:
        return f"{field}: {message}"
    shown = repr(value) if not isinstance(value, (dict, list)) else str(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{field}={shown}: {message}"


_MISSING = object()


def _crf_range(codec: str) -> tuple[int, int]:
    return CRF_LIMITS[codec]


class ImageInput(BaseModel):
    """A still image placed at `at`: seconds from the start, or "start" / "end"."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(min_length=1)
    at: float | Literal["start", "end"] = "start"

    @field_validator("at")
    @classmethod
    def _finite_time(cls, at):
        if isinstance(at, float) and (not math.isfinite(at) or at < 0):
            raise ValueError(f"must be a time in seconds >= 0, 'start' or 'end' (got {at})")
        return at

    @classmethod
    def parse(cls, text: str) -> "ImageInput":
        """Parse the CLI form PATH[@SECONDS|@start|@end]."""
        path, sep, where = text.rpartition("@")
        if not sep or not path:
            return cls(path=text)
        if where in ("start", "end"):
            return cls(path=path, at=where)
        try:
            return cls(path=path, at=float(where))
        except ValueError:
            # An '@' that belongs to the file name, not a time suffix.
            return cls(path=text)


class ExtendInput(BaseModel):
    """Continue an existing clip: forward (the clip opens the video) or backward (the clip ends it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    clip: str = Field(min_length=1)
    direction: Literal["forward", "backward"] = "forward"


class JobSpec(BaseModel):
    """One render job. Immutable; `model_dump(mode="json")` is what the job store records."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=2000)
    seconds: float = Field(default=10.0, ge=1, le=MAX_SECONDS)
    fps: int = Field(default=24, ge=1, le=MAX_FPS)
    width: int = Field(default=128, ge=16, le=MAX_SIDE, multiple_of=16)
    height: int = Field(default=80, ge=16, le=MAX_SIDE, multiple_of=16)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    steps: int = Field(default=20, ge=1, le=MAX_STEPS)
    guidance: float = Field(default=4.0, ge=0, le=MAX_GUIDANCE)
    # Guidance rescale (model.flow.guided): 0 is plain classifier-free guidance.
    guidance_rescale: float = Field(default=0.0, ge=0, le=1)
    # Guidance of infill tasks (latent frames between observed ones); None: INFILL_GUIDANCE, or `guidance` if
    # that is lower. A store made before this field existed records none, so its remaining infill tasks resume
    # at the default.
    infill_guidance: float | None = Field(default=None, ge=0, le=MAX_GUIDANCE)
    # Noise level below which extension tasks sample without guidance; None: EXTENSION_GUIDANCE_FLOOR. A store
    # made before this field existed records none, so its remaining extension tasks resume at the default.
    extension_guidance_floor: float | None = Field(default=None, ge=0, le=1)
    # Noise level of the refinement pass, 0 (off) to below 1; None: REFINE_LEVEL. A store made before this field
    # existed records none and resumes without refinement, as it was planned.
    refine: float | None = Field(default=None, ge=0, lt=1)
    # Sampling steps of a refinement task; None: the share of `steps` its noise level spans, at most
    # REFINE_STEPS_MAX (steps_for_refine).
    refine_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    sampler: Literal["euler", "heun"] = "euler"
    schedule: Literal["parallel", "autoregressive", "long-range", "hierarchy-2", "hierarchy-3"] = "parallel"
    window: Annotated[int, Field(ge=2, le=MAX_WINDOW)] | None = None
    model: str | None = None
    codec: Literal["h264", "h265", "av1"] = "h264"
    quality: int | None = None
    output: str = Field(min_length=1)
    store: str | None = None
    images: tuple[ImageInput, ...] = ()
    loop: bool = False
    extend: ExtendInput | None = None
    bridge: tuple[str, str] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must contain text")
        return prompt

    @field_validator("seconds", "guidance", "infill_guidance", "refine")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> "JobSpec":
        problems = []
        if self.quality is not None:
            low, high = _crf_range(self.codec)
            if not low <= self.quality <= high:
                problems.append(("quality", self.quality, f"CRF for {self.codec} must be in {low}..{high}"))
        if self.num_frames < 2:
            problems.append(("seconds", self.seconds, f"at {self.fps} fps gives fewer than 2 frames"))
        for i, image in enumerate(self.images):
            if isinstance(image.at, float) and image.at > self.seconds:
                problems.append((f"images[{i}].at", image.at, f"must be within the video (0..{self.seconds} s)"))
        if self.extend is not None and self.bridge is not None:
            problems.append(("extend", self.extend.clip, "cannot be combined with bridge"))
        if self.loop and (self.extend is not None or self.bridge is not None):
            problems.append(("loop", True, "a loop cannot also extend or bridge clips"))
        if problems:
            raise SpecError(problems)
        return self

    # -- derived values -------------------------------------------------------------------------------------

    @property
    def num_frames(self) -> int:
        """Frames in the output video: exactly seconds x fps, rounded to a whole frame."""
        return int(round(self.seconds * self.fps))

    @property
    def crf(self) -> int:
        return self.quality if self.quality is not None else CRF_DEFAULTS[self.codec]

    @property
    def store_path(self) -> str:
        """The job store: `store` if given, else next to the output and named after it (out.mp4 -> out.zarr)."""
        return self.store if self.store else default_store_path(self.output)

    @property
    def guidance_for_infill(self) -> float:
        """The guidance scale of infill tasks (``plan.fills_gap``)."""
        if self.infill_guidance is not None:
            return self.infill_guidance
        return min(self.guidance, INFILL_GUIDANCE)

    @property
    def guidance_floor_for_extension(self) -> float:
        """The noise level below which extension tasks sample without guidance."""
        return EXTENSION_GUIDANCE_FLOOR if self.extension_guidance_floor is None else self.extension_guidance_floor

    @property
    def refine_level(self) -> float:
        """The refinement pass's noise level; 0 when there is none."""
        return REFINE_LEVEL if self.refine is None else self.refine

    @property
    def steps_for_refine(self) -> int:
        """Sampling steps of a refinement task: ``refine_steps``, or the share of ``steps`` its noise level
        spans, at least one and at most REFINE_STEPS_MAX."""
        if self.refine_steps is not None:
            return self.refine_steps
        return max(1, min(REFINE_STEPS_MAX, math.ceil(self.steps * self.refine_level - 1e-9)))

    def with_model_defaults(self, defaults: dict) -> "JobSpec":
        """This job with the settings it leaves unset taken from its model's render defaults (a checkpoint's
        `sampling`). The job store keeps the spec as given: a resume takes the defaults from the same
        checkpoint again, which the store's model identity pins. Raises SpecError naming a default that is
        not a MODEL_DEFAULT_FIELDS setting or out of that setting's range."""
        unknown = [(f"sampling.{key}", value, f"a model may set only {', '.join(MODEL_DEFAULT_FIELDS)}")
                   for key, value in defaults.items() if key not in MODEL_DEFAULT_FIELDS]
        if unknown:
            raise SpecError(unknown)
        fill = {key: value for key, value in defaults.items() if getattr(self, key) is None}
        if not fill:
            return self
        try:
            return self.model_validate({**self.model_dump(), **fill})
        except ValidationError as err:
            problems = spec_error_from(err).problems
        raise SpecError([(f"sampling.{field}", value, f"not a valid default for this setting ({message})")
                         for field, value, message in problems])

    def content_fields(self) -> dict:
        """The fields that decide the rendered content; two specs agreeing here render the same video."""
        data = self.model_dump(mode="json")
        for field in ("output", "store"):
            data.pop(field)
        return data

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: dict) -> "JobSpec":
        """Validate a mapping; raise SpecError naming every bad field with its value and limit."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise spec_error_from(err) from None

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: dict | None = None) -> "JobSpec":
        """Read a YAML spec (optional) and apply `overrides` (CLI flags; None values are ignored)."""
        data: dict = {}
        if path is not None:
            data = read_yaml(path)
        for key, value in (overrides or {}).items():
            if value is not None:
                data[key] = value
        return cls.parse(data)


def read_yaml(path: str | os.PathLike) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise SpecError([("spec", str(path), f"cannot read the spec file: {err.strerror or err}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise SpecError([("spec", str(path), f"is not valid YAML{at}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError([("spec", str(path), "must be a YAML mapping of field: value")])
    return data


def spec_error_from(err: ValidationError) -> SpecError:
    problems: list[tuple[str, Any, str]] = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "spec"
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, SpecError):  # cross-field problems raised by JobSpec._cross_field
            problems.extend(cause.problems)
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            problems.append((field, _MISSING, "is required"))
        elif item["type"] == "extra_forbidden":
            problems.append((field, _MISSING, "is not a known field"))
        else:
            problems.append((field, item.get("input"), message[:1].lower() + message[1:]))
    return SpecError(problems)


def default_store_path(output: str) -> str:
    """out.mp4 -> out.zarr, in the same directory (or under the same URL prefix)."""
    head, sep, name = output.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head}{sep}{stem}.zarr"
