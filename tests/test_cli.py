"""The swsc-hf command line: compress, eval (with --json), report, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from swsc_hf.cli import main


def swsc_4bit_bits(shapes: list[tuple[int, int]]) -> float:
    """Stored bits per weight of the swsc-4bit preset, counted by hand: 4-bit codes, a float16 scale per row and
    group of 128 values (rounded down to a divisor of the row: 64 for the tiny model's 64-wide rows) and a float16
    codebook of 16 values per matrix."""
    stored = sum(4 * o * i + 16 * o * (i // min(128, i)) + 16 * 16 for o, i in shapes)
    return stored / sum(o * i for o, i in shapes)


def test_compress_eval_report(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "compressed"
    assert main(["compress", str(tiny_with_tokenizer), str(out), "--preset", "swsc-4bit", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dense = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer)
    shapes = [tuple(m.weight.shape) for name, m in dense.named_modules()
              if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    assert len(shapes) == 14 and summary["avg_bits"] == pytest.approx(swsc_4bit_bits(shapes), rel=1e-12)
    assert (out / "config.json").exists()

    text = tmp_path / "text.txt"
    text.write_text(" the of and a to in is was on for \n" * 200)
    assert main(["eval", str(out), "--data", str(text), "--seq-len", "64", "--max-tokens", "512", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == 8 * 63 and result["perplexity"] > 1 and result["avg_bits"] == summary["avg_bits"]

    assert main(["report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 14


def test_compress_replaces_an_existing_checkpoint_atomically_and_keeps_other_files(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "compressed"
    assert main(["compress", str(tiny_with_tokenizer), str(out), "--bits", "4"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    assert main(["compress", str(tiny_with_tokenizer), str(out), "--bits", "3"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_compress_refuses_outputs_that_would_lose_files_before_compressing(tiny_with_tokenizer, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr("swsc_hf.cli.load_source", lambda *a, **k: pytest.fail("compression started"))
    source = tmp_path / "project" / "src"
    shutil.copytree(tiny_with_tokenizer, source)
    (tmp_path / "project" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.csv").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [(source, "is the source model"), (tmp_path / "project", "contains the source model"),
             (tmp_path, "contains the source model"), (tmp_path / "file", "is not a folder"),
             (tmp_path / "other", "not empty")]
    for out, message in cases:
        assert main(["compress", str(source), str(out), "--bits", "4"]) == 2, out
        assert message in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "project")
    assert main(["compress", str(tiny_with_tokenizer), ".", "--bits", "4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "file").read_text() == "mine"


def test_compress_overwrite_keeps_the_files_it_does_not_write(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["compress", str(tiny_with_tokenizer), str(out), "--bits", "4", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()


def test_bad_arguments_give_a_clear_error(tiny_with_tokenizer, tmp_path, capsys):
    assert main(["compress", str(tiny_with_tokenizer), str(tmp_path / "x"), "--rank", "-3"]) == 2
    assert "SWSCConfig.rank=-3 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # the tiny model's embeddings are not tied to its head
    assert main(["compress", str(tiny_with_tokenizer), str(tmp_path / "x"), "--head-bits", "4",
                 "--embedding-from-head"]) == 2
    assert "SWSCConfig.embedding_from_head=True" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compress_layer_overrides_reach_the_layers_they_name(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "compressed"
    assert main(["compress", str(tiny_with_tokenizer), str(out), "--preset", "swsc-4bit",
                 "--layer-overrides", '{"down_proj": {"scale_group_size": 16}}']) == 0
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["compressed_layers"]
    assert {name: layer["scale_group_size"] for name, layer in layers.items() if name.endswith("down_proj")} == {
        "model.layers.0.mlp.down_proj": 16, "model.layers.1.mlp.down_proj": 16}
    assert {layer["scale_group_size"] for name, layer in layers.items() if not name.endswith("down_proj")} == {64}
    with pytest.raises(SystemExit):
        main(["compress", str(tiny_with_tokenizer), str(tmp_path / "x"), "--layer-overrides", "{down_proj: 16}"])
    assert "is not JSON" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_compress_bits_ladder_scalar_keeps_every_layer_a_scalar_table(tiny_with_tokenizer, tmp_path):
    """`--bits-ladder scalar` reaches the calibrated allocation: every layer gets a scalar table (the fastest
    kernels), and the choice is saved in config.json; `--head-bits` gives the head its own table, and the tuning,
    refit, rotation and 8-bit grid flags reach the config."""
    text = tmp_path / "calibration.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and keeps running far away\n" * 100)
    out = tmp_path / "compressed"
    assert main(["compress", str(tiny_with_tokenizer), str(out), "--bits", "2.5", "--calibration", str(text),
                 "--n-samples", "4", "--calibration-seq-len", "32", "--tune-steps", "0",
                 "--bits-ladder", "scalar", "--tune-samples", "3", "--head-bits", "6", "--layer-tune-steps", "2",
                 "--refit-rounds", "2", "--refit-damp", "0.1", "--tune-dtype", "bfloat16", "--rotate-residual",
                 "--int8-codebooks"]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits_ladder"] == "scalar" and config["refit_rounds"] == 2 and config["refit_damp"] == 0.1
    assert config["rotate_residual"] is True and config["int8_codebooks"] is True
    assert config["head_bits"] == 6 and config["compressed_layers"]["lm_head"]["n_clusters"] == 64
    assert config["tune_samples"] == 3 and config["layer_tune_steps"] == 2 and config["tune_dtype"] == "bfloat16"
    assert {layer.get("segment_length", 1) for layer in config["compressed_layers"].values()} == {1}


def test_cli_choices_match_the_config_it_builds():
    """The parser lists choices without importing swsc_hf (fast `--help`), so its literals must follow the config's."""
    from swsc_hf.config import BITS_LADDERS, CLUSTER_DIMS, TABLE_DTYPES, TUNE_DTYPES
    from swsc_hf_cli import build_parser

    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    choices = {action.dest: tuple(action.choices) for action in compress._actions if action.choices}
    assert choices["bits_ladder"] == BITS_LADDERS
    assert choices["cluster_dim"] == CLUSTER_DIMS
    assert choices["table_dtype"] == TABLE_DTYPES
    assert choices["tune_dtype"] == TUNE_DTYPES
