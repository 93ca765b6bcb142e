"""No traps for a new user (issue 14): loud wrong loads, real offload, a fast CLI, numbers that do not mislead."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama_config
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from swsc_hf import SWSCConfig, SWSCLinear, compress_model, compression_report

GUARD_HINT = "pip install swsc-hf, then import swsc_hf"


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = compress_model(LlamaForCausalLM(tiny_llama_config()), SWSCConfig(n_clusters=16, segment_length=1, rank=2))
    path = tmp_path_factory.mktemp("tiny-swsc")
    model.save_pretrained(path)
    return str(path)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


# ---- 1. a load without `import swsc_hf` fails loudly ---------------------------------------------------------------
def test_load_without_import_raises(compressed_dir):
    result = _run(
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({compressed_dir!r})\n"
        "assert 'swsc_hf' not in sys.modules\n"
        "print('LOADED')\n"
    )
    assert result.returncode != 0 and "LOADED" not in result.stdout
    output = result.stdout + result.stderr
    assert "ignore_mismatched_sizes" in output  # transformers' size-mismatch error on every compressed layer
    assert GUARD_HINT in output  # the guard tensor's name in the load report says what to do


def test_guarded_checkpoint_loads_cleanly_with_import(compressed_dir, input_ids, caplog):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir)
    assert isinstance(model.model.layers[0].mlp.up_proj, SWSCLinear)
    with safe_open(os.path.join(compressed_dir, "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.mlp.up_proj.weight" in keys and any(GUARD_HINT in k for k in keys)
    assert "UNEXPECTED" not in caplog.text and "MISMATCH" not in caplog.text
    assert torch.isfinite(model(input_ids).logits).all()


def test_checkpoint_without_guard_still_loads(compressed_dir, input_ids, tmp_path):
    """Checkpoints written before the guard existed (no placeholder tensors) load as before."""
    for name in os.listdir(compressed_dir):
        if name != "model.safetensors":
            (tmp_path / name).write_bytes(open(os.path.join(compressed_dir, name), "rb").read())
    with safe_open(os.path.join(compressed_dir, "model.safetensors"), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if list(handle.get_slice(k).get_shape()) != [0]}
        metadata = handle.metadata()
    assert not any(k.endswith("up_proj.weight") for k in tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata=metadata)
    old = AutoModelForCausalLM.from_pretrained(tmp_path)
    new = AutoModelForCausalLM.from_pretrained(compressed_dir)
    assert torch.equal(old(input_ids).logits, new(input_ids).logits)


# ---- 3. disk offload moves every stored tensor ---------------------------------------------------------------------
def _stored(layer: SWSCLinear) -> dict[str, torch.Tensor]:
    return {**dict(layer.named_parameters(recurse=False)), **dict(layer.named_buffers(recurse=False))}


@pytest.mark.parametrize("source", ["checkpoint", "compress-on-load"])
def test_disk_offload_moves_codes_too(compressed_dir, tiny_dense_dir, input_ids, tmp_path, source):
    """device_map="auto" with little memory and an offload folder: codes go to disk with the tables, by default."""
    kwargs = dict(device_map="auto", max_memory={"cpu": 60_000}, offload_folder=str(tmp_path / "offload"))
    config = SWSCConfig(n_clusters=16, segment_length=1, rank=2)
    if source == "checkpoint":
        model = AutoModelForCausalLM.from_pretrained(compressed_dir, **kwargs)
        reference = AutoModelForCausalLM.from_pretrained(compressed_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=config, **kwargs)
        reference = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=config)
    assert "disk" in model.hf_device_map.values()
    offloaded = [layer for layer in model.modules() if isinstance(layer, SWSCLinear)
                 and layer.codebook.device.type == "meta"]
    assert offloaded
    for layer in offloaded:
        assert {n: t.device.type for n, t in _stored(layer).items()} == {n: "meta" for n in _stored(layer)}
    assert torch.equal(model(input_ids).logits, reference(input_ids).logits)


# ---- 4. the command line --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"], ["report"]])
def test_cli_parses_arguments_without_importing_torch(argv):
    """`swsc-hf --help` (and an argument error) must not import torch, transformers, peft or swsc_hf (seconds)."""
    result = _run(
        "import sys, swsc_hf_cli\n"
        f"try:\n    swsc_hf_cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'swsc_hf') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_console_script_is_the_light_entry_point():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["swsc-hf"] == "swsc_hf_cli:main"


def test_cli_threads_flag_and_default(compressed_dir, monkeypatch):
    from swsc_hf.cli import main
    from swsc_hf_cli import default_threads

    threads = torch.get_num_threads()
    try:
        assert main(["report", compressed_dir, "--threads", "1"]) == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 1 <= default_threads() <= (os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3


def test_cli_report_needs_no_tokenizer_and_names_dense_models(compressed_dir, tiny_dense_dir, capsys):
    from swsc_hf.cli import main

    assert not any("tokenizer" in name for name in os.listdir(compressed_dir))
    assert main(["report", compressed_dir]) == 0
    assert "14 compressed layers" in capsys.readouterr().out
    assert main(["report", tiny_dense_dir]) == 0
    out = capsys.readouterr().out
    assert "dense (no compressed layers)" in out and "0.000" not in out


@pytest.mark.parametrize("src", ["./no-such-model", "{tmp}/missing", "{tmp}/file.txt"])
def test_cli_missing_local_source_is_named_as_such(tmp_path, capsys, src):
    from swsc_hf.cli import main

    (tmp_path / "file.txt").write_text("x")
    src = src.format(tmp=tmp_path)
    assert main(["compress", src, str(tmp_path / "out"), "--bits", "4"]) == 2
    err = capsys.readouterr().err
    assert ("no such folder" in err or "is a file" in err) and "repo" not in err.lower()
    assert main(["report", src]) == 2


def test_cli_compress_keeps_source_dtype_and_prints_a_summary(tiny_with_tokenizer, tmp_path, capsys):
    from swsc_hf.cli import main

    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer).to(torch.bfloat16).save_pretrained(source)
    for name in os.listdir(tiny_with_tokenizer):
        if "token" in name:
            (source / name).write_bytes((tiny_with_tokenizer / name).read_bytes())
    assert main(["compress", str(source), str(tmp_path / "out"), "--bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "bits/weight" in out and "{" not in out and len(out.splitlines()) <= 4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert main(["compress", str(source), str(tmp_path / "out"), "--bits", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["avg_bits"] <= 4


# ---- 5. numbers and habits that do not mislead ----------------------------------------------------------------------
def _compressed(**config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    settings = {**dict(n_clusters=16, segment_length=1, rank=2), **config}
    return compress_model(LlamaForCausalLM(tiny_llama_config()), SWSCConfig(**settings))


@pytest.mark.parametrize("bits", [3, 4])
def test_data_free_bits_fill_the_budget(tiny_dense_dir, bits):
    """bits=4 alone fits only 3-bit codes (4-bit codes with their scales cost 4.13 bits): layers are upgraded until
    the average is as close to the budget as the ladder allows, never above it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=SWSCConfig(bits=bits))
    assert bits - 0.05 <= compression_report(model).compressed_bits_per_weight <= bits
    again = compress_model(LlamaForCausalLM(tiny_llama_config()), SWSCConfig(bits=bits))
    assert again.config.quantization_config.compressed_layers == model.config.quantization_config.compressed_layers


def test_num_parameters_counts_packed_codes():
    model = _compressed()
    names = {name for name, _ in model.named_parameters()}
    assert "model.layers.0.mlp.up_proj.codes" in names
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_dtype_casts_are_consistent_and_keep_tables(input_ids):
    model = _compressed()
    layer = model.model.layers[0].mlp.up_proj
    assert layer.codebook.dtype == torch.float16
    model.half()
    assert model.model.embed_tokens.weight.dtype == torch.float16 and layer.codebook.dtype == torch.float16
    model.to(torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and layer.codebook.dtype == torch.float16
    assert layer.dequantize().dtype == torch.bfloat16 and torch.isfinite(model(input_ids).logits).all()
    model.float()
    assert model.model.embed_tokens.weight.dtype == torch.float32 and layer.codebook.dtype == torch.float16
    assert layer.codes.dtype == torch.uint8


def test_save_pretrained_writes_a_model_card_but_keeps_the_users(tmp_path):
    model = _compressed()
    model.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "swsc_hf" in card and "bits" in card
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("my notes")
    model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "my notes"


def test_prepare_model_for_kbit_training_keeps_tables(caplog):
    from peft import prepare_model_for_kbit_training

    model = _compressed()
    model.half()
    prepare_model_for_kbit_training(model)
    assert model.model.layers[0].self_attn.q_proj.codebook.dtype == torch.float16
    assert model.model.norm.weight.dtype == torch.float32 and model.is_activation_checkpointing
    assert "prepare_for_training" in caplog.text


def test_all_linear_targets_compressed_layers(input_ids):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_compressed(), LoraConfig(target_modules="all-linear", r=4))
    wrapped = {name.split(".")[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")
               and isinstance(m.get_base_layer(), SWSCLinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not hasattr(peft_model.base_model.model.lm_head, "lora_A")
    assert torch.isfinite(peft_model(input_ids).logits).all()


def test_peft_own_merge_then_save_reloads(input_ids, tmp_path):
    """docs/finetuning.md: saving after PEFT's own merge_and_unload() reloads (save records the merged layouts)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_compressed(table_dtype="float32"), LoraConfig(target_modules=["q_proj"], r=4))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.model.layers[0].self_attn.q_proj.spec.rank == 2 + 4
    assert torch.equal(reloaded(input_ids).logits, merged(input_ids).logits)


# ---- 6. the main job prints a summary ---------------------------------------------------------------------------
def test_main_job_prints_a_summary_unless_per_layer(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "main_job.py"
    spec = importlib.util.spec_from_file_location("main_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert not job.build_parser().parse_args([]).per_layer and job.build_parser().parse_args(["--per-layer"]).per_layer
    report = compression_report(_compressed())
    summary = report.summary()
    assert len(summary.splitlines()) == 2 and "14 compressed layers" in summary and "bits/weight" in summary
    assert len(str(report).splitlines()) == 1 + 14 + 2
