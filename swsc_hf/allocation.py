"""`bits=` targets: pick each layer's layout so the model meets an average bits-per-weight budget.

Data-free, every layer gets the richest layout of the ladder that fits the budget on its own. With calibration
data, the budget is spread by measured sensitivity: the diagonal Fisher information F = E[g^2] of the loss
gradient on each weight (one backward pass per calibration sequence through the dense model) estimates the loss
increase of compressing a layer with a layout as 1/2 * sum(F * (W - W')^2), measured with a quick data-free fit of
that layout; a greedy pass then upgrades, bit by bit, the layers where an upgrade buys the most loss reduction per
stored bit. Layers whose compression hurts the loss most get more bits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .core.compress import compress_weight
from .core.spec import LayerSpec, fitting_scale_group

logger = logging.getLogger(__name__)

# The ladder of layouts `bits=` chooses from: scalar codebooks of 2^b values over segments scaled per 128 weights.
LADDER_CODE_BITS = (2, 3, 4, 5, 6, 8)
LADDER_SCALE_GROUP = 128


def ladder(out_features: int, in_features: int, near: float | None = None) -> list[LayerSpec]:
    """Candidate layouts of one layer, cheapest first; with `near`, only code widths from one below to two above."""
    group = fitting_scale_group(LADDER_SCALE_GROUP, in_features)
    widths = [b for b in LADDER_CODE_BITS if near is None or int(near) - 1 <= b <= int(near) + 2]
    return [LayerSpec(out_features, in_features, n_clusters=2**bits, segment_length=1, scale_group_size=group)
            for bits in widths or LADDER_CODE_BITS[:1]]


def spec_bits(spec: LayerSpec) -> float:
    """Stored bits per weight of a layout (tables counted at 16 bits)."""
    return 8 * spec.stored_bytes(2) / (spec.out_features * spec.in_features)


def uniform_choice(out_features: int, in_features: int, bits: float) -> LayerSpec:
    """The richest ladder layout within `bits` for this layer (the cheapest one if none fits)."""
    candidates = ladder(out_features, in_features)
    fitting = [spec for spec in candidates if spec_bits(spec) <= bits + 1e-9]
    return fitting[-1] if fitting else candidates[0]


def fill_budget(shapes: dict[str, tuple[int, int]], bits: float) -> dict[str, LayerSpec]:
    """Data-free `bits=`: layouts (from shapes alone) whose weighted average comes as close to `bits` as the ladder
    allows without exceeding it.

    Every layer starts at the richest layout that fits `bits` on its own (`uniform_choice`: 4-bit codes with their
    scales cost 4.13 bits, so `bits=4` alone gives 3.13), then layers are upgraded one ladder step at a time, in
    model order (earlier layers first), while the total stays within the budget; passes repeat until no upgrade
    fits. The order is a fixed, unmeasured choice: without data there is no sensitivity to rank the layers by
    (calibrated `bits=` ranks them by Fisher information, `allocate`).
    """
    ladders = {name: ladder(out, inp) for name, (out, inp) in shapes.items()}
    level = {name: ladders[name].index(uniform_choice(*shapes[name], bits)) for name in shapes}
    sizes = {name: out * inp for name, (out, inp) in shapes.items()}
    budget = bits * sum(sizes.values())
    spent = sum(spec_bits(ladders[name][level[name]]) * sizes[name] for name in shapes)
    upgraded = True
    while upgraded:
        upgraded = False
        for name in shapes:
            options, now = ladders[name], level[name]
            if now + 1 < len(options):
                extra = (spec_bits(options[now + 1]) - spec_bits(options[now])) * sizes[name]
                if spent + extra <= budget + 1e-6:
                    level[name] += 1
                    spent += extra
                    upgraded = True
    if shapes:
        logger.info("swsc_hf: bits=%g data-free: layouts average %.4f bits per weight", bits,
                    spent / sum(sizes.values()))
    return {name: ladders[name][level[name]] for name in shapes}


# A matrix to size: the parameter holding it and the view of that parameter (or of its gradient) that is the
# (out, in) matrix, e.g. one expert's slice of a fused 3-D expert weight, or a Conv1D's transposed weight.
MatrixViews = dict[str, tuple[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]


def linear_views(model: nn.Module, names: list[str]) -> MatrixViews:
    """The views of plain linears: each module's `weight` as it is."""
    return {name: (model.get_submodule(name).weight, lambda t: t) for name in names}


def fisher_diagonals(model: nn.Module, names: list[str], batches: list[torch.Tensor],
                     views: MatrixViews | None = None) -> dict[str, torch.Tensor]:
    """E[g^2] of the language-model loss for every named matrix (dense model, calibration batches); `views` says
    where each matrix lives (default: the `weight` of the linear of that name)."""
    views = views or linear_views(model, names)
    params = {id(param): param for param, _ in views.values()}
    saved = {key: param.requires_grad for key, param in params.items()}
    others = [p for p in model.parameters() if p.requires_grad]
    for p in others:
        p.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    fisher = {name: torch.zeros_like(view(param), dtype=torch.float32) for name, (param, view) in views.items()}
    try:
        for batch in tqdm(batches, desc="swsc_hf: measuring sensitivity", unit="seq"):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            for name, (param, view) in views.items():
                if param.grad is not None:  # an expert no token was routed to has no gradient
                    fisher[name] += view(param.grad).float().square()
    finally:
        model.zero_grad(set_to_none=True)
        for key, param in params.items():
            param.requires_grad_(saved[key])
        for p in others:
            p.requires_grad_(True)
    return {name: f / len(batches) for name, f in fisher.items()}


@torch.no_grad()
def allocate(model: nn.Module, names: list[str], bits: float, fisher: dict[str, torch.Tensor],
             seed: int = 0, views: MatrixViews | None = None) -> dict[str, LayerSpec]:
    """Per-layer layouts whose weighted average stays within `bits`, upgrading the most sensitive layers first."""
    views = views or linear_views(model, names)
    names = list(views)
    costs: dict[str, list[tuple[LayerSpec, float, float]]] = {}
    for name in tqdm(names, desc="swsc_hf: sizing layers", unit="layer"):
        param, view = views[name]
        weight = view(param.detach()).float()
        options = []
        for spec in ladder(*weight.shape, near=bits):
            error = weight - compress_weight(weight, spec, seed=seed, kmeans_iters=8).dense()
            loss = 0.5 * float((fisher[name] * error.square()).sum())
            options.append((spec, spec_bits(spec) * weight.numel(), loss))
        costs[name] = options
    budget = bits * sum(view(param).numel() for param, view in views.values())
    level = dict.fromkeys(names, 0)
    spent = sum(costs[n][0][1] for n in names)
    if spent > budget:
        logger.warning("bits=%.3f is below the cheapest layout (%.3f bits); using it", bits,
                       spent / (budget / bits))
    while True:
        best, best_gain = None, 0.0
        for name in names:
            step = level[name] + 1
            if step >= len(costs[name]):
                continue
            _, cost_now, loss_now = costs[name][level[name]]
            _, cost_next, loss_next = costs[name][step]
            extra = cost_next - cost_now
            if spent + extra > budget:
                continue
            gain = (loss_now - loss_next) / extra
            if gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            break
        spent += costs[best][level[best] + 1][1] - costs[best][level[best]][1]
        level[best] += 1
    return {name: costs[name][level[name]][0] for name in names}
