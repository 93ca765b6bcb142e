"""Compressed matmul kernels against a brute-force oracle: every layout, instruction set, token count and dtype."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ISAS, KERNEL_LAYOUTS, tiny_llama_config
from transformers import LlamaForCausalLM

import swsc_hf
from swsc_hf import SWSCLinear
from swsc_hf.core.compress import reconstruct_channels
from swsc_hf.core.packing import pack_codes
from swsc_hf.core.spec import LayerSpec
from swsc_hf.kernels import (
    GEMV_MAX_TOKENS,
    choose_kernel,
    codebook_matmul,
    cpu_gemv_kernel,
    cpu_isa,
    decode_attention,
    decode_attention_kernel,
    integer_dot_available,
    limit_cpu_isa,
    load_cpu_kernels,
    reference_codebook_matmul,
    reference_table_grads,
    table_grads,
    unsupported_reason,
)
from swsc_hf.kernels.dispatch import kernel_layout

pytestmark = pytest.mark.skipif(not load_cpu_kernels(), reason="the CPU kernels could not be built here")


def make_layer_tensors(spec: LayerSpec, seed: int = 0, dtype: torch.dtype = torch.float16):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(spec.n_codebooks, spec.n_clusters, spec.segment_length, generator=g).to(dtype)
    codes = torch.randint(0, spec.n_clusters, (spec.channels, spec.segments_per_channel), generator=g)
    scales = None
    if spec.scale_groups:
        scales = (torch.rand(spec.channels, spec.scale_groups, generator=g) + 0.5).to(dtype)
    return codes, pack_codes(codes, spec.code_bits), codebook, scales


def oracle_weight(spec: LayerSpec, codes, codebook, scales) -> torch.Tensor:
    """W (out x in) in float64, element by element from the definition."""
    m = torch.empty(spec.channels, spec.channel_length, dtype=torch.float64)
    for c in range(spec.channels):
        for p in range(spec.channel_length):
            value = float(codebook[c // spec.channels_per_codebook, codes[c, p // spec.segment_length],
                                   p % spec.segment_length])
            if scales is not None:
                value *= float(scales[c, p // spec.scale_group_size])
            m[c, p] = value
    return m if spec.cluster_dim == "output" else m.t()


@pytest.mark.parametrize("layout", KERNEL_LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_kernels_equal_oracle_on_every_layout(layout, isa):
    out_f, in_f, k, seg, dim, group, rows = layout
    spec = LayerSpec(out_f, in_f, n_clusters=k, segment_length=seg, cluster_dim=dim, scale_group_size=group,
                     rows_per_codebook=rows)
    assert unsupported_reason(spec) is None
    codes, packed, codebook, scales = make_layer_tensors(spec)
    weight = oracle_weight(spec, codes, codebook, scales)
    g = torch.Generator().manual_seed(1)
    for tokens in (1, 2, 3, 5, GEMV_MAX_TOKENS, GEMV_MAX_TOKENS + 1, 33):
        assert choose_kernel(spec, torch.device("cpu"), tokens) == (
            "cpu_gemv" if tokens <= GEMV_MAX_TOKENS else "cpu_dequant_gemm")
        x = torch.randn(tokens, in_f, generator=g)
        with torch.no_grad():
            got = codebook_matmul(x, packed, codebook, scales, spec)
        expected = (x.double() @ weight.t()).float()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        # the input gradient runs the transposed kernel
        xg = x.clone().requires_grad_(True)
        grad_out = torch.randn(tokens, out_f, generator=g)
        codebook_matmul(xg, packed, codebook, scales, spec).backward(grad_out)
        expected_grad = (grad_out.double() @ weight).float()
        torch.testing.assert_close(xg.grad, expected_grad, rtol=1e-5, atol=1e-5 * float(expected_grad.abs().max()))


@pytest.mark.parametrize("dim", ["output", "input"])
def test_kernels_split_large_matrices_over_threads(dim):
    """Matrices above the per-thread minimum are split over torch's threads; the result must not change."""
    spec = LayerSpec(1024, 768, n_clusters=16, segment_length=1, cluster_dim=dim, scale_group_size=64)
    _, packed, codebook, scales = make_layer_tensors(spec, seed=5)
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xg = x.clone().requires_grad_(True)
            y = codebook_matmul(xg, packed, codebook, scales, spec)
            y.sum().backward()
            results.append((y.detach(), xg.grad))
    finally:
        torch.set_num_threads(threads)
    expected = reference_codebook_matmul(x, packed, codebook, scales, spec)
    for y, grad in results:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [0, 8])
@pytest.mark.parametrize("clusters, seg", [(256, 2), (32, 2), (40, 1), (128, 1)])
def test_byte_plane_kernels_split_channels_over_threads(rows, clusters, seg):
    """Pairs of 5- and 8-bit codes and scalars of 6- and 7-bit codes (VBMI byte planes in quads of channels where
    the CPU has them, else scalar loads, planes or the general decoder) over threads whose channel ranges split
    quads: each thread's first and last channels take the general decoder."""
    spec = LayerSpec(1030, 192, n_clusters=clusters, segment_length=seg, scale_group_size=96, rows_per_codebook=rows)
    codes, packed, codebook, scales = make_layer_tensors(spec, seed=7)
    weight = oracle_weight(spec, codes, codebook, scales)
    x = torch.randn(1, 192, generator=torch.Generator().manual_seed(8))
    expected = (x.double() @ weight.t()).float()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                got = codebook_matmul(x, packed, codebook, scales, spec)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    finally:
        torch.set_num_threads(threads)
    kernel = cpu_gemv_kernel(packed, codebook, scales, spec)
    if cpu_isa() == "avx512" and integer_dot_available():
        assert kernel == "byte_planes"
    elif cpu_isa() != "portable" and seg == 2:
        assert kernel == "half_pairs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_with_bias_and_low_rank_matches_reference_path(dtype):
    spec = LayerSpec(96, 64, n_clusters=16, segment_length=1, scale_group_size=32, rank=4)
    layer = SWSCLinear(spec, bias=True, dtype=torch.float16, bias_dtype=torch.float32)
    codes, packed, codebook, scales = make_layer_tensors(spec, seed=3)
    with torch.no_grad():
        layer.codes = packed
        layer.codebook.copy_(codebook)
        layer.scales.copy_(scales)
        layer.lowrank_a.normal_()
        layer.lowrank_b.normal_()
        layer.bias.normal_()
    for shape in ((1, 1, 64), (2, 3, 64), (1, 40, 64)):
        x = torch.randn(*shape).to(dtype)
        with torch.no_grad():
            got = layer(x)
            expected = x.float() @ layer.dequantize().t() + layer.bias
        assert got.dtype == dtype and got.shape == (*shape[:-1], 96)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_compile_sees_one_op_without_graph_breaks():
    spec = LayerSpec(48, 64, n_clusters=16, segment_length=1, scale_group_size=32)
    _, packed, codebook, scales = make_layer_tensors(spec)
    compiled = torch.compile(lambda x: codebook_matmul(x, packed, codebook, scales, spec) * 2, fullgraph=True,
                             backend="aot_eager")
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), 2 * reference_codebook_matmul(x, packed, codebook, scales, spec))
    meta = torch.ops.swsc_hf.codebook_matmul(torch.empty(5, 64, device="meta"), packed.to("meta"),
                                             codebook.to("meta"), scales.to("meta"), [48, 64, 16, 1, 0, 32, 0])
    assert meta.shape == (5, 48) and meta.device.type == "meta"


@pytest.mark.parametrize("cluster_dim", ["output", "input"])
def test_compiled_decode_graphs_call_the_cpp_gemv_directly(cluster_dim, monkeypatch):
    # dynamo warns once per process per message: a fresh record, so a warning another test raised first shows here
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())
    spec = LayerSpec(48, 64, n_clusters=16, segment_length=1, cluster_dim=cluster_dim, scale_group_size=16)
    _, packed, codebook, scales = make_layer_tensors(spec)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward

    compiled = torch.compile(lambda x: codebook_matmul(x, packed, codebook, scales, spec), fullgraph=True,
                             dynamic=False, backend=capture)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for tokens in (1, GEMV_MAX_TOKENS + 1):
            x = torch.randn(1, tokens, 64)
            torch.testing.assert_close(compiled(x), reference_codebook_matmul(x, packed, codebook, scales, spec),
                                       rtol=1e-5, atol=1e-5)
    assert not [str(w.message) for w in caught if "swsc_hf" in str(w.message) or "dispatch.py" in str(w.message)]
    gemv = "swsc_hf_cpu.gemv.default" if cluster_dim == "output" else "swsc_hf_cpu.gemv_t.default"
    assert gemv in graphs[0]  # decode: no Python custom op between the graph and the kernel
    assert "swsc_hf.codebook_matmul.default" in graphs[1]  # prefill: the custom op picks tiles + GEMM


@pytest.mark.parametrize("cluster_dim", ["output", "input"])
def test_cpp_gemv_takes_activations_of_any_leading_shape_layout_and_dtype(cluster_dim):
    spec = LayerSpec(48, 64, n_clusters=16, segment_length=1, cluster_dim=cluster_dim, scale_group_size=16)
    _, packed, codebook, scales = make_layer_tensors(spec)
    layout = kernel_layout(spec)
    gemv = torch.ops.swsc_hf_cpu.gemv if cluster_dim == "output" else torch.ops.swsc_hf_cpu.gemv_t
    x = torch.randn(3, 64, 2).transpose(1, 2).to(torch.bfloat16)  # (3, 2, 64), not contiguous
    got = gemv(x, packed, codebook, scales, layout)
    assert got.shape == (3, 2, 48) and got.dtype == torch.bfloat16
    expected = reference_codebook_matmul(x.float(), packed, codebook, scales, spec)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))
    fake = gemv(torch.empty(5, 1, 64, device="meta"), packed.to("meta"), codebook.to("meta"), scales.to("meta"),
                layout)
    assert fake.shape == (5, 1, 48)


def test_unsupported_layout_falls_back_to_reference_with_a_reason(caplog):
    spec = LayerSpec(30, 48, n_clusters=16, segment_length=3, scale_group_size=24)  # 3-dim vectors
    assert "segment_length=3" in unsupported_reason(spec)
    codes, packed, codebook, scales = make_layer_tensors(spec)
    x = torch.randn(2, 48)
    with caplog.at_level(logging.INFO, logger="swsc_hf.kernels.dispatch"), torch.no_grad():
        got = codebook_matmul(x, packed, codebook, scales, spec)
    assert any("segment_length=3" in r.getMessage() for r in caplog.records)
    expected = (x.double() @ oracle_weight(spec, codes, codebook, scales).t()).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def trainable_layer_case(layout: tuple) -> tuple:
    """A layer of `layout` (as in KERNEL_LAYOUTS) with float32 tables, an input and an output gradient."""
    out_f, in_f, k, seg, dim, group, rows = layout
    spec = LayerSpec(out_f, in_f, n_clusters=k, segment_length=seg, cluster_dim=dim, scale_group_size=group,
                     rows_per_codebook=rows)
    codes, packed, codebook, scales = make_layer_tensors(spec, seed=11, dtype=torch.float32)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 5, in_f, generator=g)
    return spec, codes, packed, codebook, scales, x, torch.randn(2, 5, out_f, generator=g)


@pytest.mark.parametrize("layout", KERNEL_LAYOUTS + [(30, 48, 16, 3, "output", 24, 0)],
                         ids=lambda t: "-".join(map(str, t)))
@pytest.mark.parametrize("kernels", [True, False])
def test_trainable_tables_get_the_gradients_of_the_definition(layout, kernels):
    """Table training's written-out gradients (x, codebook, scales) equal autograd through scales * codebook[codes]
    (float64), with the compiled dequant and table gradients, the reference ones, and for a layout the kernels do
    not cover."""
    spec, codes, packed, codebook, scales, x, grad_out = trainable_layer_case(layout)
    dim = spec.cluster_dim
    leaves = [x, codebook] + ([scales] if scales is not None else [])
    oracle = [t.double().requires_grad_(True) for t in leaves]
    channels = reconstruct_channels(spec, oracle[1], codes, oracle[2] if scales is not None else None)
    weight = channels if dim == "output" else channels.t()
    (oracle[0] @ weight.t()).backward(grad_out.double())
    trained = [t.clone().requires_grad_(True) for t in leaves]
    previous = swsc_hf.set_kernels_enabled(kernels)
    try:
        y = codebook_matmul(trained[0], packed, trained[1], trained[2] if scales is not None else None, spec)
        y.backward(grad_out)
    finally:
        swsc_hf.set_kernels_enabled(previous)
    for got, expected in zip(trained, oracle, strict=True):
        scale = float(expected.grad.abs().max())
        torch.testing.assert_close(got.grad, expected.grad.float(), rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("rows", [0, 7])
def test_compiled_table_gradients_split_over_threads_equal_the_reference(rows):
    """Chunks of channels on several threads (a codebook of 7 rows spans chunk boundaries) give the reference's
    gradients, bit for bit the same on every thread count."""
    spec = LayerSpec(700, 512, n_clusters=16, segment_length=1, scale_group_size=64, rows_per_codebook=rows)
    _, packed, codebook, scales = make_layer_tensors(spec, seed=5, dtype=torch.float32)
    grad_m = torch.randn(spec.channels, spec.channel_length, generator=torch.Generator().manual_seed(6))
    expected = reference_table_grads(grad_m.double(), packed, codebook.double(), scales.double(), spec)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(table_grads(grad_m, packed, codebook, scales, spec))
    finally:
        torch.set_num_threads(threads)
    for got in results:
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e.float(), rtol=1e-5, atol=1e-5 * float(e.abs().max()))
            assert g.dtype == torch.float32
        for g, first in zip(got, results[0], strict=True):
            assert torch.equal(g, first)


def test_isa_detection_and_limits():
    assert cpu_isa() in ISAS
    previous = limit_cpu_isa("portable")
    try:
        assert cpu_isa() == "portable"
    finally:
        limit_cpu_isa(previous)
    with pytest.raises(ValueError, match="isa must be one of"):
        limit_cpu_isa("sse9")


@pytest.mark.parametrize("env", [{"SWSC_HF_KERNELS": "0"}, {"CXX": "/nonexistent/c++"}],
                         ids=["disabled", "no-compiler"])
def test_without_kernels_layers_still_run_on_the_reference_path(tmp_path, env):
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from swsc_hf.kernels import codebook_matmul, load_cpu_kernels, reference_codebook_matmul\n"
        "from swsc_hf.core.spec import LayerSpec\n"
        "from swsc_hf.core.packing import pack_codes\n"
        "spec = LayerSpec(16, 32, n_clusters=4, segment_length=1)\n"
        "packed = pack_codes(torch.randint(0, 4, (16, 32)), 2)\n"
        "book = torch.randn(1, 4, 1)\n"
        "x = torch.randn(2, 32)\n"
        "assert torch.equal(codebook_matmul(x, packed, book, None, spec), "
        "reference_codebook_matmul(x, packed, book, None, spec))\n"
        "print('loaded', load_cpu_kernels())\n"
    )
    run_env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), **env}
    result = subprocess.run([sys.executable, "-c", script], env=run_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "loaded False" in result.stdout
    assert "reference path" in result.stderr


def test_kernels_build_where_torch_would_build_them(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory  # the oracle: torch's own choice

    from swsc_hf.kernels.cpu import build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.get_default_build_root", lambda: str(tmp_path))
    assert build_directory("name") == Path(_get_build_directory("name", False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "elsewhere"))
    assert build_directory("name") == Path(_get_build_directory("name", False)) == tmp_path / "elsewhere" / "name"


def test_an_interrupted_builds_lock_file_is_removed_with_a_warning(tmp_path, caplog):
    from swsc_hf.kernels.cpu import exclusive_build

    (tmp_path / "lock").touch()  # what torch's build leaves when it is killed midway; torch waits for it forever
    (tmp_path / "kernel.so").write_bytes(b"kept")
    with caplog.at_level(logging.WARNING, logger="swsc_hf"), exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert "interrupted build" in caplog.text and str(tmp_path / "lock") in caplog.text
    assert (tmp_path / "kernel.so").read_bytes() == b"kept"


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX; Windows keeps torch's lock file only")
def test_a_live_build_in_another_process_is_waited_for_not_broken(tmp_path, caplog):
    from swsc_hf.kernels.cpu import exclusive_build

    builder = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from swsc_hf.kernels.cpu import exclusive_build\n"
        "d = Path(sys.argv[1])\n"
        "with exclusive_build(d):\n"
        "    (d / 'lock').touch()\n"
        "    print('building', flush=True)\n"
        "    time.sleep(1.5)\n"
        "    (d / 'lock').unlink()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", builder, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "building"
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="swsc_hf"), exclusive_build(tmp_path):
        waited = time.perf_counter() - start
    assert child.wait(timeout=60) == 0
    assert waited > 0.5 and "interrupted build" not in caplog.text


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_file_system_without_locks_builds_under_torchs_lock_file_only(tmp_path, monkeypatch):
    import fcntl

    from swsc_hf.kernels.cpu import exclusive_build

    def refuse(*args):
        raise OSError("no locks here")

    monkeypatch.setattr(fcntl, "flock", refuse)
    (tmp_path / "lock").touch()  # without the OS lock nothing proves it stale, so it stays
    with exclusive_build(tmp_path):
        pass
    assert (tmp_path / "lock").exists()


def test_layouts_cover_every_preset_and_ladder_width():
    from swsc_hf.allocation import ladder

    for out_f, in_f in itertools.product((576, 1536), (576, 1536)):
        for spec in ladder(out_f, in_f, vectors=True):
            assert unsupported_reason(spec) is None, spec


@pytest.mark.parametrize("rotate", [False, True])
def test_compile_decoding_generates_the_same_tokens_through_the_compiled_step(monkeypatch, rotate):
    """Also with a rotated residual stream: its hooks trace into the one compiled graph."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    swsc_hf.compress_model(model, swsc_hf.SWSCConfig(preset="swsc-4bit", rotate_residual=rotate))
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    eager = model.generate(prompt, max_new_tokens=6, do_sample=False)
    compiled_calls = []
    original = type(model).get_compiled_call

    def spy(self, compile_config):
        compiled_calls.append(compile_config)
        return original(self, compile_config)

    monkeypatch.setattr(type(model), "get_compiled_call", spy)
    swsc_hf.compile_decoding(model, backend="eager")
    assert model.generation_config.cache_implementation == "static"
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), eager)
    assert compiled_calls and compiled_calls[0].fullgraph  # the decode steps ran the compiled call


@pytest.mark.slow
def test_compile_decoding_with_the_cpp_wrapper_generates_the_same_tokens():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    swsc_hf.compress_model(model, swsc_hf.SWSCConfig(preset="swsc-4bit"))
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    eager = model.generate(prompt, max_new_tokens=6, do_sample=False)
    swsc_hf.compile_decoding(model, cpp_wrapper=True)
    assert model.generation_config.compile_config.options == {"cpp_wrapper": True}
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), eager)
    with pytest.raises(ValueError, match="needs backend='inductor'"):
        swsc_hf.compile_decoding(model, backend="eager", cpp_wrapper=True)


def test_packed_gqa_attention_runs_the_decode_kernel_and_matches_sdpa(monkeypatch):
    from transformers.integrations import sdpa_attention

    from swsc_hf import generation

    torch.manual_seed(0)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = 3
    query, key, value = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    shared = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    shared[0, ..., 7:] = False
    per_head = torch.rand(2, 6, 1, 11, generator=torch.Generator().manual_seed(1)) > 0.3
    per_head[..., 0] = True
    kernels = []

    def spy(query, key, value, mask, scale):  # records where decode_attention runs these operands
        kernels.append(decode_attention_kernel(query, key, value, mask))
        return decode_attention(query, key, value, mask, scale=scale)

    for mask in (shared, per_head):
        expected, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
        with monkeypatch.context() as patch:
            patch.setattr(generation, "sdpa_attention_forward", None)  # a single-token step must not fall back
            patch.setattr(generation, "decode_attention", spy)
            packed, _ = generation.packed_gqa_sdpa_forward(module, query, key, value, mask, scaling=0.3)
        assert packed.shape == expected.shape == (2, 1, 6, 8)
        torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-6)
    assert kernels == ["cpu", "cpu"]  # the compiled decode attention, on the key/value heads


def test_compile_decoding_switches_sdpa_to_packed_gqa_attention():
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    assert model.config._attn_implementation == "sdpa"
    swsc_hf.compile_decoding(model, backend="eager")
    assert model.config._attn_implementation == swsc_hf.generation.PACKED_GQA_SDPA
    eager = LlamaForCausalLM(tiny_llama_config(attn_implementation="eager")).eval()
    swsc_hf.compile_decoding(eager, backend="eager")
    assert eager.config._attn_implementation == "eager"  # other implementations are left alone


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, "strided"])
def test_kernels_read_scales_of_any_float_dtype_and_layout(scale_dtype, isa):
    spec = LayerSpec(40, 64, n_clusters=16, segment_length=1, scale_group_size=16)
    codes, packed, codebook, scales = make_layer_tensors(spec, seed=7)
    if scale_dtype == "strided":  # a transposed copy's view: not contiguous, same values
        scales = scales.t().contiguous().t()
        assert not scales.is_contiguous()
    else:
        scales = scales.to(scale_dtype)
    weight = oracle_weight(spec, codes, codebook, scales)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    for tokens in (1, 3):
        with torch.no_grad():
            got = codebook_matmul(x[:tokens], packed, codebook, scales, spec)
        expected = (x[:tokens].double() @ weight.t()).float()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("book_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", [(40, 96, 64, 2, 32), (24, 192, 64, 2, 96), (48, 64, 256, 4, 16),
                                    (24, 128, 128, 4, 0), (48, 96, 16, 1, 32), (40, 48, 16, 1, 16),
                                    (40, 64, 256, 2, 16), (24, 96, 200, 2, 32), (20, 40, 256, 2, 0),
                                    (40, 96, 64, 1, 32), (24, 192, 50, 1, 96), (40, 48, 64, 1, 16),
                                    (24, 40, 64, 1, 0), (40, 96, 32, 2, 32), (22, 80, 128, 2, 16),
                                    (24, 48, 64, 2, 16), (20, 40, 100, 2, 0), (40, 96, 32, 1, 32),
                                    (24, 96, 20, 1, 48), (24, 96, 100, 1, 32), (40, 64, 256, 1, 16)],
                         ids=lambda t: "-".join(map(str, t)))
def test_codebooks_of_any_dtype_take_exact_paths(layout, book_dtype, isa):
    """Pairs and quadruples whose values are float16 exactly are read as float16 codewords.
    - AVX-512 with VBMI, one token: scalars of 6-8-bit codes and pairs of 5-8-bit codes in steps of 16 codes by
      byte permutes of their byte planes.
    - AVX-512: pairs of <= 64 codewords by 16-bit permutes, of more by scalar loads (below); 4-bit scalar tables by
      float permutes of two codes per byte where channels and groups are whole blocks of 32 values (48-value
      channels and 16-value groups take the general decoder).
    - AVX2: 4-bit scalar tables and 64 pairs in blocks of 32 values, and 6-bit scalar tables in blocks of 16, are
      looked up in float16 byte planes (channels of 48 values keep the float permutes for 4-bit codes; groups of 96
      take steps of 32 and 16 codes); pairs of 5-8-bit codes in groups of whole 16 values (6-bit ones outside the
      planes' blocks of 32) are read as float16 pairs by scalar loads (channels of 40 values keep the float gather;
      the 5- and 7-bit streams end with the last code, so their last channel reads a zero-padded copy).
    Values that are not float16 exactly (float32 with full mantissas, bfloat16 beyond float16's range) must take the
    float32 table."""
    out_f, in_f, k, seg, group = layout
    spec = LayerSpec(out_f, in_f, n_clusters=k, segment_length=seg, scale_group_size=group)
    codes, packed, codebook, scales = make_layer_tensors(spec, seed=9, dtype=torch.float32)
    codebook = codebook.to(book_dtype)
    if book_dtype == torch.bfloat16:
        codebook[0, 0, 0] = 1e30  # representable in bfloat16, infinite in float16
    weight = oracle_weight(spec, codes, codebook, scales)
    x = torch.randn(4, in_f, generator=torch.Generator().manual_seed(10))
    for tokens in (1, 4, GEMV_MAX_TOKENS + 1):
        xt = x.repeat(3, 1)[:tokens]
        with torch.no_grad():
            got = codebook_matmul(xt, packed, codebook, scales, spec)
        expected = (xt.double() @ weight.t()).float()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    planes = cpu_isa() == "avx2" and book_dtype == torch.float16 and in_f % 32 == 0 and (group or in_f) % 32 == 0
    bits = (k - 1).bit_length()
    vbmi_planes = (cpu_isa() == "avx512" and integer_dot_available() and book_dtype == torch.float16
                   and seg <= 2 and bits >= 7 - seg and in_f % (16 * seg) == 0 and (group or in_f) % (16 * seg) == 0)
    kernel = cpu_gemv_kernel(packed, codebook, scales, spec)
    if cpu_isa() == "portable":
        assert kernel == "portable"
    elif vbmi_planes:
        assert kernel == "byte_planes"
    elif seg == 1 and k > 16:  # 5-8-bit codes
        six_bit = cpu_isa() == "avx2" and bits == 6 and book_dtype == torch.float16 and (group or in_f) % 16 == 0
        assert kernel == ("six_bit_planes" if six_bit else "float")
    elif seg == 1:
        block = 32 if cpu_isa() == "avx512" else 16  # gemv_nibbles' blocks: two vectors
        nibbles = in_f % block == 0 and group % block == 0
        assert kernel == ("planes" if planes else "nibbles" if nibbles else "float")
    elif seg == 2:  # pairs of 5-8-bit codes
        scalar_loads = cpu_isa() == "avx2" or k > 64  # AVX-512 permutes pairs of <= 64 codewords in registers
        half_pairs = scalar_loads and book_dtype == torch.float16 and (group or in_f) % 16 == 0
        assert kernel == ("pair_planes" if k == 64 and planes else "half_pairs" if half_pairs else "float")


def test_cpu_gemv_kernel_names_the_transposed_and_reference_paths():
    spec = LayerSpec(48, 64, n_clusters=16, segment_length=1, cluster_dim="input", scale_group_size=16)
    _, packed, codebook, scales = make_layer_tensors(spec)
    assert cpu_gemv_kernel(packed, codebook, scales, spec) == "transposed"
    whole = LayerSpec(48, 64, n_clusters=8, segment_length=64)  # SWSC's layout: whole channels, a gather in torch
    _, packed, codebook, _ = make_layer_tensors(whole)
    assert cpu_gemv_kernel(packed, codebook, None, whole) == "reference"
    scalar = LayerSpec(48, 64, n_clusters=16, segment_length=1, scale_group_size=16)
    _, packed, codebook, scales = make_layer_tensors(scalar)
    previous = swsc_hf.set_kernels_enabled(False)
    try:
        assert cpu_gemv_kernel(packed, codebook, scales, scalar) == "reference"
    finally:
        swsc_hf.set_kernels_enabled(previous)
    assert cpu_gemv_kernel(packed, codebook, scales, scalar) != "reference"


@pytest.mark.parametrize("layout", [KERNEL_LAYOUTS[0], (48, 64, 256, 4, "output", 16, 0),
                                    (30, 48, 16, 3, "output", 24, 0)], ids=lambda t: "-".join(map(str, t)))
def test_trainable_tables_multiply_in_bfloat16_under_autocast(layout):
    """Tuning with `tune_dtype="bfloat16"` autocasts: the table-training products, forward and backward, then run
    in bfloat16 (output and gradients differ from float32's), and the output and all three gradients stay within
    bfloat16 rounding of the definition, in float32."""
    spec, codes, packed, codebook, scales, x, grad_out = trainable_layer_case(layout)
    dim = spec.cluster_dim
    oracle = [t.double().requires_grad_(True) for t in (x, codebook, scales)]
    weight = reconstruct_channels(spec, oracle[1], codes, oracle[2])
    expected_y = oracle[0] @ (weight if dim == "output" else weight.t()).t()
    expected_y.backward(grad_out.double())
    trained = [t.clone().requires_grad_(True) for t in (x, codebook, scales)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = codebook_matmul(trained[0], packed, trained[1], trained[2], spec)
    y.backward(grad_out)
    in_float32 = [t.clone().requires_grad_(True) for t in (x, codebook, scales)]
    y32 = codebook_matmul(in_float32[0], packed, in_float32[1], in_float32[2], spec)
    y32.backward(grad_out)
    assert y.dtype == torch.float32 and not torch.equal(y.detach(), y32.detach())
    assert all(not torch.equal(a.grad, b.grad) for a, b in zip(trained, in_float32, strict=True))
    scale = float(expected_y.abs().max())
    torch.testing.assert_close(y.detach(), expected_y.detach().float(), rtol=0, atol=2e-2 * scale)
    for got, expected in zip(trained, oracle, strict=True):
        assert got.grad.dtype == torch.float32
        scale = float(expected.grad.abs().max())
        torch.testing.assert_close(got.grad, expected.grad.float(), rtol=0, atol=2e-2 * scale)
