"""The compression schedule of a loaded model: which linears are compressed together, in what order, on what data.

Data-free, every group is compressed on its own. Calibrated, decoder layers run in groups (`share_group_size`
layers, 1 by default): the group's inputs are the outputs of the already-compressed earlier groups, each targeted
linear gets the Gram matrix X^T X of its inputs, the group is compressed, and its compressed outputs feed the next
group (GPTQ's sequential pass). Layers that share a basis (Basis Sharing) are compressed together within their group.
With `bits=` and calibration, the layouts are first chosen by measured sensitivity (`allocation`).

With `layer_tune_steps`, each fitted group's tables are tuned toward the dense group's outputs before they feed the
next group (`layer_tuning`).

May import `config`, `core`, `data`, `allocation`, `experts`, `layer_tuning` and `model_ops`; it never marks a model
compressed (the quantizer does), so the quantizer and the multi-process path can both use it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import MatrixViews, allocate, fisher_diagonals
from .config import SWSCConfig
from .core.basis_sharing import fit_separate_factors, fit_shared_basis, shared_rank
from .core.compress import CompressedWeight, compress_weight, to_weight
from .core.lowrank import output_loss
from .core.spec import LayerSpec
from .data import calibration_texts
from .experts import (
    MIN_EXPERT_TOKENS,
    expert_gram_hook,
    expert_layer_name,
    expert_matrix,
    expert_projections,
    is_fused_experts,
)
from .layer_tuning import layers_output, relative_error, tune_layer_tables
from .model_ops import (
    dense_weight,
    experts_specs,
    find_targets,
    install_compressed,
    install_compressed_experts,
    is_conv1d,
    set_shared_basis,
    shared_basis_key,
)

logger = logging.getLogger(__name__)
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def target_names(model: nn.Module, config: SWSCConfig) -> list[str]:
    """Names of the modules compression replaces: targeted linears and fused experts modules, in model order."""
    targets = find_targets(model, config.modules_to_not_convert)
    return [name for name, _ in targets.linears + targets.experts]


def compress_linears(model: nn.Module, config: SWSCConfig, tokenizer=None) -> None:
    """Compress every targeted linear of `model` in place: calibrated when `config` has a dataset, else data-free."""
    targets = find_targets(model, config.modules_to_not_convert)
    modules = targets.linears + targets.experts
    if any(p.device.type == "meta" for _, module in modules for p in module.parameters(recurse=False)):
        raise ValueError("some layers are offloaded (on the meta device); compress them on load instead: "
                         "from_pretrained(..., quantization_config=SWSCConfig(...)) without a dataset")
    names = [name for name, _ in modules]
    if config.is_calibrated:
        compress_calibrated(model, config, tokenizer or config.tokenizer, names)
    else:
        for group in tqdm(compression_groups(names, config), desc="swsc_hf: compressing", unit="group"):
            compress_group(model, group, config)


def layer_index(name: str) -> int | None:
    """The decoder layer a module name belongs to ("model.layers.3.mlp.up_proj" -> 3), None outside the stack."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def compression_groups(names: list[str], config: SWSCConfig) -> list[list[str]]:
    """Units compressed together: the same projection over `share_group_size` adjacent layers, else one linear."""
    grouped: dict[tuple, list[str]] = defaultdict(list)
    for name in names:
        layer = layer_index(name)
        if layer is not None and config.shares_basis(name):
            grouped[(_LAYER_INDEX.sub(".*.", name, count=1), layer // config.share_group_size)].append(name)
        else:
            grouped[(name,)].append(name)
    return list(grouped.values())


def compress_group(model: nn.Module, names: list[str], config: SWSCConfig,
                   hessians: dict[str, torch.Tensor] | None = None,
                   allocation: dict[str, LayerSpec] | None = None) -> None:
    """Compress `names` (one linear, or one projection over a group of layers sharing a basis) and swap them in.

    `hessians` are the layers' input Grams (calibrated), `allocation` the layouts chosen for `bits=`. A fused
    experts module is compressed one expert matrix at a time (`compress_experts`).
    """
    if len(names) == 1 and is_fused_experts(model.get_submodule(names[0])):
        compress_experts(model, names[0], config, hessians, allocation)
        return
    weights = [dense_weight(model.get_submodule(name)).detach() for name in names]
    for name, weight in zip(names, weights, strict=True):
        if weight.is_floating_point() and not torch.isfinite(weight).all():
            raise ValueError(f"swsc_hf could not compress {name}: its weight contains NaN or Inf values; compress "
                             "a finite checkpoint")
    specs = [config.layer_spec(name, *w.shape, allocation) for name, w in zip(names, weights, strict=True)]
    grams = [hessians.get(name) if hessians else None for name in names]
    if len(names) > 1 or config.shares_basis(names[0]):
        results = _compress_shared(model, names, weights, specs, grams, config)
    else:
        results = [compress_weight(weights[0], specs[0], hessian=grams[0], **config.fit_options())]
    for name, result in zip(names, results, strict=True):
        install_compressed(model, name, result, config)


def compress_experts(model: nn.Module, name: str, config: SWSCConfig,
                     hessians: dict[str, torch.Tensor] | None = None,
                     allocation: dict[str, LayerSpec] | None = None) -> None:
    """Compress every expert matrix of the fused experts module `name` with its own layout (and its own Gram of
    the tokens routed to it, where it has one) and swap in an `SWSCExperts`."""
    experts = model.get_submodule(name)
    specs = experts_specs(name, experts, config, allocation)
    compressed = {}
    for projection, layer_specs in specs.items():
        stacked = experts._parameters[projection].detach()
        compressed[projection] = [
            compress_weight(expert_matrix(stacked, index, experts.is_transposed), spec,
                            hessian=(hessians or {}).get(expert_layer_name(name, projection, index)),
                            **config.fit_options())
            for index, spec in enumerate(layer_specs)
        ]
    install_compressed_experts(model, name, compressed, config)


def matrix_views(model: nn.Module, names: list[str]) -> MatrixViews:
    """Where each compressed matrix of `names` lives: a linear's weight (transposed for a Conv1D), or one expert's
    slice of a fused experts weight (under the expert layer's name)."""
    views: MatrixViews = {}
    for name in names:
        module = model.get_submodule(name)
        if not is_fused_experts(module):
            views[name] = (module.weight, (lambda t: t.t()) if is_conv1d(module) else (lambda t: t))
            continue
        for projection in expert_projections(module):
            for index in range(module.num_experts):
                views[expert_layer_name(name, projection, index)] = (
                    module._parameters[projection],
                    lambda t, i=index, m=module: expert_matrix(t, i, m.is_transposed))
    return views


def _compress_shared(model, names, weights, specs, grams, config: SWSCConfig) -> list[CompressedWeight]:
    """Basis Sharing: each layer's codebook term, then one basis for the group's stacked residuals (or, with
    `share_selection="loss"`, separate per-layer factors where they lose less at the same size)."""
    outs = [w.shape[0] for w in weights]
    in_features = weights[0].shape[1]
    rank = shared_rank(outs, in_features, config.rank, config.parameter_ratio)
    key = shared_basis_key(names[0], [layer_index(n) for n in names])
    residuals, results = [], []
    for weight, spec, gram in zip(weights, specs, grams, strict=True):
        result = CompressedWeight(dataclasses.replace(spec, rank=rank, shared_basis=key))
        residual = weight.float()
        if spec.n_clusters:
            fitted = compress_weight(weight, dataclasses.replace(spec, rank=0), hessian=gram, **config.fit_options())
            result.codebook, result.codes, result.scales = fitted.codebook, fitted.codes, fitted.scales
            residual = residual - to_weight(fitted.codebook_term(), spec)
        residuals.append(residual)
        results.append(result)
    parts, basis = fit_shared_basis(residuals, grams, rank, seed=config.seed)
    if config.share_selection == "loss":
        separate = fit_separate_factors(residuals, grams, rank * (sum(outs) + in_features), config.seed)
        shared_loss = sum(output_loss(r, a @ basis, g) for r, a, g in zip(residuals, parts, grams, strict=True))
        separate_loss = sum(output_loss(r, a @ b, g) for r, (a, b), g in zip(residuals, separate, grams, strict=True))
        logger.info("swsc_hf: %s: shared-basis loss %.4g, per-layer loss %.4g at equal parameters", key,
                    shared_loss, separate_loss)
        if separate_loss < shared_loss:
            for result, (a, b) in zip(results, separate, strict=True):
                result.spec = dataclasses.replace(result.spec, rank=a.shape[1], shared_basis=None)
                result.lowrank_a, result.lowrank_b = a, b
            return results
    for result, part in zip(results, parts, strict=True):
        result.lowrank_a, result.lowrank_b = part, basis
    set_shared_basis(model, key, basis.to(weights[0].device, config.table_torch_dtype(weights[0].dtype)))
    return results


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


def calibration_batches(config: SWSCConfig, tokenizer, device: torch.device,
                        count: int | None = None) -> list[torch.Tensor]:
    """`count` (default `n_samples`) windows of `seq_len` tokens, taken at seeded random offsets in the calibration
    text; a larger count extends the same sequence of windows."""
    if tokenizer is None:
        raise ValueError("calibrated compression needs a tokenizer: pass SWSCConfig(tokenizer=...)")
    text = "\n\n".join(calibration_texts(config.dataset))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= config.seq_len:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len={config.seq_len}")
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seq_len, (count or config.n_samples,), generator=generator)
    return [ids[s : s + config.seq_len][None].to(device) for s in starts.tolist()]


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]):
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


def run_layers(layers, inputs):
    """Run captured (hidden states, kwargs) pairs through `layers`; returns the outputs in the same form."""
    return [(layers_output(layers, hidden, kwargs), kwargs) for hidden, kwargs in inputs]


@torch.no_grad()
def compress_calibrated(model: nn.Module, config: SWSCConfig, tokenizer, names: list[str]) -> None:
    """GPTQ-style sequential pass over the decoder layers on calibration data; then the linears outside the stack
    (the output head, when compressed) are fitted on what a forward of the compressed stack feeds them."""
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    batches = calibration_batches(config, tokenizer, device)
    allocation = None
    sized = [n for n in names if n not in config.compressed_layers]  # not a head sized by head_bits
    if config.bits is not None and sized:
        views = matrix_views(model, sized)
        with torch.enable_grad():
            fisher = fisher_diagonals(model, sized, batches, views)
        allocation = allocate(model, sized, config.bits, fisher, seed=config.seed, views=views,
                              vectors=config.bits_ladder == "all")
        del fisher
    inputs = capture_first_layer_inputs(model, layers, batches)
    step = config.share_group_size
    handled: set[str] = set()
    for first in tqdm(range(0, len(layers), step), desc="swsc_hf: calibrated compression", unit="layer"):
        group_layers = list(range(first, min(first + step, len(layers))))
        members = [n for n in names if n.startswith(prefix + ".") and layer_index(n) in group_layers]
        part = [layers[i] for i in group_layers]
        hessians, outputs = collect_hessians(model, members, functools.partial(run_layers, part, inputs))
        tune = bool(config.layer_tune_steps and members)
        targets = [hidden for hidden, _ in outputs] if tune else []  # the dense layers' outputs, for layer tuning
        del outputs
        for group in compression_groups(members, config):
            compress_group(model, group, config, hessians, allocation)
        handled.update(members)
        if tune:
            report = logger.isEnabledFor(logging.DEBUG)  # the error before and after costs two forwards
            before = relative_error(part, inputs[0], targets[0]) if report else 0.0
            tune_layer_tables(part, inputs, targets, config.layer_tune_steps, config.layer_tune_lr,
                              scales_lr=config.tune_scales_lr)
            if report:
                logger.debug("swsc_hf: layers %s tuned toward the dense outputs: relative error %.4f -> %.4f on "
                             "the first window", group_layers, before, relative_error(part, inputs[0], targets[0]))
        del targets
        inputs = run_layers(part, inputs)
    rest = [n for n in names if n not in handled]  # outside the decoder stack: the output head, when compressed
    if rest:
        hessians, _ = collect_hessians(model, rest, functools.partial(run_model, model, batches))
        for group in compression_groups(rest, config):
            compress_group(model, group, config, hessians, allocation)


def run_model(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """A forward of the whole model on each batch (outputs dropped)."""
    for batch in batches:
        model(input_ids=batch, use_cache=False)


def collect_hessians(model, members, run: Callable[[], object]) -> tuple[dict[str, torch.Tensor], object]:
    """X^T X of every member linear's inputs, and of every expert's routed tokens for fused experts, while `run()`
    runs the part of the model that feeds them, and what `run()` returned; an expert that saw fewer than
    `MIN_EXPERT_TOKENS` tokens gets none (it is compressed data-free), and so does a linear `run()` never reaches."""
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    experts = [name for name in members if is_fused_experts(model.get_submodule(name))]
    members = [name for name in members if name not in experts]

    def make_hook(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = x.t() @ x
            hessians[name] = hessians[name] + gram if name in hessians else gram

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in members]
    handles += [model.get_submodule(name).register_forward_hook(
        expert_gram_hook(model.get_submodule(name), hessians, counts, name), with_kwargs=True) for name in experts]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    scarce = sorted(name for name, count in counts.items() if count < MIN_EXPERT_TOKENS)
    if scarce:
        logger.info("swsc_hf: %d expert matrices saw fewer than %d calibration tokens and are compressed data-free: "
                    "%s", len(scarce), MIN_EXPERT_TOKENS, ", ".join(scarce[:4]))
    for name in scarce:
        del hessians[name]
    return hessians, result
