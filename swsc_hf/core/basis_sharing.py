"""Basis Sharing (arXiv 2410.03765): one input-side low-rank basis for the stacked residuals of a group of layers.

Tensors in, tensors out: the caller stacks the group's residuals (what the codebook term left, or the weights),
passes the activation Grams when calibrated, and stores the factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lowrank import fit_low_rank
from .spec import rank_for_ratio


def shared_rank(out_features: list[int], in_features: int, rank: int, parameter_ratio: float | None = None) -> int:
    """Rank of a group's shared basis: `parameter_ratio` of the stacked parameters when given, else `rank`."""
    stacked_out = sum(out_features)
    if parameter_ratio is not None:
        rank = rank_for_ratio(parameter_ratio, stacked_out, in_features)
    return max(1, min(rank, in_features, stacked_out))


def fit_shared_basis(residuals: list[Tensor], grams: list[Tensor | None], rank: int,
                     seed: int = 0) -> tuple[list[Tensor], Tensor]:
    """Per-layer coefficients (out_i x rank) and the shared basis (rank x in) of the stacked residuals, whitened by
    the summed activation Gram when the layers were calibrated."""
    gram = sum(grams) if grams[0] is not None else None
    factors, basis = fit_low_rank(torch.cat(residuals), rank, gram, seed=seed)
    return list(factors.split([r.shape[0] for r in residuals])), basis


def fit_separate_factors(residuals: list[Tensor], grams: list[Tensor | None], budget: int,
                         seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Per-layer low-rank factors using `budget` parameters in all, split evenly among the layers."""
    factors = []
    for residual, gram in zip(residuals, grams, strict=True):
        out_features, in_features = residual.shape
        rank = budget // (len(residuals) * (out_features + in_features))
        factors.append(fit_low_rank(residual, max(1, min(rank, out_features, in_features)), gram, seed=seed))
    return factors


