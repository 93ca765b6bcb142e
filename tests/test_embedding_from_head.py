"""`embedding_from_head`: input embeddings tied to a compressed head read its tables (`SWSCEmbedding`) instead of
keeping a dense copy; the row decoder (`dequantize_weight_rows`, `unpack_codes_at`) against full dequantization."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from conftest import tiny_llama_config
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from swsc_hf import SWSCConfig, SWSCEmbedding, SWSCLinear, compress_model, dequantize_model
from swsc_hf.core.compress import to_weight
from swsc_hf.core.packing import pack_codes, unpack_codes, unpack_codes_at
from swsc_hf.core.spec import LayerSpec
from swsc_hf.kernels import dequantize_channels, dequantize_weight_rows

CONFIG = dict(preset="swsc-4bit", head_bits=4)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8, 13, 16])
def test_codes_gathered_at_positions_equal_the_unpacked_stream(bits):
    codes = torch.randint(0, 2**bits, (1000,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    positions = torch.tensor([[0, 999, 7], [8, 500, 999]])
    assert torch.equal(unpack_codes_at(packed, bits, positions), codes[positions])
    assert torch.equal(unpack_codes(packed, bits, 1000), codes)


@pytest.mark.parametrize("spec", [
    LayerSpec(48, 32, n_clusters=16, scale_group_size=8),
    LayerSpec(48, 32, n_clusters=40, segment_length=2, scale_group_size=8, rows_per_codebook=5),
    LayerSpec(48, 30, n_clusters=7, segment_length=3),
    LayerSpec(48, 32, n_clusters=40, segment_length=4, scale_group_size=8, rows_per_codebook=5, cluster_dim="input"),
    LayerSpec(48, 30, n_clusters=7, segment_length=3, cluster_dim="input"),
], ids=["scalars", "pairs-books", "odd-bits", "input-channels", "input-odd"])
def test_weight_rows_equal_rows_of_the_dequantized_weight(spec):
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(spec.n_codebooks, spec.n_clusters, spec.segment_length, generator=generator)
    codes = pack_codes(torch.randint(0, spec.n_clusters, (spec.n_codes,), generator=generator), spec.code_bits)
    scales = torch.rand(spec.channels, spec.scale_groups, generator=generator) if spec.scale_groups else None
    weight = to_weight(dequantize_channels(codes, codebook, scales, spec), spec)
    rows = torch.tensor([0, 47, 3, 3, 20])
    assert torch.equal(dequantize_weight_rows(codes, codebook, scales, spec, rows), weight[rows])


def test_layer_weight_rows_include_the_low_rank_term():
    spec = LayerSpec(24, 16, n_clusters=16, scale_group_size=8, rank=3)
    layer = SWSCLinear(spec, dtype=torch.float32)
    torch.manual_seed(0)
    for name in ("codebook", "scales", "lowrank_a", "lowrank_b"):
        getattr(layer, name).data.normal_()
    layer.codes.data = pack_codes(torch.randint(0, 16, (spec.n_codes,)), spec.code_bits)
    rows = torch.tensor([5, 0, 23])
    torch.testing.assert_close(layer.weight_rows(rows), layer.dequantize()[rows])


def tiny_gemma3_config() -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                         max_position_embeddings=128, tie_word_embeddings=True)


@pytest.mark.parametrize("on_load", [True, False], ids=["on-load", "in-memory"])
def test_embeddings_read_the_head_and_round_trip(tiny_tied_dense_dir, tmp_path, on_load):
    config = SWSCConfig(**CONFIG, embedding_from_head=True)
    if on_load:
        model = AutoModelForCausalLM.from_pretrained(tiny_tied_dense_dir, quantization_config=config)
    else:
        model = compress_model(AutoModelForCausalLM.from_pretrained(tiny_tied_dense_dir), config)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, SWSCEmbedding) and embedding.head is model.lm_head
    assert not [name for name, _ in model.named_parameters() if "embed_tokens.weight" in name]
    ids = torch.tensor([[3, 127, 0, 3, 64]])
    assert torch.equal(embedding(ids), model.lm_head.dequantize()[ids])
    assert model.dtype == torch.float32  # not the float16 tables'
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "c")
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["quantization_config"]["embedding_from_head"] is True and saved["dtype"] == "float32"
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as checkpoint:
        assert not [key for key in checkpoint.keys() if key.startswith("model.embed_tokens.weight")]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert isinstance(reloaded.get_input_embeddings(), SWSCEmbedding)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False),
                       model.generate(ids, max_new_tokens=4, do_sample=False))


def test_gemma_scaled_embeddings_equal_a_dense_copy_of_the_head():
    """The oracle: the same compression with the dense embedding overwritten by the dequantized head (Gemma-3
    multiplies embeddings by sqrt(hidden), rounded to the model's dtype)."""
    config = tiny_gemma3_config()

    def compressed(embedding_from_head: bool) -> nn.Module:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()  # compressing unties the config
        return compress_model(model, SWSCConfig(**CONFIG, embedding_from_head=embedding_from_head))

    reading, dense = compressed(True), compressed(False)
    assert reading.get_input_embeddings().embed_scale == 8.0
    with torch.no_grad():
        dense.get_input_embeddings().weight.copy_(dense.lm_head.dequantize())
        ids = torch.tensor([[1, 2, 100, 2, 7, 9]])
        assert torch.equal(reading(ids).logits, dense(ids).logits)
        dequantize_model(reading)
        embedding = reading.get_input_embeddings()
        assert type(embedding).__name__ == "Gemma3TextScaledWordEmbedding"
        assert embedding.weight is reading.lm_head.weight
        torch.testing.assert_close(reading(ids).logits, dense(ids).logits)


def test_a_disk_offloaded_head_is_read_through_its_hook(tiny_tied_dense_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_tied_dense_dir, quantization_config=SWSCConfig(**CONFIG,
                                                                                         embedding_from_head=True))
    model.save_pretrained(tmp_path / "c")
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "disk"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c", device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload"))
    assert offloaded.lm_head.codes.device.type == "meta"
    ids = torch.tensor([[3, 127, 0, 3, 64]])
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, model(ids).logits)


def test_refused_before_compressing(tiny_tied_dense_dir, tmp_path):
    untied = tmp_path / "untied"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(untied)
    with pytest.raises(ValueError, match="embedding_from_head.*not tied"):
        AutoModelForCausalLM.from_pretrained(untied, quantization_config=SWSCConfig(**CONFIG,
                                                                                    embedding_from_head=True))
    with pytest.raises(ValueError, match="embedding_from_head.*stays dense"):
        compress_model(AutoModelForCausalLM.from_pretrained(tiny_tied_dense_dir),
                       SWSCConfig(preset="swsc-4bit", embedding_from_head=True))
    with pytest.raises(ValueError, match="embedding_from_head"):
        SWSCConfig(embedding_from_head=True, rotate_residual=True)
    with pytest.raises(ValueError, match="embedding_from_head"):
        SWSCConfig(embedding_from_head="yes")


def test_compiled_decoding_generates_the_eager_tokens():
    """`compile_decoding` traces the embedding look-up into the step (fullgraph) on Gemma-3's dynamic shapes."""
    import swsc_hf

    config = tiny_gemma3_config()
    torch.manual_seed(0)
    model = compress_model(AutoModelForCausalLM.from_config(config).eval(),
                           SWSCConfig(**CONFIG, embedding_from_head=True))
    prompt = torch.randint(0, 128, (1, 21), generator=torch.Generator().manual_seed(5))
    eager = model.generate(prompt, max_new_tokens=24, do_sample=False)
    swsc_hf.compile_decoding(model, backend="eager")
    assert torch.equal(model.generate(prompt, max_new_tokens=24, do_sample=False), eager)
