"""Baselines the benchmarks compare against: per-group round-to-nearest (RTN) and HQQ, as fake-quantized weights."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def rtn_quantize_(model: nn.Module, bits: int, group_size: int, skip: tuple[str, ...] = ("lm_head",)) -> float:
    """Asymmetric per-group round-to-nearest of every nn.Linear (min/max grid, fp16 scale and minimum per group).

    Returns the average stored bits per weight: bits + 32 / group_size (a 16-bit scale and a 16-bit minimum).
    """
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(name.endswith(s) for s in skip):
            continue
        weight = module.weight.float()
        groups = weight.reshape(-1, group_size)
        low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
        scale = ((high - low) / (2**bits - 1)).clamp_min(1e-12).half().float()
        low = low.half().float()
        q = torch.clamp(torch.round((groups - low) / scale), 0, 2**bits - 1)
        module.weight.copy_((q * scale + low).reshape(weight.shape).to(module.weight.dtype))
    return bits + 32 / group_size
