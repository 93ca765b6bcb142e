"""Fine-tuning compressed models: LoRA through PEFT, merges, centroid training, Trainer (tiny random Llama)."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import swsc_hf
from swsc_hf import SWSCConfig, SWSCLinear
from swsc_hf import lora as swsc_lora

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
swsc_lora.register_with_peft()  # `import swsc_hf` does this too; idempotent


def tiny_model(rank: int = 4, table_dtype: str = "float32", **config_kwargs) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    kwargs = {**dict(n_clusters=16, segment_length=1, rank=rank, table_dtype=table_dtype), **config_kwargs}
    return swsc_hf.compress_model(model, SWSCConfig(**kwargs)).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a busy machine their spin-waits make the file 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compressed() -> LlamaForCausalLM:
    return tiny_model()


@pytest.fixture
def model(compressed) -> LlamaForCausalLM:
    return copy.deepcopy(compressed)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))


def lora(model, **kwargs):
    return get_peft_model(model, LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16, **kwargs))


def randomize_lora_b(peft_model) -> None:
    """LoRA starts as a no-op (B = 0); give B values so merges have something to merge."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


def compressed_state(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": t.detach().clone() for n, m in model.named_modules() if isinstance(m, SWSCLinear)
            for k, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))}


def train(model, batch, steps: int = 6, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch).logits


def test_register_is_idempotent():
    import peft.tuners.lora.model as lora_model

    assert swsc_lora.register_with_peft()
    dispatcher = lora_model.dispatch_default
    assert swsc_lora.register_with_peft() and lora_model.dispatch_default is dispatcher


def test_without_peft_the_module_imports_and_registration_is_a_no_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft.tuners.lora.config", None)  # as if PEFT were not installed
    spec = importlib.util.spec_from_file_location("swsc_hf._lora_without_peft", swsc_lora.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.PEFT_AVAILABLE and module.register_with_peft() is False
    assert not hasattr(module, "SWSCLoraLinear")


def test_get_peft_model_wraps_compressed_layers_and_trains_only_adapters(model, batch):
    before = compressed_state(model)
    reference = logits(model, batch)
    peft_model = lora(model)
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, swsc_lora.SWSCLoraLinear)]
    assert len(wrapped) == 4 and all(n.endswith(tuple(TARGETS)) for n in wrapped)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    torch.testing.assert_close(logits(peft_model, batch), reference, rtol=0, atol=0)  # B = 0 at start

    losses = train(peft_model, batch)
    assert losses[-1] < losses[0] - 0.05
    after = compressed_state(peft_model.get_base_model())
    assert before.keys() == {k.replace(".base_layer", "") for k in after}
    for key, tensor in after.items():
        assert torch.equal(tensor, before[key.replace(".base_layer", "")]), key
    assert not any(hasattr(m, "weight") for m in peft_model.modules() if isinstance(m, SWSCLinear))


def test_adapter_save_load_round_trip(compressed, batch, tmp_path):
    peft_model = lora(copy.deepcopy(compressed), lora_dropout=0.1)
    train(peft_model, batch, steps=3)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(compressed), tmp_path)
    assert isinstance(loaded.get_base_model().model.layers[0].self_attn.q_proj, swsc_lora.SWSCLoraLinear)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("rank", [0, 4])
def test_compressed_merge_is_exact_and_reloads(rank, batch, tmp_path):
    base = tiny_model(rank=rank)
    peft_model = lora(base)
    randomize_lora_b(peft_model)
    expected = logits(peft_model, batch)

    native = copy.deepcopy(peft_model).merge_and_unload()  # PEFT's own merge: compressed and exact
    torch.testing.assert_close(logits(native, batch), expected, rtol=0, atol=1e-4)

    merged = swsc_lora.merge_and_unload(peft_model, mode="compressed")
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, SWSCLinear) and q_proj.spec.rank == rank + 8
    layers = merged.config.quantization_config.compressed_layers
    assert layers["model.layers.0.self_attn.q_proj"]["rank"] == rank + 8
    assert layers["model.layers.0.self_attn.k_proj"].get("rank", 0) == rank
    torch.testing.assert_close(logits(merged, batch), expected, rtol=0, atol=1e-4)

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.model.layers[1].self_attn.v_proj.spec.rank == rank + 8
    torch.testing.assert_close(logits(reloaded, batch), logits(merged, batch), rtol=0, atol=0)


def test_dense_merge_gives_a_plain_dense_model(model, batch, tmp_path):
    peft_model = lora(model)
    randomize_lora_b(peft_model)
    expected = logits(peft_model, batch)
    merged = swsc_lora.merge_and_unload(peft_model, mode="dense")
    assert not any(isinstance(m, SWSCLinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    assert getattr(merged.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(merged, batch), expected, rtol=0, atol=1e-4)

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(reloaded, "hf_quantizer", None) is None
    assert not any(isinstance(m, SWSCLinear) for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded, batch), logits(merged, batch), rtol=0, atol=0)


def test_shared_basis_refuses_compressed_merge_but_merges_dense(batch):
    base = tiny_model(rank=0, method="basis_sharing", n_clusters=0, parameter_ratio=0.8, share_group_size=2,
                      share_types=TARGETS)
    assert base.model.layers[0].self_attn.q_proj.spec.shared_basis is not None
    peft_model = lora(base)
    randomize_lora_b(peft_model)
    expected = logits(peft_model, batch)
    with pytest.raises(ValueError, match="shares its input-side basis.*mode=\"dense\""):
        copy.deepcopy(peft_model).merge_and_unload()  # PEFT's own merge
    with pytest.raises(ValueError, match="cannot merge into model.layers.0.self_attn.q_proj: the layer shares"):
        swsc_lora.merge_and_unload(peft_model, mode="compressed")
    assert not any(m.merged for m in peft_model.modules() if isinstance(m, swsc_lora.SWSCLoraLinear))
    merged = swsc_lora.merge_and_unload(peft_model, mode="dense")
    torch.testing.assert_close(logits(merged, batch), expected, rtol=0, atol=1e-4)


def test_unsupported_lora_options_are_clear_errors(model):
    with pytest.raises(ValueError, match="DoRA .*not supported on swsc_hf compressed layers"):
        lora(copy.deepcopy(model), use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported"):
        lora(model, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="mode='fused'"):
        swsc_lora.merge_and_unload(model, mode="fused")


def test_centroid_training_changes_codebooks_and_round_trips(model, batch, tmp_path):
    before = compressed_state(model)
    swsc_hf.prepare_for_training(model, train_codebooks=True, gradient_checkpointing=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".codebook") for n in trainable)
    losses = train(model, batch, lr=3e-3)
    assert losses[-1] < losses[0] - 0.02
    swsc_hf.finish_training(model)
    after = compressed_state(model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(".codebook") for k in changed)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, tensor in compressed_state(reloaded).items():
        assert torch.equal(tensor, after[key]), key
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)


def test_lora_with_codebooks_checkpointing_and_merge(model, batch, tmp_path):
    peft_model = lora(model)
    swsc_hf.prepare_for_training(peft_model, train_codebooks=True)  # after get_peft_model, which freezes all
    assert peft_model.get_base_model().is_activation_checkpointing
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(n.endswith(".codebook") for n in trainable) and any(".lora_A." in n for n in trainable)
    losses = train(peft_model, batch, lr=3e-3)
    assert losses[-1] < losses[0] - 0.05
    expected = logits(peft_model, batch)

    # two artifacts: the adapter, and the base holding the trained codebooks
    split = copy.deepcopy(peft_model)
    split.save_pretrained(tmp_path / "adapter")
    swsc_hf.finish_training(split.unload()).save_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)

    # one artifact: merged into the compressed checkpoint
    merged = swsc_lora.merge_and_unload(peft_model)
    torch.testing.assert_close(logits(merged, batch), expected, rtol=0, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), batch),
                               logits(merged, batch), rtol=0, atol=0)


def test_trainer_accepts_peft_and_centroid_models(compressed, batch, tmp_path):
    rows = [{"input_ids": row, "labels": row} for row in batch]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    assert compressed.hf_quantizer.is_trainable and compressed.hf_quantizer.is_qat_trainable
    for trained in (lora(copy.deepcopy(compressed)),
                    swsc_hf.prepare_for_training(copy.deepcopy(compressed), train_codebooks=True)):
        result = Trainer(model=trained, args=args, train_dataset=rows).train()
        assert result.global_step == 2


def test_peft_prepare_model_for_kbit_training_runs_on_compressed_model(batch):
    """PEFT's helper does not know "swsc" (it would cast the float16 tables to float32 and enable no activation
    checkpointing): `import swsc_hf` makes it run `prepare_for_training` on swsc_hf models instead."""
    model = peft.prepare_model_for_kbit_training(tiny_model(table_dtype="float16"))
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.layers[0].self_attn.q_proj.codebook.dtype == torch.float16
    assert model.is_activation_checkpointing
    losses = train(lora(model), batch, steps=3)
    assert losses[-1] < losses[0]
