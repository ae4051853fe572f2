"""The DiT benchmark runs end to end on the tiny preset, and its FLOP count matches PyTorch's."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import bench
from model.config import get_preset
from model.dit import FrameInputs


def test_json_report(capsys):
    code = bench.main(["--preset", "tiny", "--json", "--device", "cpu", "--history", "0,3,16", "--latent-frames",
                       "2", "--size", "4x6", "--repeats", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["preset"] == "tiny" and result["device"] == "cpu"
    # 16 history + 2 latent frames exceed tiny's window of 8: the benchmark says it raised the limit.
    assert result["max_window"] == 18 and "raised from 8 to 18" in result["note"]
    assert [r["history"] for r in result["rows"]] == [0, 3, 16]
    for row in result["rows"]:
        assert row["tokens_per_frame"] == 6
        for kind in ("cached", "uncached"):
            assert row[kind]["step_s"] > 0 and row[kind]["tokens_per_s"] > 0 and row[kind]["peak_bytes"] >= 0
        assert (row["cache_build_s"] > 0) == (row["history"] > 0)
    assert result["rows"][0]["memory_method"] in ("VmHWM", "ru_maxrss")


def test_table_report(capsys):
    bench.main(["--preset", "tiny", "--device", "cpu", "--history", "0,2", "--latent-frames", "1", "--size",
                "2x2", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "history" in line and "cached step" in line)
    assert "uncached step" in header and "cache build" in header
    assert any(line.split("│")[1].strip() == "2" for line in lines if line.startswith("│"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--size", "5x4"], "multiples of the patch size 2, got 5x4"),
    (["--size", "wide"], "expected HxW latent size"),
    (["--history", "0,x"], "expected comma-separated frame counts"),
    (["--latent-frames", "0"], "--latent-frames: must be at least 1, got 0"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
])
def test_bad_arguments_are_value_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        bench.main(["--preset", "tiny", "--device", "cpu", *argv])


@pytest.mark.parametrize(("history", "cached"), [(0, False), (5, False), (5, True)])
def test_analytic_flops_match_pytorch_count(history, cached):
    """The FLOPs behind the utilisation figure agree with PyTorch's own count of matmuls and attention."""
    bm = bench.build_model("tiny", torch.device("cpu"), history + 3)
    latent, rows, cols = 3, 6, 8
    text = (bm.tokens, bm.mask, bm.pooled)
    win = FrameInputs(torch.randn(latent, 4, rows, cols), torch.zeros(latent, dtype=torch.bool),
                      torch.arange(history, history + latent), torch.full((latent,), 0.5))
    cache = None
    if cached:
        observed = FrameInputs(torch.randn(history, 4, rows, cols), torch.ones(history, dtype=torch.bool),
                               torch.arange(history), torch.zeros(history))
        cache = bm.dit.observed_cache([observed], *text)
    elif history:
        win = FrameInputs(torch.randn(history + latent, 4, rows, cols),
                          torch.arange(history + latent) < history, torch.arange(history + latent),
                          torch.where(torch.arange(history + latent) < history, 0.0, 0.5))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        bm.dit([win], *text, cache=cache)
    analytic = bench.forward_flops(bm.cfg, windows=1, latent_frames=latent, history=history, cached=cached,
                                   rows=rows, cols=cols, text_len=bm.tokens.shape[1], text_dim=bm.tokens.shape[2],
                                   pooled_dim=bm.pooled.shape[1])
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_utilisation_code_path_runs_on_cpu():
    u = bench.measure_base_utilisation(torch.device("cpu"), rows=4, cols=4, branches=2, repeats=1, preset="tiny",
                                       matmul_size=64)
    assert u["window_frames"] == get_preset("tiny").dit.max_window
    assert u["forward_tflops"] > 0 and u["matmul_tflops"] > 0 and u["share_of_matmul"] > 0
