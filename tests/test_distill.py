"""Distillation of the shared tables toward the dense model: it lowers the KL to the teacher on held-out text,
changes only codebooks and scales (same layouts, same stored bytes), and the result saves and reloads exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import swsc_hf
from swsc_hf import SWSCConfig
from swsc_hf.distill import distill_tables


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

    losses = distill_tables(model, teacher, train, steps=60, lr=1e-2, scales_lr=3e-3)

    assert losses[-1] < 0.95 * losses[0]
    assert kl_to(teacher, model, held_out) < 0.95 * before  # measured: 0.80 -> 0.69 (random model, random text)
    assert swsc_hf.compression_report(model).model_stored_bytes == stored
    assert all(torch.equal(model.state_dict()[n], t) for n, t in untouched.items())  # codes, norms, head
    assert not any(p.requires_grad for p in model.parameters())
    model.save_pretrained(tmp_path / "compressed")
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")
        assert torch.equal(reloaded(held_out).logits, model(held_out).logits)
