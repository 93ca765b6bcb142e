"""swsc_hf: shared-weight compression of causal LMs as a transformers quantization plugin.

`import swsc_hf` registers `SWSCConfig` / `SWSCQuantizer` under quant_method "swsc", so
`from_pretrained(..., quantization_config=SWSCConfig(...))` compresses and a saved swsc_hf checkpoint reloads with
plain `from_pretrained`.
"""

from transformers.quantizers import register_quantization_config, register_quantizer

from .config import PRESETS, SWSCConfig
from .quantizer import SWSCQuantizer

register_quantization_config("swsc")(SWSCConfig)
register_quantizer("swsc")(SWSCQuantizer)

from .lora import register_with_peft  # noqa: E402
from .modules import SWSCLinear  # noqa: E402
from .pipeline import compress_model, dequantize_model  # noqa: E402
from .report import compression_report  # noqa: E402

register_with_peft()

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "SWSCConfig",
    "SWSCLinear",
    "SWSCQuantizer",
    "compress_model",
    "compression_report",
    "dequantize_model",
]
