"""Compiled decoding: `generate` with a static KV cache and a `torch.compile`d decode step, on CPU too.

At batch 1 a small model's decode step is a few hundred small eager PyTorch ops (norms, rotary embeddings, the KV
cache, attention) around the compressed matmuls; compiled, they become a handful of fused kernels while the
compressed matmuls stay the one custom op (`swsc_hf::codebook_matmul`). transformers already compiles the decode
step (not the prefill, whose shape changes with every prompt) when the cache is static, but only on GPUs unless its
`CompileConfig` is flagged for all devices; `compile_decoding` sets that up.

Attention: under torch.compile transformers' SDPA attention copies the cached keys and values once per query head
(`repeat_kv`) at every step of a grouped-query model, and torch's CPU SDPA then splits the step's attention over
batch x heads only. `compile_decoding` switches a model on "sdpa" to `PACKED_GQA_SDPA`: a single-token step stacks the
query heads of each group as rows of one query block against the shared key/value head (transformers' own `pack_gqa`,
so nothing is copied) and runs `swsc_hf.kernels.decode_attention`, which on CPU splits the cache over the threads and
skips the unfilled tail of the static cache. Each had been about a third of a compiled SmolLM2 step: the copies at 1
thread, torch's SDPA on the packed heads at 2 threads on an AVX2 CPU (docs/design.md). Prompts, training and
everything else take transformers' SDPA attention unchanged. `use_decode_attention` makes that switch alone, for
eager decoding: compressed models get it when they are compressed or loaded.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AttentionInterface, CompileConfig
from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kernels import decode_attention, load_cpu_kernels

logger = logging.getLogger(__name__)

PACKED_GQA_SDPA = "swsc_hf_packed_gqa_sdpa"


def packed_gqa_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a single-token step runs `decode_attention` on the key/value heads.

    query (batch, heads, 1, dim) becomes (batch, kv_heads, heads / kv_heads, dim) by transformers' own `pack_gqa`:
    the heads sharing a key/value head are rows of one query block (a per-head mask is packed alike, a shared one
    broadcasts). Everything else (prompts, training, soft-capping, position biases) goes to `sdpa_attention_forward`.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    heads, q_length = query.shape[1], query.shape[2]
    packable = (q_length == 1 and not module.training and kwargs.get("softcap") is None
                and kwargs.get("position_bias") is None and not kwargs.get("output_attentions", False))
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = decode_attention(pack_gqa(query, groups), key, value, pack_gqa(attention_mask, groups), scale=scaling)
    return out.reshape(out.shape[0], heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_GQA_SDPA, packed_gqa_sdpa_forward)
AttentionMaskInterface.register(PACKED_GQA_SDPA, sdpa_mask)


def use_decode_attention(model: nn.Module) -> bool:
    """Switch a model on "sdpa" to `PACKED_GQA_SDPA`, so its single-token steps, eager or compiled, attend through
    `decode_attention`; returns whether it switched. Other implementations are left alone.

    Compressed models get it when they are compressed or loaded (eager SmolLM2 decoding 1.08x faster on 2 threads,
    docs/design.md). Prompts and training still run transformers' SDPA attention, and the setting is not saved
    (transformers does not serialise the attention implementation). Undo with `model.set_attn_implementation("sdpa")`.
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(PACKED_GQA_SDPA)
    return True


def use_sdpa_attention(model: nn.Module) -> None:
    """Undo `use_decode_attention`: a model on `PACKED_GQA_SDPA` goes back to transformers' "sdpa"."""
    if getattr(model.config, "_attn_implementation", None) == PACKED_GQA_SDPA:
        model.set_attn_implementation("sdpa")


def compile_decoding(model: nn.Module, *, backend: str = "inductor", fullgraph: bool = True,
                     cpp_wrapper: bool = False) -> nn.Module:
    """Make `model.generate` decode with a static KV cache and a compiled step on any device; returns the model.

    The first `generate` call compiles (minutes for a 30-layer model on 2 CPU cores; once per process and cache
    length), later calls reuse it. Prefill runs eagerly. Undo with `model.generation_config.cache_implementation =
    None` and `model.generation_config.compile_config = None`.

    `cpp_wrapper=True` has inductor emit the step's wrapper in C++, so kernels are called without Python in between:
    faster decoding for a much longer first compile (docs/results.md measures both). Inductor only.
    """
    if cpp_wrapper and backend != "inductor":
        raise ValueError(f"compile_decoding(cpp_wrapper=True) needs backend='inductor', got backend={backend!r}")
    # torch.compile takes a mode or options, not both; the options leave the default mode
    options = {"cpp_wrapper": True} if cpp_wrapper else None
    # A sliding-window layer's static cache keeps its length as a Python int, which a static-shape graph specialises
    # on: Gemma-3 would recompile at every token and stop at dynamo's recompile limit. Automatic dynamic shapes
    # (dynamic=None) make that int symbolic after one recompile; other models keep static shapes.
    text_config = model.config.get_text_config()
    sliding = "sliding_attention" in (getattr(text_config, "layer_types", None) or ())
    config = CompileConfig(fullgraph=fullgraph, dynamic=None if sliding else False, backend=backend,
                           mode=None if cpp_wrapper else "default", options=options)
    config._compile_all_devices = True  # transformers' documented switch for compiling off-GPU
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config
    use_decode_attention(model)
    # built (or found) now: the first compiled step must not trace the kernels' one-time loading and its lock
    load_cpu_kernels()
    logger.info("swsc_hf: generate will decode with a static cache and a %s-compiled step", backend)
    return model
