"""Segment encode, stream-copy concatenation, probing and conditioning-input reads with the real ffmpeg."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ffmpeg as ffmpeg_python
import imageio_ffmpeg
import numpy as np
import pytest

from orchestrator import media

PALETTE = np.array(
    [
        (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128),
        (255, 255, 255), (0, 0, 0), (200, 100, 50), (50, 100, 200), (100, 200, 50), (220, 220, 120),
        (30, 60, 90), (90, 30, 60), (160, 0, 90), (0, 160, 90), (90, 160, 0), (240, 128, 16), (16, 128, 240),
    ],
    dtype=np.uint8,
)
COLOUR_TOLERANCE = 8  # yuv420p round trip of flat colours stays within a few code values


def solid_frames(colours: np.ndarray, height: int = 48, width: int = 64) -> np.ndarray:
    return np.broadcast_to(colours[:, None, None, :], (len(colours), height, width, 3)).copy()


def write_image(frame: np.ndarray, path: Path) -> None:
    """Write one RGB frame as an image file (format from the suffix) with the same ffmpeg binary."""
    h, w, _ = frame.shape
    (
        ffmpeg_python.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}")
        .output(str(path), **{"frames:v": 1, "q:v": 2})
        .overwrite_output()
        .run(cmd=media.ffmpeg_exe(), input=frame.tobytes(), quiet=True)
    )


def requires(codec: str) -> None:
    if codec not in media.available_codecs():
        pytest.skip(f"this ffmpeg cannot encode {codec}")


# ----------------------------------------------------------------------------------------- the binary


def test_ffmpeg_lookup_order(tmp_path, monkeypatch):
    bundled = imageio_ffmpeg.get_ffmpeg_exe()
    monkeypatch.delenv(media.FFMPEG_ENV, raising=False)
    assert media.ffmpeg_exe() == bundled

    configured = tmp_path / "ffmpeg-system"
    configured.symlink_to(bundled)
    monkeypatch.setenv(media.FFMPEG_ENV, str(configured))
    assert media.ffmpeg_exe() == str(configured)
    assert media.ffmpeg_exe(bundled) == bundled  # the argument beats the environment

    monkeypatch.setenv(media.FFMPEG_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="LONGSHOT_FFMPEG=.*missing"):
        media.ffmpeg_exe()
    with pytest.raises(ValueError, match="ffmpeg='no-such-ffmpeg-binary'"):
        media.ffmpeg_exe("no-such-ffmpeg-binary")


def test_bundled_binary_encodes_h264():
    assert media.available_codecs()["h264"] == "libx264"
    assert "libx264" in media.available_encoders()


def test_missing_encoder_names_what_the_binary_has(tmp_path, monkeypatch):
    # An ffmpeg build without libx265: the real binary behind a wrapper that hides that encoder.
    wrapper = tmp_path / "ffmpeg-without-x265"
    wrapper.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            if [ "$*" = "-hide_banner -nostdin -encoders" ]; then
                "{imageio_ffmpeg.get_ffmpeg_exe()}" "$@" | grep -v -e libx265 -e kvazaar
                exit 0
            fi
            exec "{imageio_ffmpeg.get_ffmpeg_exe()}" "$@"
            """
        )
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv(media.FFMPEG_ENV, str(wrapper))
    assert "h265" not in media.available_codecs()
    with pytest.raises(media.EncoderUnavailableError, match=r"codec='h265'.*libx265.*h264 \(libx264\)") as err:
        media.encode_segment(solid_frames(PALETTE[:2]), tmp_path / "s.mp4", fps=24, codec="h265")
    assert isinstance(err.value, ValueError)
    assert err.value.available["h264"] == "libx264"
    assert not (tmp_path / "s.mp4").exists()


# ----------------------------------------------------------------------------------------- frame-exact joins


@pytest.mark.parametrize("codec", ["h264", "h265", "av1"])
def test_segments_concatenate_frame_exactly(tmp_path, codec):
    requires(codec)
    lengths = (7, 8, 5)
    starts = np.cumsum((0,) + lengths[:-1])
    segments = []
    for index, (start, length) in enumerate(zip(starts, lengths)):
        path = tmp_path / f"S{index:04d}.mp4"
        result = media.encode_segment(solid_frames(PALETTE[start:start + length]), path, fps=24, codec=codec)
        assert result["frames"] == length
        segments.append(path)

    model = {"preset": "tiny", "checkpoint_hash": "sha256:ab"}
    metadata = media.job_metadata("a red circle bouncing", 1234, model)
    out = tmp_path / "out.mp4"
    joined = media.concat_segments(segments, out, metadata=metadata)
    assert joined["frames"] == 20 and joined["segments"] == 3
    assert joined["frame_rate"] == "24/1" and joined["duration"] == pytest.approx(20 / 24)

    info = media.probe(out)
    assert info["frames"] == 20
    assert info["frame_rate"] == "24/1" and info["fps"] == 24.0
    assert (info["width"], info["height"], info["pix_fmt"]) == (64, 48, "yuv420p")
    assert info["codec"] == {"h264": "h264", "h265": "hevc", "av1": "av1"}[codec]

    # Decoding gives every frame once, in order, in its own colour.
    decoded = media.read_frames(out, 64, 48)
    assert decoded.shape == (20, 48, 64, 3)
    centre = decoded[:, 16:32, 24:40].reshape(20, -1, 3).mean(axis=1)
    np.testing.assert_allclose(centre, PALETTE[:20], atol=COLOUR_TOLERANCE)

    # Every segment starts on a frame the decoder can start from.
    keyframes = media.keyframe_indices(out)
    assert {0, 7, 15} <= set(keyframes)
    assert {0, 7, 15} <= set(info["keyframes"])

    assert info["metadata"]["title"] == "a red circle bouncing"
    assert json.loads(info["metadata"]["comment"]) == {"seed": 1234, "model": model}


def test_single_frame_segments_and_ntsc_rate(tmp_path):
    # A 1-frame segment (the last one of a render often is) and a fractional rate keep exact timestamps.
    segments = []
    colours = iter(PALETTE)
    for index, length in enumerate((1, 3, 1, 2)):
        path = tmp_path / f"S{index}.mp4"
        frames = solid_frames(np.stack([next(colours) for _ in range(length)]), 32, 32)
        media.encode_segment(frames, path, fps=29.97, codec="h264")
        segments.append(path)
    joined = media.concat_segments(segments, tmp_path / "ntsc.mp4", metadata={})
    assert joined["frames"] == 7
    assert joined["frame_rate"] == "30000/1001"
    assert joined["duration"] == pytest.approx(7 * 1001 / 30000)
    assert {0, 1, 4, 5} <= set(media.keyframe_indices(tmp_path / "ntsc.mp4"))
    centre = media.read_frames(tmp_path / "ntsc.mp4", 32, 32)[:, 16, 16].astype(int)
    np.testing.assert_allclose(centre, PALETTE[:7], atol=COLOUR_TOLERANCE)


def test_concat_refuses_segments_encoded_differently(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    media.encode_segment(solid_frames(PALETTE[:2]), a, fps=24)
    media.encode_segment(solid_frames(PALETTE[:2], 32, 32), b, fps=24)
    with pytest.raises(ValueError, match=r"segment_paths: .*b\.mp4.*width"):
        media.concat_segments([a, b], tmp_path / "out.mp4", metadata={})
    c = tmp_path / "c.mp4"
    media.encode_segment(solid_frames(PALETTE[:2]), c, fps=25)
    with pytest.raises(ValueError, match="frame_rate"):
        media.concat_segments([a, c], tmp_path / "out.mp4", metadata={})
    assert not (tmp_path / "out.mp4").exists()


# ----------------------------------------------------------------------------------------- encode details


def test_encode_result_describes_the_file(tmp_path):
    import hashlib

    path = tmp_path / "S0000.mp4"
    result = media.encode_segment(solid_frames(PALETTE[:4]), path, fps=24, quality=30, preset="veryfast")
    data = path.read_bytes()
    assert result == {
        "frames": 4,
        "bytes": len(data),
        "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
        "encoder": "libx264",
    }
    info = media.probe(path)
    # Frame 0 is a keyframe; cuts between the flat colours may add more (scene-cut detection).
    assert info["keyframes"][0] == 0 and info["frames"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["S0000.mp4"]  # no partial file left behind


def test_torch_frames_encode_like_numpy(tmp_path):
    torch = pytest.importorskip("torch")
    frames = solid_frames(PALETTE[:3])
    media.encode_segment(frames, tmp_path / "n.mp4", fps=24)
    media.encode_segment(torch.from_numpy(frames), tmp_path / "t.mp4", fps=24)
    np.testing.assert_array_equal(
        media.read_frames(tmp_path / "n.mp4", 64, 48), media.read_frames(tmp_path / "t.mp4", 64, 48)
    )
    with pytest.raises(ValueError, match="frames: dtype torch.float32"):
        media.encode_segment(torch.zeros(2, 48, 64, 3), tmp_path / "f.mp4", fps=24)


def test_killed_encode_leaves_no_finished_file(tmp_path):
    target = tmp_path / "S0000.mp4"
    script = textwrap.dedent(
        f"""
        import numpy as np
        from orchestrator import media
        frames = np.random.default_rng(0).integers(0, 256, (600, 240, 320, 3), dtype=np.uint8)
        media.encode_segment(frames, {str(target)!r}, fps=24, codec="h265", preset="slow")
        """
    )
    # Its own session, so the kill below reaches the encoder's ffmpeg too, by process-group id.
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
            assert child.poll() is None, "the encode finished before it could be killed"
            assert time.monotonic() < deadline, "the encode never started writing"
            time.sleep(0.02)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(name.startswith(".S0000.mp4.") and name.endswith(".partial") for name in leftovers)

    # Running the task again simply writes the segment.
    assert media.encode_segment(solid_frames(PALETTE[:2]), target, fps=24)["frames"] == 2
    assert media.probe(target)["frames"] == 2


# ----------------------------------------------------------------------------------------- metadata


def test_metadata_keys_standard_and_custom(tmp_path):
    segment = tmp_path / "S0.mp4"
    media.encode_segment(solid_frames(PALETTE[:2]), segment, fps=24)

    media.concat_segments(
        [segment], tmp_path / "std.mp4", metadata={"title": "line one\nline two", "comment": {"seed": 7}}
    )
    tags = media.probe(tmp_path / "std.mp4")["metadata"]
    assert tags["title"] == "line one\nline two"
    assert json.loads(tags["comment"]) == {"seed": 7}

    media.concat_segments(
        [segment], tmp_path / "custom.mp4", metadata={"title": "prompt", "longshot.job_id": "J-1", "seed": 99}
    )
    tags = media.probe(tmp_path / "custom.mp4")["metadata"]
    assert (tags["title"], tags["longshot.job_id"], tags["seed"]) == ("prompt", "J-1", "99")


# ----------------------------------------------------------------------------------------- conditioning inputs


def test_read_image_covers_and_centre_crops(tmp_path):
    # Wide image: green | red | blue bands; covering 64x48 keeps only the red middle.
    wide = np.zeros((48, 128, 3), np.uint8)
    wide[:, :32] = (0, 255, 0)
    wide[:, 32:96] = (255, 0, 0)
    wide[:, 96:] = (0, 0, 255)
    write_image(wide, tmp_path / "wide.png")
    frames = media.read_frames(tmp_path / "wide.png", 64, 48)
    assert frames.shape == (1, 48, 64, 3)
    np.testing.assert_allclose(frames[0, :, 4:-4].reshape(-1, 3).mean(0), (255, 0, 0), atol=3)

    # Tall jpg, half the target size: scaled up by 2 to cover, then the top and bottom bands are cropped.
    tall = np.zeros((64, 32, 3), np.uint8)
    tall[:16] = (0, 0, 255)
    tall[16:48] = (255, 255, 0)
    tall[48:] = (0, 0, 255)
    write_image(tall, tmp_path / "tall.jpg")
    frames = media.read_frames(tmp_path / "tall.jpg", 64, 64)
    assert frames.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(frames[0, 4:-4].reshape(-1, 3).mean(0), (255, 255, 0), atol=12)

    # Resampling to a job fps leaves a still image a single frame.
    assert media.read_frames(tmp_path / "wide.png", 32, 32, fps=24).shape == (1, 32, 32, 3)


def test_read_clip_resamples_and_limits(tmp_path):
    clip = tmp_path / "clip.mp4"
    media.encode_segment(solid_frames(PALETTE[:12]), clip, fps=24)
    half = media.read_frames(clip, 32, 24, fps=12)
    assert half.shape == (6, 24, 32, 3)
    np.testing.assert_allclose(half[:, 12, 16].astype(int), PALETTE[0:12:2], atol=COLOUR_TOLERANCE)
    assert media.read_frames(clip, 32, 24, fps=48).shape[0] == 24
    first = media.read_frames(clip, 64, 48, max_frames=5)
    assert first.shape == (5, 48, 64, 3)
    np.testing.assert_allclose(first[:, 24, 32].astype(int), PALETTE[:5], atol=COLOUR_TOLERANCE)


def test_read_anamorphic_clip_uses_display_aspect(tmp_path):
    # 32x48 stored pixels with 2:1 pixel aspect display as 64x48: all three bands must survive the cover.
    stored = np.zeros((2, 48, 32, 3), np.uint8)
    stored[:, :, :8] = (255, 0, 0)
    stored[:, :, 8:24] = (0, 255, 0)
    stored[:, :, 24:] = (0, 0, 255)
    clip = tmp_path / "anamorphic.mp4"
    (
        ffmpeg_python.input("pipe:", format="rawvideo", pix_fmt="rgb24", s="32x48", framerate=24)
        .filter("setsar", "2/1")
        .output(str(clip), vcodec="libx264", pix_fmt="yuv420p", crf=10)
        .overwrite_output()
        .run(cmd=media.ffmpeg_exe(), input=stored.tobytes(), quiet=True)
    )
    frames = media.read_frames(clip, 64, 48)
    assert frames.shape == (2, 48, 64, 3)
    row = frames[0, 24].astype(int)
    np.testing.assert_allclose(row[4], (255, 0, 0), atol=40)
    np.testing.assert_allclose(row[32], (0, 255, 0), atol=40)
    np.testing.assert_allclose(row[60], (0, 0, 255), atol=40)


# ----------------------------------------------------------------------------------------- previews


def test_previews(tmp_path):
    video = tmp_path / "v.mp4"
    media.encode_segment(solid_frames(PALETTE[:20]), video, fps=24)

    sheet = media.make_preview(video, tmp_path / "sheet.png", width=320, tiles=12, columns=4)
    assert sheet["frames"] == 12
    info = media.probe(tmp_path / "sheet.png")
    assert (info["width"], info["height"]) == (320, 3 * 60)  # 4x3 tiles of 80x60
    tile = media.read_frames(tmp_path / "sheet.png", 320, 180)[0]
    np.testing.assert_allclose(tile[30, 40].astype(int), PALETTE[0], atol=COLOUR_TOLERANCE)
    np.testing.assert_allclose(tile[150, 280].astype(int), PALETTE[19], atol=COLOUR_TOLERANCE)

    gif = media.make_preview(video, tmp_path / "v.gif", width=64, gif_fps=12)
    assert (tmp_path / "v.gif").read_bytes()[:6] == b"GIF89a"
    info = media.probe(tmp_path / "v.gif")
    assert info["width"] == 64 and info["frames"] == gif["frames"] == 10


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("frames", "kwargs", "message"),
    [
        (np.zeros((2, 48, 64, 3), np.float32), {}, r"frames: dtype float32"),
        (np.zeros((2, 48, 64), np.uint8), {}, r"frames: shape \(2, 48, 64\)"),
        (np.zeros((2, 48, 64, 4), np.uint8), {}, r"frames: shape \(2, 48, 64, 4\)"),
        (np.zeros((0, 48, 64, 3), np.uint8), {}, r"frames: shape \(0, 48, 64, 3\)"),
        (np.zeros((2, 47, 64, 3), np.uint8), {}, r"frames: height 47"),
        (np.zeros((2, 48, 63, 3), np.uint8), {}, r"frames: width 63"),
        ([[0]], {}, r"frames: expected a uint8 numpy array"),
        (None, {"codec": "mpeg2"}, r"codec='mpeg2'.*h264, h265, av1"),
        (None, {"quality": 60}, r"quality=60: libx264 takes a CRF between 0 and 51"),
        (None, {"quality": "high"}, r"quality='high'"),
        (None, {"preset": "ludicrous"}, r"preset='ludicrous'"),
        (None, {"fps": 0}, r"fps=0"),
        (None, {"fps": "fast"}, r"fps='fast'"),
        (None, {"fps": float("nan")}, r"fps=nan"),
        (None, {"path_suffix": ".avi"}, r"path=.*\.avi.*\.mp4"),
    ],
)
def test_encode_rejects_bad_input(tmp_path, frames, kwargs, message):
    if frames is None:
        frames = solid_frames(PALETTE[:2])
    path = tmp_path / ("S0" + kwargs.pop("path_suffix", ".mp4"))
    kwargs.setdefault("fps", 24)
    with pytest.raises(ValueError, match=message):
        media.encode_segment(frames, path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(ValueError, match=r"path='.*nope\.mp4': no such file"):
        media.probe(missing)
    with pytest.raises(ValueError, match=r"path='.*nope\.mp4': no such file"):
        media.read_frames(missing, 64, 48)
    with pytest.raises(ValueError, match=r"segment_paths='.*nope\.mp4': no such file"):
        media.concat_segments([missing], tmp_path / "out.mp4", metadata={})
    with pytest.raises(ValueError, match=r"segment_paths=\[\]"):
        media.concat_segments([], tmp_path / "out.mp4", metadata={})
    with pytest.raises(ValueError, match=r"video_path='.*nope\.mp4'"):
        media.make_preview(missing, tmp_path / "p.gif")

    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(ValueError, match=r"path='.*notes\.mp4': not a readable video"):
        media.read_frames(text, 64, 48)

    segment = tmp_path / "S0.mp4"
    media.encode_segment(solid_frames(PALETTE[:2]), segment, fps=24)
    with pytest.raises(ValueError, match=r"width=0"):
        media.read_frames(segment, 0, 48)
    with pytest.raises(ValueError, match=r"max_frames=0"):
        media.read_frames(segment, 64, 48, max_frames=0)
    with pytest.raises(ValueError, match=r"metadata key 'bad key'"):
        media.concat_segments([segment], tmp_path / "out.mp4", metadata={"bad key": "x"})
    with pytest.raises(ValueError, match=r"out_path=.*out\.mkv"):
        media.concat_segments([segment], tmp_path / "out.mkv", metadata={})
    with pytest.raises(ValueError, match=r"out_path=.*no-dir.*does not exist"):
        media.concat_segments([segment], tmp_path / "no-dir" / "out.mp4", metadata={})


def textured_clip(frames: int, seed: int = 0) -> np.ndarray:
    """A still, finely textured backdrop with a small square gliding over it: what a keyframe re-codes."""
    rng = np.random.default_rng(seed)
    backdrop = rng.integers(60, 200, size=(48, 64, 3), dtype=np.uint8)
    clip = np.repeat(backdrop[None], frames, axis=0)
    for i in range(frames):
        clip[i, 20:28, 4 + i: 12 + i] = (250, 40, 40)
    return clip


def test_lossless_segments_encoded_once_join_without_keyframe_seams(tmp_path):
    from orchestrator.evaluate import seam_ratio

    clip, lengths = textured_clip(36), (12, 12, 12)
    starts = [0, 12, 24]
    model = {"preset": "tiny", "checkpoint_hash": "sha256:ab"}
    metadata = media.job_metadata("a red square", 1, model)
    joined = {}
    for kind, quality in (("copy", 23), ("once", 0)):
        paths = []
        for index, (start, length) in enumerate(zip(starts, lengths)):
            path = tmp_path / f"{kind}-S{index}.mp4"
            media.encode_segment(clip[start:start + length], path, fps=24, quality=quality)
            paths.append(path)
        out = tmp_path / f"{kind}.mp4"
        encode = {"codec": "h264", "quality": 23} if kind == "once" else None
        info = media.concat_segments(paths, out, metadata=metadata, encode=encode)
        assert info["frames"] == 36 and info["frame_rate"] == "24/1"
        joined[kind] = media.read_frames(out, 64, 48)
        if kind == "once":
            assert media.probe(out)["keyframes"] == [0]  # one stream: no keyframe at the segment starts
            assert json.loads(media.probe(out)["metadata"]["comment"])["seed"] == 1
    seams = {kind: seam_ratio(frames, starts[1:]) for kind, frames in joined.items()}
    assert seams["once"] < 1.5 < seams["copy"], seams
    # the same picture: encoding once loses no more than encoding each segment at the output's quality
    assert media_psnr(joined["once"], clip) > media_psnr(joined["copy"], clip) - 1.0
    with pytest.raises(ValueError, match="encode=.*takes codec"):
        media.concat_segments(paths, tmp_path / "bad.mp4", metadata=metadata, encode={"crf": 23})


def media_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))
