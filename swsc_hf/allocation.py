"""`bits=` targets: pick each layer's layout so the model meets an average bits-per-weight budget.

Data-free, every layer gets the richest scalar layout of the ladder that fits the budget on its own. With
calibration data, the budget is spread by measured sensitivity: the diagonal Fisher information F = E[g^2] of the
loss gradient on each weight (one backward pass per calibration sequence through the dense model) estimates the loss
increase of compressing a layer with a layout as 1/2 * sum(F * (W - W')^2), measured with a quick data-free fit of
that layout. Each layer's candidates, scalar tables and 2- and 4-dim vector tables, are reduced to the lower convex
hull of (stored bits, estimated loss); a greedy pass then upgrades, hull step by hull step, the layers where an
upgrade buys the most loss reduction per stored bit. Layers whose compression hurts the loss most get more bits, and
each gets the layout that is best for its bits.
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

# The scalar ladder: codebooks of 2^b values over segments scaled per 128 weights.
LADDER_CODE_BITS = (2, 3, 4, 5, 6, 8)
LADDER_SCALE_GROUP = 128
# Vector layouts calibrated `bits=` also weighs: (segment length, codewords), 2-4 code bits per weight, codes of at
# most 8 bits (what the compiled kernels read).
LADDER_VECTORS = ((2, 16), (2, 64), (2, 256), (4, 256))


def ladder(out_features: int, in_features: int, near: float | None = None, vectors: bool = False) -> list[LayerSpec]:
    """Candidate layouts of one layer, cheapest first: scalar tables, and with `vectors` the 2- and 4-dim vector
    tables of `LADDER_VECTORS`; with `near`, only layouts of one code bit per weight below to two above."""
    shapes = [(1, 2**bits) for bits in LADDER_CODE_BITS]
    if vectors:
        shapes += [shape for shape in LADDER_VECTORS if in_features % shape[0] == 0]
    specs = [LayerSpec(out_features, in_features, n_clusters=clusters, segment_length=segment,
                       scale_group_size=fitting_scale_group(LADDER_SCALE_GROUP, in_features, segment))
             for segment, clusters in shapes]
    if near is not None:
        specs = [spec for spec in specs if int(near) - 1 <= spec.code_bits / spec.segment_length <= int(near) + 2]
    if not specs:
        return ladder(out_features, in_features)[:1]
    return sorted(specs, key=spec_bits)


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


def lower_hull(options: list[tuple[LayerSpec, float, float]]) -> list[tuple[LayerSpec, float, float]]:
    """The (layout, cost, loss) options worth upgrading through, cheapest first: the lower convex hull of (cost,
    loss), so each step costs more, loses less, and buys less loss per bit than the step before it."""
    hull: list[tuple[LayerSpec, float, float]] = []
    for option in sorted(options, key=lambda o: (o[1], o[2])):
        if hull and option[2] >= hull[-1][2]:
            continue  # costs at least as much for no less loss
        while len(hull) >= 2:
            (_, c0, l0), (_, c1, l1) = hull[-2], hull[-1]
            if (l0 - l1) * (option[1] - c0) > (l0 - option[2]) * (c1 - c0):
                break  # hull[-1] is below the chord from hull[-2] to this option: it stays
            hull.pop()
        hull.append(option)
    return hull


@torch.no_grad()
def allocate(model: nn.Module, names: list[str], bits: float, fisher: dict[str, torch.Tensor],
             seed: int = 0, views: MatrixViews | None = None, vectors: bool = True) -> dict[str, LayerSpec]:
    """Per-layer layouts whose weighted average stays within `bits`, upgrading the most sensitive layers first;
    `vectors=False` chooses among scalar tables only (their kernels are the fastest)."""
    views = views or linear_views(model, names)
    names = list(views)
    costs: dict[str, list[tuple[LayerSpec, float, float]]] = {}
    for name in tqdm(names, desc="swsc_hf: sizing layers", unit="layer"):
        param, view = views[name]
        weight = view(param.detach()).float()
        options = []
        for spec in ladder(*weight.shape, near=bits, vectors=vectors):
            error = weight - compress_weight(weight, spec, seed=seed, kmeans_iters=8).dense()
            loss = 0.5 * float((fisher[name] * error.square()).sum())
            options.append((spec, spec_bits(spec) * weight.numel(), loss))
        costs[name] = lower_hull(options)
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
