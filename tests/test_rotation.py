"""The residual stream's rotation (`swsc_hf.rotation`, `core.hadamard`): Hadamard matrices against their definition
and an explicit product, a rotated model against the dense one, refusals that leave the model as it was, and a
rotated compressed model through save, load and dequantize."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_llama_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from swsc_hf import SWSCConfig, compress_model
from swsc_hf.core.hadamard import hadamard_factors, hadamard_product, paley_hadamard
from swsc_hf.rotation import ROTATION_ATTR, rotate_residual_stream

SIZES = [1, 2, 12, 20, 48, 176, 576, 960, 1536]


def explicit(size: int) -> torch.Tensor:
    return functools.reduce(torch.kron, hadamard_factors(size), torch.ones(1, 1, dtype=torch.float64))


def llama_with_gains(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                                               num_key_value_heads=2, **overrides)).eval()
    with torch.no_grad():  # gains other than 1, so folding them matters
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.uniform_(0.5, 1.5)
    return model


def test_paley_order_4_golden():
    assert torch.equal(paley_hadamard(3), torch.tensor(
        [[1, 1, 1, 1], [-1, 1, 1, -1], [-1, -1, 1, 1], [-1, 1, -1, 1]], dtype=torch.float64))


@pytest.mark.parametrize("size", SIZES)
def test_factors_make_a_hadamard_matrix(size):
    matrix = explicit(size)
    assert matrix.shape == (size, size)
    assert torch.equal(matrix.abs(), torch.ones_like(matrix))
    assert torch.equal(matrix @ matrix.T, size * torch.eye(size, dtype=torch.float64))


@pytest.mark.parametrize("size", [12, 48, 576, 960])
def test_product_equals_the_explicit_matrix(size):
    x = torch.randn(3, 2, size, dtype=torch.float64)
    factors = hadamard_factors(size)
    assert torch.allclose(hadamard_product(x, factors), x @ explicit(size))
    assert torch.allclose(hadamard_product(x, factors, transpose=True), x @ explicit(size).T)


@pytest.mark.parametrize("size", [3, 7, 56, 896])
def test_orders_without_a_construction_are_refused(size):
    with pytest.raises(ValueError, match=f"order {size}"):
        hadamard_factors(size)


@pytest.mark.parametrize("tied", [False, True])
def test_rotation_keeps_the_model(tied, input_ids):
    model = llama_with_gains(tie_word_embeddings=tied)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    with torch.no_grad():
        expected = model(input_ids).logits
        rotate_residual_stream(model, seed=3)
        got = model(input_ids).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    signs = getattr(model, ROTATION_ATTR).signs
    assert torch.equal(signs.abs(), torch.ones_like(signs)) and (signs < 0).any()
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(48))
    assert torch.equal(layer.post_attention_layernorm.weight, torch.ones(48))
    assert not torch.allclose(layer.self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.allclose(layer.mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert torch.equal(model.model.norm.weight, before["model.norm.weight"])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_a_second_rotation_is_refused():
    model = llama_with_gains()
    rotate_residual_stream(model)
    with pytest.raises(ValueError, match="already rotated"):
        rotate_residual_stream(model)


def unchanged(model, before) -> bool:
    return all(torch.equal(param, before[name]) for name, param in model.named_parameters())


def test_other_structures_are_refused_untouched():
    model = GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=1, n_head=4, vocab_size=64, n_positions=32))
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    with pytest.raises(ValueError, match="rotate_residual"):
        rotate_residual_stream(model)
    assert unchanged(model, before) and not hasattr(model, ROTATION_ATTR)


def test_a_norm_that_is_not_rms_is_caught_by_the_probe():
    model = llama_with_gains()
    model.model.layers[0].input_layernorm = torch.nn.LayerNorm(48, bias=False)  # subtracts the mean: not invariant
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    with pytest.raises(ValueError, match="changed its outputs"):
        rotate_residual_stream(model)
    assert unchanged(model, before) and not hasattr(model, ROTATION_ATTR)
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.model.norm).__name__ == "LlamaRMSNorm"


def test_a_hidden_size_without_hadamard_matrix_is_refused():
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=56, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="hidden size 56.*rotate_residual=False"):
        rotate_residual_stream(model)


def test_config_field_is_validated():
    with pytest.raises(ValueError, match="rotate_residual"):
        SWSCConfig(rotate_residual="yes")
    assert SWSCConfig(rotate_residual=True).compresses_after_load


def test_rotated_compressed_model_saves_loads_and_dequantizes(input_ids, tmp_path):
    config = SWSCConfig(n_clusters=16, segment_length=1, rank=0, scale_group_size=16, rotate_residual=True, seed=5)
    model = compress_model(llama_with_gains(tie_word_embeddings=True), config)
    with torch.no_grad():
        logits = model(input_ids).logits
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved_signs = f.get_tensor(f"{ROTATION_ATTR}.signs")
    assert torch.equal(saved_signs, getattr(model, ROTATION_ATTR).signs)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(getattr(reloaded, ROTATION_ATTR).signs, saved_signs)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, logits)

    dense = reloaded.dequantize()
    assert not hasattr(dense, ROTATION_ATTR)
    assert type(dense.model.embed_tokens) is torch.nn.Embedding and type(dense.model.norm).__name__ == "LlamaRMSNorm"
    plain = LlamaForCausalLM(dense.config).eval()
    plain.load_state_dict(dense.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(input_ids).logits, logits, atol=1e-4 * logits.abs().max().item())


def test_compress_on_load_rotates_as_compress_model_does(tiny_dense_dir, input_ids):
    config = dict(n_clusters=16, segment_length=1, rank=0, scale_group_size=16, rotate_residual=True)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=SWSCConfig(**config))
    direct = compress_model(AutoModelForCausalLM.from_pretrained(tiny_dense_dir), SWSCConfig(**config))
    assert hasattr(loaded, ROTATION_ATTR)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, direct(input_ids).logits)


def test_multi_process_compression_refuses_the_rotation(tiny_dense_dir):
    from swsc_hf.distributed import compress_source

    with pytest.raises(ValueError, match="rotate_residual.*one process"):
        compress_source(tiny_dense_dir, SWSCConfig(preset="swsc-4bit", rotate_residual=True))


def test_data_free_rotation_warns(caplog):
    with caplog.at_level("WARNING", logger="swsc_hf.quantizer"):
        compress_model(llama_with_gains(), SWSCConfig(preset="swsc-4bit", scale_group_size=16, rotate_residual=True))
    assert "without calibration" in caplog.text
