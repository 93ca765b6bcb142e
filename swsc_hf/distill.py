"""Distillation of the shared tables: after compression, fine-tune only the codebooks (and per-group scales) so the
compressed model's next-token distribution matches the dense model's on calibration text.

This is the weight-clustering paper's centroid fine-tuning with the dense model as the target instead of the text
(as AQLM's and VPTQ's end-to-end fine-tuning do): matching the teacher repairs compression error without adapting
the model to the calibration text's domain, and it keeps the stored size (codes, layouts and dtypes are unchanged).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .table_training import finish_training, prepare_for_training

logger = logging.getLogger(__name__)


def distill_tables(
    model: nn.Module,
    teacher: nn.Module,
    batches: list[torch.Tensor],
    steps: int = 64,
    lr: float = 3e-3,
    scales_lr: float | None = None,
) -> list[float]:
    """Train `model`'s codebooks (and, with `scales_lr`, its scales) to match `teacher`'s logits; returns the losses.

    Each step takes the next batch of `batches` (token ids), runs the teacher without gradients and minimises the
    per-token KL(teacher || model) with AdamW and a cosine schedule. Adam's steps are about `lr` in absolute size,
    so `scales_lr` should be small next to the scales (weights' magnitudes, ~1e-2 here) while the codebooks hold
    normalised values of order one (docs/results.md used lr=3e-3, scales_lr=1e-4, 64 steps). Tables are stored
    back in the checkpoint's table dtype at the end (`finish_training`), so save/reload reproduces the result.
    """
    if steps < 1 or not batches:
        raise ValueError(f"distill_tables needs steps >= 1 and at least one batch, got steps={steps} and "
                         f"{len(batches)} batches")
    prepare_for_training(model, train_codebooks=True, train_scales=scales_lr is not None,
                         gradient_checkpointing=False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if not n.endswith("scales")], "lr": lr}]
    if scales_lr is not None:
        groups.append({"params": [p for n, p in trainable if n.endswith("scales")], "lr": scales_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    teacher.eval()
    losses = []
    for step in tqdm(range(steps), desc="swsc_hf: distilling tables", unit="step"):
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * step / steps))
        ids = batches[step % len(batches)]
        with torch.no_grad():
            target = teacher(ids).logits.float().log_softmax(-1)
        logits = model(ids).logits.float().log_softmax(-1)
        loss = F.kl_div(logits.flatten(0, -2), target.flatten(0, -2), log_target=True, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    finish_training(model)
    logger.info("swsc_hf: distillation KL %.4f -> %.4f over %d steps", losses[0], losses[-1], steps)
    return losses
