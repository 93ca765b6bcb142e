"""Per-layer tuning of the shared tables inside calibrated compression.

Fitting matches each linear on its own (its weights, weighted by its inputs' Gram matrix). Right after a decoder
layer is fitted, its codebooks and per-group scales are trained so that the compressed layer as a whole (attention
and MLP together) reproduces the dense layer's outputs on the calibration inputs it receives, which are the
outputs of the already-compressed layers before it (AQLM's block-wise fine-tuning). The error is repaired before it
reaches the later layers, which are then fitted on inputs closer to the dense model's. Codes, layouts and stored
size are unchanged; the end-to-end tuning (`distill`) runs afterwards as before.

Imports `modules`, `table_training`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import SWSCLinear
from .table_training import scale_step_groups, set_cosine_step_sizes

LayerInput = tuple[torch.Tensor, dict]


def layers_output(layers: list[nn.Module], hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The hidden states after running `layers` in order on `hidden` (decoder layers' keyword arguments)."""
    for layer in layers:
        hidden = layer(hidden, **kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


@torch.no_grad()
def relative_error(layers: list[nn.Module], layer_input: LayerInput, target: torch.Tensor) -> float:
    """||out - target||^2 / ||target - input||^2 on one window: the error in what `layers` add to the residual
    stream, relative to what the dense layers add."""
    hidden, kwargs = layer_input
    out = layers_output(layers, hidden, kwargs).float()
    change = (target.float() - hidden.float()).pow(2).sum()
    return float((out - target.float()).pow(2).sum() / change.clamp_min(1e-30))


def tune_layer_tables(
    layers: list[nn.Module],
    inputs: list[LayerInput],
    targets: list[torch.Tensor],
    steps: int,
    lr: float,
    scales_lr: float = 0.0,
) -> None:
    """Train the codebooks (and, with `scales_lr` > 0, the per-group scales, `scale_step_groups`) of the compressed
    linears in `layers` so that their output on `inputs` matches `targets` (the dense layers' outputs on the same
    inputs).

    `steps` Adam steps with a cosine schedule, each on the next window (mean squared error); the tables are stored
    back in their dtypes and frozen.
    """
    if steps < 1 or not inputs or len(inputs) != len(targets):
        raise ValueError(f"tune_layer_tables needs steps >= 1 and one target per input, got steps={steps}, "
                         f"{len(inputs)} inputs and {len(targets)} targets")
    holders = [module for layer in layers for module in layer.modules() if isinstance(module, SWSCLinear)]
    others = [param for layer in layers for param in layer.parameters() if param.requires_grad]
    trained: dict[str, list[nn.Parameter]] = {"codebook": [], "scales": []}
    dtypes: dict[tuple[int, str], torch.dtype] = {}
    for index, holder in enumerate(holders):
        for name, params in trained.items():
            param = getattr(holder, name, None)
            if isinstance(param, nn.Parameter) and param.numel() and (name == "codebook" or scales_lr > 0):
                dtypes[index, name] = param.dtype
                upcast = nn.Parameter(param.detach().float(), requires_grad=True)
                setattr(holder, name, upcast)
                params.append(upcast)
    if not dtypes:
        return
    groups = scale_step_groups(trained["scales"], scales_lr)
    if trained["codebook"]:
        groups.insert(0, {"params": trained["codebook"], "lr": lr})
    optimizer = torch.optim.Adam(groups)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    for param in others:  # the layers' dense parameters (norms, biases) stay as they are, without gradients
        param.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in range(steps):
                set_cosine_step_sizes(optimizer, base_lrs, step / steps)
                hidden, kwargs = inputs[step % len(inputs)]
                out = layers_output(layers, hidden, kwargs)
                loss = F.mse_loss(out.float(), targets[step % len(inputs)].detach().float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for param in others:
            param.requires_grad_(True)
        for (index, name), dtype in dtypes.items():
            holder = holders[index]
            setattr(holder, name, nn.Parameter(getattr(holder, name).detach().to(dtype), requires_grad=False))
