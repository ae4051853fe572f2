"""DiT benchmark: the cost of one denoising step against the number of history (observed) frames.

``longshot bench dit --preset demo --json`` (or ``python -m model.bench ...``) times, for each history length:

* **cached** — one latent-only forward that reads the observed frames' temporal keys/values from a
  precomputed :class:`~model.dit.ObservedCache` (what every step of ``Generator.sample`` does); the one-time
  cost of building that cache is reported separately (``cache_build_s``);
* **uncached** — one full forward over the observed and latent frames together.

One step is one forward of one window (one guidance branch; classifier-free guidance runs two). Every time is
the median of ``--repeats`` runs taken round-robin over the history lengths, so that load from other processes
on a shared machine spreads evenly instead of landing on one history length.
A window of 256 history frames is far larger than any preset's ``max_window``: the benchmark builds the DiT
with ``max_window`` raised to fit, because it measures the attention cost, not what a render may use.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the call; on the CPU the
kernel's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident
set before the call, with glibc told to serve large blocks by ``mmap`` so that freed tensors leave the resident
set; where that is unavailable, the growth of ``ru_maxrss``. The ``memory_method`` field says which was used.

On CUDA the benchmark also measures the card's bf16 matmul rate and reports the bf16 forward rate of the
``base`` preset (FLOPs counted analytically from its config) as a share of it.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from model.config import ModelConfig, get_preset, preset_names
from model.dit import FrameInputs, VideoDiT
from model.generator import _quiet_open_clip
from model.text import TextEncoder

PROMPT = "a lighthouse on a cliff at dusk, waves breaking below"


# ------------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory in bytes that a block of code adds on top of what was in use when it started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else _cpu_method()
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.method == "VmHWM":
            _libc().malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets the high-water mark to the current resident set
            self._start = _proc_status_kib("VmRSS") * 1024
        else:
            self._start = _maxrss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "VmHWM":
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = _maxrss_bytes()
        self.peak_bytes = max(0, peak - self._start)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD = 64 KiB, fixed: large tensors come from mmap and return to the kernel when freed,
        # so the resident set follows the live tensors instead of glibc's cached heap.
        _LIBC.mallopt(-3, 1 << 16)
    return _LIBC


def _cpu_method() -> str:
    if platform.system() != "Linux":
        return "ru_maxrss"
    try:
        _libc()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _proc_status_kib("VmHWM")
        return "VmHWM"
    except (OSError, ValueError):
        return "ru_maxrss"


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"/proc/self/status has no {field}")


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# ------------------------------------------------------------------------------------------------- FLOPs
def forward_flops(cfg: ModelConfig, *, windows: int, latent_frames: int, history: int, cached: bool, rows: int,
                  cols: int, text_len: int, text_dim: int, pooled_dim: int) -> float:
    """FLOPs (2 per multiply-add) of one DiT forward over ``windows`` equal windows, counted from the config.

    Without a cache the forward runs ``history + latent_frames`` frames through the blocks; with one
    (``cached``) only the latent frames, whose temporal attention still reads ``history + latent_frames`` keys,
    and the text keys/values come from the cache. Attention is counted dense, as the kernels compute it;
    norms, rotary embeddings, softmax and element-wise work are left out.
    """
    d, p, c = cfg.dit.hidden, cfg.dit.patch, cfg.vae.latent_channels
    mlp = int(d * cfg.dit.mlp_ratio)
    n = (rows // p) * (cols // p)  # tokens per frame
    keys = history + latent_frames
    query = latent_frames if cached else keys
    frames = windows * query
    tokens = frames * n
    per_block = (
        2 * tokens * d * (4 * d + 4 * d + 2 * d + 2 * mlp)  # q/k/v/proj of spatial and temporal, cross q/proj, MLP
        + 4 * frames * n * n * d  # spatial attention: scores and weighted sum
        + 4 * windows * n * query * keys * d  # temporal attention
        + 4 * tokens * text_len * d  # cross-attention
        + 2 * frames * d * 9 * d  # adaLN modulation (per frame)
        + (0 if cached else 2 * windows * text_len * text_dim * 2 * d)  # cross-attention keys/values of the text
    )
    conditioning = 2 * frames * (256 * d + d * d) + 2 * windows * pooled_dim * d  # timestep MLP, pooled text
    # Patch embedding, output projection, and the final layer's modulation (computed per token).
    embed = 2 * tokens * (c + 1) * p * p * d + 2 * tokens * d * c * p * p + 2 * tokens * d * 2 * d
    return float(cfg.dit.depth * per_block + conditioning + embed)


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    with PeakMemory(device) as mem:
        fn()
    return mem.peak_bytes, mem.method


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                  iters: int = 50) -> float:
    """The card's dense matmul rate in TFLOP/s, from a loop of n x n x n products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    _sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start) / 1e12


# ------------------------------------------------------------------------------------------------- model
@dataclass
class BenchModel:
    cfg: ModelConfig  # with max_window raised to fit the largest window
    dit: VideoDiT
    tokens: torch.Tensor  # (1, L, Dt) text tokens of the prompt
    mask: torch.Tensor  # (1, L)
    pooled: torch.Tensor  # (1, E)
    max_window_raised_from: int | None


def build_model(preset: str, device: torch.device, max_window: int, seed: int = 0) -> BenchModel:
    """The preset's text encoder and DiT with random (non-zero) weights; the VAE plays no part in a step."""
    cfg = get_preset(preset)
    raised = None
    if max_window > cfg.dit.max_window:
        raised = cfg.dit.max_window
        cfg = cfg.replace(dit=dataclasses.replace(cfg.dit, max_window=max_window))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet_open_clip():
            text = TextEncoder(cfg.text).eval()
        with torch.no_grad():
            emb = text.encode([PROMPT])
        dit = VideoDiT(cfg.dit, cfg.vae.latent_channels, text.width, text.embed_dim)
        # A fresh adaLN-Zero model has closed residual branches; open them so every layer does real work.
        with torch.no_grad():
            for param in dit.parameters():
                param.normal_(0.0, 0.02)
    del text
    dit = dit.to(device).eval()
    return BenchModel(cfg, dit, emb.tokens.to(device), emb.mask.to(device), emb.pooled.to(device), raised)


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Case:
    """One thing to time: building the cache, a cached step or an uncached step at one history length."""

    history: int
    kind: str  # "cache_build" | "cached" | "uncached"
    call: Callable[[], object]
    query_frames: int  # frames the forward runs through the blocks
    seconds: list[float] = dataclasses.field(default_factory=list)


def prepare_cases(bm: BenchModel, device: torch.device, history: int, latent_frames: int, rows: int,
                  cols: int) -> list[Case]:
    c = bm.cfg.vae.latent_channels
    g = torch.Generator().manual_seed(history)
    observed = torch.randn(history, c, rows, cols, generator=g).to(device)
    latents = torch.randn(latent_frames, c, rows, cols, generator=g).to(device)
    obs_times = torch.arange(history, device=device)
    lat_times = torch.arange(history, history + latent_frames, device=device)
    level = torch.full((latent_frames,), 0.5, device=device)
    latent_win = FrameInputs(latents, torch.zeros(latent_frames, dtype=torch.bool, device=device), lat_times, level)
    text = (bm.tokens, bm.mask, bm.pooled)

    def inference(fn):
        def call():
            with torch.no_grad(), _autocast(device):
                return fn()
        return call

    if not history:
        step = inference(lambda: bm.dit([latent_win], *text))
        return [Case(0, "cached", step, latent_frames), Case(0, "uncached", step, latent_frames)]
    observed_win = FrameInputs(observed, torch.ones(history, dtype=torch.bool, device=device), obs_times,
                               torch.zeros(history, device=device))
    build_cache = inference(lambda: bm.dit.observed_cache([observed_win], *text))
    cache = build_cache()
    full_win = FrameInputs(torch.cat([observed, latents]), torch.cat([observed_win.observed, latent_win.observed]),
                           torch.cat([obs_times, lat_times]), torch.cat([observed_win.noise, level]))
    return [Case(history, "cache_build", build_cache, history),
            Case(history, "cached", inference(lambda: bm.dit([latent_win], *text, cache=cache)), latent_frames),
            Case(history, "uncached", inference(lambda: bm.dit([full_win], *text)), history + latent_frames)]


def time_cases(cases: list[Case], device: torch.device, repeats: int) -> None:
    """Time every case ``repeats`` times.

    Cases of one kind are timed round-robin over the history lengths, so that load from elsewhere spreads over
    all of them; kinds are timed one after another, so that cached steps follow cached steps as in a sampling
    loop instead of running in the cold caches and freshly faulted memory a large uncached forward leaves.
    """
    for kind in ("cached", "uncached", "cache_build"):
        group = [case for case in cases if case.kind == kind]
        for case in group:
            case.call()  # warm-up
        for _ in range(repeats):
            for case in group:
                _sync(device)
                start = time.perf_counter()
                case.call()
                _sync(device)
                case.seconds.append(time.perf_counter() - start)


def summarise(bm: BenchModel, cases: list[Case], device: torch.device, latent_frames: int, rows: int,
              cols: int) -> list[dict]:
    """Rows of the result, one per history length, with the peak memory of each case measured alone."""
    tokens_per_frame = (rows // bm.cfg.dit.patch) * (cols // bm.cfg.dit.patch)
    out: dict[int, dict] = {}
    for case in cases:
        row = out.setdefault(case.history, {"history": case.history, "latent_frames": latent_frames,
                                            "tokens_per_frame": tokens_per_frame, "cache_build_s": 0.0,
                                            "cache_build_peak_bytes": 0})
        seconds = statistics.median(case.seconds)
        peak, row["memory_method"] = peak_memory(case.call, device)
        if case.kind == "cache_build":
            row["cache_build_s"], row["cache_build_peak_bytes"] = seconds, peak
            continue
        row[case.kind] = {
            "step_s": seconds,
            "step_min_s": min(case.seconds),
            "peak_bytes": peak,
            # Tokens the forward runs through the blocks, and the latent tokens it denoises, per second.
            "tokens_per_s": case.query_frames * tokens_per_frame / seconds,
            "latent_tokens_per_s": latent_frames * tokens_per_frame / seconds,
            "tflops": forward_flops(bm.cfg, windows=1, latent_frames=latent_frames, history=case.history,
                                    cached=case.kind == "cached", rows=rows, cols=cols,
                                    text_len=bm.tokens.shape[1], text_dim=bm.tokens.shape[2],
                                    pooled_dim=bm.pooled.shape[1]) / seconds / 1e12,
        }
    return [out[h] for h in sorted(out)]


def measure_base_utilisation(device: torch.device, *, rows: int = 32, cols: int = 32, branches: int = 2,
                             repeats: int = 10, preset: str = "base", matmul_size: int = 8192) -> dict:
    """bf16 forward rate of a full window of ``preset`` as a share of the card's bf16 matmul rate."""
    bm = build_model(preset, device, 0)
    frames = bm.cfg.dit.max_window
    c = bm.cfg.vae.latent_channels
    g = torch.Generator().manual_seed(0)
    win = FrameInputs(torch.randn(frames, c, rows, cols, generator=g).to(device),
                      torch.zeros(frames, dtype=torch.bool, device=device),
                      torch.arange(frames, device=device), torch.full((frames,), 0.5, device=device))
    tokens, mask, pooled = (t.expand(branches, *t.shape[1:]) for t in (bm.tokens, bm.mask, bm.pooled))

    def forward():
        with torch.no_grad(), _autocast(device):
            return bm.dit([win] * branches, tokens, mask, pooled)

    seconds = time_call(forward, device, repeats)
    flops = forward_flops(bm.cfg, windows=branches, latent_frames=frames, history=0, cached=False, rows=rows,
                          cols=cols, text_len=bm.tokens.shape[1], text_dim=bm.tokens.shape[2],
                          pooled_dim=bm.pooled.shape[1])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_tflops(device, dtype, n=matmul_size)
    achieved = flops / seconds / 1e12
    del bm
    return {"preset": preset, "window_frames": frames, "branches": branches, "latent_size": [rows, cols],
            "dtype": str(dtype).replace("torch.", ""), "forward_s": seconds, "forward_tflop": flops / 1e12,
            "forward_tflops": achieved, "matmul_tflops": peak, "share_of_matmul": achieved / peak}


# --------------------------------------------------------------------------------------------------- CLI
DEFAULT_FRAME_SIZE = (144, 256)  # frames the default latent size corresponds to


def _size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size: expected HxW latent size such as 18x32, got {text!r}") from None
    if rows <= 0 or cols <= 0:
        raise argparse.ArgumentTypeError(f"--size: latent height and width must be positive, got {text!r}")
    return rows, cols


def _history(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--history: expected comma-separated frame counts, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--history: frame counts must be >= 0, got {text!r}")
    return sorted(set(values))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # bad input is a ValueError, which the longshot CLI reports in one line
        raise ValueError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="longshot bench dit", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", choices=preset_names())
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--history", type=_history, default=[0, 16, 64, 256],
                   help="history (observed) frame counts, comma-separated (default: 0,16,64,256)")
    p.add_argument("--latent-frames", type=int, default=8, help="latent frames being denoised (default: 8)")
    p.add_argument("--size", type=_size, default=None,
                   help="latent size HxW (default: that of 144x256 frames under the preset's VAE, e.g. 36x64 "
                        "for a x4 VAE)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per measurement, taken round-robin; the median is reported (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-utilisation", action="store_true",
                   help="on CUDA, skip the base preset's forward rate against the matmul rate")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def run(args: argparse.Namespace) -> dict:
    if args.latent_frames < 1:
        raise ValueError(f"--latent-frames: must be at least 1, got {args.latent_frames}")
    if args.repeats < 1:
        raise ValueError(f"--repeats: must be at least 1, got {args.repeats}")
    cfg = get_preset(args.preset)
    rows, cols = args.size or (DEFAULT_FRAME_SIZE[0] // cfg.vae.spatial_factor,
                               DEFAULT_FRAME_SIZE[1] // cfg.vae.spatial_factor)
    if rows % cfg.dit.patch or cols % cfg.dit.patch:
        raise ValueError(f"--size: latent height and width must be multiples of the patch size "
                         f"{cfg.dit.patch}, got {rows}x{cols}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    window = max(args.history) + args.latent_frames
    bm = build_model(args.preset, device, window)
    cases = [case for h in args.history for case in prepare_cases(bm, device, h, args.latent_frames, rows, cols)]
    time_cases(cases, device, args.repeats)
    rows_out = summarise(bm, cases, device, args.latent_frames, rows, cols)
    del cases
    result = {
        "benchmark": "dit-step-vs-history",
        "preset": args.preset,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32",
        "dit_parameters": bm.dit.num_parameters(),
        "latent_size": [rows, cols],
        "latent_frames": args.latent_frames,
        "repeats": args.repeats,
        "max_window": bm.cfg.dit.max_window,
        "note": (f"max_window raised from {bm.max_window_raised_from} to {bm.cfg.dit.max_window} to fit the "
                 "largest window: this measures attention cost, not a window a render may use"
                 if bm.max_window_raised_from is not None else ""),
        "step": "one forward of one window (one guidance branch); cached = latent frames only, reading the "
                "observed keys/values from a cache built once (cache_build_s)",
        "rows": rows_out,
    }
    by_history = {r["history"]: r for r in rows_out}
    if 16 in by_history and 256 in by_history:
        cached = by_history[256]["cached"]["step_s"] / by_history[16]["cached"]["step_s"]
        uncached = by_history[256]["uncached"]["step_s"] / by_history[16]["uncached"]["step_s"]
        result["cached_step_ratio_256_vs_16"] = cached
        result["uncached_step_ratio_256_vs_16"] = uncached
        result["cached_target_met"] = cached <= 1.5  # target: <= 1.5x with the cache
    del bm
    if device.type == "cuda" and not args.no_utilisation:
        result["utilisation"] = measure_base_utilisation(device)
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"DiT step vs history — preset {result['preset']} on {result['device']} "
                        f"({result['dtype']}, latent {result['latent_size'][0]}x{result['latent_size'][1]}, "
                        f"{result['latent_frames']} latent frames)")
    for col in ("history", "cached step", "cache build", "uncached step", "cached peak", "uncached peak",
                "cached latent tok/s", "uncached tok/s"):
        table.add_column(col, justify="right")
    mib = 1 / 2 ** 20
    for r in result["rows"]:
        table.add_row(str(r["history"]), f"{r['cached']['step_s'] * 1e3:.1f} ms", f"{r['cache_build_s'] * 1e3:.1f} ms",
                      f"{r['uncached']['step_s'] * 1e3:.1f} ms", f"{r['cached']['peak_bytes'] * mib:.1f} MiB",
                      f"{r['uncached']['peak_bytes'] * mib:.1f} MiB", f"{r['cached']['latent_tokens_per_s']:,.0f}",
                      f"{r['uncached']['tokens_per_s']:,.0f}")
    # Piped output would otherwise wrap at 80 columns and split every header.
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    console.print(f"memory: {result['rows'][0]['memory_method']}; {result['step']}")
    if result["note"]:
        console.print(result["note"])
    if "cached_step_ratio_256_vs_16" in result:
        console.print(f"256 vs 16 history frames: cached x{result['cached_step_ratio_256_vs_16']:.2f} "
                      f"(target <= 1.5: {'met' if result['cached_target_met'] else 'MISSED'}), "
                      f"uncached x{result['uncached_step_ratio_256_vs_16']:.2f}")
    u = result.get("utilisation")
    if u:
        console.print(f"{u['preset']} {u['dtype']} forward: {u['forward_tflops']:.1f} TFLOP/s = "
                      f"{100 * u['share_of_matmul']:.1f}% of the measured matmul rate {u['matmul_tflops']:.1f} TFLOP/s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
