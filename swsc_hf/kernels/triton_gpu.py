"""Triton kernels for the compressed matmul on CUDA (and, for tests, on CPU tensors under TRITON_INTERPRET=1).

- `gemv` (few tokens, decode): each program decodes a tile of the channel matrix M = scales * codebook[codes] in
  registers, straight from the packed code stream, the tables and the scales, and multiplies it with the tile of
  up to 8 tokens' activations it shares (float32 accumulation). W is never written; the long axis is split over
  programs (partial sums added by torch) so that small matrices still fill the GPU.
  When a channel's codes fill whole 32-bit words (1-, 2-, 4- or 8-bit codes, segments of 1, 2, 4 or 8 values,
  scale groups a multiple of a word's values) and the outputs are channels, the GEMV reads the stream a word at a
  time instead (`_gemv_words_kernel`): one load per 4-32 codes and one scale load per word, not one of each per
  weight, and the products accumulate per lane until the end (one reduction per program, not one per step).
- `gemv_token` (one token; a candidate, chosen only by `kernel="gemv_token"` until it is timed on a GPU):
  `_gemv_token_kernel` keeps every tensor a (channels, words) tile in the word load's layout and unrolls a word's
  codes, so the sm_90 build has no layout conversion in its loop and about half the instructions a weight of
  `_gemv_words_kernel` (docs/design.md).
- `dequant_gemm` (more tokens, prefill): a kernel writes M in the activations' dtype, whole or in tiles of at most
  `GPU_TILE_ELEMENTS` weights, and cuBLAS multiplies it (the structure of the CPU path, with larger tiles). Where
  the GEMV's word reader applies, so does the dequantizer's (`_dequant_words_kernel`, a tile of words a program).

The codes are read as stored (no load-time repacking, no extra memory): code i is bits [i b, (i + 1) b) of the
little-endian stream (core/packing.py), so one byte holds it when b is 1, 2, 4 or 8 and two adjacent bytes
otherwise. Tables are gathered from global memory (a table is at most 256 x 4 values, L1-resident); FLUTE keeps
them in shared memory instead, which Triton does not expose for gathers. Any segment length, codebooks shared by
any number of channels, any scale group and both cluster dims are covered; codes must fit in 8 bits, and offsets
are int32 (8 codes fill b bytes, so no bit offset is formed), which limits a layer to 2^31 - 1 weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..core.spec import LayerSpec
from .reference import channel_tiles

# Up to this many tokens a call runs the GEMV; beyond, dequantized weights and cuBLAS. Measured on an H200
# (benchmarks/gpu_speed.py, docs/results.md): dequantization + cuBLAS costs about 1.5 GEMV tokens and hardly grows
# up to 8 tokens, while each token adds about 40% to the GEMV. A GEMV program takes up to GEMV_BLOCK_TOKENS tokens.
GEMV_MAX_TOKENS = 2
GEMV_BLOCK_TOKENS = 8
# "gemv": as dispatched; "gemv_token": the one-token kernel where a call has one token and the words fit (a candidate,
# not dispatched until timed on a GPU, see docs/design.md); "gemv_bytes": the byte reader even where words fit
KERNELS = ("gemv", "gemv_token", "gemv_bytes", "dequant_gemm")
# Prefill dequantizes at most this many weights at a time (a transient buffer in the activations' dtype, 128 MiB in
# 16 bits): whole layers of 8B models in one launch and one cuBLAS call, tiles of the largest heads.
GPU_TILE_ELEMENTS = 1 << 26
# The word readers' launch shapes, the best of a sweep on an H200 (docs/design.md). GEMV: WORDS_BLOCK_N channels a
# program, WORDS_TILE weights x tokens a step. Dequantizer: DEQUANT_TILE weights a program, DEQUANT_TILE_WIDTH of
# them along a channel.
WORDS_BLOCK_N, WORDS_TILE, WORDS_WARPS = 4, 4096, 4
DEQUANT_TILE, DEQUANT_TILE_WIDTH, DEQUANT_WARPS = 4096, 1024, 8
# The one-token GEMV's launch: TOKEN_BLOCK_N channels x TOKEN_BLOCK_W words a step, about TOKEN_PROGRAMS_PER_SM
# programs a multiprocessor (chosen by its sm_90 build's registers; not yet swept on a GPU: gpu_speed.py
# --token-launches).
TOKEN_BLOCK_N, TOKEN_BLOCK_W, TOKEN_WARPS, TOKEN_PROGRAMS_PER_SM = 32, 32, 4, 4
MAX_CODES = 2**31 - 1  # offsets are int32: codes, weights of a tile and table entries all stay below


def unsupported_reason(spec: LayerSpec) -> str | None:
    """Why the Triton kernels cannot run this layout's codebook term, or None when they can."""
    if not spec.n_clusters:
        return "no codebook term"
    if spec.code_bits > 8:
        return f"{spec.code_bits}-bit codes (the Triton kernels cover up to 8 bits, 256 codewords)"
    if spec.n_codes > MAX_CODES or spec.out_features * spec.in_features > MAX_CODES:
        return f"{spec.out_features} x {spec.in_features} weights (the Triton kernels use int32 offsets)"
    return None


@triton.jit
def _decode_tile(codes_ptr, book_ptr, scales_ptr, rows, cols, n_rows, length, n_bytes, n_groups, rows_per_book,
                 SEG: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr,
                 HAS_SCALES: tl.constexpr):
    """M[rows, cols] in float32 for broadcastable int index tensors (zero outside the matrix)."""
    mask = (rows < n_rows) & (cols < length)
    index = rows * (length // SEG) + cols // SEG  # the code's index in the stream (< 2**31, see MAX_CODES)
    bit = (index & 7) * BITS  # 8 codes fill BITS bytes: int32 offsets, no int64 bit offset
    byte = (index >> 3) * BITS + (bit >> 3)
    word = tl.load(codes_ptr + byte, mask=mask, other=0).to(tl.int32)
    if (BITS & (BITS - 1)) != 0:  # 3, 5, 6 or 7 bits: a code may straddle two bytes
        word |= tl.load(codes_ptr + byte + 1, mask=mask & (byte + 1 < n_bytes), other=0).to(tl.int32) << 8
    code = (word >> (bit & 7)) & ((1 << BITS) - 1)
    entry = ((rows // rows_per_book) * K + code) * SEG + cols % SEG
    w = tl.load(book_ptr + entry, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALES:
        w *= tl.load(scales_ptr + rows * n_groups + cols // GROUP, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _gemv_kernel(x_ptr, codes_ptr, book_ptr, scales_ptr, out_ptr,
                 n_tokens, n_rows, length, n_bytes, n_groups, rows_per_book, split_len,
                 OVER_CHANNELS: tl.constexpr, SEG: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr,
                 GROUP: tl.constexpr, HAS_SCALES: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, t, n] = sum over this program's slice of the reduced axis of x[t, k] M-product[k, n]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if OVER_CHANNELS:  # y[t, c] = sum_p x[t, p] M[c, p]: outputs are channels, the channel length is reduced
        n_out = n_rows
        n_reduce = length
    else:  # y[t, p] = sum_c x[t, c] M[c, p]: outputs are positions, channels are reduced
        n_out = length
        n_reduce = n_rows
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, split_len, BLOCK_K):
        k = pid_s * split_len + k0 + tl.arange(0, BLOCK_K)
        x_mask = (t[:, None] < n_tokens) & (k[None, :] < n_reduce)
        x = tl.load(x_ptr + t[:, None].to(tl.int64) * n_reduce + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
        if OVER_CHANNELS:
            w = _decode_tile(codes_ptr, book_ptr, scales_ptr, n[:, None], k[None, :], n_rows, length, n_bytes,
                             n_groups, rows_per_book, SEG, BITS, K, GROUP, HAS_SCALES)  # (BLOCK_N, BLOCK_K)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        else:
            w = _decode_tile(codes_ptr, book_ptr, scales_ptr, k[:, None], n[None, :], n_rows, length, n_bytes,
                             n_groups, rows_per_book, SEG, BITS, K, GROUP, HAS_SCALES)  # (BLOCK_K, BLOCK_N)
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    out = out_ptr + (pid_s * n_tokens + t[:, None].to(tl.int64)) * n_out + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(t[:, None] < n_tokens) & (n[None, :] < n_out))


@triton.jit
def _gemv_words_kernel(x_ptr, words_ptr, book_ptr, scales_ptr, out_ptr,
                       n_tokens, n_rows, length, words_per_row, n_groups, rows_per_book, split_words,
                       SEG: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr,
                       HAS_SCALES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_W: tl.constexpr):
    """out[split, t, n] = sum over this program's words of channel n of x[t, p] M[n, p], M's rows being outputs.

    A word holds CPW = 32 / BITS codes; word w of a row covers positions [w CPW SEG, (w + 1) CPW SEG), all in one
    scale group. Tiles are (tokens, channels, words, codes in a word).
    """
    CPW: tl.constexpr = 32 // BITS
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, CPW)[None, None, :]
    rows = n[:, None, None]
    tokens = t[:, None, None, None]
    book = (rows // rows_per_book) * K
    acc = tl.zeros((BLOCK_T, BLOCK_N, BLOCK_W, CPW), dtype=tl.float32)
    for w0 in range(0, split_words, BLOCK_W):
        w = (tl.program_id(1) * split_words + w0 + tl.arange(0, BLOCK_W))[None, :, None]
        mask = (rows < n_rows) & (w < words_per_row)
        word = tl.load(words_ptr + rows * words_per_row + w, mask=mask, other=0)
        entry = (book + ((word >> (j * BITS)) & ((1 << BITS) - 1))) * SEG
        position = (w * CPW + j) * SEG
        x_mask = (tokens < n_tokens) & (w[None] < words_per_row)
        if HAS_SCALES:
            scale = tl.load(scales_ptr + rows * n_groups + (w * (CPW * SEG)) // GROUP, mask=mask, other=0.0)
        for s in tl.static_range(SEG):
            value = tl.load(book_ptr + entry + s, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALES:
                value *= scale.to(tl.float32)
            x = tl.load(x_ptr + tokens.to(tl.int64) * length + position[None] + s, mask=x_mask, other=0.0)
            acc += x.to(tl.float32) * value[None]
    total = tl.sum(tl.sum(acc, axis=3), axis=2)
    out = out_ptr + (tl.program_id(1) * n_tokens + t[:, None].to(tl.int64)) * n_rows + n[None, :]
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=(t[:, None] < n_tokens) & (n[None, :] < n_rows))


@triton.jit
def _load(pointer, mask, other, MASKED: tl.constexpr):
    """tl.load, masked only where a tile may cross the matrix's edge (MASKED)."""
    if MASKED:
        return tl.load(pointer, mask=mask, other=other)
    else:
        return tl.load(pointer)


@triton.jit
def _codeword_value(packed, s: tl.constexpr, VALUE_BITS: tl.constexpr, value_type: tl.constexpr):
    """Value s of a codeword loaded whole as one integer of its VALUE_BITS-bit values, as float32."""
    bits = (packed >> (s * VALUE_BITS)) & ((1 << VALUE_BITS) - 1)
    if VALUE_BITS == 16:
        return bits.to(tl.int16).to(value_type, bitcast=True).to(tl.float32)
    else:
        return bits.to(tl.int32).to(value_type, bitcast=True).to(tl.float32)


@triton.jit
def _gemv_token_kernel(x_ptr, words_ptr, book_ptr, packed_book_ptr, scales_ptr, out_ptr,
                       n_rows, words_per_row, n_groups, rows_per_book, split_words,
                       SEG: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr,
                       HAS_SCALES: tl.constexpr, ONE_BOOK: tl.constexpr, VALUE_BITS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, EVEN_N: tl.constexpr, EVEN_W: tl.constexpr):
    """out[split, n] = sum over this program's words of channel n of x[p] M[n, p], for one token.

    Every tensor is a (channels, words) tile in the layout of the coalesced word load and the codes of a word are
    unrolled, so there is no layout conversion and each activation is loaded once per thread for all the channels
    it holds. VALUE_BITS > 0: `packed_book_ptr` views the codebook as one integer a codeword (SEG values of
    VALUE_BITS bits in 4 or 8 bytes), so a code costs one gather instead of SEG. ONE_BOOK: one codebook for the
    matrix. EVEN_N / EVEN_W: the tiles never cross the matrix's edge, so no masks.
    """
    CPW: tl.constexpr = 32 // BITS
    VPW: tl.constexpr = CPW * SEG
    EVEN: tl.constexpr = EVEN_N and EVEN_W
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = n[:, None]
    book = (rows // rows_per_book) * K
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for w0 in range(0, split_words, BLOCK_W):
        w = (tl.program_id(1) * split_words + w0 + tl.arange(0, BLOCK_W))[None, :]
        in_w = w < words_per_row
        mask = (rows < n_rows) & in_w
        word = _load(words_ptr + rows * words_per_row + w, mask, 0, not EVEN)
        part = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        for c in tl.static_range(CPW):
            index = (word >> (c * BITS)) & ((1 << BITS) - 1)
            if not ONE_BOOK:
                index += book
            if VALUE_BITS > 0:
                packed = _load(packed_book_ptr + index, mask, 0, not EVEN)
            for s in tl.static_range(SEG):
                x = _load(x_ptr + w * VPW + (c * SEG + s), in_w, 0.0, not EVEN_W)
                if VALUE_BITS > 0:
                    value = _codeword_value(packed, s, VALUE_BITS, book_ptr.dtype.element_ty)
                else:
                    value = _load(book_ptr + index * SEG + s, mask, 0.0, not EVEN)
                part += x.to(tl.float32) * value.to(tl.float32)
        if HAS_SCALES:  # a word's values share one scale: one multiply a word
            scale = _load(scales_ptr + rows * n_groups + (w * VPW) // GROUP, mask, 0.0, not EVEN)
            part *= scale.to(tl.float32)
        acc += part
    out = out_ptr + tl.program_id(1) * n_rows + n
    tl.store(out, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=n < n_rows)


@triton.jit
def _dequant_kernel(codes_ptr, book_ptr, scales_ptr, out_ptr, start, stop, length, n_bytes, n_groups,
                    rows_per_book, SEG: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr,
                    HAS_SCALES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r, c] = M[start + r, c] for channels start:stop, in out's dtype."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = start + r[:, None]
    w = _decode_tile(codes_ptr, book_ptr, scales_ptr, rows, c[None, :], stop, length, n_bytes, n_groups,
                     rows_per_book, SEG, BITS, K, GROUP, HAS_SCALES)
    out = out_ptr + r[:, None].to(tl.int64) * length + c[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=(rows < stop) & (c[None, :] < length))


@triton.jit
def _dequant_words_kernel(words_ptr, book_ptr, scales_ptr, out_ptr, start, stop, words_per_row, n_groups,
                          rows_per_book, SEG: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr,
                          HAS_SCALES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[r, :] = M[start + r, :] for channels start:stop, reading the codes a 32-bit word at a time.

    Tiles are (channels, words, codes in a word, values in a segment); a word's values share one scale.
    """
    CPW: tl.constexpr = 32 // BITS
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None, None]
    w = (tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :, None]
    j = tl.arange(0, CPW)[None, None, :]
    rows = start + r
    mask = (rows < stop) & (w < words_per_row)
    word = tl.load(words_ptr + rows * words_per_row + w, mask=mask, other=0)
    entry = ((rows // rows_per_book) * K + ((word >> (j * BITS)) & ((1 << BITS) - 1))) * SEG
    s = tl.arange(0, SEG)[None, None, None, :]
    value = tl.load(book_ptr + entry[:, :, :, None] + s, mask=mask[:, :, :, None], other=0.0).to(tl.float32)
    if HAS_SCALES:
        scale = tl.load(scales_ptr + rows * n_groups + (w * (CPW * SEG)) // GROUP, mask=mask, other=0.0)
        value *= scale.to(tl.float32)[:, :, :, None]
    position = ((w * CPW + j) * SEG)[:, :, :, None] + s
    out = out_ptr + r[:, :, :, None].to(tl.int64) * (words_per_row * CPW * SEG) + position
    tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask[:, :, :, None])


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _table_args(spec: LayerSpec, codes: torch.Tensor) -> tuple[list[int], dict[str, int | bool]]:
    """Runtime and constexpr arguments describing the layout to `_decode_tile`."""
    group = spec.scale_group_size if spec.scale_groups else 1
    runtime = [spec.channel_length, codes.numel(), max(spec.scale_groups, 1), spec.channels_per_codebook]
    const = dict(SEG=spec.segment_length, BITS=spec.code_bits, K=spec.n_clusters, GROUP=group,
                 HAS_SCALES=bool(spec.scale_groups))
    return runtime, const


def dequantize_tile(codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, spec: LayerSpec,
                    start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Channels start:stop of the codebook term as a (stop - start, channel_length) tensor of `dtype`."""
    out = torch.empty(stop - start, spec.channel_length, dtype=dtype, device=codes.device)
    (length, n_bytes, n_groups, rows_per_book), const = _table_args(spec, codes)
    scales = codebook if scales is None else scales
    words = _code_words(codes) if word_stream_reason(spec) is None else None
    if words is not None:
        words_per_row, values_per_word = _word_shape(spec)
        block_w = min(triton.next_power_of_2(words_per_row), max(1, DEQUANT_TILE_WIDTH // values_per_word))
        block_r = max(1, DEQUANT_TILE // (block_w * values_per_word))
        grid = (triton.cdiv(stop - start, block_r), triton.cdiv(words_per_row, block_w))
        _dequant_words_kernel[grid](words, codebook, scales, out, start, stop, words_per_row, n_groups,
                                    rows_per_book, BLOCK_R=block_r, BLOCK_W=block_w, num_warps=DEQUANT_WARPS,
                                    **const)
        return out
    block_r, block_c = 16, 128
    grid = (triton.cdiv(stop - start, block_r), triton.cdiv(length, block_c))
    _dequant_kernel[grid](codes, codebook, scales, out, start, stop, length, n_bytes, n_groups, rows_per_book,
                          BLOCK_R=block_r, BLOCK_C=block_c, enable_fp_fusion=True, **const)
    return out


def _word_shape(spec: LayerSpec) -> tuple[int, int]:
    """(32-bit words a channel's codes fill, weights a word decodes to) for the word readers."""
    return spec.segments_per_channel * spec.code_bits // 32, 32 // spec.code_bits * spec.segment_length


def word_stream_reason(spec: LayerSpec) -> str | None:
    """Why `_gemv_words_kernel` cannot read this layout's codes a 32-bit word at a time, or None when it can."""
    if spec.code_bits not in (1, 2, 4, 8):
        return f"{spec.code_bits}-bit codes do not tile a 32-bit word"
    if spec.segment_length not in (1, 2, 4, 8):
        return f"segments of {spec.segment_length} values (1, 2, 4 or 8 read by word)"
    if spec.segments_per_channel * spec.code_bits % 32:
        return f"a channel's {spec.segments_per_channel * spec.code_bits} code bits do not fill whole words"
    values_per_word = _word_shape(spec)[1]
    if spec.scale_groups and spec.scale_group_size % values_per_word:
        return f"scale groups of {spec.scale_group_size} split a word's {values_per_word} values"
    return None


def _code_words(codes: torch.Tensor) -> torch.Tensor | None:
    """The packed byte stream viewed as little-endian int32 words, or None when its size or address do not allow."""
    if codes.numel() % 4 or codes.data_ptr() % 4:
        return None
    return codes.view(torch.int32)


def _gemv_words(x2: torch.Tensor, words: torch.Tensor, codebook, scales, spec: LayerSpec,
                split: int | None) -> torch.Tensor:
    tokens = x2.shape[0]
    words_per_row, values_per_word = _word_shape(spec)
    block_t = min(triton.next_power_of_2(tokens), GEMV_BLOCK_TOKENS)
    block_n = WORDS_BLOCK_N
    block_w = max(1, min(triton.next_power_of_2(words_per_row), WORDS_TILE // (block_n * block_t * values_per_word)))
    n_blocks = triton.cdiv(spec.channels, block_n)
    if split is None:
        split = max(1, -(-4 * _sm_count(x2.device) // n_blocks))
    split_words = triton.cdiv(triton.cdiv(words_per_row, min(split, triton.cdiv(words_per_row, block_w))),
                              block_w) * block_w
    split = triton.cdiv(words_per_row, split_words)
    out = torch.empty(split, tokens, spec.channels, dtype=x2.dtype if split == 1 else torch.float32,
                      device=x2.device)
    group = spec.scale_group_size if spec.scale_groups else 1
    grid = (n_blocks, split, triton.cdiv(tokens, block_t))
    _gemv_words_kernel[grid](x2, words, codebook, codebook if scales is None else scales, out, tokens, spec.channels,
                             spec.channel_length, words_per_row, max(spec.scale_groups, 1),
                             spec.channels_per_codebook, split_words, SEG=spec.segment_length, BITS=spec.code_bits,
                             K=spec.n_clusters, GROUP=group, HAS_SCALES=bool(spec.scale_groups), BLOCK_T=block_t,
                             BLOCK_N=block_n, BLOCK_W=block_w, num_warps=WORDS_WARPS, enable_fp_fusion=True)
    return out[0] if split == 1 else out.sum(0)


def _packed_codewords(codebook: torch.Tensor) -> torch.Tensor | None:
    """The codebook viewed as one 32- or 64-bit integer a codeword (2 or 4 values filling 4 or 8 bytes), or None."""
    values, size = codebook.shape[-1], codebook.element_size()
    width = values * size
    if values < 2 or size not in (2, 4) or width not in (4, 8) or codebook.data_ptr() % width:
        return None
    return codebook.view(torch.int32 if width == 4 else torch.int64)


def _gemv_token(x2: torch.Tensor, words: torch.Tensor, codebook, scales, spec: LayerSpec,
                split: int | None) -> torch.Tensor:
    """One token through `_gemv_token_kernel`: (1, channels) in x2's dtype."""
    words_per_row = _word_shape(spec)[0]
    block_n, block_w = TOKEN_BLOCK_N, min(TOKEN_BLOCK_W, triton.next_power_of_2(words_per_row))
    n_blocks = triton.cdiv(spec.channels, block_n)
    word_blocks = triton.cdiv(words_per_row, block_w)
    if split is None:  # about TOKEN_PROGRAMS_PER_SM programs a multiprocessor, splitting the words evenly
        target = min(word_blocks, -(-TOKEN_PROGRAMS_PER_SM * _sm_count(x2.device) // n_blocks))
        split = max(d for d in range(1, target + 1) if word_blocks % d == 0)
    split_words = triton.cdiv(word_blocks, min(max(split, 1), word_blocks)) * block_w
    split = triton.cdiv(words_per_row, split_words)
    out = torch.empty(split, spec.channels, dtype=x2.dtype if split == 1 else torch.float32, device=x2.device)
    group = spec.scale_group_size if spec.scale_groups else 1
    packed = _packed_codewords(codebook)
    _gemv_token_kernel[(n_blocks, split)](
        x2, words, codebook, codebook if packed is None else packed, codebook if scales is None else scales, out,
        spec.channels, words_per_row, max(spec.scale_groups, 1), spec.channels_per_codebook, split_words,
        SEG=spec.segment_length, BITS=spec.code_bits, K=spec.n_clusters, GROUP=group,
        HAS_SCALES=bool(spec.scale_groups), ONE_BOOK=spec.n_codebooks == 1,
        VALUE_BITS=0 if packed is None else codebook.element_size() * 8, BLOCK_N=block_n, BLOCK_W=block_w,
        EVEN_N=spec.channels % block_n == 0, EVEN_W=words_per_row % split_words == 0, num_warps=TOKEN_WARPS,
        enable_fp_fusion=True)
    return out[0:1] if split == 1 else out.sum(0, keepdim=True)


def _gemv(x2: torch.Tensor, codes, codebook, scales, spec: LayerSpec, over_channels: bool,
          split: int | None, kernel: str) -> torch.Tensor:
    by_words = kernel != "gemv_bytes"
    words = _code_words(codes) if by_words and over_channels and word_stream_reason(spec) is None else None
    if words is not None:
        if x2.shape[0] == 1 and kernel == "gemv_token":
            return _gemv_token(x2, words, codebook, scales, spec, split)
        return _gemv_words(x2, words, codebook, scales, spec, split)
    tokens, n_reduce = x2.shape
    n_out = spec.channels if over_channels else spec.channel_length
    block_t = min(triton.next_power_of_2(tokens), GEMV_BLOCK_TOKENS)
    # Tiles run along M's rows, whose bytes are contiguous: wide in k over channels, wide in n otherwise. About 2048
    # weights a tile keeps the sm_90 build under 100 registers a thread (cuobjdump) for one or two tokens.
    block_n, block_k = (8, max(32, 256 // block_t)) if over_channels else (max(32, 256 // block_t), 8)
    n_blocks = triton.cdiv(n_out, block_n)
    if split is None:  # enough programs for about four per multiprocessor
        split = max(1, -(-4 * _sm_count(x2.device) // n_blocks))
    split_len = triton.cdiv(triton.cdiv(n_reduce, min(split, triton.cdiv(n_reduce, block_k))), block_k) * block_k
    split = triton.cdiv(n_reduce, split_len)
    dtype = x2.dtype if split == 1 else torch.float32
    out = torch.empty(split, tokens, n_out, dtype=dtype, device=x2.device)
    (length, n_bytes, n_groups, rows_per_book), const = _table_args(spec, codes)
    grid = (n_blocks, split, triton.cdiv(tokens, block_t))
    _gemv_kernel[grid](x2, codes, codebook, codebook if scales is None else scales, out, tokens, spec.channels,
                       length, n_bytes, n_groups, rows_per_book, split_len, OVER_CHANNELS=over_channels,
                       BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, enable_fp_fusion=True, **const)
    return out[0] if split == 1 else out.sum(0)


def _dequant_gemm(x2: torch.Tensor, codes, codebook, scales, spec: LayerSpec, over_channels: bool) -> torch.Tensor:
    dtype = x2.dtype if x2.dtype in (torch.float16, torch.bfloat16) else torch.float32
    xd = x2.to(dtype)
    out = None
    for a, b in channel_tiles(spec, GPU_TILE_ELEMENTS):
        tile = dequantize_tile(codes, codebook, scales, spec, a, b, dtype)
        if over_channels:  # M's rows are the outputs: y[:, a:b] = x M[a:b]^T
            part = F.linear(xd, tile)
            if (a, b) == (0, spec.channels):
                return part
            if out is None:
                out = xd.new_empty(xd.shape[0], spec.channels)
            out[:, a:b] = part
        else:  # M's rows are the inputs: y += x[:, a:b] M[a:b], summed in float32
            part = (xd[:, a:b] @ tile).float()
            out = part if out is None else out + part
    return out


def triton_codebook_matmul(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None,
                           spec: LayerSpec, *, transposed: bool = False, kernel: str | None = None,
                           split: int | None = None) -> torch.Tensor:
    """x W_c^T (or x W_c when `transposed`, the input gradient) with the Triton kernels, in x's dtype.

    `kernel` is "gemv", "dequant_gemm" or None (by the number of tokens), "gemv_token" (the one-token kernel where
    the call has one token and the word reader applies, else "gemv"), or "gemv_bytes" (the GEMV's byte reader
    where the word reader would run, to compare them); `split` fixes how many programs share the
    reduced axis of the GEMV (None: enough to fill the GPU). The dispatch calls this for CUDA tensors; tests call it
    directly on CPU tensors with TRITON_INTERPRET=1 set before triton is imported.
    """
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(f"the Triton kernels cannot run layout {spec.to_dict()}: {reason}")
    features = spec.out_features if transposed else spec.in_features
    x2 = x.reshape(-1, features).contiguous()
    over_channels = (spec.cluster_dim == "output") != transposed
    if kernel is None:
        kernel = "gemv" if x2.shape[0] <= GEMV_MAX_TOKENS else "dequant_gemm"
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    args = (codes.contiguous(), codebook.contiguous(), None if scales is None else scales.contiguous(), spec)
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, spec.in_features if transposed else spec.out_features)
    elif kernel.startswith("gemv"):
        y = _gemv(x2, *args, over_channels, split, kernel)
    else:
        y = _dequant_gemm(x2, *args, over_channels)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
