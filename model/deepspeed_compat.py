"""DeepSpeed-inference wrapping of the DiT.

Custom models get no automatic tensor-parallel policy, so the injection policy names the linear layers whose
outputs must be summed across ranks (row-parallel): each attention's output projection and the MLP's second
layer. Every other linear layer in a block is split by output features, which splits attention by heads and the
MLP by hidden units. The adaLN modulation lives outside the blocks for exactly this reason.
"""
from __future__ import annotations

import os

import torch

from model.dit import DiTBlock

ROW_PARALLEL_LINEARS = ("spatial_attn.proj", "temporal_attn.proj", "cross_attn.proj", "mlp.fc2")


def injection_policy() -> dict:
    return {DiTBlock: ROW_PARALLEL_LINEARS}


def init_inference(dit: torch.nn.Module, *, dtype: torch.dtype = torch.float32, tp_size: int = 1):
    """Wrap ``dit`` with ``deepspeed.init_inference``; returns the InferenceEngine (callable like the module)."""
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import; on machines without CUDA it must be the CPU one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed.init_inference(
        dit,
        tensor_parallel={"tp_size": tp_size},
        dtype=dtype,
        injection_policy=injection_policy(),
        replace_with_kernel_inject=False,
    )
