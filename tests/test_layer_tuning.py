"""Per-layer tuning inside calibrated compression: it lowers a layer's output error against the dense layer, changes
only codebooks and scales (same codes, layouts, dtypes and stored bytes), and improves the whole model's match."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from conftest import tiny_llama_config
from test_distill import kl_after_compression
from transformers import LlamaForCausalLM

import swsc_hf
from swsc_hf import SWSCConfig
from swsc_hf.compression import capture_first_layer_inputs, decoder_layers, run_layers
from swsc_hf.layer_tuning import relative_error, tune_layer_tables


def test_tuning_a_layer_lowers_its_output_error_and_changes_only_its_tables():
    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config(initializer_range=0.15)).eval()
    model = copy.deepcopy(dense)
    swsc_hf.compress_model(model, SWSCConfig(n_clusters=4, segment_length=1, rank=0, scale_group_size=32))
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 32), generator=generator) for _ in range(4)]
    inputs = capture_first_layer_inputs(dense, decoder_layers(dense), batches)
    with torch.no_grad():
        targets = [hidden for hidden, _ in run_layers([decoder_layers(dense)[0]], inputs)]
    layer = decoder_layers(model)[0]
    before = [relative_error([layer], x, t) for x, t in zip(inputs, targets, strict=True)]
    frozen = {n: t.clone() for n, t in layer.state_dict().items() if not n.endswith(("codebook", "scales"))}
    flags = {n: (p.dtype, p.requires_grad) for n, p in layer.named_parameters()}

    tune_layer_tables([layer], inputs, targets, steps=80, lr=1e-2, scales_lr=3e-2)

    after = [relative_error([layer], x, t) for x, t in zip(inputs, targets, strict=True)]
    assert sum(after) < 0.8 * sum(before)  # measured: 2.94 -> 2.12 (summed over the 4 windows; 4-value tables)
    assert all(torch.equal(layer.state_dict()[n], t) for n, t in frozen.items())  # codes, norms
    assert {n: (p.dtype, p.requires_grad) for n, p in layer.named_parameters()} == flags
    assert all(p.grad is None for p in layer.parameters())  # nothing but the tables took gradients


def test_tune_layer_tables_refuses_missing_targets():
    with pytest.raises(ValueError, match="one target per input"):
        tune_layer_tables([torch.nn.Identity()], [(torch.zeros(1, 2, 4), {})], [], steps=4, lr=1e-3)


def test_calibrated_compression_with_layer_tuning_matches_the_dense_model_better(calibration, caplog):
    plain_kl, plain = kl_after_compression(calibration, tune_steps=0)
    with caplog.at_level(logging.DEBUG, logger="swsc_hf.compression"):
        tuned_kl, tuned = kl_after_compression(calibration, tune_steps=0, layer_tune_steps=48, layer_tune_lr=1e-2,
                                                 tune_scales_lr=3e-2)
    errors = [tuple(map(float, re.findall(r"relative error ([\d.]+) -> ([\d.]+)", r.getMessage())[0]))
              for r in caplog.records if "relative error" in r.getMessage()]
    assert len(errors) == 2 and all(after < before for before, after in errors)  # each of the 2 layers
    assert SWSCConfig(**calibration).layer_tune_steps == 0  # off unless a preset or the user asks
    assert tuned_kl < 0.9 * plain_kl  # measured: 0.394 -> 0.342
    first = decoder_layers(tuned)[0]
    assert torch.equal(first.self_attn.q_proj.codes, decoder_layers(plain)[0].self_attn.q_proj.codes)
    assert not torch.equal(first.self_attn.q_proj.codebook, decoder_layers(plain)[0].self_attn.q_proj.codebook)
    assert {n: p.dtype for n, p in tuned.named_parameters()} == {n: p.dtype for n, p in plain.named_parameters()}
    assert swsc_hf.compression_report(tuned).model_stored_bytes == swsc_hf.compression_report(plain).model_stored_bytes
