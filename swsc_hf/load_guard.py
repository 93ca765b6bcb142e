"""The load guard: tensors every swsc_hf checkpoint carries so that loading it *without* `import swsc_hf` fails loudly.

Without the import, transformers does not know quant_method "swsc": it warns and builds the dense model, whose
compressed layers would keep random weights. So every compressed layer also stores an empty tensor under its dense
name (`<layer>.weight`, shape (0,)): a plain transformers load finds a size mismatch on every such layer and raises
("You set `ignore_mismatched_sizes` to `False`, thus raising an error"), and its load report lists the mismatches
next to `GUARD_KEY`, a tensor whose name tells what to do. swsc_hf's own load ignores these tensors
(`ignore_patterns`); checkpoints written before the guard existed simply lack them and load as before.

Imports `modules` only.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .modules import SWSCLinear

GUARD_KEY = "swsc_hf compressed checkpoint: pip install swsc-hf, then import swsc_hf before from_pretrained"
GUARD_SHAPE = [0]


def guard_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The empty tensors `save_pretrained` writes beside the model's own: one per compressed layer, and `GUARD_KEY`."""
    tensors = {GUARD_KEY: torch.zeros(GUARD_SHAPE, dtype=torch.uint8)}
    for name, module in model.named_modules():
        if isinstance(module, SWSCLinear):
            tensors[f"{name}.weight"] = torch.zeros(GUARD_SHAPE, dtype=module.dense_dtype)
    return tensors


def is_guard(key: str, shape: list[int], compressed_layers) -> bool:
    """Whether checkpoint tensor `key` of `shape` is a guard tensor of a layer in `compressed_layers`."""
    return shape == GUARD_SHAPE and (key == GUARD_KEY or (key.endswith(".weight") and key[:-7] in compressed_layers))


def ignore_patterns(compressed_layers) -> set[str]:
    """Patterns for `_keys_to_ignore_on_load_unexpected`, so swsc_hf's own load skips the guard tensors silently."""
    return {f"^{re.escape(GUARD_KEY)}$"} | {rf"(^|\.){re.escape(name)}\.weight$" for name in compressed_layers}
