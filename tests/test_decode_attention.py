"""The CPU decode attention kernel (swsc_hf.kernels.decode_attention) against a float64 oracle and torch's SDPA."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swsc_hf.kernels import (
    DECODE_MAX_ROWS,
    decode_attention,
    decode_attention_kernel,
    load_cpu_kernels,
    set_kernels_enabled,
)

pytestmark = pytest.mark.skipif(not load_cpu_kernels(), reason="the CPU kernels could not be built here")


def oracle(q, k, v, mask, scale) -> torch.Tensor:
    """softmax(q k^T scale + mask) v in float64, written out; rows whose keys are all masked give zeros."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + (torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask.double())
    top = scores.amax(-1, keepdim=True)
    weights = torch.where(top == -math.inf, 0.0, torch.exp(scores - top.clamp_min(-1e300)))
    total = weights.sum(-1, keepdim=True)
    return (weights @ v.double()) / torch.where(total == 0, 1.0, total)


def operands(batch, heads, rows, dim, length, value_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, rows, dim, generator=g), torch.randn(batch, heads, length, dim, generator=g),
            torch.randn(batch, heads, length, value_dim, generator=g))


def static_cache_mask(length: int, filled: int) -> torch.Tensor:
    """A static cache's decode mask: the first `filled` keys visible, the unfilled tail -inf (transformers' shape)."""
    mask = torch.zeros(1, 1, 1, length)
    mask[..., filled:] = -math.inf
    return mask


# (batch, heads, rows, dim, length, value_dim): SmolLM2's packed step, Gemma-3's head size, odd sizes and tails,
# a head size of 96 (64 values in registers, then one vector at a time)
SHAPES = [(1, 3, 3, 64, 640, 64), (1, 1, 4, 256, 300, 256), (2, 2, 5, 40, 333, 24), (1, 2, 1, 8, 5, 8),
          (1, 4, 1, 17, 97, 33), (1, 2, 2, 96, 70, 96)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "bool-per-row", "static-tail", "window"])
def test_kernel_equals_the_oracle_and_sdpa(shape, mask_kind, isa, threads):
    batch, heads, rows, dim, length, value_dim = shape
    q, k, v = operands(*shape)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "bool-per-row":
        mask = torch.rand(batch, 1, rows, length, generator=torch.Generator().manual_seed(3)) > 0.4
        mask[..., -1] = True
    elif mask_kind == "static-tail":
        mask = static_cache_mask(length, max(1, 2 * length // 3))
    else:  # a sliding window: keys before it are hidden too
        mask = torch.full((1, 1, rows, length), -math.inf)
        mask[..., length // 4: length - 1] = 0.25
    assert decode_attention_kernel(q, k, v, mask) == "cpu"
    out = decode_attention(q, k, v, mask, scale=0.3)
    assert out.shape == (batch, heads, rows, value_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), oracle(q, k, v, mask, 0.3), rtol=1e-5, atol=1e-5)
    # SDPA rounds in float32 too: its distance from the oracle is of the same order as ours
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
                               rtol=1e-4, atol=1e-5)


def test_default_scale_and_strided_operands(isa):
    q, k, v = operands(1, 2, 3, 16, 50, 16)
    q_strided = q.transpose(2, 3).contiguous().transpose(2, 3)  # last dim not contiguous: copied first
    k_view = torch.cat([k, k], dim=2)[:, :, ::2]  # keys with a row stride of two rows
    out = decode_attention(q_strided, k_view, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k_view, v), rtol=1e-5, atol=2e-6)


def test_rows_whose_keys_are_all_masked_give_zeros_as_sdpa_does(isa):
    q, k, v = operands(1, 2, 3, 16, 20, 16)
    mask = torch.ones(1, 2, 3, 20, dtype=torch.bool)
    mask[0, 1, 2] = False
    out = decode_attention(q, k, v, mask)
    assert torch.all(out[0, 1, 2] == 0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=2e-6)
    assert torch.all(decode_attention(q, k, v, torch.zeros_like(mask)) == 0)


def test_keys_past_the_last_visible_one_are_never_read(isa):
    """The unfilled tail of a static cache may hold anything: NaN there would poison SDPA's output, not ours."""
    q, k, v = operands(1, 3, 3, 64, 100, 64)
    mask = static_cache_mask(100, 60)
    expected = oracle(q, k, v, mask, 0.125)
    k[:, :, 60:] = math.nan
    v[:, :, 60:] = math.nan
    out = decode_attention(q, k, v, mask, scale=0.125)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-6)


def test_operands_outside_the_kernel_go_to_sdpa():
    q, k, v = operands(1, 2, 3, 16, 20, 16)
    assert decode_attention_kernel(q, k, v) == "cpu"
    assert decode_attention_kernel(q.bfloat16(), k.bfloat16(), v.bfloat16()) == "sdpa"
    assert decode_attention_kernel(torch.randn(1, 2, DECODE_MAX_ROWS + 1, 16), k, v) == "sdpa"  # a prompt
    assert decode_attention_kernel(torch.randn(1, 4, 3, 16), k, v) == "sdpa"  # heads SDPA would broadcast
    assert decode_attention_kernel(q, k, v, torch.zeros(1, 1, 1, 21)) == "sdpa"  # a mask of the wrong length
    assert decode_attention_kernel(q, k, v, torch.zeros(1, 1, 1, 20, dtype=torch.float64)) == "sdpa"
    assert decode_attention_kernel(q, k, v, torch.tensor(0.0)) == "sdpa"  # a scalar mask
    trained = q.clone().requires_grad_()
    assert decode_attention_kernel(trained, k, v) == "sdpa"
    with torch.no_grad():
        assert decode_attention_kernel(trained, k, v) == "cpu"
    previous = set_kernels_enabled(False)
    try:
        assert decode_attention_kernel(q, k, v) == "sdpa"
    finally:
        set_kernels_enabled(previous)
    out = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=0.5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                                                   scale=0.5))
    grad_out = decode_attention(trained, k, v)
    grad_out.sum().backward()  # SDPA's autograd
    assert trained.grad is not None


def test_the_op_traces_whole_into_a_compiled_graph():
    q, k, v = operands(1, 3, 3, 64, 40, 64)
    mask = static_cache_mask(40, 30)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(lambda q, k, v, m: decode_attention(q, k, v, m, scale=0.125), backend=backend,
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), decode_attention(q, k, v, mask, scale=0.125))
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert any("swsc_hf_cpu.decode_attention" in target for target in targets), targets
    with torch._subclasses.fake_tensor.FakeTensorMode():  # the fake implementation: shapes without data
        fake = torch.ops.swsc_hf_cpu.decode_attention(torch.empty(2, 3, 4, 8), torch.empty(2, 3, 9, 8),
                                                       torch.empty(2, 3, 9, 5), None, 1.0)
    assert fake.shape == (2, 3, 4, 5)


def test_bad_operands_name_the_problem():
    q, k, v = operands(1, 2, 3, 16, 20, 16)
    op = torch.ops.swsc_hf_cpu.decode_attention
    with pytest.raises(RuntimeError, match="must be a 4-dim float32 CPU tensor"):
        op(q.double(), k, v, None, 1.0)
    with pytest.raises(RuntimeError, match="do not match"):
        op(q, k[:, :, :, :8], v, None, 1.0)
    with pytest.raises(RuntimeError, match="mask must be bool or float32"):
        op(q, k, v, torch.zeros(1, 1, 1, 20, dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="mask must have 1 to 4 dims"):
        op(q, k, v, torch.tensor(0.0), 1.0)


def decode_attention_calls(run) -> int:
    """How many times the CPU decode attention kernel ran during `run()`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return sum(event.count for event in profile.key_averages() if event.key == "swsc_hf_cpu::decode_attention")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_compiled_decoding_attends_through_the_kernel_and_generates_the_eager_tokens(arch):
    """Grouped queries (all three), head_dim 16, and Gemma-3's sliding-window layers (window 16, a longer prompt):
    the static cache's masks hide keys at both ends."""
    from test_architectures import tiny_model

    import swsc_hf

    model = tiny_model(arch)
    prompt = torch.randint(0, 128, (1, 21), generator=torch.Generator().manual_seed(4))
    eager = model.generate(prompt, max_new_tokens=8, do_sample=False)
    swsc_hf.compile_decoding(model, backend="eager")
    compiled = []
    calls = decode_attention_calls(lambda: compiled.append(model.generate(prompt, max_new_tokens=8, do_sample=False)))
    assert calls >= 7 * model.config.num_hidden_layers  # every decode step after the first compiled one
    assert torch.equal(compiled[0], eager)


def test_compiled_decoding_of_sliding_window_layers_runs_past_the_recompile_limit():
    """Gemma-3's sliding-window cache layers keep their length as a Python int: with static shapes every token
    recompiled the step, and generate stopped at dynamo's recompile limit (8) with fullgraph=True."""
    from test_architectures import tiny_model

    import swsc_hf

    model = tiny_model("gemma3")
    prompt = torch.randint(0, 128, (1, 21), generator=torch.Generator().manual_seed(5))
    eager = model.generate(prompt, max_new_tokens=24, do_sample=False)
    swsc_hf.compile_decoding(model, backend="eager")
    assert torch.equal(model.generate(prompt, max_new_tokens=24, do_sample=False), eager)
    dense_layers = tiny_model("llama")
    swsc_hf.compile_decoding(dense_layers, backend="eager")
    assert dense_layers.generation_config.compile_config.dynamic is False  # full attention keeps static shapes


def test_compile_decoding_works_in_a_process_that_has_not_loaded_the_kernels():
    """The decode attention loads the kernels on first use; inside the first compiled step that load (and its lock)
    could not be traced, so a model without compressed layers failed to generate."""
    script = (
        "import torch, swsc_hf\n"
        "from test_architectures import tiny_model\n"
        "model = tiny_model('llama')\n"
        "prompt = torch.randint(0, 128, (1, 9))\n"
        "eager = model.generate(prompt, max_new_tokens=4, do_sample=False)\n"
        "swsc_hf.compile_decoding(model, backend='eager')\n"
        "assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), eager)\n"
    )
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compressed_models_decode_eagerly_through_the_kernel_until_dequantized(arch, tmp_path):
    """compress_model and from_pretrained leave the model on the packed decode attention (eager generate calls the
    kernel at every step and gives SDPA's tokens); the choice is not saved, and dequantize_model undoes it."""
    from test_architectures import tiny_model
    from transformers import AutoModelForCausalLM

    import swsc_hf
    from swsc_hf.generation import PACKED_GQA_SDPA

    model = tiny_model(arch)
    assert model.config._attn_implementation == "sdpa"
    swsc_hf.compress_model(model, swsc_hf.SWSCConfig(preset="swsc-4bit"))
    assert model.config._attn_implementation == PACKED_GQA_SDPA
    prompt = torch.randint(0, 128, (1, 21), generator=torch.Generator().manual_seed(6))
    packed = []
    calls = decode_attention_calls(lambda: packed.append(model.generate(prompt, max_new_tokens=6, do_sample=False)))
    assert calls >= 5 * model.config.num_hidden_layers  # every single-token step; the prompt goes to SDPA
    model.set_attn_implementation("sdpa")
    assert decode_attention_calls(lambda: packed.append(model.generate(prompt, max_new_tokens=6,
                                                                       do_sample=False))) == 0
    assert torch.equal(packed[0], packed[1])

    model.save_pretrained(tmp_path)
    assert PACKED_GQA_SDPA not in (tmp_path / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == PACKED_GQA_SDPA
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), packed[0])
    swsc_hf.dequantize_model(loaded)
    assert loaded.config._attn_implementation == "sdpa"
    eager = tiny_model(arch)
    eager.set_attn_implementation("eager")
    assert not swsc_hf.use_decode_attention(eager) and eager.config._attn_implementation == "eager"
