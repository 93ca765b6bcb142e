"""SWSCConfig: validation with clear messages, presets, and the to_dict / from_dict / JSON round trip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

import swsc_hf
from swsc_hf import PRESETS, SWSCConfig
from swsc_hf.config import CALIBRATED_PRESETS
from swsc_hf.core.spec import LayerSpec


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_clusters=-1), "n_clusters"),
        (dict(n_clusters=1.5), "n_clusters"),
        (dict(n_clusters="many"), "n_clusters"),
        (dict(cluster_dim="rows"), "cluster_dim"),
        (dict(rank=-2), "rank"),
        (dict(segment_length=0), "segment_length"),
        (dict(scale_group_size=-5), "scale_group_size"),
        (dict(kmeans_iters=0), "kmeans_iters"),
        (dict(refit_rounds=-1), "refit_rounds"),
        (dict(refit_rounds=True), "refit_rounds"),
        (dict(refit_damp=-0.1), "refit_damp"),
        (dict(refit_damp=True), "refit_damp"),
        (dict(refit_damp=float("nan")), "refit_damp"),
        (dict(method="magic"), "method"),
        (dict(preset="nope"), "preset"),
        (dict(table_dtype="int8"), "table_dtype"),
        (dict(int8_codebooks=1), "int8_codebooks"),
        (dict(int8_codebooks=True, table_dtype="bfloat16"), "int8_codebooks.*table_dtype='float16'"),
        (dict(n_clusters=0, rank=0), "n_clusters"),
        (dict(bogus=1), "bogus"),
        (dict(format_version=99), "format_version"),
        (dict(tune_steps=-1), "tune_steps"),
        (dict(tune_steps=2.5), "tune_steps"),
        (dict(layer_tune_steps=-4), "layer_tune_steps"),
        (dict(tune_lr=-1e-3), "tune_lr"),
        (dict(tune_scales_lr="fast"), "tune_scales_lr"),
        (dict(tune_positions=-3), "tune_positions"),
        (dict(tune_samples=-1), "tune_samples"),
        (dict(tune_dtype="float16"), "tune_dtype"),
        (dict(time_budget=0), "time_budget"),
        (dict(time_budget=float("inf")), "time_budget"),
        (dict(compressed_layers={"a": {"out_features": 4, "in_features": 4, "n_clusters": 2, "segment_length": 3}}),
         "compressed_layers"),
        (dict(layer_overrides=["down_proj"]), "layer_overrides"),
        (dict(layer_overrides={"down_proj": 64}), "layer_overrides"),
        (dict(layer_overrides={"down_proj": {"tune_lr": 1e-3}}),
         r"layer_overrides\['down_proj'\] sets \['tune_lr'\]"),
        (dict(layer_overrides={"down_proj": {"scale_group_size": -5}}),
         r"layer_overrides\['down_proj'\] gives scale_group_size=-5"),
        (dict(n_clusters=16, rank=0, layer_overrides={"q_proj": {"n_clusters": 0}}),
         r"\['q_proj'\] gives n_clusters=0"),
        (dict(bits=3.0, layer_overrides={"down_proj": {"rank": 4}}), "drop \\['layer_overrides'\\]"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SWSCConfig(**kwargs)


def test_round_trip_through_dict_and_json():
    config = SWSCConfig(n_clusters=0.25, rank=16, cluster_dim="input", seed=7, modules_to_not_convert=["lm_head"],
                        dataset=["calibration text"], tokenizer=object())
    data = config.to_dict()
    assert "dataset" not in data and "tokenizer" not in data
    again = SWSCConfig.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data


def test_a_field_from_a_newer_swsc_hf_asks_for_an_upgrade():
    saved = {**SWSCConfig(preset="swsc-4bit").to_dict(), "tune_frobnication": 3}
    with pytest.raises(ValueError, match=r"unknown fields \['tune_frobnication'\].*upgrade swsc_hf"):
        SWSCConfig.from_dict(saved)


def test_presets_fill_fields_and_explicit_arguments_win():
    config = SWSCConfig(preset="swsc-paper")
    assert (config.n_clusters, config.segment_length, config.rank) == (0.5, None, 32)
    assert SWSCConfig(preset="swsc-paper", rank=8).rank == 8
    assert SWSCConfig(preset="swsc-4bit", segment_length=None).segment_length is None
    for name in PRESETS:
        SWSCConfig(preset=name)


def test_layer_spec_resolution():
    spec = SWSCConfig(n_clusters=0.5, rank=8).layer_spec("x", 128, 64)
    assert (spec.n_clusters, spec.segment_length, spec.rank) == (64, 64, 8)
    scaled = SWSCConfig(n_clusters=16, segment_length=1, scale_group_size=128).layer_spec("x", 128, 576)
    assert scaled.scale_group_size == 96  # rounded down to a divisor of 576
    with pytest.raises(ValueError, match="segment_length"):
        SWSCConfig(n_clusters=16, segment_length=5).layer_spec("x", 8, 64)


def test_layer_overrides_set_the_layout_of_the_layers_they_name():
    """A key matches whole dotted parts of a layer's name, anywhere in it (an expert's matrix too); later keys win;
    the other layers keep the config's layout."""
    config = SWSCConfig(preset="swsc-2bit", layer_overrides={"down_proj": {"scale_group_size": 64},
                                                             "layers.1.mlp.down_proj": {"n_clusters": 16}})
    first = config.layer_spec("model.layers.0.mlp.down_proj", 576, 1536)
    assert (first.n_clusters, first.segment_length, first.scale_group_size) == (256, 4, 64)
    second = config.layer_spec("model.layers.1.mlp.down_proj", 576, 1536)
    assert (second.n_clusters, second.scale_group_size) == (16, 64)
    expert = config.layer_spec("model.layers.0.mlp.experts.compressed.down_proj.3", 576, 1536)
    assert expert.scale_group_size == 64
    for other in ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.shutdown_proj", "model.layers.11.mlp.up_proj"):
        assert config.layer_spec(other, 576, 1536) == SWSCConfig(preset="swsc-2bit").layer_spec(other, 576, 1536)
    assert SWSCConfig(preset="swsc-2bit").layer_overrides == {}


def test_compression_gives_overridden_layers_their_layout_and_saves_it(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    config = SWSCConfig(n_clusters=8, segment_length=2, rank=0, scale_group_size=16,
                        layer_overrides={"down_proj": {"scale_group_size": 8}})
    swsc_hf.compress_model(model, config)
    groups = {name: m.spec.scale_group_size for name, m in model.named_modules()
              if isinstance(m, swsc_hf.SWSCLinear)}
    assert {g for name, g in groups.items() if name.endswith("down_proj")} == {8}
    assert {g for name, g in groups.items() if not name.endswith("down_proj")} == {16}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["layer_overrides"] == {"down_proj": {"scale_group_size": 8}}
    assert saved["compressed_layers"]["model.layers.0.mlp.down_proj"]["scale_group_size"] == 8


def test_layer_overrides_are_not_shared_between_configs():
    first, second = SWSCConfig(preset="swsc-2.2b-cal"), SWSCConfig(preset="swsc-2.2b-cal")
    first.layer_overrides["q_proj"] = {"rank": 4}
    assert "q_proj" not in second.layer_overrides and "q_proj" not in PRESETS["swsc-2.2b-cal"].get(
        "layer_overrides", {})
    explicit = SWSCConfig(preset="swsc-2.2b-cal", layer_overrides={"q_proj": {"rank": 4}})
    assert explicit.layer_overrides == {"q_proj": {"rank": 4}}  # replaces the preset's, as every explicit field


def test_saved_layout_must_match_the_architecture():
    config = SWSCConfig(compressed_layers={"a": LayerSpec(8, 8, n_clusters=2, segment_length=8).to_dict()})
    with pytest.raises(ValueError, match="does not match its architecture"):
        config.layer_spec("a", 16, 8)


def test_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["swsc"] is SWSCConfig
    assert AUTO_QUANTIZER_MAPPING["swsc"] is swsc_hf.SWSCQuantizer


def test_config_json_round_trips_the_whole_quantization_config(tmp_path):
    """A compressed model's config.json holds every saved field, the layouts of all layers included (a shared basis
    among them), exactly as the config has them, and reads back to the same config."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2))
    config = SWSCConfig(n_clusters=8, segment_length=2, rank=2, scale_group_size=16, share_group_size=2,
                        share_types=["q_proj"], seed=5, modules_to_not_convert=["lm_head"])
    swsc_hf.compress_model(model, config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]

    layouts = {name: m.spec.to_dict() for name, m in model.named_modules() if isinstance(m, swsc_hf.SWSCLinear)}
    assert len(layouts) == 14 and saved["compressed_layers"] == layouts
    assert layouts["model.layers.1.self_attn.q_proj"]["shared_basis"] == "q_proj_0_1"
    assert (saved["quant_method"], saved["format_version"]) == ("swsc", 1)
    assert saved == json.loads(json.dumps(config.to_dict()))
    assert set(saved) == set(SWSCConfig().to_dict())  # the saved fields, no run-time state
    assert AutoConfig.from_pretrained(tmp_path).quantization_config == saved
    assert SWSCConfig.from_dict(saved).to_dict() == saved


def test_calibrated_presets_carry_their_budget_and_refuse_to_run_without_data(calibration):
    config = SWSCConfig(preset="swsc-4.25b-cal", **calibration)
    assert config.bits == 4.25 and config.tunes and config.n_clusters is None
    assert SWSCConfig(preset="swsc-4.25b-cal", bits=4.25).bits == 4.25
    with pytest.raises(ValueError, match="conflicts with preset"):
        SWSCConfig(preset="swsc-4.25b-cal", bits=3)
    with pytest.raises(ValueError, match="drop"):
        SWSCConfig(preset="swsc-4bit", bits=4.25)
    assert all(name.endswith("-cal") for name in CALIBRATED_PRESETS) and len(CALIBRATED_PRESETS) == 4
    model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(ValueError, match="needs calibration text"):
        swsc_hf.compress_model(model, SWSCConfig(preset="swsc-3.2b-cal"))
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # nothing was touched
    roundtrip = SWSCConfig.from_dict(SWSCConfig(preset="swsc-4.25b-cal").to_dict())
    assert roundtrip.bits == 4.25 and roundtrip.preset == "swsc-4.25b-cal"


def test_a_saved_config_loads_as_saved_when_its_preset_was_redefined_since():
    """`swsc-3.2b-cal` was a fixed layout (pairs of 64) before it became `bits=3.2`: a checkpoint saved then holds
    the old fields and its layers. It loads with those fields; only a new, unsaved config takes the preset's
    current definition (which refuses the explicit layout)."""
    old_fields = dict(preset="swsc-3.2b-cal", n_clusters=64, segment_length=2, rank=0, scale_group_size=128,
                      n_samples=16, seq_len=512)
    layers = {"model.layers.0.mlp.up_proj": LayerSpec(64, 32, n_clusters=64, segment_length=2,
                                                        scale_group_size=32).to_dict()}
    saved = {**SWSCConfig(method="swsc", n_clusters=64, segment_length=2, rank=0, scale_group_size=128).to_dict(),
             **old_fields, "compressed_layers": layers}
    loaded = SWSCConfig.from_dict(saved)
    assert (loaded.bits, loaded.n_clusters, loaded.segment_length) == (None, 64, 2)
    assert loaded.compressed_layers == layers and loaded.preset == "swsc-3.2b-cal"
    with pytest.raises(ValueError, match="chooses every layer's layout"):
        SWSCConfig.from_dict({**saved, "compressed_layers": {}})
