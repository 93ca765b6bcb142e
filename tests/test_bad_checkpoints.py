"""Corrupted or mismatched compressed checkpoints fail with an error that names the tensor and the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from swsc_hf import SWSCConfig

LAYER = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def compressed_dir(tiny_dense_dir, tmp_path_factory):
    # 12 clusters: 4-bit codes can hold the out-of-range values 12..15
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=12, segment_length=1, rank=2))
    path = tmp_path_factory.mktemp("compressed")
    model.save_pretrained(path)
    return path


def edited_copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config["quantization_config"])
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def load(path):
    return AutoModelForCausalLM.from_pretrained(path)


def test_out_of_range_code(compressed_dir, tmp_path):
    def corrupt(t):
        t[f"{LAYER}.codes"] = torch.full_like(t[f"{LAYER}.codes"], 0xFF)  # every code = 15 >= 12

    with pytest.raises(ValueError, match=rf"{LAYER}.codes holds code 15 but the codebook has only 12"):
        load(edited_copy(compressed_dir, tmp_path / "c", corrupt))


def test_wrong_shape(compressed_dir, tmp_path):
    def corrupt(t):
        t[f"{LAYER}.lowrank_a"] = torch.zeros(128, 3, dtype=torch.float16)

    with pytest.raises(ValueError, match=rf"{LAYER}.lowrank_a is F16 \[128, 3\], expected"):
        load(edited_copy(compressed_dir, tmp_path / "c", corrupt))


def test_truncated_packed_codes(compressed_dir, tmp_path):
    def corrupt(t):
        t[f"{LAYER}.codes"] = t[f"{LAYER}.codes"][:-1].clone()

    with pytest.raises(ValueError, match=rf"{LAYER}.codes is U8"):
        load(edited_copy(compressed_dir, tmp_path / "c", corrupt))


def test_missing_tensor(compressed_dir, tmp_path):
    with pytest.raises(ValueError, match=rf"lacks tensor {LAYER}.codebook"):
        load(edited_copy(compressed_dir, tmp_path / "c", lambda t: t.pop(f"{LAYER}.codebook")))


def test_unexpected_tensor(compressed_dir, tmp_path):
    def corrupt(t):
        t[f"{LAYER}.weight"] = torch.zeros(128, 64)

    with pytest.raises(ValueError, match="does not describe"):
        load(edited_copy(compressed_dir, tmp_path / "c", corrupt))


def test_integer_codes_stored_as_float(compressed_dir, tmp_path):
    def corrupt(t):
        t[f"{LAYER}.codes"] = t[f"{LAYER}.codes"].float()

    with pytest.raises(ValueError, match=rf"{LAYER}.codes is F32"):
        load(edited_copy(compressed_dir, tmp_path / "c", corrupt))


def test_config_layout_for_another_architecture(compressed_dir, tmp_path):
    def corrupt(q):
        q["compressed_layers"][LAYER]["in_features"] = 32

    with pytest.raises(ValueError, match="does not match its architecture"):
        load(edited_copy(compressed_dir, tmp_path / "c", edit_config=corrupt))


def test_invalid_config_value(compressed_dir, tmp_path):
    def corrupt(q):
        q["compressed_layers"][LAYER]["segment_length"] = 7

    with pytest.raises(ValueError, match="segment_length"):
        load(edited_copy(compressed_dir, tmp_path / "c", edit_config=corrupt))


def test_truncated_file(compressed_dir, tmp_path):
    path = edited_copy(compressed_dir, tmp_path / "c")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="past the end of the file"):
        load(path)


def test_huge_declared_header(compressed_dir, tmp_path):
    path = edited_copy(compressed_dir, tmp_path / "c")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="header"):
        load(path)
