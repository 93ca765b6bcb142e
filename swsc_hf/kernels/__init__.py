"""Compressed matmul kernels: one dispatch point (`codebook_matmul`), a reference implementation, CPU kernels; and
for the dense parts of decode steps, `decode_attention` (the compiled CPU attention) and `dense_matmul` (the compiled
CPU GEMV of the linears a compressed model keeps dense)."""

from .attention import DECODE_MAX_ROWS, decode_attention, decode_attention_kernel
from .cpu import cpu_isa, integer_dot_available, limit_cpu_isa, load_cpu_kernels, set_integer_dot
from .dense import dense_matmul, dense_matmul_kernel
from .dispatch import (
    GEMV_MAX_TOKENS,
    choose_kernel,
    codebook_matmul,
    cpu_gemv_kernel,
    kernels_enabled,
    set_kernels_enabled,
    table_grads,
    unsupported_reason,
)
from .reference import (
    channel_tiles,
    dequantize_channels,
    dequantize_weight_rows,
    reference_codebook_matmul,
    reference_table_grads,
    unpacked_codes,
)

__all__ = [
    "DECODE_MAX_ROWS",
    "GEMV_MAX_TOKENS",
    "channel_tiles",
    "choose_kernel",
    "codebook_matmul",
    "cpu_gemv_kernel",
    "cpu_isa",
    "decode_attention",
    "decode_attention_kernel",
    "dense_matmul",
    "dense_matmul_kernel",
    "dequantize_channels",
    "dequantize_weight_rows",
    "integer_dot_available",
    "kernels_enabled",
    "limit_cpu_isa",
    "load_cpu_kernels",
    "reference_codebook_matmul",
    "reference_table_grads",
    "set_integer_dot",
    "set_kernels_enabled",
    "table_grads",
    "unpacked_codes",
    "unsupported_reason",
]
