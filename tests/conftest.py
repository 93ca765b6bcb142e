"""Shared fixtures: a tiny random Llama saved as a dense checkpoint (alone and with a small tokenizer); the CPU
kernels' instruction sets and thread counts, one test per value."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swsc_hf.kernels import limit_cpu_isa


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


@pytest.fixture(scope="session")
def tiny_tied_dense_dir(tmp_path_factory) -> str:
    """The tiny Llama with its input embeddings and output head tied (one matrix), saved dense."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-tied-dense")
    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tiny_dense_dir, tmp_path_factory):
    """The tiny Llama plus a small word-level tokenizer saved beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the of and a to in is was on for as with by at from".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tiny-tok")
    shutil.copytree(tiny_dense_dir, path, dirs_exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return path


# The instruction sets the CPU kernels dispatch to (each test caps them at one; a cap above the CPU's runs its best).
ISAS = ["avx512", "avx2", "portable"]


@pytest.fixture(params=ISAS)
def isa(request):
    previous = limit_cpu_isa(request.param)
    yield request.param
    limit_cpu_isa(previous)


@pytest.fixture(params=[1, 2])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


class ByteTokenizer:
    """A stand-in tokenizer for calibration tests: one token per UTF-8 byte, folded into the tiny vocabulary."""

    def __call__(self, text: str, return_tensors: str = "pt"):
        ids = torch.tensor([list(text.encode("utf-8"))], dtype=torch.long) % 128
        return type("Encoding", (), {"input_ids": ids})()


@pytest.fixture
def calibration() -> dict:
    texts = [f"Sample sentence number {i} about compression of language models." for i in range(40)]
    return dict(dataset=texts, tokenizer=ByteTokenizer(), n_samples=4, seq_len=32)


# (out, in, n_clusters, segment_length, cluster_dim, scale_group_size, rows_per_codebook): the presets' and the
# `bits=` ladder's layouts (2-8 bit scalar tables, 2- and 4-dim vectors, scales per group), odd sizes, tails.
KERNEL_LAYOUTS = [
    (48, 96, 16, 1, "output", 32, 0),     # swsc-4bit
    (37, 64, 12, 1, "output", 64, 4),     # 4-bit codes, odd rows, a codebook per 4 rows
    (64, 40, 16, 1, "input", 0, 0),       # 4-bit codes without scales, input channels
    (40, 96, 64, 2, "output", 32, 0),     # swsc-3bit
    (40, 96, 32, 2, "output", 32, 5),     # 5-bit pairs, a codebook per 5 rows
    (20, 64, 64, 2, "output", 0, 3),      # 6-bit pairs without scales, a codebook per 3 rows
    (24, 96, 64, 2, "output", 48, 0),     # 6-bit pairs in groups of 48 (not a multiple of 32)
    (24, 192, 64, 2, "output", 96, 0),    # 6-bit pairs in groups of 96 (steps of 64 and 32 values on AVX2)
    (48, 64, 256, 4, "output", 16, 0),    # 2-bit quadruples in groups of 16
    (37, 128, 256, 4, "output", 128, 0),  # swsc-2bit (groups of 128), odd rows
    (40, 64, 256, 4, "input", 0, 5),      # quadruples without scales, input channels, a codebook per 5 rows
    (24, 128, 256, 8, "output", 64, 0),   # 8-dim vectors of byte codes
    (37, 80, 4, 1, "output", 16, 0),      # 2-bit scalar, odd rows
    (32, 48, 8, 1, "input", 16, 0),       # 3-bit, input channels
    (50, 96, 32, 1, "output", 48, 0),     # 5-bit: two-register table
    (24, 64, 64, 1, "output", 64, 0),     # 6-bit: gather
    (24, 64, 200, 1, "output", 0, 0),     # 8-bit codes, K not a power of two, no scales
    (38, 96, 256, 2, "output", 32, 0),    # 8-bit pairs: quads of channels and two left (VBMI byte planes)
    (44, 64, 200, 2, "output", 0, 8),     # 8-bit pairs without scales, a codebook per 8 rows (quads share one)
    (36, 64, 256, 2, "output", 32, 6),    # 8-bit pairs, a codebook per 6 rows (quads would straddle two)
    (29, 70, 16, 2, "output", 0, 0),      # channel length not a multiple of 16: masked tail
    (40, 40, 16, 4, "input", 0, 7),       # one codebook per 7 channels
    (64, 32, 128, 8, "output", 16, 16),   # 8-dim vectors, codebook per 16 rows
    (31, 45, 5, 1, "input", 0, 0),        # 3-bit codes straddling bytes, odd everything
]
