"""The compress-on-load step: a transformers `ConversionOps` that compresses each dense weight as it arrives.

May import `config`, `core`, `modules`, `experts` and `model_ops`; the quantizer hands it to the loader.
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.quantizers_utils import get_module_from_name

from .core.compress import compress_weight
from .experts import COMPRESSED, SWSCExperts, expert_matrix
from .model_ops import relative_error
from .modules import SWSCLinear


class SWSCQuantize(ConversionOps):
    """Compress one dense weight as it arrives from the checkpoint, on the device the loader put it on: a linear's
    (transposed for a `Conv1D`), or a fused experts weight, one expert at a time."""

    def __init__(self, hf_quantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        (value,) = input_dict.values()
        weight = value[0] if isinstance(value, list) else value
        module_name = full_layer_name.rsplit(".", 1)[0]
        module, tensor_name = get_module_from_name(model, full_layer_name)
        config = self.hf_quantizer.quantization_config
        dtype = config.table_torch_dtype(weight.dtype)
        if isinstance(module, SWSCExperts):
            out = {}
            for index, layer in enumerate(module.layers(tensor_name)):
                matrix = expert_matrix(weight, index, module.is_transposed)
                tensors = _compress(layer, matrix, f"{full_layer_name}[{index}]", config, dtype)
                out.update({f"{module_name}.{COMPRESSED}.{tensor_name}.{index}.{name}": tensor
                            for name, tensor in tensors.items()})
            delattr(module, tensor_name)
        else:
            matrix = weight.t() if getattr(module, "from_conv1d", False) else weight
            out = {f"{module_name}.{name}": tensor
                   for name, tensor in _compress(module, matrix, full_layer_name, config, dtype).items()}
            del module.weight
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return out


def _compress(layer: SWSCLinear, weight, name: str, config, dtype) -> dict:
    try:
        compressed = compress_weight(weight, layer.spec, **config.fit_options())
    except ValueError as err:
        # Raised here, the loader would only report "issues during automatic conversion", naming no layer: record
        # it, store zeros, and let the quantizer raise it by name once loading is done (`raise_compress_errors`).
        layer.compress_error = f"swsc_hf could not compress {name}: {err}"
        return {key: torch.zeros(shape, dtype=torch.uint8 if key == "codes" else dtype, device=weight.device)
                for key, shape in layer.spec.tensor_shapes().items()}
    layer.relative_error = relative_error(weight, compressed)
    return SWSCLinear.stored_tensors(compressed, dtype, config.int8_codebooks)


def raise_compress_errors(model) -> None:
    """Raise (as a ValueError naming the layer) what `SWSCQuantize` could not compress during loading."""
    failed = [module.compress_error for module in model.modules() if getattr(module, "compress_error", None)]
    if failed:
        more = f" (and {len(failed) - 1} more layers)" if len(failed) > 1 else ""
        raise ValueError(failed[0] + more)
