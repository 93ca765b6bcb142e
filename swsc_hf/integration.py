"""The work behind `SWSCQuantizer`: replacing linears, compress-on-load, calibrated compression, validation."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from .config import SWSCConfig
from .core.compress import CompressedWeight, compress_weight
from .core.packing import unpack_codes
from .core.spec import LayerSpec
from .modules import SWSCLinear
from .safety import check_finite, install_atomic_save, read_safetensors_header

logger = logging.getLogger(__name__)

SHARED_BASES_ATTR = "swsc_shared_bases"


class SWSCSharedBases(nn.Module):
    """Input-side low-rank factors shared by groups of layers (Basis Sharing), stored once in the checkpoint."""

    def __init__(self, shapes: dict[str, tuple[int, int]], dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.bases = nn.ParameterDict(
            {key: nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False) for key, shape in shapes.items()}
        )


def shared_basis_key(module_name: str, group: Iterable[int]) -> str:
    """Key of the basis shared by projection `module_name` (e.g. "q_proj") over the layers in `group`."""
    layers = list(group)
    return f"{module_name.rsplit('.', 1)[-1]}_{layers[0]}_{layers[-1]}"


def target_linears(model: nn.Module, config: SWSCConfig) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules compression replaces (everything not excluded by modules_to_not_convert)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and should_convert_module(name, config.modules_to_not_convert)
    ]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = get_module_from_name(model, name)
    setattr(parent, attr, new)


def link_shared_bases(model: nn.Module) -> None:
    """Point every layer with a shared basis at the model's `SWSCSharedBases` (a plain reference, not a child)."""
    holder = getattr(model, SHARED_BASES_ATTR, None)
    for name, module in model.named_modules():
        if isinstance(module, SWSCLinear) and module.spec.shared_basis is not None:
            if holder is None or module.spec.shared_basis not in holder.bases:
                raise ValueError(f"{name} uses shared basis {module.spec.shared_basis!r}, which the model lacks")
            module.__dict__["shared_basis_module"] = holder


def replace_with_shells(model: nn.Module, config: SWSCConfig, *, placeholder: bool) -> list[str]:
    """Swap targeted linears for empty `SWSCLinear` shells (on the meta device, before weights load).

    For compress-on-load, each shell keeps a `weight` placeholder so the checkpoint's dense weight has a key to
    land on; the quantize op consumes it. For a compressed checkpoint the layouts come from
    `config.compressed_layers` and only layers listed there are replaced.
    """
    replaced = []
    bases: dict[str, tuple[int, int]] = {}
    for name, linear in target_linears(model, config):
        if not placeholder and name not in config.compressed_layers:
            continue
        spec = config.layer_spec(name, linear.out_features, linear.in_features)
        dtype = linear.weight.dtype
        with torch.device("meta"):
            shell = SWSCLinear(spec, bias=linear.bias is not None, dtype=config.table_torch_dtype(dtype),
                               bias_dtype=dtype)
            if placeholder:
                shell.weight = nn.Parameter(torch.empty(spec.out_features, spec.in_features, dtype=dtype),
                                            requires_grad=False)
        if spec.shared_basis is not None:
            bases[spec.shared_basis] = (spec.rank, spec.in_features)
        _swap(model, name, shell)
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


def relative_error(dense: torch.Tensor, compressed: CompressedWeight) -> float:
    """||W - W'||_F / ||W||_F."""
    dense = dense.float()
    return float((dense - compressed.dense()).norm() / dense.norm().clamp_min(1e-30))


class SWSCQuantize(ConversionOps):
    """Compress one dense weight as it arrives from the checkpoint, on the device the loader put it on."""

    def __init__(self, hf_quantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        (value,) = input_dict.values()
        weight = value[0] if isinstance(value, list) else value
        module_name = full_layer_name.rsplit(".", 1)[0]
        module, _ = get_module_from_name(model, full_layer_name)
        config = self.hf_quantizer.quantization_config
        try:
            compressed = compress_weight(
                weight, module.spec, kmeans_iters=config.kmeans_iters, seed=config.seed,
                affine_correction=config.affine_correction,
            )
        except ValueError as err:  # the loader would re-raise it as a generic error after the load report
            raise ValueError(f"swsc_hf could not compress {full_layer_name}: {err}") from err
        module.relative_error = relative_error(weight, compressed)
        del module.weight
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        tensors = SWSCLinear.stored_tensors(compressed, config.table_torch_dtype(weight.dtype))
        return {f"{module_name}.{name}": tensor for name, tensor in tensors.items()}


def record_layouts(model: nn.Module, config: SWSCConfig) -> None:
    """Rewrite `config.compressed_layers` from the model's `SWSCLinear` layers (the loader builds shells from it).

    Run before saving: a compressed LoRA merge changes ranks, and a dequantized layer is no longer compressed.
    """
    config.compressed_layers = {
        name: module.spec.to_dict() for name, module in model.named_modules() if isinstance(module, SWSCLinear)
    }


def finalize_compressed_model(model: nn.Module, config: SWSCConfig) -> None:
    """After loading: record layouts, freeze compressed tensors, link shared bases, check codes and values, and
    make `save_pretrained` atomic."""
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


def validate_codes(name: str, module: SWSCLinear) -> None:
    """Every code must address an existing codeword (a corrupted checkpoint must not gather out of bounds)."""
    spec = module.spec
    if not spec.n_clusters or module.codes.device.type == "meta":
        return
    if spec.n_clusters == 2**spec.code_bits:
        return  # every representable code is valid
    step = 1 << 24
    for start in range(0, spec.n_codes, step):
        count = min(step, spec.n_codes - start)
        top = int(unpack_codes(module.codes, spec.code_bits, count, start).max())
        if top >= spec.n_clusters:
            raise ValueError(f"checkpoint tensor {name}.codes holds code {top} but the codebook has only "
                             f"{spec.n_clusters} entries: the checkpoint is corrupted")


# ---- checkpoint validation (before any weight is read) ---------------------------------------------------------
def validate_checkpoint(files: Iterable[str], config: SWSCConfig, float_dtypes: tuple[str, ...] = ("F16", "BF16",
                        "F32")) -> None:
    """Check every compressed tensor of the checkpoint against the layouts in its config, before loading.

    Missing, unexpected, mis-shaped or mis-typed compressed tensors fail here with the tensor's name, instead of
    loading as randomly initialised values.
    """
    header: dict[str, dict] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise ValueError(f"swsc_hf loads compressed checkpoints from safetensors only, got {Path(file).name}; "
                             "re-save the model with save_pretrained (safe_serialization is the default)")
        header.update(read_safetensors_header(file)[0])
    expected: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    bases: dict[str, tuple[int, int]] = {}
    for name, layer in config.compressed_layers.items():
        spec = LayerSpec.from_dict(layer)
        for tensor, shape in spec.tensor_shapes().items():
            expected[f"{name}.{tensor}"] = (shape, ("U8",) if tensor == "codes" else float_dtypes)
        if spec.shared_basis is not None:
            bases[spec.shared_basis] = (spec.rank, spec.in_features)
    for key, shape in bases.items():
        expected[f"{SHARED_BASES_ATTR}.bases.{key}"] = (shape, float_dtypes)
    for key, (shape, dtypes) in expected.items():
        if key not in header:
            raise ValueError(f"the checkpoint lacks tensor {key} that its quantization_config requires")
        info = header[key]
        if tuple(info["shape"]) != shape or info["dtype"] not in dtypes:
            raise ValueError(f"checkpoint tensor {key} is {info['dtype']} {info['shape']}, expected one of {dtypes} "
                             f"{list(shape)} from its quantization_config")
    prefixes = tuple(f"{name}." for name in config.compressed_layers)
    allowed = {f"{name}.bias" for name in config.compressed_layers}
    unexpected = [k for k in header if k.startswith(prefixes) and k not in expected and k not in allowed]
    if unexpected:
        raise ValueError(f"the checkpoint has tensors its quantization_config does not describe: {unexpected[:5]}")
