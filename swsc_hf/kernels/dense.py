"""The dense GEMV of decode steps: the compiled CPU kernel where it applies, `torch.nn.functional.linear` otherwise.

A compressed model keeps some linears dense, its output head by default, and a decode step reads such a weight in
full for every token: SmolLM2's tied 49152 x 576 head is 113 MB of float32, more than all its compressed layers. torch
runs a decode-sized call as a BLAS sgemv, which read it at 11 GB/s on a 2-core Zen 4 EPYC at any thread count, where
the machine reads 27-33 GB/s. `dense_matmul` runs csrc/dense_gemv.cpp instead where it can: CPU operands of one dtype
(float32 or bfloat16), a contiguous weight, up to `GEMV_MAX_TOKENS` tokens, no gradient wanted, outside
TorchScript traces. The kernel splits the rows over torch's threads and streams them at memory speed
(docs/design.md). It is the custom op `swsc_hf_cpu::dense_gemv` with a fake implementation, so compiled decode graphs
call it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu import load_cpu_kernels
from .dispatch import GEMV_MAX_TOKENS, kernels_enabled

# The dtypes the kernel reads (x, weight and bias of one): sums in float32, rounded once to that dtype. float16 stays
# with torch, whose GEMV read SmolLM2's head faster (33 against 25 GB/s, 2 threads, the Zen 4 EPYC).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def dense_matmul_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """"cpu" where `dense_matmul` runs the compiled kernel on these operands, else "torch"."""
    if torch.jit.is_tracing():
        return "torch"  # TorchScript traces (ONNX, OpenVINO) record F.linear, which their converters know
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if weight.dtype not in KERNEL_DTYPES or any(t.device.type != "cpu" or t.dtype != weight.dtype for t in tensors):
        return "torch"
    if weight.dim() != 2 or not weight.is_contiguous() or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return "torch"  # shapes F.linear broadcasts or refuses: it says what is wrong
    if bias is not None and bias.shape != (weight.shape[0],):
        return "torch"
    if weight.shape[1] == 0 or x.numel() // weight.shape[1] > GEMV_MAX_TOKENS:
        return "torch"  # prompts: BLAS's GEMM
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "torch"
    if not (kernels_enabled() and load_cpu_kernels()):
        return "torch"
    return "cpu"


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b, as `torch.nn.functional.linear`; decode-sized CPU calls run the compiled dense GEMV (the same result
    within rounding: the float32 sums are taken in another order)."""
    if dense_matmul_kernel(x, weight, bias) == "torch":
        return F.linear(x, weight, bias)
    return torch.ops.swsc_hf_cpu.dense_gemv(x, weight, bias)
