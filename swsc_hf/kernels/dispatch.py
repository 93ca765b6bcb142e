"""One dispatch point for the compressed matmul: picks the implementation per layout, device and token count.

- `cpu_gemv`: the compiled look-up-table GEMV (few tokens, CPU): reads only packed codes, tables and scales
  (`cpu_gemv_kernel` names the kernel it picks per layout, values and instruction set).
- `cpu_dequant_gemm`: many tokens on CPU: the compiled kernel rebuilds float32 tiles, a BLAS GEMM multiplies.
- `triton_gemv` / `triton_dequant_gemm`: the same two strategies on CUDA tensors, as Triton kernels
  (`triton_gpu.py`), when triton can be imported.
- `reference`: plain torch (any device, any layout, differentiable in the tables); also the fallback, with one
  logged reason per layout, when a layout is outside what the kernels cover or they could not be built.

The compiled path is the custom op `swsc_hf::codebook_matmul` (with a fake implementation for torch.compile,
torch.export and meta tensors, and an autograd formula whose input gradient runs the transposed kernel), so graphs
keep it whole. Outside compilation and autograd the kernel is called directly, which costs less per call.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.spec import LayerSpec
from .cpu import load_cpu_kernels
from .reference import (
    channel_tiles,
    dequantize_channels,
    reference_codebook_matmul,
    reference_table_grads,
)

logger = logging.getLogger(__name__)

# Up to this many tokens a call runs the GEMV; beyond, tiles + GEMM. On SmolLM2's 1536 x 576 layers (1 thread, 4-bit)
# both cost about 250 us at 8 tokens; the GEMV's cost grows with the tokens, the tiles' does not.
GEMV_MAX_TOKENS = 8
SEGMENT_LENGTHS = (1, 2, 4, 8)
_reported: set[str] = set()
_enabled = {"kernels": True}


def set_kernels_enabled(enabled: bool) -> bool:
    """Use the compiled kernels (True, the default) or only the reference path (False); returns the previous value.

    For comparing the two paths on a model (the decode attention's reference is torch's SDPA); `SWSC_HF_KERNELS=0`
    does the same for a whole process.
    """
    previous = _enabled["kernels"]
    _enabled["kernels"] = bool(enabled)
    return previous


def kernels_enabled() -> bool:
    """Whether `set_kernels_enabled` lets the compiled kernels run (they may still be missing: `load_cpu_kernels`)."""
    return _enabled["kernels"]


def layout_key(spec: LayerSpec) -> tuple[int, ...]:
    """The codebook term of `spec` as ints (the custom op's `layout` argument)."""
    group = spec.scale_group_size if spec.scale_groups else 0
    return (spec.out_features, spec.in_features, spec.n_clusters, spec.segment_length,
            int(spec.cluster_dim == "input"), group, spec.rows_per_codebook)


@functools.lru_cache(maxsize=4096)
def spec_from_key(key: tuple[int, ...]) -> LayerSpec:
    out_f, in_f, k, seg, is_input, group, rows = key
    return LayerSpec(out_f, in_f, n_clusters=k, segment_length=seg, cluster_dim="input" if is_input else "output",
                     scale_group_size=group, rows_per_codebook=rows)


def unsupported_reason(spec: LayerSpec) -> str | None:
    """Why the compiled kernels cannot run this layout's codebook term, or None when they can."""
    if not spec.n_clusters:
        return "no codebook term"
    if spec.segment_length not in SEGMENT_LENGTHS:
        return f"segment_length={spec.segment_length} (kernels cover {SEGMENT_LENGTHS})"
    if spec.code_bits > 8:
        return f"{spec.code_bits}-bit codes (kernels cover up to 8 bits, 256 codewords)"
    if spec.scale_groups and spec.scale_group_size % 16:
        return f"scale_group_size={spec.scale_group_size} (kernels need a multiple of 16)"
    return None


@dataclass(frozen=True)
class _Plan:
    """What the dispatch needs of a layout, computed once per `LayerSpec`."""

    spec: LayerSpec
    layout: list[int]  # the custom op's layout argument (layout_key)
    kernel_layout: list[int]  # the C++ ops' layout argument
    reason: str | None  # why the compiled kernels cannot run it, or None
    whole_channel: bool  # SWSC's layout: the reference path never rebuilds W
    over_channels: bool  # x W^T is the GEMV over channels (cluster_dim == "output")


def _whole_channel(spec: LayerSpec) -> bool:
    return spec.n_clusters > 0 and spec.segments_per_channel == 1 and not spec.scale_groups and spec.n_codebooks == 1


def kernel_layout(spec: LayerSpec) -> list[int]:
    """The C++ ops' layout argument: [channels, length, K, segment, code bits, scale group, channels per book]."""
    return [spec.channels, spec.channel_length, spec.n_clusters, spec.segment_length, spec.code_bits,
            spec.scale_group_size if spec.scale_groups else 0, spec.channels_per_codebook]


@functools.lru_cache(maxsize=4096)
def _plan(spec: LayerSpec) -> _Plan:
    return _Plan(spec, list(layout_key(spec)), kernel_layout(spec), unsupported_reason(spec), _whole_channel(spec),
                 spec.cluster_dim == "output")


def _cpu_kernels_cover(reason: str | None, device: torch.device) -> bool:
    """Whether the compiled CPU kernels run a layout on tensors of `device` (enabled, built, supported): `reason` is
    the layout's `unsupported_reason` (a plan's, outside compilation)."""
    return device.type == "cpu" and reason is None and _enabled["kernels"] and load_cpu_kernels()


@functools.cache
def _triton_kernels():
    """(the Triton kernels module, None), or (None, why not); triton is imported on the first CUDA call only."""
    if os.environ.get("SWSC_HF_KERNELS", "1") == "0":
        return None, "compiled kernels disabled by SWSC_HF_KERNELS=0"
    try:
        from . import triton_gpu
    except ImportError as error:
        return None, f"triton cannot be imported ({error})"
    return triton_gpu, None


def _cuda_reason(spec: LayerSpec) -> str | None:
    if not _enabled["kernels"]:
        return "kernels disabled by set_kernels_enabled(False)"
    module, reason = _triton_kernels()
    return reason if module is None else module.unsupported_reason(spec)


def choose_kernel(spec: LayerSpec, device: torch.device, n_tokens: int) -> str:
    """"cpu_gemv", "cpu_dequant_gemm", "triton_gemv", "triton_dequant_gemm" or "reference" for this layout, device
    and number of tokens."""
    if device.type == "cuda":
        reason = _cuda_reason(spec)
    else:
        reason = _plan(spec).reason
        if reason is None and not _enabled["kernels"]:
            reason = "kernels disabled by set_kernels_enabled(False)"
        if reason is None and device.type != "cpu":
            reason = f"no compiled kernel for {device.type} yet"
        if reason is None and not load_cpu_kernels():
            reason = "the CPU kernels could not be built"
    if reason is not None:
        key = f"{layout_key(spec)}:{reason}"
        if key not in _reported:
            _reported.add(key)
            logger.info("swsc_hf: reference path for layout %s: %s", spec.to_dict(), reason)
        return "reference"
    if device.type == "cuda":
        return "triton_gemv" if n_tokens <= _triton_kernels()[0].GEMV_MAX_TOKENS else "triton_dequant_gemm"
    return "cpu_gemv" if n_tokens <= GEMV_MAX_TOKENS else "cpu_dequant_gemm"


def cpu_gemv_kernel(codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, spec: LayerSpec) -> str:
    """Which CPU kernel a decode-sized call of this codebook term runs here: "integer" / "integer_nibbles"
    (AVX-512 quadruples / AVX2 4-bit scalar tables, for codebooks on their 8-bit grid or after
    `set_integer_dot(True)`), "planes" / "pair_planes" / "six_bit_planes" (AVX2, float16 byte planes for 4-bit
    scalar tables / 64 pairs / 33-64 scalars), "byte_planes" (AVX-512 VBMI, one token: float16 scalars of 6-8-bit
    codes and pairs of 5-8-bit codes looked up by byte permutes), "half_pairs" (float16 pairs of 5-8-bit codes,
    7-8-bit on AVX-512, read whole by scalar loads), "nibbles", "float", "portable", "transposed" (input-dim
    channels: `gemv_t`, the general decoder) or "reference" where the compiled kernels do not run it (SWSC's
    whole-channel layout included).
    Some kernels depend on the values (float16 exactly, the 8-bit grid) as well as the layout, hence the tensors."""
    plan = _plan(spec)
    if plan.whole_channel or not _cpu_kernels_cover(plan.reason, codes.device):
        return "reference"
    if not plan.over_channels:
        return "transposed"
    return torch.ops.swsc_hf_cpu.gemv_kernel(codes, codebook, scales, plan.kernel_layout)


def _compiled_matmul(x2: torch.Tensor, codes, codebook, scales, plan: _Plan, transposed: bool) -> torch.Tensor:
    """x2 (tokens, features) times W_c^T (or W_c when `transposed`, the input gradient) with the CPU kernels."""
    ops = torch.ops.swsc_hf_cpu
    layout = plan.kernel_layout
    # x W^T is the channel GEMV when the channels are W's rows; otherwise (and for the gradient) the transposed one.
    over_channels = plan.over_channels != transposed
    if x2.shape[0] <= GEMV_MAX_TOKENS:
        return _cpu_gemv(over_channels)(x2, codes, codebook, scales, layout)
    xf = x2.float()
    tiles = list(channel_tiles(plan.spec))
    out = None
    for a, b in tiles:
        tile = ops.dequant(codes, codebook, scales, layout, a, b)  # rows a:b of the channel matrix M
        if over_channels:  # M's rows are the outputs: y[:, a:b] = x M[a:b]^T, written into one output buffer
            part = F.linear(xf, tile)
            if len(tiles) == 1:
                return part
            if out is None:
                out = xf.new_empty(xf.shape[0], plan.spec.channels)
            out[:, a:b] = part
        else:  # M's rows are the inputs: y += x[:, a:b] M[a:b]
            out = torch.addmm(out, xf[:, a:b], tile) if out is not None else xf[:, a:b] @ tile
    return out


def _cpu_gemv(over_channels: bool):
    """The C++ GEMV overload, called directly: a call through the op packet costs a few microseconds more. Not
    cached: torch.compile traces this function, and warns about (and ignores) a cache around it."""
    ops = torch.ops.swsc_hf_cpu
    return ops.gemv.default if over_channels else ops.gemv_t.default


def _run(x, codes, codebook, scales, layout: list[int], transposed: bool) -> torch.Tensor:
    spec = spec_from_key(tuple(layout))
    features = spec.out_features if transposed else spec.in_features
    x2 = x.reshape(-1, features)
    kernel = choose_kernel(spec, x.device, x2.shape[0])
    if kernel.startswith("triton_"):
        triton_matmul = _triton_kernels()[0].triton_codebook_matmul
        return triton_matmul(x, codes, codebook, scales, spec, transposed=transposed, kernel=kernel[len("triton_"):])
    if kernel == "reference":
        if transposed:
            y = x2.float() @ _dense_weight(codes, codebook, scales, spec)
        else:
            y = reference_codebook_matmul(x2, codes, codebook, scales, spec)
    else:
        y = _compiled_matmul(x2, codes, codebook, scales, _plan(spec), transposed)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("swsc_hf::codebook_matmul", mutates_args=())
def codebook_matmul_op(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None,
                       layout: list[int]) -> torch.Tensor:
    """x W_c^T for the codebook term described by `layout` (see `layout_key`)."""
    return _run(x, codes, codebook, scales, layout, transposed=False)


@torch.library.custom_op("swsc_hf::codebook_matmul_t", mutates_args=())
def codebook_matmul_t_op(g: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None,
                         layout: list[int]) -> torch.Tensor:
    """g W_c (the gradient of x W_c^T with respect to x)."""
    return _run(g, codes, codebook, scales, layout, transposed=True)


@codebook_matmul_op.register_fake
def _(x, codes, codebook, scales, layout):
    return x.new_empty(*x.shape[:-1], layout[0])


@codebook_matmul_t_op.register_fake
def _(g, codes, codebook, scales, layout):
    return g.new_empty(*g.shape[:-1], layout[1])


def _setup_context(ctx, inputs, output):
    _, codes, codebook, scales, layout = inputs
    ctx.save_for_backward(codes, codebook, scales)
    ctx.layout = layout


def _backward(ctx, grad):
    codes, codebook, scales = ctx.saved_tensors
    return codebook_matmul_t_op(grad, codes, codebook, scales, ctx.layout), None, None, None, None


codebook_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def _channel_matrix(codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, spec: LayerSpec
                    ) -> torch.Tensor:
    """The channel matrix M (channels x channel_length, float32): the compiled dequant where it applies."""
    plan = _plan(spec)
    if _cpu_kernels_cover(plan.reason, codes.device):
        return torch.ops.swsc_hf_cpu.dequant(codes, codebook, scales, plan.kernel_layout, 0, spec.channels)
    return torch.cat([dequantize_channels(codes, codebook, scales, spec, a, b) for a, b in channel_tiles(spec)])


class _TrainableTablesMatmul(torch.autograd.Function):
    """x W_c^T, differentiable in x, the codebook and the scales, with the gradients written out.

    The weight is rebuilt (forward and again in backward, so nothing weight-sized is kept between them) and never
    recorded; the tables' gradients come from dL/dW by `table_grads` (on CPU one compiled pass over the code stream).
    Autograd through `codebook[codes] * scales` would keep and replay the per-element gather instead.
    """

    @staticmethod
    def forward(ctx, x, codebook, scales, codes, spec):
        weight = _dense_weight(codes, codebook, scales, spec)
        ctx.save_for_backward(x, codebook, scales, codes)
        ctx.spec = spec
        ctx.compute_dtype = _autocast_dtype(x.device)
        return F.linear(x.to(ctx.compute_dtype), weight.to(ctx.compute_dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, codebook, scales, codes = ctx.saved_tensors
        spec = ctx.spec
        compute = ctx.compute_dtype
        grad2 = grad.reshape(-1, spec.out_features).to(compute)
        grad_x = grad_book = grad_scales = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad2 @ _dense_weight(codes, codebook, scales, spec).to(compute)).reshape(x.shape).to(x.dtype)
        train_scales = scales is not None and ctx.needs_input_grad[2]
        if not (ctx.needs_input_grad[1] or train_scales):
            return grad_x, None, None, None, None
        x2 = x.reshape(-1, spec.in_features).to(compute)
        grad_m = grad2.t() @ x2 if spec.cluster_dim == "output" else x2.t() @ grad2  # (channels, channel_length)
        grad_m = grad_m.float()
        grad_book, grad_scales = table_grads(grad_m, codes, codebook.detach(),
                                             None if scales is None else scales.detach(), spec,
                                             book_grad=ctx.needs_input_grad[1], scales_grad=train_scales)
        grad_book = None if grad_book is None else grad_book.to(codebook.dtype)
        grad_scales = None if grad_scales is None else grad_scales.to(scales.dtype)
        return grad_x, grad_book, grad_scales, None, None


def _autocast_dtype(device: torch.device) -> torch.dtype:
    """The dtype autocast runs matmuls in on `device` (float32 where autocast is off)."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


def table_grads(grad_m: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None,
                spec: LayerSpec, book_grad: bool = True, scales_grad: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The codebook's and the scales' gradients (None where not asked for) from dL/dM, M the channel matrix
    (channels x channel_length): on CPU the compiled single pass over the stream (float32), else
    `reference_table_grads` (in grad_m's dtype)."""
    plan = _plan(spec)
    scales_grad = scales_grad and scales is not None
    if _cpu_kernels_cover(plan.reason, codes.device) and (book_grad or scales_grad):
        grad_book, grad_scales = torch.ops.swsc_hf_cpu.table_grads(grad_m, codes, codebook, scales,
                                                                   plan.kernel_layout, book_grad, scales_grad)
        return (grad_book if book_grad else None), (grad_scales if scales_grad else None)
    return reference_table_grads(grad_m, codes, codebook, scales, spec, book_grad, scales_grad)


def _dense_weight(codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, spec: LayerSpec
                  ) -> torch.Tensor:
    """W_c (out x in, float32) from detached tables."""
    with torch.no_grad():
        m = _channel_matrix(codes, codebook.detach(), None if scales is None else scales.detach(), spec)
    return m if spec.cluster_dim == "output" else m.t()


def codebook_matmul(
    x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, spec: LayerSpec
) -> torch.Tensor:
    """x W_c^T for the codebook term W_c = scales * codebook[codes] of `spec`, in x's dtype.

    Trainable tables (codebook or scales requiring grad, with grad enabled) take a path with written-out table
    gradients (`_TrainableTablesMatmul`; the reference path under torch.compile); SWSC's whole-channel layout takes
    the reference path; everything else goes through the kernel `choose_kernel` picks.
    """
    grad = torch.is_grad_enabled()
    trains_tables = grad and (codebook.requires_grad or (scales is not None and scales.requires_grad))
    if torch.compiler.is_compiling():  # traced without the plan cache; the custom op keeps the graph whole
        if _whole_channel(spec) or trains_tables:
            return reference_codebook_matmul(x, codes, codebook, scales, spec)
        tokens = x.numel() // spec.in_features
        if (not (grad and x.requires_grad) and tokens <= GEMV_MAX_TOKENS
                and _cpu_kernels_cover(unsupported_reason(spec), x.device)):
            # decode: the C++ GEMV straight from the compiled graph, no Python per call
            return _cpu_gemv(spec.cluster_dim == "output")(x, codes, codebook, scales, kernel_layout(spec))
        return codebook_matmul_op(x, codes, codebook, scales, list(layout_key(spec)))
    plan = _plan(spec)
    if plan.whole_channel:
        return reference_codebook_matmul(x, codes, codebook, scales, spec)
    if trains_tables:
        return _TrainableTablesMatmul.apply(x, codebook, scales, codes, spec)
    if grad and x.requires_grad:
        return codebook_matmul_op(x, codes, codebook, scales, plan.layout)
    if _cpu_kernels_cover(plan.reason, x.device):  # the common case
        if x.numel() <= GEMV_MAX_TOKENS * spec.in_features:  # decode: one C++ call (any leading shape and dtype)
            return _cpu_gemv(plan.over_channels)(x, codes, codebook, scales, plan.kernel_layout)
        y = _compiled_matmul(x.reshape(-1, spec.in_features), codes, codebook, scales, plan, transposed=False)
        return y.to(x.dtype).reshape(*x.shape[:-1], spec.out_features)
    return _run(x, codes, codebook, scales, plan.layout, transposed=False)
