"""Training of the demo model on the procedural world: ``longshot train vae|text|dit|export``.

Each part trains in its own run directory (``<run>/<part>/``) and can be stopped and resumed at any time:
``state.pt`` holds the weights, optimiser, EMA, step and random state, written atomically every
``--save-every`` steps. ``export`` assembles the parts into a checkpoint directory (fp16 safetensors +
config.json) that :meth:`model.Generator.load` reads.

    longshot train vae  --preset demo --run runs/demo --steps 3000
    longshot train text --preset demo --run runs/demo --steps 1500
    longshot train dit  --preset demo --run runs/demo --steps 4000      # needs vae and text
    longshot train latents --run runs/demo --clips 400    # optional: encode clips once (model.latent_pool) ...
    longshot train dit  --run runs/demo --latents         # ... and train the DiT on them, twice as fast on a CPU
    longshot train latents --run runs/demo --stills --clips 15360   # first frames of 15,360 worlds, and a DiT
    longshot train dit  --run runs/demo --latents runs/demo/stills.zarr --batch 32   # trained on them as images
    longshot train export --run runs/demo --out model/checkpoints/demo
    longshot train unpack --run runs/more --init-from model/checkpoints/demo   # a run from a checkpoint, then
    longshot train dit --run runs/more --init-from model/checkpoints/demo --steps 20000 --latents   # train on

A run whose ``model.json`` gives the VAE shape channels (``vae.shape_channels``, ``vae.latent_channels`` grown by as
many) goes on from a model without them: ``vae --decoder-only --init-from CHECKPOINT --circled P --degrade P``
keeps the encoder's latents, trains its shape head and widens the decoder; ``vae --head-only`` trains the shape head
alone on the frozen VAE (it leaves its "no object" plateau only after some hundreds of steps, cheap without the
decoder's pass); ``dit --init-from CHECKPOINT`` then widens the DiT (the new channels' weights at zero) and trains
it in the wider latent space.

Training runs on a CUDA device when there is one (``--device``, default ``auto``; the forward passes in bf16
autocast there, the weights, optimiser and EMA stay fp32) and on the CPU otherwise. Every part records where
its steps ran (``compute`` in ``<run>/<part>/<part>.json`` and in an exported checkpoint's config), so a model
card can say which compute trained it.

The DiT sees what the orchestrator will ask of it: windows of frames drawn from videos as long as the full 60
seconds with log-uniform strides, some frames observed (clean) and the others noised, single images as
one-frame windows, and several aspect ratios packed into one batch.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.config import ModelConfig, get_preset, preset_names
from model.dit import FrameInputs, VideoDiT
from model.flow import noisy, sample_training_times, video_noise, window_flow_losses, windows_noise
from model.generator import (CONFIG_FILE, SAMPLING_KEY, WEIGHTS_FILE, Generator, VideoModel, _quiet_open_clip,
                             sampling_defaults)
from model.latent_pool import (CLIP_FPS, CLIP_SECONDS, LatentPool, build_pool, encode_pixel_groups, latent_object_mask,
                               num_latents, pixel_groups, to_pixels)
from model.vae import SHAPE_SCALE, Decoder
from model.world import (EVAL_SEED_BASE, SHAPES, caption, object_mask, render_frames, sample_world,
                         shape_coverage)

PARTS = ("vae", "text", "dit")
POOL_NAME = "latents.zarr"  # a run's latent pool for DiT training (``longshot train latents``)
STILLS_NAME = "stills.zarr"  # a run's pool of stills (``longshot train latents --stills``)
SAMPLING_FILE = "sampling.json"  # a run's render defaults for its exports (``longshot train export --sampling``)
# Frame sizes (width, height) the demo model trains on; all multiples of 16, landscape, portrait and square.
VIDEO_SIZES = ((128, 80), (80, 128), (96, 96), (128, 64))
# Noise levels the DiT's estimates are made from when the decoder trains on them (`--generated`): a render's
# last sampling step starts at ~0.3 (8 Euler steps at shift 3).
GENERATED_NOISE = (0.05, 0.5)
# The layers that read and make the shape channels (vae.shape_channels) train at this multiple of the learning
# rate. At 1, 600 steps left the decoder drawing circles from circles' latents whatever the channels said (0.20,
# ops/train/EXPERIMENTS.md, "The shape head reads the pixels"); the scratch decoder that learnt to follow them
# gave its input layer for the channels 10 times its 2e-4.
SHAPE_LR_SCALE = 4.0
# Share of the batches in which a decoder that reads the prompt is given the empty prompt instead.
CAPTION_DROP = 0.1
IMAGE_SIZES = ((128, 80), (96, 96), (64, 112))


# ----------------------------------------------------------------------------------------------- plumbing
@dataclass
class RunPaths:
    root: Path
    part: str

    @property
    def dir(self) -> Path:
        return self.root / self.part

    @property
    def state(self) -> Path:
        return self.dir / "state.pt"

    @property
    def weights(self) -> Path:
        return self.dir / f"{self.part}.safetensors"

    @property
    def meta(self) -> Path:
        return self.dir / f"{self.part}.json"

    @property
    def log(self) -> Path:
        return self.dir / "log.jsonl"


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


class Logger:
    def __init__(self, path: Path, total: int, every: int):
        self.path, self.total, self.every = path, total, every
        self.start = time.time()
        self.first_step: int | None = None

    def __call__(self, step: int, **values) -> None:
        if self.first_step is None:
            self.first_step = step - 1
        if step % self.every and step != self.total:
            return
        elapsed = time.time() - self.start
        rate = (step - self.first_step) / max(elapsed, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        record = {"step": step, "time": round(elapsed, 1), **{k: round(float(v), 6) for k, v in values.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={float(v):.4g}" for k, v in values.items())
        print(f"[{self.path.parent.name}] step {step}/{self.total} {shown} {rate:.2f} it/s eta {eta / 60:.1f} min",
              flush=True)


def resolve_device(name: str) -> torch.device:
    """``--device``: "auto" is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} asked for, but torch sees no CUDA device on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {name!r} is neither cpu nor cuda")
    return device


def describe_device(device: torch.device) -> str:
    """What trained a run's steps, for its metadata: the GPU's name, or the CPU and its torch threads."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.machine() or 'unknown'}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def lr_at(step: int, base: float, warmup: int, total: int, spent: float | None = None) -> float:
    """Warmup, then a cosine from ``base`` down to a tenth of it over ``total`` steps. ``spent`` (the share of a
    time budget used, with --anneal-in-time) moves the cosine on as far as the clock has, if that is further."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if spent is not None:
        progress = max(progress, spent)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Trainer:
    """Shared loop: resumable state, cosine learning rate, EMA, periodic saves."""

    part = ""

    def __init__(self, args, model: VideoModel, params, rng_seed: int):
        self.args = args
        self.model = model
        # The model is on this device already (main moves it before the optimiser sees the parameters).
        self.device = next(model.parameters()).device
        self.paths = RunPaths(Path(args.run), self.part)
        self.paths.dir.mkdir(parents=True, exist_ok=True)
        # ``params``: parameters, or parameter groups (dicts) whose "lr_scale" multiplies the learning rate.
        params = list(params)
        plain = [p for p in params if not isinstance(p, dict)]
        groups = ([{"params": plain}] if plain else []) + [g for g in params if isinstance(g, dict)]
        self.opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
        self.step = 0
        self.rng = random.Random(rng_seed)
        self.ema: dict[str, torch.Tensor] | None = None
        self.warm_source: str | None = None  # where a warm-started run's first weights came from
        # Where the steps ran: one record per stretch of steps on one device (a run may resume elsewhere).
        self.compute: list[dict] = []
        self._stretch_start = 0

    def autocast(self):
        """bf16 autocast of the forward passes on a GPU; the CPU keeps fp32.

        Measured on a 2-core CPU with bf16 matrix units (AMX), where one bf16 matrix product of the demo DiT's
        size runs 7 times as fast as in fp32: a DiT training step under CPU bf16 autocast was still slower
        (0.47 against 0.66 steps/s; the bf16 attention's backward pass alone took 825 against 51 ms), and with
        the attention kept in fp32 too (0.59 against 0.68 steps/s over 100 steps of varied window shapes).
        """
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, *tensors: torch.Tensor):
        moved = tuple(t.to(self.device, non_blocking=True) for t in tensors)
        return moved if len(moved) > 1 else moved[0]

    def record_compute(self) -> None:
        """Extend this stretch's record to the current step, or open a new one on resuming elsewhere."""
        here = describe_device(self.device)
        if self.compute and self.compute[-1]["device"] == here and self.compute[-1]["to"] == self._stretch_start:
            self.compute[-1]["to"] = self.step
        elif self.step > self._stretch_start:
            self.compute.append({"device": here, "from": self._stretch_start, "to": self.step})
        self._stretch_start = self.step

    def module(self) -> torch.nn.Module:
        return getattr(self.model, self.part)

    @property
    def state_path(self) -> Path:
        return self.paths.state

    def warm_start(self, source: Path) -> None:
        """A fresh run's weights from another run or checkpoint: every tensor of the same name and shape.

        For an architecture change that keeps most of the network (a new patch size or latent space keeps
        the DiT's blocks): the copied blocks start from what they learnt, the rest from scratch.
        """
        state = self.adapt_warm_start(warm_start_state(source, self.part))
        own = self.module().state_dict()
        taken = {k: v.to(own[k].dtype) for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(own) - set(taken))
        self.module().load_state_dict({**own, **taken})
        self.warm_source = str(source)
        print(f"[{self.part}] warm start from {source}: {len(taken)} tensors copied, {len(skipped)} kept fresh "
              f"({', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''})", flush=True)

    def adapt_warm_start(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook: another architecture's tensors renamed or reshaped to fit this one."""
        return state

    def resume(self) -> None:
        if not self.state_path.is_file() and self.args.init_from:
            self.warm_start(Path(self.args.init_from))
        if self.state_path.is_file():
            state = torch.load(self.state_path, map_location="cpu", weights_only=False)
            self.module().load_state_dict(state["weights"])
            self.opt.load_state_dict(state["optimizer"])
            self.step = state["step"]
            self.ema = state.get("ema")
            if self.ema is not None:
                self.ema = {k: v.to(self.device) for k, v in self.ema.items()}
            self.warm_source = state.get("init_from")
            self.compute = list(state.get("compute", ()))
            self.rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            print(f"[{self.part}] resumed at step {self.step} from {self.state_path}", flush=True)

    def save(self, final: bool = False) -> None:
        self.record_compute()
        atomic_torch_save({"weights": self.module().state_dict(), "optimizer": self.opt.state_dict(),
                           "step": self.step, "ema": self.ema, "rng": self.rng.getstate(),
                           "init_from": self.warm_source, "compute": self.compute,
                           "torch_rng": torch.get_rng_state()}, self.state_path)
        weights = self.ema if self.ema is not None else self.module().state_dict()
        atomic_save_safetensors(weights, self.paths.weights)
        meta = {"part": self.part, "preset": self.args.preset, "step": self.step, "final": final,
                "ema": self.ema is not None, **({"init_from": self.warm_source} if self.warm_source else {}),
                "compute": self.compute, **self.metadata()}
        self.paths.meta.write_text(json.dumps(meta, indent=2))

    def metadata(self) -> dict:
        return {}

    def update_ema(self, decay: float) -> None:
        current = self.module().state_dict()
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in current.items()}
            return
        floats = [k for k, v in current.items() if v.is_floating_point()]
        # One fused update for all tensors (per tensor, two small kernels each on a GPU step): ema += (1 - decay)
        # * (weights - ema), i.e. decay * ema + (1 - decay) * weights.
        torch._foreach_lerp_([self.ema[k] for k in floats], [current[k] for k in floats], 1 - decay)
        for k, v in current.items():
            if not v.is_floating_point():
                self.ema[k].copy_(v)

    def loss(self) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def run(self) -> None:
        self.resume()
        self._stretch_start = self.step
        print(f"[{self.part}] training on {describe_device(self.device)}", flush=True)
        total = self.args.steps
        log = Logger(self.paths.log, total, self.args.log_every)
        self.module().train()
        # A time budget (--minutes) ends the run early at a step boundary; the learning rate still follows the
        # schedule over --steps, so a later command with the same --steps resumes where this one stopped. With
        # --anneal-in-time it follows the clock where that is ahead, so a run on a lent machine of unknown speed
        # still ends annealed when its minutes are up (and does not resume on the same schedule).
        minutes = getattr(self.args, "minutes", None)
        started = time.monotonic()
        deadline = started + 60 * minutes if minutes else None
        by_time = bool(getattr(self.args, "anneal_in_time", False)) and deadline is not None
        while self.step < total:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                print(f"[{self.part}] time budget of {minutes:g} min spent at step {self.step}", flush=True)
                break
            spent = (now - started) / (60 * minutes) if by_time else None
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.step, self.args.lr, self.args.warmup, total, spent) * group.get("lr_scale", 1)
            with self.autocast():
                loss, values = self.loss()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            # Each parameter group is clipped on its own: a head's gradients (the VAE's shape head) neither shrink
            # the rest's steps nor are shrunk by them. The logged norm is the whole gradient's, before clipping.
            grad = torch.stack([torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
                                for group in self.opt.param_groups]).pow(2).sum().sqrt()
            self.opt.step()
            self.step += 1
            if self.args.ema:
                self.update_ema(min(self.args.ema, (1 + self.step) / (10 + self.step)))
            log(self.step, loss=loss.item(), grad=grad.item(), **values)
            if self.step % self.args.save_every == 0:
                self.save()
        self.finish()
        self.save(final=self.step >= total)
        print(f"[{self.part}] done: {self.paths.weights}", flush=True)

    def finish(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------- the VAE
def object_pixel_weight(objects: torch.Tensor, extra: float, ring: int = 2) -> torch.Tensor:
    """The VAE's ``--object-weight``: 1 + ``extra`` on the pixels objects cover (bool (B, 1, T, H, W)) and the
    ``ring`` pixels around them, 1 elsewhere.

    A world frame is mostly flat backdrop, so a plain mean spends the decoder's capacity there; the shapes the
    prompt names are a few percent of the pixels, and a small diamond's corners a few pixels of those (the
    decoder shipped before this weight drew a diamond 19 px across as a circle). The ring counts too: a corner
    is right only where the backdrop beside it is.
    """
    b, c, t, h, w = objects.shape
    flat = objects.float().reshape(b * t, 1, h, w)
    near = F.max_pool2d(flat, kernel_size=2 * ring + 1, stride=1, padding=ring).reshape(b, c, t, h, w)
    return 1.0 + extra * near


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (B, C, T, H, W) under a per-pixel ``weight`` (B, 1, T, H, W) normalised to mean 1, so a
    weight moves the loss between pixels without changing its scale; the plain mean without one."""
    if weight is None:
        return values.mean()
    return (values * weight).mean() / weight.mean()


def gradient_loss(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """L1 between the frame-to-frame and neighbour-pixel differences of two videos (B, 3, T, H, W).

    Objects cover a few percent of a frame, so plain pixel losses are dominated by flat background; matching
    differences weighs the edges that make a shape, and the frame-to-frame term punishes objects that jump
    where one latent frame's four frames meet the next (the seams the evaluation measures).
    """
    loss = recon.new_zeros(())
    for dim in (2, 3, 4):
        if recon.shape[dim] > 1:
            loss = loss + (torch.diff(recon, dim=dim) - torch.diff(video, dim=dim)).abs().mean()
    return loss


def seam_loss(recon: torch.Tensor, video: torch.Tensor, temporal_factor: int) -> torch.Tensor:
    """L1 between the frame-to-frame differences of two videos (B, 3, T, H, W) where one latent frame meets the
    next (entering frames 1, 1 + tf, 1 + 2 tf, ...).

    The decoder makes each latent frame's four frames from the same features, so its errors hold still within
    a latent frame and change at once at the next: a flicker at every latent boundary (the x4 demo VAE's
    reconstructions jumped five times more there than the world does). This term asks the change across each
    boundary to be the world's change, so that the errors of neighbouring latent frames agree.
    """
    at = list(range(0, recon.shape[2] - 1, temporal_factor))
    if not at:
        return recon.new_zeros(())
    def across(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, [i + 1 for i in at]] - x[:, :, at]
    return (across(recon) - across(video)).abs().mean()


class VAETrainer(Trainer):
    """Encoder and decoder together; or, with ``--decoder-only``, the decoder alone on a frozen encoder.

    Decoder-only training keeps the latent space fixed, so it can run while the DiT trains on that space.
    """

    part = "vae"

    def __init__(self, args, model: VideoModel):
        self.head_only = bool(getattr(args, "head_only", False))
        if self.head_only and not model.cfg.vae.shape_channels:
            raise ValueError("--head-only: this run's VAE has no shape head (vae.shape_channels is 0 in its "
                             "model.json)")
        # The shape head alone learns on the frozen VAE (encoder and decoder as the run or --init-from has them):
        # it reads pixels and is supervised by the world, so no decoder pass is needed and a step is a few
        # renders and the head's own small network.
        self.decoder_only = bool(getattr(args, "decoder_only", False)) or self.head_only
        self.generated = float(getattr(args, "generated", 0.0) or 0.0)
        if not 0.0 <= self.generated <= 1.0:
            raise ValueError(f"--generated: {self.generated!r} must be a share in [0, 1]")
        if self.generated and not self.decoder_only:
            raise ValueError("--generated: needs --decoder-only (the DiT's latent space must stay fixed)")
        self.frame_stack_only = bool(getattr(args, "frame_stack_only", False))
        if self.frame_stack_only and not self.decoder_only:
            raise ValueError("--frame-stack-only: needs --decoder-only (it trains a part of the decoder)")
        if self.frame_stack_only:
            # Only the per-frame upsampling stack trains: the layers that mix latent frames and frames keep
            # their weights, so how the decoder joins one latent frame to the next stays as it was while the
            # stack learns to draw each frame sharper. (Sharper frames still show the DiT's jumps between latent
            # frames more plainly: ops/train/EXPERIMENTS.md, "The per-frame stack alone".)
            decoder = model.vae.decoder
            for frozen in decoder.before_frame_stack():
                frozen.requires_grad_(False)
            params = [p for p in decoder.parameters() if p.requires_grad]
        elif self.head_only:
            params = model.vae.encoder.shape_head.parameters()
        else:
            params = model.vae.decoder.parameters() if self.decoder_only else model.vae.parameters()
        self.shape_channels = model.cfg.vae.shape_channels
        if self.shape_channels and self.shape_channels != len(SHAPES):
            raise ValueError(f"vae.shape_channels: {self.shape_channels} must be 0 or one per shape of the world "
                             f"({len(SHAPES)}: {', '.join(SHAPES)})")
        if self.shape_channels and not self.head_only:
            # The layers new with the shape channels (the encoder's head, the decoder's input for them) learn at
            # SHAPE_LR_SCALE times the rest's rate; the head trains beside a frozen encoder too, whose appearance
            # latents (and a DiT's training on them) stay as they were.
            new = [*model.vae.encoder.shape_head.parameters(), *model.vae.decoder.shape_in.parameters()]
            params = [*(p for p in params if all(p is not q for q in new)), {"params": new, "lr_scale": SHAPE_LR_SCALE}]
        self.degrade = float(getattr(args, "degrade", 0.0) or 0.0)
        if not 0.0 <= self.degrade <= 1.0:
            raise ValueError(f"--degrade: {self.degrade!r} must be a share in [0, 1]")
        super().__init__(args, model, params, rng_seed=args.seed + (7 if self.decoder_only else 0))
        self.latent_stats: dict = {}
        if self.decoder_only:
            self.load_frozen_encoder(model)
            if self.head_only:
                model.vae.decoder.requires_grad_(False)
            if self.shape_channels:
                model.vae.encoder.shape_head.requires_grad_(True)
        self.object_error: dict[str, float] = {}
        self.circled = float(getattr(args, "circled", 0.0) or 0.0)
        if not 0.0 <= self.circled <= 1.0 - self.generated:
            raise ValueError(f"--circled: {self.circled!r} must be a share in [0, 1 - --generated]")
        if self.circled and not (self.decoder_only and (model.vae.reads_caption or self.shape_channels)):
            raise ValueError("--circled: needs --decoder-only and a decoder that reads the prompt or shape "
                             "channels (vae.caption_width or vae.shape_channels in the run's model.json)")
        decoder_options = [name for name, on in (("--generated", self.generated), ("--circled", self.circled),
                                                 ("--degrade", self.degrade), ("--frame-stack-only",
                                                                               self.frame_stack_only)) if on]
        if self.head_only and decoder_options:
            raise ValueError(f"--head-only: trains the shape head alone; {', '.join(decoder_options)} "
                             f"train the decoder")
        if self.generated:
            model.dit.eval().requires_grad_(False)
        if self.generated or model.vae.reads_caption:
            model.text.eval().requires_grad_(False)

    def load_frozen_encoder(self, model: VideoModel) -> None:
        """The run's trained VAE; a fresh run with ``--init-from`` takes the source's encoder and latent
        statistics instead (its decoder is warm-started by :meth:`resume`, so it may have another design)."""
        init_from = Path(self.args.init_from) if self.args.init_from else None
        if self.paths.weights.is_file():
            # A run unpacked from a decoder without caption attention lacks its tensors; they start fresh.
            missing, unexpected = model.vae.load_state_dict(load_file(str(self.paths.weights)), strict=False)
            if unexpected or any(not k.startswith("decoder.caption.") for k in missing):
                raise KeyError(f"vae: {self.paths.weights} does not fit the run's VAE: missing {missing[:4]}, "
                               f"unexpected {unexpected[:4]}")
            meta = json.loads(self.paths.meta.read_text())
        elif init_from is not None:
            encoder = {k: v for k, v in warm_start_state(init_from, "vae").items() if k.startswith("encoder.")}
            model.vae.load_state_dict({**model.vae.state_dict(), **encoder})
            meta = source_latent_stats(init_from)
        else:
            raise FileNotFoundError(f"vae: --decoder-only needs trained weights at {self.paths.weights} "
                                    f"or --init-from a run or checkpoint with a trained encoder")
        self.latent_stats = {k: meta[k] for k in ("latent_shift", "latent_scale")}
        self.frozen_record = meta
        self.encoder_steps = meta.get("encoder_steps", meta.get("step"))
        model.vae.encoder.requires_grad_(False)

    def adapt_warm_start(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.model.cfg.vae.frame_blocks:
            return state
        return Decoder.frame_rate_state(state, self.model.cfg.vae.temporal_factor, prefix="decoder.")

    @property
    def state_path(self) -> Path:
        name = "state-head.pt" if self.head_only else "state-decoder.pt" if self.decoder_only else "state.pt"
        return self.paths.dir / name

    def batch(self, objects: bool = False, circled: bool = False):
        """A batch of same-sized clips, mostly 9-frame videos (3 latents), some single images; their captions;
        with ``objects``, the pixels objects cover in them, bool (B, 1, T, H, W) (else None); with ``circled``,
        the same clips with every object drawn as a circle (else None); for a VAE with shape channels, their
        targets (B, S, T_lat, h, w) (else None)."""
        w, h = self.rng.choice(VIDEO_SIZES)
        num_frames = 1 if self.rng.random() < 0.2 else 9
        clips, captions, masks, circles, shapes = [], [], [], [], []
        for _ in range(self.args.batch):
            spec = sample_world(self.rng.randrange(EVAL_SEED_BASE))
            fps = self.rng.choice((8, 12, 24, 30))
            start = self.rng.randrange(0, 60 * fps)
            frames = range(start, start + num_frames)
            clips.append(to_pixels(render_frames(spec, frames, fps=fps, width=w, height=h)))
            captions.append(caption(spec))
            if objects:
                masks.append(torch.from_numpy(object_mask(spec, frames, fps=fps, width=w, height=h)))
            if circled:
                circles.append(to_pixels(render_frames(all_circles(spec), frames, fps=fps, width=w, height=h)))
            if self.shape_channels:
                shapes.append(latent_shape_targets(spec, frames, fps=fps, width=w, height=h, cfg=self.model.cfg.vae))
        return (self.to_device(torch.stack(clips)), captions,
                self.to_device(torch.stack(masks)[:, None]) if objects else None,
                self.to_device(torch.stack(circles)) if circled else None,
                self.to_device(torch.stack(shapes)) if self.shape_channels else None)

    def caption_tokens(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tokens, mask) of the captions for a decoder that reads them, each dropped to the empty prompt
        CAPTION_DROP of the time so that the decoder also decodes without one (a plain VAE round trip)."""
        if not self.model.vae.reads_caption:
            return None
        kept = [c if self.rng.random() >= CAPTION_DROP else "" for c in captions]
        with torch.no_grad():
            text = self.model.text.encode(kept)
        return text.tokens.float(), text.mask

    @torch.no_grad()
    def generated_latents(self, mean: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """What the run's DiT makes of each clip's latents (B, C, T_lat, h, w): its clean-latent estimate from the
        latents noised to a level in GENERATED_NOISE, prompted with the clip's caption.

        A render's latents are such estimates (the last sampling step lands on one made at noise ~0.3), and they
        differ from the encoder's: shapes rounded off, colours spread, each latent frame a little off its
        neighbours. A decoder that has only seen the encoder's latents draws those errors as blobs and flicker.
        """
        cfg = self.latent_config()
        z = cfg.normalise_latents(mean)
        windows = []
        for clip in z.transpose(1, 2):  # (T_lat, C, h, w)
            n = len(clip)
            t = torch.full((n,), self.rng.uniform(*GENERATED_NOISE), device=self.device)
            noise = self.to_device(video_noise(n, tuple(clip.shape[1:]), cfg.flow.noise_correlation))
            windows.append(FrameInputs(noisy(clip, noise, t), torch.zeros(n, dtype=torch.bool, device=self.device),
                                       torch.arange(n, device=self.device), t))
        text = self.model.text.encode(captions)
        velocity = self.model.dit(windows, text.tokens, text.mask, text.pooled)
        estimates = torch.stack([w.frames - w.noise.view(-1, 1, 1, 1) * v.float() for w, v in zip(windows, velocity)])
        return cfg.raw_latents(estimates.transpose(1, 2))

    def latent_config(self) -> ModelConfig:
        """The model's config with the latent statistics of the encoder this run decodes."""
        return self.model.cfg.replace(**self.latent_stats)

    @torch.no_grad()
    def degraded(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, T_lat, h, w) made more like a DiT's, clip by clip with probability ``--degrade``:
        the appearance channels blurred by a random share and noised (up to 0.15 of the normalised latents'
        spread), the shape channels blurred, scaled by 0.7-1.2 and noised (up to 0.3). A DiT's latents round
        off what the encoder's keep sharp, and its shape channels are never exact; a decoder trained only on the
        encoder's latents draws those errors as blobs (ops/train/EXPERIMENTS.md, "Shape channels beside the
        latents")."""
        cfg = self.latent_config()
        x = cfg.normalise_latents(z)
        b, a = len(x), cfg.vae.appearance_channels
        def share(high: float = 1.0, low: float = 0.0) -> torch.Tensor:
            return (low + (high - low) * torch.rand(b, 1, 1, 1, 1)).to(x.device)
        chosen = (torch.rand(b, 1, 1, 1, 1) < self.degrade).to(x.device)
        look, shapes = x[:, :a], x[:, a:]
        look = torch.lerp(look, blur_latents(look), share()) + share(0.15) * torch.randn_like(look)
        if shapes.shape[1]:
            shapes = torch.lerp(shapes, blur_latents(shapes), share()) * share(1.2, 0.7)
            shapes = shapes + share(0.3) * torch.randn_like(shapes)
        return cfg.raw_latents(torch.where(chosen, torch.cat([look, shapes], dim=1), x))

    def head_loss(self):
        """``--head-only``: the shape head's squared error against the world's shape channels on true clips."""
        video, _, _, _, shapes = self.batch()
        predicted = self.model.vae.encoder.shape_head(self.model.vae._pack_time(video))
        head = F.mse_loss(predicted, shapes)
        return head, {"shape_head": head.item()}

    def loss(self):
        if self.head_only:
            return self.head_loss()
        draw = self.rng.random()
        source = "generated" if draw < self.generated else "circled" if draw < self.generated + self.circled else "own"
        video, captions, objects, circles, shapes = self.batch(objects=bool(self.args.object_weight),
                                                               circled=source == "circled")
        weight = object_pixel_weight(objects, self.args.object_weight) if objects is not None else None
        if self.decoder_only:
            self.model.vae.encoder.eval()
        words = self.caption_tokens(captions)
        # "circled": the latents of the same clips with every object a circle; the frames to draw are the clips
        # themselves, so what tells a circle from a square is the caption, or the shape channels, alone.
        mean, logvar = self.model.vae.encode_dist(circles if source == "circled" else video)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if source == "own" else mean.detach()
        appearance = self.model.cfg.vae.appearance_channels
        head = None
        if self.shape_channels:
            # The head learns from the true clips in every batch (on circled ones its own pass on them is cheap).
            predicted = (self.model.vae.encoder.shape_head(self.model.vae._pack_time(video)) if source == "circled"
                         else mean[:, appearance:])
            head = F.mse_loss(predicted, shapes)
            # The decoder learns from the true shape channels (a DiT's are trained towards them), not the head's.
            z = torch.cat([z[:, :appearance], shapes], dim=1)
        if source == "generated":
            z = self.generated_latents(z, captions)
        if self.degrade and self.decoder_only:
            z = self.degraded(z)
        recon = self.model.vae.decode_frames(z, from_start=True, caption=words)
        mean, logvar = mean[:, :appearance], logvar[:, :appearance]  # the KL is the appearance posterior's
        error = recon - video
        l1 = weighted_mean(error.abs(), weight)
        mse = weighted_mean(error.pow(2), weight)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        psnr = 10 * torch.log10(4.0 / error.detach().pow(2).mean().clamp(min=1e-10))  # pixels span [-1, 1]
        edges = gradient_loss(recon, video)
        seams = seam_loss(recon, video, self.model.cfg.vae.temporal_factor)
        loss = l1 + mse + self.args.edge * edges + self.args.seam * seams + self.args.kl * kl
        values = {"psnr": psnr.item(), "kl": kl.item(), "edges": edges.item(), "seams": seams.item()}
        if head is not None:
            loss = loss + head
            values["shape_head"] = head.item()
        if objects is not None and (self.generated or self.circled):
            # Squared error on the objects' pixels, a running mean per kind of latents: whether the decoder
            # learns to draw the shapes the DiT's latents (or the circles) miss shows here and not in the loss.
            error_here = error.detach().pow(2).mean(1, keepdim=True)[objects].mean().item()
            self.object_error[source] = error_here if source not in self.object_error else (
                0.95 * self.object_error[source] + 0.05 * error_here)
            values.update({f"objects_{k}": v for k, v in sorted(self.object_error.items())})
        return loss, values

    @torch.no_grad()
    def finish(self) -> None:
        """Latent normalisation: the DiT works on latents of zero mean and unit variance."""
        if self.decoder_only:
            return  # the encoder, hence the latent space and its statistics, did not change
        self.model.vae.eval()
        saved = self.module().state_dict()
        if self.ema is not None:
            self.module().load_state_dict(self.ema)
        means = []
        for _ in range(16):  # the appearance channels' (shape channels are unit-sized by construction)
            means.append(self.model.vae.encode_dist(self.batch()[0])[0][:, :self.model.cfg.vae.appearance_channels])
        z = torch.cat([m.flatten() for m in means])
        self.latent_stats = {"latent_shift": z.mean().item(), "latent_scale": 1.0 / z.std().item()}
        self.module().load_state_dict(saved)

    def metadata(self) -> dict:
        if self.head_only:  # the decoder's record stays as its own training left it
            kept = ("decoder_steps", "generated", "circled", "degrade", "object_weight", "frame_stack_only")
            return {**self.latent_stats, "encoder_steps": self.encoder_steps, "shape_head_steps": self.step,
                    **{k: self.frozen_record[k] for k in kept if k in self.frozen_record}}
        extra = {"decoder_steps": self.step, "encoder_steps": self.encoder_steps} if self.decoder_only else {}
        if self.degrade:
            extra["degrade"] = self.degrade
        if self.generated:
            extra["generated"] = self.generated
        if self.circled:
            extra["circled"] = self.circled
        if self.args.object_weight:
            extra["object_weight"] = self.args.object_weight
        if self.frame_stack_only:
            extra["frame_stack_only"] = True
        return {**self.latent_stats, **extra}


def latent_shape_targets(spec, frames: range, *, fps: int, width: int, height: int, cfg) -> torch.Tensor:
    """The shape channels (S, T_lat, h, w) of a clip's frames ``frames`` (1 + 4k of them) for a VAE with
    ``cfg.shape_channels``: SHAPE_SCALE times each latent pixel's per-shape coverage, averaged over the frames
    the latent encodes (the first latent holds the first frame alone) and the pixels it covers."""
    cover = torch.from_numpy(shape_coverage(spec, frames, fps=fps, width=width, height=height))  # (T, S, H, W)
    tf = cfg.temporal_factor
    per_latent = torch.stack([cover[0]] + [cover[1 + tf * k: 1 + tf * (k + 1)].mean(0)
                                           for k in range((len(cover) - 1) // tf)])
    return SHAPE_SCALE * F.avg_pool2d(per_latent, cfg.spatial_factor).transpose(0, 1)


def blur_latents(z: torch.Tensor) -> torch.Tensor:
    """Each latent frame of ``z`` (B, C, T, h, w) blurred by the 3x3 binomial kernel, edges replicated."""
    b, c, t, h, w = z.shape
    kernel = torch.tensor([1.0, 2.0, 1.0], device=z.device, dtype=z.dtype)
    kernel = (kernel[:, None] * kernel[None]) / 16
    frames = z.transpose(1, 2).reshape(b * t, c, h, w)
    frames = F.conv2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)
    return frames.reshape(b, t, c, h, w).transpose(1, 2)


def all_circles(spec):
    """The world ``spec`` with every object drawn as a circle: what the DiT of the demo model makes of any shape."""
    return dataclasses.replace(spec, objects=tuple(dataclasses.replace(o, shape="circle") for o in spec.objects))


# ------------------------------------------------------------------------------------------ text encoder
# Each world of a text batch comes with this many copies in all that differ in shapes alone (see shape_variants).
# Off by default, as the shipped text encoder was trained. From it, 8,000 steps with groups of 4 taught it shapes
# (its image tower picks the right shape among four for 97% of frames, against 30%; the first ~2,500 steps stay at
# chance), and a DiT trained on that encoder hears shape words several times more; it is not shipped yet, and
# from scratch the recipe is unmeasured (ops/train/EXPERIMENTS.md, "Every shape comes out round").
SHAPE_VARIANTS = 1


def shape_variants(spec, rng: random.Random, count: int) -> list:
    """Up to ``count`` copies of the world ``spec`` with other object shapes and nothing else changed, each with
    a caption of its own: one object's shape replaced, or two objects' shapes exchanged.

    Why: with in-batch negatives drawn at random, almost every other caption of a batch names another colour, and
    colours alone pick the right caption; a text encoder trained so (the shipped one) embedded
    "a red square" and "a red circle" alike (pooled cosine 0.994), and a DiT conditioned on it drew every shape
    as a blob. A variant is a negative that only the shape word tells apart. ``spec`` itself is not returned.
    """
    seen = {caption(spec)}
    variants = []
    objects = list(spec.objects)
    for _ in range(8 * count):
        if len(variants) >= count:
            break
        changed = list(objects)
        if len({o.shape for o in objects}) > 1 and rng.random() < 0.3:
            i, j = rng.sample(range(len(objects)), 2)
            changed[i] = dataclasses.replace(objects[i], shape=objects[j].shape)
            changed[j] = dataclasses.replace(objects[j], shape=objects[i].shape)
        else:
            i = rng.randrange(len(objects))
            others = [shape for shape in SHAPES if shape != objects[i].shape]
            changed[i] = dataclasses.replace(objects[i], shape=rng.choice(others))
        variant = dataclasses.replace(spec, objects=tuple(changed))
        text = caption(variant)
        if text not in seen:
            seen.add(text)
            variants.append(variant)
    return variants


class TextTrainer(Trainer):
    part = "text"

    def __init__(self, args, model: VideoModel):
        super().__init__(args, model, model.text.parameters(), rng_seed=args.seed + 1)
        from open_clip.loss import ClipLoss

        self.clip_loss = ClipLoss()
        size = model.text.clip.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size

    def metadata(self) -> dict:
        return {"shape_variants": self.args.shape_variants}

    def loss(self):
        prompts, images = [], []
        group = self.args.shape_variants
        while len(prompts) < self.args.batch:
            spec = sample_world(self.rng.randrange(EVAL_SEED_BASE))
            fps = 24
            frame = self.rng.randrange(0, 60 * fps)
            # The world and, with --shape-variants, copies of it that differ in shapes alone, all at one
            # frame: their captions differ in a shape word only, so the contrastive loss can no longer be met
            # by colours alone (see shape_variants).
            for variant in [spec, *shape_variants(spec, self.rng, group - 1)][:self.args.batch - len(prompts)]:
                images.append(to_pixels(render_frames(variant, [frame], fps=fps, width=self.image_size,
                                                      height=self.image_size))[:, 0])
                prompts.append(caption(variant))
        tokens, images = self.to_device(self.model.text.tokenize(prompts), torch.stack(images))
        img, txt, scale = self.model.text.contrastive_logits(tokens, images)
        loss = self.clip_loss(img.float(), txt.float(), scale.float())
        with torch.no_grad():
            acc = ((img @ txt.T).argmax(1) == torch.arange(len(img), device=img.device)).float().mean()
        return loss, {"acc": acc.item()}


# ----------------------------------------------------------------------------------------------- the DiT
def _stride(rng: random.Random, max_stride: float, contiguous: float) -> int:
    """1 with probability ``contiguous``, else log-uniform in [1, max_stride]."""
    if max_stride <= 1 or rng.random() < contiguous:
        return 1
    return max(1, int(round(math.exp(rng.uniform(0.0, math.log(max_stride))))))


def _evenly_spaced(rng: random.Random, num_latents: int, count: int, stride: int) -> list[int]:
    """``count`` frames ``stride`` apart from a random start that keeps them inside the video (fewer at its end)."""
    start = rng.randint(0, max(0, num_latents - 1 - stride * (count - 1)))
    return sorted({min(num_latents - 1, start + stride * k) for k in range(count)})


def _far_context(rng: random.Random, num_latents: int, taken: set[int], count: int) -> list[int]:
    """Up to ``count`` long-range observed frames from anywhere in the video, as the planner adds keyframes."""
    pool = [f for f in range(num_latents) if f not in taken]
    return rng.sample(pool, min(count, len(pool)))


def sample_window(rng: random.Random, num_latents: int, max_window: int) -> tuple[list[int], list[int]]:
    """An FDM-style training window: (observed, latent) latent-frame indices of one video.

    The mix mirrors the shapes of the planner's tasks, so the model practises exactly what a render asks of it:

    * keyframes (20%): frames spread over the video at a log-uniform stride, nothing observed;
    * infill (30%): a run of latents between two observed frames at the same stride (usually 1, the last
      level of every hierarchy), plus a few far-away context frames;
    * continuation (30%): a run of observed frames followed (or, for backward extension, preceded) by a run of
      latents, as in the autoregressive and hierarchical schemes, plus far-away context;
    * scattered (20%): log-uniform frames with the ends and a few random frames observed, which covers the
      level-parallel scheme's many-observed, few-latent tasks.

    Consecutive latent frames at stride 1 matter most: every seam in a rendered video sits between two of them.
    """
    if num_latents < 2:
        return [], [0]
    kind = rng.random()
    if kind < 0.2:  # keyframes
        n = min(rng.randint(2, max_window), num_latents)
        stride = _stride(rng, (num_latents - 1) / max(n - 1, 1), contiguous=0.1)
        return [], _evenly_spaced(rng, num_latents, n, stride)
    if kind < 0.5:  # infill between two observed neighbours
        n = rng.randint(1, max(1, min(max_window - 2, num_latents - 2)))
        stride = _stride(rng, (num_latents - 1) / (n + 1), contiguous=0.6)
        frames = _evenly_spaced(rng, num_latents, n + 2, stride)
        if len(frames) < 3:
            return frames[:1], frames[1:]
        observed, latent = [frames[0], frames[-1]], frames[1:-1]
        room = max_window - len(frames)
        observed += _far_context(rng, num_latents, set(frames), rng.randint(0, min(3, room)))
        return sorted(observed), latent
    if kind < 0.8:  # continuation: observed run, then latent run
        n_obs = rng.randint(1, max(1, max_window // 2))
        n_lat = rng.randint(1, max(1, max_window - n_obs))
        stride = _stride(rng, (num_latents - 1) / max(n_obs + n_lat - 1, 1), contiguous=0.7)
        frames = _evenly_spaced(rng, num_latents, n_obs + n_lat, stride)
        if len(frames) < 2:
            return [], frames
        n_obs = min(n_obs, len(frames) - 1)
        backward = rng.random() < 0.2
        observed, latent = (frames[-n_obs:], frames[:-n_obs]) if backward else (frames[:n_obs], frames[n_obs:])
        room = max_window - len(frames)
        observed += _far_context(rng, num_latents, set(frames), rng.randint(0, min(4, room)))
        return sorted(observed), latent
    # scattered
    n = rng.randint(3, max_window)
    stride = _stride(rng, max(1.0, (num_latents - 1) / (n - 1)), contiguous=0.2)
    frames = _evenly_spaced(rng, num_latents, n, stride)
    if len(frames) < 3:
        return [], frames
    chosen = [frames[0], frames[-1]] + rng.sample(frames[1:-1], rng.randint(0, len(frames) - 3))
    latent = [f for f in frames if f not in chosen]
    return sorted(chosen), latent


# Off by default: the shipped DiT trained on a plain mean. A weight of 4 gives objects about half of a window's
# loss instead of a tenth; from the 16,000-step demo DiT, 600 steps with it cut the x0 error on object pixels at
# noise 0.6 / 0.9 to 0.094 / 0.295 (0.111 / 0.333 without), but at 26,000 steps the backdrop's error at noise 0.9
# had doubled and 60-s renders had worse seams (ops/train/EXPERIMENTS.md, "Weighing the object pixels").
OBJECT_WEIGHT = 0.0


def object_loss_weight(spec, times: list[int], fps: int, width: int, height: int, spatial_factor: int,
                       extra: float) -> torch.Tensor:
    """Loss weight of every latent pixel of latent frames ``times`` (F, h, w): 1 + ``extra`` where an object
    covers any pixel of the latent pixel in any of the video frames it encodes, 1 elsewhere.

    Objects cover a few percent of a frame and the backdrop the rest; under a plain mean the flat backdrop,
    learned early, keeps most of the gradient while the objects, which the prompt is about, stay blobs.
    """
    return weight_from_object_mask(latent_object_mask(spec, times, fps, width, height, spatial_factor), extra)


def weight_from_object_mask(mask, extra: float) -> torch.Tensor:
    """The weights of :func:`object_loss_weight` from a latent object mask (0/1, numpy or torch, any device)."""
    return 1.0 + extra * torch.as_tensor(mask).float()


@dataclass
class WindowDraft:
    """One training window as drawn on the CPU, before its frames are encoded: which latent frames it holds and
    which of them are observed, its caption and object loss weight, and where its latents come from: rows
    ``rows`` of its batch's pixel groups of frame size ``size``, or, from a latent pool, ``latents`` themselves
    (normalised (n, C, h, w))."""
    times: list[int]
    observed: list[int]
    caption: str
    size: tuple[int, int] | None = None  # (height, width) of the frames in the batch's pixel groups
    rows: int = 0  # the first of its len(times) rows there
    latents: torch.Tensor | None = None
    weight: torch.Tensor | None = None


@dataclass
class DraftBatch:
    """A step's windows and their video frames: one uint8 tensor (n, 4, H, W, 3) of pixel groups per frame size,
    so that a batch crosses from a data loader worker as a few large tensors and encodes in one call per size."""
    windows: list[WindowDraft]
    pixels: dict[tuple[int, int], torch.Tensor]

    def pin_memory(self) -> "DraftBatch":  # the data loader's pinning thread calls this
        return DraftBatch(self.windows, {size: groups.pin_memory() for size, groups in self.pixels.items()})


def draw_world_windows(rng: random.Random, windows: int, images: int, max_window: int, spatial_factor: int,
                       object_weight: float) -> DraftBatch:
    """A batch of ``windows`` video windows of fresh worlds, of one frame size, then ``images`` single images:
    the whole CPU side of a DiT step on clips drawn on the fly (the world drawn with numpy), so that it can run
    ahead in data loader workers while the GPU trains.

    The single images follow the video windows: a 16-frame window costs as much as 16 images but shows one world
    where they show 16, and a frame's layout (which shapes, which colours, how many) is what the prompt decides.
    """
    video_size = rng.choice(VIDEO_SIZES)
    drafts, groups = [], {}
    for b in range(windows + images):
        spec = sample_world(rng.randrange(EVAL_SEED_BASE))
        if b >= windows or (b == 0 and rng.random() < 0.5):  # single images as one-frame videos
            (w, h), fps, observed, latent = rng.choice(IMAGE_SIZES), 24, [], [0]
        else:
            (w, h), fps, seconds = video_size, rng.choice(CLIP_FPS), rng.choice(CLIP_SECONDS)
            observed, latent = sample_window(rng, num_latents(seconds, fps), max_window)
        times = sorted(observed + latent)
        weight = (object_loss_weight(spec, times, fps, w, h, spatial_factor, object_weight)
                  if object_weight else None)
        same_size = groups.setdefault((h, w), [])
        drafts.append(WindowDraft(times, observed, caption(spec), size=(h, w),
                                  rows=sum(len(g) for g in same_size), weight=weight))
        same_size.append(pixel_groups(spec, times, fps, w, h))
    return DraftBatch(drafts, {size: torch.from_numpy(np.concatenate(parts)) for size, parts in groups.items()})


class WorldWindowStream(torch.utils.data.IterableDataset):
    """Endless :class:`DraftBatch` es of :func:`draw_world_windows`, one random stream per data loader worker."""

    def __init__(self, seed: str, **draw):
        self.seed, self.draw = seed, draw

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}/worker {worker.id if worker else 0}")
        while True:
            yield draw_world_windows(rng, **self.draw)


TEXT_CACHE_LIMIT = 20_000  # captions whose text encoding a DiT run keeps (a pool's few hundred always fit)


class DiTTrainer(Trainer):
    part = "dit"

    def __init__(self, args, model: VideoModel):
        self.head_only = bool(getattr(args, "head_only", False))
        if self.head_only:
            if model.dit.refine is None:
                raise ValueError("--head-only: this run's DiT has no refine head (dit.refine is 0 in its model.json)")
            # The blocks stay as warm-started: no gradients flow through them, so a step costs about a DiT
            # forward pass plus the head's.
            model.dit.requires_grad_(False)
            model.dit.refine.requires_grad_(True)
        params = model.dit.refine.parameters() if self.head_only else model.dit.parameters()
        super().__init__(args, model, params, rng_seed=args.seed + 2)
        self.model.vae.eval().requires_grad_(False)
        self.model.text.eval().requires_grad_(False)
        self.text_cache: dict[str, tuple] = {}
        # Training noise levels: the sampler's shift by default; ``--time-shift`` overrides it (a smaller shift
        # puts more of the steps at low noise, where the objects' shapes are drawn).
        self.shift = model.cfg.flow.shift if args.time_shift is None else args.time_shift
        # Windows come from the pre-encoded clips of a latent pool when one is given (see model.latent_pool),
        # else from clips drawn and encoded on the fly.
        self.pool = LatentPool.open(args.latents, model.vae) if args.latents else None
        self.loader = None  # the data loader's batch iterator, started at the first step (--loader-workers)
        if self.pool is not None:
            kind = "stills" if self.pool.stills else "clips"
            print(f"[dit] windows from {len(self.pool)} pool {kind} at {args.latents} "
                  f"(frame sizes {', '.join(f'{w}x{h}' for w, h in self.pool.sizes)})", flush=True)
            if self.device.type == "cuda":  # a pool of a few thousand clips is a few GB: hold it where it is used
                held = self.pool.preload(self.device)
                print(f"[dit] pool held on {self.device}: {held / 2 ** 30:.2f} GiB", flush=True)

    def adapt_warm_start(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.model.cfg
        return VideoDiT.widened_state(state, cfg.vae.latent_channels, cfg.dit.patch)

    def metadata(self) -> dict:
        meta = {"head_only": True} if self.head_only else {}
        if self.args.images:
            meta["images"] = self.args.images
        if self.shift != self.model.cfg.flow.shift:
            meta["time_shift"] = self.shift
        return meta

    def encode_drafts(self, batch: DraftBatch) -> list[torch.Tensor]:
        """The normalised latents of every window: pool latents as they are, drawn frames encoded in one encoder
        call per frame size, in fp32 even under autocast (the latent space is the fp32 encoder's, as in a
        latent pool or a render)."""
        with torch.autocast(self.device.type, enabled=False):
            encoded = {size: self.normalise(encode_pixel_groups(self.model.vae, groups))
                       for size, groups in batch.pixels.items()}
        return [self.to_device(d.latents) if d.latents is not None else
                encoded[d.size][d.rows:d.rows + len(d.times)] for d in batch.windows]

    def normalise(self, means: torch.Tensor) -> torch.Tensor:
        return self.model.cfg.normalise_latents(means)

    @torch.no_grad()
    def text(self, prompts: list[str]):
        missing = [p for p in dict.fromkeys(prompts) if p not in self.text_cache]  # each caption once
        if missing:
            # Worlds drawn on the fly rarely repeat a caption: a bounded cache keeps a long GPU run's memory flat.
            # Clearing it drops this batch's cached captions too, so they are encoded again with the rest.
            if len(self.text_cache) + len(missing) > TEXT_CACHE_LIMIT:
                self.text_cache.clear()
                missing = list(dict.fromkeys(prompts))
            emb = self.model.text.encode(missing)
            for i, p in enumerate(missing):
                self.text_cache[p] = (emb.tokens[i], emb.mask[i], emb.pooled[i])
        rows = [self.text_cache[p] for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])

    def draw(self) -> DraftBatch:
        """This step's windows: from the latent pool, from the data loader workers (``--loader-workers``), or
        drawn here."""
        cfg = self.model.cfg
        if self.pool is None:
            draw = dict(windows=self.args.batch, images=self.args.images, max_window=cfg.dit.max_window,
                        spatial_factor=cfg.vae.spatial_factor, object_weight=self.args.object_weight)
            if not self.args.loader_workers:
                return draw_world_windows(self.rng, **draw)
            if self.loader is None:
                # The workers' streams are seeded by the run's seed and the step they start at, so a resumed run
                # draws new worlds; torch gives each worker one thread, so they do not crowd the main process.
                stream = WorldWindowStream(f"{self.args.seed}/step {self.step}", **draw)
                self.loader = iter(torch.utils.data.DataLoader(
                    stream, batch_size=None, num_workers=self.args.loader_workers, prefetch_factor=2,
                    persistent_workers=True, pin_memory=self.device.type == "cuda"))
            return next(self.loader)
        video_size = self.rng.choice(self.pool.sizes)
        picks = []
        # The batch's first window is an image half the time, except from a pool of stills: every window is one.
        images = self.args.images + (not self.pool.stills and self.rng.random() < 0.5)
        for _ in range(self.args.batch + self.args.images - images):
            attrs, clip = self.pool.draw(self.rng, video_size)
            observed, latent = sample_window(self.rng, len(clip), cfg.dit.max_window)
            picks.append((attrs, sorted(observed + latent), observed))
        drafts = []
        if picks:  # (at batch 1, this step's one window may be an image)
            weigh = bool(self.args.object_weight)  # object_loss_weight's weights, from the pool's masks
            latents, masks = self.pool.gather([(attrs, times) for attrs, times, _ in picks], cfg.vae.spatial_factor,
                                              weigh)
            lengths = [len(times) for _, times, _ in picks]
            latents = self.normalise(latents.float()).split(lengths)
            weights = (weight_from_object_mask(masks, self.args.object_weight).split(lengths) if weigh
                       else [None] * len(picks))
            drafts = [WindowDraft(times, observed, attrs["caption"], latents=x, weight=w)
                      for (attrs, times, observed), x, w in zip(picks, latents, weights)]
        fresh = draw_world_windows(self.rng, 0, images, cfg.dit.max_window, cfg.vae.spatial_factor,
                                   self.args.object_weight)  # single images of fresh worlds
        return DraftBatch(drafts + fresh.windows, fresh.pixels)

    def loss(self):
        batch = self.draw()
        latents = self.encode_drafts(batch)
        # Windows of one latent frame size are noised and scored together, so a step launches a few GPU kernels
        # per frame size rather than dozens per window (at batch 256 on a GPU, kernel launches and the waits of
        # small copies took most of a step); they are ordered by size, the order being of no other consequence.
        counts = collections.Counter(tuple(x.shape[1:]) for x in latents)  # windows per size, in order seen
        sizes = list(counts)
        order = sorted(range(len(latents)), key=lambda i: sizes.index(tuple(latents[i].shape[1:])))
        drafts, latents = [batch.windows[i] for i in order], [latents[i] for i in order]
        lengths = [len(d.times) for d in drafts]
        # Every frame's flags, noise level, latent-frame index and window, put together here and moved in one
        # copy each.
        observed = torch.tensor([t in d.observed for d in drafts for t in d.times])
        level = sample_training_times(len(drafts), self.shift).repeat_interleave(torch.tensor(lengths))
        level = level.masked_fill(observed, 0.0)
        times = torch.tensor([t for d in drafts for t in d.times])
        window = torch.arange(len(drafts)).repeat_interleave(torch.tensor(lengths))
        observed, level, times, window = self.to_device(observed, level, times, window)
        starts = np.cumsum([0] + lengths).tolist()  # each window's first frame
        windows, groups, first = [], [], 0
        for size in sizes:
            group = range(first, first + counts[size])
            first = group.stop
            rows = slice(starts[group.start], starts[group.stop])
            x0 = torch.cat(latents[group.start:group.stop])
            local = window[rows] - group.start  # each frame's window within the group
            noise = windows_noise(local, len(group), size, self.model.cfg.flow.noise_correlation)
            xt = torch.where(observed[rows, None, None, None], x0, noisy(x0, noise, level[rows]))
            for i in group:
                frames = slice(starts[i], starts[i + 1])
                windows.append(FrameInputs(xt[frames.start - rows.start:frames.stop - rows.start], observed[frames],
                                           times[frames], level[frames]))
            weight = None
            if any(drafts[i].weight is not None for i in group):  # windows without one weigh every pixel alike
                weight = torch.cat([self.to_device(drafts[i].weight) if drafts[i].weight is not None else
                                    x0.new_ones(lengths[i], *size[1:]) for i in group])
            groups.append((group, rows, local, x0, noise, weight))
        prompts = ["" if self.rng.random() < self.model.cfg.flow.text_dropout else d.caption for d in drafts]
        tokens, mask, pooled = self.text(prompts)
        outs = self.model.dit(windows, tokens, mask, pooled)
        losses = [window_flow_losses(torch.cat(outs[group.start:group.stop]), x0, noise, ~observed[rows], local,
                                     len(group), weight)
                  for group, rows, local, x0, noise, weight in groups]
        return torch.cat(losses).mean(), {}


# ------------------------------------------------------------------------------------------------ export
def load_part(model: VideoModel, run: Path, part: str) -> dict:
    paths = RunPaths(run, part)
    if not paths.weights.is_file():
        raise FileNotFoundError(f"{part}: no trained weights at {paths.weights}; run `longshot train {part} "
                                f"--run {run}` first")
    getattr(model, part).load_state_dict(load_file(str(paths.weights)))
    return json.loads(paths.meta.read_text()) if paths.meta.is_file() else {}


def warm_start_state(source: Path, part: str) -> dict[str, torch.Tensor]:
    """``part``'s weights in a run directory (``<run>/<part>/<part>.safetensors``) or a checkpoint directory."""
    run_weights = RunPaths(source, part).weights
    if run_weights.is_file():
        return load_file(str(run_weights))
    checkpoint = source / WEIGHTS_FILE
    if checkpoint.is_file():
        prefix = f"{part}."
        return {k[len(prefix):]: v for k, v in load_file(str(checkpoint)).items() if k.startswith(prefix)}
    raise FileNotFoundError(f"--init-from: neither {run_weights} nor {checkpoint} exists")


def source_latent_stats(source: Path) -> dict:
    """The latent normalisation (and the encoder's steps) of a run directory or checkpoint directory."""
    meta_path = RunPaths(source, "vae").meta
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    config = json.loads((source / "config.json").read_text())
    vae = config.get("training", {}).get("vae", {})
    return {"latent_shift": config["model"]["latent_shift"], "latent_scale": config["model"]["latent_scale"],
            "encoder_steps": vae.get("encoder_steps", vae.get("step"))}


def run_config(preset: str, run: Path) -> ModelConfig:
    """The architecture a run directory trains: recorded in ``<run>/model.json`` by its first command.

    Every later command on the run (resume, the other parts, export) reads it back, so a run keeps training
    the architecture it started with even after the preset it came from changes.
    """
    path = run / "model.json"
    if path.is_file():
        cfg = ModelConfig.from_dict(json.loads(path.read_text()))
        if cfg.preset != preset:
            raise ValueError(f"preset: run {run} trains preset {cfg.preset!r} (see {path}), got {preset!r}")
        return cfg
    cfg = get_preset(preset)
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return cfg


def build_model(preset: str, run: Path, parts: tuple[str, ...]) -> tuple[VideoModel, dict]:
    cfg = run_config(preset, run)
    vae_meta: dict = {}
    if "vae" in parts and RunPaths(run, "vae").meta.is_file():
        vae_meta = json.loads(RunPaths(run, "vae").meta.read_text())
        if "latent_scale" in vae_meta:
            cfg = cfg.replace(latent_shift=vae_meta["latent_shift"], latent_scale=vae_meta["latent_scale"])
    torch.manual_seed(0)
    with _quiet_open_clip():
        model = VideoModel(cfg)
    metas = {}
    for part in parts:
        metas[part] = load_part(model, run, part)
    return model, metas


def run_sampling(run: Path, updates: dict | None = None) -> dict:
    """The render defaults a run's export records (``<run>/sampling.json``: unpacked from a checkpoint, or set
    by ``export --sampling``), with ``updates`` applied and kept for the next export."""
    path = run / SAMPLING_FILE
    sampling = sampling_defaults(json.loads(path.read_text())) if path.is_file() else {}
    if updates:
        sampling.update(sampling_defaults(updates))
        path.write_text(json.dumps(sampling, indent=2) + "\n")
    return sampling


def export(run: Path, out: Path, preset: str, sampling: dict | None = None) -> Path:
    model, metas = build_model(preset, run, PARTS)
    gen = Generator(model, device="cpu", sampling=run_sampling(run, sampling))
    extra = {"training": {part: {k: v for k, v in meta.items() if k != "part"} for part, meta in metas.items()}}
    gen.save(out, dtype=torch.float16, extra=extra)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"exported {out} ({size / 1e6:.1f} MB) {gen.identity['checkpoint_hash']}")
    return out


def unpack(checkpoint: Path, run: Path) -> Path:
    """A run directory made from a checkpoint: its architecture (``model.json``) and every part's weights (fp32)
    and training record, so that any part can train on from a shipped model while the others stay as they are.

    Run directories are where training keeps its state and are not shipped; without this, going on from the
    shipped model would need the very run that made it. The part being trained then warm-starts from the
    checkpoint (``--init-from``), which starts a fresh optimiser and learning-rate schedule on its weights.
    """
    Generator.load(checkpoint)  # a readable, complete checkpoint, or a CheckpointError naming what is wrong
    taken = [RunPaths(run, part).weights for part in PARTS if RunPaths(run, part).weights.is_file()]
    if taken or (run / "model.json").is_file():
        raise FileExistsError(f"--run: {run} already holds a run ({(taken or [run / 'model.json'])[0]}); "
                              f"unpack into a new directory")
    meta = json.loads((checkpoint / CONFIG_FILE).read_text())
    run.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        paths = RunPaths(run, part)
        paths.dir.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({k: v.float() if v.is_floating_point() else v
                                 for k, v in warm_start_state(checkpoint, part).items()}, paths.weights)
        record = {**meta.get("training", {}).get(part, {}), "part": part, "unpacked_from": str(checkpoint)}
        if part == "vae":  # the latent normalisation the DiT was trained in
            stats = source_latent_stats(checkpoint)
            record.update(latent_shift=stats["latent_shift"], latent_scale=stats["latent_scale"])
        paths.meta.write_text(json.dumps(record, indent=2))
    (run / "model.json").write_text(json.dumps(meta["model"], indent=2) + "\n")
    if meta.get(SAMPLING_KEY):  # the checkpoint's render defaults, so that re-exporting the run keeps them
        (run / SAMPLING_FILE).write_text(json.dumps(meta[SAMPLING_KEY], indent=2) + "\n")
    print(f"unpacked {checkpoint} into {run}: {', '.join(PARTS)}")
    return run


# -------------------------------------------------------------------------------------------------- CLI
def parse_sampling(items: list[str]) -> dict[str, float]:
    """``--sampling SETTING=VALUE`` options as a mapping; raises ValueError naming a malformed one."""
    sampling = {}
    for item in items:
        key, sep, text = item.partition("=")
        try:
            value = json.loads(text) if sep and key else None  # a whole number stays an int (refine_steps)
        except ValueError:
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"--sampling={item!r}: must be SETTING=NUMBER, e.g. refine=0.9")
        sampling[key] = value
    return sampling


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longshot train", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=PARTS + ("latents", "export", "unpack"))
    parser.add_argument("--preset", default="demo", choices=preset_names())
    parser.add_argument("--run", default="runs/demo", help="run directory holding every part's state")
    parser.add_argument("--out", default=None, help="export: checkpoint directory to write")
    parser.add_argument("--sampling", action="append", default=[], metavar="SETTING=VALUE",
                        help="export: a render default of the exported model, taken by a job that leaves the "
                             "setting unset (infill_guidance, extension_guidance_floor, refine, refine_steps), "
                             "e.g. refine=0.9; repeatable, and kept in the run's sampling.json for later exports")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=None, help="EMA decay (0 disables)")
    parser.add_argument("--kl", type=float, default=1e-6, help="VAE KL weight")
    parser.add_argument("--edge", type=float, default=1.0,
                        help="VAE weight of the edge and frame-to-frame difference loss")
    parser.add_argument("--seam", type=float, default=0.0,
                        help="VAE weight of the frame-to-frame difference loss across latent-frame boundaries")
    parser.add_argument("--generated", type=float, default=0.0, metavar="P",
                        help="vae --decoder-only: share of batches decoded from the run's DiT's clean-latent "
                             "estimates of the clips instead of the encoder's latents (needs the run's text and dit)")
    parser.add_argument("--circled", type=float, default=0.0, metavar="P",
                        help="vae --decoder-only with a decoder that reads the prompt or shape channels: share of "
                             "batches decoded from the latents of the same clips with every object a circle, to "
                             "the clips themselves (the caption or the shape channels alone then tell the shape)")
    parser.add_argument("--degrade", type=float, default=0.0, metavar="P",
                        help="vae --decoder-only: share of clips whose latents are blurred and noised (and shape "
                             "channels jittered) before decoding, as a DiT's latents are")
    parser.add_argument("--decoder-only", action="store_true",
                        help="vae: train the decoder alone on the frozen encoder (the latent space stays fixed)")
    parser.add_argument("--frame-stack-only", action="store_true",
                        help="vae --decoder-only: train only the decoder's per-frame upsampling stack; the "
                             "layers that mix time keep their weights")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="a fresh run starts from the tensors of the same name and shape in this run or "
                             "checkpoint directory; unpack: the checkpoint to unpack (default: the shipped one)")
    parser.add_argument("--latents", nargs="?", const="", default=None, metavar="POOL",
                        help="dit: draw training windows from a latent pool (default <run>/latents.zarr) built "
                             "by `longshot train latents`, instead of drawing and encoding clips every step")
    parser.add_argument("--clips", type=int, default=400, help="latents: clips in the pool (more extend it)")
    parser.add_argument("--rebuild", action="store_true",
                        help="latents: replace a pool built by another encoder or seed")
    parser.add_argument("--stills", action="store_true",
                        help=f"latents: a pool of stills, each clip one world's first frame at the single images' "
                             f"sizes (default <run>/{STILLS_NAME}); `dit --latents` on it trains on single frames")
    parser.add_argument("--object-weight", type=float, default=OBJECT_WEIGHT, metavar="A",
                        help="dit: extra loss weight on latent pixels that objects cover; vae: on the pixels "
                             "objects cover and the 2 around them (1 + A there, 1 elsewhere; "
                             f"default {OBJECT_WEIGHT:g}: a plain mean)")
    parser.add_argument("--time-shift", type=float, default=None, metavar="S",
                        help="dit: shift of the logit-normal training noise levels (default: the model's flow.shift)")
    parser.add_argument("--images", type=int, default=0, metavar="N",
                        help="dit: N single images of fresh worlds in every batch besides the --batch windows "
                             "(each a one-frame window with the weight of a video window in the loss)")
    parser.add_argument("--shape-variants", type=int, default=SHAPE_VARIANTS, metavar="G",
                        help="text: each world in a batch comes with G-1 copies that differ in object shapes alone, "
                             f"as negatives only the shape word tells apart (default {SHAPE_VARIANTS}; 1: none)")
    parser.add_argument("--head-only", action="store_true",
                        help="dit: train the refine head alone (dit.refine > 0 in the run's model.json) on the "
                             "frozen, warm-started DiT; vae: train the shape head alone (vae.shape_channels > 0) "
                             "on the frozen VAE, against the world's shape coverage")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="dit: worker processes that draw the clips of coming steps while this one trains "
                             "(0: drawn between steps; the world is drawn on the CPU, a GPU step waits for it); "
                             "latents: worker processes that draw the pool's clips while this one encodes them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto",
                        help="where to train: auto (a CUDA device when there is one, else the CPU), cpu, cuda, "
                             "cuda:N")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop (and save) after this many minutes of training, even before --steps")
    parser.add_argument("--anneal-in-time", action="store_true",
                        help="with --minutes: the cosine learning rate runs over the time budget where that ends "
                             "before --steps, so the run ends annealed however fast the machine is")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    if args.part == "export":
        export(run, Path(args.out or "model/checkpoints/demo"), args.preset, parse_sampling(args.sampling))
        return 0
    if args.part == "unpack":
        source = Path(args.init_from) if args.init_from else Generator.default_checkpoint()
        if source is None:
            raise FileNotFoundError("unpack: no --init-from given and this installation has no shipped checkpoint")
        unpack(source, run)
        return 0
    if args.stills and args.part != "latents":
        raise ValueError(f"--stills: builds a pool (`longshot train latents --stills`); train on it with "
                         f"`longshot train {args.part} --latents {run / STILLS_NAME}`")
    if args.latents == "" or (args.part == "latents" and args.latents is None):
        args.latents = str(run / (STILLS_NAME if args.stills else POOL_NAME))
    if args.shape_variants < 1:
        raise ValueError(f"--shape-variants: {args.shape_variants} must be at least 1 (1: no variants)")
    if args.images < 0:
        raise ValueError(f"--images: {args.images} must be 0 or more single images per batch")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise ValueError(f"--minutes: {args.minutes!r} must be a positive number of minutes")
    if args.loader_workers < 0:
        raise ValueError(f"--loader-workers: {args.loader_workers} must be 0 or more worker processes")
    if args.loader_workers and args.latents and args.part == "dit":
        raise ValueError("--loader-workers: windows from a latent pool (--latents) are read, not drawn; "
                         "drop one of the two")
    if args.anneal_in_time and args.minutes is None:
        raise ValueError("--anneal-in-time: needs --minutes, the time budget to anneal over")
    device = resolve_device(args.device)
    if args.part == "latents":
        model, _ = build_model(args.preset, run, ("vae",))
        model.to(device)
        build_pool(model.vae, args.latents, args.clips, sizes=IMAGE_SIZES if args.stills else VIDEO_SIZES,
                   seed=args.seed, stills=args.stills, rebuild=args.rebuild, workers=args.loader_workers)
        return 0
    defaults = {"vae": (3000, 4, 1e-3, 0.0), "text": (1500, 64, 1e-3, 0.0), "dit": (4000, 8, 3e-4, 0.995)}
    steps, batch, lr, ema = defaults[args.part]
    args.steps = args.steps or steps
    args.batch = args.batch or batch
    args.lr = args.lr or lr
    args.ema = ema if args.ema is None else args.ema
    torch.manual_seed(args.seed)
    if args.part == "dit":
        model, _ = build_model(args.preset, run, ("vae", "text"))
        trainer: Trainer = DiTTrainer(args, model.to(device))
    elif args.part == "vae" and args.decoder_only and (args.generated or run_config(args.preset, run).vae.caption_width):
        # The run's own DiT makes the latents; its text encoder reads the captions.
        model, _ = build_model(args.preset, run, ("text", "dit") if args.generated else ("text",))
        trainer = VAETrainer(args, model.to(device))
    else:
        with _quiet_open_clip():
            model = VideoModel(run_config(args.preset, run)).to(device)
        trainer = VAETrainer(args, model) if args.part == "vae" else TextTrainer(args, model)
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
