"""The model facade the orchestrator uses: load a checkpoint, encode text, sample windows, encode, decode.

A checkpoint directory holds ``config.json`` (the :class:`ModelConfig`, naming its preset) and
``model.safetensors`` (weights of the VAE, text encoder and DiT, under the prefixes ``vae.``, ``text.`` and
``dit.``). Its content hash is recorded by the orchestrator in every job store, so a resumed render can prove
it uses the same weights. ``config.json`` may also hold ``sampling``: the render settings this model was
measured best with (for example its refinement level), which a job that leaves them unset takes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from model.config import ModelConfig, get_preset, preset_names
from model.dit import FrameInputs, VideoDiT
from model.flow import get_sampler, guided, noisy, time_schedule, video_noise
from model.text import TextEmbedding, TextEncoder
from model.vae import CausalVAE

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# The section of config.json with the model's own render defaults: names of job settings, each a number.
SAMPLING_KEY = "sampling"
SHIPPED_DIR = Path(__file__).parent / "checkpoints" / "demo"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        super().__init__(f"checkpoint {self.path!r}: {problem}")


@dataclass(frozen=True)
class Window:
    """Which latent frames a sampling call sees (observed) and generates (latent), at latent size h x w."""

    observed_times: tuple[int, ...]
    latent_times: tuple[int, ...]
    height: int
    width: int

    def __post_init__(self):
        obs, lat = tuple(int(t) for t in self.observed_times), tuple(int(t) for t in self.latent_times)
        object.__setattr__(self, "observed_times", obs)
        object.__setattr__(self, "latent_times", lat)
        if not lat:
            raise ValueError("window.latent_times: at least one latent frame is required")
        if len(set(obs)) != len(obs) or len(set(lat)) != len(lat):
            raise ValueError("window: frame times must not repeat")
        both = set(obs) & set(lat)
        if both:
            raise ValueError(f"window: frames {sorted(both)} are both observed and latent")
        if min(obs + lat) < 0:
            raise ValueError(f"window: frame times must be >= 0, got {min(obs + lat)}")

    @property
    def size(self) -> int:
        return len(self.observed_times) + len(self.latent_times)


class VideoModel(nn.Module):
    """The three trained parts together, so one state dict covers a checkpoint."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = CausalVAE(cfg.vae)
        with _quiet_open_clip():
            self.text = TextEncoder(cfg.text)
        self.dit = VideoDiT(cfg.dit, cfg.vae.latent_channels, self.text.width, self.text.embed_dim)
        if cfg.vae.caption_width and cfg.vae.caption_width != self.text.width:
            raise ValueError(f"vae.caption_width: {cfg.vae.caption_width} must equal the text encoder's token "
                             f"width ({self.text.width}), which the decoder attends to")

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in ("vae", "text", "dit")}


@contextlib.contextmanager
def _quiet_open_clip():
    # open_clip logs "No pretrained weights loaded" on the root logger for every randomly built model.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def checkpoint_hash(weights_path: Path, config: ModelConfig, sampling: dict | None = None) -> str:
    """Identity of a checkpoint: its weights file and the model configuration it is loaded with (the latent
    normalisation and the sampling prior live in the configuration and change the output as much as weights),
    and its render defaults where it has any (they change what a job that leaves them unset renders)."""
    digest = hashlib.sha256(file_hash(weights_path).encode())
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    if sampling:
        digest.update(json.dumps(sampling, sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()


def sampling_defaults(value: Any) -> dict[str, float]:
    """A checkpoint's ``sampling`` section checked for shape: setting names mapped to numbers. Which settings
    a job takes from it, and their limits, are the job spec's to check."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{SAMPLING_KEY}: must map setting names to numbers, got {type(value).__name__}")
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"{SAMPLING_KEY}.{key}: must be a number, got {number!r}")
    return dict(value)


def checkpoint_sampling(name_or_path: str | Path) -> dict[str, float]:
    """The render defaults (``config.json``'s ``sampling``) of what :meth:`Generator.from_name` loads for
    ``name_or_path``, read without the weights; a preset's random weights have none."""
    checkpoint = Generator.checkpoint_of(name_or_path)
    if checkpoint is None:
        return {}
    path = checkpoint.expanduser() / CONFIG_FILE
    try:
        return sampling_defaults(json.loads(path.read_text()).get(SAMPLING_KEY))
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(path.parent, f"{CONFIG_FILE} is not a valid model config ({err})") from err


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Generator:
    """Inference facade over a :class:`VideoModel`. See the module docstring for the checkpoint format."""

    def __init__(self, model: VideoModel, *, device=None, checkpoint_hash: str | None = None,
                 sampling: dict | None = None):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.config = model.cfg
        # Render defaults of this model (config.json's `sampling`), for the job settings a job leaves unset.
        self.sampling = sampling_defaults(sampling)
        # CPU: fp32. CUDA: bf16 autocast where the card supports it (weights stay fp32 for exactness of norms).
        self.dtype = (torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported()
                      else torch.float32)
        self.checkpoint_hash = checkpoint_hash or _state_hash(self.model)
        self._deepspeed_engine: Any = None  # set by enable_deepspeed, with the model.dit it wraps
        self._deepspeed_wraps: nn.Module | None = None
        self._dit_override: Callable | None = None
        self._text_cache: dict[str, TextEmbedding] = {}

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, *, device=None, seed: int = 0) -> "Generator":
        """A randomly initialised model of a preset (deterministic for the seed)."""
        cfg = get_preset(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VideoModel(cfg)
        return cls(model, device=device)

    @classmethod
    def load(cls, path: str | Path, *, device=None) -> "Generator":
        path = Path(path).expanduser()
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not path.is_dir():
            raise CheckpointError(path, "no such directory; train one with `longshot train vae|text|dit "
                                  "--preset demo`, or use a preset name such as 'tiny'")
        for required in (config_path, weights_path):
            if not required.is_file():
                raise CheckpointError(path, f"missing file {required.name!r}; a checkpoint directory needs "
                                      f"{CONFIG_FILE} and {WEIGHTS_FILE} (written by Generator.save or `longshot train`)")
        try:
            meta = json.loads(config_path.read_text())
            cfg = ModelConfig.from_dict(meta["model"])
            sampling = sampling_defaults(meta.get(SAMPLING_KEY))
        except (ValueError, KeyError, TypeError) as err:  # ValueError covers bad JSON and unknown config keys
            raise CheckpointError(path, f"{CONFIG_FILE} is not a valid model config ({err})") from err
        try:
            state = load_file(str(weights_path))
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise CheckpointError(path, f"{WEIGHTS_FILE} is corrupt or truncated ({err})") from err
        with _quiet_open_clip():
            model = VideoModel(cfg)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(path, f"weights do not match preset {cfg.preset!r}: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise CheckpointError(path, f"tensor {key!r} has shape {tuple(value.shape)}, "
                                      f"expected {tuple(expected[key].shape)}")
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return cls(model, device=device, checkpoint_hash=checkpoint_hash(weights_path, cfg, sampling),
                   sampling=sampling)

    def save(self, path: str | Path, *, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in self.model.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        meta = {"format": FORMAT_VERSION, "model": self.config.to_dict(), **(extra or {})}
        if self.sampling:
            meta[SAMPLING_KEY] = self.sampling
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        self.checkpoint_hash = checkpoint_hash(path / WEIGHTS_FILE, self.config, self.sampling)
        return path

    @staticmethod
    def default_checkpoint() -> Path | None:
        """The shipped demo checkpoint directory, if this installation has it."""
        return SHIPPED_DIR if (SHIPPED_DIR / WEIGHTS_FILE).is_file() else None

    @classmethod
    def from_name(cls, name_or_path: str | Path, *, device=None) -> "Generator":
        """A preset name (random weights) or a checkpoint directory."""
        path = cls.checkpoint_of(name_or_path)
        return cls.from_preset(str(name_or_path), device=device) if path is None else cls.load(path, device=device)

    @classmethod
    def checkpoint_of(cls, name_or_path: str | Path) -> Path | None:
        """The checkpoint directory :meth:`from_name` loads for ``name_or_path``: None for a preset's random
        weights, the shipped checkpoint for ``demo`` where it is installed."""
        if isinstance(name_or_path, str) and name_or_path in preset_names():
            return cls.default_checkpoint() if name_or_path == "demo" else None
        return Path(name_or_path)

    # -- facts the orchestrator reads ---------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        return {"preset": self.config.preset, "checkpoint_hash": self.checkpoint_hash}

    @property
    def latent_channels(self) -> int:
        return self.config.vae.latent_channels

    @property
    def max_window(self) -> int:
        return self.config.dit.max_window

    @property
    def decode_context(self) -> int:
        return self.config.vae.decode_context

    def num_latent_frames(self, num_frames: int) -> int:
        if num_frames < 1:
            raise ValueError(f"num_frames: must be at least 1, got {num_frames}")
        return self.model.vae.num_latent_frames(num_frames)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        self.model.vae.check_size(height, width)
        f = self.config.vae.spatial_factor
        return height // f, width // f

    def parameter_counts(self) -> dict[str, int]:
        return self.model.parameter_counts()

    # -- DeepSpeed ----------------------------------------------------------------------------------------
    def enable_deepspeed(self, tp_size: int = 1) -> None:
        """Run the DiT through ``deepspeed.init_inference`` (tensor parallel over ``tp_size`` ranks)."""
        from model.deepspeed_compat import init_inference

        self._deepspeed_engine = init_inference(self.model.dit, dtype=self.dtype, tp_size=tp_size)
        self._deepspeed_wraps = self.model.dit

    @property
    def engine(self) -> str:
        """What runs the DiT: "deepspeed" while the engine still wraps ``model.dit``, else "eager"."""
        return "deepspeed" if self._engine_wraps_dit() else "eager"

    def _engine_wraps_dit(self) -> bool:
        return self._deepspeed_engine is not None and self._deepspeed_wraps is self.model.dit

    @property
    def _dit_call(self) -> Callable:
        """The DiT as sampling calls it, looked up at every call: a DiT swapped into ``model.dit`` after load (a
        training script scoring its weights, say) is the one sampled, never the one an engine wrapped before."""
        if self._dit_override is not None:
            return self._dit_override
        return self._deepspeed_engine if self._engine_wraps_dit() else self.model.dit

    @_dit_call.setter
    def _dit_call(self, call: Callable | None) -> None:
        # Tests put an instrumented or exact-velocity call in the DiT's place; None restores the lookup.
        self._dit_override = call

    # -- text ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            emb = self.model.text.encode(missing)
            for i, p in enumerate(missing):
                self._text_cache[p] = TextEmbedding(emb.tokens[i:i + 1], emb.mask[i:i + 1], emb.pooled[i:i + 1])
        return TextEmbedding.cat([self._text_cache[p] for p in prompts])

    # -- sampling -----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def check_window(self, window: Window, observed: torch.Tensor | None) -> None:
        if window.size > self.max_window:
            raise ValueError(f"window: {window.size} frames ({len(window.observed_times)} observed + "
                             f"{len(window.latent_times)} latent) exceed the maximum window of {self.max_window} "
                             f"for preset {self.config.preset!r}")
        c = self.latent_channels
        expected = (len(window.observed_times), c, window.height, window.width)
        if window.observed_times:
            if observed is None or tuple(observed.shape) != expected:
                got = None if observed is None else tuple(observed.shape)
                raise ValueError(f"observed: expected latents of shape {expected} for this window, got {got}")
        if window.height % 2 or window.width % 2 or window.height < 2 or window.width < 2:
            raise ValueError(f"window: latent size {window.height}x{window.width} must be even "
                             "(frame sizes are multiples of 16)")

    @torch.no_grad()
    def sample(self, window: Window, observed: torch.Tensor | None, prompt: str | TextEmbedding, *, seed: int,
               steps: int, guidance: float, guidance_rescale: float = 0.0, sampler: str = "euler",
               causal: bool = False, video_seed: int | None = None,
               callback: Callable[[int, int], None] | None = None, use_cache: bool = True,
               start: torch.Tensor | None = None, start_level: float = 1.0,
               guidance_floor: float = 0.0) -> torch.Tensor:
        """Generate the window's latent frames; returns (n_latent, C, h, w) float32 on the CPU.

        Deterministic for (seed, window, observed, prompt, settings) on one device: the initial noise is
        drawn on the CPU from ``torch.Generator().manual_seed(seed)``; with the model's
        ``flow.noise_correlation``, mixed with a field common to the video, drawn from ``video_seed`` (every
        window of one video passes the same; by default the field is the window's own, drawn from ``seed``).

        ``guidance_floor`` limits guidance to an interval of noise levels (Kynkäänniemi et al. 2024, "Applying
        guidance in a limited interval improves sample and distribution quality"): steps that start below it
        take the conditional prediction alone, one DiT branch instead of two.
        """
        self.check_window(window, observed)
        step_fn = get_sampler(sampler)
        if steps < 1:
            raise ValueError(f"steps: must be at least 1, got {steps}")
        dev, c, h, w = self.device, self.latent_channels, window.height, window.width
        prompts = [prompt] if guidance == 1.0 else [prompt, ""]
        text = prompt if isinstance(prompt, TextEmbedding) else self.encode_text(prompts)
        if isinstance(prompt, TextEmbedding) and guidance != 1.0:
            text = TextEmbedding.cat([prompt, self.encode_text([""])])
        text = text.to(dev)
        branches = len(text)

        lat_order = sorted(range(len(window.latent_times)), key=lambda i: window.latent_times[i])
        lat_times = torch.tensor([window.latent_times[i] for i in lat_order], dtype=torch.long)
        n_lat = len(lat_times)
        own = torch.Generator().manual_seed(int(seed))
        # Without a video seed the common field comes from the window's own stream, after its own noise: a
        # second generator seeded alike would draw the very same numbers, and the noise would be 1.34 times
        # too large (sqrt(0.8) + sqrt(0.2) of one draw).
        shared = own if video_seed is None else torch.Generator().manual_seed(int(video_seed))
        noise = video_noise(n_lat, (c, h, w), self.config.flow.noise_correlation, own=own, shared=shared)
        if start is not None:
            if not 0.0 < start_level <= 1.0:
                raise ValueError(f"start_level: {start_level!r} must be in (0, 1]")
            if tuple(start.shape) != (n_lat, c, h, w):
                raise ValueError(f"start: expected ({n_lat}, {c}, {h}, {w}), got {tuple(start.shape)}")
            noise = noisy(start[torch.tensor(lat_order)].float(), noise, torch.full((n_lat,), float(start_level)))
        x = noise.to(dev)

        obs_times = torch.tensor(window.observed_times, dtype=torch.long)
        obs = None if observed is None or not window.observed_times else observed.to(dev, torch.float32)
        if obs is not None:
            order = torch.argsort(obs_times)
            obs_times, obs = obs_times[order], obs[order]

        def branch_text(count: int):
            return (text.tokens, text.mask, text.pooled) if count == branches else \
                (text.tokens[:count], text.mask[:count], text.pooled[:count])

        def split(outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            v = [o.float() for o in outs]
            return (v[0], v[1]) if len(v) == 2 else (v[0], v[0])

        if obs is not None and use_cache:
            obs_win = FrameInputs(obs, torch.ones(len(obs_times), dtype=torch.bool, device=dev), obs_times.to(dev),
                                  torch.zeros(len(obs_times), device=dev))
            caches: dict[int, Any] = {}  # per branch count; the conditional-only one only once guidance stops

            def cond_uncond(xt: torch.Tensor, t: torch.Tensor, count: int = branches):
                if count not in caches:
                    with self._autocast():
                        caches[count] = self.model.dit.observed_cache([obs_win] * count, *branch_text(count))
                win = FrameInputs(xt, torch.zeros(n_lat, dtype=torch.bool, device=dev), lat_times.to(dev),
                                  t.expand(n_lat))
                with self._autocast():
                    return split(self._dit_call([win] * count, *branch_text(count), causal=causal,
                                                cache=caches[count]))
        else:
            all_times = lat_times if obs is None else torch.cat([obs_times, lat_times])
            order = torch.argsort(all_times)
            is_obs = torch.zeros(len(all_times), dtype=torch.bool)
            is_obs[: len(all_times) - n_lat] = True
            is_obs = is_obs[order]
            lat_slots = (~is_obs).nonzero().squeeze(1).to(dev)

            def cond_uncond(xt: torch.Tensor, t: torch.Tensor, count: int = branches):
                frames = xt if obs is None else torch.cat([obs, xt])[order.to(dev)]
                levels = torch.where(is_obs.to(dev), torch.zeros((), device=dev), t)
                win = FrameInputs(frames, is_obs.to(dev), all_times[order].to(dev), levels)
                with self._autocast():
                    outs = self._dit_call([win] * count, *branch_text(count), causal=causal)
                return split([o[lat_slots] for o in outs])

        with_guidance = guided(cond_uncond, guidance, guidance_rescale) if branches == 2 else None

        def model_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # the schedule's levels are computed, so a step meant to sit on the floor may land a hair below it
            if with_guidance is not None and float(t) >= guidance_floor - 1e-6:
                return with_guidance(xt, t)
            return cond_uncond(xt, t, 1)[0]
        if start is None:
            times = time_schedule(steps, self.config.flow.shift, device=dev)
        else:
            times = start_level * time_schedule(steps, 1.0, device=dev)
        x = step_fn(model_fn, x, times, callback=callback)
        result = torch.empty_like(x)
        result[torch.tensor(lat_order, device=dev)] = x  # back to the caller's order of latent_times
        return result.float().cpu()

    @torch.no_grad()
    def predict_clean(self, noisy_latents: torch.Tensor, times: Sequence[int], level: float,
                      prompt: str | TextEmbedding) -> torch.Tensor:
        """One conditional DiT call on latent frames ``times`` all at noise ``level`` (0 clean, 1 noise):
        its estimate of the clean latents, (n, C, h, w) float32 on the CPU. For measuring the DiT, not sampling."""
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"level: {level!r} must be in [0, 1]")
        n = len(times)
        if noisy_latents.dim() != 4 or len(noisy_latents) != n or noisy_latents.shape[1] != self.latent_channels:
            raise ValueError(f"noisy_latents: expected ({n}, {self.latent_channels}, h, w), "
                             f"got {tuple(noisy_latents.shape)}")
        dev = self.device
        text = (prompt if isinstance(prompt, TextEmbedding) else self.encode_text([prompt])).to(dev)
        x = noisy_latents.to(dev, torch.float32)
        t = torch.full((n,), float(level), device=dev)
        win = FrameInputs(x, torch.zeros(n, dtype=torch.bool, device=dev), torch.as_tensor(list(times), device=dev), t)
        with self._autocast():
            velocity = self._dit_call([win], text.tokens, text.mask, text.pooled)[0].float()
        return (x - t.view(-1, 1, 1, 1) * velocity).cpu()  # x_t = (1 - t) x0 + t noise, v = noise - x0

    # -- VAE ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, frames) -> torch.Tensor:
        """uint8 frames (T, H, W, 3) -> normalised latents (T_lat, C, h, w) float32 on the CPU.

        A clip whose length is not 1 + 4k is padded at the end by repeating its last frame.
        """
        video = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
        if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[-1] != 3:
            raise ValueError(f"frames: expected uint8 (T, H, W, 3), got {video.dtype} {tuple(video.shape)}")
        self.model.vae.check_size(video.shape[1], video.shape[2])
        tf = self.config.vae.temporal_factor
        pad = (-(video.shape[0] - 1)) % tf
        if pad:
            video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        x = video.to(self.device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # (1, 3, T, H, W)
        mean, _ = self.model.vae.encode_dist(x)
        return self.config.normalise_latents(mean)[0].transpose(0, 1).float().cpu()

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor, context: torch.Tensor | None = None,
                     prompt: str | None = None) -> torch.Tensor:
        """Like :meth:`decode` but returns float pixels on the 0..255 scale before rounding, (T, H, W, 3)."""
        c = self.latent_channels
        for name, t in (("latents", latents), ("context", context)):
            if t is not None and (t.dim() != 4 or t.shape[1] != c):
                raise ValueError(f"{name}: expected (n, {c}, h, w) latents, got {tuple(t.shape)}")
        if len(latents) == 0:
            raise ValueError("latents: at least one latent frame is required")
        if context is not None and len(context) and context.shape[2:] != latents.shape[2:]:
            raise ValueError(f"context: latent size {tuple(context.shape[2:])} differs from latents "
                             f"{tuple(latents.shape[2:])}")
        z = latents if context is None or not len(context) else torch.cat([context, latents])
        z = self.config.raw_latents(z.to(self.device, torch.float32))
        caption = None
        if self.model.vae.reads_caption:
            text = self.encode_text([prompt or ""])
            caption = (text.tokens.to(self.device, torch.float32), text.mask.to(self.device))
        # TF32 convolutions would make a chunked decode differ from a one-shot decode by more than rounding.
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            frames = self.model.vae.decode_frames(z.transpose(0, 1)[None],
                                                  from_start=context is None or not len(context), caption=caption)
        frames = frames[0].permute(1, 2, 3, 0)  # (T, H, W, 3)
        if context is not None and len(context):
            frames = frames[-self.config.vae.temporal_factor * len(latents):]
        return ((frames.float().clamp(-1, 1) + 1) * 127.5).cpu()

    def decode(self, latents: torch.Tensor, context: torch.Tensor | None = None,
               prompt: str | None = None) -> torch.Tensor:
        """Latents (n, C, h, w) -> uint8 frames (T, H, W, 3).

        ``context=None``: the latents start the video, giving 1 + 4(n-1) frames. Otherwise ``context`` is the
        latent frames just before ``latents`` (up to :attr:`decode_context` of them, or all from latent 0) and
        the result is exactly the 4n frames of ``latents``, equal to the same frames of a one-shot decode.
        ``prompt``: what the video shows, for a decoder that reads it (``reads_prompt``, from
        ``vae.caption_width``); ``None`` decodes as for the empty prompt. Other decoders ignore it.
        """
        return self.decode_float(latents, context, prompt).round().to(torch.uint8)

    @property
    def reads_prompt(self) -> bool:
        """Whether the decoder draws from the prompt as well as the latents (decode with ``prompt=``)."""
        return self.model.vae.reads_caption


def _state_hash(model: nn.Module) -> str:
    """Content hash of in-memory weights (for presets built from random init)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()
