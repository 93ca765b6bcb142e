"""Triton kernels (swsc_hf/kernels/triton_gpu.py) against `reference_codebook_matmul` on every layout.

With CUDA the comparisons run compiled on the GPU. Without, they run on CPU tensors in Triton's interpreter, which
needs TRITON_INTERPRET=1 before triton is first imported (triton's own library functions are decorated then, and
torch imports triton early): `test_in_triton_interpreter` reruns this file in a subprocess with it set.
Tolerances (relative to the largest output): float32 activations 1e-5 (float32 accumulation in another order);
bfloat16 1e-2 for the GEMV (one rounding of the output, as the reference) and 2e-2 for dequant + GEMM (the
tiles are rounded to bfloat16 before cuBLAS multiplies them).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import KERNEL_LAYOUTS

from swsc_hf.core.packing import pack_codes
from swsc_hf.core.spec import LayerSpec
from swsc_hf.kernels import (
    choose_kernel,
    codebook_matmul,
    dequantize_channels,
    reference_codebook_matmul,
    set_kernels_enabled,
)

triton = pytest.importorskip("triton", reason="triton is not installed (in the test extra: pip install -e .[test])")

from swsc_hf.kernels import triton_gpu  # noqa: E402  (after the skip)

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if CUDA and not INTERPRETED else "cpu")
runs_kernels = pytest.mark.skipif(not (CUDA or INTERPRETED),
                                  reason="no CUDA: runs in test_in_triton_interpreter's TRITON_INTERPRET=1 subprocess")

# The CPU kernels' layouts (conftest.KERNEL_LAYOUTS), and what only the Triton kernels cover.
LAYOUTS = [
    *KERNEL_LAYOUTS,
    (33, 64, 128, 2, "output", 32, 0),    # 7-bit pairs straddling bytes
    (30, 48, 16, 3, "output", 24, 0),     # 3-dim vectors, group 24
    (20, 36, 2, 1, "input", 10, 5),       # 1-bit codes, group 10, codebook per 5 channels
    (64, 256, 16, 1, "output", 128, 0),   # swsc-4bit in whole tiles of the one-token GEMV (no masks)
    (64, 512, 256, 4, "output", 128, 0),  # swsc-2bit in whole tiles of the one-token GEMV
]
TOKENS = {torch.float32: (1, 3, 8, 9, 17), torch.bfloat16: (1, 5, 17)}  # each run is slow interpreted
# The last two layouts test the kernels without channel masks, not the token counts: fewer runs (the largest, so the
# slowest interpreted: a fifth of this file's interpreted time with every count)
WHOLE_TILES = LAYOUTS[-2:]
WHOLE_TILE_TOKENS = (1, 8)
TOLERANCE = {torch.float32: {"gemv": 1e-5, "gemv_token": 1e-5, "gemv_bytes": 1e-5, "dequant_gemm": 1e-5},
             torch.bfloat16: {"gemv": 1e-2, "gemv_token": 1e-2, "gemv_bytes": 1e-2, "dequant_gemm": 2e-2}}


def make_layer(layout, seed: int = 0):
    out_f, in_f, k, seg, dim, group, rows = layout
    spec = LayerSpec(out_f, in_f, n_clusters=k, segment_length=seg, cluster_dim=dim, scale_group_size=group,
                     rows_per_codebook=rows)
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(spec.n_codebooks, k, seg, generator=g).half()
    codes = torch.randint(0, k, (spec.channels, spec.segments_per_channel), generator=g)
    scales = (torch.rand(spec.channels, spec.scale_groups, generator=g) + 0.5).half() if spec.scale_groups else None
    tensors = [pack_codes(codes, spec.code_bits), codebook, scales]
    return spec, [None if t is None else t.to(DEVICE) for t in tensors]


def assert_close(got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    expected = expected.float().cpu()
    torch.testing.assert_close(got.float().cpu(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_both_kernels_equal_reference(layout, dtype):
    spec, tensors = make_layer(layout)
    assert triton_gpu.unsupported_reason(spec) is None
    g = torch.Generator().manual_seed(1)
    for tokens in WHOLE_TILE_TOKENS if layout in WHOLE_TILES else TOKENS[dtype]:
        x = torch.randn(tokens, spec.in_features, generator=g).to(dtype).to(DEVICE)
        expected = reference_codebook_matmul(x.cpu(), *[t if t is None else t.cpu() for t in tensors], spec)
        for kernel in triton_gpu.KERNELS:
            got = triton_gpu.triton_codebook_matmul(x, *tensors, spec, kernel=kernel)
            assert got.dtype == dtype and got.shape == (tokens, spec.out_features)
            assert_close(got, expected, TOLERANCE[dtype][kernel])


@runs_kernels
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_transposed_product_is_the_input_gradient(layout):
    spec, tensors = make_layer(layout, seed=2)
    weight = dequantize_channels(*[t if t is None else t.cpu() for t in tensors], spec)
    weight = weight if spec.cluster_dim == "output" else weight.t()  # W, out x in
    g = torch.Generator().manual_seed(3)
    for tokens in (1,) if layout in WHOLE_TILES else (1, 4, 11):
        grad = torch.randn(tokens, spec.out_features, generator=g)
        expected = grad.double() @ weight.double()
        for kernel in triton_gpu.KERNELS:
            got = triton_gpu.triton_codebook_matmul(grad.to(DEVICE), *tensors, spec, transposed=True, kernel=kernel)
            assert got.shape == (tokens, spec.in_features)
            assert_close(got, expected, 1e-5)


@runs_kernels
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[4], LAYOUTS[11]], ids=["output", "input", "odd"])
def test_gemv_split_over_programs_adds_the_same_sum(layout):
    spec, tensors = make_layer(layout, seed=4)
    for tokens, kernel in ((3, "gemv"), (1, "gemv_token")):
        x = torch.randn(tokens, spec.in_features, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        whole = triton_gpu.triton_codebook_matmul(x, *tensors, spec, kernel=kernel, split=1)
        for split in (2, 3, 1000):
            got = triton_gpu.triton_codebook_matmul(x, *tensors, spec, kernel=kernel, split=split)
            assert_close(got, whole, 1e-5)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("segment", [2, 4])
def test_one_token_kernel_reads_whole_codewords_of_any_table_dtype(dtype, segment):
    """Codewords of 4 or 8 bytes are gathered as one integer and split into their values (16- or 32-bit)."""
    spec, tensors = make_layer((24, 64, 256, segment, "output", 32, 0), seed=10)
    tensors[1] = tensors[1].to(dtype)
    packed = triton_gpu._packed_codewords(tensors[1])
    assert (packed is not None) == (segment * tensors[1].element_size() in (4, 8))
    x = torch.randn(1, spec.in_features, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    expected = reference_codebook_matmul(x.cpu(), *[t if t is None else t.cpu() for t in tensors], spec)
    assert_close(triton_gpu.triton_codebook_matmul(x, *tensors, spec, kernel="gemv_token"), expected, 1e-5)


@runs_kernels
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[4], LAYOUTS[8], LAYOUTS[9]],
                         ids=["words", "bytes", "words-odd-rows", "input"])
def test_dequant_gemm_in_channel_tiles_adds_up_to_the_whole(layout, monkeypatch):
    """Layers over GPU_TILE_ELEMENTS weights are dequantized a few channels at a time (outputs written per tile,
    or partial products summed when the channels are inputs)."""
    spec, tensors = make_layer(layout, seed=8)
    x = torch.randn(5, spec.in_features, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    expected = reference_codebook_matmul(x.cpu(), *[t if t is None else t.cpu() for t in tensors], spec)
    monkeypatch.setattr(triton_gpu, "GPU_TILE_ELEMENTS", 3 * spec.channel_length)
    assert_close(triton_gpu.triton_codebook_matmul(x, *tensors, spec, kernel="dequant_gemm"), expected, 1e-5)


@runs_kernels
def test_leading_dims_and_zero_tokens():
    spec, tensors = make_layer(LAYOUTS[1], seed=6)
    x = torch.randn(2, 3, spec.in_features, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    got = triton_gpu.triton_codebook_matmul(x, *tensors, spec)
    assert got.shape == (2, 3, spec.out_features)
    assert_close(got, reference_codebook_matmul(x.cpu(), *[t if t is None else t.cpu() for t in tensors], spec), 1e-5)
    empty = triton_gpu.triton_codebook_matmul(x[:, :0], *tensors, spec)
    assert empty.shape == (2, 0, spec.out_features)


@runs_kernels
def test_unsupported_layouts_and_kernel_names_are_refused():
    spec = LayerSpec(16, 32, n_clusters=512, segment_length=1)  # 9-bit codes
    assert "9-bit codes" in triton_gpu.unsupported_reason(spec)
    with pytest.raises(ValueError, match="9-bit codes"):
        triton_gpu.triton_codebook_matmul(torch.randn(1, 32), torch.zeros(36, dtype=torch.uint8),
                                          torch.randn(1, 512, 1), None, spec)
    spec, tensors = make_layer(LAYOUTS[0])
    with pytest.raises(ValueError, match="kernel must be one of"):
        triton_gpu.triton_codebook_matmul(torch.randn(1, spec.in_features), *tensors, spec, kernel="fused")


def test_dispatch_picks_triton_for_cuda_tensors_and_says_why_not(caplog):
    spec = LayerSpec(48, 96, n_clusters=16, segment_length=1, scale_group_size=32)
    cuda = torch.device("cuda")
    assert choose_kernel(spec, cuda, 1) == "triton_gemv"
    assert choose_kernel(spec, cuda, triton_gpu.GEMV_MAX_TOKENS) == "triton_gemv"
    assert choose_kernel(spec, cuda, triton_gpu.GEMV_MAX_TOKENS + 1) == "triton_dequant_gemm"
    odd = LayerSpec(30, 48, n_clusters=16, segment_length=3, scale_group_size=24)  # outside the CPU kernels
    assert choose_kernel(odd, cuda, 1) == "triton_gemv"
    wide = LayerSpec(16, 32, n_clusters=512, segment_length=1)
    with caplog.at_level(logging.INFO, logger="swsc_hf.kernels.dispatch"):
        assert choose_kernel(wide, cuda, 1) == "reference"
        previous = set_kernels_enabled(False)
        try:
            assert choose_kernel(LayerSpec(44, 88, n_clusters=8, scale_group_size=22), cuda, 1) == "reference"
        finally:
            set_kernels_enabled(previous)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "9-bit codes" in messages and "set_kernels_enabled(False)" in messages


def test_word_stream_covers_the_presets_and_says_why_not():
    """The GEMV reads whole 32-bit words of codes for the 4- and 2-bit presets; other layouts keep the byte reader."""
    assert triton_gpu.word_stream_reason(LayerSpec(576, 1536, n_clusters=16, scale_group_size=128)) is None
    assert triton_gpu.word_stream_reason(LayerSpec(576, 1536, n_clusters=256, segment_length=4,
                                                    scale_group_size=128)) is None
    assert "6-bit codes" in triton_gpu.word_stream_reason(LayerSpec(576, 1536, n_clusters=64, segment_length=2))
    assert "segments of 3" in triton_gpu.word_stream_reason(LayerSpec(30, 48, n_clusters=16, segment_length=3))
    assert "whole words" in triton_gpu.word_stream_reason(LayerSpec(48, 36, n_clusters=16))  # 144 bits a channel
    assert "split a word" in triton_gpu.word_stream_reason(LayerSpec(48, 96, n_clusters=256, segment_length=4,
                                                                     scale_group_size=8))


@pytest.mark.skipif(INTERPRETED, reason="the interpreter replaces compilation")
@pytest.mark.parametrize("kernel,over,seg,bits,tokens", [
    ("gemv", True, 1, 4, 1), ("gemv", False, 1, 4, 1), ("gemv", True, 2, 6, 8), ("gemv", False, 3, 5, 2),
    ("dequant", None, 4, 8, None), ("dequant", None, 1, 3, None), ("words", None, 1, 4, 1), ("words", None, 4, 8, 4),
    ("words", None, 1, 2, 8), ("dequant_words", None, 1, 4, None), ("dequant_words", None, 4, 8, None),
    ("token", True, 1, 4, 0), ("token", False, 1, 4, 0), ("token", True, 4, 8, 0), ("token", False, 2, 4, 0),
    ("token", True, 4, 8, 16), ("token", False, 2, 8, 16)])
def test_kernels_compile_for_hopper_without_a_gpu(kernel, over, seg, bits, tokens):
    """Triton's ahead-of-time compile for sm_90 (its bundled ptxas; no driver needed) of the kernels' variants."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = {"gemv": triton_gpu._gemv_kernel, "dequant": triton_gpu._dequant_kernel,
          "words": triton_gpu._gemv_words_kernel, "dequant_words": triton_gpu._dequant_words_kernel,
          "token": triton_gpu._gemv_token_kernel}[kernel]
    const = dict(SEG=seg, BITS=bits, K=2**bits, GROUP=128, HAS_SCALES=True)
    if kernel == "gemv":
        block_t = tokens
        const.update(OVER_CHANNELS=over, BLOCK_T=block_t, BLOCK_N=8 if over else 256 // block_t,
                     BLOCK_K=256 // block_t if over else 8)
    elif kernel == "words":
        const.update(BLOCK_T=tokens, BLOCK_N=4, BLOCK_W=4096 // (4 * tokens * 32 // bits * seg))
    elif kernel == "token":  # one token; `over`: whole tiles (no masks) and one codebook, or not; `tokens`: VALUE_BITS
        const.update(BLOCK_N=triton_gpu.TOKEN_BLOCK_N, BLOCK_W=triton_gpu.TOKEN_BLOCK_W, EVEN_N=over, EVEN_W=over,
                     ONE_BOOK=over, VALUE_BITS=tokens)
    elif kernel == "dequant_words":
        const.update(BLOCK_R=4, BLOCK_W=1024 // (32 // bits * seg))
    else:
        const.update(BLOCK_R=16, BLOCK_C=128)
    pointers = {"x_ptr": "*bf16", "codes_ptr": "*u8", "words_ptr": "*i32", "book_ptr": "*fp16", "scales_ptr": "*fp16",
                "out_ptr": "*bf16", "packed_book_ptr": {4: "*i64", 2: "*i32"}.get(seg, "*fp16")}
    signature = {name: "constexpr" if name in const else pointers.get(name, "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=const), target=GPUTarget("cuda", 90, 32),
                              options={"enable_fp_fusion": True})
    assert compiled.asm["cubin"]


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the kernels run in this process")
def test_in_triton_interpreter():
    """Every test above on CPU tensors in Triton's interpreter: this file in a process started with
    TRITON_INTERPRET=1."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 2 * len(LAYOUTS) and "failed" not in summary, summary


@pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs CUDA")
class TestOnCuda:
    """The dispatch on real CUDA tensors: the custom op, its gradient, torch.compile and a CUDA graph."""

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
    def test_codebook_matmul_routes_to_triton(self, dtype):
        spec, tensors = make_layer(LAYOUTS[0])
        cpu_tensors = [t if t is None else t.cpu() for t in tensors]
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for tokens in (1, 33):
            assert choose_kernel(spec, DEVICE, tokens).startswith("triton_")
            x = torch.randn(tokens, spec.in_features).to(dtype)
            with torch.no_grad():
                got = codebook_matmul(x.to(DEVICE), *tensors, spec)
            assert got.device.type == "cuda" and got.dtype == dtype
            assert_close(got, reference_codebook_matmul(x, *cpu_tensors, spec), tol)

    def test_input_gradient_and_compile(self):
        spec, tensors = make_layer(LAYOUTS[4])
        cpu_tensors = [t if t is None else t.cpu() for t in tensors]
        x = torch.randn(5, spec.in_features)
        xg = x.to(DEVICE).requires_grad_(True)
        codebook_matmul(xg, *tensors, spec).sum().backward()
        xc = x.clone().requires_grad_(True)
        reference_codebook_matmul(xc, *cpu_tensors, spec).sum().backward()
        assert_close(xg.grad, xc.grad, 1e-4)
        compiled = torch.compile(lambda v: codebook_matmul(v, *tensors, spec) * 2, fullgraph=True)
        with torch.no_grad():
            assert_close(compiled(x.to(DEVICE)), 2 * reference_codebook_matmul(x, *cpu_tensors, spec), 1e-4)

    def test_decode_call_replays_in_a_cuda_graph(self):
        spec, tensors = make_layer(LAYOUTS[1])
        x = torch.randn(1, spec.in_features, device=DEVICE, dtype=torch.float16)
        with torch.no_grad():
            codebook_matmul(x, *tensors, spec)  # warm-up: compiles the kernel outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = codebook_matmul(x, *tensors, spec)
            x.normal_()
            expected = codebook_matmul(x, *tensors, spec)
            graph.replay()
        torch.cuda.synchronize()
        assert_close(out, expected, 1e-3)
