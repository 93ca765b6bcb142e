"""Attention for decode steps: the compiled CPU kernel where it applies, torch's SDPA otherwise.

A batch-1 decode step attends a few query rows to the whole key/value cache, so it is bound by reading the cache.
torch's CPU SDPA splits its work over batch x heads only, three units on SmolLM2, and in a compiled SmolLM2 step on
2 threads it took about a third of the step (docs/design.md). `decode_attention` runs csrc/decode_attention.cpp
instead where it can: float32 CPU tensors, no gradient wanted, key/value heads already matched to the query's (grouped
queries packed as rows, as transformers' `pack_gqa` does). Everything else goes to
`torch.nn.functional.scaled_dot_product_attention`, the reference the kernel is tested against. The kernel is the
custom op `swsc_hf_cpu::decode_attention` with a fake implementation, so compiled graphs call it directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cpu import load_cpu_kernels
from .dispatch import kernels_enabled

# Query rows per (batch, head) up to which the kernel runs: a decode step has a few, a prompt goes to SDPA's GEMMs.
DECODE_MAX_ROWS = 64


def decode_attention_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attn_mask: torch.Tensor | None = None) -> str:
    """"cpu" where `decode_attention` runs the compiled kernel on these operands, else "sdpa"."""
    tensors = (query, key, value)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 4 for t in tensors):
        return "sdpa"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "sdpa"
    batch, heads, rows, dim = query.shape
    if (rows > DECODE_MAX_ROWS or key.shape[:2] != (batch, heads) or value.shape[:3] != key.shape[:3]
            or key.shape[3] != dim):
        return "sdpa"  # prompts, and batch or head broadcasting, which SDPA does
    if attn_mask is not None:
        full = (batch, heads, rows, key.shape[2])
        if (attn_mask.dtype not in (torch.bool, torch.float32) or attn_mask.device.type != "cpu"
                or not 1 <= attn_mask.dim() <= 4
                or any(m not in (1, n) for m, n in zip(attn_mask.shape[::-1], full[::-1], strict=False))):
            return "sdpa"  # a mask that does not broadcast to the scores' shape: SDPA says what is wrong
    if not (kernels_enabled() and load_cpu_kernels()):
        return "sdpa"
    return "cpu"


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(query key^T * scale + mask) value, as `scaled_dot_product_attention` without dropout or causal flag.

    query (batch, heads, rows, dim), key (batch, heads, length, dim), value (batch, heads, length, value_dim);
    attn_mask bool (True = attend) or additive, broadcastable to (batch, heads, rows, length); scale defaults to
    1 / sqrt(dim). A row whose keys are all masked gives zeros, as SDPA does on CPU.
    """
    if decode_attention_kernel(query, key, value, attn_mask) == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    return torch.ops.swsc_hf_cpu.decode_attention(query, key, value, attn_mask, scale)
