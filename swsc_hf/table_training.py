"""Training the compressed tables in place (centroid fine-tuning): codebooks and, optionally, per-group scales.

`prepare_for_training(model, train_codebooks=True)` makes the codebooks (and optionally the scales) trainable in
float32; `finish_training(model)` stores them back in the checkpoint's table dtype. Trained tables belong to the
compressed base checkpoint (`save_pretrained` of the base), never to a LoRA adapter: a codebook is only meaningful
with the codes it was trained with, so it travels with them. `distill`, `layer_tuning` and `lora` build on this.

May import `modules` and `model_ops`.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .model_ops import SHARED_BASES_ATTR
from .modules import SWSCLinear

logger = logging.getLogger(__name__)


def set_cosine_step_sizes(optimizer: torch.optim.Optimizer, base_lrs: list[float], done: float) -> None:
    """Each parameter group's step size on a cosine schedule: its base size at `done` = 0, zero at `done` = 1."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * done))


def scale_step_groups(scales: list[nn.Parameter], relative_lr: float) -> list[dict]:
    """Optimizer groups for per-group scales, one per layer, each with a step of `relative_lr` times that layer's
    mean |scale|.

    Adam's steps are about the step size in absolute terms, and scales are weight magnitudes, which differ between
    models and between layers (SmolLM2-135M's layer means range from 0.15 to 1.2); a relative step moves every
    layer's scales by the same fraction.
    """
    return [{"params": [param], "lr": relative_lr * float(param.detach().abs().mean().clamp_min(1e-12))}
            for param in scales]


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model (it has adapters and a base model)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT model, or `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model was loaded in (config.dtype), else its input embeddings' (their weight, or an
    `SWSCEmbedding`'s empty marker in the model's dtype)."""
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else next(model.get_input_embeddings().parameters()).dtype


def swsc_config(model: nn.Module):
    """The model's `SWSCConfig` (its quantization config); a clear error if the model is not compressed by swsc_hf."""
    config = getattr(model.config, "quantization_config", None)
    if getattr(config, "quant_method", None) != "swsc":
        raise ValueError("the model is not an swsc_hf compressed model (no quantization_config with quant_method "
                         "'swsc'); compress it with swsc_hf.compress_model or load it with SWSCConfig")
    return config


def table_holders(model: nn.Module) -> list[nn.Module]:
    """Every module holding compressed float tables: the SWSCLinear layers and the shared-basis holder."""
    holders = [m for m in model.modules() if isinstance(m, SWSCLinear)]
    shared = getattr(model, SHARED_BASES_ATTR, None)
    return holders + ([shared.bases] if shared is not None else [])


def _tables(holder: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in holder.named_parameters(recurse=False) if n not in ("bias", "codes")]


def prepare_for_training(
    model: nn.Module, train_codebooks: bool = False, train_scales: bool = False, gradient_checkpointing: bool = True,
    upcast_dense: bool = True,
) -> nn.Module:
    """Get a compressed model (or a PEFT model on one) ready to train; returns it.

    As `peft.prepare_model_for_kbit_training` does for the methods it knows: dense float16/bfloat16 parameters
    (layer norms, embeddings, head) are cast to float32 and activation checkpointing is enabled (non-reentrant,
    with input gradients). The compressed tables stay frozen in their stored dtype, except the codebooks
    (centroid fine-tuning) and per-group scales when asked: those become trainable float32 parameters (low
    precision tables do not train with Adam). `upcast_dense=False` keeps the dense parameters' dtypes (when none of
    them trains). On a plain model everything else is frozen; on a PEFT model the
    adapters keep their state, so call this after `get_peft_model` (which freezes every non-adapter tensor).
    Call `finish_training` afterwards to store trained tables back in the checkpoint's dtype.
    """
    base = base_model(model)
    swsc_config(base)
    holders = table_holders(base)
    table_ids = {id(p) for holder in holders for _, p in _tables(holder)}
    for param in base.parameters():
        if id(param) in table_ids:
            continue
        if not is_peft_model(model):
            param.requires_grad_(False)
        if upcast_dense and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    trained = {"codebook": train_codebooks, "scales": train_scales}
    count = 0
    for holder in holders:
        for name, param in _tables(holder):
            train = trained.get(name, False)
            if train:
                setattr(holder, name, nn.Parameter(param.detach().float(), requires_grad=True))
                count += param.numel()
            else:
                param.requires_grad_(False)
    if (train_codebooks or train_scales) and not count:
        logger.warning("prepare_for_training: the model has no codebooks/scales to train (low-rank-only layers?)")
    logger.info("swsc_hf: %d compressed table values are trainable", count)
    if gradient_checkpointing:
        base.activation_checkpointing_enable({"use_reentrant": False})
    return model


@torch.no_grad()
def finish_training(model: nn.Module) -> nn.Module:
    """Store every compressed table back in the checkpoint's table dtype and freeze it; returns the model.

    After this, save_pretrained -> from_pretrained reproduces the model exactly (trained float32 codebooks would
    otherwise be rounded by the loader instead).
    """
    base = base_model(model)
    dtype = swsc_config(base).table_torch_dtype(model_dtype(base))
    for holder in table_holders(base):
        for name, param in _tables(holder):
            if param.dtype != dtype or param.requires_grad:
                setattr(holder, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
    return model
