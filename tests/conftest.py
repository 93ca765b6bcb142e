"""Shared fixtures: a tiny random Llama saved as a dense checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory) -> str:
    """A saved 2-layer random Llama (float32)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    path = tmp_path_factory.mktemp("tiny-dense")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
