"""Every change swsc_hf makes to a model: which linears it targets, swapping modules, building `SWSCLinear` layers,
the shared-basis holder and its links, recording layouts, marking a model compressed, and dequantizing.

The compression schedule, the load-time hook, LoRA and the CLI change models only through these functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from .atomic_save import install_atomic_save
from .config import SWSCConfig
from .core.compress import CompressedWeight
from .core.spec import LayerSpec
from .modules import SWSCLinear
from .validation import check_finite, validate_codes

logger = logging.getLogger(__name__)

SHARED_BASES_ATTR = "swsc_shared_bases"


class SWSCSharedBases(nn.Module):
    """Input-side low-rank factors shared by groups of layers (Basis Sharing), stored once in the checkpoint."""

    def __init__(self, shapes: dict[str, tuple[int, int]], dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.bases = nn.ParameterDict(
            {key: nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False) for key, shape in shapes.items()}
        )


# ---- finding and swapping layers ----------------------------------------------------------------------------------
def target_linears(model: nn.Module, modules_to_not_convert: list[str]) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules compression replaces: every one not matched by `modules_to_not_convert`."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and should_convert_module(name, modules_to_not_convert)
    ]


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent, attr = get_module_from_name(model, name)
    setattr(parent, attr, new)


# ---- compressed layers --------------------------------------------------------------------------------------------
def new_layer(spec: LayerSpec, config: SWSCConfig, *, bias: bool, dense_dtype: torch.dtype,
              device: torch.device | str | None = None) -> SWSCLinear:
    """An empty `SWSCLinear` for `spec`: tables in the config's table dtype, the bias in the model's `dense_dtype`."""
    return SWSCLinear(spec, bias=bias, dtype=config.table_torch_dtype(dense_dtype), device=device,
                      bias_dtype=dense_dtype)


def relative_error(dense: torch.Tensor, compressed: CompressedWeight) -> float:
    """||W - W'||_F / ||W||_F."""
    dense = dense.float()
    return float((dense - compressed.dense()).norm() / dense.norm().clamp_min(1e-30))


def install_compressed(model: nn.Module, name: str, compressed: CompressedWeight, config: SWSCConfig) -> SWSCLinear:
    """Replace the dense linear `name` by an `SWSCLinear` holding `compressed` (its bias kept); returns the layer."""
    dense = model.get_submodule(name)
    weight = dense.weight.detach()
    layer = new_layer(compressed.spec, config, bias=dense.bias is not None, dense_dtype=weight.dtype,
                      device=weight.device)
    if dense.bias is not None:
        layer.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    if compressed.spec.shared_basis is not None:
        link_shared_basis(layer, getattr(model, SHARED_BASES_ATTR))
    layer.load_compressed(compressed, config.table_torch_dtype(weight.dtype))
    layer.relative_error = relative_error(weight, compressed)
    swap_module(model, name, layer)
    return layer


def replace_with_shells(model: nn.Module, config: SWSCConfig, *, placeholder: bool) -> list[str]:
    """Swap targeted linears for empty `SWSCLinear` shells (on the meta device, before weights load).

    For compress-on-load, each shell keeps a `weight` placeholder so the checkpoint's dense weight has a key to
    land on; the quantize op consumes it. For a compressed checkpoint the layouts come from
    `config.compressed_layers` and only layers listed there are replaced.
    """
    replaced = []
    bases: dict[str, tuple[int, int]] = {}
    for name, linear in target_linears(model, config.modules_to_not_convert):
        if not placeholder and name not in config.compressed_layers:
            continue
        spec = config.layer_spec(name, linear.out_features, linear.in_features)
        dtype = linear.weight.dtype
        with torch.device("meta"):
            shell = new_layer(spec, config, bias=linear.bias is not None, dense_dtype=dtype)
            if placeholder:
                shell.weight = nn.Parameter(torch.empty(spec.out_features, spec.in_features, dtype=dtype),
                                            requires_grad=False)
        if spec.shared_basis is not None:
            bases[spec.shared_basis] = spec.shared_basis_shape
        swap_module(model, name, shell)
        replaced.append(name)
    unknown = set(config.compressed_layers) - set(replaced)
    if not placeholder and unknown:
        raise ValueError(f"quantization_config lists compressed layers the model does not have as nn.Linear: "
                         f"{sorted(unknown)[:5]}; the checkpoint does not match this architecture")
    if bases:
        with torch.device("meta"):
            setattr(model, SHARED_BASES_ATTR, SWSCSharedBases(bases, dtype=config.table_torch_dtype(model.dtype)))
    if not replaced:
        logger.warning("swsc_hf found no nn.Linear to compress; check modules_to_not_convert")
    return replaced


# ---- shared bases -------------------------------------------------------------------------------------------------
def shared_basis_key(module_name: str, group: Iterable[int]) -> str:
    """Key of the basis shared by projection `module_name` (e.g. "q_proj") over the layers in `group`."""
    layers = list(group)
    return f"{module_name.rsplit('.', 1)[-1]}_{layers[0]}_{layers[-1]}"


def set_shared_basis(model: nn.Module, key: str, basis: torch.Tensor) -> None:
    """Store `basis` (already in its table dtype and device) as the model's shared basis `key`."""
    holder = getattr(model, SHARED_BASES_ATTR, None)
    if holder is None:
        holder = SWSCSharedBases({})
        setattr(model, SHARED_BASES_ATTR, holder)
    holder.bases[key] = nn.Parameter(basis, requires_grad=False)


def link_shared_basis(layer: SWSCLinear, holder: SWSCSharedBases) -> None:
    """Point `layer` at the holder of its shared basis: a plain reference, not a child module (saved once)."""
    layer.__dict__["shared_basis_module"] = holder


def link_shared_bases(model: nn.Module) -> None:
    """Link every layer with a shared basis to the model's `SWSCSharedBases`."""
    holder = getattr(model, SHARED_BASES_ATTR, None)
    for name, module in model.named_modules():
        if isinstance(module, SWSCLinear) and module.spec.shared_basis is not None:
            if holder is None or module.spec.shared_basis not in holder.bases:
                raise ValueError(f"{name} uses shared basis {module.spec.shared_basis!r}, which the model lacks")
            link_shared_basis(module, holder)


# ---- the model as a whole -----------------------------------------------------------------------------------------
def record_layouts(model: nn.Module, config: SWSCConfig) -> None:
    """Rewrite `config.compressed_layers` from the model's `SWSCLinear` layers (the loader builds shells from it).

    Run before saving: a compressed LoRA merge changes ranks, and a dequantized layer is no longer compressed.
    """
    config.compressed_layers = {
        name: module.spec.to_dict() for name, module in model.named_modules() if isinstance(module, SWSCLinear)
    }


def mark_compressed(model: nn.Module, config: SWSCConfig, quantizer) -> None:
    """Make a model compressed outside `from_pretrained` look as the loader leaves one: its quantization config,
    `quantizer` as `hf_quantizer` (unless it has one of the same type), `is_quantized`, the method name."""
    model.config.quantization_config = config
    if not isinstance(getattr(model, "hf_quantizer", None), type(quantizer)):
        model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = "swsc"


def finalize_compressed_model(model: nn.Module, config: SWSCConfig) -> None:
    """After loading or compressing: record layouts, freeze compressed tensors, link shared bases, check codes and
    values, and make `save_pretrained` atomic."""
    for name, module in model.named_modules():
        if not isinstance(module, SWSCLinear):
            continue
        if "weight" in module._parameters:
            raise RuntimeError(f"{name}.weight never arrived from the checkpoint, so the layer was not compressed")
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
        validate_codes(name, module)
        check_finite(name, module)
    record_layouts(model, config)
    link_shared_bases(model)
    holder = getattr(model, SHARED_BASES_ATTR, None)
    if holder is not None:
        holder.requires_grad_(False)
        check_finite(f"{SHARED_BASES_ATTR}.bases", holder.bases)
    install_atomic_save(model)


@torch.no_grad()
def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> nn.Linear:
    """An nn.Linear holding `weight` (out x in) and `bias`, in `dtype` (the weight's by default)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=dtype or weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every `SWSCLinear` with an nn.Linear holding its dense weight (for `model.dequantize()`)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, SWSCLinear):
            swap_module(model, name, dense_linear(module.dequantize(), module.bias, dtype))
    if hasattr(model, SHARED_BASES_ATTR):
        delattr(model, SHARED_BASES_ATTR)
    return model
