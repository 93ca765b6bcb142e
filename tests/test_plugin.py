"""Compress on load, run, save, reload: the transformers integration end to end on a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import swsc_hf
from swsc_hf import SWSCConfig, SWSCLinear, compression_report

SETTINGS = {
    "paper-output": dict(n_clusters=0.5, rank=8),
    "paper-input": dict(n_clusters=0.5, rank=4, cluster_dim="input"),
    "scalar-scaled": dict(n_clusters=16, segment_length=1, rank=0, scale_group_size=32),
    "vector-lowrank": dict(n_clusters=64, segment_length=4, rank=4, scale_group_size=-1),
    "input-vector": dict(n_clusters=32, segment_length=2, rank=2, cluster_dim="input", scale_group_size=16),
}


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_compress_save_reload_identical(tiny_dense_dir, input_ids, tmp_path, name):
    config = SWSCConfig(**SETTINGS[name])
    model = load(tiny_dense_dir, quantization_config=config)
    targets = [m for n, m in model.named_modules() if n.endswith(("_proj",))]
    assert targets and all(isinstance(m, SWSCLinear) for m in targets)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("_proj"))
    logits = model(input_ids).logits
    assert torch.isfinite(logits).all()
    generated = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, input_ids.shape[1] + 4)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "swsc" and len(saved["compressed_layers"]) == len(targets)
    reloaded = load(tmp_path)
    assert torch.equal(reloaded(input_ids).logits, logits)
    assert torch.equal(reloaded.generate(input_ids[:1], max_new_tokens=4, do_sample=False), generated)


def test_checkpoint_smaller_than_dense_and_matches_report(tiny_dense_dir, tmp_path):
    model = load(tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=16, segment_length=1, rank=0))
    model.save_pretrained(tmp_path)
    report = compression_report(model)
    stored = 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith((".codebook", ".codes", ".scales", ".lowrank_a", ".lowrank_b")):
                tensor = f.get_tensor(key)
                stored += tensor.numel() * tensor.element_size()
    assert stored == report.compressed_stored_bytes
    # 4-bit codes plus a 16-entry fp16 codebook per matrix
    assert 4.0 < report.compressed_bits_per_weight < 4.2
    dense_size = sum(p.stat().st_size for p in Path(tiny_dense_dir).glob("*.safetensors"))
    assert (tmp_path / "model.safetensors").stat().st_size < dense_size


def test_codes_are_bit_packed(tiny_dense_dir):
    model = load(tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=8, segment_length=1, rank=0))
    layer = model.model.layers[0].mlp.up_proj
    assert layer.codes.dtype == torch.uint8
    assert layer.codes.numel() == (128 * 64 * 3 + 7) // 8  # 3 bits per code


def test_dequantize_equals_terms(tiny_dense_dir):
    model = load(tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=0.5, rank=8, table_dtype="float32"))
    layer = model.model.layers[1].self_attn.o_proj
    idx = layer.unpacked_codes()[:, 0]
    expected = layer.codebook[0][idx] + layer.lowrank_a @ layer.lowrank_b
    torch.testing.assert_close(layer.dequantize(), expected)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ expected.t(), rtol=1e-5, atol=1e-5)


def test_input_clustering_forward_matches_dense(tiny_dense_dir):
    model = load(tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=0.5, rank=4, cluster_dim="input"))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t(), rtol=1e-4, atol=1e-5)


def test_model_dequantize_gives_dense_linears(tiny_dense_dir, input_ids):
    model = load(tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=16, segment_length=1, rank=2))
    logits = model(input_ids).logits
    model.dequantize()
    assert not any(isinstance(m, SWSCLinear) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None
    torch.testing.assert_close(model(input_ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_full_rank_and_all_clusters_are_lossless(tiny_dense_dir, input_ids):
    dense = load(tiny_dense_dir)
    exact = load(tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=1.0, rank=0, table_dtype="float32"))
    torch.testing.assert_close(exact(input_ids).logits, dense(input_ids).logits, rtol=1e-4, atol=1e-4)
    full = load(tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=1, rank=64, table_dtype="float32"))
    torch.testing.assert_close(full(input_ids).logits, dense(input_ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_maps(tiny_dense_dir, input_ids, device_map):
    reference = load(tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=16, segment_length=1, rank=2))
    model = load(tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=16, segment_length=1, rank=2),
                 device_map=device_map)
    assert torch.equal(model(input_ids).logits, reference(input_ids).logits)


def test_offloaded_layers_compress_and_run(tiny_dense_dir, input_ids, tmp_path):
    """Layer 1 goes to disk through accelerate: it is compressed as it loads and still runs."""
    config = SWSCConfig(n_clusters=16, segment_length=1, rank=2)
    reference = load(tiny_dense_dir, quantization_config=config)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = load(tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=16, segment_length=1, rank=2),
                 device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert isinstance(model.model.layers[1].mlp.up_proj, SWSCLinear)
    assert torch.equal(model(input_ids).logits, reference(input_ids).logits)


def test_unknown_layers_fall_back_to_modules_to_not_convert(tiny_dense_dir):
    model = load(tiny_dense_dir, quantization_config=SWSCConfig(
        n_clusters=16, segment_length=1, rank=0, modules_to_not_convert=["lm_head", r".*\.mlp"]))
    # transformers' matching: a name prefix, a regex from the start, or a suffix ("mlp" alone matches none of these)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, SWSCLinear)


def test_compress_model_after_load_saves_and_reloads(tiny_dense_dir, input_ids, tmp_path):
    model = load(tiny_dense_dir)
    swsc_hf.compress_model(model, SWSCConfig(preset="swsc-4bit"))
    logits = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert torch.equal(load(tmp_path)(input_ids).logits, logits)

