"""The dense GEMV of decode steps (swsc_hf.kernels.dense_matmul, csrc/dense_gemv.cpp) against a float64 oracle and
F.linear, and the dense output head of compressed models that runs it (`SWSCDenseLinear`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from swsc_hf import SWSCConfig, SWSCDenseLinear, SWSCLinear, compress_model, dequantize_model
from swsc_hf.kernels import (
    GEMV_MAX_TOKENS,
    dense_matmul,
    dense_matmul_kernel,
    load_cpu_kernels,
    set_kernels_enabled,
)

pytestmark = pytest.mark.skipif(not load_cpu_kernels(), reason="the CPU kernels could not be built here")


def operands(tokens: int, out: int, n: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, n, generator=g), torch.randn(out, n, generator=g),
            torch.randn(out, generator=g) if bias else None)


def oracle(x, weight, bias) -> torch.Tensor:
    y = x.double() @ weight.double().T
    return y if bias is None else y + bias.double()


# (out, n): rows in whole blocks of four and with 1-3 left over, features in whole vectors (AVX-512, AVX2) and with
# tails, one feature; 5000 x 64 rows spread over several threads' shares.
SHAPES = [(64, 64), (37, 100), (6, 17), (3, 1), (5000, 64), (1, 576)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tokens", [1, 2, GEMV_MAX_TOKENS])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_kernel_equals_the_oracle(shape, tokens, bias, isa, threads):
    x, weight, b = operands(tokens, *shape, bias)
    assert dense_matmul_kernel(x, weight, b) == "cpu"
    y = dense_matmul(x, weight, b)
    assert y.dtype == torch.float32 and y.shape == (tokens, shape[0])
    torch.testing.assert_close(y.double(), oracle(x, weight, b), rtol=1e-5, atol=1e-5 * shape[1] ** 0.5)


@pytest.mark.parametrize("shape", [(37, 100), (6, 17), (5000, 64)], ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_operands_sum_in_float32_and_round_once(shape, isa):
    dtype = torch.bfloat16
    x, weight, b = (t.to(dtype) for t in operands(3, *shape, True))
    assert dense_matmul_kernel(x, weight, b) == "cpu"
    y = dense_matmul(x, weight, b)
    assert y.dtype == dtype and y.shape == (3, shape[0])
    exact = oracle(x, weight, b)  # the rounded operands' exact result: the kernel adds one rounding to `dtype`
    torch.testing.assert_close(y.double(), exact.to(dtype).double(), rtol=2 * torch.finfo(dtype).eps,
                               atol=1e-5 * shape[1] ** 0.5)


def test_leading_dimensions_and_strided_activations_are_kept(isa):
    x, weight, b = operands(6, 40, 48, True)
    x3 = x.view(2, 3, 48)
    torch.testing.assert_close(dense_matmul(x3, weight, b), F.linear(x3, weight, b), rtol=1e-5, atol=1e-5)
    strided = torch.randn(2, 96)[:, ::2]  # a view whose features are not contiguous
    assert dense_matmul_kernel(strided, weight, b) == "cpu"
    torch.testing.assert_close(dense_matmul(strided, weight, b), F.linear(strided, weight, b), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_calls_outside_the_kernel_go_to_f_linear():
    x, weight, b = operands(1, 8, 16, True)
    assert dense_matmul_kernel(x, weight, b) == "cpu"
    prompt = torch.randn(GEMV_MAX_TOKENS + 1, 16)
    assert dense_matmul_kernel(prompt, weight, b) == "torch"
    assert dense_matmul_kernel(x.bfloat16(), weight, b) == "torch"  # mixed dtypes
    assert dense_matmul_kernel(x.double(), weight.double(), b.double()) == "torch"
    assert dense_matmul_kernel(x.half(), weight.half(), b.half()) == "torch"  # torch's float16 GEMV measured faster
    assert dense_matmul_kernel(x, weight.t().contiguous().t(), b) == "torch"  # a transposed (non-contiguous) weight
    assert dense_matmul_kernel(x, weight, b.double()) == "torch"
    assert dense_matmul_kernel(torch.randn(1, 15), weight, b) == "torch"  # F.linear says what is wrong
    trained = weight.clone().requires_grad_()
    assert dense_matmul_kernel(x, trained, b) == "torch"
    with torch.no_grad():
        assert dense_matmul_kernel(x, trained, b) == "cpu"
    previous = set_kernels_enabled(False)
    try:
        assert dense_matmul_kernel(x, weight, b) == "torch"
    finally:
        set_kernels_enabled(previous)
    torch.testing.assert_close(dense_matmul(prompt, weight, b), F.linear(prompt, weight, b))
    dense_matmul(x, trained, b).sum().backward()  # F.linear's autograd
    assert trained.grad is not None
    with pytest.raises(RuntimeError):
        dense_matmul(torch.randn(1, 15), weight, b)
    traced = torch.jit.trace(lambda x: dense_matmul(x, weight, b), x)  # a TorchScript trace records F.linear
    assert "swsc_hf_cpu" not in str(traced.graph) and "linear" in str(traced.graph)
    torch.testing.assert_close(traced(x), F.linear(x, weight, b))


def test_the_op_traces_whole_into_a_compiled_graph():
    x, weight, b = operands(1, 40, 64, True)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(lambda x, w, b: dense_matmul(x, w, b), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, b), dense_matmul(x, weight, b))
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert any("swsc_hf_cpu.dense_gemv" in target for target in targets), targets
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.ops.swsc_hf_cpu.dense_gemv(torch.empty(2, 3, 8), torch.empty(5, 8), None)
    assert fake.shape == (2, 3, 5)


def test_bad_operands_name_the_problem():
    x, weight, b = operands(1, 8, 16, True)
    op = torch.ops.swsc_hf_cpu.dense_gemv
    with pytest.raises(RuntimeError, match="weight must be a contiguous 2-dim float32 or bfloat16 CPU tensor"):
        op(x, weight.half(), b)
    with pytest.raises(RuntimeError, match=r"x must be a Float CPU tensor \(the weight's dtype\) of 16 features"):
        op(torch.randn(1, 15), weight, b)
    with pytest.raises(RuntimeError, match="x must be a Float CPU tensor"):
        op(x.bfloat16(), weight, b)
    with pytest.raises(RuntimeError, match=r"bias must be a Float CPU tensor \(the weight's dtype\) of 8 values"):
        op(x, weight, torch.randn(7))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_compressed_models_dense_head_runs_the_kernel_and_round_trips(tied, tmp_path, input_ids):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()
    compress_model(model, SWSCConfig(preset="swsc-4bit"))
    head = model.get_output_embeddings()
    assert type(head) is SWSCDenseLinear  # same module, same parameter: the tie holds
    assert (head.weight is model.get_input_embeddings().weight) == tied
    assert "lm_head.weight" in model.state_dict()
    step = input_ids[:, -1:]
    with torch.no_grad():
        hidden = model.model(step).last_hidden_state
        assert dense_matmul_kernel(hidden, head.weight, head.bias) == "cpu"
        torch.testing.assert_close(head(hidden), F.linear(hidden, head.weight), rtol=1e-5, atol=1e-5)
        logits = model(input_ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded.get_output_embeddings()) is SWSCDenseLinear
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, logits)
    dense = dequantize_model(reloaded)
    assert type(dense.get_output_embeddings()) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_a_compressed_head_is_left_as_it_is():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    compress_model(model, SWSCConfig(preset="swsc-4bit", head_bits=6))
    assert isinstance(model.get_output_embeddings(), SWSCLinear)
