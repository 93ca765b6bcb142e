"""Compress an already-loaded model: data-free, or calibrated layer by layer (GPTQ-style sequential pass).

Calibrated compression runs decoder layers in groups (`share_group_size` layers, 1 by default): the group's
inputs are the outputs of the already-compressed earlier groups, each targeted linear gets the Gram matrix
X^T X of its inputs, the group is compressed, and its compressed outputs feed the next group. Layers that share a
basis (Basis Sharing) are compressed together within their group.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import SWSCConfig
from .core.compress import CompressedWeight, compress_weight, to_weight
from .core.lowrank import fit_low_rank
from .data import calibration_texts
from .integration import (
    SHARED_BASES_ATTR,
    SWSCSharedBases,
    _swap,
    finalize_compressed_model,
    relative_error,
    shared_basis_key,
    target_linears,
)
from .modules import SWSCLinear

logger = logging.getLogger(__name__)
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def compress_model(model: nn.Module, config: SWSCConfig, tokenizer=None) -> nn.Module:
    """Compress `model` in place as `config` says and make it saveable/reloadable as an swsc_hf checkpoint."""
    from .quantizer import SWSCQuantizer

    targets = target_linears(model, config)
    if any(module.weight.device.type == "meta" for _, module in targets):
        raise ValueError("some layers are offloaded (on the meta device); compress them on load instead: "
                         "from_pretrained(..., quantization_config=SWSCConfig(...)) without a dataset")
    if config.is_calibrated:
        _compress_calibrated(model, config, tokenizer or config.tokenizer, [name for name, _ in targets])
    else:
        names = [name for name, _ in targets]
        for group in tqdm(_groups(names, config), desc="swsc_hf: compressing", unit="group"):
            _compress_group(model, group, config, hessians=None)
    model.config.quantization_config = config
    if not isinstance(getattr(model, "hf_quantizer", None), SWSCQuantizer):
        model.hf_quantizer = SWSCQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = "swsc"
    finalize_compressed_model(model, config)
    return model


def _layer_of(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _is_shared(name: str, config: SWSCConfig) -> bool:
    return bool(config.share_types) and config.share_group_size > 1 and name.rsplit(".", 1)[-1] in config.share_types


def _groups(names: list[str], config: SWSCConfig) -> list[list[str]]:
    """Units compressed together: the same projection over `share_group_size` adjacent layers, else one linear."""
    grouped: dict[tuple, list[str]] = defaultdict(list)
    for name in names:
        layer = _layer_of(name)
        if layer is not None and _is_shared(name, config):
            grouped[(_LAYER_INDEX.sub(".*.", name, count=1), layer // config.share_group_size)].append(name)
        else:
            grouped[(name,)].append(name)
    return list(grouped.values())


def _compress_group(
    model: nn.Module, names: list[str], config: SWSCConfig, hessians: dict[str, torch.Tensor] | None
) -> None:
    """Compress `names` (one linear, or one projection over a group of layers sharing a basis) and swap them in."""
    modules = [model.get_submodule(name) for name in names]
    weights = [module.weight.detach() for module in modules]
    specs = [config.layer_spec(name, w.shape[0], w.shape[1]) for name, w in zip(names, weights, strict=True)]
    grams = [hessians.get(name) if hessians else None for name in names]
    shared = len(names) > 1 or _is_shared(names[0], config)
    kwargs = dict(kmeans_iters=config.kmeans_iters, seed=config.seed, affine_correction=config.affine_correction,
                  error_feedback=config.error_feedback)
    if not shared:
        results = [compress_weight(weights[0], specs[0], hessian=grams[0], **kwargs)]
    else:
        results, specs = _compress_shared(names, weights, specs, grams, config, kwargs, model)
    for name, module, weight, result in zip(names, modules, weights, results, strict=True):
        table_dtype = config.table_torch_dtype(weight.dtype)
        layer = SWSCLinear(result.spec, bias=module.bias is not None, dtype=table_dtype, device=weight.device,
                           bias_dtype=weight.dtype)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        if result.spec.shared_basis is not None:
            layer.__dict__["shared_basis_module"] = getattr(model, SHARED_BASES_ATTR)
        layer.load_compressed(result, table_dtype)
        layer.relative_error = relative_error(weight, result)
        _swap(model, name, layer)


def _compress_shared(names, weights, specs, grams, config, kwargs, model):
    """Basis Sharing: one input-side basis for the stacked (whitened) residuals of a group of layers."""
    in_features = weights[0].shape[1]
    outs = [w.shape[0] for w in weights]
    stacked_params = sum(outs) * in_features
    if config.parameter_ratio is not None:
        rank = int(config.parameter_ratio * stacked_params / (sum(outs) + in_features))
    else:
        rank = config.rank
    rank = max(1, min(rank, in_features, sum(outs)))
    key = shared_basis_key(names[0], [_layer_of(n) for n in names])
    residuals, results = [], []
    for weight, spec, gram in zip(weights, specs, grams, strict=True):
        result = CompressedWeight(dataclasses.replace(spec, rank=rank, shared_basis=key))
        residual = weight.float()
        if spec.n_clusters:
            fitted = compress_weight(weight, dataclasses.replace(spec, rank=0), hessian=gram, **kwargs)
            result.codebook, result.codes, result.scales = fitted.codebook, fitted.codes, fitted.scales
            residual = residual - to_weight(fitted.codebook_term(), spec)
        residuals.append(residual)
        results.append(result)
    stacked = torch.cat(residuals)
    gram = sum(grams) if grams[0] is not None else None
    factors, basis = fit_low_rank(stacked, rank, gram, seed=config.seed)
    parts = factors.split(outs)
    if config.share_selection == "loss":
        separate = _separate_factors(residuals, grams, rank * (sum(outs) + in_features), config.seed)
        shared_loss = sum(_output_loss(r, a @ basis, g) for r, a, g in zip(residuals, parts, grams, strict=True))
        separate_loss = sum(_output_loss(r, a @ b, g) for r, (a, b), g in zip(residuals, separate, grams, strict=True))
        logger.info("swsc_hf: %s: shared-basis loss %.4g, per-layer loss %.4g at equal parameters", key,
                    shared_loss, separate_loss)
        if separate_loss < shared_loss:
            for result, (a, b) in zip(results, separate, strict=True):
                result.spec = dataclasses.replace(result.spec, rank=a.shape[1], shared_basis=None)
                result.lowrank_a, result.lowrank_b = a, b
            return results, [r.spec for r in results]
    for result, part in zip(results, parts, strict=True):
        result.lowrank_a, result.lowrank_b = part, basis
    holder = getattr(model, SHARED_BASES_ATTR, None)
    if holder is None:
        holder = SWSCSharedBases({})
        setattr(model, SHARED_BASES_ATTR, holder)
    table_dtype = config.table_torch_dtype(weights[0].dtype)
    holder.bases[key] = nn.Parameter(basis.to(weights[0].device, table_dtype), requires_grad=False)
    return results, [r.spec for r in results]


def _output_loss(residual: torch.Tensor, fitted: torch.Tensor, gram: torch.Tensor | None) -> float:
    """||(R - fit) X^T||_F^2 = tr(D G D^T) with the layer's activation Gram G; plain ||R - fit||_F^2 without data."""
    error = residual.float() - fitted.float()
    if gram is None:
        return float(error.square().sum())
    return float(((error @ gram.to(error.device, error.dtype)) * error).sum())


def _separate_factors(residuals, grams, budget: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer low-rank factors using `budget` parameters in all, split evenly among the layers."""
    factors = []
    for residual, gram in zip(residuals, grams, strict=True):
        out_features, in_features = residual.shape
        rank = budget // (len(residuals) * (out_features + in_features))
        factors.append(fit_low_rank(residual, max(1, min(rank, out_features, in_features)), gram, seed=seed))
    return factors


# ---- calibration ------------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with `num_hidden_layers` entries."""
    count = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"could not find the {count} decoder layers of {type(model).__name__} for calibrated "
                     "compression; compress data-free (no dataset) instead")


def calibration_batches(config: SWSCConfig, tokenizer, device: torch.device) -> list[torch.Tensor]:
    """`n_samples` windows of `seq_len` tokens, taken at seeded random offsets in the calibration text."""
    if tokenizer is None:
        raise ValueError("calibrated compression needs a tokenizer: pass SWSCConfig(tokenizer=...)")
    text = "\n\n".join(calibration_texts(config.dataset))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= config.seq_len:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len={config.seq_len}")
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seq_len, (config.n_samples,), generator=generator)
    return [ids[s : s + config.seq_len][None].to(device) for s in starts.tolist()]


@torch.no_grad()
def _capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]):
    """The hidden states and keyword arguments each batch brings to the first decoder layer."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_layers(layers, inputs):
    outputs = []
    for hidden, kwargs in inputs:
        for layer in layers:
            hidden = layer(hidden, **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        outputs.append((hidden, kwargs))
    return outputs


@torch.no_grad()
def _compress_calibrated(model: nn.Module, config: SWSCConfig, tokenizer, names: list[str]) -> None:
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    batches = calibration_batches(config, tokenizer, device)
    if config.bits is not None:
        from .allocation import allocate, fisher_diagonals

        with torch.enable_grad():
            fisher = fisher_diagonals(model, names, batches)
        config.allocation = allocate(model, names, config.bits, fisher, seed=config.seed)
        del fisher
    inputs = _capture_first_layer_inputs(model, layers, batches)
    step = config.share_group_size
    handled: set[str] = set()
    for first in tqdm(range(0, len(layers), step), desc="swsc_hf: calibrated compression", unit="layer"):
        group_layers = list(range(first, min(first + step, len(layers))))
        members = [n for n in names if n.startswith(prefix + ".") and _layer_of(n) in group_layers]
        hessians = _collect_hessians(model, members, layers, group_layers, inputs)
        for group in _groups(members, config):
            _compress_group(model, group, config, hessians)
        handled.update(members)
        inputs = _run_layers([layers[i] for i in group_layers], inputs)
    rest = [n for n in names if n not in handled]
    for group in _groups(rest, config):  # linears outside the decoder stack: compressed data-free
        _compress_group(model, group, config, hessians=None)


def _collect_hessians(model, members, layers, group_layers, inputs) -> dict[str, torch.Tensor]:
    """Run the group's dense layers on `inputs`, accumulating X^T X of every member linear's inputs."""
    hessians: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = x.t() @ x
            hessians[name] = hessians[name] + gram if name in hessians else gram

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in members]
    try:
        _run_layers([layers[i] for i in group_layers], inputs)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `SWSCLinear` with an nn.Linear holding its dense weight (for `model.dequantize()`)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, SWSCLinear):
            weight = module.dequantize()
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=weight.device, dtype=dtype or weight.dtype)
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            _swap(model, name, linear)
    if hasattr(model, SHARED_BASES_ATTR):
        delattr(model, SHARED_BASES_ATTR)
    return model
