"""Round two of the reliability attack (issue 16): checkpoints that loaded silently wrong or failed with messages
that named nothing. Each case must now fail with a ValueError naming the file, tensor or field."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from swsc_hf import LayerSpec, SWSCConfig
from swsc_hf.config import MAX_COMPRESSED_LAYERS
from swsc_hf.validation import check_layouts, read_safetensors_header

LAYER = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def compressed_dir(tiny_dense_dir, tmp_path_factory):
    """A checkpoint whose 4-bit codes can hold out-of-range values (12 clusters), with checksums."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=12, segment_length=1, rank=2, kmeans_iters=3))
    path = tmp_path_factory.mktemp("compressed")
    model.save_pretrained(path)
    return path


def rewritten(src, dst, edit):
    """A copy whose tensors were edited and written back without checksums (as another tool would)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def split(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + length].decode(), raw[8 + length :]


def join(text: str, data: bytes) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def header_edited(src, dst, edit):
    """A copy whose safetensors header text was edited, data (and so checksums) unchanged."""
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    text, data = split(file)
    file.write_bytes(join(edit(text), data))
    return dst


# ---- item 3: offloaded layers are checked too (from the file, before they are offloaded) ------------------------
OFFLOAD_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
               "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_an_intact_checkpoint_still_loads_offloaded(compressed_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir, device_map=OFFLOAD_MAP, offload_folder=tmp_path,
                                                 offload_buffers=True)
    ids = torch.arange(12)[None] % 128
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, AutoModelForCausalLM.from_pretrained(compressed_dir)(ids).logits)


def test_nan_table_in_a_disk_offloaded_layer(compressed_dir, tmp_path):
    def nan_table(t):
        t[f"{LAYER}.codebook"].view(-1)[0] = float("nan")

    folder = rewritten(compressed_dir, tmp_path / "c", nan_table)
    with pytest.raises(ValueError, match=rf"{LAYER}.codebook in model.safetensors holds NaN or Inf"):
        AutoModelForCausalLM.from_pretrained(folder, device_map=OFFLOAD_MAP, offload_folder=tmp_path / "off")


def test_out_of_range_codes_in_offloaded_buffers(compressed_dir, tmp_path):
    def bad_codes(t):
        t[f"{LAYER}.codes"][0] = 0xFF

    folder = rewritten(compressed_dir, tmp_path / "c", bad_codes)
    with pytest.raises(ValueError, match=rf"{LAYER}.codes holds code 15 but the codebook has only 12"):
        AutoModelForCausalLM.from_pretrained(folder, device_map=OFFLOAD_MAP, offload_folder=tmp_path / "off",
                                             offload_buffers=True)


# ---- item 4: two checkpoint names for one model tensor -------------------------------------------------------------
@pytest.mark.parametrize("real, alias", [("model.norm.weight", "model.model.norm.weight"),
                                         (f"{LAYER}.codebook", LAYER.replace("model.", "", 1) + ".codebook")])
def test_alias_tensors_are_refused(compressed_dir, tmp_path, real, alias):
    def add_alias(t):
        t[alias] = torch.zeros_like(t[real])

    with pytest.raises(ValueError, match=rf"{alias}.* both fill the model's {real}|{real}.* both fill"):
        AutoModelForCausalLM.from_pretrained(rewritten(compressed_dir, tmp_path / "c", add_alias))


# ---- item 5: what gives the bytes their meaning is recorded and checked ------------------------------------------
def test_header_dtype_edit_is_refused(compressed_dir, tmp_path):
    def f16_to_bf16(text):
        header = json.loads(text)
        assert header[f"{LAYER}.codebook"]["dtype"] == "F16"
        header[f"{LAYER}.codebook"]["dtype"] = "BF16"
        return json.dumps(header)

    folder = header_edited(compressed_dir, tmp_path / "c", f16_to_bf16)
    with pytest.raises(ValueError, match=rf"{LAYER}.codebook in model.safetensors is BF16 .* saved as \['F16'"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_layout_edit_in_config_json_is_refused(compressed_dir, tmp_path):
    folder = shutil.copytree(compressed_dir, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    layer = config["quantization_config"]["compressed_layers"]["model.layers.0.self_attn.q_proj"]  # 64 x 64
    layer["cluster_dim"] = "input"  # same tensor shapes on a square layer: only the recorded digest tells
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="compressed_layers in config.json differs from the layouts recorded"):
        AutoModelForCausalLM.from_pretrained(folder)


# ---- item 6: one shared basis, two shapes ------------------------------------------------------------------------
def test_shared_basis_with_two_ranks_is_refused():
    def layer(rank):
        return dict(out_features=64, in_features=64, n_clusters=0, rank=rank, shared_basis="q_proj_0_1")

    layers = {"model.layers.0.self_attn.q_proj": layer(8), "model.layers.1.self_attn.q_proj": layer(4)}
    with pytest.raises(ValueError, match=r"layers.1.self_attn.q_proj'\] uses shared basis 'q_proj_0_1' with shape"):
        check_layouts({}, layers, "swsc_shared_bases.bases")


# ---- item 7: NaN/Inf in tensors that are not compressed tables ---------------------------------------------------
@pytest.mark.parametrize("name", ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"])
def test_nan_in_dense_tensors_is_refused(compressed_dir, tmp_path, name):
    def poison(t):
        t[name].view(-1)[-1] = float("inf")

    with pytest.raises(ValueError, match=rf"{name} in model.safetensors holds NaN or Inf"):
        AutoModelForCausalLM.from_pretrained(rewritten(compressed_dir, tmp_path / "c", poison))


# ---- item 10: headers swsc_hf's parser accepted but safetensors' refuses -----------------------------------------
@pytest.mark.parametrize("edit", [
    lambda text: text.replace('"data_offsets":[0,', '"data_offsets":[-0,', 1),
    lambda text: text[:-1] + ', "\\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}',
    lambda text: json.dumps({**json.loads(text), "__metadata__": False}),
], ids=["minus-zero", "lone-surrogate", "metadata-false"])
def test_headers_safetensors_refuses_are_refused_with_the_file_named(compressed_dir, tmp_path, edit):
    folder = header_edited(compressed_dir, tmp_path / "c", lambda text: edit(json.dumps(
        json.loads(text), separators=(",", ":"))))
    with pytest.raises(ValueError, match="model.safetensors"):
        read_safetensors_header(folder / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)


# ---- item 11: config values accepted then failing deep inside; NaN source weights name the layer ------------------
@pytest.mark.parametrize("field, value", [
    ("n_clusters", float("nan")), ("n_clusters", float("inf")), ("rank", True), ("scale_group_size", False),
    ("segment_length", True), ("rows_per_codebook", True), ("share_group_size", True), ("seed", 2**70),
    ("seed", -1), ("preset", ["swsc-4bit"]), ("n_samples", 10**12), ("seq_len", 10**9), ("kmeans_iters", 10**9),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SWSCConfig\.{field}="):
        SWSCConfig(**{field: value})


def test_nan_source_weight_names_the_layer(tiny_dense_dir, tmp_path):
    folder = shutil.copytree(tiny_dense_dir, tmp_path / "dense")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"could not compress model.layers.1.mlp.up_proj.weight: .*NaN or Inf"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=SWSCConfig(n_clusters=0, rank=2))
    from swsc_hf import compress_model  # after loading (the calibrated path's schedule), too

    with pytest.raises(ValueError, match=r"could not compress model.layers.1.mlp.up_proj: .*NaN or Inf"):
        compress_model(AutoModelForCausalLM.from_pretrained(folder), SWSCConfig(n_clusters=0, rank=2))


# ---- item 12: a config.json listing a million layers fails before the work grows with it ---------------------------
def test_absurd_number_of_compressed_layers_fails_fast(monkeypatch):
    layer = {"out_features": 64, "in_features": 64, "rank": 2}
    layers = dict.fromkeys((f"model.layers.{i}.mlp" for i in range(MAX_COMPRESSED_LAYERS + 1)), layer)
    monkeypatch.setattr(LayerSpec, "from_dict", lambda data: pytest.fail("a layout was validated first"))
    with pytest.raises(ValueError, match=r"SWSCConfig.compressed_layers lists 131073 layers"):
        SWSCConfig.from_dict({"quant_method": "swsc", "compressed_layers": layers})


# ---- item 8: tied embeddings and a compressed head: untied, saved, reloaded -------------------------------------
@pytest.mark.parametrize("on_load", [True, False], ids=["on-load", "in-memory"])
def test_compressed_head_of_a_tied_model_round_trips(tiny_tied_dense_dir, tmp_path, on_load):
    from swsc_hf import SWSCLinear, compress_model

    config = SWSCConfig(n_clusters=0, rank=4, modules_to_not_convert=["embed_tokens"])  # lm_head compressed too
    if on_load:
        model = AutoModelForCausalLM.from_pretrained(tiny_tied_dense_dir, quantization_config=config)
    else:
        model = compress_model(AutoModelForCausalLM.from_pretrained(tiny_tied_dense_dir), config)
    dense_embedding = AutoModelForCausalLM.from_pretrained(tiny_tied_dense_dir).model.embed_tokens.weight
    assert isinstance(model.lm_head, SWSCLinear) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, dense_embedding)  # the embedding stays dense
    ids = torch.arange(12)[None] % 128
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False),
                       model.generate(ids, max_new_tokens=4, do_sample=False))

    config_file = tmp_path / "c" / "config.json"  # as saved before untying existed: still tied in config.json
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, "tie_word_embeddings": True}))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "c")(ids).logits, expected)


# ---- item 10: broken sharded index files are refused with the file named -----------------------------------------
@pytest.fixture(scope="module")
def sharded_dir(compressed_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(compressed_dir).save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize("edit", [
    lambda index: "{not json",
    lambda index: json.dumps({"metadata": index["metadata"]}),
    lambda index: json.dumps({**index, "weight_map": list(index["weight_map"])}),
    lambda index: json.dumps({**index, "weight_map": dict.fromkeys(index["weight_map"], 3)}),
    lambda index: json.dumps({**index, "weight_map": dict.fromkeys(index["weight_map"], "../model.safetensors")}),
    lambda index: "[]",
], ids=["invalid-json", "no-weight-map", "list-weight-map", "int-values", "outside-folder", "not-an-object"])
def test_broken_shard_index_names_the_file(sharded_dir, tmp_path, edit):
    folder = shutil.copytree(sharded_dir, tmp_path / "c")
    index_file = folder / "model.safetensors.index.json"
    index_file.write_text(edit(json.loads(index_file.read_text())))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_shared_basis_names_swapped_in_config_json_are_refused(tiny_dense_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=SWSCConfig(
        preset="basis-sharing-paper"))
    model.save_pretrained(tmp_path / "c")
    config_file = tmp_path / "c" / "config.json"
    config = json.loads(config_file.read_text())
    layers = config["quantization_config"]["compressed_layers"]
    for index in (0, 1):  # up_proj and gate_proj bases have one shape: only the recorded digest tells them apart
        up, gate = layers[f"model.layers.{index}.mlp.up_proj"], layers[f"model.layers.{index}.mlp.gate_proj"]
        assert up["shared_basis"] == "up_proj_0_1" and gate["shared_basis"] == "gate_proj_0_1"
        up["shared_basis"], gate["shared_basis"] = gate["shared_basis"], up["shared_basis"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="compressed_layers in config.json differs from the layouts recorded"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")
