"""Compiled decoding: `generate` with a static KV cache and a `torch.compile`d decode step, on CPU too.

At batch 1 a small model's decode step is a few hundred small eager PyTorch ops (norms, rotary embeddings, the KV
cache, attention) around the compressed matmuls; compiled, they become a handful of fused kernels while the
compressed matmuls stay the one custom op (`swsc_hf::codebook_matmul`). transformers already compiles the decode
step (not the prefill, whose shape changes with every prompt) when the cache is static, but only on GPUs unless its
`CompileConfig` is flagged for all devices; `compile_decoding` sets that up. Imports nothing from swsc_hf.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers import CompileConfig

logger = logging.getLogger(__name__)


def compile_decoding(model: nn.Module, *, backend: str = "inductor", fullgraph: bool = True) -> nn.Module:
    """Make `model.generate` decode with a static KV cache and a compiled step on any device; returns the model.

    The first `generate` call compiles (minutes for a 30-layer model on 2 CPU cores; once per process and cache
    length), later calls reuse it. Prefill runs eagerly. Undo with `model.generation_config.cache_implementation =
    None` and `model.generation_config.compile_config = None`.
    """
    config = CompileConfig(fullgraph=fullgraph, dynamic=False, backend=backend, mode="default")
    config._compile_all_devices = True  # transformers' documented switch for compiling off-GPU
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config
    logger.info("swsc_hf: generate will decode with a static cache and a %s-compiled step", backend)
    return model
