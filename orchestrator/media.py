"""Video in and out through the ffmpeg binary, driven by ffmpeg-python.

Which ffmpeg runs (first match wins):

1. the ``ffmpeg`` argument of any function here (a path, or a command name found on ``PATH``);
2. the ``LONGSHOT_FFMPEG`` environment variable (same forms);
3. ``imageio_ffmpeg.get_ffmpeg_exe()``: imageio-ffmpeg's own ``IMAGEIO_FFMPEG_EXE`` variable, then the
   binary bundled with the wheel, then an ``ffmpeg`` on ``PATH``.

The binary must be ffmpeg 5.1 or newer (``-fps_mode``). No ffprobe is needed: imageio-ffmpeg ships none, so
probing reads ffmpeg's own stream report and the packet list of the ``framecrc`` muxer.

A render is encoded in segments, one per decode task. The segments are stored losslessly and
``concat_segments`` encodes them once into the output as one stream (``encode=``), or joins segments already
encoded at the output's settings by stream copy. Either way the demuxer reads them as one stream, which only
works when every segment is encoded with the same settings, so ``encode_segment`` derives them from
(codec, quality, preset, fps, size) alone, never from the segment length; ``concat_segments`` checks that the
segments agree (same codec parameters and extradata checksum) before joining them and checks the frame count
of what it wrote.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import ffmpeg as ffmpeg_python
import numpy as np

__all__ = [
    "CODECS",
    "EncoderUnavailableError",
    "FFmpegError",
    "FrameCountError",
    "MediaIntegrityError",
    "available_codecs",
    "available_encoders",
    "concat_segments",
    "encode_segment",
    "ffmpeg_exe",
    "job_metadata",
    "keyframe_indices",
    "make_preview",
    "probe",
    "read_frames",
]

FFMPEG_ENV = "LONGSHOT_FFMPEG"
MAX_FPS = 1000
MAX_SIDE = 16384
# Keyframes also fall inside segments longer than this: it bounds seek cost in long segments and, being
# independent of the segment length, keeps the encoder settings identical for every segment.
GOP_SECONDS = 10
SEGMENT_SUFFIXES = (".mp4", ".mov")
OUTPUT_SUFFIXES = (".mp4", ".mov", ".m4v")
PREVIEW_SUFFIXES = (".gif", ".png")
# Keys the mp4 muxer stores in the standard iTunes-style `ilst` atoms that every player reads. Any other key
# needs `-movflags use_metadata_tags`, which switches the whole file to QuickTime `mdta` keys.
STANDARD_METADATA_KEYS = frozenset(
    {
        "title", "artist", "album_artist", "composer", "album", "date", "comment", "genre", "copyright",
        "grouping", "lyrics", "description", "synopsis", "show", "episode_id", "network", "keywords",
    }
)
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")
_X26X_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo",
)


class FFmpegError(RuntimeError):
    """ffmpeg exited with an error; carries the command line and the tail of its log."""

    def __init__(self, cmd: list[str], returncode: int, stderr: str):
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr
        tail = "\n".join(stderr.strip().splitlines()[-20:])
        super().__init__(f"ffmpeg exited with status {returncode}: {' '.join(cmd)}\n{tail}")


class EncoderUnavailableError(ValueError):
    """The ffmpeg binary has none of the encoders that implement the requested codec."""

    def __init__(self, codec: str, candidates: tuple[str, ...], available: dict[str, str], exe: str):
        self.codec = codec
        self.candidates = candidates
        self.available = available
        self.exe = exe
        offered = ", ".join(f"{c} ({e})" for c, e in available.items()) or "none"
        super().__init__(
            f"codec={codec!r}: ffmpeg at {exe} has none of the encoders {', '.join(candidates)}; "
            f"codecs it can encode: {offered}. Set {FFMPEG_ENV} to an ffmpeg built with one of them."
        )


class MediaIntegrityError(RuntimeError):
    """A video ffmpeg wrote is not what was asked for; it was not published under its final name."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class FrameCountError(MediaIntegrityError):
    """A written video does not hold the number of frames it must hold."""

    def __init__(self, path: str | os.PathLike, expected: int, actual: int, detail: str = ""):
        self.expected = expected
        self.actual = actual
        super().__init__(path, f"expected {expected} frames, found {actual}{detail}")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """How one ffmpeg encoder is driven: CRF range and default, speed presets, fixed extra options."""

    name: str
    crf_default: int
    crf_range: tuple[int, int]
    preset_default: str | int
    presets: tuple[str | int, ...]
    preset_option: str = "preset"
    extra: tuple[tuple[str, str], ...] = ()

    def options(self, *, fps: Fraction, quality: float, preset: str | int) -> dict[str, Any]:
        gop = max(1, math.ceil(fps * GOP_SECONDS))
        options: dict[str, Any] = {
            "c:v": self.name,
            "pix_fmt": "yuv420p",
            "crf": _format_number(quality),
            self.preset_option: preset,
            "g": gop,
            # No B-frames: with reordering, the decode delay an encoder signals depends on how many frames a
            # segment has (a 1-frame segment gets none), so segments of different lengths start at different
            # DTS offsets and stream-copy concatenation corrupts their timestamps.
            "bf": 0,
            "flags": "+cgop",
            "force_key_frames": "expr:eq(n,0)",
            "colorspace": "bt709",
            "color_primaries": "bt709",
            "color_trc": "bt709",
            "color_range": "tv",
        }
        options.update(dict(self.extra))
        return options


CODECS: dict[str, tuple[Encoder, ...]] = {
    "h264": (
        Encoder("libx264", 20, (0, 51), "medium", _X26X_PRESETS),
    ),
    "h265": (
        Encoder(
            "libx265", 22, (0, 51), "medium", _X26X_PRESETS,
            # hvc1 (parameter sets only in the sample entry) is the tag Apple players require.
            extra=(("x265-params", "log-level=error:open-gop=0"), ("tag:v", "hvc1")),
        ),
    ),
    "av1": (
        Encoder("libsvtav1", 30, (1, 63), 8, tuple(range(0, 14))),
        Encoder(
            "libaom-av1", 30, (0, 63), 6, tuple(range(0, 9)), preset_option="cpu-used",
            extra=(("b:v", "0"), ("row-mt", "1")),
        ),
    ),
}
CODEC_ALIASES = {"avc": "h264", "hevc": "h265"}


# --------------------------------------------------------------------------------------------- the binary


def ffmpeg_exe(ffmpeg: str | os.PathLike | None = None) -> str:
    """Absolute path of the ffmpeg binary to run (lookup order in the module docstring)."""
    if ffmpeg is not None:
        return _resolve_exe(str(ffmpeg), "ffmpeg")
    configured = os.environ.get(FFMPEG_ENV)
    if configured:
        return _resolve_exe(configured, FFMPEG_ENV)
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _resolve_exe(value: str, name: str) -> str:
    found = shutil.which(value)
    if found is None:
        raise ValueError(f"{name}={value!r}: no executable file at that path or of that name on PATH")
    return os.path.abspath(found)


@functools.lru_cache(maxsize=8)
def _encoders_of(exe: str) -> frozenset[str]:
    out = _run_raw([exe, "-hide_banner", "-nostdin", "-encoders"]).stdout.decode("utf-8", "replace")
    names = set()
    for line in out.splitlines():
        # " V....D libx264    libx264 H.264 ..." after the legend, which ends with a " ------" line
        match = re.match(r"^ ([VAS][A-Z.]{5}) (\S+)", line)
        if match and match.group(2) != "=":
            names.add(match.group(2))
    return frozenset(names)


def available_encoders(ffmpeg: str | os.PathLike | None = None) -> frozenset[str]:
    """Names of all encoders the ffmpeg binary was built with."""
    return _encoders_of(ffmpeg_exe(ffmpeg))


def available_codecs(ffmpeg: str | os.PathLike | None = None) -> dict[str, str]:
    """Codec name -> the encoder `encode_segment` uses for it, for the codecs this binary can encode."""
    encoders = available_encoders(ffmpeg)
    chosen = {}
    for codec, candidates in CODECS.items():
        for encoder in candidates:
            if encoder.name in encoders:
                chosen[codec] = encoder.name
                break
    return chosen


def _pick_encoder(codec: str, exe: str) -> Encoder:
    if not isinstance(codec, str) or CODEC_ALIASES.get(codec.lower(), codec.lower()) not in CODECS:
        raise ValueError(f"codec={codec!r}: unknown codec; choose one of {', '.join(CODECS)}")
    key = CODEC_ALIASES.get(codec.lower(), codec.lower())
    encoders = _encoders_of(exe)
    for encoder in CODECS[key]:
        if encoder.name in encoders:
            return encoder
    raise EncoderUnavailableError(key, tuple(e.name for e in CODECS[key]), available_codecs(exe), exe)


# --------------------------------------------------------------------------------------------- running


def _run_raw(cmd: list[str], input: Any = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, input=input, capture_output=True, env=env)
    if result.returncode != 0:
        raise FFmpegError(cmd, result.returncode, result.stderr.decode("utf-8", "replace"))
    return result


def _run(
    stream: Any, exe: str, input: Any = None, *, output_url: str | None = None, output_extra: list[str] = ()
) -> subprocess.CompletedProcess:
    cmd = ffmpeg_python.compile(
        stream.global_args("-hide_banner", "-nostdin", "-nostats", "-loglevel", "error"), cmd=exe
    )
    if output_extra:
        # ffmpeg-python takes each output option once; repeated ones (-metadata k=v ...) go in by hand,
        # in front of the output file name they apply to.
        at = cmd.index(output_url)
        cmd[at:at] = list(output_extra)
    # SVT-AV1 logs through its own channel, not ffmpeg's; 2 = warnings and errors only.
    env = dict(os.environ, SVT_LOG="2")
    return _run_raw(cmd, input=input, env=env)


def _media_url(path: Path) -> str:
    # The file: protocol keeps ffmpeg from reading a ':' in a file name as a protocol prefix.
    return "file:" + str(path.resolve())


def _existing_file(path: str | os.PathLike, name: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{name}={path!r}: expected a file path")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{name}={str(path)!r}: no such file")
    return p


def _output_path(path: str | os.PathLike, name: str, suffixes: tuple[str, ...]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{name}={path!r}: expected a file path")
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"{name}={str(path)!r}: file suffix must be one of {', '.join(suffixes)}")
    if not p.parent.is_dir():
        raise ValueError(f"{name}={str(path)!r}: directory {str(p.parent)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"{name}={str(path)!r}: is a directory")
    return p


def _partial_path(path: Path) -> Path:
    # Hidden, unique and without the final suffix: a killed writer leaves nothing that passes for the output.
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


def _publish(partial: Path, path: Path) -> None:
    """Make `partial` durable, then give it its final name in one atomic step."""
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # directories cannot be opened on every platform; the rename itself is still atomic
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------------------------- probing


@dataclasses.dataclass(frozen=True)
class _Packets:
    time_base: Fraction
    pts: list[int]
    durations: list[int]
    keys: list[bool]
    extradata: str | None  # "<size>, <crc>" as framecrc prints it


def _parse_packets(text: str) -> _Packets:
    time_base = Fraction(1, 1)
    pts, durations, keys = [], [], []
    extradata = None
    for line in text.splitlines():
        if line.startswith("#tb 0:"):
            time_base = Fraction(line.split(":", 1)[1].strip())
        elif line.startswith("#extradata 0:"):
            extradata = " ".join(line.split(":", 1)[1].split())
        elif line and not line.startswith("#"):
            # stream, dts, pts, duration, size, crc[, F=flags][, S=side data]
            fields = [f.strip() for f in line.split(",")]
            pts.append(int(fields[2]))
            durations.append(int(fields[3]))
            flags = next((f[2:] for f in fields[6:] if f.startswith("F=")), None)
            keys.append(flags is None or bool(int(flags, 16) & 1))
    return _Packets(time_base, pts, durations, keys, extradata)


_VIDEO_STREAM = re.compile(r"^\s*Stream #0:\d+.*?: Video: (\w+)(.*)$")


def _parse_stream_report(report: str) -> dict[str, Any]:
    """Codec, size, pixel format and nominal fps of the first video stream in `ffmpeg -i` output."""
    for line in report.splitlines():
        match = _VIDEO_STREAM.match(line)
        if not match:
            continue
        rest = match.group(2)
        size = re.search(r", (\d+)x(\d+)(?=[\s,\[]|$)", rest)
        pix_fmt = re.search(r", ([a-z0-9_]+)(?:\(|,)", rest)
        fps = re.search(r", ([\d.]+)(k?) (?:fps|tbr)", rest)
        return {
            "codec": match.group(1),
            "width": int(size.group(1)) if size else None,
            "height": int(size.group(2)) if size else None,
            "pix_fmt": pix_fmt.group(1) if pix_fmt else None,
            "nominal_fps": float(fps.group(1)) * (1000 if fps.group(2) else 1) if fps else None,
        }
    return {}


def _parse_metadata(report: str) -> dict[str, str]:
    """Container-level metadata from the "Input #0" block of `ffmpeg -i` output."""
    metadata: dict[str, str] = {}
    lines = report.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("Input #0"))
    except StopIteration:
        return metadata
    last_key = None
    in_block = False
    for line in lines[start + 1:]:
        if line.startswith("  Metadata:"):
            in_block = True
            continue
        if not in_block:
            if not line.startswith("    "):
                break
            continue
        if not line.startswith("    "):
            break
        key, sep, value = line[4:].partition(": ")
        if not sep:
            key, value = line[4:].rstrip(":"), ""
        key = key.strip()
        if key:
            metadata[key] = value
            last_key = key
        elif last_key is not None:  # ffmpeg prints each further line of a multi-line value as "  : line"
            metadata[last_key] += "\n" + value
    return metadata


def _scan(path: Path, exe: str) -> tuple[_Packets, str]:
    """Packet list (stream copy, no decoding) and the stream report of a file's first video stream."""
    cmd = [
        exe, "-hide_banner", "-nostdin", "-nostats", "-i", _media_url(path),
        "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-",
    ]
    result = subprocess.run(cmd, capture_output=True)
    report = result.stderr.decode("utf-8", "replace")
    if result.returncode != 0:
        if "Stream map '0:v:0' matches no streams" in report or "Invalid data found" in report:
            raise ValueError(f"path={str(path)!r}: not a readable video or image file")
        raise FFmpegError(cmd, result.returncode, report)
    return _parse_packets(result.stdout.decode("utf-8", "replace")), report


def _frame_rate(packets: _Packets, nominal: float | None) -> Fraction | None:
    durations = [d for d in packets.durations if d > 0]
    if durations:
        common = Counter(durations).most_common(1)[0][0]
        return 1 / (common * packets.time_base)
    return _as_fps(nominal, "fps") if nominal else None


def probe(path: str | os.PathLike, *, ffmpeg: str | os.PathLike | None = None) -> dict[str, Any]:
    """Describe the first video stream of a video or image file without decoding it.

    Returns ``frames`` (packet count of the stream, which is the frame count for the formats used here),
    ``fps`` (float) and ``frame_rate`` (exact, as "num/den"; from the packet durations), ``width``, ``height``,
    ``codec`` (ffmpeg's codec name: h264, hevc, av1, png, mjpeg...), ``pix_fmt``, ``duration`` in seconds,
    ``keyframes`` (indices of packets flagged as keyframes, in stream order) and the container ``metadata``.
    """
    p = _existing_file(path, "path")
    exe = ffmpeg_exe(ffmpeg)
    packets, report = _scan(p, exe)
    stream = _parse_stream_report(report)
    if not stream:
        raise ValueError(f"path={str(path)!r}: has no video stream")
    rate = _frame_rate(packets, stream["nominal_fps"])
    duration = float(sum(packets.durations) * packets.time_base)
    return {
        "frames": len(packets.pts),
        "fps": float(rate) if rate else None,
        "frame_rate": f"{rate.numerator}/{rate.denominator}" if rate else None,
        "width": stream["width"],
        "height": stream["height"],
        "codec": stream["codec"],
        "pix_fmt": stream["pix_fmt"],
        "duration": duration,
        "keyframes": [i for i, key in enumerate(packets.keys) if key],
        "metadata": _parse_metadata(report),
    }


def keyframe_indices(path: str | os.PathLike, *, ffmpeg: str | os.PathLike | None = None) -> list[int]:
    """Display-order indices of the frames the decoder reports as keyframes (decodes the whole stream)."""
    p = _existing_file(path, "path")
    exe = ffmpeg_exe(ffmpeg)
    cmd = [
        exe, "-hide_banner", "-nostdin", "-nostats", "-i", _media_url(p),
        "-map", "0:v:0", "-vf", "showinfo", "-f", "null", "-",
    ]
    report = _run_raw(cmd).stderr.decode("utf-8", "replace")
    return [
        int(m.group(1))
        for m in re.finditer(r"Parsed_showinfo.*?\bn:\s*(\d+)\b.*?\biskey:(\d)", report)
        if m.group(2) == "1"
    ]


# --------------------------------------------------------------------------------------------- validation


_NTSC_BASES = (24, 30, 48, 60, 120, 240)


def _as_fps(fps: Any, name: str) -> Fraction:
    """Exact frame rate from an int, a Fraction, a "num/den" string or a float (29.97 means 30000/1001)."""
    if isinstance(fps, bool):
        raise ValueError(f"{name}={fps!r}: expected a positive frame rate")
    try:
        if isinstance(fps, float):
            if not math.isfinite(fps):
                raise ValueError
            rate = Fraction(fps).limit_denominator(1001)
            for base in _NTSC_BASES:
                ntsc = Fraction(base * 1000, 1001)
                if abs(fps - float(ntsc)) < 0.005:
                    rate = ntsc
        else:
            rate = Fraction(fps)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"{name}={fps!r}: expected a positive frame rate (int, Fraction, 'num/den')") from None
    if not 0 < rate <= MAX_FPS:
        raise ValueError(f"{name}={fps!r}: frame rate must be > 0 and <= {MAX_FPS}")
    return rate


def _as_frames(frames: Any) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames: dtype {frames.dtype} is not uint8 (expected values 0..255)")
        frames = frames.detach().cpu().contiguous().numpy()
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames: expected a uint8 numpy array or torch tensor, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames: dtype {frames.dtype} is not uint8 (expected values 0..255)")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: shape {tuple(frames.shape)} is not (T, H, W, 3)")
    t, h, w, _ = frames.shape
    if t < 1:
        raise ValueError(f"frames: shape {tuple(frames.shape)} has no frames (T must be >= 1)")
    for side, value in (("height", h), ("width", w)):
        if value < 2 or value % 2 or value > MAX_SIDE:
            raise ValueError(
                f"frames: {side} {value} (shape {tuple(frames.shape)}) must be even and between 2 and "
                f"{MAX_SIDE}: yuv420p halves both chroma dimensions"
            )
    return np.ascontiguousarray(frames)


def _as_side(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_SIDE:
        raise ValueError(f"{name}={value!r}: expected an integer between 1 and {MAX_SIDE}")
    return int(value)


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# --------------------------------------------------------------------------------------------- writing


def encode_segment(
    frames: Any,
    path: str | os.PathLike,
    *,
    fps: int | float | Fraction | str,
    codec: str = "h264",
    quality: float | None = None,
    preset: str | int | None = None,
    ffmpeg: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Encode uint8 frames (T, H, W, 3) into a video segment that concatenates by stream copy.

    Every segment gets the same settings: yuv420p, BT.709 colour tags, CRF ``quality`` (per-encoder default
    when None), no B-frames, closed GOPs that begin with an IDR/key frame on the segment's first frame, and
    timestamps at exactly ``fps``. The file appears at ``path`` only once it is complete and durable.
    Returns ``{"frames", "bytes", "sha256", "encoder"}``.
    """
    array = _as_frames(frames)
    rate = _as_fps(fps, "fps")
    out = _output_path(path, "path", SEGMENT_SUFFIXES)
    exe = ffmpeg_exe(ffmpeg)
    encoder, quality, preset = _encoder_settings(codec, quality, preset, exe)

    t, h, w, _ = array.shape
    partial = _partial_path(out)
    stream = (
        ffmpeg_python.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}",
            framerate=f"{rate.numerator}/{rate.denominator}",
        )
        .video
        # Convert with the BT.709 matrix the file is tagged with, so players and read_frames agree on colour.
        .filter("scale", out_color_matrix="bt709", out_range="tv")
        .output(
            _media_url(partial), f=out.suffix.lower().lstrip(".").replace("m4v", "mp4"),
            **encoder.options(fps=rate, quality=quality, preset=preset),
        )
        .overwrite_output()
    )
    try:
        # A flat memoryview streams the frames to ffmpeg without copying them.
        _run(stream, exe, input=array.reshape(-1).data)
        packets, _ = _scan(partial, exe)
        if len(packets.pts) != t:
            raise FrameCountError(out, t, len(packets.pts), " after encoding")
        if not packets.keys[0]:
            raise MediaIntegrityError(out, f"{encoder.name} did not start the segment on a keyframe")
        _publish(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    size, digest = _file_digest(out)
    return {"frames": t, "bytes": size, "sha256": digest, "encoder": encoder.name}


def _encoder_settings(codec: str, quality: float | None, preset: str | int | None,
                      exe: str) -> tuple[Encoder, float, str | int]:
    """The encoder for ``codec`` with ``quality`` and ``preset`` checked against it (its defaults for None)."""
    encoder = _pick_encoder(codec, exe)
    if quality is None:
        quality = encoder.crf_default
    lo, hi = encoder.crf_range
    if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not lo <= quality <= hi:
        raise ValueError(f"quality={quality!r}: {encoder.name} takes a CRF between {lo} and {hi}")
    if preset is None:
        preset = encoder.preset_default
    if preset not in encoder.presets:
        raise ValueError(
            f"preset={preset!r}: {encoder.name} takes one of {', '.join(map(str, encoder.presets))}"
        )
    return encoder, quality, preset


def _concat_line(path: Path) -> str:
    # The concat script quotes with '...'; a literal quote is written as '\'' (close, escaped quote, reopen).
    return "file '" + _media_url(path).replace("'", "'\\''") + "'\n"


def concat_segments(
    segment_paths: list[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    metadata: dict[str, Any],
    encode: dict[str, Any] | None = None,
    ffmpeg: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Join segments written by `encode_segment` into one mp4 by stream copy (no re-encoding), or, with
    ``encode`` (``{"codec", "quality", "preset"}``, the last two optional), encode them once as one stream.

    Encoding once is for segments stored losslessly (``quality=0`` with h264): a segment encoded on its own
    must start on a keyframe, and a keyframe codes the whole picture afresh, so each segment's first frame
    jumps away from the last, predicted frame of the one before (measured on a 16-s render: the seam ratio at
    segment starts 1.95 at CRF 23, 0.90 encoded as one stream). The joined stream has a keyframe only at its
    start and every ``GOP_SECONDS``.

    ``metadata`` goes into the container: ``title``, ``comment`` and the other standard mp4 keys
    (`STANDARD_METADATA_KEYS`) as the usual tags; any other key switches the file to QuickTime ``mdta`` keys,
    which ffmpeg and most tools read back under the same names. Values that are not strings are stored as
    JSON. The output is checked to hold exactly the sum of the segments' frames, with each segment starting
    on a keyframe, before it appears at ``out_path``.
    Returns ``{"frames", "bytes", "sha256", "fps", "frame_rate", "duration", "segments"}``.
    """
    if isinstance(segment_paths, (str, os.PathLike)) or not hasattr(segment_paths, "__iter__"):
        raise ValueError(f"segment_paths={segment_paths!r}: expected a list of segment files")
    segments = [_existing_file(s, "segment_paths") for s in segment_paths]
    if not segments:
        raise ValueError("segment_paths=[]: need at least one segment")
    out = _output_path(out_path, "out_path", OUTPUT_SUFFIXES)
    tags = _metadata_tags(metadata)
    exe = ffmpeg_exe(ffmpeg)

    first_frames: list[int] = []
    total = 0
    reference = None
    for segment in segments:
        packets, report = _scan(segment, exe)
        stream = _parse_stream_report(report)
        params = {
            "codec": stream.get("codec"),
            "width": stream.get("width"),
            "height": stream.get("height"),
            "pix_fmt": stream.get("pix_fmt"),
            "frame_rate": _frame_rate(packets, stream.get("nominal_fps")),
            "extradata": packets.extradata,
        }
        if reference is None:
            reference = params
        elif params != reference:
            differing = {k: (reference[k], params[k]) for k in params if params[k] != reference[k]}
            raise ValueError(
                f"segment_paths: {str(segment)!r} was not encoded like {str(segments[0])!r} and cannot be "
                f"joined by stream copy; differing (first, this): {differing}"
            )
        first_frames.append(total)
        total += len(packets.pts)
    if encode is not None:
        unknown = sorted(set(encode) - {"codec", "quality", "preset"})
        if unknown or "codec" not in encode:
            raise ValueError(f"encode={encode!r}: takes codec and optionally quality and preset")
        if reference["frame_rate"] is None:
            raise MediaIntegrityError(segments[0], "has no constant frame rate to encode the joined video at")
        encoder, quality, preset = _encoder_settings(encode["codec"], encode.get("quality"), encode.get("preset"),
                                                     exe)

    movflags = "+faststart" + ("+use_metadata_tags" if set(tags) - STANDARD_METADATA_KEYS else "")
    partial = _partial_path(out)
    with tempfile.NamedTemporaryFile("w", suffix=".ffconcat", delete=False, encoding="utf-8") as listing:
        listing.write("ffconcat version 1.0\n")
        listing.writelines(_concat_line(s) for s in segments)
    try:
        output_args: dict[str, Any] = {
            "c": "copy", "map": "0:v", "map_metadata": -1, "movflags": movflags, "f": "mp4",
        }
        if encode is not None:
            output_args.pop("c")
            output_args.update(encoder.options(fps=reference["frame_rate"], quality=quality, preset=preset))
        url = _media_url(partial)
        stream = ffmpeg_python.input(_media_url(Path(listing.name)), f="concat", safe=0).output(
            url, **output_args
        ).overwrite_output()
        metadata_args = [arg for key, value in tags.items() for arg in ("-metadata", f"{key}={value}")]
        _run(stream, exe, output_url=url, output_extra=metadata_args)
        packets, _ = _scan(partial, exe)
        if len(packets.pts) != total:
            raise FrameCountError(out, total, len(packets.pts), f" after joining {len(segments)} segments")
        missing = [i for i in (first_frames if encode is None else first_frames[:1]) if not packets.keys[i]]
        if missing:
            raise MediaIntegrityError(
                out, f"segments starting at frames {missing} lost their keyframe in the join"
            )
        rate = reference["frame_rate"]
        if rate is not None:
            step = packets.durations[0]
            expected_pts = [packets.pts[0] + i * step for i in range(total)]
            if sorted(packets.pts) != expected_pts:
                raise MediaIntegrityError(out, f"joined timestamps are not evenly spaced at {rate} fps")
        _publish(partial, out)
    finally:
        os.unlink(listing.name)
        partial.unlink(missing_ok=True)
    size, digest = _file_digest(out)
    return {
        "frames": total,
        "bytes": size,
        "sha256": digest,
        "fps": float(rate) if rate else None,
        "frame_rate": f"{rate.numerator}/{rate.denominator}" if rate else None,
        "duration": float(sum(packets.durations) * packets.time_base),
        "segments": len(segments),
    }


def _metadata_tags(metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata={metadata!r}: expected a dict of key -> value")
    tags = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not _METADATA_KEY.match(key):
            raise ValueError(f"metadata key {key!r}: use letters, digits, '_', '.' and '-' only")
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if "\x00" in text:
            raise ValueError(f"metadata[{key!r}]: value contains a NUL character")
        tags[key] = text
    return tags


def job_metadata(prompt: str, seed: int, model: dict[str, Any], **extra: Any) -> dict[str, str]:
    """Container metadata of a render: the prompt as ``title``, seed, model and extras as JSON ``comment``."""
    return {"title": prompt, "comment": json.dumps({"seed": seed, "model": model, **extra}, sort_keys=True)}


# --------------------------------------------------------------------------------------------- reading


def read_frames(
    path: str | os.PathLike,
    width: int,
    height: int,
    fps: int | float | Fraction | str | None = None,
    *,
    max_frames: int | None = None,
    ffmpeg: str | os.PathLike | None = None,
) -> np.ndarray:
    """Decode an image (png, jpg, ...) or a clip into uint8 frames (T, height, width, 3).

    Frames are scaled to cover width x height (respecting the input's pixel aspect ratio), then
    centre-cropped, so inputs of any aspect ratio fit the job. With ``fps`` the clip is resampled to that rate
    (frames dropped or repeated by timestamp); without it every decoded frame is returned.
    ``max_frames`` keeps only the first frames.
    """
    p = _existing_file(path, "path")
    w, h = _as_side(width, "width"), _as_side(height, "height")
    if max_frames is not None and (
        isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames < 1
    ):
        raise ValueError(f"max_frames={max_frames!r}: expected a positive integer or None")
    exe = ffmpeg_exe(ffmpeg)
    _scan(p, exe)  # a clear ValueError for files that hold no video, before decoding

    video = ffmpeg_python.input(_media_url(p)).video
    if fps is not None:
        rate = _as_fps(fps, "fps")
        video = video.filter("fps", fps=f"{rate.numerator}/{rate.denominator}")
    video = (
        video
        # RGB first, then square pixels, so "cover" below is computed on the displayed shape and no
        # chroma-subsampled format has to take an odd intermediate width.
        .filter("format", "rgb24")
        .filter("scale", "iw*sar", "ih")
        .filter("setsar", 1)
        .filter("scale", w, h, force_original_aspect_ratio="increase", flags="bicubic")
        .filter("crop", w, h)
    )
    output_args: dict[str, Any] = {"f": "rawvideo", "pix_fmt": "rgb24", "fps_mode": "passthrough"}
    if max_frames is not None:
        output_args["frames:v"] = int(max_frames)
    raw = _run(video.output("pipe:", **output_args), exe).stdout
    frame_bytes = w * h * 3
    if len(raw) % frame_bytes:
        raise FFmpegError(["read_frames", str(p)], 0, f"decoded {len(raw)} bytes, not a multiple of {frame_bytes}")
    frames = np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)
    if len(frames) == 0:
        raise ValueError(f"path={str(path)!r}: no frames could be decoded")
    return frames.copy()  # writable, independent of the bytes object


def make_preview(
    video_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    width: int = 320,
    gif_fps: int | float | Fraction | str = 8,
    tiles: int = 12,
    columns: int = 4,
    ffmpeg: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """A small preview of a video: an animated GIF (``.gif``) or a contact sheet of evenly spaced frames
    (``.png``), ``width`` pixels wide. Returns ``{"path", "bytes", "frames"}`` (frames shown)."""
    src = _existing_file(video_path, "video_path")
    out = _output_path(out_path, "out_path", PREVIEW_SUFFIXES)
    w = _as_side(width, "width")
    for name, value in (("tiles", tiles), ("columns", columns)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    exe = ffmpeg_exe(ffmpeg)
    info = probe(src, ffmpeg=exe)
    video = ffmpeg_python.input(_media_url(src)).video
    partial = _partial_path(out)

    if out.suffix.lower() == ".gif":
        rate = _as_fps(gif_fps, "gif_fps")
        scaled = video.filter("fps", fps=f"{rate.numerator}/{rate.denominator}").filter(
            "scale", w, -2, flags="lanczos"
        )
        split = scaled.split()
        # A palette computed from the clip itself keeps a 256-colour GIF close to the video's colours.
        palette = split[0].filter("palettegen", stats_mode="diff")
        stream = ffmpeg_python.filter([split[1], palette], "paletteuse", dither="bayer").output(
            _media_url(partial), f="gif", loop=0
        )
        shown = max(1, math.floor(info["duration"] * rate)) if info["duration"] else info["frames"]
    else:
        count = min(tiles, info["frames"])
        picks = sorted({round(i * (info["frames"] - 1) / max(1, count - 1)) for i in range(count)})
        cols = min(columns, len(picks))
        rows = math.ceil(len(picks) / cols)
        tile_width = max(2, (w // cols) // 2 * 2)
        stream = (
            video.filter("select", "+".join(f"eq(n,{i})" for i in picks))
            .filter("scale", tile_width, -2, flags="lanczos")
            .filter("tile", f"{cols}x{rows}")
            .output(_media_url(partial), f="image2", vcodec="png", fps_mode="passthrough", update=1,
                    **{"frames:v": 1})
        )
        shown = len(picks)
    try:
        _run(stream.overwrite_output(), exe)
        _publish(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"path": str(out), "bytes": out.stat().st_size, "frames": shown}
