"""The compress-on-load step: a transformers `ConversionOps` that compresses each dense weight as it arrives.

May import `config`, `core`, `modules` and `model_ops`; the quantizer hands it to the loader.
"""

from __future__ import annotations

from transformers.core_model_loading import ConversionOps
from transformers.quantizers.quantizers_utils import get_module_from_name

from .core.compress import compress_weight
from .model_ops import relative_error
from .modules import SWSCLinear


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
            compressed = compress_weight(weight, module.spec, **config.fit_options())
        except ValueError as err:  # the loader would re-raise it as a generic error after the load report
            raise ValueError(f"swsc_hf could not compress {full_layer_name}: {err}") from err
        module.relative_error = relative_error(weight, compressed)
        del module.weight
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        tensors = SWSCLinear.stored_tensors(compressed, config.table_torch_dtype(weight.dtype))
        return {f"{module_name}.{name}": tensor for name, tensor in tensors.items()}
