"""Every architecture a user brings, as tiny random models (hidden 64, 2 layers): compressed on load, the forward
equal to the layer-wise dequantized model, save/reload identical, LoRA applies, and every decoder weight matrix
compressed (embeddings, the head and mixture-of-experts routers are dense by design; anything else left dense fails
the test with its name)."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

import swsc_hf
from swsc_hf import SWSCConfig, SWSCLinear, compression_report, dequantize_model
from swsc_hf.experts import SWSCExperts

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
              tie_word_embeddings=False)
LLAMA_LIKE = dict(COMMON, intermediate_size=128, num_key_value_heads=2)
MOE = dict(LLAMA_LIKE, num_experts_per_tok=2)

ARCHITECTURES = {
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "mistral": ("MistralConfig", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(LLAMA_LIKE, head_dim=16)),
    "gemma3": ("Gemma3TextConfig", dict(LLAMA_LIKE, head_dim=16, sliding_window=16)),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "gpt_neox": ("GPTNeoXConfig", dict(COMMON, intermediate_size=128)),
    "opt": ("OPTConfig", dict(COMMON, ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1)),
    "falcon": ("FalconConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=True, num_kv_heads=2, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", dict(MOE, num_local_experts=4)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, num_experts=4, moe_intermediate_size=64, head_dim=16,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", dict(MOE, num_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(MOE, num_experts=4, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=64, decoder_sparse_step=1,
                                         mlp_only_layers=[])),
    "gpt_oss": ("GptOssConfig", dict(MOE, num_local_experts=4, head_dim=16, sliding_window=16,
                                     layer_types=["sliding_attention", "full_attention"])),
}
MOE_FAMILIES = {"mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "gpt_oss"}
CALIBRATED = ["llama", "gpt2", "mixtral", "qwen3_moe"]


def tiny_model(arch: str) -> nn.Module:
    config_class, settings = ARCHITECTURES[arch]
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            path = tmp_path_factory.mktemp(arch)
            tiny_model(arch).save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return get


def assert_all_compressed(model: nn.Module, arch: str) -> None:
    report = compression_report(model)
    assert report.compressed_fraction == 1.0, f"{arch}: left dense: {report.uncompressed}"
    dense_by_design = {why for _, why in report.left_dense.values()}
    assert report.compressed_weights > 0 and dense_by_design, arch
    if arch in MOE_FAMILIES:
        assert any(isinstance(m, SWSCExperts) for m in model.modules()), arch


@torch.no_grad()
def assert_reloads_identically(model: nn.Module, path) -> None:
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    logits = model(ids).logits
    model.save_pretrained(path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(path)(ids).logits, logits)


def lora_targets(model: nn.Module) -> list[str]:
    """The full names of the first attention-side compressed layer and, for MoE, one expert matrix."""
    names = [n for n, m in model.named_modules() if isinstance(m, SWSCLinear)]
    chosen = [names[0]]
    chosen += [n for n in names if ".compressed.down_proj." in n][:1]
    return chosen


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_compresses_reloads_and_dequantizes(arch, dense_dirs, tmp_path):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(dense_dirs(arch), quantization_config=SWSCConfig(preset="swsc-4bit"))
    assert_all_compressed(model, arch)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits), arch
        dense = dequantize_model(reloaded)
        assert not any(isinstance(m, (SWSCLinear, SWSCExperts)) for m in dense.modules())
        torch.testing.assert_close(dense(ids).logits, logits, rtol=1e-4, atol=1e-4)

    targets = lora_targets(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    wrapped = [n for n, m in peft_model.named_modules() if type(m).__name__ == "SWSCLoraLinear"]
    assert len(wrapped) == len(targets), (arch, targets, wrapped)
    with torch.no_grad():
        adapted = peft_model(ids).logits
    assert torch.isfinite(adapted).all() and not torch.equal(adapted, logits)


@pytest.mark.parametrize("arch", CALIBRATED)
def test_architecture_calibrated(arch, dense_dirs, calibration, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(dense_dirs(arch),
                                                 quantization_config=SWSCConfig(preset="swsc-4bit", **calibration))
    assert_all_compressed(model, arch)
    assert_reloads_identically(model, tmp_path)


def test_unsupported_layers_are_skipped_and_listed(caplog):
    """An nn.Linear subclass with its own forward and nn.MultiheadAttention's out_proj stay as they are, named in
    the log and in the report; plain linears (and subclasses that keep nn.Linear's forward) are compressed."""

    class Clamped(nn.Linear):
        def forward(self, x):
            return super().forward(x).clamp(-1, 1)

    class Renamed(nn.Linear):
        pass

    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.renamed, mlp.clamped = Renamed(64, 64), Clamped(64, 64)
    mlp.attn = nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 5, 64)
    expected = (mlp.clamped(x), mlp.attn(x, x, x)[0])
    with caplog.at_level("WARNING", logger="swsc_hf"):
        swsc_hf.compress_model(model, SWSCConfig(preset="swsc-4bit"))
    assert isinstance(mlp.up_proj, SWSCLinear) and isinstance(mlp.renamed, SWSCLinear)
    assert type(mlp.clamped) is Clamped and type(mlp.attn.out_proj) is not SWSCLinear
    assert torch.equal(mlp.clamped(x), expected[0]) and torch.equal(mlp.attn(x, x, x)[0], expected[1])
    assert "mlp.clamped" in caplog.text and "mlp.attn.out_proj" in caplog.text
    uncompressed = compression_report(model).uncompressed
    assert "own forward" in uncompressed["model.layers.0.mlp.clamped.weight"]
    assert "MultiheadAttention" in uncompressed["model.layers.0.mlp.attn.out_proj.weight"]
    assert "MultiheadAttention" in uncompressed["model.layers.0.mlp.attn.in_proj_weight"]


def test_experts_with_few_routed_tokens_fall_back_to_data_free(dense_dirs, calibration, caplog):
    """Calibrating on a single short sequence, some experts see fewer than MIN_EXPERT_TOKENS tokens: they are
    compressed data-free (logged), the others with their own Gram matrices, and everything is compressed."""
    calibration.update(n_samples=1, seq_len=12)
    with caplog.at_level("INFO", logger="swsc_hf"):
        model = AutoModelForCausalLM.from_pretrained(
            dense_dirs("mixtral"), quantization_config=SWSCConfig(preset="swsc-4bit", **calibration))
    assert "compressed data-free" in caplog.text
    assert_all_compressed(model, "mixtral")


def test_experts_forward_touches_only_routed_experts(dense_dirs):
    model = AutoModelForCausalLM.from_pretrained(dense_dirs("mixtral"), quantization_config=SWSCConfig(
        preset="swsc-4bit"))
    experts = model.model.layers[0].mlp.experts
    calls = []
    for index, layer in enumerate(experts.compressed["down_proj"]):
        layer.register_forward_pre_hook(lambda _m, _a, i=index: calls.append(i))
    hidden = torch.randn(3, 64)
    top_k_index = torch.tensor([[0, 2], [2, 0], [0, 2]])
    out = experts(hidden, top_k_index, torch.full((3, 2), 0.5))
    assert sorted(calls) == [0, 2] and out.shape == hidden.shape


def test_bits_allocation_covers_experts(dense_dirs, calibration):
    model = AutoModelForCausalLM.from_pretrained(dense_dirs("qwen3_moe"),
                                                 quantization_config=SWSCConfig(bits=3.5, **calibration))
    assert_all_compressed(model, "qwen3_moe")
    report = compression_report(model)
    assert report.compressed_bits_per_weight <= 3.5
    experts = [layer for name, layer in model.named_modules()
               if ".compressed." in name and isinstance(layer, SWSCLinear)]
    assert experts and all(layer.spec.n_clusters for layer in experts)


def test_calibration_lowers_output_error_of_a_mixture_of_experts(dense_dirs, calibration):
    """Per-expert Gram matrices (of the tokens routed to each expert) make the compressed MoE closer to dense."""
    held_out = calibration["tokenizer"]("Another sentence about the compression of language models.").input_ids
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs("mixtral"))
    with torch.no_grad():
        reference = dense(held_out).logits
    errors = {}
    for name, extra in [("data-free", {}), ("calibrated", calibration)]:
        config = SWSCConfig(n_clusters=4, segment_length=1, rank=0, scale_group_size=16, **extra)
        model = AutoModelForCausalLM.from_pretrained(dense_dirs("mixtral"), quantization_config=config)
        with torch.no_grad():
            errors[name] = float((model(held_out).logits - reference).norm())
    assert errors["calibrated"] < errors["data-free"], errors


def test_bits_data_free_plans_over_experts(dense_dirs, tmp_path):
    """Data-free `bits=` fills its budget over every matrix, expert matrices included, and reloads identically."""
    model = AutoModelForCausalLM.from_pretrained(dense_dirs("mixtral"), quantization_config=SWSCConfig(bits=3.5))
    assert_all_compressed(model, "mixtral")
    layouts = model.config.quantization_config.compressed_layers
    assert sum(".compressed." in name for name in layouts) == 2 * 2 * 4  # layers x projections x experts
    assert compression_report(model).compressed_bits_per_weight <= 3.5
    assert_reloads_identically(model, tmp_path)


def test_experts_compress_on_load_with_disk_offload(dense_dirs, tmp_path):
    """A decoder layer of experts offloaded to disk is compressed as it loads and computes what it does in memory."""
    config = SWSCConfig(preset="swsc-4bit")
    in_memory = AutoModelForCausalLM.from_pretrained(dense_dirs("mixtral"), quantization_config=config)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(dense_dirs("mixtral"), quantization_config=SWSCConfig(
        preset="swsc-4bit"), device_map=device_map, offload_folder=str(tmp_path))
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, in_memory(ids).logits, rtol=1e-5, atol=1e-5)
