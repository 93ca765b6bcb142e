"""Distillation of the shared tables toward the dense model: it lowers the KL to the teacher on held-out text,
changes only codebooks and scales (same layouts, same stored bytes), and the result saves and reloads exactly."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import ByteTokenizer, tiny_llama_config
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import swsc_hf
from swsc_hf import SWSCConfig, distill
from swsc_hf.distill import DenseTeacher, compute_dtype_for, distill_tables, distillation_kl
from swsc_hf.table_training import scale_step_groups


def kl_to(teacher, model, ids) -> float:
    with torch.no_grad():
        target = teacher(ids).logits.log_softmax(-1).flatten(0, -2)
        return float(F.kl_div(model(ids).logits.log_softmax(-1).flatten(0, -2), target, log_target=True,
                              reduction="batchmean"))


def test_distillation_lowers_kl_and_keeps_the_layout(tmp_path):
    torch.manual_seed(0)  # larger weights than the default init, so the teacher's predictions are not near uniform
    LlamaForCausalLM(tiny_llama_config(initializer_range=0.15)).save_pretrained(tmp_path / "dense")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=SWSCConfig(
        n_clusters=4, segment_length=1, rank=0, scale_group_size=32, table_dtype="float32"))
    generator = torch.Generator().manual_seed(0)
    train = [torch.randint(0, 128, (4, 32), generator=generator) for _ in range(8)]
    held_out = torch.randint(0, 128, (4, 32), generator=generator)
    before, stored = kl_to(teacher, model, held_out), swsc_hf.compression_report(model).model_stored_bytes
    untouched = {n: t.clone() for n, t in model.state_dict().items() if not n.endswith(("codebook", "scales"))}

    losses = distill_tables(model, teacher, train, steps=60, lr=1e-2, scales_lr=3e-2)

    assert losses[-1] < 0.95 * losses[0]
    assert kl_to(teacher, model, held_out) < 0.95 * before  # measured: 0.80 -> 0.69 (random model, random text)
    assert swsc_hf.compression_report(model).model_stored_bytes == stored
    assert all(torch.equal(model.state_dict()[n], t) for n, t in untouched.items())  # codes, norms, head
    assert not any(p.requires_grad for p in model.parameters())
    model.save_pretrained(tmp_path / "compressed")
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")
        assert torch.equal(reloaded(held_out).logits, model(held_out).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distillation_kl_equals_kl_div_in_value_and_gradient(dtype, monkeypatch):
    """The fused, chunked KL against autograd through log_softmax and F.kl_div (the unfused oracle), with chunks of
    3 rows over 2 x 7 positions, so the last chunk is partial."""
    monkeypatch.setattr(distill, "KL_CHUNK_VALUES", 3 * 50)
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 7, 50, generator=generator)).to(dtype).requires_grad_(True)
    target = (4 * torch.randn(2, 7, 50, generator=generator)).to(dtype)
    oracle = F.kl_div(logits.float().log_softmax(-1).flatten(0, -2), target.float().log_softmax(-1).flatten(0, -2),
                      log_target=True, reduction="batchmean")
    (expected,) = torch.autograd.grad(3.0 * oracle, logits)
    fused = distillation_kl(logits, target)
    (grad,) = torch.autograd.grad(3.0 * fused, logits)
    assert fused.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(fused, oracle, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), expected.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_kl(logits, target[:, :6])


def test_bfloat16_tuning_puts_the_tied_head_back():
    """bfloat16 tuning runs the frozen head on a bfloat16 copy of its weight; afterwards the head holds its own
    float32 parameter again, still tied to the input embeddings."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.15, tie_word_embeddings=True)).eval()
    teacher = copy.deepcopy(model)
    head = model.lm_head.weight
    swsc_hf.compress_model(model, SWSCConfig(n_clusters=4, segment_length=1, rank=0, scale_group_size=32))
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    distill_tables(model, teacher, [ids], steps=2, compute_dtype="bfloat16")
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert model.lm_head.weight is head and model.model.embed_tokens.weight is head
    assert head.dtype == torch.float32 and teacher.lm_head.weight.dtype == torch.float32


def tiny_model_with_dense_copy() -> tuple[nn.Module, nn.Module, torch.Tensor, list[str]]:
    """A tiny Llama, a dense copy of it, a batch of ids and the names of its linears below the head."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.15)).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    return model, copy.deepcopy(model), ids, names


def test_dense_teacher_gives_the_dense_logits_and_puts_the_compressed_layers_back(calibration):
    model, dense, ids, names = tiny_model_with_dense_copy()
    teacher = DenseTeacher.before_compression(model, names)
    swsc_hf.compress_model(model, SWSCConfig(n_clusters=4, segment_length=1, rank=0, scale_group_size=32))
    with torch.no_grad():
        compressed = model(ids).logits
        assert torch.equal(teacher(ids), dense(ids).logits)
        assert torch.equal(model(ids).logits, compressed)  # the compressed layers are back in place
    assert all(isinstance(model.get_submodule(n), swsc_hf.SWSCLinear) for n in names)


def test_dense_teacher_keeps_its_norms_while_tuning_trains_the_models(calibration):
    """Tuning the norms must not move the teacher's: its logits stay the dense model's, bit for bit."""
    model, dense, ids, names = tiny_model_with_dense_copy()
    teacher = DenseTeacher.before_compression(model, names, keep_norms=True)
    swsc_hf.compress_model(model, SWSCConfig(n_clusters=4, segment_length=1, rank=0, scale_group_size=32))
    distill_tables(model, teacher, [ids], steps=3, lr=1e-2, norms_lr=1e-1)
    assert not torch.equal(model.model.norm.weight, dense.model.norm.weight)  # the model's norms trained
    with torch.no_grad():
        assert torch.equal(teacher(ids), dense(ids).logits)
    sharing = DenseTeacher.before_compression(model, names)
    with pytest.raises(ValueError, match="keep_norms=True"):
        distill_tables(model, sharing, [ids], steps=1, norms_lr=1e-3)


def kl_after_compression(calibration, **tuning) -> tuple[float, nn.Module]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.15)).eval()
    dense = copy.deepcopy(model)
    calibration = {**calibration, "n_samples": 16, "seq_len": 64}  # 4 x 32 tokens only teach the model those
    config = SWSCConfig(n_clusters=4, segment_length=1, rank=0, scale_group_size=32, **calibration, **tuning)
    swsc_hf.compress_model(model, config)
    text = " ".join(f"Held-out sentence {i} on compressing language models." for i in range(12))
    held_out = ByteTokenizer()(text).input_ids[:, :256].reshape(4, 64)  # text like the calibration's, not in it
    return kl_to(dense, model, held_out), model


def test_calibrated_compression_tunes_toward_the_dense_model_by_default(calibration):
    untuned, plain = kl_after_compression(calibration, tune_steps=0)
    tuned, model = kl_after_compression(calibration, tune_lr=1e-2, tune_scales_lr=3e-2)
    assert SWSCConfig(**calibration).tune_steps == 64  # on by default when calibrated
    assert tuned < 0.9 * untuned  # measured: 0.39 -> 0.33
    assert not any(p.requires_grad for p in model.parameters())
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in plain.named_parameters()}
    assert swsc_hf.compression_report(model).model_stored_bytes == swsc_hf.compression_report(plain).model_stored_bytes


def test_tuning_norms_and_sampled_positions(calibration):
    untuned, _ = kl_after_compression(calibration, tune_steps=0)
    tuned, model = kl_after_compression(calibration, tune_lr=1e-2, tune_norms_lr=1e-2, tune_positions=8)
    assert tuned < 0.9 * untuned
    assert not torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_tuning_draws_one_fresh_window_per_step_unless_told(calibration, monkeypatch):
    """Tuning windows extend the fitting windows' sequence: `tune_steps` of them by default (each seen once), or
    `tune_samples` cycled."""
    seen = []

    def record(model, teacher, batches, **kwargs):
        seen.append(batches)
        return []

    monkeypatch.setattr(swsc_hf.quantizer, "distill_tables", record)
    kl_after_compression(calibration, tune_steps=24)
    kl_after_compression(calibration, tune_steps=24, tune_samples=5)
    fitting = swsc_hf.calibration_batches(SWSCConfig(**{**calibration, "n_samples": 16, "seq_len": 64}),
                                          calibration["tokenizer"], torch.device("cpu"))
    assert [len(batches) for batches in seen] == [24, 5]
    assert all(torch.equal(a, b) for a, b in zip(seen[0][:16], fitting, strict=True))
    assert len({tuple(batch[0, :8].tolist()) for batch in seen[0]}) > 16  # more windows than fitting saw


def test_bfloat16_tuning_tunes_as_float32_does(calibration):
    """`tune_dtype="bfloat16"` (autocast products, float32 tables and loss) reaches the tuning, changes the result
    and repairs as much of the compression error as float32 tuning does."""
    untuned, _ = kl_after_compression(calibration, tune_steps=0)
    in_float32, reference = kl_after_compression(calibration, tune_lr=1e-2, tune_scales_lr=3e-2)
    in_bfloat16, model = kl_after_compression(calibration, tune_lr=1e-2, tune_scales_lr=3e-2, tune_dtype="bfloat16")
    assert in_bfloat16 < 0.9 * untuned and abs(in_bfloat16 - in_float32) < 0.05 * in_float32  # measured: 0.2% apart
    assert not torch.equal(model.model.layers[0].mlp.up_proj.codebook, reference.model.layers[0].mlp.up_proj.codebook)
    assert model.model.layers[0].mlp.up_proj.codebook.dtype == torch.float16


def test_auto_tune_dtype_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    for bf16, amx, expected in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                (False, False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda bf16=bf16: bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        assert compute_dtype_for("auto", torch.device("cpu")) == expected
    assert compute_dtype_for("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert compute_dtype_for("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="tune_dtype='float16'"):
        compute_dtype_for("float16", torch.device("cpu"))


def test_time_budget_stops_tuning_early(calibration, caplog):
    with caplog.at_level(logging.INFO, logger="swsc_hf"):
        kl_after_compression(calibration, tune_steps=100_000, time_budget=3.0)
    assert "time budget" in caplog.text


def test_bfloat16_model_tunes_and_keeps_its_dtypes(calibration):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.15)).to(torch.bfloat16).eval()
    dtypes = {n: p.dtype for n, p in model.named_parameters() if "proj" not in n}
    swsc_hf.compress_model(model, SWSCConfig(n_clusters=4, segment_length=1, rank=0, scale_group_size=32,
                                             tune_steps=4, tune_norms_lr=1e-3, **calibration))
    assert {n: p.dtype for n, p in model.named_parameters() if n in dtypes} == dtypes
    assert model.model.layers[0].mlp.up_proj.codebook.dtype == torch.float16


def test_scales_take_steps_relative_to_their_magnitude():
    """Adam's first step moves each parameter by about its step size; the scales' step size is a fraction of each
    layer's mean |scale|, so layers whose scales differ 100x move by the same fraction."""
    small, large = nn.Parameter(torch.full((4, 3), 0.01)), nn.Parameter(torch.full((4, 3), 1.0))
    optimizer = torch.optim.Adam(scale_step_groups([small, large], 0.05))
    (small.sum() + large.sum()).backward()
    optimizer.step()
    assert torch.allclose(small.detach(), torch.full((4, 3), 0.01 * 0.95))
    assert torch.allclose(large.detach(), torch.full((4, 3), 0.95))
