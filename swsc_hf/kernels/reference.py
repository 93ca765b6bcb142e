"""Reference codebook matmul in plain torch: the numerics every compiled kernel is tested against.

It rebuilds the channel matrix in float32 tiles from the packed codes (`scales * codebook[codes]`) and multiplies.
It runs on any device, for every `LayerSpec`, and is differentiable with respect to the activations, the codebook
and the scales (table distillation and centroid training use it).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..core.compress import reconstruct_channels
from ..core.packing import unpack_codes, unpack_codes_at
from ..core.spec import LayerSpec

# Channels are rebuilt in tiles of at most this many weights, so no call holds a whole dense matrix. 2^21 rather than
# 2^22: a 512-token GEMM through a large output head ran 5-15% faster in 2M-weight tiles than in 4M (their weights
# and product stay in cache), and every SmolLM2 and Gemma-3 layer but the head still fits in one tile (docs/design.md).
TILE_ELEMENTS = 1 << 21


def unpacked_codes(codes: torch.Tensor, spec: LayerSpec, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Codes of channels start:stop as (rows, segments) int64."""
    stop = spec.channels if stop is None else stop
    per = spec.segments_per_channel
    return unpack_codes(codes, spec.code_bits, (stop - start) * per, start * per).reshape(stop - start, per)


def dequantize_channels(
    codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, spec: LayerSpec,
    start: int = 0, stop: int | None = None,
) -> torch.Tensor:
    """Channels start:stop of the codebook term, float32 (rows, channel_length)."""
    stop = spec.channels if stop is None else stop
    channel_scales = None if scales is None else scales.float()
    channel_codes = unpacked_codes(codes, spec, start, stop)
    return reconstruct_channels(spec, codebook.float(), channel_codes, channel_scales, start)


def dequantize_weight_rows(
    codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, spec: LayerSpec, rows: torch.Tensor,
) -> torch.Tensor:
    """Rows `rows` (1-D int64, output indices) of the codebook term's (out x in) weight, float32 (len(rows), in):
    an embedding look-up in a compressed head, reading only the codes of those rows (whole channels when channels
    are rows; one code per input channel and row otherwise)."""
    rows = rows.to(device=codes.device, dtype=torch.int64)
    book = codebook.float()
    per = spec.segments_per_channel
    if spec.cluster_dim == "output":  # the rows are channels
        positions = rows[:, None] * per + torch.arange(per, device=codes.device)
        return reconstruct_channels(spec, book, unpack_codes_at(codes, spec.code_bits, positions), scales,
                                    channel_ids=rows)
    channels = torch.arange(spec.channels, device=codes.device)
    positions = channels[None, :] * per + (rows // spec.segment_length)[:, None]
    values = book[(channels // spec.channels_per_codebook)[None, :], unpack_codes_at(codes, spec.code_bits, positions),
                  (rows % spec.segment_length)[:, None]]
    if scales is not None:
        values = values * scales.float().t()[rows // spec.scale_group_size]
    return values


def channel_tiles(spec: LayerSpec, max_elements: int = TILE_ELEMENTS) -> Iterator[tuple[int, int]]:
    """(start, stop) channel ranges of at most `max_elements` weights each (at least one channel)."""
    rows = max(1, max_elements // spec.channel_length)
    for start in range(0, spec.channels, rows):
        yield start, min(start + rows, spec.channels)


def reference_codebook_matmul(
    x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, spec: LayerSpec
) -> torch.Tensor:
    """x W_c^T for the codebook term W_c of `spec`, in x's dtype (float32 accumulation of float32 tiles)."""
    if spec.segments_per_channel == 1 and not spec.scale_groups and spec.n_codebooks == 1:
        return _whole_channel_matmul(x, codes, codebook, spec)
    xf = x.float()
    if spec.cluster_dim == "output":
        tiles = (dequantize_channels(codes, codebook, scales, spec, a, b) for a, b in channel_tiles(spec))
        parts = [F.linear(xf, tile) for tile in tiles]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    else:  # channels are input columns: a tile is rows a:b of W^T
        out = xf.new_zeros(*x.shape[:-1], spec.out_features)
        for a, b in channel_tiles(spec):
            out = out + xf[..., a:b] @ dequantize_channels(codes, codebook, scales, spec, a, b)
    return out.to(x.dtype)


def reference_table_grads(
    grad_m: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, spec: LayerSpec,
    book_grad: bool = True, scales_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The tables' gradients (in grad_m's dtype) from dL/dM, M the (channels, channel_length) channel matrix of `spec`.

    The codebook's is a scatter-add of dL/dM * scale over the codes, the scales' a grouped sum of
    dL/dM * codebook[codes]: what autograd through `scales * codebook[codes]` gives, without recording the gather.
    None for a gradient not asked for (or scales_grad without scales).
    """
    seg = spec.segment_length
    book = torch.arange(spec.channels, device=codes.device) // spec.channels_per_codebook
    flat = (book[:, None] * spec.n_clusters + unpacked_codes(codes, spec)).reshape(-1)  # a codeword per segment
    grad_book = grad_scales = None
    if book_grad:
        weighted = grad_m
        if scales is not None:
            weighted = grad_m * scales.to(grad_m.dtype).repeat_interleave(spec.scale_group_size, dim=1)
        grad_book = torch.zeros(codebook.numel() // seg, seg, dtype=grad_m.dtype, device=grad_m.device).index_add_(
            0, flat, weighted.reshape(-1, seg)).reshape(codebook.shape)
    if scales_grad and scales is not None:
        unscaled = codebook.to(grad_m.dtype).reshape(-1, seg)[flat].reshape(spec.channels, spec.channel_length)
        grad_scales = (grad_m * unscaled).reshape(spec.channels, -1, spec.scale_group_size).sum(-1)
    return grad_book, grad_scales


def _whole_channel_matmul(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, spec: LayerSpec
                          ) -> torch.Tensor:
    """SWSC's layout (one representative per whole channel): gather outputs, or sum inputs per cluster; W is never
    rebuilt."""
    centroids = codebook[0].to(x.dtype)  # (k, channel_length)
    idx = unpacked_codes(codes, spec)[:, 0]
    if spec.cluster_dim == "output":
        return F.linear(x, centroids)[..., idx]
    summed = x.new_zeros(*x.shape[:-1], spec.n_clusters).index_add_(-1, idx, x)
    return summed @ centroids
