"""`SWSCQuantizer`, the transformers hook, and `compress_model`, which compresses a model outside `from_pretrained`
and leaves it as the loader would (the one place that imitates the loader).

May import everything below it: `config`, `modules`, `model_ops`, `rotation`, `loading`, `compression`,
`validation`, `hub`.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from .compression import calibration_batches, compress_group, compress_linears, target_names
from .config import SWSCConfig
from .distill import DenseTeacher, distill_tables
from .experts import SWSCExperts
from .hub import install_model_card
from .load_guard import guard_tensors, ignore_patterns
from .loading import SWSCQuantize, raise_compress_errors
from .model_ops import (
    SHARED_BASES_ATTR,
    dequantize_model,
    finalize_compressed_model,
    find_targets,
    mark_compressed,
    plan_head,
    read_embeddings_from_head,
    record_layouts,
    replace_with_shells,
    round_codebooks_to_int8,
    target_shapes,
    tied_weight_names,
    untie_compressed,
)
from .modules import SWSCLinear
from .rotation import attach_rotation, rotate_residual_stream
from .validation import check_checkpoint, check_shard_indexes, checksum_metadata

logger = logging.getLogger(__name__)


class SWSCQuantizer(HfQuantizer):
    """Compress on load (data-free), after load (calibrated), or load an swsc_hf checkpoint."""

    requires_calibration = False
    quantization_config: SWSCConfig

    def validate_environment(self, *args: Any, device_map: Any = None, weights_only: bool = True,
                             **kwargs: Any) -> None:
        config = self.quantization_config
        if self.pre_quantized and not weights_only:
            raise ValueError("swsc_hf checkpoints are safetensors and never need unpickling; drop weights_only=False "
                             "(it would let a pickled file run code)")
        if config.compresses_after_load and not self.pre_quantized and isinstance(device_map, dict):
            if "disk" in device_map.values():
                raise ValueError("calibrated or basis-sharing swsc_hf compression needs every layer in memory; drop "
                                 "'disk' from device_map, or compress data-free without basis sharing, which works "
                                 "with offloading")

    def update_attn_implementation(self, config):
        """The first hook that sees the checkpoint's location (`config.name_or_path`) before transformers reads a
        sharded index: a broken index fails here with the file named."""
        if self.pre_quantized:
            check_shard_indexes(getattr(config, "name_or_path", "") or "")
        return super().update_attn_implementation(config)

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        if isinstance(module, SWSCExperts):
            return tensor_name in module.projections
        return isinstance(module, SWSCLinear) and tensor_name == "weight"

    def param_element_size(self, model, param_name: str, param) -> float:
        """The dense placeholder costs what its compressed form will, so device_map sizing is right."""
        if self.param_needs_quantization(model, param_name):
            module, tensor_name = get_module_from_name(model, param_name)
            layers = module.layers(tensor_name) if isinstance(module, SWSCExperts) else [module]
            return sum(layer.spec.stored_bytes(param.element_size()) for layer in layers) / param.numel()
        return param.element_size()

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any) -> None:
        config = self.quantization_config
        if self.pre_quantized:
            replace_with_shells(model, config, placeholder=False)
            if config.rotate_residual:
                attach_rotation(model)  # its signs arrive with the checkpoint
            untie_compressed(model)  # checkpoints saved before untying existed still say tie_word_embeddings=True
            if config.embedding_from_head:
                read_embeddings_from_head(model, require_tie=False)  # untied when it was saved
            model._keys_to_ignore_on_load_unexpected = (set(model._keys_to_ignore_on_load_unexpected or ())
                                                         | ignore_patterns(config.compressed_layers))
            if checkpoint_files:
                check_checkpoint(model, checkpoint_files, config.compressed_layers, f"{SHARED_BASES_ATTR}.bases")
        elif not config.compresses_after_load:
            config.check_compressible()
            plan_head(model, config)
            config.plan_bits(linear_shapes(model, config))
            replace_with_shells(model, config, placeholder=True)
            tied = tied_weight_names(model)
            self.tied_targets = [name for name, _ in find_targets(model, config.modules_to_not_convert).linears
                                 if f"{name}.weight" in tied]

    def _process_model_after_weight_loading(self, model, **kwargs: Any) -> None:
        config = self.quantization_config
        raise_compress_errors(model)
        for name in getattr(self, "tied_targets", ()):  # tied weights (lm_head) arrive only as their source's
            compress_group(model, [name], config)
        if not self.pre_quantized and config.compresses_after_load:
            compress_model(model, config)
        else:
            finalize_compressed_model(model, config)
        install_model_card(model, base_model=None if self.pre_quantized else model.config._name_or_path)
        allow_dtype_casts(model)

    def get_quantize_ops(self) -> SWSCQuantize:
        return SWSCQuantize(self)

    def _dequantize(self, model, dtype=None):
        return dequantize_model(model, dtype=dtype)

    def get_state_dict_and_metadata(self, model) -> tuple[dict, dict[str, str]]:
        """Before saving: the layouts of the layers as they are now, a CRC32 of every tensor, checked on load, and
        the load guard's empty tensors (so a load without `import swsc_hf` raises instead of loading garbage)."""
        record_layouts(model, self.quantization_config)
        saved = getattr(model.config, "quantization_config", None)
        if isinstance(saved, SWSCConfig) and saved is not self.quantization_config:
            record_layouts(model, saved)
        return {**model.state_dict(), **guard_tensors(model)}, checksum_metadata(model)

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """The shared tables (codebooks, scales, low-rank factors) can be fine-tuned in place."""
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def allow_dtype_casts(model: nn.Module) -> None:
    """transformers refuses `.half()` and `.float()` on every quantized model yet allows `.to(dtype)`; on an swsc_hf
    model all of them cast the dense parts and keep the compressed tables as stored (`KeepsTableDtype`), so this
    instance gets torch's own `half`/`float` back."""
    if isinstance(model, PreTrainedModel):
        # Partials of module-level functions (not bound methods) keep the model picklable and deep-copyable.
        model.half = functools.partial(nn.Module.half, model)
        model.float = functools.partial(nn.Module.float, model)


def linear_shapes(model: nn.Module, config: SWSCConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every matrix compression targets, in model order (what data-free `bits=` plans over): linears,
    Conv1D and each expert's matrices."""
    return target_shapes(model, config.modules_to_not_convert)


def compress_model(model: nn.Module, config: SWSCConfig, tokenizer=None) -> nn.Module:
    """Compress `model` in place as `config` says and make it saveable/reloadable as an swsc_hf checkpoint.

    `tokenizer` (else `config.tokenizer`) is needed for calibrated compression only; calibrated compression ends
    with `config.tune_steps` of distillation toward the dense model (`tune_toward_dense`); with
    `config.int8_codebooks` every layer is installed with its codebook on the 8-bit grid and, after tuning, put
    back on it.
    """
    start = time.perf_counter()
    config.check_compressible()
    if config.rotate_residual:
        if not config.is_calibrated:
            logger.warning("swsc_hf: rotate_residual without calibration (dataset=) measured worse than no rotation "
                           "on SmolLM2 (the folded norm gains weight the data-free fit's errors differently)")
        rotate_residual_stream(model, config.seed)
    plan_head(model, config)
    config.plan_bits(linear_shapes(model, config))
    teacher = (DenseTeacher.before_compression(model, target_names(model, config), keep_norms=config.tune_norms_lr > 0)
               if config.tunes else None)
    compress_linears(model, config, tokenizer)
    mark_compressed(model, config, SWSCQuantizer(config, pre_quantized=True))
    if teacher is not None:
        tune_toward_dense(model, config, teacher, tokenizer or config.tokenizer, time.perf_counter() - start)
    if config.int8_codebooks:
        round_codebooks_to_int8(model)
    finalize_compressed_model(model, config)
    install_model_card(model)
    allow_dtype_casts(model)
    return model


def tune_toward_dense(model: nn.Module, config: SWSCConfig, teacher, tokenizer, spent: float = 0.0) -> list[float]:
    """Distil the compressed tables of `model` toward `teacher` on `config.tune_samples` calibration windows (one
    per step by default), as `config`'s tune_* fields say, within what is left of `config.time_budget` after `spent`
    seconds; returns the losses."""
    budget = None if config.time_budget is None else config.time_budget - spent
    if budget is not None and budget <= 0:
        logger.warning("swsc_hf: compression took %.0f s of the %.0f s time budget; tuning skipped", spent,
                       config.time_budget)
        return []
    device = next(model.parameters()).device
    batches = calibration_batches(config, tokenizer, device, count=config.tune_samples or config.tune_steps)
    return distill_tables(
        model, teacher, batches, steps=config.tune_steps, lr=config.tune_lr,
        scales_lr=config.tune_scales_lr or None, norms_lr=config.tune_norms_lr or None,
        positions=config.tune_positions or None, time_budget=budget, seed=config.seed,
        compute_dtype=config.tune_dtype)
