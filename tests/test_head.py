"""`head_bits`: the output head compressed with its own layout (on load, in memory, `bits=`, calibrated)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from swsc_hf import SWSCConfig, SWSCLinear, compress_model
from swsc_hf import compression as compression_module
from swsc_hf.allocation import spec_bits
from swsc_hf.compression import calibration_batches
from swsc_hf.config import DEFAULT_NOT_CONVERT


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def dense_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("head-dense")
    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=request.param)).save_pretrained(path)
    return path


def test_head_bits_takes_the_head_out_of_the_default_dense_list():
    assert SWSCConfig().modules_to_not_convert == DEFAULT_NOT_CONVERT
    kept = SWSCConfig(head_bits=6).modules_to_not_convert
    assert "lm_head" not in kept and "embed_out" not in kept and "embed_tokens" in kept
    spec = SWSCConfig(head_bits=6).head_spec(49152, 576)
    assert (spec.n_clusters, spec.segment_length, spec.rank, spec.cluster_dim) == (64, 1, 0, "output")
    assert 576 % spec.scale_group_size == 0 and spec.scale_group_size <= 128


@pytest.mark.parametrize("value", [1, 9, 6.0, "6", True])
def test_invalid_head_bits_is_refused_by_name(value):
    with pytest.raises(ValueError, match="head_bits"):
        SWSCConfig(head_bits=value)


def test_a_head_kept_dense_by_an_explicit_list_is_a_conflict(dense_dir):
    config = SWSCConfig(preset="swsc-4bit", head_bits=6, modules_to_not_convert=["lm_head", "embed_tokens"])
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config)


@pytest.mark.parametrize("on_load", [True, False], ids=["on-load", "in-memory"])
def test_head_gets_its_own_layout_and_round_trips(dense_dir, tmp_path, on_load):
    config = SWSCConfig(preset="swsc-2bit", head_bits=5)
    if on_load:
        model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config)
    else:
        model = compress_model(AutoModelForCausalLM.from_pretrained(dense_dir), config)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert isinstance(model.lm_head, SWSCLinear) and model.lm_head.spec == config.head_spec(128, 64)
    assert model.model.layers[0].mlp.up_proj.spec.segment_length == 4  # the other layers keep the preset's layout
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    error = (model.lm_head.dequantize() - dense.lm_head.weight).norm() / dense.lm_head.weight.norm()
    assert error < 0.1  # 32 values scaled per 64 weights, against about 0.5 for the 2-bit quadruples
    ids = torch.arange(12)[None] % 128
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "c")
    saved = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert saved["head_bits"] == 5 and saved["compressed_layers"]["lm_head"]["n_clusters"] == 32
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "c")(ids).logits, expected)


def test_bits_budget_leaves_the_head_out(dense_dir):
    model = compress_model(AutoModelForCausalLM.from_pretrained(dense_dir), SWSCConfig(bits=3, head_bits=8))
    assert model.lm_head.spec.n_clusters == 256
    body = [m for n, m in model.named_modules() if isinstance(m, SWSCLinear) and n != "lm_head"]
    weights = sum(m.spec.out_features * m.spec.in_features for m in body)
    average = sum(spec_bits(m.spec) * m.spec.out_features * m.spec.in_features for m in body) / weights
    assert 2.5 < average <= 3  # the other layers fill the budget by themselves


def test_calibrated_head_is_fitted_on_its_inputs(dense_dir, calibration, monkeypatch):
    seen = {}
    fit = compression_module.compress_weight

    def recording_fit(weight, spec, **kwargs):
        if spec.out_features == 128:  # the head: the only (128, 64) matrix of the tiny Llama
            seen["hessian"] = kwargs.get("hessian")
        return fit(weight, spec, **kwargs)

    monkeypatch.setattr(compression_module, "compress_weight", recording_fit)
    config = SWSCConfig(preset="swsc-4bit", head_bits=4, tune_steps=0, **calibration)
    model = compress_model(AutoModelForCausalLM.from_pretrained(dense_dir), config)
    # the oracle: X^T X of the final hidden states the compressed stack gives the calibration windows
    gram = torch.zeros(64, 64)
    with torch.no_grad():
        for batch in calibration_batches(config, calibration["tokenizer"], torch.device("cpu")):
            hidden = model.model(input_ids=batch).last_hidden_state.reshape(-1, 64)
            gram += hidden.t() @ hidden
    assert seen["hessian"] is not None
    torch.testing.assert_close(seen["hessian"], gram, rtol=1e-4, atol=1e-3)
