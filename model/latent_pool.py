"""A pool of world clips encoded once by the VAE, for DiT training: ``longshot train latents``.

Half of a DiT training step on the CPU went into drawing world frames and encoding them, and on a GPU that
CPU work is all there is. The pool pays it once: each clip (a seeded world at one frame size, frame rate and
length, as the DiT trainer draws them) is encoded whole and kept in a Zarr group, one float16 array of raw
latent means per clip, chunked along time so that a training window reads just its own frames. Training then
draws its FDM windows from the pool's clips (``longshot train dit --latents``).

The latents belong to one VAE encoder: the group records a digest of the encoder's weights, and a trainer
whose encoder differs is refused (rebuild the pool with ``--rebuild``). Building is resumable: a clip array is
marked complete only after all its frames are written, and a rerun skips complete clips and redoes the rest;
asking for more clips extends the pool.

    <pool>.zarr/
        zarr.json            group attributes: format, encoder digest, latent channels, spatial factor
        clip-00000/          float16 (latent frames, channels, height, width); attributes: world seed, fps,
        clip-00001/          seconds, width, height, caption, complete
        objects/clip-00000/  uint8 (latent frames, height, width): 1 on the latent pixels an object touches
                             (:func:`latent_object_mask`), for the DiT's object-weighted loss

A pool of *stills* (``longshot train latents --stills``) holds one-frame clips instead: the first frame of each
of many worlds, at the single images' frame sizes, encoded as the DiT trainer encodes its single images. A DiT
trained on them (``longshot train dit --latents <run>/stills.zarr``) sees as many layouts per step as frames: a
frame's layout (which shapes, which colours, how many) is what the prompt decides, and on the CPU such single
frames are where a DiT has learnt to draw prompted shapes at all (ops/train/EXPERIMENTS.md, "The
convolutional-stage DiT for 12,000 single-frame steps"). The pool records which kind it is, and a build of the
other kind on it is refused.

Drawing a window's object masks costs about 1.7 ms of CPU, little beside a CPU training step but 0.4 s per
step for a GPU batch of 256 windows, so they are kept beside the latents; a pool built before them gets them
from the next ``longshot train latents`` on it, and until then the trainer draws them as it goes.
"""
from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from model.world import EVAL_SEED_BASE, caption, object_mask, render_frames, sample_world

POOL_FORMAT = 1
# Latent frames per chunk: a window reads a few chunks; a chunk at 128x80 is 16 x 4 x 20 x 32 halves (80 kB).
CHUNK_FRAMES = 16
# Latent frames encoded in one call while building (bounds the memory of the rendered frames).
ENCODE_BATCH = 32
OBJECTS = "objects"  # the pool's subgroup of per-clip latent object masks
STILLS_LOG_EVERY = 500  # a stills pool holds thousands of one-frame clips: a progress line per 500
# Frame rates and lengths (seconds) of the DiT's training clips, pooled or drawn on the fly (repeats weigh).
CLIP_FPS = (12, 24, 24, 30)
CLIP_SECONDS = (60, 60, 30, 10)


class PoolMismatch(ValueError):
    """The pool was encoded by another VAE encoder (or holds another latent layout)."""


def frames_of_latent(i: int) -> list[int]:
    """Video frames that latent frame i covers (latent 0 holds frame 0 alone)."""
    return [0] if i == 0 else list(range(4 * i - 3, 4 * i + 1))


def latent_object_mask(spec, times: list[int], fps: float, width: int, height: int,
                       spatial_factor: int) -> torch.Tensor:
    """Latent pixels of latent frames ``times`` that an object touches, float 0/1 (F, h, w): 1 where an object
    covers any pixel of the latent pixel in any of the video frames it encodes."""
    groups = [frames_of_latent(int(i)) for i in times]
    covered = torch.from_numpy(object_mask(spec, [f for g in groups for f in g], fps=fps, width=width,
                                           height=height)).float()
    per_latent = torch.stack([part.amax(0) for part in covered.split([len(g) for g in groups])])
    return torch.nn.functional.max_pool2d(per_latent[:, None], spatial_factor)[:, 0]


def clip_object_mask(spec, count: int, fps: int, width: int, height: int, spatial_factor: int) -> np.ndarray:
    """:func:`latent_object_mask` of latent frames ``0 .. count-1`` as uint8 (count, h, w), drawn in batches of
    ``ENCODE_BATCH`` latent frames to bound the memory of the rendered masks."""
    parts = [latent_object_mask(spec, list(range(lo, min(count, lo + ENCODE_BATCH))), fps, width, height,
                                spatial_factor) for lo in range(0, count, ENCODE_BATCH)]
    return torch.cat(parts).to(torch.uint8).numpy()


def num_latents(seconds: float, fps: int) -> int:
    """Latent frames of a clip of ``seconds`` at ``fps``: frame 0 alone, then groups of four."""
    return 1 + (int(round(seconds * fps)) - 1 + 3) // 4


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def pixel_groups(spec, times: list[int], fps: int, width: int, height: int) -> np.ndarray:
    """The video frames of the latent frames at absolute indices ``times``, uint8 (n, 4, H, W, 3): each latent
    frame's four, and frame 0 repeated four times as the encoder pads it. Pure CPU work (the world is drawn
    with numpy), so it can run in a data loader's worker processes."""
    groups = []
    for i in times:
        frames = render_frames(spec, frames_of_latent(i), fps=fps, width=width, height=height)
        groups.append(np.repeat(frames, 4, axis=0) if i == 0 else frames)
    return np.stack(groups)


@torch.no_grad()
def encode_pixel_groups(vae: torch.nn.Module, groups: torch.Tensor) -> torch.Tensor:
    """Raw latent means (n, C, h, w) of uint8 pixel groups (n, 4, H, W, 3), one latent frame each, in one encoder
    call on the VAE's device. The encoder mixes no latent frames, so encoding a frame's four video frames alone
    gives exactly what encoding the whole clip gives, and groups of different clips batch freely."""
    n, tf, height, width, _ = groups.shape
    device = next(vae.parameters()).device
    # (n, 4, H, W, 3) -> the encoder's packed input (n, 4 * 3, 1, H, W), frame-major channels
    pixels = groups.to(device).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1.0)
    moments = vae.encoder(pixels.reshape(n, tf * 3, 1, height, width))
    return moments.chunk(2, dim=1)[0][:, :, 0]


def encode_groups(vae: torch.nn.Module, spec, times: list[int], fps: int, width: int,
                  height: int) -> torch.Tensor:
    """Raw latent means (n, C, h, w) of the latent frames at absolute indices ``times``, each from its own frames."""
    return encode_pixel_groups(vae, torch.from_numpy(pixel_groups(spec, times, fps, width, height)))


def encoder_digest(vae: torch.nn.Module) -> str:
    """A short digest of the encoder's weights: the identity of the latent space a pool was built in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ClipSpec:
    """What one pool clip is: drawn from the same distribution as the DiT trainer's on-the-fly clips."""

    index: int
    world_seed: int
    fps: int
    seconds: int
    width: int
    height: int

    @property
    def num_latents(self) -> int:
        return num_latents(self.seconds, self.fps)


def clip_spec(index: int, seed: int, sizes: tuple[tuple[int, int], ...], stills: bool = False) -> ClipSpec:
    """Clip ``index`` of a pool built with ``seed``: frame sizes in turn, the rest seeded per clip. A still is
    a world's frame 0 alone (no seconds: one latent frame), at 24 fps as the trainer's single images are."""
    rng = random.Random(f"{seed}:{index}")
    width, height = sizes[index % len(sizes)]
    world_seed = rng.randrange(EVAL_SEED_BASE)
    if stills:
        return ClipSpec(index=index, world_seed=world_seed, fps=24, seconds=0, width=width, height=height)
    return ClipSpec(index=index, world_seed=world_seed, fps=rng.choice(CLIP_FPS), seconds=rng.choice(CLIP_SECONDS),
                    width=width, height=height)


def _clip_name(index: int) -> str:
    return f"clip-{index:05d}"


class LatentPool:
    """An open pool: its clips by frame size, their latents read lazily and kept in memory."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.attrs = group.attrs.asdict()
        self.clips: dict[tuple[int, int], list[tuple[str, dict]]] = {}
        for name, array in sorted(group.arrays()):
            attrs = array.attrs.asdict()
            if attrs.get("complete"):
                self.clips.setdefault((attrs["width"], attrs["height"]), []).append((name, attrs | {"name": name}))
        self._cache: dict[str, np.ndarray] = {}
        self._objects: dict[str, np.ndarray] = {}
        # After preload: every clip of a frame size in one device tensor, and each clip's first row there.
        self._held: dict[tuple[int, int], torch.Tensor] = {}
        self._held_objects: dict[tuple[int, int], torch.Tensor] = {}
        self._first_row: dict[str, int] = {}
        objects = group.get(OBJECTS)
        self.object_names = {name for name, _ in objects.arrays()} if objects is not None else set()

    @classmethod
    def open(cls, path: str | Path, vae: torch.nn.Module | None = None) -> "LatentPool":
        """Open a pool for reading; with ``vae``, refuse it unless that encoder built it."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise FileNotFoundError(f"latents: no latent pool at {path}; build it with "
                                    f"`longshot train latents --run <run>`")
        pool = cls(path, zarr.open_group(str(path), mode="r"))
        if pool.attrs.get("format") != POOL_FORMAT:
            raise PoolMismatch(f"latents: pool {path} has format {pool.attrs.get('format')!r}, "
                               f"this version reads {POOL_FORMAT}; rebuild it with --rebuild")
        if vae is not None:
            own = encoder_digest(vae)
            if pool.attrs.get("encoder") != own:
                raise PoolMismatch(f"latents: pool {path} was encoded by VAE encoder {pool.attrs.get('encoder')}, "
                                   f"the run's encoder is {own}; rebuild it with "
                                   f"`longshot train latents --rebuild`")
        if not pool.clips:
            raise ValueError(f"latents: pool {path} has no complete clip yet")
        return pool

    @property
    def stills(self) -> bool:
        """Whether the pool holds stills (one-frame clips of each world's first frame)."""
        return bool(self.attrs.get("stills"))

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return sorted(self.clips)

    def __len__(self) -> int:
        return sum(len(c) for c in self.clips.values())

    def latents(self, name: str) -> np.ndarray | torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self.group[name][:]
        return self._cache[name]

    def preload(self, device: torch.device | str) -> int:
        """Read every clip's latents and object masks into tensors on ``device`` (a GPU step then waits on no
        disk or host copy), one tensor per frame size; :meth:`draw` and :meth:`object_mask` return views of them
        and :meth:`gather` takes a batch's frames from them in one call. Returns the bytes held."""
        held = 0
        for size, clips in self.clips.items():
            names = [name for name, _ in clips]
            latents = [torch.from_numpy(self.group[name][:]) for name in names]
            self._held[size] = torch.cat(latents).to(device)
            held += self._held[size].nbytes
            stored = all(name in self.object_names for name in names)
            if stored:
                self._held_objects[size] = torch.cat([torch.from_numpy(self._stored_mask(n)) for n in names]).to(device)
                held += self._held_objects[size].nbytes
            row = 0
            for name, clip in zip(names, latents):
                self._first_row[name] = row
                self._cache[name] = self._held[size][row:row + len(clip)]
                if stored:
                    self._objects[name] = self._held_objects[size][row:row + len(clip)]
                row += len(clip)
        return held

    def gather(self, picks: list[tuple[dict, list[int]]], spatial_factor: int,
               objects: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frames ``times`` of each picked clip ``(attrs, times)``, all picks' frames one after another: latents
        (n, C, h, w) and, with ``objects``, latent object masks (n, h, w).

        From a pool held on a GPU (:meth:`preload`), picks of one frame size come in one gather: indexing clip by
        clip moves a small index to the GPU and waits for it, twice a window, hundreds of times a training step.
        """
        if not picks:
            raise ValueError("gather: no clips picked")
        sizes = {(attrs["width"], attrs["height"]) for attrs, _ in picks}
        size = next(iter(sizes))
        if len(sizes) == 1 and size in self._held and (not objects or size in self._held_objects):
            rows = torch.tensor([self._first_row[attrs["name"]] + t for attrs, times in picks for t in times])
            rows = rows.to(self._held[size].device)
            return (self._held[size].index_select(0, rows),
                    self._held_objects[size].index_select(0, rows) if objects else None)
        latents = torch.cat([torch.as_tensor(self.latents(attrs["name"])[times]) for attrs, times in picks])
        if not objects:
            return latents, None
        masks = [torch.as_tensor(self.object_mask(attrs, spatial_factor)[times]) for attrs, times in picks]
        return latents, torch.cat(masks)

    def draw(self, rng: random.Random, size: tuple[int, int]) -> tuple[dict, np.ndarray | torch.Tensor]:
        """A random clip of frame size ``size``: its attributes (``name`` among them) and raw latents
        (frames, C, h, w)."""
        name, attrs = rng.choice(self.clips[size])
        return attrs, self.latents(name)

    def _stored_mask(self, name: str) -> np.ndarray:
        return self.group[f"{OBJECTS}/{name}"][:]

    def object_mask(self, attrs: dict, spatial_factor: int) -> np.ndarray | torch.Tensor:
        """The clip's latent object mask, uint8 (frames, h, w): read from the pool, or, for a pool built
        before masks were kept, drawn from its world once and kept in memory."""
        name = attrs["name"]
        if name not in self._objects:
            if name in self.object_names:
                self._objects[name] = self._stored_mask(name)
            else:
                self._objects[name] = clip_object_mask(sample_world(attrs["world_seed"]), len(self.latents(name)),
                                                       attrs["fps"], attrs["width"], attrs["height"],
                                                       spatial_factor)
        return self._objects[name]


def clip_work(todo: list[int], seed: int, sizes: tuple[tuple[int, int], ...], spatial_factor: int,
              stills: bool = False):
    """The CPU side of building a pool: for each clip of ``todo`` its pixel groups, ``ENCODE_BATCH`` latent
    frames at a time, as ``("pixels", index, first latent, uint8 groups)``, then ``("objects", index, None,
    uint8 mask)``. All of it is numpy drawing of the world, so it can run in data loader worker processes."""
    for index in todo:
        clip = clip_spec(index, seed, sizes, stills)
        spec = sample_world(clip.world_seed)
        for lo in range(0, clip.num_latents, ENCODE_BATCH):
            times = list(range(lo, min(clip.num_latents, lo + ENCODE_BATCH)))
            yield "pixels", index, lo, torch.from_numpy(pixel_groups(spec, times, clip.fps, clip.width, clip.height))
        mask = clip_object_mask(spec, clip.num_latents, clip.fps, clip.width, clip.height, spatial_factor)
        yield "objects", index, None, torch.from_numpy(mask)


class ClipWorkStream(torch.utils.data.IterableDataset):
    """:func:`clip_work` split over data loader workers: worker k draws clips k, k + workers, ..."""

    def __init__(self, todo: list[int], seed: int, sizes: tuple[tuple[int, int], ...], spatial_factor: int,
                 stills: bool = False):
        self.todo, self.seed, self.sizes, self.spatial_factor, self.stills = todo, seed, sizes, spatial_factor, stills

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        mine = self.todo if worker is None else self.todo[worker.id::worker.num_workers]
        return clip_work(mine, self.seed, self.sizes, self.spatial_factor, self.stills)


def build_pool(vae: torch.nn.Module, path: str | Path, clips: int, *, sizes: tuple[tuple[int, int], ...],
               seed: int = 0, stills: bool = False, rebuild: bool = False, workers: int = 0,
               log=print) -> LatentPool:
    """Encode clips ``0 .. clips-1`` into the pool at ``path`` (creating, resuming or extending it); with
    ``stills``, one-frame clips of each world's first frame.

    ``workers`` data loader processes draw the worlds while this process encodes them on the VAE's device; on a
    GPU the drawing is all the work there is. The pool is the same whatever the number of workers.
    """
    if clips < 1:
        raise ValueError(f"clips: {clips} must be at least 1")
    if workers < 0:
        raise ValueError(f"workers: {workers} must be 0 or more worker processes")
    path = Path(path)
    vae = vae.eval()
    digest = encoder_digest(vae)
    latent_channels = vae.cfg.latent_channels
    factor = vae.cfg.spatial_factor
    attributes = {"format": POOL_FORMAT, "encoder": digest, "seed": seed, "stills": stills,
                  "latent_channels": latent_channels, "spatial_factor": factor}
    if rebuild or not (path / "zarr.json").is_file():
        group = zarr.open_group(str(path), mode="w", attributes=attributes)
    else:
        group = zarr.open_group(str(path), mode="r+")
        have = group.attrs.asdict()
        if (have.get("encoder") != digest or have.get("format") != POOL_FORMAT or have.get("seed") != seed
                or bool(have.get("stills")) != stills):
            kind = {True: "stills", False: "clips"}
            raise PoolMismatch(f"latents: pool {path} was built with encoder {have.get('encoder')}, seed "
                               f"{have.get('seed')}, of {kind[bool(have.get('stills'))]} (format "
                               f"{have.get('format')}); this build has encoder {digest}, seed {seed}, of "
                               f"{kind[stills]}: pass --rebuild to replace it")
    existing = {name: array.attrs.asdict().get("complete", False) for name, array in group.arrays()}
    todo = [i for i in range(clips) if not existing.get(_clip_name(i))]
    log(f"[latents] {path}: {clips - len(todo)} of {clips} clips already encoded, {len(todo)} to go")
    objects = group.require_group(OBJECTS)
    have_masks = {name for name, _ in objects.arrays()}

    def write_mask(index: int, mask: np.ndarray) -> None:
        objects.create_array(_clip_name(index), data=mask, chunks=(CHUNK_FRAMES, *mask.shape[1:]), overwrite=True)

    # Clips encoded before the pool kept object masks get theirs now (no encoding needed).
    unmasked = [i for i in range(clips) if existing.get(_clip_name(i)) and _clip_name(i) not in have_masks]
    for done, index in enumerate(unmasked, 1):
        clip = clip_spec(index, seed, sizes, stills)
        write_mask(index, clip_object_mask(sample_world(clip.world_seed), clip.num_latents, clip.fps, clip.width,
                                           clip.height, factor))
        if done % 50 == 0 or done == len(unmasked):
            log(f"[latents] object masks of {done}/{len(unmasked)} earlier clips written")
    if not todo:
        return LatentPool.open(path, vae)

    work = (clip_work(todo, seed, sizes, factor, stills) if not workers else
            iter(torch.utils.data.DataLoader(ClipWorkStream(todo, seed, sizes, factor, stills), batch_size=None,
                                             num_workers=min(workers, len(todo)), prefetch_factor=4)))
    arrays: dict[int, tuple[zarr.Array, ClipSpec]] = {}
    start, done = time.time(), 0
    # Where the build's time goes, for the closing line: waiting for drawn frames (the drawing is the limit),
    # encoding them (the encoder, and the GPU's results copied back), or writing the store.
    spent = {"waiting for frames": 0.0, "encoding": 0.0, "writing": 0.0}
    mark = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        spent[what] += now - mark
        mark = now

    for kind, index, lo, data in work:
        lap("waiting for frames")
        if index not in arrays:
            clip = clip_spec(index, seed, sizes, stills)
            h, w = clip.height // factor, clip.width // factor
            arrays[index] = (group.create_array(
                _clip_name(index), shape=(clip.num_latents, latent_channels, h, w), dtype="float16",
                chunks=(CHUNK_FRAMES, latent_channels, h, w), overwrite=True,
                attributes={"world_seed": clip.world_seed, "fps": clip.fps, "seconds": clip.seconds,
                            "width": clip.width, "height": clip.height,
                            "caption": caption(sample_world(clip.world_seed)), "complete": False}), clip)
        array, clip = arrays[index]
        if kind == "pixels":
            latents = encode_pixel_groups(vae, data).to("cpu", torch.float16).numpy()
            lap("encoding")
            array[lo:lo + len(data)] = latents
            lap("writing")
            continue
        # A clip's object mask comes after all of its pixels: the clip is complete.
        write_mask(index, data.numpy())
        array.attrs["complete"] = True  # only now does the clip count
        lap("writing")
        del arrays[index]
        done += 1
        if done % (STILLS_LOG_EVERY if stills else 1) and done < len(todo):
            mark = time.perf_counter()
            continue
        rate = done / max(time.time() - start, 1e-9)
        log(f"[latents] clip {index} ({clip.width}x{clip.height}, {clip.seconds} s at {clip.fps} fps, "
            f"{clip.num_latents} latent frames) done; {done}/{len(todo)}, eta {(len(todo) - done) / rate / 60:.1f} min")
        mark = time.perf_counter()  # the log line is nobody's time
    log(f"[latents] {done} clips in {time.time() - start:.1f} s: " + ", ".join(f"{what} {seconds:.1f} s"
                                                                            for what, seconds in spent.items()))
    return LatentPool.open(path, vae)
