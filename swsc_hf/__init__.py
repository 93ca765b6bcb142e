"""swsc_hf: shared-weight compression of causal LMs as a transformers quantization plugin.

`import swsc_hf` registers `SWSCConfig` / `SWSCQuantizer` under quant_method "swsc", so
`from_pretrained(..., quantization_config=SWSCConfig(...))` compresses and a saved swsc_hf checkpoint reloads with
plain `from_pretrained`; it also makes PEFT's LoRA wrap compressed layers. Everything in `__all__` is the public
API (one line each in docs/api.md); other names are internal.
"""

from transformers.quantizers import register_quantization_config, register_quantizer

from .atomic_save import atomic_directory, save_atomically
from .bundled import load_smollm2
from .compression import calibration_batches
from .config import PRESETS, SWSCConfig
from .core.spec import LayerSpec
from .data import join_rows, wikitext2_calibration_rows, wikitext2_test_text
from .distill import distill_tables
from .evaluation import PerplexityResult, perplexity
from .generation import compile_decoding, use_decode_attention
from .hub import build_model_card, push_compressed
from .kernels import cpu_isa, set_integer_dot, set_kernels_enabled
from .lora import merge_and_unload, register_with_peft, sync_compressed_layers
from .model_ops import dequantize_model, round_codebooks_to_int8
from .modules import SWSCDenseLinear, SWSCEmbedding, SWSCLinear
from .openvino_export import OpenVINOCausalLM, export_openvino
from .quantizer import SWSCQuantizer, compress_model
from .report import CompressionReport, compression_report
from .table_training import finish_training, prepare_for_training
from .validation import check_checkpoint, verify_checksums

register_quantization_config("swsc")(SWSCConfig)
register_quantizer("swsc")(SWSCQuantizer)
register_with_peft()

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "CompressionReport",
    "LayerSpec",
    "OpenVINOCausalLM",
    "PerplexityResult",
    "SWSCConfig",
    "SWSCDenseLinear",
    "SWSCEmbedding",
    "SWSCLinear",
    "SWSCQuantizer",
    "atomic_directory",
    "build_model_card",
    "calibration_batches",
    "check_checkpoint",
    "compile_decoding",
    "compress_model",
    "cpu_isa",
    "compression_report",
    "dequantize_model",
    "distill_tables",
    "export_openvino",
    "finish_training",
    "join_rows",
    "load_smollm2",
    "merge_and_unload",
    "perplexity",
    "prepare_for_training",
    "push_compressed",
    "register_with_peft",
    "round_codebooks_to_int8",
    "save_atomically",
    "set_integer_dot",
    "set_kernels_enabled",
    "sync_compressed_layers",
    "use_decode_attention",
    "verify_checksums",
    "wikitext2_calibration_rows",
    "wikitext2_test_text",
]
