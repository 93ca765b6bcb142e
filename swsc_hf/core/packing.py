"""Bit-packing of codebook indices into a dense little-endian uint8 stream.

Code ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream, least significant bit first, so any code
can be read back from the (at most) three bytes that cover it; that lets big matrices be dequantized in row tiles
without unpacking the whole stream.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MAX_BITS = 16
_PACK_CHUNK = 2**20  # codes packed at once; a multiple of 8, so every chunk starts on a byte boundary


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be in [1, {_MAX_BITS}], got {bits}")


def bits_for(k: int) -> int:
    """Bits needed to index ``k`` codebook entries: ceil(log2 k), at least 1."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return max(1, math.ceil(math.log2(k)))


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of a stream holding ``count`` codes of ``bits`` bits: ceil(count * bits / 8)."""
    return (count * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer ``codes`` (any shape, flattened in row-major order) into a 1-D uint8 tensor of
    ``packed_nbytes(codes.numel(), bits)`` bytes, for 1 <= bits <= 16.

    Each code is shifted to its bit offset and its (up to three) bytes are added into the stream; the codes'
    bit ranges are disjoint, so adding equals OR-ing. Work proceeds in chunks of 2**20 codes to bound memory.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int64)
    bad = torch.nonzero((flat < 0) | (flat >= 2**bits))
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"code {int(flat[i])} at flat index {i} is outside [0, {2**bits - 1}] for bits={bits}")
    out = torch.empty(packed_nbytes(flat.numel(), bits), dtype=torch.uint8, device=flat.device)
    for lo in range(0, flat.numel(), _PACK_CHUNK):
        chunk = flat[lo : lo + _PACK_CHUNK]
        nbytes = packed_nbytes(chunk.numel(), bits)
        offset = torch.arange(chunk.numel(), device=flat.device) * bits
        shifted = chunk << (offset & 7)
        byte = offset >> 3
        buf = torch.zeros(nbytes + 2, dtype=torch.int64, device=flat.device)
        for j in range(3):
            buf.index_add_(0, byte + j, (shifted >> (8 * j)) & 0xFF)
        start = lo * bits // 8
        out[start : start + nbytes] = buf[:nbytes].to(torch.uint8)
    return out


def unpack_codes(packed: Tensor, bits: int, count: int, start: int = 0) -> Tensor:
    """Codes ``start .. start + count - 1`` [count] int64 of a stream made by :func:`pack_codes`.

    Only the bytes covering the requested range are read: code ``i`` starts at bit ``i * bits``; the three bytes
    from its first byte are combined into an int32, shifted and masked.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}")
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be non-negative, got count={count}, start={start}")
    need = packed_nbytes(start + count, bits)
    if packed.numel() < need:
        raise ValueError(
            f"packed stream too short for codes [{start}, {start + count}) at {bits} bits: "
            f"expected at least {need} bytes, got {packed.numel()}"
        )
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=packed.device)
    aligned = count - count % 8 if bits <= 8 and start % 8 == 0 else 0
    if aligned:
        head = _unpack_groups_of_eight(packed, bits, aligned, start)
        if aligned == count:
            return head
        return torch.cat([head, _unpack_any(packed, bits, count - aligned, start + aligned)])
    return _unpack_any(packed, bits, count, start)


def _unpack_groups_of_eight(packed: Tensor, bits: int, count: int, start: int) -> Tensor:
    """Fast path: 8 codes of `bits` <= 8 fill exactly `bits` bytes, so each group is one int64 split by shifts."""
    first = start // 8 * bits
    groups = packed[first : first + count // 8 * bits].reshape(-1, bits).to(torch.int64)
    word = groups[:, 0].clone()
    for j in range(1, bits):
        word |= groups[:, j] << (8 * j)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device)
    return ((word[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)


def unpack_codes_at(packed: Tensor, bits: int, positions: Tensor) -> Tensor:
    """The codes at `positions` (an int64 tensor of code indices, any shape) of a stream made by :func:`pack_codes`,
    int64 in the shape of `positions`: a gather, for codes scattered over the stream (a few rows of a matrix)."""
    _check_bits(bits)
    offset = positions.to(torch.int64) * bits
    byte = offset >> 3
    last = packed.numel() - 1
    # Bytes past the end are clamped to the last one; they only feed bits above the mask.
    word = (packed[byte].to(torch.int32) | packed[(byte + 1).clamp_max(last)].to(torch.int32) << 8
            | packed[(byte + 2).clamp_max(last)].to(torch.int32) << 16)
    return ((word >> (offset & 7).to(torch.int32)) & ((1 << bits) - 1)).to(torch.int64)


def _unpack_any(packed: Tensor, bits: int, count: int, start: int) -> Tensor:
    return unpack_codes_at(packed, bits, torch.arange(start, start + count, device=packed.device))
