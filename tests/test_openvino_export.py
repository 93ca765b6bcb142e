"""`export_openvino`: the exported IR keeps every layer's codes and learned codebook (no dense weight) and runs to the
torch model's logits (max abs difference below 1e-5 on float32 logits of magnitude ~0.5; measured ~2e-7) and to its
greedy continuation, for every layout family; bad inputs get clear errors. The real-model check is marked slow."""

from __future__ import annotations

import builtins
import os

import numpy as np
import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from swsc_hf import OpenVINOCausalLM, SWSCConfig, SWSCLinear, compress_model, export_openvino

TOLERANCE = 1e-5  # max |logit difference|, float32 execution (the CPU plugin's f32 inference precision)

LAYOUTS = {
    "swsc-4bit": dict(preset="swsc-4bit"),
    "swsc-3bit (vector segments)": dict(preset="swsc-3bit"),
    "swsc-paper (whole channels + low rank)": dict(preset="swsc-paper"),
    "bits=3.5 ladder": dict(bits=3.5),
    "input channels, several codebooks, low rank": dict(n_clusters=16, segment_length=1, cluster_dim="input",
                                                        scale_group_size=32, rows_per_codebook=24, rank=4),
    "basis sharing (low rank only, shared bases)": dict(preset="basis-sharing-paper"),
    "swsc-4bit on a rotated residual stream": dict(preset="swsc-4bit", rotate_residual=True),
    "tied embeddings read from the compressed head": dict(preset="swsc-4bit", head_bits=4, embedding_from_head=True),
}


def tiny_compressed(**config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    tied = config.get("embedding_from_head", False)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()
    compress_model(model, SWSCConfig(**config))
    return model


def prompt(length: int = 20) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ov():
    return pytest.importorskip("openvino")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exported_model_gives_the_torch_logits_and_generation(ov, tmp_path, layout):
    model = tiny_compressed(**LAYOUTS[layout])
    export_openvino(model, tmp_path / "ov")
    runner = OpenVINOCausalLM(tmp_path / "ov", threads=1)
    ids = prompt()
    with torch.no_grad():
        expected = model(ids).logits
        continuation = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert (runner.logits(ids) - expected).abs().max().item() < TOLERANCE
    assert torch.equal(runner.generate(ids, 8), continuation)
    # the cache: a prefix, then one token at a time, gives the full-sequence logits
    runner.reset()
    runner.step(ids[:, :12])
    for t in range(12, 20):
        assert np.abs(runner.step(ids[:, t : t + 1])[0, -1] - expected[0, t].numpy()).max() < TOLERANCE
    # a batch of two sequences
    batch = torch.cat([ids, prompt(40)[:, 20:]])
    with torch.no_grad():
        assert (runner.logits(batch) - model(batch).logits).abs().max().item() < TOLERANCE


def test_ir_holds_codes_and_codebooks_not_dense_weights(ov, tmp_path):
    model = tiny_compressed(preset="swsc-4bit")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SWSCLinear)}
    export_openvino(model, tmp_path / "compressed")
    torch.manual_seed(0)
    export_openvino(LlamaForCausalLM(tiny_llama_config()).eval(), tmp_path / "dense")  # a dense export, for size

    ir = ov.Core().read_model(str(tmp_path / "compressed" / "openvino_model.xml"))
    constants = [op for op in ir.get_ordered_ops() if op.get_type_name() == "Constant"]
    u4 = [c for c in constants if c.get_element_type() == ov.Type.u4]
    assert len(u4) == len(layers)
    assert sorted(int(np.prod(c.get_shape())) for c in u4) == sorted(m.spec.n_codes for m in layers.values())
    codebooks = [c for c in constants if c.get_friendly_name().endswith("/codebook")]
    assert len(codebooks) == len(layers) and all(c.get_element_type() == ov.Type.f16 for c in codebooks)
    for name, layer in layers.items():  # each layer's codebook is its own learned table, bit for bit
        table = next(c for c in codebooks if c.get_friendly_name() == f"{name}/codebook")
        assert np.array_equal(table.get_data().reshape(-1), layer.codebook.numpy().reshape(-1))
    smallest = min(m.out_features * m.in_features for m in layers.values())
    big_floats = {c.get_friendly_name() for c in constants if c.get_element_type() in (ov.Type.f32, ov.Type.f16)
                  and int(np.prod(c.get_shape())) >= smallest}
    assert big_floats == {"self.model.model.embed_tokens.weight", "self.model.lm_head.weight"}  # dense by design
    compressed_size = os.path.getsize(tmp_path / "compressed" / "openvino_model.bin")
    dense_size = os.path.getsize(tmp_path / "dense" / "openvino_model.bin")
    assert compressed_size < 0.4 * dense_size, (compressed_size, dense_size)


def test_compress_to_fp16_halves_the_dense_parts(ov, tmp_path):
    model = tiny_compressed(preset="swsc-4bit")
    export_openvino(model, tmp_path / "f32")
    export_openvino(model, tmp_path / "f16", compress_to_fp16=True)
    sizes = {name: os.path.getsize(tmp_path / name / "openvino_model.bin") for name in ("f32", "f16")}
    dense_bytes = 2 * 128 * 64 * 4  # embeddings and lm_head in float32
    assert sizes["f32"] - sizes["f16"] >= 0.9 * dense_bytes / 2
    ids = prompt()
    with torch.no_grad():
        expected = model(ids).logits
    assert (OpenVINOCausalLM(tmp_path / "f16", threads=1).logits(ids) - expected).abs().max().item() < 1e-2


def test_export_writes_config_and_tokenizer_and_refuses_a_non_empty_folder(ov, tmp_path, tiny_with_tokenizer):
    from transformers import AutoTokenizer

    model = tiny_compressed(preset="swsc-4bit")
    tokenizer = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    out = tmp_path / "ov"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        export_openvino(model, out, tokenizer)
    assert os.listdir(out) == ["notes.txt"]
    export_openvino(model, out, tokenizer, overwrite=True)
    names = set(os.listdir(out))
    assert {"openvino_model.xml", "openvino_model.bin", "swsc_openvino.json", "config.json", "tokenizer.json",
            "notes.txt"} <= names
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        export_openvino(model, tmp_path / "file")


def test_runner_refuses_a_folder_not_written_by_the_export(ov, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder written by export_openvino"):
        OpenVINOCausalLM(tmp_path)


def test_model_with_meta_weights_is_refused(ov, tmp_path):
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(ValueError, match="whole model on the CPU"):
        export_openvino(model, tmp_path / "ov")
    assert not (tmp_path / "ov").exists()


def test_compressed_experts_are_refused_with_the_reason(ov, tmp_path):
    from test_architectures import tiny_model

    model = tiny_model("mixtral")
    compress_model(model, SWSCConfig(preset="swsc-4bit"))
    with pytest.raises(ValueError, match="mixture-of-experts blocks .*dequantize_model"):
        export_openvino(model, tmp_path / "ov")
    assert not (tmp_path / "ov").exists()


def test_missing_openvino_names_the_install_command(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    model = tiny_compressed(preset="swsc-4bit")
    with pytest.raises(ImportError, match="pip install openvino"):
        export_openvino(model, tmp_path / "ov")
    with pytest.raises(ImportError, match="pip install openvino"):
        OpenVINOCausalLM(tmp_path)
    assert not (tmp_path / "ov").exists()


@pytest.mark.slow
def test_smollm2_export_gives_the_torch_logits(ov, tmp_path):
    from swsc_hf import load_smollm2
    from swsc_hf.bundled import smollm2_gguf

    try:
        smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(f"the bundled SmolLM2 is absent: {err}")
    model, tokenizer = load_smollm2()
    compress_model(model, SWSCConfig(preset="swsc-4bit"))
    export_openvino(model, tmp_path / "ov", tokenizer)
    runner = OpenVINOCausalLM(tmp_path / "ov", threads=1)
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        continuation = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert (runner.logits(ids) - expected).abs().max().item() < 1e-3  # logits of magnitude ~20
    assert torch.equal(runner.generate(ids, 8), continuation)
